"""The CLIP backbone: named random sizes, Hugging Face dirs/ids, and OpenAI checkpoints (exact conversion).

    clip_model, logit_scale = build_clip("ViT-B/32", frame_size=224)          # random init, no download
    clip_model, logit_scale = build_clip("/models/clip-vit-base-patch32", 224) # CLIPModel.from_pretrained
    clip_model, logit_scale = build_clip("/models/ViT-B-32.pt", 224)          # OpenAI TorchScript / state dict
    config, hf_state = openai_to_hf(openai_state_dict)                        # the conversion alone

The returned ``CLIPModel`` has its 0-dim ``logit_scale`` parameter removed (DeepSpeed needs 1-D
parameters; the model keeps the scale in its own module) and the value is returned separately as the
multiplier (exp of the stored log).

OpenAI -> HF mapping (shapes for ViT-B/32; the architecture is inferred from the shapes):
``visual.conv1`` -> ``vision_model.embeddings.patch_embedding``; ``visual.class_embedding`` ->
``...embeddings.class_embedding``; ``visual.positional_embedding`` -> ``...position_embedding.weight``;
``visual.ln_pre``/``ln_post`` -> ``pre_layrnorm``/``post_layernorm``; ``visual.proj`` [768,512] ->
``visual_projection.weight`` (transposed); ``text_projection`` -> ``text_projection.weight``
(transposed); each block's ``attn.in_proj_{weight,bias}`` is split in three (q, k, v) ->
``self_attn.{q,k,v}_proj``; ``ln_1/ln_2`` -> ``layer_norm1/2``; ``mlp.c_fc/c_proj`` -> ``mlp.fc1/fc2``;
``token_embedding``/``positional_embedding``/``ln_final`` -> ``text_model.embeddings.*``/``final_layer_norm``.
CLIP4Clip's ``visual.conv2`` (3D patch) -> ``vision_model.embeddings.patch_embedding_3d``.
"""

from __future__ import annotations

import math
import os
import re
import zipfile

import torch
from torch import nn
from transformers import CLIPConfig, CLIPModel
from transformers.models.clip.modeling_clip import CLIPVisionEmbeddings

# Named sizes: (vision width, layers, patch), (text width, layers, heads), embed dim.
_SIZES = {
    "ViT-B/32": ((768, 12, 32), (512, 12, 8), 512),
    "ViT-B/16": ((768, 12, 16), (512, 12, 8), 512),
    "ViT-L/14": ((1024, 24, 14), (768, 12, 12), 768),
}
DEFAULT_LOGIT_SCALE = 1 / 0.07  # CLIP's initial temperature for random init


