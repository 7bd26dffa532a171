"""The ONE place that decodes video: every clip of a video in one forward pass, frames picked by timestamp.

    info, results = extract_clips(path, clips, frame_size=224, ...)   # in-process
    worker = DecodeWorker(); worker.run(path, clips, ..., timeout=120)  # in a child process that is killed on hang

``clips`` is a list of ``(start, end, targets)``; each result is a list of ``(pts_seconds, jpeg_bytes)`` per target,
or an ``ExtractError`` for that clip (e.g. ``span_beyond_end``). Whole-video failures raise ``ExtractError`` with a
class: missing, empty, corrupt, truncated, no_video_stream, unsupported, timeout, decode_error.

PyAV (bundled FFmpeg) decodes forward once through the sorted targets and seeks to a keyframe only across long gaps;
frames are chosen by presentation timestamp (the frame on screen at the target time), never by ``t * avg_fps``, so
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



class ExtractError(Exception):
    def __init__(self, cls: str, message: str):
        super().__init__(message)
        self.cls = cls
        self.message = message

    def __reduce__(self):
        return (ExtractError, (self.cls, self.message))


@dataclass
class VideoInfo:
    fps: float
    width: int
    height: int
    duration: float
    codec: str
    decoder: str


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
    """[(t, start, end, clip_i, slot_j)] sorted by time."""
    flat = []
    for ci, (start, end, targets) in enumerate(clips):
        for sj, t in enumerate(targets):
            flat.append((float(t), float(start), float(end), ci, sj))
    flat.sort()
    return flat


def _check_file(path: Path) -> None:
    try:
        st = path.stat()
    except FileNotFoundError:
        raise ExtractError("missing", f"{path}: file not found") from None
    if stat.S_ISREG(st.st_mode) and st.st_size == 0:
        raise ExtractError("empty", f"{path}: zero-length file")


def _span_errors(clips, duration: float, tolerance: float) -> dict[int, ExtractError]:
    errs = {}
    for ci, (start, end, _targets) in enumerate(clips):
        if start >= duration or end > duration + tolerance:
            errs[ci] = ExtractError(
                "span_beyond_end", f"clip [{start:.2f}, {end:.2f}] s ends beyond the video's end ({duration:.2f} s)"
            )
    return errs


# ----------------------------------------------------------------------------------------------
# PyAV


def _keyframe_times(container, stream, tb, start_offset) -> list[float]:
    """Presentation times of the keyframes, from the packet index (no decoding), then rewind."""
    times = []
    if tb:
        for packet in container.demux(stream):
            if packet.is_keyframe and packet.pts is not None:
                times.append(packet.pts * tb - start_offset)
        container.seek(0, stream=stream, backward=True, any_frame=False)
    return sorted(times)


def _last_before(times: list[float], t: float) -> float:
    """The last keyframe time <= t (0 when unknown)."""
    import bisect

    j = bisect.bisect_right(times, t + 1e-6) - 1
    return times[j] if j >= 0 else 0.0


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


def _extract_pyav(path: Path, clips, frame_size: int, threads: int, end_tolerance: float):
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
        if stream.duration and tb:
            duration = stream.duration * tb
        elif container.duration:
            duration = container.duration / 1e6
        else:
            duration = math.inf
        start_offset = float(stream.start_time * tb) if (stream.start_time and tb) else 0.0

        flat = _flatten_targets(clips)
        results = [[None] * len(t) for (_s, _e, t) in clips]
        encoded: dict[int, tuple[float, object]] = {}  # frame serial -> (pts, rgb array)
        ow, oh = output_size(width, height, frame_size) if width and height else (frame_size, frame_size)

        def take(i_target, serial, pts, frame):
            if serial not in encoded:
                encoded[serial] = (pts, frame.to_ndarray(width=ow, height=oh, format="rgb24",
                                                         interpolation="AREA"))
            _t, _s, _e, ci, sj = flat[i_target]
            results[ci][sj] = serial

        # Keyframe times from the packet index (demux only, no decoding): before each target we either keep
        # decoding forward, or, when a keyframe lies between the current position and the target, seek to it.
        # Dense targets (>= 1 per GOP) decode straight through; sparse ones cost one GOP each; never backwards.
        keyframes = _keyframe_times(container, stream, tb, start_offset)
        min_skip = 2.0 / (fps or 25.0)
        i = 0
        prev = None  # (serial, pts, frame)
        serial = 0
        last_pts = None
        decoded_any = False
        while i < len(flat):
            kf = _last_before(keyframes, flat[i][0])
            if tb and (prev is None or kf > prev[1] + min_skip):
                container.seek(int((kf + start_offset) / tb), stream=stream, backward=True, any_frame=False)
                floor, prev = (kf if prev is not None or kf > 0 else -math.inf), None
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
                        continue  # a leading picture of an open GOP after a seek: not reliably decodable
                    serial += 1
                    while i < len(flat) and flat[i][0] < pts - 1e-6:
                        t, s, e, _ci, _sj = flat[i]
                        if prev is not None and prev[1] >= s - 1e-6:
                            take(i, *prev)
                        elif pts <= e + 1e-6 or prev is None:
                            take(i, serial, pts, frame)
                        else:
                            take(i, *prev)
                        i += 1
                    prev = (serial, pts, frame)
                    if i < len(flat) and _last_before(keyframes, flat[i][0]) > pts + min_skip:
                        jumped = True
                        break
            except Exception as e:  # noqa: BLE001 - a damaged stream mid-file
                if not decoded_any:
                    raise _classify_av_error(path, e) from None
                # keep what was decoded; later targets use the last good frame or fail as beyond the end
                if prev is None:
                    err = _classify_av_error(path, e)
                    raise ExtractError("truncated", err.message) from None
                duration = min(duration, prev[1] + 1e-3)
            if not jumped:
                break  # end of stream
        if not decoded_any:
            raise ExtractError("corrupt", f"{path}: no frame could be decoded")
        if math.isinf(duration) and prev is not None:
            duration = prev[1]
        # targets after the last frame: the last frame stays on screen
        while i < len(flat) and prev is not None:
            take(i, *prev)
            i += 1

    info = VideoInfo(fps=fps, width=width, height=height, duration=float(duration), codec=ctx.name, decoder="pyav")
    return info, results, encoded


# ----------------------------------------------------------------------------------------------
# decord


def _extract_decord(path: Path, clips, frame_size: int, threads: int, end_tolerance: float):
    import decord
    import numpy as np
    from PIL import Image

    from sharding.plan import select_frames

    try:
        vr = decord.VideoReader(str(path), ctx=decord.cpu(0), num_threads=threads)
    except Exception as e:  # noqa: BLE001
        raise ExtractError("corrupt", f"{path}: decord could not open it: {e}") from None
    n = len(vr)
    if n == 0:
        raise ExtractError("corrupt", f"{path}: no frames")
    ts = vr.get_frame_timestamp(np.arange(n))[:, 0].astype(float).tolist()
    fps = float(vr.get_avg_fps())
    duration = ts[-1] + (1.0 / fps if fps else 0.0)
    h, w = vr[0].shape[:2] if n else (0, 0)
    results = [[None] * len(t) for (_s, _e, t) in clips]
    wanted: set[int] = set()
    for ci, (start, end, targets) in enumerate(clips):
        idx = select_frames(list(targets), ts, start, end)
        idx = [j if j >= 0 else min(max(0, n - 1), max(0, j)) for j in idx]
        for sj, j in enumerate(idx):
            results[ci][sj] = j + 1
            wanted.add(j)
    order = sorted(wanted)
    encoded = {}
    ow, oh = output_size(w, h, frame_size)
    if order:
        batch = vr.get_batch(order).asnumpy()
        for j, arr in zip(order, batch):
            img = Image.fromarray(arr).resize((ow, oh), Image.BILINEAR, reducing_gap=2.0)
            encoded[j + 1] = (ts[j], np.asarray(img))
    info = VideoInfo(fps=fps, width=w, height=h, duration=float(duration), codec="?", decoder="decord")
    return info, results, encoded


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
    ``(pts_seconds, jpeg_bytes)`` for clip i, or an ``ExtractError`` for that clip alone."""
    path = Path(path)
    _check_file(path)
    order = ["pyav", "decord"] if decoder == "pyav" else ["decord", "pyav"]
    first_error = None
    for name in order:
        try:
            fn = _extract_pyav if name == "pyav" else _extract_decord
            info, results, frames = fn(path, clips, frame_size, threads, end_tolerance)
            break
        except ExtractError as e:
            if first_error is None:
                first_error = e
            if e.cls not in ("unsupported", "decode_error"):
                raise  # a missing, empty, corrupt or truncated file: another decoder will not do better
        except ImportError:
            continue
    else:
        raise first_error or ExtractError("decode_error", f"{path}: no decoder could read it")
    span_errs = _span_errors(clips, info.duration, end_tolerance)
    cache: dict[int, bytes] = {}
    per_clip: list = []
    for ci, serials in enumerate(results):
        if ci in span_errs:
            per_clip.append(span_errs[ci])
            continue
        if any(s is None for s in serials):
            per_clip.append(ExtractError("decode_error", f"clip {ci}: some frames could not be decoded"))
            continue
        frames_out = []
        for s in serials:
            if s not in cache:
                cache[s] = encode_jpeg(frames[s][1], jpeg_quality, center_crop, frame_size)
            frames_out.append((round(float(frames[s][0]), 6), cache[s]))
        per_clip.append(frames_out)
    return info, per_clip


def _child_main(conn) -> None:
    """Child process loop: receive a request, decode, send the result (or the error) back."""
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
    """A child process that decodes one video at a time; killed and restarted when a video overruns its budget."""

    def __init__(self) -> None:
        self._ctx = mp.get_context("spawn")
        self._proc = None
        self._conn = None

    def _start(self) -> None:
        parent, child = self._ctx.Pipe()
        self._proc = self._ctx.Process(target=_child_main, args=(child,), daemon=True)
        self._proc.start()
        child.close()
        self._conn = parent

    def run(self, path, clips, *, timeout: float, **kwargs):
        if self._proc is None or not self._proc.is_alive():
            self._start()
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

