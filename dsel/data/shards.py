"""Sharded, resumable tokenization: the corpus split into shards, each encoded alone, then merged.

A shard is a list of pieces (whole small files grouped up to `shard_bytes`, or one byte range /
row-group range of a large file). Shard k writes `<out>.shards/shard-k.{bin,idx,docs.jsonl}` under
temporary names and then its completion marker `shard-k.done.json` (the fingerprint of its pieces,
tokenizer and read settings, and the record count of each piece). A rerun skips every shard whose
marker matches, so a killed job resumes without redoing finished shards; shards are spread over
worker processes and over torchrun ranks (shard k goes to rank k % WORLD_SIZE). The merge
concatenates the shards in plan order, so the output does not depend on how the work was split,
and numbers each record within its file (records of a split file continue across its pieces).
"""
from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import os
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from dsel.data.readers import Counter, Document, InputFile, Piece, ReadSettings, pieces_of, read_piece
from dsel.io import atomic_path, progress, read_json, write_json

log = logging.getLogger(__name__)

SHARD = re.compile(r"^\.?shard-(\d{5})\.")


@dataclass(frozen=True)
class Shard:
    index: int
    pieces: tuple[Piece, ...]

    @property
    def bytes(self) -> int:
        return sum(piece_bytes(p) for p in self.pieces)


def piece_bytes(piece: Piece) -> int:
    """Input bytes a piece stands for (progress weight): its byte range, else the share of its file."""
    if piece.end is None:
        return piece.file.size
    if piece.file.kind == "parquet":
        return piece.file.size  # row-group pieces weigh alike; only the total matters for the ETA
    return piece.end - piece.start


def plan_shards(files: list[InputFile], shard_bytes: int, settings: ReadSettings) -> list[Shard]:
    """Pieces of every file in corpus order, consecutive small pieces grouped up to `shard_bytes`."""
    shards, current, size = [], [], 0
    for file in files:
        for piece in pieces_of(file, shard_bytes, settings):
            if current and size + piece_bytes(piece) > shard_bytes:
                shards.append(Shard(len(shards), tuple(current)))
                current, size = [], 0
            current.append(piece)
            size += piece_bytes(piece)
    if current:
        shards.append(Shard(len(shards), tuple(current)))
    return shards


def shards_dir(out: str | os.PathLike) -> Path:
    return Path(f"{out}.shards")


def shard_prefix(directory: Path, k: int) -> Path:
    return directory / f"shard-{k:05d}"


def marker_path(directory: Path, k: int) -> Path:
    return directory / f"shard-{k:05d}.done.json"


def docs_path(directory: Path, k: int) -> Path:
    return directory / f"shard-{k:05d}.docs.jsonl"


