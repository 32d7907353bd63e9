"""`dsel train`: pretrain or fine-tune a GPT with the torch backend (CPU or one GPU) or megatron-core.

    dsel train data=[data/selected] valid=data/valid out=runs/main preset=pds-160m tokens=1000000000
    dsel train -c configs/train.yaml backend=megatron parallel.tp=2     # under torchrun

Running the same command again after a kill resumes from the last checkpoint in `out`.
"""
from __future__ import annotations

import logging

from dsel.cli import Command
from dsel.io import writes_output
from dsel.train.config import TrainConfig

log = logging.getLogger(__name__)


@writes_output()
def run_train(cfg: TrainConfig):
    """Train with the configured backend; returns the checkpoint directory out/model."""
    if cfg.backend == "megatron":
        from dsel.train.megatron.backend import train
    else:
        from dsel.train.torch_backend import train
    path = train(cfg)
    log.info("model checkpoint: %s", path)
    return path


COMMANDS = [Command("train", "pretrain or fine-tune a GPT (torch or megatron backend); resumes after a kill",
                    TrainConfig, run_train)]
