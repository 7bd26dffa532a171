"""Layer freezing of the CLIP backbone, CLIP4Clip's way (a property of the model, not of the optimizer).

    frozen = freeze_clip_layers(model, cfg.optim.freeze_layer_num)   # names of the parameters now frozen
"""

from __future__ import annotations

import re

from torch import nn

# CLIP parameters that CLIP4Clip freezes whatever freeze_layer_num >= 0 is (HF names).
_CLIP_STEM = re.compile(r"^clip\.(vision_model\.embeddings|vision_model\.pre_layrnorm|text_model\.embeddings)\.")
_CLIP_LAYER = re.compile(r"^clip\.(vision_model|text_model)\.encoder\.layers\.(\d+)\.")


def freeze_clip_layers(model: nn.Module, freeze_layer_num: int) -> list[str]:
    """CLIP4Clip freezing: k >= 0 freezes CLIP's embeddings, pre-norm and layers < k; -1 none. Returns names."""
    frozen = []
    if freeze_layer_num < 0:
        return frozen
    for name, p in model.named_parameters():
        layer = _CLIP_LAYER.match(name)
        if _CLIP_STEM.match(name) or (layer and int(layer.group(2)) < freeze_layer_num):
            p.requires_grad_(False)
            frozen.append(name)
    return frozen
