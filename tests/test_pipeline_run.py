"""`dsel run` end to end on a very small corpus: every stage, the results, the report, resume and re-run rules."""
import importlib.util
import json
import math
from pathlib import Path

import pytest
import yaml

from dsel.cli import main
from dsel.pipeline.runner import MARKER

ROOT = Path(__file__).resolve().parent.parent


def small_corpus(directory: Path) -> Path:
    """The bundled corpus generator at 6% scale (about 230 pool documents)."""
    spec = importlib.util.spec_from_file_location("make_corpus", ROOT / "scripts" / "make_corpus.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.make_corpus(scale=0.06, out=directory, tasks=directory / "task")
    return directory


def small_config(tmp_path: Path) -> Path:
    corpus = small_corpus(tmp_path / "corpus")
    config = {
        "run_dir": str(tmp_path / "run"), "methods": ["pds", "color", "cond-only", "rho-down", "dsir"], "budget": 0.3,
        "device": "cpu",
        "data": {"pool": str(corpus / "pool.jsonl.gz"), "target": str(corpus / "target.jsonl.gz"), "vocab_size": 512,
                 "valid": {d: str(corpus / "valid" / f"{d}.jsonl.gz") for d in ("science", "legal", "sports")}},
        "model": {"preset": "tiny", "arch": {"seq_len": 32, "n_layer": 1, "d_model": 32, "n_head": 2}},
        "prior": {"steps": 8, "batch_size": 8, "lr": 3e-3},
        "pds": {"proxy_windows": 32, "target_windows": 8, "fit": {"fit": {"epochs": 1}},
                "solve": {"solver": {"steps": 2, "lr": 0.5}}},
        "color": {"finetune": {"batch_size": 8}},
        "pretrain": {"steps": 6, "batch_size": 8, "lr": 3e-3, "eval_every": 3, "eval_batches": 2},
        "eval": {"max_batches": 2},
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def stage_times(run_dir: Path) -> dict[str, int]:
    return {str(m.parent.relative_to(run_dir)): m.stat().st_mtime_ns for m in run_dir.rglob(MARKER)}


def test_dsel_run_end_to_end_then_skips_and_reruns_only_what_changed(tmp_path, monkeypatch):
    monkeypatch.setenv("DSEL_PROGRESS", "0")
    config = small_config(tmp_path)
    run_dir = tmp_path / "run"
    main(["run", "-c", str(config)])

    stages = stage_times(run_dir)
    arms = ("pds", "color", "cond-only", "rho-down", "dsir", "random")
    assert set(stages) == {"tokenize", "prior", "pds/proxy", "pds/solve", "pds/fit", "pds/score", "pds/select",
                           "color/finetune", "color/score", "color/select", "cond-only/select", "dsir/score",
                           "dsir/select", "random/select", *(f"{s}/{arm}" for s in ("pretrain", "eval") for arm in arms)}
    results = json.loads((run_dir / "results.json").read_text())
    assert set(results["arms"]) == set(arms) and results["target"] == "science"
    budgets = {arm: row["tokens_selected"] for arm, row in results["arms"].items() if arm != "rho-down"}
    pool_tokens = json.loads((run_dir / "tokenize" / "pool.meta.json").read_text())["num_tokens"]
    assert len(set(budgets.values())) == 1 and 0 < budgets["random"] <= 0.3 * pool_tokens  # dsir at the same budget
    assert results["arms"]["rho-down"]["tokens_selected"] is None  # it selects online
    selection = json.loads((run_dir / "cond-only" / "select" / "selection.json").read_text())
    assert selection["expression"] == "-loss_cond" and selection["tau"] is None
    assert selection["tau_effective"] == pytest.approx(selection["pool"] / selection["k"])
    for row in results["arms"].values():
        assert set(row["losses"]) == {"science", "legal", "sports"} and math.isfinite(row["target_loss"])
        assert 0 <= row["lm_eval"]["dsel_science_facts"]["acc,none"] <= 1
        assert row["stderr"]["science"] > 0 and "acc,none" in row["lm_eval_stderr"]["dsel_science_facts"]
        assert row["data_efficiency"]["random_final_loss"] == results["arms"]["random"]["data_efficiency"]["random_final_loss"]
    assert results["arms"]["random"]["data_efficiency"]["multiplier"] == pytest.approx(1.0)
    domains = (run_dir / "tokenize" / "pool.domains.jsonl").read_text().split()
    assert len(domains) == json.loads((run_dir / "tokenize" / "pool.meta.json").read_text())["num_documents"]
    tokenizer = json.loads((run_dir / "tokenize" / "pool.meta.json").read_text())["tokenizer"]
    assert json.loads((run_dir / "pretrain" / "pds" / "model" / "meta.json").read_text())["tokenizer"] == tokenizer
    report = (run_dir / "report" / "index.html").read_text()
    assert all(f"{name}.png" in report for name in ("score_histograms", "domain_shares", "loss_curves"))
    scorer = results["pds_scorer"]
    assert scorer["target_kind"] == "zscore" and -1 <= scorer["val_spearman"] <= 1
    assert "validation Spearman" in report and f"{scorer['val_spearman']:.3f}" in report
    assert json.loads((run_dir / "pds" / "solve" / "DONE.json").read_text())["settings"]["solver"]["target_kind"] == "zscore"

    main(["run", "-c", str(config)])  # everything done: nothing runs again
    assert stage_times(run_dir) == stages

    (run_dir / "pretrain" / "random" / MARKER).unlink()  # killed after training, before its marker
    main(["run", "-c", str(config)])  # resumes that stage alone (its training state is complete)
    again = stage_times(run_dir)
    assert {s for s in stages if again[s] != stages[s]} == {"pretrain/random"}

    (run_dir / "pretrain" / "random" / MARKER).unlink()  # killed again, then the pretraining length changes
    main(["run", "-c", str(config), "pretrain.steps=8"])
    final = stage_times(run_dir)
    changed = {s for s in stages if final[s] != again[s]}
    assert changed == {f"{s}/{arm}" for s in ("pretrain", "eval") for arm in arms}
    log = (run_dir / "pretrain" / "pds" / "log.jsonl").read_text().splitlines()
    assert max(json.loads(r)["step"] for r in log) == 8


@pytest.mark.parametrize("override,message", [
    ("color.finetune.learning_rate=0.1", "color/finetune"),
    ("color.select={method: color, column: color, tau: 16}", "color/select: tau=16.0 and token_budget=1 both set"),
    ("color.select={method: color-batch, column: color, tau: 8}", "under dsel run the budget sets tau"),
    ("pds.select={method: topk, column: pds, fraction: 0.2}", "set either fraction= or token_budget=, not both"),
    ("pretrain.backend=megatron", "rho-down selects each batch online with the torch backend"),
    ("baselines.rho_down_tau=0.5", "rho_down_tau=0.5 must be >= 1"),
    ("budget=1.5", "budget=1.5 must be in (0, 1]"),
    ("color.finetune.target_format=books", "color/finetune"),
])
def test_impossible_settings_fail_before_anything_runs(tmp_path, capsys, override, message):
    config = small_config(tmp_path)
    with pytest.raises(SystemExit):
        main(["run", "-c", str(config), override])
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1 and not (tmp_path / "run").exists()


def test_results_table_shows_the_change_against_random():
    from dsel.pipeline.commands import format_results

    results = {"target": "science", "arms": {
        "color": {"target_loss": 0.75, "mean_loss": 1.0, "lm_eval": {"t": {"acc,none": 0.5}},
                  "stderr": {"science": 0.0125}, "data_efficiency": {"multiplier": 4.0}},
        "random": {"target_loss": 1.0, "mean_loss": 0.9, "data_efficiency": {"multiplier": 1.0}}}}
    color, random = format_results(results).splitlines()[1:]
    assert color.split() == ["color", "0.7500", "0.0125", "-25.0%", "4.00x", "1.0000", "0.500"]
    assert random.split() == ["random", "1.0000", "-", "-", "1.00x", "0.9000", "-"]


def test_until_select_stops_after_the_selections_and_still_reports(tmp_path, monkeypatch):
    monkeypatch.setenv("DSEL_PROGRESS", "0")
    config = small_config(tmp_path)
    run_dir = tmp_path / "run"
    main(["run", "-c", str(config), "methods=[color]", "until=finetune"])  # then torchrun scores the pool
    assert set(stage_times(run_dir)) == {"tokenize", "prior", "color/finetune"}
    main(["run", "-c", str(config), "methods=[color]", "until=score"])
    assert set(stage_times(run_dir)) == {"tokenize", "prior", "color/finetune", "color/score"}
    main(["run", "-c", str(config), "methods=[color]", "until=select",
          "color.select={method: color-batch, column: color, color_batch: 4}"])
    selection = json.loads((run_dir / "color" / "select" / "selection.json").read_text())
    assert selection["method"] == "color-batch" and selection["tau"] == pytest.approx(1 / 0.3)
    assert selection["k"] == round(selection["pool"] * 0.3)  # the budget sets how many color-batch keeps
    main(["run", "-c", str(config), "methods=[color]", "until=select"])
    assert set(stage_times(run_dir)) == {"tokenize", "prior", "color/finetune", "color/score", "color/select",
                                         "random/select"}
    assert (run_dir / "color" / "select" / "data" / "selected.bin").is_file()
    report = (run_dir / "report" / "index.html").read_text()
    assert "score_histograms.png" in report and "domain_shares.png" in report and "loss_curves.png" not in report
