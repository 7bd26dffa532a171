"""Token masking on the demo corpus: held-out retrieval at equal steps (against the unmasked run-to-run interval)
and at equal wall time.

    python benchmarks/bench_masking_demo.py                                  # 200 videos, 400 steps, seeds 0 1 2
    python benchmarks/bench_masking_demo.py --modes frame --seeds 0 1 2 3 --steps 800 --videos 360
    python benchmarks/bench_masking_demo.py --vision 128,4,8 --modes frame --equal-time   # a vision tower that dominates

The pipeline is launch/demo.sh's, scaled down and driven through the CLIs (subprocesses, no training code here):

1. ``ptrain sample-data`` (``--videos``, seed 0), every 4th video held out (demo.sh's split; no fine-tune split), and
   ``ptrain shard`` of both lists with demo.sh's arguments (8 uniform frames at 64 px, clips of 2-5 s).
2. For each seed, ``launch/pretrain.sh configs/demo/pretrain_tiny.yaml`` (2 CPU ranks, tiny CLIP, TDB head) with
   ``seed=S max_steps=--steps``: unmasked, then ``model.mask_ratio=--ratio`` with each ``--modes`` mask mode. Every run
   logs and checkpoints every ``--every`` steps (the same schedule for all, so checkpoint cost is equal).
3. ``ptrain eval`` of each run's final checkpoint on the held-out shards (t2v R@1/R@5).
4. Run-to-run interval: the unmasked runs differ only in ``seed`` (model init, data order, masks); their held-out
   t2v R@1 over the seeds gives mean, min-max and the t-based 95% interval of the mean.
5. Equal wall time: a run's training wall time is the ``time`` of its last step minus that of step 1 in
   ``RUN/metrics.jsonl`` (launch and start-up, the same for every run, excluded). For each seed and mask mode the
   unmasked run's checkpoint whose training time is nearest the masked run's total is evaluated and set against
   the finished masked run. (That checkpoint is mid-schedule: its learning rate has not decayed to zero.)
6. ``--equal-time``: the fair budget comparison (FLIP's): per seed and mask mode one more masked run with its own
   full schedule of ``steps x (unmasked s/step) / (masked s/step)`` steps (rounded to ``--every``), the per-step
   times measured in this seed's two equal-step runs, so that it trains as long as the unmasked run. Its held-out
   R@1 is set against the finished unmasked run's, and both training times are reported.

``--vision W,L,P`` replaces the tiny CLIP's vision tower (width 32, 2 layers, 16 px patches: 16 tokens per frame, a
small part of a step) by a random-init one of width W, L layers and P-pixel patches (the text tower stays tiny),
written once under WORK as a Hugging Face directory and given to every run as ``model.clip``. A real ViT-B/32 at 12
frames spends most of a step in its vision tower; this is how the demo gets there on a CPU.

Prints a markdown table and writes ``--out`` (JSON, rewritten after every run so a partial result survives).
Re-running reuses the corpus, shards, finished runs and evaluations under ``--work``.

Benchmarks are not tests: they print numbers measured in this run; on a shared machine wall times move with the
load of other jobs (the load average is recorded before and after each run).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "configs" / "demo" / "pretrain_tiny.yaml"
# two-sided 95% Student t quantiles by degrees of freedom (n - 1); beyond the table the normal 1.96
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}
SHARD_ARGS = ["plan.num_frames=8", "plan.sampling=uniform", "frame_size=64", "plan.min_seconds=2",
              "plan.min_words=4", "plan.max_seconds=5", "max_samples_per_shard=64", "progress=false"]


def sh(cmd: list[str], log: Path | None = None, env: dict[str, str] | None = None) -> float:
    """Run ``cmd`` (output to ``log`` if given), raise on failure with the log's tail; return its wall seconds."""
    t0 = time.time()
    with open(log, "w") if log else open(os.devnull, "w") as f:
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env).returncode
    if rc != 0:
        tail = log.read_text()[-3000:] if log else ""
        raise SystemExit(f"bench_masking_demo: {' '.join(cmd[:3])} ... failed (exit {rc}); log {log}:\n{tail}")
    return time.time() - t0


