"""Euclidean projection onto the probability simplex {g : g >= 0, sum g = 1}.

PDS keeps the data weights gamma on the simplex after every gradient step. The projection is the
sort-based algorithm of Duchi et al. (2008): find the threshold tau with sum(max(v - tau, 0)) = 1.
"""
from __future__ import annotations

import numpy as np


def project_to_simplex(v: np.ndarray) -> np.ndarray:
    """The point of the simplex closest to `v` (float64, same length)."""
    v = np.asarray(v, dtype=np.float64)
    if v.ndim != 1 or v.size == 0:
        raise ValueError(f"project_to_simplex needs a non-empty vector, got shape {v.shape}")
    u = np.sort(v)[::-1]
    cumulative = np.cumsum(u) - 1.0
    ranks = np.arange(1, v.size + 1)
    support = np.nonzero(u - cumulative / ranks > 0)[0][-1]
    tau = cumulative[support] / (support + 1)
    return np.maximum(v - tau, 0.0)
