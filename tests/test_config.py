"""Typed YAML configs: loading, overrides, and one-line errors for typos and bad types."""
from dataclasses import dataclass, field
from typing import Literal, Optional

import pytest

from dsel.config import describe, load_config, option
from dsel.errors import DselError


@dataclass
class Inner:
    lr: float = option(1e-3, "learning rate")
    steps: int = option(10, "steps")


@dataclass
class Outer:
    name: str = option(help="run name")
    train: Inner = field(default_factory=Inner)
    mode: Literal["a", "b"] = option("a", "mode")
    tags: list[str] = option([], "tags")
    seed: Optional[int] = option(None, "seed")
    verbose: bool = option(False, "chatty")


def write(tmp_path, text):
    p = tmp_path / "cfg.yaml"
    p.write_text(text)
    return p


def test_yaml_then_overrides(tmp_path):
    p = write(tmp_path, "name: x\ntrain:\n  lr: 1\n  steps: 5\ntags: [a]\n")
    cfg = load_config(Outer, p, ["train.steps=7", "mode=b", "seed=3", "verbose=true"])
    assert cfg.name == "x" and cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)
    assert cfg.train.steps == 7 and cfg.mode == "b" and cfg.seed == 3 and cfg.verbose is True
    assert cfg.tags == ["a"]


def test_defaults_are_not_shared():
    a = load_config(Outer, None, ["name=a"])
    a.tags.append("x")
    assert load_config(Outer, None, ["name=b"]).tags == []


def test_typo_names_file_key_and_suggestion(tmp_path):
    p = write(tmp_path, "name: x\ntrain:\n  lrr: 1\n")
    with pytest.raises(DselError, match=r"cfg.yaml: unknown key 'train.lrr' for Inner; did you mean 'lr'\?"):
        load_config(Outer, p)


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.steps=abc", "'train.steps' should be int"),
        ("mode=c", "'mode' must be one of"),
        ("verbose=3", "'verbose' should be bool"),
        ("nokey", "not of the form key=value"),
    ],
)
def test_bad_overrides(override, message):
    with pytest.raises(DselError, match=message):
        load_config(Outer, None, ["name=x", override])


def test_missing_required_and_missing_file(tmp_path):
    with pytest.raises(DselError, match="missing required setting"):
        load_config(Outer, None, [])
    with pytest.raises(DselError, match="nope.yaml: config file not found"):
        load_config(Outer, tmp_path / "nope.yaml")


def test_describe_lists_nested_settings():
    text = "\n".join(describe(Outer))
    assert "train.lr: float = 0.001  learning rate" in text and "name: str (required)" in text


@dataclass
class Renamed:
    out: str = option("o", "output folder", aliases=("output",))
    steps: Optional[int] = option(None, "steps")


def test_command_line_errors_blame_the_command_line_and_name_the_type(tmp_path):
    p = write(tmp_path, "name: x\ntrain:\n  steps: oops\n")
    with pytest.raises(DselError, match=r"/cfg.yaml: 'train.steps' should be int, got 'oops'$"):
        load_config(Outer, p)
    with pytest.raises(DselError, match=r"^command line: 'train.steps' should be int, got 'abc'$"):
        load_config(Outer, p, ["train.steps=abc"])
    with pytest.raises(DselError, match=r"^command line: 'steps' should be int or None, got 'abc'$"):
        load_config(Renamed, None, ["steps=abc"])
    with pytest.raises(DselError, match=r"^command line: 'tags=\[a': the value is not valid YAML"):
        load_config(Outer, None, ["name=x", "tags=[a"])
    with pytest.raises(DselError, match=r"^command line: missing required setting\(s\) name$"):
        load_config(Outer, None, [])


def test_deprecated_alias_still_works_with_a_warning(caplog):
    assert load_config(Renamed, None, ["output=x"]).out == "x"
    assert "'output' is deprecated and will be removed; use 'out'" in caplog.text
    with pytest.raises(DselError, match="both 'output' .deprecated. and 'out' are set"):
        load_config(Renamed, None, ["output=x", "out=y"])


def test_train_model_settings_are_arch_with_the_old_name_deprecated(caplog):
    from dsel.pipeline.config import PipelineConfig
    from dsel.train.config import TrainConfig

    old = load_config(TrainConfig, None, ["data=[d]", "out=o", "steps=1", "model.n_layer=3", "model.seq_len=8"])
    new = load_config(TrainConfig, None, ["data=[d]", "out=o", "steps=1", "arch.n_layer=3", "arch.seq_len=8"])
    assert old.arch == new.arch == {"n_layer": 3, "seq_len": 8} and old.model_config() == new.model_config()
    assert "command line: 'model' is deprecated and will be removed; use 'arch'" in caplog.text
    run = load_config(PipelineConfig, None, ["model.preset=tiny", "model.model.seq_len=32"])
    assert run.model == {"preset": "tiny", "arch": {"seq_len": 32}}
    assert "'model.model' is deprecated and will be removed; use 'model.arch'" in caplog.text


def test_a_state_saved_before_the_arch_rename_resumes(tmp_path):
    from dsel.config import to_dict
    from dsel.train.config import TrainConfig
    from dsel.train.torch_backend import check_same_run

    new = to_dict(TrainConfig(data=["d"], out="o", steps=1, arch={"n_layer": 3}))
    saved = {("model" if k == "arch" else k): v for k, v in new.items()}
    check_same_run(saved, new, tmp_path / "state.pt", tmp_path)
    with pytest.raises(DselError, match=r"belongs to a run with arch.n_layer=2, not 3"):
        check_same_run({**saved, "model": {"n_layer": 2}}, new, tmp_path / "state.pt", tmp_path)


def test_help_shows_choices_and_optional_types():
    text = "\n".join(describe(Outer))
    assert "mode: 'a' | 'b' = 'a'" in text and "seed: int or None = None" in text and "tags: list[str] = []" in text


def test_cli_global_options_anywhere_and_print_config(capsys):
    import yaml

    from dsel.cli import main

    main(["tokenize", "input=c.jsonl", "out=d/c", "--log-level", "warning", "--print-config"])
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["input"] == "c.jsonl" and printed["out"] == "d/c" and printed["workers"] == 2
    main(["--log-level", "ERROR", "select", "scores=s", "--print-config"])
    assert yaml.safe_load(capsys.readouterr().out)["method"] == "gumbel"


def test_removed_option_is_ignored_with_a_warning(caplog):
    from dsel.select.commands import SelectConfig

    cfg = load_config(SelectConfig, None, ["scores=s", "shards=16"])
    assert cfg.scores == "s" and not hasattr(cfg, "shards")
    assert "command line: 'shards' has no effect any more" in caplog.text
