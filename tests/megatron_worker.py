"""Run by torchrun from the megatron tests: train each TrainConfig of a JSON list with the megatron backend.

    torchrun --nproc_per_node 2 tests/megatron_worker.py runs.json

Every run writes its out/ directory (log.jsonl, model/); the test reads those. One process
group serves all runs, so the megatron import and gloo start-up are paid once. A run with
"interrupt_after": N is stopped after step N (as if killed) and then started again, to resume.
"""
import json
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
warnings.filterwarnings("ignore")

from dsel.config import from_dict  # noqa: E402
from dsel.train.config import TrainConfig  # noqa: E402
from dsel.train.megatron import backend  # noqa: E402


class Interrupted(Exception):
    """Stands in for a kill after some step."""


def interrupt_after(last_step: int):
    def on_step(step: int, row: dict) -> None:
        if step == last_step:
            raise Interrupted

    return on_step


def main(spec_path: str) -> None:
    torch.distributed.init_process_group("gloo", init_method="env://")
    for settings in json.loads(Path(spec_path).read_text()):
        last_step = settings.pop("interrupt_after", None)
        cfg = from_dict(TrainConfig, settings, spec_path)
        if last_step is not None:
            try:
                backend.train(cfg, on_step=interrupt_after(last_step))
            except Interrupted:
                pass
        backend.train(cfg)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
