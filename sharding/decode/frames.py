"""The frames of a decode request: its target times in order, the frames kept for them, resizing and JPEG encoding.

    targets = flatten_targets(clips)                        # [(t, clip_index, slot)] sorted by time
    kept = Frames(clips, frame_size=224, center_crop=False, quality=90)
    kept.take(targets[i], serial, pts, lambda: rgb_array)   # a decoder hands over the frame on screen at a target
"""

from __future__ import annotations

import io


def output_size(width: int, height: int, frame_size: int) -> tuple[int, int]:
    """(w, h) with the short side equal to ``frame_size``, aspect kept."""
    if width <= height:
        return frame_size, max(1, round(height * frame_size / width))
    return max(1, round(width * frame_size / height)), frame_size


def encode_jpeg(rgb, quality: int, center_crop: bool, frame_size: int) -> bytes:
    """uint8 HxWx3 RGB (already resized) -> JPEG bytes, optionally center-cropped to a square."""
    import numpy as np

    if center_crop:
        h, w = rgb.shape[:2]
        top, left = (h - frame_size) // 2, (w - frame_size) // 2
        rgb = rgb[top: top + frame_size, left: left + frame_size]
    rgb = np.ascontiguousarray(rgb)
    try:
        import simplejpeg

        return simplejpeg.encode_jpeg(rgb, quality=quality, colorspace="RGB", colorsubsampling="420")
    except ImportError:  # pragma: no cover - simplejpeg is a dependency; PIL is the fallback
        from PIL import Image

        buf = io.BytesIO()
        Image.fromarray(rgb).save(buf, "JPEG", quality=quality)
        return buf.getvalue()


def flatten_targets(clips):
    """[(t, clip_i, slot_j)] sorted by time."""
    return sorted((float(t), ci, sj) for ci, (_start, _end, targets) in enumerate(clips) for sj, t in enumerate(targets))


class Frames:
    """Frames kept for the targets, JPEG-encoded as soon as they are taken (bounded memory on long videos)."""

    def __init__(self, clips, frame_size: int, center_crop: bool, quality: int):
        self.results = [[None] * len(t) for (_s, _e, t) in clips]  # per clip, per target: the serial of its frame
        self.jpeg: dict[int, tuple[float, bytes]] = {}  # frame serial -> (pts, jpeg)
        self.frame_size, self.center_crop, self.quality = frame_size, center_crop, quality

    def take(self, target, serial: int, pts: float, rgb_fn) -> None:
        """Frame ``serial`` (shown at ``pts``) serves ``target``; ``rgb_fn()`` gives its resized pixels, asked for
        only the first time the frame is taken."""
        if serial not in self.jpeg:
            self.jpeg[serial] = (pts, encode_jpeg(rgb_fn(), self.quality, self.center_crop, self.frame_size))
        _t, ci, sj = target
        self.results[ci][sj] = serial
