"""A dsel GPTConfig as a megatron-core GPTModel: config translation, parallel state, seeding.

The megatron model computes the same function as `dsel.models.gpt.GPT` (pre-norm, RoPE
rotate-half, gelu or swiglu, layernorm or rmsnorm, optional biases, tied or untied head, GQA),
so weights move between the two with `dsel.train.megatron.convert`.
"""
from __future__ import annotations

import importlib.util
import os
import socket
import warnings

import torch
import torch.nn.functional as F

from dsel.errors import DselError
from dsel.models.config import GPTConfig
from dsel.train.megatron import shim


def use_transformer_engine() -> bool:
    """Whether to build with Transformer Engine's layer spec: it is installed and there is a GPU to run it."""
    return torch.cuda.is_available() and importlib.util.find_spec("transformer_engine") is not None


def check_parallel_sizes(config: GPTConfig, tp: int, pp: int, world_size: int, source: str = "train config",
                         vpp: int = 1) -> None:
    """Raise a one-line DselError when the model or the world cannot be split tp x pp (x vpp chunks) ways."""
    if tp < 1 or pp < 1 or vpp < 1:
        raise DselError(f"{source}: parallel.tp={tp}, parallel.pp={pp} and parallel.vpp={vpp} must be >= 1")
    if vpp > 1 and pp < 2:
        raise DselError(f"{source}: parallel.vpp={vpp} needs parallel.pp > 1 (it interleaves model chunks over "
                        f"the pipeline ranks)")
    if world_size % (tp * pp):
        raise DselError(f"{source}: world size {world_size} is not divisible by tp*pp = {tp}*{pp}; "
                        f"start tp*pp*dp processes with torchrun --nproc_per_node")
    sizes = {"n_head": config.n_head, "n_query_groups (kv heads)": config.kv_heads,
             "ffn_hidden": config.ffn_size, "vocab_size": config.vocab_size}
    for name, value in sizes.items():
        if value % tp:
            raise DselError(f"{source}: model {name}={value} is not divisible by parallel.tp={tp}")
    if config.n_layer % pp:
        raise DselError(f"{source}: model n_layer={config.n_layer} is not divisible by parallel.pp={pp}")
    if config.n_layer % (pp * vpp):
        raise DselError(f"{source}: model n_layer={config.n_layer} is not divisible by parallel.pp*parallel.vpp = "
                        f"{pp}*{vpp} (every model chunk holds the same number of layers)")


def check_sequence_parallel(tp: int, source: str = "train config") -> None:
    """Sequence parallelism splits activations over tp ranks and needs Transformer Engine's norms: megatron-core's
    local spec (torch LayerNorm/RMSNorm) refuses it."""
    if tp < 2:
        raise DselError(f"{source}: parallel.sequence_parallel needs parallel.tp > 1 (it splits over the tp ranks)")
    if not use_transformer_engine():
        raise DselError(f"{source}: parallel.sequence_parallel needs Transformer Engine on GPUs (megatron-core's "
                        f"local layer spec has no sequence-parallel norm); pip install transformer-engine[pytorch]")


def init_parallel(tp: int, pp: int, vpp: int = 1) -> None:
    """Start torch.distributed from torchrun's environment (gloo on CPU, nccl on GPU) and megatron's groups.

    Without torchrun (no MASTER_ADDR) it starts a one-process group on a free local port.
    """
    quiet_megatron_warnings()
    from megatron.core import parallel_state

    shim.activate()
    if not torch.distributed.is_initialized():
        if "MASTER_ADDR" not in os.environ:
            os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), RANK="0", WORLD_SIZE="1")
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo", init_method="env://")
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                             virtual_pipeline_model_parallel_size=vpp if vpp > 1 else None)


def quiet_megatron_warnings() -> None:
    """Drop megatron-core's import-time notices that TE/Apex are missing (one per module and rank).

    Without them it uses its local layer spec and torch's optimizers, which is what this backend
    expects on a machine without Transformer Engine.
    """
    for message in (r"Transformer Engine and Apex are not installed", r"Apex is not installed",
                    r"full scope is deprecated"):
        warnings.filterwarnings("ignore", message=message, category=UserWarning)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def seed_everything(seed: int) -> None:
    """megatron's model_parallel_cuda_manual_seed, on the CPU generator when there is no GPU.

    Every rank seeds torch with `seed`; the RNG tracker gets megatron's named streams (data
    parallel: seed, tensor parallel: seed + 2718 + tp_rank, expert: seed + 1024 + ...).
    """
    from megatron.core import parallel_state, tensor_parallel
    from megatron.core.tensor_parallel import random

    torch.manual_seed(seed)
    if torch.cuda.is_available():
        tensor_parallel.model_parallel_cuda_manual_seed(seed)
        return
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    seeds = {random._DATA_PARALLEL_RNG_TRACKER_NAME: seed,
             random._MODEL_PARALLEL_RNG_TRACKER_NAME: seed + 2718 + tp_rank,
             random._EXPERT_PARALLEL_RNG_TRACKER_NAME: seed + 1024}
    random.initialize_rng_tracker(force_reset=True)
    tracker = tensor_parallel.get_cuda_rng_tracker()
    tracker.reset()
    tracker.set_states({name: torch.Generator().manual_seed(s).get_state() for name, s in seeds.items()})


