"""Token masking (``model.mask_ratio``, ``ptrain.masking``): the kept tokens are the seed's, the class token and the
full-grid positions survive, ratio 0 is the unmasked model exactly, evaluation never masks, a resume (or another
world size) draws the same masks, FLOPs and MFU follow the kept tokens, and a masked ``ptrain pretrain`` resumes
exactly."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch

from data_fixtures import write_shards
from net import rank_env
from ptrain.loss import build_loss
from ptrain.masking import MASK_TAG, TokenMasker, build_token_masker
from ptrain.model import ModelConfig, build_model

T, S = 4, 32  # tiny CLIP: 4x4 grid of 8-pixel patches -> N = 16


def tiny(head="seqTransf", seed=0, **kw):
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return build_model(ModelConfig(clip="tiny", head=head, num_frames=T, frame_size=S, max_words=8,
                                       cross_layers=1, tight_dropout=0.0, **kw))


def inputs(B=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    frames = torch.randint(0, 256, (B, T, 3, S, S), dtype=torch.uint8, generator=g)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0], [1, 1, 0, 0]])[:B]
    ids = torch.randint(1, 1000, (B, 8), generator=g)
    ids[:, 0], ids[:, 5:] = 49406, 0
    ids[:, 4] = 49407
    return frames, mask, ids, (ids > 0).long()


def batch_of(index, frames=None):
    frames = frames if frames is not None else torch.zeros(len(index), T, 3, S, S, dtype=torch.uint8)
    return {"index": torch.tensor(index), "frames": frames, "keys": [f"k{i}" for i in index], "step": 0,
            "micro_step": 0}


# ---------------------------------------------------------------------------------------------- the draw


def test_kept_tokens_are_the_ones_the_seed_says():
    """Row b keeps the K positions with the lowest scores of default_rng([seed, index, tag]): re-derived here."""
    masker = TokenMasker(0.75, "frame", patches=16, kept=4, seed=7)
    keep = masker(batch_of([0, 5, 123456789]), step=0)
    assert keep.shape == (3, T, 4) and keep.dtype == torch.long
    for row, index in zip(keep, [0, 5, 123456789]):
        scores = np.random.default_rng([7, index, MASK_TAG]).random((T, 16))
        for t in range(T):
            want = sorted(np.argsort(scores[t])[:4].tolist())
            assert row[t].tolist() == want
    # a different sample, frame or seed draws a different set
    assert not torch.equal(keep[0], keep[1]) and not torch.equal(keep[0, 0], keep[0, 1])
    other = TokenMasker(0.75, "frame", patches=16, kept=4, seed=8)(batch_of([0, 5, 123456789]), step=0)
    assert not torch.equal(other, keep)


def test_tube_mode_shares_one_set_per_clip_and_the_count_is_flips():
    cfg = ModelConfig(clip="tiny", frame_size=S, num_frames=T, mask_ratio=0.5, mask_mode="tube")
    masker = build_token_masker(cfg, 16, seed=0, max_steps=10)
    keep = masker(batch_of([3, 4]), step=0)
    assert keep.shape == (2, 1, 8)  # one set per clip; the model broadcasts it over the frames
    assert all(len(set(r.tolist())) == 8 for r in keep[:, 0])  # distinct positions
    assert ModelConfig(mask_ratio=0.75).kept_patches(49) == 12 and ModelConfig(mask_ratio=0.5).kept_patches(49) == 24
    assert ModelConfig(mask_ratio=0.99).kept_patches(16) == 1  # never fewer than one patch
    assert build_token_masker(ModelConfig(), 16, seed=0, max_steps=10) is None  # ratio 0: no masker at all


def test_streamed_rows_without_a_position_are_seeded_by_step_and_key():
    masker = TokenMasker(0.5, "frame", patches=16, kept=8, seed=0)
    a = masker(batch_of([-1, -1]) | {"keys": ["a", "b"]}, 0)
    b = masker(batch_of([-1, -1]) | {"keys": ["a", "b"], "step": 1}, 1)
    assert not torch.equal(a[0], a[1]) and not torch.equal(a, b)
    assert torch.equal(a, masker(batch_of([-1, -1]) | {"keys": ["a", "b"]}, 0))


def test_unmasked_tail():
    cfg = ModelConfig(clip="tiny", frame_size=S, mask_ratio=0.5)
    masker = build_token_masker(cfg, 16, seed=0, max_steps=10, unmasked_tail_steps=3)
    assert [masker.ratio_at(s) for s in (0, 6, 7, 9)] == [0.5, 0.5, 0.0, 0.0]
    assert masker(batch_of([1]), 6) is not None and masker(batch_of([1]), 7) is None


# ---------------------------------------------------------------------------------------------- the model


@pytest.mark.parametrize("linear_patch", ["2d", "3d"])
def test_class_token_and_full_grid_positions_reach_the_encoder(linear_patch):
    """The encoder sees exactly [class token, the kept tokens] of the full-grid embeddings (positions added
    before the gather), for every frame, padded ones included."""
    model = tiny(linear_patch=linear_patch, mask_ratio=0.5).train()
    if linear_patch == "3d":  # outer temporal taps non-zero, so neighbouring (and padded) frames matter
        with torch.no_grad():
            model.clip.vision_model.embeddings.patch_embedding_3d.weight.normal_(0, 0.02)
    frames, mask, ids, attn = inputs()
    keep = build_token_masker(model.cfg, model.num_patches, seed=0, max_steps=1)(batch_of([0, 1, 2], frames), 0)
    seen = []
    hook = model.clip.vision_model.encoder.register_forward_pre_hook(
        lambda mod, args, kwargs: seen.append(kwargs["inputs_embeds"].detach()), with_kwargs=True)
    model(frames, mask, ids, attn, token_keep=keep)
    hook.remove()
    vm = model.clip.vision_model
    x = (frames.flatten(0, 1).float() / 255 - model.pixel_mean) / model.pixel_std
    x = torch.where(mask.reshape(-1, 1, 1, 1) != 0, x, torch.zeros(()))
    full = vm.embeddings(x, num_frames=T) if linear_patch == "3d" else vm.embeddings(x)  # [BT, 1+N, W]
    with torch.no_grad():
        full = vm.pre_layrnorm(full)
    got = seen[0]
    assert got.shape == (3 * T, 1 + 8, full.shape[-1])
    torch.testing.assert_close(got[:, 0], full[:, 0])  # the class token, always, first
    idx = keep.reshape(3 * T, 8) + 1
    torch.testing.assert_close(got[:, 1:], full[torch.arange(3 * T)[:, None], idx])


@pytest.mark.parametrize("head", ["meanP", "TDB", "TAB", "tightTransf"])
def test_ratio_zero_and_keeping_every_token_equal_the_unmasked_forward_exactly(head):
    plain, masked = tiny(head), tiny(head, mask_ratio=0.5)
    masked.load_state_dict(plain.state_dict())
    plain.train(), masked.train()
    x = inputs()
    assert build_token_masker(tiny(head).cfg, 16, seed=0, max_steps=1) is None  # ratio 0: no keep is passed
    want = plain(*x)
    every = torch.arange(16).expand(3, T, 16)
    for got in (masked(*x), masked(*x, token_keep=every)):
        assert got.keys() == want.keys()
        for k in want:
            assert torch.equal(got[k], want[k]), k


def test_masking_changes_the_training_forward_and_backward_runs():
    model = tiny("TDB", mask_ratio=0.5, reverse_negatives=True).train()
    x = inputs()
    keep = build_token_masker(model.cfg, 16, seed=0, max_steps=1)(batch_of([0, 1, 2]), 0)
    out = model(*x, token_keep=keep)
    assert not torch.allclose(out["video"], model(*x)["video"])
    loss, _ = build_loss(model.cfg)(out, None)
    loss.backward()
    assert model.clip.vision_model.embeddings.position_embedding.weight.grad.abs().sum() > 0
    # tube keep [B, 1, K] broadcasts over the frames
    tube = keep[:, :1]
    torch.testing.assert_close(model.frame_features(x[0], x[1], tube), model.frame_features(x[0], x[1], tube.expand(3, T, 8)))


def test_evaluation_never_masks():
    plain, masked = tiny("seqTransf"), tiny("seqTransf", mask_ratio=0.75, mask_mode="tube")
    masked.load_state_dict(plain.state_dict())
    plain.eval(), masked.eval()
    frames, mask, ids, attn = inputs()
    assert torch.equal(masked.encode_video(frames, mask), plain.encode_video(frames, mask))
    assert torch.equal(masked.encode_text(ids, attn), plain.encode_text(ids, attn))
    keep = torch.arange(4).expand(3, T, 4)
    with pytest.raises(ValueError, match="training only"):
        masked(frames, mask, ids, attn, token_keep=keep)


@pytest.mark.parametrize("ratio", [0.5, 0.75])
def test_flops_follow_the_kept_tokens(ratio):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    model = tiny("meanP", mask_ratio=ratio).train()
    frames, mask, ids, attn = inputs(1)
    keep = build_token_masker(model.cfg, 16, seed=0, max_steps=1)(batch_of([0], frames), 0)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        model(frames, mask, ids, attn, token_keep=keep)
    assert model.flops_per_sample() == pytest.approx(counter.get_total_flops(), rel=0.02)
    assert model.flops_per_sample() == model.flops_per_sample(mask_ratio=ratio)
    assert model.flops_per_sample(mask_ratio=0.75) < model.flops_per_sample(mask_ratio=0.5) < \
        model.flops_per_sample(mask_ratio=0)


def test_vit_b32_flops_at_half_and_three_quarters():
    """ViT-B/32, 12 frames (analytic, no model built twice): the vision transformer work falls with the tokens."""
    model = build_model(ModelConfig(clip="ViT-B/32", head="meanP", num_frames=12, frame_size=224))
    full, half, quarter = (model.flops_per_sample(mask_ratio=r) for r in (0, 0.5, 0.75))
    assert full / half > 1.85 and full / quarter > 3.2


# ---------------------------------------------------------------------------------------------- resume


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("mask_shards")
    write_shards(root, num_shards=3, samples_per_shard=8, frames=(3, 4), size=(32, 40))
    return root


def _loader(shards, **kw):
    from ptrain.data import DataConfig, build_train_loader

    return build_train_loader(DataConfig(sources=[str(shards)], num_workers=0), num_frames=T, frame_size=S,
                              max_words=8, **kw)


def test_resume_and_another_world_size_draw_the_same_masks(shards):
    """The masks of step 3 from an uninterrupted loader, a fresh loader + masker started at step 3 (a resume),
    and two ranks' loaders at step 3 (another world size, same global batch) are the same, row for row."""
    cfg = ModelConfig(clip="tiny", frame_size=S, num_frames=T, mask_ratio=0.5)

    def masks_at(loader, step, masker=None):
        masker = masker or build_token_masker(cfg, 16, seed=5, max_steps=10)
        it = iter(loader)
        while True:
            batch = next(it)
            if batch["step"] == step:
                return batch["index"], masker(batch, step)

    index, want = masks_at(_loader(shards, micro_batch_size=4, seed=5), 3)
    index2, resumed = masks_at(_loader(shards, micro_batch_size=4, seed=5, start_step=3), 3)
    assert torch.equal(index, index2) and torch.equal(resumed, want)
    parts = [masks_at(_loader(shards, micro_batch_size=2, seed=5, rank=r, world_size=2), 3) for r in range(2)]
    assert torch.equal(torch.cat([p[0] for p in parts]), index)
    assert torch.equal(torch.cat([p[1] for p in parts]), want)


