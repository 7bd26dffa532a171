"""Import CLIP4Clip / CLIP2Video checkpoints (and plain CLIP weights) into an export directory.

    ptrain convert src=ckpts/pytorch_model.bin.4 out=exports/c4c_meanp          # CLIP4Clip, head inferred
    ptrain convert src=c2v/msrvtt/pytorch_model.bin.2 out=exports/c2v_msrvtt     # CLIP2Video TDB + TAB
    ptrain convert src=ViT-B-32.pt format=clip head=seqTransf out=exports/b32    # OpenAI CLIP + fresh head

    from ptrain.model.convert import import_reference, reference_state_dict
    model = import_reference(torch.load(path, weights_only=True))      # -> VideoTextModel
    sd = reference_state_dict(model, "clip4clip")                      # back to the reference key layout

Checkpoints are read with ``torch.load(weights_only=True)`` (no pickled code). They are plain
``state_dict``s: ``clip.*`` (the OpenAI CLIP layout, several tensors fp16; converted exactly to the
HF layout in fp32) + head keys. The head is inferred from the keys (``lstm_visual`` -> seqLSTM,
``transformerClip`` -> seqTransf, ``cross.*`` -> tightTransf, ``type_position_embeddings`` -> TDB,
``weight_center`` -> TAB, ``clip.visual.conv2`` -> 3D patch); CLIP2Video's ``center_proj`` (TAB vs
TAB_TDB) and ``center_weight`` are not in the keys and come from ``tab_motion`` / ``tab_weight``.
Every checkpoint key must be used and every model key filled (unlike the references' non-strict load).
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import torch

from ptrain.model.clip import build_clip, clip_from_hf_state, hf_to_openai, openai_to_hf
from ptrain.model.config import ConvertConfig, ModelConfig
from ptrain.model.video_text import VideoTextModel

# Reference head key prefix -> our key prefix (block internals renamed by _BLOCK_KEYS).
_C4C_PREFIXES = [
    ("lstm_visual.", "head.lstm_visual."),
    ("frame_position_embeddings.", "head.frame_position_embeddings."),
    ("transformerClip.", "head.transformerClip."),
    ("cross.embeddings.position_embeddings.", "head.cross.position_embeddings."),
    ("cross.transformer.", "head.cross.transformer."),
    ("cross.pooler.ln_pool.", "head.cross.ln_pool."),
    ("cross.pooler.dense.", "head.cross.dense."),
    ("similarity_dense.", "head.cross.similarity_dense."),
]
_C2V_PREFIXES = [
    ("frame_position_embeddings.", "head.frame_position_embeddings."),
    ("transformerClip.", "head.transformerClip."),
    ("type_position_embeddings.", "head.tdb.type_position_embeddings."),
    ("frame2t_attention.", "head.tdb.frame2t_attention."),
    ("frame2t_projection", "head.tdb.frame2t_projection.weight"),
    ("trans_layernorm.", "head.tdb.trans_layernorm."),
    ("weight_center", "tab.centres.weight_center"),
    ("emb_center", "tab.centres.emb_center"),
    ("actionClip.", "tab.actionClip."),
]
_BLOCK_KEYS = [("attn.in_proj_weight", "attn.in_proj.weight"), ("attn.in_proj_bias", "attn.in_proj.bias")]
# Tensors the references' convert_weights stores in fp16 (Linear/Conv/MHA weights and biases, projections).
_HALF_IN_REFERENCE = re.compile(r"(\.attn\.|\.mlp\.|conv[12]\.weight$|^visual\.proj$|^text_projection$)")
_C2V_MARKERS = ("trans_layernorm.", "type_position_embeddings.", "weight_center", "frame2t_", "actionClip.")


def _clean(sd: dict) -> dict[str, torch.Tensor]:
    """Strip DDP prefixes, rename old LayerNorm gamma/beta (as the references' loader does), fp32."""
    out = {}
    for key, value in sd.items():
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"checkpoint entry {key!r} is a {type(value).__name__}, not a tensor; pass a model state_dict.")
        key = key[len("module."):] if key.startswith("module.") else key
        key = re.sub(r"\.gamma$", ".weight", re.sub(r"\.beta$", ".bias", key))
        out[key] = value.float() if value.is_floating_point() else value
    return out


