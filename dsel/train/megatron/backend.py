"""The megatron-core training backend: the torch backend's model and data with TP, PP and DP.

    torchrun --nproc_per_node 4 -m dsel train -c train.yaml backend=megatron parallel.tp=2 parallel.pp=2

Every rank builds the dsel GPT exactly as the torch backend does (seeded init, or `init`'s
weights), keeps its own tensor/pipeline slice in a megatron GPTModel (local layer spec, or
Transformer Engine's when it is installed on a GPU machine), and trains it with megatron's
DistributedDataParallel, its optimizer (`parallel.distributed_optimizer` shards the optimizer
state over data-parallel ranks) and its pipeline schedules. Step s reads the torch backend's
samples [s*B*A, (s+1)*B*A) (B = batch_size, A = grad_accum micro-batches); data-parallel rank r
takes rows [r*B/dp, (r+1)*B/dp) of each micro-batch, so every layout computes the same loss,
the same learning-rate schedule and the same clipped updates as the torch backend.

Process groups are gloo on a CPU machine (with `dsel.train.megatron.shim`) and nccl on GPUs.
Rank 0 writes the torch backend's out/ layout: log.jsonl, config.yaml and model/ (a dsel
checkpoint gathered from every rank's shard); out/state/megatron/ holds every rank's shard and
optimizer state, and running the same command again (same world size) resumes from it.
"""
from __future__ import annotations

import functools
import logging
import os
import shutil
from pathlib import Path
from typing import Callable

import torch

from dsel.config import save_config, to_dict
from dsel.errors import DselError, file_error
from dsel.io import atomic_path, progress, read_json, write_json
from dsel.train.config import TrainConfig
from dsel.train.megatron import convert, model as megatron_model

log = logging.getLogger(__name__)


def world_size() -> int:
    """Processes started by torchrun (1 without it)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def check_layout(cfg: TrainConfig, config, world: int) -> int:
    """The data-parallel size, after checking the model, the world and the batch split tp x pp x dp ways."""
    tp, pp = cfg.parallel.tp, cfg.parallel.pp
    megatron_model.check_parallel_sizes(config, tp, pp, world)
    dp = world // (tp * pp)
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


def build_parallel_model(cfg: TrainConfig, gpt, bf16: bool):
    """This rank's megatron stage holding its slice of the dsel GPT's weights, wrapped for bf16 if asked."""
    from megatron.core import parallel_state
    from megatron.core.transformer.module import Float16Module

    tp, pp = cfg.parallel.tp, cfg.parallel.pp
    model = megatron_model.build_model(gpt.config, tp, pp, bf16)
    shard = convert.to_megatron(gpt.state_dict(), gpt.config, parallel_state.get_tensor_model_parallel_rank(), tp,
                                parallel_state.get_pipeline_model_parallel_rank(), pp,
                                te=megatron_model.use_transformer_engine())
    convert.load_shard(model, shard)
    return Float16Module(model.config, model) if bf16 else model


def wrap_ddp(model, cfg: TrainConfig):
    """megatron's DistributedDataParallel (contiguous fp32 grad buffers, all-reduce or reduce-scatter)."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads

    ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=False,
                                               use_distributed_optimizer=cfg.parallel.distributed_optimizer)
    ddp = DistributedDataParallel(config=model.config, ddp_config=ddp_config, module=model)
    ddp.config.finalize_model_grads_func = finalize_model_grads  # DP grad sync + tied-embedding grads across PP
    return ddp


def make_optimizer(ddp, cfg: TrainConfig, bf16: bool):
    """megatron's AdamW or plain SGD (optionally distributed), clipping at cfg.grad_clip; no decay on norms/biases."""
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    config = OptimizerConfig(
        optimizer="adam" if cfg.optimizer == "adamw" else "sgd", lr=cfg.lr, min_lr=cfg.min_lr,
        weight_decay=cfg.weight_decay, adam_beta1=cfg.beta1, adam_beta2=cfg.beta2, adam_eps=cfg.adam_eps, sgd_momentum=0.0,
        clip_grad=cfg.grad_clip, bf16=bf16, params_dtype=torch.bfloat16 if bf16 else torch.float32,
        use_distributed_optimizer=cfg.parallel.distributed_optimizer,
    )
    optimizer = get_megatron_optimizer(config, [ddp])
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


