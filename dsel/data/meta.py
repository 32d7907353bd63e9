"""`<prefix>.meta.json`: how a tokenized dataset was made (tokenizer, vocabulary, dtype, EOD id).

Later stages read it to refuse data and models built with different tokenizers.
"""
from __future__ import annotations

import os

from dsel.errors import file_error
from dsel.io import read_json, write_json

REQUIRED_KEYS = ("vocab_size", "tokenizer", "tokenizer_sha256", "dtype", "eod_id")


def meta_path(prefix: str | os.PathLike) -> str:
    return f"{prefix}.meta.json"


def write_meta(prefix: str | os.PathLike, meta: dict) -> None:
    """Write the metadata (atomically); it must carry every REQUIRED_KEYS entry."""
    missing = [k for k in REQUIRED_KEYS if k not in meta]
    if missing:
        raise ValueError(f"metadata lacks {missing}")
    write_json(meta_path(prefix), meta)


def write_derived_meta(source_prefix: str | os.PathLike, derived, **provenance) -> None:
    """`<derived>.meta.json` for a dataset cut from `source_prefix` (a slice, a selection): the source's
    tokenizer and vocabulary with the derived dataset's counts; nothing when the source records none."""
    if os.path.isfile(meta_path(source_prefix)):
        write_meta(derived.prefix, {**read_meta(source_prefix), "num_documents": derived.num_documents,
                                    "num_tokens": derived.num_tokens, **provenance})


def read_meta(prefix: str | os.PathLike) -> dict:
    """The metadata dict (vocab_size, tokenizer, tokenizer_sha256, dtype, eod_id, counts, ...)."""
    path = meta_path(prefix)
    meta = read_json(path)
    missing = [k for k in REQUIRED_KEYS if not isinstance(meta, dict) or k not in meta]
    if missing:
        raise file_error(path, f"missing key(s) {', '.join(missing)}")
    return meta
