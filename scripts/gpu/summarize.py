"""Summarise a scripts/gpu/validate.sh folder: summary.json and RESULTS_section.md (for benchmarks/RESULTS.md).

Every MFU here is against the bf16 matmul peak measured in the same run (peak.json). Missing or
failed steps show as such; nothing is filled in that was not measured.

  python scripts/gpu/summarize.py runs/gpu-validate-<stamp>
"""
import json
import sys
from pathlib import Path

from dsel.io import write_json
from dsel.models.config import GPTConfig


def load(folder: Path, name: str):
    path = folder / f"{name}.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def steps_table(steps: list[dict]) -> list[str]:
    lines = ["| step | status | seconds (limit) |", "|---|---|---|"]
    for s in steps:
        status = "timed out" if s["timed_out"] else ("ok" if s["rc"] == 0 else f"failed (rc {s['rc']})")
        lines.append(f"| {s['step']} | {status} | {s['seconds']} ({s['limit']}) |")
    return lines


def parity_lines(parity) -> list[str]:
    if not parity:
        return ["Parity: no result."]
    lines = ["| tokens | d | V | precision | check | max relative error | tolerance | ok | first / second call s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in parity["rows"]:
        lines.append(f"| {r['tokens']} | {r['dim']} | {r['vocab']} | {r['precision']} | {r['check']} | "
                     f"{max(r['errors']):.1e} | {r['tolerance']:.0e} | {'yes' if r['ok'] else '**no**'} | "
                     f"{r['first_call_s']:.2f} / {r['second_call_s']:.3f} |")
    return lines


def kernel_lines(bench, peak) -> list[str]:
    if not bench:
        return ["Fused head: no result."]
    lines = ["| V | d | N | mode | " + " | ".join(["dsel", "torch", "torch-lce", "liger", "cce"]) +
             " | dsel MFU | memory torch/dsel |", "|---" * 11 + "|"]
    for row in bench["rows"]:
        res = row["results"]
        for mode in ("forward", "fwd+bwd", "jvp"):
            def cell(name):
                return f"{res[name][mode]['seconds'] * 1e3:.2f} ms" if mode in res.get(name, {}) else "–"
            t = res["dsel"][mode]["seconds"]
            flops = {"forward": 2, "fwd+bwd": 6, "jvp": 6}[mode] * row["vocab"] * row["dim"] * row["tokens"]
            mem = row["ratios"].get(f"{mode}_mem_torch_over_dsel")
            lines.append(f"| {row['vocab']} | {row['dim']} | {row['tokens']} | {mode} | "
                         + " | ".join(cell(n) for n in ("dsel", "torch", "torch-lce", "liger", "cce"))
                         + f" | {flops / t / (peak * 1e12):.1%} | {'n/a' if mem is None else f'{mem:.1f}x'} |")
        r = row["ratios"]
        lines.append(f"| | | | ratios | forward vs best other {r['forward_time_vs_best']:.2f}x; JVP / forward "
                     f"{r['jvp_over_forward']:.2f}x; JVP speedup vs torch.func.jvp "
                     f"{r['jvp_speedup_vs_torch_func_jvp']:.2f}x | | | | | | |")
        for name, why in row.get("missing_columns", {}).items():
            lines.append(f"| | | | no {name} column | {why} | | | | | | |")
    return lines


def score_lines(score, peak) -> list[str]:
    if not score:
        return ["CoLoR scoring: no result."]
    lines = ["| scorer | per-model tokens/s | MFU | peak MiB |", "|---|---|---|---|"]
    for name, r in score["rows"].items():
        mfu = score["flops_per_token"] * r["per_model_tokens_per_s"] / (peak * 1e12)
        mib = "n/a" if r["peak_mib"] is None else f"{r['peak_mib']:.0f}"
        lines.append(f"| {name} | {r['per_model_tokens_per_s']:,.0f} | {mfu:.1%} | {mib} |")
    lines.append(f"Speed ratio fused/plain {score['speed_ratio']:.2f}x ({score['preset']}, window {score['window']}, "
                 f"{score['precision']}); max score difference {score['max_abs_score_difference']:.1e}.")
    return lines


def train_lines(train, peak) -> list[str]:
    if not train:
        return ["Training step: no result."]
    lines = ["| backend | TP/PP | tokens/s | MFU (per device) |", "|---|---|---|---|"]
    for r in train["rows"]:
        if r.get("tokens_per_s") is None:
            continue
        lines.append(f"| {r['backend']} | {r.get('tp', 1)}/{r.get('pp', 1)} | {r['tokens_per_s']:,.0f} | "
                     f"{r['tflops'] / peak / r.get('world', 1):.1%} |")
    ratios = train.get("ratios_megatron_over_torch") or {"": train.get("ratio_megatron_over_torch", float("nan"))}
    lines.append("megatron / torch: " + ", ".join(f"{k} {v:.2f}x" for k, v in ratios.items()) + ".")
    return lines


def pmp_lines(pmp, peak) -> list[str]:
    if not pmp:
        return ["PMP solver step: no result."]
    config = GPTConfig(**pmp["model"])
    tokens = pmp["settings"]["batch"] * config.seq_len
    dots = pmp["timings"]["dsel dots only"]["seconds"]
    mfu = 6 * config.num_params() * tokens / dots / (peak * 1e12)  # forward-mode dots ~ 3 forwards
    return [f"Solver step {pmp['speedup_vs_naive']:.2f}x the per-example backward loop; dots alone "
            f"{pmp['dots_speedup_vs_naive']:.2f}x (MFU {mfu:.1%}); relative dot error {pmp['dot_relative_error']:.1e}; "
            f"one step = {pmp['step_over_training_step']:.1f} training steps."]


def main(folder: str) -> None:
    folder = Path(folder)
    steps = [json.loads(line) for line in (folder / "steps.jsonl").read_text().splitlines() if line.strip()]
    peak_info = load(folder, "peak") or {}
    peak = peak_info.get("peak_tflops") or float("nan")
    parts = {name: load(folder, name) for name in ("parity", "kernels", "score", "train", "pmp")}
    md = [f"## GPU validation — {peak_info.get('device', 'unknown device')} (scripts/gpu/validate.sh)", "",
          f"torch {peak_info.get('torch')}, triton {peak_info.get('triton')}, CUDA {peak_info.get('cuda')}. "
          f"MFU below is against a {peak_info.get('dtype')} {peak_info.get('size')}^3 matmul measured in the same "
          f"run: {peak:.1f} TFLOP/s.", "", *steps_table(steps), "",
          "### Compiled Triton vs torch reference", *parity_lines(parts["parity"]), "",
          "### Fused linear cross-entropy (`benchmarks/kernels.py`)", *kernel_lines(parts["kernels"], peak), "",
          "### CoLoR scoring (`benchmarks/score.py`)", *score_lines(parts["score"], peak), "",
          "### Training step (`benchmarks/train.py`)", *train_lines(parts["train"], peak), "",
          "### PMP solver step (`benchmarks/pmp.py`)", *pmp_lines(parts["pmp"], peak), ""]
    (folder / "RESULTS_section.md").write_text("\n".join(md))
    ok = all(s["rc"] == 0 for s in steps)
    write_json(folder / "summary.json", dict(all_steps_ok=ok, steps=steps, peak=peak_info,
                                             parity_ok=(parts["parity"] or {}).get("all_ok")))
    print("\n".join(md))
    print(f"{'all steps ok' if ok else 'SOME STEPS FAILED'}; wrote {folder / 'RESULTS_section.md'}")


if __name__ == "__main__":
    main(sys.argv[1])
