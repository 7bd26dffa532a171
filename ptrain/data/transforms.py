"""Clip transforms on uint8 frames: one crop box per clip, applied to every frame.

    box = train_box(h, w, size=224, mode="random", rng=rng)    # or center_box(h, w, 224)
    crop_HWC = apply_box(img_HWC, box, 224)                    # exact slice when no resize is needed
    frames_BTCHW = normalize(frames_uint8_BTCHW)               # float, CLIP mean/std (torch, optional)

A box is ``(x0, y0, x1, y1)`` as *fractions* of the frame, so the same box fits a frame decoded at a
reduced DCT scale. "Short side resized to ``size``" is virtual: the box is chosen in that geometry and
cut from whatever resolution was decoded; when the decoded short side already equals ``size`` and the
box is ``size`` x ``size`` (the usual case: shards store short side = frame_size), the crop is a plain
slice, otherwise only the box is resampled (torch's uint8 antialiased kernels: bicubic for eval, as
CLIP's preprocessing; bilinear for training).

Horizontal flips are off by default: a flipped clip no longer matches "turns left" / "on the right"
captions, so they are an opt-in augmentation.
"""

from __future__ import annotations

import math

import numpy as np

from ptrain.model.config import CLIP_MEAN, CLIP_STD  # torch-free

Box = tuple[float, float, float, float]


def _virtual(h: int, w: int, size: int) -> tuple[int, int]:
    """(H, W) of the frame resized so its short side is ``size``."""
    s = size / min(h, w)
    return max(size, round(h * s)), max(size, round(w * s))


def center_box(h: int, w: int, size: int) -> Box:
    H, W = _virtual(h, w, size)
    y0, x0 = (H - size) // 2, (W - size) // 2
    return x0 / W, y0 / H, (x0 + size) / W, (y0 + size) / H


def train_box(h: int, w: int, size: int, mode: str, rng: np.random.Generator, min_scale: float = 0.5) -> Box:
    """A random box: 'random' (a size x size window), 'random_resized' (area fraction in
    [min_scale, 1], aspect ratio in [3/4, 4/3] log-uniform, as torchvision's RandomResizedCrop on
    the short-side-resized frame) or 'center'."""
    if mode == "center":
        return center_box(h, w, size)
    H, W = _virtual(h, w, size)
    if mode == "random":
        y0 = int(rng.integers(0, H - size + 1))
        x0 = int(rng.integers(0, W - size + 1))
        return x0 / W, y0 / H, (x0 + size) / W, (y0 + size) / H
    if mode != "random_resized":
        raise ValueError(f"unknown crop mode {mode!r}; use 'random', 'random_resized' or 'center'")
    area = H * W
    log_ratio = (math.log(3 / 4), math.log(4 / 3))
    for _ in range(10):
        target = area * rng.uniform(min_scale, 1.0)
        ratio = math.exp(rng.uniform(*log_ratio))
        cw = int(round(math.sqrt(target * ratio)))
        ch = int(round(math.sqrt(target / ratio)))
        if 0 < cw <= W and 0 < ch <= H:
            y0 = int(rng.integers(0, H - ch + 1))
            x0 = int(rng.integers(0, W - cw + 1))
            return x0 / W, y0 / H, (x0 + cw) / W, (y0 + ch) / H
    return center_box(h, w, size)  # torchvision's fallback is a central crop too


def apply_box(img: np.ndarray, box: Box, size: int, flip: bool = False, bicubic: bool = True) -> np.ndarray:
    """The ``size`` x ``size`` uint8 crop of ``img`` [H,W,3] for a fractional box (a view when possible).

    When resampling is needed the box is rounded to whole pixels and resized by torch's uint8
    antialiased kernel: bicubic (CLIP's preprocessing; eval) or bilinear (training), ~3.5x faster
    than PIL's resize on a CPU core and within 1 grey level of PIL's result.
    """
    h, w = img.shape[:2]
    x0, y0, x1, y1 = box[0] * w, box[1] * h, box[2] * w, box[3] * h
    ix0, iy0 = round(x0), round(y0)
    exact = (
        abs(x0 - ix0) < 1e-6 and abs(y0 - iy0) < 1e-6
        and abs((x1 - x0) - size) < 1e-6 and abs((y1 - y0) - size) < 1e-6
    )
    if exact:
        out = img[iy0 : iy0 + size, ix0 : ix0 + size]
    else:
        import torch
        import torch.nn.functional as F

        ix0, iy0 = min(max(ix0, 0), w - 1), min(max(iy0, 0), h - 1)
        ix1, iy1 = max(min(round(x1), w), ix0 + 1), max(min(round(y1), h), iy0 + 1)
        region_1CHW = torch.from_numpy(img[iy0:iy1, ix0:ix1]).permute(2, 0, 1).unsqueeze(0)
        mode = "bicubic" if bicubic else "bilinear"
        out = F.interpolate(region_1CHW, size=(size, size), mode=mode, antialias=True)[0].permute(1, 2, 0).numpy()
    return out[:, ::-1] if flip else out


def normalize(frames_uint8, mean=CLIP_MEAN, std=CLIP_STD):
    """uint8 frames ``[..., 3, H, W]`` (torch) -> float32 normalised with CLIP mean/std (do it on the GPU)."""
    import torch

    x = frames_uint8.float().div_(255.0)
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(3, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(3, 1, 1)
    return x.sub_(m).div_(s)
