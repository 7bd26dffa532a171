"""PyAV (bundled FFmpeg): the default decoder, and the one module of ptrain that imports ``av`` (writing too).

    info = extract(path, clips, Frames(clips, 224, False, 90), threads=1)   # what extract_clips calls
    seconds = video_duration(path)                                          # header (or packets) only
    write_video(path, frames, encoder="libx264", rate=Fraction(25), width=320, height=240)

Decoding goes forward once through the sorted targets and seeks to a keyframe only across long gaps; frames are
chosen by presentation timestamp (the frame on screen at the target time, or the clip's first frame when the one on
screen was shown before the clip starts: ``sharding.plan.take_next_frame``), never by ``t * avg_fps``, so
variable-frame-rate files are handled. ``av`` is imported inside the functions: without PyAV, decord still decodes.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from fractions import Fraction
from pathlib import Path
from typing import Any, Iterable, Iterator

from sharding.decode.frames import Frames, flatten_targets, output_size
from sharding.decode.video import ExtractError, VideoInfo, truncation
from sharding.plan import take_next_frame


def version() -> str:
    """PyAV's version (recorded with every shard: a resume must decode with the same one)."""
    import av

    return av.__version__


def preload() -> None:
    """Import PyAV now, if it is installed (the decode worker's child does it before it says it is ready)."""
    try:
        import av  # noqa: F401
    except ImportError:  # pragma: no cover - PyAV is a dependency; decord may still be there
        pass


# ----------------------------------------------------------------------------------------------
# decoding


def _stated_duration(container, stream) -> float:
    """The video stream's duration as the header states it, inf when it states none."""
    if stream.duration and stream.time_base:
        return float(stream.duration * stream.time_base)
    if container.duration and not container.streams.audio:
        # the container's duration is its longest stream's: only the video's when there is no audio track
        return container.duration / 1e6
    return math.inf


def header_duration(path: Path) -> float:
    """The video duration the header states (no decoding), inf when it states none or PyAV cannot read it."""
    try:
        import av

        with av.open(str(path), mode="r") as container:
            return _stated_duration(container, container.streams.video[0])
    except Exception:  # noqa: BLE001 - only a cross-check for the decord path
        return math.inf


@contextmanager
def _open_video(path: Path) -> Iterator[tuple[Any, Any]]:
    """``(container, first video stream)`` of ``path``, closed on exit; ExtractError classified (unreadable, no
    video stream) when it cannot be opened."""
    import av

    try:
        container = av.open(str(path), mode="r")
    except Exception as e:  # noqa: BLE001 - classify every opening failure
        raise _classify_av_error(path, e) from None
    with container:
        if not container.streams.video:
            kinds = ", ".join(s.type for s in container.streams) or "none"
            raise ExtractError("no_video_stream", f"{path}: no video stream (streams: {kinds})")
        yield container, container.streams.video[0]


def video_duration(path: Path) -> float:
    """Seconds of the video stream, without decoding: what its header states or, when it states none, where its
    packets end (read from the packet index). What a benchmark sample over the whole video is placed on.
    ExtractError (classified as ``extract`` classifies) when the file cannot be read or has no video stream."""
    import av

    with _open_video(path) as (container, stream):
        stated = _stated_duration(container, stream)
        if 0 < stated < math.inf:
            return stated
        tb = float(stream.time_base) if stream.time_base else None
        start_offset = float(stream.start_time * tb) if (stream.start_time and tb) else 0.0
        end = 0.0
        try:
            for packet in container.demux(stream):
                if packet.pts is not None and tb:
                    end = max(end, (packet.pts + (packet.duration or 0)) * tb - start_offset)
        except av.error.FFmpegError as e:  # damaged past some point: its packets up to there count
            if end <= 0:
                raise _classify_av_error(path, e) from None
        if end <= 0:
            raise ExtractError("corrupt", f"{path}: neither the header nor the packets give the video's duration")
        return end


def _keyframe_times(container, stream, tb, start_offset) -> list[tuple[float, int]]:
    """``(time, pts)`` of the keyframes, from the packet index (no decoding), then rewind."""
    keys = []
    if tb:
        for packet in container.demux(stream):
            if packet.is_keyframe and packet.pts is not None:
                keys.append((packet.pts * tb - start_offset, packet.pts))
        container.seek(0, stream=stream, backward=True, any_frame=False)
    return sorted(keys)


