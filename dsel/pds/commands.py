"""`dsel pds proxy | solve | fit-scorer | score`: proxy sample, data scores by optimal control, the scorer, the corpus scores.

    dsel pds proxy corpus=data/pool windows=163840 window=1025 out=runs/pds/proxy
    dsel pds solve model=runs/proxy proxy=runs/pds/proxy/proxy target=lima.jsonl out=runs/pds solver.steps=100
    torchrun --nproc_per_node 8 -m dsel pds solve ...          # the same G, each step's work split over ranks
    dsel pds fit-scorer gamma=runs/pds init=runs/scorer-lm out=runs/pds/scorer
    dsel pds score model=runs/pds/scorer corpus=data/corpus out=runs/pds/scores

`solve` writes, for proxy window i (tokens [i*window, (i+1)*window) of the proxy stream):
`G.npy` (float64 [outer_epochs, N], the per-window ascent direction of every outer epoch),
`target.npy` (float64 [N], exactly what the scorer is fitted to: by default G of the last epoch
z-scored over the proxy set and clipped to +-3), `gamma.npy` (the projected-simplex weights after
the last epoch) and last `gamma.json` (settings, target kind, estimator, objective per epoch). It
saves its state after every outer epoch under `state/` and resumes from there with the same settings.
"""
from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

import numpy as np

from dsel.cli import Command
from dsel.config import option, to_dict
from dsel.data.meta import check_same_tokenizer
from dsel.data.windows import corpus_prefix
from dsel.errors import DselError, file_error
from dsel.io import (atomic_path, check_free_space, check_writable, describe_differences, read_json, write_json,
                     writes_output)
from dsel.pds.fit import FitConfig
from dsel.pds.solver import SolverConfig
from dsel.score.commands import open_windows

log = logging.getLogger(__name__)

DATA_HELP = "Megatron dataset prefix (.idx/.bin), token file (.bin/.npy) or directory/glob of dolma token files"
JSONL_SUFFIXES = (".jsonl", ".json")


@dataclass
class ProxyConfig:
    corpus: str = option(help="corpus to sample from: " + DATA_HELP)
    window: int = option(help="tokens per window (the proxy LM's seq_len + 1)")
    windows: int = option(help="proxy windows N to sample (official: 163,840 of 1024 tokens)")
    out: str = option("runs/pds/proxy", "output directory: proxy.{bin,idx,meta.json} + pool_windows.npy")
    seed: int = option(0, "seed of the uniform sample")
    memmap_dtype: str = option("uint16", "token dtype of headerless token files")


@dataclass
class SolveConfig:
    model: str = option(help="proxy LM checkpoint directory")
    proxy: str = option(help="proxy data: " + DATA_HELP + " (e.g. written by `dsel pds proxy`)")
    target: str = option(help="target examples: a .jsonl of documents (tokenized with the model's tokenizer), or "
                              "a Megatron dataset (one example per document); J = mean of per-example mean losses")
    out: str = option("runs/pds", "output directory (G.npy, target.npy, gamma.npy, gamma.json, state/)")
    tokenizer: Optional[str] = option(None, "tokenizer of a jsonl target; None = the one the model's meta names")
    text_field: str = option("text", "jsonl field of the target text")
    window: int = option(0, "tokens per proxy window and most tokens per target example; 0 = seq_len + 1")
    num_proxy: int = option(0, "use the first N proxy windows (0 = all; sample them with `dsel pds proxy`)")
    num_target: int = option(0, "use the first N target examples (0 = all)")
    memmap_dtype: str = option("uint16", "token dtype of headerless token files")
    dtype: Literal["float32", "float64"] = option("float32", "precision of the solve")
    device: str = option("auto", "auto | cpu | cuda (under torchrun: cuda:LOCAL_RANK)")
    resume: bool = option(True, "continue from the last finished outer epoch saved under out/state")
    solver: SolverConfig = field(default_factory=SolverConfig, metadata={"help": "solver settings"})


@dataclass
class FitScorerConfig:
    gamma: str = option("runs/pds", "directory written by `dsel pds solve` (target.npy + gamma.json)")
    out: str = option("runs/pds/scorer", "scorer checkpoint directory")
    init: str = option("", "separately pretrained GPT checkpoint the scorer starts from (official: a pretrained "
                           "125M LM); '' = the solve's proxy model")
    proxy: str = option("", "proxy data; '' = the one recorded in gamma.json")
    device: str = option("auto", "auto | cpu | cuda")
    fit: FitConfig = field(default_factory=FitConfig, metadata={"help": "regression settings"})


