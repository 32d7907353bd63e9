"""`dsel tokenize`: corpus files -> tokens -> one Megatron indexed dataset.

Reads what `dsel.data.readers` reads (jsonl/json/txt, optionally .gz/.zst, parquet, arrow, a
save_to_disk folder; local paths or fsspec URLs); loads a tokenizer (sentencepiece or Hugging Face,
see dsel.data.tokenizer) or trains a sentencepiece model;
encodes in resumable shards over worker processes and torchrun ranks (`dsel.data.shards`);
appends EOD (the model's EOS id) to every document; writes `<out>.bin/.idx`, the document-id
sidecar `<out>.docids.jsonl` (the id field, else `<path relative to the input root>:<record>`),
`<out>.domains.jsonl` with `domain_field`, `<out>.fields.jsonl` with `keep_fields`, and
`<out>.meta.json` (the tokenizer's identity: kind, path, sha256, vocabulary size, EOD id; the dtype).
"""
from __future__ import annotations

import itertools
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from dsel.config import option
from dsel.data.readers import input_files, read_documents
from dsel.data.tokenizer import Tokenizer, file_sha256, load_tokenizer, train_tokenizer
from dsel.errors import DselError
from dsel.io import publish_prefix, read_json, write_json

log = logging.getLogger(__name__)


@dataclass
class TokenizeConfig:
    input: str = option(help="corpus: a file, directory, glob or save_to_disk folder (jsonl/json/txt[.gz|.zst], parquet, "
                             "arrow), local or an fsspec URL (file://, memory://, s3://, hf://)")
    out: str = option(help="output prefix: writes <out>.bin/.idx/.docids.jsonl/.meta.json", aliases=("output",))
    tokenizer: str = option("", "tokenizer to load: a sentencepiece .model, a Hugging Face tokenizer.json or a "
                                "save_pretrained folder; empty: train a sentencepiece model, saved as <out>.model")
    vocab_size: int = option(8000, "vocabulary size when training the tokenizer (an upper bound on tiny corpora)")
    model_type: Literal["bpe", "unigram"] = option("bpe", "sentencepiece model type when training")
    train_docs: int = option(50000, "documents sampled from the start of the corpus to train the tokenizer")
    text_field: str = option("text", "jsonl/parquet field holding the document text")
    id_field: str = option("", "field holding the document id; empty: <path relative to the input root>:<record number>")
    domain_field: str = option("", "field naming each document's domain, written to <out>.domains.jsonl; empty: none")
    keep_fields: list[str] = option([], "source fields passed through to <out>.fields.jsonl (one object per document)")
    text_unit: Literal["line", "file"] = option("line", "plain text: one document per non-empty line, or per file")
    workers: int = option(2, "encoding worker processes (per torchrun rank)")
    chunk_docs: int = option(256, "documents encoded per tokenizer call")
    overwrite: bool = option(False, "replace a finished dataset at the output prefix made from other inputs")
    shard_bytes: int = option(64 << 20, "input bytes per shard (the unit of parallel work and of resume; large "
                                        "uncompressed jsonl/txt and parquet files are split)")
    keep_shards: bool = option(False, "keep <out>.shards/ (per-shard datasets and completion markers) after the merge")


# ---- training the tokenizer ----

def train_corpus_tokenizer(files: list, cfg: TokenizeConfig, model_path: str | os.PathLike) -> Tokenizer:
    """Train a sentencepiece model on the first `train_docs` documents of the corpus."""
    texts = (text for _, text in itertools.islice(read_documents(files, cfg), cfg.train_docs))
    return train_tokenizer(texts, model_path, cfg.vocab_size, cfg.model_type, cfg.workers, cfg.input)


# ---- the command ----

def tokenize_corpus(cfg: TokenizeConfig) -> dict:
    """Run the whole command (this rank's shards; rank 0 merges); returns the metadata of `<out>.meta.json`."""
    from dsel.data.indexed import best_dtype
    from dsel.data.readers import settings_of
    from dsel.data.shards import plan_shards, shards_dir

    check_settings(cfg)
    files = input_files(cfg.input)
    if next(read_documents(files, cfg), None) is None:
        raise DselError(f"{cfg.input}: empty corpus (no non-empty documents)")
    settings = settings_of(cfg)
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    created = _join_ranks(world)
    try:
        tokenizer = _shared_tokenizer(files, cfg, rank, world)
        dtype = np.dtype(best_dtype(tokenizer.vocab_size))
        shards = plan_shards(files, cfg.shard_bytes, settings)
        directory = shards_dir(cfg.out)
        _encode_my_shards(shards, directory, tokenizer, dtype, cfg, settings, rank, world)
        _barrier(world)
        if rank != 0:
            return {}
        with publish_prefix(cfg.out) as staged:  # the old dataset stays whole until the new one is complete
            published = None
            if not cfg.tokenizer:  # the trained tokenizer becomes <out>.model with the rest of the dataset
                shutil.copyfile(tokenizer.path, f"{staged}.model")
                published = str(Path(f"{cfg.out}.model").resolve())
            meta = _merge(directory, shards, str(staged), settings, tokenizer, dtype, files, cfg, published)
        if not cfg.keep_shards:
            shutil.rmtree(directory, ignore_errors=True)
        log.info("wrote %s: %d documents, %d tokens", cfg.out, meta["num_documents"], meta["num_tokens"])
        return meta
    finally:
        if created:
            import torch.distributed as dist

            dist.destroy_process_group()


