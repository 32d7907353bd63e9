"""Megatron indexed datasets (`prefix.idx` + `prefix.bin`), read and written by the native loader.

The format is megatron-core's `MMIDIDX` (see REFERENCE.md): files written here load in
megatron-core's `IndexedDataset` and are byte-identical to what its `IndexedDatasetBuilder`
writes for the same input; files written by megatron-core read here unchanged. Every malformed
input (wrong magic, unknown dtype code, truncated .idx or .bin, offsets past the end) is caught
when the dataset is opened and reported as a DselError naming the file.
"""
from __future__ import annotations

import os
from contextlib import ExitStack
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from dsel.errors import DselError, file_error
from dsel.io import atomic_path, check_not_mid_publish
from dsel.data.native import _C, native_errors

DTYPE_CODES: dict[int, type] = {
    1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64, 7: np.float32, 8: np.uint16,
}


def dtype_code(dtype) -> int:
    """Megatron's numeric code of a numpy dtype (DselError for a dtype Megatron cannot store)."""
    dtype = np.dtype(dtype)
    for code, candidate in DTYPE_CODES.items():
        if np.dtype(candidate) == dtype:
            return code
    raise DselError(f"dtype {dtype} cannot be stored in a Megatron indexed dataset")


def best_dtype(vocab_size: int | None) -> type:
    """The token dtype megatron-core's preprocessor picks: uint16 below 65500 ids, else int32."""
    return np.uint16 if vocab_size is not None and vocab_size < 65500 else np.int32


def check_vocab(stream: np.ndarray, vocab_size: int, path) -> None:
    """Raise a DselError naming `path` if any token of `stream` is outside [0, vocab_size)."""
    with native_errors():
        pos = _C.first_token_outside(stream, int(vocab_size))
    if pos >= 0:
        raise file_error(path, f"token id {int(stream[pos])} at token {pos} is outside the vocabulary (size {vocab_size})")


class IndexedDataset:
    """Read-only view of a Megatron indexed dataset: `ds[i]` is sequence i (a zero-copy view).

    `vocab_size`, when given, checks every token against the vocabulary on open.
    """

    def __init__(self, prefix: str | os.PathLike, vocab_size: int | None = None):
        self.prefix = str(prefix)
        check_not_mid_publish(self.prefix)
        with native_errors():
            self._native = _C.IndexedData(self.prefix)
        self.dtype = np.dtype(DTYPE_CODES[self._native.dtype_code])
        self.sizes: np.ndarray = self._native.sizes()
        self.pointers: np.ndarray = self._native.pointers()
        self.document_indices: np.ndarray = self._native.document_indices()
        self.tokens: np.ndarray = self._native.tokens()
        if vocab_size is not None:
            self.check_tokens(vocab_size)

    @property
    def bin_path(self) -> str:
        return self.prefix + ".bin"

    @property
    def idx_path(self) -> str:
        return self.prefix + ".idx"

    @property
    def num_tokens(self) -> int:
        return self._native.num_tokens

    @property
    def num_documents(self) -> int:
        return len(self.document_indices) - 1

    def __len__(self) -> int:
        return len(self.sizes)

    def __getitem__(self, i: int) -> np.ndarray:
        return self.get(i)

    def get(self, i: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        """Tokens [offset, offset+length) of sequence i (the rest of it when length is None)."""
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"sequence {i} out of range for {self.prefix} ({n} sequences)")
        i %= n
        size = int(self.sizes[i])
        length = size - offset if length is None else length
        if offset < 0 or length < 0 or offset + length > size:
            raise IndexError(f"tokens [{offset}, {offset + length}) out of range for sequence {i} of length {size}")
        start = int(self.pointers[i]) // self.dtype.itemsize + offset
        return self.tokens[start : start + length]

    def document(self, d: int) -> list[np.ndarray]:
        """The sequences of document d."""
        return [self[s] for s in range(int(self.document_indices[d]), int(self.document_indices[d + 1]))]

    @property
    def stream(self) -> np.ndarray:
        """All sequences concatenated in order, as one zero-copy token array."""
        if not self._native.contiguous:
            raise file_error(self.bin_path, "sequences are not stored back to back; cannot view them as one token stream")
        start = int(self.pointers[0]) // self.dtype.itemsize if len(self) else 0
        return self.tokens[start : start + self.num_tokens]

    @property
    def document_starts(self) -> np.ndarray:
        """Stream position where each document starts (int64), as MemmapTokens.document_starts."""
        sequence_starts = np.concatenate([[0], np.cumsum(self.sizes, dtype=np.int64)])
        return sequence_starts[self.document_indices[:-1]]

    def document_of_token(self, positions: np.ndarray) -> np.ndarray:
        """Document containing each stream position (int64)."""
        ends = np.cumsum(self.sizes, dtype=np.int64)
        seq = np.searchsorted(ends, np.asarray(positions, dtype=np.int64), side="right")
        return np.searchsorted(self.document_indices, seq, side="right").astype(np.int64) - 1

    def check_tokens(self, vocab_size: int) -> None:
        """Raise a DselError naming the .bin file if a token id is outside [0, vocab_size) (the whole
        file when the sequences are not back to back, e.g. an index over a corpus' tokens)."""
        check_vocab(self.stream if self._native.contiguous else self.tokens, vocab_size, self.bin_path)

    def __getstate__(self):
        return {"prefix": self.prefix}

    def __setstate__(self, state):
        self.__init__(state["prefix"])

    def __repr__(self) -> str:
        return f"IndexedDataset({self.prefix!r}, {len(self)} sequences, {self.num_tokens} tokens, {self.dtype})"


