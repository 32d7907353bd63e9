"""File helpers shared by every stage: atomic writes, input checks, progress bars."""
from __future__ import annotations

import json
import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from tqdm.auto import tqdm

from dsel.errors import file_error


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling of `path`; rename it onto `path` only if the block succeeds.

    Readers never see a half-written file, and a failed or killed write leaves any previous
    version of `path` untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_json(path: str | os.PathLike, obj) -> None:
    """Write `obj` as indented JSON, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def read_json(path: str | os.PathLike):
    """Read a JSON file, with a one-line error naming the file when it is missing or malformed."""
    path = require_file(path, "JSON file")
    try:
        return json.loads(Path(path).read_text())
    except json.JSONDecodeError as e:
        raise file_error(path, f"not valid JSON ({e.msg} at line {e.lineno})") from None


def require_file(path: str | os.PathLike, what: str = "file") -> Path:
    """Return `path` as a Path, or raise a DselError if it does not exist."""
    path = Path(path)
    if not path.is_file():
        raise file_error(path, f"{what} not found")
    return path


def progress(iterable=None, **kwargs):
    """A tqdm progress bar on stderr (DSEL_PROGRESS=0 hides it); sparse updates in log files."""
    kwargs.setdefault("disable", os.environ.get("DSEL_PROGRESS") == "0")
    kwargs.setdefault("mininterval", 0.1 if sys.stderr.isatty() else 10.0)
    kwargs.setdefault("dynamic_ncols", True)
    return tqdm(iterable, **kwargs)
