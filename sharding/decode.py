"""The ONE place that decodes video: every clip of a video in one forward pass, frames picked by timestamp.

    info, results = extract_clips(path, clips, frame_size=224, ...)   # in-process
    worker = DecodeWorker(); worker.run(path, clips, ..., timeout=120)  # in a child process that is killed on hang

``clips`` is a list of ``(start, end, targets)``; each result is a list of ``(pts_seconds, jpeg_bytes)`` per target,
or an ``ExtractError`` for that clip (e.g. ``span_beyond_end``). Whole-video failures raise ``ExtractError`` with a
class: missing, empty, corrupt, truncated, no_video_stream, unsupported, timeout, decode_error.

PyAV (bundled FFmpeg) decodes forward once through the sorted targets and seeks to a keyframe only across long gaps;
frames are chosen by presentation timestamp (the frame on screen at the target time, or the clip's first frame when
the one on screen was shown before the clip starts: ``sharding.plan.select_frames``), never by ``t * avg_fps``, so
variable-frame-rate files are handled. decord is the alternative decoder (its timestamps are read the same way).
A decode that hangs in native code (decord holds the GIL there) cannot be interrupted from Python, so
``DecodeWorker`` runs decodes in a child process with a time budget and kills it when the budget is spent.
"""

from __future__ import annotations

import io
import math
import multiprocessing as mp
import os
import stat
import time
from dataclasses import dataclass
from pathlib import Path

from sharding.plan import select_frames, take_next_frame


class ExtractError(Exception):
    def __init__(self, cls: str, message: str):
        super().__init__(message)
        self.cls = cls
        self.message = message

    def __reduce__(self):
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


# ----------------------------------------------------------------------------------------------
# image helpers


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


# ----------------------------------------------------------------------------------------------
# target bookkeeping shared by both decoders


def _flatten_targets(clips):
    """[(t, clip_i, slot_j)] sorted by time."""
    return sorted((float(t), ci, sj) for ci, (_start, _end, targets) in enumerate(clips) for sj, t in enumerate(targets))


def _check_file(path: Path) -> None:
    try:
        st = path.stat()
    except FileNotFoundError:
        raise ExtractError("missing", f"{path}: file not found") from None
    if stat.S_ISREG(st.st_mode) and st.st_size == 0:
        raise ExtractError("empty", f"{path}: zero-length file")


def _truncation(header_duration: float, last_pts: float, fps: float, stream_error: str | None) -> str:
    """Why a file is truncated ("" when it is not): decoding failed mid-stream, or its frames end well before
    the duration its header states."""
    frame_dt = 1.0 / (fps or 25.0)
    if stream_error:
        return f"decoding stopped after the frame at {last_pts:.2f} s: {stream_error}"
    missing = header_duration - (last_pts + frame_dt)
    if math.isfinite(header_duration) and missing > max(3 * frame_dt, TRUNCATION_SLACK_S):
        return f"the header says {header_duration:.2f} s but the frames end at {last_pts + frame_dt:.2f} s"
    return ""


def _clip_errors(clips, info: VideoInfo, tolerance: float) -> dict[int, ExtractError]:
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


def _stated_duration(container, stream) -> float:
    """The video stream's duration as the header states it, inf when it states none."""
    if stream.duration and stream.time_base:
        return float(stream.duration * stream.time_base)
    if container.duration and not container.streams.audio:
        # the container's duration is its longest stream's: only the video's when there is no audio track
        return container.duration / 1e6
    return math.inf


def _header_duration(path: Path) -> float:
    """The video duration the header states (no decoding), inf when it states none or PyAV cannot read it."""
    try:
        import av

        with av.open(str(path), mode="r") as container:
            return _stated_duration(container, container.streams.video[0])
    except Exception:  # noqa: BLE001 - only a cross-check for the decord path
        return math.inf


# ----------------------------------------------------------------------------------------------
# PyAV


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


