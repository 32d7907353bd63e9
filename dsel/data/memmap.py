"""OLMo / dolma token files: headerless uint16 or uint32 arrays with EOS between documents.

A file that starts with NumPy's `.npy` magic is not headerless: its header is parsed (a 1-D,
C-order uint16/uint32 array; its dtype wins over `memmap_dtype`) and the tokens start after it;
any other .npy is refused, so a header is never read as tokens.

`dolma tokens` writes beside each `<stem>.npy` a `<stem>.csv.gz` (no header) with one row per
document: `start,end,id,src,loc` (token offsets, end exclusive, back to back). When it is present
the documents and their ids come from it, checked against the token file.
"""
from __future__ import annotations

import os
import re
from functools import cached_property
from typing import Iterable

import numpy as np

from dsel.errors import DselError, file_error
from dsel.io import atomic_path
from dsel.data.indexed import check_vocab
from dsel.data.native import _C, native_errors

MEMMAP_DTYPES = (np.dtype(np.uint16), np.dtype(np.uint32))


NPY_MAGIC = b"\x93NUMPY"


def _memmap_dtype(dtype) -> np.dtype:
    try:
        dtype = np.dtype(dtype)
    except TypeError:
        raise DselError(f"memmap_dtype={dtype!r}: not a NumPy dtype; headerless token files are uint16 or uint32") from None
    if dtype not in MEMMAP_DTYPES:
        raise DselError(f"headerless token files are uint16 or uint32, not {dtype}")
    return dtype


class MemmapTokens:
    """A memory-mapped headerless token file viewed as one token stream.

    Documents come from the dolma metadata `<stem>.csv.gz` beside the file when there is one (and
    `doc_ids` then holds their ids); else `eos_id` marks document ends (a document runs up to and
    including its EOS); with neither the whole file counts as one document.
    """

    def __init__(self, path: str | os.PathLike, dtype=np.uint16, eos_id: int | None = None, vocab_size: int | None = None):
        self.path = str(path)
        self.dtype = _memmap_dtype(dtype)
        self.eos_id = eos_id
        self.header_bytes = 0
        npy = npy_header(self.path)
        if npy is not None:
            self.dtype, self.header_bytes = npy
            self.stream: np.ndarray = np.memmap(self.path, self.dtype, "r", offset=self.header_bytes)
        else:
            with native_errors():
                self._native = _C.RawTokens(self.path, self.dtype.itemsize)
            self.stream = self._native.tokens()
        self.metadata_path = dolma_metadata_path(self.path)
        self.doc_ids: list[str] | None = None
        self._metadata_starts = None
        if os.path.isfile(self.metadata_path):
            self._metadata_starts, self.doc_ids = read_dolma_metadata(self.metadata_path, len(self.stream))
        if vocab_size is not None:
            self.check_tokens(vocab_size)

    @property
    def num_tokens(self) -> int:
        return len(self.stream)

    def __len__(self) -> int:
        return len(self.stream)

    @cached_property
    def document_starts(self) -> np.ndarray:
        """Stream position where each document starts (int64, first is 0)."""
        if self._metadata_starts is not None:
            return self._metadata_starts
        if self.eos_id is None:
            return np.zeros(1, dtype=np.int64)
        with native_errors():
            ends = _C.token_positions(self.stream, int(self.eos_id)) + 1
        return np.concatenate([[0], ends[ends < self.num_tokens]]).astype(np.int64)

    @property
    def num_documents(self) -> int:
        return len(self.document_starts)

    def document_of_token(self, positions: np.ndarray) -> np.ndarray:
        """Document containing each stream position (int64)."""
        return np.searchsorted(self.document_starts, np.asarray(positions, dtype=np.int64), side="right").astype(np.int64) - 1

    def check_tokens(self, vocab_size: int) -> None:
        """Raise a DselError naming the file if a token id is outside [0, vocab_size)."""
        check_vocab(self.stream, vocab_size, self.path)

    def __getstate__(self):
        return {"path": self.path, "dtype": self.dtype.str, "eos_id": self.eos_id}

    def __setstate__(self, state):
        self.__init__(state["path"], state["dtype"], state["eos_id"])

    def __repr__(self) -> str:
        return f"MemmapTokens({self.path!r}, {self.num_tokens} tokens, {self.dtype})"


