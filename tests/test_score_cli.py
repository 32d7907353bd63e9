"""Scorer registry, `dsel score` / `dsel score merge`, and torchrun (gloo, 2 ranks) against 1 rank."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from dsel.cli import all_commands, main, with_default_subcommand
from dsel.errors import DselError
from dsel.io import read_json
from dsel.score import scorers
from dsel.score.engine import score_windows
from tests._score_util import BUILT, FakeScorer, build_fake_scorer, make_corpus, open_corpus

ROOT = Path(__file__).resolve().parents[1]
FAKE = "tests._score_util:build_fake_scorer"


def test_registry_builds_registered_and_module_scorers(monkeypatch):
    assert {"pds", "color"} <= set(scorers.scorer_names())
    with pytest.raises(DselError, match="unknown scorer 'nope'; valid: .*color.*pds"):
        scorers.build_scorer("nope", {}, "cpu")
    with pytest.raises(DselError, match="cannot load builder"):
        scorers.build_scorer("no.such.module:f", {}, "cpu")
    monkeypatch.setitem(scorers._BUILDERS, "fake", build_fake_scorer)
    assert isinstance(scorers.build_scorer("fake", {"fail_after": 3}, "cpu"), FakeScorer)
    assert scorers.build_scorer(FAKE, {}, "cpu").columns == ["total", "first"]
    assert scorers.resolve_builder("pds").__module__ == "dsel.pds.scorer"
    with pytest.raises(DselError, match="pds scorer settings"):
        scorers.build_scorer("pds", {"bogus": 1}, "cpu")


def test_default_subcommand_only_for_the_score_group():
    commands = all_commands()
    assert with_default_subcommand(["score", "corpus=x"], commands) == ["score", "run", "corpus=x"]
    assert with_default_subcommand(["--log-level", "DEBUG", "score"], commands)[-1] == "run"
    assert with_default_subcommand(["score", "merge", "out=x"], commands) == ["score", "merge", "out=x"]
    assert with_default_subcommand(["pds", "score", "corpus=x"], commands) == ["pds", "score", "corpus=x"]


def test_dsel_score_and_merge_commands(tmp_path, capsys):
    make_corpus(tmp_path / "corpus")
    args = [f"corpus={tmp_path / 'corpus'}", "window=6", f"scorer={FAKE}", f"out={tmp_path / 'out'}", "shard_size=9",
            "batch_size=4", "device=cpu"]
    main(["score", *args])
    first = pq.read_table(tmp_path / "out" / "scores.parquet")
    (tmp_path / "out" / "scores.parquet").unlink()
    main(["score", "merge", f"out={tmp_path / 'out'}"])
    assert pq.read_table(tmp_path / "out" / "scores.parquet").equals(first)
    with pytest.raises(SystemExit) as exit_info:
        main(["score", *args[:-1], "scorer=missing"])
    assert exit_info.value.code == 2
    assert "unknown scorer 'missing'" in capsys.readouterr().err


def torchrun(args, nproc=2, env=()):
    """Run `python -m torch.distributed.run ... ARGS` from the repository root; returns the result."""
    env = {**os.environ, "DSEL_PROGRESS": "0", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), **dict(env)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_torchrun_two_ranks_equal_one_rank(tmp_path):
    prefix = tmp_path / "corpus"
    make_corpus(prefix, num_docs=60)
    single = score_windows(open_corpus(prefix, 5), FakeScorer(), tmp_path / "one", batch_size=4, shard_size=7)
    launches = {  # the command (creates the process group) and the library API (joins torchrun's)
        "cli": ["-m", "dsel", "score", f"corpus={prefix}", "window=5", f"scorer={FAKE}", "shard_size=7", "batch_size=3",
                "device=cpu", f"out={tmp_path / 'cli'}"],
        "api": ["-m", "tests._score_util", str(prefix), "5", str(tmp_path / "api")],
    }
    for name, args in launches.items():
        result = torchrun(args)
        assert result.returncode == 0, result.stderr[-3000:]
        out = tmp_path / name
        workers = {read_json(p)["worker"].split(",")[0] for p in (out / "shards").glob("shard-*.json")}
        assert workers == {"rank 0", "rank 1"}
        assert pq.read_table(out / "scores.parquet").equals(pq.read_table(single))


def test_killed_process_resumes_without_rescoring(tmp_path):
    prefix = tmp_path / "corpus"
    make_corpus(prefix)
    clean = score_windows(open_corpus(prefix, 6), FakeScorer(), tmp_path / "clean", batch_size=4, shard_size=8)
    args = ["score", f"corpus={prefix}", "window=6", f"scorer={FAKE}", "shard_size=8", "batch_size=4", "device=cpu",
            f"out={tmp_path / 'out'}"]
    env = {**os.environ, "DSEL_PROGRESS": "0", "PYTHONPATH": str(ROOT), "DSEL_TEST_EXIT_AFTER": "5"}
    result = subprocess.run([sys.executable, "-m", "dsel", *args], cwd=ROOT, env=env, capture_output=True, text=True)
    assert result.returncode == 3, result.stderr[-3000:]
    assert len(list((tmp_path / "out" / "shards").glob("shard-*.json"))) == 2
    main(args)
    windows = len(open_corpus(prefix, 6))
    unfinished = [min(8, windows - start) for start in range(16, windows, 8)]  # shards 2, 3, ...
    assert BUILT[-1].calls == sum(-(-size // 4) for size in unfinished)
    assert pq.read_table(tmp_path / "out" / "scores.parquet").equals(pq.read_table(clean))


def test_dsel_select_reads_the_score_table(tmp_path):
    make_corpus(tmp_path / "corpus")
    main(["score", f"corpus={tmp_path / 'corpus'}", "window=6", f"scorer={FAKE}", f"out={tmp_path / 'scores'}",
          "device=cpu"])
    main(["select", f"scores={tmp_path / 'scores'}", f"out={tmp_path / 'select'}", "method=topk", "column=total",
          "fraction=0.5", "materialise=false"])
    total = pq.read_table(tmp_path / "scores" / "scores.parquet").column("total").to_numpy()
    kept = np.load(tmp_path / "select" / "indices.npy")
    assert len(kept) == round(len(total) / 2)
    assert total[kept].min() >= np.delete(total, kept).max()