def load1() -> float:
    return os.getloadavg()[0]


def corpus(work: Path, videos: int) -> None:
    """Sample data and held-out / train shards as launch/demo.sh makes them (skipped when already there)."""
    raw = work / "raw"
    if not (raw / "sample_meta.json").is_file():
        print(f"== sample-data: {videos} videos", flush=True)
        sh(["ptrain", "sample-data", f"out={raw}", f"num_videos={videos}", "seed=0", "overwrite=true"],
           work / "sample-data.log")
    rows = list(csv.DictReader(open(raw / "HowTo100M_v1.csv")))
    for split, keep in (("train", lambda i: i % 4 != 3), ("heldout", lambda i: i % 4 == 3)):
        if (work / f"shards_{split}" / "manifest.json").is_file():
            continue
        with open(work / f"{split}.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(r for i, r in enumerate(rows) if keep(i))
        print(f"== shard {split}", flush=True)
        sh(["ptrain", "shard", f"captions={raw / 'caption.json'}", f"videos={raw / 'videos'}", *SHARD_ARGS,
            f"video_list={work / f'{split}.csv'}", f"out={work / f'shards_{split}'}"], work / f"shard_{split}.log")


def train_times(run: Path) -> dict[int, float]:
    """Step -> seconds since step 1, from the run's metrics.jsonl (train records only)."""
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    recs = [r for r in recs if r.get("kind") == "train"]
    t1 = next(r["time"] for r in recs if r["step"] == 1)
    return {r["step"]: r["time"] - t1 for r in recs}


def vision_clip(work: Path, spec: str, frame_size: int = 64) -> Path:
    """A random-init CLIP with the tiny text tower and a vision tower ``W,L,P`` (width, layers, patch), saved once."""
    width, layers, patch = (int(x) for x in spec.split(","))
    out = work / f"clip_vision_{width}_{layers}_{patch}"
    if (out / "config.json").is_file():
        return out
    if frame_size % patch or width % 32:
        raise SystemExit(f"--vision {spec}: the patch must divide {frame_size} and the width be a multiple of 32")
    code = (
        "import math, sys, torch\n"
        "from transformers import CLIPConfig, CLIPModel\n"
        "w, l, p, size, out = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]\n"
        "torch.manual_seed(0)\n"
        "v = dict(hidden_size=w, intermediate_size=4 * w, num_hidden_layers=l, num_attention_heads=w // 32,\n"
        "         patch_size=p, image_size=size, hidden_act='quick_gelu')\n"
        "t = dict(hidden_size=32, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=49408,\n"
        "         max_position_embeddings=77, hidden_act='quick_gelu', eos_token_id=49407, bos_token_id=49406,\n"
        "         pad_token_id=0)\n"
        "cfg = CLIPConfig(text_config=t, vision_config=v, projection_dim=32, logit_scale_init_value=math.log(1 / 0.07))\n"
        "CLIPModel(cfg).save_pretrained(out)\n")
    sh([sys.executable, "-c", code, str(width), str(layers), str(patch), str(frame_size), str(out)],
       work / "clip_vision.log")
    return out


def pretrain(work: Path, name: str, seed: int, extra: list[str], args, steps: int | None = None) -> dict:
    """One pretraining run (reused when its final checkpoint exists): its wall times and load averages."""
    steps = steps or args.steps
    run = work / "runs" / name
    final = run / "checkpoints" / f"step_{steps:08d}"
    info_f = run / "bench_run.json"
    if (final / "export" / "config.json").is_file() and info_f.is_file():
        return json.loads(info_f.read_text())
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "MASTER_PORT": str(args.master_port)}
    before = load1()
    print(f"== pretrain {name} (load {before:.1f})", flush=True)
    wall = sh([str(ROOT / "launch" / "pretrain.sh"), str(CONFIG), f"model.head={args.head}", f"seed={seed}",
               f"max_steps={steps}", f"data.sources=[{work / 'shards_train'}]", f"run_dir={run}",
               f"log.every_steps={args.every}", f"checkpoint.every_steps={args.every}", "checkpoint.keep_last=100000",
               "log.tensorboard=false", *extra], work / f"{name}.log", env)
    times = train_times(run)
    info = {"name": name, "seed": seed, "steps": steps, "overrides": extra, "process_wall_s": round(wall, 1),
            "train_wall_s": round(times[steps], 1),
            "step_times_s": {str(k): round(v, 2) for k, v in times.items()},
            "load_before": round(before, 2), "load_after": round(load1(), 2)}
    info_f.write_text(json.dumps(info, indent=1))
    print(f"   {name}: {info['train_wall_s']} s training ({wall:.0f} s process)", flush=True)
    return info


