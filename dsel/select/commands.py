"""`dsel select`: a score table (or .npy) -> the kept windows, their statistics and a Megatron dataset.

    dsel select scores=runs/pds/scores out=runs/select method=gumbel fraction=0.4   # corpus from scores.json
    dsel select scores=runs/color/scores corpus=data/corpus method=color column=color tau=16
    dsel select scores=runs/color/scores corpus=data/corpus method=topk column=-loss_cond token_budget=1000000000

Writes into `out/`: `indices.npy` (sorted window ids, int64), `kept.parquet` (per kept window: id,
document, source document id, domain, tokens, scores, text), `histogram.png` (the selection key
with the threshold line), `data/selected` (Megatron .bin/.idx, one window per document: a copy, or
with format=index only the index over the corpus' tokens) with `data/selected.docids.jsonl` beside
it, and last `selection.json` (settings, threshold, counts, tokens, per-domain shares). Every file
is written under a temporary name and renamed.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from dsel.cli import Command
from dsel.config import option
from dsel.errors import DselError
from dsel.io import (atomic_path, check_free_space, differences, file_digest, publish_dir, read_json, write_json,
                     writes_output)

log = logging.getLogger(__name__)

PDS_FRACTION = 0.4
DEFAULT_TAU = 16.0  # CoLoR-Filter's headline setting


@dataclass
class SelectConfig:
    scores: str = option(help="score directory (scores.parquet + scores.json), a .parquet file, or a .npy of one score per window")
    corpus: str = option("", "the scored corpus: Megatron prefix, token file or directory/glob of dolma token files; "
                                "'' = the one in scores.json, if any")
    out: str = option("runs/select", "output directory")
    method: Literal["topk", "gumbel", "color", "color-batch", "random"] = option(
        "gumbel", "topk | gumbel (PDS) | color (global top 1/tau) | color-batch (n of tau*n draws) | random")
    column: str = option("", "score expression: 'pds', '-loss_cond', 'loss_prior - loss_cond'; '' = the only score column")
    fraction: float | None = option(None, "share of windows to keep, in (0, 1]; default 0.4 (PDS); color methods use 1/tau")
    tau: float | None = option(None, "CoLoR: keep 1/tau of the pool (color, color-batch); >= 1; None = 16 "
                                     "(with token_budget= the budget sets the amount: leave tau unset)")
    color_batch: int = option(1024, "color-batch: n windows kept from each draw of tau*n random candidates")
    token_budget: int = option(0, "keep the best windows whose tokens sum to at most this (replaces fraction/tau); 0 = off")
    temperature: float = option(0.1, "gumbel: score + temperature * Gumbel noise")
    seed: int = option(0, "seed of the Gumbel noise, random selection and color-batch draws")
    window: int = option(0, "tokens per window; 0 = the window recorded in scores.json")
    memmap_dtype: str = option("uint16", "token dtype of a headerless corpus file")
    materialise: bool = option(True, "write the selected windows as the Megatron dataset data/selected (needs corpus)")
    format: Literal["megatron", "index"] = option(
        "megatron", "megatron: copy the kept windows into data/selected; index: write only its .idx over the corpus' tokens")
    kept_text: bool = option(True, "kept.parquet: add each window's text (decoded with the corpus tokenizer, when at hand)")
    chunk_rows: int = option(1 << 20, "score rows read at a time (memory bound of the streaming passes)")
    overwrite: bool = option(False, "replace a finished selection in out made from other scores or settings")

    REMOVED_OPTIONS = {"shards": "the selection is written once, straight into data/selected",
                       "workers": "the selection is written once, straight into data/selected"}


SPEED_ONLY = ("out", "chunk_rows", "overwrite")  # never change what is selected


def check_settings(cfg: SelectConfig) -> None:
    """One-line errors for settings that cannot work, before any file is read."""
    if cfg.fraction is not None and not 0 < cfg.fraction <= 1:
        raise DselError(f"fraction={cfg.fraction}: must be in (0, 1]")
    if cfg.tau is not None and cfg.tau < 1:
        raise DselError(f"tau={cfg.tau}: must be >= 1 (keep 1/tau of the pool)")
    if cfg.tau is not None and not cfg.method.startswith("color"):
        raise DselError(f"tau={cfg.tau}: only method=color or color-batch keep 1/tau; method={cfg.method} takes "
                        f"fraction= or token_budget=")
    if cfg.tau is not None and cfg.token_budget:
        raise DselError(f"tau={cfg.tau} and token_budget={cfg.token_budget} both set the amount kept; set one")
    if cfg.method.startswith("color") and cfg.fraction is not None:
        raise DselError(f"method={cfg.method} keeps 1/tau of the pool; set tau= instead of fraction=")
    if cfg.token_budget < 0:
        raise DselError(f"token_budget={cfg.token_budget}: must be >= 0")
    if cfg.token_budget and cfg.fraction is not None:
        raise DselError("set either fraction= or token_budget=, not both")
    if cfg.method == "color-batch" and cfg.token_budget:
        raise DselError("method=color-batch keeps n of each tau*n draw; it takes no token_budget (use method=color)")
    if cfg.temperature < 0:
        raise DselError(f"temperature={cfg.temperature}: must be >= 0")
    for name in ("chunk_rows", "color_batch"):
        if getattr(cfg, name) < 1:
            raise DselError(f"{name}={getattr(cfg, name)}: must be >= 1")


def make_plan(cfg: SelectConfig, source):
    """The method, expression and amount to select, from the settings and the table's columns."""
    from dsel.select.expression import parse_expression
    from dsel.select.methods import Plan

    colour = cfg.method.startswith("color")
    expression = None if cfg.method == "random" and not cfg.column and len(source.columns) != 1 else parse_expression(cfg.column, source)
    tau = (cfg.tau or DEFAULT_TAU) if colour and not cfg.token_budget else None
    fraction = None if cfg.token_budget else (1.0 / tau if colour else cfg.fraction or PDS_FRACTION)
    return Plan(cfg.method, expression, fraction=fraction, token_budget=cfg.token_budget or None,
                tau=tau, color_batch=cfg.color_batch,
                temperature=cfg.temperature if cfg.method == "gumbel" else 0.0, seed=cfg.seed)


