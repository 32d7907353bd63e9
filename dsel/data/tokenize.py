"""`dsel tokenize`: corpus files -> tokens -> Megatron indexed dataset.

Reads jsonl (optionally gzipped), parquet and plain text; loads a tokenizer (sentencepiece or Hugging
Face, see dsel.data.tokenizer) or trains a sentencepiece model; encodes with several worker processes;
appends EOD (the tokenizer's EOS id) to every document; writes `<output>.bin/.idx`, the document-id
sidecar `<output>.docids.jsonl` and `<output>.meta.json` (the tokenizer's identity: kind, path, sha256,
vocabulary size, EOD id; and the dtype).
"""
from __future__ import annotations

import glob
import gzip
import io
import itertools
import json
import logging
import multiprocessing
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Literal

import numpy as np

from dsel.config import option
from dsel.errors import DselError, file_error
from dsel.data.tokenizer import Tokenizer, load_tokenizer, train_tokenizer
from dsel.io import progress, require_file

log = logging.getLogger(__name__)

JSONL_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz")
PARQUET_SUFFIXES = (".parquet",)
TEXT_SUFFIXES = (".txt", ".txt.gz")
OWN_OUTPUT_SUFFIXES = (".docids.jsonl", ".meta.json")  # what `dsel tokenize` writes: never an input


@dataclass
class TokenizeConfig:
    input: str = option(help="corpus: a .jsonl[.gz]/.parquet/.txt file, a directory of them, or a glob")
    output: str = option(help="output prefix: writes <output>.bin/.idx/.docids.jsonl/.meta.json")
    tokenizer: str = option("", "tokenizer to load: a sentencepiece .model, a Hugging Face tokenizer.json or a "
                                "save_pretrained folder; empty: train a sentencepiece model, saved as <output>.model")
    vocab_size: int = option(8000, "vocabulary size when training the tokenizer (an upper bound on tiny corpora)")
    model_type: Literal["bpe", "unigram"] = option("bpe", "sentencepiece model type when training")
    train_docs: int = option(50000, "documents sampled from the start of the corpus to train the tokenizer")
    text_field: str = option("text", "jsonl/parquet field holding the document text")
    id_field: str = option("", "jsonl/parquet field holding the document id; empty: <file>:<record number>")
    text_unit: Literal["line", "file"] = option("line", "plain text: one document per non-empty line, or per file")
    workers: int = option(2, "encoding worker processes")
    chunk_docs: int = option(256, "documents per work item sent to a worker")


# ---- reading the corpus: (document id, text) pairs ----

def input_files(pattern: str) -> list[Path]:
    """The corpus files named by a file, a directory (searched recursively) or a glob."""
    path = Path(pattern)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and _kind(p) is not None)
    elif any(ch in pattern for ch in "*?["):
        files = sorted(Path(p) for p in glob.glob(pattern, recursive=True) if Path(p).is_file())
    else:
        files = [require_file(path, "input file")]
    if not files:
        raise DselError(f"{pattern}: no input files found")
    for f in files:
        if _kind(f) is None:
            raise file_error(f, "unknown input format (expected .jsonl, .jsonl.gz, .json, .parquet or .txt)")
    return files


def _kind(path: Path) -> str | None:
    name = path.name.lower()
    if name.endswith(OWN_OUTPUT_SUFFIXES):
        return None
    for kind, suffixes in (("jsonl", JSONL_SUFFIXES), ("parquet", PARQUET_SUFFIXES), ("text", TEXT_SUFFIXES)):
        if name.endswith(suffixes):
            return kind
    return None


def _open_text(path: Path) -> io.TextIOBase:
    if path.name.endswith(".gz"):
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8")
    return open(path, encoding="utf-8")


def read_jsonl(path: Path, text_field: str, id_field: str) -> Iterator[tuple[str, str]]:
    with _open_text(path) as f:
        for line_no, line in enumerate(f):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise file_error(path, f"line {line_no + 1} is not valid JSON ({e.msg})") from None
            if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
                raise file_error(path, f"line {line_no + 1} has no string field '{text_field}'")
            yield _doc_id(record, id_field, path, line_no), record[text_field]


def read_parquet(path: Path, text_field: str, id_field: str) -> Iterator[tuple[str, str]]:
    import pyarrow.parquet as pq

    try:
        table = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several types for a damaged file
        raise file_error(path, f"not a readable parquet file ({e})") from None
    columns = [text_field] + ([id_field] if id_field else [])
    missing = [c for c in columns if c not in table.schema_arrow.names]
    if missing:
        raise file_error(path, f"no column(s) {', '.join(missing)} (has {', '.join(table.schema_arrow.names)})")
    row = 0
    for batch in table.iter_batches(columns=columns, batch_size=4096):
        data = batch.to_pydict()
        for k, text in enumerate(data[text_field]):
            record = {id_field: data[id_field][k]} if id_field else {}
            yield _doc_id(record, id_field, path, row), text or ""
            row += 1


