"""megatron backend under torchrun (2 CPU processes, gloo): TP=2, PP=2 and DP=2 (distributed optimizer)
train the same model on the same samples as the torch backend, to the same losses and weights."""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("megatron.core")
pytest.importorskip("dsel.train.torch_backend")

from dsel.config import from_dict  # noqa: E402
from dsel.errors import DselError  # noqa: E402
from dsel.models.checkpoint import read_weights  # noqa: E402
from dsel.models.config import GPTConfig  # noqa: E402
from dsel.train import torch_backend  # noqa: E402
from dsel.train.config import TrainConfig  # noqa: E402
from dsel.train.megatron import backend  # noqa: E402
from dsel.train.megatron.model import check_parallel_sizes  # noqa: E402
from tests._train_util import write_counting_dataset  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MODEL = {"vocab_size": 128, "seq_len": 16, "n_layer": 2, "d_model": 32, "n_head": 4, "n_query_groups": 2,
         "activation": "swiglu", "ffn_hidden": 64}
# Each layout trains a variant of MODEL, so the runs also cover tied embeddings across pipeline
# stages, rmsnorm, gelu, biases and per-sample loss weights; the bf16 run (megatron's bf16
# weights with fp32 main params vs the torch backend's bf16 autocast) matches to bf16 precision.
LAYOUTS = {
    "tp2": ({"tp": 2}, {}),  # with per-sample loss weights (see runs)
    "pp2": ({"pp": 2}, {"tie_embeddings": True, "norm": "rmsnorm"}),
    "dp2": ({"distributed_optimizer": True}, {"activation": "gelu", "bias": True, "n_query_groups": None}),
    "pp2-bf16": ({"pp": 2}, {}),
}
PRECISION = {"pp2-bf16": "bf16"}


def settings(tmp_path, data, name, model_changes, **overrides):
    return {"data": [data], "valid": str(tmp_path / "valid"), "out": str(tmp_path / name),
            "model": {**MODEL, **model_changes}, "steps": 6, "batch_size": 4, "grad_accum": 2, "lr": 1e-2,
            "min_lr": 1e-3, "warmup": 1, "eval_batches": 2, "device": "cpu", "backend": "megatron", **overrides}


def read_log(run: Path):
    rows = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r], [r["valid_loss"] for r in rows if "valid_loss" in r]


