"""Fitting PDS's data scorer: regression of a sequence model's score on the solve's target.

The scorer (dsel.models.scorer.Scorer: a transformer trunk + a linear head on mean-pooled final
hidden states) learns to predict `target.npy` of `dsel pds solve` (by default G z-scored over the
proxy set and clipped to +-3), so that it can then score windows it has never seen. The recipe is
the official one: AdamW with linear warmup and cosine decay, gradient-norm clipping, MSE, and the
checkpoint with the best validation Spearman correlation kept. Quality is the Pearson and Spearman
correlation between predictions and target on a held-out split of the proxy windows.
"""
from __future__ import annotations

import copy
import logging
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from dsel.config import option
from dsel.errors import DselError
from dsel.io import progress
from dsel.train.schedule import lr_at

log = logging.getLogger(__name__)


@dataclass
class FitConfig:
    """Optimisation settings of the scorer regression (defaults: the official recipe)."""

    epochs: int = option(5, "passes over the training split (official: 5)")
    lr: float = option(1e-4, "AdamW peak learning rate (official: 1e-4)")
    warmup: int = option(10, "linear warmup steps (official: 10)")
    min_lr_ratio: float = option(0.0, "cosine decay to this fraction of lr at the last step (official: 0)")
    weight_decay: float = option(0.01, "AdamW weight decay (official: 0.01)")
    grad_clip: float = option(1.0, "gradient-norm clip, 0 = off (official: 1.0)")
    batch_size: int = option(16, "windows per step (official: 512)")
    val_fraction: float = option(0.1, "share of the proxy windows held out for validation and model choice")
    eval_every: int = option(0, "validate every k steps (0 = after every epoch); the best-Spearman model is kept")
    seed: int = option(0, "seed of the split and the batch order")


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation; nan when either side is constant (undefined)."""
    a, b = a - a.mean(), b - b.mean()
    denom = np.sqrt((a * a).sum() * (b * b).sum())
    return float((a * b).sum() / denom) if denom > 0 else float("nan")


def average_ranks(x: np.ndarray) -> np.ndarray:
    """Ranks 0..n-1, ties sharing their average rank (clipped targets have ties)."""
    values, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    first = np.cumsum(counts) - counts
    return (first + (counts - 1) / 2.0)[inverse]


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    return pearson(average_ranks(a), average_ranks(b))


def split_ids(n: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train ids, validation ids), a seeded random split with at least two of each."""
    if n < 4:
        raise DselError(f"fitting the scorer needs at least 4 proxy windows, got {n}")
    order = np.random.default_rng(seed).permutation(n)
    num_val = min(n - 2, max(2, int(round(n * val_fraction))))
    return np.sort(order[num_val:]), np.sort(order[:num_val])


def check_target(target: np.ndarray, source: str) -> np.ndarray:
    """The scorer target as float64, refused when non-finite or (near-)constant."""
    target = np.asarray(target, dtype=np.float64)
    if not np.isfinite(target).all():
        raise DselError(f"{source}: the scorer target holds non-finite values")
    if not target.std() > 1e-6 * max(np.abs(target).max(), 1e-300):
        raise DselError(f"{source}: the scorer target has no spread (std {target.std():.3g}): nothing to fit; "
                        "rerun `dsel pds solve` with solver.target_kind=zscore or more solver.steps")
    return target


@torch.no_grad()
def predict(scorer: nn.Module, tokens: np.ndarray, batch_size: int, device: torch.device) -> np.ndarray:
    scorer.eval()
    out = [scorer(torch.as_tensor(tokens[i : i + batch_size], dtype=torch.long, device=device)).float().cpu()
           for i in range(0, len(tokens), batch_size)]
    return torch.cat(out).double().numpy()


def evaluate(scorer: nn.Module, tokens: np.ndarray, target: np.ndarray, batch_size: int,
             device: torch.device) -> dict:
    """MSE, Pearson and Spearman of the scorer's predictions against the target."""
    pred = predict(scorer, tokens, batch_size, device)
    return {"mse": float(np.mean((pred - target) ** 2)), "pearson": pearson(pred, target),
            "spearman": spearman(pred, target)}