def evaluate(work: Path, name: str, step: int) -> dict:
    """Held-out t2v R@1/R@5 of run ``name`` at ``step`` (``ptrain eval`` on that checkpoint's export; cached)."""
    out = work / "eval" / f"{name}_step{step}.json"
    if not out.is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        export = work / "runs" / name / "checkpoints" / f"step_{step:08d}" / "export"
        sh(["ptrain", "eval", f"export={export}", f"shards=[{work / 'shards_heldout'}]", f"out={out}"],
           work / "eval" / f"{name}_step{step}.log")
    a = json.loads(out.read_text())["all"]
    return {"step": step, "t2v_R1": a["t2v_R1"], "t2v_R5": a["t2v_R5"], "chance_R1": a["chance_R1"]}


def interval(xs: list[float]) -> dict:
    """Mean, min-max, sample sd and the t-based 95% interval of the mean of ``xs``."""
    n, mean = len(xs), statistics.fmean(xs)
    sd = statistics.stdev(xs) if n > 1 else float("nan")
    half = T95.get(n - 1, 1.96) * sd / math.sqrt(n) if n > 1 else float("nan")
    return {"n": n, "mean": mean, "min": min(xs), "max": max(xs), "sd": sd,
            "t95_lo": mean - half, "t95_hi": mean + half}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/bench_masking_demo"), help="corpus, shards, runs, evals")
    ap.add_argument("--videos", type=int, default=200, help="sample-data videos (demo: 360)")
    ap.add_argument("--steps", type=int, default=400, help="optimizer steps per run (demo: 800)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--modes", nargs="+", default=["frame", "tube"], choices=["frame", "tube"])
    ap.add_argument("--ratio", type=float, default=0.5)
    ap.add_argument("--head", default="TDB", help="model.head (the config's is TDB)")
    ap.add_argument("--vision", default="", metavar="W,L,P",
                    help="random-init vision tower (width, layers, patch px) instead of the tiny one; '' = tiny")
    ap.add_argument("--equal-time", action="store_true",
                    help="also a masked run with a full schedule as long in training time as the unmasked run")
    ap.add_argument("--every", type=int, default=25, help="log and checkpoint every N steps (equal-wall-time points)")
    ap.add_argument("--master-port", type=int, default=29617)
    ap.add_argument("--out", type=Path, default=None, help="results JSON (default WORK/results.json)")
    args = ap.parse_args()
    if args.steps % args.every:
        ap.error(f"--steps {args.steps} must be a multiple of --every {args.every}")
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    out = args.out or work / "results.json"
    t_start = time.time()
    corpus(work, args.videos)
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    settings.update(config=str(CONFIG.relative_to(ROOT)), ranks=2, accelerator="cpu", cpu_count=os.cpu_count())
    results: dict = {"settings": settings, "runs": {}, "evals": {}, "equal_wall": [], "equal_time": []}
    common = [f"model.clip={vision_clip(work, args.vision)}"] if args.vision else []

    def save() -> None:
        out.write_text(json.dumps(results, indent=1))

    masked = {m: [f"model.mask_ratio={args.ratio}", f"model.mask_mode={m}"] for m in args.modes}
    variants = [("none", [])] + list(masked.items())
    # seeds outer, variants inner: the runs compared with each other are measured close in time (shared machine)
    for seed in args.seeds:
        for mode, extra in variants:
            name = f"{mode}_s{seed}"
            results["runs"][name] = pretrain(work, name, seed, common + extra, args)
            results["evals"][name] = evaluate(work, name, args.steps)
            save()
        base = results["runs"][f"none_s{seed}"]
        base_times = {int(k): v for k, v in base["step_times_s"].items() if int(k) % args.every == 0}
        for mode in args.modes:
            m = results["runs"][f"{mode}_s{seed}"]
            step = min(base_times, key=lambda s: abs(base_times[s] - m["train_wall_s"]))
            e = evaluate(work, f"none_s{seed}", step)
            results["equal_wall"].append({"seed": seed, "mode": mode, "masked_wall_s": m["train_wall_s"],
                                          "unmasked_step": step, "unmasked_wall_s": base_times[step],
                                          "unmasked": e, "masked": results["evals"][f"{mode}_s{seed}"]})
            save()
            if args.equal_time:
                # per-step times of this seed's equal-step runs -> the steps the masked run gets in the same time
                speed = base["train_wall_s"] / m["train_wall_s"]
                steps = max(args.every, round(args.steps * speed / args.every) * args.every)
                name = f"{mode}_eqt_s{seed}"
                results["runs"][name] = r = pretrain(work, name, seed, common + masked[mode], args, steps)
                results["evals"][name] = ev = evaluate(work, name, steps)
                results["equal_time"].append({"seed": seed, "mode": mode, "speed": round(speed, 3), "steps": steps,
                                              "masked_wall_s": r["train_wall_s"], "unmasked_wall_s": base["train_wall_s"],
                                              "masked": ev, "unmasked": results["evals"][f"none_s{seed}"]})
                save()
    results["total_wall_s"] = round(time.time() - t_start, 1)
    report(results, args)
    save()
    print(f"results: {out}")


