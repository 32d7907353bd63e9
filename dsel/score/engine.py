"""Corpus-scale scoring: every window of a corpus through a scorer, in resumable shards, merged
into one score table.

Layout of `out_dir`:

    shards/job.json            what is scored: fingerprint, corpus, window, columns, shard size, meta
    shards/shard-000042.npz    window ids + one float32 array per score column, for shard 42
    shards/shard-000042.json   completion marker: fingerprint, window range, shard stats
    scores.parquet             window, doc, doc_id, tokens, domain, <score columns>, by window
    scores.json                meta, counts, per-column (and per-domain) statistics
    hist-<column>.png          histogram of each score column
    doc_scores.parquet         per document: token-weighted mean of every score column

Shard k holds windows [k*S, (k+1)*S) and belongs to rank k % world_size. A shard counts as done
once its marker exists; the marker is written after the shard file is renamed into place, so a
killed run loses only the shards in progress and a rerun skips the finished ones. The fingerprint
(columns, window, corpus, shard size, meta) is checked on every rerun and merge: shards of another
scoring configuration are refused, never mixed.
"""
from __future__ import annotations

import datetime
import hashlib
import json
import logging
import os
import time
import zipfile
from pathlib import Path

import numpy as np

from dsel.data.docids import domains_path, read_document_strings
from dsel.data.windows import Windows, corpus_digest, corpus_prefix, document_ids, source_name
from dsel.errors import DselError, file_error
from dsel.io import (atomic_path, check_free_space, describe_differences, output_lock, progress, read_json,
                     require_file, write_json)
from dsel.score.stats import column_stats, score_histogram, table_stats

log = logging.getLogger(__name__)

SHARDS = "shards"
RESERVED = ("window", "doc", "doc_id", "tokens", "domain", "windows")  # table columns no score may take
DEFAULT_SHARD_BATCHES = 64  # shard_size=None: this many batches per shard


# ----- the job: what is scored, and its fingerprint --------------------------------------------------
def corpus_info(source) -> dict:
    """Enough to reopen the corpus for a later merge, and to notice it changed."""
    from dsel.data.dolma import DolmaTokens

    kind = "indexed" if hasattr(source, "prefix") else "dolma" if isinstance(source, DolmaTokens) else "memmap"
    return {"kind": kind, "path": os.path.abspath(source_name(source)), "tokens": int(source.num_tokens),
            "dtype": np.dtype(source.dtype).str, "eos_id": getattr(source, "eos_id", None),
            "digest": corpus_digest(source)}


def plain_json(obj):
    """`obj` as plain JSON types (devices, paths and numpy scalars become strings)."""
    return json.loads(json.dumps(obj, default=str, sort_keys=True))


def job_spec(windows: Windows, columns: list[str], shard_size: int, meta: dict) -> dict:
    """The scoring configuration a shard belongs to, with its fingerprint."""
    meta = plain_json(meta)
    spec = {"columns": list(columns), "window": windows.window, "num_windows": len(windows),
            "corpus": corpus_info(windows.source), "shard_size": int(shard_size),
            "meta_sha256": hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()}
    fingerprint = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]
    return {**spec, "fingerprint": fingerprint, "meta": meta}


def job_path(out: Path) -> Path:
    return out / SHARDS / "job.json"


def read_job(out: Path) -> dict:
    """shards/job.json of a score directory (DselError when it was never scored)."""
    return read_json(require_file(job_path(out), "score job (run `dsel score` first)"))


def table_info(job: dict) -> dict:
    """What a score table records about its job (parquet metadata and scores.json)."""
    return {"fingerprint": job["fingerprint"], "corpus": job["corpus"]["path"], "window": job["window"],
            "corpus_digest": job["corpus"].get("digest")}


def shard_file(out: Path, k: int) -> Path:
    return out / SHARDS / f"shard-{k:06d}.npz"


def marker_file(out: Path, k: int) -> Path:
    return out / SHARDS / f"shard-{k:06d}.json"


