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


def header_commands(path: Path, command: str) -> list[dict]:
    """key=value settings of every `-m dsel <command>` line in a config's header comment (continuations joined)."""
    commands, current = [], ""
    for line in (line[1:].strip() for line in path.read_text().splitlines() if line.startswith("#")):
        current += " " + line.removesuffix("\\")
        if not line.endswith("\\"):
            commands.append(current)
            current = ""
    return [dict(token.split("=", 1) for token in line.split(f"-m dsel {command} ")[1].split() if "=" in token)
            for line in commands if f"-m dsel {command} " in line]


@pytest.mark.parametrize("name", ["pds-160m.yaml", "color-150m.yaml"])
def test_header_scoring_lines_carry_every_setting_of_the_score_stage(name):
    """The torchrun scoring line must write shards `dsel run` accepts: every setting it fingerprints, equal."""
    import yaml

    cfg = load_config(PipelineConfig, CONFIGS / name)
    pipeline = Pipeline(cfg)
    window = TrainConfig(data=["x"], out="x", steps=1, preset=cfg.model["preset"]).model_config().seq_len + 1
    settings = pipeline.stage_settings(cfg.data.vocab_size, window, budget=1)
    run = pipeline.runner.path
    paths = {"prior": run("prior") / "model", "cond": run("color/finetune") / "model",
             "model": run("pds/fit") / "scorer"}
    for method in [m for m in ("pds", "color") if m in cfg.methods]:
        lines = header_commands(CONFIGS / name, f"{method} score")
        assert len(lines) == 1, f"{name}: one torchrun line for {method} score"
        stage = {**settings[f"{method}/score"][1], "out": str(run(f"{method}/score"))}
        for key, value in stage.items():
            expected = str(paths[key]) if key in paths else value
            assert key in lines[0] and yaml.safe_load(lines[0][key]) == expected, f"{name}: {key}={expected!r}"


def test_color_1b_config_is_the_paper_recipe():
    cfg = load_config(TrainConfig, CONFIGS / "color-1b.yaml")
    arch = cfg.model_config()
    assert (arch.seq_len, arch.d_model, arch.n_layer, arch.n_head, arch.ffn_size) == (512, 2048, 24, 32, 8192)
    assert arch.qk_layernorm and not arch.norm_bias and not arch.bias
    assert (cfg.lr, cfg.weight_decay, cfg.adam_eps, cfg.z_loss, cfg.schedule) == (1e-3, 0.0, 1e-15, 1e-4, "olmo")
    assert cfg.samples_per_step == 256 and cfg.tokens == 192_000 * 256 * 512
