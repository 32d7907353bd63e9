"""A directory (or glob) of dolma / OLMo token files read as one corpus.

The files are taken in sorted order of their path (relative to the directory), so the corpus does
not depend on the file system's listing order. Windows follow OLMo's MemMapDataset: each file is
cut into its own non-overlapping windows and its ragged tail dropped, so no window crosses a file
boundary (dsel.data.windows.Windows does this for every source with several `streams`). Positions
(document starts, `document_of_token`) count tokens of the files laid end to end. Document ids are
those of each file's dolma `.csv.gz` metadata, else `<file relative to the directory>:<document>`.
"""
from __future__ import annotations

import glob
import hashlib
import logging
import os
from functools import cached_property
from pathlib import Path

import numpy as np

from dsel.data.memmap import MemmapTokens
from dsel.errors import DselError
from dsel.io import dataset_digest

log = logging.getLogger(__name__)

TOKEN_SUFFIXES = (".npy", ".bin")


def is_file_set(path: str) -> bool:
    """Whether `path` names several token files: a directory or a glob pattern."""
    return os.path.isdir(path) or glob.has_magic(path)


def glob_root(pattern: str) -> str:
    """The directory part of a glob before its first wildcard: what its files' ids are relative to."""
    fixed = pattern[: min(pattern.find(c) % (len(pattern) + 1) for c in "*?[")]
    return os.path.dirname(fixed) or "."


def token_files(path: str) -> tuple[str, list[str]]:
    """(root the ids are relative to, the token files in sorted order) of a directory or a glob; a
    `.bin` with an `.idx` beside it is a Megatron dataset, not a token file."""
    if os.path.isdir(path):
        root = path
        found = [str(p) for p in Path(path).rglob("*") if p.suffix in TOKEN_SUFFIXES and p.is_file()
                 and not any(part.startswith(".") for part in p.relative_to(path).parts)]  # no temporary files
    else:
        root = glob_root(path)
        found = [p for p in glob.glob(path, recursive=True) if os.path.isfile(p)]
    files = sorted((p for p in found if p.endswith(TOKEN_SUFFIXES) and not os.path.isfile(p[:-4] + ".idx")),
                   key=lambda p: Path(os.path.relpath(p, root)).as_posix())
    if not files:
        raise DselError(f"{path}: no token files (.npy, or .bin without an .idx) found")
    return root, files


class DolmaTokens:
    """Several headerless (or .npy) token files as one corpus of `streams`, one per file."""

    def __init__(self, path: str | os.PathLike, dtype=np.uint16, eos_id: int | None = None):
        self.path = str(path)
        self.eos_id = eos_id
        self.root, paths = token_files(self.path)
        files = [MemmapTokens(p, dtype, eos_id) for p in paths]
        for f in files:
            if f.dtype != files[0].dtype:
                raise DselError(f"{f.path}: holds {f.dtype} tokens but {files[0].path} holds {files[0].dtype}; "
                                "the files of one corpus share one dtype")
        for f in files:
            if f.num_tokens == 0:
                log.warning("%s: empty token file, skipped", f.path)
        self.files = [f for f in files if f.num_tokens]
        if not self.files:
            raise DselError(f"{self.path}: every token file is empty")
        self.dtype = self.files[0].dtype
        self.file_starts = np.concatenate([[0], np.cumsum([f.num_tokens for f in self.files])]).astype(np.int64)

    @property
    def streams(self) -> list[np.ndarray]:
        return [f.stream for f in self.files]

    @property
    def num_tokens(self) -> int:
        return int(self.file_starts[-1])

    def __len__(self) -> int:
        return self.num_tokens

    @cached_property
    def document_starts(self) -> np.ndarray:
        """Position (in the files laid end to end) where each document starts; every file starts one."""
        return np.concatenate([f.document_starts + start for f, start in zip(self.files, self.file_starts)])

    @property
    def num_documents(self) -> int:
        return len(self.document_starts)

    def document_of_token(self, positions: np.ndarray) -> np.ndarray:
        """Document containing each position (int64)."""
        return np.searchsorted(self.document_starts, np.asarray(positions, dtype=np.int64), side="right").astype(np.int64) - 1

    @cached_property
    def doc_ids(self) -> list[str]:
        """Each document's id: from its file's dolma metadata, else `<relative file>:<document number>`."""
        ids = []
        for f in self.files:
            rel = Path(os.path.relpath(f.path, self.root)).as_posix()
            ids += f.doc_ids if f.doc_ids is not None else [f"{rel}:{k}" for k in range(f.num_documents)]
        return ids

    def check_tokens(self, vocab_size: int) -> None:
        """Raise a DselError naming the file of the first token id outside [0, vocab_size)."""
        for f in self.files:
            f.check_tokens(vocab_size)

    def digest(self) -> str:
        """Content digest of the file set: every file's relative name and digest."""
        blob = "\n".join(f"{os.path.relpath(f.path, self.root)}\0{dataset_digest(f.path)}" for f in self.files)
        return f"files:{len(self.files)}:{hashlib.sha256(blob.encode()).hexdigest()[:32]}"

    def __getstate__(self):
        return {"path": self.path, "dtype": self.dtype.str, "eos_id": self.eos_id}

    def __setstate__(self, state):
        self.__init__(state["path"], state["dtype"], state["eos_id"])

    def __repr__(self) -> str:
        return f"DolmaTokens({self.path!r}, {len(self.files)} files, {self.num_tokens} tokens, {self.dtype})"
