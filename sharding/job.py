"""`ptrain shard`: Ray orchestration of plan -> decode -> shard writing. The only module that imports ray.

    ptrain shard videos=DIR captions=caption.json out=SHARDS [video_list=HowTo100M_v1.csv] [num_frames=12] ...
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- ptrain shard ... ray.address=auto

The driver plans every clip from the captions (pure, fast, no video touched), packs videos into tasks, skips tasks
whose shards are already committed, and runs the rest as Ray tasks with an explicit CPU reservation. A task decodes
each of its videos once (in a killable child process), writes its shards atomically and records every failure.
The driver merges the failures into ``errors.jsonl`` and writes ``manifest.json``; both are rewritten whole on every
run from per-task records, so a rerun never duplicates a line.
"""

from __future__ import annotations

import json
import platform
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

from sharding.config import ShardConfig
from sharding.plan import (
    CaptionError,
    TaskPlan,
    assign_shards,
    find_videos,
    load_captions,
    load_video_list,
    plan_hash,
    plan_video,
)
from sharding.write import ForeignShardsError, scan_output, shard_stem, write_atomic, write_shard

STATE_DIR = ".ptrain_shard"  # per-task error records live here until merged into errors.jsonl


def _versions() -> dict:
    import av
    import numpy
    import simplejpeg

    import ptrain

    return {"ptrain": ptrain.__version__, "av": av.__version__, "simplejpeg": simplejpeg.__version__,
            "numpy": numpy.__version__, "python": platform.python_version()}


def _error(video_id, stage, cls, message, clip_index=None, key=None) -> dict:
    return {"video_id": video_id, "clip_index": clip_index, "key": key, "stage": stage, "class": cls,
            "message": message}


_WORKER = None


def _decode_worker(cls):
    """One decoder child per Ray worker process, reused across tasks (Ray reuses its workers): the child's
    start-up cost is paid once, and a hung child is killed and replaced by DecodeWorker itself."""
    global _WORKER
    if _WORKER is None:
        _WORKER = cls()
    return _WORKER


def process_task(task: TaskPlan, paths: dict[str, str], opts: dict, skip_shards: list[int]) -> dict:
    """Decode the task's videos once each and write its shards that are not committed yet. Runs in a Ray worker."""
    from sharding.decode import DecodeWorker, ExtractError

    out = Path(opts["out"])
    skip = set(skip_shards)
    by_video: dict[str, list] = defaultdict(list)
    for clip in task.clips:
        by_video[clip.video_id].append(clip)
    samples: dict[int, list] = defaultdict(list)
    errors: list[dict] = []
    worker = _decode_worker(DecodeWorker)
    t0 = time.monotonic()
    for vid in task.videos:
        clips = sorted(by_video[vid], key=lambda c: c.clip_index)
        try:
            info, per_clip = worker.run(
                paths[vid], [(c.start, c.end, c.targets) for c in clips], timeout=opts["video_timeout_s"],
                frame_size=opts["frame_size"], center_crop=opts["center_crop"],
                jpeg_quality=opts["jpeg_quality"], threads=opts["decoder_threads"], decoder=opts["decoder"],
                end_tolerance=opts["end_tolerance_seconds"],
            )
        except ExtractError as e:
            errors.append(_error(vid, "decode", e.cls, e.message) | {"clips": len(clips)})
            continue
        for clip, result in zip(clips, per_clip):
            if isinstance(result, ExtractError):
                errors.append(_error(vid, "clip", result.cls, result.message, clip.clip_index, clip.key))
                continue
            if clip.shard in skip:
                continue
            meta = {
                "key": clip.key, "video_id": vid, "clip_index": clip.clip_index, "start": clip.start,
                "end": clip.end, "text": clip.text, "captions": clip.segments,
                "frame_times": [pts for pts, _ in result], "target_times": clip.targets,
                "fps": round(info.fps, 6), "width": info.width, "height": info.height,
                "duration": round(info.duration, 6),
            }
            members = {"txt": clip.text.encode("utf-8"),
                       "json": json.dumps(meta, sort_keys=True, ensure_ascii=False).encode("utf-8")}
            for j, (_pts, jpg) in enumerate(result):
                members[f"{j:03d}.jpg"] = jpg
            samples[clip.shard].append((clip.key, members))
    written = []
    for shard in task.shards:
        if shard in skip:
            continue
        stem = shard_stem(opts["name"], shard)
        written.append(write_shard(out, stem, samples[shard], {"plan_hash": opts["plan_hash"],
                                                               "versions": opts["versions"]}))
    state = out / STATE_DIR
    state.mkdir(exist_ok=True)
    write_atomic(state / f"errors-task-{task.task_index:06d}.jsonl",
                 "".join(json.dumps(e, sort_keys=True) + "\n" for e in errors).encode())
    return {"task": task.task_index, "written": written, "errors": errors, "seconds": time.monotonic() - t0,
            "clips": len(task.clips)}


