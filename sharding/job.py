"""`ptrain shard`: Ray orchestration of plan -> decode -> shard writing. The only module that imports ray.

    ptrain shard videos=DIR captions=caption.json out=SHARDS [video_list=HowTo100M_v1.csv] [plan.num_frames=12] ...
    ray job submit --address http://127.0.0.1:8265 -- ptrain shard ... ray.address=auto

The driver reads the videos and their text from the source (``sharding/sources``, ``source=howto100m``), plans
every clip (pure, fast, no video touched) and packs the videos into shard groups (a group's clips are dealt over its
shards). For every group that is not committed yet it starts:

- decode tasks, a few videos each (``videos_per_decode_task``), which decode each video once in a killable child
  process and return the JPEG-encoded samples through the object store, and
- one writer task that receives the decode results of its group, writes its shards atomically and records the
  group's failures.

Decode parallelism is therefore independent of the shard size, and the progress bar moves per decode task.
The driver merges the failures into ``errors.jsonl`` and writes ``manifest.json``; both are rewritten whole on
every run from per-group records, so a rerun never duplicates a line.
"""

from __future__ import annotations

import fcntl
import json
import platform
import socket
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

from ptrain.data.format import ERRORS, MANIFEST, encode_sample, shard_stem
from sharding.config import ShardConfig
from sharding.plan import PlannedClip, TaskPlan, assign_shards, find_videos, plan_hash, plan_record
from sharding.sources import CaptionError, open_source
from sharding.write import ForeignShardsError, scan_output, write_atomic, write_shard

STATE_DIR = ".ptrain_shard"  # plan marker, lock and per-group failure records


def _versions() -> dict:
    import numpy
    import simplejpeg

    import ptrain
    from sharding.decode import pyav

    return {"ptrain": ptrain.__version__, "av": pyav.version(), "simplejpeg": simplejpeg.__version__,
            "numpy": numpy.__version__, "python": platform.python_version()}


def _error(video_id, stage, cls, message, clip_index=None, key=None, clips=None) -> dict:
    e = {"video_id": video_id, "clip_index": clip_index, "key": key, "stage": stage, "class": cls,
         "message": message}
    if clips is not None:
        e["clips"] = clips
    return e


# ----------------------------------------------------------------------------------------------
# Ray task bodies (plain functions: testable without Ray)

_WORKER = None


def _decode_worker():
    """One decoder child per Ray worker process, reused across tasks (Ray reuses its workers): the child's
    start-up cost is paid once, and a hung child is killed and replaced by DecodeWorker itself."""
    global _WORKER
    if _WORKER is None:
        from sharding.decode.worker import DecodeWorker

        _WORKER = DecodeWorker()
    return _WORKER


def _sample(clip: PlannedClip, info, frames: list) -> tuple[str, dict[str, bytes]]:
    """One clip as the members of a shard sample (``ptrain.data.format``): its caption is the clip's text."""
    meta = {
        "video_id": clip.video_id, "clip_index": clip.clip_index, "start": clip.start, "end": clip.end,
        "text": clip.text, "captions": [clip.text], "segments": clip.segments,
        "frame_times": [pts for pts, _ in frames], "target_times": clip.targets, "fps": round(info.fps, 6),
        "width": info.width, "height": info.height, "duration": round(info.duration, 6),
    }
    return clip.key, encode_sample(clip.key, meta, [jpg for _pts, jpg in frames])


def decode_videos(videos: list[tuple[str, str, list[PlannedClip]]], opts: dict, skip_shards: list[int]) -> dict:
    """Decode each video once for all its clips; return the samples of shards not committed yet, and failures."""
    from sharding.decode.video import ExtractError

    worker = _decode_worker()
    skip = set(skip_shards)
    samples: dict[int, list] = defaultdict(list)
    errors: list[dict] = []
    for vid, path, clips in videos:
        try:
            info, per_clip = worker.run(
                path, [(c.start, c.end, c.targets) for c in clips], timeout=opts["video_timeout_s"],
                frame_size=opts["frame_size"], center_crop=opts["center_crop"], jpeg_quality=opts["jpeg_quality"],
                threads=opts["decoder_threads"], decoder=opts["decoder"], end_tolerance=opts["end_tolerance_seconds"],
            )
        except ExtractError as e:
            errors.append(_error(vid, "decode", e.cls, e.message, clips=len(clips)))
            continue
        for clip, result in zip(clips, per_clip):
            if isinstance(result, ExtractError):
                errors.append(_error(vid, "clip", result.cls, result.message, clip.clip_index, clip.key))
            elif clip.shard not in skip:
                samples[clip.shard].append(_sample(clip, info, result))
    return {"samples": dict(samples), "errors": errors, "clips": sum(len(c) for _v, _p, c in videos)}


