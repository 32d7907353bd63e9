"""The dsel GPT: a pre-norm decoder with rotary embeddings, laid out like megatron-core's GPTModel.

Parameter names and shapes are those of megatron-core's local layer spec (`embedding.
word_embeddings`, `decoder.layers.{i}.self_attention.linear_qkv`, ..., `output_layer`), and the
fused QKV weight uses megatron's grouped layout (per key/value group: that group's query heads,
then its key head, then its value head). A dsel checkpoint therefore loads into a megatron-core
model with a renaming at most (dsel.train.megatron.convert), and the same weights give the same
logits in both.

The LM head is fused with the loss (`kernels.linear_cross_entropy`): training, scoring and
evaluation never materialise the [tokens x vocab] logits; `forward` does, for small uses only.
"""
from __future__ import annotations

import hashlib
import math

import torch
import torch.nn.functional as F
from torch import nn

from dsel.models.config import GPTConfig

IGNORE_INDEX = -100


def parameter_generator(seed: int, name: str) -> torch.Generator:
    """The RNG of one parameter's init, a function of (seed, name) alone.

    Any tensor of a model, hence any tensor- or pipeline-parallel shard of it, can then be drawn
    without drawing the others: the megatron backend builds only its rank's shard and still
    starts from exactly the weights the torch backend starts from.
    """
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


@torch.no_grad()
def init_parameter_(name: str, p: torch.Tensor, config: GPTConfig, generator: torch.Generator | None = None) -> None:
    """Megatron's init of parameter `name`: N(0, std) weights, std/sqrt(2*layers) for the residual outputs,
    unit norm weights, zero biases."""
    std = config.init_std
    if "layernorm" in name:
        p.fill_(1.0 if name.endswith("weight") else 0.0)
    elif name.endswith("bias"):
        p.zero_()
    elif name.endswith(("linear_proj.weight", "linear_fc2.weight")):
        p.normal_(0.0, std / math.sqrt(2 * config.n_layer), generator=generator)
    else:
        p.normal_(0.0, std, generator=generator)


def make_norm(config: GPTConfig, width: int | None = None) -> nn.Module:
    """LayerNorm (with a bias unless norm_bias=False) or RMSNorm over `width` (default d_model) features."""
    width = width or config.d_model
    if config.norm == "rmsnorm":
        return nn.RMSNorm(width, eps=config.norm_eps)
    return nn.LayerNorm(width, eps=config.norm_eps, bias=config.norm_bias)


