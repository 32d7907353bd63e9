"""benchmarks/score_scaling.py runs end to end at toy sizes: same scores on 1 and 2 ranks, a ratio in the JSON."""
import importlib.util
from pathlib import Path

from dsel.io import read_json

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "score_scaling.py"


def test_scaling_benchmark_writes_rows_with_ratio(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("score_scaling", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "bench.json"
    bench.main(["--ranks", "1", "2", "--windows", "48", "--window", "17", "--d-model", "16", "--layers", "1",
                "--shard-size", "8", "--device", "cpu", "--out", str(out)])
    rows = read_json(out)["rows"]
    assert [r["ranks"] for r in rows] == [1, 2]
    assert rows[1]["max_abs_diff_vs_first"] == 0.0
    assert set(rows[1]["per_rank_s"]) == {"rank 0", "rank 1"} and rows[1]["throughput_ratio"] > 0
    assert "ratios:" in capsys.readouterr().out
