"""`dsel pds solve | fit-scorer | score`: data weights by optimal control, the scorer, the corpus scores.

    dsel pds solve model=runs/proxy proxy=data/proxy target=data/target out=runs/pds solver.steps=100
    dsel pds fit-scorer gamma=runs/pds out=runs/pds/scorer
    dsel pds score model=runs/pds/scorer corpus=data/corpus out=runs/pds/scores

`solve` writes `gamma.npy` (float64, one weight per proxy window, window i of the proxy data =
gamma[i], sums to 1) and `gamma.json` (settings, objective per outer epoch). It saves its state
after every outer epoch under `state/` and resumes from there when re-run with the same settings.
"""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from dsel.cli import Command
from dsel.config import option, to_dict
from dsel.data.meta import check_same_tokenizer
from dsel.data.windows import corpus_prefix
from dsel.errors import file_error
from dsel.io import atomic_path, read_json, write_json
from dsel.pds.fit import FitConfig
from dsel.pds.solver import SolverConfig
from dsel.score.commands import open_windows

log = logging.getLogger(__name__)

DATA_HELP = "Megatron dataset prefix (.idx/.bin) or headerless token file (.bin/.npy)"


@dataclass
class SolveConfig:
    model: str = option(help="proxy LM checkpoint directory")
    proxy: str = option(help="proxy data: " + DATA_HELP)
    target: str = option(help="target data: " + DATA_HELP)
    out: str = option("runs/pds", "output directory (gamma.npy, gamma.json, state/)")
    window: int = option(0, "tokens per window; 0 = the model's seq_len + 1")
    num_proxy: int = option(0, "use the first N proxy windows (0 = all)")
    num_target: int = option(0, "use the first N target windows (0 = all)")
    memmap_dtype: str = option("uint16", "token dtype of headerless token files")
    dtype: Literal["float32", "float64"] = option("float32", "precision of the solve")
    device: str = option("auto", "auto | cpu | cuda")
    resume: bool = option(True, "continue from the last finished outer epoch saved under out/state")
    solver: SolverConfig = field(default_factory=SolverConfig, metadata={"help": "solver settings"})


@dataclass
class FitScorerConfig:
    gamma: str = option("runs/pds", "directory written by `dsel pds solve` (gamma.npy + gamma.json)")
    out: str = option("runs/pds/scorer", "scorer checkpoint directory")
    init: str = option("", "GPT checkpoint whose trunk starts the scorer; '' = the solve's proxy model")
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


# ----- solve ---------------------------------------------------------------------------------------
def run_solve(cfg: SolveConfig) -> Path:
    """Solve gamma and write gamma.npy + gamma.json into cfg.out."""
    import torch

    from dsel.models.checkpoint import load_model
    from dsel.device import resolve_device
    from dsel.pds.solver import PMPSolver

    device = resolve_device(cfg.device)
    model, meta = load_model(cfg.model, device)
    if not hasattr(model, "head_weight"):
        raise file_error(cfg.model, f"holds a '{model.arch}' model; the PMP solver needs a GPT proxy LM")
    model = model.to(getattr(torch, cfg.dtype))
    window = cfg.window or model.config.seq_len + 1
    proxy = load_tokens(cfg.proxy, window, cfg.num_proxy, cfg.memmap_dtype, model.config.vocab_size, cfg.model, meta)
    target = load_tokens(cfg.target, window, cfg.num_target, cfg.memmap_dtype, model.config.vocab_size, cfg.model, meta)
    out = Path(cfg.out)
    fingerprint = _fingerprint(cfg, len(proxy), len(target), window)
    gamma, start_epoch = _resume_state(out, fingerprint, len(proxy)) if cfg.resume else (None, 0)
    objectives = list(read_json(out / "state" / "state.json")["objectives"]) if start_epoch else []

    def save_state(epoch: int, gamma: np.ndarray, objective: float) -> None:
        objectives.append(objective)
        _write_npy(out / "state" / "gamma.npy", gamma)
        write_json(out / "state" / "state.json",
                   {"fingerprint": fingerprint, "finished_epochs": epoch + 1, "objectives": objectives})

    solver = PMPSolver(model, proxy, target, cfg.solver, device=device)
    gamma = solver.solve(gamma, start_epoch, on_epoch=save_state)
    _write_npy(out / "gamma.npy", gamma)
    write_json(out / "gamma.json", {
        "key": "gamma[i] is the weight of proxy window i (tokens [i*window, (i+1)*window) of the proxy stream)",
        "num_windows": len(proxy), "window": window, "proxy": cfg.proxy, "target": cfg.target,
        "num_target_windows": len(target), "model": cfg.model, "model_meta": meta,
        "objective_per_epoch": objectives, "settings": to_dict(cfg),
    })
    log.info("wrote %s (%d windows, %d with weight 0)", out / "gamma.npy", len(gamma), int((gamma == 0).sum()))
    return out / "gamma.npy"


def load_tokens(path: str, window: int, limit: int, memmap_dtype: str, vocab_size: int, model_path: str,
                model_meta: dict | None = None) -> np.ndarray:
    """The first `limit` (0 = all) windows of a dataset as an array [N, window], tokenizer- and vocabulary-checked."""
    windows = open_windows(path, window, memmap_dtype)
    check_same_tokenizer(model_path, model_meta or {}, corpus_prefix(windows.source))
    count = len(windows) if limit <= 0 else min(limit, len(windows))
    tokens = windows.batch(np.arange(count))
    check_vocab(tokens, vocab_size, path, model_path)
    return tokens