def rotary_frequencies(seq_len: int, head_dim: int, base: float, device=None) -> torch.Tensor:
    """Rotation angles [seq_len, head_dim]: megatron's RotaryEmbedding (frequencies repeated twice)."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim))
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float32, device=device), inv_freq)
    return torch.cat((angles, angles), dim=-1)


def apply_rotary(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """Rotate x [B, L, H, D] by angles [L, D] in the non-interleaved (rotate-half) convention."""
    cos, sin = angles.cos()[:, None, :].to(x.dtype), angles.sin()[:, None, :].to(x.dtype)
    first, second = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-second, first), dim=-1) * sin


class SelfAttention(nn.Module):
    """Causal grouped-query attention with a fused QKV projection in megatron's layout."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head, self.groups, self.head_dim = config.n_head, config.kv_heads, config.head_dim
        qkv_out = self.groups * (self.n_head // self.groups + 2) * self.head_dim
        self.linear_qkv = nn.Linear(config.d_model, qkv_out, bias=config.bias)
        self.linear_proj = nn.Linear(self.n_head * self.head_dim, config.d_model, bias=config.bias)
        if config.qk_layernorm:  # OLMo's q_norm/k_norm: one norm over all heads' features
            self.q_layernorm = make_norm(config, self.n_head * self.head_dim)
            self.k_layernorm = make_norm(config, self.groups * self.head_dim)

    def forward(self, x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
        b, length, _ = x.shape
        per_group = self.n_head // self.groups
        qkv = self.linear_qkv(x).view(b, length, self.groups, (per_group + 2) * self.head_dim)
        q, k, v = qkv.split([per_group * self.head_dim, self.head_dim, self.head_dim], dim=-1)
        q, k = q.reshape(b, length, -1), k.reshape(b, length, -1)  # heads in order, group by group
        if hasattr(self, "q_layernorm"):
            q, k = self.q_layernorm(q), self.k_layernorm(k)
        q = apply_rotary(q.view(b, length, self.n_head, self.head_dim), angles)
        k = apply_rotary(k.view(b, length, self.groups, self.head_dim), angles)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B, heads, L, D]
        if per_group > 1:
            k, v = k.repeat_interleave(per_group, dim=1), v.repeat_interleave(per_group, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.linear_proj(out.transpose(1, 2).reshape(b, length, -1))


class MLP(nn.Module):
    """GeLU MLP, or SwiGLU with the gate and up projections stacked in one `linear_fc1`."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.gated = config.activation == "swiglu"
        fc1_out = config.ffn_size * (2 if self.gated else 1)
        self.linear_fc1 = nn.Linear(config.d_model, fc1_out, bias=config.bias)
        self.linear_fc2 = nn.Linear(config.ffn_size, config.d_model, bias=config.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.linear_fc1(x)
        if self.gated:
            gate, up = x.chunk(2, dim=-1)
            x = F.silu(gate) * up
        else:
            x = F.gelu(x)
        return self.linear_fc2(x)


class TransformerLayer(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.input_layernorm = make_norm(config)
        self.self_attention = SelfAttention(config)
        self.pre_mlp_layernorm = make_norm(config)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attention(self.input_layernorm(x), angles)
        return x + self.mlp(self.pre_mlp_layernorm(x))


class Decoder(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.layers = nn.ModuleList(TransformerLayer(config) for _ in range(config.n_layer))
        self.final_layernorm = make_norm(config)


class Embedding(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.d_model)


class GPT(nn.Module):
    """Decoder-only LM. `hidden_states` + `head_weight` is the contract the PDS solver and scorers use."""

    arch = "gpt"

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config.validate()
        self.embedding = Embedding(config)
        self.decoder = Decoder(config)
        if not config.tie_embeddings:
            self.output_layer = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.reset_parameters()

    def reset_parameters(self, seed: int | None = None) -> None:
        """Megatron's init (see init_parameter_); with `seed`, each tensor from its own parameter_generator."""
        for name, p in self.named_parameters():
            init_parameter_(name, p, self.config, None if seed is None else parameter_generator(seed, name))

    @property
    def head_weight(self) -> torch.Tensor:
        """The output projection [V, d] (the input embedding when tied)."""
        return self.embedding.word_embeddings.weight if self.config.tie_embeddings else self.output_layer.weight

    def hidden_states(self, tokens: torch.Tensor) -> torch.Tensor:
        """Final-normed hidden states [B, L, d] of token ids [B, L]."""
        if tokens.shape[1] > self.config.seq_len:
            raise ValueError(f"{tokens.shape[1]} tokens exceed the model's context of {self.config.seq_len}")
        angles = rotary_frequencies(tokens.shape[1], self.config.head_dim, self.config.rope_base, tokens.device)
        x = self.embedding.word_embeddings(tokens)
        for layer in self.decoder.layers:
            x = layer(x, angles)
        return self.decoder.final_layernorm(x)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Logits [B, L, V] (materialised: for tests and small evaluations)."""
        hidden = self.hidden_states(tokens)
        return hidden @ self.head_weight.to(hidden.dtype).T

    def token_losses(self, tokens: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        """Next-token cross-entropy [B, W-1] of windows [B, W] (0 where targets are IGNORE_INDEX).

        Without `targets` the window predicts its own shifted tokens; the head and the loss are
        fused, so no logits are materialised.
        """
        from kernels import head_operands, linear_cross_entropy

        inputs = tokens[:, :-1]
        targets = tokens[:, 1:] if targets is None else targets
        hidden, weight = head_operands(self.hidden_states(inputs), self.head_weight)  # bf16 under autocast
        losses = linear_cross_entropy(hidden.flatten(0, 1), weight, targets.flatten())
        return losses.view(targets.shape)

    def sequence_losses(self, tokens: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        """Mean next-token loss of each window [B] over its non-ignored targets (float32)."""
        targets = tokens[:, 1:] if targets is None else targets
        counts = (targets != IGNORE_INDEX).sum(dim=1).clamp(min=1)
        return self.token_losses(tokens, targets).float().sum(dim=1) / counts

    def loss(self, tokens: torch.Tensor, weights: torch.Tensor | None = None, z_loss: float = 0.0) -> torch.Tensor:
        """Training loss: the mean window loss, or sum_n weights[n] * loss_n (PDS's weighted loss).

        `z_loss` adds z_loss * mean(logsumexp(logits)^2) over the targets (OLMo's softmax auxiliary
        loss, which CoLoR-Filter's models train with at 1e-4).
        """
        from kernels import linear_cross_entropy

        targets = tokens[:, 1:]
        hidden = self.hidden_states(tokens[:, :-1])
        head = self.head_weight.to(hidden.dtype)
        token = linear_cross_entropy(hidden.flatten(0, 1), head, targets.flatten()).view(targets.shape)
        losses = token.float().mean(dim=1)
        if weights is None:
            loss = losses.mean()
        elif weights.shape != losses.shape:
            raise ValueError(f"weights of shape {tuple(weights.shape)} for {len(losses)} windows")
        else:
            loss = (weights.to(losses) * losses).sum()
        if z_loss:
            loss = loss + z_loss * squared_log_normaliser(hidden, head, targets, token)
        return loss


def squared_log_normaliser(hidden: torch.Tensor, head: torch.Tensor, targets: torch.Tensor,
                           token_losses: torch.Tensor) -> torch.Tensor:
    """mean over non-ignored targets of logsumexp(logits)^2, without the logits.

    The cross-entropy of a target is logsumexp(z) - z_target, so logsumexp(z) = loss + h . w_target:
    one gathered row of the head per token instead of a [tokens x vocab] matrix.
    """
    valid = targets != IGNORE_INDEX
    target_logit = (hidden.float() * head[targets.clamp(min=0)].float()).sum(-1)
    log_normaliser = token_losses.float() + target_logit
    return (log_normaliser.pow(2) * valid).sum() / valid.sum().clamp(min=1)
