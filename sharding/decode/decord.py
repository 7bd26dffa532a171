"""The decord decoder (PyAV's fallback, or the first choice with decoder=decord): the one module importing decord.

    info = extract(path, clips, Frames(clips, 224, False, 90), threads=1)

Frames are chosen by their presentation timestamps as PyAV's are (``sharding.plan.select_frames``), so both
decoders pick the same frames; the header's duration comes from PyAV (``pyav.header_duration``, no decoding).
"""

from __future__ import annotations

from pathlib import Path

from sharding.decode.frames import Frames, flatten_targets, output_size
from sharding.decode.pyav import header_duration
from sharding.decode.video import ExtractError, VideoInfo, truncation
from sharding.plan import select_frames


def extract(path: Path, clips, frames: Frames, threads: int) -> VideoInfo:
    """Decode the frames on screen at the targets of ``clips`` into ``frames``; the VideoInfo."""
    import decord
    import numpy as np
    from PIL import Image

    try:
        vr = decord.VideoReader(str(path), ctx=decord.cpu(0), num_threads=threads)
    except Exception as e:  # noqa: BLE001
        # decode_error, not corrupt: decord gives up on files FFmpeg partly reads (a half-cut faststart mp4),
        # so PyAV gets its turn and classifies what it cannot read
        raise ExtractError("decode_error", f"{path}: decord could not open it: {e}") from None
    n = len(vr)
    if n == 0:
        raise ExtractError("decode_error", f"{path}: decord sees no frames")
    ts = vr.get_frame_timestamp(np.arange(n))[:, 0].astype(float).tolist()
    fps = float(vr.get_avg_fps())
    duration = ts[-1] + (1.0 / fps if fps else 0.0)
    h, w = vr[0].shape[:2]
    ow, oh = output_size(w, h, frames.frame_size)
    targets = flatten_targets(clips)
    index = select_frames([t for t, _c, _s in targets], ts, [clips[c][:2] for _t, c, _s in targets])
    order = sorted(set(index))
    for k in range(0, len(order), 32):  # bounded memory: at most 32 full-size frames at once
        chunk = order[k: k + 32]
        batch = dict(zip(chunk, vr.get_batch(chunk).asnumpy()))
        for target, j in zip(targets, index):
            if j in batch:
                img = Image.fromarray(batch[j]).resize((ow, oh), Image.BILINEAR, reducing_gap=2.0)
                frames.take(target, j + 1, ts[j], lambda img=img: np.asarray(img))
    stated = header_duration(path)
    truncated = truncation(stated, ts[-1], fps, None)
    return VideoInfo(fps=fps, width=w, height=h, duration=float(duration), codec="?", decoder="decord",
                     last_pts=float(ts[-1]), header_duration=stated, truncated=truncated)
