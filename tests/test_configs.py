"""Every shipped YAML config validates against its verb's config class, and the pretrain configs
derive a DeepSpeed JSON; config errors name the key and a fix."""

from pathlib import Path

import pytest
import yaml

from ptrain.config import ConfigError, load_config
from ptrain.configs import EvalConfig, PretrainConfig

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def _class_for(path: Path):
    """The root config class of a shipped YAML, from its directory (and file name under demo/)."""
    kind = path.parent.name
    if kind == "pretrain" or (kind == "demo" and path.name.startswith("pretrain")):
        return PretrainConfig
    if kind == "shard" or (kind == "demo" and path.name.startswith("shard")):
        from sharding.config import ShardConfig

        return ShardConfig
    if kind == "finetune" or (kind == "demo" and path.name.startswith("finetune")):
        from ptrain import cli

        if "finetune" in cli.VERBS:
            return cli.resolve(cli.VERBS["finetune"][0])
    return None


ALL_YAML = sorted(CONFIGS.rglob("*.yaml"))


def test_pretrain_recipes_and_demo_exist():
    names = {p.name for p in ALL_YAML}
    assert {"howto100m_vitb32_meanP.yaml", "howto100m_vitb32_seqTransf.yaml", "howto100m_vitb32_tdb_tab.yaml",
            "pretrain_tiny.yaml"} <= names


@pytest.mark.parametrize("path", ALL_YAML, ids=lambda p: str(p.relative_to(CONFIGS)))
def test_shipped_config_validates(path):
    data = yaml.safe_load(path.read_text())
    assert isinstance(data, dict) and data, f"{path} is empty"
    cls = _class_for(path)
    if cls is None:
        pytest.skip(f"no verb known for {path.relative_to(CONFIGS)}")
    # keys a recipe leaves to the command line (where the data lives) get placeholders; a benchmark's split is the
    # one of the first command its header gives
    placeholders = {"ShardConfig": {"videos": "/in/videos", "captions": "/in/caption.json", "out": "/out",
                                    "annotations": "/in/annotations"},
                    "FinetuneConfig": {"init": "ViT-B/32"}}
    extra = [f"{k}={v}" for k, v in placeholders.get(cls.__name__, {}).items() if k not in data]
    if cls.__name__ == "ShardConfig":
        extra += [a for a in (_header_commands(path)[:1] or [[]])[0] if a.startswith("split=")]
    cfg = load_config(cls, path, extra)
    if cls is PretrainConfig:
        from ptrain.engine import deepspeed_config

        ds = deepspeed_config(cfg.engine, world_size=8)
        assert ds["train_batch_size"] == cfg.engine.micro_batch_size * cfg.engine.grad_accum * 8
        assert cfg.model.max_words <= 77 and cfg.data.sources


def _header_commands(path: Path) -> list[list[str]]:
    """The ``ptrain shard`` commands of a config's header comment, as argument lists (after the config path)."""
    out = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        words = line[1:].split()
        if words[:2] == ["ptrain", "shard"] and len(words) > 2 and words[2].endswith(".yaml"):
            out.append(words[3:])
    return out


BENCHMARKS = {"msrvtt": 12, "msvd": 12, "lsmdc": 12, "activitynet": 64, "didemo": 64, "vatex": 12}


