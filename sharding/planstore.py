"""The stored plan of a `ptrain shard` output: per-group plan files, a plan manifest with its hash, reuse by inputs.

    key = inputs_key(cfg, source.describe(), index)        # the inputs by size and mtime, and the settings
    stored = reusable_plan(state_dir, key) or build_plan(cfg, source, index, state_dir, key)
    stored.plan_hash, stored.groups                         # [[first_shard, num_shards, videos, clips, frames]]
    for video_id, path, rows in read_group(stored.group_file(3)): ...

Layout (``OUT/.ptrain_shard/``):

    plans/<plan_hash>/manifest.json       the hash, settings, inputs, counts and one entry per shard group
    plans/<plan_hash>/group-NNNNNN.jsonl  one line per video: [video path, [video_id, [clip rows]]]
    plans/<plan_hash>/plan-errors.jsonl   what is known from the inputs alone: missing videos, no captions, ...
    plans/inputs-<inputs_key>.json        {inputs_key, plan_hash}: the plan a rerun with these inputs reuses

Planning streams: the source yields one video at a time, ``pack_groups`` holds one group, and each group is written
as soon as it is full, so the driver's memory is the per-video index (ids seen, the video files) whatever the
corpus. A Ray task gets the path of its group's file, never the clips.

The plan hash is sha256 over the settings and every video's clip rows (id, clip index, shard, times, text,
segments, frame times) in plan order; video paths are not in it (moving the videos does not change the plan).
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
import re
import shutil
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import orjson

from ptrain.data.format import sanitize_id
from sharding.plan import VIDEO_EXTENSIONS, VideoIndex, pack_groups, plan_records, planned_frames
from sharding.sources import CaptionError, file_facts
from sharding.write import write_atomic

PLAN_FORMAT = 1  # bump when the plan files or the planner's output change: stored plans are then made again
# a sanitised id ends in '-' and 8 hex digits; only a safe id of that shape can collide with one
_SANITISED_TAIL = re.compile(r"-[0-9a-f]{8}$")


def settings_of(cfg) -> dict[str, Any]:
    """The settings that shape the output (part of the plan hash)."""
    settings = dict(vars(cfg.plan)) | {
        "frame_size": cfg.frame_size, "center_crop": cfg.center_crop, "jpeg_quality": cfg.jpeg_quality,
        "max_samples_per_shard": cfg.max_samples_per_shard, "shards_per_task": cfg.shards_per_task,
        "name": cfg.name, "decoder": cfg.decoder,
    }
    if cfg.source != "howto100m":  # the default source stays out, so plans made before sources existed keep their hash
        settings["source"] = cfg.source
    return settings


def videos_facts(spec: str, index: VideoIndex | None) -> dict[str, Any]:
    """What the video index was made from: a list file by size and mtime, a directory by a digest of its listing."""
    if Path(spec).is_file():
        return {"list": file_facts(spec)}
    return {"dir": str(spec), "digest": index.digest if index else None}


def inputs_key(cfg, source_facts: dict, videos: dict) -> str:
    """sha256 of everything a stored plan depends on: the inputs (files by size and mtime), the settings, the
    planner's version. Equal keys: the stored plan is reused without reading the captions again."""
    import ptrain

    blob = {"format": PLAN_FORMAT, "ptrain": ptrain.__version__, "settings": settings_of(cfg),
            "source": source_facts, "videos": videos}
    return hashlib.sha256(json.dumps(blob, sort_keys=True, default=str).encode()).hexdigest()


@dataclass
class StoredPlan:
    dir: Path
    manifest: dict[str, Any]

    @property
    def plan_hash(self) -> str:
        return self.manifest["plan_hash"]

    @property
    def groups(self) -> list[list[int]]:
        """Per group: ``[first_shard, num_shards, videos, clips, frames]``."""
        return self.manifest["groups"]

    def group_file(self, index: int) -> Path:
        return self.dir / f"group-{index:06d}.jsonl"

    @property
    def errors_file(self) -> Path:
        return self.dir / "plan-errors.jsonl"

    def plan_errors(self) -> Iterator[dict]:
        with self.errors_file.open(encoding="utf-8") as f:
            for line in f:
                yield json.loads(line)


