"""OpenAI -> HF conversion and CLIP4Clip / CLIP2Video import, checked against reference forwards
re-derived here from the references' math (functional code on the raw reference-layout state dict,
nn.MultiheadAttention's own kernel, LND layout, 3-D [B*H, N, N] masks), never against our modules."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

import ptrain
from ptrain.cli import main as cli_main
from ptrain.model.clip import build_clip, clip_from_hf_state, hf_to_openai, openai_to_hf
from ptrain.model.config import ModelConfig
from ptrain.model.convert import import_reference, reference_state_dict
from ptrain.model.video_text import CLIP_MEAN, CLIP_STD, VideoTextModel

W, LAYERS, PATCH, IMAGE, VOCAB, T = 128, 2, 8, 32, 1000, 4  # width 128 -> 2 heads (width // 64)
HEADS = W // 64


# ----------------------------------------------------------------------------------------------
# a tiny OpenAI-layout CLIP and its reference forward


def openai_state_dict(seed=0, width=W, dim=W):
    g = torch.Generator().manual_seed(seed)

    def r(*shape, std=0.02):
        return torch.randn(*shape, generator=g) * std

    sd = {
        "visual.conv1.weight": r(width, 3, PATCH, PATCH, std=0.05),
        "visual.class_embedding": r(width, std=0.1),
        "visual.positional_embedding": r((IMAGE // PATCH) ** 2 + 1, width, std=0.1),
        "visual.proj": r(width, dim, std=width**-0.5),
        "token_embedding.weight": r(VOCAB, width, std=0.1),
        "positional_embedding": r(77, width, std=0.05),
        "text_projection": r(width, dim, std=width**-0.5),
        "logit_scale": torch.tensor(math.log(1 / 0.07)),
    }
    for ln in ("visual.ln_pre", "visual.ln_post", "ln_final"):
        sd[f"{ln}.weight"], sd[f"{ln}.bias"] = 1 + r(width, std=0.1), r(width, std=0.1)
    for tower in ("visual.transformer", "transformer"):
        for i in range(LAYERS):
            p = f"{tower}.resblocks.{i}."
            sd[p + "attn.in_proj_weight"], sd[p + "attn.in_proj_bias"] = r(3 * width, width, std=width**-0.5), r(3 * width)
            sd[p + "attn.out_proj.weight"], sd[p + "attn.out_proj.bias"] = r(width, width, std=width**-0.5), r(width)
            sd[p + "mlp.c_fc.weight"], sd[p + "mlp.c_fc.bias"] = r(4 * width, width, std=width**-0.5), r(4 * width)
            sd[p + "mlp.c_proj.weight"], sd[p + "mlp.c_proj.bias"] = r(width, 4 * width, std=(4 * width) ** -0.5), r(width)
            for ln in ("ln_1", "ln_2"):
                sd[p + f"{ln}.weight"], sd[p + f"{ln}.bias"] = 1 + r(width, std=0.1), r(width, std=0.1)
    return sd


def ref_ln(x, sd, p, eps=1e-5):
    return F.layer_norm(x, x.shape[-1:], sd[p + ".weight"], sd[p + ".bias"], eps)


def ref_block(x_LND, sd, p, heads, mask=None, eps=1e-5):
    """OpenAI / CLIP4Clip ResidualAttentionBlock on LND input with nn.MultiheadAttention's kernel."""
    h = ref_ln(x_LND, sd, p + "ln_1", eps)
    a = F.multi_head_attention_forward(
        h, h, h, h.shape[-1], heads, sd[p + "attn.in_proj_weight"], sd[p + "attn.in_proj_bias"], None, None, False,
        0.0, sd[p + "attn.out_proj.weight"], sd[p + "attn.out_proj.bias"], training=False, need_weights=False, attn_mask=mask,
    )[0]
    x = x_LND + a
    h = F.linear(ref_ln(x, sd, p + "ln_2", eps), sd[p + "mlp.c_fc.weight"], sd[p + "mlp.c_fc.bias"])
    return x + F.linear(h * torch.sigmoid(1.702 * h), sd[p + "mlp.c_proj.weight"], sd[p + "mlp.c_proj.bias"])


