"""Score statistics against numpy, per-domain breakdown, histogram PNG."""
import numpy as np
import pytest

from dsel.score.stats import QUANTILES, column_stats, quantile_name, score_histogram, table_stats


def test_column_stats_match_numpy():
    rng = np.random.default_rng(0)
    values = rng.standard_normal(1001).astype(np.float32)
    values[[3, 50]] = [np.nan, np.inf]
    stats = column_stats(values)
    finite = values[np.isfinite(values)].astype(np.float64)
    assert stats["count"] == 1001 and stats["nonfinite"] == 2
    assert stats["mean"] == pytest.approx(finite.mean(), rel=1e-12)
    assert stats["std"] == pytest.approx(finite.std(), rel=1e-12)
    assert (stats["min"], stats["max"]) == (finite.min(), finite.max())
    for q in QUANTILES:
        assert stats["quantiles"][quantile_name(q)] == pytest.approx(np.quantile(finite, q), rel=1e-12)
    assert quantile_name(0.5) == "p50" and quantile_name(0.01) == "p1" and quantile_name(0.999) == "p99.9"
    assert column_stats(np.array([np.nan]))["mean"] is None


def test_table_stats_per_domain():
    scores = {"a": np.arange(6, dtype=np.float32), "b": -np.arange(6, dtype=np.float32)}
    tokens = np.array([4, 4, 4, 4, 4, 2])
    domains = np.array(["x", "y", "x", "y", "x", "x"])
    stats = table_stats(scores, tokens, domains)
    assert stats["count"] == 6 and stats["tokens"] == 22
    assert stats["domains"]["x"]["count"] == 4 and stats["domains"]["x"]["tokens"] == 14
    assert stats["domains"]["y"]["columns"]["a"]["mean"] == pytest.approx(2.0)
    assert stats["domains"]["x"]["columns"]["b"]["quantiles"]["p50"] == pytest.approx(np.median([0, -2, -4, -5]))
    assert "domains" not in table_stats(scores, tokens)


@pytest.mark.parametrize("threshold", [None, 0.25])
def test_histogram_png_is_written(tmp_path, threshold):
    values = np.random.default_rng(1).standard_normal(500)
    path = score_histogram(values, tmp_path / "plots" / "hist.png", threshold=threshold, title="pds")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 2000
    assert list((tmp_path / "plots").iterdir()) == [path]
