"""The megatron-core training backend: the torch backend's model and data with TP, PP and DP.

    torchrun --nproc_per_node 4 -m dsel train -c train.yaml backend=megatron parallel.tp=2 parallel.pp=2

Every rank builds only its own tensor/pipeline slice of the model (dsel.train.megatron.shards:
the torch backend's seeded init, or `init`'s weights, read tensor by tensor) in a megatron
GPTModel (local layer spec, or Transformer Engine's when it is installed on a GPU machine), and
trains it with megatron's DistributedDataParallel, its optimizer (`parallel.distributed_optimizer`
shards the optimizer state over data-parallel ranks) and its pipeline schedules; `parallel.vpp` > 1
gives each pipeline rank that many model chunks (virtual stages pp_rank, pp_rank + pp, ...) run by
megatron's interleaved 1F1B schedule, which takes micro-batches in groups of pp. Step s reads the
torch backend's samples [s*B*A, (s+1)*B*A) (B = batch_size, A = grad_accum micro-batches);
data-parallel rank r takes rows [r*B/dp, (r+1)*B/dp) of each micro-batch, so every layout
computes the same loss, the same learning-rate schedule and the same clipped updates as the
torch backend.

Process groups are gloo on a CPU machine (with `dsel.train.megatron.shim`) and nccl on GPUs.
Rank 0 writes the torch backend's out/ layout: log.jsonl, config.yaml and, at the end, model/ (a
dsel checkpoint exported from the last sharded checkpoint). out/state/megatron/step-S/ is a
megatron dist_checkpointing checkpoint (every rank writes its own shards of weights and optimizer
state); running the command again resumes from it, also with another tp/pp/dp layout and world
size (the weights and optimizer state are resharded; training draws no random numbers after the
init, dropout being 0, so no RNG state is needed). `dsel export dsel model=OUT out=DIR` turns any
such checkpoint into a dsel checkpoint.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import os
from pathlib import Path
from typing import Callable

import torch

from dsel.config import save_config, to_dict
from dsel.errors import DselError, file_error
from dsel.io import progress, read_json
from dsel.train.config import TrainConfig
from dsel.train.megatron import checkpoint, model as megatron_model, shards
from dsel.train.torch_backend import RESUMABLE_CHANGES

log = logging.getLogger(__name__)
RESUMABLE = RESUMABLE_CHANGES + ("parallel", "out")  # a resumed megatron run may also change its layout


def world_size() -> int:
    """Processes started by torchrun (1 without it)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def check_layout(cfg: TrainConfig, config, world: int) -> int:
    """The data-parallel size, after checking the model, the world and the batch split tp x pp x dp ways."""
    tp, pp = cfg.parallel.tp, cfg.parallel.pp
    megatron_model.check_parallel_sizes(config, tp, pp, world, vpp=cfg.parallel.vpp)
    if cfg.parallel.sequence_parallel:
        megatron_model.check_sequence_parallel(tp)
    dp = world // (tp * pp)
    if cfg.parallel.vpp > 1 and cfg.grad_accum % pp:
        raise DselError(f"train config: grad_accum={cfg.grad_accum} is not a multiple of parallel.pp={pp}; megatron's "
                        f"interleaved schedule (parallel.vpp={cfg.parallel.vpp}) runs micro-batches in groups of pp")
    if cfg.batch_size % dp:
        raise DselError(f"train config: batch_size={cfg.batch_size} is not divisible by the data-parallel size {dp} "
                        f"(world {world} / tp {tp} / pp {pp})")
    return dp


def check_device(cfg: TrainConfig) -> None:
    """The megatron backend trains on the GPUs it sees, or on the CPU when it sees none: `device` must agree."""
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise DselError(f"train config: device={cfg.device} but no GPU is visible")
    if cfg.device == "cpu" and torch.cuda.is_available():
        raise DselError("train config: device=cpu, but the megatron backend uses every GPU it sees; "
                        "hide them with CUDA_VISIBLE_DEVICES= to train on the CPU")


def use_bf16(cfg: TrainConfig) -> bool:
    """bf16 weights (fp32 main params in the optimizer) on GPUs with precision auto|bf16."""
    return cfg.precision == "bf16" or (cfg.precision == "auto" and torch.cuda.is_available())


