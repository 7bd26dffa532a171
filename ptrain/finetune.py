"""``ptrain finetune``: a benchmark recipe -- init from an export or a CLIP, train, select on validation, test once.

    launch/finetune.sh configs/finetune/msrvtt_seqTransf.yaml init=runs/howto100m_vitb32_seqTransf
    ptrain finetune configs/finetune/msvd_meanP.yaml init=ViT-B-32.pt data.sources=[shards/msvd_train]
    deepspeed --num_gpus 8 launch/finetune.sh CONFIG init=EXPORT          # every launch form of pretraining works
    ptrain submit finetune CONFIG init=EXPORT ray.num_workers=4 ray.use_gpu=true   # Ray Train (docs/ray.md)

The same loop, engine and launch forms as ``ptrain pretrain`` (``ptrain.loop.fit``), with what makes it a
fine-tune: every tensor of ``init`` (heads included) or fresh CLIP4Clip-initialised heads on a CLIP; a fresh
optimizer, schedule and data position; ``epochs`` over the training split (``data.caption_sampling``: expand or
random captions per epoch); the validation split (``data.eval_sources``) every ``eval.every_epochs`` keeping the
best export (``RUN/best/export``) by ``eval.metric``, or the last epoch when there is no validation split; the test
split (``test``) once at the end, written to ``RUN/results/test.json`` and ``.md`` with how the export was chosen.
An interrupted fine-tune resumes exactly, as pretraining does (the best-so-far travels in the checkpoint).
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import sys
from pathlib import Path
from typing import Any, Callable

import torch

from ptrain import checkpoint as ckpt
from ptrain import distributed as du
from ptrain.config import dump_config
from ptrain.configs import FinetuneConfig
from ptrain.logging import RunLogger
from ptrain.loop import Cadence, Position, failure, fit, peak_flops, report_failure, run_recipe
from ptrain.model.config import ModelConfig

# ModelConfig fields a fine-tune may set on top of an export's architecture (how it trains, not what it is)
TRAINING_FIELDS = ("num_frames", "max_words", "local_loss", "gather_with_grad", "reverse_negatives",
                   "grad_checkpointing", "tight_dropout", "max_logit_scale", "mask_ratio", "mask_mode")


def init_model(init: str, cfg: ModelConfig):
    """The model a fine-tune starts from, and a description of ``init`` for the results.

    An export (a directory with a ptrain ``config.json``, or a run / step_N directory): every tensor, its
    architecture; ``cfg.head`` must name the same head. Anything else is a CLIP for ``ModelConfig.clip``, with fresh
    heads initialised from CLIP's text layers as CLIP4Clip does."""
    from ptrain.model import build_model
    from ptrain.model.api import load

    try:
        export = ckpt.find_export(init)
    except FileNotFoundError:
        export = None
    if export is None:
        model = build_model(dataclasses.replace(cfg, clip=init))
        return model, {"init": init, "kind": "clip", "heads": "fresh (from CLIP's text layers, as CLIP4Clip)"}
    model = load(export)
    if model.cfg.head != cfg.head:
        raise ValueError(f"init={init}: the export has head {model.cfg.head} but the config asks for model.head="
                         f"{cfg.head}; set model.head={model.cfg.head} (or pick an export of a {cfg.head} run)")
    if (model.cfg.head == "TAB") and model.cfg.tab_global != cfg.tab_global:
        raise ValueError(f"init={init}: the export's TAB global branch is {model.cfg.tab_global} but the config asks "
                         f"for model.tab_global={cfg.tab_global}; set it to {model.cfg.tab_global}")
    model.cfg = dataclasses.replace(model.cfg, **{f: getattr(cfg, f) for f in TRAINING_FIELDS})
    if model.cfg.grad_checkpointing:
        model.clip.gradient_checkpointing_enable()
    return model.train(), {"init": str(export), "kind": "export", "heads": f"{model.cfg.head} from the export"}


