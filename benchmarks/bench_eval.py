"""Evaluation cost: wall time and peak memory of `ptrain eval` on a 1,000 x 1,000 gallery, meanP and tightTransf.

    python benchmarks/bench_eval.py                       # tiny CLIP end to end, 1000 videos x 12 frames
    python benchmarks/bench_eval.py --videos 200 --pairs-clip ViT-B/32

Two measurements, each in its own process (peak RSS from the kernel's accounting of that process):

1. End to end: shards of ``--videos`` synthetic single-caption samples (``--frames`` JPEG frames at the model's frame
   size) are written once; for each head a random-init model of ``--clip`` size is exported and ``ptrain eval`` runs
   on the shards (loading, decoding, embedding every video and caption, the N x N scores, the metrics).
2. The tight head's cross encoder at a real size (``--pairs-clip``, default ViT-B/32: width 512, 4 layers, 12
   frames): (text, video) pairs scored per second in the chunks ``similarity`` uses, so the cost of the 1,000 x 1,000
   = 1M pairs of a real tightTransf eval follows by proportion (every pair is one cross-encoder forward).

Benchmarks are not tests: they print numbers measured in this run; compare runs on the same machine only.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def write_gallery(out: Path, videos: int, frames: int, size: int, per_shard: int = 100) -> None:
    import simplejpeg

    from tests.data_fixtures import make_frame, write_shard

    for s in range(0, videos, per_shard):
        samples = []
        for v in range(s, min(s + per_shard, videos)):
            jpgs = [simplejpeg.encode_jpeg(make_frame(size, size, t, v), quality=90, colorspace="RGB")
                    for t in range(frames)]
            samples.append({"key": f"v{v:05d}_0000", "video_id": f"v{v:05d}", "caption": f"video {v} of the gallery",
                            "frames": jpgs})
        write_shard(out, "gallery", s // per_shard, samples, offsets=True)


def measured(cmd: list[str]) -> tuple[float, float, str]:
    """(wall seconds, peak RSS MiB, stdout) of ``cmd`` run in a fresh process (ru_maxrss of the reaped children)."""
    wrapper = ("import resource, subprocess, sys, time, json\n"
               "t = time.perf_counter()\n"
               "p = subprocess.run(sys.argv[1:], capture_output=True, text=True)\n"
               "dt = time.perf_counter() - t\n"
               "rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024\n"
               "print(json.dumps({'s': dt, 'rss': rss, 'rc': p.returncode, 'out': p.stdout[-3000:], "
               "'err': p.stderr[-3000:]}))\n")
    res = json.loads(subprocess.run([sys.executable, "-c", wrapper, *cmd], capture_output=True, text=True,
                                    check=True).stdout)
    if res["rc"] != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{res['err']}")
    return res["s"], res["rss"], res["out"]


def end_to_end(args, work: Path) -> list[tuple[str, float, float, str]]:
    import torch

    from ptrain.model import ModelConfig, build_model, save_export

    shards = work / "shards"
    t0 = time.perf_counter()
    write_gallery(shards, args.videos, args.frames, args.size)
    print(f"wrote {args.videos} videos x {args.frames} frames at {args.size} px in {time.perf_counter() - t0:.1f} s",
          flush=True)
    rows = []
    for head in ("meanP", "tightTransf"):
        torch.manual_seed(0)
        model = build_model(ModelConfig(clip=args.clip, head=head, num_frames=args.frames, frame_size=args.size,
                                        max_words=16, cross_layers=args.cross_layers))
        save_export(model, work / f"export_{head}")
        out = work / f"results_{head}.json"
        cmd = [sys.executable, "-m", "ptrain", "eval", f"export={work / f'export_{head}'}", f"shards=[{shards}]",
               f"batch_size={args.batch}", f"out={out}"]
        s, rss, _ = measured(cmd)
        m = json.loads(out.read_text())["all"]
        rows.append((head, s, rss, f"{m['n_text']} x {m['n_video']}"))
        print(f"  {head}: {s:.1f} s, peak RSS {rss:.0f} MiB", flush=True)
    return rows


def cross_encoder_rate(args) -> tuple[float, float]:
    """(pairs per second, peak MiB of this process) of the tight head at ``--pairs-clip`` size."""
    import warnings

    import torch

    from ptrain.model import ModelConfig, build_model

    warnings.simplefilter("ignore")
    model = build_model(ModelConfig(clip=args.pairs_clip, head="tightTransf", num_frames=args.frames,
                                    frame_size=224 if args.pairs_clip != "tiny" else args.size)).eval()
    dim = model.clip.config.projection_dim
    text = torch.randn(args.pair_rows, dim)
    video = torch.randn(1000, args.frames, dim)
    with torch.no_grad():
        model.similarity(text[:2], video[:64])  # warm-up
        t0 = time.perf_counter()
        model.similarity(text, video)
        dt = time.perf_counter() - t0
    return args.pair_rows * 1000 / dt, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--videos", type=int, default=1000)
    p.add_argument("--frames", type=int, default=12)
    p.add_argument("--size", type=int, default=32, help="frame size of the --clip model (tiny: 32)")
    p.add_argument("--clip", default="tiny")
    p.add_argument("--cross-layers", type=int, default=2)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--pairs-clip", default="ViT-B/32", help="model size of the cross-encoder rate measurement")
    p.add_argument("--pair-rows", type=int, default=8, help="text rows scored against 1000 videos for the rate")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        rows = end_to_end(args, Path(tmp))
    rate, rss = cross_encoder_rate(args)
    print(f"\n`ptrain eval`, {args.clip} CLIP, {args.frames} frames at {args.size} px, end to end (one process, CPU)\n")
    print("| head | gallery | wall s | peak RSS MiB |\n|---|---|---:|---:|")
    for head, s, mib, gallery in rows:
        print(f"| {head} | {gallery} | {s:.1f} | {mib:.0f} |")
    print(f"\ntightTransf cross encoder at {args.pairs_clip} size ({args.frames} frames): {rate:.0f} pairs/s, peak RSS "
          f"{rss:.0f} MiB -> a 1,000 x 1,000 gallery (1M pairs) takes {1e6 / rate / 60:.1f} min of this CPU")


if __name__ == "__main__":
    main()