def detect_format(sd: dict) -> str:
    if not any(k.startswith("clip.") for k in sd):
        raise ValueError("checkpoint has no clip.* keys: not a CLIP4Clip/CLIP2Video state dict (use format=clip for plain CLIP weights).")
    return "clip2video" if any(k.startswith(_C2V_MARKERS) for k in sd) else "clip4clip"


def _count(sd, prefix):
    return len({m.group(1) for k in sd for m in [re.match(re.escape(prefix) + r"(\d+)\.", k)] if m})


def infer_model_config(sd: dict, fmt: str, image_size: int, *, head="auto", num_frames=12, max_words=32,
                       tab_motion="TAB_TDB", tab_weight=0.5, compat="auto", clip_name="imported") -> ModelConfig:
    """The ``ModelConfig`` a reference checkpoint describes (what its keys say + the given options)."""
    has = lambda prefix: any(k.startswith(prefix) for k in sd)  # noqa: E731
    opts: dict = {}
    if fmt == "clip4clip":
        inferred = "tightTransf" if has("cross.") else "seqLSTM" if has("lstm_visual.") else "seqTransf" if has("transformerClip.") else "meanP"
        layers = _count(sd, "cross.transformer.resblocks.") or _count(sd, "transformerClip.resblocks.")
    else:
        # CLIP2Video's sim_type: seqTransf has the temporal transformer, meanP has none; TDB needs both the
        # transformer and the type table (sim_type=meanP with temporal_type=TDB creates the table but never uses it)
        global_head = ("TDB" if has("type_position_embeddings.") else "seqTransf") if has("transformerClip.") else "meanP"
        if has("weight_center"):
            inferred = "TAB"
            motion = tab_motion if has("actionClip.") else "none"
            if global_head == "meanP" and motion != "none":
                raise ValueError("this CLIP2Video checkpoint has TAB motion tokens (actionClip) on the meanP branch, which "
                                 "the reference cannot run (its motion tokens read the seqTransf frame position table); "
                                 "it was not trained as saved")
            opts.update(tab_global=global_head, tab_motion=motion, tab_weight=tab_weight,
                        tab_centers=sd["weight_center"].shape[0])
        else:
            inferred = global_head
        opts["tdb_proj"] = "sigmoid_selfA" if has("frame2t_attention.") else "sigmoid_mlp" if has("frame2t_projection") else "raw"
        layers = _count(sd, "transformerClip.resblocks.")
    if head != "auto" and head != inferred:
        raise ValueError(f"head={head} was requested but the checkpoint's keys describe head {inferred}; drop head= or fix it.")
    use_compat = fmt == "clip2video" if compat == "auto" else compat in (True, "true")
    # The references use exp(logit_scale) unclamped at test time (CLIP4Clip clamps the parameter to
    # ln 100 after each step, CLIP2Video's stored value may lie above): keep it exact.
    stored = math.exp(float(sd["clip.logit_scale"])) if "clip.logit_scale" in sd else 100.0
    return ModelConfig(
        clip=clip_name, head=inferred, num_frames=num_frames, max_words=max_words, frame_size=image_size,
        linear_patch="3d" if "clip.visual.conv2.weight" in sd else "2d", cross_layers=layers or 4,
        compat=use_compat, max_logit_scale=max(100.0, stored), **opts,
    )


def _map_head_key(key: str, fmt: str, cfg: ModelConfig) -> str | None:
    """Our key for a reference head key; None for keys the reference creates but never uses."""
    if fmt == "clip4clip" and cfg.head == "seqLSTM" and key.startswith("frame_position_embeddings."):
        return None  # created and CLIP-initialised by CLIP4Clip for seqLSTM, never used
    uses_tdb = cfg.head == "TDB" or (cfg.head == "TAB" and cfg.tab_global == "TDB")
    if fmt == "clip2video" and key.startswith("trans_layernorm.") and not (uses_tdb and cfg.tdb_proj != "raw"):
        return None  # CLIP2Video always creates it; only TDB's sigmoid_mlp / sigmoid_selfA transforms use it
    if fmt == "clip2video" and not uses_tdb and key.startswith(("type_position_embeddings.", "frame2t_")):
        return None  # created by temporal_type / temporal_proj, used only on the seqTransf branch
    for old, new in _C4C_PREFIXES if fmt == "clip4clip" else _C2V_PREFIXES:
        if key.startswith(old):
            out = new + key[len(old):]
            for a, b in _BLOCK_KEYS:
                out = out.replace(a, b) if out.endswith(a) else out
            return out
    raise ValueError(f"unexpected key {key!r} in the {fmt} checkpoint.")


