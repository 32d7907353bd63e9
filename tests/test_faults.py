"""Fault injection: kills at random instants, concurrent writers, read-only folders, a full disk, stale
reuse. Each test's first docstring line is its case and what it protects (docs/reliability.md is
generated from them by scripts/reliability_table.py)."""
from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from dsel.cli import main
from dsel.config import from_dict
from dsel.errors import DselError
from dsel.io import lock_file, output_lock

ROOT = Path(__file__).resolve().parent.parent
VOCAB = 320
GPT = {"vocab_size": 384, "seq_len": 16, "n_layer": 1, "n_head": 2, "d_model": 32}
WORDS = "data selection optimal control loss prior target corpus window token model score filter " \
        "science legal sports travel recipe software gradient adjoint weight budget".split()


# ----- fixtures: a tokenized corpus, tiny checkpoints, a score table -----------------------------------
@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """corpus.jsonl, its dataset `base` (tokenizer base.model), prior/cond checkpoints, a score table."""
    from dsel.color.commands import ColorScoreConfig, run_score
    from dsel.models.checkpoint import save_model
    from dsel.models.config import preset
    from dsel.models.gpt import GPT as Model

    root = tmp_path_factory.mktemp("faults")
    rng = random.Random(0)
    with open(root / "corpus.jsonl", "w") as f:
        for i in range(300):
            words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 20)))
            f.write(json.dumps({"id": f"doc{i}", "text": words}) + "\n")
    os.environ["DSEL_PROGRESS"] = "0"
    main(["tokenize", f"input={root / 'corpus.jsonl'}", f"output={root / 'base'}", f"vocab_size={VOCAB}",
          "workers=1", "id_field=id"])
    for seed, name in enumerate(("prior", "cond")):
        torch.manual_seed(seed)
        save_model(root / name, Model(preset("tiny", **GPT)))
    run_score(from_dict(ColorScoreConfig, {"corpus": str(root / "base"), "prior": str(root / "prior"),
                                           "cond": str(root / "cond"), "out": str(root / "scores"),
                                           "batch_size": 16, "device": "cpu"}))
    return root


def dsel(*args, env=None, preexec=None) -> subprocess.Popen:
    """`python -m dsel ARGS` in a subprocess (this tree first on the path, progress bars off)."""
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), "DSEL_PROGRESS": "0", **(env or {})}
    return subprocess.Popen([sys.executable, "-m", "dsel", *map(str, args)], env=full_env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=preexec)


def finish(proc: subprocess.Popen, timeout: float = 300) -> tuple[int, str]:
    """(exit status, stderr) of a finished subprocess."""
    _, err = proc.communicate(timeout=timeout)
    return proc.returncode, err


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120) -> bool:
    """Wait until `path` exists (True) or the process ended (False)."""
    end = time.time() + timeout
    while time.time() < end:
        if path.exists():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.005)
    raise TimeoutError(path)


def timed(args) -> float:
    """Run a command to completion in this process (the uninterrupted reference); its seconds."""
    started = time.time()
    main(list(map(str, args)))
    return time.time() - started


def kill_then_rerun(args, lock: Path, seed: int, work_seconds: float) -> float:
    """Start the command, SIGKILL it a seeded random time into its work, rerun it to completion."""
    delay = random.Random(seed).uniform(0.0, 0.9) * work_seconds
    proc = dsel(*args)
    if wait_for(lock, proc):
        time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    status, err = finish(dsel(*args))
    assert status == 0, err
    return delay


def leftovers(*folders: Path) -> list[str]:
    """Temporary files, moved-aside folders and locks under or beside the given outputs."""
    found = []
    for folder in folders:
        for path in [*folder.parent.iterdir(), *(folder.rglob("*") if folder.is_dir() else [])]:
            if path.name.startswith(".") and any(t in path.name for t in (".tmp-", ".old-", ".lock", "probe")):
                found.append(str(path))
    return found


def same_files(a: Path, b: Path, names) -> None:
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


