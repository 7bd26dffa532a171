"""Export and load: the self-describing model directory that downstream jobs read.

    from ptrain.model.api import save_export, load
    save_export(model, "RUN/checkpoints/step_00001000/export")   # model.safetensors + config.json
    model = ptrain.load("RUN/checkpoints/step_00001000/export")   # strict: every key must match

Layout of an export directory:
- ``config.json``: a Hugging Face ``CLIPConfig`` (``model_type: clip``) plus a ``"ptrain"`` section:
  ``format_version``, ``ptrain_version``, ``model`` (the full ``ModelConfig``: head, frames,
  frame size, head options ...), ``normalization`` (mean/std of pixel values in [0, 1]),
  ``tokenizer`` (type, SOT/EOT ids, vocab size, max_words, vocabulary file), ``logit_scale``.
- the tokenizer's vocabulary: ``bpe_simple_vocab_16e6.txt.gz`` (or ``tokenizer/{vocab.json,merges.txt}``
  for a Hugging Face tokenizer), named relatively by ``ptrain.tokenizer.vocab``, so an export can be moved.
- ``model.safetensors``: the CLIP weights under Hugging Face names (``text_model.*``,
  ``vision_model.*``, ``visual_projection.weight``, ``text_projection.weight``, 0-dim ``logit_scale``)
  and the head weights under ``head.*`` / ``tab.*`` (3D patch: ``vision_model.embeddings.patch_embedding_3d.weight``).

So ``transformers.CLIPModel.from_pretrained(export_dir)`` loads the CLIP part (ignoring the head keys)
and ``ptrain.load`` rebuilds the whole model with a strict key check.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import asdict, fields
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import CLIPConfig

from ptrain.version import __version__
from ptrain.model.clip import clip_from_hf_state
from ptrain.model.config import ModelConfig
from ptrain.model.tokenizer import DEFAULT_VOCAB
from ptrain.model.video_text import CLIP_MEAN, CLIP_STD, VideoTextModel

FORMAT_VERSION = 1


def export_state_dict(model: VideoTextModel, state_dict: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Export key layout of ``model.state_dict()`` (or of a consolidated ZeRO-3 state dict)."""
    sd = model.state_dict() if state_dict is None else state_dict
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        key = key[len("module."):] if key.startswith("module.") else key  # a wrapped model's state dict
        if key.startswith("clip."):
            out[key[len("clip."):]] = value
        elif key == "logit_scale.log_scale":
            out["logit_scale"] = value.reshape(())
        else:
            out[key] = value
    return {k: v.detach().cpu().contiguous() for k, v in out.items()}


# What exports before the vocabulary was copied recorded for the shipped vocabulary.
_LEGACY_SHIPPED_VOCAB = "ptrain/model/bpe_simple_vocab_16e6.txt.gz"
_HF_TOKENIZER_FILES = ("vocab.json", "merges.txt")


def _tokenizer_source(model: VideoTextModel) -> Path:
    return Path(model.tokenizer_path or model.cfg.tokenizer or DEFAULT_VOCAB)


def _copy_atomic(src: Path, dst: Path) -> None:
    if dst.exists() and os.path.samefile(src, dst):
        return  # re-saving into the export the model was loaded from
    tmp = dst.with_name(dst.name + ".tmp")
    shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def _copy_vocabulary(model: VideoTextModel, out: Path) -> str:
    """Copy the tokenizer's vocabulary into ``out``; returns its path relative to ``out``."""
    src = _tokenizer_source(model)
    if src.is_dir():  # a Hugging Face tokenizer directory: its two files, under tokenizer/
        (out / "tokenizer").mkdir(exist_ok=True)
        for name in _HF_TOKENIZER_FILES:
            _copy_atomic(src / name, out / "tokenizer" / name)
        return "tokenizer"
    if not src.is_file():
        raise FileNotFoundError(f"tokenizer vocabulary {src} does not exist; the export must carry it (set model.tokenizer).")
    _copy_atomic(src, out / src.name)
    return src.name


def _ptrain_section(model: VideoTextModel, log_scale: torch.Tensor, vocab: str) -> dict:
    cfg = model.cfg
    shipped = not cfg.tokenizer  # '' = the shipped vocabulary (a loaded model reads the export's copy of it)
    return {
        "format_version": FORMAT_VERSION,
        "ptrain_version": __version__,
        # tokenizer: '' = the shipped CLIP vocabulary, else the copy inside the export (relative).
        "model": {**asdict(cfg), "tokenizer": "" if shipped else vocab},
        "normalization": {"mean": list(CLIP_MEAN), "std": list(CLIP_STD), "input": "RGB in [0, 1] after /255"},
        "tokenizer": {
            "type": "clip_bpe",
            "vocab": vocab,  # relative to the export directory: a .txt.gz merges file or a vocab.json + merges.txt dir
            "sot_token_id": 49406,
            "eot_token_id": 49407,
            "vocab_size": model.clip.config.text_config.vocab_size,
            "max_words": cfg.max_words,
            "truncation": "SOT + first max_words-2 tokens + EOT, zero padded",
        },
        "logit_scale": min(float(log_scale.float().exp()), cfg.max_logit_scale),
    }