def read_text(path: Path, unit: str) -> Iterator[tuple[str, str]]:
    with _open_text(path) as f:
        if unit == "file":
            yield f"{path.name}:0", f.read()
            return
        for line_no, line in enumerate(f):
            if line.strip():
                yield f"{path.name}:{line_no}", line.rstrip("\n")


def _doc_id(record: dict, id_field: str, path: Path, index: int) -> str:
    if not id_field:
        return f"{path.name}:{index}"
    if record.get(id_field) is None:
        raise file_error(path, f"record {index} has no id field '{id_field}'")
    return str(record[id_field])


def read_documents(files: list[Path], cfg: TokenizeConfig) -> Iterator[tuple[str, str]]:
    """(id, text) of every non-empty document of every file, in order."""
    for path in files:
        kind = _kind(path)
        if kind == "jsonl":
            docs = read_jsonl(path, cfg.text_field, cfg.id_field)
        elif kind == "parquet":
            docs = read_parquet(path, cfg.text_field, cfg.id_field)
        else:
            docs = read_text(path, cfg.text_unit)
        yield from ((doc_id, text) for doc_id, text in docs if text.strip())


# ---- training the tokenizer ----

def train_corpus_tokenizer(files: list[Path], cfg: TokenizeConfig, model_path: str | os.PathLike) -> Tokenizer:
    """Train a sentencepiece model on the first `train_docs` documents of the corpus."""
    texts = (text for _, text in itertools.islice(read_documents(files, cfg), cfg.train_docs))
    return train_tokenizer(texts, model_path, cfg.vocab_size, cfg.model_type, cfg.workers, cfg.input)


# ---- encoding with worker processes ----

_worker_tokenizer: Tokenizer | None = None


def _init_worker(model_path: str) -> None:
    global _worker_tokenizer
    _worker_tokenizer = load_tokenizer(model_path)


def _encode_chunk(chunk: tuple[list[str], list[str]]) -> tuple[list[str], list[np.ndarray]]:
    """Worker: encode a chunk of documents, each followed by EOD."""
    ids, texts = chunk
    eod = _worker_tokenizer.eod_id
    return ids, [np.array(tokens + [eod], dtype=np.int64) for tokens in _worker_tokenizer.encode(texts)]


def _chunks(docs: Iterator[tuple[str, str]], size: int) -> Iterator[tuple[list[str], list[str]]]:
    ids, texts = [], []
    for doc_id, text in docs:
        ids.append(doc_id)
        texts.append(text)
        if len(ids) == size:
            yield ids, texts
            ids, texts = [], []
    if ids:
        yield ids, texts


def encoded_documents(files: list[Path], cfg: TokenizeConfig, model_path: str) -> Iterator[tuple[str, np.ndarray]]:
    """(id, tokens + EOD) of every document, in corpus order, encoded by `cfg.workers` processes."""
    chunks = _chunks(read_documents(files, cfg), cfg.chunk_docs)
    if cfg.workers <= 1:
        _init_worker(model_path)
        results = map(_encode_chunk, chunks)
        yield from ((i, t) for ids, tokens in results for i, t in zip(ids, tokens))
        return
    context = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
    with context.Pool(cfg.workers, initializer=_init_worker, initargs=(model_path,)) as pool:
        for ids, tokens in pool.imap(_encode_chunk, chunks):
            yield from zip(ids, tokens)


def tokenize_corpus(cfg: TokenizeConfig) -> dict:
    """Run the whole command; returns the metadata written to `<output>.meta.json`."""
    from dsel.data.docids import write_doc_ids
    from dsel.data.indexed import IndexedDataset, IndexedDatasetWriter, best_dtype
    from dsel.data.meta import write_meta

    files = input_files(cfg.input)
    if next(read_documents(files, cfg), None) is None:
        raise DselError(f"{cfg.input}: empty corpus (no non-empty documents)")
    if cfg.tokenizer:
        tokenizer = load_tokenizer(cfg.tokenizer)
    else:
        log.info("training a %s tokenizer (vocab_size %d) on %s", cfg.model_type, cfg.vocab_size, cfg.input)
        tokenizer = train_corpus_tokenizer(files, cfg, f"{cfg.output}.model")
    dtype = np.dtype(best_dtype(tokenizer.vocab_size))
    doc_ids = []
    with IndexedDatasetWriter(cfg.output, dtype) as writer:
        for doc_id, tokens in progress(encoded_documents(files, cfg, tokenizer.path), desc="tokenize", unit="doc"):
            writer.add_document(tokens)
            doc_ids.append(doc_id)
    dataset = IndexedDataset(cfg.output, vocab_size=tokenizer.vocab_size)  # re-read, check every token id
    write_doc_ids(cfg.output, doc_ids)
    meta = {
        **tokenizer.identity(),
        "dtype": dtype.name,
        "num_documents": len(doc_ids),
        "num_tokens": dataset.num_tokens,
        "inputs": [str(f) for f in files],
        "text_field": cfg.text_field,
        "id_field": cfg.id_field,
    }
    write_meta(cfg.output, meta)
    log.info("wrote %s: %d documents, %d tokens", cfg.output, len(doc_ids), meta["num_tokens"])
    return meta
