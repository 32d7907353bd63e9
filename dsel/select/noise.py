"""Per-window random numbers that depend only on (seed, stream, window id), never on chunking.

A counter-based generator (SplitMix64: the output for counter i is a fixed mix of
seed_state + i * golden_gamma) evaluated at counter = window id. Streaming selection over row
groups of any size, in any order, therefore draws exactly the noise the in-memory selection draws.
"""
from __future__ import annotations

import numpy as np

GOLDEN_GAMMA = np.uint64(0x9E3779B97F4A7C15)

# Independent streams of the same seed, one per use.
GUMBEL_STREAM, RANDOM_STREAM, PERMUTE_STREAM = 1, 2, 3


def _mix64(z: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser: a bijective avalanche mix of uint64 values."""
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def random_bits(seed: int, stream: int, windows: np.ndarray) -> np.ndarray:
    """64 random bits per window id (uint64), a pure function of (seed, stream, window)."""
    key = _mix64(np.array([(int(seed) * 0x100000001B3 + int(stream)) & (2**64 - 1)], dtype=np.uint64))[0]
    counters = np.asarray(windows, dtype=np.int64).astype(np.uint64) + np.uint64(1)
    with np.errstate(over="ignore"):
        return _mix64(key + counters * GOLDEN_GAMMA)


def uniform(seed: int, stream: int, windows: np.ndarray) -> np.ndarray:
    """Uniform floats in the open interval (0, 1), one per window id (float64)."""
    bits = random_bits(seed, stream, windows) >> np.uint64(11)
    return (bits.astype(np.float64) + 0.5) * 2.0**-53


def gumbel(seed: int, windows: np.ndarray) -> np.ndarray:
    """Standard Gumbel noise -log(-log U), one per window id (float64)."""
    return -np.log(-np.log(uniform(seed, GUMBEL_STREAM, windows)))
