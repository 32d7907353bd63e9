"""Sharded training checkpoints with megatron-core dist_checkpointing (torch_dist format), and their export.

    out/state/megatron/latest.json     {"step": S, "layout": {...}}: the last complete checkpoint
    out/state/megatron/step-S/         megatron torch_dist: every rank writes its own shards of the
                                       weights and the optimizer state (*.distcp), rank 0 common.pt

Tensors are stored by their global shape and offset (megatron's sharded_state_dict: layers
stacked on a leading axis, tensor-parallel slices placed in the full tensor), so a checkpoint
saved at one tensor/pipeline/data-parallel layout loads at any other that divides the model.
The common state keeps what resuming checks (the run's settings, the architecture, the step).
`export` turns one checkpoint into a single dsel checkpoint folder in one process, reading only
the weights (not the optimizer state); `dsel export dsel` runs it.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import warnings
from pathlib import Path

import torch

from dsel.errors import DselError, file_error
from dsel.io import read_json, write_json
from dsel.models.config import GPTConfig

log = logging.getLogger(__name__)

FORMAT = "torch_dist"
# Optimizer state per parameter in the model's global layout (a distributed optimizer gathers its DP shards on DP
# rank 0 to write it): reshardable over DP, TP and PP.
OPTIMIZER_METADATA = {"distrib_optim_sharding_type": "fully_reshardable", "chained_optim_avoid_prefix": True}
_LAYERS = "decoder.layers."
_TE_NORMS = {"self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
             "self_attention.linear_qkv.layer_norm_bias": "input_layernorm.bias",
             "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight",
             "mlp.linear_fc1.layer_norm_bias": "pre_mlp_layernorm.bias"}


def model_keys(chunks: list) -> list[str]:
    """The state keys of a rank's model chunks, Megatron-LM's: `model`, or model0, model1, ... with vpp."""
    return ["model"] if len(chunks) == 1 else [f"model{i}" for i in range(len(chunks))]


def sharded_state(chunks: list, optimizer, loading: bool) -> dict:
    """megatron's sharded state dict of this rank's model chunks and optimizer (tensors keyed by their global
    layer index, so the chunking does not show in the stored tensors)."""
    prime_empty_state(optimizer)
    model_state = {key: model.sharded_state_dict() for key, model in zip(model_keys(chunks), chunks)}
    return {**model_state,
            "optimizer": optimizer.sharded_state_dict(model_state, is_loading=loading, metadata=OPTIMIZER_METADATA)}


@torch.no_grad()
def prime_empty_state(optimizer) -> None:
    """Give parameters without optimizer state what a fresh optimizer holds (Adam: zero moments; step 0).

    Without Apex or Transformer Engine, megatron's DistributedOptimizer reads a `step` from every
    parameter's state when it builds its checkpoint state, which fails before the first step (a
    resume) and always for plain SGD (no state). Adam started from zero moments at step 0 takes
    exactly the steps of a fresh one, so this changes no update.
    """
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    for part in getattr(optimizer, "chained_optimizers", [optimizer]):
        if not isinstance(part, DistributedOptimizer):
            continue
        inner = part.optimizer
        for group in inner.param_groups:
            for param in group["params"]:
                state = inner.state[param]
                if state:
                    continue
                if isinstance(inner, torch.optim.Adam):  # AdamW is an Adam
                    state["exp_avg"], state["exp_avg_sq"] = torch.zeros_like(param), torch.zeros_like(param)
                state["step"] = torch.tensor(0.0)


def save(folder: Path, chunks: list, optimizer, common: dict) -> None:
    """Collective: every rank writes its shards into the (new, empty) `folder`; `common` goes into common.pt."""
    from megatron.core import dist_checkpointing

    dist_checkpointing.save({**sharded_state(chunks, optimizer, loading=False), "dsel": common}, str(folder),
                            sharded_strategy=(FORMAT, 1))


def read_common(folder: Path) -> dict:
    """The dsel part of a checkpoint's common state (run settings, architecture, step, layout)."""
    from megatron.core import dist_checkpointing

    if not (folder / "common.pt").is_file() or not (folder / "metadata.json").is_file():
        raise file_error(folder, "is not a complete megatron checkpoint (common.pt or metadata.json missing)")
    try:
        common = dist_checkpointing.load_common_state_dict(str(folder))
    except Exception as e:  # megatron/torch raise many types for a corrupt file
        raise file_error(folder / "common.pt", f"cannot be read ({type(e).__name__}: {e})") from None
    if "dsel" not in common:
        raise file_error(folder, "is a megatron checkpoint, but not one written by dsel train")
    return common["dsel"]


