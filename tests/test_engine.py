"""ptrain.engine (DeepSpeed config derivation, the Engine), ptrain.optim (parameter groups, the schedule),
ptrain.model.freeze, and the world-size-free state round trip on a real (single-process, CPU/gloo) DeepSpeed engine."""

import math
import os

import pytest
import torch

from ptrain import optim as O
from ptrain.configs import EngineConfig, OptimConfig
from ptrain.loss import build_loss
from ptrain.model import ModelConfig
from ptrain.model.freeze import freeze_clip_layers

os.environ.setdefault("DS_ACCELERATOR", "cpu")
E = pytest.importorskip("ptrain.engine")

TINY = ModelConfig(clip="tiny", head="seqTransf", num_frames=3, frame_size=32, max_words=8, cross_layers=1)


def tiny_model(seed=0):
    import warnings

    from ptrain.model import build_model

    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "head modules keep a random init": expected for tiny CLIP
        return build_model(TINY)


# ---------------------------------------------------------------------------------------------- config


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
@pytest.mark.parametrize("precision", ["bf16", "fp16", "fp32"])
def test_deepspeed_config_is_derived_from_the_typed_config(stage, precision):
    cfg = EngineConfig(zero_stage=stage, precision=precision, micro_batch_size=8, grad_accum=4, grad_clip=0.5)
    ds = E.deepspeed_config(cfg, world_size=16)
    assert ds["train_batch_size"] == 8 * 4 * 16
    assert ds["train_micro_batch_size_per_gpu"] == 8 and ds["gradient_accumulation_steps"] == 4
    assert ds["gradient_clipping"] == 0.5
    assert ds["zero_optimization"]["stage"] == stage
    assert ds["bf16"]["enabled"] == (precision == "bf16") and ds["fp16"]["enabled"] == (precision == "fp16")
    # gloo cannot all-reduce bf16: on CPU half-precision runs reduce in fp32
    assert ds.get("communication_data_type") == ("fp32" if precision != "fp32" else None)
    if precision == "bf16" and stage == 1:
        assert ds["data_types"] == {"grad_accum_dtype": "fp32"}
    else:
        assert "data_types" not in ds


def test_describe_counts_negatives_without_accumulation():
    ds = E.deepspeed_config(EngineConfig(micro_batch_size=32, grad_accum=4), world_size=8)
    text = E.describe(ds, 8, 10_000_000, 9_000_000, False)
    assert "global batch 1024 = micro 32 x ranks 8 x accumulation 4" in text
    assert "negatives per query 255" in text


def test_engine_config_rejects_bad_values():
    with pytest.raises(ValueError, match="zero_stage"):
        EngineConfig(zero_stage=4)
    with pytest.raises(ValueError, match="micro_batch_size"):
        EngineConfig(micro_batch_size=0)


# ---------------------------------------------------------------------------------------------- schedule