def save_export(model: VideoTextModel, out_dir: str | os.PathLike, state_dict: dict | None = None) -> Path:
    """Write ``out_dir/{model.safetensors,config.json}`` atomically (files renamed into place).

    ``state_dict``: pass a consolidated state dict (e.g. DeepSpeed ZeRO-3's 16-bit consolidation on
    rank 0) when the module's own parameters are partitioned."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = export_state_dict(model, state_dict)
    config = model.clip.config.to_dict()
    config["architectures"] = ["CLIPModel"]
    config["logit_scale_init_value"] = float(tensors["logit_scale"])
    vocab = _copy_vocabulary(model, out)
    config["ptrain"] = _ptrain_section(model, tensors["logit_scale"], vocab)  # from tensors: ZeRO-3 params may be partitioned
    # Write to temporaries in the same directory, then rename: readers never see half a file.
    with tempfile.NamedTemporaryFile(dir=out, suffix=".safetensors.tmp", delete=False) as f:
        tmp_weights = f.name
    save_file(tensors, tmp_weights, metadata={"format": "pt", "ptrain": "export"})
    tmp_config = out / "config.json.tmp"
    tmp_config.write_text(json.dumps(config, indent=2, sort_keys=True))
    os.replace(tmp_weights, out / "model.safetensors")
    os.replace(tmp_config, out / "config.json")
    return out


def _vocabulary(section: dict, path: Path) -> str | None:
    """The export's vocabulary (absolute path), or None for the shipped one (exports of format 1 that predate the copy)."""
    vocab = section.get("tokenizer", {}).get("vocab") or _LEGACY_SHIPPED_VOCAB
    if vocab == _LEGACY_SHIPPED_VOCAB and not (path / vocab).exists():
        return None
    found = path / vocab  # relative to the export (an absolute path stays absolute)
    if found.is_file() or (found.is_dir() and all((found / f).is_file() for f in _HF_TOKENIZER_FILES)):
        return str(found.resolve())
    raise FileNotFoundError(
        f"{path}/config.json: the tokenizer vocabulary {vocab!r} is not in the export directory; copy the export "
        "directory whole (it carries its vocabulary) or re-export the model."
    )


def _model_config(section: dict, path: Path, vocab: str | None) -> ModelConfig:
    known = {f.name for f in fields(ModelConfig)}
    values = {k: v for k, v in section.get("model", {}).items() if k in known}
    if values.get("tokenizer") and vocab is not None:
        values["tokenizer"] = vocab  # a non-default vocabulary: the export's copy, as a usable path
    try:
        return ModelConfig(**values)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}/config.json: invalid ptrain.model section: {e}") from None


def load(path: str | os.PathLike, map_location: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> VideoTextModel:
    """Load an export directory written by ``save_export`` (or ``ptrain convert``); eval mode."""
    path = Path(path)
    cfg_file, weights = path / "config.json", path / "model.safetensors"
    if not cfg_file.is_file() or not weights.is_file():
        raise FileNotFoundError(
            f"{path} is not a ptrain export directory (needs config.json and model.safetensors); "
            "point at RUN/checkpoints/step_N/export or the output of `ptrain convert`."
        )
    raw = json.loads(cfg_file.read_text())
    section = raw.pop("ptrain", None)
    if section is None:
        raise ValueError(f"{cfg_file} has no 'ptrain' section: this is a plain Hugging Face CLIP; use model.clip={str(path)!r} instead.")
    if section.get("format_version", 0) > FORMAT_VERSION:
        raise ValueError(f"{path} was written by a newer ptrain (format {section['format_version']}); upgrade ptrain.")
    vocab = _vocabulary(section, path)
    cfg = _model_config(section, path, vocab)
    tensors = load_file(str(weights), device="cpu")
    clip_state = {k: v for k, v in tensors.items() if not k.startswith(("head.", "tab."))}
    rest = {k: v for k, v in tensors.items() if k.startswith(("head.", "tab."))}
    clip, scale = clip_from_hf_state(CLIPConfig.from_dict(raw), clip_state, cfg.linear_patch)
    model = VideoTextModel(cfg, clip, scale, init_from_clip=False)
    rest["logit_scale.log_scale"] = tensors["logit_scale"].reshape(1).float()
    if cfg.tdb_proj == "raw":  # exports written before raw TDB dropped its unused LayerNorm
        rest = {k: v for k, v in rest.items() if not k.startswith("head.tdb.trans_layernorm.")}
    missing, unexpected = model.load_state_dict({**{f"clip.{k}": v for k, v in clip.state_dict().items()}, **rest}, strict=False)
    if missing or unexpected:
        raise ValueError(f"{weights}: weights do not match head {cfg.head}: missing {missing[:4]}, unexpected {unexpected[:4]}.")
    model.tokenizer_path = vocab
    model = model.to(map_location)
    if dtype is not None:
        model = model.to(dtype)
    return model.eval()
