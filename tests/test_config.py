"""The config loader: precedence, coercion, one aggregated error with paths, sources and suggestions."""

from dataclasses import dataclass
from typing import Literal, Optional

import pytest

from ptrain.cli import main as cli_main
from ptrain.config import ConfigError, config_help, dump_config, load_config, opt, section
from sharding.config import ShardConfig


@dataclass
class OptimConfig:
    lr: float = opt(1e-4, "learning rate")
    warmup_steps: int = opt(10, "warmup")
    betas: list[float] = opt([0.9, 0.98], "adam betas")


@dataclass
class RootConfig:
    name: str = opt("run", "run name")
    mode: Literal["a", "b"] = opt("a", "mode")
    flag: bool = opt(False, "a flag")
    path: Optional[str] = opt(None, "optional path")
    optim: OptimConfig = section(OptimConfig, "optimiser")

    def __post_init__(self):
        if self.optim.warmup_steps < 0:
            raise ValueError("optim.warmup_steps must be >= 0")


def test_defaults_yaml_overrides_precedence(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("name: fromyaml\noptim:\n  lr: 1e-3\n  warmup_steps: 5\n")
    cfg = load_config(RootConfig, f, ["optim.warmup_steps=7", "flag=true", "optim.betas=[0.5,0.6]"])
    assert cfg.name == "fromyaml"
    assert cfg.optim.lr == pytest.approx(1e-3)  # PyYAML reads 1e-3 as a string: coerced to float
    assert cfg.optim.warmup_steps == 7
    assert cfg.flag is True
    assert cfg.optim.betas == [0.5, 0.6]
    assert cfg.mode == "a" and cfg.path is None


def test_all_errors_in_one_message_with_source_and_suggestion(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("name: no\noptim:\n  lrr: 0.1\n")
    with pytest.raises(ConfigError) as ei:
        load_config(RootConfig, f, ["mode=c", "optim.warmup_steps=abc", "flagg=1"])
    msg = str(ei.value)
    problems = ei.value.problems
    assert len(problems) == 5, problems
    assert f"optim.lrr: unknown key (from {f}); did you mean optim.lr?" in msg
    assert "name: expected a string, got bool False (YAML reads unquoted yes/no/on/off as booleans: quote " in msg
    assert "mode: 'c' is not one of 'a', 'b' (from command line)" in msg
    assert "optim.warmup_steps: expected an integer, got str 'abc' (from command line)" in msg
    assert "flagg: unknown key (from command line); did you mean flag?" in msg


def test_post_init_sentence_is_reported():
    with pytest.raises(ConfigError, match="warmup_steps must be >= 0"):
        load_config(RootConfig, None, ["optim.warmup_steps=-1"])


def test_section_assigned_a_value_and_bad_override_syntax():
    with pytest.raises(ConfigError, match="optim: is a section"):
        load_config(RootConfig, None, ["optim=3"])
    with pytest.raises(ConfigError, match="dotted.key=value"):
        load_config(RootConfig, None, ["justaword"])


def test_missing_and_malformed_yaml(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(RootConfig, tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a list\n- not a mapping\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(RootConfig, bad)


def test_dump_round_trip(tmp_path):
    cfg = load_config(RootConfig, None, ["optim.lr=3e-4", "path=/x"])
    dump_config(cfg, tmp_path / "out.yaml")
    assert load_config(RootConfig, tmp_path / "out.yaml") == cfg


def test_help_lists_keys_docs_and_defaults():
    text = "\n".join(config_help(RootConfig))
    assert "optim.lr: float = 0.0001  — learning rate" in text
    assert "mode: one of 'a', 'b' = 'a'" in text


def test_shard_config_validation():
    with pytest.raises(ConfigError) as ei:
        load_config(ShardConfig, None, ["num_frames=0", "min_seconds=30", "name=a/b"])
    msg = str(ei.value)
    assert "videos is required" in msg and "num_frames must be at least 1" in msg and "name must be a plain" in msg


def test_cli_verbs_and_help(capsys):
    assert cli_main([]) == 2
    assert "verbs:" in capsys.readouterr().out
    assert cli_main(["shrad"]) == 2
    assert "did you mean 'shard'" in capsys.readouterr().err
    assert cli_main(["shard", "--help"]) == 0
    assert "max_samples_per_shard" in capsys.readouterr().out
    assert cli_main(["shard", "--local_rank=0"]) == 2
    assert "--no_local_rank" in capsys.readouterr().err
    assert cli_main(["shard", "videos=a", "captions=b", "out=c", "fsp=2"]) == 2
    assert "fsp: unknown key (from command line); did you mean fps?" in capsys.readouterr().err


def test_string_values_keep_their_text(tmp_path):
    cfg = load_config(RootConfig, None, ["name=0123", "path=1_000"])
    assert cfg.name == "0123" and cfg.path == "1_000"
    assert load_config(RootConfig, None, ["path=null"]).path is None
    f = tmp_path / "c.yaml"
    f.write_text("name: 0123\n")
    with pytest.raises(ConfigError, match=r"name: expected a string, got int 83; quote it in YAML"):
        load_config(RootConfig, f)