def ref_encode_image(sd, x_NCHW, heads=HEADS, video_frames=None):
    width = sd["visual.conv1.weight"].shape[0]
    if "visual.conv2.weight" in sd:  # CLIP4Clip linear_patch=3d
        N, C, H, Wd = x_NCHW.shape
        x3 = x_NCHW.reshape(-1, video_frames, C, H, Wd).permute(0, 2, 1, 3, 4)
        y = F.conv3d(x3, sd["visual.conv2.weight"], stride=(1, PATCH, PATCH), padding=(1, 0, 0))
        y = y.permute(0, 2, 1, 3, 4).reshape(N, width, IMAGE // PATCH, IMAGE // PATCH)
    else:
        y = F.conv2d(x_NCHW, sd["visual.conv1.weight"], stride=PATCH)
    y = y.reshape(y.shape[0], width, -1).permute(0, 2, 1)
    cls = sd["visual.class_embedding"] + torch.zeros(y.shape[0], 1, width)
    y = ref_ln(torch.cat([cls, y], dim=1) + sd["visual.positional_embedding"], sd, "visual.ln_pre").permute(1, 0, 2)
    for i in range(LAYERS):
        y = ref_block(y, sd, f"visual.transformer.resblocks.{i}.", heads)
    return (ref_ln(y.permute(1, 0, 2), sd, "visual.ln_post") @ sd["visual.proj"])[:, 0]


def ref_encode_text(sd, ids, heads=HEADS):
    """-> (EOT feature [B, D], every token's projected state [B, L, D]) like CLIP2Video's return_hidden."""
    L = ids.shape[1]
    x = (sd["token_embedding.weight"][ids] + sd["positional_embedding"][:L]).permute(1, 0, 2)
    causal = torch.full((L, L), float("-inf")).triu_(1)
    for i in range(LAYERS):
        x = ref_block(x, sd, f"transformer.resblocks.{i}.", heads, causal)
    hidden = ref_ln(x.permute(1, 0, 2), sd, "ln_final") @ sd["text_projection"]
    return hidden[torch.arange(ids.shape[0]), ids.argmax(dim=-1)], hidden


def normalise(frames_uint8):
    mean, std = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    return (frames_uint8.float() / 255 - mean) / std


def _ids():
    eot = VOCAB - 1  # the highest id marks EOT, as in CLIP
    return torch.tensor([[eot - 1, 17, 256, 3, eot, 0, 0, 0], [eot - 1, 400, eot, 0, 0, 0, 0, 0], [eot - 1, 5, 6, 7, 8, 9, 10, eot]])


def _frames(batch=3, seed=1, zero_pad=None):
    """Random uint8 frames; ``zero_pad`` (a mask): padded frames black (uint8 0), as our loader pads."""
    g = torch.Generator().manual_seed(seed)
    frames = torch.randint(0, 256, (batch, T, 3, IMAGE, IMAGE), dtype=torch.uint8, generator=g)
    if zero_pad is not None:
        frames[zero_pad == 0] = 0
    return frames


# ----------------------------------------------------------------------------------------------
# OpenAI -> HF


def _check_clip_matches_reference(model_clip, sd):
    frames = _frames(1)[0]
    ids = _ids()
    with torch.no_grad():
        vm = model_clip.vision_model
        ours_img = model_clip.visual_projection(vm(pixel_values=normalise(frames)).pooler_output)
        h = model_clip.text_model(input_ids=ids).last_hidden_state
        ours_txt = model_clip.text_projection(h[torch.arange(3), ids.argmax(-1)])
    torch.testing.assert_close(ours_img, ref_encode_image(sd, normalise(frames)), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ours_txt, ref_encode_text(sd, ids)[0], rtol=1e-4, atol=1e-5)


def test_openai_plain_state_dict_converts_exactly(tmp_path):
    sd = openai_state_dict()
    torch.save(sd, tmp_path / "tiny-openai.pt")
    clip, scale = build_clip(str(tmp_path / "tiny-openai.pt"), IMAGE)
    assert scale == pytest.approx(1 / 0.07, rel=1e-6)
    cfg = clip.config
    assert (cfg.vision_config.hidden_size, cfg.vision_config.num_hidden_layers, cfg.vision_config.patch_size) == (W, LAYERS, PATCH)
    assert (cfg.text_config.num_attention_heads, cfg.text_config.vocab_size, cfg.projection_dim) == (HEADS, VOCAB, W)
    _check_clip_matches_reference(clip, sd)
    # The inverse mapping restores every tensor bit for bit.
    back = hf_to_openai(openai_to_hf(sd)[1])
    assert set(back) == set(sd) and all(torch.equal(back[k], sd[k]) for k in sd)


def test_openai_torchscript_archive_converts_exactly(tmp_path):
    sd = openai_state_dict(seed=2)

    class Node(torch.nn.Module):
        pass

    class Archive(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x

    root = Archive()
    for key, value in sd.items():
        *path, leaf = key.split(".")
        node = root
        for part in path:
            if not hasattr(node, part):
                node.add_module(part, Node())
            node = getattr(node, part)
        node.register_parameter(leaf, torch.nn.Parameter(value.half() if value.dim() >= 2 else value, requires_grad=False))
    for name in ("input_resolution", "context_length", "vocab_size"):  # scalars OpenAI's archives carry
        root.register_buffer(name, torch.tensor(7))
    torch.jit.save(torch.jit.script(root), str(tmp_path / "ViT-tiny.pt"))
    clip, _ = build_clip(str(tmp_path / "ViT-tiny.pt"), IMAGE)
    _check_clip_matches_reference(clip, {k: (v.half().float() if v.dim() >= 2 else v) for k, v in sd.items()})


def test_openai_checkpoint_errors_are_clear(tmp_path):
    sd = openai_state_dict()
    del sd["visual.conv1.weight"]
    torch.save(sd, tmp_path / "broken.pt")
    with pytest.raises(ValueError, match="visual.conv1.weight"):
        build_clip(str(tmp_path / "broken.pt"), IMAGE)
    sd = openai_state_dict()
    torch.save(sd, tmp_path / "ok.pt")
    with pytest.raises(ValueError, match="frame_size=64"):
        build_clip(str(tmp_path / "ok.pt"), 64)


# ----------------------------------------------------------------------------------------------
# CLIP4Clip / CLIP2Video reference forwards (re-derived from their modeling.py)


def ref_transformer(x_BND, sd, prefix, layers, mask_BN, head_major):
    """module_cross.Transformer: additive -1e6 key mask [B,N,N]; CLIP4Clip HEAD expands it per head
    with repeat_interleave, CLIP2Video with repeat (head-major)."""
    N = x_BND.shape[1]
    m = ((1.0 - mask_BN.float().unsqueeze(1)) * -1000000.0).expand(-1, N, -1)
    m = m.repeat(HEADS, 1, 1) if head_major else m.repeat_interleave(HEADS, dim=0)
    x = x_BND.permute(1, 0, 2)
    for i in range(layers):
        x = ref_block(x, sd, f"{prefix}.resblocks.{i}.", HEADS, m, eps=1e-12)
    return x.permute(1, 0, 2)


def ref_pool(v_BTD, mask_BT):
    v = v_BTD / v_BTD.norm(dim=-1, keepdim=True)
    m = mask_BT.float().unsqueeze(-1)
    s = m.sum(dim=1)
    s[s == 0.0] = 1.0
    v = (v * m).sum(dim=1) / s
    return v / v.norm(dim=-1, keepdim=True)


def ref_features(sd, frames, ids, mask):
    """The references' loaders (``_get_rawvideo``) start from np.zeros and fill the real frames with
    normalised pixels: a padded frame is 0 in normalised space whatever it held."""
    clip_sd = {k[5:]: v.float() for k, v in sd.items() if k.startswith("clip.")}
    B = frames.shape[0]
    pixels = normalise(frames.flatten(0, 1)) * mask.reshape(B * T, 1, 1, 1).float()
    vis = ref_encode_image(clip_sd, pixels, video_frames=T).view(B, T, -1)
    seq, hidden = ref_encode_text(clip_sd, ids)
    return clip_sd, vis, seq, hidden


def ref_clip4clip(sd, head, frames, mask, ids, layers=2):
    clip_sd, vis, seq, _ = ref_features(sd, frames, ids, mask)
    if head == "tightTransf":
        Nt, Nv = seq.shape[0], vis.shape[0]
        text_l = seq.unsqueeze(1).unsqueeze(1).repeat(1, Nv, 1, 1).view(-1, 1, seq.shape[-1])
        vis_r = vis.unsqueeze(0).repeat(Nt, 1, 1, 1).view(-1, T, vis.shape[-1])
        concat_mask = torch.cat([torch.ones(Nt * Nv, 1), mask.unsqueeze(0).repeat(Nt, 1, 1).view(-1, T).float()], dim=1)
        x = torch.cat([text_l, vis_r], dim=1) + sd["cross.embeddings.position_embeddings.weight"][: 1 + T]
        x = ref_transformer(x, sd, "cross.transformer", layers, concat_mask, head_major=False)
        pooled = F.linear(ref_ln(x, sd, "cross.pooler.ln_pool", 1e-12)[:, 0], sd["cross.pooler.dense.weight"], sd["cross.pooler.dense.bias"])
        pooled = pooled * torch.sigmoid(1.702 * pooled)
        return F.linear(pooled, sd["similarity_dense.weight"], sd["similarity_dense.bias"]).view(Nt, Nv)
    v = vis
    if head == "seqLSTM":
        lstm = torch.nn.LSTM(v.shape[-1], v.shape[-1], batch_first=True)
        lstm.load_state_dict({k[len("lstm_visual."):]: t for k, t in sd.items() if k.startswith("lstm_visual.")})
        packed = torch.nn.utils.rnn.pack_padded_sequence(v, mask.sum(-1), batch_first=True, enforce_sorted=False)
        out, _ = torch.nn.utils.rnn.pad_packed_sequence(lstm(packed)[0], batch_first=True)
        v = torch.cat([out, vis[:, out.shape[1]:]], dim=1) + vis
    elif head == "seqTransf":
        x = v + sd["frame_position_embeddings.weight"][:T]
        v = ref_transformer(x, sd, "transformerClip", layers, mask, head_major=False) + vis
    t = seq / seq.norm(dim=-1, keepdim=True)
    return clip_sd["logit_scale"].exp() * t @ ref_pool(v, mask).t()


def ref_clip2video(sd, frames, mask, ids, attn, *, tdb, proj, tab, motion, weight, layers=2):
    clip_sd, vis, seq, hidden = ref_features(sd, frames, ids, mask)
    P = sd.get("frame_position_embeddings.weight")  # sim_type=meanP has none

    def tdb_block(v, m):  # temporal_difference_block, index gather included
        B, n, D = v.shape
        pos = P[:n].expand(B, n, D)
        E = sd["type_position_embeddings.weight"]
        dif = v[:, 1:] - v[:, :-1]
        lnorm = lambda x: F.layer_norm(x, (D,), sd["trans_layernorm.weight"], sd["trans_layernorm.bias"], 1e-5)  # noqa: E731
        if proj == "sigmoid_mlp":
            dif = 2 * torch.sigmoid(lnorm(dif @ sd["frame2t_projection"])) - 1
        elif proj == "sigmoid_selfA":
            dif = ref_transformer(dif + pos[:, 1:], sd, "frame2t_attention", 1, m[:, 1:], head_major=True)
            dif = 2 * torch.sigmoid(lnorm(dif)) - 1
        middle = torch.cat([v, dif], 1)
        idx = [j for i in range(n - 1) for j in (i, n + i)] + [n - 1]
        return (middle[:, idx], torch.cat([pos, pos], 1)[:, idx],
                torch.cat([E[1].expand(B, n, D), E[0].expand(B, n, D)], 1)[:, idx], torch.cat([m, m], 1)[:, idx])

    if tdb:
        x, pos, typ, m2 = tdb_block(vis, mask)
        y = ref_transformer(x + pos + typ, sd, "transformerClip", layers, m2, head_major=True)[:, 0::2] + vis
    elif P is None:  # sim_type=meanP: _similarity pools the frame features as they are
        y = vis
    else:
        y = ref_transformer(vis + P[:T], sd, "transformerClip", layers, mask, head_major=True) + vis
    t = seq / seq.norm(dim=-1, keepdim=True)
    scale = clip_sd["logit_scale"].exp()
    s_global = scale * t @ ref_pool(y, mask).t()
    if not tab:
        return s_global

    def aggregate(z, m):  # get_TAB_embedding
        sw = torch.softmax(z @ sd["weight_center"].t(), 2)
        ce = (sw.unsqueeze(3) * (z.unsqueeze(2) - sd["emb_center"]) * m[:, :, None, None]).sum(1)
        ce = (ce / ce.norm(dim=-1, keepdim=True)).mean(1)
        return ce / ce.norm(dim=-1, keepdim=True)

    tokens, tmask = vis, mask.float()
    if motion != "none":
        large, lmask = vis[:, 0::2], mask[:, 0::2]
        if motion == "TAB_TDB":
            x, pos, typ, m2 = tdb_block(large, lmask)
            z = ref_transformer(x + pos + typ, sd, "actionClip", 1, m2, head_major=True)[:, 0::2]
        else:
            z = ref_transformer(large + P[: large.shape[1]], sd, "actionClip", 1, lmask, head_major=True)
        tokens, tmask = torch.cat([vis, z + large], 1), torch.cat([mask, lmask], 1).float()
    text_mask = attn.float().clone()
    text_mask[:, 0] = 0.0
    s_tab = scale * aggregate(hidden, text_mask) @ aggregate(tokens, tmask).t()
    return weight * s_global + (1 - weight) * s_tab


# ----------------------------------------------------------------------------------------------
# round trips


def small_model(head, seed=0, **kw):
    """Our model on the OpenAI-layout tiny CLIP above, heads perturbed away from their CLIP init."""
    config, hf = openai_to_hf(openai_state_dict(seed))
    clip, scale = clip_from_hf_state(config, hf, kw.get("linear_patch", "2d"))
    cfg = ModelConfig(clip="test", head=head, num_frames=T, frame_size=IMAGE, max_words=8, cross_layers=2, tight_dropout=0.0, **kw)
    model = VideoTextModel(cfg, clip, scale)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.startswith("clip."):
                p.add_(0.05 * torch.randn(p.shape, generator=g))
            elif "patch_embedding_3d" in name:  # outer temporal taps non-zero: the kernel sees neighbours
                p.add_(0.02 * torch.randn(p.shape, generator=g))
    return model.eval()


MASK = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]])