@dataclass
class ScoreConfig:
    corpus: str = option(help="corpus to score: " + DATA_HELP)
    model: str = option("runs/pds/scorer", "scorer checkpoint written by `dsel pds fit-scorer`")
    out: str = option("runs/pds/scores", "score directory (shards, then the merged score table)")
    window: int = option(0, "tokens per window; 0 = the window the scorer was fitted on")
    memmap_dtype: str = option("uint16", "token dtype of headerless token files")
    batch_size: int = option(32, "windows per batch")
    device: str = option("auto", "auto | cpu | cuda")


# ----- proxy ---------------------------------------------------------------------------------------
def run_proxy(cfg: ProxyConfig) -> Path:
    """A seeded uniform sample of `windows` corpus windows (in corpus order) as the proxy dataset."""
    from dsel.data.meta import write_derived_meta
    from dsel.data.windows import corpus_prefix, write_windows

    if cfg.window < 2 or cfg.windows < 1:
        raise DselError(f"pds proxy: window={cfg.window} must be at least 2 and windows={cfg.windows} at least 1")
    windows = open_windows(cfg.corpus, cfg.window, cfg.memmap_dtype)
    if cfg.windows > len(windows):
        raise file_error(cfg.corpus, f"has {len(windows)} windows of {cfg.window} tokens, fewer than "
                                     f"windows={cfg.windows}")
    ids = sample_windows(len(windows), cfg.windows, cfg.seed)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    _write_npy(out / "pool_windows.npy", ids)
    proxy = write_windows(windows, ids, out / "proxy")
    write_derived_meta(corpus_prefix(windows.source), proxy, proxy_of=cfg.corpus, proxy_seed=cfg.seed,
                       window=cfg.window)
    log.info("pds proxy: %d of %d windows of %d tokens -> %s", len(ids), len(windows), cfg.window, out / "proxy")
    return out / "proxy"


def sample_windows(total: int, count: int, seed: int) -> np.ndarray:
    """`count` distinct window ids of `total`, uniform without replacement, sorted."""
    return np.sort(np.random.default_rng(seed).choice(total, size=count, replace=False))


# ----- solve ---------------------------------------------------------------------------------------
@writes_output()
def run_solve(cfg: SolveConfig) -> Path:
    """Solve G, the scorer target and gamma; write them into cfg.out (rank 0 under torchrun)."""
    import torch
    import torch.distributed as dist

    from dsel.color.scorer import ScoredModel
    from dsel.models.checkpoint import load_model
    from dsel.pds.solver import PMPSolver, scorer_target
    from dsel.score.commands import start_distributed

    device, created = start_distributed(cfg.device)
    try:
        model, meta = load_model(cfg.model, device)
        if not hasattr(model, "head_weight"):
            raise file_error(cfg.model, f"holds a '{model.arch}' model; the PMP solver needs a GPT proxy LM")
        model = model.to(getattr(torch, cfg.dtype))
        lm = ScoredModel("proxy", model, cfg.model, meta)
        window = cfg.window or model.config.seq_len + 1
        proxy = load_tokens(cfg.proxy, window, cfg.num_proxy, cfg.memmap_dtype, lm)
        target = load_target_examples(cfg, window, lm)
        out = Path(cfg.out)
        # float32 G rows of every outer epoch, in state/ and the output, plus gamma, target and their copies
        check_free_space(out, len(proxy) * 4 * (2 * cfg.solver.outer_epochs + 6), "the solve's outputs")
        key = _solve_key(cfg, proxy, target, window)
        gamma, rows, objectives, start_epoch = _resume_state(out, key, len(proxy), cfg.solver.outer_epochs) if cfg.resume \
            else (None, [], [], 0)
        solver = PMPSolver(model, proxy, target, cfg.solver, device=device)

        def save_state(epoch: int, result) -> None:
            rows.append(result.G)
            objectives.append(result.objective)
            if solver.rank == 0:
                _write_npy(out / "state" / "gamma.npy", result.gamma)
                _write_npy(out / "state" / "G.npy", np.stack(rows))
                write_json(out / "state" / "state.json",
                           {"key": key, "finished_epochs": epoch + 1, "objectives": objectives})

        results = solver.solve(gamma, start_epoch, on_epoch=save_state)
        gamma = results[-1].gamma if results else gamma
        G = np.stack(rows)
        target_values = scorer_target(cfg.solver.target_kind, G[-1], gamma, cfg.solver.clip)
        if solver.rank == 0:
            _write_outputs(cfg, out, G, target_values, gamma, objectives, solver, meta,
                           num_target=len(target), window=window)
        return out / "target.npy"
    finally:
        if created:
            dist.destroy_process_group()


