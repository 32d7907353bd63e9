"""The report of a `dsel run`: one HTML page with PNGs, from the files the stages wrote.

    run_dir/results.json                     per arm: target loss, held-out losses, lm-eval, tokens
    run_dir/<method>/score/scores.parquet    scores per window (+ domain)   -> score histograms
    run_dir/<arm>/select/selection.json      threshold, per-domain shares   -> shares per domain
    run_dir/pretrain/<arm>/log.jsonl         loss and valid_loss per step   -> loss curves
    run_dir/pds/fit/scorer/meta.json         the PDS scorer's fit           -> validation Spearman/Pearson

Sections whose inputs are missing are left out, so a partial run still renders.
"""
from __future__ import annotations

import html
import json
from pathlib import Path

import numpy as np

from dsel.io import atomic_path, read_json

COLORS = {"pds": "tab:blue", "color": "tab:orange", "random": "tab:gray", "cond-only": "tab:red",
          "rho-down": "tab:purple", "dsir": "tab:brown"}


def arm_color(arm: str) -> str:
    return COLORS.get(arm, "tab:green")


def save_figure(fig, path: Path) -> str:
    """Write a matplotlib figure as PNG (atomically) and close it; returns the file name."""
    import matplotlib.pyplot as plt

    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path.name


def read_log(path: Path) -> tuple[list[dict], list[dict]]:
    """(training rows with `loss`, evaluation rows with `valid_loss`) of a training log.jsonl."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if "loss" in r], [r for r in rows if "valid_loss" in r]


def target_curve(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(training tokens, target held-out loss) at every evaluation of a pretraining log."""
    train, valid = read_log(path)
    tokens_at = {r["step"]: r["tokens"] for r in train}
    rows = [r for r in valid if r["step"] in tokens_at]
    return np.array([tokens_at[r["step"]] for r in rows], dtype=np.float64), np.array([r["valid_loss"] for r in rows])


def tokens_to_reach(tokens: np.ndarray, losses: np.ndarray, level: float) -> float | None:
    """Training tokens at which a loss curve first reaches `level`, linear between evaluations (from 0 tokens
    at the first evaluation's loss); None if it never does."""
    hits = np.flatnonzero(losses <= level)
    if len(hits) == 0:
        return None
    i = int(hits[0])
    if i == 0:
        return float(tokens[0])
    t0, t1, l0, l1 = tokens[i - 1], tokens[i], losses[i - 1], losses[i]
    return float(t0 + (t1 - t0) * (l0 - level) / (l0 - l1))


def data_efficiency(run_dir: Path, arms: list[str]) -> dict[str, dict]:
    """Per arm: the tokens at which its target held-out loss first reaches the random arm's final loss, and
    the multiplier random's tokens / those tokens (the papers' "N x less data"; None: never reached)."""
    logs = {arm: run_dir / "pretrain" / arm / "log.jsonl" for arm in arms}
    if "random" not in arms or not logs["random"].is_file():
        return {}
    tokens, losses = target_curve(logs["random"])
    if not len(losses):
        return {}
    level, total = float(losses[-1]), float(tokens[-1])
    out = {}
    for arm, path in logs.items():
        if not path.is_file():
            continue
        reached = tokens_to_reach(*target_curve(path), level)
        out[arm] = {"random_final_loss": level, "tokens_to_random_final": reached,
                    "multiplier": total / reached if reached else None}
    return out


def score_column(selection: dict) -> str | None:
    """The score column a selection ranked by, when its expression is a plain (possibly negated) column."""
    expression = (selection.get("expression") or "").strip()
    return expression.lstrip("-").strip() if expression.lstrip("-").strip().isidentifier() else None