def _last_before(keys: list[tuple[float, int]], t: float) -> tuple[float, int | None]:
    """The last keyframe at or before time t: ``(time, pts)``, or ``(0.0, None)`` when there is none."""
    import bisect

    j = bisect.bisect_right(keys, (t + 1e-6, float("inf"))) - 1
    return keys[j] if j >= 0 else (0.0, None)


def _has_container_signature(path: Path) -> bool:
    """True when the file starts like an MP4/MOV, Matroska/WebM or AVI file."""
    try:
        with open(path, "rb") as f:
            head = f.read(12)
    except OSError:
        return False
    return head[4:8] == b"ftyp" or head[:4] == b"\x1a\x45\xdf\xa3" or (head[:4] == b"RIFF" and head[8:12] == b"AVI ")


def _classify_av_error(path: Path, e: Exception) -> ExtractError:
    import av

    msg = f"{path}: {type(e).__name__}: {e}"
    if isinstance(e, av.error.InvalidDataError):
        if _has_container_signature(path):
            return ExtractError("truncated", f"{msg} (the container header is valid: the file is truncated or "
                                             "damaged; download it again)")
        return ExtractError("corrupt", msg)
    if isinstance(e, (av.error.EOFError,)):
        return ExtractError("truncated", msg)
    if isinstance(e, getattr(av.error, "DecoderNotFoundError", ())) or "decoder" in str(e).lower():
        return ExtractError("unsupported", msg)
    return ExtractError("decode_error", msg)


def extract(path: Path, clips, frames: Frames, threads: int) -> VideoInfo:
    """Decode ``path`` forward once through the sorted targets of ``clips`` into ``frames``; the VideoInfo."""
    import av

    with _open_video(path) as (container, stream):
        ctx = stream.codec_context
        if ctx is None or ctx.name is None:
            raise ExtractError("unsupported", f"{path}: no decoder for this video codec")
        ctx.thread_count = threads
        ctx.thread_type = "AUTO"
        tb = float(stream.time_base) if stream.time_base else None
        fps = float(stream.average_rate or stream.guessed_rate or 0) or 0.0
        width, height = ctx.width, ctx.height
        stated = _stated_duration(container, stream)
        start_offset = float(stream.start_time * tb) if (stream.start_time and tb) else 0.0
        ow, oh = output_size(width, height, frames.frame_size) if width and height else (frames.frame_size,) * 2

        def rgb(frame):
            return lambda: frame.to_ndarray(width=ow, height=oh, format="rgb24", interpolation="AREA")

        targets = flatten_targets(clips)  # [(t, clip, slot)] by time
        # Keyframe times from the packet index (demux only, no decoding): before each target we either keep
        # decoding forward or, when a keyframe lies between the current position and the target, seek to it.
        # Dense targets (>= 1 per GOP) decode straight through; sparse ones cost one GOP each; never backwards.
        keyframes = _keyframe_times(container, stream, tb, start_offset)
        min_skip = 2.0 / (fps or 25.0)
        i = 0
        prev = None  # (serial, pts, frame): the frame on screen until the next one
        last = None  # the last frame decoded (prev is reset by a seek, this is not)
        stream_error = None  # a decode error after some frames: the file is truncated or damaged from there on
        serial = 0
        last_pts = None
        floor = -math.inf  # after a seek: frames before the keyframe are leading pictures of an open GOP
        decoded_any = False
        while i < len(targets):
            kf, kf_pts = _last_before(keyframes, targets[i][0])
            if tb and (prev is None or kf > prev[1] + min_skip):
                if kf_pts is not None and (prev is not None or kf > 0):
                    # the keyframe's own pts: a rounded time could land on the keyframe before it
                    container.seek(kf_pts, stream=stream, backward=True, any_frame=False)
                    floor = kf
                prev = None
            jumped = False
            try:
                for frame in container.decode(stream):
                    decoded_any = True
                    pts = frame.time
                    if pts is None:
                        pts = (last_pts + 1.0 / (fps or 25.0)) if last_pts is not None else 0.0
                    last_pts = pts
                    pts -= start_offset
                    if pts < floor - 1e-6:
                        continue
                    serial += 1
                    # every target before this frame shows the previous frame (or this one, if none came before);
                    # when the previous one was shown before the target's clip starts, this one, if it is inside
                    while i < len(targets) and targets[i][0] < pts - 1e-6:
                        if prev is not None and not take_next_frame(prev[1], pts, *clips[targets[i][1]][:2]):
                            frames.take(targets[i], prev[0], prev[1], rgb(prev[2]))
                        else:
                            frames.take(targets[i], serial, pts, rgb(frame))
                        i += 1
                    prev = last = (serial, pts, frame)
                    if i < len(targets) and _last_before(keyframes, targets[i][0])[0] > pts + min_skip:
                        jumped = True
                        break
            except av.error.FFmpegError as e:  # a damaged stream mid-file: keep what was decoded
                if last is None:
                    err = _classify_av_error(path, e)
                    raise ExtractError("truncated" if decoded_any else err.cls, err.message) from None
                stream_error = f"{type(e).__name__}: {e}"
                break
            if not jumped:
                break  # end of stream
        if last is None:
            raise ExtractError("corrupt", f"{path}: no frame could be decoded")
        # after the last frame it stays on screen; in a truncated file that is only right for the targets just
        # after it: extract_clips fails the clips with targets further on (video.clip_errors)
        while i < len(targets):
            frames.take(targets[i], last[0], last[1], rgb(last[2]))
            i += 1
        truncated = truncation(stated, last[1], fps, stream_error)
        decoded_end = last[1] + 1.0 / (fps or 25.0)
        duration = decoded_end if truncated or math.isinf(stated) else stated

    return VideoInfo(fps=fps, width=width, height=height, duration=float(duration), codec=ctx.name, decoder="pyav",
                     last_pts=float(last[1]), header_duration=float(stated), truncated=truncated)


