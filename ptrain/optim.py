"""Parameter groups and the learning-rate schedule, in plain torch (DeepSpeed only wraps what this builds).

    groups = param_groups(model, cfg.optim)                 # {clip, new} x {decay, no_decay}
    optimizer = build_optimizer(model, cfg.optim)           # torch AdamW over those groups
    set_lr(optimizer, lr_multiplier(step, cfg.optim, cfg.max_steps))

CLIP4Clip's two learning rates: the CLIP backbone and the temperature run at ``lr * coef_lr``, the new modules
(temporal head, TAB) at ``lr``. Weight decay never applies to norms, biases, embeddings or the temperature. The
schedule is a pure function of the optimizer step: linear warmup, then cosine to ``min_lr_ratio`` (or constant).
"""

from __future__ import annotations

import math
import re
from typing import Any

import torch
from torch import nn

from ptrain.configs import OptimConfig

# Names that never get weight decay besides 1-D tensors (norms, biases, class embedding, log-temperature).
_NO_DECAY_2D = re.compile(r"(token_embedding|position_embedding|position_embeddings)\.weight$")


def _no_decay(name: str, p: torch.Tensor) -> bool:
    return p.ndim < 2 or bool(_NO_DECAY_2D.search(name)) or "logit_scale" in name


def param_groups(model: nn.Module, cfg: OptimConfig) -> list[dict[str, Any]]:
    """{clip, new} x {decay, no_decay}; CLIP params and the temperature at lr * coef_lr."""
    names = model.param_group_names() if hasattr(model, "param_group_names") else None
    clip_names = set(names["clip"]) if names else None
    buckets: dict[tuple[str, bool], list[torch.Tensor]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        is_clip = name in clip_names if clip_names is not None else name.startswith(("clip.", "logit_scale."))
        buckets.setdefault(("clip" if is_clip else "new", _no_decay(name, p)), []).append(p)
    groups = []
    for (part, no_decay), params in sorted(buckets.items()):
        base_lr = cfg.lr * (cfg.coef_lr if part == "clip" else 1.0)
        groups.append(
            {
                "params": params,
                "name": f"{part}_{'no_decay' if no_decay else 'decay'}",
                "weight_decay": 0.0 if no_decay else cfg.weight_decay,
                "lr": base_lr,
                "base_lr": base_lr,
            }
        )
    return groups


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    """AdamW over :func:`param_groups` (``foreach=False``: DeepSpeed's ZeRO flattens the groups itself)."""
    groups = param_groups(model, cfg)
    if not groups:
        raise ValueError("no trainable parameters: optim.freeze_layer_num froze everything and the model has no head")
    return torch.optim.AdamW(groups, betas=tuple(cfg.betas), eps=cfg.eps, foreach=False)


def warmup_steps(cfg: OptimConfig, max_steps: int) -> int:
    return cfg.warmup_steps if cfg.warmup_steps >= 0 else int(round(cfg.warmup_fraction * max_steps))


def lr_multiplier(step: int, cfg: OptimConfig, max_steps: int) -> float:
    """LR factor for optimizer step ``step`` (0-based): linear warmup, then cosine (or constant)."""
    warm = warmup_steps(cfg, max_steps)
    if step < warm:
        return (step + 1) / warm
    if cfg.schedule == "constant" or max_steps <= warm:
        return 1.0
    progress = min(1.0, (step - warm) / max(1, max_steps - warm))
    return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, multiplier: float) -> dict[str, float]:
    """Set every group's lr to base_lr * multiplier; returns {group name: lr}."""
    out = {}
    for group in optimizer.param_groups:
        group["lr"] = group["base_lr"] * multiplier
        out[group.get("name", str(len(out)))] = group["lr"]
    return out


def apply_group_hparams(optimizer: torch.optim.Optimizer, model: nn.Module, cfg: OptimConfig) -> None:
    """Re-apply this config's per-group base lr and weight decay (after loading a checkpoint).

    A checkpoint restores torch's param-group dicts as they were saved, so without this a resumed run
    would silently keep the old ``optim.lr`` / ``coef_lr`` / ``weight_decay``."""
    fresh = {g["name"]: g for g in param_groups(model, cfg)}
    for group in optimizer.param_groups:
        ref = fresh.get(group.get("name"))
        if ref is not None:
            group["base_lr"], group["weight_decay"] = ref["base_lr"], ref["weight_decay"]
