"""Score-engine throughput from 1 to N ranks (torchrun), with a small transformer scorer.

Each run scores the same synthetic corpus with `torchrun --nproc_per_node R -m dsel score`; the
scoring time of a run is the slowest rank's total shard time (from the shard markers), so process
start-up is excluded (it is reported separately as wall time). Every run must give the same
scores.parquet as the 1-rank baseline. On CPU each rank gets `--threads` threads, so the ratio
measures process scaling on that many cores; on GPUs each rank takes one GPU.

  python benchmarks/score_scaling.py                           # CPU: 1 and 2 ranks
  python benchmarks/score_scaling.py --windows 65536 --window 1025 --d-model 512 --layers 8  # GPUs
Target: throughput ratio near the rank ratio (2 ranks ~ 2x), when the ranks have their own cores/GPUs.
"""
import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dsel.data.indexed import IndexedDatasetWriter  # noqa: E402
from dsel.io import read_json, write_json  # noqa: E402


class ModelScorer:
    """A small transformer encoder, mean-pooled to one score per window (seeded: same on every rank)."""

    columns = ["score"]

    def __init__(self, vocab_size: int, d_model: int, layers: int, device, seed: int = 0):
        torch.manual_seed(seed)
        layer = nn.TransformerEncoderLayer(d_model, nhead=4, dim_feedforward=4 * d_model, dropout=0.0,
                                           batch_first=True)
        self.embed = nn.Embedding(vocab_size, d_model).to(device).eval()
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False).to(device).eval()
        self.head = nn.Linear(d_model, 1).to(device).eval()
        self.device, self.vocab_size = torch.device(device), vocab_size

    @torch.no_grad()
    def __call__(self, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        hidden = self.encoder(self.embed(tokens.to(self.device)))
        return {"score": self.head(hidden.mean(1)).squeeze(1).float()}


def build_model_scorer(settings: dict, device) -> ModelScorer:
    """Registry-style builder: `scorer=benchmarks.score_scaling:build_model_scorer`."""
    return ModelScorer(device=device, **settings)


def make_corpus(prefix: Path, windows: int, window: int, vocab_size: int) -> None:
    """Random documents (EOD 0) holding exactly `windows` windows of `window` tokens."""
    rng = np.random.default_rng(0)
    tokens = rng.integers(1, vocab_size, size=windows * window)
    cuts = np.sort(rng.choice(np.arange(1, len(tokens)), size=max(1, len(tokens) // 300), replace=False))
    with IndexedDatasetWriter(prefix, np.uint16) as writer:
        for doc in np.split(tokens, cuts):
            writer.add_document(np.append(doc[:-1], 0))


def run(ranks: int, args, prefix: Path, out: Path, device: str) -> dict:
    """One torchrun scoring run: wall time and the slowest rank's scoring time."""
    settings = [f"settings.vocab_size={args.vocab}", f"settings.d_model={args.d_model}",
                f"settings.layers={args.layers}"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}", "-m", "dsel",
           "score", f"corpus={prefix}", f"window={args.window}", "scorer=benchmarks.score_scaling:build_model_scorer",
           *settings, f"out={out}", f"batch_size={args.batch_size}", f"shard_size={args.shard_size}",
           f"device={device}"]
    env = {**os.environ, "DSEL_PROGRESS": "0", "OMP_NUM_THREADS": str(args.threads), "PYTHONPATH": str(ROOT)}
    began = time.perf_counter()
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - began
    if result.returncode != 0:
        raise SystemExit(f"torchrun with {ranks} ranks failed:\n{result.stderr[-4000:]}")
    per_rank: dict[str, float] = {}
    for marker in (out / "shards").glob("shard-*.json"):
        info = read_json(marker)
        rank = info["worker"].split(",")[0]
        per_rank[rank] = per_rank.get(rank, 0.0) + info["seconds"]
    scoring = max(per_rank.values())
    return {"ranks": ranks, "wall_s": round(wall, 3), "scoring_s": round(scoring, 3),
            "windows_per_s": round(args.windows / scoring, 2), "per_rank_s": per_rank}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    gpus = torch.cuda.device_count()
    p.add_argument("--ranks", type=int, nargs="+", default=[1, max(2, gpus)] if gpus != 1 else [1])
    p.add_argument("--windows", type=int, default=2048)
    p.add_argument("--window", type=int, default=129)
    p.add_argument("--vocab", type=int, default=1000)
    p.add_argument("--d-model", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--shard-size", type=int, default=64)
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank on CPU")
    p.add_argument("--device", default="auto", help="auto = cuda:LOCAL_RANK when GPUs exist, else cpu")
    p.add_argument("--out", default="score_scaling.json")
    args = p.parse_args(argv)
    rows, baseline = [], None
    with tempfile.TemporaryDirectory() as tmp:
        prefix = Path(tmp) / "corpus"
        make_corpus(prefix, args.windows, args.window, args.vocab)
        for ranks in args.ranks:
            row = run(ranks, args, prefix, Path(tmp) / f"out{ranks}", args.device)
            table = pq.read_table(Path(tmp) / f"out{ranks}" / "scores.parquet")
            baseline = baseline or (ranks, table)
            scores, reference = table.column("score").to_numpy(), baseline[1].column("score").to_numpy()
            row["max_abs_diff_vs_first"] = float(np.abs(scores - reference).max())
            row["throughput_ratio"] = round(row["windows_per_s"] / rows[0]["windows_per_s"], 3) if rows else 1.0
            rows.append(row)
    print(f"{'ranks':>5} {'wall s':>8} {'scoring s':>10} {'windows/s':>10} {'ratio':>6} {'max|diff|':>10}")
    for r in rows:
        print(f"{r['ranks']:>5} {r['wall_s']:>8.2f} {r['scoring_s']:>10.2f} {r['windows_per_s']:>10.1f} "
              f"{r['throughput_ratio']:>6.2f} {r['max_abs_diff_vs_first']:>10.2e}")
    last, first = rows[-1], rows[0]
    print(f"ratios: throughput of {last['ranks']} ranks / {first['ranks']} rank = {last['throughput_ratio']:.2f} "
          f"(ideal {last['ranks'] / first['ranks']:.1f}); device {args.device}, "
          f"{os.cpu_count()} CPU cores, {gpus} GPUs, {args.threads} thread(s) per rank")
    write_json(args.out, {"rows": rows, "settings": vars(args), "cpu_count": os.cpu_count(), "gpus": gpus})
    return rows


if __name__ == "__main__":
    main()
