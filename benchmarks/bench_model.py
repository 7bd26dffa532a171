"""Forward+backward throughput of every head vs a plain ``transformers.CLIPModel`` per-frame baseline.

    python benchmarks/bench_model.py                                   # CPU, ViT-B/32, 2 videos x 12 frames (~5 min on 2 cores)
    python benchmarks/bench_model.py --device cuda --dtype bf16 --batch 32 --sizes ViT-B/32,ViT-B/16

Random init at the named size (nothing downloads). Each row: one training step (forward with the loss
computed inside, backward), samples/s = videos per second, the ratio to the baseline measured in the
same run, model FLOPs per sample (forward, analytic: ``model.flops_per_sample()``; x3 for fwd+bwd)
and, on a GPU, MFU against the device's dense bf16 peak. The baseline is what a user would write
with plain CLIP: ``get_image_features`` on every frame, mean over frames, ``get_text_features``, a
symmetric cross-entropy. Not a test: it never asserts a time.
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch
import torch.nn.functional as F

from ptrain.model import ModelConfig, build_model

CASES = [
    ("meanP", {}),
    ("seqLSTM", {}),
    ("seqTransf", {}),
    ("tightTransf", {}),
    ("TDB", {}),
    ("TAB", {}),
    ("meanP", {"linear_patch": "3d"}),
]
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}


def _batch(batch, frames, size, words, device):
    g = torch.Generator().manual_seed(0)
    return (
        torch.randint(0, 256, (batch, frames, 3, size, size), dtype=torch.uint8, generator=g).to(device),
        torch.ones(batch, frames, dtype=torch.long, device=device),
        torch.randint(1, 49406, (batch, words), generator=g).index_fill_(1, torch.tensor([words - 1]), 49407).to(device),
        torch.ones(batch, words, dtype=torch.long, device=device),
    )


def _step_fn(model, spec, batch, dtype):
    """One training step: our forward + the step's loss + backward, or the plain-CLIP baseline."""
    frames, mask, ids, attn = batch
    if spec is not None:
        from ptrain.loss import build_loss

        loss_fn = build_loss(model.cfg)
        return lambda: loss_fn(model(frames, mask, ids, attn), None)[0].backward()
    clip, log_scale = model.clip, model.logit_scale.log_scale

    def baseline():
        B, T = frames.shape[:2]
        x = (frames.flatten(0, 1).to(dtype) / 255 - model.pixel_mean.to(dtype)) / model.pixel_std.to(dtype)
        img = F.normalize(clip.get_image_features(pixel_values=x).pooler_output.view(B, T, -1).mean(1).float(), dim=-1)
        txt = F.normalize(clip.get_text_features(input_ids=ids).pooler_output.float(), dim=-1)
        logits = log_scale.float().exp() * txt @ img.t()
        labels = torch.arange(B, device=frames.device)
        (0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels))).backward()

    return baseline


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


def run(args) -> list[dict]:
    """One configuration at a time (build, warm up, time ``iters`` steps, free); each row reports its
    best step (wall and process-CPU seconds; CPU seconds are least disturbed by other processes)."""
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
        cases = [("CLIPModel baseline", None)] + [(h + (" 3d" if kw else ""), (h, kw)) for h, kw in CASES if h in args.heads.split(",")]
        times: dict[str, list[tuple[float, float]]] = {}
        flops_of: dict[str, int] = {}
        for label, spec in cases:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                head, kw = spec if spec else ("meanP", {})
                model = build_model(ModelConfig(clip=size, head=head, num_frames=args.frames, frame_size=224, **kw))
            model = model.to(device=device, dtype=dtype).train()
            step = _step_fn(model, spec, batch, dtype)
            measured = [_timed(step, model, device) for _ in range(args.warmup + args.iters)]
            times[label] = measured[args.warmup:]
            # tightTransf training scores every (text, video) pair of the local batch: B cross passes per sample.
            flops_of[label] = model.flops_per_sample(tight_pairs=args.batch)
            del model, step
            if device.type == "cuda":
                torch.cuda.empty_cache()
        results = {}
        for label, flops in flops_of.items():
            wall, cpu = min(w for w, _ in times[label]), min(c for _, c in times[label])
            row = {"size": size, "head": label, "s_per_step": wall, "cpu_s_per_step": cpu,
                   "samples_s": args.batch / wall, "gflops_fwd": flops / 1e9}
            if peak:
                row["mfu"] = 3 * flops * row["samples_s"] / (peak * 1e12)
            results[label] = row
            rows.append(row)
        # Ratios: wall time on a GPU; CPU seconds on a CPU (robust to other load on the machine).
        key = "s_per_step" if device.type == "cuda" else "cpu_s_per_step"
        base = results["CLIPModel baseline"][key]
        for r in results.values():
            r["ratio"] = base / r[key]
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--sizes", default="ViT-B/32")
    p.add_argument("--heads", default="meanP,seqLSTM,seqTransf,tightTransf,TDB,TAB")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--frames", type=int, default=12)
    p.add_argument("--iters", type=int, default=0, help="timed steps per row, the best is reported (0 = 2 on CPU, 10 on GPU)")
    p.add_argument("--warmup", type=int, default=-1, help="untimed steps first (-1 = 1 on CPU, 3 on GPU)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    args = p.parse_args(argv)
    gpu = args.device.startswith("cuda")
    args.iters = args.iters or (10 if gpu else 2)
    args.warmup = args.warmup if args.warmup >= 0 else (3 if gpu else 1)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rows = run(args)
    where = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU ({torch.get_num_threads()} threads)"
    print(f"# {where}, {args.dtype}, batch {args.batch} videos x {args.frames} frames, 32 words, best of {args.iters} steps after {args.warmup} warm-up")
    has_mfu = any("mfu" in r for r in rows)
    basis = "wall" if gpu else "CPU-s"
    print(f"| size | head | wall s/step | CPU s/step | samples/s (wall) | speed vs CLIPModel ({basis}) | fwd GFLOPs/sample |" + (" MFU |" if has_mfu else ""))
    print("|---|---|---|---|---|---|---|" + ("---|" if has_mfu else ""))
    for r in rows:
        line = (f"| {r['size']} | {r['head']} | {r['s_per_step']:.3f} | {r['cpu_s_per_step']:.2f} | {r['samples_s']:.3f} | "
                f"{r['ratio']:.2f} | {r['gflops_fwd']:.1f} |")
        print(line + (f" {100 * r['mfu']:.1f}% |" if "mfu" in r else (" |" if has_mfu else "")))


if __name__ == "__main__":
    main()