def preflight(cfg: FinetuneConfig):
    """Every check the config allows before anything is built (``launch/launcher.sh`` runs it before starting any
    rank, each rank again): the training, validation and test shards exist, ``init`` is there, run_dir is writable.
    Returns the discovered training shards; raises ValueError / FileNotFoundError / FileExistsError naming the fix."""
    from ptrain.data import discover_sources
    from ptrain.data.shards import discover

    discovered = discover_sources(cfg.data)
    for key, paths in (("data.eval_sources", [s["path"] for s in cfg.data.eval_sources]), ("test", list(cfg.test))):
        if paths:
            try:
                discover(paths, stats={})
            except ValueError as e:
                raise ValueError(f"{key}: {e}") from None
    init = Path(cfg.init)
    if (init.is_absolute() or str(cfg.init).startswith(".")) and not init.exists():
        raise FileNotFoundError(f"init={cfg.init}: no such export, run or CLIP file; pass an export directory, a run "
                                "directory, an OpenAI .pt, a HF CLIP directory or id, or a named size (ViT-B/32)")
    ckpt.check_run_dir(cfg.run_dir)
    ckpt.resolve_resume(cfg.run_dir, cfg.checkpoint)
    return discovered


def run(cfg: FinetuneConfig) -> int:
    """``ptrain finetune``: a rank running :func:`train`, or with ``ray.enabled`` the driver of Ray Train workers."""
    return run_recipe(cfg, "finetune", train)


