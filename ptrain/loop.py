"""The shared training loop: ``train_step`` (one optimizer step) and ``fit`` (schedule, log, checkpoint, eval cadence).

    fit(engine, loader, loss_fn, log, cadence, optim_cfg, start=Position(step, samples_seen),
        save=lambda pos: ..., evaluate=lambda step: {...}, flops_per_sample=..., peak_flops=...,
        masker=None)            # ptrain.masking.TokenMasker: the patch tokens each micro-batch keeps

``ptrain pretrain`` (``ptrain/pretrain.py``) and ``ptrain finetune`` are recipes around it; they build the parts
and decide what a checkpoint and an evaluation are. The loop never synchronises with the device per micro-batch:
the loss, the stats and the non-finite verdict stay device tensors and are reduced over ranks at the log interval
and before anything is saved (a step with a non-finite loss or gradient never reaches a checkpoint).
"""

from __future__ import annotations

import errno
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from ptrain import distributed as du
from ptrain.checkpoint import CheckpointWriteError
from ptrain.data.seekable import DataUnreadable
from ptrain.optim import lr_multiplier, set_lr

EXIT_NONFINITE, EXIT_OOM, EXIT_LOST_RANK, EXIT_ERROR, EXIT_BAD_INPUT = 3, 4, 5, 1, 2
# Writes that fail because of the file system (full, read-only, over quota), not because of the program.
_WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM)
# A rank that lost its peers waits this long before exiting. The deepspeed launcher polls its ranks once a
# second and reports the first failed exit it sees; the wait lets it see the dead rank's own status (a
# signal, e.g. SIGKILL from the OOM killer) rather than this rank's "lost peers", which is only the echo.
LOST_PEER_EXIT_DELAY_S = 3.0
# Peak dense bf16/fp16 TFLOP/s of known accelerators (vendor datasheets, without sparsity), for MFU.
_PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 70.0, "V100": 125.0}
# What gloo / NCCL / c10d say when a peer process or node went away (not every gloo or socket error).
_LOST_PEER = ("connection closed by peer", "connection reset", "broken pipe", "timed out", "timeout",
              "nccl communicator was aborted", "connection refused", "read error", "remote process exited",
              "ncclremoteerror", "socket closed")


class TrainingFailed(RuntimeError):
    """A failure with its exit status (2 bad input, 3 non-finite, 4 out of memory, 5 lost a rank, 1 other)."""

    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code


@dataclass
class Position:
    """Where a run is: optimizer steps done and global samples consumed (the data cursor)."""

    step: int = 0
    samples_seen: int = 0


@dataclass
class Cadence:
    """How long a run is and how often it logs, saves and evaluates (in optimizer steps; 0 = never)."""

    max_steps: int
    log_every: int
    checkpoint_every: int
    eval_every: int = 0
    grad_accum: int = 1
    precision: str = "bf16"  # under fp16 a non-finite gradient is the loss scaler's routine skip, not a failure
    max_logit_scale: float = 100.0


def peak_flops(peak_tflops: float, precision: str) -> float | None:
    """Peak FLOP/s of one device for MFU: the configured value, else a known GPU's datasheet number."""
    if peak_tflops > 0:
        return peak_tflops * 1e12
    if not du.on_cuda() or precision == "fp32":
        return None
    name = du.device_name()
    return next((t * 1e12 for key, t in _PEAK_TFLOPS.items() if key in name), None)


def is_lost_peer(e: BaseException) -> bool:
    text = str(e).lower()
    return any(s in text for s in _LOST_PEER)


def _message(e: BaseException) -> str:
    """An exception's own sentence, also when a DataLoader worker re-raised it with the worker's traceback."""
    text = str(e).strip()
    if "Original Traceback" in text:  # "...\nptrain.data.seekable.DataUnreadable: <the sentence>"
        text = text.splitlines()[-1].split(": ", 1)[-1]
    return text