def torchrun(tmp_path, runs: list[dict], nproc: int = 2) -> None:
    """Train `runs` one after the other with the megatron backend in `nproc` gloo processes."""
    spec = tmp_path / "runs.json"
    spec.write_text(json.dumps(runs))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           str(ROOT / "tests" / "megatron_worker.py"), str(spec)]
    env = {**os.environ, "DSEL_PROGRESS": "0", "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}  # CPU + gloo
    returncode, stderr = run_group(cmd, ROOT, env)
    assert returncode == 0, stderr[-3000:]


def run_group(cmd: list[str], cwd, env, timeout: int = 300) -> tuple[int, str]:
    """(exit status, stderr) of cmd in its own process group, killed whole (torchrun's workers too) on timeout."""
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        _, stderr = proc.communicate(timeout=timeout)
        return proc.returncode, stderr
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()


def assert_same_weights(path_a: Path, path_b: Path) -> None:
    """Equal weights up to float noise; Adam turns a near-zero gradient's noise into an lr-sized step on a few
    entries (embedding rows of rare tokens), so a tiny fraction may differ by more."""
    a, b = read_weights(path_a), read_weights(path_b)
    assert a.keys() == b.keys()
    for key in a:
        diff = (a[key] - b[key]).abs()
        assert (diff > 1e-4).float().mean() < 1e-3 and diff.max() < 2e-2, key


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Per layout, the torch backend's run (<layout>-torch) and the megatron run on 2 processes (<layout>)."""
    tmp_path = tmp_path_factory.mktemp("megatron")
    data = write_counting_dataset(tmp_path / "train", vocab=MODEL["vocab_size"])
    write_counting_dataset(tmp_path / "valid", num_docs=2, seed=1, vocab=MODEL["vocab_size"])  # < 8 windows: padded
    np.save(tmp_path / "weights.npy", np.random.default_rng(0).uniform(0, 2, 6 * 8).astype(np.float32))
    extra = {name: {"precision": PRECISION.get(name, "fp32")} for name in LAYOUTS}
    extra["tp2"]["weights"] = str(tmp_path / "weights.npy")
    for name, (_, changes) in LAYOUTS.items():
        torch_backend.train(from_dict(TrainConfig, settings(tmp_path, data, f"{name}-torch", changes, backend="torch",
                                                            **extra[name])))
    dp2_layout, dp2_changes = LAYOUTS["dp2"]
    resumed = settings(tmp_path, data, "dp2-resumed", dp2_changes, parallel=dp2_layout, save_every=3, interrupt_after=4)
    torchrun(tmp_path, [settings(tmp_path, data, name, changes, parallel=layout, **extra[name])
                        for name, (layout, changes) in LAYOUTS.items()] + [resumed])
    return tmp_path


@pytest.mark.parametrize("layout", [name for name in LAYOUTS if name not in PRECISION])
def test_layout_matches_torch_backend(runs, layout):
    losses, valid = read_log(runs / layout)
    ref_losses, ref_valid = read_log(runs / f"{layout}-torch")
    assert len(losses) == 6 and losses[-1] < losses[0] - 0.2  # it learns
    torch.testing.assert_close(losses, ref_losses, atol=1e-5, rtol=0)
    torch.testing.assert_close(valid, ref_valid, atol=1e-5, rtol=0)
    assert_same_weights(runs / layout / "model", runs / f"{layout}-torch" / "model")


def test_bf16_matches_torch_backend_autocast(runs):
    losses, valid = read_log(runs / "pp2-bf16")
    ref_losses, ref_valid = read_log(runs / "pp2-bf16-torch")
    assert losses[-1] < losses[0] - 0.2
    torch.testing.assert_close(losses, ref_losses, atol=3e-2, rtol=0)
    torch.testing.assert_close(valid, ref_valid, atol=3e-2, rtol=0)


def test_resume_after_interruption_is_exact(runs):
    """Stopped after step 4 (state saved at step 3), started again: the log and weights of an uninterrupted run."""
    assert read_log(runs / "dp2-resumed") == read_log(runs / "dp2")
    a, b = read_weights(runs / "dp2-resumed" / "model"), read_weights(runs / "dp2" / "model")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert sorted(p.name for p in (runs / "dp2-resumed" / "state" / "megatron").iterdir()) == ["latest.json", "step-6"]


def test_data_parallel_replicas_agree(runs):
    meta = json.loads((runs / "dp2" / "model" / "meta.json").read_text())
    assert meta["parallel"]["dp"] == 2 and meta["parallel"]["dp_replica_spread"] == 0.0
    assert meta["step"] == 6 and (runs / "dp2" / "config.yaml").is_file()


@pytest.mark.parametrize("changes,tp,pp,world,message", [
    ({}, 3, 1, 3, "n_head=4 is not divisible by parallel.tp=3"),
    ({"n_head": 8, "n_query_groups": 2}, 4, 1, 4, "n_query_groups \\(kv heads\\)=2 is not divisible by parallel.tp=4"),
    ({"ffn_hidden": 65}, 2, 1, 2, "ffn_hidden=65 is not divisible by parallel.tp=2"),
    ({"vocab_size": 129}, 2, 1, 2, "vocab_size=129 is not divisible by parallel.tp=2"),
    ({"n_layer": 3}, 1, 2, 2, "n_layer=3 is not divisible by parallel.pp=2"),
    ({}, 2, 2, 6, "world size 6 is not divisible by tp\\*pp = 2\\*2"),
])
def test_bad_layout_is_one_line_error(changes, tp, pp, world, message):
    config = GPTConfig(**{**MODEL, **changes})
    with pytest.raises(DselError, match=message):
        check_parallel_sizes(config, tp, pp, world)


def test_train_refuses_layout_before_starting_processes(tmp_path):
    data = write_counting_dataset(tmp_path / "train", vocab=MODEL["vocab_size"])
    cfg = from_dict(TrainConfig, settings(tmp_path, data, "bad", {}, parallel={"tp": 2}))
    with pytest.raises(DselError, match="world size 1 is not divisible by tp\\*pp = 2\\*1"):
        backend.train(cfg)
    assert not torch.distributed.is_initialized()


def test_dsel_train_command_under_torchrun(tmp_path):
    """The README's launch line: `torchrun --nproc_per_node 2 -m dsel train ... backend=megatron parallel.tp=2`."""
    pytest.importorskip("dsel.train.commands")
    data = write_counting_dataset(tmp_path / "train", vocab=MODEL["vocab_size"])
    base = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "dsel",
            "train", f"data=[{data}]", "preset=tiny", f"model.vocab_size={MODEL['vocab_size']}", "model.seq_len=16",
            "steps=2", "batch_size=2", "backend=megatron"]
    env = {**os.environ, "DSEL_PROGRESS": "0", "PYTHONPATH": str(ROOT), "CUDA_VISIBLE_DEVICES": ""}
    returncode, stderr = run_group(base + [f"out={tmp_path / 'run'}", "parallel.tp=2"], tmp_path, env)
    assert returncode == 0, stderr[-3000:]
    assert json.loads((tmp_path / "run" / "model" / "config.json").read_text())["arch"] == "gpt"
    one_process = [arg if arg != "2" else "1" for arg in base]
    returncode, stderr = run_group(one_process + [f"out={tmp_path / 'bad'}", "parallel.tp=2"], tmp_path, env)
    assert returncode != 0 and "dsel train: error: train config: world size 1 is not divisible by tp*pp" in stderr
