"""The selection written out: the selected windows as one Megatron dataset `data/selected` (or only
its index over the corpus' tokens), the per-document sidecars beside it, and `kept.parquet`.

format=megatron copies the kept windows once into `data/selected.bin/.idx`. format=index writes
only `data/selected.idx`, whose byte pointers address the windows inside the corpus' token file,
and `data/selected.bin` as a symlink to that file: every reader of Megatron datasets (dsel train,
megatron-core) trains on the same samples as from the copy, without a second copy of the tokens.
"""
from __future__ import annotations

import os
import struct
from pathlib import Path
from typing import Iterator

import numpy as np

from dsel.data.indexed import DTYPE_CODES, IndexedDataset, dtype_code
from dsel.data.meta import meta_path, read_meta, write_derived_meta
from dsel.data.windows import Windows, corpus_prefix, document_ids, write_windows
from dsel.errors import DselError
from dsel.io import atomic_path

MMIDIDX_MAGIC = b"MMIDIDX\x00\x00"
KEPT_BLOCK = 1 << 16  # kept rows written to kept.parquet at a time


def materialise(windows: Windows, indices: np.ndarray, out_dir: str | Path, fmt: str = "megatron") -> IndexedDataset:
    """Write windows `indices` (in order) as `out_dir/selected` (copied, or as an index over the
    corpus), with the corpus tokenizer's meta and the window's source document ids beside it."""
    prefix = Path(out_dir) / "selected"
    if fmt == "index":
        write_index_only(windows, indices, prefix)
        selected = IndexedDataset(prefix)
    else:
        selected = write_windows(windows, indices, prefix)
    corpus = corpus_prefix(windows.source)
    # models trained on it record the tokenizer; `window` makes dsel train draw one sample per selected window
    write_derived_meta(corpus, selected, selected_from=corpus, format=fmt, window=windows.window)
    write_selected_sidecars(windows, indices, prefix)
    return selected


def token_file(windows: Windows) -> tuple[str, int]:
    """(the file holding the corpus' tokens, byte offset of its token stream)."""
    source = windows.source
    if isinstance(source, IndexedDataset):
        return source.bin_path, int(source.pointers[0]) if len(source) else 0
    if len(windows.streams) > 1:
        raise DselError(f"format=index: {source.path} is {len(windows.streams)} token files, which one Megatron index "
                        "cannot address; use format=megatron")
    return source.path, int(getattr(source, "header_bytes", 0))


def write_index_only(windows: Windows, indices: np.ndarray, prefix: Path) -> None:
    """`prefix.idx` (megatron-core's MMIDIDX layout) whose sequences are the kept windows inside the
    corpus' token file, and `prefix.bin` linked to that file."""
    if windows.dtype not in map(np.dtype, DTYPE_CODES.values()):
        raise DselError(f"format=index: the corpus holds {windows.dtype} tokens, which a Megatron index cannot "
                        "describe; use format=megatron")
    path, base = token_file(windows)
    indices = np.asarray(indices, dtype=np.int64)
    n = len(indices)
    sizes = np.full(n, windows.window, dtype=np.int32)
    pointers = base + indices * (windows.window * windows.dtype.itemsize)
    header = MMIDIDX_MAGIC + struct.pack("<Q", 1) + struct.pack("<B", dtype_code(windows.dtype)) + struct.pack("<Q", n) \
        + struct.pack("<Q", n + 1)
    link = Path(f"{prefix}.bin")
    link.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(link) as tmp:
        os.symlink(os.path.abspath(path), tmp)
    with atomic_path(f"{prefix}.idx") as tmp, open(tmp, "wb") as f:
        f.write(header)
        f.write(sizes.tobytes())
        f.write(pointers.astype(np.int64).tobytes())
        f.write(np.arange(n + 1, dtype=np.int64).tobytes())


