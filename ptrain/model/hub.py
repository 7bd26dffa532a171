"""What an export carries for the Hugging Face ecosystem: tokenizer and preprocessor files made from ptrain's own
vocabulary and frame settings, and the ``README.md`` model card.

    from ptrain.model.hub import write_hub_files
    write_hub_files(out_dir, tokenizer, section, clip_config, info={"run_dir": ...}, results=results_json)

Files (all plain JSON / text; none names code to run, e.g. no ``auto_map``):

- ``vocab.json`` + ``merges.txt``: the BPE vocabulary in the layout ``transformers.CLIPTokenizer`` reads (token ->
  id; ``#version: 0.2`` then one merge per line, in rank order), generated from the tokenizer the model uses, so
  its ids equal ``ptrain.model.tokenizer.ClipTokenizer``'s (see the model card for the one difference: ftfy).
- ``tokenizer_config.json`` + ``special_tokens_map.json``: ``CLIPTokenizer``, SOT/EOT, ``model_max_length`` = the
  export's ``max_words`` (``truncation=True`` keeps SOT + max_words-2 tokens + EOT, as ptrain does).
- ``preprocessor_config.json``: ``CLIPImageProcessor`` at the export's frame size (short side resized bicubic,
  centre crop) with CLIP's mean/std, what ``ptrain eval`` does to a frame.
- ``README.md``: what the model is, its head, what it was trained on, its eval results, how to load it.

No torch import: this only writes files.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

from ptrain.model.registry import head_label, head_spec

HF_FILES = ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json",
            "preprocessor_config.json", "README.md")
# What the card's code uses for the export's path; a reader replaces it with theirs (tests replace it too).
CARD_PATH = "path/to/this/export"


def file_mode() -> int:
    """The mode a plainly created file gets (0o666 less the umask): temporaries are created 0o600."""
    try:
        with open("/proc/self/status") as f:  # Linux: reads the umask without changing it
            mask = next(int(line.split()[1], 8) for line in f if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError, IndexError):
        mask = os.umask(0o022)
        os.umask(mask)
    return 0o666 & ~mask


def write_atomic(out: Path, name: str, data: bytes) -> None:
    """``out/name`` written to a fresh temporary of its own (``O_EXCL``, random name, so a planted symlink is never
    followed) and renamed over the old file (a symlink there is replaced, not written through)."""
    fd, tmp = tempfile.mkstemp(dir=out, prefix=f".{name}.", suffix=".tmp")
    try:
        os.fchmod(fd, file_mode())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, out / name)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _json(data: Any) -> bytes:
    return (json.dumps(data, indent=2, ensure_ascii=False) + "\n").encode("utf-8")


def tokenizer_files(tokenizer, max_words: int) -> dict[str, bytes]:
    """The four tokenizer files of ``tokenizer`` (a ``ClipTokenizer``) for ``transformers.CLIPTokenizer``."""
    merges = sorted(tokenizer.bpe_ranks, key=tokenizer.bpe_ranks.get)
    sot, eot = tokenizer.decoder[tokenizer.sot_token_id], tokenizer.decoder[tokenizer.eot_token_id]
    # why these tokens: OpenAI's CLIP as Hugging Face publishes it (unk and pad = EOT); ptrain pads with id 0, but
    # padding never reaches a feature (the text feature is read at the first EOT under either convention)
    special = {"bos_token": sot, "eos_token": eot, "unk_token": eot, "pad_token": eot}
    return {
        "vocab.json": _json(dict(sorted(tokenizer.encoder.items(), key=lambda kv: kv[1]))),
        "merges.txt": ("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges)).encode("utf-8"),
        "tokenizer_config.json": _json({"tokenizer_class": "CLIPTokenizer", "model_max_length": max_words,
                                        "do_lower_case": True, "errors": "replace",
                                        "clean_up_tokenization_spaces": False, **special}),
        "special_tokens_map.json": _json(special),
    }


def preprocessor_file(frame_size: int, mean: list[float], std: list[float]) -> bytes:
    """``preprocessor_config.json``: CLIP's image processor at ``frame_size``."""
    return _json({
        "image_processor_type": "CLIPImageProcessor", "processor_class": "CLIPProcessor",
        "do_resize": True, "size": {"shortest_edge": frame_size}, "resample": 3,  # PIL bicubic, as ptrain eval
        "do_center_crop": True, "crop_size": {"height": frame_size, "width": frame_size},
        "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
        "image_mean": list(mean), "image_std": list(std), "do_convert_rgb": True,
    })


