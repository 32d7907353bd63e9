"""`dsel pds proxy | solve | fit-scorer | score` end to end on a tiny GPT and a tokenized corpus: the
written G/target/gamma, resume, the uniform proxy sample, jsonl targets, bad input, scores vs the scorer."""
import json
import random

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from dsel.cli import main
from dsel.data.indexed import IndexedDatasetWriter
from dsel.data.meta import read_meta
from dsel.data.windows import Windows
from dsel.data.indexed import IndexedDataset
from dsel.models.checkpoint import load_model, save_model
from dsel.models.config import GPTConfig
from dsel.models.gpt import GPT
from dsel.models.scorer import Scorer
from dsel.pds.commands import sample_windows

SEQ = 8
WORDS = "the cat sat on a mat and the dog ran to the park while markets rallied as bond yields fell".split()


def write_jsonl(path, n, seed):
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            f.write(json.dumps({"text": " ".join(rng.choices(WORDS, k=rng.randint(4, 20)))}) + "\n")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tokenized corpus and target (the same tokenizer), a tiny GPT proxy LM that records it."""
    root = tmp_path_factory.mktemp("pds")
    write_jsonl(root / "corpus.jsonl", 60, seed=0)
    write_jsonl(root / "target.jsonl", 5, seed=1)
    main(["tokenize", f"input={root / 'corpus.jsonl'}", f"output={root / 'corpus'}", "vocab_size=320"])
    main(["tokenize", f"input={root / 'target.jsonl'}", f"output={root / 'target'}", f"tokenizer={root / 'corpus.model'}"])
    meta = {k: read_meta(root / "corpus")[k] for k in ("tokenizer", "tokenizer_sha256", "vocab_size")}
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=128 * -(-meta["vocab_size"] // 128), seq_len=SEQ, n_layer=1, n_head=2, d_model=16)
    save_model(root / "proxy_lm", GPT(config), meta)
    main(["pds", "proxy", f"corpus={root / 'corpus'}", f"window={SEQ + 1}", "windows=24", f"out={root / 'proxy'}"])
    return root


def solve(root, out, *extra, target="target"):
    main(["pds", "solve", f"model={root}/proxy_lm", f"proxy={root}/proxy/proxy", f"target={root}/{target}",
          f"out={out}", "device=cpu", "solver.steps=2", "solver.lr=0.5", *extra])
    return {name: np.load(out / f"{name}.npy") for name in ("G", "target", "gamma")}


def test_proxy_is_a_seeded_uniform_sample_of_the_corpus(setup):
    windows = Windows(IndexedDataset(str(setup / "corpus")), SEQ + 1)
    ids = np.load(setup / "proxy" / "pool_windows.npy")
    np.testing.assert_array_equal(ids, sample_windows(len(windows), 24, 0))
    proxy = Windows(IndexedDataset(str(setup / "proxy" / "proxy")), SEQ + 1)
    np.testing.assert_array_equal(proxy.batch(np.arange(24)), windows.batch(ids))
    assert read_meta(setup / "proxy" / "proxy")["tokenizer_sha256"] == read_meta(setup / "corpus")["tokenizer_sha256"]
    assert not np.array_equal(sample_windows(1000, 24, 1), sample_windows(1000, 24, 0))
    draws = np.concatenate([sample_windows(50, 10, seed) for seed in range(2000)])
    counts = np.bincount(draws, minlength=50)  # each window is kept with probability 1/5: 400 of 2000 expected
    assert len(np.unique(sample_windows(50, 10, 3))) == 10
    assert np.abs(counts - 400).max() < 5 * np.sqrt(2000 * 0.2 * 0.8)
    assert counts[:25].sum() == pytest.approx(counts[25:].sum(), rel=0.05)  # not biased to the start


def test_solve_writes_G_target_gamma_and_resumes(setup, tmp_path):
    straight = solve(setup, tmp_path / "a", "solver.outer_epochs=2")
    info = json.loads((tmp_path / "a" / "gamma.json").read_text())
    assert info["target_kind"] == "zscore" and info["estimator"] == "exact" and info["num_windows"] == 24
    G = straight["G"]
    assert G.shape == (2, 24) and straight["target"].shape == (24,)
    np.testing.assert_allclose(straight["target"], np.clip((G[-1] - G[-1].mean()) / G[-1].std(), -3, 3))
    assert abs(straight["gamma"].sum() - 1) < 1e-9 and straight["gamma"].min() >= 0
    solve(setup, tmp_path / "b", "solver.outer_epochs=1")  # as if killed after the first outer epoch
    resumed = solve(setup, tmp_path / "b", "solver.outer_epochs=2")
    for name in straight:
        np.testing.assert_array_equal(resumed[name], straight[name])
    projected = solve(setup, tmp_path / "b", "solver.outer_epochs=2", "solver.target_kind=gamma")
    gamma = projected["gamma"]
    np.testing.assert_allclose(projected["target"], (gamma - gamma.mean()) / gamma.std())


def test_jsonl_target_is_the_same_examples_as_the_tokenized_one(setup, tmp_path):
    from_dataset = solve(setup, tmp_path / "a")
    from_jsonl = solve(setup, tmp_path / "b", target="target.jsonl")
    np.testing.assert_array_equal(from_jsonl["G"], from_dataset["G"])


def test_sgd_solve_scores_every_window_at_fixed_steps(setup, tmp_path):
    out = solve(setup, tmp_path / "a", "solver.batch_size=4", "solver.steps=4", "solver.score_every=2")
    assert json.loads((tmp_path / "a" / "gamma.json").read_text())["estimator"] == "fixed-step"
    assert np.all(out["G"] != 0)


def run_fails(args, capsys, message):
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1 and message in errors[0] and "Traceback" not in err, err


def test_bad_input_stops_with_one_line_and_writes_nothing(setup, tmp_path, capsys):
    base = ["pds", "solve", f"model={setup}/proxy_lm", "device=cpu", "solver.steps=2"]
    with IndexedDatasetWriter(tmp_path / "foreign", np.uint16) as w:  # ids past the model's vocabulary
        w.add_document(np.full(SEQ + 1, 1000))
    run_fails(base + [f"proxy={tmp_path}/foreign", f"target={setup}/target", f"out={tmp_path}/o1"], capsys,
              "foreign: token id 1000 is past the vocabulary")
    main(["tokenize", f"input={setup / 'target.jsonl'}", f"output={tmp_path / 'other'}", "vocab_size=300"])
    capsys.readouterr()
    run_fails(base + [f"proxy={setup}/proxy/proxy", f"target={tmp_path}/other", f"out={tmp_path}/o2"], capsys,
              "but data")
    run_fails(base + [f"proxy={tmp_path}/other", f"target={setup}/target", f"out={tmp_path}/o2"], capsys, "but data")
    (tmp_path / "empty.jsonl").write_text("")
    run_fails(base + [f"proxy={setup}/proxy/proxy", f"target={tmp_path}/empty.jsonl", f"out={tmp_path}/o3"], capsys,
              "empty.jsonl: no documents")
    gpt, meta = load_model(setup / "proxy_lm")
    save_model(tmp_path / "scorer_ckpt", Scorer.from_gpt(gpt), meta)
    run_fails(["pds", "solve", f"model={tmp_path}/scorer_ckpt", f"proxy={setup}/proxy/proxy",
               f"target={setup}/target", f"out={tmp_path}/o4"], capsys, "holds a 'scorer' model")
    with IndexedDatasetWriter(tmp_path / "same", np.uint16) as w:  # identical windows: G has no spread
        for _ in range(6):
            w.add_document(np.arange(SEQ + 1) % 7)
    run_fails(base + [f"proxy={tmp_path}/same", f"target={setup}/target", f"out={tmp_path}/o5"], capsys,
              "G after outer epoch 0 has no spread over the 6 proxy windows")
    for k in range(1, 6):
        assert not (tmp_path / f"o{k}" / "target.npy").exists() and not (tmp_path / f"o{k}" / "gamma.json").exists()


def test_fit_scorer_then_score_the_corpus(setup, tmp_path, capsys):
    solve(setup, tmp_path / "pds")
    main(["pds", "fit-scorer", f"gamma={tmp_path}/pds", f"out={tmp_path}/scorer", "device=cpu", "fit.epochs=2",
          "fit.val_fraction=0.25", "fit.batch_size=4", f"init={setup}/proxy_lm"])
    assert "best validation spearman" in capsys.readouterr().out
    _, meta = load_model(tmp_path / "scorer")
    assert meta["pds_fit"]["target_kind"] == "zscore" and np.isfinite(meta["pds_fit"]["val"]["spearman"])
    main(["pds", "score", f"corpus={setup}/corpus", f"model={tmp_path}/scorer", f"out={tmp_path}/scores",
          "device=cpu", "batch_size=3"])
    table = pq.read_table(tmp_path / "scores" / "scores.parquet").to_pydict()
    scorer, _ = load_model(tmp_path / "scorer")
    windows = Windows(IndexedDataset(str(setup / "corpus")), SEQ + 1)
    with torch.no_grad():
        expected = scorer(torch.as_tensor(windows.batch(np.arange(len(windows))))).numpy()
    assert table["window"] == list(range(len(windows)))
    np.testing.assert_allclose(table["pds"], expected, rtol=1e-5, atol=1e-6)
    run_fails(["pds", "fit-scorer", f"gamma={tmp_path}/pds", f"out={tmp_path}/s2", "device=cpu",
               f"init={tmp_path}/scorer"], capsys, "holds a 'scorer' model; init= needs a GPT")
    assert not (tmp_path / "s2").exists()
