"""Benchmark (not a test): planning HowTo100M-sized caption files, the planner of BASE against today's, side by side.

    python benchmarks/bench_plan.py [--videos 10000 40000 120000] [--base f2b3d0b] [--old-max 120000]
                                    [--workdir bench_out/plan]

For each N it writes a synthetic ``caption.json`` of N videos in the real format (about 111 overlapping, rolling
ASR segments per video, about 5 KB per video) and a directory of N empty ``<id>.mp4`` files, then plans it with
default settings twice, each in a subprocess of its own (CPU time = user + system of that process, peak RSS = its
``ru_maxrss``):

- old: the planner of commit ``--base``, run from a copy of its ``sharding/`` package made with ``git archive`` into
  a temporary directory: its ``sharding.job._plan``; for f2b3d0b (the default, the code before the streaming
  planner) that loads the whole caption.json, plans every clip in memory, assigns shards and hashes; for a base
  that has the stored plan (``sharding/planstore.py``, e.g. ``--base cd758f5``) it is run as *new* is;
- new: ``sharding.job._plan`` of this tree: stream caption.json, plan video by video, write the per-group plan
  files and the plan manifest into ``OUT/.ptrain_shard/plans/`` (the writing is included in the time).

It prints a table per N (with old / new CPU, the two measured in the same run), the per-video slope of each method (least squares over the N measured) and the linear
extrapolation to the 1.22M videos of HowTo100M. ``--old-max`` skips the old method above that N (it needs about
100 KB of memory per video).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HOWTO100M_VIDEOS = 1_220_000
WORDS = ("so now we are going to take the pan and put some oil in it then add the chopped onions stir them until "
         "golden brown you can see how nice it looks already next comes garlic pepper salt and a little water "
         "cover with the lid let it simmer for ten minutes okay").split()


def _video(rng: random.Random) -> dict:
    """One video's ASR as YouTube rolls it: segments of 2.5-5 s, each starting before the previous one ends, and
    (often) repeating the previous segment's last words."""
    n = rng.randint(100, 122)
    t = rng.uniform(0, 5)
    starts, ends, texts, prev = [], [], [], []
    for _ in range(n):
        dur = rng.uniform(2.5, 5.0)
        fresh = [rng.choice(WORDS) for _ in range(rng.randint(3, 6))]
        words = prev[-2:] + fresh if prev and rng.random() < 0.6 else fresh
        starts.append(round(t, 2))
        ends.append(round(t + dur, 2))
        texts.append(" ".join(words))
        prev = words
        t += dur * rng.uniform(0.5, 0.9)
    return {"start": starts, "end": ends, "text": texts}


def make_corpus(root: Path, n: int) -> Path:
    """``root/caption.json`` of n videos and ``root/videos/<id>.mp4`` (empty files: planning never opens them)."""
    root.mkdir(parents=True, exist_ok=True)
    rng = random.Random(n)
    videos = root / "videos"
    videos.mkdir(exist_ok=True)
    with open(root / "caption.json", "w") as f:
        f.write("{")
        for i in range(n):
            vid = f"v{i:07d}{rng.choice('abcdefgh')}xyz"  # 11 characters, like a YouTube id
            f.write((", " if i else "") + json.dumps(vid) + ": " + json.dumps(_video(rng)))
            (videos / f"{vid}.mp4").touch()
        f.write("}")
    return root


CHILD = r"""
import json, resource, sys, time
from pathlib import Path
from sharding.config import ShardConfig
from sharding.job import _plan
root, out, method = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
cfg = ShardConfig(videos=str(root / "videos"), captions=str(root / "caption.json"), out=str(out), progress=False)
t0 = time.time()
import importlib.util
if method == "old" and importlib.util.find_spec("sharding.planstore") is None:  # a base before the stored plan
    result = _plan(cfg)
    clips, shards = sum(len(t.clips) for t in result[5]), sum(len(t.shards) for t in result[5])
else:
    (out / ".ptrain_shard").mkdir(parents=True, exist_ok=True)
    stored, _reused, _s = _plan(cfg, out / ".ptrain_shard")
    clips, shards = stored.manifest["clips"], stored.manifest["shards"]
ru = resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps({"cpu_s": ru.ru_utime + ru.ru_stime, "wall_s": time.time() - t0, "peak_rss": ru.ru_maxrss * 1024,
                  "clips": clips, "shards": shards}))
"""


