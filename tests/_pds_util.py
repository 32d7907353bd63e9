"""A tiny causal LM with the GPT contract (hidden_states, head_weight) for the PDS tests."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class TinyLM(nn.Module):
    """Embedding, one pre-norm attention + MLP block, final norm, untied head."""

    def __init__(self, vocab_size: int = 13, d_model: int = 8, n_head: int = 2, seq_len: int = 16):
        super().__init__()
        self.n_head = n_head
        self.embed = nn.Embedding(vocab_size, d_model)
        self.pos = nn.Parameter(0.1 * torch.randn(seq_len, d_model))
        self.norm1 = nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.proj = nn.Linear(d_model, d_model, bias=False)
        self.norm2 = nn.LayerNorm(d_model)
        self.fc1 = nn.Linear(d_model, 2 * d_model)
        self.fc2 = nn.Linear(2 * d_model, d_model)
        self.final_norm = nn.LayerNorm(d_model)
        self.output = nn.Linear(d_model, vocab_size, bias=False)
        self.vocab_size = vocab_size

    @property
    def head_weight(self) -> torch.Tensor:
        return self.output.weight

    def hidden_states(self, tokens: torch.Tensor) -> torch.Tensor:
        b, length = tokens.shape
        x = self.embed(tokens) + self.pos[:length]
        q, k, v = self.qkv(self.norm1(x)).view(b, length, 3, self.n_head, -1).permute(2, 0, 3, 1, 4)
        attn = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(attn.transpose(1, 2).reshape(b, length, -1))
        x = x + self.fc2(F.gelu(self.fc1(self.norm2(x))))
        return self.final_norm(x)


def tiny_lm(seed: int = 0, dtype=torch.float64, **kwargs) -> TinyLM:
    torch.manual_seed(seed)
    return TinyLM(**kwargs).to(dtype)


def random_tokens(n: int, length: int, vocab: int = 13, seed: int = 0):
    import numpy as np

    return np.random.default_rng(seed).integers(0, vocab, size=(n, length))


def reference_losses(model: TinyLM, params: dict, tokens: torch.Tensor) -> torch.Tensor:
    """Mean next-token loss per window with full logits, via the module's own parameter names."""
    logits = torch.func.functional_call(_LogitsView(model), {f"model.{k}": v for k, v in params.items()}, (tokens[:, :-1],))
    return F.cross_entropy(logits.transpose(1, 2), tokens[:, 1:], reduction="none").mean(dim=1)


class _LogitsView(nn.Module):
    def __init__(self, model: TinyLM):
        super().__init__()
        self.model = model

    def forward(self, tokens):
        return self.model.hidden_states(tokens) @ self.model.head_weight.T
