"""The dry run's estimates: output bytes and core-hours of a stored plan, from a few timed decodes of its videos.

    est = estimate(cfg, stored_plan)   # {"output_bytes", "core_hours", "sample_videos", "sample_clips", "method"}

How: ``dry_run_videos`` videos are picked evenly over the plan's groups (the first video of each picked group),
each decoded in this process exactly as a decode task would (``extract_clips``, same frame size, quality, decoder
and threads), and timed in CPU seconds (``time.process_time``: the decoder's threads included). Each decoded clip
is encoded as its shard sample and sized as a tar member would be (a 512-byte header per member, data padded to
512 bytes). Then, per planned clip:

    output_bytes = sample bytes per clip * planned clips + 1 KiB end-of-archive per shard + the sidecars' bytes
    core_hours   = decode CPU seconds per clip * planned clips / 3600

Clips of timed ASR tile their video, so the cost per clip stands for the cost per second of video. The decode cost
of a video dominates (writing a shard is a copy); videos that fail to decode are counted as failures of the sample,
not in the averages. The estimate is as good as the sample is typical: raise ``dry_run_videos`` for a tighter one.
"""

from __future__ import annotations

import time

from sharding.plan import planned_clip
from sharding.planstore import read_group
from sharding.write import clip_sample

TAR_BLOCK = 512
SIDECAR_BYTES_PER_SAMPLE = 40  # a key and its [offset, length] in the sidecar's JSON


def _tar_bytes(members: dict[str, bytes]) -> int:
    return sum(TAR_BLOCK + -(-len(data) // TAR_BLOCK) * TAR_BLOCK for data in members.values())


def estimate(cfg, stored) -> dict:
    from sharding.decode.extract import extract_clips
    from sharding.decode.video import ExtractError

    groups = stored.groups
    k = min(cfg.dry_run_videos, len(groups))
    if k == 0:
        return {"output_bytes": None, "core_hours": None,
                "why": "nothing to decode" if not groups else "dry_run_videos=0"}
    picks = sorted({round(i * (len(groups) - 1) / max(k - 1, 1)) for i in range(k)})
    cpu = 0.0
    clips_timed = sample_bytes = samples = 0
    failures: list[str] = []
    for g in picks:
        vid, path, rows = read_group(stored.group_file(g))[0]
        clips = [planned_clip(vid, row) for row in rows]
        t0 = time.process_time()
        try:
            info, per_clip = extract_clips(
                path, [(c.start, c.end, c.targets) for c in clips], frame_size=cfg.frame_size,
                center_crop=cfg.center_crop, jpeg_quality=cfg.jpeg_quality, threads=cfg.decoder_threads,
                decoder=cfg.decoder, end_tolerance=cfg.plan.end_tolerance_seconds)
        except ExtractError as e:
            failures.append(f"{vid}: {e.cls}")
            continue
        cpu += time.process_time() - t0
        clips_timed += len(clips)
        for clip, result in zip(clips, per_clip):
            if not isinstance(result, ExtractError):
                sample_bytes += _tar_bytes(clip_sample(clip, info, result)[1])
                samples += 1
    m = stored.manifest
    if not samples:
        return {"output_bytes": None, "core_hours": None, "sample_failures": failures,
                "why": f"none of the {len(picks)} sampled videos decoded ({', '.join(failures)})"}
    per_clip_bytes = sample_bytes / samples + SIDECAR_BYTES_PER_SAMPLE
    return {
        "output_bytes": round(per_clip_bytes * m["clips"] + 2 * TAR_BLOCK * m["shards"]),
        "core_hours": round(cpu / clips_timed * m["clips"] / 3600, 4),
        "bytes_per_clip": round(per_clip_bytes), "cpu_s_per_clip": round(cpu / clips_timed, 5),
        "sample_videos": len(picks) - len(failures), "sample_clips": clips_timed, "sample_failures": failures,
        "method": "per planned clip: sample tar bytes and decode CPU seconds of the decoded videos, times the "
                  "planned clips",
    }
