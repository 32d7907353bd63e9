"""`dsel pds solve | fit-scorer | score` end to end on a tiny GPT: resume, bad input, scores vs the scorer."""
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from dsel.cli import main
from dsel.data.indexed import IndexedDatasetWriter
from dsel.models.checkpoint import load_model, save_model
from dsel.models.config import GPTConfig
from dsel.models.gpt import GPT

VOCAB, SEQ = 64, 8


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("pds")
    rng = np.random.default_rng(0)
    for name, docs in (("proxy", 12), ("target", 3), ("corpus", 20)):
        with IndexedDatasetWriter(root / name, np.uint16) as w:
            for _ in range(docs):
                w.add_document(rng.integers(0, VOCAB, size=SEQ + 1))
    torch.manual_seed(0)
    save_model(root / "proxy_lm", GPT(GPTConfig(vocab_size=VOCAB, seq_len=SEQ, n_layer=1, n_head=2, d_model=16)))
    return root


def solve(root, out, *extra):
    main(["pds", "solve", f"model={root}/proxy_lm", f"proxy={root}/proxy", f"target={root}/target", f"out={out}",
          "device=cpu", "solver.steps=2", "solver.alpha=5", *extra])
    return np.load(out / "gamma.npy")


def test_solve_resumes_after_an_interrupted_run(setup, tmp_path):
    straight = solve(setup, tmp_path / "a", "solver.outer_epochs=2")
    solve(setup, tmp_path / "b", "solver.outer_epochs=1")  # as if killed after the first outer epoch
    resumed = solve(setup, tmp_path / "b", "solver.outer_epochs=2")
    np.testing.assert_array_equal(resumed, straight)
    assert len(straight) == 12 and abs(straight.sum() - 1) < 1e-9 and straight.min() >= 0


def test_solve_refuses_state_of_other_settings_and_foreign_tokens(setup, tmp_path):
    solve(setup, tmp_path / "a", "solver.outer_epochs=1")
    with pytest.raises(SystemExit) as exit_info:
        solve(setup, tmp_path / "a", "solver.outer_epochs=2", "solver.lr=0.5")
    assert exit_info.value.code == 2
    with IndexedDatasetWriter(tmp_path / "foreign", np.uint16) as w:
        w.add_document(np.full(SEQ + 1, VOCAB + 3))
    with pytest.raises(SystemExit):
        main(["pds", "solve", f"model={setup}/proxy_lm", f"proxy={tmp_path}/foreign", f"target={setup}/target",
              f"out={tmp_path}/c", "device=cpu"])


def test_fit_scorer_then_score_the_corpus(setup, tmp_path, capsys):
    solve(setup, tmp_path / "pds", "solver.outer_epochs=2")
    main(["pds", "fit-scorer", f"gamma={tmp_path}/pds", f"out={tmp_path}/scorer", "device=cpu", "fit.epochs=2",
          "fit.val_fraction=0.25"])
    assert "validation pearson" in capsys.readouterr().out
    main(["pds", "score", f"corpus={setup}/corpus", f"model={tmp_path}/scorer", f"out={tmp_path}/scores",
          "device=cpu", "batch_size=3"])
    table = pq.read_table(tmp_path / "scores" / "scores.parquet").to_pydict()
    scorer, _ = load_model(tmp_path / "scorer")
    tokens = np.fromfile(f"{setup}/corpus.bin", dtype=np.uint16).astype(np.int64).reshape(-1, SEQ + 1)
    with torch.no_grad():
        expected = scorer(torch.as_tensor(tokens)).numpy()
    assert table["window"] == list(range(20))
    np.testing.assert_allclose(table["pds"], expected, rtol=1e-5, atol=1e-6)