def dolma_metadata_path(path: str) -> str:
    """Where dolma writes a token file's document metadata: `<stem>.csv.gz` for `<stem>.npy` (or .bin)."""
    return re.sub(r"\.(npy|bin)$", "", str(path)) + ".csv.gz"


def read_dolma_metadata(path: str, num_tokens: int) -> tuple[np.ndarray, list[str]]:
    """(document starts, document ids) from a dolma `.csv.gz` (rows of start,end,id,...), checked to
    tile the token file's `num_tokens` tokens back to back."""
    import pyarrow as pa
    import pyarrow.csv as pacsv

    try:
        table = pacsv.read_csv(path, read_options=pacsv.ReadOptions(autogenerate_column_names=True),
                               convert_options=pacsv.ConvertOptions(
                                   column_types={"f0": pa.int64(), "f1": pa.int64(), "f2": pa.string()}))
    except (pa.ArrowException, OSError, EOFError) as e:
        raise file_error(path, f"not a dolma metadata file of start,end,id rows ({str(e).splitlines()[0]})") from None
    if table.num_columns < 3:
        raise file_error(path, f"rows have {table.num_columns} columns; dolma metadata rows are start,end,id,...")
    start, end = (table.column(k).to_numpy(zero_copy_only=False).astype(np.int64) for k in ("f0", "f1"))
    expected_start = np.concatenate([[0], end[:-1]])
    bad = np.flatnonzero((start != expected_start) | (end <= start))
    if len(bad):
        row = int(bad[0])
        raise file_error(path, f"row {row + 1} spans tokens [{start[row]}, {end[row]}) but should start at "
                               f"{expected_start[row]} and be non-empty; it does not describe its token file")
    if end[-1] != num_tokens:
        raise file_error(path, f"its documents end at token {end[-1]} but the token file holds {num_tokens} tokens; "
                               "it does not describe its token file")
    ids = table.column("f2").to_pylist()
    return start, [str(i) for i in ids]


def npy_header(path: str) -> tuple[np.dtype, int] | None:
    """(dtype, header bytes) of a `.npy` file holding a 1-D uint16/uint32 token array; None for a
    headerless file (or none at all: the native reader names it); a DselError for any other .npy."""
    if not os.path.isfile(path):
        return None
    with open(path, "rb") as f:
        if f.read(len(NPY_MAGIC)) != NPY_MAGIC:
            return None
        f.seek(0)
        try:
            version = np.lib.format.read_magic(f)
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, fortran, dtype = read(f)
        except ValueError as e:
            raise DselError(f"{path}: damaged .npy header ({e})") from None
        offset = f.tell()
    if len(shape) != 1 or fortran or dtype.newbyteorder("=") not in MEMMAP_DTYPES or dtype.byteorder == ">":
        raise DselError(f"{path}: a .npy of {dtype} {shape}{' (Fortran order)' if fortran else ''}; token files are "
                        "1-D little-endian uint16 or uint32")
    if os.path.getsize(path) - offset != shape[0] * dtype.itemsize:
        raise DselError(f"{path}: the .npy header promises {shape[0]} tokens but the file holds "
                        f"{(os.path.getsize(path) - offset) // dtype.itemsize}")
    return np.dtype(dtype.newbyteorder("=")), offset


def write_memmap_tokens(path: str | os.PathLike, documents: Iterable, dtype=np.uint16) -> int:
    """Write documents back to back as a headerless token file (atomically); returns the token count."""
    dtype = _memmap_dtype(dtype)
    total = 0
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        for doc in documents:
            arr = np.asarray(doc)
            if arr.size and (arr.min() < 0 or arr.max() > np.iinfo(dtype).max):
                raise DselError(f"{path}: token ids do not fit {dtype}")
            f.write(arr.astype(dtype).tobytes())
            total += arr.size
    return total
