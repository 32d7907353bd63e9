"""`<prefix>.meta.json`: how a tokenized dataset was made (tokenizer identity, dtype, counts).

The tokenizer's identity (dsel.data.tokenizer.Tokenizer.identity: kind, path, sha256 of its ids
file, vocabulary size, EOD id) is copied into every checkpoint trained on the data, and
`check_same_tokenizer` compares it wherever tokens meet a model.
"""
from __future__ import annotations

import logging
import os

from dsel.errors import DselError, file_error
from dsel.io import read_json, write_json

log = logging.getLogger(__name__)

REQUIRED_KEYS = ("vocab_size", "tokenizer", "tokenizer_sha256", "dtype", "eod_id")
# What identifies a tokenizer, compared in this order (tokenizer_kind is absent from metas written before it existed).
IDENTITY_KEYS = ("tokenizer_sha256", "tokenizer_kind", "eod_id", "vocab_size")


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


def tokenizer_identity(meta: dict) -> dict:
    """The tokenizer keys of a dataset or checkpoint meta (path, kind, sha256, vocab_size, eod_id) it records."""
    return {k: meta[k] for k in ("tokenizer", *IDENTITY_KEYS) if meta.get(k) is not None}


def tokenizer_mismatch(model_meta: dict, data_meta: dict) -> str:
    """'' when both metas name the same tokenizer (or one records none), else the first differing key."""
    for key in IDENTITY_KEYS:
        have, want = model_meta.get(key), data_meta.get(key)
        if have is not None and want is not None and have != want:
            return key
    return ""


def check_same_tokenizer(model: str, model_meta: dict, data: str | os.PathLike, role: str = "model") -> None:
    """Refuse dataset `data` (a prefix) when its meta names another tokenizer than `model_meta` (of a
    checkpoint `model`, or of another dataset: role="training data").

    One line naming both sides; a dataset or model that records no tokenizer is let through with a warning.
    """
    if not any(model_meta.get(k) is not None for k in IDENTITY_KEYS):
        return
    if not os.path.isfile(meta_path(data)):
        log.warning("%s not found: cannot check its tokenizer against %s", meta_path(data), model)
        return
    data_meta = read_meta(data)
    key = tokenizer_mismatch(model_meta, data_meta)
    if key:
        raise DselError(f"{model}: {role} has {key}={shown(key, model_meta)} ({model_meta.get('tokenizer', '?')}) but "
                        f"data {data} has {key}={shown(key, data_meta)} ({data_meta.get('tokenizer', '?')}); the data "
                        "was tokenized with another tokenizer")


def shown(key: str, meta: dict) -> str:
    """A meta value as error messages show it (a sha256 cut to 12 hex digits)."""
    value = meta[key]
    return f"{value[:12]}..." if key == "tokenizer_sha256" and len(str(value)) > 12 else repr(value)
