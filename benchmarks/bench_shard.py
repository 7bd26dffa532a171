"""Benchmark (not a test): clips/s of `ptrain shard` vs a CLIP4Clip-style loader that seeks once per frame.

    python benchmarks/bench_shard.py [--videos 6] [--seconds 60] [--fps 30] [--workdir bench_out/shard]

Both sides do the same work on the same videos and clips (planned from the same captions at 1 frame/s, 12 frames
per clip): pick the frames, resize the short side to 224, JPEG-encode them.

- baseline: for every target frame, seek to index ``round(t * avg_fps)`` (to the keyframe before it) and decode
  forward to it — what ``cv2.VideoCapture.set(CAP_PROP_POS_FRAMES, i)`` + ``read()`` does in CLIP4Clip's
  ``RawVideoExtractorCV2``; one video at a time, in one process;
- ours, in-process: ``sharding.decode.extract.extract_clips``: one forward decode per video for all its clips;
- ours, the full job: ``ptrain shard`` with a local Ray of ONE core (start-up, planning, shard writing and
  manifest included), so the per-core comparison with the one-process baseline is fair.

The videos are H.264 (x264, no scene cuts) at two GOP lengths: x264's default keyint 250 (8.3 s at 30 fps, the
long-GOP case typical of downloaded footage) and keyint 30 (1 s, where a 1 fps sampler takes about one frame per
GOP and seeking per frame costs about as much as decoding through). Ratios are what to read; absolute numbers
depend on the machine and on whatever else it runs.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def make_videos(root: Path, n: int, seconds: int, fps: int, keyint: int) -> dict:
    """H.264 videos of a slow, continuous pan over a texture (no scene cuts, so x264 keeps its GOP length)."""
    from sharding.decode.pyav import write_video

    (root / "videos").mkdir(parents=True, exist_ok=True)
    captions = {}
    rng = np.random.default_rng(0)
    frames = seconds * fps
    texture = rng.integers(0, 255, (360 + 64, 480 + frames // 2 + 8, 3), dtype=np.uint8)
    texture = (texture // 64 * 64).astype(np.uint8)  # blocky: realistic JPEG/H.264 sizes, cheap to encode
    for v in range(n):
        vid = f"bench{v:03d}k{keyint}"
        path = root / "videos" / f"{vid}.mp4"
        if not path.exists():
            def pan(v=v):
                for i in range(frames):
                    dy = (v * 7) % 64
                    frame = texture[dy: dy + 360, i // 2: i // 2 + 480].copy()
                    x = int(210 + 200 * np.sin(i / fps))
                    frame[100:160, x: x + 60] = (255, 40, 40)
                    yield None, frame

            write_video(path, pan(), encoder="libx264", rate=fps, width=480, height=360,
                        options={"preset": "veryfast", "crf": "23", "x264-params": f"keyint={keyint}:scenecut=0"})
        starts = [float(t) for t in np.arange(0, seconds - 3, 2.5)]
        captions[vid] = {"start": starts, "end": [t + 3 for t in starts],
                         "text": [f"step {k} put the red thing on the board" for k in range(len(starts))]}
    (root / "caption.json").write_text(json.dumps(captions))
    return captions


def baseline_extract(path: str, clips, frame_size: int, quality: int) -> int:
    """Seek once per frame by frame index, as CLIP4Clip's OpenCV loader does; returns the frames produced."""
    import av  # the competitor's own decoding loop, measured as it is (not ptrain code)

    from sharding.decode.frames import encode_jpeg, output_size

    produced = 0
    with av.open(path) as c:
        stream = c.streams.video[0]
        stream.codec_context.thread_count = 1
        fps = float(stream.average_rate)
        tb = float(stream.time_base)
        ow, oh = output_size(stream.codec_context.width, stream.codec_context.height, frame_size)
        for _start, _end, targets in clips:
            for t in targets:
                index = int(round(t * fps))
                c.seek(int(index / fps / tb), stream=stream, backward=True, any_frame=False)
                for frame in c.decode(stream):
                    if frame.pts is not None and round(frame.pts * tb * fps) >= index:
                        rgb = frame.to_ndarray(width=ow, height=oh, format="rgb24", interpolation="AREA")
                        encode_jpeg(rgb, quality, False, frame_size)
                        produced += 1
                        break
    return produced