class _Frames:
    """Frames kept for the targets, JPEG-encoded as soon as they are taken (bounded memory on long videos)."""

    def __init__(self, clips, frame_size: int, center_crop: bool, quality: int):
        self.results = [[None] * len(t) for (_s, _e, t) in clips]
        self.jpeg: dict[int, tuple[float, bytes]] = {}  # frame serial -> (pts, jpeg)
        self.frame_size, self.center_crop, self.quality = frame_size, center_crop, quality

    def take(self, target, serial: int, pts: float, rgb_fn) -> None:
        if serial not in self.jpeg:
            self.jpeg[serial] = (pts, encode_jpeg(rgb_fn(), self.quality, self.center_crop, self.frame_size))
        _t, ci, sj = target
        self.results[ci][sj] = serial


def _extract_pyav(path: Path, clips, frames: _Frames, threads: int):
    import av

    try:
        container = av.open(str(path), mode="r")
    except Exception as e:  # noqa: BLE001 - classify every opening failure
        raise _classify_av_error(path, e) from None
    with container:
        if not container.streams.video:
            kinds = ", ".join(s.type for s in container.streams) or "none"
            raise ExtractError("no_video_stream", f"{path}: no video stream (streams: {kinds})")
        stream = container.streams.video[0]
        ctx = stream.codec_context
        if ctx is None or ctx.name is None:
            raise ExtractError("unsupported", f"{path}: no decoder for this video codec")
        ctx.thread_count = threads
        ctx.thread_type = "AUTO"
        tb = float(stream.time_base) if stream.time_base else None
        fps = float(stream.average_rate or stream.guessed_rate or 0) or 0.0
        width, height = ctx.width, ctx.height
        header_duration = _stated_duration(container, stream)
        start_offset = float(stream.start_time * tb) if (stream.start_time and tb) else 0.0
        ow, oh = output_size(width, height, frames.frame_size) if width and height else (frames.frame_size,) * 2

        def rgb(frame):
            return lambda: frame.to_ndarray(width=ow, height=oh, format="rgb24", interpolation="AREA")

        targets = _flatten_targets(clips)  # [(t, clip, slot)] by time
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
        # after it: extract_clips fails the clips with targets further on (_clip_errors)
        while i < len(targets):
            frames.take(targets[i], last[0], last[1], rgb(last[2]))
            i += 1
        truncated = _truncation(header_duration, last[1], fps, stream_error)
        decoded_end = last[1] + 1.0 / (fps or 25.0)
        duration = decoded_end if truncated or math.isinf(header_duration) else header_duration

    return VideoInfo(fps=fps, width=width, height=height, duration=float(duration), codec=ctx.name, decoder="pyav",
                     last_pts=float(last[1]), header_duration=float(header_duration), truncated=truncated)


# ----------------------------------------------------------------------------------------------
# decord


def _extract_decord(path: Path, clips, frames: _Frames, threads: int):
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
    targets = _flatten_targets(clips)
    index = select_frames([t for t, _c, _s in targets], ts, [clips[c][:2] for _t, c, _s in targets])
    order = sorted(set(index))
    for k in range(0, len(order), 32):  # bounded memory: at most 32 full-size frames at once
        chunk = order[k: k + 32]
        batch = dict(zip(chunk, vr.get_batch(chunk).asnumpy()))
        for target, j in zip(targets, index):
            if j in batch:
                img = Image.fromarray(batch[j]).resize((ow, oh), Image.BILINEAR, reducing_gap=2.0)
                frames.take(target, j + 1, ts[j], lambda img=img: np.asarray(img))
    header_duration = _header_duration(path)
    truncated = _truncation(header_duration, ts[-1], fps, None)
    return VideoInfo(fps=fps, width=w, height=h, duration=float(duration), codec="?", decoder="decord",
                     last_pts=float(ts[-1]), header_duration=header_duration, truncated=truncated)


