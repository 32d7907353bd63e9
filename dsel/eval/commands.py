"""`dsel eval loss` and `dsel eval lm-eval`: held-out losses per domain and lm-eval tasks of a checkpoint.

    dsel eval loss model=runs/x/model 'data={science: data/valid/science, legal: data/valid/legal}' out=loss.json
    dsel eval lm-eval model=runs/x/model tasks=[dsel_science_facts] out=lm_eval.json

For lm-eval's full command line use `python -m dsel.eval.lm_eval --model dsel --model_args checkpoint=DIR ...`.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from dsel.cli import Command
from dsel.config import option
from dsel.errors import DselError
from dsel.io import check_free_space, check_writable, write_json

log = logging.getLogger(__name__)
RESULTS_BYTES = 1 << 20  # a results JSON: well under a MiB


@dataclass
class EvalLossConfig:
    model: str = option(help="GPT checkpoint directory", aliases=("checkpoint",))
    data: dict[str, str] = option(help="validation sets, name: corpus (Megatron prefix, token file or directory "
                                       "of dolma token files; e.g. one per domain)")
    out: str = option("", "JSON file of the losses; '' = <model>/heldout_loss.json")
    window: int = option(0, "tokens per window; 0 = the model's seq_len + 1")
    batch_size: int = option(16, "windows per forward pass")
    max_batches: int = option(0, "evaluate at most this many batches per set (0 = every window)")
    device: str = option("auto", "cpu, cuda, cuda:N or auto")


@dataclass
class LmEvalConfig:
    model: str = option(help="GPT checkpoint directory (its meta names the tokenizer)", aliases=("checkpoint",))
    tasks: list[str] = option(["dsel_science_facts"], "lm-eval task names")
    tokenizer: str = option("", "tokenizer (sentencepiece .model, tokenizer.json or folder); '' = the checkpoint's")
    include_path: str = option("", "extra directory of task YAMLs (dsel's bundled tasks are always included)")
    builtin_tasks: bool = option(True, "also index lm-eval's built-in tasks (slower start; off for bundled tasks only)")
    num_fewshot: Optional[int] = option(None, "few-shot examples; None = the task's default")
    limit: Optional[float] = option(None, "evaluate only this many (or this fraction of) examples per task")
    batch_size: int = option(16, "requests per forward pass")
    device: str = option("auto", "cpu, cuda, cuda:N or auto")
    out: str = option("", "JSON file of the results; '' = <model>/lm_eval.json")


def run_loss(cfg: EvalLossConfig) -> dict:
    """Held-out loss of the checkpoint on every validation set; written as JSON."""
    from dsel.eval.heldout import heldout_losses
    from dsel.device import resolve_device
    from dsel.models.checkpoint import load_model

    out = cfg.out or str(Path(cfg.model) / "heldout_loss.json")
    check_writable(out)
    check_free_space(out, RESULTS_BYTES, "the results")
    device = resolve_device(cfg.device)
    model, meta = load_model(cfg.model, device)
    if not hasattr(model, "sequence_losses"):
        raise DselError(f"{cfg.model}: holds a '{model.arch}' model, not a GPT language model")
    window = cfg.window or model.config.seq_len + 1
    losses = heldout_losses(model, cfg.data, window, cfg.batch_size, cfg.max_batches, device, cfg.model, meta)
    write_json(out, {"checkpoint": cfg.model, "window": window, "losses": losses})
    for name, row in losses.items():
        print(f"{name}: loss {row['loss']:.4f} over {row['windows']} windows")
    return losses


def run_lm_eval(cfg: LmEvalConfig) -> dict:
    """lm-eval's simple_evaluate on the `dsel` model; writes the results JSON (metrics per task)."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    from dsel.eval.lm_eval import TASKS_DIR
    from dsel.device import resolve_device
    from dsel.eval.lm_model import DselLM

    out = cfg.out or Path(cfg.model) / "lm_eval.json"
    check_writable(out)
    check_free_space(out, RESULTS_BYTES, "the results")
    model = DselLM(cfg.model, tokenizer=cfg.tokenizer or None, device=resolve_device(cfg.device),
                   batch_size=cfg.batch_size)
    paths = [str(TASKS_DIR)] + ([cfg.include_path] if cfg.include_path else [])
    manager = TaskManager(include_path=paths, include_defaults=cfg.builtin_tasks)
    unknown = [t for t in cfg.tasks if t not in manager.all_tasks]
    if unknown:
        raise DselError(f"unknown lm-eval task(s) {', '.join(unknown)}")
    results = lm_eval.simple_evaluate(model=model, tasks=list(cfg.tasks), num_fewshot=cfg.num_fewshot,
                                      limit=cfg.limit, task_manager=manager, log_samples=False)
    summary = {"checkpoint": cfg.model, "results": results["results"], "n_samples": results.get("n-samples", {})}
    write_json(out, summary)
    for task, metrics in results["results"].items():
        print(task, {k: v for k, v in metrics.items() if isinstance(v, float)})
    return summary


COMMANDS = [
    Command("eval loss", "held-out loss of a checkpoint on validation sets (e.g. one per domain) -> JSON",
            EvalLossConfig, run_loss),
    Command("eval lm-eval", "run lm-eval tasks (default: the bundled dsel_science_facts) on a checkpoint -> JSON",
            LmEvalConfig, run_lm_eval),
]