# ----- SIGKILL at a random instant, then rerun: identical to an uninterrupted run ----------------------
def test_kill_tokenize_then_rerun_gives_identical_dataset(work, tmp_path):
    """SIGKILL of `dsel tokenize` at a seeded random instant, rerun: dataset byte-identical, no temp file left."""
    def args(out):
        return ["tokenize", f"input={work / 'corpus.jsonl'}", f"output={out}", f"tokenizer={work / 'base.model'}",
                "workers=1", "id_field=id", "chunk_docs=16"]
    for folder in ("ref", "killed"):
        (tmp_path / folder).mkdir()
    seconds = timed(args(tmp_path / "ref" / "ds"))
    kill_then_rerun(args(tmp_path / "killed" / "ds"), lock_file(tmp_path / "killed" / "ds"), 1, seconds)
    same_files(tmp_path / "ref", tmp_path / "killed", ["ds.bin", "ds.idx", "ds.docids.jsonl"])
    assert leftovers(tmp_path / "killed" / "ds") == []


def test_kill_score_then_rerun_gives_identical_scores(work, tmp_path):
    """SIGKILL of `dsel color score` mid-shards, rerun: every score column bit-identical, finished shards kept."""
    import pyarrow.parquet as pq

    def args(out):
        return ["color", "score", f"corpus={work / 'base'}", f"prior={work / 'prior'}", f"cond={work / 'cond'}",
                f"out={out}", "batch_size=16", "shard_size=32", "device=cpu"]
    seconds = timed(args(tmp_path / "ref"))
    kill_then_rerun(args(tmp_path / "killed"), lock_file(tmp_path / "killed", ".rank0"), 3, seconds)
    ref, got = pq.read_table(tmp_path / "ref" / "scores.parquet"), pq.read_table(tmp_path / "killed" / "scores.parquet")
    for name in ("window", "loss_prior", "loss_cond", "color"):
        assert np.array_equal(ref.column(name).to_numpy(), got.column(name).to_numpy()), name
    assert leftovers(tmp_path / "killed") == []


@pytest.mark.parametrize("seed", [4, 5])
def test_kill_select_overwriting_a_selection_leaves_old_or_new_whole(work, tmp_path, seed):
    """SIGKILL of `dsel select overwrite=true` replacing a finished selection: after the kill the folder
    holds the old selection or the new one, whole; the rerun equals an uninterrupted run."""
    def args(out, fraction):
        return ["select", f"scores={work / 'scores'}", f"out={out}", "method=topk", "column=color",
                f"fraction={fraction}", "overwrite=true"]
    names = ["indices.npy", "data/selected.bin", "data/selected.idx"]
    for out, fraction in ((tmp_path / "old", 0.2), (tmp_path / "killed", 0.2)):
        timed(args(out, fraction))
    seconds = timed(args(tmp_path / "new", 0.5))
    proc = dsel(*args(tmp_path / "killed", 0.5))
    if wait_for(lock_file(tmp_path / "killed"), proc):
        time.sleep(random.Random(seed).uniform(0.0, 0.9) * seconds)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    state = json.loads((tmp_path / "killed" / "selection.json").read_text())["fraction"]
    same_files(tmp_path / ("old" if state == 0.2 else "new"), tmp_path / "killed", names)
    status, err = finish(dsel(*args(tmp_path / "killed", 0.5)))
    assert status == 0, err
    same_files(tmp_path / "new", tmp_path / "killed", names)
    assert leftovers(tmp_path / "killed") == []


def test_kill_train_then_rerun_gives_identical_weights(work, tmp_path):
    """SIGKILL of `dsel train` at a random step, rerun: weights and loss log bit-identical to an uninterrupted run."""
    def args(out):
        return ["train", f"data=[{work / 'base'}]", f"out={out}", "steps=24", "batch_size=4", "save_every=3",
                "device=cpu", "preset=tiny", "model=" + json.dumps(GPT)]
    seconds = timed(args(tmp_path / "ref"))
    kill_then_rerun(args(tmp_path / "killed"), lock_file(tmp_path / "killed"), 6, seconds)
    from dsel.models.checkpoint import load_model

    ref, got = (load_model(d / "model")[0].state_dict() for d in (tmp_path / "ref", tmp_path / "killed"))
    assert ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref)
    losses = [[json.loads(r).get("loss") for r in (d / "log.jsonl").read_text().splitlines()]
              for d in (tmp_path / "ref", tmp_path / "killed")]
    assert losses[0] == losses[1]
    assert leftovers(tmp_path / "killed", tmp_path / "killed" / "model") == []


