"""Every shipped config loads and passes the pipeline's (or dsel train's) settings check."""
from pathlib import Path

import pytest

from dsel.config import load_config
from dsel.pipeline.config import PipelineConfig
from dsel.pipeline.stages import Pipeline
from dsel.train.config import TrainConfig

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


@pytest.mark.parametrize("name", ["quickstart.yaml", "pds-160m.yaml", "color-150m.yaml"])
def test_run_configs_check(name):
    cfg = load_config(PipelineConfig, CONFIGS / name)
    Pipeline(cfg).check()


def test_pretrain_config_loads_with_the_megatron_backend():
    cfg = load_config(TrainConfig, CONFIGS / "pretrain-1b-tp-pp.yaml")
    assert cfg.backend == "megatron" and cfg.parallel.tp == 2 and cfg.parallel.pp == 2
    assert cfg.model_config().n_layer == 24