# ----------------------------------------------------------------------------------------------
# writing (the sample corpus, the benchmarks)


def write_video(path: str | Path, frames: Iterable[tuple[int | None, Any]], *, encoder: str, rate: Fraction | int,
                width: int, height: int, pix_fmt: str = "yuv420p", options: dict[str, str] | None = None,
                time_base: Fraction | None = None, container_options: dict[str, str] | None = None,
                threads: int | None = None) -> None:
    """Encode ``frames`` (``(pts, uint8 HxWx3 RGB)``; pts in ``time_base`` units, None to let the encoder count)
    into a new file at ``path`` (the container from its extension).

    ``time_base`` (a variable frame rate) is set on the stream; without it the frames are timed in ``1/rate``.
    ``threads`` sets the encoder's threads (1 with bit-exact ``container_options`` gives reproducible bytes)."""
    import av

    with av.open(str(path), "w", options=container_options or {}) as container:
        stream = container.add_stream(encoder, rate=rate, options=options or {})
        stream.width, stream.height = width, height
        stream.pix_fmt = pix_fmt
        if threads is not None:
            stream.codec_context.thread_count = threads
        if time_base is not None:
            stream.codec_context.time_base = time_base
            stream.time_base = time_base
        frame_time_base = time_base if time_base is not None else 1 / Fraction(rate)
        for pts, img in frames:
            frame = av.VideoFrame.from_ndarray(img, format="rgb24")
            if pts is not None:
                frame.pts = pts
                frame.time_base = frame_time_base
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))


def write_audio_tone(path: str | Path, seconds: float = 3.0, rate: int = 16000, hz: float = 440.0) -> None:
    """A file holding one AAC audio stream (a sine tone) and no video, written bit-exactly."""
    import av
    import numpy as np

    with av.open(str(path), "w", options={"fflags": "+bitexact"}) as container:
        stream = container.add_stream("aac", rate=rate)
        stream.layout = "mono"
        n = int(seconds * rate)
        tone = (0.2 * np.sin(2 * np.pi * hz * np.arange(n) / rate)).astype(np.float32)
        for i in range(0, n, 1024):
            chunk = tone[None, i : i + 1024]
            frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(chunk), format="fltp", layout="mono")
            frame.sample_rate, frame.pts = rate, i
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
