"""`dsel score` and `dsel score merge`: any registered scorer over a whole corpus, on one or many processes.

    dsel score corpus=data/corpus window=1025 scorer=pds settings.model=runs/pds/scorer out=runs/scores
    torchrun --nproc_per_node 8 -m dsel score corpus=data/corpus window=1025 scorer=color \\
        settings.prior=ckpt/prior settings.cond=ckpt/cond out=runs/scores
    dsel score merge out=runs/scores

Under torchrun each process scores its share of the shards (gloo on CPU, nccl with one GPU per
process, cuda:LOCAL_RANK); rank 0 merges. Rerunning the same command resumes: finished shards are
kept, not rescored.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from dsel.cli import Command
from dsel.config import option
from dsel.errors import DselError
from dsel.io import check_writable

log = logging.getLogger(__name__)


@dataclass
class ScoreCommandConfig:
    corpus: str = option(help="corpus: Megatron dataset prefix (.idx/.bin), token file (.bin/.npy) or a directory/glob of "
                                   "dolma token files")
    window: int = option(help="tokens per window (window i = tokens [i*window, (i+1)*window) of the corpus)")
    scorer: str = option(help="registered scorer name (pds, color) or module:function of a builder")
    settings: dict[str, Any] = option({}, "the scorer's settings, e.g. settings.model=DIR for pds")
    out: str = option("runs/scores", "output directory (shards/, scores.parquet, scores.json, doc_scores.parquet)")
    batch_size: int = option(32, "windows per scorer call")
    shard_size: Optional[int] = option(None, "windows per shard file; None = 64 batches (or the resumed job's)")
    device: str = option("auto", "auto | cpu | cuda | cuda:N (under torchrun, auto = cuda:LOCAL_RANK when GPUs exist)")
    memmap_dtype: str = option("uint16", "token dtype of headerless token files")


@dataclass
class ScoreMergeConfig:
    out: str = option("runs/scores", "score directory whose shards to merge")


def open_windows(path: str, window: int, memmap_dtype: str):
    """Windows over any corpus dsel.data.corpus.open_corpus opens (a Megatron prefix, a token file, a
    directory or glob of dolma token files)."""
    from dsel.data.corpus import open_corpus
    from dsel.data.windows import Windows

    return Windows(open_corpus(path, memmap_dtype), window)


def check_scorer_tokenizer(scorer, windows) -> None:
    """Refuse a corpus tokenized with another tokenizer than any of the scorer's checkpoints (`scorer.checkpoints`)."""
    from dsel.data.meta import check_same_tokenizer
    from dsel.data.windows import corpus_prefix

    for checkpoint, meta in getattr(scorer, "checkpoints", ()):
        check_same_tokenizer(checkpoint, meta, corpus_prefix(windows.source))


def start_distributed(device: str):
    """(device, whether this call created the process group): under torchrun, joins its group and
    picks cuda:LOCAL_RANK for device auto/cuda when GPUs exist."""
    import torch

    from dsel.score.engine import join_torchrun

    world = int(os.environ.get("WORLD_SIZE", "1"))
    gpu = device != "cpu" and torch.cuda.is_available()
    if device == "auto" or (device == "cuda" and world > 1):
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}" if gpu else "cpu"
    device = torch.device(device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DselError(f"device={device} but no GPU is available")
        if device.index is not None:
            torch.cuda.set_device(device)  # nccl's barrier runs on the current device
    return device, join_torchrun("nccl" if device.type == "cuda" else "gloo")


def run_score(cfg: ScoreCommandConfig) -> Path:
    """Score the corpus with the named scorer on this process's shards; rank 0 merges."""
    import torch.distributed as dist

    from dsel.score.engine import score_windows
    from dsel.score.scorers import build_scorer

    check_writable(cfg.out)
    windows = open_windows(cfg.corpus, cfg.window, cfg.memmap_dtype)
    device, created = start_distributed(cfg.device)
    try:
        scorer = build_scorer(cfg.scorer, cfg.settings, device)
        check_scorer_tokenizer(scorer, windows)
        meta = {"scorer": cfg.scorer, "settings": cfg.settings, "corpus": cfg.corpus, "window": cfg.window}
        table = score_windows(windows, scorer, cfg.out, cfg.batch_size, shard_size=cfg.shard_size, device=device,
                              meta=meta)
        if table.is_file() and int(os.environ.get("RANK", "0")) == 0:
            print(f"scored {len(windows)} windows of {cfg.window} tokens with '{cfg.scorer}' -> {table}")
        return table
    finally:
        if created:
            dist.destroy_process_group()


def run_merge(cfg: ScoreMergeConfig) -> Path:
    """Merge finished shards into scores.parquet / scores.json / doc_scores.parquet."""
    from dsel.score.engine import merge_scores

    table = merge_scores(cfg.out)
    print(f"merged -> {table}")
    return table


COMMANDS = [
    Command("score", "score every window of a corpus with a registered scorer (torchrun-aware, resumable)",
            ScoreCommandConfig, run_score),
    Command("score merge", "check and merge finished score shards into scores.parquet", ScoreMergeConfig, run_merge),
]
