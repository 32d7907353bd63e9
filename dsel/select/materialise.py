"""The selected windows as Megatron datasets: `data/part-XXXXX` shards, then merged into `data/selected`."""
from __future__ import annotations

import multiprocessing
import re
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import numpy as np

from dsel.data.indexed import IndexedDataset, merge_datasets
from dsel.data.meta import write_derived_meta
from dsel.data.windows import Windows, corpus_prefix, write_windows
from dsel.io import progress

PART = re.compile(r"^part-(\d{5})\.(bin|idx)$")


def shard_prefixes(out_dir: Path, count: int) -> list[Path]:
    """`out_dir/part-00000` ... for `count` shards."""
    return [out_dir / f"part-{i:05d}" for i in range(count)]


def remove_stale_parts(out_dir: Path, count: int) -> None:
    """Delete part files a previous run with more shards left behind (they are not in `selected`)."""
    for path in out_dir.glob("part-*"):
        match = PART.match(path.name)
        if match and int(match.group(1)) >= count:
            path.unlink()


def write_part(source, window: int, ids: np.ndarray, prefix: Path) -> None:
    """One shard: windows `ids` of `source` (a token source pickles as its path, so workers reopen it)."""
    write_windows(Windows(source, window), ids, prefix)


def materialise(windows: Windows, indices: np.ndarray, out_dir: str | Path, shards: int,
                workers: int = 1) -> tuple[list[Path], IndexedDataset]:
    """Write windows `indices` (in order) as `shards` part datasets, `workers` processes at a time,
    then merge them into `out_dir/selected`."""
    out_dir = Path(out_dir)
    parts = np.array_split(np.asarray(indices, dtype=np.int64), max(1, min(shards, len(indices))))
    jobs = [(windows.source, windows.window, ids, prefix) for ids, prefix in zip(parts, shard_prefixes(out_dir, len(parts)))]
    bar = dict(total=len(jobs), desc="write shards", unit="shard")
    if workers > 1 and len(jobs) > 1:
        with ProcessPoolExecutor(min(workers, len(jobs)), mp_context=multiprocessing.get_context("spawn")) as pool:
            for done in progress(as_completed([pool.submit(write_part, *job) for job in jobs]), **bar):
                done.result()
    else:
        for job in progress(jobs, **bar):
            write_part(*job)
    remove_stale_parts(out_dir, len(jobs))
    prefixes = [job[3] for job in jobs]
    selected = merge_datasets(prefixes, out_dir / "selected")
    corpus = corpus_prefix(windows.source)
    # models trained on it record the tokenizer; `window` makes dsel train draw one sample per window
    write_derived_meta(corpus, selected, selected_from=corpus, window=windows.window)
    return prefixes, selected
