"""A dsel GPT as a transformers causal LM (`trust_remote_code=True`), with a key/value cache for `generate`.

Written for the exports whose architecture no native transformers class computes (dsel.models.hf picks
Llama or GPT-NeoX where one does). It reproduces dsel.models.gpt exactly — megatron's fused grouped QKV
layout, OLMo-style QK-LayerNorm over the full query/key width before the head split and RoPE, LayerNorm
with or without a bias, RMSNorm, GeLU or SwiGLU, rotate-half RoPE — and keeps dsel's parameter names,
so the weights are dsel's state dict unchanged. Standalone: it imports transformers and torch only.
"""
import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_dsel import DselGPTConfig

# transformers 5.x renamed the output's past_key_values to cache; write whichever this version has
CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


def make_norm(config: DselGPTConfig, width: int) -> nn.Module:
    if config.norm == "rmsnorm":
        return nn.RMSNorm(width, eps=config.norm_eps)
    return nn.LayerNorm(width, eps=config.norm_eps, bias=config.norm_bias)


def rotary_angles(position_ids: torch.Tensor, head_dim: int, base: float) -> torch.Tensor:
    """Angles [B, L, head_dim] of positions [B, L] (frequencies repeated twice, as megatron's RotaryEmbedding)."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=position_ids.device) / head_dim))
    angles = position_ids.to(torch.float32)[..., None] * inv_freq
    return torch.cat((angles, angles), dim=-1)


def apply_rotary(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """Rotate x [B, L, H, D] by angles [B, L, D] in the rotate-half convention."""
    cos, sin = angles.cos()[:, :, None, :].to(x.dtype), angles.sin()[:, :, None, :].to(x.dtype)
    first, second = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-second, first), dim=-1) * sin


class SelfAttention(nn.Module):
    def __init__(self, config: DselGPTConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head, self.groups = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        qkv_out = self.groups * (self.n_head // self.groups + 2) * self.head_dim
        self.linear_qkv = nn.Linear(config.hidden_size, qkv_out, bias=config.bias)
        self.linear_proj = nn.Linear(self.n_head * self.head_dim, config.hidden_size, bias=config.bias)
        if config.qk_layernorm:
            self.q_layernorm = make_norm(config, self.n_head * self.head_dim)
            self.k_layernorm = make_norm(config, self.groups * self.head_dim)

    def forward(self, x, angles, mask, cache):
        b, length, _ = x.shape
        per_group = self.n_head // self.groups
        qkv = self.linear_qkv(x).view(b, length, self.groups, (per_group + 2) * self.head_dim)
        q, k, v = qkv.split([per_group * self.head_dim, self.head_dim, self.head_dim], dim=-1)
        q, k = q.reshape(b, length, -1), k.reshape(b, length, -1)
        if hasattr(self, "q_layernorm"):
            q, k = self.q_layernorm(q), self.k_layernorm(k)
        q = apply_rotary(q.view(b, length, self.n_head, self.head_dim), angles).transpose(1, 2)
        k = apply_rotary(k.view(b, length, self.groups, self.head_dim), angles).transpose(1, 2)
        v = v.transpose(1, 2)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        if per_group > 1:
            k, v = k.repeat_interleave(per_group, dim=1), v.repeat_interleave(per_group, dim=1)
        if mask is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.linear_proj(out.transpose(1, 2).reshape(b, length, -1))


class MLP(nn.Module):
    def __init__(self, config: DselGPTConfig):
        super().__init__()
        self.gated = config.hidden_act == "swiglu"
        ffn = config.intermediate_size
        self.linear_fc1 = nn.Linear(config.hidden_size, ffn * (2 if self.gated else 1), bias=config.bias)
        self.linear_fc2 = nn.Linear(ffn, config.hidden_size, bias=config.bias)

    def forward(self, x):
        x = self.linear_fc1(x)
        if self.gated:
            gate, up = x.chunk(2, dim=-1)
            return self.linear_fc2(F.silu(gate) * up)
        return self.linear_fc2(F.gelu(x))


class TransformerLayer(nn.Module):
    def __init__(self, config: DselGPTConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = make_norm(config, config.hidden_size)
        self.self_attention = SelfAttention(config, layer_idx)
        self.pre_mlp_layernorm = make_norm(config, config.hidden_size)
        self.mlp = MLP(config)

    def forward(self, x, angles, mask, cache):
        x = x + self.self_attention(self.input_layernorm(x), angles, mask, cache)
        return x + self.mlp(self.pre_mlp_layernorm(x))


class Decoder(nn.Module):
    def __init__(self, config: DselGPTConfig):
        super().__init__()
        self.layers = nn.ModuleList(TransformerLayer(config, i) for i in range(config.num_hidden_layers))
        self.final_layernorm = make_norm(config, config.hidden_size)


class Embedding(nn.Module):
    def __init__(self, config: DselGPTConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)


def attention_mask_4d(padding: torch.Tensor | None, length: int, past: int, device) -> torch.Tensor | None:
    """Boolean [B, 1, L, past + L] mask: causal over the cached and new positions, padding keys masked.

    None when plain causal attention is exact (no cache, no padding)."""
    if past == 0 and (padding is None or bool(padding.all())):
        return None
    causal = torch.ones(length, past + length, dtype=torch.bool, device=device).tril(past)
    if padding is None:
        return causal[None, None]
    keys = padding[:, -(past + length):].to(torch.bool)[:, None, None, :]
    mask = causal[None, None] & keys
    return mask | ~mask.any(dim=-1, keepdim=True)  # a fully padded query row attends everywhere (its output is unused)


class DselForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = DselGPTConfig
    base_model_prefix = "decoder"
    _no_split_modules = ["TransformerLayer"]
    _supports_sdpa = True
    _tied_weights_keys = {"output_layer.weight": "embedding.word_embeddings.weight"}

    def __init__(self, config: DselGPTConfig):
        super().__init__(config)
        self.embedding = Embedding(config)
        self.decoder = Decoder(config)
        self.output_layer = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=self.config.initializer_range)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)

    def get_input_embeddings(self):
        return self.embedding.word_embeddings

    def set_input_embeddings(self, value):
        self.embedding.word_embeddings = value

    def get_output_embeddings(self):
        return self.output_layer

    def set_output_embeddings(self, value):
        self.output_layer = value

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, inputs_embeds=None,
                labels=None, use_cache=None, logits_to_keep=0, **kwargs):
        cache = kwargs.pop("past_key_values", cache)  # the name before transformers 5.x's rename
        x = self.embedding.word_embeddings(input_ids) if inputs_embeds is None else inputs_embeds
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        past = cache.get_seq_length() if isinstance(cache, Cache) else 0
        length = x.shape[1]
        if position_ids is None:
            position_ids = torch.arange(past, past + length, device=x.device)[None].expand(x.shape[0], -1)
        angles = rotary_angles(position_ids, self.config.hidden_size // self.config.num_attention_heads,
                               self.config.rope_theta)
        mask = attention_mask_4d(attention_mask, length, past, x.device)
        for layer in self.decoder.layers:
            x = layer(x, angles, mask, cache)
        hidden = self.decoder.final_layernorm(x)
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        logits = self.output_layer(hidden)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{CACHE_FIELD: cache if use_cache else None})