def fingerprint(shard: Shard, tokenizer_sha256: str, settings: ReadSettings) -> str:
    """What a shard's output depends on: its pieces (file, size, range), the tokenizer, the read settings."""
    pieces = [{"url": p.file.url, "size": p.file.size, "start": p.start, "end": p.end} for p in shard.pieces]
    blob = json.dumps({"pieces": pieces, "tokenizer": tokenizer_sha256, "settings": asdict(settings)}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def shard_done(directory: Path, k: int, expected: str) -> bool:
    """Whether shard k's marker exists and matches (a stale marker means the shard is redone)."""
    marker = marker_path(directory, k)
    if not marker.is_file():
        return False
    try:
        same = read_json(marker).get("fingerprint") == expected
    except Exception:  # a damaged marker: redo the shard
        return False
    prefix = shard_prefix(directory, k)
    return same and Path(f"{prefix}.bin").is_file() and Path(f"{prefix}.idx").is_file() and docs_path(directory, k).is_file()


def remove_stale(directory: Path, keep: Callable[[int], bool]) -> None:
    """Delete temp files of a killed run and files of shards past the plan, for shards `keep` rejects."""
    for path in directory.iterdir() if directory.is_dir() else ():
        match = SHARD.match(path.name)
        if match and not keep(int(match.group(1))):
            path.unlink(missing_ok=True)


# ---- encoding one shard (in a worker process or inline) ----

_tokenizers: dict = {}


def _tokenizer(path: str):
    from dsel.data.tokenizer import load_tokenizer

    if path not in _tokenizers:
        _tokenizers[path] = load_tokenizer(path)
    return _tokenizers[path]


@dataclass(frozen=True)
class Job:
    shard: Shard
    fingerprint: str
    directory: Path
    tokenizer: str
    dtype: str
    settings: ReadSettings
    chunk_docs: int


def _chunks(docs: Iterator[Document], size: int) -> Iterator[list[Document]]:
    chunk = []
    for doc in docs:
        chunk.append(doc)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def encode_shard(job: Job, report: Callable[[int], None]) -> dict:
    """Encode the shard's non-empty documents (each followed by EOD), write its dataset, document
    records and last its marker; `report(bytes)` advances the progress bar."""
    from dsel.data.indexed import IndexedDatasetWriter

    tokenizer = _tokenizer(job.tokenizer)
    k, directory = job.shard.index, job.directory
    records, documents, reported = [], 0, 0
    with IndexedDatasetWriter(shard_prefix(directory, k), np.dtype(job.dtype)) as writer, \
            atomic_path(docs_path(directory, k)) as tmp, open(tmp, "w", encoding="utf-8") as docs_file:
        for number, piece in enumerate(job.shard.pieces):
            counter, count, weight = Counter(), 0, piece_bytes(piece)
            for chunk in _chunks(read_piece(piece, job.settings, counter), job.chunk_docs):
                count = chunk[-1].record + 1
                kept = [d for d in chunk if d.text.strip()]
                for doc, tokens in zip(kept, tokenizer.encode([d.text for d in kept])):
                    writer.add_document(np.asarray(tokens + [tokenizer.eod_id], dtype=np.int64))
                    docs_file.write(json.dumps(_doc_record(number, doc), ensure_ascii=False, default=str) + "\n")
                documents += len(kept)
                done = sum(piece_bytes(p) for p in job.shard.pieces[:number]) + int(weight * counter.fraction)
                report(done - reported)
                reported = done
            records.append(count)
        tokens = writer.num_tokens
    report(job.shard.bytes - reported)
    marker = {"fingerprint": job.fingerprint, "records": records, "documents": documents, "tokens": tokens}
    write_json(marker_path(directory, k), marker)
    return marker


def _doc_record(piece_number: int, doc: Document) -> dict:
    record = {"p": piece_number, "r": doc.record}
    if doc.id is not None:
        record["id"] = doc.id
    if doc.domain is not None:
        record["domain"] = doc.domain
    if doc.fields:
        record["fields"] = doc.fields
    return record


_shared_progress = None


def _init_worker(counter) -> None:
    global _shared_progress
    _shared_progress = counter


def _report_shared(delta: int) -> None:
    with _shared_progress.get_lock():
        _shared_progress.value += delta


def _encode_in_worker(job: Job) -> dict:
    return encode_shard(job, _report_shared)


def run_jobs(jobs: list[Job], workers: int, total: int, initial: int) -> None:
    """Encode `jobs` with `workers` processes (inline for 1), one bar over all input bytes with an ETA."""
    bar = progress(total=total, initial=initial, desc="tokenize", unit="B", unit_scale=True, unit_divisor=1024)
    try:
        if workers <= 1 or len(jobs) <= 1:
            for job in jobs:
                encode_shard(job, bar.update)
            return
        method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
        context = multiprocessing.get_context(method)
        counter = context.Value("q", 0)
        with context.Pool(min(workers, len(jobs)), initializer=_init_worker, initargs=(counter,)) as pool:
            pending = [pool.apply_async(_encode_in_worker, (job,)) for job in jobs]
            while pending:
                time.sleep(0.2)
                bar.update(counter.value - (bar.n - initial))
                for result in [r for r in pending if r.ready()]:
                    result.get()  # re-raises a worker's error (a DselError naming the file)
                    pending.remove(result)
            bar.update(counter.value - (bar.n - initial))
    finally:
        bar.close()


# ---- merging ----

def merged_records(directory: Path, shards: list[Shard], markers: list[dict]) -> Iterator[tuple[InputFile, int, dict]]:
    """(file, record number within the file, record) of every document, in plan order."""
    seen: dict[str, int] = {}
    for shard, marker in zip(shards, markers):
        offsets = []
        for piece, count in zip(shard.pieces, marker["records"]):
            offsets.append(seen.get(piece.file.url, 0))
            seen[piece.file.url] = offsets[-1] + count
        with open(docs_path(directory, shard.index), encoding="utf-8") as f:
            for line in f:
                record = json.loads(line)
                yield shard.pieces[record["p"]].file, offsets[record["p"]] + record["r"], record


def merge_shards(directory: Path, shards: list[Shard], out: str, settings: ReadSettings) -> dict:
    """Concatenate the shards into `out` (.bin/.idx) and write the per-document sidecars."""
    from dsel.data.docids import (domains_path, fields_path, write_doc_ids, write_document_objects,
                                  write_document_strings)
    from dsel.data.indexed import merge_datasets

    markers = [read_json(marker_path(directory, s.index)) for s in shards]
    merge_datasets([shard_prefix(directory, s.index) for s in shards], out)
    count = write_doc_ids(out, (r.get("id") or f"{file.rel}:{number}" for file, number, r in merged_records(directory, shards, markers)))
    if settings.domain_field:
        write_document_strings(domains_path(out), (r["domain"] for _, _, r in merged_records(directory, shards, markers)))
    if settings.keep_fields:
        write_document_objects(fields_path(out), (r.get("fields", {}) for _, _, r in merged_records(directory, shards, markers)))
    return {"num_documents": count, "num_tokens": sum(m["tokens"] for m in markers)}
