"""Selection methods over a score table: top-k, Gumbel-top-k, CoLoR (global and batchwise), random.

    topk         the best `fraction` (or token budget) by the score expression
    gumbel       PDS: the best of score + temperature * Gumbel noise (paper: 40%, temperature 0.1)
    color        CoLoR-Filter as its code runs it: the global top 1/tau (or token budget)
    color-batch  CoLoR-Filter's algorithm: draw tau*n random candidates, keep the n best, repeat
    random       a uniformly random subset of the same size (baseline)

Every method but color-batch streams the table (dsel.select.topk); its noise depends only on
(seed, window id), so the result does not depend on how the table is chunked.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dsel.errors import DselError
from dsel.select.expression import Expression
from dsel.select.noise import PERMUTE_STREAM, RANDOM_STREAM, gumbel, uniform
from dsel.select.topk import stream_top

HISTOGRAM_SAMPLE = 1_000_000  # at most this many key values (every stride-th window id) for the histogram


@dataclass
class Plan:
    """What to select: the method, the score expression, and how much."""

    method: str
    expression: Expression | None  # None only for random without a score column
    fraction: float | None = None  # share of the pool to keep (None with a token budget)
    token_budget: int | None = None
    tau: float | None = None  # CoLoR's tau (fraction = 1/tau)
    color_batch: int = 1024  # color-batch: n kept per draw of tau*n candidates
    temperature: float = 0.0  # gumbel noise scale
    seed: int = 0


@dataclass
class Selection:
    """The kept windows plus what describes the selection (selection.json, histogram)."""

    indices: np.ndarray  # sorted window ids, int64
    threshold: float | None  # smallest kept key (None for color-batch and random)
    tokens: int
    pool: int
    pool_tokens: int
    passes: int
    candidates: int
    sample: np.ndarray  # key values of every stride-th window of the pool (for the histogram)
    domains: dict  # domain -> {"pool": n, "kept": n}; {} without a domain column


class PoolStats:
    """First-pass observer: checks scores and window ids; counts rows and tokens; samples keys."""

    def __init__(self, source, plan: Plan, num_windows: int):
        self.source, self.plan, self.num_windows = source, plan, num_windows
        self.rows = self.tokens = 0
        self.seen = np.zeros(num_windows, dtype=bool)
        self.stride = -(-source.num_rows // HISTOGRAM_SAMPLE)
        self.samples: list[np.ndarray] = []

    def __call__(self, chunk: dict, key: np.ndarray) -> None:
        window = chunk["window"]
        check_scores(self.source, chunk, self.plan.expression)
        outside = window[(window < 0) | (window >= self.num_windows)]
        if len(outside):
            raise DselError(f"{self.source.path}: window id {int(outside[0])} is outside the corpus's {self.num_windows} windows")
        self.seen[window] = True
        self.rows += len(window)
        self.tokens += int(chunk["tokens"].sum())
        if self.plan.method == "random":  # the key is noise: sample the scores instead
            if self.plan.expression is None:
                return
            key = self.plan.expression(chunk)
        self.samples.append(key[window % self.stride == 0])

    def check_complete(self) -> None:
        """Every window scored exactly once (rows == windows and none missing, so none twice)."""
        missing = np.flatnonzero(~self.seen)
        if len(missing) or self.rows != self.num_windows:
            what = f"window {int(missing[0])} has no score" if len(missing) else "a window is listed twice"
            raise DselError(f"{self.source.path}: {what} ({self.rows} rows for {self.num_windows} windows)")

    @property
    def sample(self) -> np.ndarray:
        return np.concatenate(self.samples) if self.samples else np.empty(0)


def check_scores(source, chunk: dict, expression: Expression | None) -> None:
    """NaN or infinite scores are an error naming the file, the column and a window."""
    for name in expression.columns if expression else ():
        bad = ~np.isfinite(chunk[name])
        if bad.any():
            i = int(np.argmax(bad))
            raise DselError(f"{source.path}: score column '{name}' is {chunk[name][i]} at window {int(chunk['window'][i])}")


def selection_key(plan: Plan):
    """key(chunk) -> float64 per row, higher is kept first."""
    if plan.method == "random":
        return lambda chunk: uniform(plan.seed, RANDOM_STREAM, chunk["window"])
    if plan.method == "gumbel" and plan.temperature > 0:
        return lambda chunk: plan.expression(chunk) + plan.temperature * gumbel(plan.seed, chunk["window"])
    return plan.expression


def target_count(plan: Plan, pool: int) -> int:
    """Windows to keep for a fraction of the pool: round(fraction * pool), at least 1."""
    return min(pool, max(1, int(round(plan.fraction * pool))))


def select(source, plan: Plan, num_windows: int, chunk_rows: int = 1 << 20, max_candidates: int = 1 << 22) -> Selection:
    """Run `plan` over the score table `source` whose windows are ids [0, num_windows)."""
    columns = plan.expression.columns if plan.expression else []
    if source.num_rows == 0:
        raise DselError(f"{source.path}: score table is empty")
    stats = PoolStats(source, plan, num_windows)

    def chunks():
        return source.chunks(columns, chunk_rows)

    if plan.method == "color-batch":
        result = _select_batchwise(chunks, plan, stats)
    else:
        budget = dict(token_budget=plan.token_budget) if plan.token_budget else dict(count=target_count(plan, source.num_rows))
        top = stream_top(chunks, selection_key(plan), max_candidates=max_candidates, observe=stats, **budget)
        threshold = None if plan.method == "random" else top.threshold
        result = (top.indices, threshold, top.tokens, top.passes, top.candidates)
    stats.check_complete()
    if plan.token_budget and plan.token_budget > stats.tokens:
        raise DselError(f"{source.path}: token_budget={plan.token_budget} is larger than the pool "
                        f"({stats.tokens} tokens in {stats.rows} windows)")
    indices, threshold, tokens, passes, candidates = result
    domains = count_domains(source, indices, chunk_rows) if source.has_domain else {}
    return Selection(indices, threshold, tokens, stats.rows, stats.tokens, passes + bool(domains), candidates,
                     stats.sample, domains)


def _select_batchwise(chunks, plan: Plan, stats: PoolStats):
    """CoLoR's n-of-tau*n draws, in memory (window ids, keys and tokens of the whole pool)."""
    key = selection_key(plan)
    parts = []
    for chunk in chunks():
        k = key(chunk)
        stats(chunk, k)
        parts.append((chunk["window"], k, chunk["tokens"]))
    windows, keys, tokens = (np.concatenate(p) for p in zip(*parts))
    kept = batchwise_top(windows, keys, plan.tau, plan.color_batch, plan.seed)
    return np.sort(windows[kept]), None, int(tokens[kept].sum()), 1, len(windows)


