"""``ptrain sample-data``: the generator of a deterministic HowTo100M-style corpus (moving shapes, ASR captions).

Stands in for HowTo100M when testing and demoing the sharder, the loader and the trainer offline:

    ptrain sample-data out=demo/raw num_videos=24 seed=0 bad_videos=true

writes

- ``OUT/videos/<video_id>.<ext>``: short videos (8-20 s, 160x120 .. 320x240, 10-30 fps). Each is a run of
  2-5 s *events*; in an event ONE shape (circle/square/triangle) of one colour moves in one direction
  (left/right/up/down) at constant speed over a plain dark background. Left and right (resp. up and
  down) travel between the same two points, so the set of positions is identical and only frame ORDER
  tells the direction; shape and colour are visible in every frame. Containers/codecs are mixed:
  H.264/.mp4 (most, one with a variable frame rate), VP9 and VP8/.webm, MPEG-4 part 2/.mkv and .avi,
  MJPEG/.avi. With ``num_videos >= 7`` every kind appears at least once (6: all but MJPEG).
- ``OUT/caption.json``: ``{video_id: {"start": [...], "end": [...], "text": [...]}}`` written like YouTube
  ASR (lowercase, no punctuation, fillers, 1-3 s segments that overlap in time, rolling repeats of the
  previous segment's tail words, the odd exact duplicate).
- ``OUT/HowTo100M_v1.csv``: ``video_id,category_1,category_2,rank,task_id``.
- ``OUT/sample_meta.json``: the ground truth: per good video its file, container, codec, size, fps,
  duration, frame count (frame times for the VFR one) and events; the bad ids with their class; the id
  whose captions run past its end; the id that needs sanitising (``we.ird-id_01``).

With ``bad_videos=true`` the corpus also lists broken inputs every ingest job meets: ``bad_corrupt``
(random bytes), ``bad_truncated`` (an mp4 cut to 40 %), ``bad_empty`` (0 bytes), ``bad_audio`` (audio
stream only), ``bad_missing`` (no file at all), and one good video with a caption segment beyond its end.

Everything is a pure function of ``seed``: the plan comes from ``random.Random(seed)``, noise from numpy
generators seeded per video, and encoders run single-threaded in bitexact mode, so two runs give
byte-identical files. ``generate(...)`` is the Python entry point (returns the meta dict).
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

from ptrain.config import opt
from sharding.decode.pyav import write_audio_tone, write_video

META_VERSION = 1
WEIRD_ID = "we.ird-id_01"  # a good video whose id has a dot and a dash: exercises key sanitisation
BAD_CLASSES = ("corrupt", "truncated", "empty", "audio", "missing")
VFR_TIME_BASE = Fraction(1, 90000)

# kind -> (extension, PyAV encoder, codec name as a decoder reports it, variable frame rate)
KINDS: dict[str, tuple[str, str, str, bool]] = {
    "mp4_h264": ("mp4", "libx264", "h264", False),
    "mp4_h264_vfr": ("mp4", "libx264", "h264", True),
    "webm_vp9": ("webm", "libvpx-vp9", "vp9", False),
    "mkv_mpeg4": ("mkv", "mpeg4", "mpeg4", False),
    "webm_vp8": ("webm", "libvpx", "vp8", False),
    "avi_mpeg4": ("avi", "mpeg4", "mpeg4", False),
    "avi_mjpeg": ("avi", "mjpeg", "mjpeg", False),
}
# the first videos take these in order, so a 6-video test corpus covers every container (7: every codec)
REQUIRED_KINDS = ("mp4_h264", "mp4_h264_vfr", "webm_vp9", "mkv_mpeg4", "webm_vp8", "avi_mpeg4", "avi_mjpeg")
# later videos: mostly H.264 mp4, like YouTube downloads
KIND_WEIGHTS = {"mp4_h264": 12, "webm_vp9": 3, "webm_vp8": 1, "mkv_mpeg4": 1, "avi_mpeg4": 1, "avi_mjpeg": 1}

SIZES = ((160, 120), (176, 144), (192, 144), (224, 168), (240, 180), (256, 192), (320, 240), (320, 180))
FPS_CHOICES = tuple(Fraction(f) for f in (10, 12, 15, 24, 25, 30)) + (Fraction(30000, 1001),)
SHAPES = ("circle", "square", "triangle")
COLOURS = {
    "red": (225, 30, 30),
    "green": (40, 200, 40),
    "blue": (50, 80, 240),
    "yellow": (235, 225, 40),
    "purple": (170, 50, 210),
    "orange": (250, 140, 20),
}
DIRECTIONS = ("left", "right", "up", "down")
CATEGORIES = (
    ("Food and Entertaining", "Recipes"),
    ("Hobbies and Crafts", "Crafts"),
    ("Home and Garden", "Gardening"),
    ("Cars & Other Vehicles", "Car Maintenance"),
    ("Sports and Fitness", "Yoga"),
    ("Arts and Entertainment", "Drawing"),
)
ID_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"


@dataclass
class SampleDataConfig:
    """``ptrain sample-data``: write a small synthetic HowTo100M-style corpus."""

    out: str = opt(
        "", "output directory (created); holds videos/, caption.json, HowTo100M_v1.csv, sample_meta.json, config.yaml"
    )
    num_videos: int = opt(24, "number of good videos (>= 7 covers every container/codec kind)")
    seed: int = opt(0, "random seed; the same seed gives byte-identical output")
    bad_videos: bool = opt(True, "also list corrupt/truncated/empty/audio-only/missing videos and a beyond-end caption")
    min_duration: float = opt(8.0, "shortest video, seconds (>= 2)")
    max_duration: float = opt(20.0, "longest video, seconds")
    overwrite: bool = opt(False, "replace an existing corpus in `out` (only the files this verb writes are removed)")
    workers: int = opt(0, "processes encoding videos in parallel; 0 = one per CPU core (the output is the same for any)")

    def __post_init__(self) -> None:
        if not self.out:
            raise ValueError("out is required: pass out=DIR, the directory to write the corpus into.")
        if self.num_videos < 1:
            raise ValueError(f"num_videos must be at least 1, got {self.num_videos}.")
        if self.workers < 0:
            raise ValueError(f"workers must be >= 0 (0 = one per CPU core), got {self.workers}.")
        if not 2.0 <= self.min_duration <= self.max_duration:
            raise ValueError(
                f"durations must satisfy 2 <= min_duration <= max_duration, got "
                f"min_duration={self.min_duration} max_duration={self.max_duration}."
            )


# ----------------------------------------------------------------------------------------------
# planning: stdlib only, every random draw comes from one random.Random(seed)


def _video_id(rng: random.Random, taken: set[str]) -> str:
    while True:
        vid = rng.choice(ID_ALPHABET[:-2]) + "".join(rng.choice(ID_ALPHABET) for _ in range(10))
        if vid not in taken and not vid.startswith("bad_"):
            taken.add(vid)
            return vid


def _event_durations(rng: random.Random, total: float) -> list[float]:
    """Split ``total`` seconds into events of 2-5 s each (total >= 2)."""
    k = max(1, min(math.floor(total / 2.0), round(total / 3.5)))
    k = max(k, math.ceil(total / 5.0))
    parts = [2.0] * k
    rest = total - 2.0 * k
    # why: spread the slack randomly but never past 5 s per event
    while rest > 1e-9:
        open_ = [i for i in range(k) if parts[i] < 5.0 - 1e-9]
        i = rng.choice(open_)
        add = min(rest, 5.0 - parts[i], rng.uniform(0.2, 1.5))
        parts[i] += add
        rest -= add
    return parts


def _frame_times(rng: random.Random, fps: Fraction, duration: float, vfr: bool) -> list[Fraction]:
    """Presentation times of every frame, exact (Fractions of a second)."""
    if not vfr:
        n = max(2, round(duration * fps))
        return [Fraction(k) / fps for k in range(n)]
    # why: irregular intervals of 0.4-1.6 nominal frame periods on a fine 1/90000 clock
    nominal = int(VFR_TIME_BASE.denominator / fps)
    ticks, t, end = [], 0, int(duration * VFR_TIME_BASE.denominator)
    while t < end:
        ticks.append(t)
        t += rng.randint(int(0.4 * nominal), int(1.6 * nominal))
    return [tick * VFR_TIME_BASE for tick in ticks]


def _plan_video(rng: random.Random, vid: str, kind: str, min_d: float, max_d: float) -> dict[str, Any]:
    ext, encoder, codec, vfr = KINDS[kind]
    width, height = rng.choice(SIZES)
    fps = rng.choice(FPS_CHOICES[3:] if vfr else FPS_CHOICES)
    durations = _event_durations(rng, rng.uniform(min_d, max_d))
    times = _frame_times(rng, fps, sum(durations), vfr)
    if vfr:
        duration = Fraction(round(sum(durations) * VFR_TIME_BASE.denominator)) * VFR_TIME_BASE
    else:
        duration = len(times) / fps
    size = int(min(width, height) * rng.uniform(0.22, 0.3)) | 1  # odd: the centre is a pixel
    margin = size // 2 + 3
    # event boundaries: cumulative durations, snapped to frame times for constant frame rate videos
    bounds = [Fraction(0)]
    for d in durations[:-1]:
        t = bounds[-1] + Fraction(d).limit_denominator(1000)
        bounds.append(Fraction(round(t * fps)) / fps if not vfr else t)
    bounds.append(duration)
    events = []
    for i in range(len(durations)):
        start, end = bounds[i], bounds[i + 1]
        frames = [k for k, t in enumerate(times) if start <= t < end]
        direction = rng.choice(DIRECTIONS)
        lo_hi = (margin, (width if direction in ("left", "right") else height) - 1 - margin)
        events.append(
            {
                "start": round(float(start), 4),
                "end": round(float(end), 4),
                "shape": rng.choice(SHAPES),
                "colour": rng.choice(sorted(COLOURS)),
                "direction": direction,
                "first_frame": frames[0],
                "last_frame": frames[-1],
                "size": size,
                "axis_range": list(lo_hi),
            }
        )
    grey = rng.randint(20, 75)
    spec = {
        "video_id": vid,
        "file": f"videos/{vid}.{ext}",
        "kind": kind,
        "container": ext,
        "codec": codec,
        "encoder": encoder,
        "vfr": vfr,
        "width": width,
        "height": height,
        "fps": round(float(fps), 6),
        "fps_fraction": f"{fps.numerator}/{fps.denominator}",
        "num_frames": len(times),
        "duration": round(float(duration), 4),
        "background": [grey + rng.randint(-10, 10) for _ in range(3)],
        "noise": rng.choice((0, 0, 3, 6)),
        "noise_seed": rng.getrandbits(32),
        "events": events,
    }
    if vfr:
        spec["time_base"] = f"1/{VFR_TIME_BASE.denominator}"
        spec["frame_times"] = [round(float(t), 6) for t in times]
    return spec


def frame_times_of(spec: dict[str, Any]) -> list[Fraction]:
    """Exact presentation times of a planned video's frames."""
    if spec["vfr"]:
        return [Fraction(round(t * VFR_TIME_BASE.denominator)) * VFR_TIME_BASE for t in spec["frame_times"]]
    fps = Fraction(spec["fps_fraction"])
    return [Fraction(k) / fps for k in range(spec["num_frames"])]


