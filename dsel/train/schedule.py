"""The learning-rate schedules every training loop shares (pretraining, both backends, CoLoR fine-tuning).

    cosine  dsel's: step s (0-based) warms up linearly to lr over `warmup` steps (lr*(s+1)/warmup),
            then decays by a cosine to min_ratio*lr at the last step.
    olmo    OLMo's CosWithWarmup, which the official CoLoR-Filter code trains every model with:
            update k = s+1 (OLMo counts the step before taking it); k < warmup ramps linearly from
            warmup_start*lr (OLMo: 0.1) to lr, then a cosine over (k - warmup) / (total - warmup) to
            min_ratio*lr (OLMo's alpha_f), reached at the last update.
"""
from __future__ import annotations

import math
from typing import Literal

Schedule = Literal["cosine", "olmo"]
OLMO_WARMUP_START = 0.1  # OLMo's warmup_min_lr default: initial_lr * 0.10


def lr_at(step: int, total: int, lr: float, warmup: int, min_ratio: float, schedule: Schedule = "cosine") -> float:
    """The learning rate of 0-based step `step` of `total` under `schedule` (see the module docstring)."""
    if schedule == "olmo":
        return olmo_lr(step + 1, total, lr, warmup, min_ratio)
    if step < warmup:
        return lr * (step + 1) / warmup
    progress_frac = (step - warmup) / max(1, total - 1 - warmup)
    return lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress_frac)))


def olmo_lr(update: int, total: int, lr: float, warmup: int, min_ratio: float,
            warmup_start: float = OLMO_WARMUP_START) -> float:
    """OLMo CosWithWarmup.get_lr at 1-based update `update` of `total`."""
    floor = lr * min_ratio
    if update < warmup:
        start = lr * warmup_start
        return start + (lr - start) * update / warmup
    if update >= total:
        return floor
    return floor + (lr - floor) * (1 + math.cos(math.pi * (update - warmup) / (total - warmup))) / 2
