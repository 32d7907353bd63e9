"""CLI commands of the data stage."""
from __future__ import annotations

from dsel.cli import Command
from dsel.data.tokenize import TokenizeConfig


def run_tokenize(cfg: TokenizeConfig) -> None:
    from dsel.data.tokenize import tokenize_corpus

    tokenize_corpus(cfg)


COMMANDS = [
    Command("tokenize", "Tokenize a corpus (jsonl/parquet/text) into a Megatron .bin/.idx dataset", TokenizeConfig, run_tokenize),
]