def read_group(path: str | Path) -> list[tuple[str, str, list[list]]]:
    """``[(video_id, video_path, clip rows)]`` of one group file."""
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            video_path, (vid, rows) = json.loads(line)
            out.append((vid, video_path, rows))
    return out


def reusable_plan(state: Path, key: str) -> StoredPlan | None:
    """The stored plan made from the same inputs and settings, if there is one intact."""
    try:
        latest = json.loads(_pointer(state / "plans", key).read_text())
        if latest.get("inputs_key") != key:
            return None
        plan_dir = state / "plans" / latest["plan_hash"]
        manifest = json.loads((plan_dir / "manifest.json").read_text())
        if manifest.get("inputs_key") != key or manifest.get("format") != PLAN_FORMAT:
            return None
        return StoredPlan(plan_dir, manifest)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None  # none, or damaged: plan again


_dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


def plan_line(video_id: str, rows: list[list]) -> bytes:
    """``[video_id, rows]`` as a plan file stores it and the plan hash covers it: compact JSON, UTF-8, floats by
    ``repr``; the bytes ``json`` has always written (so a plan keeps its hash), made by orjson (about 7x faster).
    orjson writes the same text except for a float below 1e-4 (``0.00001`` for ``1e-05``, ``1e-7`` for ``1e-07``),
    a NaN or an infinity (``null``), a lone surrogate, an integer beyond 64 bits (both refused): a line with any
    of these is made by ``json``. (A text containing ``e-``, ``.0000`` or ``null`` takes that path too.)"""
    try:
        line = orjson.dumps([video_id, rows])
    except orjson.JSONEncodeError:
        return _dumps([video_id, rows]).encode()
    if b".0000" in line or b"e-" in line or b"null" in line:
        return _dumps([video_id, rows]).encode()
    return line


def _error(video_id, cls, message, clips=None) -> dict:
    e = {"video_id": video_id, "clip_index": None, "key": None, "stage": "plan", "class": cls, "message": message}
    if clips is not None:
        e["clips"] = clips
    return e


def build_plan(cfg, source, index: VideoIndex, state: Path, key: str, inputs: dict) -> StoredPlan:
    """Plan every record of ``source`` video by video and store the plan (see the module doc); CaptionError on a
    malformed annotation (nothing is kept of the partial plan)."""
    plans = state / "plans"
    plans.mkdir(parents=True, exist_ok=True)
    for stale in plans.glob(".incoming-*"):  # what a killed planner left (the caller holds the output's lock)
        shutil.rmtree(stale, ignore_errors=True)
    tmp = plans / f".incoming-{os.getpid()}"
    tmp.mkdir()
    # The rows are lists and tuples without cycles, freed by reference counting; with the collector's default
    # thresholds its passes over the rows and groups still alive took ~8% of the planner's time. Rarer passes
    # (cycles are still collected) for the build's duration.
    thresholds = gc.get_threshold()
    gc.set_threshold(100_000, 20, 100)
    try:
        return _build(cfg, source, index, plans, tmp, key, inputs)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        gc.set_threshold(*thresholds)