# ----------------------------------------------------------------------------------------------
# the model card


def _text(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return ", ".join(_text(v) for v in value)
    if isinstance(value, dict):
        return json.dumps(value, sort_keys=True, ensure_ascii=False)
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _cell(value: Any) -> str:
    """One markdown table cell: lists joined, mappings as JSON, pipes and newlines escaped."""
    return _text(value).replace("|", "\\|").replace("\r", " ").replace("\n", " ")


def _head_text(model: dict) -> str:
    try:
        spec = head_spec(str(model.get("head")))
    except ValueError:
        return f"head {model.get('head')!r} (unknown to this ptrain)"
    if not spec.alignment:
        return spec.summary
    glob = head_spec(str(model.get("tab_global", "TDB")))
    return f"{spec.summary}; its global branch is {glob.name}, {glob.summary}"


def _metric(value: Any) -> str:
    """A number as the card prints it; '–' for anything else (a results file is read, not trusted)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return "–"
    return _cell(float(value))


def _results_section(results: dict[str, Any]) -> list[str]:
    """The eval numbers of a ``ptrain eval`` / ``ptrain finetune`` results.json as a table."""
    m = results.get("all") if isinstance(results.get("all"), dict) else {}
    ks = [k for k in (1, 5, 10, 50) if f"t2v_R{k}" in m]
    if not ks:
        return ["The results given with this export hold no retrieval metrics."]
    what = [f"protocol **{_cell(results.get('protocol', '?'))}**"]
    if all(isinstance(m.get(k), (int, float)) and math.isfinite(m[k]) for k in ("n_text", "n_video")):
        what.append(f"{int(m['n_text'])} queries x {int(m['n_video'])} videos")
    for key, label in (("benchmark", "benchmark"), ("split", "split"), ("selected_on", "selected on"),
                       ("shards", "shards")):
        if results.get(key):
            what.append(f"{label} {_cell(results[key])}")
    lines = [", ".join(what) + ".", "", "| direction | " + " | ".join(f"R@{k}" for k in ks) + " | MdR | MnR |",
             "|" + "---|" * (len(ks) + 3)]
    names = [("t2v", "text -> video"), ("v2t", "video -> text"), ("v2t_strict", "video -> text (strict)")]
    for d, name in names:
        if f"{d}_R1" in m:
            cells = [_metric(m.get(f"{d}_{k}")) for k in [f"R{k}" for k in ks] + ["MdR", "MnR"]]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def model_card(section: dict[str, Any], clip_config: dict[str, Any], info: dict[str, Any] | None = None,
               results: dict[str, Any] | None = None) -> str:
    """``README.md`` of an export: ``section`` is config.json's ``ptrain`` section, ``clip_config`` its CLIP part;
    ``info``: how it was made (run dir, steps, data sources; or the converted checkpoint); ``results``: a
    results.json of ``ptrain eval`` (or a fine-tune's), when known."""
    model = section.get("model", {})
    label = head_label(str(model.get("head", "?")), str(model.get("tab_global", "TDB")))
    T, S, L = model.get("num_frames"), model.get("frame_size"), model.get("max_words")
    v, t = clip_config.get("vision_config", {}), clip_config.get("text_config", {})
    lines = [
        "---",
        f"tags: [ptrain, video-text-retrieval, clip, {label}]",
        "---",
        "",
        f"# Video-text retrieval model, {label} head (ptrain export)",
        "",
        f"A CLIP4Clip / CLIP2Video-class video-text retrieval model written by ptrain {section.get('ptrain_version')} "
        f"(export format {section.get('format_version')}). A CLIP backbone embeds each frame and the caption; the "
        f"**{label}** head turns the {T} frame embeddings of a clip into the video's score against a caption "
        f"({_head_text(model)}).",
        "",
        "| | |",
        "|---|---|",
        f"| head | {_cell(label)} (cross_layers {model.get('cross_layers')}) |",
        f"| frames per clip | {T} (uint8 RGB, {S} x {S}) |",
        f"| max words | {L} tokens (SOT + {L - 2 if isinstance(L, int) else '?'} BPE tokens + EOT) |",
        f"| backbone | {_cell(model.get('clip'))}: vision {v.get('num_hidden_layers')} layers, width "
        f"{v.get('hidden_size')}, {v.get('patch_size')} px patches ({model.get('linear_patch')}); text "
        f"{t.get('num_hidden_layers')} layers, width {t.get('hidden_size')}; {clip_config.get('projection_dim')}-d "
        "joint space |",
        f"| logit scale | {_cell(float(section.get('logit_scale', float('nan'))))} |",
    ]
    if model.get("compat"):
        lines.append("| compat | true: reproduces reference quirks of an imported checkpoint |")
    lines += ["", "## How it was made", ""]
    if info:
        lines += ["| | |", "|---|---|"] + [f"| {_cell(k)} | {_cell(v)} |" for k, v in info.items()]
    else:
        lines.append("Not recorded (the export was written without training information).")
    lines += ["", "## Evaluation", ""]
    if results:
        lines += _results_section(results)
    else:
        lines.append(f"No evaluation was recorded with this export: `ptrain eval export={CARD_PATH} shards=[DIR]` "
                     "writes results.json and results.md.")
    # meanP is parameter-free: the mean of the normalised frame embeddings is its video embedding exactly
    hf_video = "video = F.normalize(out.image_embeds.mean(0, keepdim=True), dim=-1)  # " + (
        "= ptrain's meanP video embedding" if label == "meanP" else f"frames averaged: NOT the {label} head (ptrain.load has it)")
    lines += [
        "",
        "## Use with ptrain (the whole model, head included)",
        "",
        "```python",
        "import torch, ptrain",
        f'model = ptrain.load("{CARD_PATH}")',
        "T, S = model.cfg.num_frames, model.cfg.frame_size",
        "frames = torch.full((1, T, 3, S, S), 128, dtype=torch.uint8)  # one clip: T uint8 RGB frames",
        'scores = model.similarity(model.encode_text(["a man is cooking"]), model.encode_video(frames))',
        "print(scores)",
        "```",
        "",
        f"`ptrain eval export={CARD_PATH} shards=[DIR]` scores a benchmark's shards (`ptrain shard` writes them).",
        "",
        "## Use with transformers (the CLIP backbone, frame by frame)",
        "",
        "```python",
        "import torch, torch.nn.functional as F",
        "from PIL import Image",
        "from transformers import CLIPModel, CLIPProcessor",
        f'model = CLIPModel.from_pretrained("{CARD_PATH}")  # head.* / tab.* tensors are reported unused',
        f'processor = CLIPProcessor.from_pretrained("{CARD_PATH}")',
        f"frames = [Image.new(\"RGB\", ({S}, {S}), (128, 128, 128))] * {T}  # one clip's frames",
        'inputs = processor(text=["a man is cooking"], images=frames, return_tensors="pt", padding="max_length", '
        "truncation=True)",
        "with torch.no_grad():",
        "    out = model(**inputs)",
        hf_video,
        "scores = model.logit_scale.exp() * out.text_embeds @ video.T",
        "print(scores)",
        "```",
        "",
        f"The tokenizer files give ptrain's ids, and `model_max_length` = {L} truncates as ptrain does (SOT + "
        f"{L - 2 if isinstance(L, int) else '?'} tokens + EOT). Three differences: ptrain repairs text with ftfy, "
        "unescapes HTML and lower-cases with Python's rules before tokenizing (curly quotes, `&amp;`, mojibake, a "
        "word-final capital sigma): pass `ptrain.model.tokenizer.clean_text(text)` to the Hugging Face tokenizer "
        "to get ptrain's ids for such text; a caption that spells `<|endoftext|>` is text to ptrain and the "
        "special token to Hugging Face; Hugging Face pads with EOT, ptrain with 0 (the attention masks agree).",
        "",
    ]
    return "\n".join(lines)


def write_hub_files(out: Path, tokenizer, section: dict[str, Any], clip_config: dict[str, Any],
                    info: dict[str, Any] | None = None, results: dict[str, Any] | None = None) -> None:
    """Write every file of ``HF_FILES`` into the export directory ``out``."""
    model = section["model"]
    files = tokenizer_files(tokenizer, int(model["max_words"]))
    norm = section["normalization"]
    files["preprocessor_config.json"] = preprocessor_file(int(model["frame_size"]), norm["mean"], norm["std"])
    files["README.md"] = model_card(section, clip_config, info, results).encode("utf-8")
    for name in HF_FILES:
        write_atomic(out, name, files[name])