def shape_centres(spec: dict[str, Any], event: dict[str, Any]) -> list[tuple[int, int]]:
    """(x, y) pixel centre of the event's shape in each of its frames, in frame order.

    Position is ``lo + floor(frac * (hi - lo) + 1/2)`` with ``frac`` the frame's exact fraction of the way
    from the event's first to its last frame time; "left"/"up" use ``1 - frac``. For constant frame rate
    ``1 - frac_k == frac_(n-1-k)`` exactly, so a left event visits the same positions as a right event of
    the same length, in reverse order.
    """
    times = frame_times_of(spec)[event["first_frame"] : event["last_frame"] + 1]
    lo, hi = event["axis_range"]
    span_t = times[-1] - times[0] if len(times) > 1 else Fraction(1)
    horizontal = event["direction"] in ("left", "right")
    backwards = event["direction"] in ("left", "up")
    cross = (spec["height"] if horizontal else spec["width"]) // 2
    out = []
    for t in times:
        frac = (t - times[0]) / span_t
        if backwards:
            frac = 1 - frac
        pos = lo + math.floor(frac * (hi - lo) + Fraction(1, 2))
        out.append((pos, cross) if horizontal else (cross, pos))
    return out


# ----------------------------------------------------------------------------------------------
# captions: ASR-like segments, stdlib only

