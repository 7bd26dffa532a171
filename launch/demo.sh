#!/usr/bin/env bash
# launch/demo.sh [DEMO_DIR]: install (launch/setup.sh), then the whole pipeline on one CPU machine (2 CPU cores).
#
#   1. ptrain sample-data      a HowTo100M-style corpus of moving-shape videos with ASR captions
#   2. ptrain shard (x3)       pretraining / fine-tuning / held-out video lists -> WebDataset shards (local Ray)
#   3. launch/pretrain.sh (x2) DeepSpeed ZeRO-2, 2 CPU ranks over gloo, tiny CLIP: meanP and TDB
#   4. ptrain eval (x2)        held-out retrieval R@1/5/10 (vs chance) + the motion-direction probe
#   5. launch/finetune.sh (x3) each pretrained model fine-tuned on videos pretraining never saw, and the last head
#                              fine-tuned from a random-init CLIP, each tested once on the held-out split;
#                              ptrain report puts the stages side by side (DEMO_DIR/report)
#
# The probe asks each held-out clip that lies inside one ground-truth event to choose between
# "the red circle moves to the left" and "... to the right" (up/down likewise). Left and right
# cover the same positions, so only the order of the frames tells them apart: an order-blind
# head (meanP) cannot use the order; the strictest measure scores each clip against itself played
# backwards, where meanP is exactly 50%. A temporal head (TDB) can read the order, if it learnt to.
#
# Both heads train with reversal negatives (configs/demo/pretrain_tiny.yaml: every clip played
# backwards is an extra negative for its caption), which is what lets the temporal head learn the
# order within the demo's budget; meanP cannot use them.
#
# Environment: DEMO_VIDEOS (default 360), DEMO_STEPS (default 800), DEMO_HEADS (default "meanP TDB"),
# DEMO_FINETUNE_EPOCHS (default 3), MASTER_PORT (default 29500). Re-running reuses finished steps (shards are
# skipped, runs resume).
set -euo pipefail

case "${1:-}" in
  -h|--help) sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d' | sed 's/^# \{0,1\}//'; exit 0 ;;
  -*) echo "launch/demo.sh: unknown flag $1 (usage: launch/demo.sh [DEMO_DIR]; --help for more)" >&2; exit 2 ;;
esac

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(dirname "$here")"
demo="${1:-$repo/demo}"
videos="${DEMO_VIDEOS:-360}"
steps="${DEMO_STEPS:-800}"
ft_epochs="${DEMO_FINETUNE_EPOCHS:-3}"
heads="${DEMO_HEADS:-meanP TDB}"
# install (idempotent) into .venv, or PTRAIN_VENV, and use it
bash "$here/setup.sh"
# shellcheck disable=SC1091
. "${PTRAIN_VENV:-$repo/.venv}/bin/activate"
export DS_ACCELERATOR="${DS_ACCELERATOR:-cpu}"
mkdir -p "$demo"
t0=$SECONDS
say() { printf '\n== %s (%ss)\n' "$*" $((SECONDS - t0)); }

say "1/5 sample data: $videos videos -> $demo/raw"
if [[ ! -f "$demo/raw/sample_meta.json" ]]; then
  ptrain sample-data out="$demo/raw" num_videos="$videos" seed=0 overwrite=true
fi

say "2/5 shards: every 4th video held out, every 8th (of the rest) kept for fine-tuning"
python3 - "$demo" <<'EOF'
import csv, sys
from pathlib import Path
demo = Path(sys.argv[1])
rows = list(csv.DictReader(open(demo / "raw" / "HowTo100M_v1.csv")))
splits = (("train", lambda i: i % 4 != 3 and i % 8 != 2), ("finetune", lambda i: i % 8 == 2),
          ("heldout", lambda i: i % 4 == 3))
