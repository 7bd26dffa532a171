"""Timed segments -> clips -> frame timestamps -> shard assignment, and the plan hash. Pure functions.

The plan is a pure function of (the source's records, the planning config): the same inputs give the same clips,
the same frame timestamps, the same shard of every clip and the same ``plan_hash``. Nothing here reads an
annotation file (``sharding/sources`` does) or touches a video; the only I/O is listing the video directory.

    clips = plan_video(record.video_id, record.segments, cfg.plan)   # [PlannedClip], keys and frame times
    times = clip_frame_times(start, end, num_frames=12)            # target timestamps in seconds
    groups = assign_shards(videos_with_clips, max_samples_per_shard, shards_per_task)
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ptrain.data.format import sample_key
from sharding.sources import Segment, VideoRecord

VIDEO_EXTENSIONS = (".mp4", ".webm", ".mkv", ".avi", ".mov", ".m4v")


@dataclass
class Clip:
    start: float
    end: float
    text: str
    segments: list[Segment] = field(default_factory=list)


# ----------------------------------------------------------------------------------------------
# the video directory


def find_videos(root: str | Path) -> tuple[dict[str, Path], dict[str, list[Path]]]:
    """``({video_id: path}, {video_id: [other paths]})`` for every ``<video_id>.<ext>`` under ``root``.

    When an id appears more than once (another extension or another sub-directory), the first extension in
    VIDEO_EXTENSIONS, then the first path in sorted order, wins; the others are returned as duplicates."""
    r = Path(root)
    if not r.is_dir():
        raise FileNotFoundError(f"{r}: video directory not found; pass videos=DIR")
    candidates: dict[str, list[Path]] = {}
    for path in sorted(r.rglob("*")):
        # not is_file(): a FIFO or a device is the decoder's problem, and is recorded as such
        if path.suffix.lower() in VIDEO_EXTENSIONS and not path.is_dir():
            candidates.setdefault(path.name[: -len(path.suffix)], []).append(path)
    found, duplicates = {}, {}
    for vid, paths in candidates.items():
        paths.sort(key=lambda p: (VIDEO_EXTENSIONS.index(p.suffix.lower()), str(p)))
        found[vid] = paths[0]
        if len(paths) > 1:
            duplicates[vid] = paths[1:]
    return found, duplicates


# ----------------------------------------------------------------------------------------------
# clips


def _words(text: str) -> list[str]:
    return text.split()


# A segment with start == end (an ASR line with a single timestamp) is widened to this duration, so that it has a
# place in time: it can then only merge with a segment it really overlaps, and never gives a zero-length clip.
ZERO_LENGTH_SECONDS = 0.5
# Two segments "touch" when the second starts at most this long after the first ends (ASR timestamp rounding);
# only then can the second's head repeat the first's tail (a rolling caption).
TOUCH_SECONDS = 0.1


def clean_segments(segments: list[Segment]) -> list[Segment]:
    """Undo YouTube rolling-ASR artefacts: sort, drop exact repeats, cut the repeated head of a segment that
    re-shows the previous segment's tail (only when the two overlap or touch in time: a word said again 10 s later
    is kept), and remove time overlaps (a segment starts where the previous ends; one that ends inside the previous
    one is merged into it). A zero-length segment is first widened to ``ZERO_LENGTH_SECONDS``."""
    ordered = sorted(
        (Segment(s.start, s.end if s.end > s.start else s.start + ZERO_LENGTH_SECONDS,
                 " ".join(_words(s.text.replace("\n", " ")))) for s in segments),
        key=lambda s: (s.start, s.end, s.text),
    )
    out: list[Segment] = []
    prev_raw: list[str] = []  # words of the previous segment as the ASR showed them (before trimming)
    for seg in ordered:
        words = _words(seg.text)
        if not words:
            continue
        raw = words
        if out:
            if words == prev_raw and seg.start < out[-1].end + 0.5:
                # exact rolling repeat: keep one copy, spanning both
                out[-1] = Segment(out[-1].start, max(out[-1].end, seg.end), out[-1].text)
                continue
            if seg.start <= out[-1].end + TOUCH_SECONDS:
                # the longest tail of the previous caption that is a head of this one
                k = next((n for n in range(min(len(prev_raw), len(words)), 0, -1) if prev_raw[-n:] == words[:n]), 0)
                words = words[k:]
            prev_raw = raw
            if not words:  # fully repeated: it only extends the previous segment
                out[-1] = Segment(out[-1].start, max(out[-1].end, seg.end), out[-1].text)
                continue
            if seg.end <= out[-1].end:  # swallowed in time by the previous segment: merge its new words into it
                out[-1] = Segment(out[-1].start, out[-1].end, out[-1].text + " " + " ".join(words))
                continue
            seg = Segment(max(seg.start, out[-1].end), seg.end, " ".join(words))
        prev_raw = raw
        out.append(seg)
    return out


def split_long_segments(segments: list[Segment], max_seconds: float) -> list[Segment]:
    """Split every segment longer than ``max_seconds`` into the fewest equal pieces no longer than it, sharing its
    words out in proportion to time (as if spoken at an even pace), so that a clip's text is what was said during
    the clip; pieces that get no word are dropped."""
    out = []
    for seg in segments:
        duration = seg.end - seg.start
        if duration <= max_seconds:
            out.append(seg)
            continue
        words = _words(seg.text)
        n, pieces = len(words), math.ceil(duration / max_seconds - 1e-9)
        # word w goes to piece k when b_k <= w < b_(k+1), b_k = round_half_up(k * n / pieces); computed per word
        # (a bogus timestamp can ask for millions of pieces, almost all of them empty)
        by_piece: dict[int, list[str]] = {}
        for w, word in enumerate(words):
            k = min(((w + 1) * pieces - pieces // 2 - 1) // n, pieces - 1) if n else 0
            by_piece.setdefault(k, []).append(word)
        for k, part in by_piece.items():
            out.append(Segment(seg.start + duration * k / pieces,
                               seg.end if k == pieces - 1 else seg.start + duration * (k + 1) / pieces,
                               " ".join(part)))
    return out


def plan_clips(
    segments: list[Segment],
    *,
    min_seconds: float,
    min_words: int,
    max_seconds: float,
    max_gap_seconds: float = math.inf,
) -> list[Clip]:
    """Clean the ASR segments and split those longer than ``max_seconds`` (``split_long_segments``), then grow clips
    left to right by merging neighbours until a clip lasts ``min_seconds`` and has ``min_words`` words, never beyond
    ``max_seconds`` nor across a silence longer than ``max_gap_seconds``. A too-short tail is merged into the
    previous clip when that stays within ``max_seconds``. Clips with no text are dropped."""
    clips: list[Clip] = []
    current: list[Segment] = []

    def emit(segs: list[Segment]) -> None:
        text = " ".join(s.text for s in segs).strip()
        if not text:
            return
        start, end = segs[0].start, max(s.end for s in segs)
        clips.append(Clip(start, end, text, list(segs)))

    def satisfied(segs: list[Segment]) -> bool:
        words = sum(len(_words(s.text)) for s in segs)
        return segs[-1].end - segs[0].start >= min_seconds and words >= min_words

    for seg in split_long_segments(clean_segments(segments), max_seconds):
        if current:
            too_long = seg.end - current[0].start > max_seconds
            too_far = seg.start - current[-1].end > max_gap_seconds
            if too_long or too_far:
                _close(current, clips, emit, satisfied, max_seconds, max_gap_seconds)
                current = []
        current.append(seg)
        if satisfied(current):
            emit(current)
            current = []
    if current:
        _close(current, clips, emit, satisfied, max_seconds, max_gap_seconds)
    return clips


def _close(current, clips, emit, satisfied, max_seconds, max_gap_seconds) -> None:
    """Emit a group that could not grow further; merge it into the previous clip when it is too small and fits."""
    if not satisfied(current) and clips:
        prev = clips[-1]
        fits = current[-1].end - prev.start <= max_seconds and current[0].start - prev.end <= max_gap_seconds
        if fits:
            merged = prev.segments + current
            clips[-1] = Clip(prev.start, max(s.end for s in merged), " ".join(s.text for s in merged), merged)
            return
    emit(current)


# ----------------------------------------------------------------------------------------------
# frame timestamps


def clip_frame_times(
    start: float, end: float, *, num_frames: int, sampling: str = "fps", fps: float = 1.0, slice: str = "uniform"
) -> list[float]:
    """Target timestamps (seconds, ascending) for one clip.

    ``uniform``: ``num_frames`` times at the centres of equal parts of [start, end].
    ``fps``: one time every 1/fps s from ``start`` (CLIP4Clip's 1 fps sampling), then, when there are more than
    ``num_frames``, CLIP4Clip's ``slice_framepos``: keep the head, the tail, or evenly spaced ones.
    A zero-length clip gets the one time ``start``.
    """
    duration = max(end - start, 0.0)
    if sampling not in ("uniform", "fps"):
        raise ValueError(f"sampling must be 'uniform' or 'fps', got {sampling!r}")
    if duration <= 0:  # a zero-length clip (only from a direct call: planned clips last >= ZERO_LENGTH_SECONDS)
        return [start]  # has one instant, not num_frames copies of it
    if sampling == "uniform":
        step = duration / num_frames
        return [start + (i + 0.5) * step for i in range(num_frames)]
    count = int(math.floor(duration * fps + 1e-9))
    # the centre of every whole 1/fps interval; a clip shorter than one interval gets its middle frame
    times = [start + (i + 0.5) / fps for i in range(count)] if count else [start + duration / 2]
    if len(times) <= num_frames:
        return times
    if slice == "head":
        return times[:num_frames]
    if slice == "tail":
        return times[-num_frames:]
    if slice != "uniform":
        raise ValueError(f"slice must be 'head', 'tail' or 'uniform', got {slice!r}")
    n = len(times)
    # np.linspace(0, n - 1, num_frames, dtype=int), as CLIP4Clip does: for one frame that is [0], the first
    if num_frames == 1:
        return times[:1]
    step = (n - 1) / (num_frames - 1)
    idx = [int(i * step) for i in range(num_frames - 1)] + [n - 1]  # what numpy computes (last one exact)
    return [times[i] for i in idx]


def take_next_frame(shown_pts: float, next_pts: float | None, start: float, end: float) -> bool:
    """The rule that keeps frames inside their clip: the frame on screen at a target was shown at ``shown_pts``;
    take the next frame (at ``next_pts``, None when there is none) instead when the shown one predates the clip's
    ``start`` and the next one still lies inside the clip. Both decoders apply it."""
    return shown_pts < start - 1e-6 and next_pts is not None and next_pts <= end + 1e-6


def select_frames(targets: list[float], frame_pts: list[float],
                  bounds: list[tuple[float, float]] | None = None) -> list[int]:
    """For each target time, the index of the frame on screen at that time: the last frame with pts <= t
    (the first frame for a time before it). ``frame_pts`` must be ascending.

    With ``bounds`` (the ``(start, end)`` of each target's clip), a frame is kept inside its clip: when the frame on
    screen at t was shown before ``start``, the next frame (the first with pts >= start) is taken instead if it
    lies inside the clip. Only a clip too short to hold a frame keeps one shown before its start (by less than one
    frame interval)."""
    import bisect

    out = []
    for k, t in enumerate(targets):
        j = max(0, bisect.bisect_right(frame_pts, t + 1e-6) - 1)
        if bounds is not None and take_next_frame(frame_pts[j], frame_pts[j + 1] if j + 1 < len(frame_pts) else None,
                                                  *bounds[k]):
            j += 1
        out.append(j)
    return out


# ----------------------------------------------------------------------------------------------
# shard assignment


@dataclass
class PlannedClip:
    video_id: str
    clip_index: int
    key: str
    start: float
    end: float
    text: str
    segments: list[dict]
    targets: list[float]
    shard: int = -1


@dataclass
class TaskPlan:
    """One Ray task: decode these videos once, write these shards."""

    task_index: int
    videos: list[str]
    shards: list[int]
    clips: list[PlannedClip]


def plan_record(record: VideoRecord, plan_cfg) -> list[PlannedClip]:
    """The clips of one source record, cut from its timed ``segments`` (HowTo100M-style ASR)."""
    if not record.segments and (record.captions or record.sentences or record.span is not None):
        # benchmark records (one sample per video with all its captions) get their own planner in a later step
        raise NotImplementedError(f"video {record.video_id!r}: a benchmark record (captions/span, no timed "
                                  "segments); this ptrain plans only timed ASR segments (source howto100m)")
    return plan_video(record.video_id, record.segments, plan_cfg)


def plan_video(video_id: str, segments: list[Segment], plan_cfg) -> list[PlannedClip]:
    """Clips of one video's timed segments (``plan_clips``), each with its key and frame times (``plan_cfg``: the
    ``plan`` section of ShardConfig)."""
    clips = plan_clips(
        segments,
        min_seconds=plan_cfg.min_seconds,
        min_words=plan_cfg.min_words,
        max_seconds=plan_cfg.max_seconds,
        max_gap_seconds=plan_cfg.max_gap_seconds,
    )
    out = []
    for i, c in enumerate(clips):
        targets = clip_frame_times(
            c.start, c.end, num_frames=plan_cfg.num_frames, sampling=plan_cfg.sampling, fps=plan_cfg.fps,
            slice=plan_cfg.slice,
        )
        out.append(PlannedClip(video_id, i, sample_key(video_id, i), round(c.start, 6), round(c.end, 6), c.text,
                               [asdict(s) for s in c.segments], [round(t, 6) for t in targets]))
    return out


def assign_shards(per_video: dict[str, list[PlannedClip]], max_samples_per_shard: int,
                  shards_per_task: int) -> list[TaskPlan]:
    """Pack videos (sorted by id) into tasks of at most ``max_samples_per_shard * shards_per_task`` clips (a video
    with more clips gets a task of its own), then deal each task's clips round robin over its shards, interleaving
    videos (clip 0 of every video, then clip 1, ...), so the clips of one video are spread across shards."""
    capacity = max_samples_per_shard * shards_per_task
    tasks: list[TaskPlan] = []
    group: list[str] = []
    count = 0
    for vid in sorted(per_video):
        n = len(per_video[vid])
        if n == 0:
            continue
        if group and count + n > capacity:
            tasks.append(TaskPlan(len(tasks), group, [], []))
            group, count = [], 0
        group.append(vid)
        count += n
    if group:
        tasks.append(TaskPlan(len(tasks), group, [], []))
    next_shard = 0
    for task in tasks:
        interleaved = sorted(
            (c for vid in task.videos for c in per_video[vid]), key=lambda c: (c.clip_index, c.video_id)
        )
        n_shards = max(1, math.ceil(len(interleaved) / max_samples_per_shard))
        for j, clip in enumerate(interleaved):
            clip.shard = next_shard + j % n_shards
        task.shards = list(range(next_shard, next_shard + n_shards))
        task.clips = sorted(interleaved, key=lambda c: (c.shard, c.key))
        next_shard += n_shards
    return tasks


def plan_hash(tasks: list[TaskPlan], settings: dict) -> str:
    """sha256 over every planned clip and the output-affecting settings: names the plan a shard belongs to."""
    h = hashlib.sha256()
    h.update(json.dumps(settings, sort_keys=True).encode())
    for task in tasks:
        for c in task.clips:
            h.update(json.dumps([c.video_id, c.clip_index, c.shard, c.start, c.end, c.text, c.targets]).encode())
    return h.hexdigest()