def _start_ray(cfg):
    import ray

    started = False
    if not ray.is_initialized():
        kwargs = {"include_dashboard": False, "logging_level": "WARNING", "log_to_driver": True}
        if cfg.ray.address:
            ray.init(address=cfg.ray.address, **kwargs)
        else:
            ray.init(num_cpus=cfg.ray.num_cpus, **kwargs)
            started = True
    return ray, started


def run(cfg: ShardConfig) -> int:
    t_start = time.time()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    plan_cfg = cfg.plan_config()
    try:
        captions = load_captions(cfg.captions)
        ids = load_video_list(cfg.video_list) if cfg.video_list else sorted(captions)
        files = find_videos(cfg.videos)
    except (CaptionError, FileNotFoundError) as e:
        print(f"ptrain shard: {e}", file=sys.stderr)
        return 2

    # 1. plan (pure): clips, frame targets, shard of every clip
    plan_errors: list[dict] = []
    per_video = {}
    seen_keys: dict[str, str] = {}
    for vid in ids:
        if vid not in captions:
            plan_errors.append(_error(vid, "plan", "no_captions", f"{vid}: listed in {cfg.video_list} but absent "
                                                                   f"from {cfg.captions}"))
            continue
        clips = plan_video(vid, captions[vid], plan_cfg)
        if not clips:
            plan_errors.append(_error(vid, "plan", "no_clips", f"{vid}: no caption segment with text"))
            continue
        if vid not in files:
            plan_errors.append(_error(vid, "plan", "missing", f"{vid}: no {vid}.<mp4|webm|mkv|avi> under {cfg.videos}")
                               | {"clips": len(clips)})
            continue
        other = seen_keys.setdefault(clips[0].key.rsplit("_", 1)[0], vid)
        if other != vid:
            raise ValueError(f"video ids {other!r} and {vid!r} sanitise to the same key; rename one of them")
        per_video[vid] = clips
    tasks = assign_shards(per_video, cfg.max_samples_per_shard, cfg.shards_per_task)
    settings = {k: v for k, v in vars(plan_cfg).items()} | {
        "frame_size": cfg.frame_size, "center_crop": cfg.center_crop, "jpeg_quality": cfg.jpeg_quality,
        "max_samples_per_shard": cfg.max_samples_per_shard, "shards_per_task": cfg.shards_per_task, "name": cfg.name,
    }
    phash = plan_hash(tasks, settings)
    total_clips = sum(len(t.clips) for t in tasks)
    num_shards = sum(len(t.shards) for t in tasks)

    # 2. resume: keep verified shards of this plan, remove partial ones, never touch another plan's shards
    try:
        committed, removed = scan_output(out, cfg.name, phash)
    except ForeignShardsError as e:
        print(f"ptrain shard: {e}", file=sys.stderr)
        return 2
    state = out / STATE_DIR
    pending = []
    for task in tasks:
        done = [s for s in task.shards if shard_stem(cfg.name, s) in committed]
        if len(done) < len(task.shards) or not (state / f"errors-task-{task.task_index:06d}.jsonl").is_file():
            pending.append((task, done))
    print(f"ptrain shard: {len(ids)} videos listed, {len(per_video)} to decode, {total_clips} clips planned "
          f"-> {num_shards} shards (plan {phash[:12]}); {len(committed)} shards already committed, "
          f"{len(pending)}/{len(tasks)} tasks to run" + (f"; removed partial {removed}" if removed else ""))

    # 3. run the pending tasks on Ray
    results = []
    task_failures = []
    if pending:
        ray, started = _start_ray(cfg)
        versions = _versions()
        opts = {"out": str(out.resolve()), "name": cfg.name, "plan_hash": phash, "versions": versions,
                "frame_size": cfg.frame_size, "center_crop": cfg.center_crop, "jpeg_quality": cfg.jpeg_quality,
                "decoder_threads": cfg.decoder_threads, "decoder": cfg.decoder,
                "video_timeout_s": cfg.video_timeout_s, "end_tolerance_seconds": cfg.end_tolerance_seconds}
        remote = ray.remote(process_task).options(num_cpus=cfg.ray.cpus_per_task, max_retries=2)
        refs = {}
        for task, done in pending:
            paths = {vid: str(files[vid].resolve()) for vid in task.videos}
            refs[remote.remote(task, paths, opts, done)] = task
        bar = _progress(cfg.progress, sum(len(t.clips) for t, _ in pending))
        try:
            waiting = list(refs)
            while waiting:
                ready, waiting = ray.wait(waiting, num_returns=1)
                task = refs[ready[0]]
                try:
                    results.append(ray.get(ready[0]))
                except Exception as e:  # noqa: BLE001 - a task that crashed is reported, the others go on
                    task_failures.append((task, e))
                bar.update(len(task.clips))
        finally:
            bar.close()
            if started:
                ray.shutdown()

    # 4. merge the failure records and the manifest (rewritten whole: a rerun never duplicates a line)
    errors = list(plan_errors)
    for task in tasks:
        f = state / f"errors-task-{task.task_index:06d}.jsonl"
        if f.is_file():
            errors.extend(json.loads(line) for line in f.read_text().splitlines() if line)
    for task, exc in task_failures:
        cause = getattr(exc, "cause", None) or exc
        msg = f"task {task.task_index} crashed: {type(cause).__name__}: {str(cause).strip().splitlines()[-1:]}"
        errors.extend(_error(vid, "task", "task_error", msg) for vid in task.videos)
    write_atomic(out / "errors.jsonl", "".join(json.dumps(e, sort_keys=True) + "\n" for e in errors).encode())

    shards = {}
    committed_now, _ = scan_output(out, cfg.name, phash)
    for stem in sorted(committed_now):
        sc = committed_now[stem]
        shards[stem] = {"file": sc["shard"], "samples": sc["samples"], "bytes": sc["bytes"], "sha256": sc["sha256"]}
    failed_clips = sum(e.get("clips", 1) for e in errors if e["stage"] in ("decode", "plan", "task", "clip")
                       and e["class"] not in ("no_captions", "no_clips"))
    by_class = Counter(e["class"] for e in errors)
    manifest = {
        "plan_hash": phash, "name": cfg.name, "videos_listed": len(ids), "videos_planned": len(per_video),
        "clips_planned": total_clips + sum(e.get("clips", 0) for e in plan_errors),
        "samples": sum(s["samples"] for s in shards.values()), "shards_planned": num_shards,
        "shards": shards, "failures_by_class": dict(sorted(by_class.items())), "failed_clips": failed_clips,
        "complete": len(shards) == num_shards and not task_failures,
        "settings": settings, "config": _config_dict(cfg), "versions": _versions(),
    }
    write_atomic(out / "manifest.json", json.dumps(manifest, indent=1, sort_keys=True).encode())
    from ptrain.config import dump_config

    dump_config(cfg, out / "config.yaml")

    elapsed = time.time() - t_start
    decoded = sum(r["clips"] for r in results)
    print(f"ptrain shard: done in {elapsed:.1f} s: {len(per_video)} videos, {manifest['samples']} clips in "
          f"{len(shards)}/{num_shards} shards, {decoded / max(elapsed, 1e-9):.1f} clips/s this run")
    if by_class:
        print("  failures by class: " + ", ".join(f"{k} {v}" for k, v in sorted(by_class.items()))
              + f"  (details: {out / 'errors.jsonl'})")
    if task_failures:
        print(f"  {len(task_failures)} task(s) crashed; rerun the same command to retry them", file=sys.stderr)
        return 1
    return 0


def _config_dict(cfg) -> dict:
    from ptrain.config import config_to_dict

    return config_to_dict(cfg)


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
