"""``ptrain pretrain``: contrastive video-text post-pretraining with DeepSpeed ZeRO, one process per rank (a recipe).

    launch/pretrain.sh configs/demo/pretrain_tiny.yaml                      # 2 CPU ranks (gloo)
    NUM_GPUS=8 launch/pretrain.sh configs/pretrain/howto100m_vitb32_meanP.yaml data.sources=[/data/shards]
    deepspeed --num_gpus 2 launch/pretrain.sh CONFIG.yaml [key=value ...]   # the launcher's own form
    torchrun --nproc_per_node 2 -m ptrain pretrain CONFIG.yaml              # torchrun works too
    ptrain pretrain configs/demo/pretrain_tiny.yaml engine.zero_stage=0       # one process, no launcher
    ptrain submit pretrain CONFIG.yaml ray.num_workers=8 ray.use_gpu=true     # Ray Train on a cluster (docs/ray.md)

Every rank runs :func:`train` (through :func:`run`, or in a Ray Train worker with ``ray.enabled=true``): the process
group (any launcher, or Ray's; ``ptrain.distributed``), the shards checked, the model, optimizer and engine built, a
checkpoint resumed, then ``ptrain.loop.fit``. Re-running the same command resumes from the newest COMPLETE checkpoint.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Callable

import torch

from ptrain import checkpoint as ckpt
from ptrain import distributed as du
from ptrain.config import dump_config
from ptrain.configs import PretrainConfig
from ptrain.logging import RunLogger
from ptrain.loop import Cadence, Position, failure, fit, peak_flops, report_failure, run_recipe


def preflight(cfg: PretrainConfig):
    """Every check the config allows before anything is built: the shards (training and held-out) exist, the
    backbone fits model.frame_size, run_dir is writable, the checkpoint to resume is there. ``launch/launcher.sh``
    runs it once before starting any rank, each rank again. Returns (discovered shards, newest COMPLETE checkpoint
    or None); raises ValueError / FileNotFoundError / FileExistsError naming the key and the fix."""
    from ptrain.data import discover_sources
    from ptrain.data.shards import discover
    from ptrain.model.config import backbone_problem

    discovered = discover_sources(cfg.data)
    if cfg.data.eval_sources:
        try:
            discover([s["path"] for s in cfg.data.eval_sources], stats={})
        except ValueError as e:
            raise ValueError(f"data.eval_sources: {e}") from None
    why = backbone_problem(cfg.model)
    if why:
        raise ValueError(why)
    ckpt.check_run_dir(cfg.run_dir)
    return discovered, ckpt.resolve_resume(cfg.run_dir, cfg.checkpoint)


def run(cfg: PretrainConfig) -> int:
    """``ptrain pretrain``: a rank running :func:`train`, or with ``ray.enabled`` the driver of Ray Train workers."""
    return run_recipe(cfg, "pretrain", train)


def train(cfg: PretrainConfig, on_checkpoint: Callable[[Path, Position], None] | None = None) -> int:
    """The recipe, on every rank; ``on_checkpoint(path, position)`` runs on every rank after each checkpoint is
    complete on all of them (Ray Train reports it)."""
    from ptrain.data import build_train_loader
    from ptrain.engine import Engine, describe
    from ptrain.loss import build_loss
    from ptrain.masking import build_token_masker
    from ptrain.model import build_model
    from ptrain.model.freeze import freeze_clip_layers
    from ptrain.optim import apply_group_hparams, build_optimizer

    # Inputs first: a bad shard path or a run directory in the way fail before anything is built or written.
    try:
        discovered, _ = preflight(cfg)
        du.init(cfg.engine.dist_timeout_s)
    except (FileNotFoundError, FileExistsError, ValueError) as e:  # du.PortInUse is a ValueError
        print(f"ptrain pretrain: {e}", file=sys.stderr, flush=True)
        return 2
    rank, world = du.rank(), du.world_size()
    log = RunLogger(cfg.run_dir, cfg.log, enabled=rank == 0, total_steps=cfg.max_steps)
    try:  # the checkpoint to resume, verified (rank 0 decides; damaged ones are skipped with a warning)
        resume_from = ckpt.select_resume(cfg.run_dir, cfg.checkpoint, lambda m: log.info(f"warning: {m}"))
    except ckpt.CheckpointError as e:
        print(f"ptrain pretrain: {e}", file=sys.stderr, flush=True)
        return 2
    if rank == 0:
        dump_config(cfg, Path(cfg.run_dir) / "config.yaml")

    # Same seed on every rank: identical init (DeepSpeed also broadcasts rank 0's weights).
    torch.manual_seed(cfg.seed)
    try:
        model = build_model(cfg.model)
    except (ValueError, FileNotFoundError) as e:  # a backbone that does not fit the config (named by the message)
        print(f"ptrain pretrain: model: {e}", file=sys.stderr, flush=True)
        return 2
    frozen = freeze_clip_layers(model, cfg.optim.freeze_layer_num)
    engine = Engine(model, build_optimizer(model, cfg.optim), cfg.engine)
    n_params = sum(p.numel() for p in model.parameters())
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log.info(describe(engine.config, world, n_params, n_train, cfg.model.grad_checkpointing,
                      local_negatives=model.spec.tight))
    log.info("deepspeed config: " + json.dumps(engine.config, sort_keys=True))
    if cfg.engine.compile:
        log.info(engine.compile_note)
    if frozen:
        log.info(f"frozen (optim.freeze_layer_num={cfg.optim.freeze_layer_num}): {len(frozen)} CLIP tensors")

    # Resume: engine state (any world size) + the data cursor (optimizer step, samples consumed).
    start, saved_batch = Position(), None
    if resume_from is not None:
        try:
            state, how = ckpt.load(engine, resume_from, cfg.engine.zero_stage, cfg.engine.precision)
        except ckpt.CheckpointError as e:
            print(f"ptrain pretrain: {e}", file=sys.stderr, flush=True)
            return 2
        apply_group_hparams(engine.optimizer, model, cfg.optim)  # this config's lr / coef_lr / weight decay
        start = Position(int(state["step"]), int(state["samples_seen"]))
        saved_batch = int(state["data"]["global_batch"])
        log.info(f"resumed from {resume_from} at step {start.step} ({start.samples_seen} samples seen) via {how}")
    if start.step >= cfg.max_steps:
        log.info(f"nothing to do: the run is at step {start.step} of max_steps={cfg.max_steps}")
        log.close()
        return 0
    loader = build_train_loader(
        cfg.data, num_frames=cfg.model.num_frames, frame_size=cfg.model.frame_size, max_words=cfg.model.max_words,
        micro_batch_size=cfg.engine.micro_batch_size, rank=rank, world_size=world, seed=cfg.seed,
        start_step=start.step, grad_accum=cfg.engine.grad_accum, start_sample=start.samples_seen,
        tokenizer=cfg.model.tokenizer or None, discovered=discovered,
    )
    log.info(f"data: {loader.num_shards} shards, epoch of {loader.epoch_size} samples, global batch "
             f"{loader.global_batch_size}, starting at step {start.step}")
    if saved_batch is not None and saved_batch != loader.global_batch_size:
        log.info(f"the global batch changed from {saved_batch} to {loader.global_batch_size}: the data goes on from "
                 f"sample {start.samples_seen} (none read twice or skipped); the LR schedule goes on by step")
    log.step_done(start.step)
    log.forget_after(start.step)  # rows a crashed attempt logged after its last checkpoint

    def save(pos: Position) -> Path:
        state = {"step": pos.step, "samples_seen": pos.samples_seen, "world_size": world, "seed": cfg.seed,
                 "zero_stage": cfg.engine.zero_stage, "precision": cfg.engine.precision,
                 "data": {"start_step": pos.step, "global_batch": loader.global_batch_size}}
        path = ckpt.save(engine, cfg.model, cfg.run_dir, state, cfg.checkpoint)
        if on_checkpoint is not None:
            on_checkpoint(path, pos)
        return path

    def evaluate(step: int) -> dict:
        from ptrain.evaluate import evaluate_during_training

        return evaluate_during_training(engine.module, cfg.data, cfg.model, cfg.eval)

    cadence = Cadence(cfg.max_steps, cfg.log.every_steps, cfg.checkpoint.every_steps, cfg.eval.every_steps,
                      cfg.engine.grad_accum, cfg.engine.precision, cfg.model.max_logit_scale)
    # a tight head scores every sample against the whole local batch: count those cross-encoder pairs
    pairs = cfg.engine.micro_batch_size if model.spec.tight else 1
    # token masking: kept patches drawn from (seed, sample position), so a resume draws the same masks
    masker = build_token_masker(cfg.model, model.num_patches, seed=cfg.seed, max_steps=cfg.max_steps,
                                unmasked_tail_steps=cfg.optim.unmasked_tail_steps)
    flops = {r: model.flops_per_sample(tight_pairs=pairs, mask_ratio=r) for r in {0.0, cfg.model.mask_ratio}}
    if masker is not None:
        log.info(f"token masking: ratio {masker.ratio} ({masker.mode}), {masker.kept} of {masker.patches} patch "
                 f"tokens per frame kept (+ the class token)" + (
                     f"; steps {masker.unmasked_from + 1}-{cfg.max_steps} train on every token "
                     f"(optim.unmasked_tail_steps={cfg.optim.unmasked_tail_steps})" if masker.unmasked_from is not None
                     else ""))
    try:
        fit(engine, loader, build_loss(cfg.model), log, cadence, cfg.optim, start=start, save=save,
            evaluate=evaluate, peak=peak_flops(cfg.engine.peak_tflops, cfg.engine.precision), masker=masker,
            flops_per_sample=lambda step: flops[masker.ratio_at(step) if masker is not None else 0.0])
        if loader.format_versions().get(1):
            log.info(f"read {loader.format_versions()[1]} sample(s) of shard format 1 (written by an older `ptrain "
                     "shard`; their ASR segments are read as `segments`)")
    except (RuntimeError, OSError) as e:  # TrainingFailed, a lost peer, a full or read-only run_dir
        if failure(e) is None:
            raise
        log.close()
        return report_failure(e, cfg.run_dir, ckpt.latest_intact(cfg.run_dir))
    log.close()
    return 0
