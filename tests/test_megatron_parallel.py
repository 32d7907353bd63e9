"""megatron backend under torchrun (2 CPU processes, gloo): TP=2, PP=2, PP=2 x VPP=2 (interleaved 1F1B) and
DP=2 (distributed optimizer) train the same model on the same samples as the torch backend, to the same losses and weights; a sharded
checkpoint saved at one layout resumes at another (and on one process) to the same losses; each rank
builds only its own shard."""
import json
import os
import shutil
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
    "dp2-overlap": ({"distributed_optimizer": True, "overlap": True},
                    {"activation": "gelu", "bias": True, "n_query_groups": None}),
}
VPP = ({"pp": 2, "vpp": 2}, {"n_layer": 4, "tie_embeddings": True})  # 2 model chunks of 1 layer per pipeline rank
REFERENCE = {"dp2-overlap": "dp2"}  # layouts compared with another layout's torch run (same model)
PRECISION = {"pp2-bf16": "bf16"}
PROBES = {"tp2": ({"tp": 2}, {}), "pp2": ({"pp": 2}, {}), "pp2-vpp2": VPP}  # layouts whose per-rank construction is measured


def settings(tmp_path, data, name, model_changes, **overrides):
    return {"data": [data], "valid": str(tmp_path / "valid"), "out": str(tmp_path / name),
            "arch": {**MODEL, **model_changes}, "steps": 6, "batch_size": 4, "grad_accum": 2, "lr": 1e-2,
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
        if name in REFERENCE:
            continue
        torch_backend.train(from_dict(TrainConfig, settings(tmp_path, data, f"{name}-torch", changes, backend="torch",
                                                            **extra[name])))
    torch_backend.train(from_dict(TrainConfig, settings(tmp_path, data, "vpp-torch", VPP[1], backend="torch")))
    dp2_layout, dp2_changes = LAYOUTS["dp2"]
    resumed = settings(tmp_path, data, "dp2-resumed", dp2_changes, parallel=dp2_layout, save_every=3, interrupt_after=4)
    # Saved after step 3 at one layout, resumed in copies of out/ at others (the checkpoint is resharded).
    tp2_reshard = settings(tmp_path, data, "tp2-reshard", {}, parallel=LAYOUTS["tp2"][0], save_every=3,
                           interrupt_after=3, resume_as=[{"out": str(tmp_path / "reshard-pp2"), "parallel": {"pp": 2}},
                                                         {"out": str(tmp_path / "reshard-tp1"), "parallel": {}}],
                           **extra["tp2"])
    dp2_reshard = settings(tmp_path, data, "dp2-reshard", dp2_changes, parallel=dp2_layout, save_every=3,
                           interrupt_after=3, resume_as=[{"out": str(tmp_path / "reshard-dp2-tp2"),
                                                          "parallel": {"tp": 2, "distributed_optimizer": True}}])
    # Interleaved: steps 1-3 at PP=2 x VPP=2, saved, then resumed at the same layout and (resharded) without VPP.
    vpp = settings(tmp_path, data, "vpp", VPP[1], parallel=VPP[0], save_every=3, interrupt_after=3,
                   resume_as=[{"out": str(tmp_path / "vpp-resumed"), "parallel": VPP[0]},
                              {"out": str(tmp_path / "vpp-to-pp2"), "parallel": {"pp": 2}}])
    probes = [{"probe": settings(tmp_path, data, "probe", changes, parallel=layout),
               "record": str(tmp_path / f"probe-{name}")} for name, (layout, changes) in PROBES.items()]
    torchrun(tmp_path, [settings(tmp_path, data, name, changes, parallel=layout, **extra[name])
                        for name, (layout, changes) in LAYOUTS.items()] + [resumed, tp2_reshard, dp2_reshard, vpp] + probes)
    return tmp_path


@pytest.mark.parametrize("layout", [name for name in LAYOUTS if name not in PRECISION])
def test_layout_matches_torch_backend(runs, layout):
    """dp2-overlap: grad reduce overlapped with the backward, param all-gather with the next forward."""
    losses, valid = read_log(runs / layout)
    reference = f"{REFERENCE.get(layout, layout)}-torch"
    ref_losses, ref_valid = read_log(runs / reference)
    assert len(losses) == 6 and losses[-1] < losses[0] - 0.2  # it learns
    torch.testing.assert_close(losses, ref_losses, atol=1e-5, rtol=0)
    torch.testing.assert_close(valid, ref_valid, atol=1e-5, rtol=0)
    assert_same_weights(runs / layout / "model", runs / reference / "model")


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


@pytest.mark.parametrize("parallel,grad_accum,message", [
    ({"pp": 2, "vpp": 2}, 2, "n_layer=2 is not divisible by parallel.pp\\*parallel.vpp = 2\\*2"),
    ({"vpp": 2}, 2, "parallel.vpp=2 needs parallel.pp > 1"),
    ({"pp": 2, "vpp": 0}, 2, "parallel.vpp=0 must be >= 1"),
])
def test_bad_virtual_pipeline_is_one_line_error(tmp_path, parallel, grad_accum, message):
    data = write_counting_dataset(tmp_path / "train", vocab=MODEL["vocab_size"])
    cfg = from_dict(TrainConfig, settings(tmp_path, data, "vpp", {}, parallel=parallel, grad_accum=grad_accum))
    with pytest.raises(DselError, match=message):
        backend.check_layout(cfg, torch_backend.model_config(cfg), 2)


def test_interleaving_needs_whole_micro_batch_groups(tmp_path):
    """megatron's interleaved schedule runs micro-batches in groups of pp: grad_accum=3 at pp=2 is refused."""
    data = write_counting_dataset(tmp_path / "train", vocab=MODEL["vocab_size"])
    cfg = from_dict(TrainConfig, settings(tmp_path, data, "vpp", VPP[1], parallel=VPP[0], grad_accum=3))
    with pytest.raises(DselError, match="grad_accum=3 is not a multiple of parallel.pp=2"):
        backend.check_layout(cfg, torch_backend.model_config(cfg), 2)


@pytest.mark.parametrize("tp,message", [(2, "sequence_parallel needs Transformer Engine"),
                                        (1, "sequence_parallel needs parallel.tp > 1")])
def test_sequence_parallel_without_te_is_one_line_error(tmp_path, tp, message):
    """No Transformer Engine here (CPU): megatron-core's local spec cannot split norms over the sequence."""
    data = write_counting_dataset(tmp_path / "train", vocab=MODEL["vocab_size"])
    cfg = from_dict(TrainConfig, settings(tmp_path, data, "sp", {}, parallel={"tp": tp, "sequence_parallel": True}))
    with pytest.raises(DselError, match=message):
        backend.check_layout(cfg, torch_backend.model_config(cfg), 2)


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
            "train", f"data=[{data}]", "preset=tiny", f"arch.vocab_size={MODEL['vocab_size']}", "arch.seq_len=16",
            "steps=2", "batch_size=2", "backend=megatron"]
    env = {**os.environ, "DSEL_PROGRESS": "0", "PYTHONPATH": str(ROOT), "CUDA_VISIBLE_DEVICES": ""}
    returncode, stderr = run_group(base + [f"out={tmp_path / 'run'}", "parallel.tp=2"], tmp_path, env)
    assert returncode == 0, stderr[-3000:]
    assert json.loads((tmp_path / "run" / "model" / "config.json").read_text())["arch"] == "gpt"
    one_process = [arg if arg != "2" else "1" for arg in base]
    returncode, stderr = run_group(one_process + [f"out={tmp_path / 'bad'}", "parallel.tp=2"], tmp_path, env)
    assert returncode != 0 and "dsel train: error: train config: world size 1 is not divisible by tp*pp" in stderr


