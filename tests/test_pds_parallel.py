"""`torchrun --nproc_per_node 2 -m dsel pds solve` (gloo, CPU) gives the G of one process: every step's
micro-batches (training gradient, HVP, target gradient, per-window dots) are split over the ranks."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from dsel.cli import main
from dsel.data.indexed import IndexedDatasetWriter
from dsel.models.checkpoint import save_model
from dsel.models.config import GPTConfig
from dsel.models.gpt import GPT

ROOT = Path(__file__).resolve().parent.parent
SEQ, VOCAB = 8, 32


def test_two_gloo_ranks_give_the_g_of_one(tmp_path):
    rng = np.random.default_rng(0)
    with IndexedDatasetWriter(tmp_path / "proxy", np.uint16) as w:
        for _ in range(12):
            w.add_document(rng.integers(0, VOCAB, size=SEQ + 1))
    with IndexedDatasetWriter(tmp_path / "target", np.uint16) as w:  # examples of unequal length: padded
        for length in (9, 4, 6, 3, 7):
            w.add_document(rng.integers(0, VOCAB, size=length))
    torch.manual_seed(0)
    save_model(tmp_path / "lm", GPT(GPTConfig(vocab_size=VOCAB, seq_len=SEQ, n_layer=1, n_head=2, d_model=16)))
    args = ["pds", "solve", f"model={tmp_path}/lm", f"proxy={tmp_path}/proxy", f"target={tmp_path}/target",
            "device=cpu", "dtype=float32", "solver.steps=4", "solver.lr=0.5", "solver.batch_size=6",
            "solver.score_every=2", "solver.micro_batch=2"]
    main(args + [f"out={tmp_path / 'one'}"])
    env = {**os.environ, "DSEL_PROGRESS": "0", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT),
           "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "dsel", *args,
           f"out={tmp_path / 'two'}"]
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    one, two = np.load(tmp_path / "one" / "G.npy"), np.load(tmp_path / "two" / "G.npy")
    assert one.shape == two.shape == (1, 12)
    assert np.abs(two - one).max() <= 1e-6 * np.abs(one).max()
    assert json.loads((tmp_path / "two" / "gamma.json").read_text())["ranks"] == 2
    info = json.loads((tmp_path / "one" / "gamma.json").read_text())
    assert info["ranks"] == 1 and info["estimator"] == "fixed-step"
    np.testing.assert_allclose(json.loads((tmp_path / "two" / "gamma.json").read_text())["objective_per_epoch"],
                               info["objective_per_epoch"], rtol=1e-6)
