"""Scorer regression: correlation metrics against scipy, split, and a fit that learns a real signal."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from dsel.errors import DselError
from dsel.pds.fit import FitConfig, average_ranks, fit_scorer, normalise_gamma, pearson, spearman, split_ids

stats = pytest.importorskip("scipy.stats")


def test_correlations_match_scipy_with_ties():
    rng = np.random.default_rng(0)
    a = np.round(rng.normal(size=200), 1)  # many ties, like gamma's zeros
    b = a + rng.normal(scale=0.5, size=200)
    assert pearson(a, b) == pytest.approx(stats.pearsonr(a, b).statistic, rel=1e-10)
    assert spearman(a, b) == pytest.approx(stats.spearmanr(a, b).statistic, rel=1e-10)
    np.testing.assert_allclose(average_ranks(a), stats.rankdata(a) - 1)


def test_split_is_disjoint_and_covers():
    train, val = split_ids(50, 0.2, seed=3)
    assert len(val) == 10 and len(np.intersect1d(train, val)) == 0
    np.testing.assert_array_equal(np.sort(np.concatenate([train, val])), np.arange(50))


def test_uniform_gamma_is_refused():
    with pytest.raises(DselError, match="uniform"):
        normalise_gamma(np.full(8, 1 / 8))


class _BagOfTokens(nn.Module):
    """A minimal sequence regressor: mean-pooled embeddings + linear head."""

    def __init__(self, vocab: int):
        super().__init__()
        self.embed = nn.Embedding(vocab, 8)
        self.head = nn.Linear(8, 1)

    def forward(self, tokens):
        return self.head(self.embed(tokens).mean(1)).squeeze(-1)


def test_fit_learns_gamma_that_depends_on_content():
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 20, size=(240, 16))
    share_of_small = (tokens < 5).mean(1)
    gamma = np.maximum(share_of_small - 0.2, 0)
    gamma /= gamma.sum()
    torch.manual_seed(0)
    metrics = fit_scorer(_BagOfTokens(20), tokens, gamma, FitConfig(epochs=30, lr=3e-2, batch_size=32),
                         torch.device("cpu"), show_progress=False)
    assert metrics["val_windows"] == 24
    assert metrics["val"]["spearman"] > 0.7 and metrics["val"]["pearson"] > 0.7


def test_fit_refuses_gamma_of_wrong_length():
    with pytest.raises(DselError, match="9 gamma values for 10 proxy windows"):
        fit_scorer(_BagOfTokens(5), np.zeros((10, 4), dtype=np.int64), np.linspace(0, 1, 9), FitConfig(),
                   torch.device("cpu"), show_progress=False)