def batchwise_top(windows: np.ndarray, keys: np.ndarray, tau: float, n: int, seed: int) -> np.ndarray:
    """Positions kept by CoLoR's batchwise rule: blocks of round(tau*n) random windows, the best of each.

    The pool is put in a seeded random order (by per-window noise, so it does not depend on the
    table's row order) and cut into blocks of m = round(tau*n) windows; block [a, b) keeps its
    round(b/tau) - round(a/tau) best (n for a full block), ties by window id, so round(N/tau) in all.
    """
    m = max(1, int(round(tau * n)))
    order = np.lexsort((windows, uniform(seed, PERMUTE_STREAM, windows)))
    block = np.arange(len(order)) // m
    start = block * m
    quota = np.round(np.minimum(start + m, len(order)) / tau) - np.round(start / tau)
    ranked = order[np.lexsort((windows[order], -keys[order], block))]  # blocks in order, best first within each
    rank_in_block = np.arange(len(order)) - start
    return ranked[rank_in_block < quota]


def count_domains(source, indices: np.ndarray, chunk_rows: int) -> dict:
    """Pool and kept windows per domain (one pass over window and domain columns)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    domains: dict = {}
    for chunk in source.chunks([], chunk_rows, domain=True):
        pos = np.minimum(np.searchsorted(indices, chunk["window"]), max(len(indices) - 1, 0))
        kept = indices[pos] == chunk["window"] if len(indices) else np.zeros(len(pos), dtype=bool)
        for name, values in (("pool", chunk["domain"]), ("kept", chunk["domain"].filter(pa.array(kept)))):
            for row in pc.value_counts(values).to_pylist():
                domains.setdefault(str(row["values"]), {"pool": 0, "kept": 0})[name] += int(row["counts"])
    return domains
