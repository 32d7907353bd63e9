"""`dsel run CONFIG.yaml`: corpus -> selection (PDS and/or CoLoR) -> pretraining selected vs random -> report.

    dsel run -c configs/quickstart.yaml
    dsel run -c configs/quickstart.yaml run_dir=runs/other budget=0.1

Every stage writes run_dir/<stage>/ and a done marker; running the command again skips finished
stages and resumes a killed one.
"""
from __future__ import annotations

from dsel.cli import Command
from dsel.io import writes_output
from dsel.pipeline.config import PipelineConfig


@writes_output("run_dir")
def run_pipeline(cfg: PipelineConfig) -> dict:
    """Run every stage; print the results table (target loss per arm)."""
    from dsel.pipeline.stages import Pipeline

    pipeline = Pipeline(cfg)
    results = pipeline.run()
    if results["arms"]:
        print(format_results(results))
    print(f"report: {pipeline.runner.path('report') / 'index.html'}")
    return results


def format_results(results: dict) -> str:
    """A plain-text table: per arm the target loss ± its stderr over windows, its change against random,
    the data-efficiency multiplier, mean held-out loss and lm-eval acc."""
    arms = results["arms"]
    random_loss = arms.get("random", {}).get("target_loss")
    lines = [f"{'arm':<10} {'target loss (' + results['target'] + ')':>24} {'± stderr':>9} {'vs random':>10} "
             f"{'data eff.':>10} {'mean held-out loss':>20} {'lm-eval acc':>12}"]
    for arm, row in arms.items():
        accs = [m["acc,none"] for m in row.get("lm_eval", {}).values() if "acc,none" in m]
        acc = f"{sum(accs) / len(accs):.3f}" if accs else "-"
        change = f"{100 * (row['target_loss'] / random_loss - 1):+.1f}%" if random_loss and arm != "random" else "-"
        stderr = row.get("stderr", {}).get(results["target"])
        stderr = f"{stderr:.4f}" if stderr is not None else "-"
        efficiency = row.get("data_efficiency") or {}
        multiplier = efficiency.get("multiplier")
        eff = f"{multiplier:.2f}x" if multiplier else ("<1x" if efficiency else "-")
        lines.append(f"{arm:<10} {row['target_loss']:>24.4f} {stderr:>9} "
                     f"{change:>10} {eff:>10} {row['mean_loss']:>20.4f} {acc:>12}")
    return "\n".join(lines)


COMMANDS = [
    Command("run", "the whole job: tokenize, prior, PDS/CoLoR scores, select, pretrain selected vs random, "
                   "evaluate, report (resumable)", PipelineConfig, run_pipeline),
]