def write_group(task: TaskPlan, opts: dict, skip_shards: list[int], *decoded: dict) -> dict:
    """Write the group's uncommitted shards from its decode results, then its failure record."""
    out = Path(opts["out"])
    samples: dict[int, list] = defaultdict(list)
    errors: list[dict] = []
    for part in decoded:
        for shard, items in part["samples"].items():
            samples[shard].extend(items)
        errors.extend(part["errors"])
    written = []
    for shard in task.shards:
        if shard not in skip_shards:
            stem = shard_stem(opts["name"], shard)
            written.append(write_shard(out, stem, sorted(samples[shard]), {"plan_hash": opts["plan_hash"],
                                                                           "versions": opts["versions"]}))
    errors.sort(key=lambda e: (e["video_id"], e["clip_index"] if e["clip_index"] is not None else -1))
    write_atomic(_errors_file(out, opts["plan_hash"], task.task_index),
                 "".join(json.dumps(e, sort_keys=True) + "\n" for e in errors).encode())
    return {"task": task.task_index, "written": written}


def _errors_file(out: Path, phash: str, task_index: int) -> Path:
    return out / STATE_DIR / f"errors-{phash[:12]}-group-{task_index:06d}.jsonl"


# ----------------------------------------------------------------------------------------------
# the driver


class RayStartError(RuntimeError):
    """Ray could not be joined or started; the message names the address and the fix."""


def _unreachable(address: str, timeout: float = 5.0) -> str | None:
    """Why nothing answers at a ``host:port`` or ``ray://host:port`` address, or None (also for 'auto' and
    for forms Ray resolves itself). Ray alone retries a dead address for minutes before giving up."""
    hostport = address.split("://", 1)[1] if "://" in address else address
    host, sep, port = hostport.rstrip("/").rpartition(":")
    if not sep or not host or not port.isdigit():
        return None
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            return None
    except OSError as e:
        return f"nothing answers at {host}:{port} ({e.strerror or e})"


def _start_ray(cfg):
    import ray

    started = False
    if not ray.is_initialized():
        kwargs = {"include_dashboard": False, "logging_level": "WARNING", "log_to_driver": True}
        try:
            if cfg.ray.address:
                why_not = _unreachable(cfg.ray.address)
                if why_not:
                    raise ConnectionError(why_not)
                ray.init(address=cfg.ray.address, **kwargs)
            else:
                ray.init(num_cpus=cfg.ray.num_cpus, **kwargs)
                started = True
        except Exception as e:  # noqa: BLE001 - ConnectionError, RuntimeError, ...: all mean "no Ray to run on"
            why = (str(e).strip().splitlines() or [type(e).__name__])[0]
            if cfg.ray.address:
                raise RayStartError(
                    f"cannot join the Ray cluster at ray.address={cfg.ray.address!r}: {why}\n  Start one "
                    "(`ray start --head` on this machine for 'auto'), check the address (ray://HEAD:10001, or the "
                    "HEAD:6379 of `ray start`), submit this command with `ray job submit`, or leave ray.address "
                    "unset to start a local Ray."
                ) from None
            raise RayStartError(f"cannot start a local Ray (ray.num_cpus={cfg.ray.num_cpus}): {why}\n  Check "
                                "the free memory and /tmp space, or join a running cluster with ray.address=...") \
                from None
    return ray, started


