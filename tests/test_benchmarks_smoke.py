"""The loader and PMP benchmarks run end to end at toy sizes and write the ratios they promise."""
import importlib.util
from pathlib import Path

from dsel.io import read_json

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load(name):
    spec = importlib.util.spec_from_file_location(f"{name}_benchmark", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_loader_benchmark(tmp_path, capsys):
    out = tmp_path / "loader.json"
    load("loader").main(["--tokens", "200000", "--seq-len", "64", "--batch-size", "4", "--batches", "3",
                         "--seconds", "0.05", "--out", str(out)])
    result = read_json(out)
    assert set(result["results"]) == {"dsel batch", "dsel prefetch", "megatron-core __getitem__", "numpy memmap"}
    assert result["speedup_vs_megatron"] > 0 and result["speedup_vs_numpy_memmap"] > 0
    assert "megatron-core __getitem__" in capsys.readouterr().out


def test_pmp_benchmark_dots_agree(tmp_path):
    out = tmp_path / "pmp.json"
    load("pmp").main(["--device", "cpu", "--model", "tiny", "--batch", "3", "--micro-batch", "2", "--target", "2",
                      "--out", str(out)])
    result = read_json(out)
    assert result["dot_relative_error"] < 1e-3  # the JVP dots equal the per-example backward ones
    assert result["speedup_vs_naive"] > 0 and 0 < result["solve_fraction_of_pretraining"]
