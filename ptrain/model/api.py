"""Export and load: the self-describing model directory that downstream jobs read.

    from ptrain.model.api import save_export, load
    save_export(model, "RUN/checkpoints/step_00001000/export", info={"run_dir": "RUN"})   # + card, HF files
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

- for the Hugging Face ecosystem (``ptrain/model/hub.py``): ``vocab.json``, ``merges.txt``,
  ``tokenizer_config.json``, ``special_tokens_map.json`` (``CLIPTokenizer``, ids equal to ptrain's),
  ``preprocessor_config.json`` (``CLIPImageProcessor`` at the frame size, CLIP mean/std) and ``README.md``
  (the model card). ``ptrain.load`` never reads them (exports written before them load as before).

So ``transformers.CLIPModel`` / ``CLIPTokenizer`` / ``CLIPProcessor.from_pretrained(export_dir)`` load the CLIP part
(ignoring the head keys), its tokenizer and its frame preprocessing, and ``ptrain.load`` rebuilds the whole model
with a strict key check.
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any, Literal, get_args, get_origin, get_type_hints

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import CLIPConfig, CLIPModel

from ptrain.data.format import MAX_FRAMES
from ptrain.model.clip import clip_from_hf_state, enable_3d_patch
from ptrain.model.config import HEADS, ModelConfig
from ptrain.model.hub import file_mode, write_atomic, write_hub_files
from ptrain.model.tokenizer import DEFAULT_VOCAB
from ptrain.version import __version__
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
    write_atomic(dst.parent, dst.name, src.read_bytes())  # a fresh temporary: a planted *.tmp symlink is never followed


def _copy_vocabulary(model: VideoTextModel, out: Path) -> str:
    """Copy the tokenizer's vocabulary into ``out``; returns its path relative to ``out``."""
    src = _tokenizer_source(model)
    if src.is_dir():  # a Hugging Face tokenizer directory: its two files, under tokenizer/
        if (out / "tokenizer").is_symlink():  # never write through a link planted in an export saved over
            (out / "tokenizer").unlink()
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


def save_export(model: VideoTextModel, out_dir: str | os.PathLike, state_dict: dict | None = None, *,
                info: dict[str, Any] | None = None, results: dict[str, Any] | None = None) -> Path:
    """Write the export directory ``out_dir``: ``model.safetensors``, ``config.json``, the vocabulary, the Hugging
    Face tokenizer / preprocessor files and the ``README.md`` model card, each atomically (renamed into place).

    ``state_dict``: pass a consolidated state dict (e.g. DeepSpeed ZeRO-3's 16-bit consolidation on
    rank 0) when the module's own parameters are partitioned. ``info``: how the model was made, for the card
    (a training checkpoint: run dir, steps, data sources; ``ptrain convert``: the source checkpoint); ``results``:
    a results.json of ``ptrain eval`` or a fine-tune, when known."""
    from ptrain.model.tokenizer import get_tokenizer

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = export_state_dict(model, state_dict)
    config = model.clip.config.to_dict()
    config["architectures"] = ["CLIPModel"]
    config["logit_scale_init_value"] = float(tensors["logit_scale"])
    vocab = _copy_vocabulary(model, out)
    config["ptrain"] = _ptrain_section(model, tensors["logit_scale"], vocab)  # from tensors: ZeRO-3 params may be partitioned
    # the tokenizer the model itself uses (the same cached instance), so the HF files give its ids
    tokenizer = get_tokenizer(model.tokenizer_path or model.cfg.tokenizer or None)
    write_hub_files(out, tokenizer, config["ptrain"], config, info=info, results=results)
    # Write to temporaries in the same directory, then rename: readers never see half a file.
    with tempfile.NamedTemporaryFile(dir=out, suffix=".safetensors.tmp", delete=False) as f:
        tmp_weights = f.name
    save_file(tensors, tmp_weights, metadata={"format": "pt", "ptrain": "export"})
    os.chmod(tmp_weights, file_mode())  # a temporary is created 0o600; the export is as readable as any new file
    os.replace(tmp_weights, out / "model.safetensors")
    write_atomic(out, "config.json", json.dumps(config, indent=2, sort_keys=True).encode())
    return out