def _build(cfg, source, index, plans: Path, tmp: Path, key: str, inputs: dict) -> StoredPlan:
    settings = settings_of(cfg)
    h = hashlib.sha256(json.dumps({"format": PLAN_FORMAT, "settings": settings}, sort_keys=True).encode())
    counts = Counter()
    by_class = Counter()
    key_owner: dict[str, str] = {}  # key stem -> video id, only for stems that two ids could share
    paths: dict[str, str] = {}  # video id -> file, for the videos of the group being filled
    where = cfg.captions or cfg.annotations
    extensions = "|".join(e[1:] for e in VIDEO_EXTENSIONS)
    errors = (tmp / "plan-errors.jsonl").open("w", encoding="utf-8")

    def record_error(e: dict) -> None:
        by_class[e["class"]] += 1
        counts["unplanned_clips"] += e.get("clips", 0)
        errors.write(json.dumps(e, sort_keys=True) + "\n")

    def videos():
        for record, rows in plan_records(source.records(), cfg.plan):
            counts["listed"] += 1
            vid, stem = record.video_id, record.stem
            if record.skip_reason:
                record_error(_error(vid, "no_captions", record.skip_reason))
                continue
            if not rows:
                record_error(_error(vid, "no_clips", f"{vid}: no caption segment with text"
                                    if cfg.source == "howto100m" else f"{vid}: no caption"))
                continue
            # a benchmark's files are named by its file id (ActivityNet without the v_, DiDeMo without the
            # extension), but some copies keep the id as the annotations spell it: either one is found
            names = (stem, vid) if stem != vid else (stem,)
            stem = next((n for n in names if n in index.found), stem)
            path = index.found.get(stem)
            if path is None:
                record_error(_error(vid, "missing", f"{vid}: no {' or '.join(names)}.<{extensions}> under "
                                                    f"{cfg.videos}", clips=len(rows)))
                continue
            if stem in index.duplicates:
                record_error(_error(vid, "duplicate_id", f"{vid}: several files: using {path}, ignoring "
                                                         f"{', '.join(index.duplicates[stem])}"))
            key_stem = sanitize_id(vid)
            if key_stem != vid or _SANITISED_TAIL.search(vid):
                other = key_owner.setdefault(key_stem, vid)
                if other != vid:
                    raise CaptionError(f"{where}: video ids {other!r} and {vid!r} give the same sample key "
                                       f"{key_stem!r} after sanitising; rename one of them")
            paths[vid] = os.path.abspath(path)
            counts["planned"] += 1
            yield vid, rows

    groups = []
    with errors:
        for group in pack_groups(videos(), cfg.max_samples_per_shard, cfg.shards_per_task):
            frames = 0
            with (tmp / f"group-{group.index:06d}.jsonl").open("wb") as f:
                for vid, rows in group.videos:
                    payload = plan_line(vid, rows)
                    h.update(payload)
                    f.write(b"[" + _dumps(paths.pop(vid)).encode() + b"," + payload + b"]\n")
                    frames += sum(map(planned_frames, rows))
            groups.append([group.first_shard, group.num_shards, len(group.videos), group.clips, frames])
    phash = h.hexdigest()
    manifest = {
        "format": PLAN_FORMAT, "plan_hash": phash, "inputs_key": key, "inputs": inputs, "settings": settings,
        "videos_listed": counts["listed"], "videos_planned": counts["planned"],
        "clips": sum(g[3] for g in groups), "frames": sum(g[4] for g in groups),
        "shards": sum(g[1] for g in groups), "unplanned_clips": counts["unplanned_clips"],
        "plan_failures_by_class": dict(sorted(by_class.items())), "groups": groups,
    }
    write_atomic(tmp / "manifest.json", json.dumps(manifest, sort_keys=True).encode())
    final = plans / phash
    if final.is_dir():  # the same plan, made again (inputs touched, content unchanged): keep the one in place
        shutil.rmtree(tmp)
    else:
        os.rename(tmp, final)
    write_atomic(_pointer(plans, key), json.dumps({"inputs_key": key, "plan_hash": phash}).encode())
    return StoredPlan(final, manifest)


def _pointer(plans: Path, key: str) -> Path:
    return plans / f"inputs-{key[:32]}.json"


def discard(stored: StoredPlan) -> None:
    """Remove a stored plan (one this output cannot use: it holds shards of another plan)."""
    shutil.rmtree(stored.dir, ignore_errors=True)
    _pointer(stored.dir.parent, stored.manifest["inputs_key"]).unlink(missing_ok=True)
