"""VideoTextModel on tiny CLIPs: shapes, masks, golden values, backward, parameter groups, FLOPs."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F

from ptrain.loss import build_loss
from ptrain.model import ModelConfig, build_model

HEADS = ["meanP", "seqLSTM", "seqTransf", "tightTransf", "TDB", "TAB"]
T, S = 4, 32  # frames per clip, frame size


def tiny(head: str, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cfg = ModelConfig(clip="tiny", head=head, num_frames=kw.pop("num_frames", T), frame_size=S, max_words=8,
                          cross_layers=2, tight_dropout=0.0, **kw)
        return build_model(cfg)


def loss_of(model, *inputs, groups=None):
    """The training loss of a forward (the step computes it from the model's features)."""
    return build_loss(model.cfg)(model(*inputs), groups)[0]


def arange_init(model) -> None:
    """Every parameter := a fixed hash of arange in [-1, 1) (the shader "sin-fract" hash; scaled by
    1/sqrt(fan-in); LayerNorm gains around 1), logit scale 10."""
    with torch.no_grad():
        for i, (name, p) in enumerate(sorted(model.named_parameters())):
            k = torch.arange(p.numel(), dtype=torch.float64)
            v = 2.0 * torch.frac(torch.abs(torch.sin(k * 12.9898 + i * 78.233)) * 43758.5453) - 1.0
            if p.dim() == 1 and name.endswith("weight") and ("ln" in name or "norm" in name):
                v = 1.0 + 0.1 * v
            else:
                v = v * 0.5 / math.sqrt(p.shape[-1] if p.dim() > 1 else 32)
            p.copy_(v.view_as(p).to(p.dtype))
        model.logit_scale.log_scale.fill_(math.log(10.0))


def inputs(batch=3):
    frames = ((torch.arange(batch * T * 3 * S * S) * 37) % 251).to(torch.uint8).view(batch, T, 3, S, S)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]])[:batch]
    ids = torch.tensor([[49406, 320, 1929, 49407, 0, 0, 0, 0], [49406, 320, 2368, 3207, 1615, 49407, 0, 0],
                        [49406, 1237, 49407, 0, 0, 0, 0, 0]])[:batch]
    attn = (ids > 0).long()
    return frames, mask, ids, attn


# Similarity of texts 0,1 (rows) x videos 0,1,2 (full, 2 real frames, 1 real frame) under arange_init.
# Computed once by this code; meanP is re-derived independently in test_meanp_matches_plain_clip.
GOLDEN = {
    "meanP": [[0.96583, 0.94979, 0.95798], [-0.53817, -0.56467, -0.55867]],
    "seqLSTM": [[1.01388, 0.98581, 0.98515], [-0.36677, -0.43313, -0.45928]],
    "seqTransf": [[1.38238, 1.26939, 1.27517], [0.05165, -0.0457, -0.05065]],
    "tightTransf": [[-0.04997, -0.04484, -0.03616], [-0.05469, -0.04877, -0.03957]],
    "TDB": [[0.79065, 0.73947, 0.55428], [-0.59988, -0.61636, -0.69441]],
    "TAB": [[0.32485, 0.23348, 0.09572], [-0.6414, -0.7059, -0.78162]],
}


def golden_similarity(head):
    torch.manual_seed(0)
    model = tiny(head).eval()
    arange_init(model)
    frames, mask, ids, attn = inputs()
    return model.similarity(model.encode_text(ids[:2], attn[:2]), model.encode_video(frames, mask))


@pytest.mark.parametrize("head", HEADS)
def test_golden_values(head):
    got = golden_similarity(head)
    want = torch.tensor(GOLDEN[head])
    torch.testing.assert_close(got, want, rtol=1e-4, atol=2e-5)


