"""``DecodeWorker``: ``extract_clips`` in a child process with a per-video time budget, killed when it hangs.

    worker = DecodeWorker()
    info, per_clip = worker.run(path, clips, timeout=120, frame_size=224, ...)   # ExtractError("timeout") on hang
    seconds = worker.duration(path, timeout=120)                                # the header's (probe_duration)
    info, clips, results = decode_planned(worker, path, planned_clips, timeout=120, frame_size=224, ...)
    worker.close()

A decode that hangs in native code (decord holds the GIL there, a FIFO or a stalled mount blocks in open) cannot be
interrupted from Python, so it runs in a spawned child; the child is reused across videos and replaced after a kill.
``decode_planned`` is how the job and the dry run decode a video's planned clips through a worker.
"""

from __future__ import annotations

import multiprocessing as mp
import time

from sharding.decode.extract import extract_clips, probe_duration
from sharding.decode.video import ExtractError
from sharding.plan import place_clip


def _child_main(conn) -> None:
    """Child process loop: receive a request, decode, send the result (or the error) back."""
    # the imports every decode needs come before "ready", so a video's time budget covers its decoding only
    # (a spawned child inside a Ray task also re-imports Ray first: seconds on a busy machine)
    import numpy  # noqa: F401
    from PIL import Image  # noqa: F401

    from sharding.decode import pyav

    pyav.preload()
    conn.send(("ready", None))
    while True:
        try:
            req = conn.recv()
        except EOFError:
            return
        if req is None:
            return
        kind, path, clips, kwargs = req
        try:
            conn.send(("ok", probe_duration(path) if kind == "duration" else extract_clips(path, clips, **kwargs)))
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

    @property
    def pid(self) -> int | None:
        """The decoder child's pid (None before it starts): its CPU time is what a video cost."""
        return self._proc.pid if self._proc is not None else None

    def ensure_started(self, what="the decoder") -> None:
        """Start the child now (``run`` does it when needed), so its start-up is not counted against a video."""
        if self._proc is None or not self._proc.is_alive():
            self._start(what)

    def run(self, path, clips, *, timeout: float, **kwargs):
        """``extract_clips(path, clips, **kwargs)`` in the child, within ``timeout`` seconds."""
        return self._request("extract", path, clips, kwargs, timeout)

    def duration(self, path, *, timeout: float) -> float:
        """``probe_duration(path)`` in the child (opening a file can hang too), within ``timeout`` seconds."""
        return self._request("duration", path, None, {}, timeout)

    def _request(self, kind: str, path, clips, kwargs: dict, timeout: float):
        self.ensure_started(path)
        self._conn.send((kind, str(path), clips, kwargs))
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


def decode_planned(worker: DecodeWorker, path, clips: list, *, timeout: float, **kwargs) -> tuple:
    """Decode one video for its planned clips (``sharding.plan.PlannedClip``): ``(info, clips, results)``,
    ``results[i]`` the frames of ``clips[i]`` or its ExtractError. Benchmark samples are first placed on the
    video's duration, read from its header in the child (``place_clip``: the whole video, a span cut at the end, or
    ``span_beyond_end``), and ``clips`` comes back placed. A whole-video failure raises ExtractError; ``info`` is
    None when no clip is left to decode. ``kwargs`` go to ``extract_clips``."""
    results: list = [None] * len(clips)
    if any(c.bench is not None for c in clips):
        duration = worker.duration(path, timeout=timeout)
        placed = []
        for i, clip in enumerate(clips):
            p = place_clip(clip, duration)
            if isinstance(p, str):
                results[i] = ExtractError("span_beyond_end", p)
                p = clip
            placed.append(p)
        clips = placed
    todo = [i for i, r in enumerate(results) if r is None]
    info = None
    if todo:
        info, per_clip = worker.run(path, [(clips[i].start, clips[i].end, clips[i].targets) for i in todo],
                                    timeout=timeout, **kwargs)
        for i, result in zip(todo, per_clip):
            results[i] = result
    return info, clips, results