def compute_device() -> torch.device:
    """This rank's GPU (set from LOCAL_RANK by init_parallel), or the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def build_parallel_model(cfg: TrainConfig, config, bf16: bool) -> list:
    """This rank's megatron model chunks (one per virtual pipeline stage; one without vpp) holding only its slice
    of the run's initial weights, wrapped for bf16 if asked."""
    from megatron.core.transformer.module import Float16Module

    weights = shards.initial_weights(config, cfg.seed, cfg.init)
    chunks = shards.build_rank_model(config, cfg.parallel.tp, cfg.parallel.pp, bf16, weights,
                                     sequence_parallel=cfg.parallel.sequence_parallel, vpp=cfg.parallel.vpp)
    return [Float16Module(model.config, model) if bf16 else model for model in chunks]


def wrap_ddp(chunks: list, cfg: TrainConfig) -> list:
    """megatron's DistributedDataParallel per model chunk (contiguous fp32 grad buffers, all-reduce or
    reduce-scatter); like Megatron-LM, only the first chunk splits its grads into buckets."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads

    overlap, distributed = cfg.parallel.overlap, cfg.parallel.distributed_optimizer
    ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=overlap,
                                               overlap_param_gather=overlap and distributed,
                                               use_distributed_optimizer=distributed)
    ddps = [DistributedDataParallel(config=model.config, ddp_config=ddp_config, module=model,
                                    disable_bucketing=index > 0) for index, model in enumerate(chunks)]
    config = ddps[0].config  # the schedules read their hooks from the first chunk's config
    for ddp in ddps:
        ddp.config.finalize_model_grads_func = finalize_model_grads  # DP grad sync + tied-embedding grads across PP
    if overlap:  # reduce each bucket as its grads are ready, on the last micro-batch only
        config.no_sync_func = ddps[0].no_sync if len(ddps) == 1 else [ddp.no_sync for ddp in ddps]
    return ddps


def synced_params(ddps: list):
    """Finish an overlapped param all-gather and pause the forward pre-hooks (for evaluation and saving), then
    resume them; nothing to do without overlap_param_gather."""
    overlapped = ddps[0].ddp_config.overlap_param_gather

    @contextlib.contextmanager
    def paused():
        if overlapped:
            for ddp in ddps:
                ddp.disable_forward_pre_hook()
        try:
            yield
        finally:
            if overlapped:
                for ddp in ddps:
                    ddp.enable_forward_pre_hook()

    return paused()


def make_optimizer(ddps: list, cfg: TrainConfig, bf16: bool):
    """megatron's AdamW or plain SGD (optionally distributed), clipping at cfg.grad_clip; no decay on norms/biases."""
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    config = OptimizerConfig(
        optimizer="adam" if cfg.optimizer == "adamw" else "sgd", lr=cfg.lr, min_lr=cfg.min_lr,
        weight_decay=cfg.weight_decay, adam_beta1=cfg.beta1, adam_beta2=cfg.beta2, adam_eps=cfg.adam_eps, sgd_momentum=0.0,
        clip_grad=cfg.grad_clip, bf16=bf16, params_dtype=torch.bfloat16 if bf16 else torch.float32,
        use_distributed_optimizer=cfg.parallel.distributed_optimizer,
    )
    optimizer = get_megatron_optimizer(config, ddps)
    for ddp in ddps:
        ddp.config.grad_scale_func = optimizer.scale_loss
    return optimizer


def set_lr(optimizer, lr: float, weight_decay: float) -> None:
    """This step's learning rate and weight decay on every param group (megatron's lr/wd multipliers)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_mult", 1.0)
        group["weight_decay"] = weight_decay * group.get("wd_mult", 1.0)


def window_losses_step(data_iterator, model):
    """megatron forward_step_func: micro-batch (tokens [b, W], weights [b]) -> per-token losses, loss_func."""
    tokens, weights = next(data_iterator)
    inputs, labels = tokens[:, :-1], tokens[:, 1:]
    losses = model(inputs, megatron_model.position_ids(inputs), None, labels=labels)
    return losses, functools.partial(weighted_window_loss, weights)


def weighted_window_loss(weights: torch.Tensor, token_losses: torch.Tensor):
    """(mean of weights * window losses, {sum, count}) — the torch backend's loss on this micro-batch."""
    window = token_losses.float().mean(dim=1)
    weighted = (window * weights).sum()
    return weighted / len(weights), {"sum": weighted.detach(), "count": weights.sum().detach()}


