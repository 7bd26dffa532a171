"""``extract_clips``: decode a video once for all its clips with the chosen decoder (the other one as fallback).

    info, per_clip = extract_clips(path, [(start, end, targets), ...], frame_size=224, decoder="pyav")
    seconds = probe_duration(path)            # the video's length, nothing decoded (a benchmark's whole video)

``per_clip[i]`` is a list of ``(pts_seconds, jpeg_bytes)`` for clip i (the frame on screen at each target time), or
an ``ExtractError`` for that clip alone (``span_beyond_end``, ``truncated``); a whole-video failure raises one.
"""

from __future__ import annotations

from pathlib import Path

from sharding.decode import decord, pyav
from sharding.decode.frames import Frames
from sharding.decode.video import ExtractError, check_file, clip_errors

DECODERS = {"pyav": pyav.extract, "decord": decord.extract}


def extract_clips(
    path: str | Path,
    clips: list[tuple[float, float, list[float]]],
    *,
    frame_size: int,
    center_crop: bool = False,
    jpeg_quality: int = 90,
    threads: int = 1,
    decoder: str = "pyav",
    end_tolerance: float = 1.0,
):
    """Decode ``path`` once and return ``(VideoInfo, per_clip)``; ``per_clip[i]`` is a list of
    ``(pts_seconds, jpeg_bytes)`` for clip i (the frame on screen at each target time), or an ``ExtractError``
    for that clip alone (``span_beyond_end``)."""
    path = Path(path)
    check_file(path)
    order = ["pyav", "decord"] if decoder == "pyav" else ["decord", "pyav"]
    info, errors = None, {}
    for name in order:
        frames = Frames(clips, frame_size, center_crop, jpeg_quality)
        try:
            info = DECODERS[name](path, clips, frames, threads)
            break
        except ExtractError as e:
            errors[name] = e
            if e.cls not in ("unsupported", "decode_error"):
                break  # a missing, empty, corrupt or truncated file: another decoder will not do better
        except ImportError:
            continue
    if info is None:
        # PyAV's verdict names the problem (it checks the container); decord only says it could not open it
        raise errors.get("pyav") or errors.get("decord") or ExtractError("decode_error", f"{path}: no decoder could read it")
    clip_errs = clip_errors(clips, info, end_tolerance)
    per_clip: list = []
    for ci, serials in enumerate(frames.results):
        if ci in clip_errs:
            per_clip.append(clip_errs[ci])
        elif any(s is None for s in serials):
            per_clip.append(ExtractError("decode_error", f"clip {ci}: some frames could not be decoded"))
        else:
            per_clip.append([(round(float(frames.jpeg[s][0]), 6), frames.jpeg[s][1]) for s in serials])
    return info, per_clip


def probe_duration(path: str | Path) -> float:
    """The video's duration in seconds from its header (or its packet index), nothing decoded; ExtractError for a
    missing, empty or unreadable file, as ``extract_clips`` classifies them. Read with PyAV whatever the decoder
    (decord reads no header; it takes PyAV's too)."""
    path = Path(path)
    check_file(path)
    return pyav.video_duration(path)