def check_architecture(folder: Path, saved: dict, config: GPTConfig) -> None:
    """Refuse a checkpoint of another architecture, naming the first differing GPTConfig field."""
    mine = dataclasses.asdict(config)
    for key in sorted(set(saved) | set(mine)):
        if saved.get(key) != mine.get(key):
            raise file_error(folder, f"checkpoint of another architecture: {key}={saved.get(key)!r}, "
                                     f"this run has {key}={mine.get(key)!r}")


def check_shards(folder: Path) -> None:
    """Every shard file the checkpoint's index names is there (a rank's file lost or not copied)."""
    from torch.distributed.checkpoint import FileSystemReader

    try:
        metadata = FileSystemReader(str(folder)).read_metadata()
    except Exception as e:
        raise file_error(folder / ".metadata", f"cannot be read as a checkpoint index ({type(e).__name__})") from None
    files = sorted({info.relative_path for info in metadata.storage_data.values()})
    missing = [name for name in files if not (folder / name).is_file()]
    if missing:
        raise file_error(folder / missing[0], f"shard missing ({len(missing)} of {len(files)} shard files absent)")


def load(folder: Path, chunks: list, optimizer) -> None:
    """Collective: fill this rank's model chunks and optimizer from `folder`, whatever layout saved it."""
    from megatron.core import dist_checkpointing

    check_shards(folder)
    try:
        state = dist_checkpointing.load(sharded_state(chunks, optimizer, loading=True), str(folder))
    except Exception as e:  # a damaged shard surfaces deep in torch.distributed.checkpoint
        raise file_error(folder, f"cannot be loaded ({type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]})") from None
    for key, model in zip(model_keys(chunks), chunks):
        model.load_state_dict(state[key])
    load_optimizer(optimizer, state["optimizer"])


def load_optimizer(optimizer, state) -> None:
    """optimizer.load_state_dict, with a detour for a DistributedOptimizer over torch's Adam.

    Without Apex or Transformer Engine, megatron-core 0.16 keeps a per-parameter `step` in the
    torch optimizer state but its fully_reshardable loader copies every state key except `step`
    from the checkpoint, and fails on the missing key; and it gives every parameter the same `step`
    tensor, which torch's Adam then increments once per parameter per step (wrong bias
    correction). So: load the param groups and step first, set the per-parameter steps aside
    while the parameter state loads, and put back one step tensor per parameter.
    """
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    parts = getattr(optimizer, "chained_optimizers", [optimizer])
    states = [state] if len(parts) == 1 else [state[key] for key in sorted(state)]
    for part, part_state in zip(parts, states):
        if not isinstance(part, DistributedOptimizer):
            part.load_state_dict(part_state)
            continue
        part_state = dict(part_state)
        param_state = part_state.pop("param_state")
        part_state.pop("param_state_sharding_type")
        part.load_state_dict(part_state)
        steps = {param: s.pop("step") for param, s in part.optimizer.state.items() if "step" in s}
        part.load_parameter_state_from_fully_reshardable(param_state)
        for param, step in steps.items():
            part.optimizer.state[param]["step"] = step.clone()


# ---------------------------------------------------------------------------------------------
# Where the checkpoints live, and which is the latest


def latest_file(state_dir: Path) -> Path:
    return state_dir / "latest.json"