def _rel_err(a, b):
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("head,kw", [("meanP", {}), ("seqLSTM", {}), ("seqTransf", {}), ("tightTransf", {}),
                                     ("meanP", {"linear_patch": "3d"}), ("seqTransf", {"linear_patch": "3d"})])
def test_clip4clip_checkpoint_round_trip(tmp_path, head, kw):
    model = small_model(head, **kw)
    sd = reference_state_dict(model, "clip4clip")
    assert sd["clip.visual.proj"].dtype == torch.float16 and sd["clip.visual.class_embedding"].dtype == torch.float32
    if head == "seqLSTM":  # CLIP4Clip also stores an unused frame position table for seqLSTM
        sd["frame_position_embeddings.weight"] = torch.zeros(77, W)
    torch.save(sd, tmp_path / "pytorch_model.bin.2")
    assert cli_main(["convert", f"src={tmp_path}", f"out={tmp_path / 'export'}"]) == 0
    loaded = ptrain.load(tmp_path / "export")
    assert (loaded.cfg.head, loaded.cfg.linear_patch, loaded.cfg.compat) == (head, kw.get("linear_patch", "2d"), False)
    frames, ids = _frames(), _ids()
    ours = loaded.similarity(loaded.encode_text(ids, (ids > 0).long()), loaded.encode_video(frames, MASK))
    with torch.no_grad():
        ref = ref_clip4clip(sd, head, frames, MASK, ids)
    assert _rel_err(ours, ref) <= 1e-4


