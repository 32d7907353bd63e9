"""The torch training backend: one process, CPU or one GPU.

    out = train(cfg)                      # -> out/model, a dsel.models checkpoint

Step s (0-based) trains on GPTDataset samples [s*B*A, (s+1)*B*A) (B = batch_size, A = grad_accum),
so the data position is a function of the step alone. A checkpoint holds the model, the optimizer,
the step and the RNG state; a run killed after a checkpoint and started again with the same
command continues from it and produces the same losses and weights, bit for bit, as a run that
was never interrupted (the log is cut back to the checkpoint's step first).

Output directory:
    model/        dsel checkpoint of the latest model; meta.json carries the data's tokenizer identity
                  (from <prefix>.meta.json: path, kind, sha256, vocab_size, eod_id) and the training run
    state/state.pt  everything needed to resume
    log.jsonl     one row per step {step, loss, lr, tokens, grad_norm}; eval rows {step, valid_loss}
    config.yaml   the settings of the run
"""
from __future__ import annotations

import json
import logging
import math
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from dsel.config import save_config, to_dict
from dsel.device import autocast_for, resolve_device
from dsel.train.schedule import lr_at
from dsel.data.corpus import open_corpus, sidecar_prefix
from dsel.data.indexed import IndexedDataset
from dsel.data.loader import GPTSampleLoader, WindowSampleLoader, WindowStream, prefetched
from dsel.data.meta import check_same_tokenizer, meta_path, read_meta, tokenizer_identity
from dsel.data.windows import Windows, corpus_digest, source_name
from dsel.errors import file_error
from dsel.io import atomic_path, differences, file_digest, progress, read_json
from dsel.models.config import GPTConfig
from dsel.train.config import TrainConfig

log = logging.getLogger(__name__)

# Settings a resumed run may change; any other difference means the checkpoint belongs to another run.
RESUMABLE_CHANGES = ("device", "precision", "eval_every", "eval_batches", "save_every", "valid", "log")
INPUT_PATHS = ("data", "init", "weights")  # keyed by their content digests instead (run_key)

SampleWeights = Callable[[np.ndarray], np.ndarray]


# ---------------------------------------------------------------------------------------------
# Data


def open_dataset(prefix: str, vocab_size: int):
    """The corpus at `prefix` (dsel.data.corpus: a Megatron dataset, a token file, a directory of dolma
    token files) checked to be non-empty and to hold only ids below the model's vocabulary."""
    dataset = open_corpus(prefix)
    if dataset.num_tokens == 0:
        path = dataset.bin_path if isinstance(dataset, IndexedDataset) else source_name(dataset)
        raise file_error(path, "dataset is empty (no tokens to train on)")
    dataset.check_tokens(vocab_size)
    return dataset


def blending_index(weights: Sequence[float], size: int) -> tuple[np.ndarray, np.ndarray]:
    """megatron BlendedDataset's order: sample i comes from the dataset furthest behind its share."""
    weights = np.asarray(weights, dtype=np.float64) / np.sum(weights)
    dataset_index = np.empty(size, dtype=np.int64)
    dataset_sample = np.empty(size, dtype=np.int64)
    taken = np.zeros(len(weights), dtype=np.int64)
    for i in range(size):
        d = int(np.argmax(weights * max(i, 1.0) - taken))
        dataset_index[i], dataset_sample[i] = d, taken[d]
        taken[d] += 1
    return dataset_index, dataset_sample


MID_LEVEL_DATASET_SURPLUS = 0.005  # megatron-core's default (Megatron-LM's --mid-level-dataset-surplus)


def blend_dataset_sizes(weights: Sequence[float], num_samples: int) -> list[int]:
    """The samples each dataset of a blend is built for, as megatron-core's BlendedMegatronDatasetBuilder asks
    them: ceil(ceil(N * w) * (1 + surplus)). A dataset's shuffle depends on its size (its number of epochs), so
    these sizes, not the blend's own draw counts, make a blend's samples megatron's."""
    normalized = (np.asarray(weights, dtype=np.float64) / np.sum(weights)).tolist()
    return [math.ceil(math.ceil(num_samples * w) * (1 + MID_LEVEL_DATASET_SURPLUS)) for w in normalized]