# ----------------------------------------------------------------------------------------------
# public entry points


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
    _check_file(path)
    order = ["pyav", "decord"] if decoder == "pyav" else ["decord", "pyav"]
    info, errors = None, {}
    for name in order:
        frames = _Frames(clips, frame_size, center_crop, jpeg_quality)
        try:
            fn = _extract_pyav if name == "pyav" else _extract_decord
            info = fn(path, clips, frames, threads)
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
    clip_errs = _clip_errors(clips, info, end_tolerance)
    per_clip: list = []
    for ci, serials in enumerate(frames.results):
        if ci in clip_errs:
            per_clip.append(clip_errs[ci])
        elif any(s is None for s in serials):
            per_clip.append(ExtractError("decode_error", f"clip {ci}: some frames could not be decoded"))
        else:
            per_clip.append([(round(float(frames.jpeg[s][0]), 6), frames.jpeg[s][1]) for s in serials])
    return info, per_clip


def _child_main(conn) -> None:
    """Child process loop: receive a request, decode, send the result (or the error) back."""
    # the imports every decode needs come before "ready", so a video's time budget covers its decoding only
    # (a spawned child inside a Ray task also re-imports Ray first: seconds on a busy machine)
    import numpy  # noqa: F401
    from PIL import Image  # noqa: F401

    try:
        import av  # noqa: F401
    except ImportError:  # pragma: no cover - PyAV is a dependency; decord may still be there
        pass
    conn.send(("ready", None))
    while True:
        try:
            req = conn.recv()
        except EOFError:
            return
        if req is None:
            return
        path, clips, kwargs = req
        try:
            conn.send(("ok", extract_clips(path, clips, **kwargs)))
        except ExtractError as e:
            conn.send(("error", (e.cls, e.message)))
        except Exception as e:  # noqa: BLE001 - never let one video kill the worker
            conn.send(("error", ("decode_error", f"{path}: {type(e).__name__}: {e}")))


class DecodeWorker:
    """A child process that decodes one video at a time; killed and restarted when a video overruns its budget.

    The per-video budget starts once the child has said it is ready (its start-up has a budget of its own,
    ``start_timeout``), so a slow start on a loaded machine never counts against a video."""

    def __init__(self, start_timeout: float = 300.0) -> None:
        self._ctx = mp.get_context("spawn")
        self._proc = None
        self._conn = None
        self.start_timeout = start_timeout

    def _start(self, path) -> None:
        parent, child = self._ctx.Pipe()
        self._proc = self._ctx.Process(target=_child_main, args=(child,), daemon=True)
        self._proc.start()
        child.close()
        self._conn = parent
        t0 = time.monotonic()
        try:
            ready = parent.poll(self.start_timeout) and parent.recv() == ("ready", None)
        except (EOFError, OSError):
            ready = False
        if not ready:
            self.kill()
            raise ExtractError("decoder_crash", f"{path}: not decoded: the decoder process did not start (waited "
                                                f"{time.monotonic() - t0:.0f} s); is the machine out of memory?")

    def run(self, path, clips, *, timeout: float, **kwargs):
        if self._proc is None or not self._proc.is_alive():
            self._start(path)
        self._conn.send((str(path), clips, kwargs))
        t0 = time.monotonic()
        if not self._conn.poll(timeout):
            self.kill()
            raise ExtractError("timeout", f"{path}: decoding took longer than {timeout:.0f} s and was killed "
                                          f"(raise video_timeout_s if the file is just long)")
        try:
            status, payload = self._conn.recv()
        except (EOFError, OSError):
            self.kill()
            raise ExtractError("decoder_crash", f"{path}: the decoder process died after "
                                                f"{time.monotonic() - t0:.1f} s (native crash)") from None
        if status == "error":
            raise ExtractError(*payload)
        return payload

    def kill(self) -> None:
        if self._proc is not None:
            self._proc.kill()
            self._proc.join(5)
        if self._conn is not None:
            self._conn.close()
        self._proc = None
        self._conn = None

    def close(self) -> None:
        if self._proc is not None and self._proc.is_alive():
            try:
                self._conn.send(None)
                self._proc.join(5)
            except (OSError, BrokenPipeError):
                pass
        self.kill()

