"""`dsel train`: pretrain or fine-tune a GPT with the torch backend (CPU or one GPU) or megatron-core.

    dsel train data=[data/selected] valid=data/valid out=runs/main preset=pds-160m tokens=1000000000
    dsel train -c configs/train.yaml backend=megatron parallel.tp=2     # under torchrun

Running the same command again after a kill resumes from the last checkpoint in `out`.

    dsel export dsel model=runs/main out=runs/main/model-step-3000   # a megatron run's sharded checkpoint -> dsel
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

from dsel.cli import Command
from dsel.config import option
from dsel.io import check_free_space, writes_output
from dsel.train.config import TrainConfig

log = logging.getLogger(__name__)


@writes_output()
def run_train(cfg: TrainConfig):
    """Train with the configured backend; returns the checkpoint directory out/model."""
    from dsel.models.checkpoint import checkpoint_bytes
    from dsel.train.torch_backend import model_config

    # the model and the resume state (weights and two Adam moments), each written beside the previous one
    check_free_space(cfg.out, 4 * checkpoint_bytes(model_config(cfg)), "the checkpoint and training state")
    if cfg.backend == "megatron":
        from dsel.train.megatron.backend import train
    else:
        from dsel.train.torch_backend import train
    path = train(cfg)
    log.info("model checkpoint: %s", path)
    return path


@dataclass
class ExportDselConfig:
    """`dsel export dsel`: one dsel checkpoint from a megatron backend's sharded checkpoint (any layout)."""

    model: str = option(help="a megatron run's out/ (its latest checkpoint), out/state/megatron/, or a step-N folder")
    out: str = option(help="the dsel checkpoint folder to write (model.pt, config.json, meta.json)")


@writes_output()
def run_export_dsel(cfg: ExportDselConfig):
    """Read the checkpoint's weights in this one process and write them as a dsel checkpoint."""
    from dsel.train.megatron.checkpoint import export

    path = export(cfg.model, cfg.out)
    log.info("dsel checkpoint: %s", path)
    return path


COMMANDS = [
    Command("train", "pretrain or fine-tune a GPT (torch or megatron backend); resumes after a kill", TrainConfig,
            run_train),
    Command("export dsel", "convert a megatron backend's sharded checkpoint (any TP/PP/DP layout) into one dsel "
                           "checkpoint", ExportDselConfig, run_export_dsel),
]
