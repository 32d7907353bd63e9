"""The selected windows as Megatron datasets: `data/part-XXXXX` shards, then merged into `data/selected`."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from dsel.data.indexed import IndexedDataset, dataset_exists, merge_datasets
from dsel.data.memmap import MemmapTokens
from dsel.data.windows import Windows, write_windows
from dsel.errors import DselError
from dsel.io import progress

PART = re.compile(r"^part-(\d{5})\.(bin|idx)$")


def open_corpus(path: str, window: int, memmap_dtype: str = "uint16") -> Windows:
    """Windows over a Megatron prefix (prefix.idx + prefix.bin) or a headerless token file."""
    if dataset_exists(path):
        return Windows(IndexedDataset(path), window)
    if Path(path).is_file() and not path.endswith(".idx"):
        return Windows(MemmapTokens(path, memmap_dtype), window)
    raise DselError(f"{path}: corpus not found (neither {path}.idx + {path}.bin nor a headerless token file)")


def shard_prefixes(out_dir: Path, count: int) -> list[Path]:
    """`out_dir/part-00000` ... for `count` shards."""
    return [out_dir / f"part-{i:05d}" for i in range(count)]


def remove_stale_parts(out_dir: Path, count: int) -> None:
    """Delete part files a previous run with more shards left behind (they are not in `selected`)."""
    for path in out_dir.glob("part-*"):
        match = PART.match(path.name)
        if match and int(match.group(1)) >= count:
            path.unlink()


def materialise(windows: Windows, indices: np.ndarray, out_dir: str | Path, shards: int) -> tuple[list[Path], IndexedDataset]:
    """Write windows `indices` (in order) as `shards` part datasets and their merge `out_dir/selected`."""
    out_dir = Path(out_dir)
    parts = np.array_split(np.asarray(indices, dtype=np.int64), max(1, min(shards, len(indices))))
    prefixes = shard_prefixes(out_dir, len(parts))
    for prefix, ids in progress(list(zip(prefixes, parts)), desc="write shards", unit="shard"):
        write_windows(windows, ids, prefix)
    remove_stale_parts(out_dir, len(parts))
    return prefixes, merge_datasets(prefixes, out_dir / "selected")