# ----------------------------------------------------------------------------------------------
# loading: an export directory is untrusted input (docs/threat_model.md). Everything in config.json is checked
# before it is used: its files must lie inside the directory, and every dimension must agree with the weights'
# shapes (read from the safetensors header, without loading a tensor) before any module is allocated.

_MAX_CONFIG_BYTES = 16 << 20  # a config.json is a few kB
_REEXPORT = "restore the export directory from its source or re-export the model"


def _inside(path: Path, rel: Any, what: str) -> Path:
    """``path / rel`` when it names a file inside the export directory (relative, no '..', no symlink leading
    out); a ValueError naming ``what`` otherwise. The file is never opened here."""
    where = path / "config.json"
    if not isinstance(rel, str) or not rel or "\0" in rel or os.path.isabs(rel) or ".." in Path(rel).parts:
        raise ValueError(f"{where}: {what} {rel!r} is not a path inside the export directory (relative, without "
                         f"'..'); an export names only its own files: {_REEXPORT}.")
    found = (path / rel).resolve()
    if not found.is_relative_to(path.resolve()):
        raise ValueError(f"{where}: {what} {rel!r} resolves outside the export directory (a symlink); copy the "
                         "export with its files (cp -rL) or re-export the model.")
    return found


def _vocabulary(section: dict, path: Path) -> str | None:
    """The export's vocabulary (absolute path inside the export), or None for the shipped one (exports of format 1
    that predate the copy)."""
    tokenizer = section.get("tokenizer", {})
    if not isinstance(tokenizer, dict):
        raise ValueError(f"{path}/config.json: ptrain.tokenizer must be an object, got {type(tokenizer).__name__}; "
                         f"{_REEXPORT}.")
    vocab = tokenizer.get("vocab") or _LEGACY_SHIPPED_VOCAB
    found = _inside(path, vocab, "the tokenizer vocabulary")
    if vocab == _LEGACY_SHIPPED_VOCAB and not found.exists():
        return None
    if found.is_file():
        return str(found)
    if found.is_dir() and all((found / f).is_file() for f in _HF_TOKENIZER_FILES):
        for f in _HF_TOKENIZER_FILES:  # each file of a tokenizer directory must stay inside too
            _inside(path, f"{vocab}/{f}", "the tokenizer vocabulary")
        return str(found)
    raise FileNotFoundError(
        f"{path}/config.json: the tokenizer vocabulary {vocab!r} is not in the export directory; copy the export "
        "directory whole (it carries its vocabulary) or re-export the model."
    )


def _read_config(path: Path) -> tuple[dict, dict]:
    """``(Hugging Face CLIP config, ptrain section)`` of ``path/config.json``; one clear error per malformation."""
    cfg_file = _inside(path, "config.json", "config.json")
    if cfg_file.stat().st_size > _MAX_CONFIG_BYTES:
        raise ValueError(f"{cfg_file}: {cfg_file.stat().st_size} bytes, a config.json has at most {_MAX_CONFIG_BYTES}; "
                         f"{_REEXPORT}.")
    try:
        raw = json.loads(cfg_file.read_bytes())
    except json.JSONDecodeError as e:  # its message names the position, never the content
        raise ValueError(f"{cfg_file}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno}); {_REEXPORT}.") from None
    except (ValueError, RecursionError) as e:
        raise ValueError(f"{cfg_file}: not valid UTF-8 JSON ({type(e).__name__}); {_REEXPORT}.") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{cfg_file}: holds a JSON {type(raw).__name__}, not an object; {_REEXPORT}.")
    section = raw.pop("ptrain", None)
    if section is None:
        raise ValueError(f"{cfg_file} has no 'ptrain' section: this is a plain Hugging Face CLIP; use model.clip={str(path)!r} instead.")
    if not isinstance(section, dict):
        raise ValueError(f"{cfg_file}: the 'ptrain' section must be an object, got {type(section).__name__}; {_REEXPORT}.")
    version = section.get("format_version", 0)
    if isinstance(version, bool) or not isinstance(version, int):
        raise ValueError(f"{cfg_file}: ptrain.format_version must be an integer, got {version!r}; {_REEXPORT}.")
    if version > FORMAT_VERSION:
        raise ValueError(f"{path} was written by a newer ptrain (format {version}); upgrade ptrain.")
    scale = section.get("logit_scale", 1.0)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"{cfg_file}: ptrain.logit_scale must be a finite positive number, got {scale!r}; {_REEXPORT}.")
    return raw, section