def small_run_configs(tmp_path: Path, *run_dirs: Path) -> list[Path]:
    """The pipeline test's settings on half its corpus, cut to CoLoR and the selections (seconds on a
    CPU), one config file per run directory."""
    from test_pipeline_run import small_config

    config = yaml.safe_load(small_config(tmp_path).read_text())
    spec = importlib.util.spec_from_file_location("make_corpus", ROOT / "scripts" / "make_corpus.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.make_corpus(scale=0.03, out=tmp_path / "corpus", tasks=tmp_path / "corpus" / "task")
    paths = []
    for run_dir in run_dirs:
        config.update(run_dir=str(run_dir), methods=["color"], until="select")
        paths.append(tmp_path / f"{run_dir.name}.yaml")
        paths[-1].write_text(yaml.safe_dump(config))
    return paths


def test_kill_dsel_run_then_rerun_gives_identical_selections(tmp_path):
    """SIGKILL of `dsel run` at a seeded random instant, rerun: the selections equal an uninterrupted run's."""
    ref, killed = tmp_path / "ref", tmp_path / "killed"
    ref_config, killed_config = small_run_configs(tmp_path, ref, killed)
    seconds = timed(["run", "-c", ref_config])
    kill_then_rerun(["run", "-c", killed_config], lock_file(killed), 7, seconds)
    for arm in ("color", "random"):
        same_files(ref / arm / "select", killed / arm / "select", ["indices.npy", "data/selected.bin"])
    assert leftovers(killed) == []


# ----- one writer per output ---------------------------------------------------------------------------
def test_second_writer_is_refused_naming_the_pid(work, tmp_path):
    """A second writer of an output folder in use: one line 'in use by pid N', exit 2, nothing written."""
    out = tmp_path / "sel"
    with output_lock(out):
        status, err = finish(dsel("select", f"scores={work / 'scores'}", f"out={out}", "fraction=0.3",
                                     "column=color"))
    assert status == 2 and f"in use by pid {os.getpid()}" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_two_concurrent_selects_never_break_the_output(work, tmp_path):
    """Two `dsel select` into one folder at once: each succeeds or is refused (in use), the output is whole."""
    out, ref = tmp_path / "sel", tmp_path / "ref"
    args = [f"scores={work / 'scores'}", "method=topk", "column=color", "fraction=0.4"]
    timed(["select", *args, f"out={ref}"])
    results = [finish(p) for p in [dsel("select", *args, f"out={out}") for _ in range(2)]]
    assert all(s == 0 or (s == 2 and "in use by pid" in e) for s, e in results), results
    assert any(s == 0 for s, _ in results)
    same_files(ref, out, ["indices.npy", "data/selected.bin", "data/selected.idx"])
    assert leftovers(out) == []


def test_lock_of_a_dead_process_is_taken_over(work, tmp_path):
    """A lock file left by a killed writer (dead pid): taken over; the command runs and removes it."""
    out = tmp_path / "sel"
    lock_file(out).write_text("999999999\n")
    main(["select", f"scores={work / 'scores'}", f"out={out}", "fraction=0.3", "column=color"])
    assert (out / "selection.json").is_file() and not lock_file(out).exists()


def test_different_finished_output_needs_overwrite(work, tmp_path, capsys):
    """A different finished selection or dataset in out: refused naming the differing setting unless
    overwrite=true; the same settings, or a speed-only change (chunk_rows), rerun freely."""
    base = ["select", f"scores={work / 'scores'}", f"out={tmp_path / 'sel'}", "method=topk", "column=color"]
    main([*base, "fraction=0.3"])
    main([*base, "fraction=0.3", "chunk_rows=7"])
    with pytest.raises(SystemExit) as exit_info:
        main([*base, "fraction=0.5"])
    assert exit_info.value.code == 2 and "fraction=0.3" in capsys.readouterr().err
    main([*base, "fraction=0.5", "overwrite=true"])
    assert json.loads((tmp_path / "sel" / "selection.json").read_text())["fraction"] == 0.5
    for path in work.glob("base.*"):
        shutil.copy(path, tmp_path / path.name)
    with pytest.raises(SystemExit):
        main(["tokenize", f"input={work / 'prior' / 'meta.json'}", f"output={tmp_path / 'base'}", "text_field=x"])
    assert "holds a finished dataset made with inputs=" in capsys.readouterr().err


# ----- bad states of the machine: read-only folders, a full disk ----------------------------------------
@contextlib.contextmanager
def read_only(folder: Path):
    """Make `folder` read-only: chmod for a normal user; root ignores modes, so a read-only bind mount."""
    folder.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        folder.chmod(0o555)
        try:
            yield folder
        finally:
            folder.chmod(0o755)
        return
    mounted = subprocess.run(f"mount --bind {folder} {folder} && mount -o remount,ro,bind {folder}", shell=True,
                             capture_output=True)
    if mounted.returncode != 0:
        subprocess.run(["umount", str(folder)], capture_output=True)
        pytest.skip("running as root without mount rights: no way to make a read-only folder")
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=True)