def run_schedule(ddps: list, micro_batches: list, seq_len: int, forward_only: bool) -> tuple[float, float]:
    """Forward (and backward) over micro-batches with megatron's schedule (interleaved over model chunks with vpp:
    each chunk reads every micro-batch); (loss sum, weight sum) over all ranks."""
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    data = iter(micro_batches) if len(ddps) == 1 else [iter(micro_batches) for _ in ddps]
    results = get_forward_backward_func()(
        forward_step_func=window_losses_step, data_iterator=data, model=ddps,
        num_microbatches=len(micro_batches), seq_length=seq_len, micro_batch_size=len(micro_batches[0][0]),
        forward_only=forward_only)
    totals = torch.zeros(2, dtype=torch.float64)
    if parallel_state.is_pipeline_last_stage() and parallel_state.get_tensor_model_parallel_rank() == 0:
        for item in results:
            totals += torch.stack([item["sum"], item["count"]]).double().cpu()
    device = compute_device()
    totals = totals.to(device)
    torch.distributed.all_reduce(totals)
    return totals[0].item(), totals[1].item()


def rank_rows(tokens: torch.Tensor, weights: torch.Tensor | None, dp: int, device: torch.device):
    """This data-parallel rank's rows of a micro-batch, on the compute device (weights default to 1)."""
    from megatron.core import parallel_state

    rows = slice(parallel_state.get_data_parallel_rank() * (len(tokens) // dp),
                 (parallel_state.get_data_parallel_rank() + 1) * (len(tokens) // dp))
    weights = torch.ones(len(tokens)) if weights is None else weights
    return tokens[rows].to(device), weights[rows].float().to(device)


def train_step(ddps: list, optimizer, micro_batches, lr: float, cfg: TrainConfig, seq_len: int) -> tuple[float, float]:
    """One optimizer step over this rank's micro-batches -> (step loss, grad norm before clipping)."""
    for ddp in ddps:
        ddp.zero_grad_buffer()
    optimizer.zero_grad()
    set_lr(optimizer, lr, cfg.weight_decay)
    loss_sum, _ = run_schedule(ddps, micro_batches, seq_len, forward_only=False)
    _, grad_norm, _ = optimizer.step()
    return loss_sum / cfg.samples_per_step, float(grad_norm or 0.0)


@torch.no_grad()
def evaluate(ddps: list, windows, cfg: TrainConfig, seq_len: int, dp: int) -> float:
    """Mean loss of the torch backend's held-out windows (the first eval_batches * batch_size `windows`)."""
    import numpy as np

    count = min(len(windows), cfg.eval_batches * cfg.batch_size)
    group = cfg.batch_size * (cfg.parallel.pp if cfg.parallel.vpp > 1 else 1)  # interleaving: pp micro-batches at a time
    padded = -(-count // group) * group  # whole micro-batches; padding rows weigh 0
    ids = np.minimum(np.arange(padded), count - 1)
    tokens = torch.from_numpy(windows.batch(ids, dtype=np.int64))
    weights = (torch.arange(padded) < count).float()
    device = compute_device()
    micro = [rank_rows(tokens[i : i + cfg.batch_size], weights[i : i + cfg.batch_size], dp, device)
             for i in range(0, padded, cfg.batch_size)]
    for ddp in ddps:
        ddp.eval()
    loss_sum, weight_sum = run_schedule(ddps, micro, seq_len, forward_only=True)
    for ddp in ddps:
        ddp.train()
    return loss_sum / weight_sum


def replica_spread(chunks: list) -> float:
    """Largest difference between the data-parallel replicas' checksums of this rank's shard (0 when they hold
    identical weights, as they must)."""
    from megatron.core import parallel_state

    checksum = sum(p.detach().double().abs().sum().item() for model in chunks for p in model.parameters())
    sums = torch.tensor([checksum, -checksum], dtype=torch.float64, device=compute_device())
    torch.distributed.all_reduce(sums, op=torch.distributed.ReduceOp.MAX,
                                 group=parallel_state.get_data_parallel_group())
    spread = torch.tensor([(sums[0] + sums[1]).item()], dtype=torch.float64, device=compute_device())
    torch.distributed.all_reduce(spread, op=torch.distributed.ReduceOp.MAX)
    return spread.item()


def unwrap(ddps: list) -> list:
    """The GPTModel chunks inside DDP (and Float16Module)."""
    models = [ddp.module for ddp in ddps]
    return [model.module if hasattr(model, "module") and not hasattr(model, "decoder") else model for model in models]


# ---------------------------------------------------------------------------------------------
# Checkpoints: out/state/megatron/step-S/ (sharded, dsel.train.megatron.checkpoint) at every save;
# out/model (one dsel checkpoint) exported from the last one by rank 0 at the end.


def state_dir(cfg: TrainConfig) -> Path:
    """Where the megatron backend keeps its sharded checkpoints (beside the torch backend's state/state.pt)."""
    return Path(cfg.out) / "state" / "megatron"


def layout(cfg: TrainConfig) -> dict:
    return {**to_dict(cfg.parallel), "dp": world_size() // (cfg.parallel.tp * cfg.parallel.pp), "world": world_size()}


def save_state(cfg: TrainConfig, ddps: list, optimizer, config, meta: dict, step: int) -> Path:
    """Collective: the sharded checkpoint of `step`, with what resuming and export check."""
    from dsel.train.torch_backend import run_key, tokens_per_step

    chunks = unwrap(ddps)
    common = {"step": step, "tokens": step * tokens_per_step(cfg, model_of(config)), "config": to_dict(cfg),
              "key": run_key(cfg, RESUMABLE),
              "model": dataclasses.asdict(config), "layout": {**layout(cfg), "dp_replica_spread": replica_spread(chunks)},
              "meta": meta}
    return checkpoint.save_step(state_dir(cfg), step, chunks, optimizer, common)


def load_state(cfg: TrainConfig, config, ddps: list, optimizer) -> int:
    """Resume from the latest sharded checkpoint of cfg.out (any layout; same run and architecture): its step,
    or 0 when there is none."""
    from dsel.train.torch_backend import check_same_run, run_key, run_settings

    folder = checkpoint.latest(state_dir(cfg))
    if folder is None:
        return 0
    saved = checkpoint.read_common(folder)
    checkpoint.check_architecture(folder, saved["model"], config)
    key = run_key(cfg, RESUMABLE)
    # a checkpoint saved before content keys records its settings only: its inputs are taken as unchanged
    old = saved.get("key") or {**run_settings(saved["config"], RESUMABLE), "inputs": key["inputs"]}
    check_same_run(old, key, folder, state_dir(cfg))
    if saved["layout"]["distributed_optimizer"] != cfg.parallel.distributed_optimizer:
        raise file_error(folder, f"was saved with parallel.distributed_optimizer="
                                 f"{saved['layout']['distributed_optimizer']}; resume with the same setting")
    checkpoint.load(folder, unwrap(ddps), optimizer)
    before = {key: saved["layout"].get(key, 1) for key in ("tp", "pp", "vpp", "dp")}
    after = {"tp": cfg.parallel.tp, "pp": cfg.parallel.pp, "vpp": cfg.parallel.vpp, "dp": layout(cfg)["dp"]}
    if before != after:
        log.info("resharded %s from %s to %s", folder, before, after)
    return saved["step"]


def export_model(cfg: TrainConfig) -> Path:
    """Collective: rank 0 writes out/model from the latest sharded checkpoint (the others wait)."""
    path = Path(cfg.out) / "model"
    if torch.distributed.get_rank() == 0:
        checkpoint.export(state_dir(cfg), path)
        spread = read_json(path / "meta.json")["parallel"]["dp_replica_spread"]
        if spread > 0:
            log.warning("data-parallel replicas differ (checksum spread %.3g)", spread)
    torch.distributed.barrier()
    return path


def model_of(config):
    """A storage-less dsel GPT of `config` (what the torch backend's helpers read .config from)."""
    return shards.meta_gpt(config)


# ---------------------------------------------------------------------------------------------
# The run


def train(cfg: TrainConfig, sample_weights=None, on_step: Callable[[int, dict], None] | None = None) -> Path:
    """Train (or resume) under torchrun with cfg.parallel's tp x pp (dp = the rest); returns out/model.

    `sample_weights(ids) -> float[len(ids)]` and `on_step(step, row)` (called on every rank after
    each step) are the torch backend's hooks.
    """
    from dsel.train import torch_backend

    config = torch_backend.model_config(cfg)
    gpt, seq_len = model_of(config), config.seq_len  # no weights: each rank builds only its shard
    dp = check_layout(cfg, config, world_size())
    check_device(cfg)
    run = torch_backend.run_inputs(cfg, config, sample_weights)
    steps = run.steps

    logging.getLogger("megatron.core").setLevel(logging.WARNING)  # it logs its whole config and every parameter name
    started_here = not torch.distributed.is_initialized()
    megatron_model.init_parallel(cfg.parallel.tp, cfg.parallel.pp, cfg.parallel.vpp)
    try:
        megatron_model.seed_everything(cfg.seed)
        bf16 = use_bf16(cfg)
        ddps = wrap_ddp(build_parallel_model(cfg, config, bf16), cfg)
        optimizer = make_optimizer(ddps, cfg, bf16)
        first_step = load_state(cfg, config, ddps, optimizer)
        is_logger = torch.distributed.get_rank() == 0
        out = Path(cfg.out)
        if is_logger:
            if first_step:
                log.info("resuming %s at step %d of %d", out, first_step, steps)
            save_config(cfg, out / "config.yaml")
            torch_backend.cut_log(out / cfg.log, first_step)
        for ddp in ddps:
            ddp.train()
        with open(out / cfg.log, "a") if is_logger else open(os.devnull, "w") as log_file:
            bar = progress(total=steps, initial=first_step, unit="step",
                           desc=f"train (megatron tp={cfg.parallel.tp} pp={cfg.parallel.pp} dp={dp})",
                           disable=not is_logger or os.environ.get("DSEL_PROGRESS") == "0")
            batches = torch_backend.step_batches(run.samples, cfg, first_step, steps, run.weights_of,
                                                 pin=torch.cuda.is_available())
            for step, micro_batches in enumerate(batches, first_step):
                micro = [rank_rows(tokens, weights, dp, compute_device()) for tokens, weights in micro_batches]
                lr = torch_backend.learning_rate(cfg, step, steps)
                loss, grad_norm = train_step(ddps, optimizer, micro, lr, cfg, seq_len)
                done = step + 1
                row = {"step": done, "loss": loss, "lr": lr, "tokens": done * torch_backend.tokens_per_step(cfg, gpt),
                       "grad_norm": grad_norm}
                torch_backend.write_row(log_file, row)
                bar.update()
                bar.set_postfix(loss=f"{loss:.4f}")
                if run.valid is not None and cfg.evaluates_after(done, steps):
                    with synced_params(ddps):
                        valid_loss = evaluate(ddps, run.valid, cfg, seq_len, dp)
                    torch_backend.write_row(log_file, {"step": done, "valid_loss": valid_loss})
                if cfg.saves_after(done, steps):
                    with synced_params(ddps):
                        save_state(cfg, ddps, optimizer, config, run.meta, done)
                if done == steps:
                    export_model(cfg)
                if on_step is not None:
                    on_step(done, row)
            bar.close()
    finally:
        from megatron.core import parallel_state

        parallel_state.destroy_model_parallel()
        if started_here:
            torch.distributed.destroy_process_group()
    if is_logger:
        log.info("trained %d steps (megatron tp=%d pp=%d dp=%d); checkpoint %s", steps, cfg.parallel.tp,
                 cfg.parallel.pp, dp, out / "model")
    return out / "model"