def train(cfg: FinetuneConfig, on_checkpoint: Callable[[Path, Position], None] | None = None) -> int:
    """The recipe, on every rank; ``on_checkpoint(path, position)`` runs on every rank after each checkpoint is
    complete on all of them (Ray Train reports it)."""
    from ptrain.data import build_train_loader
    from ptrain.engine import Engine, describe
    from ptrain.loss import build_loss
    from ptrain.masking import build_token_masker
    from ptrain.model.freeze import freeze_clip_layers
    from ptrain.optim import apply_group_hparams, build_optimizer

    run_dir = Path(cfg.run_dir)
    # Inputs first: a bad shard path or a run directory in the way fail before anything is built or written.
    try:
        discovered = preflight(cfg)
        du.init(cfg.engine.dist_timeout_s)
        # the checkpoint to resume, verified (rank 0 decides; damaged ones are skipped with a warning)
        warnings: list[str] = []
        resume_from = ckpt.select_resume(run_dir, cfg.checkpoint, warnings.append)
    except (FileNotFoundError, FileExistsError, ValueError, ckpt.CheckpointError) as e:  # PortInUse: a ValueError
        print(f"ptrain finetune: {e}", file=sys.stderr, flush=True)
        return 2
    rank, world = du.rank(), du.world_size()

    torch.manual_seed(cfg.seed)
    try:
        model, init_info = init_model(cfg.init, cfg.model)
    except (FileNotFoundError, ValueError) as e:
        print(f"ptrain finetune: {e}", file=sys.stderr, flush=True)
        return 2
    model_cfg = model.cfg
    frozen = freeze_clip_layers(model, cfg.optim.freeze_layer_num)
    engine = Engine(model, build_optimizer(model, cfg.optim), cfg.engine)

    # Resume an interrupted fine-tune exactly (its checkpoint carries the best-so-far); otherwise a fresh start.
    start, best, resumed = Position(), {}, ""
    if resume_from is not None:
        try:
            state, how = ckpt.load(engine, resume_from, cfg.engine.zero_stage, cfg.engine.precision)
        except ckpt.CheckpointError as e:
            print(f"ptrain finetune: {e}", file=sys.stderr, flush=True)
            return 2
        apply_group_hparams(engine.optimizer, model, cfg.optim)
        start, best = Position(int(state["step"]), int(state["samples_seen"])), dict(state.get("best") or {})
        resumed = f"resumed from {resume_from} at step {start.step} via {how}"
    tokenizer = model.tokenizer_path or model_cfg.tokenizer or None
    loader = build_train_loader(
        cfg.data, num_frames=model_cfg.num_frames, frame_size=model_cfg.frame_size, max_words=model_cfg.max_words,
        micro_batch_size=cfg.engine.micro_batch_size, rank=rank, world_size=world, seed=cfg.seed,
        grad_accum=cfg.engine.grad_accum, start_step=start.step, start_sample=start.samples_seen,
        tokenizer=tokenizer, discovered=discovered)
    steps_per_epoch = math.ceil(loader.epoch_size / loader.global_batch_size)
    max_steps = cfg.epochs * steps_per_epoch

    log = RunLogger(run_dir, cfg.log, enabled=rank == 0, total_steps=max_steps)
    if rank == 0:
        dump_config(cfg, run_dir / "config.yaml")
    log.info(f"fine-tune from {init_info['init']} ({init_info['heads']}); {cfg.epochs} epochs of {loader.epoch_size} "
             f"samples ({cfg.data.caption_sampling} captions) = {max_steps} steps of {loader.global_batch_size}")
    log.info(describe(engine.config, world, sum(p.numel() for p in model.parameters()),
                      sum(p.numel() for p in model.parameters() if p.requires_grad), model_cfg.grad_checkpointing,
                      local_negatives=model.spec.tight))
    if frozen:
        log.info(f"frozen (optim.freeze_layer_num={cfg.optim.freeze_layer_num}): {len(frozen)} CLIP tensors")
    for line in warnings:
        log.info(f"warning: {line}")
    if resumed:
        log.info(resumed)
    log.step_done(start.step)
    log.forget_after(start.step)

    selection = _Selection(cfg, run_dir, engine, model_cfg, best, log)

    def save(pos: Position) -> Path:
        state = {"step": pos.step, "samples_seen": pos.samples_seen, "world_size": world, "seed": cfg.seed,
                 "zero_stage": cfg.engine.zero_stage, "precision": cfg.engine.precision, "best": selection.best,
                 "data": {"start_step": pos.step, "global_batch": loader.global_batch_size}}
        path = ckpt.save(engine, model_cfg, run_dir, state, cfg.checkpoint)
        if on_checkpoint is not None:
            on_checkpoint(path, pos)
        return path

    every_epochs = cfg.eval.every_epochs if selection.split else 0
    cadence = Cadence(max_steps, cfg.log.every_steps, cfg.checkpoint.every_steps or steps_per_epoch,
                      every_epochs * steps_per_epoch, cfg.engine.grad_accum, cfg.engine.precision,
                      model_cfg.max_logit_scale)
    pairs = cfg.engine.micro_batch_size if model.spec.tight else 1
    # token masking as in pretraining (off unless the fine-tune config sets model.mask_ratio; an export's is not inherited)
    masker = build_token_masker(model_cfg, model.num_patches, seed=cfg.seed, max_steps=max_steps,
                                unmasked_tail_steps=cfg.optim.unmasked_tail_steps)
    flops = {r: model.flops_per_sample(tight_pairs=pairs, mask_ratio=r) for r in {0.0, model_cfg.mask_ratio}}
    if masker is not None:
        log.info(f"token masking: ratio {masker.ratio} ({masker.mode}), {masker.kept} of {masker.patches} patch "
                 "tokens per frame kept (+ the class token)")
    try:
        if start.step < max_steps:
            fit(engine, loader, build_loss(model_cfg), log, cadence, cfg.optim, start=start, save=save,
                evaluate=lambda step: selection.evaluate(step, step / steps_per_epoch), masker=masker,
                flops_per_sample=lambda step: flops[masker.ratio_at(step) if masker is not None else 0.0],
                peak=peak_flops(cfg.engine.peak_tflops, cfg.engine.precision))
        if not selection.split:  # no validation split: the last epoch is the export
            selection.keep_last(max_steps)
        if cfg.test:
            selection.test(cfg.test, tokenizer, init_info)
    except (RuntimeError, OSError) as e:  # TrainingFailed, a lost peer, a full or read-only run_dir
        if failure(e) is None:
            raise
        log.close()
        return report_failure(e, run_dir, ckpt.latest_intact(run_dir))
    log.close()
    return 0


