"""Summaries of score columns: JSON statistics (overall and per domain) and PNG histograms.

Used per shard (in each shard's completion marker), for the merged table (`scores.json`) and by
`dsel select`, which draws the histogram of the column it selects on with its threshold.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping

import numpy as np

from dsel.io import atomic_path

QUANTILES = (0.01, 0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99)


def quantile_name(q: float) -> str:
    """'p50' for 0.5, 'p1' for 0.01, 'p99.9' for 0.999: the JSON key of a quantile."""
    return f"p{100 * q:.10g}"


def column_stats(values: np.ndarray, quantiles=QUANTILES) -> dict:
    """count, non-finite count, mean, std, min, max and quantiles of the finite values (float64 math)."""
    values = np.asarray(values, dtype=np.float64).reshape(-1)
    finite = values[np.isfinite(values)]
    stats = {"count": int(values.size), "nonfinite": int(values.size - finite.size)}
    if finite.size == 0:
        return {**stats, "mean": None, "std": None, "min": None, "max": None, "quantiles": {}}
    points = np.quantile(finite, quantiles)
    return {**stats, "mean": float(finite.mean()), "std": float(finite.std()), "min": float(finite.min()),
            "max": float(finite.max()), "quantiles": {quantile_name(q): float(v) for q, v in zip(quantiles, points)}}


def table_stats(columns: Mapping[str, np.ndarray], tokens: np.ndarray, domains: np.ndarray | None = None) -> dict:
    """Window and token counts plus `column_stats` per score column; the same per domain when given."""
    tokens = np.asarray(tokens)
    stats = {"count": int(tokens.size), "tokens": int(tokens.sum()),
             "columns": {name: column_stats(values) for name, values in columns.items()}}
    if domains is not None:
        domains = np.asarray(domains)
        stats["domains"] = {
            str(domain): table_stats({n: np.asarray(v)[domains == domain] for n, v in columns.items()},
                                     tokens[domains == domain])
            for domain in np.unique(domains)
        }
    return stats


def score_histogram(values: np.ndarray, path: str | os.PathLike, threshold: float | None = None,
                    title: str = "score distribution", bins: int = 100, xlabel: str = "score") -> Path:
    """Write a PNG histogram of the finite `values`, with a vertical line at `threshold` when given."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    values = np.asarray(values, dtype=np.float64).reshape(-1)
    values = values[np.isfinite(values)]
    fig, ax = plt.subplots(figsize=(7, 4))
    try:
        ax.hist(values, bins=bins, color="#4c72b0")
        if threshold is not None:
            kept = int((values >= threshold).sum())
            ax.axvline(threshold, color="#c44e52", linestyle="--",
                       label=f"threshold {threshold:.4g}: {kept} of {values.size} at or above")
            ax.legend(loc="upper right")
        ax.set_title(title)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("windows")
        fig.tight_layout()
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=100)
    finally:
        plt.close(fig)
    return Path(path)