def _plan(cfg: ShardConfig):
    """Everything decided before any video is touched: clips, shards, failures known from the inputs alone."""
    source = open_source(cfg.source, cfg)
    records = list(source.records())
    files, duplicates = find_videos(cfg.videos)
    plan_errors: list[dict] = []
    per_video: dict[str, list[PlannedClip]] = {}
    paths: dict[str, Path] = {}
    owner_of_key: dict[str, str] = {}
    for record in records:
        vid, stem = record.video_id, record.stem
        if record.skip_reason:
            plan_errors.append(_error(vid, "plan", "no_captions", record.skip_reason))
            continue
        clips = plan_record(record, cfg.plan)
        if not clips:
            plan_errors.append(_error(vid, "plan", "no_clips", f"{vid}: no caption segment with text"))
            continue
        if stem not in files:
            plan_errors.append(_error(vid, "plan", "missing", f"{vid}: no {stem}.<mp4|webm|mkv|avi|mov|m4v> under "
                                                              f"{cfg.videos}", clips=len(clips)))
            continue
        if stem in duplicates:
            plan_errors.append(_error(vid, "plan", "duplicate_id", f"{vid}: several files: using {files[stem]}, "
                                      f"ignoring {', '.join(map(str, duplicates[stem]))}"))
        key_stem = clips[0].key.rsplit("_", 1)[0]
        other = owner_of_key.setdefault(key_stem, vid)
        if other != vid:
            raise CaptionError(f"{cfg.captions or cfg.annotations}: video ids {other!r} and {vid!r} give the same "
                               f"sample key {key_stem!r} after sanitising; rename one of them")
        per_video[vid] = clips
        paths[vid] = files[stem]
    tasks = assign_shards(per_video, cfg.max_samples_per_shard, cfg.shards_per_task)
    settings = dict(vars(cfg.plan)) | {
        "frame_size": cfg.frame_size, "center_crop": cfg.center_crop, "jpeg_quality": cfg.jpeg_quality,
        "max_samples_per_shard": cfg.max_samples_per_shard, "shards_per_task": cfg.shards_per_task,
        "name": cfg.name, "decoder": cfg.decoder,
    }
    if cfg.source != "howto100m":  # the default source stays out, so plans made before sources existed keep their hash
        settings["source"] = cfg.source
    return source, len(records), paths, per_video, plan_errors, tasks, settings, plan_hash(tasks, settings)


