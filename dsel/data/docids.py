"""Per-document sidecars: one JSON string per document of a dataset, in order.

`<prefix>.docids.jsonl` holds the source id of every document. Scores are computed per window;
`Windows.doc_of_window` gives a window's document index and this file turns that index back into
the id of the source record (the input's id field, or `<file>:<record number>`), so scores can be
joined to the original corpus. `<prefix>.domains.jsonl`, when present, holds every document's
domain (for per-domain statistics and selection shares). `<prefix>.fields.jsonl`, when present,
holds one JSON object per document: the source fields `dsel tokenize keep_fields=` passed through.
"""
from __future__ import annotations

import json
import os
from typing import Iterable

from dsel.errors import file_error
from dsel.io import atomic_path, require_file


def doc_ids_path(prefix: str | os.PathLike) -> str:
    return f"{prefix}.docids.jsonl"


def domains_path(prefix: str | os.PathLike) -> str:
    return f"{prefix}.domains.jsonl"


def fields_path(prefix: str | os.PathLike) -> str:
    return f"{prefix}.fields.jsonl"


def write_document_strings(path: str | os.PathLike, values: Iterable[str]) -> int:
    """Write one JSON string per line (atomically); returns how many."""
    count = 0
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for value in values:
            f.write(json.dumps(str(value), ensure_ascii=False) + "\n")
            count += 1
    return count


def read_document_strings(path: str | os.PathLike, expected: int | None = None, what: str = "entries") -> list[str]:
    """One string per document; `expected` checks the count against the dataset's."""
    path = require_file(path, "per-document sidecar")
    values = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            try:
                values.append(str(json.loads(line)))
            except json.JSONDecodeError:
                raise file_error(path, f"line {line_no} is not a JSON string") from None
    if expected is not None and len(values) != expected:
        raise file_error(path, f"has {len(values)} {what} but the dataset has {expected} documents")
    return values


def write_doc_ids(prefix: str | os.PathLike, ids: Iterable[str]) -> int:
    """Write the document-id sidecar of `prefix`; returns how many ids."""
    return write_document_strings(doc_ids_path(prefix), ids)


def read_doc_ids(prefix: str | os.PathLike, expected: int | None = None) -> list[str]:
    """The source id of each document; `expected` checks the count against the dataset's."""
    return read_document_strings(doc_ids_path(prefix), expected, "ids")


def write_document_objects(path: str | os.PathLike, values: Iterable[dict]) -> int:
    """Write one JSON object per line (atomically); returns how many."""
    count = 0
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for value in values:
            f.write(json.dumps(value, ensure_ascii=False, default=str) + "\n")
            count += 1
    return count