C2V_CASES = [
    dict(head="TAB", tdb_proj="sigmoid_selfA", tab_motion="TAB_TDB"),  # the released configuration
    dict(head="TAB", tdb_proj="sigmoid_mlp", tab_motion="TAB_TDB"),
    dict(head="TAB", tab_global="seqTransf", tab_motion="TAB"),
    dict(head="TAB", tdb_proj="sigmoid_selfA", tab_motion="none"),
    dict(head="TAB", tab_global="meanP", tab_motion="none"),  # sim_type=meanP with center_type=TAB
    dict(head="TDB", tdb_proj="raw"),
    dict(head="TDB", tdb_proj="sigmoid_selfA"),
    dict(head="seqTransf"),  # CLIP2Video's sim_type=seqTransf without TDB or TAB
]


def clip2video_checkpoint(tmp_path, case, logit_scale=None):
    """(reference state dict, its file) of a perturbed small model of ``case``, CLIP2Video layout."""
    case = dict(case)
    head = case.pop("head")
    model = small_model(head, compat=True, tab_centers=3, **case)
    sd = reference_state_dict(model, "clip2video")
    if "head.tdb.trans_layernorm.weight" not in model.state_dict():  # CLIP2Video always creates it
        sd["trans_layernorm.weight"], sd["trans_layernorm.bias"] = torch.ones(W), torch.zeros(W)
    if case.get("tab_global") == "meanP":  # temporal_type=TDB, temporal_proj=sigmoid_selfA: created, never used
        g = torch.Generator().manual_seed(7)
        sd["type_position_embeddings.weight"] = torch.randn(2, W, generator=g)
        for k, v in reference_state_dict(small_model("TDB", compat=True), "clip2video").items():
            if k.startswith("frame2t_attention."):
                sd[k] = v
    if logit_scale is not None:
        sd["clip.logit_scale"] = torch.tensor(math.log(logit_scale))
    torch.save(sd, tmp_path / "pytorch_model.bin.2")
    return sd, tmp_path / "pytorch_model.bin.2"


