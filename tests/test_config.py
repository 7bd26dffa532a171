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
    with pytest.raises(ConfigError) as ei:
        load_config(RootConfig, None, ["optim.warmup_steps=-1"])
    assert ei.value.problems == ["optim.warmup_steps must be >= 0 (from command line)"]


def test_section_assigned_a_value_and_bad_override_syntax(tmp_path):
    with pytest.raises(ConfigError, match="optim: is a section"):
        load_config(RootConfig, None, ["optim=3"])
    with pytest.raises(ConfigError, match="dotted.key=value"):
        load_config(RootConfig, None, ["justaword"])
    f = tmp_path / "c.yaml"
    f.write_text("name: x\n")
    with pytest.raises(ConfigError) as ei:  # every malformed item, each with its fix, in one error
        load_config(RootConfig, None, ["flg", "optim..lr=1", "x.=2", str(f), "mode=c"])
    assert ei.value.problems == [
        "'flg': not a key=value override (from command line); did you mean flag=VALUE?",
        "'optim..lr=1': 'optim..lr' is not a dotted key (from command line); write it as dotted.key=value, "
        "e.g. ray.num_cpus=2",
        "'x.=2': 'x.' is not a dotted key (from command line); write it as dotted.key=value, e.g. ray.num_cpus=2",
        f"{str(f)!r}: not a key=value override (from command line); a config file goes first: "
        "ptrain VERB CONFIG.yaml [dotted.key=value ...]",
        "mode: 'c' is not one of 'a', 'b' (from command line)",
    ]