def _checked_type(value: Any, tp: Any) -> bool:
    """Whether a JSON value has a ModelConfig field's type exactly (an export is written by ptrain, not typed)."""
    if get_origin(tp) is Literal:
        return isinstance(value, str) and value in get_args(tp)
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    return isinstance(value, tp)


def _model_config(section: dict, path: Path, vocab: str | None) -> ModelConfig:
    cfg_file = path / "config.json"
    model = section.get("model", {})
    if not isinstance(model, dict):
        raise ValueError(f"{cfg_file}: ptrain.model must be an object, got {type(model).__name__}; {_REEXPORT}.")
    hints = get_type_hints(ModelConfig)
    values = {k: v for k, v in model.items() if k in hints}
    for key, value in values.items():
        if _checked_type(value, hints[key]):
            continue
        if key == "head":
            raise ValueError(f"{cfg_file}: ptrain.model.head is {value!r}, not a head this ptrain knows "
                             f"({', '.join(HEADS)}); upgrade ptrain if a newer one wrote it, or {_REEXPORT}.")
        want = ", ".join(map(repr, get_args(hints[key]))) if get_origin(hints[key]) is Literal else \
            ("a finite number" if hints[key] is float else getattr(hints[key], "__name__", str(hints[key])))
        raise ValueError(f"{cfg_file}: ptrain.model.{key} must be {want}, got {value!r}; {_REEXPORT}.")
    if values.get("tokenizer"):
        if vocab is None:  # never a path of its own: only the export's checked copy is ever read
            raise ValueError(f"{cfg_file}: ptrain.model.tokenizer names a vocabulary but the export carries none; "
                             f"{_REEXPORT}.")
        values["tokenizer"] = vocab  # a non-default vocabulary: the export's copy, as a usable path
    if values.get("num_frames", 1) > MAX_FRAMES:  # sizes every video batch the model is given
        raise ValueError(f"{cfg_file}: ptrain.model.num_frames={values['num_frames']} is more than a shard holds "
                         f"({MAX_FRAMES}); {_REEXPORT}.")
    try:
        return ModelConfig(**values)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{cfg_file}: invalid ptrain.model section: {e}") from None


def _weight_shapes(weights: Path) -> dict[str, tuple[int, ...]]:
    """Every tensor's shape from the safetensors header (no tensor is read)."""
    try:
        with safe_open(str(weights), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as e:  # noqa: BLE001 - SafetensorError, OSError: reported with the file and the fix
        raise ValueError(f"{weights}: not a readable safetensors file ({type(e).__name__}); {_REEXPORT}.") from None


_CLIP_DIMS = {"text_config": ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                              "vocab_size", "max_position_embeddings"),
              "vision_config": ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                                "image_size", "patch_size", "num_channels")}
_CLIP_FLOATS = ("layer_norm_eps", "attention_dropout", "dropout", "initializer_range", "initializer_factor")


def _number(v: Any, integer: bool) -> bool:
    if isinstance(v, bool) or not isinstance(v, int if integer else (int, float)):
        return False
    return v >= 1 if integer else math.isfinite(v)


def _clip_config(raw: dict, cfg_file: Path) -> CLIPConfig:
    """The Hugging Face CLIP config of an export, its sizes positive integers and its rates finite numbers."""
    checks = [(raw, "", ("projection_dim",), True), (raw, "", ("logit_scale_init_value",), False)]
    for sub, keys in _CLIP_DIMS.items():
        part = raw.get(sub)
        if not isinstance(part, dict):
            raise ValueError(f"{cfg_file}: {sub} must be an object, got {type(part).__name__}; {_REEXPORT}.")
        checks += [(part, f"{sub}.", keys, True), (part, f"{sub}.", _CLIP_FLOATS, False)]
    for part, prefix, keys, integer in checks:
        for k in keys:
            v = part.get(k)
            if v is not None and not _number(v, integer):
                want = "a positive integer" if integer else "a finite number"
                raise ValueError(f"{cfg_file}: {prefix}{k} must be {want}, got {v!r}; {_REEXPORT}.")
    try:
        return CLIPConfig.from_dict(raw)
    except Exception as e:  # noqa: BLE001 - transformers raises several kinds for a malformed config
        raise ValueError(f"{cfg_file}: not a valid CLIP config ({type(e).__name__}: {e}); {_REEXPORT}.") from None


