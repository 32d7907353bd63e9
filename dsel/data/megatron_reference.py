"""megatron-core's own GPTDataset over a dsel dataset: the reference our loader is tested and benchmarked against."""
from __future__ import annotations

import os
from types import SimpleNamespace

import numpy as np


def megatron_gpt_dataset(prefix: str, seq_len: int, seed: int, num_samples: int | None, indices: np.ndarray,
                         cache_dir: str | os.PathLike, vocab_size: int, eod_id: int):
    """A megatron.core GPTDataset (train split) over all of `indices` of the dataset at `prefix`."""
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
    from megatron.core.datasets.utils import Split

    tokenizer = SimpleNamespace(vocab_size=vocab_size, eod=eod_id, pad=vocab_size + 1, eos=eod_id,
                                unique_identifiers={"name": "dsel"})
    config = GPTDatasetConfig(
        random_seed=seed, sequence_length=seq_len, blend=([str(prefix)], None), split="1,0,0",
        path_to_cache=str(cache_dir), tokenizer=tokenizer, reset_position_ids=False, reset_attention_mask=False,
        eod_mask_loss=False,
    )
    low_level = GPTDataset.build_low_level_dataset(str(prefix), config)
    return GPTDataset(low_level, str(prefix), indices, num_samples, Split.train, config)
