"""benchmarks/kernels.py runs end to end at toy sizes and writes the ratios it promises."""
import importlib.util
from pathlib import Path

from dsel.io import read_json

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "kernels.py"


def test_benchmark_writes_table_rows_with_ratios(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("kernels_benchmark", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "bench.json"
    bench.main(["--device", "cpu", "--vocab", "70", "--dim", "16", "--tokens", "33", "--repeats", "1",
                "--out", str(out)])
    rows = read_json(out)["rows"]
    assert [(r["vocab"], r["dim"], r["tokens"]) for r in rows] == [(70, 16, 33)]
    assert {"torch", "dsel"} <= set(rows[0]["results"])
    assert rows[0]["ratios"]["jvp_over_forward"] > 0
    assert "ratios:" in capsys.readouterr().out