def report(results: dict, args) -> None:
    """The markdown tables and the verdicts, into ``results['summary']``."""
    ev, runs = results["evals"], results["runs"]
    label = {"none": "unmasked", **{m: f"mask {args.ratio} {m}" for m in args.modes}}
    summary: dict = {}
    print(f"\n{len(args.seeds)} seeds, {args.steps} steps each; held-out t2v (chance R@1 "
          f"{ev[f'none_s{args.seeds[0]}']['chance_R1']:.2f}%)\n")
    print("| run | R@1 per seed | R@1 mean [min-max] | t 95% of the mean | R@5 mean | training wall s (mean) |")
    print("|---|---|---|---|---:|---:|")
    for mode in ["none", *args.modes]:
        names = [f"{mode}_s{s}" for s in args.seeds if f"{mode}_s{s}" in ev]
        if not names:
            continue
        r1 = interval([ev[n]["t2v_R1"] for n in names])
        r5 = statistics.fmean(ev[n]["t2v_R5"] for n in names)
        wall = statistics.fmean(runs[n]["train_wall_s"] for n in names)
        summary[mode] = {"R1": r1, "R5_mean": r5, "train_wall_s_mean": wall}
        per_seed = " / ".join(f"{ev[n]['t2v_R1']:.1f}" for n in names)
        print(f"| {label[mode]} | {per_seed} | {r1['mean']:.2f} "
              f"[{r1['min']:.1f}-{r1['max']:.1f}] | {r1['t95_lo']:.2f} to {r1['t95_hi']:.2f} | {r5:.1f} | {wall:.0f} |")
    base = summary.get("none", {}).get("R1")
    for mode in args.modes:
        if base is None or mode not in summary:
            continue
        m = summary[mode]["R1"]["mean"]
        # paired by seed: the masked run against its unmasked twin (same seed, same data order)
        pairs = [ev[f"{mode}_s{s}"]["t2v_R1"] - ev[f"none_s{s}"]["t2v_R1"] for s in args.seeds
                 if f"{mode}_s{s}" in ev and f"none_s{s}" in ev]
        summary[mode]["paired_R1_diff"] = paired = interval(pairs)
        summary[mode]["within_minmax"] = base["min"] <= m <= base["max"]
        summary[mode]["within_t95"] = base["t95_lo"] <= m <= base["t95_hi"]
        print(f"\n{label[mode]}: mean R@1 {m:.2f} vs unmasked {base['mean']:.2f}: "
              f"{'within' if summary[mode]['within_minmax'] else 'outside'} the unmasked min-max "
              f"[{base['min']:.1f}, {base['max']:.1f}], "
              f"{'within' if summary[mode]['within_t95'] else 'outside'} its t 95% interval "
              f"[{base['t95_lo']:.2f}, {base['t95_hi']:.2f}]; paired by seed: "
              f"{' / '.join(f'{d:+.1f}' for d in pairs)}, mean {paired['mean']:+.2f}, "
              f"t 95% [{paired['t95_lo']:+.2f}, {paired['t95_hi']:+.2f}]")
    def cell(e: dict) -> str:
        return f"{e['t2v_R1']:.1f}, {e['t2v_R5']:.1f}"

    comparisons = {  # results key -> title, the table's middle header cells, a row's middle cells
        "equal_wall": ("Equal wall time: the masked run's training time vs the unmasked run's nearest checkpoint",
                       "| masked: wall s, R@1, R@5 | unmasked at that time: step, wall s, R@1, R@5 ", "|---|---",
                       lambda r: f"| {r['masked_wall_s']:.0f}, {cell(r['masked'])} | {r['unmasked_step']}, "
                                 f"{r['unmasked_wall_s']:.0f}, {cell(r['unmasked'])} "),
        "equal_time": ("Equal training time, full schedules: the masked run gets the steps the unmasked run's time "
                       f"buys (its speed-up per step measured in this seed's {args.steps}-step runs)",
                       "| speed-up per step | masked: steps, wall s, R@1, R@5 | unmasked: steps, wall s, R@1, R@5 ",
                       "|---:|---|---",
                       lambda r: f"| {r['speed']:.2f}x | {r['steps']}, {r['masked_wall_s']:.0f}, {cell(r['masked'])} "
                                 f"| {args.steps}, {r['unmasked_wall_s']:.0f}, {cell(r['unmasked'])} "),
    }
    for key, (title, header, rule, middle) in comparisons.items():
        if not results[key]:
            continue
        print(f"\n{title}\n\n| seed | mask mode {header}| R@1 masked - unmasked |\n|---:|---{rule}|---:|")
        for r in results[key]:
            print(f"| {r['seed']} | {r['mode']} {middle(r)}| {r['masked']['t2v_R1'] - r['unmasked']['t2v_R1']:+.1f} |")
        for mode in args.modes:
            ds = [r["masked"]["t2v_R1"] - r["unmasked"]["t2v_R1"] for r in results[key] if r["mode"] == mode]
            if ds:
                summary.setdefault(mode, {})[f"{key}_R1_diff"] = iv = interval(ds)
                print(f"{label[mode]}, {key.replace('_', ' ')}: R@1 masked - unmasked "
                      f"{' / '.join(f'{d:+.1f}' for d in ds)}, mean {iv['mean']:+.2f}"
                      + (f", t 95% [{iv['t95_lo']:+.2f}, {iv['t95_hi']:+.2f}]" if len(ds) > 1 else ""))
    results["summary"] = summary


if __name__ == "__main__":
    main()
