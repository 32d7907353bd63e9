"""Every script in benchmarks/ runs end to end at toy sizes and writes the table rows and ratios it promises."""
import importlib.util
from pathlib import Path

import torch

from dsel.io import read_json

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load_benchmark(name):
    """benchmarks/<name>.py as a module (the folder is not a package)."""
    spec = importlib.util.spec_from_file_location(f"{name}_benchmark", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_kernels_benchmark(tmp_path, capsys):
    bench = load_benchmark("kernels")
    out = tmp_path / "bench.json"
    bench.main(["--device", "cpu", "--vocab", "70", "--dim", "16", "--tokens", "33", "--repeats", "1",
                "--out", str(out)])
    rows = read_json(out)["rows"]
    assert [(r["vocab"], r["dim"], r["tokens"]) for r in rows] == [(70, 16, 33)]
    assert {"torch", "dsel"} <= set(rows[0]["results"])
    assert rows[0]["ratios"]["jvp_over_forward"] > 0
    assert "ratios:" in capsys.readouterr().out


def test_color_score_benchmark(tmp_path, capsys):
    bench = load_benchmark("score")
    out = tmp_path / "bench.json"
    bench.main(["--device", "cpu", "--preset", "tiny", "--window", "16", "--batch-size", "3", "--micro-batch", "2",
                "--repeats", "1", "--peak-tflops", "1", "--out", str(out)])
    result = read_json(out)
    assert set(result["rows"]) == {"color", "torch"}
    assert all(r["per_model_tokens_per_s"] == 2 * r["pool_tokens_per_s"] > 0 for r in result["rows"].values())
    assert result["speed_ratio"] > 0 and result["max_abs_score_difference"] < 1e-4
    assert "speed ratio color/torch" in capsys.readouterr().out


def test_score_scaling_benchmark(tmp_path, capsys):
    bench = load_benchmark("score_scaling")
    out = tmp_path / "bench.json"
    bench.main(["--ranks", "1", "2", "--windows", "48", "--window", "17", "--d-model", "16", "--layers", "1",
                "--shard-size", "8", "--device", "cpu", "--out", str(out)])
    rows = read_json(out)["rows"]
    assert [r["ranks"] for r in rows] == [1, 2]
    assert rows[1]["max_abs_diff_vs_first"] == 0.0
    assert set(rows[1]["per_rank_s"]) == {"rank 0", "rank 1"} and rows[1]["throughput_ratio"] > 0
    assert "ratios:" in capsys.readouterr().out


def test_select_benchmark(tmp_path, capsys):
    bench = load_benchmark("selection")
    out = tmp_path / "bench.json"
    bench.main(["--rows", "20000", "--row-group", "3000", "--chunk-rows", "4096", "--dir", str(tmp_path), "--out", str(out)])
    rows = read_json(out)["rows"]
    assert [r["case"] for r in rows] == ["topk-40%", "gumbel-40%", "budget-40%"]
    for r in rows:
        assert r["same_count"] and r["time_ratio"] > 0 and r["streamed"]["passes"] >= 2
    assert rows[1]["same_selection"]  # Gumbel keys are continuous: no ties, so argpartition picks the same set
    assert rows[0]["streamed"]["kept"] == 8000
    assert "ratios (streamed / in-memory)" in capsys.readouterr().out


def test_train_benchmark_both_backends(tmp_path, capsys):
    """torch in this process, megatron at TP=2 under torchrun (2 gloo ranks): each rank holds half the matrices."""
    bench = load_benchmark("train")
    out = tmp_path / "bench.json"
    bench.main(["--preset", "tiny", "--seq-len", "16", "--batch-size", "2", "--repeats", "1", "--layouts", "2/1",
                "--report-memory", "--out", str(out)])
    result = read_json(out)
    assert [(r["backend"], r["tp"], r["pp"]) for r in result["rows"]] == [("torch", 1, 1), ("megatron", 2, 1)]
    assert all(r["tokens_per_s"] > 0 and 0 < r["mfu"] for r in result["rows"])
    megatron = result["rows"][1]
    assert len(megatron["peak_memory_bytes"]) == 2 and len(set(megatron["params_per_rank"])) == 1
    assert sum(megatron["params_per_rank"]) < 2 * result["num_params"] and result["model"]["seq_len"] == 16
    assert result["ratios_megatron_over_torch"]["2/1"] > 0
    assert "ratio megatron 2/1 / torch" in capsys.readouterr().out
    assert not torch.distributed.is_initialized()


def test_loader_benchmark(tmp_path, capsys):
    out = tmp_path / "loader.json"
    load_benchmark("loader").main(["--tokens", "200000", "--seq-len", "64", "--batch-size", "4", "--batches", "3",
                         "--seconds", "0.05", "--out", str(out)])
    result = read_json(out)
    assert set(result["results"]) == {"dsel batch", "dsel prefetch", "megatron-core __getitem__", "numpy memmap"}
    assert result["speedup_vs_megatron"] > 0 and result["speedup_vs_numpy_memmap"] > 0
    assert "megatron-core __getitem__" in capsys.readouterr().out


def test_dolma_benchmark(tmp_path, capsys):
    out = tmp_path / "dolma.json"
    load_benchmark("dolma").main(["--tokens", "200000", "--files", "5", "--seq-len", "64", "--batch-size", "4",
                                  "--batches", "3", "--seconds", "0.05", "--out", str(out)])
    result = read_json(out)
    assert set(result["results"]) == {"dsel directory", "dsel one file", "OLMo MemMapDataset"}
    assert result["speedup_vs_olmo"] > 0 and result["directory_over_one_file"] > 0
    assert "OLMo MemMapDataset" in capsys.readouterr().out


def test_pmp_benchmark_dots_agree(tmp_path):
    out = tmp_path / "pmp.json"
    load_benchmark("pmp").main(["--device", "cpu", "--model", "tiny", "--batch", "3", "--micro-batch", "2", "--target", "2",
                      "--out", str(out)])
    result = read_json(out)
    assert result["dot_relative_error"] < 1e-3  # the JVP dots equal the per-example backward ones
    assert result["speedup_vs_naive"] > 0 and 0 < result["solve_fraction_of_pretraining"]


def test_tokenize_benchmark(tmp_path, capsys):
    bench = load_benchmark("tokenization")
    out = tmp_path / "bench.json"
    bench.main(["--docs", "120", "--files", "2", "--vocab", "300", "--out", str(out)])  # exits unless outputs are identical
    rows = read_json(out)["rows"]
    assert [r["workers"] for r in rows] == [1, 2]
    assert all(r["dsel"]["docs"] == r["megatron"]["docs"] == 120 and r["dsel_over_megatron"] > 0 for r in rows)
    assert "dsel/megatron" in capsys.readouterr().out


def test_pmp_benchmark_rank_stability(tmp_path):
    """Two solver seeds, both estimators, on a tiny checkpoint and dataset: a Spearman per estimator."""
    import numpy as np

    from dsel.data.indexed import IndexedDatasetWriter
    from dsel.models.checkpoint import save_model
    from dsel.models.config import GPTConfig
    from dsel.models.gpt import GPT

    rng = np.random.default_rng(0)
    for name, docs in (("proxy", 8), ("target", 2)):
        with IndexedDatasetWriter(tmp_path / name, np.uint16) as w:
            for _ in range(docs):
                w.add_document(rng.integers(0, 32, size=9))
    torch.manual_seed(0)
    save_model(tmp_path / "lm", GPT(GPTConfig(vocab_size=32, seq_len=8, n_layer=1, n_head=2, d_model=16)))
    out = tmp_path / "stability.json"
    load_benchmark("pmp").main(["--mode", "stability", "--prior", str(tmp_path / "lm"), "--proxy", str(tmp_path / "proxy"),
                                "--target-data", str(tmp_path / "target"), "--target", "0", "--steps", "3", "--batch", "2",
                                "--score-every", "2", "--device", "cpu", "--out", str(out)])
    rows = read_json(out)["estimators"]
    assert len(rows) == 2 and all(-1 <= r["spearman_between_seeds"] <= 1 for r in rows.values())
    assert rows["fixed-step (score_every=2)"]["zero_windows"] == 0  # every window scored under every seed


def test_generate_benchmark(tmp_path, capsys):
    bench = load_benchmark("generate")
    out = tmp_path / "bench.json"
    bench.main(["--device", "cpu", "--preset", "tiny", "--prompt", "10", "--new-tokens", "4", "--repeats", "1",
                "--out", str(out)])
    result = read_json(out)
    assert set(result["rows"]) == {"kv cache", "rerun window"} and result["speed_ratio"] > 0
    assert "ratios:" in capsys.readouterr().out