def _write_outputs(cfg: SolveConfig, out: Path, G, target_values, gamma, objectives, solver, meta,
                   num_target: int, window: int) -> None:
    """G.npy, target.npy, gamma.npy, then gamma.json (written last: its presence means a finished solve)."""
    (out / "gamma.json").unlink(missing_ok=True)  # the manifest, written last: never beside another gamma.npy
    _write_npy(out / "G.npy", G)
    _write_npy(out / "target.npy", target_values)
    _write_npy(out / "gamma.npy", gamma)
    write_json(out / "gamma.json", {
        "key": "row i of every .npy is proxy window i (tokens [i*window, (i+1)*window) of the proxy stream)",
        "target_kind": cfg.solver.target_kind, "estimator": solver.estimator, "clip": cfg.solver.clip,
        "num_windows": len(gamma), "window": window, "proxy": cfg.proxy, "target": cfg.target,
        "num_target_examples": num_target, "model": cfg.model, "model_meta": meta, "ranks": solver.world,
        "objective_per_epoch": objectives, "G_std_per_epoch": [float(g.std()) for g in G],
        "gamma_zeros": int((gamma == 0).sum()), "settings": to_dict(cfg),
    })
    print(f"pds solve: {len(gamma)} proxy windows, target {cfg.solver.target_kind} ({solver.estimator} G, "
          f"{len(G)} outer epoch(s), objective {objectives[-1]:.4f}) -> {out / 'target.npy'}")


def load_tokens(path: str, window: int, limit: int, memmap_dtype: str, lm) -> np.ndarray:
    """The first `limit` (0 = all) windows of a dataset as an array [N, window], checked against the model."""
    windows = open_windows(path, window, memmap_dtype)
    count = len(windows) if limit <= 0 else min(limit, len(windows))
    check_same_tokenizer(lm.checkpoint, lm.meta, corpus_prefix(windows.source))
    tokens = windows.batch(np.arange(count))
    check_vocab(tokens, lm.vocab_size, path, lm.checkpoint)
    return tokens


def load_target_examples(cfg: SolveConfig, window: int, lm) -> list[np.ndarray]:
    """The target examples, each tokenised on its own and cut to its first `window` tokens."""
    from dsel.color.target import dataset_documents, read_jsonl_texts, tokenize_texts

    if cfg.target.endswith(JSONL_SUFFIXES):
        documents = tokenize_texts(read_jsonl_texts(cfg.target, cfg.text_field), _tokenizer(cfg, lm))
    else:
        from dsel.data.indexed import dataset_exists

        if not dataset_exists(_prefix(cfg.target)):
            raise file_error(cfg.target, "target not found (expected a .jsonl file or a Megatron dataset prefix)")
        check_same_tokenizer(lm.checkpoint, lm.meta, _prefix(cfg.target))
        documents = dataset_documents(_prefix(cfg.target))
    examples = [doc[:window] for doc in documents if len(doc) >= 2]
    if cfg.num_target > 0:
        examples = examples[: cfg.num_target]
    if not examples:
        raise file_error(cfg.target, "no target example has 2 or more tokens")
    top = max(int(e.max()) for e in examples)
    if top >= lm.vocab_size:
        raise file_error(cfg.target, f"token id {top} is past the vocabulary of {lm.vocab_size} of model "
                                     f"{lm.checkpoint}; the data and the model use different tokenizers")
    return examples