_DIR_PHRASES = {
    "left": ("to the left", "left", "towards the left"),
    "right": ("to the right", "right", "towards the right"),
    "up": ("up", "upwards", "to the top"),
    "down": ("down", "downwards", "to the bottom"),
}
_TEMPLATES = (
    "the {c} {s} moves {d}",
    "the {c} {s} is moving {d}",
    "we see a {c} {s} going {d}",
    "here the {c} {s} slides {d}",
    "this {c} {s} is heading {d}",
    "a {c} {s} moving {d}",
)
_FILLERS = ("so", "now", "um", "uh", "okay so", "and now", "alright")


def _sentence(rng: random.Random, ev: dict[str, Any]) -> list[str]:
    text = rng.choice(_TEMPLATES).format(c=ev["colour"], s=ev["shape"], d=rng.choice(_DIR_PHRASES[ev["direction"]]))
    text = text.replace("a orange", "an orange")
    if rng.random() < 0.35:
        text = rng.choice(_FILLERS) + " " + text
    return text.split()


def _event_segments(rng: random.Random, ev: dict[str, Any]) -> list[tuple[float, float, str]]:
    """1-3 s segments inside [start, end + 0.3], each starting before the previous one ends."""
    spans, t = [], ev["start"] + rng.uniform(0.0, 0.3)
    while True:
        end = min(t + rng.uniform(1.0, 3.0), ev["end"] + 0.3)
        if end - t < 0.8:
            break
        spans.append((t, end))
        nxt = end - rng.uniform(0.2, 0.7)  # why: YouTube ASR segments overlap their successor
        if nxt > ev["end"] - 1.0:
            break
        t = max(nxt, t + 0.5)
    words: list[str] = []
    sentence_ends: list[int] = []
    segments, pos = [], 0
    for i, (s, e) in enumerate(spans):
        n_new = max(2, round((e - s) * rng.uniform(2.0, 3.0)))  # ~2.5 spoken words per second
        while len(words) < pos + n_new:
            words += _sentence(rng, ev)
            sentence_ends.append(len(words))
        if i == len(spans) - 1:
            # why: the event's last segment finishes its sentence, so every event is fully described
            n_new = min(b for b in sentence_ends if b >= pos + n_new) - pos
        # why: rolling captions repeat the previous segment's tail words at their start
        back = rng.randint(1, 3) if i > 0 and rng.random() < 0.6 else 0
        segments.append((round(s, 2), round(e, 2), " ".join(words[max(0, pos - back) : pos + n_new])))
        pos += n_new
    if segments and rng.random() < 0.2:
        j = rng.randrange(len(segments))
        segments.insert(j + 1, segments[j])  # an exact duplicate, as real ASR dumps contain
    return segments