class BlendedSamples:
    """Samples of several datasets interleaved by weight; `batch(ids)` like GPTSampleLoader's."""

    def __init__(self, datasets: list[IndexedDataset], weights: Sequence[float], seq_len: int, seed: int,
                 num_samples: int):
        self.dataset_index, self.dataset_sample = blending_index(weights, num_samples)
        sizes = blend_dataset_sizes(weights, num_samples)
        self.loaders = [sample_loader(ds, seq_len, seed, max(n, 1)) for ds, n in zip(datasets, sizes)]
        self.seq_len, self.num_samples = seq_len, num_samples

    def batch(self, ids: np.ndarray) -> np.ndarray:
        """Samples `ids` of the blend, [len(ids), seq_len+1] int64."""
        ids = np.asarray(ids, dtype=np.int64)
        out = np.empty((len(ids), self.seq_len + 1), dtype=np.int64)
        which = self.dataset_index[ids]
        for d in np.unique(which):
            rows = which == d
            out[rows] = self.loaders[d].batch(self.dataset_sample[ids[rows]])
        return out


def selection_window(prefix: str) -> int | None:
    """The window length of a `dsel select` output (recorded in its meta.json), None for other data."""
    path = Path(meta_path(prefix))
    return read_json(path).get("window") if path.is_file() else None


def sample_loader(dataset, seq_len: int, seed: int, num_samples: int):
    """Samples of one corpus: whole windows of a selection or of token files (WindowSampleLoader), else
    megatron's GPTDataset order.

    A selection trains window by window so that no sample joins two selected windows; its windows
    must then be exactly one training sample (seq_len + 1 tokens) long. Token files (OLMo/dolma)
    train as OLMo's MemMapDataset reads them: each file cut into windows of seq_len + 1 tokens.
    """
    if not isinstance(dataset, IndexedDataset):
        return WindowSampleLoader(Windows(dataset, seq_len + 1), seed, num_samples)
    window = selection_window(dataset.prefix)
    if window is None:
        return GPTSampleLoader(dataset, seq_len, 1, seed, num_samples=num_samples, prefetch=0)
    if window != seq_len + 1:
        raise file_error(meta_path(dataset.prefix), f"a selection of {window}-token windows cannot train as selected "
                                                    f"with seq_len={seq_len} (samples of {seq_len + 1} tokens); set "
                                                    f"arch.seq_len={window - 1} or select windows of {seq_len + 1}")
    if not np.all(dataset.sizes == window):
        raise file_error(dataset.idx_path, f"a selection of windows must hold only documents of seq_len+1 = {window} "
                                           "tokens")
    loader = WindowSampleLoader(Windows(dataset, window), seed, num_samples)
    if loader.epochs > 1:
        log.warning("%s: %d samples repeat its %d selected windows (%d passes)", dataset.prefix, num_samples,
                    len(dataset), loader.epochs)
    return loader


def training_samples(cfg: TrainConfig, seq_len: int, vocab_size: int, num_samples: int):
    """The sample source of the run (one dataset: sample_loader; several: BlendedSamples)."""
    datasets = [open_dataset(prefix, vocab_size) for prefix in cfg.data]
    if len(datasets) == 1:
        return sample_loader(datasets[0], seq_len, cfg.seed, num_samples)
    weights = cfg.data_weights or [ds.num_tokens for ds in datasets]
    return BlendedSamples(datasets, weights, seq_len, cfg.seed, num_samples)