def run_case(root: Path, args, keyint: int) -> list:
    from sharding.config import PlanConfig
    from sharding.decode.extract import extract_clips
    from sharding.plan import plan_video
    from sharding.sources.howto100m import load_captions

    t = time.perf_counter()
    make_videos(root, args.videos, args.seconds, args.fps, keyint)
    print(f"keyint {keyint}: videos ready in {time.perf_counter() - t:.1f} s "
          f"({args.videos} x {args.seconds} s, {args.fps} fps, 480x360)")
    plan_cfg = PlanConfig()  # defaults: 1 fps, 12 frames, clips >= 5 s
    captions = load_captions(root / "caption.json")
    plans = {vid: plan_video(vid, segs, plan_cfg) for vid, segs in sorted(captions.items())}
    n_clips = sum(len(p) for p in plans.values())

    # interleave the two methods video by video and keep the best of `repeats` runs of each, so that load from
    # other processes on the machine hits both sides alike
    base_s = ours_s = 0.0
    for vid, clips in plans.items():
        spans = [(c.start, c.end, c.targets) for c in clips]
        path = root / "videos" / f"{vid}.mp4"
        b, o = [], []
        for _ in range(args.repeats):
            t = time.perf_counter()
            baseline_extract(str(path), spans, 224, 90)
            b.append(time.perf_counter() - t)
            t = time.perf_counter()
            extract_clips(path, spans, frame_size=224, threads=1)
            o.append(time.perf_counter() - t)
        base_s += min(b)
        ours_s += min(o)
    rows = [(f"keyint {keyint}: baseline, seek per frame (1 process)", base_s),
            (f"keyint {keyint}: ours, one GOP-aware pass per video (1 process)", ours_s)]

    # the whole job on ONE core (Ray start-up, planning, shard writing and the manifest included), against
    # the one-process baseline above
    out = root / "shards"
    shutil.rmtree(out, ignore_errors=True)
    t = time.perf_counter()
    subprocess.run([sys.executable, "-m", "ptrain", "shard", f"videos={root / 'videos'}",
                    f"captions={root / 'caption.json'}", f"out={out}", "progress=false", "ray.num_cpus=1",
                    "max_samples_per_shard=8", "videos_per_decode_task=1"], check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    rows.append((f"keyint {keyint}: ours, the ptrain shard job on 1 core (incl. Ray start-up)",
                 time.perf_counter() - t))
    return [(name, secs, n_clips, base_s) for name, secs in rows]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--videos", type=int, default=6, help="videos per GOP length (the README table: 6)")
    ap.add_argument("--seconds", type=int, default=60)
    ap.add_argument("--fps", type=int, default=30)
    ap.add_argument("--keyints", default="250,30", help="GOP lengths (frames) to test: x264's default, and 1 s")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--workdir", default="bench_out/shard")
    args = ap.parse_args()
    rows = []
    for keyint in [int(k) for k in args.keyints.split(",")]:
        rows += run_case(Path(args.workdir) / f"keyint{keyint}", args, keyint)
    print(f"\n| {'method':<74} | {'seconds':>8} | {'clips/s':>8} | {'vs baseline':>11} |")
    print(f"|{'-' * 76}|{'-' * 10}|{'-' * 10}|{'-' * 13}|")
    for name, secs, n_clips, base_s in rows:
        print(f"| {name:<74} | {secs:8.2f} | {n_clips / secs:8.2f} | {base_s / secs:10.2f}x |")


if __name__ == "__main__":
    main()