def measure(method: str, corpus: Path, out: Path, pythonpath: str) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    env = dict(os.environ, PYTHONPATH=pythonpath)
    res = subprocess.run([sys.executable, "-c", CHILD, str(corpus), str(out), method], capture_output=True,
                         text=True, env=env, cwd=corpus)  # cwd: not the repository (sys.path[0] of -c)
    if res.returncode < 0:  # killed, e.g. by the kernel's OOM killer: say so, go on with the other method
        shutil.rmtree(out, ignore_errors=True)
        why = " (out of memory?)" if res.returncode == -9 else ""
        return {"failed": f"killed by signal {-res.returncode}{why}"}
    if res.returncode != 0:
        raise SystemExit(f"{method} planner failed:\n{res.stderr[-3000:]}")
    shutil.rmtree(out, ignore_errors=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def slope(points: list[tuple[int, float]]) -> tuple[float, float]:
    """Least-squares (intercept, per-video slope)."""
    n = len(points)
    if n == 1:
        return 0.0, points[0][1] / points[0][0]
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    b = sum((x - mx) * (y - my) for x, y in points) / sum((x - mx) ** 2 for x, _ in points)
    return my - b * mx, b


def gib(x: float) -> str:
    return f"{x / 2**30:.2f} GiB" if x >= 2**30 else f"{x / 2**20:.0f} MiB"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--videos", type=int, nargs="+", default=[10_000, 40_000, 120_000])
    ap.add_argument("--base", default="f2b3d0b", help="commit whose planner is 'old'")
    ap.add_argument("--old-max", type=int, default=120_000, help="skip the old planner above this many videos")
    ap.add_argument("--workdir", default=None, help="default: a temporary directory, removed at the end")
    args = ap.parse_args()

    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="bench_plan_"))
    old_tree = work / "old_tree"
    shutil.rmtree(old_tree, ignore_errors=True)
    old_tree.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", args.base, "sharding"], capture_output=True,
                             check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(old_tree)], input=archive, check=True)
    pythonpath = os.environ.get("PYTHONPATH", "")
    new_path = os.pathsep.join(filter(None, [str(ROOT), pythonpath]))
    old_path = os.pathsep.join(filter(None, [str(old_tree), str(ROOT), pythonpath]))  # old sharding, this ptrain

    rows = []
    print(f"| videos | caption.json | clips | old ({args.base}): CPU s / peak RSS | new: CPU s / peak RSS | "
          "old / new CPU |")
    print("|---:|---:|---:|---:|---:|---:|")
    try:
        for n in args.videos:
            corpus = make_corpus(work / f"n{n}", n)
            size = (corpus / "caption.json").stat().st_size
            new = measure("new", corpus, work / "out", new_path)
            old = measure("old", corpus, work / "out", old_path) if n <= args.old_max else None
            rows.append((n, old, new))
            old_txt = ("not run (--old-max)" if old is None else old["failed"] if "failed" in old
                       else f"{old['cpu_s']:.1f} / {gib(old['peak_rss'])}")
            ratio = f"{old['cpu_s'] / new['cpu_s']:.2f}x" if old and "failed" not in old else "-"
            print(f"| {n:,} | {size / 1e6:.0f} MB | {new['clips']:,} | {old_txt} | {new['cpu_s']:.1f} / "
                  f"{gib(new['peak_rss'])} | {ratio} |", flush=True)
            shutil.rmtree(corpus)
        print()
        for name, idx in (("old", 1), ("new", 2)):
            pts = [(row[0], row[idx]) for row in rows if row[idx] and "failed" not in row[idx]]
            if not pts:
                continue
            a_cpu, b_cpu = slope([(n, m["cpu_s"]) for n, m in pts])
            a_rss, b_rss = slope([(n, m["peak_rss"]) for n, m in pts])
            print(f"{name}: {b_cpu * 1e3:.3f} ms CPU ({sum(m['cpu_s'] for _, m in pts) / sum(n for n, _ in pts) * 1e3:.3f} "
                  f"ms mean) and {b_rss / 1024:.1f} KiB peak RSS per video; at "
                  f"{HOWTO100M_VIDEOS / 1e6:.2f}M videos: {(a_cpu + b_cpu * HOWTO100M_VIDEOS) / 60:.1f} min of CPU, "
                  f"{gib(a_rss + b_rss * HOWTO100M_VIDEOS)} peak RSS (linear extrapolation)")
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
