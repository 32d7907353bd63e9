"""Score tables read in bounded-memory chunks: the score stage's parquet table or a plain .npy.

A chunk is a dict of numpy arrays: `window` (int64 window ids), `tokens` (int64) and the score
columns asked for (float64), plus `domain` as a pyarrow array when asked for and present.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np

from dsel.errors import DselError, file_error
from dsel.io import read_json

ID_COLUMNS = ("window", "doc", "tokens")
NPY_COLUMN = "score"


class ParquetScores:
    """The merged score table (`scores.parquet`: window, doc, doc_id, tokens, domain, float scores).

    `path` is one parquet file or a directory of parquet parts read in name order.
    """

    def __init__(self, path: Path):
        import pyarrow as pa
        import pyarrow.parquet as pq

        self.path = path
        self.files = sorted(path.glob("*.parquet")) if path.is_dir() else [path]
        if not self.files:
            raise file_error(path, "no .parquet files in the score table directory")
        try:
            self._files = [pq.ParquetFile(f, pre_buffer=False) for f in self.files]
        except (pa.ArrowInvalid, OSError) as e:
            raise file_error(path, f"not a readable parquet table ({str(e).splitlines()[0]})") from None
        schema = self._files[0].schema_arrow
        for required in ("window", "tokens"):
            if required not in schema.names:
                raise file_error(path, f"score table has no '{required}' column (columns: {', '.join(schema.names)})")
        self.columns = [f.name for f in schema if pa.types.is_floating(f.type) and f.name not in ID_COLUMNS]
        self.has_domain = "domain" in schema.names
        self.num_rows = sum(f.metadata.num_rows for f in self._files)

    def chunks(self, columns: list[str], chunk_rows: int, domain: bool = False) -> Iterator[dict]:
        """Stream `window`, `tokens` and `columns` (and `domain`) in chunks of at most chunk_rows rows."""
        wanted = ["window", "tokens", *columns] + (["domain"] if domain and self.has_domain else [])
        for file in self._files:  # page by page, without buffering whole row groups ahead
            for batch in file.iter_batches(batch_size=chunk_rows, columns=wanted):
                if batch.num_rows == 0:
                    continue
                chunk = {name: _numpy(batch.column(name), self.path, name) for name in wanted if name != "domain"}
                chunk["window"] = chunk["window"].astype(np.int64, copy=False)
                chunk["tokens"] = chunk["tokens"].astype(np.int64, copy=False)
                if "domain" in wanted:
                    chunk["domain"] = batch.column("domain")
                yield chunk


class NpyScores:
    """A .npy of one score per window (window i = row i), all windows `window_tokens` tokens long."""

    has_domain = False

    def __init__(self, path: Path, window_tokens: int):
        self.path = path
        try:
            self._scores = np.load(path, mmap_mode="r")
        except ValueError as e:
            raise file_error(path, f"not a readable .npy file ({e})") from None
        if self._scores.ndim != 1 or not np.issubdtype(self._scores.dtype, np.number):
            raise file_error(path, f"expected a 1-D numeric array of scores, got {self._scores.dtype} {self._scores.shape}")
        self.columns = [NPY_COLUMN]
        self.num_rows = len(self._scores)
        self.window_tokens = int(window_tokens)

    def chunks(self, columns: list[str], chunk_rows: int, domain: bool = False) -> Iterator[dict]:
        """Stream row slices of the array as chunks (tokens = the window length)."""
        for start in range(0, self.num_rows, chunk_rows):
            stop = min(start + chunk_rows, self.num_rows)
            chunk = {"window": np.arange(start, stop, dtype=np.int64),
                     "tokens": np.full(stop - start, self.window_tokens, dtype=np.int64)}
            for name in columns:
                chunk[name] = np.asarray(self._scores[start:stop], dtype=np.float64)
            yield chunk


def _numpy(column, path: Path, name: str) -> np.ndarray:
    """A pyarrow column as numpy; nulls are an error naming the file and column."""
    if column.null_count:
        raise file_error(path, f"column '{name}' has {column.null_count} missing values")
    values = column.to_numpy(zero_copy_only=False)
    return values.astype(np.float64, copy=False) if np.issubdtype(values.dtype, np.floating) else values


def table_path(scores: str | Path) -> Path:
    """The parquet table of a score directory, or the file given."""
    path = Path(scores)
    if path.is_dir():
        path = path / "scores.parquet"
    if not path.exists():
        raise file_error(path, "score table not found")
    return path


def table_meta(scores: str | Path) -> dict:
    """`scores.json` next to the table ({} when absent), the score stage's record of the run."""
    path = Path(scores)
    meta = (path if path.is_dir() else path.parent) / "scores.json"
    return read_json(meta) if meta.is_file() and path.suffix != ".npy" else {}


def open_scores(scores: str | Path, window_tokens: int = 0):
    """A ParquetScores or NpyScores for a score directory, .parquet file or .npy file."""
    if str(scores).endswith(".npy"):
        path = Path(scores)
        if not path.is_file():
            raise file_error(path, "score file not found")
        if window_tokens <= 0:
            raise file_error(path, "a .npy of scores records no window length; set window=")
        return NpyScores(path, window_tokens)
    return ParquetScores(table_path(scores))


def check_pool(source, num_windows: int) -> None:
    """The score table must have exactly one row per window of the corpus."""
    if source.num_rows != num_windows:
        raise file_error(source.path, f"{source.num_rows} scores but the corpus has {num_windows} windows")


def unknown_column(source, name: str) -> DselError:
    """The error for a score column the table lacks, listing the valid ones."""
    return file_error(source.path, f"unknown score column '{name}'; valid columns: {', '.join(source.columns) or '(none)'}")
