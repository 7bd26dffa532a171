"""Check (not a test): this tree's planner plans exactly what the planner of BASE planned, row for row, bit for bit.

    python benchmarks/check_plan.py [--base 17f6e22] [--videos 2000] [--cases 20000]

Each planner runs in a subprocess of its own (BASE from a ``git archive`` copy of its ``sharding/``, as
``bench_plan.py`` does) and prints what it planned as canonical JSON (``json.dumps`` of the decoded values: floats by
``repr``, so equal text means equal bits); the parent compares the two line by line:

- ``clip_rows`` (and ``clean_segments``, ``split_long_segments``, ``plan_clips``, ``clip_frame_times``) on
  ``--cases`` generated segment lists under generated settings: unsorted and tied start times, zero-length and
  over-long segments, exact and rolling repeats, empty and oddly spaced texts, gaps, times close to a rounding tie
  of the 6-decimal frame times, fps and uniform sampling, head / tail / uniform slicing, one frame;
- the segment lists of ``tests/test_plan.py`` (copied here: the test module needs pytest);
- a whole stored plan (``sharding.job._plan``) of a ``bench_plan.py`` corpus of ``--videos`` videos: the manifest's
  counts and groups, every group file's lines decoded, and the plan hash.

It exits 1 on the first difference, naming the case.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import hashlib, json, math, random, sys
from pathlib import Path
from sharding.config import PlanConfig, ShardConfig
from sharding.job import _plan
from sharding.plan import clean_segments, clip_frame_times, clip_rows, plan_clips, split_long_segments
from sharding.sources import Segment

mode, arg = sys.argv[1], sys.argv[2]
out = sys.stdout
WORDS = "a b c d e so now we take the pan oil it".split()


def canon(x):
    return json.dumps(x, ensure_ascii=False)


def words(rng):
    return [rng.choice(WORDS) for _ in range(rng.choice((0, 1, 1, 2, 3, 4, 5, 6, 9)))]


def time(rng, t):
    r = rng.random()
    if r < 0.15:  # near a tie of the 6th decimal (0.0000005 apart), where rounding is decided by the last bits
        return round(t, 6) + rng.choice((0.0000005, -0.0000005, 0.00000049999999, 0.0000005000001))
    if r < 0.3:
        return float(round(t))
    return round(t, rng.choice((1, 2, 3, 7, 12)))


def case(rng):
    n = rng.choice((0, 1, 2, 3, 5, 8, 20, 60, 120))
    t, prev, segs = rng.uniform(0, 50), [], []
    for _ in range(n):
        r = rng.random()
        dur = 0.0 if r < 0.1 else rng.uniform(20, 90) if r < 0.15 else rng.uniform(0.05, 6)
        w = words(rng)
        if prev and rng.random() < 0.5:  # a rolling repeat: the previous tail, whole or in part, then new words
            w = prev[-rng.randint(1, len(prev)):] + w
        if prev and rng.random() < 0.08:
            w = list(prev)  # an exact repeat
        text = rng.choice((" ", " ", "  ", "\t", " \n ")).join(w) if w else rng.choice(("", " "))
        start = time(rng, t)
        end = start + dur if rng.random() < 0.9 else start  # zero-length, or the widened rule
        segs.append((max(start, 0.0), max(end, start, 0.0), text))
        prev = w
        t += rng.choice((dur * rng.uniform(0.3, 1.2), 0.0, rng.uniform(3, 12), 0.05))
    if rng.random() < 0.3:
        rng.shuffle(segs)
    if rng.random() < 0.2 and segs:  # ties: the same start (and end) with other texts
        segs += [(s, e, " ".join(words(rng))) for s, e, _ in rng.sample(segs, min(len(segs), 4))]
    max_seconds = rng.choice((5.0, 7.5, 20.0, 31.0))
    cfg = PlanConfig(min_seconds=min(rng.choice((0.0, 2.0, 5.0, 7.5)), max_seconds), min_words=rng.choice((0, 1, 4, 9)),
                     max_seconds=max_seconds, max_gap_seconds=rng.choice((0.0, 1.0, 4.0, 1e9)),
                     num_frames=rng.choice((1, 2, 5, 12, 16)), sampling=rng.choice(("fps", "fps", "uniform")),
                     fps=rng.choice((1.0, 1.0, 0.5, 2.0, 2.5, 3.3, 0.7)), slice=rng.choice(("head", "tail", "uniform")))
    return [Segment(*s) for s in segs], cfg


def planned(segs, cfg):
    clean = [list(s) for s in clean_segments(segs)]
    split = [list(s) for s in split_long_segments(segs, cfg.max_seconds)]
    clips = [[c.start, c.end, c.text, [list(s) for s in c.segments]]
             for c in plan_clips(segs, min_seconds=cfg.min_seconds, min_words=cfg.min_words,
                                 max_seconds=cfg.max_seconds, max_gap_seconds=cfg.max_gap_seconds)]
    rows = clip_rows(segs, cfg)
    return [clean, split, clips, json.loads(json.dumps(rows))]


TEST_PLAN_CASES = [  # the segment lists of tests/test_plan.py, with the settings they are planned under
    ([(0.0, 2.5, "so today we are"), (2.0, 4.5, "we are going to make"), (2.0, 4.5, "we are going to make"),
      (4.0, 6.0, "going to make"), (6.5, 8.0, "a   cake\n")], {}),
    ([(5, 6, "b c"), (0, 1, "  "), (1, 2, "a")], {}),
    ([(3, 3, "a b c d e"), (20, 20, "x y z w")], dict(min_seconds=2, min_words=3, max_seconds=20, max_gap_seconds=4)),
    ([(0, 4, "one two"), (2, 2, "three")], {}),
    ([(0, 4, "one two"), (3, 6, "three four")], {}),
    ([(0, 2, "we are going"), (5, 7, "going to")], {}),
    ([(0, 2, "we are going"), (2.05, 4, "going to")], {}),
    ([(0, 1, "one two"), (1, 2, "three"), (2, 3.5, "four five six")], dict(min_seconds=3.0, min_words=4,
                                                                            max_seconds=10.0)),
    ([(0, 50, "a very long monologue here")], dict(min_seconds=5, min_words=1, max_seconds=20)),
    ([(10, 70, "only two")], dict(min_seconds=5, min_words=1, max_seconds=20)),
    ([(0, 1, "a b"), (30, 31, "c d")], dict(min_seconds=5, min_words=1, max_seconds=60, max_gap_seconds=4)),
    ([(0, 5, "one two three"), (5, 6, "four")], dict(min_seconds=5, min_words=2, max_seconds=20)),
    ([(i * 3.0, i * 3.0 + 3, f"w{i} x y") for i in range(10)], dict(min_seconds=8, min_words=3, max_seconds=10)),
    ([(0.0, 1.7e9, "a b c")], dict(max_seconds=20.0)),
    ([(j * 2, j * 2 + 2, f"a b c{j}") for j in range(6)], dict(min_seconds=2, min_words=1, max_seconds=10,
                                                                num_frames=4, sampling="uniform")),
    ([(0, 6, "one two three four")], {}),
]

if mode == "cases":
    rng = random.Random(int(arg.split(":")[1]))
    for segs, kw in TEST_PLAN_CASES:
        for extra in ({}, dict(sampling="uniform", num_frames=5), dict(fps=2.0, slice="tail", num_frames=3)):
            cfg = PlanConfig(**(kw | extra))
            print(canon(planned([Segment(float(a), float(b), t) for a, b, t in segs], cfg)), file=out)
    for _ in range(int(arg.split(":")[0])):
        segs, cfg = case(rng)
        print(canon(planned(segs, cfg)), file=out)
    for start, end in ((0.0, 0.0), (3.0, 3.0), (1.25, 1.75), (0.1, 30.123456789), (17.0000005, 29.0000015)):
        for kw in (dict(sampling="uniform"), dict(sampling="fps", fps=1.0), dict(sampling="fps", fps=3.0, slice="tail"),
                   dict(sampling="fps", fps=2.0, slice="head"), dict(sampling="fps", fps=2.0, num_frames=1)):
            print(canon(clip_frame_times(start, end, num_frames=kw.pop("num_frames", 12), **kw)), file=out)
else:
    root, outdir = Path(arg), Path(sys.argv[3])
    (outdir / ".ptrain_shard").mkdir(parents=True, exist_ok=True)
    cfg = ShardConfig(videos=str(root / "videos"), captions=str(root / "caption.json"), out=str(outdir), progress=False)
    stored, _reused, _s = _plan(cfg, outdir / ".ptrain_shard")
    m = stored.manifest
    print(canon({k: m[k] for k in ("clips", "frames", "shards", "groups", "videos_planned", "unplanned_clips")}))
    print(canon({"plan_hash": stored.plan_hash}))
    for g in range(len(stored.groups)):
        with stored.group_file(g).open(encoding="utf-8") as f:
            for line in f:
                print(canon(json.loads(line)), file=out)
"""