READ_ONLY_COMMANDS = {
    "tokenize": ["tokenize", "input={corpus}", "output={out}/ds", "vocab_size=300"],
    "train": ["train", "data=[{base}]", "out={out}", "steps=5"],
    "select": ["select", "scores={scores}", "out={out}", "column=color"],
    "score": ["score", "corpus={base}", "window=17", "scorer=color", "out={out}"],
    "color score": ["color", "score", "corpus={base}", "prior={prior}", "cond={cond}", "out={out}"],
    "color finetune": ["color", "finetune", "prior={prior}", "target={corpus}", "out={out}"],
    "color train-prior": ["color", "train-prior", "corpus={base}", "out={out}", "train={{steps: 2}}"],
    "pds solve": ["pds", "solve", "model={prior}", "proxy={base}", "target={base}", "out={out}"],
    "pds fit-scorer": ["pds", "fit-scorer", "gamma={out}", "out={out}"],
    "pds score": ["pds", "score", "corpus={base}", "model={prior}", "out={out}"],
    "eval loss": ["eval", "loss", "checkpoint={prior}", "data={{a: {base}}}", "out={out}/loss.json"],
    "eval lm-eval": ["eval", "lm-eval", "checkpoint={prior}", "out={out}/lm.json"],
    "run": ["run", "run_dir={out}"],
}


@pytest.mark.parametrize("command", list(READ_ONLY_COMMANDS))
def test_read_only_output_folder_is_one_line_before_any_work(work, tmp_path, capsys, command):
    """A read-only output folder: one line naming it, exit 2, before any work starts (every command)."""
    paths = {"corpus": work / "corpus.jsonl", "base": work / "base", "scores": work / "scores",
             "prior": work / "prior", "cond": work / "cond"}
    with read_only(tmp_path / "ro") as folder:
        args = [a.format(out=folder, **paths) for a in READ_ONLY_COMMANDS[command]]
        started = time.time()
        with pytest.raises(SystemExit) as exit_info:
            main(args)
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1, err
    assert f"{folder}: output folder is not writable" in err and time.time() - started < 30


def test_full_disk_is_one_line_and_keeps_the_previous_output(work, tmp_path):
    """A full disk (RLIMIT_FSIZE in the subprocess) while replacing a selection: one line, exit 2, the
    previous selection byte-identical, no temporary files."""
    out = tmp_path / "sel"
    args = ["select", f"scores={work / 'scores'}", f"out={out}", "method=topk", "column=color"]
    timed([*args, "fraction=0.2"])
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}

    def small_disk():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))

    status, err = finish(dsel(*args, "fraction=0.9", "overwrite=true", preexec=small_disk))
    assert status == 2 and len(err.strip().splitlines()) == 1 and f"{out}: could not be written" in err, err
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert leftovers(out) == []


# ----- fingerprints by content and identity checks -------------------------------------------------------
def test_checkpoint_digest_is_saved_and_follows_the_weights(tmp_path):
    """checkpoint_digest: saved at write time, equal to one computed on demand, changed by new weights."""
    from dsel.models.checkpoint import DIGEST, checkpoint_digest, save_model
    from dsel.models.config import preset
    from dsel.models.gpt import GPT as Model

    torch.manual_seed(0)
    model = Model(preset("tiny", **GPT))
    save_model(tmp_path / "m", model)
    saved = checkpoint_digest(tmp_path / "m")
    (tmp_path / "m" / DIGEST).unlink()  # a checkpoint from before digests: computed now
    assert checkpoint_digest(tmp_path / "m") == saved
    with torch.no_grad():
        model.head_weight.add_(1e-3)
    save_model(tmp_path / "m", model)
    assert checkpoint_digest(tmp_path / "m") != saved