def num_shards(job: dict) -> int:
    return -(-job["num_windows"] // job["shard_size"])


def shard_range(job: dict, k: int) -> tuple[int, int]:
    """Windows [start, stop) of shard k."""
    return k * job["shard_size"], min((k + 1) * job["shard_size"], job["num_windows"])


def count_windows(job: dict, shards: list[int]) -> int:
    """How many windows the given shards hold."""
    return sum(stop - start for start, stop in (shard_range(job, k) for k in shards))


def mismatch(old: dict, new: dict) -> str:
    """The settings in which two job specs differ (dotted keys, e.g. meta.digests.prior), for an error message."""
    keys = ("columns", "window", "num_windows", "corpus", "shard_size", "meta")
    return describe_differences({k: old.get(k) for k in keys}, {k: new.get(k) for k in keys})


def open_job(out: Path, windows: Windows, columns: list[str], shard_size: int | None, batch_size: int,
             meta: dict) -> dict:
    """The job spec of this run, written to shards/job.json; refuses a directory of another job.

    shard_size None resumes with the existing job's shard size, else uses DEFAULT_SHARD_BATCHES batches.
    """
    path = job_path(out)
    old = read_json(path) if path.is_file() else None
    if shard_size is None:
        shard_size = old["shard_size"] if old else DEFAULT_SHARD_BATCHES * batch_size
    if shard_size <= 0:
        raise DselError(f"shard_size must be positive, got {shard_size}")
    clashes = [name for name in columns if name in RESERVED]
    if clashes or len(set(columns)) != len(columns) or not columns:
        raise DselError(f"scorer columns {columns} must be distinct, non-empty and not {', '.join(RESERVED)}")
    job = job_spec(windows, columns, shard_size, meta)
    if old is not None and old.get("fingerprint") != job["fingerprint"]:
        raise file_error(path, f"shards of another scoring config ({mismatch(old, job)}); "
                               f"use another out directory or delete {out / SHARDS}")
    if old is None:
        write_json(path, job)
    return job


# ----- scoring ---------------------------------------------------------------------------------------
def resolve_rank(rank: int | None, world_size: int | None) -> tuple[int, int]:
    """(rank, world size): given values, else torch.distributed's when initialised, else (0, 1)."""
    if rank is None or world_size is None:
        import torch.distributed as dist

        running = dist.is_available() and dist.is_initialized()
        rank = rank if rank is not None else (dist.get_rank() if running else 0)
        world_size = world_size if world_size is not None else (dist.get_world_size() if running else 1)
    if not 0 <= rank < world_size:
        raise DselError(f"rank {rank} is outside a world of {world_size} processes")
    return rank, world_size


def join_torchrun(backend: str = "gloo") -> bool:
    """Create the process group torchrun's environment describes, unless there is none to join or
    one exists; returns whether it was created here. The engine only needs barriers, which gloo
    does on any device without assumptions about which GPU each rank uses."""
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not dist.is_available() or dist.is_initialized():
        return False
    # a rank that finishes its shards early waits at the barrier for the slowest one
    dist.init_process_group(backend, timeout=datetime.timedelta(hours=24))
    return True


def shard_done(out: Path, k: int, fingerprint: str) -> bool:
    """Whether shard k is finished (marker + file); a marker of another job is an error."""
    marker = marker_file(out, k)
    if not marker.is_file():
        return False
    if read_json(marker).get("fingerprint") != fingerprint:
        raise file_error(marker, "written by another scoring config; use another out directory or delete "
                                 f"{out / SHARDS}")
    return shard_file(out, k).is_file()


def remove_stale_temps(out: Path, shards: list[int]) -> None:
    """Delete temp files a killed run left for `shards` (only this rank's, which no one else writes)."""
    for k in shards:
        for stale in (out / SHARDS).glob(f".shard-{k:06d}.*.tmp-*"):
            log.info("removing %s left by an interrupted run", stale)
            stale.unlink(missing_ok=True)


def run_scorer(scorer, tokens: np.ndarray, ids: np.ndarray, columns: list[str], corpus: str) -> dict[str, np.ndarray]:
    """Score one batch and check what came back: every column, float32 [B], finite."""
    import torch

    vocab_size = getattr(scorer, "vocab_size", None)
    if vocab_size is not None and tokens.size and int(tokens.max()) >= vocab_size:
        raise DselError(f"{corpus}: token id {int(tokens.max())} in windows {ids[0]}..{ids[-1]} is past the "
                        f"scorer's vocabulary of {vocab_size}; the corpus uses another tokenizer")
    scores = scorer(torch.from_numpy(tokens))
    if set(scores) != set(columns):
        raise DselError(f"scorer returned columns {sorted(scores)} but declares {columns}")
    batch = {}
    for name in columns:
        values = torch.as_tensor(scores[name]).detach().float().cpu().numpy()
        if values.shape != (len(ids),):
            raise DselError(f"scorer column '{name}' has shape {values.shape}, expected ({len(ids)},)")
        bad = np.flatnonzero(~np.isfinite(values))
        if bad.size:
            raise DselError(f"{corpus}: scorer gave a non-finite '{name}' score ({values[bad[0]]}) to window "
                            f"{ids[bad[0]]}")
        batch[name] = values
    return batch


def score_shard(windows: Windows, scorer, out: Path, job: dict, k: int, batch_size: int, worker: str, bar) -> None:
    """Score shard k through a prefetching WindowStream and write it, then its marker, atomically."""
    from dsel.data.loader import WindowStream

    start, stop = shard_range(job, k)
    began = time.perf_counter()
    parts = {name: [] for name in job["columns"]}
    corpus = job["corpus"]["path"]
    for ids, tokens in WindowStream(windows, batch_size, start, stop):
        for name, values in run_scorer(scorer, tokens, ids, job["columns"], corpus).items():
            parts[name].append(values)
        bar.update(len(ids))
    columns = {name: np.concatenate(values) for name, values in parts.items()}
    with atomic_path(shard_file(out, k)) as tmp, open(tmp, "wb") as f:
        np.savez(f, window=np.arange(start, stop, dtype=np.int64), **columns)
    write_json(marker_file(out, k), {
        "fingerprint": job["fingerprint"], "shard": k, "start": start, "stop": stop, "windows": stop - start,
        "worker": worker, "seconds": round(time.perf_counter() - began, 3),
        "stats": {name: column_stats(values) for name, values in columns.items()},
    })


def score_windows(windows: Windows, scorer, out_dir, batch_size: int, shard_size: int | None = None, device=None,
                  meta: dict | None = None, rank: int | None = None, world_size: int | None = None) -> Path:
    """Score every window into `out_dir` (this rank's shards), then merge; returns out_dir/scores.parquet.

    `device` is where the scorer runs (recorded per shard). Without explicit ranks, they come from
    torch.distributed, joining torchrun's process group when launched by torchrun without one; all
    ranks then meet at a barrier and rank 0 merges. With explicit ranks and no process group (e.g.
    independent array jobs), rank 0 merges if every shard is finished, else `dsel score merge` does.
    """
    created = join_torchrun() if rank is None and world_size is None else False
    try:
        rank, world_size = resolve_rank(rank, world_size)
        if batch_size <= 0:
            raise DselError(f"batch_size must be positive, got {batch_size}")
        if hasattr(scorer, "check_window"):
            scorer.check_window(windows.window)
        out = Path(out_dir)
        with output_lock(out, f".rank{rank}"):
            return _score_rank(windows, scorer, out, batch_size, shard_size, device, meta, rank, world_size)
    finally:
        if created:
            import torch.distributed as dist

            dist.destroy_process_group()


def _score_rank(windows: Windows, scorer, out: Path, batch_size: int, shard_size: int | None, device, meta,
                rank: int, world_size: int) -> Path:
    """This rank's unfinished shards, then the merge (see score_windows)."""
    check_free_space(out, score_bytes(len(windows), len(scorer.columns)), "the scores")
    job = open_job(out, windows, list(scorer.columns), shard_size, batch_size, meta or {})
    owned = list(range(rank, num_shards(job), world_size))
    todo = [k for k in owned if not shard_done(out, k, job["fingerprint"])]
    remove_stale_temps(out, todo)
    total, remaining = count_windows(job, owned), count_windows(job, todo)
    log.info("rank %d/%d: %d of %d shards to score (%d windows of %d tokens)", rank, world_size, len(todo),
             len(owned), remaining, windows.window)
    worker = f"rank {rank}, {device or 'cpu'}"
    with progress(total=total, initial=total - remaining, unit="win", desc=f"score rank {rank}",
                  position=rank) as bar:
        for k in todo:
            score_shard(windows, scorer, out, job, k, batch_size, worker, bar)
    return finish(out, windows, rank)


def score_bytes(num_windows: int, num_columns: int) -> int:
    """About the disk scores take: float32 columns plus window, doc and token columns, in shards and the table."""
    return 2 * num_windows * (num_columns + 3) * 4


def finish(out: Path, windows: Windows, rank: int) -> Path:
    """Rank 0 merges: after a barrier in a process group, else only if every shard is finished."""
    import torch.distributed as dist

    table = out / "scores.parquet"
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        if rank == 0:
            merge_scores(out, windows)
        dist.barrier()
        return table
    job = read_job(out)
    pending = [k for k in range(num_shards(job)) if not shard_done(out, k, job["fingerprint"])]
    if rank == 0 and not pending:
        return merge_scores(out, windows)
    log.info("rank %d done; %d shards still to score (first: %d); merge with `dsel score merge out=%s` when all are "
             "done", rank, len(pending), pending[0] if pending else -1, out)
    return table


# ----- merge -----------------------------------------------------------------------------------------
def reopen_windows(job: dict) -> Windows:
    """The job's windows, reopened from the corpus recorded in job.json (checked unchanged)."""
    from dsel.data.dolma import DolmaTokens
    from dsel.data.indexed import IndexedDataset
    from dsel.data.memmap import MemmapTokens

    corpus = job["corpus"]
    if corpus["kind"] == "indexed":
        source = IndexedDataset(corpus["path"])
    else:
        kind = DolmaTokens if corpus["kind"] == "dolma" else MemmapTokens
        source = kind(corpus["path"], corpus["dtype"], corpus["eos_id"])
    if source.num_tokens != corpus["tokens"]:
        raise file_error(corpus["path"], f"has {source.num_tokens} tokens but was scored with {corpus['tokens']}; "
                                         "the corpus changed since scoring")
    if corpus.get("digest") not in (None, corpus_digest(source)):
        raise file_error(corpus["path"], "content differs from the corpus that was scored (digest); the corpus "
                                         "changed since scoring")
    return Windows(source, job["window"])


def load_shards(out: Path, job: dict) -> dict[str, np.ndarray]:
    """Every shard's columns in window order, checking each window is scored exactly once."""
    n = job["num_windows"]
    merged = {name: np.empty(n, dtype=np.float32) for name in job["columns"]}
    owner = np.full(n, -1, dtype=np.int64)
    markers = sorted((out / SHARDS).glob("shard-*.json"))
    for index, marker in enumerate(markers):
        if read_json(marker).get("fingerprint") != job["fingerprint"]:
            raise file_error(marker, "written by another scoring config than shards/job.json")
        path = marker.with_suffix(".npz")
        ids, columns = read_shard(path, job["columns"])
        if len(ids) and (ids.min() < 0 or ids.max() >= n):
            raise file_error(path, f"holds window ids outside [0, {n})")
        taken = owner[ids] >= 0
        if taken.any() or len(np.unique(ids)) != len(ids):
            first = int(ids[taken][0]) if taken.any() else int(ids[0])
            other = markers[owner[first]].with_suffix(".npz").name if taken.any() else "itself"
            raise file_error(path, f"window {first} is scored twice (also in {other}); remove the duplicated shard")
        owner[ids] = index
        for name in job["columns"]:
            merged[name][ids] = columns[name]
    missing = np.flatnonzero(owner < 0)
    if missing.size:
        k = int(missing[0]) // job["shard_size"]
        start, stop = shard_range(job, k)
        raise file_error(shard_file(out, k), f"missing or unfinished (windows [{start}, {stop}); "
                                             f"{missing.size} windows unscored in all); rerun `dsel score` to finish")
    return merged


def read_shard(path: Path, columns: list[str]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """(window ids, {column: float32 scores}) of one shard file, checked for the expected columns."""
    require_file(path, "shard file (its marker exists)")
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {name: data[name] for name in data.files}
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        raise file_error(path, f"not a readable shard ({e})") from None
    absent = [name for name in ["window", *columns] if name not in arrays]
    if absent:
        raise file_error(path, f"lacks column(s) {', '.join(absent)}")
    ids = arrays["window"].astype(np.int64)
    if any(arrays[name].shape != ids.shape for name in columns):
        raise file_error(path, "columns of different lengths")
    return ids, {name: arrays[name].astype(np.float32) for name in columns}


def document_labels(windows: Windows, meta: dict) -> tuple[list[str] | None, list[str] | None]:
    """(doc ids, domains) per document, from `<prefix>.docids.jsonl` and `<prefix>.domains.jsonl` (or
    one `meta["domain"]` for the whole corpus); None where unknown."""
    source = windows.source
    prefix = corpus_prefix(source)
    doc_ids = document_ids(source)
    if Path(domains_path(prefix)).is_file():
        domains = read_document_strings(domains_path(prefix), source.num_documents)
    elif isinstance(meta.get("domain"), str):
        domains = [meta["domain"]] * source.num_documents
    else:
        domains = None
    return doc_ids, domains


def score_table(windows: Windows, columns: dict[str, np.ndarray], doc_ids, domains):
    """The scores.parquet table: window, doc, doc_id?, tokens, domain?, then the float32 scores."""
    import pyarrow as pa

    n = len(windows)
    doc = windows.doc_of_window
    data = {"window": pa.array(np.arange(n, dtype=np.int64)), "doc": pa.array(doc)}
    if doc_ids is not None:
        data["doc_id"] = pa.array(doc_ids, pa.string()).take(pa.array(doc))
    data["tokens"] = pa.array(np.full(n, windows.window, dtype=np.int64))
    if domains is not None:
        data["domain"] = pa.array(domains, pa.string()).take(pa.array(doc))
    data.update({name: pa.array(values.astype(np.float32)) for name, values in columns.items()})
    return pa.table(data)


def write_parquet(table, path: Path, info: dict) -> None:
    """Write a table atomically, with `info` as JSON in the schema metadata under b"dsel"."""
    import pyarrow.parquet as pq

    table = table.replace_schema_metadata({b"dsel": json.dumps(info, sort_keys=True).encode()})
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def merge_scores(out_dir, windows: Windows | None = None) -> Path:
    """Check coverage and write scores.parquet, doc_scores.parquet, the histograms and last scores.json
    (the manifest: readers refuse a table without a matching one); returns the path of scores.parquet."""
    out = Path(out_dir)
    job = read_job(out)
    windows = windows if windows is not None else reopen_windows(job)
    if len(windows) != job["num_windows"] or windows.window != job["window"]:
        raise DselError(f"{windows}: does not match the scored job ({job['num_windows']} windows of {job['window']})")
    with output_lock(out, ".merge"):
        for stale in out.glob(".*.tmp-*"):
            stale.unlink(missing_ok=True)
        columns = load_shards(out, job)
        (out / "scores.json").unlink(missing_ok=True)
        doc_ids, domains = document_labels(windows, job["meta"])
        table = score_table(windows, columns, doc_ids, domains)
        write_parquet(table, out / "scores.parquet", table_info(job))
        doc_table = doc_score_table(windows, columns, doc_ids, domains)
        write_parquet(doc_table, out / "doc_scores.parquet", table_info(job))
        window_domains = table.column("domain").to_numpy(zero_copy_only=False) if domains is not None else None
        for name, values in columns.items():
            score_histogram(values, out / f"hist-{name}.png", title=f"{name}: {len(values)} windows", xlabel=name)
        write_json(out / "scores.json", {
            **table_info(job), "meta": job["meta"], "columns": job["columns"], "num_windows": job["num_windows"],
            "num_documents": doc_table.num_rows, "num_shards": num_shards(job), "shard_size": job["shard_size"],
            "has_doc_id": doc_ids is not None, "has_domain": domains is not None,
            "stats": table_stats(columns, np.full(len(windows), windows.window), window_domains),
        })
    log.info("merged %d shards: %d windows x %s -> %s", num_shards(job), len(windows), job["columns"],
             out / "scores.parquet")
    return out / "scores.parquet"


def read_scores(path, columns: list[str] = ()):
    """The score table at `path` (a score directory or a .parquet file) as a pyarrow Table; DselError
    when it is missing, unreadable or lacks one of `columns` (naming the ones it has)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(path)
    path = require_file(path / "scores.parquet" if path.is_dir() else path, "score table (run `dsel score`)")
    try:
        table = pq.read_table(path)
    except (OSError, pa.ArrowException) as e:
        raise file_error(path, f"not a readable parquet file ({e})") from None
    absent = [name for name in columns if name not in table.column_names]
    if absent:
        raise file_error(path, f"has no column {', '.join(absent)}; it has {', '.join(table.column_names)}")
    return table


# ----- per-document scores -----------------------------------------------------------------------------
def window_document_overlaps(windows: Windows) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(window, doc, tokens) of every non-empty intersection of a window with a document."""
    return windows.document_overlaps()


def doc_score_table(windows: Windows, columns: dict[str, np.ndarray], doc_ids, domains):
    """Per scored document: doc, doc_id?, domain?, tokens, windows and the token-weighted mean of
    every score column (each window weighs by how many of its tokens lie in the document)."""
    import pyarrow as pa

    window, doc, lengths = window_document_overlaps(windows)
    docs, index = np.unique(doc, return_inverse=True)
    tokens = np.bincount(index, weights=lengths).astype(np.int64)
    data = {"doc": pa.array(docs.astype(np.int64))}
    if doc_ids is not None:
        data["doc_id"] = pa.array(doc_ids, pa.string()).take(pa.array(docs))
    if domains is not None:
        data["domain"] = pa.array(domains, pa.string()).take(pa.array(docs))
    data["tokens"] = pa.array(tokens)
    data["windows"] = pa.array(np.bincount(index).astype(np.int64))
    for name, values in columns.items():
        weighted = np.bincount(index, weights=lengths * values[window].astype(np.float64))
        data[name] = pa.array((weighted / tokens).astype(np.float32))
    return pa.table(data)


def write_doc_scores(out_dir, windows: Windows | None = None) -> Path:
    """(Re)write out_dir/doc_scores.parquet from scores.parquet, without rescoring."""
    out = Path(out_dir)
    job = read_job(out)
    windows = windows if windows is not None else reopen_windows(job)
    table = read_scores(out, job["columns"])
    columns = {name: table.column(name).to_numpy() for name in job["columns"]}
    doc_ids, domains = document_labels(windows, job["meta"])
    path = out / "doc_scores.parquet"
    write_parquet(doc_score_table(windows, columns, doc_ids, domains), path, table_info(job))
    return path