def _captions(rng: random.Random, events: list[dict[str, Any]]) -> dict[str, list]:
    segs = [seg for ev in events for seg in _event_segments(rng, ev)]
    segs.sort(key=lambda s: s[0])  # stable: duplicates stay adjacent
    return {"start": [s[0] for s in segs], "end": [s[1] for s in segs], "text": [s[2] for s in segs]}


# ----------------------------------------------------------------------------------------------
# rendering (numpy, imported lazily) and encoding (sharding.decode.pyav, the home of PyAV)


def _sprite(shape: str, size: int):
    """Boolean mask [size, size] of the shape, centred."""
    import numpy as np

    yy, xx = np.mgrid[0:size, 0:size]
    c = size // 2
    if shape == "circle":
        return (xx - c) ** 2 + (yy - c) ** 2 <= c * c
    if shape == "square":
        return np.ones((size, size), bool)
    # triangle pointing up; its orientation is the same for every direction, so it leaks nothing
    return (yy >= 0) & (2 * np.abs(xx - c) <= yy)


def render_frames(spec: dict[str, Any]):
    """Yield (frame index, RGB uint8 [H, W, 3]) for every frame of a planned video."""
    import numpy as np

    h, w = spec["height"], spec["width"]
    base = np.empty((h, w, 3), np.uint8)
    base[:] = spec["background"]
    noise_rng = np.random.default_rng(spec["noise_seed"])
    for ev in spec["events"]:
        mask = _sprite(ev["shape"], ev["size"])
        colour = np.array(COLOURS[ev["colour"]], np.uint8)
        r = ev["size"] // 2
        for k, (cx, cy) in zip(range(ev["first_frame"], ev["last_frame"] + 1), shape_centres(spec, ev)):
            img = base.copy()
            if spec["noise"]:
                noise = noise_rng.integers(-spec["noise"], spec["noise"] + 1, size=(h, w, 1), dtype=np.int16)
                img = np.clip(img.astype(np.int16) + noise, 0, 255).astype(np.uint8)
            img[cy - r : cy + r + 1, cx - r : cx + r + 1][mask] = colour
            yield k, img


