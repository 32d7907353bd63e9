"""Model checkpoints: a directory with `model.safetensors`, `config.json` and `meta.json`.

Checkpoints written before safetensors hold `model.pt` (a torch state dict) and still load. A
transformers model folder of a supported architecture (dsel.models.hf: Llama, GPT-NeoX) is read
wherever a checkpoint is, converted to a dsel GPT on load.

`config.json` holds the architecture name and its GPTConfig, enough to rebuild the module;
`meta.json` is free-form provenance (tokenizer, data, training settings) that later stages check
against their inputs. A checkpoint is written into a temporary directory and renamed into place,
so a killed save never leaves a half-written checkpoint and never destroys the previous one.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from pathlib import Path

import torch
from torch import nn

from dsel.config import from_dict
from dsel.errors import DselError, file_error
from dsel.io import file_digest, read_json, remove_stale, replace_dir as _replace_dir
from dsel.models.config import GPTConfig

WEIGHTS = "model.safetensors"
LEGACY_WEIGHTS = "model.pt"


def architectures() -> dict[str, type]:
    """Architecture name -> module class."""
    from dsel.models.gpt import GPT
    from dsel.models.scorer import Scorer

    return {GPT.arch: GPT, Scorer.arch: Scorer}


def build_model(arch: str, config: GPTConfig) -> nn.Module:
    """A freshly initialised module of architecture `arch`."""
    classes = architectures()
    if arch not in classes:
        raise DselError(f"unknown model architecture '{arch}'; known: {', '.join(classes)}")
    return classes[arch](config)


def save_model(path: str | os.PathLike, model: nn.Module, meta: dict | None = None) -> Path:
    """Write `model` (its weights, architecture and config) and `meta` as a checkpoint directory."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    remove_stale(path)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        save_file(state, tmp / WEIGHTS)
        config = {"arch": model.arch, "model": dataclasses.asdict(model.config)}
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        (tmp / "meta.json").write_text(json.dumps(meta or {}, indent=2, sort_keys=True, default=str) + "\n")
        (tmp / DIGEST).write_text(json.dumps(weights_digest(tmp), indent=2) + "\n")
        _replace_dir(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def checkpoint_bytes(config: GPTConfig, copies: int = 2) -> int:
    """About the disk a checkpoint of `config` takes while it is written: fp32 weights, `copies` times (the
    new one is written beside the old one, then renamed over it)."""
    return config.num_params() * 4 * copies


WEIGHT_SUFFIXES = (".pt", ".safetensors", ".bin")  # dsel's, older dsel's, a transformers folder's
DIGEST = "digest.json"  # sha256 of the weights, written at save time: what later stages key their reuse on


def weights_digest(path: str | os.PathLike) -> dict:
    """{"sha256": digest of every weight file of checkpoint folder `path` (name and bytes), "files": sizes}."""
    files = weight_files(Path(path))
    if not files:
        raise file_error(path, "model weights not found")
    text = "".join(f"{p.name}\0{file_digest(p)}\n" for p in files)
    return {"sha256": hashlib.sha256(text.encode()).hexdigest(), "files": {p.name: p.stat().st_size for p in files}}


def checkpoint_digest(path: str | os.PathLike) -> str:
    """The content digest of a checkpoint's weights: the one saved with it, else (an older checkpoint,
    or weight files changed since) computed now."""
    path = Path(path)
    saved = path / DIGEST
    if saved.is_file():
        record = read_json(saved)
        sizes = {name: (path / name).stat().st_size if (path / name).is_file() else None for name in record["files"]}
        if sizes == record["files"] and {p.name for p in weight_files(path)} == set(record["files"]):
            return record["sha256"]
    return weights_digest(path)["sha256"]


def weight_files(path: Path) -> list[Path]:
    """The weight files of checkpoint folder `path` (model.safetensors, model.pt, pytorch_model.bin), by name."""
    return sorted(p for p in path.iterdir() if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES))


def read_model_config(path: str | os.PathLike) -> tuple[str, GPTConfig]:
    """(architecture, GPTConfig) of a checkpoint directory, without loading its weights."""
    from dsel.models import hf

    path = Path(path)
    if not path.is_dir():
        raise file_error(path, "model checkpoint directory not found")
    if hf.is_hf_folder(path):
        return "gpt", hf.read_hf_config(path)[1]
    config = read_json(path / "config.json")
    if not isinstance(config, dict) or "arch" not in config or "model" not in config:
        raise file_error(path / "config.json", "is not a dsel model config (needs 'arch' and 'model')")
    return config["arch"], from_dict(GPTConfig, config["model"], str(path / "config.json"))


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    """(module on `device`, meta) from a checkpoint directory."""
    path = Path(path)
    arch, config = read_model_config(path)
    model = build_model(arch, config)
    load_weights(model, path)
    return model.to(device), read_model_meta(path)


def read_model_meta(path: str | os.PathLike) -> dict:
    """A checkpoint's meta (tokenizer identity, provenance); a transformers folder's from its tokenizer files."""
    from dsel.models import hf

    path = Path(path)
    if hf.is_hf_folder(path):
        return hf.hf_meta(path)
    return read_json(path / "meta.json") if (path / "meta.json").is_file() else {}


def load_weights(model: nn.Module, path: str | os.PathLike) -> None:
    """Load a checkpoint's weights into `model`, refusing any name or shape mismatch."""
    from dsel.models import hf

    path = Path(path)
    state = hf.load_hf_state(path) if hf.is_hf_folder(path) else read_weights(path)
    mismatch = check_state_dict(model, state)
    if mismatch:
        raise file_error(path, f"checkpoint from another architecture: {mismatch}")
    model.load_state_dict(state)


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """The state dict of a dsel checkpoint directory: model.safetensors, or model.pt of older checkpoints."""
    from safetensors.torch import load_file

    weights = path / WEIGHTS if (path / WEIGHTS).is_file() else path / LEGACY_WEIGHTS
    if not weights.is_file():
        raise file_error(path / WEIGHTS, "model weights not found")
    try:
        if weights.name == WEIGHTS:
            return load_file(weights)
        return torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as e:  # safetensors and torch raise many types for a corrupt file
        raise file_error(weights, f"cannot be read as model weights ({type(e).__name__})") from None


def check_state_dict(model: nn.Module, state: dict) -> str:
    """'' when `state` fits `model` exactly, else a short description of the first mismatch."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing:
        return f"missing {missing[0]}" + (f" and {len(missing) - 1} more" if len(missing) > 1 else "")
    if unexpected:
        return f"unexpected {unexpected[0]}" + (f" and {len(unexpected) - 1} more" if len(unexpected) > 1 else "")
    for name, tensor in own.items():
        if tuple(state[name].shape) != tuple(tensor.shape):
            return f"{name} has shape {tuple(state[name].shape)}, the model expects {tuple(tensor.shape)}"
    return ""
