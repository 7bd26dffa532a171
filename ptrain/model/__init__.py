"""The video-text model library: CLIP backbone + CLIP4Clip / CLIP2Video heads, import and export.

    from ptrain.model import ModelConfig, build_model
    model = build_model(ModelConfig(clip="tiny", head="seqTransf", frame_size=32))
    out = model(frames_BTCHW, frame_mask_BT, input_ids_BL, attention_mask_BL)   # {"loss": ..., ...}

    import ptrain
    model = ptrain.load("RUN/checkpoints/step_00001000/export")
    text_ND = model.encode_text(["a man is cooking"])
    logits = model.similarity(text_ND, model.encode_video(frames_BTCHW, frame_mask_BT))

Modules: ``config`` (torch-free configs), ``clip`` (backbone building, OpenAI -> HF conversion),
``blocks`` (the reference-style transformer block), ``heads`` (temporal heads), ``video_text``
(``VideoTextModel``), ``api`` (``load``, ``save_export``), ``convert`` (CLIP4Clip/CLIP2Video import),
``tokenizer`` (CLIP BPE). Importing this package does not import torch; the names below load lazily.
"""

from ptrain.model.config import ConvertConfig, ModelConfig

_LAZY = {
    "build_model": "ptrain.model.video_text",
    "VideoTextModel": "ptrain.model.video_text",
    "load": "ptrain.model.api",
    "save_export": "ptrain.model.api",
}

__all__ = ["ModelConfig", "ConvertConfig", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'ptrain.model' has no attribute {name!r}")