def corpus_and_window(cfg: SelectConfig) -> tuple[str, int]:
    """The corpus and window length: the settings, else what the score stage recorded in scores.json."""
    from dsel.select.source import table_meta

    meta = table_meta(cfg.scores)
    recorded = int(meta.get("window") or meta.get("meta", {}).get("window") or 0)
    if cfg.window and recorded and cfg.window != recorded:
        raise DselError(f"window={cfg.window}: the scores were computed on windows of {recorded} tokens (scores.json)")
    return cfg.corpus or meta.get("corpus") or "", cfg.window or recorded


@writes_output()
def run_select(cfg: SelectConfig) -> Path:
    """Select, then write indices.npy, kept.parquet, histogram.png, data/selected, selection.json."""
    from dsel.score.commands import open_windows
    from dsel.select import megatron_args
    from dsel.select.materialise import materialise, write_kept
    from dsel.select.methods import select
    from dsel.select.source import check_pool, open_scores, table_meta

    check_settings(cfg)
    start = time.time()
    corpus, window = corpus_and_window(cfg)
    source = open_scores(cfg.scores, window)
    if cfg.materialise and not corpus:
        raise DselError(f"{cfg.scores}: no corpus recorded (scores.json); set corpus= or materialise=false")
    if corpus and window <= 0:
        raise DselError(f"{cfg.scores}: no window length recorded (scores.json); set window=")
    windows = open_windows(corpus, window, cfg.memmap_dtype) if corpus else None
    num_windows = len(windows) if windows is not None else source.num_rows
    check_pool(source, num_windows)
    if cfg.token_budget and 0 < window and cfg.token_budget < window:
        raise DselError(f"token_budget={cfg.token_budget}: below one window of {window} tokens; nothing could be kept")
    meta = table_meta(cfg.scores)
    check_scored_corpus(cfg.scores, meta, windows)
    final = Path(cfg.out)
    key = selection_key(cfg, meta, windows)
    check_overwrite(final / "selection.json", key, cfg.overwrite)
    plan = make_plan(cfg, source)
    selection = select(source, plan, num_windows, cfg.chunk_rows)
    if cfg.materialise and cfg.format == "megatron":
        check_free_space(final, selection.tokens * np.dtype(windows.source.dtype).itemsize, "the selected data")
    with publish_dir(final) as out:  # built aside, then swapped in whole: a kill leaves the old or the new
        with atomic_path(out / "indices.npy") as tmp, open(tmp, "wb") as f:
            np.save(f, selection.indices)
        write_kept(out / "kept.parquet", source, selection.indices, windows, cfg.chunk_rows, cfg.kept_text)
        histogram = write_histogram(out / "histogram.png", selection, plan)
        data = {}
        if cfg.materialise:
            selected = materialise(windows, selection.indices, out / "data", cfg.format)
            data = {"selected": str(final / Path(selected.prefix).relative_to(out)), "format": cfg.format}
            data["megatron_args"] = str(final / megatron_args.write(out, [data["selected"]], seq_len=window - 1,
                                                                  meta_from=selected.prefix)
                                        .relative_to(out))  # Megatron-LM hand-off
        summary = describe_selection(plan, selection, source, corpus, window, time.time() - start)
        summary["outputs"] = {"indices": str(final / "indices.npy"), "kept": str(final / "kept.parquet"),
                              "histogram": histogram and str(final / "histogram.png"), "data": data}
        write_json(out / "selection.json", {**summary, "key": key})
    log.info("kept %d of %d windows (%d tokens), threshold %s -> %s",
             len(selection.indices), selection.pool, selection.tokens, selection.threshold, final)
    return final


