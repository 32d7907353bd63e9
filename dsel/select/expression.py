"""Score expressions: what "higher is better" means for a selection.

    pds                     a column
    -loss_cond              its negation (conditional-only baseline; -loss_prior = perplexity filter)
    loss_prior - loss_cond  a difference of two columns (CoLoR by hand, RHO-down style)
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from dsel.errors import DselError
from dsel.select.source import unknown_column

NAME = r"[A-Za-z_][A-Za-z0-9_.]*"
PATTERN = re.compile(rf"^\s*(-)?\s*({NAME})\s*(?:-\s*({NAME}))?\s*$")


@dataclass(frozen=True)
class Expression:
    """sign * column, or column - minus."""

    column: str
    negate: bool = False
    minus: str | None = None

    @property
    def columns(self) -> list[str]:
        return [self.column] + ([self.minus] if self.minus else [])

    def __call__(self, chunk: dict) -> np.ndarray:
        """The expression's value per row of a chunk (float64)."""
        value = chunk[self.column]
        if self.negate:
            value = -value
        if self.minus:
            value = value - chunk[self.minus]
        return value

    def __str__(self) -> str:
        return ("-" if self.negate else "") + self.column + (f" - {self.minus}" if self.minus else "")


def parse_expression(text: str, source) -> Expression:
    """Parse `text` against the score columns of `source` ('' = its only score column)."""
    if not text.strip():
        if len(source.columns) != 1:
            raise DselError(f"{source.path}: {len(source.columns)} score columns ({', '.join(source.columns)}); "
                            "choose one with column=")
        return Expression(source.columns[0])
    match = PATTERN.match(text)
    if not match:
        raise DselError(f"column='{text}': expected 'name', '-name' or 'name_a - name_b'")
    negate, column, minus = bool(match.group(1)), match.group(2), match.group(3)
    for name in (column, minus):
        if name is not None and name not in source.columns:
            raise unknown_column(source, name)
    return Expression(column, negate, minus)
