"""Training-step throughput against a plain ``transformers.CLIPModel`` per-frame step: token masking and torch.compile.

    python benchmarks/bench_model.py --threads 1              # CPU, ViT-B/32, 2 videos x 12 frames (~40 min on 2 busy cores)
    python benchmarks/bench_model.py --compile off            # eager rows only (~8 min)
    python benchmarks/bench_model.py --heads seqTransf,TDB,TAB --compile off    # more heads, unmasked
    python benchmarks/bench_model.py --device cuda --dtype bf16 --batch 32 --sizes ViT-B/32,ViT-B/16

Random init at the named size (nothing downloads). Rows, each one training step (forward, the loss, backward):

- ``CLIPModel baseline``: what a user writes with plain CLIP: ``get_image_features`` on every frame, mean over
  frames, ``get_text_features``, a symmetric cross-entropy;
- ``ours``: ``VideoTextModel`` (meanP) + ``ptrain.loss``, unmasked, then with ``token_keep`` from
  ``ptrain.masking.TokenMasker`` at mask ratios 0.5 and 0.75, per frame and as tubes;
- each of them eager and under ``torch.compile`` (inductor; ``nn.Module.compile(dynamic=False)``, as
  ``engine.compile=true`` does through DeepSpeed; the compile itself happens in the untimed warm-up).

Columns: wall and process-CPU seconds per step (best of ``--iters`` after the warm-up), samples/s (videos per wall
second), the speed relative to the eager baseline measured in the same run (on a CPU from CPU seconds, which
other processes on a shared machine disturb least; on a GPU from wall time), forward GFLOPs per sample
(``model.flops_per_sample(mask_ratio=...)``: the kept tokens; x3 for forward + backward) and, on a GPU, MFU
against the dense bf16 peak. The load average of the machine is printed before and after. Not a test: it never
asserts a time.
"""

from __future__ import annotations

import argparse
import os
import time
import warnings

import torch
import torch.nn.functional as F

from ptrain.loss import build_loss
from ptrain.masking import TokenMasker
from ptrain.model import ModelConfig, build_model

MASKS = [(0.0, "frame"), (0.5, "frame"), (0.5, "tube"), (0.75, "frame"), (0.75, "tube")]
EXTRA_HEADS = {  # --heads: more heads, unmasked and eager (the per-head comparison)
    "seqLSTM": {}, "seqTransf": {}, "tightTransf": {}, "TDB": {}, "TAB": {}, "meanP3d": {"linear_patch": "3d"},
}
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}


def _batch(batch, frames, size, words, device):
    g = torch.Generator().manual_seed(0)
    return (
        torch.randint(0, 256, (batch, frames, 3, size, size), dtype=torch.uint8, generator=g).to(device),
        torch.ones(batch, frames, dtype=torch.long, device=device),
        torch.randint(1, 49406, (batch, words), generator=g).index_fill_(1, torch.tensor([words - 1]), 49407).to(device),
        torch.ones(batch, words, dtype=torch.long, device=device),
    )


def _baseline_loss(model, batch, dtype):
    """The plain-CLIP step's loss as a function (compiled whole for the compiled row)."""
    frames, _, ids, _ = batch
    clip, log_scale = model.clip, model.logit_scale.log_scale

    def loss():
        B, T = frames.shape[:2]
        x = (frames.flatten(0, 1).to(dtype) / 255 - model.pixel_mean.to(dtype)) / model.pixel_std.to(dtype)
        img = F.normalize(clip.get_image_features(pixel_values=x).pooler_output.view(B, T, -1).mean(1).float(), dim=-1)
        txt = F.normalize(clip.get_text_features(input_ids=ids).pooler_output.float(), dim=-1)
        logits = log_scale.float().exp() * txt @ img.t()
        labels = torch.arange(B, device=frames.device)
        return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels))

    return loss


def _timed(step, model, device):
    if device.type == "cuda":
        torch.cuda.synchronize()
    start, start_cpu = time.perf_counter(), time.process_time()
    step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    out = time.perf_counter() - start, time.process_time() - start_cpu
    model.zero_grad(set_to_none=True)
    return out


def _build(size, head, kw, frames, device, dtype):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = build_model(ModelConfig(clip=size, head=head, num_frames=frames, frame_size=224, **kw))
    return model.to(device=device, dtype=dtype).train()


def _cases(args):
    """(label, head, model kwargs, mask ratio, mask mode, compiled) of every row, in print order."""
    out = []
    for compiled in {"off": [False], "on": [True], "both": [False, True]}[args.compile]:
        out.append(("CLIPModel baseline", None, {}, 0.0, "", compiled))
        for ratio, mode in MASKS:
            label = "ours (meanP), unmasked" if ratio == 0 else f"ours, mask {ratio} {mode}"
            out.append((label, "meanP", {}, ratio, mode if ratio else "", compiled))
    for name in [h for h in args.heads.split(",") if h]:
        if name not in EXTRA_HEADS:
            raise SystemExit(f"--heads: unknown {name!r}; choose from {', '.join(EXTRA_HEADS)}")
        out.append((f"ours ({name}), unmasked", name.replace("3d", ""), EXTRA_HEADS[name], 0.0, "", False))
    return out