def run(cfg: ShardConfig) -> int:
    t_start = time.time()
    out = Path(cfg.out)
    try:
        source, n_listed, paths, per_video, plan_errors, tasks, settings, phash = _plan(cfg)
        inputs = source.describe()  # what the plan was made from, stated as it was read
    except (CaptionError, FileNotFoundError) as e:
        print(f"ptrain shard: {e}", file=sys.stderr)
        return 2
    total_clips = sum(len(t.clips) for t in tasks)
    stems = [shard_stem(cfg.name, s) for t in tasks for s in t.shards]
    versions = _versions()

    # one run per output directory at a time
    state = out / STATE_DIR
    state.mkdir(parents=True, exist_ok=True)
    lock = open(state / "lock", "w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        print(f"ptrain shard: another `ptrain shard` is writing to {out}; wait for it to finish", file=sys.stderr)
        return 2

    # resume: keep verified shards of this plan, remove what a crash left of ours, never touch anything else
    marker = state / "plan.json"
    marker_plan = json.loads(marker.read_text()).get("plan_hash") if marker.is_file() else None
    try:
        committed, removed = scan_output(out, stems, phash, versions, marker_plan)
    except ForeignShardsError as e:
        print(f"ptrain shard: {e}", file=sys.stderr)
        return 2
    if marker_plan is None:
        write_atomic(marker, json.dumps({"plan_hash": phash, "settings": settings}, indent=1).encode())
    from ptrain.config import config_to_dict, dump_config

    dump_config(cfg, out / "config.yaml")
    pending = []
    for task in tasks:
        done = [s for s in task.shards if shard_stem(cfg.name, s) in committed]
        if len(done) < len(task.shards) or not _errors_file(out, phash, task.task_index).is_file():
            pending.append((task, done))
    print(f"ptrain shard: {n_listed} videos listed, {len(per_video)} to decode, {total_clips} clips planned "
          f"-> {len(stems)} shards (plan {phash[:12]}); {len(committed)} shards already committed, "
          f"{len(pending)}/{len(tasks)} shard groups to run" + (f"; removed partial {removed}" if removed else ""))

    # run the pending groups on Ray: decode tasks feed one writer task per group
    crashed: list[tuple[TaskPlan, str]] = []
    decoded_clips = 0
    if pending:
        try:
            ray, started = _start_ray(cfg)
        except RayStartError as e:
            print(f"ptrain shard: {e}", file=sys.stderr)
            return 2
        opts = {"out": str(out.resolve()), "name": cfg.name, "plan_hash": phash, "versions": versions,
                "frame_size": cfg.frame_size, "center_crop": cfg.center_crop, "jpeg_quality": cfg.jpeg_quality,
                "decoder_threads": cfg.decoder_threads, "decoder": cfg.decoder,
                "video_timeout_s": cfg.video_timeout_s, "end_tolerance_seconds": cfg.plan.end_tolerance_seconds}
        decode_remote = ray.remote(decode_videos).options(num_cpus=cfg.ray.cpus_per_task, max_retries=2)
        write_remote = ray.remote(write_group).options(num_cpus=cfg.ray.cpus_per_task, max_retries=2)
        decode_refs: dict = {}
        write_refs: dict = {}
        for task, done in pending:
            by_video: dict[str, list] = defaultdict(list)
            for clip in task.clips:
                by_video[clip.video_id].append(clip)
            units = [(vid, str(paths[vid].resolve()), sorted(by_video[vid], key=lambda c: c.clip_index))
                     for vid in task.videos]
            refs = []
            for k in range(0, len(units), cfg.videos_per_decode_task):
                chunk = units[k: k + cfg.videos_per_decode_task]
                ref = decode_remote.remote(chunk, opts, done)
                decode_refs[ref] = sum(len(c) for _v, _p, c in chunk)
                refs.append(ref)
            write_refs[write_remote.remote(task, opts, done, *refs)] = task
        bar = _progress(cfg.progress, sum(decode_refs.values()))
        try:
            waiting = list(decode_refs)
            while waiting:
                ready, waiting = ray.wait(waiting, num_returns=1)
                bar.update(decode_refs[ready[0]])
                decoded_clips += decode_refs[ready[0]]
            bar.close()
            for ref, task in write_refs.items():
                try:
                    for sidecar in ray.get(ref)["written"]:
                        committed[Path(sidecar["shard"]).stem] = sidecar
                except Exception as e:  # noqa: BLE001 - a crashed group is reported, the others go on
                    cause = getattr(e, "cause", None) or e
                    crashed.append((task, f"{type(cause).__name__}: {str(cause).strip().splitlines()[-1]}"))
        finally:
            bar.close()
            if started:
                ray.shutdown()

    # merge the failure records and the manifest (rewritten whole: a rerun never duplicates a line)
    errors = list(plan_errors)
    for task in tasks:
        f = _errors_file(out, phash, task.task_index)
        if f.is_file():
            errors.extend(json.loads(line) for line in f.read_text().splitlines() if line)
    for task, msg in crashed:
        n = Counter(c.video_id for c in task.clips)
        errors.extend(_error(vid, "task", "task_error", f"shard group {task.task_index} crashed: {msg}",
                             clips=n[vid]) for vid in task.videos)
    write_atomic(out / ERRORS, "".join(json.dumps(e, sort_keys=True) + "\n" for e in errors).encode())

    shards = {stem: {"file": committed[stem]["shard"], "samples": committed[stem]["samples"],
                     "bytes": committed[stem]["bytes"], "sha256": committed[stem]["sha256"]}
              for stem in stems if stem in committed}
    by_class = Counter(e["class"] for e in errors)
    manifest = {
        "plan_hash": phash, "name": cfg.name, "videos_listed": n_listed, "videos_planned": len(per_video),
        "clips_planned": total_clips + sum(e.get("clips", 0) for e in plan_errors),
        "samples": sum(s["samples"] for s in shards.values()), "shards_planned": len(stems), "shards": shards,
        "failures_by_class": dict(sorted(by_class.items())),
        "failed_clips": sum(e.get("clips", 1) for e in errors if e["class"] not in ("no_captions", "no_clips",
                                                                                  "duplicate_id")),
        "complete": len(shards) == len(stems) and not crashed,
        "settings": settings, "config": config_to_dict(cfg), "versions": versions, "inputs": inputs,
    }
    write_atomic(out / MANIFEST, json.dumps(manifest, indent=1, sort_keys=True).encode())

    elapsed = time.time() - t_start
    print(f"ptrain shard: done in {elapsed:.1f} s: {len(per_video)} videos, {manifest['samples']} clips in "
          f"{len(shards)}/{len(stems)} shards, {decoded_clips / max(elapsed, 1e-9):.1f} clips/s this run")
    if by_class:
        print("  failures by class: " + ", ".join(f"{k} {v}" for k, v in sorted(by_class.items()))
              + f"  (details: {out / ERRORS})")
    if crashed:
        print(f"  {len(crashed)} shard group(s) crashed; rerun the same command to retry them", file=sys.stderr)
        return 1
    return 0


class _NoBar:
    def update(self, n):
        pass

    def close(self):
        pass


def _progress(enabled: bool, total: int):
    if not enabled:
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=total, unit="clip", desc="shard", smoothing=0.1, dynamic_ncols=True)
