"""`PipelineConfig`: the settings of `dsel run`, one YAML file from corpus to report.

Each method section passes settings through to the stage's own command config (`dsel train`,
`dsel pds solve`, `dsel color finetune`, `dsel select`, ...): the pipeline fills in the paths
(data, model, out) and `check_stage_settings` builds every stage config before anything runs, so
a typo in any section fails at once with the stage's own one-line error.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from dsel.config import option
from dsel.errors import DselError

log = logging.getLogger(__name__)

BUNDLED = Path(__file__).resolve().parent.parent / "data" / "bundled"
Method = Literal["pds", "color", "cond-only", "rho-down", "dsir"]
Until = Literal["finetune", "score", "select", "report"]
UNTIL_ORDER = ("finetune", "score", "select", "report")


@dataclass
class DataConfig:
    """The corpus to select from, the target the selection aims at, and held-out validation sets."""

    pool: str = option("bundled", "corpus to select from (jsonl[.gz]/parquet/txt file, directory or glob); "
                                  "'bundled' = dsel's six-domain corpus")
    target: str = option("bundled", "target documents the selection aims at; 'bundled' = held-out science documents")
    valid: dict[str, str] = option({}, "held-out validation sets, name: file; {} with a bundled pool = one per domain")
    target_valid: str = option("science", "the validation set that measures the target (report's headline loss)")
    tokenizer: str = option("", "tokenizer of every set (sentencepiece .model, Hugging Face tokenizer.json or "
                                "folder); '' = train a sentencepiece model on the pool")
    vocab_size: int = option(2048, "sentencepiece vocabulary trained on the pool (when no tokenizer is given)")
    text_field: str = option("text", "jsonl/parquet field of the document text")
    id_field: str = option("id", "jsonl/parquet field of the document id ('' = <file>:<record>)")
    domain_field: str = option("domain", "jsonl field naming each document's domain ('' = none): per-domain shares")
    workers: int = option(2, "tokenizer worker processes")


@dataclass
class PdsConfig:
    """PDS: solve data weights on a proxy sample of the pool, fit a scorer, score the pool."""

    proxy_windows: int = option(512, "pool windows sampled uniformly (seeded, `dsel pds proxy`) as the proxy set")
    target_windows: int = option(0, "target examples (documents) used by the solve's J (0 = all)")
    solve: dict[str, Any] = option({}, "`dsel pds solve` settings (e.g. {solver: {steps: 20, lr: 0.5}})")
    fit: dict[str, Any] = option({}, "`dsel pds fit-scorer` settings (e.g. {fit: {epochs: 3, lr: 1e-4}})")
    score: dict[str, Any] = option({}, "`dsel pds score` settings (batch_size, device)")
    select: dict[str, Any] = option({"method": "gumbel", "column": "pds", "temperature": 0.1},
                                    "`dsel select` settings (the token budget is set by the pipeline)")


@dataclass
class ColorConfig:
    """CoLoR-Filter: fine-tune the prior on the target, score the pool by loss reduction."""

    finetune: dict[str, Any] = option({}, "`dsel color finetune` settings (epochs, lr, batch_size)")
    score: dict[str, Any] = option({}, "`dsel color score` settings (batch_size, micro_batch, device)")
    select: dict[str, Any] = option({"method": "color", "column": "color"},
                                    "`dsel select` settings (the token budget is set by the pipeline)")


@dataclass
class BaselinesConfig:
    """The CoLoR-Filter paper's baselines beside random: cond-only, rho-down, dsir (arms in `methods`)."""

    rho_down_tau: float | None = option(None, "rho-down: each step keeps n of tau*n random pool windows; "
                                              "None = 1/budget (the selection ratio of the other arms)")
    dsir_workers: int = option(1, "dsir: processes of the data-selection package")


@dataclass
class EvalConfig:
    """Evaluation of every pretrained model."""

    max_batches: int = option(0, "held-out batches per validation set (0 = every window)")
    batch_size: int = option(16, "windows per forward pass")
    lm_eval_tasks: list[str] = option(["dsel_science_facts"], "lm-eval tasks run on every model ([] = none)")
    builtin_tasks: bool = option(False, "index lm-eval's built-in tasks too (needed for e.g. hellaswag; slower)")


@dataclass
class PipelineConfig:
    """`dsel run`: tokenize -> prior -> PDS and/or CoLoR -> select -> pretrain selected vs random -> eval -> report."""

    run_dir: str = option("runs/quickstart", "every stage writes run_dir/<stage>/ and is skipped once done")
    methods: list[Method] = option(["pds", "color"], "selection arms, each compared with random data: pds, color, and "
                                                     "the CoLoR paper's baselines cond-only (-loss_cond), rho-down "
                                                     "(online, during pretraining), dsir (data-selection package)")
    until: Until = option("report", "stop after this phase: finetune (models ready to score: hand scoring to "
                                    "torchrun), score, select (pretrain at scale with `torchrun -m dsel train`), report")
    budget: float = option(0.25, "share of the pool's tokens every selection (and the random baseline) keeps")
    seed: int = option(0, "seed of the proxy sample, the random baseline and every training run")
    device: str = option("auto", "cpu, cuda, cuda:N or auto (every stage)")
    data: DataConfig = field(default_factory=DataConfig, metadata={"help": "corpus, target and validation data"})
    model: dict[str, Any] = option({"preset": "tiny"}, "the GPT of every stage: `dsel train` preset and "
                                                       "arch overrides, e.g. {preset: tiny, arch: {seq_len: 128}}")
    prior: dict[str, Any] = option({"steps": 200}, "`dsel train` settings of the proxy/prior LM (on the pool)")
    pretrain: dict[str, Any] = option({"steps": 300}, "`dsel train` settings of every pretraining run (same for all)")
    pds: PdsConfig = field(default_factory=PdsConfig, metadata={"help": "PDS settings"})
    color: ColorConfig = field(default_factory=ColorConfig, metadata={"help": "CoLoR-Filter settings"})
    baselines: BaselinesConfig = field(default_factory=BaselinesConfig, metadata={"help": "rho-down and dsir settings"})
    eval: EvalConfig = field(default_factory=EvalConfig, metadata={"help": "evaluation settings"})

    def __post_init__(self):
        for section in ("model", "prior", "pretrain"):
            setattr(self, section, with_arch(getattr(self, section), section))


def with_arch(settings: dict, section: str) -> dict:
    """`dsel train` settings of a run-config section with the old name of `arch` (`model`, kept for one
    release) renamed, so the pipeline's merge of shared and per-stage settings sees one key."""
    if "model" not in settings:
        return settings
    log.warning("run config: '%s.model' is deprecated and will be removed; use '%s.arch'", section, section)
    if "arch" in settings:
        raise DselError(f"run config: both '{section}.model' (deprecated) and '{section}.arch' are set")
    return {("arch" if key == "model" else key): value for key, value in settings.items()}