def check_correlation(metrics: dict, step: int) -> None:
    """Refuse an undefined validation correlation (a constant prediction) instead of reporting 0."""
    if not np.isfinite(metrics["spearman"]) or not np.isfinite(metrics["pearson"]):
        raise DselError(f"fitting the scorer: the validation correlation is undefined at step {step} (the scorer "
                        "predicts one constant value); lower fit.lr or raise fit.epochs")


def fit_scorer(scorer: nn.Module, tokens: np.ndarray, target: np.ndarray, cfg: FitConfig,
               device: torch.device, show_progress: bool = True) -> dict:
    """Train `scorer` in place on (tokens[n], target[n]); keep the best validation Spearman; return metrics."""
    if len(tokens) != len(target):
        raise DselError(f"fitting the scorer: {len(target)} target values for {len(tokens)} proxy windows")
    target = check_target(target, "fitting the scorer")
    train_ids, val_ids = split_ids(len(tokens), cfg.val_fraction, cfg.seed)
    optimizer = torch.optim.AdamW(scorer.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    rng = np.random.default_rng(cfg.seed + 1)
    per_epoch = -(-len(train_ids) // cfg.batch_size)
    total = cfg.epochs * per_epoch
    best = {"spearman": -np.inf}
    best_state, history, step = None, [], 0
    bar = progress(total=total, desc="pds fit-scorer", disable=not show_progress)
    for epoch in range(cfg.epochs):
        order = rng.permutation(train_ids)
        for start in range(0, len(order), cfg.batch_size):
            scorer.train()
            ids = np.sort(order[start : start + cfg.batch_size])
            loss = _train_step(scorer, optimizer, tokens[ids], target[ids], lr_at(step, total, cfg.lr, cfg.warmup,
                                                                                     cfg.min_lr_ratio), cfg, device)
            if not np.isfinite(loss):
                raise DselError(f"fitting the scorer: the loss is {loss} at epoch {epoch}; lower fit.lr")
            step += 1
            bar.update(1)
            bar.set_postfix(mse=f"{loss:.4f}", best_val_spearman=f"{best['spearman']:.3f}")
            if (cfg.eval_every and step % cfg.eval_every == 0) or step % per_epoch == 0 or step == total:
                val = evaluate(scorer, tokens[val_ids], target[val_ids], cfg.batch_size, device)
                check_correlation(val, step)
                history.append({"step": step, "epoch": epoch, **val})
                if val["spearman"] > best["spearman"]:
                    best, best_state = {"step": step, **val}, copy.deepcopy(scorer.state_dict())
    bar.close()
    scorer.load_state_dict(best_state)
    metrics = {"train_windows": len(train_ids), "val_windows": len(val_ids), "best_step": best["step"],
               "train": evaluate(scorer, tokens[train_ids], target[train_ids], cfg.batch_size, device),
               "val": {k: best[k] for k in ("mse", "pearson", "spearman")}, "history": history}
    log.info("pds fit-scorer: best validation spearman %.3f pearson %.3f at step %d (%d windows)",
             best["spearman"], best["pearson"], best["step"], len(val_ids))
    return metrics


def _train_step(scorer: nn.Module, optimizer, tokens: np.ndarray, target: np.ndarray, lr: float, cfg: FitConfig,
                device: torch.device) -> float:
    """One AdamW step on the MSE of a batch at learning rate `lr`, gradient norm clipped."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    batch = torch.as_tensor(tokens, dtype=torch.long, device=device)
    y = torch.as_tensor(target, dtype=torch.float32, device=device)
    loss = nn.functional.mse_loss(scorer(batch).float(), y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if cfg.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(scorer.parameters(), cfg.grad_clip)
    optimizer.step()
    return float(loss.item())
