"""Tiny dsel GPTs and an independent plain-torch scorer for the CoLoR tests."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from dsel.models.config import preset
from dsel.models.gpt import GPT


def tiny_gpt(seed: int = 0, **overrides) -> GPT:
    """A 1-layer, d_model 32 GPT (fp32, eval mode) with a seeded random init."""
    settings = dict(vocab_size=64, seq_len=32, n_layer=1, n_head=2, d_model=32)
    torch.manual_seed(seed)
    return GPT(preset("tiny", **{**settings, **overrides})).eval()


def plain_mean_losses(model, tokens: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
    """Mean next-token loss per row from materialised logits and F.cross_entropy (the reference)."""
    with torch.no_grad():
        logits = model.hidden_states(tokens[:, :-1]) @ model.head_weight.T
        per_token = F.cross_entropy(logits.transpose(1, 2), tokens[:, 1:], reduction="none")
    if lengths is None:
        return per_token.mean(1)
    return torch.stack([per_token[b, : int(n) - 1].mean() for b, n in enumerate(lengths)])


def random_windows(n: int, width: int, vocab: int = 64, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (n, width), generator=torch.Generator().manual_seed(seed))