def _encoder_options(encoder: str) -> dict[str, str]:
    # why: one thread + fixed speed settings make the bitstream a pure function of the frames
    if encoder == "libx264":
        # why: with x264's macroblock-tree rate control, about 1 encode in 5 came out different from
        # the others (same frames, same options, one thread); without it every repeat is identical
        return {"preset": "veryfast", "crf": "24", "threads": "1", "x264-params": "mbtree=0"}
    if encoder.startswith("libvpx"):
        # why: realtime is ~5x faster than "good"; but VP8 with a positive cpu-used adapts its speed to
        # the wall clock (5 different files in 10 encodes), a negative one fixes it. VP9's is always fixed.
        speed = "-8" if encoder == "libvpx" else "8"
        return {"deadline": "realtime", "cpu-used": speed, "b": "400k", "threads": "1"}
    return {"qscale": "4", "threads": "1"}  # mpeg4, mjpeg


def encode_video(spec: dict[str, Any], path: Path) -> None:
    """Render and encode one planned video to ``path`` (bit-exact, one encoder thread: reproducible bytes)."""
    fps = Fraction(spec["fps_fraction"])
    times = frame_times_of(spec)
    time_base = VFR_TIME_BASE if spec["vfr"] else 1 / fps
    write_video(path, ((int(times[k] / time_base), img) for k, img in render_frames(spec)),
                encoder=spec["encoder"], rate=fps, width=spec["width"], height=spec["height"],
                pix_fmt="yuvj420p" if spec["encoder"] == "mjpeg" else "yuv420p",
                options=_encoder_options(spec["encoder"]), time_base=VFR_TIME_BASE if spec["vfr"] else None,
                container_options={"fflags": "+bitexact"}, threads=1)


