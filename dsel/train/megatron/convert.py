"""dsel GPT state_dict <-> megatron-core GPTModel state_dicts, one per (pipeline stage, tensor rank).

The dsel GPT's parameter names are megatron's local-spec names and its qkv weight already has
megatron's grouped layout ([groups, (heads_per_group + 2) * head_dim, d]), so the mapping is:

- tensor parallelism splits, per rank r of tp:
  column-parallel outputs (dim 0): linear_qkv (whole query groups, so a plain chunk),
  linear_fc1 (swiglu: the gate and the up halves are chunked separately, rank r gets
  [gate_r; up_r]), the vocab-parallel word embedding and output layer;
  row-parallel inputs (dim 1): linear_proj, linear_fc2 (their biases are not split);
  norms are replicated;
- pipeline parallelism gives stage s the layers [s * n, (s + 1) * n) renumbered from 0; the
  first stage holds the embedding, the last the final norm and the output layer (with tied
  embeddings the last stage of a pipeline keeps its own copy of the embedding as output_layer);
- Transformer Engine's spec fuses the pre-attention / pre-MLP norms into the next linear
  (`linear_qkv.layer_norm_weight`, `linear_fc1.layer_norm_weight`).
"""
from __future__ import annotations

import re
from typing import Iterable, Iterator, Mapping

import torch

from dsel.errors import DselError
from dsel.models.config import GPTConfig

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")
# Tensor-parallel split dimension of each weight (by name suffix); absent = replicated.
_COLUMN = ("self_attention.linear_qkv.weight", "self_attention.linear_qkv.bias", "mlp.linear_fc1.weight",
           "mlp.linear_fc1.bias", "embedding.word_embeddings.weight", "output_layer.weight")
_ROW = ("self_attention.linear_proj.weight", "mlp.linear_fc2.weight")
# dsel (local spec) name -> Transformer Engine spec name, inside a layer.
_TE_NAMES = {
    "input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight",
    "input_layernorm.bias": "self_attention.linear_qkv.layer_norm_bias",
    "pre_mlp_layernorm.weight": "mlp.linear_fc1.layer_norm_weight",
    "pre_mlp_layernorm.bias": "mlp.linear_fc1.layer_norm_bias",
}
_FROM_TE = {te: local for local, te in _TE_NAMES.items()}


def stage_layers(config: GPTConfig, pp_rank: int, pp: int) -> range:
    """Global indices of the layers pipeline stage `pp_rank` holds (even split)."""
    per_stage = config.n_layer // pp
    return range(pp_rank * per_stage, (pp_rank + 1) * per_stage)


def _split_dim(name: str) -> int | None:
    if name.endswith(_COLUMN):
        return 0
    if name.endswith(_ROW):
        return 1
    return None


def _is_swiglu_fc1(name: str, config: GPTConfig) -> bool:
    return config.activation == "swiglu" and ".mlp.linear_fc1." in f".{name}"


def _shard(name: str, tensor: torch.Tensor, config: GPTConfig, tp_rank: int, tp: int) -> torch.Tensor:
    """This tensor-parallel rank's slice of a full weight."""
    dim = _split_dim(name)
    if dim is None or tp == 1:
        return tensor
    if _is_swiglu_fc1(name, config):
        gate, up = tensor.chunk(2, dim=0)
        return torch.cat([gate.chunk(tp, dim=0)[tp_rank], up.chunk(tp, dim=0)[tp_rank]], dim=0)
    return tensor.chunk(tp, dim=dim)[tp_rank]


def _unshard(name: str, pieces: list[torch.Tensor], config: GPTConfig) -> torch.Tensor:
    """The full weight from every tensor-parallel rank's slice (inverse of `_shard`)."""
    dim = _split_dim(name)
    if dim is None or len(pieces) == 1:
        return pieces[0]
    if _is_swiglu_fc1(name, config):
        halves = [piece.chunk(2, dim=0) for piece in pieces]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=0)
    return torch.cat(pieces, dim=dim)


def _te_name(name: str) -> str:
    match = _LAYER.match(name)
    if match and match.group(2) in _TE_NAMES:
        return f"decoder.layers.{match.group(1)}.{_TE_NAMES[match.group(2)]}"
    return name


