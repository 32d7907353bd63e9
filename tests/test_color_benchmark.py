"""benchmarks/score.py runs end to end at toy sizes and writes both scorers' rows and the ratio."""
import importlib.util
from pathlib import Path

from dsel.io import read_json

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "score.py"


def test_score_benchmark_writes_rows_and_ratio(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("score_benchmark", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "bench.json"
    bench.main(["--device", "cpu", "--preset", "tiny", "--window", "16", "--batch-size", "3", "--micro-batch", "2",
                "--repeats", "1", "--peak-tflops", "1", "--out", str(out)])
    result = read_json(out)
    assert set(result["rows"]) == {"color", "torch"}
    assert all(r["per_model_tokens_per_s"] == 2 * r["pool_tokens_per_s"] > 0 for r in result["rows"].values())
    assert result["speed_ratio"] > 0 and result["max_abs_score_difference"] < 1e-4
    assert "speed ratio color/torch" in capsys.readouterr().out