def test_scores_refuse_a_model_retrained_in_place(work, tmp_path):
    """`dsel color score` rerun after the model was retrained at the same path: refused, naming the key."""
    from dsel.color.commands import ColorScoreConfig, run_score
    from dsel.models.checkpoint import load_model, save_model

    shutil.copytree(work / "cond", tmp_path / "cond")
    cfg = from_dict(ColorScoreConfig, {"corpus": str(work / "base"), "prior": str(work / "prior"),
                                       "cond": str(tmp_path / "cond"), "out": str(tmp_path / "s"), "device": "cpu"})
    run_score(cfg)
    model, meta = load_model(tmp_path / "cond")
    with torch.no_grad():
        model.head_weight.mul_(1.5)
    save_model(tmp_path / "cond", model, meta)
    with pytest.raises(DselError, match=r"meta\.digests\.cond"):
        run_score(cfg)


def test_select_refuses_scores_of_another_corpus(work, tmp_path):
    """`dsel select` with scores of another corpus of the same window count: refused (corpus digest)."""
    from dsel.data.indexed import IndexedDataset, IndexedDatasetWriter

    source = IndexedDataset(str(work / "base"))
    with IndexedDatasetWriter(tmp_path / "other", source.dtype) as writer:  # same tokens, other documents
        writer.add_document(source.stream)
    with pytest.raises(DselError, match="scores of another corpus"):
        main_api_select(work, tmp_path, corpus=str(tmp_path / "other"))


def main_api_select(work, tmp_path, **settings):
    from dsel.select.commands import SelectConfig, run_select

    return run_select(from_dict(SelectConfig, {"scores": str(work / "scores"), "out": str(tmp_path / "sel"),
                                               "column": "color", **settings}))


def test_select_refuses_a_table_without_its_manifest(work, tmp_path):
    """A score table whose scores.json is gone (a merge killed before its manifest): refused, one line."""
    shutil.copytree(work / "scores", tmp_path / "scores", ignore=shutil.ignore_patterns("shards"))
    window = json.loads((tmp_path / "scores" / "scores.json").read_text())["window"]
    (tmp_path / "scores" / "scores.json").unlink()
    from dsel.select.commands import SelectConfig, run_select

    with pytest.raises(DselError, match="scores.json is missing"):
        run_select(from_dict(SelectConfig, {"scores": str(tmp_path / "scores"), "corpus": str(work / "base"),
                                            "window": window, "out": str(tmp_path / "sel"), "column": "color"}))


@pytest.mark.parametrize("settings, message", [
    ({"token_budget": 5}, "below one window"),
])
def test_impossible_budget_is_refused_up_front(work, tmp_path, settings, message):
    """token_budget below one window: refused before selecting, instead of an empty selection."""
    with pytest.raises(DselError, match=message):
        main_api_select(work, tmp_path, **settings)
    assert not (tmp_path / "sel").exists()


@pytest.mark.parametrize("length", ["steps=0", "tokens=0"])
def test_zero_training_length_is_refused_up_front(work, tmp_path, capsys, length):
    """steps=0 / tokens=0: one line before training, never a report of a checkpoint that was not written."""
    with pytest.raises(SystemExit) as exit_info:
        main(["train", f"data=[{work / 'base'}]", f"out={tmp_path / 't'}", length])
    assert exit_info.value.code == 2 and "must be positive" in capsys.readouterr().err
    assert not (tmp_path / "t").exists()


def test_speed_only_settings_do_not_change_results(work, tmp_path):
    """Speed-only settings (tokenize workers, select chunk_rows; left out of every reuse key): byte-identical outputs."""
    for workers in (1, 2):
        main(["tokenize", f"input={work / 'corpus.jsonl'}", f"output={tmp_path / f'w{workers}'}",
              f"tokenizer={work / 'base.model'}", f"workers={workers}", "id_field=id", "chunk_docs=50"])
    same = [f"w1.{s}" for s in ("bin", "idx", "docids.jsonl")]
    for name in same:
        assert (tmp_path / name).read_bytes() == (tmp_path / name.replace("w1", "w2")).read_bytes()
    for i, speed in enumerate([{"chunk_rows": 1 << 20}, {"chunk_rows": 7}]):
        main_api_select(work, tmp_path / str(i), method="gumbel", column="color", fraction=0.3, **speed)
    same_files(tmp_path / "0" / "sel", tmp_path / "1" / "sel", ["indices.npy", "data/selected.bin", "data/selected.idx"])


