"""Each rank builds only its own tensor/pipeline shard of the model; the full model exists nowhere.

The megatron model of a rank is built with megatron-core's own per-rank construction (every
layer allocates only its slice; megatron's random init is skipped, `perform_initialization=False`)
and filled from a *lazy* full state: `SeededWeights` draws a dsel GPT parameter only when asked
for it, from a generator that depends on (seed, name) alone (`dsel.models.gpt.parameter_generator`,
the torch backend's init too), and `checkpoint_weights` memory-maps an `init` checkpoint.
`convert.megatron_tensors` then reads just this stage's tensors, one at a time, and each
rank's slice is copied into the model as it comes. A rank's peak memory is its shard plus one full tensor (the largest: the
embedding), and every layout starts from the weights the torch backend starts from.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator, Mapping

import torch

from dsel.errors import DselError, file_error
from dsel.models.checkpoint import check_state_dict
from dsel.models.config import GPTConfig
from dsel.models.gpt import GPT, init_parameter_, parameter_generator
from dsel.train.megatron import convert, model as megatron_model


def meta_gpt(config: GPTConfig) -> GPT:
    """A dsel GPT on the meta device: names, shapes and config, no storage."""
    with torch.device("meta"):
        return GPT(config)


class SeededWeights(Mapping):
    """The initial weights of a dsel GPT for `seed`, each tensor drawn when it is read (and not kept)."""

    def __init__(self, config: GPTConfig, seed: int):
        self.config, self.seed = config, seed
        self.shapes = {name: p.shape for name, p in meta_gpt(config).state_dict().items()}

    def __getitem__(self, name: str) -> torch.Tensor:
        tensor = torch.empty(self.shapes[name])
        init_parameter_(name, tensor, self.config, parameter_generator(self.seed, name))
        return tensor

    def __iter__(self) -> Iterator[str]:
        return iter(self.shapes)

    def __len__(self) -> int:
        return len(self.shapes)


class SafetensorsWeights(Mapping):
    """The tensors of a .safetensors file, each read from disk when it is asked for (and not kept)."""

    def __init__(self, path: Path):
        from safetensors import safe_open

        self.path = path
        with safe_open(str(path), framework="pt") as f:
            self.names = list(f.keys())
            self.shapes = {name: torch.Size(f.get_slice(name).get_shape()) for name in self.names}

    def __getitem__(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        with safe_open(str(self.path), framework="pt") as f:
            return f.get_tensor(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)


def checkpoint_weights(path: str | Path, config: GPTConfig) -> Mapping[str, torch.Tensor]:
    """An `init` checkpoint's weights, read lazily (a rank reads only the tensors of its stage), checked to fit.

    model.safetensors is read tensor by tensor, a legacy model.pt is memory-mapped; a Hugging Face
    folder is converted whole by dsel.models.hf (its tensors are renamed and split on the way).
    """
    from dsel.models import checkpoint, hf

    path = Path(path)
    try:
        if hf.is_hf_folder(path):
            state = hf.load_hf_state(path)
        elif (path / checkpoint.WEIGHTS).is_file():
            state = SafetensorsWeights(path / checkpoint.WEIGHTS)
        elif (path / checkpoint.LEGACY_WEIGHTS).is_file():
            state = torch.load(path / checkpoint.LEGACY_WEIGHTS, map_location="cpu", weights_only=True, mmap=True)
        else:
            raise file_error(path / checkpoint.WEIGHTS, "model weights not found")
    except DselError:
        raise
    except Exception as e:  # safetensors and torch raise many types for a corrupt file
        raise file_error(path, f"cannot be read as model weights ({type(e).__name__})") from None
    shapes = state.shapes if isinstance(state, SafetensorsWeights) else {k: v.shape for k, v in state.items()}
    mismatch = check_state_dict(meta_gpt(config), {k: torch.empty(v, device="meta") for k, v in shapes.items()})
    if mismatch:
        raise file_error(path, f"checkpoint from another architecture: {mismatch}")
    return state


def initial_weights(config: GPTConfig, seed: int, init: str | None) -> Mapping[str, torch.Tensor]:
    """The run's starting weights as a lazy full state: `init`'s, or drawn from `seed`."""
    return SeededWeights(config, seed) if init is None else checkpoint_weights(init, config)


def build_rank_model(config: GPTConfig, tp: int, pp: int, bf16: bool, weights: Mapping[str, torch.Tensor],
                     sequence_parallel: bool = False, vpp: int = 1) -> list:
    """This rank's megatron model chunks (parallel state initialised), each holding its slice of `weights`: one
    stage, or with vpp > 1 the chunks of virtual stages pp_rank, pp_rank + pp, ... (megatron's interleaving)."""
    from megatron.core import parallel_state

    tp_rank, pp_rank = parallel_state.get_tensor_model_parallel_rank(), parallel_state.get_pipeline_model_parallel_rank()
    chunks = []
    for vp_stage in range(vpp):
        model = megatron_model.build_model(config, tp, pp, bf16, initialize=False, sequence_parallel=sequence_parallel,
                                           vpp=vpp, vp_stage=vp_stage if vpp > 1 else None)
        convert.copy_into(model, convert.megatron_tensors(weights, config, tp_rank, tp, vp_stage * pp + pp_rank, pp * vpp,
                                                          te=megatron_model.use_transformer_engine()))
        chunks.append(model)
    return chunks


def parameter_count(chunks: list) -> int:
    """Elements of the parameters this rank holds (over its model chunks)."""
    return sum(p.numel() for model in chunks for p in model.parameters())
