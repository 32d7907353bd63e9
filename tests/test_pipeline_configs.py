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


@pytest.mark.parametrize("name,params", [("pretrain-1b-tp-pp.yaml", 1.2e9), ("pretrain-pds-1.7b.yaml", 1.7e9)])
def test_pretrain_configs_fit_8_gpus_with_the_official_batch(name, params):
    """The official PDS runs' 512 x 1024-token steps, and a layout that divides the model on 8 GPUs."""
    from dsel.train.megatron.backend import check_layout

    cfg = load_config(TrainConfig, CONFIGS / name)
    config = cfg.model_config()
    assert cfg.backend == "megatron" and cfg.samples_per_step == 512 and config.seq_len == 1024
    assert check_layout(cfg, config, 8) == 8 // (cfg.parallel.tp * cfg.parallel.pp)
    assert params < config.num_params() < params * 1.15
