"""Fixed-length windows of a token source: the unit of scoring and selection.

A token source (IndexedDataset, MemmapTokens or DolmaTokens) is one or several token `streams`
(an IndexedDataset's sequences concatenated in order; Megatron sequences already end with EOD;
a DolmaTokens has one stream per file). Each stream is cut into windows of W tokens, its ragged
tail dropped, and the windows are numbered stream after stream: with one stream window i is
tokens [i*W, (i+1)*W); with several no window crosses a stream (file) boundary, as in OLMo.
Positions count tokens of the streams laid end to end.
"""
from __future__ import annotations

import os
from functools import cached_property
from typing import Iterator, Sequence, Union

import numpy as np

from dsel.errors import DselError
from dsel.data.dolma import DolmaTokens
from dsel.data.indexed import DTYPE_CODES, IndexedDataset, IndexedDatasetWriter
from dsel.data.memmap import MemmapTokens
from dsel.data.native import _C, native_errors
from dsel.io import dataset_digest

TokenSource = Union[IndexedDataset, MemmapTokens, DolmaTokens]


def source_name(source: TokenSource) -> str:
    """The file (or file set) a source reads, for error messages."""
    return getattr(source, "prefix", None) or source.path


def corpus_prefix(source: TokenSource) -> str:
    """The path sidecars hang off: a Megatron prefix, a token file without its .bin/.npy suffix, a
    directory of token files without its trailing slash (see dsel.data.corpus.sidecar_prefix)."""
    from dsel.data.corpus import sidecar_prefix

    return sidecar_prefix(source_name(source))


def source_streams(source: TokenSource) -> list[np.ndarray]:
    """The token streams windows are cut from (one per file of a DolmaTokens, else one)."""
    return source.streams if isinstance(source, DolmaTokens) else [source.stream]


def corpus_digest(source: TokenSource) -> str:
    """Content digest of a source (to notice a corpus changed between scoring and selecting)."""
    return source.digest() if isinstance(source, DolmaTokens) else dataset_digest(source_name(source))


def document_ids(source: TokenSource) -> list[str] | None:
    """The id of every document: the source's own (dolma metadata), else its `.docids.jsonl`; None if neither."""
    from dsel.data.docids import doc_ids_path, read_doc_ids

    own = getattr(source, "doc_ids", None)
    if own is not None:
        return own
    prefix = corpus_prefix(source)
    return read_doc_ids(prefix, source.num_documents) if os.path.isfile(doc_ids_path(prefix)) else None


class Windows:
    """Non-overlapping windows of `window` tokens over the streams of a token source."""

    def __init__(self, source: TokenSource, window: int):
        if window <= 0:
            raise DselError(f"{source_name(source)}: window must be positive, got {window}")
        self.source = source
        self.window = int(window)
        self.streams = source_streams(source)
        lengths = np.array([len(s) for s in self.streams], dtype=np.int64)
        self.first_window = np.concatenate([[0], np.cumsum(lengths // self.window)]).astype(np.int64)
        self.stream_starts = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        self.num_windows = int(self.first_window[-1])
        if self.num_windows == 0 and len(lengths) > 1:
            raise DselError(f"{source_name(source)}: no token file holds one window of {window} tokens (the longest "
                            f"holds {int(lengths.max())})")
        if self.num_windows == 0:
            raise DselError(f"{source_name(source)}: {int(lengths[0])} tokens is less than one window of {window}")

    def __len__(self) -> int:
        return self.num_windows

    @property
    def dtype(self) -> np.dtype:
        return self.streams[0].dtype

    def _locate(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(stream, window within that stream) of every window id."""
        part = np.searchsorted(self.first_window, ids, side="right") - 1
        return part, ids - self.first_window[part]

    def tokens(self, i: int) -> np.ndarray:
        """Window i as a zero-copy view."""
        if not 0 <= i < self.num_windows:
            raise IndexError(f"window {i} out of range [0, {self.num_windows})")
        part, local = (int(x[0]) for x in self._locate(np.array([i], dtype=np.int64)))
        return self.streams[part][local * self.window : (local + 1) * self.window]

    @cached_property
    def window_starts(self) -> np.ndarray:
        """Position of each window's first token (int64[num_windows])."""
        part, local = self._locate(np.arange(self.num_windows, dtype=np.int64))
        return self.stream_starts[part] + local * self.window

    @cached_property
    def doc_of_window(self) -> np.ndarray:
        """Document containing each window's first token (int64[num_windows])."""
        return self.source.document_of_token(self.window_starts)

    def document_overlaps(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(window, doc, tokens) of every non-empty intersection of a window with a document."""
        starts, ends = self.window_starts, self.window_starts + self.window
        docs = self.source.document_starts
        cuts = np.union1d(starts, docs)
        window = np.searchsorted(starts, cuts, side="right") - 1
        inside = (window >= 0) & (cuts < ends[np.maximum(window, 0)])
        cuts, window = cuts[inside], window[inside]
        lengths = np.minimum(np.append(cuts[1:], np.iinfo(np.int64).max), ends[window]) - cuts
        return window, self.source.document_of_token(cuts), lengths

    def runs(self, ids: np.ndarray) -> Iterator[tuple[np.ndarray, np.ndarray, slice]]:
        """(stream, its window ids, slice of `ids`) for every run of consecutive ids in one stream, in order."""
        if len(self.streams) == 1:
            yield self.streams[0], ids, slice(0, len(ids))
            return
        if len(ids) and (ids.min() < 0 or ids.max() >= self.num_windows):
            bad = int(ids[(ids < 0) | (ids >= self.num_windows)][0])
            raise DselError(f"{source_name(self.source)}: window id {bad} out of range [0, {self.num_windows})")
        part, local = self._locate(ids)
        cuts = (np.flatnonzero(np.diff(part)) + 1).tolist()  # plain ints: this loop runs per batch
        starts, ends = [0, *cuts], [*cuts, len(ids)]
        for a, b, p in zip(starts, ends, part[starts].tolist()):
            yield self.streams[p], local[a:b], slice(a, b)

    def batch(self, ids: Sequence[int], out: np.ndarray | None = None, dtype=np.int64) -> np.ndarray:
        """Windows `ids` gathered into `out` ([B, W], allocated with `dtype` when None), GIL released."""
        ids = np.ascontiguousarray(ids, dtype=np.int64).reshape(-1)
        if out is None:
            out = np.empty((len(ids), self.window), dtype=dtype)
        if not np.can_cast(self.dtype, out.dtype, "safe"):
            raise DselError(f"{source_name(self.source)}: cannot gather {self.dtype} tokens into a {out.dtype} buffer")
        with native_errors():
            for stream, local, rows in self.runs(ids):
                _C.gather_windows(stream, self.window, local, out[rows])
        return out

    def __repr__(self) -> str:
        return f"Windows({source_name(self.source)!r}, window={self.window}, {self.num_windows} windows)"


def write_windows(windows: Windows, ids: Sequence[int], out_prefix: str | os.PathLike) -> IndexedDataset:
    """Write windows `ids` (in order) as a new Megatron dataset, one window per document."""
    dtype = windows.dtype if windows.dtype in map(np.dtype, DTYPE_CODES.values()) else np.dtype(np.int32)
    with IndexedDatasetWriter(out_prefix, dtype) as writer:
        for stream, local, _ in windows.runs(np.ascontiguousarray(ids, dtype=np.int64).reshape(-1)):
            writer.add_windows(stream, windows.window, local)
    return IndexedDataset(out_prefix)