def convert_clip2video(tmp_path, case, src):
    motion = case.get("tab_motion", "TAB_TDB")
    args = ["convert", f"src={src}", f"out={tmp_path / 'export'}"]
    if motion != "none":  # not in the keys; "none" is inferred from the missing actionClip
        args.append(f"tab_motion={motion}")
    assert cli_main(args) == 0
    return ptrain.load(tmp_path / "export")


def ref_clip2video_case(sd, case, frames, mask, ids, attn):
    head = case["head"]
    uses_tdb = head == "TDB" or (head == "TAB" and case.get("tab_global", "TDB") == "TDB")
    with torch.no_grad():
        return ref_clip2video(sd, frames, mask, ids, attn, tdb=uses_tdb, proj=case.get("tdb_proj", "sigmoid_selfA"),
                              tab=head == "TAB", motion=case.get("tab_motion", "TAB_TDB"), weight=0.5)


@pytest.mark.parametrize("case", C2V_CASES, ids=lambda c: "-".join(str(v) for v in c.values()))
def test_clip2video_checkpoint_round_trip(tmp_path, case):
    sd, src = clip2video_checkpoint(tmp_path, case)
    loaded = convert_clip2video(tmp_path, case, src)
    head, motion = case["head"], case.get("tab_motion", "TAB_TDB")
    assert loaded.cfg.head == head and loaded.cfg.compat is True and loaded.cfg.tab_centers == (3 if head == "TAB" else 5)
    if head == "TAB":
        assert loaded.cfg.tab_motion == motion
    if case.get("tdb_proj") == "raw":  # the reference's unused LayerNorm is dropped, not imported
        assert not any("trans_layernorm" in k for k in loaded.state_dict())
    frames, ids = _frames(), _ids()
    attn = (ids > 0).long()
    ours = loaded.similarity(loaded.encode_text(ids, attn), loaded.encode_video(frames, MASK))
    ref = ref_clip2video_case(sd, case, frames, MASK, ids, attn)
    assert _rel_err(ours, ref) <= 1e-4
    # Our correct mask layout differs from the reference on this padded batch (what compat is for); without any
    # transformer (TAB on the meanP branch, no motion tokens) there is no mask layout and both agree.
    fixed = import_reference(sd, tab_motion="TAB_TDB" if motion == "none" else motion, compat="false")
    err = _rel_err(fixed.similarity(fixed.encode_text(ids, attn), fixed.encode_video(frames, MASK)), ref)
    assert err > 1e-4 if case.get("tab_global") != "meanP" else err <= 1e-4


