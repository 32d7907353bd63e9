"""The document-id sidecar `<prefix>.docids.jsonl`: the source id of every document, in order.

Scores are computed per window; `Windows.doc_of_window` gives a window's document index and this
file turns that index back into the id of the source record (the input's id field, or
`<file>:<record number>`), so scores can be joined to the original corpus.
"""
from __future__ import annotations

import json
import os
from typing import Iterable

from dsel.errors import file_error
from dsel.io import atomic_path, require_file


def doc_ids_path(prefix: str | os.PathLike) -> str:
    return f"{prefix}.docids.jsonl"


def write_doc_ids(prefix: str | os.PathLike, ids: Iterable[str]) -> int:
    """Write one JSON string per line (atomically); returns how many."""
    count = 0
    with atomic_path(doc_ids_path(prefix)) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for doc_id in ids:
            f.write(json.dumps(str(doc_id), ensure_ascii=False) + "\n")
            count += 1
    return count


def read_doc_ids(prefix: str | os.PathLike, expected: int | None = None) -> list[str]:
    """The source id of each document; `expected` checks the count against the dataset's."""
    path = require_file(doc_ids_path(prefix), "document-id sidecar")
    ids = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            try:
                ids.append(json.loads(line))
            except json.JSONDecodeError:
                raise file_error(path, f"line {line_no} is not a JSON string") from None
    if expected is not None and len(ids) != expected:
        raise file_error(path, f"has {len(ids)} ids but the dataset has {expected} documents")
    return ids