@pytest.mark.parametrize("bench", BENCHMARKS)
def test_benchmark_shard_configs_run_the_commands_of_the_finetune_recipes(bench):
    """configs/shard/<bench>.yaml opens with the shard commands of configs/finetune/base_<bench>.yaml (one per split);
    each validates with its split, and the config stores the recipe's frames at 1 fps, short side 224."""
    from sharding.config import ShardConfig

    path = CONFIGS / "shard" / f"{bench}.yaml"
    commands = _header_commands(path)
    base = CONFIGS / "finetune" / f"base_{bench}.yaml"
    assert commands and commands == _header_commands(base)
    assert f"plan.fps=2 plan.num_frames={2 * BENCHMARKS[bench]}" in path.read_text()  # how to store 2x frames
    finetune = yaml.safe_load(base.read_text())
    outs = {a.split("=", 1)[1] for cmd in commands for a in cmd if a.startswith("out=")}
    assert set(finetune["test"]) | set(finetune["data"]["sources"]) | set(finetune["data"]["eval_sources"]) <= outs
    for cmd in commands:
        args = [a.replace("=DIR", "=/in/dir") for a in cmd]
        cfg = load_config(ShardConfig, path, args)
        assert (cfg.source, cfg.split) == (bench, dict(a.split("=", 1) for a in cmd)["split"])
        assert (cfg.plan.num_frames, cfg.plan.fps, cfg.plan.sampling, cfg.plan.slice, cfg.frame_size) == \
            (BENCHMARKS[bench], 1.0, "fps", "uniform", 224)
    with pytest.raises(ConfigError, match=rf"split must be one of .* for source={bench}, got 'nope'"):
        load_config(ShardConfig, path, ["annotations=/a", "videos=/v", "out=/o", "split=nope"])


def test_recipes_use_the_seed_settings():
    for head in ("meanP", "seqTransf", "tdb_tab"):
        cfg = load_config(PretrainConfig, CONFIGS / "pretrain" / f"howto100m_vitb32_{head}.yaml")
        assert (cfg.model.num_frames, cfg.model.max_words, cfg.model.frame_size) == (12, 32, 224)
        assert cfg.optim.lr == 1e-4 and cfg.optim.betas == [0.9, 0.98] and cfg.engine.grad_clip == 1.0
        assert cfg.engine.precision == "bf16" and cfg.engine.zero_stage in (1, 2)
    tab = load_config(PretrainConfig, CONFIGS / "pretrain" / "howto100m_vitb32_tdb_tab.yaml")
    assert (tab.model.head, tab.model.tab_global, tab.model.tab_motion) == ("TAB", "TDB", "TAB_TDB")


def test_unknown_key_names_a_close_match():
    with pytest.raises(ConfigError, match=r"optim.lrr: unknown key \(from command line\); did you mean optim.lr\?"):
        load_config(PretrainConfig, None, ["optim.lrr=1e-4"])


def test_cross_section_checks_are_sentences():
    with pytest.raises(ConfigError, match="eval.every_steps is set but data.eval_sources is empty"):
        load_config(PretrainConfig, None, ["eval.every_steps=10"])
    with pytest.raises(ConfigError, match="zero_stage must be 0, 1, 2 or 3"):
        load_config(PretrainConfig, None, ["engine.zero_stage=5"])
    with pytest.raises(ConfigError, match="export is required"):
        load_config(EvalConfig, None, ["shards=[x]"])


def test_finetune_recipes_per_benchmark_and_head():
    """meanP, seqTransf and TDB+TAB for every benchmark, each with the paper's number (or why none) and its command,
    sharing one base file per benchmark; the papers' frames, words and rates."""
    from ptrain.configs import FinetuneConfig

    for bench, frames, words in (("msrvtt", 12, 32), ("msvd", 12, 32), ("lsmdc", 12, 32), ("activitynet", 64, 64),
                                 ("didemo", 64, 64), ("vatex", 12, 32)):
        for head in ("meanP", "seqTransf", "tdb_tab"):
            path = CONFIGS / "finetune" / f"{bench}_{head}.yaml"
            text = path.read_text()
            assert "# Paper (t2v): " in text and f"launch/finetune.sh configs/finetune/{bench}_{head}.yaml" in text
            assert f"include: base_{bench}.yaml" in text and len(text.splitlines()) < 20  # shared values live in the base
            cfg = load_config(FinetuneConfig, path, ["init=ViT-B/32"])
            assert (cfg.model.num_frames, cfg.model.max_words, cfg.benchmark) == (frames, words, bench)
            assert (cfg.optim.lr, cfg.optim.coef_lr, cfg.epochs) == (1e-4, 1e-3, 5)
            assert cfg.engine.micro_batch_size * (8 if frames == 64 else 4) == 128
            assert cfg.model.head == {"tdb_tab": "TAB"}.get(head, head)