def train_step(engine, loss_fn, batches: Iterator[dict], step: int, accum: int, dev: torch.device,
               masker: Callable[[dict, int], torch.Tensor | None] | None = None) -> dict[str, Any]:
    """One optimizer step over ``accum`` micro-batches: forward, loss, backward, and DeepSpeed's step (which
    updates at the accumulation boundary). Returns device tensors (``loss``, ``stats``) and host counters.
    ``masker(batch, step)``: the patch tokens each frame keeps (token masking), or None for every token."""
    loss_sum = torch.zeros((), device=dev)
    stats: dict[str, torch.Tensor] = {}
    frames, wait = 0, 0.0
    for _ in range(accum):
        t0 = time.perf_counter()
        batch = next(batches)
        wait += time.perf_counter() - t0
        if batch["step"] != step:  # the loader's cursor must match ours (resume exactness)
            raise TrainingFailed(f"data cursor at step {batch['step']} but training is at step {step}", EXIT_ERROR)
        frames += int(batch["frame_mask"].sum())  # real frames, not padding (a host tensor: no device sync)
        keep = masker(batch, step) if masker is not None else None  # drawn from (seed, sample position)
        extra = {} if keep is None else {"token_keep": keep.to(dev)}
        out = engine(batch["frames"].to(dev), batch["frame_mask"].to(dev), batch["input_ids"].to(dev),
                     batch["attention_mask"].to(dev), **extra)
        loss, step_stats = loss_fn(out, batch["group_ids"].to(dev))
        engine.backward(loss)
        engine.step()
        loss_sum += loss.detach().float()
        for k, v in step_stats.items():
            if torch.is_tensor(v) and v.numel() == 1:
                stats[k] = stats.get(k, 0.0) + v.detach().float().reshape(()) / accum
    return {"loss": loss_sum / accum, "stats": stats, "frames": frames, "wait": wait}


def fit(engine, loader, loss_fn, log, cadence: Cadence, optim_cfg, *, start: Position,
        save: Callable[[Position], Path], evaluate: Callable[[int], dict] | None = None,
        flops_per_sample: int | Callable[[int], int] = 0, peak: float | None = None,
        masker: Callable[[dict, int], torch.Tensor | None] | None = None) -> Position:
    """Train from ``start`` to ``cadence.max_steps``; returns the final position. Raises TrainingFailed.
    ``flops_per_sample``: forward FLOPs of one sample, or a function of the step (token masking changes it)."""
    flops_at = flops_per_sample if callable(flops_per_sample) else (lambda step: flops_per_sample)
    dev, world = du.device(), du.world_size()
    global_batch = loader.global_batch_size
    batches = iter(loader)
    pos = Position(start.step, start.samples_seen)
    log_scale = engine.module.logit_scale.log_scale
    max_log_scale = math.log(cadence.max_logit_scale)
    window = _Window(dev)
    reported_skips = 0
    for step in range(start.step, cadence.max_steps):
        lrs = set_lr(engine.optimizer, lr_multiplier(step, optim_cfg, cadence.max_steps))
        try:
            result = train_step(engine, loss_fn, batches, step, cadence.grad_accum, dev, masker)
            # The temperature's master weight is clamped after the update, as CLIP4Clip does (a collective).
            engine.clamp_(log_scale, max_log_scale)
        except DataUnreadable as e:
            raise TrainingFailed(_message(e), EXIT_BAD_INPUT) from None
        except torch.OutOfMemoryError as e:
            raise TrainingFailed(
                f"out of memory at step {step + 1} (micro batch {loader.micro_batch_size}, grad_accum "
                f"{cadence.grad_accum}): lower engine.micro_batch_size and raise engine.grad_accum, or set "
                f"model.grad_checkpointing=true ({str(e).splitlines()[0]})", EXIT_OOM) from None
        except RuntimeError as e:
            if isinstance(e, TrainingFailed) or not is_lost_peer(e):
                raise
            raise TrainingFailed(f"lost a rank at step {step + 1}: {str(e).splitlines()[0]}", EXIT_LOST_RANK) from None
        window.add(step, result, engine.grad_norm(), count_grad=cadence.precision != "fp16")
        window.flops += flops_at(step)
        pos = Position(step + 1, pos.samples_seen + global_batch)
        done = pos.step
        log.step_done()

        last = done == cadence.max_steps
        saving = (cadence.checkpoint_every and done % cadence.checkpoint_every == 0) or last
        if done % cadence.log_every == 0 or last or done == start.step + 1 or saving:
            # One small all-reduce: the window's loss, a shared non-finite verdict, frames; nothing is saved unchecked.
            summary = window.reduce(world)
            if done % cadence.log_every == 0 or last or done == start.step + 1:
                skipped = sum(v for k, v in loader.stats.items() if k.startswith("samples_") and k != "samples_substituted")
                sps = summary["steps"] * global_batch / max(summary["elapsed"], 1e-9)
                window_flops = window.flops / max(summary["steps"], 1)  # mean forward FLOPs/sample of the window
                log.metrics(done, {
                    # the optimizer's own rates (after a resume too), not recomputed from the config
                    "loss": summary["loss"], "lr_new": lrs.get("new_decay", lrs.get("new_no_decay")),
                    "lr_clip": lrs.get("clip_decay", lrs.get("clip_no_decay")),
                    "grad_norm": summary["grad_norm"], "samples_per_s": sps,
                    "frames_per_s": summary["frames"] / max(summary["elapsed"], 1e-9),
                    "data_wait": summary["wait"] / max(summary["elapsed"], 1e-9), "samples_seen": pos.samples_seen,
                    "epoch": loader.epoch_at(done), **summary["stats"],
                    "mfu": sps / world * 3 * window_flops / peak if peak else None,
                    "samples_skipped": skipped, "shards_damaged": loader.stats.get("shards_damaged", 0),
                })
                if skipped > reported_skips:
                    log.info(f"loader: skipped {skipped} unreadable sample(s) so far ({dict(loader.stats)})")
                    reported_skips = skipped
                window = _Window(dev)
        # evaluate before saving: what the evaluation decides (a fine-tune's best-so-far) travels in the checkpoint
        if evaluate is not None and cadence.eval_every and (done % cadence.eval_every == 0 or last):
            try:
                scores = evaluate(done)
            except ValueError as e:  # the held-out shards cannot be evaluated (all unreadable, ...)
                raise TrainingFailed(f"evaluation at step {done} failed: {e}; fix data.eval_sources or set "
                                     "eval.every_steps=0", EXIT_BAD_INPUT) from None
            log.metrics(done, scores, prefix="eval")
            window.restart_clock()
        if saving:
            log.info(f"checkpoint {save(pos)}")
            window.restart_clock()  # saving is not training time
    return pos


