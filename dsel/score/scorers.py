"""Scorer registry: a name -> a builder `(settings: dict, device) -> scorer`.

A scorer is any object with `columns: list[str]` and `__call__(tokens LongTensor[B, W] on the CPU)
-> {column: float tensor [B]}` (optionally `check_window(window)` and `vocab_size`). Builders are
imported lazily so the registry costs nothing until a scorer is built. Add one with
`register_scorer("name", builder)`, or name any builder on the command line as
`package.module:function`.
"""
from __future__ import annotations

import importlib
from typing import Callable, Union

from dsel.errors import DselError

Builder = Callable[[dict, object], object]

_BUILDERS: dict[str, Union[str, Builder]] = {
    "pds": "dsel.pds.scorer:build_scorer",
    "color": "dsel.color.scorer:build_scorer",
}


def register_scorer(name: str, builder: Union[str, Builder]) -> None:
    """Make `name` build scorers with `builder` (a callable or a 'module:function' string)."""
    _BUILDERS[name] = builder


def scorer_names() -> list[str]:
    """The registered scorer names, sorted."""
    return sorted(_BUILDERS)


def build_scorer(name: str, settings: dict, device) -> object:
    """Build the scorer registered as `name` (or named 'module:function') from its settings."""
    return resolve_builder(name)(dict(settings), device)


def resolve_builder(name: str) -> Builder:
    """The builder of a registered name or of a 'module:function' path."""
    target = _BUILDERS.get(name, name if ":" in name else None)
    if target is None:
        raise DselError(f"unknown scorer '{name}'; valid: {', '.join(scorer_names())} (or module:function)")
    if callable(target):
        return target
    module, _, attr = target.partition(":")
    try:
        builder = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise DselError(f"scorer '{name}': cannot load builder {target} ({e})") from None
    if not callable(builder):
        raise DselError(f"scorer '{name}': {target} is not callable")
    return builder
