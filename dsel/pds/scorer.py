"""PDS's fitted data scorer as a score-engine scorer: one "pds" score per window.

`dsel.score.engine.score_windows(windows, PDSScorer(...), out_dir, ...)` runs it over a corpus;
the score registry builds it by name ("pds") through `build_scorer({"model": DIR}, device)`.
"""
from __future__ import annotations

import torch
from torch import nn

from dsel.errors import DselError


class PDSScorer:
    """tokens [B, W] -> {"pds": predicted (z-scored) data weight [B]}."""

    columns = ["pds"]

    def __init__(self, model: nn.Module, device: str | torch.device = "cpu", name: str = "scorer",
                 meta: dict | None = None):
        self.model = model.to(device).eval()
        self.device = torch.device(device)
        self.name = name
        self.checkpoints = [(name, meta or {})]  # (checkpoint, meta): `dsel score` checks the corpus tokenizer
        self.vocab_size = model.config.vocab_size

    @torch.no_grad()
    def __call__(self, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        tokens = tokens.to(self.device, dtype=torch.long)
        if tokens.numel() and int(tokens.max()) >= self.vocab_size:
            raise DselError(f"{self.name}: token id {int(tokens.max())} is past the scorer's vocabulary "
                            f"of {self.vocab_size}; the corpus was tokenized with a different tokenizer")
        return {"pds": self.model(tokens).float()}


def load_pds_scorer(path: str, device: str | torch.device = "cpu") -> PDSScorer:
    """A PDSScorer from a checkpoint written by `dsel pds fit-scorer`."""
    from dsel.models.checkpoint import load_model
    from dsel.models.scorer import Scorer

    model, meta = load_model(path, device)
    if not isinstance(model, Scorer):
        raise DselError(f"{path}: holds a '{model.arch}' model, not a PDS scorer (run `dsel pds fit-scorer`)")
    return PDSScorer(model, device, name=str(path), meta=meta)


def build_scorer(cfg: dict, device: torch.device) -> PDSScorer:
    """Score-registry builder: cfg = {"model": scorer checkpoint directory}."""
    unknown = set(cfg) - {"model"}
    if unknown or "model" not in cfg:
        raise DselError(f"pds scorer settings: expected {{model: CHECKPOINT_DIR}}, got keys {sorted(cfg)}")
    return load_pds_scorer(cfg["model"], device)