def test_meanp_matches_plain_clip():
    # meanP = cosine of the EOT text feature with the normalised mean of normalised CLIP image features.
    model = tiny("meanP").eval()
    arange_init(model)
    frames, mask, ids, attn = inputs()
    clip = model.clip
    x = (frames.float() / 255 - torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 1, 3, 1, 1)) / torch.tensor(
        [0.26862954, 0.26130258, 0.27577711]).view(1, 1, 3, 1, 1)
    with torch.no_grad():
        img = clip.visual_projection(clip.vision_model(pixel_values=x.flatten(0, 1)).pooler_output).view(3, T, -1)
        txt = clip.text_projection(clip.text_model(input_ids=ids[:2]).pooler_output)
    img = F.normalize(img, dim=-1)
    vid = torch.stack([F.normalize(img[b, : int(mask[b].sum())].mean(0), dim=0) for b in range(3)])
    want = 10.0 * F.normalize(txt, dim=-1) @ vid.t()
    torch.testing.assert_close(golden_similarity("meanP"), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(want, torch.tensor(GOLDEN["meanP"]), rtol=1e-4, atol=2e-5)


# Every head, every TDB difference transform, every TAB motion mode (and both TAB global branches).
VARIANTS = [(h, {}) for h in HEADS] + [
    ("TDB", {"tdb_proj": "raw"}),
    ("TDB", {"tdb_proj": "sigmoid_mlp"}),
    ("TAB", {"tab_motion": "none"}),
    ("TAB", {"tab_motion": "TAB"}),
    ("TAB", {"tab_motion": "TAB_TDB", "tdb_proj": "raw"}),
    ("TAB", {"tab_motion": "TAB_TDB", "tdb_proj": "sigmoid_mlp"}),
    ("TAB", {"tab_global": "seqTransf", "tab_motion": "none"}),
    ("TAB", {"tab_global": "seqTransf", "tab_motion": "TAB"}),
]


@pytest.mark.parametrize("head,kw", VARIANTS, ids=lambda v: v if isinstance(v, str) else "-".join(map(str, v.values())) or "default")
@pytest.mark.parametrize("linear_patch", ["2d", "3d"])
def test_forward_backward_reaches_every_parameter(head, kw, linear_patch):
    torch.manual_seed(0)
    model = tiny(head, linear_patch=linear_patch, **kw).train()
    frames, mask, ids, attn = inputs()
    loss, stats = build_loss(model.cfg)(model(frames, mask, ids, attn), torch.tensor([7, 8, 9]))
    assert loss.dim() == 0 and torch.isfinite(loss)
    assert all(not v.requires_grad for v in stats.values())
    if head == "TAB":
        assert {"loss_global", "loss_tab"} <= set(stats)
        torch.testing.assert_close(loss, 0.5 * stats["loss_global"] + 0.5 * stats["loss_tab"])
    loss.backward()
    # The cross encoder's final bias adds one constant to every logit of the B x B matrix, and the symmetric
    # cross-entropy is invariant to that shift, so its gradient is zero up to rounding (its sign and size are
    # whatever the machine's summation order leaves); every other parameter must get a real gradient.
    shift_invariant = {"head.cross.similarity_dense.bias"}
    for name in shift_invariant & {n for n, _ in model.named_parameters()}:
        grad = dict(model.named_parameters())[name].grad
        assert grad is None or float(grad.abs().max()) < 1e-6, (name, grad)
    dead = [n for n, p in model.named_parameters() if p.requires_grad and n not in shift_invariant
            and (p.grad is None or not p.grad.abs().sum() > 0)]
    assert dead == []
    groups = model.param_group_names()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(groups["clip"]) | set(groups["new"]) == trainable
    assert all(n.startswith(("clip.", "logit_scale.")) for n in groups["clip"])
    assert all(not n.startswith("clip.") for n in groups["new"])
    assert (len(groups["new"]) > 0) == (head != "meanP")


def perturb_3d_patch(model) -> None:
    """Give the central-frame-inflated 3D kernel non-zero outer taps (it then sees neighbouring frames)."""
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        w = model.clip.vision_model.embeddings.patch_embedding_3d.weight
        w.add_(0.05 * torch.randn(w.shape, generator=g))


@pytest.mark.parametrize("head", HEADS)
@pytest.mark.parametrize("linear_patch", ["2d", "3d"])
def test_padding_and_single_frame_masks(head, linear_patch):
    """Padded frames never change a clip's features: a 2-frame clip padded to 4 with garbage equals
    the same 2 frames alone, and a 1-frame clip equals a model run at num_frames=1. With a 3D patch
    too: padded frames are zeros in normalised space, like the conv's own temporal zero padding."""
    torch.manual_seed(0)
    model = tiny(head, linear_patch=linear_patch).eval()
    if linear_patch == "3d":
        perturb_3d_patch(model)
    frames, _, ids, attn = inputs()
    real = frames[:1, :2]
    garbage = torch.randint(0, 256, (1, 2, 3, S, S), dtype=torch.uint8)
    padded = torch.cat([real, garbage], dim=1)
    text = model.encode_text(ids[:2], attn[:2])
    alone = model.similarity(text, model.encode_video(real, torch.ones(1, 2, dtype=torch.long)))
    masked = model.similarity(text, model.encode_video(padded, torch.tensor([[1, 1, 0, 0]])))
    torch.testing.assert_close(masked, alone, rtol=1e-5, atol=1e-5)

    one = model.similarity(text, model.encode_video(frames[:1, :1], torch.ones(1, 1, dtype=torch.long)))
    one_padded = model.similarity(text, model.encode_video(frames[:1], torch.tensor([[1, 0, 0, 0]])))
    torch.testing.assert_close(one_padded, one, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("linear_patch", ["2d", "3d"])
def test_padded_frames_are_zero_in_normalised_space(linear_patch):
    """uint8 frames padded with black (our loader) and float frames padded with anything give what
    the references' loaders feed: normalised pixels with padded frames exactly 0. The caller's
    tensor is left alone."""
    torch.manual_seed(0)
    model = tiny("TDB", compat=True, linear_patch=linear_patch).eval()  # compat: a difference token sees a padded frame
    if linear_patch == "3d":
        perturb_3d_patch(model)
    frames, mask, ids, attn = inputs()
    frames[mask == 0] = 0  # black uint8 padding
    pixels = (frames.float() / 255 - model.pixel_mean) / model.pixel_std  # [B, T, 3, S, S]
    reference = pixels * mask[:, :, None, None, None]  # np.zeros, then the real normalised frames
    garbage = pixels.clone()
    garbage[mask == 0] = torch.randn_like(garbage[mask == 0])
    before = garbage.clone()
    with torch.no_grad():
        want = model.frame_features(reference)
        for given in (frames, garbage):
            torch.testing.assert_close(model.frame_features(given, mask), want, rtol=1e-5, atol=1e-6)
        # Without the mask a black uint8 frame is a black image, not the zeros the references feed.
        assert not torch.allclose(model.frame_features(frames)[mask == 0], want[mask == 0], atol=1e-3)
    assert torch.equal(garbage, before)
    text = model.encode_text(ids, attn)
    torch.testing.assert_close(model.similarity(text, model.encode_video(frames, mask)),
                               model.similarity(text, model.encode_video(reference, mask)), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="frame_mask"):
        model.frame_features(frames, mask[:, :2])


def test_num_frames_one_model_trains():
    model = tiny("TAB", num_frames=1)
    frames, _, ids, attn = inputs(2)
    loss = loss_of(model, frames[:, :1], torch.ones(2, 1, dtype=torch.long), ids, attn)
    loss.backward()
    assert torch.isfinite(loss)


def test_compat_mask_layout_changes_only_padded_batches():
    """compat=True reproduces CLIP2Video's head-major mask layout and TDB mask off-by-one: same
    numbers as compat=False without padding, different numbers with mixed padding in a batch."""
    torch.manual_seed(0)
    a = tiny("TAB").eval()
    b = tiny("TAB", compat=True).eval()
    b.load_state_dict(a.state_dict())
    frames, mask, ids, attn = inputs()
    full = torch.ones_like(mask)
    ta, tb = a.encode_text(ids, attn), b.encode_text(ids, attn)
    torch.testing.assert_close(a.encode_video(frames, full), b.encode_video(frames, full))
    assert not torch.allclose(a.similarity(ta, a.encode_video(frames, mask)), b.similarity(tb, b.encode_video(frames, mask)), atol=1e-4)


def test_tab_similarity_is_weighted_sum_of_global_and_alignment():
    torch.manual_seed(0)
    model = tiny("TAB", tab_weight=0.3).eval()
    frames, mask, ids, attn = inputs()
    t, v = model.encode_text(ids, attn), model.encode_video(frames, mask)
    d = t.shape[1] // 2
    scale = model.logit_scale()
    s_global = scale * (t[:, :d] / math.sqrt(0.3)) @ (v[:, :d] / math.sqrt(0.3)).t()
    s_tab = scale * (t[:, d:] / math.sqrt(0.7)) @ (v[:, d:] / math.sqrt(0.7)).t()
    torch.testing.assert_close(model.similarity(t, v), 0.3 * s_global + 0.7 * s_tab)
    # Each half is unit-norm (the two normalised embeddings).
    torch.testing.assert_close((t[:, :d] / math.sqrt(0.3)).norm(dim=-1), torch.ones(3))


def test_tight_similarity_matches_training_logits_and_chunks():
    torch.manual_seed(0)
    model = tiny("tightTransf").eval()
    frames, mask, ids, attn = inputs()
    t, v = model.encode_text(ids, attn), model.encode_video(frames, mask)
    assert v.shape == (3, T, 32)
    full = model.similarity(t, v)
    torch.testing.assert_close(model.similarity(t, v, pair_chunk=1), full)
    with torch.no_grad():
        direct = model.head(model.text_features(ids)[0], model.frame_features(frames), mask)
    torch.testing.assert_close(full, direct, rtol=1e-5, atol=1e-5)


def test_encode_text_accepts_strings():
    model = tiny("meanP").eval()
    ids, mask = model.tokenize(["a dog runs", "a cat"])
    assert ids.dtype == torch.long and ids.shape == (2, 8) and ids[0, 0] == 49406
    torch.testing.assert_close(model.encode_text(["a dog runs", "a cat"]), model.encode_text(ids, mask))


def test_bad_inputs_raise_clear_errors():
    model = tiny("meanP").eval()
    with pytest.raises(ValueError, match="frame_size"):
        model.encode_video(torch.zeros(1, T, 3, 48, 48, dtype=torch.uint8))
    with pytest.raises(ValueError, match="frame_size"):
        build_model(ModelConfig(clip="tiny", frame_size=30))
    with pytest.raises(ValueError, match="tab_global"):
        ModelConfig(head="TAB", tab_global="seqTransf", tab_motion="TAB_TDB")
    with pytest.raises(FileNotFoundError, match="neither a named size"):
        build_model(ModelConfig(clip="./no/such/dir", frame_size=32))


def test_logit_scale_is_1d_and_clamped():
    model = tiny("meanP", logit_scale_init=500.0)
    scale = model.logit_scale
    assert scale.log_scale.shape == (1,)
    assert float(scale().detach()) == pytest.approx(100.0)
    # Above the bound the clamp in forward passes no gradient: the parameter would stay stuck there.
    scale().backward()
    assert scale.log_scale.grad.item() == 0.0
    # So the trainer also clamps the parameter itself after each optimizer step.
    assert scale.clamp_() is scale
    assert scale.log_scale.item() == pytest.approx(math.log(100.0)) and scale.log_scale.requires_grad
    scale.log_scale.grad = None
    with torch.no_grad():
        scale.log_scale.fill_(math.log(20.0))
    scale.clamp_()
    assert scale.log_scale.item() == pytest.approx(math.log(20.0))  # below the bound: untouched
    scale().backward()
    assert scale.log_scale.grad.item() == pytest.approx(20.0)


@pytest.mark.parametrize("head", ["meanP", "seqTransf", "TAB"])
def test_flops_per_sample_matches_flop_counter(head):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    model = tiny(head).eval()
    frames, mask, ids, attn = inputs(1)
    counter = FlopCounterMode(display=False)
    # The math attention backend decomposes into matmuls the counter sees (the fused CPU kernel it skips).
    with counter, torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        model.encode_video(frames, mask)
        model.encode_text(ids, attn)
    counted = counter.get_total_flops()
    # The counter sees the same matmuls/convs/attention; it also counts TAB's centre assignment.
    assert model.flops_per_sample() == pytest.approx(counted, rel=0.02)


def test_named_sizes_build_without_download():
    from ptrain.model.clip import named_clip_config

    cfg = named_clip_config("ViT-B/32", 224)
    assert (cfg.vision_config.hidden_size, cfg.vision_config.patch_size, cfg.projection_dim) == (768, 32, 512)
    assert named_clip_config("ViT-L/14", 224).vision_config.num_hidden_layers == 24
    assert named_clip_config("ViT-B/16", 224).vision_config.patch_size == 16


def test_grad_checkpointing_gives_the_same_gradients():
    grads = []
    for ckpt in (False, True):
        torch.manual_seed(0)
        model = tiny("seqTransf", grad_checkpointing=ckpt).train()
        loss_of(model, *inputs()).backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-4, atol=1e-6)


def test_bf16_model_trains_and_encodes():
    model = tiny("TAB").to(torch.bfloat16)
    loss = loss_of(model, *inputs())
    loss.backward()
    assert torch.isfinite(loss) and model.clip.visual_projection.weight.grad.dtype == torch.bfloat16
    model.eval()
    frames, mask, ids, attn = inputs()
    assert model.similarity(model.encode_text(ids, attn), model.encode_video(frames, mask)).dtype == torch.float32