def _local_name(name: str) -> str:
    match = _LAYER.match(name)
    if match and match.group(2) in _FROM_TE:
        return f"decoder.layers.{match.group(1)}.{_FROM_TE[match.group(2)]}"
    return name


def to_megatron(state: Mapping[str, torch.Tensor], config: GPTConfig, tp_rank: int = 0, tp: int = 1,
                pp_rank: int = 0, pp: int = 1, te: bool = False) -> dict[str, torch.Tensor]:
    """The state_dict of megatron stage (pp_rank, tp_rank) from a full dsel GPT state_dict."""
    return dict(megatron_tensors(state, config, tp_rank, tp, pp_rank, pp, te))


def megatron_tensors(state: Mapping[str, torch.Tensor], config: GPTConfig, tp_rank: int = 0, tp: int = 1,
                     pp_rank: int = 0, pp: int = 1, te: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
    """(megatron name, this rank's slice) for every tensor of stage (pp_rank, tp_rank), one at a time.

    `state` may be a lazy mapping (dsel.train.megatron.shards): only the tensors this stage
    holds are read, and only this rank's slice of each is kept (a copy).
    """
    layers = stage_layers(config, pp_rank, pp)
    first, last = pp_rank == 0, pp_rank == pp - 1
    for full_name in state.keys():
        name, match = full_name, _LAYER.match(full_name)
        if match:
            index = int(match.group(1))
            if index not in layers:
                continue
            name = f"decoder.layers.{index - layers.start}.{match.group(2)}"
        elif name.startswith("embedding.") and not first:
            continue
        elif name.startswith(("decoder.final_layernorm.", "output_layer.")) and not last:
            continue
        yield _te_name(name) if te else name, _shard(name, state[full_name], config, tp_rank, tp).clone()
    if config.tie_embeddings and last and not first:
        yield "output_layer.weight", _shard("output_layer.weight", state["embedding.word_embeddings.weight"], config,
                                            tp_rank, tp).clone()


def from_megatron(shards: list[list[dict[str, torch.Tensor]]], config: GPTConfig) -> dict[str, torch.Tensor]:
    """A full dsel GPT state_dict from megatron state_dicts indexed [pp_rank][tp_rank]."""
    pp = len(shards)
    full: dict[str, torch.Tensor] = {}
    for pp_rank, stage in enumerate(shards):
        layers = stage_layers(config, pp_rank, pp)
        local = [{_local_name(k): v for k, v in shard.items() if not k.endswith("_extra_state")} for shard in stage]
        for name in local[0]:
            match = _LAYER.match(name)
            full_name = f"decoder.layers.{layers.start + int(match.group(1))}.{match.group(2)}" if match else name
            if full_name == "output_layer.weight" and config.tie_embeddings:
                continue
            full[full_name] = _unshard(name, [shard[name] for shard in local], config).detach().clone()
    return full


def load_shard(model: torch.nn.Module, shard: Mapping[str, torch.Tensor]) -> None:
    """Copy a converted shard into a megatron model; every parameter must be covered exactly."""
    copy_into(model, shard.items())


@torch.no_grad()
def copy_into(model: torch.nn.Module, tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
    """Copy (name, tensor) pairs into a megatron model as they come (a rank never holds its shard twice);
    every parameter must be covered exactly, with its shape."""
    own = {k: v for k, v in model.state_dict(keep_vars=True).items() if not k.endswith("_extra_state")}
    seen = set()
    for name, tensor in tensors:
        if name not in own:
            raise DselError(f"megatron model: checkpoint from another architecture (unexpected {name})")
        if own[name].shape != tensor.shape:
            raise DselError(f"megatron model: {name} has shape {tuple(tensor.shape)}, "
                            f"model expects {tuple(own[name].shape)}")
        own[name].copy_(tensor)
        seen.add(name)
    missing = sorted(set(own) - seen)
    if missing:
        raise DselError(f"megatron model: checkpoint from another architecture (missing {missing[:3]})")


def shard_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """This rank's weights as CPU tensors, without TE/megatron `_extra_state` entries."""
    return {k: v.detach().float().cpu() for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