# ----------------------------------------------------------------------------------------------
# the corpus


def plan(num_videos: int = 24, seed: int = 0, bad_videos: bool = True, min_duration: float = 8.0,
         max_duration: float = 20.0) -> dict[str, Any]:
    """The whole corpus as data (meta + captions + csv rows); no files touched, no numpy."""
    rng = random.Random(seed)
    taken: set[str] = {WEIRD_ID}
    kinds = list(REQUIRED_KINDS[:num_videos])
    pool = sorted(KIND_WEIGHTS)
    kinds += rng.choices(pool, weights=[KIND_WEIGHTS[k] for k in pool], k=num_videos - len(kinds))
    weird_at = min(3, num_videos - 1)  # an mkv (index 3) when there are enough videos
    videos: dict[str, dict[str, Any]] = {}
    for i, kind in enumerate(kinds):
        vid = WEIRD_ID if i == weird_at else _video_id(rng, taken)
        videos[vid] = _plan_video(rng, vid, kind, min_duration, max_duration)
    captions = {vid: _captions(rng, spec["events"]) for vid, spec in videos.items()}

    bad: dict[str, dict[str, Any]] = {}
    beyond_end: dict[str, float] = {}
    if bad_videos:
        notes = {
            "corrupt": ("mp4", "random bytes named .mp4"),
            "truncated": ("mp4", "a valid H.264 mp4 cut to 40 % of its bytes (no moov atom)"),
            "empty": ("mp4", "a zero-length file"),
            "audio": ("mp4", "an mp4 with only an AAC audio stream"),
            "missing": (None, "listed in caption.json and the csv but no file exists"),
        }
        for cls in BAD_CLASSES:
            vid = f"bad_{cls}"
            ext, note = notes[cls]
            inner = _plan_video(rng, vid, "mp4_h264", min_duration, max(min_duration, min(max_duration, 10.0)))
            bad[vid] = {"class": cls, "file": f"videos/{vid}.{ext}" if ext else None, "note": note}
            if cls == "truncated":
                bad[vid]["source"] = inner  # encoded, then cut
            captions[vid] = _captions(rng, inner["events"])
        # why: real ASR sometimes runs past the end of the (re-encoded) video
        target = next(iter(videos))
        dur = videos[target]["duration"]
        start = round(dur + 2.0, 2)
        cap = captions[target]
        cap["start"].append(start)
        cap["end"].append(round(dur + 4.5, 2))
        cap["text"].append("thanks for watching")
        beyond_end[target] = start

    rows = []
    for vid in list(videos) + list(bad):
        cat1, cat2 = rng.choice(CATEGORIES)
        rows.append([vid, cat1, cat2, rng.randint(1, 200), rng.randint(10000, 130000)])
    meta = {
        "version": META_VERSION,
        "seed": seed,
        "num_videos": num_videos,
        "weird_id": WEIRD_ID,
        "total_duration": round(sum(v["duration"] for v in videos.values()), 4),
        "videos": videos,
        "bad_videos": {k: {kk: vv for kk, vv in v.items() if kk != "source"} for k, v in bad.items()},
        "beyond_end": beyond_end,
    }
    return {"meta": meta, "captions": captions, "csv_rows": rows, "bad_sources": bad}


OUTPUT_FILES = ("caption.json", "HowTo100M_v1.csv", "sample_meta.json", "config.yaml")


def _prepare_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"out={out} is a file; pass out=DIR naming a directory.")
    if out.is_dir() and any(out.iterdir()):
        ours = [out / f for f in OUTPUT_FILES] + [out / "videos"]
        if not overwrite:
            raise FileExistsError(
                f"out={out} is not empty; pass overwrite=true to replace a previous sample corpus there, "
                "or choose an empty directory."
            )
        for p in ours:
            if p.is_file():
                p.unlink()
        if (out / "videos").is_dir():
            for p in (out / "videos").iterdir():
                if p.is_file():
                    p.unlink()
    (out / "videos").mkdir(parents=True, exist_ok=True)


