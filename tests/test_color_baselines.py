"""The CoLoR-Filter paper's baselines in dsel: RHO-down (online) against a naive loop, DSIR through the
authors' data-selection package."""
import json

import numpy as np
import pytest
import torch

from dsel.data.indexed import IndexedDataset
from dsel.data.windows import Windows
from dsel.errors import DselError
from dsel.models.config import preset
from dsel.models.gpt import GPT
from dsel.select.dsir import log_importance_weights, window_keys
from dsel.select.rho_down import RhoDownBatches, rho_down_keep
from _train_util import TINY_MODEL, write_counting_dataset


def test_rho_down_keeps_the_n_largest_reducible_losses_of_each_candidate_batch(tmp_path):
    windows = Windows(IndexedDataset(write_counting_dataset(tmp_path / "pool", num_docs=80)), TINY_MODEL["seq_len"] + 1)
    loss_cond = np.random.default_rng(0).normal(3.0, 1.0, len(windows))
    torch.manual_seed(0)
    model = GPT(preset("tiny", **TINY_MODEL))
    batches = RhoDownBatches(windows, loss_cond, batch_size=3, grad_accum=2, tau=4, seed=5)
    for step in (0, 1, 7):
        # the naive loop: draw tau*n candidates, score each alone with the current model, keep the n best
        candidates = batches.candidates(step)
        assert len(candidates) == 24 and len(set(candidates)) == 24
        scored = []
        for w in candidates:
            with torch.no_grad():
                current = float(model.sequence_losses(torch.from_numpy(windows.batch([w])))[0])
            scored.append((-(current - loss_cond[w]), int(w)))
        naive = [w for _, w in sorted(scored)[:6]]
        kept, tokens = batches.select(model, step)
        assert kept.tolist() == naive
        np.testing.assert_array_equal(tokens.numpy(), windows.batch(kept))
        assert [len(t) for t, _ in batches(model, step)] == [3, 3]
    assert not np.array_equal(batches.candidates(0), batches.candidates(1))
    assert rho_down_keep(np.array([1.0, 2.0, 2.0]), np.zeros(3), np.array([9, 4, 3]), 2).tolist() == [2, 1]
    with pytest.raises(DselError, match="candidates per step"):
        RhoDownBatches(windows, loss_cond, batch_size=len(windows), grad_accum=1, tau=2, seed=0)


def write_docs(path, docs):
    path.write_text("".join(json.dumps({"id": f"d{i}", "text": t}) + "\n" for i, t in enumerate(docs)))
    return str(path)


def test_dsir_weights_follow_the_target_and_keep_document_order(tmp_path):
    rng = np.random.default_rng(0)
    science = "atom electron proton neutron molecule energy".split()
    sports = "goal match team score league player".split()
    pool = [" ".join(rng.choice(science if i % 3 == 0 else sports, 40)) for i in range(30)]
    target = [" ".join(rng.choice(science, 40)) for _ in range(10)]
    pool_file, target_file = write_docs(tmp_path / "pool.jsonl", pool), write_docs(tmp_path / "target.jsonl", target)
    one = log_importance_weights([pool_file], [target_file], tmp_path / "c1", id_field="id", num_proc=1)
    two = log_importance_weights([pool_file], [target_file], tmp_path / "c2", id_field="id", num_proc=2)
    assert one == pytest.approx(two)  # the package's virtual shards are put back in document order
    weights = np.array([one[f"d{i}"] for i in range(30)])
    assert weights[::3].min() > np.delete(weights, np.arange(0, 30, 3)).max()  # target-like documents first
    keys = window_keys(one, [f"d{i}" for i in range(30)], np.array([0, 0, 1, 3]), seed=0)
    assert keys[0] == keys[1] and keys[0] != keys[2]  # windows of one document share its key
    with pytest.raises(DselError, match="no weight for pool document 'x'"):
        window_keys(one, ["x"], np.array([0]), seed=0)
