"""Scorer regression: correlation metrics against scipy, split, the official recipe (schedule, clipping,
best-validation-Spearman model kept), degenerate targets and predictions, and a fit that learns a real signal."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from dsel.errors import DselError
from dsel.pds.fit import FitConfig, average_ranks, evaluate, fit_scorer, pearson, spearman, split_ids

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


def test_undefined_correlation_is_nan_not_zero():
    assert np.isnan(pearson(np.ones(5), np.arange(5.0)))
    assert np.isnan(spearman(np.arange(5.0), np.full(5, 2.0)))


def test_constant_target_is_refused():
    with pytest.raises(DselError, match="no spread"):
        fit_scorer(_BagOfTokens(5), np.zeros((10, 4), dtype=np.int64), np.full(10, 0.7), FitConfig(),
                   torch.device("cpu"), show_progress=False)


class _Constant(nn.Module):
    """Predicts one learnable number whatever the input: its validation correlation is undefined."""

    def __init__(self):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(()))

    def forward(self, tokens):
        return self.bias.expand(len(tokens))


def test_constant_prediction_stops_with_the_setting_to_change():
    tokens = np.random.default_rng(0).integers(0, 5, size=(20, 4))
    with pytest.raises(DselError, match="validation correlation is undefined at step 1.*fit.lr"):
        fit_scorer(_Constant(), tokens, np.linspace(-1, 1, 20), FitConfig(epochs=1, batch_size=32),
                   torch.device("cpu"), show_progress=False)


class _BagOfTokens(nn.Module):
    """A minimal sequence regressor: mean-pooled embeddings + linear head."""

    def __init__(self, vocab: int):
        super().__init__()
        self.embed = nn.Embedding(vocab, 8)
        self.head = nn.Linear(8, 1)

    def forward(self, tokens):
        return self.head(self.embed(tokens).mean(1)).squeeze(-1)


def _content_target(n=240, seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, 20, size=(n, 16))
    share_of_small = (tokens < 5).mean(1)
    return tokens, np.clip((share_of_small - share_of_small.mean()) / share_of_small.std(), -3, 3)


def test_fit_learns_a_target_that_depends_on_content():
    tokens, target = _content_target()
    torch.manual_seed(0)
    metrics = fit_scorer(_BagOfTokens(20), tokens, target, FitConfig(epochs=30, lr=3e-2, batch_size=32, warmup=5),
                         torch.device("cpu"), show_progress=False)
    assert metrics["val_windows"] == 24
    assert metrics["val"]["spearman"] > 0.7 and metrics["val"]["pearson"] > 0.7


def test_the_best_validation_spearman_model_is_kept():
    """A learning rate that first learns and then diverges: the kept model is the best one seen, and its
    reported correlations are those of the returned weights (recomputed here independently)."""
    tokens, target = _content_target()
    torch.manual_seed(0)
    scorer = _BagOfTokens(20)
    cfg = FitConfig(epochs=12, lr=3e-2, batch_size=32, warmup=0, min_lr_ratio=1.0, eval_every=2, grad_clip=0,
                    weight_decay=0.0)
    metrics = fit_scorer(scorer, tokens, target, cfg, torch.device("cpu"), show_progress=False)
    history = metrics["history"]
    assert len(history) > 10
    best = max(history, key=lambda h: h["spearman"])
    assert metrics["best_step"] == best["step"] and metrics["val"]["spearman"] == best["spearman"]
    _, val_ids = split_ids(len(tokens), cfg.val_fraction, cfg.seed)
    again = evaluate(scorer, tokens[val_ids], target[val_ids], 32, torch.device("cpu"))
    assert again["spearman"] == pytest.approx(best["spearman"], abs=1e-12)
    assert again["pearson"] == pytest.approx(best["pearson"], abs=1e-9)


def test_warmup_decay_and_clipping_shape_the_updates(monkeypatch):
    """The learning rate of each step follows warmup + cosine decay; gradients are clipped to grad_clip."""
    from dsel.pds import fit as fit_module

    seen = []
    real_step = fit_module._train_step

    def spy(scorer, optimizer, tokens, target, lr, cfg, device):
        loss = real_step(scorer, optimizer, tokens, target, lr, cfg, device)
        norm = torch.sqrt(sum((p.grad ** 2).sum() for p in scorer.parameters()))
        seen.append((optimizer.param_groups[0]["lr"], float(norm)))
        return loss

    monkeypatch.setattr(fit_module, "_train_step", spy)
    tokens, target = _content_target(n=100)
    cfg = FitConfig(epochs=2, lr=1e-2, warmup=3, min_lr_ratio=0.1, batch_size=10, grad_clip=0.05)
    fit_scorer(_BagOfTokens(20), tokens, 100 * target, cfg, torch.device("cpu"), show_progress=False)
    lrs = [lr for lr, _ in seen]
    assert len(lrs) == 2 * 9
    np.testing.assert_allclose(lrs[:3], [1e-2 / 3, 2e-2 / 3, 1e-2])
    assert lrs[-1] == pytest.approx(1e-3) and all(a >= b for a, b in zip(lrs[2:], lrs[3:]))
    assert max(norm for _, norm in seen) <= 0.05 + 1e-6


def test_fit_refuses_target_of_wrong_length():
    with pytest.raises(DselError, match="9 target values for 10 proxy windows"):
        fit_scorer(_BagOfTokens(5), np.zeros((10, 4), dtype=np.int64), np.linspace(0, 1, 9), FitConfig(),
                   torch.device("cpu"), show_progress=False)
