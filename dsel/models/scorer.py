"""PDS's data scorer: a GPT trunk with a linear head on mean-pooled final hidden states.

It regresses a window's (normalised) data weight gamma; `Scorer.from_gpt` starts it from a
trained LM, as the paper starts its 125M scorer from a pretrained model.
"""
from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn

from dsel.models.config import GPTConfig
from dsel.models.gpt import GPT


class Scorer(nn.Module):
    """tokens [B, W] -> one score per window [B]."""

    arch = "scorer"

    def __init__(self, config: GPTConfig):
        super().__init__()
        # A tied trunk carries no separate LM output layer: the scorer never predicts tokens.
        self.trunk = GPT(replace(config, tie_embeddings=True))
        self.head = nn.Linear(config.d_model, 1)
        nn.init.normal_(self.head.weight, std=config.init_std)
        nn.init.zeros_(self.head.bias)

    @property
    def config(self) -> GPTConfig:
        return self.trunk.config

    @classmethod
    def from_gpt(cls, gpt: GPT) -> "Scorer":
        """A scorer whose trunk (embedding + decoder) is a copy of `gpt`'s, on gpt's device and dtype.

        Its context is one token longer than the LM's: it reads whole training windows (seq_len + 1).
        """
        scorer = cls(replace(gpt.config, seq_len=gpt.config.seq_len + 1)).to(device=gpt.head_weight.device, dtype=gpt.head_weight.dtype)
        trunk = {k: v for k, v in gpt.state_dict().items() if not k.startswith("output_layer.")}
        scorer.trunk.load_state_dict(trunk)
        return scorer

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        pooled = self.trunk.hidden_states(tokens).mean(dim=1)
        return self.head(pooled).squeeze(-1)