def data_meta(prefixes: Sequence[str], model_vocab: int | None = None) -> dict:
    """The data's tokenizer identity (from <prefix>.meta.json: path, kind, sha256, vocab_size, eod_id), checked to agree."""
    found: dict = {}
    prefixes = [sidecar_prefix(p) for p in prefixes]
    for prefix in prefixes:
        path = meta_path(prefix)
        if not Path(path).is_file():
            log.warning("%s not found: the checkpoint will not record the tokenizer", path)
            continue
        if found:
            check_same_tokenizer(prefixes[0], found, prefix, role="training data")
        meta = tokenizer_identity(read_meta(prefix))
        if model_vocab is not None and meta["vocab_size"] > model_vocab:
            raise file_error(path, f"tokenizer vocabulary {meta['vocab_size']} exceeds the model's vocab_size "
                                   f"{model_vocab}; set arch.vocab_size (or a preset) to at least that")
        found = found or meta
    return found


def data_vocab_size(prefixes: Sequence[str]) -> int | None:
    """The largest tokenizer vocabulary recorded by the data's meta files (None when none records one)."""
    prefixes = [sidecar_prefix(p) for p in prefixes]
    sizes = [read_meta(p)["vocab_size"] for p in prefixes if Path(meta_path(p)).is_file()]
    return max(sizes) if sizes else None


def load_sample_weights(path: str, num_samples: int) -> SampleWeights:
    """Per-sample loss weights from a 1-D .npy indexed by training sample."""
    try:
        weights = np.load(path, mmap_mode="r")
    except (OSError, ValueError) as e:
        raise file_error(path, f"cannot be read as a .npy array ({e})") from None
    if weights.ndim != 1 or not np.issubdtype(weights.dtype, np.number):
        raise file_error(path, f"expected a 1-D numeric array of per-sample weights, got {weights.dtype} {weights.shape}")
    if len(weights) < num_samples:
        raise file_error(path, f"{len(weights)} weights for a run of {num_samples} samples")
    return lambda ids: np.asarray(weights[ids], dtype=np.float32)


@dataclass
class RunInputs:
    """What both backends derive from the settings before training."""

    steps: int
    samples: object  # GPTSampleLoader or BlendedSamples
    valid: Optional[Windows]
    weights_of: Optional[SampleWeights]
    meta: dict  # checkpoint meta: the data's tokenizer, the data, init and the run's settings


def run_inputs(cfg: TrainConfig, config: GPTConfig, sample_weights: SampleWeights | None = None) -> RunInputs:
    """Length, training samples, held-out windows, per-sample weights and checkpoint meta of a run (checked)."""
    steps = cfg.num_steps(config.seq_len)
    num_samples = steps * cfg.samples_per_step
    samples = training_samples(cfg, config.seq_len, config.vocab_size, num_samples)
    valid = Windows(open_dataset(cfg.valid, config.vocab_size), config.seq_len + 1) if cfg.valid is not None else None
    weights_of = sample_weights or (load_sample_weights(cfg.weights, num_samples) if cfg.weights else None)
    meta = {**data_meta(cfg.data, config.vocab_size), "data": list(cfg.data), "init": cfg.init, "train": to_dict(cfg)}
    if cfg.valid is not None:
        check_same_tokenizer(cfg.data[0], meta, sidecar_prefix(cfg.valid), role="training data")
    if cfg.init is not None:
        from dsel.models.checkpoint import read_model_meta

        for prefix in cfg.data:
            check_same_tokenizer(cfg.init, read_model_meta(cfg.init), sidecar_prefix(prefix))
    return RunInputs(steps, samples, valid, weights_of, meta)


# ---------------------------------------------------------------------------------------------
# Model and optimizer


def model_config(cfg: TrainConfig) -> GPTConfig:
    """The architecture to train: preset + overrides, on init's architecture (checked to be a GPT)."""
    from dsel.models.checkpoint import read_model_config
    from dsel.models.gpt import GPT

    init_config = None
    if cfg.init is not None:
        arch, init_config = read_model_config(cfg.init)
        if arch != GPT.arch:
            raise file_error(cfg.init, f"init checkpoint is a '{arch}' model, training needs a '{GPT.arch}' model")
    return cfg.model_config(init_config, data_vocab_size(cfg.data))


