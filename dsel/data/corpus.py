"""The one opener of corpora: every command that takes a corpus (train, eval loss, color finetune,
score, pds, select) opens it here.

A corpus is a Megatron dataset prefix (also given as `prefix.bin`/`prefix.idx`), a headerless or
`.npy` token file (OLMo/dolma), or a directory / glob of such token files read as one corpus
(dsel.data.dolma). Its sidecars (`.meta.json`, `.docids.jsonl`, `.domains.jsonl`) hang off
`sidecar_prefix(path)`.
"""
from __future__ import annotations

import glob
import os
from pathlib import Path
from typing import Iterator

import numpy as np

from dsel.data.dolma import DolmaTokens, glob_root, is_file_set
from dsel.data.indexed import IndexedDataset, dataset_exists
from dsel.data.memmap import MemmapTokens
from dsel.errors import DselError


def sidecar_prefix(path: str | os.PathLike) -> str:
    """The prefix a corpus' sidecars hang off: a Megatron prefix itself, a token file without its
    .bin/.npy suffix, a directory without its trailing slash, a glob's directory before its first wildcard."""
    path = str(path)
    if glob.has_magic(path):
        return glob_root(path)
    if path.endswith((".bin", ".idx")) and dataset_exists(path[:-4]):
        return path[:-4]
    if dataset_exists(path):
        return path
    return path.rstrip("/").removesuffix(".bin").removesuffix(".npy") or path


def eod_of(path: str) -> int | None:
    """The EOD id recorded in a token file's `<stem>.meta.json`, None when it has none."""
    from dsel.data.meta import meta_path, read_meta

    prefix = sidecar_prefix(path)
    return read_meta(prefix)["eod_id"] if Path(meta_path(prefix)).is_file() else None


def open_corpus(path: str | os.PathLike, memmap_dtype: str = "uint16"):
    """The token source of a corpus path (see the module docstring); one line naming it when it is none."""
    path = str(path)
    stem = path[:-4] if path.endswith((".bin", ".idx", ".npy")) else path
    if dataset_exists(path):
        return IndexedDataset(path)
    if dataset_exists(stem) and not path.endswith(".npy"):
        return IndexedDataset(stem)
    if is_file_set(path):
        return DolmaTokens(path, memmap_dtype, eos_id=eod_of(path))
    if path.endswith((".bin", ".npy")) and Path(path).is_file():
        return MemmapTokens(path, memmap_dtype, eos_id=eod_of(path))
    raise DselError(f"{path}: corpus not found (expected a Megatron dataset {path}.idx + {path}.bin, a headerless "
                    ".bin/.npy token file, or a directory or glob of token files)")


def corpus_documents(source) -> Iterator[np.ndarray]:
    """Every document of a token source as one token array, in order (documents never cross a file)."""
    if isinstance(source, IndexedDataset):
        bounds = source.document_indices
        for d in range(len(bounds) - 1):
            parts = [source[i] for i in range(bounds[d], bounds[d + 1])]
            yield np.concatenate(parts) if parts else np.zeros(0, dtype=source.dtype)
        return
    for f in source.files if isinstance(source, DolmaTokens) else [source]:
        yield from np.split(f.stream, f.document_starts[1:])