def plot_score_histograms(run_dir: Path, methods: list[str], out: Path) -> str | None:
    """Per method: the pool's score histogram (stacked by domain when known) and the selection threshold."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pyarrow.parquet as pq

    panels = []
    for method in methods:
        table, selection = run_dir / method / "score" / "scores.parquet", run_dir / method / "select" / "selection.json"
        if not (table.is_file() and selection.is_file()):
            continue
        selected = read_json(selection)
        column = score_column(selected)
        if column is None:
            continue
        data = pq.read_table(table).to_pydict()
        if column not in data:
            continue
        panels.append((method, column, selected, np.asarray(data[column], dtype=np.float64), data.get("domain")))
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4), squeeze=False)
    for ax, (method, column, selected, values, domains) in zip(axes[0], panels):
        bins = np.linspace(values.min(), values.max(), 50) if values.max() > values.min() else 10
        if domains is not None:
            names = sorted(set(domains))
            groups = [values[np.asarray(domains) == name] for name in names]
            ax.hist(groups, bins=bins, stacked=True, label=names)
            ax.legend(fontsize=7)
        else:
            ax.hist(values, bins=bins, color=arm_color(method))
        if selected.get("threshold") is not None:
            sign = -1.0 if (selected.get("expression") or "").strip().startswith("-") else 1.0
            ax.axvline(sign * float(selected["threshold"]), color="black", linestyle="--", label="threshold")
        ax.set_title(f"{method}: {column} ({selected.get('method')}, kept {selected.get('kept_fraction', 0):.0%})")
        ax.set_xlabel(column)
        ax.set_ylabel("windows")
    return save_figure(fig, out / "score_histograms.png")


def domain_shares(run_dir: Path, arms: list[str]) -> tuple[list[str], dict[str, list[float]]]:
    """(domains, {"pool" and each arm: share of its windows per domain}) from the selection.json files."""
    shares: dict[str, dict[str, float]] = {}
    for arm in arms:
        path = run_dir / arm / "select" / "selection.json"
        domains = read_json(path).get("domains") if path.is_file() else None
        if not domains:
            continue
        shares.setdefault("pool", {k: v["pool_share"] for k, v in domains.items()})
        shares[arm] = {k: v["kept_share"] for k, v in domains.items()}
    names = sorted({d for s in shares.values() for d in s})
    return names, {k: [s.get(d, 0.0) for d in names] for k, s in shares.items()}


def plot_domain_shares(run_dir: Path, arms: list[str], out: Path) -> str | None:
    """Grouped bars: share of each domain in the pool and in every selection."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names, shares = domain_shares(run_dir, arms)
    if not names:
        return None
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(names)), 4))
    width = 0.8 / len(shares)
    for k, (label, values) in enumerate(shares.items()):
        ax.bar(np.arange(len(names)) + k * width, values, width, label=label,
               color="lightgray" if label == "pool" else arm_color(label), edgecolor="black", linewidth=0.3)
    ax.set_xticks(np.arange(len(names)) + 0.4 - width / 2, names)
    ax.set_ylabel("share of windows")
    ax.set_title("domain shares: pool vs selections")
    ax.legend()
    return save_figure(fig, out / "domain_shares.png")


def plot_loss_curves(run_dir: Path, arms: list[str], target: str, out: Path) -> str | None:
    """Training loss and target held-out loss against training tokens, one line per arm."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    logs = {arm: read_log(run_dir / "pretrain" / arm / "log.jsonl") for arm in arms
            if (run_dir / "pretrain" / arm / "log.jsonl").is_file()}
    if not logs:
        return None
    fig, (train_ax, valid_ax) = plt.subplots(1, 2, figsize=(12, 4))
    for arm, (train, valid) in logs.items():
        train_ax.plot([r["step"] for r in train], [r["loss"] for r in train], color=arm_color(arm), label=arm, lw=1)
        if valid:
            valid_ax.plot([r["step"] for r in valid], [r["valid_loss"] for r in valid], "o-", color=arm_color(arm),
                          label=arm)
    train_ax.set(title="training loss", xlabel="step", ylabel="loss")
    valid_ax.set(title=f"target held-out loss ({target})", xlabel="step", ylabel="loss")
    train_ax.legend()
    valid_ax.legend()
    return save_figure(fig, out / "loss_curves.png")


def results_table(results: dict) -> str:
    """HTML table: one row per arm; target loss, every held-out loss, lm-eval metrics, tokens."""
    arms = results.get("arms", {})
    if not arms:
        return "<p>no results yet</p>"
    domains = sorted({d for row in arms.values() for d in row.get("losses", {})})
    metrics = sorted({f"{task} {m}" for row in arms.values() for task, ms in row.get("lm_eval", {}).items() for m in ms})
    best = min(row["target_loss"] for row in arms.values())
    head = ["arm", f"target loss ({results.get('target', '')}) ± stderr", "data efficiency vs random",
            "mean held-out loss", *domains, *metrics, "tokens selected"]
    rows = []
    for arm, row in arms.items():
        lm = {f"{task} {m}": v for task, ms in row.get("lm_eval", {}).items() for m, v in ms.items()}
        lm_err = {f"{task} {m}": v for task, ms in row.get("lm_eval_stderr", {}).items() for m, v in ms.items()}
        err = row.get("stderr", {})
        target = f"{row['target_loss']:.4f}" + with_stderr(err.get(results.get("target", "")))
        tokens = row.get("tokens_selected")
        cells = [arm, f"<b>{target}</b>" if row["target_loss"] == best else target,
                 multiplier_text(row.get("data_efficiency")), f"{row['mean_loss']:.4f}",
                 *(f"{row['losses'][d]:.4f}{with_stderr(err.get(d))}" if d in row.get("losses", {}) else "-"
                   for d in domains),
                 *(f"{lm[m]:.3f}{with_stderr(lm_err.get(m), 3)}" if m in lm else "-" for m in metrics),
                 f"{tokens:,}" if tokens is not None else "online"]
        rows.append("<tr>" + "".join(f"<td>{c if c.startswith('<b>') else html.escape(c)}</td>" for c in cells) + "</tr>")
    header = "<tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr>"
    return f"<table>{header}{''.join(rows)}</table>"


def with_stderr(stderr, digits: int = 4) -> str:
    """' ± 0.0123' (nothing when unknown)."""
    return f" ± {stderr:.{digits}f}" if isinstance(stderr, (int, float)) else ""


def multiplier_text(efficiency: dict | None) -> str:
    """'12.3x (1,234 tokens)', '< 1x' when the random arm's final loss is never reached, '-' when unknown."""
    if not efficiency:
        return "-"
    if efficiency.get("multiplier") is None:
        return "< 1x (never reaches random's final loss)"
    return f"{efficiency['multiplier']:.2f}x ({efficiency['tokens_to_random_final']:,.0f} tokens)"