def build_model(cfg: TrainConfig, load_init: bool = True) -> torch.nn.Module:
    """The GPT to train, seeded tensor by tensor (as the megatron backend draws its shards), or init's weights."""
    from dsel.models.checkpoint import load_weights
    from dsel.models.gpt import GPT

    torch.manual_seed(cfg.seed)
    model = GPT(model_config(cfg))
    model.reset_parameters(seed=cfg.seed)
    if cfg.init is not None and load_init:
        load_weights(model, cfg.init)
    return model


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW or plain SGD; weight decay on matrices only (not on norms and biases)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr)
    fused = params[0].is_cuda  # one fused kernel per step on GPU
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.adam_eps, fused=fused)


def learning_rate(cfg: TrainConfig, step: int, steps: int) -> float:
    """This step's lr under cfg.schedule: warmup to lr, then cosine decay to min_lr at the last step."""
    return lr_at(step, steps, cfg.lr, cfg.warmup, cfg.min_lr / cfg.lr, cfg.schedule)


# ---------------------------------------------------------------------------------------------
# Steps and evaluation


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, micro_batches, lr: float,
               grad_clip: float, device: torch.device, precision: str = "auto", z_loss: float = 0.0) -> tuple[float, float]:
    """One optimizer step over micro-batches of (tokens [B, W], weights [B] or None) -> (loss, grad norm).

    The loss is the mean window loss over all micro-batches, or with weights sum_n w_n*loss_n / N
    (N = windows in the step; all-ones weights give the plain mean).
    """
    total = sum(len(tokens) for tokens, _ in micro_batches)
    loss_sum = torch.zeros((), device=device)
    for tokens, weights in micro_batches:
        tokens = tokens.to(device, non_blocking=True)
        with autocast_for(device, precision):
            if weights is None:
                loss = model.loss(tokens, z_loss=z_loss) * (len(tokens) / total)
            else:
                loss = model.loss(tokens, weights.to(device) / total, z_loss=z_loss * len(tokens) / total)
        loss.backward()
        loss_sum += loss.detach()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip if grad_clip > 0 else float("inf"))
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss_sum.item(), norm.item()


@torch.no_grad()
def window_losses(model: torch.nn.Module, data, window: Optional[int] = None, batch_size: int = 8,
                  device: str | torch.device | None = None, max_batches: Optional[int] = None,
                  precision: str = "auto") -> np.ndarray:
    """Held-out loss of each of the first windows of `data` (a dataset prefix or a Windows), float64.

    Windows are consecutive `window` tokens (default: the model's seq_len + 1, predicting seq_len).
    """
    window = window or model.config.seq_len + 1
    windows = data if isinstance(data, Windows) else Windows(open_corpus(data), window)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    stop = len(windows) if max_batches is None else min(len(windows), max_batches * batch_size)
    was_training = model.training
    model.eval()
    losses = []
    for _, tokens in WindowStream(windows, batch_size, stop=stop):
        with autocast_for(device, precision):
            losses.append(model.sequence_losses(torch.from_numpy(tokens).to(device)).double().cpu().numpy())
    model.train(was_training)
    return np.concatenate(losses)


def evaluate(model: torch.nn.Module, data, window: Optional[int] = None, batch_size: int = 8,
             device: str | torch.device | None = None, max_batches: Optional[int] = None,
             precision: str = "auto") -> float:
    """Mean held-out loss of the first windows of `data` (see window_losses)."""
    return float(window_losses(model, data, window, batch_size, device, max_batches, precision).mean())


# ---------------------------------------------------------------------------------------------
# Checkpoints and the log


def state_path(cfg: TrainConfig) -> Path:
    return Path(cfg.out) / "state" / "state.pt"


