"""A PNG histogram of the selection key with the threshold line (until the score stage ships one)."""
from __future__ import annotations

import os

import numpy as np

from dsel.io import atomic_path


def score_histogram(values: np.ndarray, path: str | os.PathLike, threshold: float | None = None, title: str = "") -> None:
    """Histogram of `values` written atomically to `path`; a dashed line marks `threshold`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.hist(np.asarray(values, dtype=np.float64), bins=100, color="#4c72b0")
    if threshold is not None:
        ax.axvline(threshold, color="#c44e52", linestyle="--", label=f"threshold {threshold:.4g}")
        ax.legend()
    ax.set_title(title)
    ax.set_xlabel("score")
    ax.set_ylabel("windows")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
