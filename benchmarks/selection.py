"""Streaming exact selection (dsel.select) vs numpy argpartition in memory, on synthetic score tables.

Writes N random float32 scores (plus window ids and token counts) as parquet in row groups, then
times, for each case (top 40%, Gumbel-top 40%, a token budget):
  streamed   dsel.select.methods.select over the parquet table in chunks (exact; ties by window id)
  in-memory  read the whole table, then numpy argpartition of the key (no tie rule) + sort of the ids
and the peak extra resident memory of each (VmHWM after resetting it). Prints a table, writes JSON,
reports streamed / in-memory time and memory ratios.

  python benchmarks/selection.py                       # 100M scores, row groups of 1M
  python benchmarks/selection.py --rows 1000000 --row-group 65536 --out select_small.json
"""
import os
import sys

# This script shares its name with the stdlib module `select`: keep its own folder off sys.path.
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]

import argparse  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

import dsel  # noqa: E402

from dsel.benchmarking import PeakMemory  # noqa: E402
from dsel.io import write_json  # noqa: E402
from dsel.select.expression import Expression  # noqa: E402
from dsel.select.methods import Plan, select, selection_key  # noqa: E402
from dsel.select.source import open_scores  # noqa: E402

FRACTION = 0.4


def write_table(path: Path, rows: int, row_group: int, seed: int = 0) -> None:
    """Synthetic scores: N(0,1) float32, window ids 0..N-1, 512-2048 tokens per row; written a row group at a time."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    schema = pa.schema([("window", pa.int64()), ("tokens", pa.int64()), ("pds", pa.float32())])
    with pq.ParquetWriter(path, schema) as writer:
        for start in range(0, rows, row_group):
            n = min(row_group, rows - start)
            writer.write_table(pa.table({
                "window": np.arange(start, start + n, dtype=np.int64),
                "tokens": rng.integers(512, 2049, n, dtype=np.int64),
                "pds": rng.standard_normal(n, dtype=np.float32),
            }, schema=schema), row_group_size=row_group)


def in_memory(path: Path, plan: Plan) -> np.ndarray:
    """The baseline: read every row, then argpartition the key (count) or argsort + cumsum (budget)."""
    import pyarrow.parquet as pq

    table = pq.read_table(path, columns=["window", "tokens", "pds"])
    chunk = {name: table.column(name).to_numpy() for name in ("window", "tokens")}
    chunk["pds"] = table.column("pds").to_numpy().astype(np.float64)
    key = selection_key(plan)(chunk)
    if plan.token_budget:
        order = np.argsort(-key, kind="stable")
        keep = order[: int(np.searchsorted(np.cumsum(chunk["tokens"][order]), plan.token_budget, side="right"))]
    else:
        k = int(round(plan.fraction * len(key)))
        keep = np.argpartition(-key, k - 1)[:k]
    return np.sort(chunk["window"][keep])


def measure(fn):
    """(seconds, peak extra bytes or None, result) of one call."""
    with PeakMemory(torch.device("cpu")) as memory:
        start = time.perf_counter()
        result = fn()
        seconds = time.perf_counter() - start
    return seconds, memory.peak, result


def run_worker(mode: str, case: str, table: str, rows: int, chunk_rows: int) -> dict:
    """Time one case in this (fresh) process: `mode` is streamed or in-memory."""
    plan = cases(rows)[case]
    if mode == "streamed":
        seconds, peak, sel = measure(lambda: select(open_scores(table), plan, rows, chunk_rows))
        indices, extra = sel.indices, dict(passes=sel.passes, candidates=sel.candidates)
    else:
        seconds, peak, indices = measure(lambda: in_memory(Path(table), plan))
        extra = {}
    return dict(seconds=seconds, peak_bytes=peak, kept=len(indices),
                sha256=hashlib.sha256(np.ascontiguousarray(indices, dtype=np.int64).tobytes()).hexdigest(), **extra)


def in_fresh_process(mode: str, case: str, table: Path, rows: int, chunk_rows: int) -> dict:
    """run_worker in a new interpreter, so peak memory is not hidden by memory an earlier case freed."""
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", mode, "--case", case, "--table", str(table),
           "--rows", str(rows), "--chunk-rows", str(chunk_rows)]
    root = str(Path(dsel.__file__).resolve().parents[1])  # the child imports the same dsel as this process
    env = {**os.environ, "DSEL_PROGRESS": "0", "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"{mode} {case} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def cases(rows: int) -> dict[str, Plan]:
    """The selections timed: plain top-k, PDS Gumbel-top-k, and a token budget of 40% of the tokens."""
    pds = Expression("pds")
    return {
        "topk-40%": Plan("topk", pds, fraction=FRACTION),
        "gumbel-40%": Plan("gumbel", pds, fraction=FRACTION, temperature=0.1, seed=1),
        "budget-40%": Plan("topk", pds, token_budget=int(FRACTION * rows * 1280)),
    }


def fmt_bytes(n):
    return "n/a" if n is None else f"{n / 2**20:.0f} MiB"


def fmt_ratio(x):
    return "n/a" if x is None else f"{x:.2f}"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=100_000_000, help="synthetic scores (windows)")
    p.add_argument("--row-group", type=int, default=1 << 20, help="parquet row-group size")
    p.add_argument("--chunk-rows", type=int, default=1 << 20, help="rows per streamed chunk")
    p.add_argument("--dir", default=None, help="where to write the table (default: a temporary directory)")
    p.add_argument("--out", default="select_bench.json")
    p.add_argument("--worker", choices=["streamed", "in-memory"], help=argparse.SUPPRESS)
    p.add_argument("--case", help=argparse.SUPPRESS)
    p.add_argument("--table", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(run_worker(args.worker, args.case, args.table, args.rows, args.chunk_rows)))
        return
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        path = Path(tmp) / "scores.parquet"
        t0 = time.perf_counter()
        write_table(path, args.rows, args.row_group)
        print(f"wrote {args.rows} scores in row groups of {args.row_group} "
              f"({path.stat().st_size / 2**20:.0f} MiB) in {time.perf_counter() - t0:.1f}s")
        print(f"{'case':<12} {'streamed':>10} {'peak':>9} {'in-memory':>10} {'peak':>9} {'time ratio':>10} {'mem ratio':>9}  passes")
        rows = []
        for case in cases(args.rows):
            streamed = in_fresh_process("streamed", case, path, args.rows, args.chunk_rows)
            memory = in_fresh_process("in-memory", case, path, args.rows, args.chunk_rows)
            mem_ratio = streamed["peak_bytes"] / memory["peak_bytes"] if streamed["peak_bytes"] and memory["peak_bytes"] else None
            row = dict(case=case, rows=args.rows, streamed=streamed, in_memory=memory,
                       time_ratio=streamed["seconds"] / memory["seconds"], memory_ratio=mem_ratio,
                       same_count=streamed["kept"] == memory["kept"], same_selection=streamed["sha256"] == memory["sha256"])
            rows.append(row)
            print(f"{case:<12} {streamed['seconds']:>9.2f}s {fmt_bytes(streamed['peak_bytes']):>9} "
                  f"{memory['seconds']:>9.2f}s {fmt_bytes(memory['peak_bytes']):>9} {row['time_ratio']:>10.2f} "
                  f"{fmt_ratio(mem_ratio):>9}  {streamed['passes']}"
                  f"{'' if row['same_selection'] else '  (selections differ: argpartition breaks ties arbitrarily)'}")
    write_json(args.out, dict(rows=rows, row_group=args.row_group, chunk_rows=args.chunk_rows))
    print("ratios (streamed / in-memory): " + " ".join(
        f"{r['case']}: time {r['time_ratio']:.2f}, memory {fmt_ratio(r['memory_ratio'])}"
        for r in rows))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