def test_stage_runner_reuses_by_content(tmp_path):
    """`dsel run` stages: a changed input file at the same path reruns that stage and the ones after it;
    deleted or altered outputs rerun the stage (DONE.json is not enough); speed-only settings rerun nothing."""
    from dsel.pipeline.runner import StageRunner

    source = tmp_path / "pool.txt"
    source.write_text("abc")
    runs = []

    def copy(out):
        runs.append("a")
        (out / "a.txt").write_text(source.read_text().upper())

    def reverse(out):
        runs.append("b")
        (out / "b.txt").write_text((tmp_path / "run" / "a" / "a.txt").read_text()[::-1])

    def pipeline(**settings):
        runner = StageRunner(tmp_path / "run")
        runner.run("a", {"x": 1, **settings}, [], copy, reads=[str(source)])
        runner.run("b", {}, ["a"], reverse)

    pipeline()
    pipeline(workers=8)
    assert runs == ["a", "b"]
    source.write_text("xyz")  # same path and size, new content
    pipeline()
    assert runs[2:] == ["a", "b"] and (tmp_path / "run" / "b" / "b.txt").read_text() == "ZYX"
    (tmp_path / "run" / "a" / "a.txt").unlink()  # output deleted, DONE.json kept: the stage reruns, b is current
    pipeline()
    assert runs[4:] == ["a"]
    (tmp_path / "run" / "b" / "b.txt").write_text("QQQ")  # output altered in place
    pipeline()
    assert runs[5:] == ["b"] and (tmp_path / "run" / "b" / "b.txt").read_text() == "ZYX"


def copy_dataset(prefix: Path, to: Path) -> Path:
    """Copy the files of dataset `prefix` (bin, idx, meta, doc ids) to prefix `to`."""
    for path in prefix.parent.glob(prefix.name + ".*"):
        shutil.copy(path, to.parent / (to.name + path.name[len(prefix.name):]))
    return to


def rewrite_as_one_document(prefix: Path) -> None:
    """Replace dataset `prefix` in place by its token stream as one document: same .bin size, new content."""
    from dsel.data.indexed import IndexedDataset, IndexedDatasetWriter

    source = IndexedDataset(str(prefix))
    stream, dtype = np.array(source.stream), source.dtype
    del source
    with IndexedDatasetWriter(prefix, dtype) as writer:
        writer.add_document(stream)


def test_train_resume_is_keyed_by_content_not_paths(work, tmp_path):
    """`dsel train` rerun: a moved but identical dataset resumes; new data at the same path is refused,
    naming the differing key (inputs.data)."""
    from dsel.train.commands import run_train
    from dsel.train.config import TrainConfig

    def train(data):
        return run_train(from_dict(TrainConfig, {"data": [str(data)], "out": str(tmp_path / "t"), "steps": 2,
                                                 "batch_size": 2, "device": "cpu", "preset": "tiny", "model": GPT}))
    train(copy_dataset(work / "base", tmp_path / "a"))
    weights = (tmp_path / "t" / "model" / "model.safetensors").read_bytes()
    train(copy_dataset(work / "base", tmp_path / "b"))  # same content elsewhere: the finished run is current
    assert (tmp_path / "t" / "model" / "model.safetensors").read_bytes() == weights
    rewrite_as_one_document(tmp_path / "b")
    with pytest.raises(DselError, match=r"state.pt: belongs to a run with inputs\.data="):
        train(tmp_path / "b")


def solve_settings(work, out: Path, **extra) -> dict:
    """A seconds-long `dsel pds solve` of the prior on 24 windows of the corpus (target: its first documents)."""
    return {"model": str(work / "prior"), "proxy": str(work / "base"), "target": str(work / "base"), "out": str(out),
            "device": "cpu", "num_proxy": 24, "num_target": 8, "solver": {"steps": 3, "lr": 0.5, **extra}}


def test_pds_solve_resume_is_keyed_by_content_not_paths(work, tmp_path):
    """`dsel pds solve` rerun: a moved but identical model resumes; the model retrained in place is refused,
    naming the differing key (inputs.model)."""
    from dsel.models.checkpoint import load_model, save_model
    from dsel.pds.commands import SolveConfig, run_solve

    shutil.copytree(work / "prior", tmp_path / "m")
    settings = {**solve_settings(work, tmp_path / "s"), "model": str(tmp_path / "m")}
    run_solve(from_dict(SolveConfig, settings))
    shutil.copytree(work / "prior", tmp_path / "moved")
    run_solve(from_dict(SolveConfig, {**settings, "model": str(tmp_path / "moved"), "solver": {
        **settings["solver"], "outer_epochs": 2}}))  # resumes after epoch 1 with the moved model
    model, meta = load_model(tmp_path / "m")
    with torch.no_grad():
        model.head_weight.mul_(1.5)
    save_model(tmp_path / "m", model, meta)
    with pytest.raises(DselError, match=r"state\.json: was written by a solve of other settings or data "
                                        r"\(inputs\.model "):
        run_solve(from_dict(SolveConfig, settings))


