"""GPT architecture settings shared by the torch model and the megatron-core backend.

The fields mirror megatron-core's TransformerConfig so one GPTConfig builds either model and
their weights map one to one.
"""
from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Literal, Optional

from dsel.config import option
from dsel.errors import DselError


@dataclass
class GPTConfig:
    """A pre-norm decoder-only transformer with rotary position embeddings."""

    vocab_size: int = option(32000, "vocabulary size (padded up to a multiple of 128 by the tokenizer stage)")
    seq_len: int = option(512, "context length")
    n_layer: int = option(12, "transformer layers")
    n_head: int = option(12, "attention heads")
    n_query_groups: Optional[int] = option(None, "key/value heads for grouped-query attention; None = n_head")
    d_model: int = option(768, "hidden size")
    ffn_hidden: Optional[int] = option(None, "MLP hidden size; None = 4*d_model (gelu) or 8/3*d_model rounded (swiglu)")
    activation: Literal["gelu", "swiglu"] = option("gelu", "MLP activation")
    norm: Literal["layernorm", "rmsnorm"] = option("layernorm", "normalisation layer")
    norm_eps: float = option(1e-5, "normalisation epsilon")
    bias: bool = option(False, "biases in linear layers")
    norm_bias: bool = option(True, "a bias (shift) in every LayerNorm; False = scale only (OLMo/CoLoR: no LayerNorm bias)")
    qk_layernorm: bool = option(False, "LayerNorm on the queries and keys over their full width, before the head split "
                                       "and RoPE (OLMo's attention_layer_norm, used by CoLoR-Filter)")
    tie_embeddings: bool = option(False, "share the input embedding and the output head")
    rope_base: float = option(10000.0, "rotary embedding base")
    init_std: float = option(0.02, "std of the normal weight init")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    @property
    def kv_heads(self) -> int:
        return self.n_query_groups or self.n_head

    @property
    def ffn_size(self) -> int:
        if self.ffn_hidden:
            return self.ffn_hidden
        if self.activation == "swiglu":
            return 64 * ((8 * self.d_model // 3 + 63) // 64)
        return 4 * self.d_model

    def validate(self, source: str = "model config") -> "GPTConfig":
        """Raise a DselError for sizes that cannot build a model."""
        if self.d_model % self.n_head:
            raise DselError(f"{source}: d_model={self.d_model} is not divisible by n_head={self.n_head}")
        if self.n_head % self.kv_heads:
            raise DselError(f"{source}: n_head={self.n_head} is not divisible by n_query_groups={self.kv_heads}")
        if self.head_dim % 2:
            raise DselError(f"{source}: head_dim={self.head_dim} must be even for rotary embeddings")
        return self

    def num_params(self, include_embedding: bool = True) -> int:
        """Parameter count (weights only; norms and biases are ignored as negligible)."""
        attn = self.d_model * self.head_dim * (self.n_head * 2 + self.kv_heads * 2)
        mlp = self.d_model * self.ffn_size * (3 if self.activation == "swiglu" else 2)
        emb = self.vocab_size * self.d_model * (1 if self.tie_embeddings else 2)
        return self.n_layer * (attn + mlp) + (emb if include_embedding else 0)

    def flops_per_token(self, training: bool = False) -> float:
        """Matmul FLOPs per token: 2*params for the forward, plus attention scores; x3 for training."""
        fwd = 2 * (self.num_params(include_embedding=False) + self.vocab_size * self.d_model)
        fwd += 2 * 2 * self.n_layer * self.seq_len * self.d_model
        return 3 * fwd if training else fwd


PRESETS: dict[str, GPTConfig] = {
    # Tiny models that train in seconds on a CPU (tests, the quickstart).
    "tiny": GPTConfig(vocab_size=512, seq_len=64, n_layer=2, n_head=4, d_model=64),
    "small-cpu": GPTConfig(vocab_size=4096, seq_len=128, n_layer=4, n_head=4, d_model=128),
    # The papers' models.
    "pds-160m": GPTConfig(vocab_size=50304, seq_len=1024, n_layer=12, n_head=12, d_model=768),
    "pds-scorer-125m": GPTConfig(vocab_size=50304, seq_len=1024, n_layer=12, n_head=12, d_model=768),
    # CoLoR-Filter's OLMo prior (configs/base.yaml of color-filter-olmo): QK-LayerNorm, no biases anywhere.
    "color-150m": GPTConfig(vocab_size=50304, seq_len=512, n_layer=12, n_head=16, d_model=1024, norm_bias=False,
                            qk_layernorm=True),
    # CoLoR-Filter's 1.2B target model (configs/sweeps/pretrain-1b.yaml): d 2048, 24 layers, 32 heads, MLP 8192.
    "color-1b": GPTConfig(vocab_size=50304, seq_len=512, n_layer=24, n_head=32, d_model=2048, norm_bias=False,
                          qk_layernorm=True),
    "gpt-1b": GPTConfig(vocab_size=50304, seq_len=2048, n_layer=24, n_head=16, d_model=2048),
}


def preset(name: str, **overrides) -> GPTConfig:
    """A copy of a named preset with some fields changed."""
    if name not in PRESETS:
        raise DselError(f"unknown model preset '{name}'; choose one of {', '.join(PRESETS)}")
    return replace(PRESETS[name], **overrides)


# The settings of the original dsel GPT. Code that re-implements the forward elsewhere (the transformers
# export, the KV-cached decoder) reproduces exactly these and refuses or falls back on any other.
CORE_FIELDS = frozenset({"vocab_size", "seq_len", "n_layer", "n_head", "n_query_groups", "d_model", "ffn_hidden",
                         "activation", "norm", "norm_eps", "bias", "tie_embeddings", "rope_base", "init_std"})


def settings_beyond_core(config: GPTConfig) -> list[str]:
    """Fields outside CORE_FIELDS that `config` sets to something other than their default."""
    defaults = GPTConfig()
    return [f.name for f in fields(GPTConfig)
            if f.name not in CORE_FIELDS and getattr(config, f.name) != getattr(defaults, f.name)]