ZERO_PAD_CASES = [
    ("clip2video", dict(head="TDB", tdb_proj="sigmoid_selfA")),  # compat: the difference token after the last real frame
    ("clip2video", dict(head="TAB", tdb_proj="sigmoid_selfA", tab_motion="TAB_TDB")),  # released CLIP2Video
    ("clip4clip", dict(head="seqTransf", linear_patch="3d")),  # the 3D kernel spans the padded neighbours
]


@pytest.mark.parametrize("fmt,case", ZERO_PAD_CASES, ids=lambda c: c if isinstance(c, str) else "-".join(map(str, c.values())))
def test_zero_padded_uint8_frames_match_the_reference_loader(tmp_path, fmt, case):
    """Our loader pads short clips with black uint8 frames; the references' loaders pad with zeros in
    normalised space. The model zeroes padded frames after normalising, so the two agree."""
    frames, ids = _frames(zero_pad=MASK), _ids()
    attn = (ids > 0).long()
    if fmt == "clip2video":
        sd, src = clip2video_checkpoint(tmp_path, case)
        loaded = convert_clip2video(tmp_path, case, src)
        ref = ref_clip2video_case(sd, case, frames, MASK, ids, attn)
    else:
        kw = dict(case)
        sd = reference_state_dict(small_model(kw.pop("head"), **kw), "clip4clip")
        torch.save(sd, tmp_path / "pytorch_model.bin.1")
        assert cli_main(["convert", f"src={tmp_path / 'pytorch_model.bin.1'}", f"out={tmp_path / 'export'}"]) == 0
        loaded = ptrain.load(tmp_path / "export")
        with torch.no_grad():
            ref = ref_clip4clip(sd, case["head"], frames, MASK, ids)
    ours = loaded.similarity(loaded.encode_text(ids, attn), loaded.encode_video(frames, MASK))
    assert _rel_err(ours, ref) <= 1e-4
    # Black frames encoded as images (what the model did before) are a different input.
    with torch.no_grad():
        black = loaded.frame_features(frames)  # no mask: the padded frames stay black images
        zeroed = loaded.frame_features(frames, MASK)
    assert not torch.allclose(black[MASK == 0], zeroed[MASK == 0], atol=1e-3)


