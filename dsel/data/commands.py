"""CLI commands of the data stage."""
from __future__ import annotations

import os
from pathlib import Path

from dsel.cli import Command
from dsel.data.tokenize import TokenizeConfig
from dsel.errors import DselError
from dsel.io import check_free_space, output_lock, rank_tag


def run_tokenize(cfg: TokenizeConfig) -> None:
    """Tokenize under the output's lock, refusing to replace a dataset made from other inputs."""
    from dsel.data.tokenize import tokenize_corpus

    prefix = output_prefix(cfg)
    with output_lock(prefix, rank_tag()):
        check_overwrite_dataset(cfg, prefix)
        check_free_space(prefix, estimated_bytes(cfg), "the tokenized dataset")
        tokenize_corpus(cfg)


def output_prefix(cfg: TokenizeConfig) -> str:
    """The dataset prefix the command writes (`out`, formerly `output`)."""
    return str(getattr(cfg, "out", None) or getattr(cfg, "output"))


def dataset_key(cfg: TokenizeConfig) -> dict:
    """What a finished dataset records about how it was made (in its .meta.json)."""
    from dsel.data.tokenize import input_files

    return {"inputs": [f.url for f in input_files(cfg.input)], "text_field": cfg.text_field, "id_field": cfg.id_field}


def check_overwrite_dataset(cfg: TokenizeConfig, prefix: str) -> None:
    """Refuse to replace a finished dataset made from other inputs or fields, unless overwrite=true."""
    from dsel.io import read_json

    meta_file = Path(f"{prefix}.meta.json")
    if getattr(cfg, "overwrite", False) or not meta_file.is_file():
        return
    old = read_json(meta_file)
    for name, value in dataset_key(cfg).items():
        if old.get(name) != value:
            raise DselError(f"{prefix}: holds a finished dataset made with {name}={old.get(name)!r} (this run: "
                            f"{value!r}); set overwrite=true to replace it, or choose another out")


def estimated_bytes(cfg: TokenizeConfig) -> int:
    """A rough size of the output: 2-byte tokens of ~4 characters, gzip text expanding ~3x."""
    from dsel.data.tokenize import input_files

    local = [f.url for f in input_files(cfg.input) if os.path.isfile(f.url)]
    return sum(os.path.getsize(url) * (3 if url.endswith((".gz", ".zst")) else 1) for url in local) // 2


COMMANDS = [
    Command("tokenize", "Tokenize a corpus (jsonl/parquet/text) into a Megatron .bin/.idx dataset", TokenizeConfig, run_tokenize),
]
