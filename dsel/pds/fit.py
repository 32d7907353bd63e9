"""Fitting PDS's data scorer: regression of a sequence model's score on the normalised gamma.

The scorer (dsel.models.scorer.Scorer: a transformer trunk + a linear head on mean-pooled final
hidden states) learns to predict the z-scored data weight of each proxy window, so that it can
then weight windows it has never seen. Quality is the Pearson and Spearman correlation between
predictions and gamma on a held-out split of the proxy windows.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from dsel.config import option
from dsel.errors import DselError
from dsel.io import progress

log = logging.getLogger(__name__)


@dataclass
class FitConfig:
    """Optimisation settings of the scorer regression."""

    epochs: int = option(3, "passes over the training split")
    lr: float = option(1e-4, "AdamW learning rate")
    weight_decay: float = option(0.0, "AdamW weight decay")
    batch_size: int = option(16, "windows per step")
    val_fraction: float = option(0.1, "share of the proxy windows held out for the reported correlations")
    seed: int = option(0, "seed of the split and the batch order")


def normalise_gamma(gamma: np.ndarray) -> tuple[np.ndarray, dict]:
    """z-scored gamma (the regression target) and the mean/std used."""
    mean, std = float(gamma.mean()), float(gamma.std())
    if not std > 0:
        raise DselError("gamma is uniform, there is nothing to fit: run `dsel pds solve` with more outer "
                        "epochs or a larger solver.alpha")
    return (gamma - mean) / std, {"mean": mean, "std": std}


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a - a.mean(), b - b.mean()
    denom = np.sqrt((a * a).sum() * (b * b).sum())
    return float((a * b).sum() / denom) if denom > 0 else 0.0


def average_ranks(x: np.ndarray) -> np.ndarray:
    """Ranks 0..n-1, ties sharing their average rank (gamma has many exact zeros)."""
    values, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    first = np.cumsum(counts) - counts
    return (first + (counts - 1) / 2.0)[inverse]


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    return pearson(average_ranks(a), average_ranks(b))


def split_ids(n: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train ids, validation ids), a seeded random split with at least one of each."""
    if n < 2:
        raise DselError(f"fitting the scorer needs at least 2 proxy windows, got {n}")
    order = np.random.default_rng(seed).permutation(n)
    num_val = min(n - 1, max(1, int(round(n * val_fraction))))
    return np.sort(order[num_val:]), np.sort(order[:num_val])


@torch.no_grad()
def predict(scorer: nn.Module, tokens: np.ndarray, batch_size: int, device: torch.device) -> np.ndarray:
    scorer.eval()
    out = [scorer(torch.as_tensor(tokens[i : i + batch_size], dtype=torch.long, device=device)).float().cpu()
           for i in range(0, len(tokens), batch_size)]
    return torch.cat(out).double().numpy()


def fit_scorer(scorer: nn.Module, tokens: np.ndarray, gamma: np.ndarray, cfg: FitConfig,
               device: torch.device, show_progress: bool = True) -> dict:
    """Train `scorer` in place on (tokens[n], z-scored gamma[n]); return the split's metrics."""
    if len(tokens) != len(gamma):
        raise DselError(f"fitting the scorer: {len(gamma)} gamma values for {len(tokens)} proxy windows")
    target, stats = normalise_gamma(np.asarray(gamma, dtype=np.float64))
    train_ids, val_ids = split_ids(len(tokens), cfg.val_fraction, cfg.seed)
    optimizer = torch.optim.AdamW(scorer.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    rng = np.random.default_rng(cfg.seed + 1)
    steps = cfg.epochs * -(-len(train_ids) // cfg.batch_size)
    bar = progress(total=steps, desc="pds fit-scorer", disable=not show_progress)
    for epoch in range(cfg.epochs):
        scorer.train()
        order = rng.permutation(train_ids)
        for start in range(0, len(order), cfg.batch_size):
            ids = np.sort(order[start : start + cfg.batch_size])
            batch = torch.as_tensor(tokens[ids], dtype=torch.long, device=device)
            y = torch.as_tensor(target[ids], dtype=torch.float32, device=device)
            loss = nn.functional.mse_loss(scorer(batch).float(), y)
            if not torch.isfinite(loss):
                raise DselError(f"fitting the scorer: the loss is {loss.item()} at epoch {epoch}; lower fit.lr")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            bar.update(1)
            bar.set_postfix(mse=f"{loss.item():.4f}")
    bar.close()
    metrics = {"normalisation": {"kind": "zscore", **stats}, "train_windows": len(train_ids), "val_windows": len(val_ids)}
    for name, ids in (("train", train_ids), ("val", val_ids)):
        pred = predict(scorer, tokens[ids], cfg.batch_size, device)
        metrics[name] = {"mse": float(np.mean((pred - target[ids]) ** 2)),
                         "pearson": pearson(pred, target[ids]), "spearman": spearman(pred, target[ids])}
    log.info("pds fit-scorer: validation pearson %.3f spearman %.3f (%d windows)",
             metrics["val"]["pearson"], metrics["val"]["spearman"], len(val_ids))
    return metrics