def import_reference(sd: dict, fmt: str = "auto", source: str = "the checkpoint", **options) -> VideoTextModel:
    """Build our model from a CLIP4Clip / CLIP2Video state dict (strict: every key used, every slot filled).

    ``source`` names the checkpoint in errors. ``options``: ``head``, ``num_frames``, ``max_words``,
    ``tab_motion``, ``tab_weight``, ``compat``, ``clip_name`` (see ``infer_model_config``)."""
    sd = _clean(sd)
    fmt = detect_format(sd) if fmt == "auto" else fmt
    clip_sd = {k[len("clip."):]: v for k, v in sd.items() if k.startswith("clip.")}
    config, hf = openai_to_hf(clip_sd)
    cfg = infer_model_config(sd, fmt, config.vision_config.image_size, **options)
    clip, scale = clip_from_hf_state(config, hf, cfg.linear_patch)
    model = VideoTextModel(cfg, clip, scale, init_from_clip=False)
    state = {f"clip.{k}": v for k, v in clip.state_dict().items()}
    state["logit_scale.log_scale"] = hf["logit_scale"].reshape(1)
    expected = model.state_dict()
    for key, value in sd.items():
        if key.startswith("clip."):
            continue
        ours = _map_head_key(key, fmt, cfg)
        if ours is not None:
            state[ours] = value
            _check_shape(source, key, value, expected.get(ours), cfg)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{fmt} checkpoint does not fit head {cfg.head}: missing {missing[:4]}, unexpected {unexpected[:4]}.")
    return model.eval()


def _check_shape(source: str, key: str, value: torch.Tensor, ours: torch.Tensor | None, cfg: ModelConfig) -> None:
    """A clear error for a head tensor whose shape does not fit (instead of load_state_dict's RuntimeError)."""
    if ours is None or ours.shape == value.shape:
        return
    if key.endswith("position_embeddings.weight") and value.dim() == ours.dim() == 2 and value.shape[1] == ours.shape[1]:
        rows = value.shape[0]
        most = rows - 1 if key.startswith("cross.") else rows  # the cross encoder's row 0 is the text token
        raise ValueError(
            f"{source}: {key} is a position table of {rows} rows, but num_frames={cfg.num_frames} needs "
            f"{ours.shape[0]} rows (head {cfg.head}): the checkpoint was trained for at most {most} frames per clip. "
            f"Convert with num_frames<={most} (ptrain convert src=... num_frames={min(cfg.num_frames, most)})."
        )
    raise ValueError(
        f"{source}: {key} has shape {list(value.shape)} but head {cfg.head} expects {list(ours.shape)}; "
        "the checkpoint does not fit the architecture inferred from its keys."
    )