for name, keep in splits:
    with open(demo / f"{name}.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(r for i, r in enumerate(rows) if keep(i))
EOF
# 8 frames spread over each clip at 64 px (the tiny model's input); short clips so that most
# lie inside one motion event.
shard_args=(captions="$demo/raw/caption.json" videos="$demo/raw/videos" plan.num_frames=8 plan.sampling=uniform
            frame_size=64 plan.min_seconds=2 plan.min_words=4 plan.max_seconds=5 max_samples_per_shard=64
            progress=false)
for split in train finetune heldout; do
  if [[ ! -f "$demo/shards_$split/manifest.json" ]]; then  # a finished shard run leaves its manifest
    ptrain shard "${shard_args[@]}" video_list="$demo/$split.csv" out="$demo/shards_$split"
  fi
done

say "3/5 pretraining: heads $heads, $steps steps each, 2 CPU ranks"
for head in $heads; do
  "$here/pretrain.sh" "$repo/configs/demo/pretrain_tiny.yaml" model.head="$head" max_steps="$steps" \
    data.sources="[$demo/shards_train]" run_dir="$demo/runs/$head" log.every_steps=200
done

say "4/5 held-out evaluation"
for head in $heads; do
  echo "--- $head"
  ptrain eval export="$demo/runs/$head" shards="[$demo/shards_heldout]" \
    probe.sample_meta="$demo/raw/sample_meta.json" probe.min_overlap=0.7 out="$demo/eval_$head.json"
done

say "5/5 fine-tuning on videos pretraining never saw, then the held-out split once"
for head in $heads; do
  "$here/finetune.sh" "$repo/configs/demo/finetune_tiny.yaml" init="$demo/runs/$head" model.head="$head" \
    epochs="$ft_epochs" data.sources="[$demo/shards_finetune]" test="[$demo/shards_heldout]" \
    run_dir="$demo/runs/finetune_$head" log.every_steps=20
  echo "--- $head, fine-tuned"
  ptrain eval export="$demo/runs/finetune_$head/best/export" shards="[$demo/shards_heldout]" \
    probe.sample_meta="$demo/raw/sample_meta.json" probe.min_overlap=0.7 out="$demo/eval_finetune_$head.json"
done
# the same fine-tune from a random-init CLIP: what post-pretraining gave (last head only, to keep the demo short)
last="${heads##* }"
"$here/finetune.sh" "$repo/configs/demo/finetune_tiny.yaml" init=tiny model.head="$last" epochs="$ft_epochs" \
  data.sources="[$demo/shards_finetune]" test="[$demo/shards_heldout]" run_dir="$demo/runs/scratch_$last" \
  log.every_steps=20 benchmark=sample-data

report_args=()
for head in $heads; do
  report_args+=("$demo/eval_$head.json" "$demo/eval_finetune_$head.json" "$demo/runs/$head" "$demo/runs/finetune_$head")
done
report_args+=("$demo/runs/scratch_$last")
ptrain report "${report_args[@]}" out="$demo/report" >/dev/null  # report.md and training curves (PNG)

say "summary"
python3 - "$demo" $heads <<'EOF'
import json, sys
from pathlib import Path
demo, heads = Path(sys.argv[1]), sys.argv[2:]
print(f"{'head':<21} {'t2v R@1':>8} {'R@5':>6} {'R@10':>6} {'chance R@1':>11} {'direction 4-way':>16} "
      f"{'vs opposite':>12} {'vs reversed':>12}")
nan = float("nan")
for h in heads:
    for stage, name in (("", h + ", pretrained"), ("finetune_", h + ", fine-tuned")):
        f = demo / f"eval_{stage}{h}.json"
        if not f.is_file():
            continue
        r = json.loads(f.read_text())
        a, p = r["all"], r.get("probe", {})
        print(f"{name:<21} {a['t2v_R1']:8.1f} {a['t2v_R5']:6.1f} {a['t2v_R10']:6.1f} {a['chance_R1']:11.1f} "
              f"{p.get('direction_acc', nan):15.1f}% {p.get('order_acc', nan):11.1f}% {p.get('reversal_acc', nan):11.1f}%")
scratch = sorted(demo.glob("runs/scratch_*/results/test.json"))
for f in scratch:
    a = json.loads(f.read_text())["all"]
    name = f.parts[-3].removeprefix("scratch_") + ", no pretraining"
    print(f"{name:<21} {a['t2v_R1']:8.1f} {a['t2v_R5']:6.1f} {a['t2v_R10']:6.1f} {a['chance_R1']:11.1f}")
print("fine-tuned: on a split pretraining never saw; no pretraining: the same fine-tune from a random-init CLIP.")
print("direction 4-way: chance 25%. vs opposite: true direction caption vs the opposite one, chance 50%.")
print("vs reversed: true caption scored on the clip vs the same clip played backwards; meanP is exactly 50%.")
# each temporal head against meanP: the difference with a 95% interval from the independent-proportions
# approximation (both heads score the same clips, and meanP's reversal score is exactly 50% by
# construction, so this interval is wider than a paired test's: conservative)
base = json.loads((demo / "eval_meanP.json").read_text()).get("probe", {}) if "meanP" in heads else {}
for h in (h for h in heads if h != "meanP" and base.get("probe_clips")):
    p = json.loads((demo / f"eval_{h}.json").read_text())["probe"]
    for key, name in (("order_acc", "true vs opposite caption"), ("reversal_acc", "clip vs clip reversed")):
        a, b, n = p[key] / 100, base[key] / 100, p["probe_clips"]
        half = 196 * ((a * (1 - a) + b * (1 - b)) / n) ** 0.5
        verdict = "beats" if 100 * (a - b) > half else "does not clearly beat"
        print(f"{h} {verdict} meanP on {name}: {100 * a:.1f}% vs {100 * b:.1f}% "
              f"({100 * (a - b):+.1f} points, 95% interval +-{half:.1f}, {n} held-out clips)")
EOF
echo "demo finished in $((SECONDS - t0)) s; runs, shards and metrics under $demo; both stages side by side, with the"
echo "training curves: $demo/report/report.md"
