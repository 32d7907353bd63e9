"""`dsel export hf`: a dsel GPT checkpoint as a transformers model folder (lm-eval `--model hf`, vLLM, OLMES).

    dsel export hf model=runs/pretrain/selected/model out=hf/selected
    lm_eval --model hf --model_args pretrained=hf/selected --tasks ...
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from dsel.cli import Command
from dsel.config import option


@dataclass
class ExportHFConfig:
    model: str = option(help="dsel GPT checkpoint directory (e.g. runs/pretrain/model)")
    out: str = option(help="output transformers folder: config.json, model.safetensors, tokenizer files")
    tokenizer: str = option("", "tokenizer to ship (sentencepiece .model, tokenizer.json or folder); '' = the "
                                "checkpoint's, from its meta")


def run_export_hf(cfg: ExportHFConfig) -> Path:
    from dsel.models.hf import export_hf

    out = export_hf(cfg.model, cfg.out, cfg.tokenizer or None)
    print(f"exported {cfg.model} -> {out} (transformers; load with AutoModelForCausalLM.from_pretrained)")
    return out


COMMANDS = [Command("export hf", "write a GPT checkpoint as a transformers model folder (safetensors + tokenizer)",
                    ExportHFConfig, run_export_hf)]
