"""`dsel color finetune` and `dsel color score`: CoLoR-Filter's conditional model and its scores.

    dsel color finetune prior=ckpt/prior target=target.jsonl out=ckpt/cond
    dsel color score corpus=data/pool prior=ckpt/prior cond=ckpt/cond out=scores/color

`score` writes, per window of the corpus, `loss_prior`, `loss_cond` and `color = loss_prior -
loss_cond` (plus `loss_<name>` for any extra model) through the score engine; `dsel select` then
keeps the top 1/tau by `color` (or by `-loss_cond` for the conditional-only baseline).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from dsel.cli import Command
from dsel.color.config import ColorScorerConfig, Precision
from dsel.config import option, to_dict
from dsel.errors import DselError

log = logging.getLogger(__name__)


@dataclass(kw_only=True)
class ColorScoreConfig(ColorScorerConfig):
    """`dsel color score`: per-window losses of each model and the CoLoR score, in shards."""

    corpus: str = option(help="Megatron dataset prefix of the pool to score (prefix.bin / prefix.idx)")
    out: str = option(help="output directory (shards, then scores.parquet)")
    window: Optional[int] = option(None, "tokens per window; None = the models' context length")
    batch_size: int = option(64, "windows per batch handed to the scorer")
    shard_size: Optional[int] = option(None, "windows per shard file; None = 64 batches")
    device: str = option("auto", "cpu, cuda, cuda:N or auto")


@dataclass
class ColorFinetuneConfig:
    """`dsel color finetune`: the prior trained for one epoch on target data -> conditional model."""

    prior: str = option(help="prior model checkpoint to start from")
    target: str = option(help="target data: a .jsonl file of texts, or a Megatron dataset prefix")
    out: str = option(help="checkpoint directory of the conditional model")
    text_key: str = option("text", "jsonl field holding the text")
    tokenizer: Optional[str] = option(None, "sentencepiece model for jsonl targets; None = the prior's (from its meta)")
    epochs: int = option(1, "passes over the target data (the paper: 1)")
    batch_size: int = option(16, "sequences per step")
    lr: float = option(1e-3, "AdamW learning rate (the paper: 1e-3)")
    weight_decay: float = option(0.0, "AdamW weight decay")
    warmup: int = option(0, "linear warmup steps")
    min_lr_ratio: float = option(1.0, "cosine decay to this fraction of lr over the run; 1.0 = constant lr")
    grad_clip: float = option(1.0, "gradient norm clip (0 = off)")
    seed: int = option(0, "seed of the data order")
    device: str = option("auto", "cpu, cuda, cuda:N or auto")
    precision: Precision = option("auto", "auto = bf16 autocast on GPU, fp32 on CPU")


def resolve_device(name: str):
    """A torch.device; "auto" picks the GPU when there is one."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(name)
    except RuntimeError:
        raise DselError(f"device must be cpu, cuda, cuda:N or auto, got {name!r}") from None


def check_data_matches(prefix: str, models) -> None:
    """Refuse data tokenized with another tokenizer than the models (`ScoredModel`s; from the meta sidecar)."""
    from dsel.data.meta import read_meta

    if not Path(f"{prefix}.meta.json").is_file():
        log.warning("%s.meta.json not found: cannot check its tokenizer against the models", prefix)
        return
    data = read_meta(prefix)
    for m in models:
        for key in ("vocab_size", "tokenizer_sha256"):
            have, want = m.meta.get(key), data.get(key)
            if have is not None and want is not None and have != want:
                raise DselError(f"{m.checkpoint}: model has {key}={have!r} but data {prefix} has {key}={want!r}")


def run_score(cfg: ColorScoreConfig):
    """Score every window of the corpus with the models; returns the score table's path."""
    from dsel.color.scorer import load_scorer
    from dsel.data.indexed import IndexedDataset
    from dsel.data.windows import Windows
    from dsel.score.engine import score_windows

    device = resolve_device(cfg.device)
    scorer = load_scorer(cfg, device)
    window = cfg.window or min(m.context for m in scorer.models)
    scorer.check_window(window)
    check_data_matches(cfg.corpus, scorer.models)
    windows = Windows(IndexedDataset(cfg.corpus), window)
    meta = {"scorer": "color", "corpus": cfg.corpus, "window": window,
            "models": {m.name: m.checkpoint for m in scorer.models}, "micro_batch": cfg.micro_batch}
    table = score_windows(windows, scorer, cfg.out, cfg.batch_size, shard_size=cfg.shard_size, device=device, meta=meta)
    log.info("CoLoR scores of %d windows -> %s", len(windows), table)
    return table


def target_pieces(cfg: ColorFinetuneConfig, prior, length: int):
    """The target data as pieces of at most `length` tokens, in the vocabulary of `prior` (a ScoredModel)."""
    from dsel.color.target import (check_token_range, dataset_documents, read_jsonl_texts, split_documents,
                                   tokenize_texts)

    if cfg.target.endswith((".jsonl", ".json")):
        tokenizer_path = cfg.tokenizer or prior.meta.get("tokenizer")
        if not tokenizer_path:
            raise DselError(f"{cfg.prior}: checkpoint records no tokenizer; set tokenizer= to tokenize {cfg.target}")
        from dsel.data.tokenize import load_tokenizer

        tokenizer = load_tokenizer(tokenizer_path)
        if prior.meta.get("tokenizer_sha256") not in (None, tokenizer.sha256):
            raise DselError(f"{tokenizer_path}: not the tokenizer the prior {cfg.prior} was trained with (sha256 differs)")
        documents = tokenize_texts(read_jsonl_texts(cfg.target, cfg.text_key), tokenizer)
    else:
        check_data_matches(cfg.target, [prior])
        documents = dataset_documents(cfg.target)
    pieces = split_documents(documents, length)
    if not pieces:
        raise DselError(f"{cfg.target}: no target document has 2 or more tokens")
    check_token_range(pieces, prior.vocab_size, cfg.target)
    return pieces


def run_finetune(cfg: ColorFinetuneConfig):
    """Fine-tune the prior on the target data and save the conditional model."""
    from dsel.color.finetune import finetune_model
    from dsel.color.scorer import ScoredModel
    from dsel.color.target import epoch_batches
    from dsel.models.checkpoint import load_model, save_model

    device = resolve_device(cfg.device)
    model, meta = load_model(cfg.prior, device)
    pieces = target_pieces(cfg, ScoredModel("prior", model, cfg.prior, meta), model.config.seq_len + 1)
    batches = [b for epoch in range(cfg.epochs) for b in epoch_batches(pieces, cfg.batch_size, 0, cfg.seed + epoch)]
    losses = finetune_model(model, batches, len(batches), lr=cfg.lr, weight_decay=cfg.weight_decay, warmup=cfg.warmup,
                            min_lr_ratio=cfg.min_lr_ratio, grad_clip=cfg.grad_clip, device=device,
                            precision=cfg.precision)
    meta = {**meta, "finetune": {**to_dict(cfg), "steps": len(losses), "first_loss": losses[0], "last_loss": losses[-1]}}
    save_model(cfg.out, model, meta)
    log.info("conditional model (%d steps on %d target pieces) -> %s", len(losses), len(pieces), cfg.out)
    return Path(cfg.out)


COMMANDS = [
    Command("color finetune", "fine-tune the prior on target data (one epoch, AdamW lr 1e-3) -> conditional model",
            ColorFinetuneConfig, run_finetune),
    Command("color score", "per-window losses of prior and conditional models and the CoLoR score, in shards",
            ColorScoreConfig, run_score),
]