def source_documents(windows: Windows) -> tuple[list[str] | None, list[str] | None]:
    """(document ids, domains) of the corpus from its sidecars (None where it has none)."""
    from dsel.data.docids import domains_path, read_document_strings

    prefix = corpus_prefix(windows.source)
    count = windows.source.num_documents
    ids = document_ids(windows.source)
    domains = read_document_strings(domains_path(prefix), count) if Path(domains_path(prefix)).is_file() else None
    return ids, domains


def write_selected_sidecars(windows: Windows, indices: np.ndarray, prefix: Path) -> None:
    """`selected.docids.jsonl` (the source document id of each kept window; the document number when
    the corpus records no ids) and `selected.domains.jsonl` when the corpus has domains."""
    from dsel.data.docids import domains_path, write_doc_ids, write_document_strings

    ids, domains = source_documents(windows)
    docs = windows.doc_of_window[np.asarray(indices, dtype=np.int64)]
    write_doc_ids(prefix, (ids[d] if ids is not None else str(d) for d in docs.tolist()))
    if domains is not None:
        write_document_strings(domains_path(prefix), (domains[d] for d in docs.tolist()))


def kept_scores(source, indices: np.ndarray, chunk_rows: int) -> dict[str, np.ndarray]:
    """Every score column of the kept windows, in window order (one streaming pass over the table)."""
    indices = np.asarray(indices, dtype=np.int64)
    found = {"window": [], **{c: [] for c in source.columns}}
    for chunk in source.chunks(source.columns, chunk_rows):
        hit = np.isin(chunk["window"], indices)
        for name in found:
            found[name].append(chunk[name][hit])
    columns = {name: np.concatenate(parts) if parts else np.zeros(0) for name, parts in found.items()}
    order = np.argsort(columns["window"], kind="stable")
    return {name: values[order] for name, values in columns.items()}


def write_kept(path: Path, source, indices: np.ndarray, windows: Windows | None, chunk_rows: int, text: bool) -> None:
    """`kept.parquet`: per kept window its id, document, source document id, domain, tokens, scores
    and (with `text` and the corpus tokenizer's file at hand) its text."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    scores = kept_scores(source, indices, chunk_rows)
    ids, domains = source_documents(windows) if windows is not None else (None, None)
    decode = corpus_decoder(windows) if text and windows is not None else None
    with atomic_path(path) as tmp:
        writer = None
        for block in _blocks(len(scores["window"])):
            table = pa.table(_kept_columns(scores, block, windows, ids, domains, decode))
            writer = writer or pq.ParquetWriter(tmp, table.schema)
            writer.write_table(table)
        if writer is None:
            writer = pq.ParquetWriter(tmp, pa.schema([("window", pa.int64())]))
        writer.close()


def _blocks(n: int) -> Iterator[slice]:
    yield from (slice(start, min(start + KEPT_BLOCK, n)) for start in range(0, n, KEPT_BLOCK))


def _kept_columns(scores: dict, block: slice, windows: Windows | None, ids, domains, decode) -> dict:
    window = scores["window"][block]
    columns = {"window": window}
    if windows is not None:
        doc = windows.doc_of_window[window]
        columns["doc"] = doc
        if ids is not None:
            columns["doc_id"] = [ids[d] for d in doc.tolist()]
        if domains is not None:
            columns["domain"] = [domains[d] for d in doc.tolist()]
        columns["tokens"] = np.full(len(window), windows.window, dtype=np.int64)
    columns.update({name: scores[name][block] for name in scores if name != "window"})
    if decode is not None:
        columns["text"] = [decode(windows.tokens(int(w))) for w in window]
    return columns


def corpus_decoder(windows: Windows):
    """`decode(tokens) -> text` with the tokenizer the corpus' meta names, or None if it is not at hand."""
    prefix = corpus_prefix(windows.source)
    if not Path(meta_path(prefix)).is_file():
        return None
    model = read_meta(prefix).get("tokenizer")
    if not model or not Path(model).is_file():
        return None
    from dsel.data.tokenizer import load_tokenizer

    return load_tokenizer(model).decode