def run(args) -> list[dict]:
    """Rows of one configuration each: warm up (compiling where asked), time ``iters`` steps, keep the best."""
    device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    peak = None
    if device.type == "cuda":
        name = torch.cuda.get_device_name()
        peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
        if dtype is torch.float32 and peak:
            peak = None  # MFU is reported against the bf16 peak only
    rows = []
    for size in args.sizes.split(","):
        batch = _batch(args.batch, args.frames, 224, 32, device)
        models: dict[tuple, torch.nn.Module] = {}
        for label, head, kw, ratio, mode, compiled in _cases(args):
            key = (head or "meanP", tuple(sorted(kw.items())), compiled)
            if key not in models:  # one model per (head, compile); the mask rows reuse it
                models.clear()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                torch._dynamo.reset()
                models[key] = _build(size, head or "meanP", kw, args.frames, device, dtype)
                if compiled:  # in place, as DeepSpeed's engine.compile (the baseline compiles its own function)
                    models[key].compile(dynamic=False)
            model = models[key]
            if head is None:
                loss = _baseline_loss(model, batch, dtype)
                loss = torch.compile(loss, dynamic=False) if compiled else loss
                step = lambda loss=loss: loss().backward()  # noqa: E731
            else:
                extra = {}
                if ratio:
                    masker = TokenMasker(ratio, mode, model.num_patches, model.cfg.kept_patches(model.num_patches, ratio),
                                         seed=0)
                    extra["token_keep"] = masker.draw({"index": torch.arange(args.batch), "frames": batch[0]}).to(device)
                loss_fn = build_loss(model.cfg)
                step = lambda extra=extra, model=model, loss_fn=loss_fn: \
                    loss_fn(model(*batch, **extra), None)[0].backward()  # noqa: E731
            t0 = time.perf_counter()
            warmup = args.warmup + (1 if compiled else 0)  # compiled: the first step compiles, one more settles
            measured = [_timed(step, model, device) for _ in range(warmup + args.iters)]
            setup_s = sum(w for w, _ in measured[:warmup])
            times = measured[warmup:]
            flops = model.flops_per_sample(tight_pairs=args.batch, mask_ratio=ratio)
            wall, cpu = min(w for w, _ in times), min(c for _, c in times)
            row = {"size": size, "case": label, "compiled": compiled, "s_per_step": wall, "cpu_s_per_step": cpu,
                   "samples_s": args.batch / wall, "gflops_fwd": flops / 1e9, "warmup_s": setup_s,
                   "total_s": time.perf_counter() - t0}
            if peak:
                row["mfu"] = 3 * flops * row["samples_s"] / (peak * 1e12)
            rows.append(row)
            print(f"  measured {size} {label}{' (compiled)' if compiled else ''}: {cpu:.2f} CPU-s/step "
                  f"(warm-up {setup_s:.0f} s)", flush=True)
        models.clear()
        # Ratios: wall time on a GPU; CPU seconds on a CPU (robust to other load on the machine).
        key = "s_per_step" if device.type == "cuda" else "cpu_s_per_step"
        base = next(r for r in rows if r["size"] == size and r["case"] == "CLIPModel baseline" and not r["compiled"])
        for r in rows:
            if r["size"] == size:
                r["ratio"] = base[key] / r[key]
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--sizes", default="ViT-B/32")
    p.add_argument("--compile", default="both", choices=["both", "off", "on"], help="eager rows, compiled rows or both")
    p.add_argument("--heads", default="", help=f"more heads, unmasked and eager: {','.join(EXTRA_HEADS)}")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--frames", type=int, default=12)
    p.add_argument("--iters", type=int, default=0, help="timed steps per row, the best is reported (0 = 2 on CPU, 10 on GPU)")
    p.add_argument("--warmup", type=int, default=-1, help="untimed steps first (-1 = 1 on CPU, 3 on GPU; +1 compiled)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    args = p.parse_args(argv)
    gpu = args.device.startswith("cuda")
    args.iters = args.iters or (10 if gpu else 2)
    args.warmup = args.warmup if args.warmup >= 0 else (3 if gpu else 1)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    load0 = os.getloadavg()
    rows = run(args)
    load1 = os.getloadavg()
    where = torch.cuda.get_device_name() if gpu else f"CPU ({torch.get_num_threads()} threads, {os.cpu_count()} cores)"
    print(f"\n# {where}, {args.dtype}, batch {args.batch} videos x {args.frames} frames, 32 words, best of {args.iters} "
          f"steps after {args.warmup} warm-up (+1 compiled)")
    print(f"# load average (1/5/15 min) at start {load0[0]:.2f}/{load0[1]:.2f}/{load0[2]:.2f}, "
          f"at end {load1[0]:.2f}/{load1[1]:.2f}/{load1[2]:.2f}")
    has_mfu = any("mfu" in r for r in rows)
    basis = "wall" if gpu else "CPU-s"
    print(f"| size | step | compile | wall s/step | CPU s/step | samples/s (wall) | speed vs eager CLIPModel ({basis}) "
          f"| fwd GFLOPs/sample |" + (" MFU |" if has_mfu else ""))
    print("|---|---|---|---|---|---|---|---|" + ("---|" if has_mfu else ""))
    for r in rows:
        line = (f"| {r['size']} | {r['case']} | {'yes' if r['compiled'] else 'no'} | {r['s_per_step']:.3f} | "
                f"{r['cpu_s_per_step']:.2f} | {r['samples_s']:.3f} | {r['ratio']:.2f} | {r['gflops_fwd']:.1f} |")
        print(line + (f" {100 * r['mfu']:.1f}% |" if "mfu" in r else (" |" if has_mfu else "")))


if __name__ == "__main__":
    main()
