"""The run report renders from synthetic stage outputs: every section, every PNG, the numbers in the table."""
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dsel.eval.report import data_efficiency, domain_shares, write_report

DOMAINS = ["legal", "science", "sports"]


def fake_run(run_dir, rng):
    """Score tables, selections, training logs and results as the pipeline's stages write them."""
    arms = {"pds": "pds", "color": "color", "random": None}
    for arm, column in arms.items():
        kept = {"legal": 10, "science": 60, "sports": 30} if column else {"legal": 33, "science": 34, "sports": 33}
        domains = {d: {"kept": k, "pool": 100, "kept_share": k / 100, "pool_share": 1 / 3, "kept_fraction": k / 100}
                   for d, k in kept.items()}
        selection = {"method": "gumbel" if arm == "pds" else arm, "expression": column, "threshold": 0.5,
                     "kept_fraction": 1 / 3, "tokens_kept": 6500, "domains": domains}
        (run_dir / arm / "select").mkdir(parents=True)
        (run_dir / arm / "select" / "selection.json").write_text(json.dumps(selection))
        if column:
            (run_dir / arm / "score").mkdir(parents=True)
            table = pa.table({"window": np.arange(300), "domain": [DOMAINS[i % 3] for i in range(300)],
                              column: rng.normal(size=300).astype(np.float32)})
            pq.write_table(table, run_dir / arm / "score" / "scores.parquet")
        log = run_dir / "pretrain" / arm / "log.jsonl"
        log.parent.mkdir(parents=True)
        rows = [{"step": s, "loss": 5.0 / s, "lr": 1e-3, "tokens": 64 * s} for s in range(1, 21)]
        rows += [{"step": s, "valid_loss": 6.0 / s} for s in (10, 20)]
        log.write_text("".join(json.dumps(r) + "\n" for r in rows))
    results = {"target": "science", "timings": {"tokenize": 1.5, "prior": 30.0},
               "arms": {arm: {"target_loss": loss, "mean_loss": loss + 0.5, "tokens_selected": 6500,
                              "losses": {d: loss + k for k, d in enumerate(DOMAINS)},
                              "lm_eval": {"dsel_science_facts": {"acc,none": 0.25 + loss / 100}}}
                        for arm, loss in (("pds", 2.25), ("color", 2.125), ("random", 2.75))}}
    (run_dir / "results.json").write_text(json.dumps(results))


def test_report_renders_every_section_with_its_numbers(tmp_path):
    fake_run(tmp_path, np.random.default_rng(0))
    page = write_report(tmp_path, tmp_path / "report")
    text = page.read_text()
    for name in ("score_histograms.png", "domain_shares.png", "loss_curves.png"):
        png = tmp_path / "report" / name
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"src='{name}'" in text
    assert "<b>2.1250</b>" in text  # the best target loss is highlighted
    assert "2.7500" in text and "dsel_science_facts acc,none" in text and "0.271" in text
    assert "<b>31.5</b>" in text  # total of the stage timings
    assert "color 2.1250 (-22.7%" in text and "pds 2.2500 (-18.2%" in text


def write_log(path, evals, tokens_per_step=100):
    """A pretraining log: train rows for steps 1..last and valid_loss rows {step: loss}."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [{"step": s, "loss": 1.0, "tokens": tokens_per_step * s} for s in range(1, max(evals) + 1)]
    rows += [{"step": s, "valid_loss": v} for s, v in evals.items()]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_data_efficiency_is_random_tokens_over_tokens_to_reach_random_final_loss(tmp_path):
    write_log(tmp_path / "pretrain" / "random" / "log.jsonl", {10: 5.0, 20: 4.0, 30: 3.5, 40: 3.0})
    write_log(tmp_path / "pretrain" / "color" / "log.jsonl", {10: 4.0, 20: 2.0, 30: 1.5, 40: 1.2})
    write_log(tmp_path / "pretrain" / "dsir" / "log.jsonl", {10: 5.5, 20: 5.0, 30: 4.0, 40: 3.5})
    found = data_efficiency(tmp_path, ["color", "dsir", "random"])
    # color reaches 3.0 halfway between step 10 (4.0) and 20 (2.0): 1,500 tokens; random needs 4,000
    assert found["color"]["tokens_to_random_final"] == pytest.approx(1500)
    assert found["color"]["multiplier"] == pytest.approx(4000 / 1500)
    assert found["random"]["multiplier"] == pytest.approx(1.0) and found["dsir"]["multiplier"] is None
    results = {"target": "science", "arms": {
        "color": {"target_loss": 1.2, "mean_loss": 1.0, "stderr": {"science": 0.0321},
                  "data_efficiency": found["color"], "lm_eval": {"t": {"acc,none": 0.5}},
                  "lm_eval_stderr": {"t": {"acc,none": 0.025}}},
        "random": {"target_loss": 3.0, "mean_loss": 2.0, "data_efficiency": found["random"]}}}
    (tmp_path / "results.json").write_text(json.dumps(results))
    text = write_report(tmp_path, tmp_path / "report").read_text()
    assert "1.2000 ± 0.0321" in text and "2.67x (1,500 tokens)" in text and "0.500 ± 0.025" in text


def test_domain_shares_come_from_the_selections(tmp_path):
    fake_run(tmp_path, np.random.default_rng(0))
    names, shares = domain_shares(tmp_path, ["pds", "color", "random"])
    assert names == DOMAINS
    assert shares["pool"] == [1 / 3] * 3
    assert shares["pds"] == [0.1, 0.6, 0.3] and shares["random"] == [0.33, 0.34, 0.33]


def test_report_of_a_partial_run_keeps_what_exists(tmp_path):
    log = tmp_path / "pretrain" / "random" / "log.jsonl"
    log.parent.mkdir(parents=True)
    log.write_text(json.dumps({"step": 1, "loss": 3.0}) + "\n")
    text = write_report(tmp_path, tmp_path / "report").read_text()
    assert "loss_curves.png" in text and "score_histograms.png" not in text and "no results yet" in text