def transformer_config(config: GPTConfig, tp: int = 1, pp: int = 1, bf16: bool = False, initialize: bool = True,
                       sequence_parallel: bool = False, vpp: int = 1):
    """The megatron TransformerConfig of a dsel GPTConfig: no dropout, and only fusions that compute what the
    dsel GPT computes (bias-dropout-add on GPUs); `initialize=False` skips megatron's random init (the caller
    fills the weights: megatron still allocates each rank's slice and marks its tensor-parallel attributes,
    which perform_initialization=False would skip)."""
    from megatron.core.transformer import TransformerConfig

    swiglu = config.activation == "swiglu"
    dtype = torch.bfloat16 if bf16 else torch.float32
    on_gpu = torch.cuda.is_available()
    return TransformerConfig(
        num_layers=config.n_layer, hidden_size=config.d_model, num_attention_heads=config.n_head,
        num_query_groups=config.kv_heads, kv_channels=config.head_dim, ffn_hidden_size=config.ffn_size,
        normalization="RMSNorm" if config.norm == "rmsnorm" else "LayerNorm", layernorm_epsilon=config.norm_eps,
        add_bias_linear=config.bias, add_qkv_bias=config.bias,
        gated_linear_unit=swiglu, activation_func=F.silu if swiglu else F.gelu,
        hidden_dropout=0.0, attention_dropout=0.0, init_method_std=config.init_std,
        **({} if initialize else {"init_method": _keep, "output_layer_init_method": _keep}),
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, sequence_parallel=sequence_parallel,
        virtual_pipeline_model_parallel_size=vpp if vpp > 1 else None,
        params_dtype=dtype, pipeline_dtype=dtype, bf16=bf16,
        use_cpu_initialization=not on_gpu,
        bias_activation_fusion=False,  # megatron's fused bias-gelu is the tanh approximation of gelu
        masked_softmax_fusion=False, bias_dropout_fusion=on_gpu, apply_rope_fusion=False,
        gradient_accumulation_fusion=False, persist_layer_norm=False,
    )


def _keep(tensor: torch.Tensor) -> torch.Tensor:
    """An init method that leaves the freshly allocated weight as it is (the caller fills it)."""
    return tensor


def layer_spec(config: GPTConfig):
    """Transformer Engine's layer spec when it can run, megatron's local spec otherwise."""
    from megatron.core.models.gpt import gpt_layer_specs

    if use_transformer_engine():
        return gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec()
    normalization = "RMSNorm" if config.norm == "rmsnorm" else "LayerNorm"
    return gpt_layer_specs.get_gpt_layer_local_spec(normalization=normalization)


def build_model(config: GPTConfig, tp: int = 1, pp: int = 1, bf16: bool = False, initialize: bool = True,
                sequence_parallel: bool = False, vpp: int = 1, vp_stage: int | None = None):
    """This rank's megatron GPTModel stage, or with vpp > 1 its model chunk `vp_stage` (parallel state must be
    initialised); only its shard is allocated."""
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel

    shim.activate()
    model = GPTModel(
        config=transformer_config(config, tp, pp, bf16, initialize, sequence_parallel, vpp),
        transformer_layer_spec=layer_spec(config), vocab_size=config.vocab_size, max_sequence_length=config.seq_len,
        pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage),
        post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage), vp_stage=vp_stage,
        share_embeddings_and_output_weights=config.tie_embeddings, position_embedding_type="rope",
        rotary_base=config.rope_base, parallel_output=True,
    )
    return model.cuda() if torch.cuda.is_available() else model


def position_ids(tokens: torch.Tensor) -> torch.Tensor:
    """Positions 0..L-1 for every row of a [B, L] token batch."""
    return torch.arange(tokens.shape[1], device=tokens.device).unsqueeze(0).expand_as(tokens)
