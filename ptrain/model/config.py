"""Model and convert configs (stdlib only: importing this never imports torch).

    from ptrain.model.config import ModelConfig
    cfg = ModelConfig(clip="ViT-B/32", head="seqTransf", num_frames=12)

``clip`` names the backbone: ``tiny`` (tests), ``ViT-B/32``, ``ViT-B/16``, ``ViT-L/14`` (random
init at that size), a local Hugging Face CLIP directory or hub id (``CLIPModel.from_pretrained``),
or an OpenAI checkpoint file ``*.pt`` (TorchScript or plain state dict, converted to the HF layout).

Heads (``head``) are the rows of ``ptrain/model/registry.py``: ``meanP``, ``seqLSTM``, ``seqTransf``,
``tightTransf`` (CLIP4Clip); ``TDB`` (seqTransf + CLIP2Video's temporal difference block) and ``TAB``
(CLIP2Video's temporal alignment block beside the ``tab_global`` branch; ``head=TAB`` with defaults is the
released CLIP2Video).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ptrain.config import Problems, opt
from ptrain.model.registry import HEAD_NAMES, TAB_GLOBAL_HEADS, global_spec, head_spec

# CLIP's image normalisation (OpenAI preprocessing); the model applies it to uint8 frames, exports record it
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

HEADS = HEAD_NAMES
NAMED_SIZES = ("tiny", "ViT-B/32", "ViT-B/16", "ViT-L/14")
# The frame side of a named backbone must split into whole patches (ptrain/model/clip.py: tiny cuts a 4x4 grid)
NAMED_PATCH = {"tiny": 4, "ViT-B/32": 32, "ViT-B/16": 16, "ViT-L/14": 14}


@dataclass
class ModelConfig:
    """The video-text model: CLIP backbone, temporal head, loss options."""

    clip: str = opt("tiny", "backbone: tiny | ViT-B/32 | ViT-B/16 | ViT-L/14 (random init), a HF dir/id, or an OpenAI .pt")
    head: Literal[HEAD_NAMES] = opt(
        "meanP", "similarity head (CLIP4Clip: meanP seqLSTM seqTransf tightTransf; CLIP2Video: TDB TAB)"
    )
    num_frames: int = opt(12, "frames per clip (T); clips with fewer frames are padded and masked")
    max_words: int = opt(32, "text length in tokens including SOT and EOT")
    frame_size: int = opt(224, "square frame side in pixels; must equal the backbone's image size")
    linear_patch: Literal["2d", "3d"] = opt("2d", "patch embedding: 2d per frame, or 3d (kernel 3 over time, central-frame init)")
    cross_layers: int = opt(4, "depth of the temporal transformer (seqTransf/TDB/TAB) and of the tightTransf cross encoder")
    tdb_proj: Literal["raw", "sigmoid_mlp", "sigmoid_selfA"] = opt(
        "sigmoid_selfA", "TDB difference transform: raw subtraction, 2*sigmoid(LN(d W))-1, or 1-layer attention + sigmoid"
    )
    tab_global: Literal[TAB_GLOBAL_HEADS] = opt("TDB", "head=TAB: the global branch fused with the alignment score")
    tab_centers: int = opt(5, "head=TAB: number K of shared alignment centres")
    tab_motion: Literal["none", "TAB", "TAB_TDB"] = opt(
        "TAB_TDB", "head=TAB: extra motion tokens from every 2nd frame: none, 1-layer transformer, or TDB + transformer"
    )
    tab_weight: float = opt(0.5, "head=TAB: w in w*global + (1-w)*alignment, for the score and the loss")
    tight_dropout: float = opt(0.1, "tightTransf: dropout on the cross-encoder input (CLIP4Clip uses 0.1)")
    compat: bool = opt(
        False,
        "reproduce reference quirks that change numbers (head-major attention-mask layout, TDB mask off-by-one); "
        "for imported CLIP2Video checkpoints only",
    )
    local_loss: bool = opt(False, "InfoNCE over local rows x global columns (linear memory) instead of the full global matrix")
    gather_with_grad: bool = opt(True, "all-gather features with gradient (exact global-batch gradients)")
    reverse_negatives: bool = opt(
        False,
        "training: every clip played backwards is an extra negative for its caption (text->video), which "
        "teaches a temporal head the order of events; only for captions that describe ordered events",
    )
    logit_scale_init: float = opt(0.0, "initial logit scale (the multiplier, not its log); 0 = from the checkpoint, or 1/0.07 at random init")
    max_logit_scale: float = opt(100.0, "the logit scale is clamped to at most this, inside forward and after each training step")
    grad_checkpointing: bool = opt(False, "recompute CLIP encoder layers in backward to save activation memory")
    mask_ratio: float = opt(
        0.0, "training only: drop this fraction of each frame's patch tokens before CLIP's vision transformer "
        "(FLIP/UMT-style; the class token is always kept; evaluation and exports use every token); 0 = off")
    mask_mode: Literal["frame", "tube"] = opt(
        "frame", "mask_ratio > 0: draw the kept patches per frame, or one set per clip shared by its frames (tube)")
    tokenizer: str = opt("", "tokenizer vocabulary: '' = the CLIP BPE file shipped in ptrain/model/, or a HF tokenizer dir")

    def __post_init__(self):
        p = Problems()
        p.check(self.num_frames >= 1, "num_frames", f"num_frames must be at least 1, got {self.num_frames}")
        p.check(self.max_words >= 2, "max_words", f"max_words must be at least 2 (room for SOT and EOT), got {self.max_words}")
        p.check(self.max_words <= 77, "max_words",
                f"max_words is {self.max_words} but CLIP's text position table has 77 rows; use at most 77")
        p.check(self.frame_size >= 8, "frame_size", f"frame_size must be at least 8 pixels, got {self.frame_size}")
        patch = NAMED_PATCH.get(self.clip)
        if patch and self.frame_size >= 8:
            what = "splits frames into a 4x4 grid of patches" if self.clip == "tiny" else f"has {patch}-pixel patches"
            fits = [self.frame_size - self.frame_size % patch, self.frame_size - self.frame_size % patch + patch]
            p.check(self.frame_size % patch == 0, "frame_size",
                    f"clip={self.clip} {what}, so frame_size must be a multiple of {patch}; got {self.frame_size} "
                    f"(e.g. {' or '.join(str(f) for f in fits if f >= 8)}; shard with the same frame_size)",
                    also=("clip",))
        p.check(self.cross_layers >= 1, "cross_layers", f"cross_layers must be at least 1, got {self.cross_layers}")
        spec = head_spec(self.head)
        if spec.alignment:
            p.check(self.tab_centers >= 1, "tab_centers", f"tab_centers must be at least 1, got {self.tab_centers}")
            p.check(0.0 <= self.tab_weight <= 1.0, "tab_weight", f"tab_weight must lie in [0, 1], got {self.tab_weight}")
            p.check(not (self.tab_motion == "TAB_TDB" and self.tab_global != "TDB"), "tab_motion",
                    "tab_motion=TAB_TDB shares the TDB block of the global branch; set tab_global=TDB or "
                    "choose tab_motion=TAB or none", also=("tab_global",))
            p.check(self.tab_motion == "none" or global_spec(self).frame_positions, "tab_motion",
                    f"tab_motion={self.tab_motion} uses the frame position table of the global branch, which "
                    f"tab_global={self.tab_global} has not; set tab_motion=none (as CLIP2Video must with sim_type=meanP) "
                    "or tab_global=TDB or seqTransf", also=("tab_global",))
        p.check(not (spec.tight and 1 + self.num_frames > 77), "num_frames",
                f"{self.head} feeds 1 + num_frames tokens through a 77-row position table; "
                f"num_frames={self.num_frames} is too many", also=("head",))
        p.check(not (self.reverse_negatives and spec.tight), "reverse_negatives",
                f"reverse_negatives is not supported with head={self.head} (its loss scores local pairs in the "
                "cross encoder); use a loose temporal head such as seqTransf or TDB", also=("head",))
        p.check(0.0 <= self.tight_dropout < 1.0, "tight_dropout", f"tight_dropout must lie in [0, 1), got {self.tight_dropout}")
        p.check(self.logit_scale_init >= 0, "logit_scale_init",
                f"logit_scale_init must be >= 0 (0 = default), got {self.logit_scale_init}")
        p.check(self.max_logit_scale > 0, "max_logit_scale", f"max_logit_scale must be > 0, got {self.max_logit_scale}")
        p.check(0.0 <= self.mask_ratio < 1.0, "mask_ratio",
                f"mask_ratio must lie in [0, 1) (the fraction of patch tokens dropped in training), got {self.mask_ratio}")
        p.raise_any()

    def kept_patches(self, patches: int, mask_ratio: float | None = None) -> int:
        """Patch tokens per frame that training keeps out of ``patches`` at ``mask_ratio`` (None = this config's):
        ``floor(patches * (1 - ratio))``, at least 1 (FLIP's count; the class token comes on top)."""
        ratio = self.mask_ratio if mask_ratio is None else mask_ratio
        if not 0.0 <= ratio < 1.0:
            raise ValueError(f"mask ratio must lie in [0, 1), got {ratio}")
        return max(1, int(patches * (1.0 - ratio) + 1e-9))


def backbone_problem(cfg: ModelConfig) -> str | None:
    """What can be told about ``cfg.clip`` without building it (no torch): a path that does not exist, or a local
    Hugging Face CLIP directory whose image size is not ``frame_size``. None when nothing is wrong (or a hub id)."""
    import json
    import os

    name = cfg.clip
    if name in NAMED_PATCH:
        return None
    if name.endswith(".pt") or name.startswith((".", "/", "~")):
        if not os.path.exists(os.path.expanduser(name)):
            return (f"model.clip={name!r} does not exist; give an existing OpenAI .pt file or Hugging Face CLIP "
                    f"directory, or a named size ({', '.join(NAMED_SIZES)})")
    config = os.path.join(os.path.expanduser(name), "config.json")
    if not os.path.isfile(config):
        return None
    try:
        with open(config) as f:
            vision = json.load(f).get("vision_config") or {}
        image, patch = int(vision.get("image_size", 224)), int(vision.get("patch_size", 32))
    except (OSError, ValueError, TypeError, AttributeError) as e:
        return f"model.clip={name!r}: {config} is not a readable CLIP config ({e})"
    if image != cfg.frame_size:
        return (f"model.clip={name!r} takes {image}x{image} frames ({patch}-pixel patches) but model.frame_size="
                f"{cfg.frame_size}; set model.frame_size={image} (and shard with the same frame size)")
    return None


@dataclass
class ConvertConfig:
    """``ptrain convert``: import a CLIP4Clip / CLIP2Video checkpoint into an export directory."""

    src: str = opt("", "checkpoint file (pytorch_model.bin.N) or an OpenAI .pt / HF CLIP dir with format=clip")
    out: str = opt("", "export directory to write (model.safetensors + config.json)")
    format: Literal["auto", "clip4clip", "clip2video", "clip"] = opt(
        "auto", "source layout; auto tells CLIP4Clip from CLIP2Video by their head keys"
    )
    head: str = opt("auto", "head to build; auto infers it from the checkpoint keys")
    num_frames: int = opt(12, "frames per clip the exported model expects")
    max_words: int = opt(32, "text length the exported model uses")
    tab_motion: Literal["none", "TAB", "TAB_TDB"] = opt(
        "TAB_TDB", "CLIP2Video center_proj (TAB or TAB_TDB are not told apart by the keys; none when there is no "
        "actionClip, as with sim_type=meanP)")
    tab_weight: float = opt(0.5, "CLIP2Video center_weight")
    compat: Literal["auto", "true", "false"] = opt(
        "auto", "reference quirks: auto = on for CLIP2Video (its released numbers depend on them), off for CLIP4Clip"
    )
    overwrite: bool = opt(False, "replace an existing export directory")

    def __post_init__(self):
        p = Problems()
        p.check(self.head == "auto" or self.head in HEADS, "head",
                f"head must be auto or one of {', '.join(HEADS)}, got {self.head!r}")
        p.raise_any()
