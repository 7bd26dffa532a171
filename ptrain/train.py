"""``ptrain pretrain``: contrastive video-text post-pretraining with DeepSpeed ZeRO, one process per rank.

    launch/pretrain.sh configs/demo/pretrain_tiny.yaml                      # 2 CPU ranks (gloo)
    NUM_GPUS=8 launch/pretrain.sh configs/pretrain/howto100m_vitb32_meanP.yaml data.sources=[/data/shards]
    ptrain pretrain configs/demo/pretrain_tiny.yaml engine.zero_stage=0       # one process, no launcher

Every rank runs :func:`run` with RANK / LOCAL_RANK / WORLD_SIZE from the environment. A step:
``grad_accum`` micro-batches through ``engine(...)`` / ``engine.backward`` / ``engine.step`` (the
distributed InfoNCE is computed inside the model's forward), then logging, checkpointing and the
optional held-out eval. Re-running the same command resumes from the newest COMPLETE checkpoint.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from ptrain import checkpoint as ckpt
from ptrain import engine as E
from ptrain.config import dump_config
from ptrain.logging import RunLogger
from ptrain.schema import PretrainConfig

EXIT_NONFINITE, EXIT_OOM, EXIT_LOST_RANK, EXIT_ERROR = 3, 4, 5, 1
# A rank that lost its peers waits this long before exiting. The deepspeed launcher polls its ranks once a
# second and reports the first failed exit it sees; the wait lets it see the dead rank's own status (a
# signal, e.g. SIGKILL from the OOM killer) rather than this rank's "lost peers", which is only the echo.
LOST_PEER_EXIT_DELAY_S = 3.0


class TrainingFailed(RuntimeError):
    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code


def run(cfg: PretrainConfig) -> int:
    from ptrain.data import build_train_loader
    from ptrain.model import build_model

    # Process group first: rank and world come from the launcher's environment.
    E.init_distributed(cfg.engine)
    rank, world = dist.get_rank(), dist.get_world_size()
    run_dir = Path(cfg.run_dir)
    try:
        resume_from = ckpt.resolve_resume(run_dir, cfg.checkpoint)
    except (FileNotFoundError, FileExistsError) as e:
        print(f"ptrain pretrain: {e}", file=sys.stderr, flush=True)
        return 2
    start_step = 0
    log = RunLogger(run_dir, cfg.log, enabled=rank == 0, total_steps=cfg.max_steps)
    if rank == 0:
        dump_config(cfg, run_dir / "config.yaml")

    # Same seed on every rank: identical init (DeepSpeed also broadcasts rank 0's weights).
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model)
    frozen = E.freeze_clip_layers(model, cfg.optim.freeze_layer_num)
    engine, ds_config = E.build_engine(model, cfg.optim, cfg.engine)
    n_params = sum(p.numel() for p in model.parameters())
    n_train = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad)
    log.info(E.describe(ds_config, world, n_params, n_train, cfg.model.grad_checkpointing,
                        local_negatives=cfg.model.head == "tightTransf"))
    log.info("deepspeed config: " + json.dumps(ds_config, sort_keys=True))
    if frozen:
        log.info(f"frozen (optim.freeze_layer_num={cfg.optim.freeze_layer_num}): {len(frozen)} CLIP tensors")

    # Resume: engine state (any world size) + the data cursor (optimizer step, samples consumed).
    samples_seen = 0
    if resume_from is not None:
        state, how = ckpt.load(engine, resume_from, cfg.engine.zero_stage, cfg.engine.precision)
        E.apply_group_hparams(engine, model, cfg.optim)  # this config's lr / coef_lr / weight decay
        start_step, samples_seen = int(state["step"]), int(state["samples_seen"])
        log.info(f"resumed from {resume_from} at step {start_step} ({samples_seen} samples seen) via {how}")
    if start_step >= cfg.max_steps:
        log.info(f"nothing to do: the run is at step {start_step} of max_steps={cfg.max_steps}")
        log.close()
        return 0
    try:
        loader = build_train_loader(
            cfg.data, num_frames=cfg.model.num_frames, frame_size=cfg.model.frame_size, max_words=cfg.model.max_words,
            micro_batch_size=cfg.engine.micro_batch_size, rank=rank, world_size=world, seed=cfg.seed,
            start_step=start_step, grad_accum=cfg.engine.grad_accum, start_sample=samples_seen,
        )
    except (FileNotFoundError, ValueError) as e:  # missing or empty shard directories, bad sizes
        print(f"ptrain pretrain: data: {e}", file=sys.stderr, flush=True)
        log.close()
        return 2
    log.info(f"data: {loader.num_shards} shards, epoch of {loader.epoch_size} samples, global batch "
             f"{loader.global_batch_size}, starting at step {start_step}")
    saved_batch = int(state["data"]["global_batch"]) if resume_from is not None else loader.global_batch_size
    if saved_batch != loader.global_batch_size:
        log.info(f"the global batch changed from {saved_batch} to {loader.global_batch_size}: the data goes on from "
                 f"sample {samples_seen} (none read twice or skipped); the LR schedule goes on by step")
    log.step_done(start_step)
    log.forget_after(start_step)  # rows a crashed attempt logged after its last checkpoint
    try:
        # a tight head scores every sample against the whole local batch: count those cross-encoder pairs
        tight_pairs = cfg.engine.micro_batch_size if cfg.model.head == "tightTransf" else 1
        _loop(cfg, engine, loader, log, start_step, samples_seen, model.flops_per_sample(tight_pairs=tight_pairs))
    except (TrainingFailed, RuntimeError) as e:
        if not isinstance(e, TrainingFailed):
            if not _is_lost_peer(e):
                raise
            e = TrainingFailed(f"lost a rank: {str(e).splitlines()[0]}", EXIT_LOST_RANK)
        latest = ckpt.latest_complete(run_dir)
        where = f"resume from {latest} by re-running the same command" if latest else "no complete checkpoint yet: a re-run starts over"
        print(f"ptrain pretrain: rank {rank}: {e}\n  {where} (checkpoint.resume=auto).", file=sys.stderr, flush=True)
        log.close()
        if e.code == EXIT_LOST_RANK:
            time.sleep(LOST_PEER_EXIT_DELAY_S)
        return e.code
    log.close()
    return 0


def _loop(cfg: PretrainConfig, engine, loader, log: RunLogger, start_step: int, samples_seen: int, flops_fwd: int):
    rank, world = dist.get_rank(), dist.get_world_size()
    dev = E.device()
    accum, global_batch = cfg.engine.grad_accum, loader.global_batch_size
    peak = E.peak_flops(cfg.engine)
    batches = iter(loader)
    window = {"t": time.perf_counter(), "wait": 0.0, "steps": 0, "frames": 0.0}
    reported_skips = 0
    max_log_scale = math.log(cfg.model.max_logit_scale)
    log_scale = engine.module.logit_scale.log_scale
    for step in range(start_step, cfg.max_steps):
        lr_mult = E.lr_multiplier(step, cfg.optim, cfg.max_steps)
        lrs = E.set_lr(engine, lr_mult)

        # Forward/backward over the micro-batches; DeepSpeed steps the optimizer at the boundary.
        loss_sum, stats, frames = 0.0, {}, 0
        for _ in range(accum):
            t0 = time.perf_counter()
            batch = next(batches)
            window["wait"] += time.perf_counter() - t0
            frames += int(batch["frame_mask"].sum())  # real frames, not padding
            if batch["step"] != step:  # the loader's cursor must match ours (resume exactness)
                raise TrainingFailed(f"data cursor at step {batch['step']} but training is at step {step}", EXIT_ERROR)
            try:
                out = engine(batch["frames"].to(dev), batch["frame_mask"].to(dev), batch["input_ids"].to(dev),
                             batch["attention_mask"].to(dev), batch["group_ids"].to(dev))
                engine.backward(out["loss"])
                engine.step()
            except torch.OutOfMemoryError as e:
                raise TrainingFailed(
                    f"out of memory at step {step + 1} (micro batch {cfg.engine.micro_batch_size}, "
                    f"{cfg.model.num_frames} frames): lower engine.micro_batch_size and raise engine.grad_accum, "
                    f"or set model.grad_checkpointing=true ({str(e).splitlines()[0]})", EXIT_OOM) from None
            except RuntimeError as e:
                if _is_lost_peer(e):
                    raise TrainingFailed(f"lost a rank at step {step + 1}: {str(e).splitlines()[0]}", EXIT_LOST_RANK) from None
                raise
            loss_sum += float(out["loss"].detach())
            for k, v in out.items():
                if k != "loss" and torch.is_tensor(v) and v.numel() == 1:
                    stats[k] = stats.get(k, 0.0) + float(v) / accum

        # The temperature's master weight is clamped after the update, as CLIP4Clip does (a collective).
        E.clamp_parameter_(log_scale, max_log_scale)

        # One small all-reduce per step: the mean loss for the log, a shared non-finite verdict, frames.
        # A non-finite gradient norm counts too under bf16 (DeepSpeed applies such a step, so the weights
        # are poisoned and must never reach a checkpoint) and fp32 (the computation itself overflowed);
        # under fp16 it is the loss scaler's routine overflow: DeepSpeed skipped the step and lowers the scale.
        gnorm = E.grad_norm(engine)
        bad_grad = gnorm is not None and not math.isfinite(gnorm) and cfg.engine.precision != "fp16"
        bad = not math.isfinite(loss_sum) or bad_grad
        vec = torch.tensor([loss_sum / accum, float(bad), frames], dtype=torch.float64, device=dev)
        dist.all_reduce(vec)
        loss, nonfinite = float(vec[0]) / world, int(vec[1])
        window["frames"] += float(vec[2])
        if nonfinite:
            raise TrainingFailed(
                f"non-finite loss or gradient at step {step + 1} on {nonfinite} rank(s) (loss {loss}, grad norm "
                f"{gnorm}); resuming repeats the same batches, so change something first: lower optim.lr (the "
                f"checkpoint's lr is replaced by the config's), check engine.precision (bf16 is the safe choice) "
                f"or inspect this step's batch", EXIT_NONFINITE)
        samples_seen += global_batch
        done = step + 1
        window["steps"] += 1
        log.step_done()

        if done % cfg.log.every_steps == 0 or done == cfg.max_steps or done == start_step + 1:
            elapsed = time.perf_counter() - window["t"]
            sps = window["steps"] * global_batch / max(elapsed, 1e-9)
            skipped = sum(v for k, v in loader.stats.items() if k.startswith("samples_") and k != "samples_substituted")
            metrics = {
                # the optimizer's own rates (after a resume too), not recomputed from the config
                "loss": loss, "lr_new": lrs.get("new_decay", lrs.get("new_no_decay")),
                "lr_clip": lrs.get("clip_decay", lrs.get("clip_no_decay")),
                "grad_norm": gnorm, "samples_per_s": sps, "frames_per_s": window["frames"] / max(elapsed, 1e-9),
                "data_wait": window["wait"] / max(elapsed, 1e-9), "samples_seen": samples_seen,
                "epoch": loader.epoch_at(done), **stats,
                "mfu": sps / world * 3 * flops_fwd / peak if peak else None,
                "samples_skipped": skipped, "shards_damaged": loader.stats.get("shards_damaged", 0),
            }
            log.metrics(done, metrics)
            if skipped > reported_skips:
                log.info(f"loader: skipped {skipped} unreadable sample(s) so far ({dict(loader.stats)})")
                reported_skips = skipped
            window = {"t": time.perf_counter(), "wait": 0.0, "steps": 0, "frames": 0.0}

        if (cfg.checkpoint.every_steps and done % cfg.checkpoint.every_steps == 0) or done == cfg.max_steps:
            state = {"step": done, "samples_seen": samples_seen, "world_size": world, "seed": cfg.seed,
                     "zero_stage": cfg.engine.zero_stage, "precision": cfg.engine.precision,
                     "data": {"start_step": done, "global_batch": global_batch}}
            path = ckpt.save(engine, cfg.model, cfg.run_dir, state, cfg.checkpoint)
            log.info(f"checkpoint {path}")
            window["t"] = time.perf_counter()  # saving is not training time

        if cfg.eval.every_steps and (done % cfg.eval.every_steps == 0 or done == cfg.max_steps):
            from ptrain.evaluate import evaluate_during_training

            m = evaluate_during_training(engine.module, cfg.data, cfg.model.num_frames, cfg.model.frame_size,
                                         cfg.model.max_words, cfg.eval)
            log.metrics(done, m, prefix="eval")
            window["t"] = time.perf_counter()


# What gloo / NCCL / c10d say when a peer process or node went away (not every gloo or socket error).
_LOST_PEER = ("connection closed by peer", "connection reset", "broken pipe", "timed out", "timeout",
              "nccl communicator was aborted", "connection refused", "read error", "remote process exited",
              "ncclremoteerror", "socket closed")


def _is_lost_peer(e: BaseException) -> bool:
    text = str(e).lower()
    return any(s in text for s in _LOST_PEER)