def save_checkpoint(cfg: TrainConfig, model, optimizer, step: int, meta: dict, key: dict) -> None:
    """Write out/model (a dsel checkpoint) and then out/state/state.pt (for resuming), each atomically."""
    from dsel.models.checkpoint import save_model

    save_model(Path(cfg.out) / "model", model, {**meta, "step": step, "tokens": step * tokens_per_step(cfg, model)})
    state = {"step": step, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
             "rng": rng_state(), "config": to_dict(cfg), "key": key}
    with atomic_path(state_path(cfg)) as tmp:
        torch.save(state, tmp)


def rng_state() -> dict:
    """torch's CPU (and CUDA) generator states."""
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def load_state(cfg: TrainConfig, key: dict) -> dict | None:
    """The resume state of `cfg.out`, checked to come from the same run (`run_key`); None if there is none."""
    path = state_path(cfg)
    return read_state_file(path, key, path.parent) if path.is_file() else None


def read_state_file(path: Path, key: dict, state_folder: Path) -> dict:
    """A saved training state, refused when it is unreadable or was saved by a run of another key."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for a missing or corrupt file
        raise file_error(path, f"cannot be read as a training state ({type(e).__name__})") from None
    # a state saved before content keys records its settings only: its inputs are taken as unchanged
    old = state.get("key") or {**run_settings(state["config"], RESUMABLE_CHANGES), "inputs": key["inputs"]}
    check_same_run(old, key, path, state_folder)
    return state


def run_key(cfg: TrainConfig, resumable: Sequence[str] = RESUMABLE_CHANGES) -> dict:
    """What a resumed run must share with the saved one: every setting but the `resumable` ones and the input
    paths, and the content of each input (`inputs`: dataset digests, init's weights digest, the weights file's)."""
    from dsel.models.checkpoint import checkpoint_digest

    inputs = {"data": [corpus_digest(open_corpus(prefix)) for prefix in cfg.data],
              "init": checkpoint_digest(cfg.init) if cfg.init is not None else None,
              "weights": file_digest(cfg.weights) if cfg.weights is not None else None}
    return {**run_settings(to_dict(cfg), resumable), "inputs": inputs}


def run_settings(config: dict, resumable: Sequence[str]) -> dict:
    """The settings of a run (`to_dict` form) that its results depend on: not the resumable ones, nor the
    input paths (their content is in the key instead: a moved dataset still resumes)."""
    return {k: v for k, v in config.items() if k not in (*resumable, *INPUT_PATHS)}


def check_same_run(old: dict, new: dict, path: Path, state_folder: Path) -> None:
    """Refuse a saved state whose run key `old` differs from this run's, naming the first differing key (a state
    saved before `model` was renamed `arch` compares under the new name)."""
    if "model" in old and "arch" not in old:
        old = {("arch" if key == "model" else key): value for key, value in old.items()}
    changed = differences(old, new)
    if changed:
        key, before, after = changed[0]
        raise file_error(path, f"belongs to a run with {key}={before!r}, not {after!r}; "
                               f"use another out directory or delete {state_folder}")


def tokens_per_step(cfg: TrainConfig, model) -> int:
    return cfg.samples_per_step * model.config.seq_len


def cut_log(path: Path, step: int) -> None:
    """Keep only the log rows of steps <= `step` (the resumed run writes the rest again; a torn row goes too)."""
    if not path.is_file():
        return
    rows = [line for line in path.read_text().splitlines() if logged_step(line) <= step]
    with atomic_path(path) as tmp:
        tmp.write_text("".join(row + "\n" for row in rows))


def logged_step(line: str) -> float:
    """The step of a log row; infinity for a row cut short by a kill."""
    try:
        return json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return float("inf")


# ---------------------------------------------------------------------------------------------
# The run


def step_batches(samples, cfg: TrainConfig, first_step: int, steps: int, weights_of: SampleWeights | None,
                 pin: bool = False):
    """Per step, the micro-batches [(tokens, weights)] of its samples, prefetched on a thread.

    `pin` puts the tokens in page-locked memory so the copy to the GPU overlaps compute.
    """
    per_step = cfg.samples_per_step

    def make(step: int):
        ids = np.arange(step * per_step, (step + 1) * per_step, dtype=np.int64)
        tokens = torch.from_numpy(samples.batch(ids))
        tokens = tokens.pin_memory() if pin else tokens
        weights = torch.from_numpy(np.asarray(weights_of(ids), dtype=np.float32)) if weights_of else None
        return [(tokens[i : i + cfg.batch_size], None if weights is None else weights[i : i + cfg.batch_size])
                for i in range(0, per_step, cfg.batch_size)]

    return prefetched(range(first_step, steps), make, depth=2)


def train(cfg: TrainConfig, sample_weights: SampleWeights | None = None,
          on_step: Callable[[int, dict], None] | None = None,
          online_batches: Callable[[torch.nn.Module, int], list] | None = None) -> Path:
    """Train (or resume, or fine-tune from cfg.init) and return the checkpoint directory out/model.

    `sample_weights(ids) -> float[len(ids)]` weights each training sample's loss (overrides
    cfg.weights); `on_step(step, row)` is called after every logged step; `online_batches(model,
    step)` -> [(tokens, weights)] replaces the data's samples with batches chosen by the model as it
    trains (RHO-down; a function of the step and the weights, so a resumed run stays exact).
    """
    out = Path(cfg.out)
    device = resolve_device(cfg.device)
    run = run_inputs(cfg, model_config(cfg), sample_weights)  # the inputs checked before the state is read
    key = run_key(cfg)
    state = load_state(cfg, key)
    model = build_model(cfg) if state is None else resume_model(cfg, state)
    steps = run.steps

    model.to(device).train()
    optimizer = make_optimizer(model, cfg)
    first_step = 0
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        restore_rng(state["rng"])
        first_step = state["step"]
        log.info("resuming %s at step %d of %d", out, first_step, steps)
    save_config(cfg, out / "config.yaml")
    log_path = out / cfg.log
    cut_log(log_path, first_step)
    if first_step >= steps:
        return out / "model"

    if online_batches is None:
        batches = step_batches(run.samples, cfg, first_step, steps, run.weights_of, pin=device.type == "cuda")
    else:  # chosen right before each step, by the model the previous step left
        batches = (online_batches(model, step) for step in range(first_step, steps))
    with open(log_path, "a") as log_file, closing(batches), progress(total=steps, initial=first_step, desc="train",
                                                                     unit="step") as bar:
        for step, micro_batches in enumerate(batches, first_step):
            lr = learning_rate(cfg, step, steps)
            loss, grad_norm = train_step(model, optimizer, micro_batches, lr, cfg.grad_clip, device, cfg.precision,
                                         cfg.z_loss)
            done = step + 1
            row = {"step": done, "loss": loss, "lr": lr, "tokens": done * tokens_per_step(cfg, model),
                   "grad_norm": grad_norm}
            write_row(log_file, row)
            bar.update()
            bar.set_postfix(loss=f"{loss:.4f}")
            if run.valid is not None and cfg.evaluates_after(done, steps):
                valid_loss = evaluate(model, run.valid, batch_size=cfg.batch_size, device=device,
                                      max_batches=cfg.eval_batches, precision=cfg.precision)
                write_row(log_file, {"step": done, "valid_loss": valid_loss})
                bar.set_postfix(loss=f"{loss:.4f}", valid=f"{valid_loss:.4f}")
            if cfg.saves_after(done, steps):
                save_checkpoint(cfg, model, optimizer, done, run.meta, key)
            if on_step is not None:
                on_step(done, row)
    log.info("trained %d steps; final loss %.4f; checkpoint %s", steps, loss, out / "model")
    return out / "model"


def resume_model(cfg: TrainConfig, state: dict) -> torch.nn.Module:
    """The model of a resumed run: the run's architecture with the checkpointed weights."""
    model = build_model(cfg, load_init=False)
    model.load_state_dict(state["model"])
    return model


def write_row(log_file, row: dict) -> None:
    """Append one JSON row to the log and flush it (a killed run keeps every finished step)."""
    log_file.write(json.dumps(row) + "\n")
    log_file.flush()