def run(pythonpath: str, *args: str, cwd: Path) -> list[str]:
    env = dict(os.environ, PYTHONPATH=pythonpath)
    res = subprocess.run([sys.executable, "-c", CHILD, *args], capture_output=True, text=True, env=env, cwd=cwd)
    if res.returncode != 0:
        raise SystemExit(f"planner ({pythonpath.split(os.pathsep)[0]}) failed:\n{res.stderr[-3000:]}")
    return res.stdout.splitlines()


def compare(what: str, old: list[str], new: list[str]) -> bool:
    if len(old) != len(new):
        print(f"{what}: {len(old)} lines from BASE, {len(new)} from this tree")
        return False
    for i, (a, b) in enumerate(zip(old, new)):
        if a != b:
            print(f"{what}: line {i} differs\n  BASE: {a[:2000]}\n  this: {b[:2000]}")
            return False
    print(f"{what}: {len(new)} lines, equal")
    return True


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--base", default="17f6e22", help="commit whose planner is the reference")
    ap.add_argument("--videos", type=int, default=2000, help="videos of the generated corpus")
    ap.add_argument("--cases", type=int, default=20000, help="generated segment lists")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from bench_plan import make_corpus

    with tempfile.TemporaryDirectory(prefix="check_plan_") as tmp:
        work = Path(tmp)
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", args.base, "sharding"], capture_output=True,
                                 check=True).stdout
        (work / "base").mkdir()
        subprocess.run(["tar", "-x", "-C", str(work / "base")], input=archive, check=True)
        extra = os.environ.get("PYTHONPATH", "")
        new_path = os.pathsep.join(filter(None, [str(ROOT), extra]))
        old_path = os.pathsep.join(filter(None, [str(work / "base"), str(ROOT), extra]))
        ok = True
        spec = f"{args.cases}:{args.seed}"
        ok &= compare("segment lists", run(old_path, "cases", spec, cwd=work), run(new_path, "cases", spec, cwd=work))
        corpus = make_corpus(work / "corpus", args.videos)
        ok &= compare(f"stored plan of {args.videos} videos",
                      run(old_path, "corpus", str(corpus), str(work / "out_old"), cwd=work),
                      run(new_path, "corpus", str(corpus), str(work / "out_new"), cwd=work))
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
