"""lm-eval's own command line with dsel's model and tasks registered.

lm-eval 0.4 finds models only in its registry (lm_eval.models.MODEL_MAPPING plus whatever was
imported and decorated with @register_model); it reads no entry points, so the stock `lm_eval`
command cannot see `--model dsel` without editing lm-eval. This wrapper (also installed as the
`dsel-lm-eval` command) imports the registration first and adds dsel's bundled tasks
(dsel/eval/tasks) to `--include_path` when none is given:

    python -m dsel.eval.lm_eval --model dsel --model_args checkpoint=runs/quickstart/pretrain/color/model \\
        --tasks dsel_science_facts --output_path results/
"""
from __future__ import annotations

import sys
from pathlib import Path

TASKS_DIR = Path(__file__).resolve().parent / "tasks"


def with_bundled_tasks(argv: list[str]) -> list[str]:
    """argv plus `--include_path <dsel tasks>` unless the user set an include path."""
    if any(arg == "--include_path" or arg.startswith("--include_path=") for arg in argv):
        return argv
    return [*argv, "--include_path", str(TASKS_DIR)]


def main(argv: list[str] | None = None) -> None:
    """Run lm-eval's CLI (`lm_eval ...` arguments) with the `dsel` model registered."""
    import dsel.eval.lm_model  # noqa: F401  (registers --model dsel)
    from lm_eval.__main__ import cli_evaluate

    argv = sys.argv[1:] if argv is None else argv
    sys.argv = [sys.argv[0], *(with_bundled_tasks(argv) if len(argv) > 1 else argv)]
    cli_evaluate()


if __name__ == "__main__":
    main()