def test_pds_micro_batch_does_not_change_the_solve(work, tmp_path):
    """solver.micro_batch (left out of the solve's resume key): G and gamma equal across micro-batch sizes
    (float32, to 1e-5 relative)."""
    from dsel.pds.commands import SolveConfig, run_solve

    for micro in (3, 24):
        run_solve(from_dict(SolveConfig, solve_settings(work, tmp_path / str(micro), micro_batch=micro)))
    for name in ("G.npy", "gamma.npy"):
        a, b = (np.load(tmp_path / str(micro) / name) for micro in (3, 24))
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6 * np.abs(a).max(), err_msg=name)


def test_killed_dataset_publish_is_finished_by_the_next_writer(work, tmp_path):
    """A tokenize killed while moving its finished dataset into place (new .bin, old .idx, no manifest): readers
    refuse it in one line, the next writer of the prefix finishes the move; the dataset equals the new one, no
    staging folder left."""
    from dsel.data.indexed import IndexedDataset
    from dsel.io import STAGED

    old, new = tmp_path / "old", tmp_path / "new"
    copy_dataset(work / "base", old)
    copy_dataset(work / "base", new)
    rewrite_as_one_document(new)
    staging = tmp_path / ".ds.tmp-999999999"  # a dead writer's staging folder, complete
    staging.mkdir()
    for path in tmp_path.glob("new.*"):
        shutil.copy(path, staging / ("ds" + path.name[3:]))
    (staging / STAGED).touch()
    copy_dataset(old, tmp_path / "ds")
    shutil.copy(new.with_suffix(".bin"), tmp_path / "ds.bin")  # killed after its first move
    (tmp_path / "ds.meta.json").unlink()
    with pytest.raises(DselError, match="part old, part new: publishing it stopped midway"):
        IndexedDataset(tmp_path / "ds")  # readers refuse the mixed files until the move is finished
    with output_lock(tmp_path / "ds"):
        pass
    assert len(IndexedDataset(tmp_path / "ds")) == len(IndexedDataset(new))
    for suffix in (".bin", ".idx", ".docids.jsonl", ".meta.json"):
        assert Path(f"{tmp_path / 'ds'}{suffix}").read_bytes() == Path(f"{new}{suffix}").read_bytes(), suffix
    assert leftovers(tmp_path / "ds") == []


def test_tokenize_overwrite_replaces_the_dataset_as_a_unit(work, tmp_path):
    """`dsel tokenize overwrite=true` over a dataset of another corpus: the new dataset's files replace the
    old ones together (byte-identical to a fresh tokenize), old sidecars it lacks removed, no temp files."""
    half = tmp_path / "half.jsonl"
    half.write_text("".join((work / "corpus.jsonl").read_text().splitlines(keepends=True)[:100]))

    def tokenize(source, out, *extra):
        main(["tokenize", f"input={source}", f"output={out}", f"tokenizer={work / 'base.model'}", "workers=1", *extra])
    tokenize(work / "corpus.jsonl", tmp_path / "ds", "id_field=id", "domain_field=id")
    tokenize(half, tmp_path / "ref")
    tokenize(half, tmp_path / "ds", "overwrite=true")
    for suffix in (".bin", ".idx", ".docids.jsonl"):
        assert Path(f"{tmp_path / 'ds'}{suffix}").read_bytes() == Path(f"{tmp_path / 'ref'}{suffix}").read_bytes()
    assert not Path(f"{tmp_path / 'ds'}.domains.jsonl").exists() and leftovers(tmp_path / "ds") == []


@pytest.mark.parametrize("command", ["tokenize", "select"])
def test_bad_input_creates_no_output_folder(work, tmp_path, capsys, command):
    """A bad input (a broken tokenizer, a missing score table) into a new nested out: one line, exit 2, and
    no folder of the output created (inputs are refused before anything is written)."""
    out = tmp_path / "new" / "deeper" / "out"
    (tmp_path / "broken.model").write_bytes(b"not a sentencepiece model")
    args = {"tokenize": ["tokenize", f"input={work / 'corpus.jsonl'}", f"output={out}",
                         f"tokenizer={tmp_path / 'broken.model'}"],
            "select": ["select", f"scores={tmp_path / 'missing'}", f"out={out}", "column=color"]}[command]
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2 and len(capsys.readouterr().err.strip().splitlines()) == 1
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize("name, content", [(".sel.lock", ""), (".sel.lock", "999999999\n"),
                                           (".sel.rank1.lock", "999999999\n")])