class _Window:
    """Per-log-interval accumulators: device tensors (no host sync per step) + host counters."""

    def __init__(self, dev: torch.device):
        self.dev = dev
        self.loss = torch.zeros((), device=dev, dtype=torch.float64)
        self.bad = torch.zeros((), device=dev, dtype=torch.float64)  # non-finite steps
        self.first_bad = torch.full((), math.inf, device=dev, dtype=torch.float64)  # the first one's step
        self.stats: dict[str, torch.Tensor] = {}
        self.grad_norm: torch.Tensor | None = None
        self.steps, self.frames, self.wait = 0, 0, 0.0
        self.flops = 0  # sum over the window's steps of the forward FLOPs per sample
        self.t = time.perf_counter()

    def restart_clock(self) -> None:
        self.t = time.perf_counter()

    def add(self, step: int, result: dict[str, Any], grad_norm: torch.Tensor | None, count_grad: bool) -> None:
        loss = result["loss"].double()
        bad = ~torch.isfinite(loss)
        if grad_norm is not None:
            self.grad_norm = grad_norm.detach().double().to(self.dev)
            if count_grad:  # bf16/fp32: DeepSpeed applies such a step, so the weights are poisoned
                bad = bad | ~torch.isfinite(self.grad_norm)
        self.bad += bad.double()
        self.first_bad = torch.where(bad & torch.isinf(self.first_bad), torch.tensor(float(step + 1), device=self.dev,
                                                                                      dtype=torch.float64), self.first_bad)
        self.loss += loss
        for k, v in result["stats"].items():
            self.stats[k] = self.stats.get(k, 0.0) + v.double()
        self.steps += 1
        self.frames += result["frames"]
        self.wait += result["wait"]

    def reduce(self, world: int) -> dict[str, Any]:
        """Mean over the window and the ranks; raises TrainingFailed when any rank saw a non-finite step."""
        elapsed = time.perf_counter() - self.t
        n = max(self.steps, 1)
        names = sorted(self.stats)
        vec = torch.stack([self.loss / n, self.bad, torch.tensor(float(self.frames), device=self.dev,
                                                                   dtype=torch.float64),
                           *[self.stats[k] / n for k in names]])
        first = du.all_reduce_max(-self.first_bad.clone())  # the earliest bad step over ranks (max of negatives)
        vec = du.all_reduce_sum(vec)
        values = vec.tolist()
        if values[1]:
            at = -float(first)
            raise TrainingFailed(
                f"non-finite loss or gradient at step {int(at) if math.isfinite(at) else '?'} (in {int(values[1])} "
                f"rank-step(s) since the last log line; loss {values[0] / world}, grad norm "
                f"{float(self.grad_norm) if self.grad_norm is not None else None}); resuming repeats the same batches, "
                f"so change something first: lower optim.lr (the checkpoint's lr is replaced by the config's), check "
                f"engine.precision (bf16 is the safe choice) or inspect that step's batch", EXIT_NONFINITE)
        return {"loss": values[0] / world, "frames": values[2], "steps": self.steps, "elapsed": elapsed,
                "wait": self.wait, "grad_norm": float(self.grad_norm) if self.grad_norm is not None else None,
                "stats": {k: v / world for k, v in zip(names, values[3:])}}


