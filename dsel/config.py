"""Typed configs: dataclasses loaded from YAML and overridden on the command line.

Every stage declares its settings as a dataclass whose fields carry a `help` string in their
metadata (`field(default=..., metadata={"help": ...})`, or the shorthand `option(...)`).
`load_config(Cls, "cfg.yaml", ["train.lr=3e-4"])` reads the YAML, applies dotted overrides,
checks every key and type, and returns a `Cls`. A typo gets a one-line error naming the file,
the key and the closest valid name; a bad value given on the command line is blamed on the
command line. A field renamed in a release keeps its old name as an alias for one release:
`option(..., aliases=("output",))` accepts `output=` with a one-line deprecation warning; a removed
setting listed in the class's `REMOVED_OPTIONS` ({name: why}) is ignored with a warning.
"""
from __future__ import annotations

import dataclasses
import difflib
import logging
import types
import typing
from pathlib import Path
from typing import Any, Iterable

import yaml

from dsel.errors import DselError

log = logging.getLogger(__name__)
COMMAND_LINE = "command line"


def option(default: Any = dataclasses.MISSING, help: str = "", aliases: tuple[str, ...] = (), **kwargs) -> Any:
    """A dataclass field with a help string (and deprecated old names in `aliases`); mutable defaults
    (lists, dicts) are copied per instance."""
    metadata = {"help": help, "aliases": tuple(aliases)}
    if isinstance(default, (list, dict)):
        value = default
        return dataclasses.field(default_factory=lambda: type(value)(value), metadata=metadata, **kwargs)
    return dataclasses.field(default=default, metadata=metadata, **kwargs)


class Origins(str):
    """The source named in errors: the config file, or the command line for the keys it set."""

    def __new__(cls, file: str, command_line: set[str]):
        origin = super().__new__(cls, file)
        origin.command_line = command_line
        return origin

    def of(self, key: str) -> str:
        parts = key.replace("[", ".").split(".")
        given = any(".".join(parts[: i + 1]) in self.command_line for i in range(len(parts)))
        return COMMAND_LINE if given else str(self)


def _where(source: str, key: str) -> str:
    return source.of(key) if isinstance(source, Origins) else source


def load_config(cls: type, path: str | Path | None = None, overrides: Iterable[str] = ()) -> Any:
    """Build a `cls` from an optional YAML file plus `key.sub=value` overrides."""
    data: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise DselError(f"{path}: config file not found")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise DselError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
        if not isinstance(data, dict):
            raise DselError(f"{path}: expected a mapping of settings at the top level")
    given = {_apply_override(data, item) for item in overrides}
    source = Origins(str(path) if path else COMMAND_LINE, given)
    return from_dict(cls, data, source)