def latest(state_dir: Path) -> Path | None:
    """The last complete checkpoint folder under state_dir, or None."""
    path = latest_file(state_dir)
    if not path.is_file():
        return None
    return state_dir / f"step-{read_json(path)['step']}"


def save_step(state_dir: Path, step: int, chunks: list, optimizer, common: dict) -> Path:
    """Collective: write step-S (into a temporary folder, renamed once every rank is done), point latest.json
    at it and drop older steps; a kill at any moment leaves the previous checkpoint usable."""
    rank = torch.distributed.get_rank()
    folder, tmp = state_dir / f"step-{step}", state_dir / f".step-{step}.tmp"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    torch.distributed.barrier()
    save(tmp, chunks, optimizer, common)
    torch.distributed.barrier()
    if rank == 0:
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)
        write_json(latest_file(state_dir), {"step": step, "layout": common["layout"]})
        for old in state_dir.glob("step-*"):
            if old != folder:
                shutil.rmtree(old, ignore_errors=True)
    torch.distributed.barrier()
    return folder


# ---------------------------------------------------------------------------------------------
# Export: one checkpoint -> one dsel checkpoint folder (one process, no process group needed)


def resolve(path: str | Path) -> Path:
    """A checkpoint folder from a run's out/, its state/megatron/, or a step-S folder itself."""
    path = Path(path)
    for state_dir in (path / "state" / "megatron", path):
        if latest_file(state_dir).is_file():
            return latest(state_dir)
    if (path / "metadata.json").is_file():
        return path
    raise file_error(path, "no megatron checkpoint here (expected a run's out/, out/state/megatron/ or a step-N folder)")


def full_weights(folder: Path, config: GPTConfig) -> dict[str, torch.Tensor]:
    """The dsel GPT state_dict held by a checkpoint (the model's tensors only, read in this one process)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    check_shards(folder)
    reader = dcp.FileSystemReader(str(folder))
    stored = reader.read_metadata().state_dict_metadata
    tensors = {key: torch.empty(tuple(meta.size), dtype=meta.properties.dtype) for key, meta in stored.items()
               if isinstance(meta, TensorStorageMetadata) and not key.startswith("optimizer.")}
    dcp.load(tensors, storage_reader=reader, no_dist=True)
    weights = {}
    for key, tensor in tensors.items():
        if key == "output_layer.weight" and config.tie_embeddings:
            continue
        if not key.startswith(_LAYERS):
            weights[key] = tensor.float()
            continue
        name = _TE_NORMS.get(key[len(_LAYERS):], key[len(_LAYERS):])
        for layer in range(tensor.shape[0]):
            weights[f"{_LAYERS}{layer}.{name}"] = tensor[layer].float().clone()
    return weights


def export(path: str | Path, out: str | Path) -> Path:
    """Write the weights of the megatron checkpoint at `path` as a dsel checkpoint folder `out`."""
    from dsel.io import check_free_space
    from dsel.models.checkpoint import check_state_dict, checkpoint_bytes, save_model
    from dsel.models.gpt import GPT

    from dsel.train.megatron.model import quiet_megatron_warnings

    quiet_megatron_warnings()
    warnings.filterwarnings("ignore", message=r"torch.distributed is disabled", category=UserWarning)
    folder = resolve(path)
    common = read_common(folder)
    config = GPTConfig(**common["model"])
    check_free_space(out, checkpoint_bytes(config), "the exported checkpoint")
    weights = full_weights(folder, config)
    with torch.device("meta"):
        gpt = GPT(config)
    mismatch = check_state_dict(gpt, weights)
    if mismatch:
        raise DselError(f"{folder}: checkpoint does not hold a dsel GPT of its recorded architecture: {mismatch}")
    gpt.load_state_dict(weights, assign=True)
    save_model(out, gpt, {**common["meta"], "step": common["step"], "tokens": common["tokens"],
                          "parallel": common["layout"], "exported_from": str(folder)})
    log.info("exported %s -> %s", folder, out)
    return Path(out)