def named_clip_config(name: str, frame_size: int) -> CLIPConfig:
    """A CLIPConfig for a named size at ``frame_size`` (``tiny``: 2 layers, width 32, MLP 128, 4x4 patches)."""
    if name == "tiny":
        if frame_size % 4:
            raise ValueError(f"clip=tiny splits frames into 4x4 patches; frame_size={frame_size} must be a multiple of 4.")
        vision = dict(hidden_size=32, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, patch_size=frame_size // 4)
        text = dict(hidden_size=32, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
        dim = 32
    elif name in _SIZES:
        (vw, vl, patch), (tw, tl, th), dim = _SIZES[name]
        if frame_size % patch:
            raise ValueError(f"clip={name} has {patch}-pixel patches; frame_size={frame_size} must be a multiple of {patch}.")
        vision = dict(hidden_size=vw, intermediate_size=4 * vw, num_hidden_layers=vl, num_attention_heads=vw // 64, patch_size=patch)
        text = dict(hidden_size=tw, intermediate_size=4 * tw, num_hidden_layers=tl, num_attention_heads=th)
    else:
        raise ValueError(f"unknown CLIP size {name!r}; use one of tiny, {', '.join(_SIZES)}.")
    vision.update(image_size=frame_size, hidden_act="quick_gelu")
    text.update(vocab_size=49408, max_position_embeddings=77, hidden_act="quick_gelu", eos_token_id=49407, bos_token_id=49406, pad_token_id=0)
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=dim, logit_scale_init_value=math.log(DEFAULT_LOGIT_SCALE))


# ----------------------------------------------------------------------------------------------
# OpenAI layout -> Hugging Face layout

_BLOCK_RENAMES = [
    ("attn.out_proj.", "self_attn.out_proj."),
    ("ln_1.", "layer_norm1."),
    ("ln_2.", "layer_norm2."),
    ("mlp.c_fc.", "mlp.fc1."),
    ("mlp.c_proj.", "mlp.fc2."),
]
_TOP_RENAMES = {
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "ln_final.weight": "text_model.final_layer_norm.weight",
    "ln_final.bias": "text_model.final_layer_norm.bias",
    "visual.class_embedding": "vision_model.embeddings.class_embedding",
    "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
    "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
    "visual.conv2.weight": "vision_model.embeddings.patch_embedding_3d.weight",
    "visual.ln_pre.weight": "vision_model.pre_layrnorm.weight",
    "visual.ln_pre.bias": "vision_model.pre_layrnorm.bias",
    "visual.ln_post.weight": "vision_model.post_layernorm.weight",
    "visual.ln_post.bias": "vision_model.post_layernorm.bias",
}
_TRANSPOSED = {"visual.proj": "visual_projection.weight", "text_projection": "text_projection.weight"}
_JIT_SCALARS = ("input_resolution", "context_length", "vocab_size")
_BLOCK_RE = re.compile(r"^(visual\.)?transformer\.resblocks\.(\d+)\.(.+)$")


def _count_blocks(sd: dict, prefix: str) -> int:
    ids = {int(m.group(1)) for k in sd for m in [re.match(prefix + r"(\d+)\.", k)] if m}
    return len(ids)


def openai_to_hf(sd: dict[str, torch.Tensor], vision_heads: int | None = None, text_heads: int | None = None):
    """Convert an OpenAI CLIP state dict to ``(CLIPConfig, HF state dict)``, exactly (fp32 copies).

    Heads default to width // 64 as in OpenAI's ``build_model``. ``logit_scale`` stays a 0-dim
    tensor under its HF name. Raises ``ValueError`` naming the first missing or unexpected key."""
    missing = [k for k in ("visual.conv1.weight", "visual.positional_embedding", "text_projection", "ln_final.weight", "positional_embedding", "token_embedding.weight") if k not in sd]
    if missing:
        raise ValueError(f"not an OpenAI CLIP (ViT) state dict: missing {missing[0]!r}; ResNet CLIPs are not supported.")
    vision_width, _, patch, _ = sd["visual.conv1.weight"].shape
    grid = round((sd["visual.positional_embedding"].shape[0] - 1) ** 0.5)
    text_width = sd["ln_final.weight"].shape[0]
    vision = dict(
        hidden_size=vision_width, intermediate_size=sd["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
        num_hidden_layers=_count_blocks(sd, r"visual\.transformer\.resblocks\."),
        num_attention_heads=vision_heads or max(1, vision_width // 64), patch_size=patch, image_size=patch * grid,
        hidden_act="quick_gelu",
    )
    vocab = sd["token_embedding.weight"].shape[0]
    text = dict(
        hidden_size=text_width, intermediate_size=sd["transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
        num_hidden_layers=_count_blocks(sd, r"transformer\.resblocks\."),
        num_attention_heads=text_heads or max(1, text_width // 64), vocab_size=vocab,
        max_position_embeddings=sd["positional_embedding"].shape[0], hidden_act="quick_gelu",
        eos_token_id=vocab - 1, bos_token_id=vocab - 2, pad_token_id=0,
    )
    scale = float(sd["logit_scale"]) if "logit_scale" in sd else math.log(DEFAULT_LOGIT_SCALE)
    config = CLIPConfig(text_config=text, vision_config=vision, projection_dim=sd["text_projection"].shape[1], logit_scale_init_value=scale)

    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        value = value.detach().float() if value.is_floating_point() else value
        if key in _JIT_SCALARS:
            continue
        if key == "logit_scale":
            out["logit_scale"] = value.reshape(())
        elif key in _TOP_RENAMES:
            out[_TOP_RENAMES[key]] = value
        elif key in _TRANSPOSED:
            out[_TRANSPOSED[key]] = value.t().contiguous()
        elif m := _BLOCK_RE.match(key):
            tower = "vision_model" if m.group(1) else "text_model"
            base, rest = f"{tower}.encoder.layers.{m.group(2)}.", m.group(3)
            if rest in ("attn.in_proj_weight", "attn.in_proj_bias"):
                kind = rest.rsplit("_", 1)[1]
                for name, part in zip("qkv", value.chunk(3, dim=0)):
                    out[f"{base}self_attn.{name}_proj.{kind}"] = part.contiguous()
                continue
            for old, new in _BLOCK_RENAMES:
                if rest.startswith(old):
                    out[base + new + rest[len(old):]] = value
                    break
            else:
                raise ValueError(f"unexpected key {key!r} in the OpenAI CLIP state dict.")
        else:
            raise ValueError(f"unexpected key {key!r} in the OpenAI CLIP state dict.")
    return config, out


def hf_to_openai(hf: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of ``openai_to_hf`` (used to write reference-layout checkpoints)."""
    inv_top = {v: k for k, v in _TOP_RENAMES.items()}
    inv_t = {v: k for k, v in _TRANSPOSED.items()}
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, value in hf.items():
        if key == "logit_scale":
            out[key] = value.reshape(())
        elif key in inv_top:
            out[inv_top[key]] = value
        elif key in inv_t:
            out[inv_t[key]] = value.t().contiguous()
        elif m := re.match(r"^(text|vision)_model\.encoder\.layers\.(\d+)\.(.+)$", key):
            base = ("visual." if m.group(1) == "vision" else "") + f"transformer.resblocks.{m.group(2)}."
            rest = m.group(3)
            if am := re.match(r"self_attn\.([qkv])_proj\.(weight|bias)$", rest):
                qkv.setdefault((base, am.group(2)), {})[am.group(1)] = value
                continue
            for old, new in _BLOCK_RENAMES:
                if rest.startswith(new):
                    out[base + old + rest[len(new):]] = value
                    break
            else:
                raise ValueError(f"unexpected key {key!r} in the HF CLIP state dict.")
        else:
            raise ValueError(f"unexpected key {key!r} in the HF CLIP state dict.")
    for (base, kind), parts in qkv.items():
        out[f"{base}attn.in_proj_{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]])
    return out


def read_openai_checkpoint(path: str) -> dict[str, torch.Tensor]:
    """State dict of an OpenAI ``.pt``: TorchScript archive (the user's own file, loaded with
    ``torch.jit.load``) or a plain state dict (``torch.load(weights_only=True)``)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"OpenAI CLIP checkpoint {path} does not exist.")
    is_script = False
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as zf:
            is_script = any(n.split("/", 1)[-1].startswith("code/") or n.endswith("/constants.pkl") for n in zf.namelist())
    if is_script:
        return {k: v for k, v in torch.jit.load(path, map_location="cpu").state_dict().items()}
    sd = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict):
        raise ValueError(f"{path} holds a {type(sd).__name__}, not a state dict or TorchScript CLIP.")
    return sd


# ----------------------------------------------------------------------------------------------
# 3D patch embedding


class VideoVisionEmbeddings(CLIPVisionEmbeddings):
    """CLIP's vision embeddings plus CLIP4Clip's 3D patch conv (kernel (3, p, p), stride (1, p, p),
    temporal padding 1), used instead of the 2D conv when ``num_frames`` is given."""

    def __init__(self, config, temporal_kernel: int = 3):
        super().__init__(config)
        p = config.patch_size
        self.patch_embedding_3d = nn.Conv3d(
            config.num_channels, self.embed_dim, kernel_size=(temporal_kernel, p, p), stride=(1, p, p),
            padding=((temporal_kernel - 1) // 2, 0, 0), bias=False,
        )

    @torch.no_grad()
    def inflate_from_2d(self) -> None:
        """Central-frame inflation: zeros at the outer temporal taps, the 2D kernel in the middle."""
        w2d = self.patch_embedding.weight
        k = self.patch_embedding_3d.weight.shape[2]
        left = (k - 1) // 2
        w3d = torch.zeros_like(self.patch_embedding_3d.weight)
        w3d[:, :, left] = w2d
        self.patch_embedding_3d.weight.copy_(w3d)

    def forward(self, pixel_values, interpolate_pos_encoding=False, num_frames: int | None = None):
        if num_frames is None:
            return super().forward(pixel_values, interpolate_pos_encoding)
        BT, C, H, W = pixel_values.shape
        x_BCTHW = pixel_values.to(self.patch_embedding_3d.weight.dtype).view(BT // num_frames, num_frames, C, H, W).transpose(1, 2)
        y_BDTgg = self.patch_embedding_3d(x_BCTHW)
        patches = y_BDTgg.transpose(1, 2).flatten(3).reshape(BT, self.embed_dim, -1).transpose(1, 2)
        cls = self.class_embedding.expand(BT, 1, -1)
        return torch.cat([cls, patches], dim=1) + self.position_embedding(self.position_ids)


def enable_3d_patch(clip: CLIPModel) -> None:
    """Swap in ``VideoVisionEmbeddings`` (keeps the 2D weights; inflates them into the 3D conv)."""
    old = clip.vision_model.embeddings
    if isinstance(old, VideoVisionEmbeddings):
        return
    new = VideoVisionEmbeddings(old.config).to(dtype=old.patch_embedding.weight.dtype)
    new.load_state_dict(old.state_dict(), strict=False)
    new.inflate_from_2d()
    clip.vision_model.embeddings = new


# ----------------------------------------------------------------------------------------------
# building


def _strip_logit_scale(clip: CLIPModel) -> float:
    scale = float(clip.logit_scale.detach().exp())
    del clip.logit_scale
    return scale


def clip_from_hf_state(config: CLIPConfig, state: dict[str, torch.Tensor], linear_patch: str = "2d"):
    """A CLIPModel built from ``config`` with ``state`` loaded strictly; returns (model, scale)."""
    model = CLIPModel(config).eval()
    if linear_patch == "3d" or "vision_model.embeddings.patch_embedding_3d.weight" in state:
        enable_3d_patch(model)
    state = dict(state)
    if "logit_scale" not in state:
        state["logit_scale"] = torch.tensor(config.logit_scale_init_value)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("position_ids") and "patch_embedding_3d" not in k]
    if missing or unexpected:
        raise ValueError(f"CLIP weights do not match the architecture: missing {missing[:3]}, unexpected {unexpected[:3]}.")
    return model, _strip_logit_scale(model)


def build_clip(name: str, frame_size: int, linear_patch: str = "2d") -> tuple[CLIPModel, float]:
    """The backbone for ``ModelConfig.clip``; returns (CLIPModel without logit_scale, scale)."""
    if name == "tiny" or name in _SIZES:
        model = CLIPModel(named_clip_config(name, frame_size)).eval()
        scale = _strip_logit_scale(model)
    elif name.endswith(".pt") or (os.path.isfile(name) and not os.path.isdir(name)):
        config, state = openai_to_hf(read_openai_checkpoint(name))
        model, scale = clip_from_hf_state(config, state)
    else:
        if not os.path.isdir(name) and (name.startswith((".", "/", "~")) or os.sep in name.strip("/").split("/", 1)[-1]):
            raise FileNotFoundError(
                f"clip={name!r} is neither a named size (tiny, {', '.join(_SIZES)}), an existing directory, "
                "nor an OpenAI .pt file."
            )
        model = CLIPModel.from_pretrained(name).eval()  # a local dir, or a hub id (online users only)
        scale = _strip_logit_scale(model)
    image_size = model.config.vision_config.image_size
    if image_size != frame_size:
        raise ValueError(
            f"clip={name!r} expects {image_size}x{image_size} frames but frame_size={frame_size}; "
            f"set model.frame_size={image_size} (and shard with the same frame size)."
        )
    if linear_patch == "3d":
        enable_3d_patch(model)
    return model, scale