class _Selection:
    """Which export a fine-tune keeps: the best on the selection split by ``eval.metric`` (or the last epoch)."""

    def __init__(self, cfg: FinetuneConfig, run_dir: Path, engine, model_cfg: ModelConfig, best: dict, log):
        self.cfg, self.run_dir, self.engine, self.model_cfg, self.best, self.log = cfg, run_dir, engine, model_cfg, best, log
        self.on = cfg.eval.select_on
        self.split = list(cfg.test) if self.on == "test" else [s["path"] for s in cfg.data.eval_sources]
        metric = cfg.eval.metric
        self.lower_is_better = metric.endswith(("MdR", "MnR"))

    @property
    def export_dir(self) -> Path:
        return self.run_dir / "best" / "export"

    def _better(self, value: float) -> bool:
        if "value" not in self.best:
            return True
        return value < self.best["value"] if self.lower_is_better else value > self.best["value"]

    def evaluate(self, step: int, epoch: float) -> dict[str, float]:
        from ptrain.evaluate import embed_split

        metrics = embed_split(self.engine.module, self.split, self.model_cfg, self.cfg.eval, self.engine.module.tokenizer_path)
        value = float(metrics[self.cfg.eval.metric])
        if self._better(value):
            self._export(step)
            self.best = {"step": step, "epoch": round(epoch, 3), "metric": self.cfg.eval.metric, "value": value,
                         "split": self.on, "metrics": metrics}
            self.log.info(f"new best {self.cfg.eval.metric} {value:.2f} at epoch {epoch:.2f}: {self.export_dir}")
        return {**metrics, "epoch": epoch, "best_" + self.cfg.eval.metric: float(self.best["value"])}

    def _export(self, step: int) -> None:
        weights, _ = self.engine.gather_full_state()  # a collective: every rank
        if du.is_main():
            tmp = self.export_dir.with_name("export.tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            info = {**ckpt.card_info(self.run_dir, {"step": step}), "benchmark": self.cfg.benchmark,
                    "selected": f"step {step} ({'best ' + self.cfg.eval.metric if self.split else 'the last epoch'})"}
            ckpt.export_weights(self.engine.module, self.model_cfg, weights, tmp, info)
            (tmp / "selection.json").write_text(json.dumps({"step": step}))
            shutil.rmtree(self.export_dir, ignore_errors=True)
            tmp.rename(self.export_dir)
        du.barrier()

    def keep_last(self, step: int) -> None:
        if self.best.get("step") != step:
            self._export(step)
            self.best = {"step": step, "split": None, "metric": None,
                         "why": "no validation split: the last epoch is kept"}

    def test(self, shards: list[str], tokenizer: str | None, init_info: dict[str, Any]) -> None:
        from ptrain.evaluate import markdown, retrieval_on_export, write_results

        results = retrieval_on_export(self.export_dir, shards, self.cfg.eval)
        if self.on == "test":
            words = ("the export was SELECTED ON THE TEST SPLIT (eval.select_on=test): these test numbers are "
                     "optimistic and not comparable with papers that select on a validation split")
        elif self.best.get("split") == "val":
            words = (f"the export was selected on the validation split by {self.best['metric']} "
                     f"(epoch {self.best['epoch']}); the test split was evaluated once, at the end")
        else:
            words = "no validation split: the last epoch's export was kept; the test split was evaluated once"
        results.update(benchmark=self.cfg.benchmark, init=init_info["init"], init_kind=init_info["kind"],
                       selected_on=self.on if self.best.get("split") else "last_epoch", selection=words,
                       best=self.best, run_dir=str(self.run_dir))
        if du.is_main():
            write_results(str(self.run_dir / "results" / "test.json"), results)
            _card_with_results(self.export_dir, results)
            self.log.info(f"test ({results['protocol']}): t2v R@1 {results['all']['t2v_R1']:.1f} -- {words}")
            self.log.info(markdown(results))


def _card_with_results(export: Path, results: dict[str, Any]) -> None:
    """Rewrite the export's model card with its test results (the rest of the export is unchanged)."""
    from ptrain.model.hub import model_card, write_atomic

    config = json.loads((export / "config.json").read_text())
    section = config.pop("ptrain")
    info = {"benchmark": results.get("benchmark"), "init": results.get("init"), "selection": results.get("selection")}
    write_atomic(export, "README.md", model_card(section, config, info, results).encode("utf-8"))