def _tokenizer(cfg: SolveConfig, lm):
    """The tokenizer of a jsonl target: tokenizer=, else the model's, checked against the model's sha256."""
    from dsel.data.meta import tokenizer_mismatch
    from dsel.data.tokenizer import load_tokenizer

    path = cfg.tokenizer or lm.meta.get("tokenizer")
    if not path:
        raise file_error(cfg.model, f"checkpoint records no tokenizer; set tokenizer= to tokenize {cfg.target}")
    tokenizer = load_tokenizer(path)
    key = tokenizer_mismatch(lm.meta, tokenizer.identity())
    if key:
        raise file_error(path, f"not the tokenizer the proxy model {cfg.model} was trained with ({key} "
                               f"{tokenizer.identity()[key]!r}, the model's {lm.meta[key]!r})")
    return tokenizer


def _prefix(path: str) -> str:
    return path[:-4] if path.endswith((".bin", ".idx")) else path


def check_vocab(tokens: np.ndarray, vocab_size: int, data_path: str, model_path: str) -> None:
    """Refuse data whose token ids do not fit the model's vocabulary (a tokenizer mismatch)."""
    largest = int(tokens.max()) if tokens.size else 0
    if largest >= vocab_size:
        raise file_error(data_path, f"token id {largest} is past the vocabulary of {vocab_size} of model "
                                    f"{model_path}; the data and the model use different tokenizers")


def _resume_state(out: Path, key: dict, num_windows: int, outer_epochs: int):
    """(gamma, G rows, objectives, first epoch to run) from out/state, or a fresh start."""
    state_file = out / "state" / "state.json"
    if not state_file.is_file():
        return None, [], [], 0
    state = read_json(state_file)
    if state.get("key") != key:
        raise file_error(state_file, f"was written by a solve of other settings or data "
                                     f"({describe_differences(state.get('key'), key)}); use another out "
                                     "directory or resume=false")
    if state["finished_epochs"] > outer_epochs:
        raise file_error(state_file, f"holds {state['finished_epochs']} finished outer epochs, more than "
                                     f"solver.outer_epochs={outer_epochs}; use another out directory or resume=false")
    gamma = read_vector(out / "state" / "gamma.npy", num_windows, "gamma")
    rows = list(np.load(out / "state" / "G.npy", allow_pickle=False))
    log.info("resuming the PDS solve after outer epoch %d", state["finished_epochs"] - 1)
    return gamma, rows, list(state["objectives"]), int(state["finished_epochs"])


def _solve_key(cfg: SolveConfig, proxy: np.ndarray, target: list[np.ndarray], window: int) -> dict:
    """What must not change across a resume: every solver setting but the epochs and the post-processing
    ones, and the content read (the model's weights digest, the proxy and target tokens), not their paths."""
    from dsel.models.checkpoint import checkpoint_digest

    settings = to_dict(cfg)
    for key in ("outer_epochs", "target_kind", "clip", "micro_batch"):  # micro_batch: test_faults proves it
        settings["solver"].pop(key)
    for key in ("out", "resume", "device", "model", "proxy", "target", "tokenizer", "text_field", "num_proxy",
                "num_target", "window", "memmap_dtype"):  # what they select is in the token digests
        settings.pop(key)
    inputs = {"model": checkpoint_digest(cfg.model), "proxy_tokens": tokens_digest([proxy]),
              "target_tokens": tokens_digest(target)}
    return {**settings, "num_proxy_windows": len(proxy), "num_target_examples": len(target), "window_tokens": window,
            "inputs": inputs}


def tokens_digest(arrays) -> str:
    """sha256 of a sequence of token arrays (their shapes and ids, whatever their dtype)."""
    digest = hashlib.sha256()
    for array in arrays:
        digest.update(f"{array.shape}\0".encode())
        digest.update(memoryview(np.ascontiguousarray(array, dtype=np.int64).reshape(-1)))
    return digest.hexdigest()[:32]