def selection_key(cfg: SelectConfig, meta: dict, windows) -> dict:
    """What a finished selection was made from: every result-changing setting, the scores' identity
    (the score job's fingerprint, else the file's digest) and the corpus digest."""
    from dsel.config import to_dict
    from dsel.data.windows import corpus_digest
    from dsel.select.source import table_path

    settings = {k: v for k, v in to_dict(cfg).items() if k not in SPEED_ONLY}
    scores = meta.get("fingerprint") or file_digest(cfg.scores if str(cfg.scores).endswith(".npy")
                                                    else table_path(cfg.scores))
    corpus = corpus_digest(windows.source) if windows is not None else None
    return {**settings, "scores_digest": scores, "corpus_digest": corpus}


def check_overwrite(manifest: Path, key: dict, overwrite: bool) -> None:
    """Refuse to replace a finished output made from other inputs or settings, unless overwrite=true."""
    if overwrite or not manifest.is_file():
        return
    old = read_json(manifest).get("key")
    changed = differences(old, key) if isinstance(old, dict) else [("key", None, None)]
    if changed:
        name, before, after = changed[0]
        raise DselError(f"{manifest.parent}: holds a finished output made with {name}={before!r} (this run: "
                        f"{after!r}); set overwrite=true to replace it, or choose another out")


def check_scored_corpus(scores: str, meta: dict, windows) -> None:
    """Refuse scores of another corpus (by content digest) and a score table whose manifest
    (scores.json) is missing or belongs to another merge."""
    from dsel.data.windows import corpus_digest, source_name
    from dsel.select.source import table_path

    if not str(scores).endswith(".npy"):
        import pyarrow.parquet as pq

        path = table_path(scores)
        recorded = (pq.read_schema(path).metadata or {}).get(b"dsel") if path.is_file() else None
        if recorded is not None:
            import json

            fingerprint = json.loads(recorded).get("fingerprint")
            if meta.get("fingerprint") not in (None, fingerprint) or not meta:
                raise DselError(f"{path}: its scores.json is missing or from another scoring run (an interrupted "
                                "merge); rerun `dsel score merge`")
    digest = meta.get("corpus_digest")
    if digest and windows is not None and corpus_digest(windows.source) != digest:
        raise DselError(f"{scores}: scores of another corpus ({meta.get('corpus')}, digest {digest}), not of "
                        f"{source_name(windows.source)}")


def write_histogram(path: Path, selection, plan) -> str | None:
    """The key histogram with the threshold line; None when there is nothing to plot (random, no column)."""
    if len(selection.sample) == 0:
        return None
    from dsel.score.stats import score_histogram

    shown = f"{plan.expression} + {plan.temperature:g} * Gumbel" if plan.method == "gumbel" and plan.temperature else str(plan.expression)
    title = f"{plan.method}: {shown} ({len(selection.sample)} of {selection.pool} windows)"
    score_histogram(selection.sample, path, threshold=selection.threshold, title=title, xlabel=shown)
    return str(path)


def describe_selection(plan, selection, source, corpus: str, window: int, seconds: float) -> dict:
    """selection.json: settings, threshold, counts, tokens, per-domain shares."""
    kept = len(selection.indices)
    summary = {
        "method": plan.method, "expression": str(plan.expression) if plan.expression else None,
        "fraction": plan.fraction, "tau": plan.tau, "tau_effective": selection.pool / max(kept, 1),
        "token_budget": plan.token_budget,
        "temperature": plan.temperature, "seed": plan.seed,
        "color_batch": plan.color_batch if plan.method == "color-batch" else None,
        "threshold": selection.threshold, "k": kept, "pool": selection.pool,
        "kept_fraction": kept / selection.pool, "tokens_kept": selection.tokens, "tokens_pool": selection.pool_tokens,
        "scores": str(source.path), "corpus": corpus or None, "window": window or None,
        "passes": selection.passes, "candidates_sorted": selection.candidates, "seconds": round(seconds, 3),
    }
    if selection.domains:
        summary["domains"] = {name: {**c, "kept_share": c["kept"] / max(kept, 1), "pool_share": c["pool"] / selection.pool,
                                     "kept_fraction": c["kept"] / max(c["pool"], 1)}
                              for name, c in sorted(selection.domains.items())}
    return summary


COMMANDS = [
    Command("select", "select windows from a score table (top-k, Gumbel-top-k, CoLoR tau, random) and write them as a Megatron dataset",
            SelectConfig, run_select),
]
