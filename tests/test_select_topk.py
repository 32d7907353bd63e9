"""Streaming selection against naive in-memory numpy sorts (ties by window id), on parquet with tiny row groups."""
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dsel.select.expression import parse_expression
from dsel.select.methods import Plan, batchwise_top, select
from dsel.select.noise import PERMUTE_STREAM, RANDOM_STREAM, gumbel, uniform
from dsel.select.source import open_scores
from dsel.select.topk import orderable, stream_top

N = 5000


def write_table(path, seed=0, n=N, row_group=137, ties=True, domains=True):
    """A score table like the score stage writes: rows shuffled, small row groups, tied scores."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(n)
    pds = rng.normal(size=n).astype(np.float32)
    if ties:
        pds[::5] = 0.25  # a block of exact ties straddling typical thresholds
    columns = {
        "window": order.astype(np.int64),
        "doc": (order // 3).astype(np.int64),
        "tokens": rng.integers(0, 64, n).astype(np.int64),
        "pds": pds,
        "loss_prior": rng.normal(3, 1, n).astype(np.float32),
        "loss_cond": rng.normal(3, 1, n).astype(np.float32),
    }
    if domains:
        columns["domain"] = np.array(["web", "code", "books"])[rng.integers(0, 3, n)]
    pq.write_table(pa.table(columns), path, row_group_size=row_group)
    return columns


def naive_order(window, key):
    """Best first: key descending, window id ascending."""
    return np.lexsort((window, -key))


def naive_key(cols, expr):
    f = lambda name: cols[name].astype(np.float64)
    return {"pds": f("pds"), "-loss_cond": -f("loss_cond"), "loss_prior - loss_cond": f("loss_prior") - f("loss_cond")}[expr]


def test_orderable_preserves_float_order():
    x = np.array([-np.inf, -3.5, -1e-300, -0.0, 0.0, 1e-300, 2.0, np.inf])
    u = orderable(x)
    assert (np.diff(u.astype(object)) >= 0).all()
    assert u[3] == u[4]  # -0.0 == 0.0


def test_noise_is_a_function_of_window_id_only():
    ids = np.arange(1000)
    perm = np.random.default_rng(1).permutation(1000)
    np.testing.assert_array_equal(gumbel(7, ids)[perm], gumbel(7, ids[perm]))
    np.testing.assert_array_equal(gumbel(7, ids)[:10], gumbel(7, ids[:10]))
    assert not np.array_equal(gumbel(7, ids), gumbel(8, ids))
    u = uniform(3, 1, np.arange(200_000))
    assert 0 < u.min() and u.max() < 1 and abs(u.mean() - 0.5) < 0.01
    g = gumbel(3, np.arange(200_000))
    assert abs(g.mean() - np.euler_gamma) < 0.02 and abs(g.var() - np.pi**2 / 6) < 0.05


@pytest.mark.parametrize("max_candidates", [1 << 22, 2])  # 2 forces refinement passes down to exact ties
@pytest.mark.parametrize("count", [1, 17, 1000, 2500, N - 1, N])
def test_stream_top_count_equals_argsort(max_candidates, count):
    rng = np.random.default_rng(count)
    key = np.round(rng.normal(size=N), 2)  # many ties
    window = rng.permutation(N)
    tokens = rng.integers(0, 9, N)

    def chunks():
        for s in range(0, N, 101):
            yield {"window": window[s:s + 101], "tokens": tokens[s:s + 101], "k": key[s:s + 101]}

    top = stream_top(chunks, lambda c: c["k"], count=count, max_candidates=max_candidates)
    best = naive_order(window, key)[:count]
    np.testing.assert_array_equal(top.indices, np.sort(window[best]))
    assert len(top.indices) == count and top.threshold == key[best].min() and top.tokens == tokens[best].sum()


@pytest.mark.parametrize("max_candidates", [1 << 22, 3])
@pytest.mark.parametrize("share", [0.0, 0.001, 0.3, 0.99, 1.0, 2.0])
def test_stream_top_token_budget_equals_cumsum(max_candidates, share):
    rng = np.random.default_rng(int(share * 1000))
    key = np.round(rng.normal(size=N), 2)
    window = rng.permutation(N)
    tokens = rng.integers(0, 50, N)
    budget = int(share * tokens.sum())

    def chunks():
        for s in range(0, N, 64):
            yield {"window": window[s:s + 64], "tokens": tokens[s:s + 64], "k": key[s:s + 64]}

    top = stream_top(chunks, lambda c: c["k"], token_budget=budget, max_candidates=max_candidates)
    order = naive_order(window, key)
    keep = order[np.cumsum(tokens[order]) <= budget]
    np.testing.assert_array_equal(top.indices, np.sort(window[keep]))
    assert top.tokens == tokens[keep].sum() <= budget


@pytest.mark.parametrize("method,expr,temperature", [
    ("topk", "pds", 0.0), ("gumbel", "pds", 0.1), ("gumbel", "-loss_cond", 1.0),
    ("color", "loss_prior - loss_cond", 0.0), ("random", "pds", 0.0),
])
@pytest.mark.parametrize("chunk_rows", [7, 1 << 20])
def test_select_on_parquet_equals_in_memory(tmp_path, method, expr, temperature, chunk_rows):
    cols = write_table(tmp_path / "scores.parquet")
    source = open_scores(tmp_path)
    plan = Plan(method, parse_expression(expr, source), fraction=0.4, temperature=temperature, seed=5)
    sel = select(source, plan, N, chunk_rows=chunk_rows, max_candidates=50)
    window = cols["window"]
    if method == "random":
        key = uniform(5, RANDOM_STREAM, window)
    else:
        key = naive_key(cols, expr) + (temperature * gumbel(5, window) if method == "gumbel" else 0)
    best = naive_order(window, key)[:2000]
    np.testing.assert_array_equal(sel.indices, np.sort(window[best]))
    assert len(sel.indices) == 2000 and sel.indices.dtype == np.int64
    assert sel.tokens == cols["tokens"][best].sum() and sel.pool == N and sel.pool_tokens == cols["tokens"].sum()
    assert sel.threshold == (None if method == "random" else key[best].min())
    names, counts = np.unique(cols["domain"], return_counts=True)
    kept_names, kept_counts = np.unique(cols["domain"][best], return_counts=True)
    assert sel.domains == {n: {"pool": int(c), "kept": int(kept_counts[list(kept_names).index(n)])} for n, c in zip(names, counts)}


def test_select_token_budget_on_parquet(tmp_path):
    cols = write_table(tmp_path / "scores.parquet")
    source = open_scores(tmp_path)
    plan = Plan("gumbel", parse_expression("pds", source), token_budget=30_000, temperature=0.1, seed=1)
    sel = select(source, plan, N, chunk_rows=33, max_candidates=10)
    key = naive_key(cols, "pds") + 0.1 * gumbel(1, cols["window"])
    order = naive_order(cols["window"], key)
    keep = order[np.cumsum(cols["tokens"][order]) <= 30_000]
    np.testing.assert_array_equal(sel.indices, np.sort(cols["window"][keep]))
    assert sel.tokens == cols["tokens"][keep].sum() <= 30_000


def naive_batchwise(windows, keys, tau, n, seed):
    """CoLoR's loop: shuffle, take tau*n candidates at a time, keep the best of each draw."""
    perm = np.lexsort((windows, uniform(seed, PERMUTE_STREAM, windows)))
    m, kept = int(round(tau * n)), []
    for a in range(0, len(perm), m):
        draw = perm[a:a + m]
        quota = int(np.round(min(a + m, len(perm)) / tau) - np.round(a / tau))
        best = sorted(draw, key=lambda i: (-keys[i], windows[i]))[:quota]
        kept += best
    return np.array(sorted(kept))


@pytest.mark.parametrize("tau,n", [(4, 10), (7, 3), (16, 1), (1, 50)])
def test_batchwise_keeps_n_of_each_tau_n_draw(tau, n):
    rng = np.random.default_rng(tau)
    windows = rng.permutation(1000)
    keys = np.round(rng.normal(size=1000), 1)
    kept = np.sort(batchwise_top(windows, keys, tau, n, seed=3))
    np.testing.assert_array_equal(kept, naive_batchwise(windows, keys, tau, n, 3))
    assert len(kept) == round(1000 / tau)


def test_color_batch_on_parquet(tmp_path):
    cols = write_table(tmp_path / "scores.parquet", domains=False)
    source = open_scores(tmp_path)
    plan = Plan("color-batch", parse_expression("loss_prior - loss_cond", source), tau=8, color_batch=16, seed=2)
    sel = select(source, plan, N, chunk_rows=100)
    key = naive_key(cols, "loss_prior - loss_cond")
    expected = np.sort(cols["window"][naive_batchwise(cols["window"], key, 8, 16, 2)])
    np.testing.assert_array_equal(sel.indices, expected)
    assert len(sel.indices) == N // 8 and sel.domains == {}