def _rows(run):
    return {r["step"]: r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
            if r["kind"] == "train"}


def test_masked_pretrain_resumes_exactly_and_mfu_counts_the_kept_tokens(shards, tmp_path):
    """6 steps at mask 0.5 with a 2-step unmasked tail, checkpoints every 2; a second run resumed from step 2
    logs the same losses for steps 3-6 (the same masks were drawn). MFU per step uses the masked FLOPs, then
    the unmasked ones in the tail."""
    run = tmp_path / "run"
    common = ["max_steps=6", "model.clip=tiny", "model.head=seqTransf", f"model.num_frames={T}",
              f"model.frame_size={S}", "model.max_words=8", "model.cross_layers=1", "model.mask_ratio=0.5",
              f"data.sources=[{shards}]", "data.num_workers=0", "engine.zero_stage=2", "engine.precision=fp32",
              "engine.micro_batch_size=4", "engine.peak_tflops=1", "checkpoint.every_steps=2",
              "checkpoint.keep_last=5", "log.every_steps=1", "log.tensorboard=false", "optim.lr=1e-3",
              "optim.coef_lr=1", "optim.unmasked_tail_steps=2", "seed=3"]
    proc = subprocess.run([sys.executable, "-m", "ptrain", "pretrain", f"run_dir={run}", *common], env=rank_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "token masking: ratio 0.5 (frame), 8 of 16 patch tokens per frame kept" in proc.stderr
    assert "steps 5-6 train on every token" in proc.stderr
    full = _rows(run)

    model = tiny("seqTransf", mask_ratio=0.5)
    masked, unmasked = model.flops_per_sample(), model.flops_per_sample(mask_ratio=0)
    for step, row in full.items():  # mfu = samples/s x 3 x flops / peak (1 TFLOP/s), one step per window
        flops = row["mfu"] * 1e12 / (3 * row["samples_per_s"])
        assert flops == pytest.approx(masked if step <= 4 else unmasked, rel=1e-6), step

    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(run / "checkpoints" / "step_00000002", resumed / "checkpoints" / "step_00000002")
    proc = subprocess.run([sys.executable, "-m", "ptrain", "pretrain", f"run_dir={resumed}", *common], env=rank_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    again = _rows(resumed)
    assert sorted(again) == [3, 4, 5, 6]
    assert [again[s]["loss"] for s in (3, 4, 5, 6)] == pytest.approx([full[s]["loss"] for s in (3, 4, 5, 6)],
                                                                      rel=1e-6, abs=1e-7)