def _mismatch(cfg_file: Path, weights: Path, what: str, key: str, want: Any, have: Any) -> ValueError:
    return ValueError(
        f"{cfg_file}: {what} gives {key} the shape {want} but {weights.name} holds {have}: config.json does not "
        f"describe these weights (edited, or from another export); {_REEXPORT}."
    )


def _layers(shapes: dict, prefix: str) -> int:
    ids = {int(m.group(1)) for k in shapes for m in [re.match(re.escape(prefix) + r"(\d+)\.", k)] if m}
    return max(ids) + 1 if ids else 0


def _check_clip(clip_cfg: CLIPConfig, cfg: ModelConfig, shapes: dict, cfg_file: Path, weights: Path) -> None:
    """The CLIP dimensions of config.json against the weights: these size the backbone, so they are checked first."""
    t, v = clip_cfg.text_config, clip_cfg.vision_config
    if v.image_size % v.patch_size:
        raise ValueError(f"{cfg_file}: vision_config.image_size={v.image_size} is not a multiple of patch_size="
                         f"{v.patch_size}; {_REEXPORT}.")
    expect = [
        ("text_config.vocab_size and hidden_size", "text_model.embeddings.token_embedding.weight", (t.vocab_size, t.hidden_size)),
        ("text_config.max_position_embeddings", "text_model.embeddings.position_embedding.weight",
         (t.max_position_embeddings, t.hidden_size)),
        ("text_config.intermediate_size", "text_model.encoder.layers.0.mlp.fc1.weight", (t.intermediate_size, t.hidden_size)),
        ("vision_config.hidden_size, num_channels and patch_size", "vision_model.embeddings.patch_embedding.weight",
         (v.hidden_size, v.num_channels, v.patch_size, v.patch_size)),
        ("vision_config.image_size and patch_size", "vision_model.embeddings.position_embedding.weight",
         ((v.image_size // v.patch_size) ** 2 + 1, v.hidden_size)),
        ("vision_config.intermediate_size", "vision_model.encoder.layers.0.mlp.fc1.weight", (v.intermediate_size, v.hidden_size)),
        ("projection_dim", "visual_projection.weight", (clip_cfg.projection_dim, v.hidden_size)),
        ("projection_dim", "text_projection.weight", (clip_cfg.projection_dim, t.hidden_size)),
    ]
    for what, key, want in expect:
        if shapes.get(key) != want:
            raise _mismatch(cfg_file, weights, what, key, want, shapes.get(key, "no such tensor"))
    for what, prefix, n in [("text_config.num_hidden_layers", "text_model.encoder.layers.", t.num_hidden_layers),
                            ("vision_config.num_hidden_layers", "vision_model.encoder.layers.", v.num_hidden_layers)]:
        have = _layers(shapes, prefix)
        if have != n:
            raise ValueError(f"{cfg_file}: {what}={n} but {weights.name} holds {have} layers under {prefix}*; "
                             f"config.json does not describe these weights; {_REEXPORT}.")
    if cfg.frame_size != v.image_size:
        raise ValueError(f"{cfg_file}: ptrain.model.frame_size={cfg.frame_size} but the weights take "
                         f"{v.image_size}x{v.image_size} frames (vision_config.image_size); {_REEXPORT}.")
    stacks = {k[: m.end()] for k in shapes if k.startswith(("head.", "tab.")) for m in [re.search(r"resblocks\.", k)] if m}
    head_layers = max((_layers(shapes, prefix) for prefix in stacks), default=0)
    stacked = (cfg.tab_global if cfg.head == "TAB" else cfg.head) in ("seqTransf", "TDB", "tightTransf")
    if stacked and cfg.cross_layers > head_layers:  # each layer is a module built before shapes can be compared
        raise ValueError(f"{cfg_file}: ptrain.model.cross_layers={cfg.cross_layers} but the head weights hold at most "
                         f"{head_layers} layers; {_REEXPORT}.")


def _check_model(clip_cfg: CLIPConfig, cfg: ModelConfig, shapes: dict, cfg_file: Path, weights: Path) -> None:
    """Every tensor of the model config.json describes against the weights, from a model built on the meta device
    (shapes only, nothing allocated): key by key, with both shapes."""
    try:
        with torch.device("meta"):
            clip = CLIPModel(clip_cfg)
            if cfg.linear_patch == "3d" or "vision_model.embeddings.patch_embedding_3d.weight" in shapes:
                enable_3d_patch(clip)
            del clip.logit_scale
            model = VideoTextModel(cfg, clip, 1.0, init_from_clip=False)
    except Exception as e:  # noqa: BLE001 - a config that cannot even describe a model
        raise ValueError(f"{cfg_file}: describes no buildable model ({type(e).__name__}: {e}); {_REEXPORT}.") from None
    expected: dict[str, tuple[int, ...]] = {}
    for key, value in model.state_dict().items():
        if key == "logit_scale.log_scale":
            expected["logit_scale"] = ()
        elif not key.endswith("position_ids"):
            expected[key[len("clip."):] if key.startswith("clip.") else key] = tuple(value.shape)
    for key, want in expected.items():
        if key in shapes and shapes[key] != want:
            raise _mismatch(cfg_file, weights, f"ptrain.model (head {cfg.head})", key, want, shapes[key])
    legacy = "head.tdb.trans_layernorm." if cfg.tdb_proj == "raw" else None  # raw TDB dropped its unused LayerNorm
    missing = [k for k in expected if k not in shapes and "patch_embedding_3d" not in k]
    unexpected = [k for k in shapes if k not in expected and not (legacy and k.startswith(legacy))]
    if missing or unexpected:
        raise ValueError(f"{weights}: weights do not match head {cfg.head}: missing {missing[:4]}, unexpected "
                         f"{unexpected[:4]}; {_REEXPORT}.")


def load(path: str | os.PathLike, map_location: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> VideoTextModel:
    """Load an export directory written by ``save_export`` (or ``ptrain convert``); eval mode.

    The directory is untrusted: its files must lie inside it, config.json is checked field by field and against
    the weights' shapes before anything is allocated, and every problem is a ValueError naming the file and the fix.
    """
    path = Path(path)
    cfg_file, weights = path / "config.json", path / "model.safetensors"
    if not cfg_file.is_file() or not weights.is_file():
        raise FileNotFoundError(
            f"{path} is not a ptrain export directory (needs config.json and model.safetensors); "
            "point at RUN/checkpoints/step_N/export or the output of `ptrain convert`."
        )
    raw, section = _read_config(path)
    vocab = _vocabulary(section, path)
    cfg = _model_config(section, path, vocab)
    shapes = _weight_shapes(_inside(path, "model.safetensors", "the weights file"))
    if shapes.get("logit_scale") != ():
        raise _mismatch(cfg_file, weights, "the export format", "logit_scale", (), shapes.get("logit_scale", "no such tensor"))
    clip_cfg = _clip_config(raw, cfg_file)
    _check_clip(clip_cfg, cfg, shapes, cfg_file, weights)
    _check_model(clip_cfg, cfg, shapes, cfg_file, weights)
    tensors = load_file(str(weights), device="cpu")
    if not torch.isfinite(tensors["logit_scale"]).all():
        raise ValueError(f"{weights}: logit_scale is {float(tensors['logit_scale'])}, not finite; {_REEXPORT}.")
    clip_state = {k: v for k, v in tensors.items() if not k.startswith(("head.", "tab."))}
    rest = {k: v for k, v in tensors.items() if k.startswith(("head.", "tab."))}
    clip, scale = clip_from_hf_state(clip_cfg, clip_state, cfg.linear_patch)
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