def run_schedule(ddp, micro_batches: list, seq_len: int, forward_only: bool) -> tuple[float, float]:
    """Forward (and backward) over micro-batches with megatron's schedule; (loss sum, weight sum) over all ranks."""
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    results = get_forward_backward_func()(
        forward_step_func=window_losses_step, data_iterator=iter(micro_batches), model=[ddp],
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


def train_step(ddp, optimizer, micro_batches, lr: float, cfg: TrainConfig, seq_len: int) -> tuple[float, float]:
    """One optimizer step over this rank's micro-batches -> (step loss, grad norm before clipping)."""
    ddp.zero_grad_buffer()
    optimizer.zero_grad()
    set_lr(optimizer, lr, cfg.weight_decay)
    loss_sum, _ = run_schedule(ddp, micro_batches, seq_len, forward_only=False)
    _, grad_norm, _ = optimizer.step()
    return loss_sum / cfg.samples_per_step, float(grad_norm or 0.0)


@torch.no_grad()
def evaluate(ddp, windows, cfg: TrainConfig, seq_len: int, dp: int) -> float:
    """Mean loss of the torch backend's held-out windows (the first eval_batches * batch_size `windows`)."""
    import numpy as np

    count = min(len(windows), cfg.eval_batches * cfg.batch_size)
    padded = -(-count // cfg.batch_size) * cfg.batch_size  # whole micro-batches; padding rows weigh 0
    ids = np.minimum(np.arange(padded), count - 1)
    tokens = torch.from_numpy(windows.batch(ids, dtype=np.int64))
    weights = (torch.arange(padded) < count).float()
    device = compute_device()
    micro = [rank_rows(tokens[i : i + cfg.batch_size], weights[i : i + cfg.batch_size], dp, device)
             for i in range(0, padded, cfg.batch_size)]
    ddp.eval()
    loss_sum, weight_sum = run_schedule(ddp, micro, seq_len, forward_only=True)
    ddp.train()
    return loss_sum / weight_sum


def gather_full_state(model, config) -> tuple[dict, float] | None:
    """On rank 0: (the full dsel state_dict from the first data-parallel replica, replica spread).

    Every rank also sends a checksum of its shard; the spread is the largest difference between
    data-parallel replicas of one shard (0 when they hold identical weights, as they should).
    """
    from megatron.core import parallel_state

    shard = convert.shard_state(model)
    checksum = sum(t.double().abs().sum().item() for t in shard.values())
    place = (parallel_state.get_pipeline_model_parallel_rank(), parallel_state.get_tensor_model_parallel_rank())
    mine = (place, checksum, shard if parallel_state.get_data_parallel_rank() == 0 else None)
    gathered = [None] * torch.distributed.get_world_size() if torch.distributed.get_rank() == 0 else None
    torch.distributed.gather_object(mine, gathered, dst=0)
    if gathered is None:
        return None
    tp = parallel_state.get_tensor_model_parallel_world_size()
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    shards = [[None] * tp for _ in range(pp)]
    checksums: dict[tuple, list[float]] = {}
    for (p, t), sums, weights in gathered:
        checksums.setdefault((p, t), []).append(sums)
        if weights is not None:
            shards[p][t] = weights
    spread = max(max(sums) - min(sums) for sums in checksums.values())
    return convert.from_megatron(shards, config), spread


def unwrap(ddp):
    """The GPTModel inside DDP (and Float16Module)."""
    model = ddp.module
    return model.module if hasattr(model, "module") and not hasattr(model, "decoder") else model


def save_model_checkpoint(ddp, gpt, cfg: TrainConfig, meta: dict, step: int) -> Path:
    """Gather the shards into the dsel GPT and save it as out/model on rank 0 (the torch backend's layout)."""
    from dsel.models.checkpoint import save_model

    gathered = gather_full_state(unwrap(ddp), gpt.config)
    path = Path(cfg.out) / "model"
    if gathered is not None:
        full, spread = gathered
        if spread > 0:
            log.warning("data-parallel replicas differ (checksum spread %.3g)", spread)
        gpt.load_state_dict(full)
        dp = world_size() // (cfg.parallel.tp * cfg.parallel.pp)
        from dsel.train.torch_backend import tokens_per_step

        save_model(path, gpt, {**meta, "step": step, "tokens": step * tokens_per_step(cfg, gpt),
                               "parallel": {**to_dict(cfg.parallel), "dp": dp, "dp_replica_spread": spread}})
    torch.distributed.barrier()
    return path


# ---------------------------------------------------------------------------------------------
# Resuming: every rank keeps its own shard and optimizer state under out/state/megatron/step-S/;
# latest.json names the last step every rank finished saving, so a kill mid-save is harmless.


def state_dir(cfg: TrainConfig) -> Path:
    """Where the megatron backend keeps its resume state (beside the torch backend's state/state.pt)."""
    return Path(cfg.out) / "state" / "megatron"


def optimizer_state(optimizer) -> list:
    """This rank's optimizer state, per part of megatron's (chained) optimizer.

    A distributed optimizer part keeps this rank's shard of the main params and the inner torch
    optimizer over it; both are saved as they are (resuming needs the same layout, which
    load_state checks).
    """
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    state = []
    for part in getattr(optimizer, "chained_optimizers", [optimizer]):
        if isinstance(part, DistributedOptimizer):
            main = [p.detach().clone() for group in part.optimizer.param_groups for p in group["params"]]
            state.append({"inner": part.optimizer.state_dict(), "main_params": main})
        else:
            state.append({"whole": part.state_dict()})
    return state


@torch.no_grad()
def load_optimizer_state(optimizer, state: list) -> None:
    """Inverse of optimizer_state."""
    for part, saved in zip(getattr(optimizer, "chained_optimizers", [optimizer]), state):
        if "whole" in saved:
            part.load_state_dict(saved["whole"])
            continue
        part.optimizer.load_state_dict(saved["inner"])
        params = [p for group in part.optimizer.param_groups for p in group["params"]]
        for param, value in zip(params, saved["main_params"]):
            param.copy_(value)


def save_state(cfg: TrainConfig, ddp, optimizer, step: int) -> None:
    """Write this rank's weights, optimizer state and RNG for `step`; rank 0 then points latest.json at it."""
    rank, folder = torch.distributed.get_rank(), state_dir(cfg) / f"step-{step}"
    weights = {k: v for k, v in unwrap(ddp).state_dict().items() if not k.endswith("_extra_state")}
    state = {"step": step, "model": weights, "optimizer": optimizer_state(optimizer), "rng": torch.get_rng_state(),
             "config": to_dict(cfg), "world": world_size()}
    with atomic_path(folder / f"rank-{rank}.pt") as tmp:
        torch.save(state, tmp)
    torch.distributed.barrier()
    if rank == 0:
        write_json(state_dir(cfg) / "latest.json", {"step": step, "world": world_size()})
        for old in state_dir(cfg).glob("step-*"):
            if old != folder:
                shutil.rmtree(old, ignore_errors=True)
    torch.distributed.barrier()


def load_state(cfg: TrainConfig) -> dict | None:
    """This rank's saved state of the run in cfg.out (checked to be the same run and layout), or None."""
    from dsel.train.torch_backend import read_state_file

    latest = state_dir(cfg) / "latest.json"
    if not latest.is_file():
        return None
    saved = read_json(latest)
    if saved["world"] != world_size():
        raise file_error(latest, f"belongs to a run on {saved['world']} processes, not {world_size()}; "
                                 f"use another out directory or delete {state_dir(cfg)}")
    path = state_dir(cfg) / f"step-{saved['step']}" / f"rank-{torch.distributed.get_rank()}.pt"
    return read_state_file(path, cfg, state_dir(cfg))


def restore(ddp, optimizer, state: dict) -> int:
    """Put a saved state back into the model and the optimizer; returns its step."""
    unwrap(ddp).load_state_dict(state["model"], strict=False)
    load_optimizer_state(optimizer, state["optimizer"])
    torch.set_rng_state(state["rng"])
    return state["step"]


# ---------------------------------------------------------------------------------------------
# The run


def train(cfg: TrainConfig, sample_weights=None, on_step: Callable[[int, dict], None] | None = None) -> Path:
    """Train (or resume) under torchrun with cfg.parallel's tp x pp (dp = the rest); returns out/model.

    `sample_weights(ids) -> float[len(ids)]` and `on_step(step, row)` (called on every rank after
    each step) are the torch backend's hooks.
    """
    from dsel.train import torch_backend

    gpt = torch_backend.build_model(cfg)  # the torch backend's init: same seed, same weights
    config, seq_len = gpt.config, gpt.config.seq_len
    dp = check_layout(cfg, config, world_size())
    check_device(cfg)
    run = torch_backend.run_inputs(cfg, config, sample_weights)
    steps = run.steps

    logging.getLogger("megatron.core").setLevel(logging.WARNING)  # it logs its whole config and every parameter name
    started_here = not torch.distributed.is_initialized()
    megatron_model.init_parallel(cfg.parallel.tp, cfg.parallel.pp)
    try:
        megatron_model.seed_everything(cfg.seed)
        bf16 = use_bf16(cfg)
        ddp = wrap_ddp(build_parallel_model(cfg, gpt, bf16), cfg)
        optimizer = make_optimizer(ddp, cfg, bf16)
        state = load_state(cfg)
        first_step = 0 if state is None else restore(ddp, optimizer, state)
        is_logger = torch.distributed.get_rank() == 0
        out = Path(cfg.out)
        if is_logger:
            if first_step:
                log.info("resuming %s at step %d of %d", out, first_step, steps)
            save_config(cfg, out / "config.yaml")
            torch_backend.cut_log(out / cfg.log, first_step)
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
                loss, grad_norm = train_step(ddp, optimizer, micro, lr, cfg, seq_len)
                done = step + 1
                row = {"step": done, "loss": loss, "lr": lr, "tokens": done * torch_backend.tokens_per_step(cfg, gpt),
                       "grad_norm": grad_norm}
                torch_backend.write_row(log_file, row)
                bar.update()
                bar.set_postfix(loss=f"{loss:.4f}")
                if run.valid is not None and cfg.evaluates_after(done, steps):
                    valid_loss = evaluate(ddp, run.valid, cfg, seq_len, dp)
                    torch_backend.write_row(log_file, {"step": done, "valid_loss": valid_loss})
                if cfg.saves_after(done, steps):
                    save_model_checkpoint(ddp, gpt, cfg, run.meta, done)
                    save_state(cfg, ddp, optimizer, done)
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