def failure(e: BaseException) -> TrainingFailed | None:
    """What a recipe reports for an exception out of :func:`fit`: TrainingFailed as it is; a lost peer (5); a write
    the file system refused (a full or read-only run_dir: 2); None for anything else (a bug: let it raise)."""
    if isinstance(e, TrainingFailed):
        return e
    if isinstance(e, CheckpointWriteError):  # its message names the checkpoint and the fix
        return TrainingFailed(str(e), EXIT_BAD_INPUT)
    if isinstance(e, OSError) and e.errno in _WRITE_ERRNOS:  # e.g. metrics.jsonl on a full disk
        return TrainingFailed(f"{e}: free space in run_dir or point run_dir elsewhere", EXIT_BAD_INPUT)
    if isinstance(e, RuntimeError) and is_lost_peer(e):
        return TrainingFailed(f"lost a rank: {str(e).splitlines()[0]}", EXIT_LOST_RANK)
    return None


def report_failure(e: BaseException, run_dir: str | Path, latest: Path | None) -> int:
    """Print what failed and how to go on (one line); returns the exit status (after the lost-peer delay)."""
    import sys

    e = failure(e) or TrainingFailed(f"lost a rank: {str(e).splitlines()[0]}", EXIT_LOST_RANK)
    if latest:
        where = f"{'fix that, then ' if e.code == EXIT_BAD_INPUT else ''}re-run the same command to resume from {latest}"
    else:
        where = "no intact checkpoint yet: a re-run starts over"
    print(f"ptrain: rank {du.rank()}: {e}; {where} (checkpoint.resume=auto).", file=sys.stderr, flush=True)
    if e.code == EXIT_LOST_RANK:
        time.sleep(LOST_PEER_EXIT_DELAY_S)
    return e.code


def run_recipe(cfg, verb: str, train: Callable[[Any], int]) -> int:
    """``ptrain VERB`` for a training recipe: this process is a rank (a launcher's, or a world of one) and runs
    ``train(cfg)``, or with ``ray.enabled`` the driver of Ray Train workers that each run ``ptrain.VERB:train``."""
    if cfg.ray.enabled:
        if du.launched():
            print(f"ptrain {verb}: ray.enabled=true in a rank that a launcher started ({du.launcher_name()}): Ray Train "
                  f"starts its own workers; run `ptrain {verb} CONFIG ray.enabled=true` once (or `ptrain submit "
                  f"{verb} CONFIG`), or drop ray.enabled to train under this launcher", file=sys.stderr, flush=True)
            return 2
        from ptrain.cluster import train_on_ray

        return train_on_ray(cfg, f"ptrain.{verb}:train", verb)
    code = train(cfg)
    if code == 0:  # leave the process group together: a rank exiting first made gloo abort its peer (SIGABRT)
        du.destroy()
    return code
