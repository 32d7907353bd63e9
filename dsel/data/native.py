"""The compiled loader `dsel._C`, and the translation of its FormatError into DselError."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

from dsel.errors import DselError

try:
    from dsel import _C
except ImportError as e:  # pragma: no cover - only when the extension was never built
    raise ImportError(
        "dsel._C (the native token loader) is not built: run `pip install -e .` "
        "or `python setup.py build_ext --inplace` in the dsel checkout"
    ) from e


@contextmanager
def native_errors() -> Iterator[None]:
    """Re-raise the extension's FormatError ('<file>: <problem>') as a one-line DselError."""
    try:
        yield
    except _C.FormatError as e:
        raise DselError(str(e)) from None
