"""What a decode reports about a video (VideoInfo, ExtractError) and the end-of-video rules both decoders share.

A whole-video failure raises ``ExtractError(cls, message)``; a clip that cannot be served gets one in its place in
the results (``clip_errors``): ``span_beyond_end`` past the video's stated end, ``truncated`` past the last
decodable frame of a cut file (never copies of that frame).
"""

from __future__ import annotations

import math
import stat
from dataclasses import dataclass
from pathlib import Path


class ExtractError(Exception):
    """A video (or one clip of it) that cannot be decoded: ``cls`` is the errors.jsonl class, ``message`` says why."""

    def __init__(self, cls: str, message: str):
        super().__init__(message)
        self.cls = cls
        self.message = message

    def __reduce__(self):  # crosses process boundaries (the decode worker's pipe, Ray's object store)
        return (ExtractError, (self.cls, self.message))


# A file whose header promises more than this beyond its last decodable frame (and at least 3 frame intervals) is
# truncated; smaller differences are rounding, B-frame delay or an audio track slightly longer than the video.
TRUNCATION_SLACK_S = 0.5


@dataclass
class VideoInfo:
    fps: float
    width: int
    height: int
    duration: float  # seconds; for a truncated file, where its decodable frames end
    codec: str
    decoder: str
    last_pts: float = 0.0  # presentation time of the last decoded frame
    header_duration: float = math.inf  # what the container/stream header claims (inf: not stated)
    truncated: str = ""  # why the file is truncated (a decode error mid-stream, or fewer frames than the header says)


def check_file(path: Path) -> None:
    """``missing`` and ``empty`` files are known before any decoder opens them."""
    try:
        st = path.stat()
    except FileNotFoundError:
        raise ExtractError("missing", f"{path}: file not found") from None
    if stat.S_ISREG(st.st_mode) and st.st_size == 0:
        raise ExtractError("empty", f"{path}: zero-length file")


def truncation(header_duration: float, last_pts: float, fps: float, stream_error: str | None) -> str:
    """Why a file is truncated ("" when it is not): decoding failed mid-stream, or its frames end well before
    the duration its header states."""
    frame_dt = 1.0 / (fps or 25.0)
    if stream_error:
        return f"decoding stopped after the frame at {last_pts:.2f} s: {stream_error}"
    missing = header_duration - (last_pts + frame_dt)
    if math.isfinite(header_duration) and missing > max(3 * frame_dt, TRUNCATION_SLACK_S):
        return f"the header says {header_duration:.2f} s but the frames end at {last_pts + frame_dt:.2f} s"
    return ""


def clip_errors(clips, info: VideoInfo, tolerance: float) -> dict[int, ExtractError]:
    """Per-clip failures: ``span_beyond_end`` for a clip beyond the video's (stated) end, ``truncated`` for a clip
    of a truncated file with a target more than 2 frame intervals past the last decodable frame (it would only get
    copies of that frame)."""
    # the end a complete file would have: the header's, or for a file that states none, where its frames end
    # (unknown for a truncated one: then its clips are judged by the truncation alone)
    if math.isfinite(info.header_duration):
        end_of_video = info.header_duration
    else:
        end_of_video = None if info.truncated else info.duration
    limit = info.last_pts + 2.0 / (info.fps or 25.0) + 1e-6
    errs = {}
    for ci, (start, end, targets) in enumerate(clips):
        if end_of_video is not None and (start >= end_of_video or end > end_of_video + tolerance):
            errs[ci] = ExtractError(
                "span_beyond_end", f"clip [{start:.2f}, {end:.2f}] s ends beyond the video's end ({end_of_video:.2f} s)"
            )
        elif info.truncated and any(float(t) > limit for t in targets):
            first = min(float(t) for t in targets if float(t) > limit)
            errs[ci] = ExtractError(
                "truncated", f"clip [{start:.2f}, {end:.2f}] s: its frames from {first:.2f} s on are missing: the "
                             f"file is truncated ({info.truncated})"
            )
    return errs
