"""`TrainConfig`: the settings of `dsel train`, shared by the torch and the megatron-core backends.

    dsel train data=[data/selected] valid=data/valid out=runs/pretrain preset=pds-160m steps=5000
    dsel train data=[data/target] init=runs/prior/model out=runs/cond lr=1e-4 steps=200   # fine-tune

Training length is `steps` optimizer steps, or `tokens` (rounded up to whole steps). One step sees
`batch_size * grad_accum` samples of `seq_len + 1` tokens (megatron-core GPTDataset samples; see
dsel.data.loader), so both backends read the same samples in the same order.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Literal, Optional

from dsel.config import from_dict, option
from dsel.errors import DselError
from dsel.models.config import GPTConfig, preset as preset_config
from dsel.train.schedule import Schedule


VOCAB_MULTIPLE = 128  # Megatron's make_vocab_size_divisible_by


def padded_vocab_size(vocab_size: int, multiple: int = VOCAB_MULTIPLE) -> int:
    """`vocab_size` rounded up to a multiple of `multiple` (GPU-friendly matmul shapes, as Megatron pads)."""
    return -(-vocab_size // multiple) * multiple


@dataclass
class ParallelConfig:
    """Model/data parallelism of the megatron backend (data parallel size = world size / (tp * pp))."""

    tp: int = option(1, "tensor-parallel size")
    pp: int = option(1, "pipeline-parallel size")
    vpp: int = option(1, "virtual pipeline stages (model chunks) per pp rank, megatron's "
                          "virtual_pipeline_model_parallel_size: the interleaved 1F1B schedule; needs pp > 1")
    distributed_optimizer: bool = option(False, "shard optimizer state over data-parallel ranks")
    overlap: bool = option(False, "overlap the data-parallel grad reduce with the backward pass (and, with "
                                  "distributed_optimizer, the param all-gather with the next forward)")
    sequence_parallel: bool = option(False, "split norms/dropout activations along the sequence over the tp ranks "
                                            "(needs tp > 1 and Transformer Engine)")


@dataclass
class TrainConfig:
    """`dsel train`: pretrain (or fine-tune, with `init`) a GPT on Megatron datasets or dolma token files."""

    data: list[str] = option(help="corpora to train on (Megatron prefixes, token files or directories of dolma token "
                                  "files); several are blended (see data_weights)")
    out: str = option(help="output directory: model/ (checkpoint), state/ (resume), log.jsonl, config.yaml")
    data_weights: Optional[list[float]] = option(None, "blend weights of several data prefixes; None = by token count")
    valid: Optional[str] = option(None, "held-out corpus for valid_loss (as data)")
    preset: Optional[str] = option(None, "model preset (dsel.models.config.PRESETS); None = init's architecture, else 'tiny'")
    arch: dict[str, Any] = option({}, "GPTConfig fields overriding the preset, e.g. {n_layer: 4, seq_len: 256}; "
                                      "vocab_size defaults to the data's tokenizer vocabulary padded to a multiple of 128",
                                  aliases=("model",))
    init: Optional[str] = option(None, "checkpoint to start from (fine-tuning): a dsel checkpoint or a transformers "
                                       "model folder (Llama, GPT-NeoX); None = random init")
    optimizer: Literal["adamw", "sgd"] = option("adamw", "adamw, or plain sgd (no momentum)")
    lr: float = option(3e-4, "peak learning rate")
    min_lr: float = option(3e-5, "learning rate of the last step (end of the cosine decay)")
    warmup: int = option(0, "linear warmup steps")
    schedule: Schedule = option("cosine", "cosine (warmup from 0, cosine to min_lr) | olmo (OLMo's CosWithWarmup: "
                                          "warmup from 0.1*lr, the official CoLoR-Filter schedule)")
    steps: Optional[int] = option(None, "optimizer steps (set this or tokens)")
    tokens: Optional[int] = option(None, "training tokens, rounded up to whole steps (set this or steps)")
    batch_size: int = option(8, "samples per micro-batch")
    grad_accum: int = option(1, "micro-batches per optimizer step")
    grad_clip: float = option(1.0, "gradient norm clip (0 = off)")
    weight_decay: float = option(0.1, "decoupled (AdamW) or L2 (SGD) weight decay of matrices; none on norms/biases")
    beta1: float = option(0.9, "AdamW beta1")
    beta2: float = option(0.95, "AdamW beta2")
    adam_eps: float = option(1e-8, "AdamW epsilon (the official CoLoR-Filter recipe: 1e-15)")
    z_loss: float = option(0.0, "weight of the z-loss, mean logsumexp(logits)^2 (OLMo/CoLoR-Filter: 1e-4); 0 = off")
    weights: Optional[str] = option(None, ".npy of per-sample loss weights indexed by training sample (PDS-style)")
    seed: int = option(1234, "seed of the model init and of the data order")
    eval_every: int = option(0, "steps between valid_loss evaluations (0 = only at the end)")
    eval_batches: int = option(8, "batches of held-out windows per evaluation")
    save_every: int = option(0, "steps between checkpoints (0 = only at the end)")
    device: str = option("auto", "cpu, cuda, cuda:N or auto")
    precision: Literal["auto", "bf16", "fp32"] = option("auto", "auto = bf16 autocast on GPU, fp32 on CPU")
    backend: Literal["torch", "megatron"] = option("torch", "torch (CPU or one GPU) or megatron (torchrun, TP/PP/DP)")
    parallel: ParallelConfig = option(help="megatron backend: tp, pp, distributed_optimizer", default_factory=ParallelConfig)
    log: str = option("log.jsonl", "per-step log file, relative to out")

    def __post_init__(self):
        self.check()

    def check(self) -> None:
        """Raise a DselError for settings that cannot train."""
        if not self.data:
            raise DselError("train config: 'data' needs at least one dataset prefix")
        if (self.steps is None) == (self.tokens is None):
            raise DselError("train config: set exactly one of 'steps' and 'tokens'")
        if self.data_weights is not None and len(self.data_weights) != len(self.data):
            raise DselError(f"train config: {len(self.data_weights)} data_weights for {len(self.data)} data prefixes")
        if self.data_weights is not None and (min(self.data_weights) < 0 or sum(self.data_weights) <= 0):
            raise DselError("train config: data_weights must be non-negative with a positive sum")
        positive = {"batch_size": self.batch_size, "grad_accum": self.grad_accum, "lr": self.lr,
                    "steps": 1 if self.steps is None else self.steps,
                    "tokens": 1 if self.tokens is None else self.tokens, "eval_batches": self.eval_batches}
        for name, value in positive.items():
            if value <= 0:
                raise DselError(f"train config: '{name}' must be positive, got {value}")
        if not 0 <= self.min_lr <= self.lr:
            raise DselError(f"train config: min_lr={self.min_lr} must be in [0, lr={self.lr}]")
        if self.adam_eps <= 0 or self.z_loss < 0:
            raise DselError(f"train config: adam_eps={self.adam_eps} must be > 0 and z_loss={self.z_loss} >= 0")
        if self.backend == "megatron" and (self.z_loss or self.arch.get("qk_layernorm")
                                           or self.arch.get("norm_bias") is False):
            raise DselError("train config: z_loss, arch.qk_layernorm and arch.norm_bias=false are torch-backend "
                            "features (megatron-core's QK norm is per head); use backend=torch")
        for name in ("warmup", "eval_every", "save_every"):
            if getattr(self, name) < 0:
                raise DselError(f"train config: '{name}' must be >= 0, got {getattr(self, name)}")

    def model_config(self, init_config: GPTConfig | None = None, data_vocab: int | None = None) -> GPTConfig:
        """The GPTConfig to train: preset (or the init checkpoint's config) with `arch` overrides.

        Without init and without an explicit `arch.vocab_size`, the vocabulary is the data's
        tokenizer vocabulary `data_vocab` padded to a multiple of 128, as Megatron pads it.
        """
        if self.preset is not None:
            base = preset_config(self.preset)
        else:
            base = init_config or preset_config("tiny")
        names = {f.name for f in dataclasses.fields(GPTConfig)}
        unknown = sorted(set(self.arch) - names)
        if unknown:
            raise DselError(f"train config: unknown arch setting '{unknown[0]}'; GPTConfig has {', '.join(sorted(names))}")
        merged = {**dataclasses.asdict(base), **self.arch}
        if data_vocab and init_config is None and "vocab_size" not in self.arch:
            merged["vocab_size"] = padded_vocab_size(data_vocab)
        return from_dict(GPTConfig, merged, "train config: arch").validate("train config: arch")

    def num_steps(self, seq_len: int) -> int:
        """Optimizer steps: `steps`, or `tokens` rounded up to whole steps of batch_size*grad_accum*seq_len."""
        if self.steps is not None:
            return self.steps
        return math.ceil(self.tokens / (self.batch_size * self.grad_accum * seq_len))

    @property
    def samples_per_step(self) -> int:
        return self.batch_size * self.grad_accum

    def evaluates_after(self, step: int, steps: int) -> bool:
        """Whether the held-out loss is measured after `step` of `steps` (every eval_every, and at the end)."""
        return step == steps or bool(self.eval_every and step % self.eval_every == 0)

    def saves_after(self, step: int, steps: int) -> bool:
        """Whether a checkpoint is written after `step` of `steps` (every save_every, and at the end)."""
        return step == steps or bool(self.save_every and step % self.save_every == 0)
