"""The dry run's estimates: output bytes and core-hours of a stored plan, from a few timed decodes of its videos.

    est = estimate(cfg, stored_plan)   # {"output_bytes", "core_hours", "sample_videos", "sample_clips", "method"}

How: ``dry_run_videos`` videos are picked evenly over the plan's groups (the first video of each picked group),
each decoded exactly as a decode task would (``DecodeWorker``: a child process with the ``video_timeout_s``
budget, same frame size, quality, decoder and threads), and timed in CPU seconds of that child (user + system,
its decoder threads included, read from ``/proc``). Each decoded clip
is encoded as its shard sample and sized as a tar member would be (a 512-byte header per member, data padded to
512 bytes). Then, per planned clip:

    output_bytes = sample bytes per written clip * planned clips * share of the sample's clips written
                   + per shard: the end-of-archive blocks, half a tar record of padding, its sidecar
    core_hours   = decode CPU seconds per clip * planned clips / 3600

Clips of timed ASR tile their video, so the cost per clip stands for the cost per second of video (a benchmark
sample is a whole video or its span: the cost per sample is the cost per video). The decode cost
of a video dominates (writing a shard is a copy); videos that fail to decode are counted as failures of the sample,
not in the averages. The estimate is as good as the sample is typical: raise ``dry_run_videos`` for a tighter one.
"""

from __future__ import annotations

import os

from sharding.plan import planned_clip
from sharding.planstore import read_group
from sharding.write import clip_sample

TAR_BLOCK = 512
TAR_RECORD = 10240  # tarfile pads an archive to whole records: half a record per shard on average
SIDECAR_BYTES = 450  # a sidecar's fixed fields (hash, versions, ...)
SIDECAR_BYTES_PER_SAMPLE = 50  # a key and its [offset, length] in the sidecar's JSON


def _tar_bytes(members: dict[str, bytes]) -> int:
    return sum(TAR_BLOCK + -(-len(data) // TAR_BLOCK) * TAR_BLOCK for data in members.values())


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a live process (all its threads)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def estimate(cfg, stored) -> dict:
    from sharding.decode.video import ExtractError
    from sharding.decode.worker import DecodeWorker, decode_planned

    groups = stored.groups
    k = min(cfg.dry_run_videos, len(groups))
    if k == 0:
        return {"output_bytes": None, "core_hours": None,
                "why": "nothing to decode" if not groups else "dry_run_videos=0"}
    picks = sorted({round(i * (len(groups) - 1) / max(k - 1, 1)) for i in range(k)})
    cpu = 0.0
    clips_timed = sample_bytes = samples = 0
    failures: list[str] = []
    worker = DecodeWorker()
    try:
        for g in picks:
            vid, path, rows = read_group(stored.group_file(g))[0]
            clips = [planned_clip(vid, row) for row in rows]
            try:
                worker.ensure_started(path)
                t0 = _cpu_seconds(worker.pid)
                info, clips, per_clip = decode_planned(
                    worker, path, clips, timeout=cfg.video_timeout_s, frame_size=cfg.frame_size,
                    center_crop=cfg.center_crop, jpeg_quality=cfg.jpeg_quality, threads=cfg.decoder_threads,
                    decoder=cfg.decoder, end_tolerance=cfg.plan.end_tolerance_seconds)
                cpu += _cpu_seconds(worker.pid) - t0
            except ExtractError as e:
                failures.append(f"{vid}: {e.cls}")
                continue
            clips_timed += len(clips)
            for clip, result in zip(clips, per_clip):
                if not isinstance(result, ExtractError):
                    sample_bytes += _tar_bytes(clip_sample(clip, info, result)[1])
                    samples += 1
    finally:
        worker.close()
    m = stored.manifest
    if not samples:
        return {"output_bytes": None, "core_hours": None, "sample_failures": failures,
                "why": f"none of the {len(picks)} sampled videos decoded ({', '.join(failures)})"}
    per_clip_bytes = sample_bytes / samples + SIDECAR_BYTES_PER_SAMPLE
    per_shard = 2 * TAR_BLOCK + TAR_RECORD / 2 + SIDECAR_BYTES
    return {
        "output_bytes": round(per_clip_bytes * m["clips"] * samples / clips_timed + per_shard * m["shards"]),
        "core_hours": round(cpu / clips_timed * m["clips"] / 3600, 4),
        "bytes_per_clip": round(per_clip_bytes), "cpu_s_per_clip": round(cpu / clips_timed, 5),
        "sample_videos": len(picks) - len(failures), "sample_clips": clips_timed, "sample_failures": failures,
        "method": "per planned clip: sample tar bytes and decode CPU seconds of the decoded videos, times the "
                  "planned clips",
    }