def test_lr_schedule_is_warmup_then_cosine():
    cfg = OptimConfig(warmup_steps=10, min_lr_ratio=0.1)
    f = [O.lr_multiplier(s, cfg, 110) for s in range(110)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert all(a < b for a, b in zip(f[:10], f[1:10]))  # rising warmup
    assert f[10] == pytest.approx(1.0)
    assert f[60] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert all(a >= b for a, b in zip(f[10:], f[11:]))  # monotone decay
    assert O.lr_multiplier(110, cfg, 110) == pytest.approx(0.1)
    assert O.warmup_steps(OptimConfig(warmup_fraction=0.1), 1000) == 100
    assert O.lr_multiplier(500, OptimConfig(warmup_steps=0, schedule="constant"), 1000) == 1.0


# ---------------------------------------------------------------------------------------------- groups


def test_param_groups_split_clip_new_and_no_decay():
    model = tiny_model()
    groups = {g["name"]: g for g in O.param_groups(model, OptimConfig(lr=1e-4, coef_lr=1e-3, weight_decay=0.2))}
    assert set(groups) == {"clip_decay", "clip_no_decay", "new_decay", "new_no_decay"}
    assert groups["clip_decay"]["lr"] == pytest.approx(1e-7) and groups["new_decay"]["lr"] == pytest.approx(1e-4)
    assert groups["clip_no_decay"]["weight_decay"] == 0.0 and groups["new_decay"]["weight_decay"] == 0.2
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay = {names[id(p)] for g in ("clip_no_decay", "new_no_decay") for p in groups[g]["params"]}
    decay = {names[id(p)] for g in ("clip_decay", "new_decay") for p in groups[g]["params"]}
    assert "logit_scale.log_scale" in no_decay
    assert "clip.text_model.embeddings.token_embedding.weight" in no_decay
    assert "clip.vision_model.embeddings.position_embedding.weight" in no_decay
    assert "head.frame_position_embeddings.weight" in no_decay
    assert any(n.endswith("layer_norm1.weight") for n in no_decay) and all(not n.endswith(".bias") for n in decay)
    assert "clip.vision_model.embeddings.patch_embedding.weight" in decay  # a conv kernel, decayed
    assert "clip.visual_projection.weight" in decay
    total = sum(len(g["params"]) for g in groups.values())
    assert total == sum(1 for p in model.parameters() if p.requires_grad)


def test_freeze_layer_num_follows_clip4clip():
    model = tiny_model()
    assert freeze_clip_layers(model, -1) == []
    frozen = set(freeze_clip_layers(model, 1))
    assert "clip.vision_model.embeddings.patch_embedding.weight" in frozen
    assert "clip.text_model.embeddings.token_embedding.weight" in frozen
    assert "clip.vision_model.pre_layrnorm.weight" in frozen
    assert any(".encoder.layers.0." in n for n in frozen) and not any(".encoder.layers.1." in n for n in frozen)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {"clip.text_model.final_layer_norm.weight", "clip.vision_model.post_layernorm.weight",
            "clip.visual_projection.weight", "logit_scale.log_scale"} <= trainable
    assert not any(n.startswith("head.") for n in frozen)


# ---------------------------------------------------------------------------------------------- engine


def _batch(seed, B=4):
    g = torch.Generator().manual_seed(seed)
    frames = torch.randint(0, 256, (B, 3, 3, 32, 32), dtype=torch.uint8, generator=g)
    ids = torch.randint(1, 1000, (B, 8), generator=g)
    ids[:, 0], ids[:, -1] = 49406, 49407
    return frames, torch.ones(B, 3, dtype=torch.long), ids, torch.ones(B, 8, dtype=torch.long), torch.arange(B)


def _train(engine, steps, first=0):
    losses, loss_fn = [], build_loss(TINY)
    for s in range(first, first + steps):
        *inputs, groups = _batch(s)
        loss, _ = loss_fn(engine(*inputs), groups)
        engine.backward(loss)
        engine.step()
        losses.append(float(loss.detach()))
    return losses


def _engine(model, optim: OptimConfig, cfg: EngineConfig):
    return E.Engine(model, O.build_optimizer(model, optim), cfg)


def test_full_state_round_trip_across_zero_stages(world_of_one):
    """Train at ZeRO-2, gather full fp32 weights + Adam moments, scatter them into a fresh ZeRO-3 and a
    ZeRO-0 engine: the next steps' losses equal the uninterrupted ZeRO-2 run's."""
    optim = OptimConfig(lr=3e-3, coef_lr=1.0, warmup_steps=0)
    ref = _engine(tiny_model(), optim, EngineConfig(zero_stage=2, precision="fp32", micro_batch_size=4))
    _train(ref, 3)
    weights, moments = ref.gather_full_state()
    steps_done = ref.optimizer_step_count()
    assert steps_done == 3
    assert set(k.split("/", 1)[0] for k in moments) == {"exp_avg", "exp_avg_sq"}
    assert all(v.dtype == torch.float32 for v in weights.values())
    expected = _train(ref, 3, first=3)
    for stage in (3, 0):
        other = _engine(tiny_model(seed=123), optim, EngineConfig(zero_stage=stage, precision="fp32", micro_batch_size=4))
        other.load_full_state(weights, moments, steps_done)
        got = _train(other, 3, first=3)
        assert got == pytest.approx(expected, rel=1e-5, abs=1e-6), f"ZeRO-{stage}"


def test_set_lr_reaches_the_optimizer(world_of_one):
    engine = _engine(tiny_model(), OptimConfig(lr=1e-3, coef_lr=0.1), EngineConfig(zero_stage=1, precision="fp32", micro_batch_size=4))
    lrs = O.set_lr(engine.optimizer, 0.5)
    assert lrs["new_decay"] == pytest.approx(5e-4) and lrs["clip_decay"] == pytest.approx(5e-5)
    assert sorted(g["lr"] for g in engine.optimizer.param_groups) == sorted(lrs.values())
