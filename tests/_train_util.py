"""Tiny learnable datasets and configs for the training tests."""
from __future__ import annotations

import numpy as np

from dsel.data.indexed import IndexedDatasetWriter
from dsel.train.config import TrainConfig

VOCAB = 64
TINY_MODEL = {"vocab_size": VOCAB, "seq_len": 16, "n_layer": 1, "d_model": 32, "n_head": 2}


def write_counting_dataset(prefix, num_docs: int = 40, seed: int = 0, vocab: int = VOCAB) -> str:
    """Documents counting up modulo `vocab` from a random start: next-token structure to learn."""
    rng = np.random.default_rng(seed)
    with IndexedDatasetWriter(prefix, np.uint16) as writer:
        for _ in range(num_docs):
            start, length = rng.integers(0, vocab), rng.integers(10, 50)
            writer.add_document((start + np.arange(length)) % vocab)
    return str(prefix)


def tiny_config(tmp_path, data, **overrides) -> TrainConfig:
    """A TrainConfig of a 1-layer d=32 model on CPU, 8 steps of batch 4 unless overridden."""
    settings = dict(data=[str(d) for d in data], out=str(tmp_path / "run"), arch=dict(TINY_MODEL), steps=8,
                    batch_size=4, lr=1e-2, min_lr=1e-3, device="cpu")
    settings.update(overrides)
    return TrainConfig(**settings)