def reference_state_dict(model: VideoTextModel, fmt: str, clip_dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
    """Our model in the reference key layout (CLIP tensors of rank >= 2 in ``clip_dtype``, like the
    references' ``convert_weights``). Used to hand checkpoints back to the reference code, and by tests."""
    out: dict[str, torch.Tensor] = {}
    clip_hf = {k[len("clip."):]: v for k, v in model.state_dict().items() if k.startswith("clip.")}
    clip_hf["logit_scale"] = model.logit_scale.log_scale.detach().reshape(())
    for key, value in hf_to_openai(clip_hf).items():
        out[f"clip.{key}"] = value.to(clip_dtype) if _HALF_IN_REFERENCE.search(key) else value
    table = _C4C_PREFIXES if fmt == "clip4clip" else _C2V_PREFIXES
    for key, value in model.state_dict().items():
        if key.startswith("clip.") or key.startswith("logit_scale."):
            continue
        for old, new in table:
            if key.startswith(new):
                ref = old + key[len(new):]
                for a, b in _BLOCK_KEYS:
                    ref = ref.replace(b, a) if ref.endswith(b) else ref
                out[ref] = value.detach().clone()
                break
        else:
            raise ValueError(f"{key} has no {fmt} equivalent (head {model.cfg.head}).")
    return out


def checkpoint_file(path: str) -> Path:
    """``path`` itself, or the highest ``pytorch_model.bin.N`` in a directory."""
    p = Path(path)
    if p.is_dir():
        found = sorted(p.glob("pytorch_model.bin.*"), key=lambda f: int(f.suffix[1:]) if f.suffix[1:].isdigit() else -1)
        if not found:
            raise FileNotFoundError(f"{p} holds no pytorch_model.bin.N file; pass the checkpoint file itself as src=.")
        p = found[-1]
    if not p.is_file():
        raise FileNotFoundError(f"checkpoint {p} does not exist.")
    return p


def read_checkpoint(path: str) -> dict[str, torch.Tensor]:
    """A reference checkpoint file, or the highest ``pytorch_model.bin.N`` in a directory."""
    p = checkpoint_file(path)
    sd = torch.load(p, map_location="cpu", weights_only=True)
    if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict):
        raise ValueError(f"{p} holds a {type(sd).__name__}, not a state dict.")
    return sd


def run(cfg: ConvertConfig) -> int:
    """``ptrain convert``: read ``cfg.src``, build the model, write the export to ``cfg.out``."""
    from ptrain.model.api import save_export

    if not cfg.src or not cfg.out:
        raise SystemExit("ptrain convert: set src=CHECKPOINT and out=EXPORT_DIR.")
    out = Path(cfg.out)
    if (out / "model.safetensors").exists() and not cfg.overwrite:
        raise SystemExit(f"ptrain convert: {out} already holds an export; pass overwrite=true to replace it.")
    if cfg.format == "clip":
        head = "meanP" if cfg.head == "auto" else cfg.head
        clip, scale = build_clip(cfg.src, _clip_image_size(cfg.src))
        mcfg = ModelConfig(clip=cfg.src, head=head, num_frames=cfg.num_frames, max_words=cfg.max_words,
                           frame_size=clip.config.vision_config.image_size, tab_motion=cfg.tab_motion, tab_weight=cfg.tab_weight)
        model = VideoTextModel(mcfg, clip, scale).eval()
        info = {"made by": "ptrain convert format=clip: a CLIP with a freshly initialised head (not trained on "
                           "video yet)", "source": str(cfg.src)}
    else:
        try:
            src = checkpoint_file(cfg.src)
            sd = read_checkpoint(str(src))
            fmt = detect_format({k.removeprefix("module."): None for k in sd}) if cfg.format == "auto" else cfg.format
            model = import_reference(
                sd, fmt, source=str(src), head=cfg.head, num_frames=cfg.num_frames,
                max_words=cfg.max_words, tab_motion=cfg.tab_motion, tab_weight=cfg.tab_weight, compat=cfg.compat,
                clip_name=str(cfg.src),
            )
        except ValueError as e:  # a checkpoint that does not fit: say so without a traceback
            raise SystemExit(f"ptrain convert: {e}") from None
        info = {"made by": f"ptrain convert: imported from a {'CLIP2Video' if fmt == 'clip2video' else 'CLIP4Clip'} "
                           "checkpoint (its training data: that run's, not recorded in the checkpoint)",
                "source checkpoint": str(src), "format": fmt + (" (detected)" if cfg.format == "auto" else "")}
    save_export(model, out, info=info)
    m = model.cfg
    params = sum(p.numel() for p in model.parameters())
    print(f"ptrain convert: wrote {out} (head={m.head}, linear_patch={m.linear_patch}, frame_size={m.frame_size}, "
          f"compat={m.compat}, {params / 1e6:.2f}M parameters)")
    return 0


def _clip_image_size(src: str) -> int:
    """The image size a CLIP source was trained at (so convert needs no frame_size option)."""
    from ptrain.model.clip import read_openai_checkpoint

    p = Path(src)
    if p.is_file():
        sd = read_openai_checkpoint(src)
        return sd["visual.conv1.weight"].shape[-1] * round((sd["visual.positional_embedding"].shape[0] - 1) ** 0.5)
    from transformers import CLIPConfig

    return CLIPConfig.from_pretrained(src).vision_config.image_size
