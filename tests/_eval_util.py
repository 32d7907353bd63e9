"""Shared fixtures of the eval tests: a tokenizer trained on a slice of the bundled corpus, a tiny GPT."""
import gzip
import itertools
from pathlib import Path

import torch

from dsel.data.tokenize import TokenizeConfig, tokenize_corpus
from dsel.models.checkpoint import save_model
from dsel.models.config import preset
from dsel.models.gpt import GPT

BUNDLED = Path(__file__).resolve().parent.parent / "dsel" / "data" / "bundled"


def tokenized_slice(directory: Path, name: str = "pool", docs: int = 120, vocab_size: int = 512,
                    tokenizer: str = "") -> dict:
    """The first `docs` documents of a bundled file tokenized under directory/name; returns its meta."""
    source = BUNDLED / f"{name}.jsonl.gz" if name in ("pool", "target") else BUNDLED / "valid" / f"{name}.jsonl.gz"
    with gzip.open(source, "rt") as f:
        lines = list(itertools.islice(f, docs))
    (directory / f"{name}.jsonl").write_text("".join(lines))
    cfg = TokenizeConfig(input=str(directory / f"{name}.jsonl"), out=str(directory / name), vocab_size=vocab_size,
                         tokenizer=tokenizer, id_field="id", workers=1)
    return tokenize_corpus(cfg)


def tiny_checkpoint(path: Path, meta: dict, seq_len: int = 32, seed: int = 0) -> Path:
    """A randomly initialised 1-layer GPT over the tokenizer of `meta`, saved as a checkpoint."""
    torch.manual_seed(seed)
    model = GPT(preset("tiny", vocab_size=meta["vocab_size"], seq_len=seq_len, n_layer=1, d_model=32, n_head=2))
    with torch.no_grad():  # sharper random logits than the 0.02 init, so choices differ clearly
        model.head_weight.mul_(20)
    return save_model(path, model, {"tokenizer": meta["tokenizer"], "vocab_size": meta["vocab_size"]})
