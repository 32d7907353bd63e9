"""Torch training backend: exact resume after a kill, fine-tuning from a checkpoint, bad input, the CLI."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import types

import numpy as np
import pytest
import torch

from dsel.cli import main
from dsel.config import load_config
from dsel.data.indexed import IndexedDataset, IndexedDatasetWriter
from dsel.data.loader import GPTSampleLoader
from dsel.data.meta import write_meta
from dsel.errors import DselError
from dsel.models.checkpoint import load_model, save_model
from dsel.models.gpt import GPT
from dsel.models.config import GPTConfig
from dsel.train.config import TrainConfig
from dsel.train.torch_backend import evaluate, train
from tests._train_util import TINY_MODEL, tiny_config, write_counting_dataset


class Killed(Exception):
    """Stands for the process being killed."""


def kill_after(step):
    def on_step(done, row):
        if done == step:
            raise Killed
    return on_step


def log_rows(run_dir):
    return [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_resumed_run_equals_uninterrupted_run_bit_for_bit(tmp_path, optimizer):
    data = write_counting_dataset(tmp_path / "d")
    valid = write_counting_dataset(tmp_path / "v", num_docs=8, seed=2)
    settings = dict(optimizer=optimizer, steps=7, warmup=2, save_every=2, grad_accum=2, batch_size=2, valid=valid,
                    eval_every=3, eval_batches=1)
    whole = train(tiny_config(tmp_path / "whole", [data], **settings))
    cfg = tiny_config(tmp_path / "killed", [data], **settings)
    with pytest.raises(Killed):
        train(cfg, on_step=kill_after(5))  # last checkpoint at step 4; step 5 is logged, then lost
    assert max(r["step"] for r in log_rows(tmp_path / "killed" / "run")) == 5
    with open(tmp_path / "killed" / "run" / "log.jsonl", "a") as log_file:
        log_file.write('{"step": 6, "lo')  # a row torn by the kill
    resumed = train(cfg)
    assert log_rows(tmp_path / "killed" / "run") == log_rows(tmp_path / "whole" / "run")
    (a, meta_a), (b, meta_b) = load_model(whole), load_model(resumed)
    for name, p in a.state_dict().items():
        assert torch.equal(b.state_dict()[name], p), name
    assert meta_a["step"] == meta_b["step"] == 7
    assert train(cfg) == resumed  # a finished run is left as it is
    assert len(log_rows(tmp_path / "killed" / "run")) == len(log_rows(tmp_path / "whole" / "run"))


def test_resume_refuses_a_changed_run(tmp_path):
    data = write_counting_dataset(tmp_path / "d")
    cfg = tiny_config(tmp_path, [data], steps=4, save_every=2)
    with pytest.raises(Killed):
        train(cfg, on_step=kill_after(3))
    with pytest.raises(DselError, match="state.pt: belongs to a run with lr=0.01, not 0.02"):
        train(tiny_config(tmp_path, [data], steps=4, save_every=2, lr=0.02))


def test_finetune_starts_from_init_weights_and_architecture(tmp_path):
    data = write_counting_dataset(tmp_path / "d")
    target = write_counting_dataset(tmp_path / "t", num_docs=12, seed=7)
    prior = train(tiny_config(tmp_path / "prior", [data], steps=10))
    prior_model, _ = load_model(prior)
    cfg = tiny_config(tmp_path / "ft", [target], init=str(prior), arch={}, steps=2, lr=1e-3, min_lr=1e-3)
    tuned, meta = load_model(train(cfg))
    assert tuned.config == prior_model.config and meta["init"] == str(prior)
    first_loss = log_rows(tmp_path / "ft" / "run")[0]["loss"]
    batch = GPTSampleLoader(IndexedDataset(target), 16, 4, cfg.seed, num_samples=8).batch(np.arange(4))
    with torch.no_grad():
        assert first_loss == pytest.approx(prior_model.loss(torch.from_numpy(batch)).item(), rel=1e-5)
    fresh_loss = log_rows(tmp_path / "prior" / "run")[0]["loss"]
    assert first_loss < fresh_loss


def test_empty_dataset_is_refused(tmp_path):
    with IndexedDatasetWriter(tmp_path / "empty", np.uint16):
        pass
    with pytest.raises(DselError, match="empty.bin: dataset is empty"):
        train(tiny_config(tmp_path, [tmp_path / "empty"]))


def test_token_ids_beyond_the_model_vocabulary_are_refused(tmp_path):
    with IndexedDatasetWriter(tmp_path / "wide", np.uint16) as writer:
        writer.add_document(np.arange(100))
    with pytest.raises(DselError, match=r"wide.bin: token id 64 at token 64 is outside the vocabulary \(size 64\)"):
        train(tiny_config(tmp_path, [tmp_path / "wide"]))


def test_init_from_another_architecture_is_refused(tmp_path):
    data = write_counting_dataset(tmp_path / "d")
    other = save_model(tmp_path / "other", GPT(GPTConfig(**{**TINY_MODEL, "d_model": 48})))
    with pytest.raises(DselError, match="checkpoint from another architecture"):
        train(tiny_config(tmp_path, [data], init=str(other), preset="tiny"))


def test_config_mistakes_are_one_line_errors(tmp_path):
    yaml_file = tmp_path / "train.yaml"
    yaml_file.write_text("data: [d]\nout: o\nsteps: 3\nwarmpu: 10\n")
    with pytest.raises(DselError, match="unknown key 'warmpu' for TrainConfig; did you mean 'warmup'"):
        load_config(TrainConfig, yaml_file)
    with pytest.raises(DselError, match="set exactly one of 'steps' and 'tokens'"):
        load_config(TrainConfig, None, ["data=[d]", "out=o", "steps=3", "tokens=100"])
    with pytest.raises(DselError, match="unknown arch setting 'n_layers'"):
        load_config(TrainConfig, None, ["data=[d]", "out=o", "steps=3", "arch.n_layers=2"]).model_config()
    with pytest.raises(DselError, match="'parallel.tp' should be int"):
        load_config(TrainConfig, None, ["data=[d]", "out=o", "steps=3", "parallel.tp=two"])


def test_tokens_are_rounded_up_to_whole_steps(tmp_path):
    cfg = tiny_config(tmp_path, ["d"], steps=None, tokens=5 * 64 + 1)
    assert cfg.num_steps(16) == 6


def test_cli_trains_and_reports_bad_input(tmp_path, capsys):
    data = write_counting_dataset(tmp_path / "d")
    out = tmp_path / "cli"
    model = ",".join(f"{k}: {v}" for k, v in TINY_MODEL.items())
    main(["train", f"data=[{data}]", f"valid={data}", f"out={out}", f"arch={{{model}}}", "steps=3", "batch_size=2",
          "device=cpu", "eval_batches=1"])
    trained, _ = load_model(out / "model")
    assert [r["step"] for r in log_rows(out) if "loss" in r] == [1, 2, 3]
    assert log_rows(out)[-1]["valid_loss"] == pytest.approx(evaluate(trained, str(data), batch_size=2, max_batches=1))
    with pytest.raises(SystemExit) as exit_info:
        main(["train", f"data=[{tmp_path / 'missing'}]", f"out={tmp_path / 'x'}", "steps=1", "device=cpu"])
    assert exit_info.value.code == 2
    assert "dsel train: error: " in capsys.readouterr().err


def test_finetune_refuses_data_of_another_tokenizer(tmp_path):
    data = write_counting_dataset(tmp_path / "d")
    target = write_counting_dataset(tmp_path / "t", num_docs=12, seed=7)
    meta = {"vocab_size": 64, "tokenizer": "a.model", "tokenizer_sha256": "a" * 64, "dtype": "uint16", "eod_id": 0}
    write_meta(data, meta)
    write_meta(target, {**meta, "tokenizer": "b.model", "tokenizer_sha256": "b" * 64})
    prior = train(tiny_config(tmp_path / "prior", [data], steps=1))
    with pytest.raises(DselError, match="model has tokenizer_sha256=aaaaaaaaaaaa... .* but data .*t has tokenizer_sha256=bbbbbbbbbbbb"):
        train(tiny_config(tmp_path / "ft", [target], init=str(prior), arch={}, steps=1))


def test_tokenizer_vocabulary_larger_than_the_model_is_refused(tmp_path):
    data = write_counting_dataset(tmp_path / "d")
    write_meta(data, {"vocab_size": 8000, "tokenizer": "t.model", "tokenizer_sha256": "c" * 64, "dtype": "uint16",
                      "eod_id": 0})
    with pytest.raises(DselError, match="d.meta.json: tokenizer vocabulary 8000 exceeds the model's vocab_size 64"):
        train(tiny_config(tmp_path, [data]))


def test_bf16_autocast_trains_on_cpu_when_asked(tmp_path):
    data = write_counting_dataset(tmp_path / "d")
    train(tiny_config(tmp_path, [data], precision="bf16", steps=3))
    assert all(np.isfinite(r["loss"]) for r in log_rows(tmp_path / "run"))


def test_megatron_backend_is_dispatched_to_its_module(tmp_path, monkeypatch):
    seen = []
    fake = types.ModuleType("dsel.train.megatron.backend")
    fake.train = lambda cfg: seen.append(cfg) or tmp_path / "model"
    monkeypatch.setitem(sys.modules, "dsel.train.megatron.backend", fake)
    main(["train", "data=[d]", f"out={tmp_path}", "steps=2", "backend=megatron", "parallel.tp=2"])
    assert len(seen) == 1 and seen[0].backend == "megatron" and seen[0].parallel.tp == 2


def test_sigkilled_cli_run_resumes_to_the_uninterrupted_result(tmp_path):
    data = write_counting_dataset(tmp_path / "d")
    model = ",".join(f"{k}: {v}" for k, v in TINY_MODEL.items())
    args = [f"data=[{data}]", f"arch={{{model}}}", "steps=12", "save_every=3", "batch_size=2", "device=cpu"]
    main(["train", f"out={tmp_path / 'whole'}", *args])
    command = [sys.executable, "-m", "dsel", "train", f"out={tmp_path / 'killed'}", *args]
    env = {**os.environ, "DSEL_PROGRESS": "0"}
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log_file = tmp_path / "killed" / "log.jsonl"
    while process.poll() is None and not (log_file.is_file() and len(log_file.read_text().splitlines()) >= 4):
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    main(["train", f"out={tmp_path / 'killed'}", *args])
    assert log_rows(tmp_path / "killed") == log_rows(tmp_path / "whole")
    (a, _), (b, _) = load_model(tmp_path / "whole" / "model"), load_model(tmp_path / "killed" / "model")
    for name, p in a.state_dict().items():
        assert torch.equal(b.state_dict()[name], p), name