# ----- fit-scorer ----------------------------------------------------------------------------------
@writes_output()
def run_fit_scorer(cfg: FitScorerConfig) -> dict:
    """Fit the scorer on the solve's target.npy; keep the best-validation-Spearman model with its metrics."""
    from dsel.device import resolve_device
    from dsel.models.checkpoint import checkpoint_bytes, load_model, save_model
    from dsel.models.scorer import Scorer
    from dsel.pds.fit import fit_scorer

    solve_dir = Path(cfg.gamma)
    info = read_json(solve_dir / "gamma.json")
    target = read_vector(solve_dir / "target.npy", info["num_windows"], "scorer target")
    device = resolve_device(cfg.device)
    init = cfg.init or info["model"]
    gpt, meta = load_model(init, device)
    if not hasattr(gpt, "head_weight"):
        raise file_error(init, f"holds a '{gpt.arch}' model; init= needs a GPT language-model checkpoint")
    if gpt.config.seq_len + 1 < info["window"]:
        raise file_error(init, f"has a context of {gpt.config.seq_len} tokens, shorter than the proxy windows of "
                               f"{info['window']} tokens")
    proxy = cfg.proxy or info["proxy"]
    windows = open_windows(proxy, info["window"], info["settings"].get("memmap_dtype", "uint16"))
    if len(windows) < len(target):
        raise file_error(proxy, f"has {len(windows)} windows of {info['window']} tokens but "
                                f"{solve_dir}/target.npy has {len(target)} values")
    check_same_tokenizer(init, meta, corpus_prefix(windows.source))
    tokens = windows.batch(np.arange(len(target)))
    check_vocab(tokens, gpt.config.vocab_size, proxy, init)
    check_free_space(cfg.out, checkpoint_bytes(gpt.config), "the scorer checkpoint")
    scorer = Scorer.from_gpt(gpt).float()
    metrics = fit_scorer(scorer, tokens, target, cfg.fit, device)
    metrics["target_kind"] = info.get("target_kind", "gamma")
    save_model(cfg.out, scorer, {**meta, "pds_fit": metrics, "window": info["window"], "gamma": cfg.gamma,
                                 "init": init})
    print(f"scorer fit: best validation spearman {metrics['val']['spearman']:.3f}, pearson "
          f"{metrics['val']['pearson']:.3f} (step {metrics['best_step']}) on {metrics['val_windows']} windows "
          f"-> {cfg.out}")
    return metrics


def read_vector(path: Path, num_windows: int, what: str) -> np.ndarray:
    """A .npy of one finite value per proxy window."""
    path = Path(path)
    if not path.is_file():
        raise file_error(path, f"{what} file not found (run `dsel pds solve` first)")
    try:
        values = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as e:
        raise file_error(path, f"not a readable .npy file ({e})") from None
    if values.ndim != 1 or len(values) != num_windows:
        raise file_error(path, f"holds {values.shape} values but the proxy set has {num_windows} windows")
    if not np.isfinite(values).all():
        raise file_error(path, "holds non-finite values")
    return values.astype(np.float64)


# ----- score ---------------------------------------------------------------------------------------
def run_score(cfg: ScoreConfig) -> Path:
    """Score every window of a corpus with the fitted scorer (this rank's shards under torchrun; rank 0 merges)."""
    import torch.distributed as dist

    from dsel.models.checkpoint import checkpoint_digest, read_model_config, read_model_meta
    from dsel.pds.scorer import load_pds_scorer
    from dsel.score.commands import start_distributed
    from dsel.score.engine import score_windows

    check_writable(cfg.out)
    read_model_config(cfg.model)
    meta = read_model_meta(cfg.model)
    window = cfg.window or int(meta.get("window", 0))
    if window <= 0:
        raise file_error(cfg.model, "records no window size; set window=")
    windows = open_windows(cfg.corpus, window, cfg.memmap_dtype)
    check_same_tokenizer(cfg.model, meta, corpus_prefix(windows.source))
    device, created = start_distributed(cfg.device)
    try:
        scorer = load_pds_scorer(cfg.model, device)
        return score_windows(windows, scorer, cfg.out, cfg.batch_size, device=device,
                             meta={"scorer": "pds", "model": cfg.model, "corpus": cfg.corpus, "window": window,
                                   "model_digest": checkpoint_digest(cfg.model)})
    finally:
        if created:
            dist.destroy_process_group()


# ----- shared --------------------------------------------------------------------------------------
def _write_npy(path: Path, array: np.ndarray) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, array)


COMMANDS = [
    Command("pds proxy", "sample N corpus windows uniformly (seeded) as the PDS proxy set", ProxyConfig, run_proxy),
    Command("pds solve", "solve PDS per-window scores on a proxy set by optimal control (PMP): G, target, gamma", SolveConfig, run_solve),
    Command("pds fit-scorer", "fit the PDS data scorer to the solve's target.npy (best validation Spearman kept)",
            FitScorerConfig, run_fit_scorer),
    Command("pds score", "score a corpus with the fitted PDS scorer (one score per window)", ScoreConfig, run_score),
]
