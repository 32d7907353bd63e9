"""`dsel color train-prior|finetune|score`: CoLoR-Filter's prior and conditional models and scores.

    dsel color train-prior corpus=data/pool fraction=0.1 out=runs/prior train.steps=20000
    dsel color finetune prior=runs/prior/model target=target.jsonl out=ckpt/cond
    dsel color score corpus=data/pool prior=ckpt/prior cond=ckpt/cond out=scores/color

`score` writes, per window of the corpus, `loss_prior`, `loss_cond` and `color = loss_prior -
loss_cond` (plus `loss_<name>` for any extra model) through the score engine; `dsel select` then
keeps the top 1/tau by `color` (or by `-loss_cond` for the conditional-only baseline).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional

from dsel.cli import Command
from dsel.color.config import ColorScorerConfig, Precision
from dsel.train.schedule import Schedule
from dsel.config import option, to_dict
from dsel.errors import DselError
from dsel.io import check_free_space, check_writable, writes_output

log = logging.getLogger(__name__)

TargetFormat = Literal["pieces", "sft", "chunks"]

# The official prior (color-filter-olmo configs/base.yaml): batch 256 = 64 x 4, AdamW lr 1e-3, betas (0.9, 0.95),
# eps 1e-15, wd 0, clip 1.0, z-loss 1e-4, OLMo's cosine with 1000 warmup steps to 0.1x.
PRIOR_RECIPE = {"preset": "color-150m", "batch_size": 64, "grad_accum": 4, "lr": 1e-3, "min_lr": 1e-4, "warmup": 1000,
                "schedule": "olmo", "weight_decay": 0.0, "beta1": 0.9, "beta2": 0.95, "adam_eps": 1e-15,
                "z_loss": 1e-4, "grad_clip": 1.0}


@dataclass(kw_only=True)
class ColorScoreConfig(ColorScorerConfig):
    """`dsel color score`: per-window losses of each model and the CoLoR score, in shards."""

    corpus: str = option(help="corpus: Megatron dataset prefix, or a headerless .bin/.npy token file (dolma)")
    out: str = option(help="output directory (shards, then scores.parquet)")
    window: Optional[int] = option(None, "tokens per window; None = the models' context length")
    batch_size: int = option(64, "windows per batch handed to the scorer")
    shard_size: Optional[int] = option(None, "windows per shard file; None = 64 batches")
    device: str = option("auto", "auto | cpu | cuda | cuda:N (under torchrun, auto = cuda:LOCAL_RANK)")
    memmap_dtype: str = option("uint16", "token dtype of headerless token files")


@dataclass
class ColorTrainPriorConfig:
    """`dsel color train-prior`: the prior LM, trained by `dsel train` on a random slice of the corpus."""

    corpus: str = option(help="Megatron dataset prefix of the corpus")
    out: str = option(help="output directory: slice.* (the documents trained on) and dsel train's model/, state/, log.jsonl")
    fraction: float = option(1.0, "fraction of the corpus documents, drawn at random, to train on (1.0 = all)")
    seed: int = option(0, "seed of the random slice")
    train: dict[str, Any] = option({}, "dsel train settings (TrainConfig) other than data and out, e.g. "
                                       "{steps: 24000}; unset ones default to the official prior recipe "
                                       "(PRIOR_RECIPE: preset color-150m, lr 1e-3, wd 0, eps 1e-15, z-loss 1e-4, ...)")


@dataclass
class ColorFinetuneConfig:
    """`dsel color finetune`: the prior trained for one epoch on target data -> conditional model.

    Defaults are the official recipe (color-filter-olmo configs/base.yaml + sweeps/finetune-down.yaml):
    a fresh AdamW (lr 1e-3, betas 0.9/0.95, eps 1e-15, wd 0), global batch 256, 100 warmup steps
    (Books: 20) and OLMo's cosine to 0.1x, z-loss 1e-4, gradient clip 1.0.
    """

    prior: str = option(help="prior model checkpoint to start from")
    target: str = option(help="target data: a .jsonl file of texts, or a tokenized corpus (Megatron prefix, "
                                   "token file or directory of dolma token files)")
    out: str = option(help="checkpoint directory of the conditional model")
    text_key: str = option("text", "jsonl field holding the text")
    tokenizer: Optional[str] = option(None, "tokenizer for jsonl targets (sentencepiece .model, tokenizer.json or "
                                            "folder); None = the prior's (from its meta)")
    target_format: TargetFormat = option("pieces", "pieces (documents + EOD, padding masked out) | sft (official "
                                                   "downstream: no EOS, right-padded, pad targets trained on) | "
                                                   "chunks (official Books: the stream cut into full rows)")
    pad_id: Optional[int] = option(None, "sft padding token; None = the tokenizer's pad id, else its EOD id")
    epochs: int = option(1, "passes over the target data (the paper: 1)")
    batch_size: int = option(256, "sequences per step (official: global batch 256)")
    lr: float = option(1e-3, "AdamW peak learning rate (official: 1e-3)")
    weight_decay: float = option(0.0, "AdamW weight decay (official: 0)")
    adam_eps: float = option(1e-15, "AdamW epsilon (official: 1e-15)")
    warmup: int = option(100, "warmup steps (official: 100 downstream, 20 Books)")
    schedule: Schedule = option("olmo", "olmo (OLMo's CosWithWarmup, official) | cosine (dsel train's)")
    min_lr_ratio: float = option(0.1, "cosine decay to this fraction of lr at the last step (official alpha_f 0.1); "
                                      "1.0 = constant after warmup")
    z_loss: float = option(1e-4, "z-loss weight (official softmax_auxiliary_loss: 1e-4); 0 = off")
    grad_clip: float = option(1.0, "gradient norm clip (0 = off)")
    seed: int = option(0, "seed of the data order")
    device: str = option("auto", "cpu, cuda, cuda:N or auto")
    precision: Precision = option("auto", "auto = bf16 autocast on GPU, fp32 on CPU")

    def __post_init__(self):
        if self.epochs < 1 or self.batch_size < 1 or self.warmup < 0 or self.lr <= 0 or self.adam_eps <= 0:
            raise DselError("color finetune: epochs and batch_size must be >= 1, warmup >= 0, lr and adam_eps > 0")
        if not 0 <= self.min_lr_ratio <= 1 or self.z_loss < 0:
            raise DselError(f"color finetune: min_lr_ratio={self.min_lr_ratio} must be in [0, 1], z_loss >= 0")


def check_data_matches(prefix: str, models) -> None:
    """Refuse data tokenized with another tokenizer than the models (`ScoredModel`s; from the meta sidecar)."""
    from dsel.data.meta import check_same_tokenizer

    for m in models:
        check_same_tokenizer(m.checkpoint, m.meta, prefix)


def random_slice(prefix: str, fraction: float, seed: int, out_prefix: str) -> str:
    """Write a seeded random `fraction` of the documents of `prefix` (kept in corpus order) as `out_prefix`."""
    import numpy as np

    from dsel.data.indexed import IndexedDataset, subset_dataset
    from dsel.data.meta import write_derived_meta

    if not 0 < fraction <= 1:
        raise DselError(f"fraction must be in (0, 1], got {fraction}")
    if fraction == 1:
        return prefix
    from dsel.data.corpus import open_corpus

    if not isinstance(open_corpus(prefix), IndexedDataset):
        raise DselError(f"{prefix}: fraction={fraction} slices a Megatron dataset; token files train whole (fraction=1)")
    num_documents = IndexedDataset(prefix).num_documents
    count = max(1, round(fraction * num_documents))
    ids = np.sort(np.random.default_rng(seed).choice(num_documents, size=count, replace=False))
    sliced = subset_dataset(prefix, ids, out_prefix)
    write_derived_meta(prefix, sliced, slice_of=prefix, fraction=fraction, seed=seed)
    log.info("prior slice: %d of %d documents of %s -> %s", count, num_documents, prefix, out_prefix)
    return out_prefix


@writes_output()
def run_train_prior(cfg: ColorTrainPriorConfig):
    """Train the prior on a random slice of the corpus with `dsel train`; returns the checkpoint directory."""
    from dsel.config import from_dict
    from dsel.train.commands import run_train
    from dsel.train.config import TrainConfig

    reserved = sorted({"data", "out"} & set(cfg.train))
    if reserved:
        raise DselError(f"train.{reserved[0]}: set by color train-prior (from corpus, fraction and out); remove it")
    data = random_slice(cfg.corpus, cfg.fraction, cfg.seed, str(Path(cfg.out) / "slice"))
    settings = {**PRIOR_RECIPE, **cfg.train, "data": [data], "out": cfg.out}
    if "min_lr" not in cfg.train and "lr" in cfg.train:  # keep the official 0.1x floor under another lr
        settings["min_lr"] = 0.1 * float(settings["lr"])
    train_cfg = from_dict(TrainConfig, settings, "color train-prior: train")
    return run_train(train_cfg)


def run_score(cfg: ColorScoreConfig):
    """Score every window of the corpus with the models (this rank's shards; rank 0 merges)."""
    import torch.distributed as dist

    from dsel.color.scorer import load_scorer
    from dsel.data.windows import corpus_prefix
    from dsel.models.checkpoint import checkpoint_digest
    from dsel.score.commands import open_windows, start_distributed
    from dsel.score.engine import score_windows

    check_writable(cfg.out)
    device, created = start_distributed(cfg.device)
    try:
        scorer = load_scorer(cfg, device)
        window = cfg.window or min(m.context for m in scorer.models)
        scorer.check_window(window)
        windows = open_windows(cfg.corpus, window, cfg.memmap_dtype)
        check_data_matches(corpus_prefix(windows.source), scorer.models)
        meta = {"scorer": "color", "corpus": cfg.corpus, "window": window, "micro_batch": cfg.micro_batch,
                "precision": cfg.precision, "models": {m.name: m.checkpoint for m in scorer.models},
                "digests": {m.name: checkpoint_digest(m.checkpoint) for m in scorer.models}}
        table = score_windows(windows, scorer, cfg.out, cfg.batch_size, shard_size=cfg.shard_size, device=device,
                              meta=meta)
    finally:
        if created:
            dist.destroy_process_group()
    log.info("CoLoR scores of %d windows -> %s", len(windows), table)
    return table


def target_documents(cfg: ColorFinetuneConfig, prior) -> tuple[list, int]:
    """The target documents (each ending with EOD) in the vocabulary of `prior` (a ScoredModel), and the pad id."""
    from dsel.color.target import dataset_documents, read_jsonl_texts, tokenize_texts

    if cfg.target.endswith((".jsonl", ".json")):
        tokenizer_path = cfg.tokenizer or prior.meta.get("tokenizer")
        if not tokenizer_path:
            raise DselError(f"{cfg.prior}: checkpoint records no tokenizer; set tokenizer= to tokenize {cfg.target}")
        from dsel.data.meta import tokenizer_mismatch
        from dsel.data.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(tokenizer_path)
        key = tokenizer_mismatch(prior.meta, tokenizer.identity())
        if key:
            raise DselError(f"{tokenizer_path}: not the tokenizer the prior {cfg.prior} was trained with ({key} "
                            f"{tokenizer.identity()[key]!r}, the prior's {prior.meta[key]!r})")
        pad = getattr(tokenizer, "pad_id", None)
        return tokenize_texts(read_jsonl_texts(cfg.target, cfg.text_key), tokenizer), (
            pad if pad is not None and pad >= 0 else tokenizer.eod_id)
    from dsel.data.corpus import sidecar_prefix
    from dsel.data.meta import meta_path, read_meta

    prefix = sidecar_prefix(cfg.target)
    check_data_matches(prefix, [prior])
    eod = read_meta(prefix)["eod_id"] if Path(meta_path(prefix)).is_file() else 0
    return dataset_documents(cfg.target), eod


def target_pieces(cfg: ColorFinetuneConfig, prior, length: int):
    """The target data as rows of at most `length` tokens in cfg.target_format (dsel.color.target)."""
    from dsel.color.target import check_token_range, sft_rows, split_documents, stream_chunks

    documents, pad_id = target_documents(cfg, prior)
    if cfg.target_format == "sft":  # the official rows have no EOS: drop the EOD each document ends with
        pad_id = pad_id if cfg.pad_id is None else cfg.pad_id
        eod = documents[0][-1]
        pieces = sft_rows([d[:-1] if d[-1] == eod else d for d in documents if len(d) > 1], length, pad_id)
    elif cfg.target_format == "chunks":
        pieces = stream_chunks(documents, length)
    else:
        pieces = split_documents(documents, length)
    if not pieces:
        raise DselError(f"{cfg.target}: no target row of {cfg.target_format} (the data is shorter than one "
                        f"{length}-token row)" if cfg.target_format == "chunks" else
                        f"{cfg.target}: no target document has 2 or more tokens")
    check_token_range(pieces, prior.vocab_size, cfg.target)
    return pieces


@writes_output()
def run_finetune(cfg: ColorFinetuneConfig):
    """Fine-tune the prior on the target data and save the conditional model."""
    from dsel.color.finetune import finetune_model
    from dsel.color.scorer import ScoredModel
    from dsel.color.target import epoch_batches
    from dsel.device import resolve_device
    from dsel.models.checkpoint import checkpoint_bytes, load_model, save_model

    device = resolve_device(cfg.device)
    model, meta = load_model(cfg.prior, device)
    pieces = target_pieces(cfg, ScoredModel("prior", model, cfg.prior, meta), model.config.seq_len + 1)
    check_free_space(cfg.out, checkpoint_bytes(model.config), "the conditional model")
    drop_last = cfg.target_format != "pieces"  # the official loader drops the last partial batch
    batches = [b for epoch in range(cfg.epochs)
               for b in epoch_batches(pieces, cfg.batch_size, 0, cfg.seed + epoch, drop_last)]
    if not batches:
        raise DselError(f"{cfg.target}: {len(pieces)} target rows make no full batch of batch_size={cfg.batch_size}")
    losses = finetune_model(model, batches, len(batches), lr=cfg.lr, weight_decay=cfg.weight_decay, warmup=cfg.warmup,
                            min_lr_ratio=cfg.min_lr_ratio, grad_clip=cfg.grad_clip, device=device,
                            precision=cfg.precision, adam_eps=cfg.adam_eps, z_loss=cfg.z_loss, schedule=cfg.schedule)
    meta = {**meta, "finetune": {**to_dict(cfg), "steps": len(losses), "first_loss": losses[0], "last_loss": losses[-1]}}
    save_model(cfg.out, model, meta)
    log.info("conditional model (%d steps on %d target pieces) -> %s", len(losses), len(pieces), cfg.out)
    return Path(cfg.out)


COMMANDS = [
    Command("color train-prior", "train the prior LM on a random slice of the corpus (via dsel train)",
            ColorTrainPriorConfig, run_train_prior),
    Command("color finetune", "fine-tune the prior on target data (the official recipe: one epoch, AdamW lr 1e-3, "
                              "warmup + cosine to 0.1x, batch 256) -> conditional model",
            ColorFinetuneConfig, run_finetune),
    Command("color score", "per-window losses of prior and conditional models and the CoLoR score, in shards",
            ColorScoreConfig, run_score),
]