def check_vocab(tokens: np.ndarray, vocab_size: int, data_path: str, model_path: str) -> None:
    """Refuse data whose token ids do not fit the model's vocabulary (a tokenizer mismatch)."""
    largest = int(tokens.max()) if tokens.size else 0
    if largest >= vocab_size:
        raise file_error(data_path, f"token id {largest} is past the vocabulary of {vocab_size} of model "
                                    f"{model_path}; the data and the model use different tokenizers")


def _resume_state(out: Path, fingerprint: str, num_windows: int) -> tuple[np.ndarray | None, int]:
    """(gamma, first epoch to run) from out/state, or (None, 0) when there is nothing to resume."""
    state_file = out / "state" / "state.json"
    if not state_file.is_file():
        return None, 0
    state = read_json(state_file)
    if state.get("fingerprint") != fingerprint:
        raise file_error(state_file, "was written by a solve with other settings or data; use another out "
                                     "directory or resume=false")
    gamma = read_gamma(out / "state" / "gamma.npy", num_windows)
    log.info("resuming the PDS solve after outer epoch %d", state["finished_epochs"] - 1)
    return gamma, int(state["finished_epochs"])


def _fingerprint(cfg: SolveConfig, num_proxy: int, num_target: int, window: int) -> str:
    """What must not change across a resume: the data, the model and every solver setting but the epochs."""
    settings = to_dict(cfg)
    settings["solver"].pop("outer_epochs")
    for key in ("out", "resume", "device"):
        settings.pop(key)
    settings.update(num_proxy_windows=num_proxy, num_target_windows=num_target, window_tokens=window)
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


# ----- fit-scorer ----------------------------------------------------------------------------------
def run_fit_scorer(cfg: FitScorerConfig) -> dict:
    """Fit the scorer on the solve's gamma; save it with its validation correlations."""
    from dsel.device import resolve_device
    from dsel.models.checkpoint import load_model, save_model
    from dsel.models.scorer import Scorer
    from dsel.pds.fit import fit_scorer

    info = read_json(Path(cfg.gamma) / "gamma.json")
    gamma = read_gamma(Path(cfg.gamma) / "gamma.npy", info["num_windows"])
    device = resolve_device(cfg.device)
    init = cfg.init or info["model"]
    gpt, meta = load_model(init, device)
    proxy = cfg.proxy or info["proxy"]
    windows = open_windows(proxy, info["window"], info["settings"].get("memmap_dtype", "uint16"))
    if len(windows) < len(gamma):
        raise file_error(proxy, f"has {len(windows)} windows of {info['window']} tokens but "
                                f"{cfg.gamma}/gamma.npy has {len(gamma)} weights")
    check_same_tokenizer(init, meta, corpus_prefix(windows.source))
    tokens = windows.batch(np.arange(len(gamma)))
    check_vocab(tokens, gpt.config.vocab_size, proxy, init)
    scorer = Scorer.from_gpt(gpt).float()
    metrics = fit_scorer(scorer, tokens, gamma, cfg.fit, device)
    save_model(cfg.out, scorer, {**meta, "pds_fit": metrics, "window": info["window"], "gamma": cfg.gamma})
    print(f"scorer fit: validation pearson {metrics['val']['pearson']:.3f}, spearman {metrics['val']['spearman']:.3f} "
          f"on {metrics['val_windows']} windows -> {cfg.out}")
    return metrics


def read_gamma(path: Path, num_windows: int) -> np.ndarray:
    """gamma.npy, checked to hold one finite weight per proxy window."""
    path = Path(path)
    if not path.is_file():
        raise file_error(path, "gamma file not found (run `dsel pds solve` first)")
    try:
        gamma = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as e:
        raise file_error(path, f"not a readable .npy file ({e})") from None
    if gamma.ndim != 1 or len(gamma) != num_windows:
        raise file_error(path, f"holds {gamma.shape} weights but the proxy set has {num_windows} windows")
    if not np.isfinite(gamma).all():
        raise file_error(path, "holds non-finite weights")
    return gamma.astype(np.float64)


# ----- score ---------------------------------------------------------------------------------------
def run_score(cfg: ScoreConfig) -> Path:
    """Score every window of a corpus with the fitted scorer (this rank's shards under torchrun; rank 0 merges)."""
    import torch.distributed as dist

    from dsel.models.checkpoint import read_model_config, read_model_meta
    from dsel.pds.scorer import load_pds_scorer
    from dsel.score.commands import start_distributed
    from dsel.score.engine import score_windows

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
                             meta={"scorer": "pds", "model": cfg.model, "corpus": cfg.corpus, "window": window})
    finally:
        if created:
            dist.destroy_process_group()


# ----- shared --------------------------------------------------------------------------------------
def _write_npy(path: Path, array: np.ndarray) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, array)


COMMANDS = [
    Command("pds solve", "solve PDS data weights gamma on a proxy set by optimal control (PMP)", SolveConfig, run_solve),
    Command("pds fit-scorer", "fit the PDS data scorer to gamma (regression, validation correlations)",
            FitScorerConfig, run_fit_scorer),
    Command("pds score", "score a corpus with the fitted PDS scorer (one score per window)", ScoreConfig, run_score),
]
