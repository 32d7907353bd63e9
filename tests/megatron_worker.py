"""Run by torchrun from the megatron tests: train each TrainConfig of a JSON list with the megatron backend.

    torchrun --nproc_per_node 2 tests/megatron_worker.py runs.json

Every run writes its out/ directory (log.jsonl, model/); the test reads those. One process
group serves all runs, so the megatron import and gloo start-up are paid once.
- "interrupt_after": N stops a run after step N (as if killed); it is then started again, in
  the same out/, or, with "resume_as": [{settings}, ...], in a copy of out/ per entry, with those
  settings changed (another layout: the sharded checkpoint is resharded).
- {"probe": {...}, "record": PATH} builds one layout's model on every rank, with the full dsel GPT
  forbidden anywhere, and writes each rank's parameter count and peak RSS to PATH.
"""
import json
import resource
import shutil
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


def train_interrupted(cfg: TrainConfig, last_step: int) -> None:
    try:
        backend.train(cfg, on_step=interrupt_after(last_step))
    except Interrupted:
        pass


def forbid_full_model() -> None:
    """Make building a dsel GPT with real weights, or the torch backend's model, fail on this rank."""
    from dsel.models import gpt
    from dsel.train import torch_backend

    original = gpt.GPT.reset_parameters

    def only_on_meta(self, *args, **kwargs):
        assert all(p.device.type == "meta" for p in self.parameters()), "a full dsel GPT was built on a rank"
        return original(self, *args, **kwargs)

    gpt.GPT.reset_parameters = only_on_meta
    torch_backend.build_model = None


def probe(settings: dict, record: str) -> None:
    """Build the layout's model on every rank; rank r writes record.r.json {tp_rank, pp_rank, params, max_rss_kb}."""
    from megatron.core import parallel_state

    from dsel.train import torch_backend
    from dsel.train.megatron import model as megatron_model, shards

    cfg = from_dict(TrainConfig, settings)
    config = torch_backend.model_config(cfg)
    forbid_full_model()
    megatron_model.init_parallel(cfg.parallel.tp, cfg.parallel.pp, cfg.parallel.vpp)
    megatron_model.seed_everything(cfg.seed)
    model = backend.build_parallel_model(cfg, config, bf16=False)
    row = {"tp_rank": parallel_state.get_tensor_model_parallel_rank(),
           "pp_rank": parallel_state.get_pipeline_model_parallel_rank(), "params": shards.parameter_count(model),
           "max_rss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}
    Path(f"{record}.{torch.distributed.get_rank()}.json").write_text(json.dumps(row))
    parallel_state.destroy_model_parallel()


def main(spec_path: str) -> None:
    torch.distributed.init_process_group("gloo", init_method="env://")
    for settings in json.loads(Path(spec_path).read_text()):
        if "probe" in settings:
            probe(settings["probe"], settings["record"])
            continue
        last_step = settings.pop("interrupt_after", None)
        resume_as = settings.pop("resume_as", None)
        cfg = from_dict(TrainConfig, settings, spec_path)
        if last_step is not None:
            train_interrupted(cfg, last_step)
        for changes in resume_as or [{}]:
            resumed = from_dict(TrainConfig, {**settings, **changes}, spec_path)
            if resumed.out != cfg.out and torch.distributed.get_rank() == 0:
                shutil.copytree(cfg.out, resumed.out)
            torch.distributed.barrier()
            backend.train(resumed)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
