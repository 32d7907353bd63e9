"""The DSIR baseline (Xie et al.) with the authors' `data-selection` package: hashed n-gram importance weights.

`HashedNgramDSIR` fits bag-of-n-gram models (unigrams + bigrams hashed into 10,000 buckets) of the
target text and of the raw pool text and gives every pool document the log importance weight
log p_target(x) - log p_raw(x). DSIR then keeps documents by Gumbel-top-k on those weights; here the
Gumbel noise is drawn per document (seeded) and every window of the tokenized pool takes its
document's key, so `dsel select method=topk` keeps the best documents' windows up to the same
token budget as every other arm (and the windows train as selected). Documents are matched to the
tokenized pool by document id, the reader the tokenize stage used.
"""
from __future__ import annotations

import logging
from pathlib import Path
from types import SimpleNamespace
from typing import Sequence

import numpy as np

from dsel.errors import DselError

log = logging.getLogger(__name__)

DSIR_STREAM = 4  # noise stream of the per-document Gumbel keys (dsel.select.noise streams 1-3 are taken)


def corpus_files(files: Sequence) -> list:
    """InputFiles (dsel.data.readers) of the given files; paths are read as files of their own."""
    from dsel.data.readers import input_files

    return [f if hasattr(f, "url") else input_files(str(f))[0] for f in files]


def document_reader(files: Sequence, text_field: str, id_field: str):
    """load(url) -> {"id", "text"} dicts: the same documents and ids `dsel tokenize` read from those files."""
    from dsel.data.readers import read_documents

    fields = SimpleNamespace(text_field=text_field, id_field=id_field, text_unit="line")
    by_url = {f.url: f for f in files}

    def load(url: str):
        for doc_id, text in read_documents([by_url[url]], fields):
            yield {"id": doc_id, "text": text}

    return load


def log_importance_weights(pool_files: Sequence, target_files: Sequence, cache_dir: str | Path,
                           text_field: str = "text", id_field: str = "", ngrams: int = 2,
                           num_buckets: int = 10000, num_proc: int = 1) -> dict[str, float]:
    """doc id -> the package's log importance weight of every pool document (files: InputFiles or paths)."""
    from data_selection import HashedNgramDSIR
    from joblib import parallel_config

    pool_files, target_files = corpus_files(pool_files), corpus_files(target_files)
    load = document_reader(pool_files + target_files, text_field, id_field)
    dsir = HashedNgramDSIR(raw_datasets=[f.url for f in pool_files], target_datasets=[f.url for f in target_files],
                           cache_dir=str(cache_dir), raw_load_dataset_fn=load, target_load_dataset_fn=load,
                           num_proc=num_proc, ngrams=ngrams, num_buckets=num_buckets)
    # threads, not joblib's worker processes: nltk 3.10's ReDoS-guarded tokenizer does not survive pickling
    # (its timeout sentinel arrives as another object and re.findall rejects it)
    with parallel_config(backend="threading"):
        dsir.fit_importance_estimator(num_tokens_to_fit="all")
        dsir.compute_importance_weights()
    weights: dict[str, float] = {}
    shards = dsir._get_virtually_sharded_datasets(dsir.raw_datasets)  # how the package split the files
    for path in dsir.raw_datasets:
        ids = [doc["id"] for doc in load(path)]
        mine = [s for s in shards if s["path"] == path]
        values = np.empty(len(ids))
        for shard in mine:  # shard j of k holds documents j, j+k, j+2k, ... of the file
            values[shard["shard_idx"]::shard["num_shards"]] = np.load(dsir.log_importance_weights_dir /
                                                                      f"{shard['overall_idx']}.npy")
        weights.update(zip(ids, values.tolist()))
    if len(set(weights.values())) < 2:
        raise DselError(f"{pool_files[0].url}: DSIR gives every pool document the same importance weight "
                        f"(the target and pool n-gram statistics do not differ)")
    return weights


def window_keys(weights: dict[str, float], doc_ids: Sequence[str], doc_of_window: np.ndarray, seed: int) -> np.ndarray:
    """Per window: its document's log importance weight + that document's Gumbel noise (DSIR's resampling key)."""
    from dsel.select.noise import uniform

    missing = [d for d in doc_ids if d not in weights]
    if missing:
        raise DselError(f"DSIR has no weight for pool document {missing[0]!r}: the text files are not the "
                        f"ones tokenized (or the id field differs)")
    per_doc = np.array([weights[d] for d in doc_ids], dtype=np.float64)
    noise = -np.log(-np.log(uniform(seed, DSIR_STREAM, np.arange(len(doc_ids), dtype=np.int64))))
    return (per_doc + noise)[doc_of_window]


def write_dsir_scores(pool_prefix: str, pool_files: Sequence, target_files: Sequence, window: int,
                      out: Path, seed: int, text_field: str = "text", id_field: str = "", num_proc: int = 1) -> Path:
    """out/scores.npy: one DSIR key per window of the tokenized pool (for `dsel select`)."""
    from dsel.data.docids import read_doc_ids
    from dsel.data.corpus import open_corpus
    from dsel.data.windows import Windows
    from dsel.io import atomic_path

    weights = log_importance_weights(pool_files, target_files, out / "cache", text_field, id_field, num_proc=num_proc)
    windows = Windows(open_corpus(pool_prefix), window)
    doc_ids = read_doc_ids(pool_prefix)
    keys = window_keys(weights, doc_ids, windows.doc_of_window, seed)
    with atomic_path(out / "scores.npy") as tmp, open(tmp, "wb") as f:
        np.save(f, keys)
    log.info("DSIR keys of %d windows (%d documents) -> %s", len(keys), len(doc_ids), out / "scores.npy")
    return out / "scores.npy"
