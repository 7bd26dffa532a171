"""Timed segments -> clips -> frame timestamps -> shard groups, and the video index. Pure functions.

The plan is a pure function of (the source's records in their order, the planning config): the same inputs give
the same clips, the same frame timestamps and the same shard of every clip. Nothing here reads an annotation file
(``sharding/sources`` does), touches a video or writes a file (``sharding/planstore.py`` stores the plan); the
only I/O is listing the videos (``index_videos``).

    rows = plan_record(record, cfg.plan)                            # one video's clips as compact plan rows
    clips = plan_video(record.video_id, record.segments, cfg.plan)  # [PlannedClip], keys and frame times
    times = clip_frame_times(start, end, num_frames=12)             # target timestamps in seconds
    for group in pack_groups(stream_of_(video_id, rows), max_samples_per_shard, shards_per_task): ...
    clip = place_clip(planned_clip(vid, row), duration)             # a benchmark sample on its video's duration

Two kinds of record (``sharding.sources.VideoRecord``): timed ASR segments are cut into clips (``clip_rows``); a
benchmark record is one sample (``benchmark_row``) holding every caption of the video, over its ``span`` or the
whole video. The length of a whole video is known only when its file is opened, so its row holds a marker (end and
frame times None) that the decode task resolves from the header's duration (``place_clip``): the plan stays a pure
function of the annotations and the settings.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import operator
import os
from dataclasses import dataclass, field, replace
from pathlib import Path

from ptrain.data.format import sanitize_id
from sharding.sources import Segment, VideoRecord

# in order of preference when one id has several files (the benchmarks' originals: MSVD .avi, DiDeMo .mov/.3gp/...)
VIDEO_EXTENSIONS = (".mp4", ".webm", ".mkv", ".avi", ".mov", ".m4v", ".3gp", ".wmv", ".mpg", ".mpeg", ".flv")


@dataclass
class Clip:
    start: float
    end: float
    text: str
    segments: list[Segment] = field(default_factory=list)


# ----------------------------------------------------------------------------------------------
# the video directory


@dataclass
class VideoIndex:
    """Where each video file is: ``found`` ``{video_id: path}``, ``duplicates`` ``{video_id: [other paths]}``, and
    ``digest``, a hash of the listing (what a stored plan is checked against when ``videos`` is a directory)."""

    found: dict[str, str]
    duplicates: dict[str, list[str]]
    list_file: bool  # videos= named a list file (its paths are not checked: a missing one fails at decode time)
    digest: str


def index_videos(spec: str | Path) -> VideoIndex:
    """The video files of ``videos=``: a directory (searched recursively for ``<video_id>.<ext>``) or a list file,
    one path per line or a CSV with a ``video_id,path`` header (relative paths are taken from the list's directory),
    so a million-file tree need not be walked on every run.

    When an id appears more than once (another extension or another sub-directory, or twice in a list), the first
    extension in VIDEO_EXTENSIONS, then the first path in sorted order (in a list: the first line) wins; the others
    are returned as duplicates. Paths are kept as strings (a Path object costs several times the memory)."""
    r = Path(spec)
    if r.is_file():
        return _index_list(r)
    if not r.is_dir():
        raise FileNotFoundError(f"{r}: video directory or list file not found; pass videos=DIR or videos=LIST")
    ranked: dict[str, tuple[int, str]] = {}
    duplicates: dict[str, list[str]] = {}
    for dirpath, dirnames, filenames in os.walk(r):
        dirnames.sort()
        for name in filenames:
            stem, dot, ext = name.rpartition(".")
            ext = "." + ext.lower()
            if not dot or not stem or ext not in VIDEO_EXTENSIONS:
                continue
            # not is_file(): a FIFO or a device is the decoder's problem, and is recorded as such
            cand = (VIDEO_EXTENSIONS.index(ext), os.path.join(dirpath, name))
            have = ranked.get(stem)
            if have is None:
                ranked[stem] = cand
            else:
                keep, drop = (cand, have) if cand < have else (have, cand)
                ranked[stem] = keep
                duplicates.setdefault(stem, []).append(drop[1])
    found = {vid: path for vid, (_rank, path) in ranked.items()}
    del ranked
    dups = {vid: sorted(paths, key=lambda p: (VIDEO_EXTENSIONS.index(os.path.splitext(p)[1].lower()), p))
            for vid, paths in duplicates.items()}
    h = hashlib.sha256()
    for vid in sorted(found):
        h.update(f"{vid}\0{found[vid]}\n".encode("utf-8", "surrogateescape"))
    return VideoIndex(found, dups, False, h.hexdigest())


def _index_list(path: Path) -> VideoIndex:
    found: dict[str, str] = {}
    duplicates: dict[str, list[str]] = {}
    base = path.parent
    with path.open(newline="", encoding="utf-8") as f:
        first = f.readline()
        header = [c.strip() for c in first.strip().split(",")]
        if header[:2] == ["video_id", "path"]:
            rows = ((row[0].strip(), row[1].strip()) for row in csv.reader(f) if len(row) >= 2 and row[0].strip())
        else:
            f.seek(0)
            rows = ((os.path.splitext(os.path.basename(line.strip()))[0], line.strip()) for line in f if line.strip())
        for vid, p in rows:
            full = p if os.path.isabs(p) else os.path.join(base, p)
            if vid in found:
                duplicates.setdefault(vid, []).append(full)
            else:
                found[vid] = full
    return VideoIndex(found, duplicates, True, "")


# ----------------------------------------------------------------------------------------------
# clips


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
    starts, ends, texts, _words = _clean(segments)
    return list(map(Segment, starts, ends, texts))


def split_long_segments(segments: list[Segment], max_seconds: float) -> list[Segment]:
    """Split every segment longer than ``max_seconds`` into the fewest equal pieces no longer than it, sharing its
    words out in proportion to time (as if spoken at an even pace), so that a clip's text is what was said during
    the clip; pieces that get no word are dropped."""
    columns = ([s[0] for s in segments], [s[1] for s in segments], [s[2] for s in segments],
               [len(s[2].split()) for s in segments])
    starts, ends, texts, _words = _split_long(columns, max_seconds)
    return list(map(Segment, starts, ends, texts))


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
    (starts, ends, texts, _words), cuts, clip_ends = _plan_clips(segments, min_seconds, min_words, max_seconds,
                                                                 max_gap_seconds)
    return [Clip(starts[i], end, " ".join(texts[i:j]), list(map(Segment, starts[i:j], ends[i:j], texts[i:j])))
            for i, j, end in zip(cuts, cuts[1:] + [len(starts)], clip_ends)]


# The functions above, on the planner's working form: the segments as columns (starts, ends, texts, word counts),
# each text split once. Planning 136M segments, every object made per segment or per clip adds up, so the clips are
# index ranges into the columns until ``clip_rows`` makes the rows.


def _clean(segments) -> tuple:
    """``clean_segments`` as columns (sequences): starts, ends, texts, word counts. The ends rise strictly (a segment
    that does not end after the previous one is merged into it)."""
    if not segments:
        return [], [], [], []
    starts, ends, texts = zip(*segments)
    wordses = [t.split() for t in texts]
    if not all(map(operator.lt, starts, ends)):
        ends = [b if b > a else a + ZERO_LENGTH_SECONDS for a, b in zip(starts, ends)]
    if not all(map(operator.lt, starts, starts[1:])):
        # not strictly rising: sort as Segments sort, by (start, end, normalised text); rising starts already are
        ordered = sorted(zip(starts, ends, map(" ".join, wordses), wordses))
        starts, ends, wordses = [o[0] for o in ordered], [o[1] for o in ordered], [o[3] for o in ordered]
    # Every segment with words leaves the end of the last kept segment at max(that end, its own end), whichever
    # branch it takes below, so ``last_end`` is the running maximum of the ends so far. Kept segments are one tuple
    # each (one append, not four), the last one held apart while it may still grow.
    kept: list[tuple] = []
    prev: list[str] | None = None  # words of the previous segment as the ASR showed them (before trimming)
    last_start = last_end = 0.0
    last_text = ""
    last_n = 0
    join = " ".join
    for start, end, words in zip(starts, ends, wordses):
        if not words:
            continue
        if prev is None:
            prev, last_start, last_end, last_text, last_n = words, start, end, join(words), len(words)
            continue
        raw = words
        if start <= last_end + TOUCH_SECONDS:
            # touching: the longest tail of the previous caption that is a head of this one goes (a tail starts with
            # words[0]: none when words[0] is not in it); an exact repeat goes whole
            first = words[0]
            if first in prev:
                # the tails that fit start at p >= len(prev) - len(words) with words[0]: the first that matches
                n = len(prev)
                p = n - len(words) if n > len(words) else 0
                while True:
                    try:
                        p = prev.index(first, p)
                    except ValueError:
                        break
                    if prev[p:] == words[:n - p]:
                        words = words[n - p:]
                        break
                    p += 1
        elif words == prev and start < last_end + 0.5:  # exact rolling repeat (TOUCH_SECONDS < 0.5)
            words = ()
        prev = raw
        if not words:  # fully repeated: it only extends the previous segment
            if end > last_end:
                last_end = end
            continue
        if end <= last_end:  # swallowed in time by the previous segment: merge its new words into it
            last_text = last_text + " " + join(words)
            last_n += len(words)
            continue
        kept.append((last_start, last_end, last_text, last_n))
        last_start = last_end if last_end > start else start
        last_end, last_text, last_n = end, join(words), len(words)
    if prev is None:
        return [], [], [], []
    kept.append((last_start, last_end, last_text, last_n))
    return tuple(zip(*kept))


def _split_long(columns, max_seconds: float):
    """``split_long_segments`` on columns (the same columns when no segment is longer than ``max_seconds``)."""
    starts, ends, texts, counts = columns
    if not starts or max(map(operator.sub, ends, starts)) <= max_seconds:
        return columns
    out_s, out_e, out_t, out_n = [], [], [], []
    for start, end, text, count in zip(starts, ends, texts, counts):
        duration = end - start
        if duration <= max_seconds:
            out_s.append(start), out_e.append(end), out_t.append(text), out_n.append(count)
            continue
        words = text.split()
        n, pieces = len(words), math.ceil(duration / max_seconds - 1e-9)
        # word w goes to piece k when b_k <= w < b_(k+1), b_k = round_half_up(k * n / pieces); computed per word
        # (a bogus timestamp can ask for millions of pieces, almost all of them empty)
        by_piece: dict[int, list[str]] = {}
        for w, word in enumerate(words):
            k = min(((w + 1) * pieces - pieces // 2 - 1) // n, pieces - 1) if n else 0
            by_piece.setdefault(k, []).append(word)
        for k, part in by_piece.items():
            out_s.append(start + duration * k / pieces)
            out_e.append(end if k == pieces - 1 else start + duration * (k + 1) / pieces)
            out_t.append(" ".join(part))
            out_n.append(len(part))
    return out_s, out_e, out_t, out_n


def _plan_clips(segments, min_seconds, min_words, max_seconds, max_gap_seconds):
    """``plan_clips`` as ``(columns, cuts, clip ends)``: clip c is the segments ``cuts[c]`` up to ``cuts[c + 1]``
    (the last one up to the end); every segment has text, so the clips cover all of them, in order."""
    cleaned = _clean(segments)
    columns = _split_long(cleaned, max_seconds)
    starts, ends, _texts, counts = columns
    # the clean segments' ends rise, so a clip ends where its last segment does; split pieces are checked
    rising = columns is cleaned or all(map(operator.lt, ends, ends[1:]))
    cuts: list[int] = []  # the first segment of every clip
    clip_ends: list[float] = []
    cur = 0  # the first segment of the group being grown
    cur_start = prev_end = 0.0
    words = 0  # words in the group (kept as it grows: counting them again per segment is quadratic)
    for k, (start, end, count) in enumerate(zip(starts, ends, counts)):
        if k == cur:
            cur_start = start
        elif end - cur_start > max_seconds or start - prev_end > max_gap_seconds:
            _close(cur, k, words, cuts, clip_ends, columns, rising, min_seconds, min_words, max_seconds,
                   max_gap_seconds)
            cur, cur_start, words = k, start, 0
        words += count
        if end - cur_start >= min_seconds and words >= min_words:
            cuts.append(cur)
            clip_ends.append(end if rising else max(ends[cur:k + 1]))
            cur, words = k + 1, 0
        prev_end = end
    if cur < len(starts):
        _close(cur, len(starts), words, cuts, clip_ends, columns, rising, min_seconds, min_words, max_seconds,
               max_gap_seconds)
    return columns, cuts, clip_ends


def _close(i, j, words, cuts, clip_ends, columns, rising, min_seconds, min_words, max_seconds,
           max_gap_seconds) -> None:
    """Emit the group of segments i..j-1 that could not grow further; merge it into the previous clip when it is too
    small and fits."""
    starts, ends = columns[0], columns[1]
    end = ends[j - 1] if rising else max(ends[i:j])
    if cuts and not (ends[j - 1] - starts[i] >= min_seconds and words >= min_words):
        if ends[j - 1] - starts[cuts[-1]] <= max_seconds and starts[i] - clip_ends[-1] <= max_gap_seconds:
            if end > clip_ends[-1]:
                clip_ends[-1] = end
            return
    cuts.append(i)
    clip_ends.append(end)


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
    end: float | None  # None: a benchmark sample over the whole video, placed on its duration at decode time
    text: str
    segments: list[dict]
    targets: list[float] | None  # None with ``end``: computed when the video's duration is known
    shard: int = -1
    bench: dict | None = None  # a benchmark sample's fields (BENCH_ROW); None for an ASR clip


# A planned clip as the plan files store it (compact; ``PlannedClip`` is its readable form):
#   [clip_index, shard, start, end, text, [[seg_start, seg_end, seg_text], ...], [target times]]
# A benchmark sample has an eighth field, a dict: "captions" (every caption, the annotation file's order), "split",
# "span" ([start, end] or None: the whole video), "sampling" ([num_frames, sampling, fps, slice]: how its frame
# times are made once the video's duration is known), and when the record has them "sentences" ([[start, end, text]])
# and "meta" (the record's extra JSON fields). A whole-video sample has start 0 and end and frame times None.
ROW_INDEX, ROW_SHARD, ROW_TARGETS = 0, 1, 6


def plan_record(record: VideoRecord, plan_cfg) -> list[list]:
    """The rows of one source record: clips cut from its timed ``segments`` (HowTo100M-style ASR), or the one
    sample of a benchmark record (``captions``, optionally a ``span`` and ``sentences``); [] when it has no text."""
    if not record.segments and (record.captions or record.sentences or record.span is not None):
        return [benchmark_row(record, plan_cfg)] if record.captions else []
    return clip_rows(record.segments, plan_cfg)


def clip_rows(segments: list[Segment], plan_cfg) -> list[list]:
    """Clips of one video's timed segments (``plan_clips``) with their frame times, as plan rows (shard -1 until
    ``pack_groups`` deals them; a row's segments are ``(start, end, text)`` tuples); ``plan_cfg`` is the ``plan``
    section of ShardConfig."""
    return clip_rows_many([segments], plan_cfg)[0]


def clip_rows_many(segment_lists: list[list[Segment]], plan_cfg) -> list[list[list]]:
    """``clip_rows`` of several videos, the same rows; their frame times in one pass of array operations (whose
    fixed cost per call, paid per video, was the larger part of the time of the frame times)."""
    planned = [_plan_clips(segments, plan_cfg.min_seconds, plan_cfg.min_words, plan_cfg.max_seconds,
                           plan_cfg.max_gap_seconds) for segments in segment_lists]
    clip_starts: list[float] = []
    clip_ends: list[float] = []
    for (starts, _e, _t, _w), cuts, ends in planned:
        clip_starts += [starts[i] for i in cuts]
        clip_ends += ends
    rounded, targets = _row_times(clip_starts, clip_ends, plan_cfg) if clip_starts else ([], [])
    total = len(clip_starts)
    out: list[list[list]] = []
    at = 0  # the first clip of the video in the batch's columns
    join = " ".join
    for (starts, ends, texts, _words), cuts, _ends in planned:
        n = len(cuts)
        if not n:
            out.append([])
            continue
        stops = cuts[1:] + [len(starts)]
        segs = list(zip(starts, ends, texts))
        out.append(list(map(list, zip(range(n), [-1] * n, rounded[at:at + n], rounded[total + at:total + at + n],
                                      [join(texts[i:j]) for i, j in zip(cuts, stops)],
                                      [segs[i:j] for i, j in zip(cuts, stops)], targets[at:at + n]))))
        at += n
    return out


# A batch of ``plan_records``: at most this many videos, and it closes once it holds this many segments (one
# video's, however many, is always planned: memory stays that of one entry at most, plus a batch of common ones).
BATCH_VIDEOS = 256
BATCH_SEGMENTS = 1 << 16


def plan_records(records, plan_cfg):
    """``(record, rows)`` for every record, in order: ``plan_record``'s rows, None for a record with a
    ``skip_reason``. ASR records are planned in batches (``clip_rows_many``); a record raising in the source
    (a malformed entry) stops the stream there, as it would one record at a time."""
    batch: list = []
    size = 0
    for record in records:
        batch.append(record)
        size += len(record.segments)
        if len(batch) >= BATCH_VIDEOS or size >= BATCH_SEGMENTS:
            yield from _plan_batch(batch, plan_cfg)
            batch, size = [], 0
    yield from _plan_batch(batch, plan_cfg)


def _plan_batch(batch: list, plan_cfg):
    asr = [r for r in batch if not r.skip_reason and (r.segments or not (r.captions or r.sentences
                                                                        or r.span is not None))]
    rows = iter(clip_rows_many([r.segments for r in asr], plan_cfg)) if asr else iter(())
    asr_ids = set(map(id, asr))
    for record in batch:
        if record.skip_reason:
            yield record, None
        elif id(record) in asr_ids:
            yield record, next(rows)
        else:
            yield record, plan_record(record, plan_cfg)


def _row_times(clip_starts: list[float], clip_ends: list[float], plan_cfg) -> tuple[list[float], list[list[float]]]:
    """``[round(start, 6) ..., round(end, 6) ...]`` and every clip's ``clip_frame_times`` rounded to 6 decimals, for
    all the clips of a video in a few array operations (per clip and per frame in Python, this was a third of the
    planner's time). The arithmetic is ``clip_frame_times``' own, operation for operation in float64, so the times
    are the same to the bit; ``_round6`` rounds as ``round(x, 6)`` does."""
    import numpy as np

    num_frames, fps = plan_cfg.num_frames, plan_cfg.fps
    s = np.array(clip_starts)
    duration = np.array(clip_ends) - s
    if not (duration > 0).all() or plan_cfg.sampling not in ("uniform", "fps"):  # only from direct calls
        return _round6(clip_starts + clip_ends), [
            [round(t, 6) for t in clip_frame_times(a, b, num_frames=num_frames, sampling=plan_cfg.sampling, fps=fps,
                                                   slice=plan_cfg.slice)] for a, b in zip(clip_starts, clip_ends)]
    if plan_cfg.sampling == "uniform":
        lengths = np.full(len(s), num_frames)
    else:
        count = np.floor(duration * fps + 1e-9)
        lengths = np.where(count > num_frames, num_frames, np.maximum(count, 1)).astype(np.int64)
    offsets = np.zeros(len(s) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    clip = np.repeat(np.arange(len(s)), lengths)  # the clip of every frame time
    j = (np.arange(offsets[-1]) - offsets[clip]).astype(np.float64)  # its place in the clip
    if plan_cfg.sampling == "uniform":  # num_frames times at the centres of equal parts of [start, end]
        times = s[clip] + (j + 0.5) * (duration / num_frames)[clip]
    else:  # the centre of every 1/fps interval, then CLIP4Clip's slice_framepos over the kept ones
        n = count[clip]
        sliced = n > num_frames
        if plan_cfg.slice == "tail":
            k = np.where(sliced, n - num_frames + j, j)
        elif plan_cfg.slice == "uniform" and num_frames > 1:
            # np.linspace(0, n - 1, num_frames, dtype=int): int(i * (n - 1) / (num_frames - 1)), the last one exact
            picked = np.where(j == num_frames - 1, n - 1, np.trunc(j * ((n - 1) / (num_frames - 1))))
            k = np.where(sliced, picked, j)
        else:  # head, or one frame (the first)
            k = j
        times = np.where(n == 0, (s + duration / 2)[clip], s[clip] + (k + 0.5) / fps)
    flat = _round6(np.concatenate((s, np.array(clip_ends), times)))
    bounds = (offsets + 2 * len(s)).tolist()
    return flat[:2 * len(s)], [flat[a:b] for a, b in zip(bounds, bounds[1:])]


def _round6(x) -> list[float]:
    """``[round(v, 6) for v in x]`` at array speed. ``round`` gives the double nearest to v rounded to a multiple of
    1e-6 (half to even, on v's exact value); so does ``rint(v * 1e6) / 1e6`` whenever ``v * 1e6`` is not within its
    rounding error of a half-integer (the product is off by at most half an ulp, far below 1e-3 for |v| < 2**40 / 1e6
    s; the division of two exact integers is correctly rounded). The few values near a tie get ``round`` itself."""
    import numpy as np

    x = np.asarray(x, dtype=np.float64)
    y = x * 1e6
    out = np.rint(y) / 1e6
    doubtful = ~(np.abs(y) < 2.0**40) | (np.abs(y - np.floor(y) - 0.5) < 1e-3)
    values = out.tolist()
    if doubtful.any():
        for i in np.flatnonzero(doubtful).tolist():
            values[i] = round(float(x[i]), 6)
    return values


def benchmark_row(record: VideoRecord, plan_cfg) -> list:
    """The one sample of a benchmark record (``record.captions`` non-empty) as a plan row: its first caption is the
    training text; over ``record.span`` (frame times planned now; the span is cut at the video's end when it is
    decoded) or, with no span, the whole video (a marker: start 0, end and frame times None, ``place_clip``)."""
    sampling = [plan_cfg.num_frames, plan_cfg.sampling, plan_cfg.fps, plan_cfg.slice]
    bench: dict = {"captions": list(record.captions), "split": record.split, "sampling": sampling,
                   "span": [round(record.span[0], 6), round(record.span[1], 6)] if record.span is not None else None}
    if record.sentences:
        bench["sentences"] = [[round(s[0], 6), round(s[1], 6), s[2]] for s in record.sentences]
    if record.meta:
        bench["meta"] = dict(record.meta)
    if record.span is None:
        return [0, -1, 0.0, None, record.captions[0], [], None, bench]
    start, end = bench["span"]
    return [0, -1, start, end, record.captions[0], [], _frame_times(start, end, sampling), bench]


def _frame_times(start: float, end: float, sampling: list) -> list[float]:
    num_frames, mode, fps, slice_ = sampling
    return [round(t, 6) for t in clip_frame_times(start, end, num_frames=num_frames, sampling=mode, fps=fps,
                                                  slice=slice_)]


def planned_frames(row: list) -> int:
    """Frames a plan row asks for; a whole-video sample counts its most (its length is not known yet)."""
    return len(row[ROW_TARGETS]) if row[ROW_TARGETS] is not None else row[7]["sampling"][0]


def place_clip(clip: PlannedClip, duration: float) -> PlannedClip | str:
    """A benchmark sample placed on its video, ``duration`` seconds long (the header's): a whole-video sample
    becomes [0, duration] with its frame times (1/fps, at most num_frames, spread by ``slice``, as planned for a
    clip); a span that runs past the end is cut there (CLIP4Clip reads a span up to min(end, duration): DiDeMo's
    30 s of a shorter video). A span that starts at or after the end gives the message saying so instead. An ASR
    clip, or a span inside the video, is returned unchanged."""
    if clip.bench is None or (clip.end is not None and clip.end <= duration):
        return clip
    if not math.isfinite(duration):
        raise ValueError(f"video {clip.video_id!r}: place_clip needs a finite duration, got {duration!r}")
    if clip.start >= duration:
        what = f"span [{clip.start:.2f}, {clip.end:.2f}] s" if clip.end is not None else "the whole video"
        return f"{what} starts at or after the video's end ({duration:.2f} s)"
    end = round(duration, 6)
    return replace(clip, end=end, targets=_frame_times(clip.start, end, clip.bench["sampling"]))


def planned_clip(video_id: str, row: list, key_stem: str | None = None) -> PlannedClip:
    """The readable form of a plan row (``key_stem``: ``sanitize_id(video_id)``, when the caller has it)."""
    i, shard, start, end, text, segs, targets, *bench = row
    stem = key_stem if key_stem is not None else sanitize_id(video_id)
    return PlannedClip(video_id, i, f"{stem}_{i:04d}", start, end, text,
                       [{"start": a, "end": b, "text": t} for a, b, t in segs], targets, shard,
                       bench[0] if bench else None)


def plan_video(video_id: str, segments: list[Segment], plan_cfg) -> list[PlannedClip]:
    """Clips of one video's timed segments, each with its key and frame times (shard unassigned)."""
    stem = sanitize_id(video_id)
    return [planned_clip(video_id, row, stem) for row in clip_rows(segments, plan_cfg)]


@dataclass
class Group:
    """A shard group: one writer's shards and the videos whose clips fill them (each video decoded once)."""

    index: int
    first_shard: int
    num_shards: int
    videos: list[tuple[str, list[list]]]  # (video_id, clip rows with their shard) in stream order
    clips: int

    @property
    def shards(self) -> list[int]:
        return list(range(self.first_shard, self.first_shard + self.num_shards))


def pack_groups(videos, max_samples_per_shard: int, shards_per_task: int):
    """Pack ``(video_id, rows)`` pairs, in the order given, into groups of at most ``max_samples_per_shard *
    shards_per_task`` clips (a video with more clips gets a group of its own), and deal each group's clips round
    robin over its shards, interleaving videos (clip 0 of every video, then clip 1, ...; videos by id), so the clips
    of one video are spread across shards. A generator: memory is one group, whatever the corpus."""
    capacity = max_samples_per_shard * shards_per_task
    group: list[tuple[str, list[list]]] = []
    count = index = next_shard = 0

    def close() -> Group:
        nonlocal index, next_shard
        n_shards = max(1, math.ceil(count / max_samples_per_shard))
        order = sorted((row[ROW_INDEX], vid, row) for vid, rows in group for row in rows)
        for j, (_i, _vid, row) in enumerate(order):
            row[ROW_SHARD] = next_shard + j % n_shards
        g = Group(index, next_shard, n_shards, group, count)
        index += 1
        next_shard += n_shards
        return g

    for vid, rows in videos:
        n = len(rows)
        if n == 0:
            continue
        if group and count + n > capacity:
            yield close()
            group, count = [], 0
        group.append((vid, rows))
        count += n
    if group:
        yield close()