def test_clip2video_logit_scale_above_100_is_kept(tmp_path):
    """CLIP2Video may store a logit scale above ln 100; the reference uses exp() of it unclamped."""
    case = dict(head="TDB", tdb_proj="raw")
    sd, src = clip2video_checkpoint(tmp_path, case, logit_scale=150.0)
    loaded = convert_clip2video(tmp_path, case, src)
    assert loaded.cfg.max_logit_scale == pytest.approx(150.0, rel=1e-6)
    section = json.loads((tmp_path / "export" / "config.json").read_text())["ptrain"]
    assert section["model"]["max_logit_scale"] == pytest.approx(150.0, rel=1e-6)
    assert section["logit_scale"] == pytest.approx(150.0, rel=1e-6)
    assert float(loaded.logit_scale().detach()) == pytest.approx(150.0, rel=1e-6)
    frames, ids = _frames(), _ids()
    attn = (ids > 0).long()
    ours = loaded.similarity(loaded.encode_text(ids, attn), loaded.encode_video(frames, MASK))
    assert _rel_err(ours, ref_clip2video_case(sd, case, frames, MASK, ids, attn)) <= 1e-4
    # A scale below 100 keeps the usual bound.
    (tmp_path / "low").mkdir()
    sd, _ = clip2video_checkpoint(tmp_path / "low", case, logit_scale=20.0)
    assert import_reference(sd).cfg.max_logit_scale == 100.0


def test_frame_table_too_short_names_the_checkpoint_and_the_fix(tmp_path):
    """A reference frame position table has 77 rows; more frames cannot be imported from it."""
    sd = reference_state_dict(small_model("seqTransf"), "clip4clip")
    assert sd["frame_position_embeddings.weight"].shape[0] == 77
    torch.save(sd, tmp_path / "pytorch_model.bin.3")
    with pytest.raises(SystemExit) as e:
        cli_main(["convert", f"src={tmp_path}", f"out={tmp_path / 'export'}", "num_frames=100"])
    msg = str(e.value)
    assert "pytorch_model.bin.3" in msg and "frame_position_embeddings.weight" in msg and "77 rows" in msg
    assert "num_frames=100" in msg and "num_frames<=77" in msg
    assert not (tmp_path / "export" / "model.safetensors").exists()
    with pytest.raises(ValueError, match=r"my\.bin: .*77 rows.*num_frames<=77"):
        import_reference(sd, source="my.bin", num_frames=78)


def test_import_rejects_mismatched_checkpoints():
    sd = reference_state_dict(small_model("seqTransf"), "clip4clip")
    with pytest.raises(ValueError, match="describe head seqTransf"):
        import_reference(sd, head="meanP")
    sd["transformerClip.resblocks.0.extra"] = torch.zeros(1)
    with pytest.raises(ValueError, match="missing|unexpected"):
        import_reference(sd)


def test_convert_plain_clip_with_a_fresh_head(tmp_path):
    torch.save(openai_state_dict(), tmp_path / "tiny.pt")
    assert cli_main(["convert", f"src={tmp_path / 'tiny.pt'}", "format=clip", "head=seqTransf", f"out={tmp_path / 'out'}"]) == 0
    model = ptrain.load(tmp_path / "out")
    assert model.cfg.head == "seqTransf" and model.cfg.frame_size == IMAGE
    # seqTransf starts from CLIP's text blocks 0..1 and text position table, like the papers.
    torch.testing.assert_close(model.head.frame_position_embeddings.weight[:77], model.clip.text_model.embeddings.position_embedding.weight)
