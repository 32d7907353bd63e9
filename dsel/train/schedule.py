"""The learning-rate schedule every training loop shares (pretraining, both backends, CoLoR fine-tuning)."""
from __future__ import annotations

import math


def lr_at(step: int, total: int, lr: float, warmup: int, min_ratio: float) -> float:
    """Linear warmup for `warmup` steps, then cosine decay to `min_ratio * lr` at the last step (total - 1)."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress_frac = (step - warmup) / max(1, total - 1 - warmup)
    return lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress_frac)))
