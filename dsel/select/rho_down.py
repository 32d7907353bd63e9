"""RHO-down as the CoLoR-Filter paper runs it: online selection by the model being trained.

Every optimizer step draws tau*n candidate windows of the pool at random (seeded by the step, so
a resumed run draws the same ones); the model in training scores them without gradients, and the
n with the largest reducible loss, loss_current - loss_cond, make the step's batch. loss_cond is
the conditional model's loss of each pool window (the `loss_cond` column of `dsel color score`),
fixed during training, as in the paper's RHO-down baseline.
"""
from __future__ import annotations

import numpy as np
import torch

from dsel.data.windows import Windows
from dsel.device import autocast_for
from dsel.errors import DselError


def rho_down_keep(loss_current: np.ndarray, loss_cond: np.ndarray, window_ids: np.ndarray, n: int) -> np.ndarray:
    """Positions of the n candidates with the largest loss_current - loss_cond (ties: lower window id first)."""
    return np.lexsort((window_ids, -(np.asarray(loss_current, np.float64) - loss_cond)))[:n]


class RhoDownBatches:
    """`batches(model, step)` -> the step's micro-batches [(tokens, None)], chosen online from the pool."""

    def __init__(self, windows: Windows, loss_cond: np.ndarray, batch_size: int, grad_accum: int, tau: float,
                 seed: int, precision: str = "auto"):
        if tau < 1:
            raise DselError(f"rho-down: tau={tau} must be >= 1 (keep n of tau*n candidates)")
        if len(loss_cond) != len(windows):
            raise DselError(f"rho-down: {len(loss_cond)} conditional losses for {len(windows)} pool windows")
        self.windows, self.loss_cond = windows, np.asarray(loss_cond, dtype=np.float64)
        self.batch_size, self.n = batch_size, batch_size * grad_accum
        self.candidates_per_step = int(round(tau * self.n))
        if self.candidates_per_step > len(windows):
            raise DselError(f"rho-down: {self.candidates_per_step} candidates per step (tau*n) but the pool has "
                            f"{len(windows)} windows")
        self.seed, self.precision = seed, precision

    def candidates(self, step: int) -> np.ndarray:
        """The step's tau*n random candidate window ids (sorted)."""
        rng = np.random.default_rng([self.seed, step])
        return np.sort(rng.choice(len(self.windows), self.candidates_per_step, replace=False))

    @torch.no_grad()
    def current_losses(self, model: torch.nn.Module, tokens: torch.Tensor) -> np.ndarray:
        """Mean window loss of each candidate under the model as it is now."""
        device = next(model.parameters()).device
        was_training = model.training
        model.eval()
        losses = []
        for start in range(0, len(tokens), self.batch_size):
            with autocast_for(device, self.precision):
                losses.append(model.sequence_losses(tokens[start:start + self.batch_size].to(device)).float().cpu())
        model.train(was_training)
        return torch.cat(losses).numpy()

    def select(self, model: torch.nn.Module, step: int) -> tuple[np.ndarray, torch.Tensor]:
        """(kept window ids, their tokens [n, W]) of `step`."""
        ids = self.candidates(step)
        tokens = torch.from_numpy(self.windows.batch(ids))
        keep = rho_down_keep(self.current_losses(model, tokens), self.loss_cond[ids], ids, self.n)
        return ids[keep], tokens[keep]

    def __call__(self, model: torch.nn.Module, step: int) -> list:
        _, tokens = self.select(model, step)
        return [(tokens[i:i + self.batch_size], None) for i in range(0, self.n, self.batch_size)]


def conditional_losses(scores_dir: str, num_windows: int) -> np.ndarray:
    """The `loss_cond` column of a `dsel color score` table, indexed by window id."""
    import pyarrow.parquet as pq

    from dsel.select.source import table_path

    table = pq.read_table(table_path(scores_dir), columns=["window", "loss_cond"])
    window = table.column("window").to_numpy()
    out = np.full(num_windows, np.nan)
    out[window] = table.column("loss_cond").to_numpy()
    if np.isnan(out).any():
        raise DselError(f"{scores_dir}: the score table has no loss_cond for window {int(np.flatnonzero(np.isnan(out))[0])}")
    return out