@pytest.mark.parametrize("resumed", ["reshard-pp2", "reshard-tp1"])
def test_tp2_checkpoint_resumes_at_another_layout(runs, resumed):
    """Saved at TP=2 after step 3, resumed at PP=2 (dp 1) and at TP=1 (dp 2): the next steps' losses and the final
    weights of the uninterrupted runs (TP=2 and the torch backend)."""
    losses, valid = read_log(runs / resumed)
    torch.testing.assert_close(losses, read_log(runs / "tp2")[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(losses, read_log(runs / "tp2-torch")[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(valid, read_log(runs / "tp2-torch")[1], atol=1e-5, rtol=0)
    assert_same_weights(runs / resumed / "model", runs / "tp2-torch" / "model")
    meta = json.loads((runs / resumed / "model" / "meta.json").read_text())
    layout = {"reshard-pp2": (1, 2, 1), "reshard-tp1": (1, 1, 2)}[resumed]
    assert (meta["parallel"]["tp"], meta["parallel"]["pp"], meta["parallel"]["dp"]) == layout


def test_distributed_optimizer_state_reshards(runs):
    """Distributed optimizer at DP=2 saved after step 3, resumed at TP=2 (its state regathered): the DP=2 run's losses."""
    torch.testing.assert_close(read_log(runs / "reshard-dp2-tp2")[0], read_log(runs / "dp2")[0], atol=1e-5, rtol=0)
    assert_same_weights(runs / "reshard-dp2-tp2" / "model", runs / "dp2-torch" / "model")


def test_tp2_checkpoint_resumes_on_one_process(runs, tmp_path):
    """Another world size: the TP=2 checkpoint of step 3 continued by `dsel train` in one process (no torchrun)."""
    shutil.copytree(runs / "tp2-reshard", tmp_path / "one")
    cmd = [sys.executable, "-m", "dsel", "train", "-c", str(tmp_path / "one" / "config.yaml"), f"out={tmp_path / 'one'}",
           "parallel.tp=1"]
    env = {**os.environ, "DSEL_PROGRESS": "0", "PYTHONPATH": str(ROOT), "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    returncode, stderr = run_group(cmd, tmp_path, env)
    assert returncode == 0, stderr[-3000:]
    torch.testing.assert_close(read_log(tmp_path / "one")[0], read_log(runs / "tp2-torch")[0], atol=1e-5, rtol=0)


def full_gpt_params(tmp_path, changes=None) -> dict[str, int]:
    """Parameter name -> element count of the full model (the torch backend's)."""
    data = write_counting_dataset(tmp_path / "train", vocab=MODEL["vocab_size"])
    gpt = torch_backend.build_model(from_dict(TrainConfig, settings(tmp_path, data, "full", changes or {})))
    return {name: p.numel() for name, p in gpt.named_parameters()}


def test_each_rank_builds_only_its_shard(runs, tmp_path):
    """TP=2: each rank holds half of every matrix and a copy of the norms; PP=2: stage 0 the embedding and layer 0,
    stage 1 layer 1, the final norm and the head. The worker refuses to build a full dsel GPT on any rank."""
    full = full_gpt_params(tmp_path)
    rows = {name: sorted((json.loads((runs / f"probe-{name}.{r}.json").read_text()) for r in range(2)),
                         key=lambda row: (row["pp_rank"], row["tp_rank"])) for name in PROBES}
    norms = sum(n for name, n in full.items() if "layernorm" in name)
    assert [row["params"] for row in rows["tp2"]] == [(sum(full.values()) - norms) // 2 + norms] * 2
    first_stage = sum(n for name, n in full.items() if name.startswith(("embedding.", "decoder.layers.0.")))
    assert [row["params"] for row in rows["pp2"]] == [first_stage, sum(full.values()) - first_stage]
    assert all(row["params"] < sum(full.values()) for name in ("tp2", "pp2") for row in rows[name])


def test_each_pipeline_rank_builds_only_its_interleaved_chunks(runs, tmp_path):
    """PP=2 x VPP=2 over 4 layers: rank 0 holds chunks (embedding, layer 0) and (layer 2), rank 1 (layer 1) and
    (layer 3, final norm, its copy of the tied embedding as the head) — megatron's interleaved assignment."""
    full = full_gpt_params(tmp_path, VPP[1])
    rows = sorted((json.loads((runs / f"probe-pp2-vpp2.{r}.json").read_text()) for r in range(2)),
                  key=lambda row: row["pp_rank"])

    def held(*prefixes):
        return sum(n for name, n in full.items() if name.startswith(prefixes))

    assert [row["params"] for row in rows] == [
        held("embedding.", "decoder.layers.0.", "decoder.layers.2."),
        held("decoder.layers.1.", "decoder.layers.3.", "decoder.final_layernorm.", "embedding.")]


@pytest.mark.parametrize("resumed", ["vpp-resumed", "vpp-to-pp2"])
def test_interleaved_pipeline_matches_torch_backend_and_resumes(runs, resumed):
    """PP=2 x VPP=2 (interleaved 1F1B, tied embeddings) trained 3 steps, saved, then resumed at the same layout and
    resharded to PP=2 without virtual stages: every step's loss, the valid loss and the final weights of the torch
    backend."""
    losses, valid = read_log(runs / resumed)
    ref_losses, ref_valid = read_log(runs / "vpp-torch")
    assert len(losses) == 6 and losses[-1] < losses[0] - 0.2
    torch.testing.assert_close(losses, ref_losses, atol=1e-5, rtol=0)
    torch.testing.assert_close(valid, ref_valid, atol=1e-5, rtol=0)
    assert_same_weights(runs / resumed / "model", runs / "vpp-torch" / "model")
    meta = json.loads((runs / resumed / "model" / "meta.json").read_text())
    assert (meta["parallel"]["pp"], meta["parallel"]["vpp"]) == {"vpp-resumed": (2, 2), "vpp-to-pp2": (2, 1)}[resumed]


def test_export_writes_a_dsel_checkpoint(runs, tmp_path):
    """`dsel export dsel` of a run's last sharded checkpoint: the weights the run's own model/ holds, loadable by dsel."""
    from dsel.cli import main
    from dsel.models.checkpoint import load_model

    assert main(["export", "dsel", f"model={runs / 'reshard-pp2'}", f"out={tmp_path / 'exported'}"]) in (0, None)
    model, meta = load_model(tmp_path / "exported")
    reference = read_weights(runs / "reshard-pp2" / "model")
    assert all(torch.equal(model.state_dict()[k], reference[k]) for k in reference) and meta["step"] == 6


def test_checkpoint_of_another_architecture_is_one_line_error(runs):
    data = str(runs / "train")
    cfg = from_dict(TrainConfig, settings(runs, data, "tp2", {"d_model": 64}, parallel={"tp": 2}))
    with pytest.raises(DselError, match="step-6: checkpoint of another architecture: d_model=32, this run has d_model=64"):
        backend.load_state(cfg, torch_backend.model_config(cfg), None, None)


def test_missing_shard_is_one_line_error(runs, tmp_path):
    from dsel.train.megatron import checkpoint

    broken = tmp_path / "broken"
    shutil.copytree(runs / "tp2" / "state" / "megatron", broken)
    shard = sorted((broken / "step-6").glob("*.distcp"))[-1]
    shard.unlink()
    with pytest.raises(DselError, match=f"{shard.name}: shard missing"):
        checkpoint.export(broken, tmp_path / "out")
    assert not (tmp_path / "out").exists()