def test_missing_and_malformed_yaml(tmp_path, capsys):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(RootConfig, tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a list\n- not a mapping\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(RootConfig, bad)
    # through the CLI: one clear line naming the input and the fix, exit 2, never a traceback
    (tmp_path / "binary.yaml").write_bytes(b"\xff\xfe\x00garbage")
    (tmp_path / "broken.yaml").write_text("num_frames: [1\n")
    (tmp_path / "adir").mkdir()
    cases = {
        "nope.yaml": "nope.yaml: config file not found; pass an existing YAML config file first, then "
                     "dotted.key=value overrides (or only overrides)",
        "justaword": "'justaword' is meant as an override, write it as KEY=VALUE",
        "adir": "adir: is a directory, not a config file",
        "binary.yaml": "binary.yaml: not a text (UTF-8) file",
        "broken.yaml": "broken.yaml: not valid YAML at line 2, column 1: expected ',' or ']'",
    }
    for arg, expected in cases.items():
        path = arg if arg == "justaword" else str(tmp_path / arg)
        assert cli_main(["shard", path, "videos=a", "captions=b", "out=c"]) == 2
        err = capsys.readouterr().err
        assert expected in err and "Traceback" not in err, err


def test_dump_round_trip(tmp_path):
    cfg = load_config(RootConfig, None, ["optim.lr=3e-4", "path=/x"])
    dump_config(cfg, tmp_path / "out.yaml")
    assert load_config(RootConfig, tmp_path / "out.yaml") == cfg


@dataclass
class AfterSectionConfig:
    first: int = opt(1, "a plain key")
    optim: OptimConfig = section(OptimConfig, "optimiser")
    last: bool = opt(True, "a plain key declared after the section")


def test_help_lists_keys_docs_and_defaults():
    text = "\n".join(config_help(RootConfig))
    assert "optim.lr: float = 0.0001  — learning rate" in text
    assert "mode: one of 'a', 'b' = 'a'" in text
    # plain keys first, then each section under its heading after a blank line: `last` is not read as optim's
    assert config_help(AfterSectionConfig) == [
        "  first: int = 1  — a plain key",
        "  last: bool = True  — a plain key declared after the section",
        "",
        "optim.*  (optimiser)",
        "  optim.lr: float = 0.0001  — learning rate",
        "  optim.warmup_steps: int = 10  — warmup",
        "  optim.betas: list of float = [0.9, 0.98]  — adam betas",
    ]


def test_shard_config_validation(tmp_path):
    f = tmp_path / "shard.yaml"
    f.write_text("ray:\n  cpus_per_task: 0\nplan:\n  max_seconds: 10\n")
    with pytest.raises(ConfigError) as ei:
        load_config(ShardConfig, f, ["plan.num_frames=0", "plan.min_seconds=30", "name=a/b", "ray.num_cpus=0"])
    # __post_init__'s problems are lines of the one error, each at its dotted key with the value's source
    assert ei.value.problems == [
        f"ray.cpus_per_task must be positive, got 0.0 (from {f})",
        "ray.num_cpus must be at least 1 (or unset: all cores), got 0 (from command line)",
        "plan.num_frames must be at least 1, got 0 (from command line)",
        "plan.min_seconds (30.0) is larger than max_seconds (10.0); lower min_seconds or raise max_seconds "
        f"(plan.min_seconds from command line, plan.max_seconds from {f})",
        "videos is required: pass videos=DIR, the directory of the videos",
        "captions is required: pass captions=FILE, the caption.json",
        "out is required: pass out=DIR, the directory for the shards",
        "name must be a plain file prefix without '/', '\\' or '.', got 'a/b' (from command line)",
    ]


def test_cli_verbs_and_help(capsys):
    assert cli_main([]) == 0  # no arguments: the verbs, and success (nothing went wrong)
    assert "verbs:" in capsys.readouterr().out
    assert cli_main(["--version"]) == 0
    assert capsys.readouterr().out.startswith("ptrain 0.")
    assert cli_main(["shrad"]) == 2
    assert "did you mean 'shard'" in capsys.readouterr().err
    assert cli_main(["shard", "--help"]) == 0
    assert "max_samples_per_shard" in capsys.readouterr().out
    # a launcher's --local_rank (deepspeed --module ptrain ...) is taken out, in either spelling and place
    assert cli_main(["--local_rank=0", "shard", "--help"]) == 0 and cli_main(["shard", "--local_rank", "1", "--help"]) == 0
    capsys.readouterr()
    assert cli_main(["shard", "--gpus", "2"]) == 2  # any other flag is refused
    assert "unexpected flag '--gpus'" in capsys.readouterr().err
    assert cli_main(["shard", "videos=a", "captions=b", "out=c", "plan.fsp=2"]) == 2
    assert "plan.fsp: unknown key (from command line); did you mean plan.fps?" in capsys.readouterr().err


def test_help_into_a_closed_pipe_is_not_a_traceback():
    import os
    import subprocess
    import sys

    for argv in (["shard", "--help"], ["--help"]):
        r, w = os.pipe()
        os.close(r)  # the reader is gone before the first byte, as with `ptrain shard --help | head -0`
        try:
            proc = subprocess.run([sys.executable, "-m", "ptrain", *argv], stdout=w, stderr=subprocess.PIPE,
                                  text=True, timeout=60)
        finally:
            os.close(w)
        assert proc.returncode == 0 and proc.stderr == "", (argv, proc.stderr)


def test_string_values_keep_their_text(tmp_path):
    cfg = load_config(RootConfig, None, ["name=0123", "path=1_000"])
    assert cfg.name == "0123" and cfg.path == "1_000"
    assert load_config(RootConfig, None, ["path=null"]).path is None
    f = tmp_path / "c.yaml"
    f.write_text("name: 0123\n")
    with pytest.raises(ConfigError, match=r"name: expected a string, got int 83; quote it in YAML"):
        load_config(RootConfig, f)


def test_a_bad_section_value_is_one_error_not_a_crash_of_the_parent():
    from ptrain.configs import PretrainConfig

    with pytest.raises(ConfigError) as ei:
        load_config(PretrainConfig, None, ["run_dir=/tmp/x", "eval.every_steps=5", "eval.batch_size=0"])
    assert any(line.startswith("eval") and "batch_size" in line for line in ei.value.problems), ei.value.problems


def test_shard_plan_keys_live_in_their_section_and_old_keys_say_where():
    from sharding.sources import SOURCES

    base = ["videos=v", "captions=c.json", "out=o"]
    cfg = load_config(ShardConfig, None, base + ["plan.num_frames=8", "plan.sampling=uniform"])
    assert (cfg.plan.num_frames, cfg.plan.sampling, cfg.source) == (8, "uniform", "howto100m")
    with pytest.raises(ConfigError) as ei:  # the keys of before the plan section
        load_config(ShardConfig, None, base + ["num_frames=8", "fps=2", "source=howto10m"])
    assert ei.value.problems == [
        "num_frames: unknown key (from command line); did you mean plan.num_frames?",
        "fps: unknown key (from command line); did you mean plan.fps?",
        f"source must be one of {', '.join(map(repr, SOURCES))}, got 'howto10m'; did you mean 'howto100m'? (from "
        "command line)",
    ]
    # captions is the howto100m source's input: required for it only
    with pytest.raises(ConfigError, match="captions is required"):
        load_config(ShardConfig, None, ["videos=v", "out=o"])


def test_a_choice_spelt_like_a_boolean_survives_yaml_and_the_command_line(tmp_path):
    """`ptrain convert ... compat=true`: the command line and YAML read `true` as a bool; the choice is 'true'."""
    from ptrain.model.config import ConvertConfig

    assert load_config(ConvertConfig, None, ["compat=true"]).compat == "true"
    assert load_config(ConvertConfig, None, ["compat=False"]).compat == "false"
    f = tmp_path / "c.yaml"
    f.write_text("compat: true\n")
    assert load_config(ConvertConfig, f).compat == "true"
    with pytest.raises(ConfigError, match="compat: 'yes' is not one of 'auto', 'true', 'false'"):
        load_config(ConvertConfig, None, ["compat='yes'"])


def test_includes_build_on_base_files_key_by_key(tmp_path):
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "common.yaml").write_text("name: base\noptim:\n  lr: 1e-3\n  warmup_steps: 5\n")
    (tmp_path / "base" / "more.yaml").write_text("include: common.yaml\nmode: b\n")
    child = tmp_path / "child.yaml"
    child.write_text("include: [base/more.yaml]\noptim:\n  warmup_steps: 9\n")
    cfg = load_config(RootConfig, child, ["flag=true"])
    assert (cfg.name, cfg.mode, cfg.flag) == ("base", "b", True)
    assert cfg.optim.lr == pytest.approx(1e-3) and cfg.optim.warmup_steps == 9  # one key replaced, the other kept
    with pytest.raises(ConfigError) as ei:  # a problem names the file that set the value
        load_config(RootConfig, child, ["optim.lr=x"])
    assert "optim.lr: expected a number, got str 'x' (from command line)" in ei.value.problems
    (tmp_path / "base" / "common.yaml").write_text("include: ../child.yaml\nname: loop\n")
    with pytest.raises(ConfigError, match="includes form a cycle"):
        load_config(RootConfig, child)
    (tmp_path / "bad.yaml").write_text("include: nowhere.yaml\n")
    with pytest.raises(ConfigError, match="'nowhere.yaml': .* not found; includes are relative"):
        load_config(RootConfig, tmp_path / "bad.yaml")
    (tmp_path / "typo.yaml").write_text("include: base/more.yaml\nmod: a\n")
    (tmp_path / "base" / "common.yaml").write_text("name: base\n")
    with pytest.raises(ConfigError) as ei:
        load_config(RootConfig, tmp_path / "typo.yaml")
    assert f"mod: unknown key (from {tmp_path / 'typo.yaml'}); did you mean mode?" in ei.value.problems
