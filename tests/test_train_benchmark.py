"""benchmarks/train.py runs both backends end to end at toy sizes and writes the ratio it promises."""
import importlib.util
from pathlib import Path

import pytest
import torch

pytest.importorskip("megatron.core")
pytest.importorskip("dsel.train.torch_backend")
pytest.importorskip("dsel.benchmarking")

from dsel.io import read_json  # noqa: E402

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "train.py"


def test_benchmark_reports_both_backends_and_ratio(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("train_benchmark", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "bench.json"
    bench.main(["--preset", "tiny", "--seq-len", "16", "--batch-size", "2", "--repeats", "1", "--out", str(out)])
    result = read_json(out)
    assert [r["backend"] for r in result["rows"]] == ["torch", "megatron"]
    assert all(r["tokens_per_s"] > 0 and 0 < r["mfu"] for r in result["rows"])
    assert result["ratio_megatron_over_torch"] > 0 and result["model"]["seq_len"] == 16
    assert "ratio megatron/torch" in capsys.readouterr().out
    assert not torch.distributed.is_initialized()  # the megatron world is torn down