def from_dict(cls: type, data: dict, source: str = "<config>", prefix: str = "") -> Any:
    """Convert a nested dict into dataclass `cls`, checking keys and coercing types."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    renamed = {old: f.name for f in fields.values() for old in f.metadata.get("aliases", ())}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    removed = getattr(cls, "REMOVED_OPTIONS", {})
    for key, value in data.items():
        if key in removed and key not in fields:
            log.warning("%s: '%s%s' has no effect any more and will be refused in the next release (%s)",
                        _where(source, prefix + key), prefix, key, removed[key])
            continue
        if key in renamed and key not in fields:
            new = renamed[key]
            log.warning("%s: '%s%s' is deprecated and will be removed; use '%s%s'", _where(source, prefix + key),
                        prefix, key, prefix, new)
            if new in data:
                raise DselError(f"{_where(source, prefix + key)}: both '{prefix}{key}' (deprecated) and '{prefix}{new}' are set")
            key = new
        if key not in fields:
            raise DselError(f"{_where(source, prefix + key)}: unknown key '{prefix}{key}' for {cls.__name__}{_suggest(key, fields)}")
        kwargs[key] = _coerce(value, hints[key], source, f"{prefix}{key}")
    missing = [n for n, f in fields.items() if n not in kwargs and _is_required(f)]
    if missing:
        raise DselError(f"{source}: missing required setting(s) {', '.join(prefix + m for m in missing)}")
    return cls(**kwargs)


def to_dict(config: Any) -> dict:
    """A plain dict of a config (for saving next to a stage's outputs)."""
    return dataclasses.asdict(config)


def save_config(config: Any, path: str | Path) -> None:
    """Write a config as YAML, atomically, so a stage's outputs record how they were made."""
    from dsel.io import atomic_path

    with atomic_path(path) as tmp:
        tmp.write_text(yaml.safe_dump(to_dict(config), sort_keys=False))


def describe(cls: type, prefix: str = "") -> list[str]:
    """One line per setting (nested ones dotted): name, type, default and help; for --help."""
    lines = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            lines += describe(hint, f"{prefix}{f.name}.")
            continue
        default = "(required)" if _is_required(f) else f"= {_default_of(f)!r}"
        lines.append(f"  {prefix}{f.name}: {_type_name(hint)} {default}  {f.metadata.get('help', '')}".rstrip())
    return lines


def _apply_override(data: dict, item: str) -> str:
    """Set `key=value` (the value read as YAML) in `data`; returns the key."""
    if "=" not in item:
        raise DselError(f"command line: override '{item}' is not of the form key=value")
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw else ""
    except yaml.YAMLError as e:
        raise DselError(f"command line: '{item}': the value is not valid YAML ({str(e).splitlines()[0]})") from None
    node = data
    parts = key.strip().split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise DselError(f"command line: '{key}' sets a field inside a non-mapping setting")
    node[parts[-1]] = value
    return key.strip()


def _coerce(value: Any, hint: Any, source: str, key: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        non_none = [a for a in args if a is not type(None)]
        for candidate in non_none:
            try:
                return _coerce(value, candidate, source, key)
            except DselError:
                continue
        raise _type_error(source, key, value, hint)
    if origin is typing.Literal:
        if value not in args:
            raise DselError(f"{_where(source, key)}: '{key}' must be one of {', '.join(map(repr, args))}, got {value!r}")
        return value
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise _type_error(source, key, value, hint)
        return from_dict(hint, value, source, f"{key}.")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            value = [value]
        item_type = args[0] if args else Any
        return origin(_coerce(v, item_type, source, f"{key}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise _type_error(source, key, value, hint)
        return {k: _coerce(v, args[1], source, f"{key}.{k}") if args else v for k, v in value.items()}
    if hint is Any:
        return value
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise _type_error(source, key, value, hint)
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str) and _is_float(value):  # YAML 1.1 reads 1e-4 as a string
        return float(value)
    if hint is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if hint is str and isinstance(value, (str, int, float)) and not isinstance(value, bool):
        return str(value)
    raise _type_error(source, key, value, hint)


def _is_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _type_error(source: str, key: str, value: Any, hint: Any) -> DselError:
    return DselError(f"{_where(source, key)}: '{key}' should be {_type_name(hint)}, got {value!r}")


def _suggest(key: str, names: Iterable[str]) -> str:
    close = difflib.get_close_matches(key, list(names), n=1)
    return f"; did you mean '{close[0]}'?" if close else ""


def _is_required(f: dataclasses.Field) -> bool:
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING


def _default_of(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


def _type_name(hint: Any) -> str:
    """`int`, `int or None`, `'bpe' | 'unigram'`, `list[str]`: how --help and errors name a type."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Literal:
        return " | ".join(map(repr, args))
    if origin in (typing.Union, types.UnionType):
        names = [_type_name(a) for a in args if a is not type(None)]
        return " or ".join(names) + (" or None" if type(None) in args else "")
    if origin is not None:
        return f"{getattr(origin, '__name__', str(origin))}[{', '.join(_type_name(a) for a in args)}]"
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")