def _encode_one(job: tuple[dict[str, Any], str]) -> None:
    encode_video(job[0], Path(job[1]))


def generate(out_dir: str | Path, num_videos: int = 24, seed: int = 0, bad_videos: bool = True,
             min_duration: float = 8.0, max_duration: float = 20.0, overwrite: bool = False,
             workers: int = 1) -> dict[str, Any]:
    """Write the corpus into ``out_dir`` and return the meta dict (also saved as ``sample_meta.json``).

    ``workers`` > 1 encodes videos in that many processes (0 = one per core). Every video is a pure
    function of its own spec (seeded noise, single-threaded bit-exact encoders), so the files are the
    same for any number of workers."""
    SampleDataConfig(out=str(out_dir), num_videos=num_videos, min_duration=min_duration, max_duration=max_duration,
                     workers=workers)
    out = Path(out_dir)
    _prepare_out(out, overwrite)
    p = plan(num_videos, seed, bad_videos, min_duration, max_duration)
    meta = p["meta"]
    jobs = [(spec, str(out / spec["file"])) for spec in meta["videos"].values()]
    workers = min(workers or os.cpu_count() or 1, len(jobs))
    if workers > 1:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        # why spawn: the caller may hold threads (tests, Ray, torch) that a fork would copy mid-state
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            list(pool.map(_encode_one, jobs, chunksize=max(1, len(jobs) // (8 * workers))))
    else:
        for job in jobs:
            _encode_one(job)
    if bad_videos:
        import numpy as np

        videos = out / "videos"
        noise = np.random.default_rng(seed + 7919)
        (videos / "bad_corrupt.mp4").write_bytes(noise.integers(0, 256, 20000, dtype=np.uint8).tobytes())
        src = p["bad_sources"]["bad_truncated"]["source"]
        full = videos / "bad_truncated.mp4"
        encode_video(src, full)
        data = full.read_bytes()
        full.write_bytes(data[: int(len(data) * 0.4)])
        (videos / "bad_empty.mp4").write_bytes(b"")
        write_audio_tone(videos / "bad_audio.mp4")
    (out / "caption.json").write_text(json.dumps(p["captions"], indent=1) + "\n")
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["video_id", "category_1", "category_2", "rank", "task_id"])
    writer.writerows(p["csv_rows"])
    (out / "HowTo100M_v1.csv").write_text(buf.getvalue())
    (out / "sample_meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    return meta


def run(cfg: SampleDataConfig) -> int:
    """CLI entry: generate and print a one-paragraph summary."""
    t0 = time.perf_counter()
    try:
        meta = generate(cfg.out, cfg.num_videos, cfg.seed, cfg.bad_videos, cfg.min_duration, cfg.max_duration,
                        cfg.overwrite, cfg.workers)
    except FileExistsError as e:
        print(f"ptrain sample-data: {e}", file=sys.stderr)
        return 2
    from ptrain.config import dump_config

    dump_config(cfg, Path(cfg.out) / "config.yaml")  # the resolved config, like every run
    kinds: dict[str, int] = {}
    for v in meta["videos"].values():
        kinds[v["kind"]] = kinds.get(v["kind"], 0) + 1
    print(
        f"wrote {len(meta['videos'])} videos ({meta['total_duration']:.1f} s in all; "
        + ", ".join(f"{n} {k}" for k, n in sorted(kinds.items()))
        + f") + {len(meta['bad_videos'])} bad entries to {cfg.out} in {time.perf_counter() - t0:.1f} s\n"
        f"  captions: {Path(cfg.out) / 'caption.json'}  csv: {Path(cfg.out) / 'HowTo100M_v1.csv'}  "
        f"ground truth: {Path(cfg.out) / 'sample_meta.json'}  config: {Path(cfg.out) / 'config.yaml'}"
    )
    return 0
