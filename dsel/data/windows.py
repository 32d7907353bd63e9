"""Fixed-length windows of a token stream: the unit of scoring and selection.

A token source (IndexedDataset or MemmapTokens) is viewed as ONE stream of tokens (sequences
concatenated in order; Megatron sequences already end with EOD). Window i is tokens
[i*W, (i+1)*W); the ragged tail is dropped.
"""
from __future__ import annotations

import os
from functools import cached_property
from typing import Sequence, Union

import numpy as np

from dsel.errors import DselError
from dsel.data.indexed import DTYPE_CODES, IndexedDataset, IndexedDatasetWriter
from dsel.data.memmap import MemmapTokens
from dsel.data.native import _C, native_errors

TokenSource = Union[IndexedDataset, MemmapTokens]


def source_name(source: TokenSource) -> str:
    """The file a source reads, for error messages."""
    return getattr(source, "prefix", None) or source.path


def corpus_prefix(source: TokenSource) -> str:
    """The path sidecars hang off: a Megatron prefix, or a token file without its .bin/.npy suffix."""
    prefix = getattr(source, "prefix", None)
    if prefix is not None:
        return prefix
    path = str(source.path)
    return path.removesuffix(".bin").removesuffix(".npy")


class Windows:
    """Non-overlapping windows of `window` tokens over a token source."""

    def __init__(self, source: TokenSource, window: int):
        if window <= 0:
            raise DselError(f"{source_name(source)}: window must be positive, got {window}")
        self.source = source
        self.window = int(window)
        self.stream = source.stream
        self.num_windows = len(self.stream) // self.window
        if self.num_windows == 0:
            raise DselError(f"{source_name(source)}: {len(self.stream)} tokens is less than one window of {window}")

    def __len__(self) -> int:
        return self.num_windows

    @property
    def dtype(self) -> np.dtype:
        return self.stream.dtype

    def tokens(self, i: int) -> np.ndarray:
        """Window i as a zero-copy view."""
        if not 0 <= i < self.num_windows:
            raise IndexError(f"window {i} out of range [0, {self.num_windows})")
        return self.stream[i * self.window : (i + 1) * self.window]

    @cached_property
    def doc_of_window(self) -> np.ndarray:
        """Document containing each window's first token (int64[num_windows])."""
        starts = np.arange(self.num_windows, dtype=np.int64) * self.window
        return self.source.document_of_token(starts)

    def batch(self, ids: Sequence[int], out: np.ndarray | None = None, dtype=np.int64) -> np.ndarray:
        """Windows `ids` gathered into `out` ([B, W], allocated with `dtype` when None), GIL released."""
        ids = np.ascontiguousarray(ids, dtype=np.int64).reshape(-1)
        if out is None:
            out = np.empty((len(ids), self.window), dtype=dtype)
        if not np.can_cast(self.dtype, out.dtype, "safe"):
            raise DselError(f"{source_name(self.source)}: cannot gather {self.dtype} tokens into a {out.dtype} buffer")
        with native_errors():
            _C.gather_windows(self.stream, self.window, ids, out)
        return out

    def __repr__(self) -> str:
        return f"Windows({source_name(self.source)!r}, window={self.window}, {self.num_windows} windows)"


def write_windows(windows: Windows, ids: Sequence[int], out_prefix: str | os.PathLike) -> IndexedDataset:
    """Write windows `ids` (in order) as a new Megatron dataset, one window per document."""
    dtype = windows.dtype if windows.dtype in map(np.dtype, DTYPE_CODES.values()) else np.dtype(np.int32)
    with IndexedDatasetWriter(out_prefix, dtype) as writer:
        writer.add_windows(windows.stream, windows.window, ids)
    return IndexedDataset(out_prefix)
