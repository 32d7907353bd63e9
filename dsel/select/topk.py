"""Exact top-k and token-budget selection over score tables streamed in chunks (radix select).

Windows are ranked by key (descending), ties by window id (ascending); the kept set is the
longest prefix of that order whose weight fits the target (weight 1 per window for a count k,
the window's tokens for a token budget). Memory stays bounded by the chunk size plus the kept ids:

  pass 1      histogram of the top RADIX_BITS bits of an order-preserving uint64 image of the key,
              weighted; the bucket where the running weight crosses the target is the bracket.
  (refine)    if the bracket holds more than max_candidates windows, histogram the next bits of
              the windows inside it (rare: heavy ties or a very narrow score range).
  last pass   keep every window above the bracket, collect the few inside it, sort them exactly.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

import numpy as np

RADIX_BITS = 20
SIGN_BIT = np.uint64(1 << 63)

Chunks = Callable[[], Iterable[dict]]  # chunks() -> a fresh pass over the table
Key = Callable[[dict], np.ndarray]  # key(chunk) -> float64 key per row


@dataclass
class TopSelection:
    """The kept windows and what the selection found on the way."""

    indices: np.ndarray  # sorted window ids (int64)
    threshold: float | None  # smallest kept key (None when nothing is kept)
    tokens: int  # tokens of the kept windows
    passes: int
    candidates: int  # windows sorted exactly in the last pass


def orderable(key: np.ndarray) -> np.ndarray:
    """uint64 image of float64 keys with the same order (-0.0 and 0.0 map alike; no NaN)."""
    bits = (np.asarray(key, dtype=np.float64) + 0.0).view(np.int64)  # + 0.0 turns -0.0 into 0.0
    flip = (bits >> 63).view(np.uint64) | SIGN_BIT  # negative: flip every bit; positive: set the sign bit
    return bits.view(np.uint64) ^ flip


def _histogram(chunks: Iterable[dict], key: Key, used: int, prefix: int, bits: int, by_tokens: bool,
               observe=None) -> tuple[np.ndarray, np.ndarray]:
    """Weight and count per value of the next `bits` bits, over windows whose top `used` bits equal prefix."""
    weight = np.zeros(1 << bits, dtype=np.float64 if by_tokens else np.int64)
    count = np.zeros(1 << bits, dtype=np.int64)
    shift = np.uint64(64 - used - bits)
    for chunk in chunks:
        k = key(chunk)
        if observe is not None:
            observe(chunk, k)
        u = orderable(k)
        w = chunk["tokens"] if by_tokens else None
        if used:
            inside = (u >> np.uint64(64 - used)) == np.uint64(prefix)
            u = u[inside]
            w = None if w is None else w[inside]
        bucket = ((u >> shift) & np.uint64((1 << bits) - 1)).astype(np.int64)
        _add_counts(count, bucket)
        _add_counts(weight, bucket, w)
    return weight, count


def _add_counts(total: np.ndarray, bucket: np.ndarray, weights: np.ndarray | None = None) -> None:
    """total[b] += (weight of) rows in bucket b; sparse updates for chunks much smaller than the histogram."""
    if len(bucket) * 16 >= len(total):
        total += np.bincount(bucket, weights=weights, minlength=len(total)).astype(total.dtype, copy=False)
    else:
        np.add.at(total, bucket, 1 if weights is None else weights)


def _crossing_bucket(weight: np.ndarray, need: float) -> tuple[int | None, float]:
    """(bucket where the running weight from the top first exceeds need, weight above it); None if all fit."""
    above = np.cumsum(weight[::-1])[::-1] - weight  # weight of the strictly higher buckets
    crossing = np.flatnonzero(above + weight > need)
    if len(crossing) == 0:
        return None, float(weight.sum())
    t = int(crossing[-1])
    return t, float(above[t])


def _collect(chunks: Iterable[dict], key: Key, used: int, prefix: int, inclusive: bool):
    """Windows above the bracket (ids, smallest key, tokens) and every row inside it.

    `inclusive` counts the bracket itself as above (it fits whole); used == 0 is the whole table.
    """
    kept, cand = [], {"window": [], "key": [], "tokens": []}
    low, tokens = np.inf, 0
    for chunk in chunks:
        k = key(chunk)
        if used:
            top = orderable(k) >> np.uint64(64 - used)
            above = top >= np.uint64(prefix) if inclusive else top > np.uint64(prefix)
            inside = np.zeros(len(k), dtype=bool) if inclusive else top == np.uint64(prefix)
        else:
            above, inside = np.full(len(k), inclusive), np.full(len(k), not inclusive)
        kept.append(chunk["window"][above])
        if above.any():
            low = min(low, float(k[above].min()))
            tokens += int(chunk["tokens"][above].sum())
        for name in ("window", "tokens"):
            cand[name].append(chunk[name][inside])
        cand["key"].append(k[inside])
    return kept, {name: np.concatenate(parts) for name, parts in cand.items()}, low, tokens


def stream_top(chunks: Chunks, key: Key, count: int | None = None, token_budget: int | None = None,
               max_candidates: int = 1 << 22, observe=None) -> TopSelection:
    """Keep the `count` best windows, or the best windows whose tokens sum to at most `token_budget`.

    `chunks()` starts a fresh pass over the table; `key(chunk)` gives float64 keys
    (higher is better; the same function of a row on every pass). `observe(chunk, key)` sees
    every chunk of the first pass (statistics, input checks).
    """
    if (count is None) == (token_budget is None):
        raise ValueError("give exactly one of count and token_budget")
    by_tokens = token_budget is not None
    need = float(token_budget if by_tokens else count)
    used, prefix, passes, inclusive = 0, 0, 0, False
    while used < 64:
        bits = min(RADIX_BITS, 64 - used)
        weight, counts = _histogram(chunks(), key, used, prefix, bits, by_tokens, observe if passes == 0 else None)
        passes += 1
        t, above = _crossing_bucket(weight, need)
        if t is None:  # the whole bracket fits
            inclusive = True
            break
        prefix, used, need = (prefix << bits) | t, used + bits, need - above
        if counts[t] <= max_candidates:
            break
    kept, cand, low, tokens = _collect(chunks(), key, used, prefix, inclusive)
    order = np.lexsort((cand["window"], -cand["key"]))
    weights = cand["tokens"][order] if by_tokens else np.ones(len(order), dtype=np.int64)
    take = order[: int(np.searchsorted(np.cumsum(weights), need, side="right"))]
    if len(take):
        low = min(low, float(cand["key"][take].min()))
        tokens += int(cand["tokens"][take].sum())
    indices = np.concatenate(kept + [cand["window"][take].astype(np.int64)])
    indices.sort()  # in place: the kept ids are the one thing here that grows with the table
    return TopSelection(indices, None if np.isinf(low) else low, tokens, passes + 1, len(cand["window"]))