def _merge(directory: Path, shards, prefix: str, settings, tokenizer, dtype, files, cfg: TokenizeConfig,
           tokenizer_path: str | None = None) -> dict:
    """Merge the shards into dataset `prefix` with its sidecars and `<prefix>.meta.json` (recording the
    tokenizer at `tokenizer_path` when given: where a trained one is published); returns the meta."""
    from dsel.data.indexed import IndexedDataset
    from dsel.data.meta import write_meta
    from dsel.data.shards import merge_shards

    counts = merge_shards(directory, shards, prefix, settings)
    dataset = IndexedDataset(prefix, vocab_size=tokenizer.vocab_size)  # re-read, check every token id
    meta = {
        **tokenizer.identity(),
        "dtype": dtype.name,
        "num_documents": counts["num_documents"],
        "num_tokens": dataset.num_tokens,
        "inputs": [f.url for f in files],
        "text_field": cfg.text_field,
        "id_field": cfg.id_field,
        "domain_field": cfg.domain_field,
        "keep_fields": list(cfg.keep_fields),
        "shards": len(shards),
    }
    if tokenizer_path:
        meta["tokenizer"] = tokenizer_path
    write_meta(prefix, meta)
    return meta


def check_settings(cfg: TokenizeConfig) -> None:
    """One-line errors for settings that cannot work, before any file is read."""
    for name in ("workers", "chunk_docs", "shard_bytes"):
        if getattr(cfg, name) < 1:
            raise DselError(f"{name}={getattr(cfg, name)}: must be >= 1")


def _join_ranks(world: int) -> bool:
    if world <= 1:
        return False
    from dsel.score.engine import join_torchrun

    return join_torchrun("gloo")


def _barrier(world: int) -> None:
    if world > 1:
        import torch.distributed as dist

        dist.barrier()


def _shared_tokenizer(files, cfg: TokenizeConfig, rank: int, world: int) -> Tokenizer:
    """The tokenizer given, else one trained on the corpus by rank 0 (a killed run's model is reused
    when its shards recorded it, so finished shards stay valid)."""
    from dsel.data.shards import shards_dir

    if cfg.tokenizer:
        return load_tokenizer(cfg.tokenizer)
    model_path = trained_tokenizer_path(cfg)  # in the work folder: published with the dataset as <out>.model
    record = shards_dir(cfg.out) / "tokenizer.json"
    if rank == 0:
        model_path.parent.mkdir(parents=True, exist_ok=True)
        reusable = model_path.is_file() and record.is_file() and read_json(record).get("sha256") == file_sha256(model_path)
        if reusable:
            log.info("resuming with the tokenizer %s trained by the interrupted run", model_path)
        else:
            log.info("training a %s tokenizer (vocab_size %d) on %s", cfg.model_type, cfg.vocab_size, cfg.input)
            train_corpus_tokenizer(files, cfg, model_path)
            write_json(record, {"sha256": file_sha256(model_path)})
    _barrier(world)
    return load_tokenizer(model_path)


def trained_tokenizer_path(cfg: TokenizeConfig) -> Path:
    """Where a tokenizer trained on the corpus lives until the dataset is published (beside the shards)."""
    from dsel.data.shards import shards_dir

    return shards_dir(cfg.out) / "tokenizer.model"


def _encode_my_shards(shards, directory: Path, tokenizer, dtype, cfg: TokenizeConfig, settings, rank: int, world: int) -> None:
    """Encode this rank's unfinished shards; finished ones (matching markers) are kept as they are."""
    from dsel.data.shards import Job, fingerprint, remove_stale, run_jobs, shard_done

    mine = [s for s in shards if s.index % world == rank]
    sha256 = tokenizer.sha256
    prints = {s.index: fingerprint(s, sha256, settings) for s in mine}
    done = {s.index for s in mine if shard_done(directory, s.index, prints[s.index])}
    directory.mkdir(parents=True, exist_ok=True)
    remove_stale(directory, lambda k: k in done or (k % world != rank and k < len(shards)))
    jobs = [Job(s, prints[s.index], directory, tokenizer.path, dtype.name, settings, cfg.chunk_docs)
            for s in mine if s.index not in done]
    if done:
        log.info("resuming: %d of %d shards already done", len(done), len(mine))
    run_jobs(jobs, cfg.workers, sum(s.bytes for s in mine), sum(s.bytes for s in mine if s.index in done))