def _as_tokens(tokens) -> np.ndarray:
    """A 1-D integer array from a list, numpy array or CPU tensor."""
    arr = np.asarray(tokens)
    if arr.size == 0:
        return arr.reshape(0).astype(np.int64)
    return arr.reshape(-1)


class IndexedDatasetWriter:
    """Writes `prefix.bin`/`prefix.idx` under temporary names, renamed only when the block succeeds.

        with IndexedDatasetWriter("out/data", np.uint16) as w:
            w.add_document(tokens)          # one sequence = one document
            w.add_item(part); w.end_document()
    """

    def __init__(self, prefix: str | os.PathLike, dtype=np.int32):
        self.prefix = str(prefix)
        self.dtype = np.dtype(dtype)
        self._code = dtype_code(self.dtype)
        self._native = None

    def __enter__(self) -> "IndexedDatasetWriter":
        self._files = ExitStack()
        idx_tmp = self._files.enter_context(atomic_path(self.prefix + ".idx"))
        bin_tmp = self._files.enter_context(atomic_path(self.prefix + ".bin"))
        with native_errors():
            self._native = _C.Writer(str(bin_tmp), str(idx_tmp), self._code)
        return self

    def __exit__(self, exc_type, exc, tb):
        native, self._native = self._native, None
        if exc_type is not None:
            return self._files.__exit__(exc_type, exc, tb)  # removes the temporary files
        try:
            with native_errors():
                native.finalize()
        except BaseException as e:
            self._files.__exit__(type(e), e, e.__traceback__)
            raise
        return self._files.__exit__(None, None, None)  # renames .bin, then .idx

    def add_item(self, tokens) -> None:
        """Append one sequence to the current document."""
        with native_errors():
            self._writer().add_item(_as_tokens(tokens))

    def end_document(self) -> None:
        """Close the current document (after one or more add_item calls)."""
        self._writer().end_document()

    def add_document(self, tokens) -> None:
        """Append one document made of one sequence."""
        self.add_item(tokens)
        self.end_document()

    def add_dataset(self, dataset: IndexedDataset) -> None:
        """Append every document of another dataset of the same dtype."""
        with native_errors():
            self._writer().add_dataset(dataset._native)

    def add_documents(self, dataset: IndexedDataset, ids: Sequence[int]) -> None:
        """Append documents `ids` of another dataset, in that order."""
        with native_errors():
            self._writer().add_documents(dataset._native, np.asarray(ids, dtype=np.int64).reshape(-1))

    def add_windows(self, stream: np.ndarray, window: int, ids: Sequence[int]) -> None:
        """Append windows `ids` of a token stream (tokens [i*window, (i+1)*window)), one document each."""
        with native_errors():
            self._writer().add_windows(stream, int(window), np.asarray(ids, dtype=np.int64).reshape(-1))

    @property
    def num_documents(self) -> int:
        return self._writer().num_documents

    @property
    def num_tokens(self) -> int:
        return self._writer().num_tokens

    def _writer(self):
        if self._native is None:
            raise DselError(f"{self.prefix}: IndexedDatasetWriter used outside its `with` block")
        return self._native


def open_datasets(prefixes: Iterable[str | os.PathLike]) -> list[IndexedDataset]:
    """Open several datasets, checking they share one dtype."""
    datasets = [IndexedDataset(p) for p in prefixes]
    if not datasets:
        raise DselError("no datasets given")
    for ds in datasets[1:]:
        if ds.dtype != datasets[0].dtype:
            raise file_error(ds.idx_path, f"dtype {ds.dtype} differs from {datasets[0].prefix}'s {datasets[0].dtype}")
    return datasets


def merge_datasets(prefixes: Iterable[str | os.PathLike], out_prefix: str | os.PathLike) -> IndexedDataset:
    """Concatenate datasets (documents in order) into `out_prefix`; returns the merged dataset."""
    datasets = open_datasets(prefixes)
    with IndexedDatasetWriter(out_prefix, datasets[0].dtype) as writer:
        for ds in datasets:
            writer.add_dataset(ds)
    return IndexedDataset(out_prefix)


def subset_dataset(prefix: str | os.PathLike, indices: Sequence[int], out_prefix: str | os.PathLike) -> IndexedDataset:
    """Write documents `indices` of `prefix` (in the given order) as a new dataset."""
    ds = IndexedDataset(prefix)
    with IndexedDatasetWriter(out_prefix, ds.dtype) as writer:
        writer.add_documents(ds, indices)
    return IndexedDataset(out_prefix)


def dataset_exists(prefix: str | os.PathLike) -> bool:
    """Whether both files of a dataset are present."""
    return Path(f"{prefix}.idx").is_file() and Path(f"{prefix}.bin").is_file()