def headline(results: dict) -> str:
    """One sentence: each method's target loss against random data of the same token budget."""
    arms = results.get("arms", {})
    if "random" not in arms or len(arms) < 2:
        return ""
    base = arms["random"]["target_loss"]
    parts = [f"{html.escape(arm)} {row['target_loss']:.4f} ({100 * (row['target_loss'] / base - 1):+.1f}%, "
             f"data efficiency {html.escape(multiplier_text(row.get('data_efficiency')))})"
             for arm, row in arms.items() if arm != "random"]
    return (f"<p>Held-out loss on the target ({html.escape(results.get('target', ''))}) after pretraining on each "
            f"selection: {', '.join(parts)}; random data of the same token budget: {base:.4f}. Data efficiency: "
            f"random's training tokens over the tokens an arm needs to reach random's final target loss.</p>")


def pds_scorer_table(run_dir: Path) -> str:
    """The PDS data scorer's fit: target kind and its best validation Spearman and Pearson (from its meta.json)."""
    meta_file = run_dir / "pds" / "fit" / "scorer" / "meta.json"
    if not meta_file.is_file():
        return ""
    fit = read_json(meta_file).get("pds_fit", {})
    if "val" not in fit:
        return ""
    cells = [fit.get("target_kind", "?"), f"{fit['val']['spearman']:.3f}", f"{fit['val']['pearson']:.3f}",
             f"{fit['val_windows']:,}", str(fit.get("best_step", "-"))]
    head = ["target", "validation Spearman", "validation Pearson", "validation windows", "kept step"]
    return ("<table><tr>" + "".join(f"<th>{h}</th>" for h in head) + "</tr><tr>"
            + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr></table>")


def timings_table(timings: dict) -> str:
    """HTML table of seconds per stage and the total."""
    if not timings:
        return ""
    rows = "".join(f"<tr><td>{html.escape(k)}</td><td>{v:.1f}</td></tr>" for k, v in timings.items())
    total = sum(timings.values())
    return f"<table><tr><th>stage</th><th>seconds</th></tr>{rows}<tr><td><b>total</b></td><td><b>{total:.1f}</b></td></tr></table>"


STYLE = ("body{font-family:sans-serif;max-width:1200px;margin:2em auto}table{border-collapse:collapse;margin:1em 0}"
         "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}td:first-child,th:first-child{text-align:left}"
         "img{max-width:100%}")


def selection_arms(run_dir: Path) -> list[str]:
    """Arms with a selection or a pretraining run on disk (random last), for runs without results."""
    found = {p.parent.parent.name for p in run_dir.glob("*/select/selection.json")}
    found |= {p.name for p in (run_dir / "pretrain").glob("*") if p.is_dir()}
    return sorted(found, key=lambda arm: (arm == "random", arm))


def write_report(run_dir: str | Path, out: str | Path) -> Path:
    """Write out/index.html and its PNGs for the run in run_dir; returns the HTML path."""
    run_dir, out = Path(run_dir), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    results = read_json(run_dir / "results.json") if (run_dir / "results.json").is_file() else {}
    arms = list(results.get("arms", {})) or selection_arms(run_dir)
    methods = [a for a in arms if a != "random"]
    target = results.get("target", "")
    figures = [("Scores and thresholds", plot_score_histograms(run_dir, methods, out)),
               ("Selected share per domain", plot_domain_shares(run_dir, arms, out)),
               ("Loss curves: selected vs random", plot_loss_curves(run_dir, arms, target, out))]
    sections = [f"<h2>Results</h2>{headline(results)}{results_table(results)}"]
    sections += [f"<h2>{title}</h2><img src='{name}' alt='{title}'>" for title, name in figures if name]
    if pds_scorer_table(run_dir):
        sections.append(f"<h2>PDS data scorer</h2>{pds_scorer_table(run_dir)}")
    if results.get("timings"):
        sections.append(f"<h2>Stage timings</h2>{timings_table(results['timings'])}")
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>dsel run: {html.escape(run_dir.name)}</title>"
            f"<style>{STYLE}</style></head><body><h1>dsel run <code>{html.escape(str(run_dir))}</code></h1>"
            + "".join(sections) + "</body></html>\n")
    with atomic_path(out / "index.html") as tmp:
        tmp.write_text(page, encoding="utf-8")
    return out / "index.html"