def test_stale_lock_files_are_taken_over_and_cleaned(work, tmp_path, name, content):
    """A lock file a killed writer left (no pid written yet, a dead pid, another rank's tag): the next writer
    runs and no lock file remains."""
    (tmp_path / name).write_text(content)
    main(["select", f"scores={work / 'scores'}", f"out={tmp_path / 'sel'}", "fraction=0.3", "column=color"])
    assert (tmp_path / "sel" / "selection.json").is_file() and leftovers(tmp_path / "sel") == []


BRACED_GPT = json.dumps(GPT).replace("{", "{{").replace("}", "}}")
FULL_DISK_COMMANDS = {
    "tokenize": ["tokenize", "input={corpus}", "output={out}/ds", "tokenizer={base}.model", "workers=1"],
    "train": ["train", "data=[{base}]", "out={out}", "steps=5", "preset=tiny", "arch=" + BRACED_GPT],
    "select": ["select", "scores={scores}", "out={out}", "column=color"],
    "score": ["score", "corpus={base}", "window=17", "scorer=color", "settings={{prior: {prior}, cond: {cond}}}",
              "out={out}", "device=cpu"],
    "color score": ["color", "score", "corpus={base}", "prior={prior}", "cond={cond}", "out={out}", "device=cpu"],
    "color finetune": ["color", "finetune", "prior={prior}", "target={corpus}", "tokenizer={base}.model",
                       "out={out}", "device=cpu"],
    "color train-prior": ["color", "train-prior", "corpus={base}", "out={out}",
                          "train={{steps: 2, preset: tiny, arch: " + BRACED_GPT + "}}"],
    "pds solve": ["pds", "solve", "model={prior}", "proxy={base}", "target={base}", "out={out}", "num_proxy=24",
                  "solver.steps=3", "device=cpu"],
    "pds fit-scorer": ["pds", "fit-scorer", "gamma={solve}", "out={out}", "device=cpu"],
    "pds score": ["pds", "score", "corpus={base}", "model={scorer}", "out={out}", "device=cpu"],
    "eval loss": ["eval", "loss", "checkpoint={prior}", "data={{a: {base}}}", "out={out}/loss.json", "device=cpu"],
    "export hf": ["export", "hf", "model={prior}", "out={out}", "tokenizer={base}.model"],
}


@pytest.fixture(scope="module")
def solved(work):
    """A finished `dsel pds solve` of the prior and a PDS scorer checkpoint (window 17) made from it."""
    from dsel.models.checkpoint import load_model, save_model
    from dsel.models.scorer import Scorer
    from dsel.pds.commands import SolveConfig, run_solve

    run_solve(from_dict(SolveConfig, solve_settings(work, work / "solve")))
    save_model(work / "scorer", Scorer.from_gpt(load_model(work / "prior")[0]), {"window": 17})
    return work


@pytest.mark.parametrize("command", list(FULL_DISK_COMMANDS))
def test_full_disk_is_refused_before_any_work(solved, tmp_path, capsys, monkeypatch, command):
    """Too little free disk for the output (an estimate, e.g. a checkpoint ~ params x 4 bytes x 2, scores ~
    windows x 4 bytes per column): one line naming the output and the space needed, exit 2, nothing written
    (every writing command)."""
    import dsel.io

    work = solved
    paths = {"corpus": work / "corpus.jsonl", "base": work / "base", "scores": work / "scores",
             "prior": work / "prior", "cond": work / "cond", "solve": work / "solve", "scorer": work / "scorer"}
    out = tmp_path / "out"
    args = [a.format(out=out, **paths) for a in FULL_DISK_COMMANDS[command]]
    real = shutil.disk_usage
    monkeypatch.setattr(dsel.io.shutil, "disk_usage", lambda p: real(p)._replace(free=0))
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1, err
    assert "MiB but its filesystem has 0.0 MiB free" in err and str(out) in err, err
    assert not out.exists() or not any(p.is_file() for p in out.rglob("*"))
