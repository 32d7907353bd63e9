"""Torch training backend: learning, schedule, optimizer steps, accumulation, weighted loss, blending."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dsel.data.indexed import IndexedDataset
from dsel.data.loader import GPTSampleLoader
from dsel.data.meta import write_meta
from dsel.models.checkpoint import load_model
from dsel.train.torch_backend import blending_index, build_model, evaluate, learning_rate, train
from tests._train_util import tiny_config, write_counting_dataset


def read_log(run_dir):
    rows = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    return [r for r in rows if "loss" in r], [r for r in rows if "valid_loss" in r]


def first_samples(prefix, cfg, count):
    """The first `count` training samples, straight from the megatron-identical loader."""
    loader = GPTSampleLoader(IndexedDataset(prefix), 16, count, cfg.seed, num_samples=cfg.num_steps(16) * cfg.samples_per_step)
    return torch.from_numpy(loader.batch(np.arange(count)))


def window_losses_from_logits(model, tokens):
    """Mean next-token cross-entropy per window, from materialised logits (independent of model.loss)."""
    logits = model(tokens[:, :-1]).float()
    ce = F.cross_entropy(logits.transpose(1, 2), tokens[:, 1:], reduction="none")
    return ce.mean(dim=1)


def test_loss_decreases_and_checkpoint_records_data(tmp_path):
    data = write_counting_dataset(tmp_path / "train")
    valid = write_counting_dataset(tmp_path / "valid", num_docs=10, seed=1)
    write_meta(data, {"vocab_size": 64, "tokenizer": "tok.model", "tokenizer_sha256": "abc", "dtype": "uint16", "eod_id": 0})
    cfg = tiny_config(tmp_path, [data], valid=valid, steps=40, eval_every=20, eval_batches=2)
    path = train(cfg)
    steps, evals = read_log(tmp_path / "run")
    assert [r["step"] for r in steps] == list(range(1, 41))
    assert np.mean([r["loss"] for r in steps[-5:]]) < 0.6 * np.mean([r["loss"] for r in steps[:5]])
    assert [r["tokens"] for r in steps[:2]] == [4 * 16, 2 * 4 * 16]
    assert [r["step"] for r in evals] == [20, 40] and evals[1]["valid_loss"] < evals[0]["valid_loss"]
    model, meta = load_model(path)
    assert (meta["tokenizer"], meta["tokenizer_sha256"], meta["vocab_size"], meta["step"]) == ("tok.model", "abc", 64, 40)
    assert evaluate(model, valid, batch_size=4, max_batches=2) == pytest.approx(evals[1]["valid_loss"], rel=1e-6)
    assert (tmp_path / "run" / "config.yaml").is_file()


def test_evaluate_is_the_mean_window_loss(tmp_path):
    data = write_counting_dataset(tmp_path / "d")
    model = build_model(tiny_config(tmp_path, [data]))
    windows = torch.from_numpy(IndexedDataset(data).stream[: 6 * 17].astype(np.int64).reshape(6, 17))
    with torch.no_grad():
        expected = window_losses_from_logits(model, windows).mean().item()
    assert evaluate(model, data, window=17, batch_size=2, max_batches=3) == pytest.approx(expected, rel=1e-5)
    assert evaluate(model, data, window=17, batch_size=3, max_batches=2) == pytest.approx(expected, rel=1e-5)


def test_schedule_is_linear_warmup_then_cosine_to_min_lr_at_the_last_step(tmp_path):
    data = write_counting_dataset(tmp_path / "d")
    cfg = tiny_config(tmp_path, [data], steps=10, warmup=3, lr=1e-2, min_lr=1e-3)
    def hand(step, steps=10, warmup=3, lr=1e-2, min_lr=1e-3):
        if step < warmup:
            return lr * (step + 1) / warmup
        return min_lr + (lr - min_lr) * 0.5 * (1 + math.cos(math.pi * (step - warmup) / (steps - 1 - warmup)))
    assert [learning_rate(cfg, s, 10) for s in range(10)] == pytest.approx([hand(s) for s in range(10)], rel=1e-12)
    train(cfg)
    steps, _ = read_log(tmp_path / "run")
    assert [r["lr"] for r in steps] == pytest.approx([hand(s) for s in range(10)], rel=1e-12)


def test_sgd_step_is_theta_minus_lr_grad(tmp_path):
    data = write_counting_dataset(tmp_path / "d")
    cfg = tiny_config(tmp_path, [data], optimizer="sgd", steps=1, lr=0.5, min_lr=0.5, grad_clip=0.0, weight_decay=0.0)
    reference = build_model(cfg)
    window_losses_from_logits(reference, first_samples(data, cfg, 4)).mean().backward()
    trained, _ = load_model(train(cfg))
    for name, p in reference.named_parameters():
        torch.testing.assert_close(trained.state_dict()[name], p.detach() - 0.5 * p.grad, rtol=1e-5, atol=1e-6)


def test_grad_accumulation_equals_one_big_batch(tmp_path):
    data = write_counting_dataset(tmp_path / "d")
    big = load_model(train(tiny_config(tmp_path / "a", [data], optimizer="sgd", batch_size=4, steps=3)))[0]
    accum = load_model(train(tiny_config(tmp_path / "b", [data], optimizer="sgd", batch_size=2, grad_accum=2, steps=3)))[0]
    for name, p in big.state_dict().items():
        torch.testing.assert_close(accum.state_dict()[name], p, rtol=1e-5, atol=1e-6)


def test_weighted_loss_is_the_weighted_sum_of_window_losses(tmp_path):
    data = write_counting_dataset(tmp_path / "d")
    weights = np.random.default_rng(3).uniform(0, 3, size=8).astype(np.float32)
    np.save(tmp_path / "w.npy", weights)
    settings = dict(optimizer="sgd", steps=1, batch_size=2, grad_accum=2, lr=0.5, min_lr=0.5, grad_clip=0.0, weight_decay=0.0)
    cfg = tiny_config(tmp_path / "npy", [data], weights=str(tmp_path / "w.npy"), **settings)
    reference = build_model(cfg)
    losses = window_losses_from_logits(reference, first_samples(data, cfg, 4))
    objective = sum(float(weights[n]) * losses[n] for n in range(4)) / 4
    objective.backward()
    from_npy, _ = load_model(train(cfg))
    for name, p in reference.named_parameters():
        torch.testing.assert_close(from_npy.state_dict()[name], p.detach() - 0.5 * p.grad, rtol=1e-5, atol=1e-6)
    logged = json.loads((tmp_path / "npy" / "run" / "log.jsonl").read_text().splitlines()[0])["loss"]
    assert logged == pytest.approx(objective.item(), rel=1e-5)
    from_callable, _ = load_model(train(tiny_config(tmp_path / "fn", [data], **settings), sample_weights=lambda ids: weights[ids]))
    for name, p in from_npy.state_dict().items():
        torch.testing.assert_close(from_callable.state_dict()[name], p, rtol=0, atol=0)


def test_unit_weights_equal_unweighted_training(tmp_path):
    data = write_counting_dataset(tmp_path / "d")
    plain, _ = load_model(train(tiny_config(tmp_path / "a", [data], steps=3)))
    ones, _ = load_model(train(tiny_config(tmp_path / "b", [data], steps=3), sample_weights=lambda ids: np.ones(len(ids))))
    for name, p in plain.state_dict().items():
        torch.testing.assert_close(ones.state_dict()[name], p, rtol=1e-5, atol=1e-6)


def test_blending_index_matches_megatron():
    helpers = pytest.importorskip("megatron.core.datasets.helpers_cpp")
    weights = np.array([0.5, 0.3, 0.2])
    index = np.zeros(1000, dtype=np.int16)
    sample = np.zeros(1000, dtype=np.int64)
    helpers.build_blending_indices(index, sample, weights, 3, 1000, False)
    ours_index, ours_sample = blending_index([5, 3, 2], 1000)
    np.testing.assert_array_equal(ours_index, index)
    np.testing.assert_array_equal(ours_sample, sample)


def test_several_prefixes_are_blended(tmp_path):
    a = write_counting_dataset(tmp_path / "a", num_docs=30)
    b = write_counting_dataset(tmp_path / "b", num_docs=10, seed=5)
    cfg = tiny_config(tmp_path, [a, b], data_weights=[0.75, 0.25], steps=4)
    train(cfg)
    steps, _ = read_log(tmp_path / "run")
    assert len(steps) == 4 and all(np.isfinite(r["loss"]) for r in steps)
