"""Root configs of ``ptrain pretrain`` and ``ptrain eval`` and their training sections (stdlib only).

    from ptrain.config import load_config
    from ptrain.configs import PretrainConfig
    cfg = load_config(PretrainConfig, "configs/demo/pretrain_tiny.yaml", ["engine.zero_stage=3"])

Sections: ``model`` (:class:`ptrain.model.config.ModelConfig`), ``data``
(:class:`ptrain.data.config.DataConfig`), ``optim``, ``engine`` (DeepSpeed), ``checkpoint``, ``log``,
``eval`` (retrieval on held-out shards during training) and ``ray`` (Ray Train instead of a launcher). Each builder gets its own section only;
``ptrain/engine.py`` derives the DeepSpeed JSON from ``engine`` (+ the clip setting of ``optim``).
Importing this module never imports torch.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal, Optional

from ptrain.config import Problems, opt, section
from ptrain.data.config import DataConfig
from ptrain.model.config import ModelConfig

# A batch whose uint8 frames alone exceed this can never run: its float copy is 4x that, beyond any accelerator or
# host of today, so such a batch size is a typo; refused before anything is allocated.
MAX_BATCH_FRAME_BYTES = 64 << 30


def batch_problem(key: str, batch: int, num_frames: int, frame_size: int) -> str | None:
    """A sentence when ``batch`` clips of ``num_frames`` x ``frame_size``^2 RGB uint8 frames exceed the bound."""
    clip = num_frames * 3 * frame_size * frame_size
    if batch * clip <= MAX_BATCH_FRAME_BYTES:
        return None
    return (f"{key}={batch} clips of {num_frames} frames at {frame_size} px is {batch * clip / 2**30:.0f} GiB of uint8 "
            f"frames per batch (their float copy 4x that); at most {MAX_BATCH_FRAME_BYTES // clip} fit the "
            f"{MAX_BATCH_FRAME_BYTES >> 30} GiB bound. Use a realistic size (CLIP4Clip: 8-128 per device) and "
            "engine.grad_accum for a larger global batch")


@dataclass
class OptimConfig:
    """AdamW with CLIP4Clip's two learning rates, a warmup + cosine schedule and layer freezing."""

    lr: float = opt(1e-4, "peak learning rate of the new modules (temporal head, TAB)")
    coef_lr: float = opt(
        1e-2,
        "CLIP backbone (and temperature) learning rate = lr * coef_lr. CLIP4Clip's 1e-3 was nearly frozen by its fp16 "
        "weights; with fp32 master weights 1e-3 really trains CLIP, so pick it on purpose",
    )
    weight_decay: float = opt(0.2, "decoupled weight decay; never applied to norms, biases, embeddings, the temperature")
    betas: list[float] = opt([0.9, 0.98], "Adam beta1, beta2 (CLIP: 0.9, 0.98)")
    eps: float = opt(1e-6, "Adam epsilon")
    warmup_steps: int = opt(-1, "linear warmup steps; -1 = warmup_fraction * max_steps")
    warmup_fraction: float = opt(0.1, "warmup length as a fraction of max_steps when warmup_steps is -1 (CLIP4Clip: 0.1)")
    schedule: Literal["cosine", "constant"] = opt("cosine", "after warmup: cosine decay to min_lr_ratio, or constant")
    min_lr_ratio: float = opt(0.0, "the cosine ends at lr * min_lr_ratio")
    freeze_layer_num: int = opt(
        -1,
        "-1: train all of CLIP; k >= 0: freeze CLIP's embeddings and pre-norm and its first k layers per tower "
        "(CLIP4Clip semantics: 0 freezes only the embeddings)",
    )
    unmasked_tail_steps: int = opt(
        0, "with model.mask_ratio > 0: train the last N steps on every token (FLIP's unmasked tail); 0 = masked to the end")

    def __post_init__(self):
        p = Problems()
        p.check(self.lr > 0, "lr", f"lr must be positive, got {self.lr}")
        p.check(self.coef_lr >= 0, "coef_lr", f"coef_lr must be >= 0, got {self.coef_lr}")
        p.check(len(self.betas) == 2 and all(0.0 <= b < 1.0 for b in self.betas), "betas",
                f"betas must be two numbers in [0, 1), got {self.betas}")
        p.check(self.weight_decay >= 0, "weight_decay", f"weight_decay must be >= 0, got {self.weight_decay}")
        p.check(self.eps > 0, "eps", f"eps must be > 0, got {self.eps}")
        p.check(0.0 <= self.warmup_fraction < 1.0, "warmup_fraction",
                f"warmup_fraction must lie in [0, 1), got {self.warmup_fraction}")
        p.check(0.0 <= self.min_lr_ratio <= 1.0, "min_lr_ratio", f"min_lr_ratio must lie in [0, 1], got {self.min_lr_ratio}")
        p.check(self.freeze_layer_num >= -1, "freeze_layer_num",
                f"freeze_layer_num must be -1 (train everything) or >= 0, got {self.freeze_layer_num}")
        p.check(self.unmasked_tail_steps >= 0, "unmasked_tail_steps",
                f"unmasked_tail_steps must be >= 0, got {self.unmasked_tail_steps}")
        p.raise_any()


@dataclass
class EngineConfig:
    """DeepSpeed: ZeRO stage, precision, batch geometry, clipping (turned into the DeepSpeed JSON)."""

    zero_stage: int = opt(2, "ZeRO stage 0-3 (1-2 are right for ViT-B/L CLIP: 3 moves 1.5x the bytes for nothing)")
    precision: Literal["bf16", "fp16", "fp32"] = opt("bf16", "compute precision; bf16/fp16 keep fp32 master weights")
    micro_batch_size: int = opt(32, "clips per rank per forward pass (also this rank's share of the negatives)")
    grad_accum: int = opt(1, "micro-batches per optimizer step (does NOT add contrastive negatives)")
    grad_clip: float = opt(1.0, "global gradient-norm clip applied by DeepSpeed inside step(); 0 = off")
    grad_accum_dtype: Literal["auto", "fp32", "bf16", "fp16"] = opt(
        "auto", "gradient accumulation dtype; auto = fp32 for bf16 ZeRO-1 (DeepSpeed's BF16_Optimizer), else DeepSpeed's default"
    )
    communication_dtype: Literal["auto", "fp32", "bf16", "fp16"] = opt(
        "auto", "gradient all-reduce dtype; auto = fp32 on CPU (gloo has no bf16 reduce), else the compute dtype"
    )
    reduce_bucket_size: int = opt(200_000_000, "ZeRO reduce / all-gather bucket size in elements")
    overlap_comm: bool = opt(False, "overlap gradient reduction with backward (uses ~4.5x the bucket size in memory)")
    peak_tflops: float = opt(
        0.0, "peak dense TFLOP/s of one device in the compute dtype, for MFU; 0 = detect on known GPUs (CPU: set it)"
    )
    dist_timeout_s: int = opt(1800, "collective timeout in seconds: how long a rank waits for a lost peer before failing")
    compile: bool = opt(
        False, "run the model's forward and backward under torch.compile (DeepSpeed's engine.compile); where the "
        "backend cannot compile (no C compiler, no Triton) training warns and runs eagerly")

    def __post_init__(self):
        p = Problems()
        p.check(self.zero_stage in (0, 1, 2, 3), "zero_stage", f"zero_stage must be 0, 1, 2 or 3, got {self.zero_stage}")
        p.check(self.micro_batch_size >= 1, "micro_batch_size", f"micro_batch_size must be >= 1, got {self.micro_batch_size}")
        p.check(self.grad_accum >= 1, "grad_accum", f"grad_accum must be >= 1, got {self.grad_accum}")
        p.check(self.grad_clip >= 0, "grad_clip", f"grad_clip must be >= 0 (0 = off), got {self.grad_clip}")
        p.check(self.peak_tflops >= 0, "peak_tflops", f"peak_tflops must be >= 0 (0 = detect), got {self.peak_tflops}")
        p.check(self.reduce_bucket_size >= 1, "reduce_bucket_size",
                f"reduce_bucket_size must be >= 1, got {self.reduce_bucket_size}")
        p.check(self.dist_timeout_s >= 1, "dist_timeout_s", f"dist_timeout_s must be >= 1, got {self.dist_timeout_s}")
        p.check(not (self.compile and self.zero_stage == 3), "compile",
                "compile=true does not work with zero_stage=3 (DeepSpeed 0.19.8 gathers ZeRO-3 parameters in module "
                "hooks that break torch.compile's graphs); use zero_stage 1 or 2, or compile=false",
                also=("zero_stage",))
        p.raise_any()


@dataclass
class CheckpointConfig:
    """RUN/checkpoints/step_NNNNNNNN/: DeepSpeed state + consolidated state + export/ + COMPLETE."""

    every_steps: int = opt(1000, "save every N optimizer steps (and always at the end); 0 = only at the end")
    keep_last: int = opt(3, "keep the newest K complete checkpoints, delete older ones")
    resume: str = opt(
        "auto", "auto: continue from the newest COMPLETE checkpoint of run_dir if any; none: start fresh (refused "
        "when run_dir already holds checkpoints); or a step_N / run directory to start from"
    )
    consolidated_optimizer: bool = opt(
        True, "also save full (unpartitioned) fp32 weights + Adam moments, so a run can resume on a different world size"
    )
    if_all_damaged: Literal["error", "start_over"] = opt(
        "error", "resume=auto when every COMPLETE checkpoint fails verification: error (exit 2, each problem named) "
        "or start_over (step 0; the damaged ones are moved to checkpoints/damaged/)"
    )

    def __post_init__(self):
        p = Problems()
        p.check(self.every_steps >= 0, "every_steps", f"every_steps must be >= 0 (0 = only at the end), got {self.every_steps}")
        p.check(self.keep_last >= 1, "keep_last", f"keep_last must be >= 1, got {self.keep_last}")
        p.check(bool(self.resume), "resume", "resume must be 'auto', 'none' or a checkpoint directory, got ''")
        p.raise_any()


@dataclass
class LogConfig:
    """Rank-0 console (progress bar), RUN/metrics.jsonl and TensorBoard under RUN/tb/."""

    every_steps: int = opt(10, "write metrics every N optimizer steps")
    tensorboard: bool = opt(True, "write TensorBoard events under RUN/tb/")
    progress_bar: bool = opt(True, "show a progress bar on an interactive terminal (plain lines otherwise)")

    def __post_init__(self):
        p = Problems()
        p.check(self.every_steps >= 1, "every_steps", f"every_steps must be >= 1, got {self.every_steps}")
        p.raise_any()


@dataclass
class EvalDuringTrainConfig:
    """Retrieval on data.eval_sources every N steps (R@1/5/10, MdR, MnR in metrics.jsonl)."""

    every_steps: int = opt(0, "evaluate every N optimizer steps and at the end; 0 = never")
    batch_size: int = opt(32, "clips per rank per eval batch")
    max_samples: int = opt(0, "evaluate on the first N held-out samples only (0 = all)")

    def __post_init__(self):
        p = Problems()
        p.check(self.every_steps >= 0, "every_steps", f"every_steps must be >= 0 (0 = never), got {self.every_steps}")
        p.check(self.batch_size >= 1, "batch_size", f"batch_size must be >= 1, got {self.batch_size}")
        p.check(self.max_samples >= 0, "max_samples", f"max_samples must be >= 0 (0 = all), got {self.max_samples}")
        p.raise_any()


@dataclass
class RayTrainConfig:
    """Ray Train (``ray.enabled=true``): the same recipe in TorchTrainer workers, one rank each (docs/ray.md)."""

    enabled: bool = opt(False, "run the recipe in Ray Train workers (TorchTrainer; the process group comes from Ray) "
                               "instead of one process per launcher rank")
    address: Optional[str] = opt(
        None, "unset: the cluster of the Ray job this runs in (`ptrain submit`, `ray job submit`), else a local Ray "
              "on loopback; 'auto' joins the cluster started on this machine, ray://HEAD:10001 a remote one")
    num_workers: int = opt(2, "training workers = ranks (one GPU each with use_gpu)")
    use_gpu: bool = opt(False, "give every worker gpus_per_worker GPUs (NCCL); false: CPU workers over gloo")
    gpus_per_worker: float = opt(1.0, "GPUs reserved per worker when use_gpu is true")
    cpus_per_worker: float = opt(1.0, "CPUs reserved per worker (also its OMP_NUM_THREADS; data loader workers "
                                      "run inside this reservation)")
    max_failures: int = opt(0, "restarts of the worker group after a lost worker or node, each from the newest "
                               "complete checkpoint of run_dir (-1: unlimited, 0: none)")

    def __post_init__(self):
        p = Problems()
        p.check(self.num_workers >= 1, "num_workers", f"num_workers must be >= 1, got {self.num_workers}")
        p.check(self.cpus_per_worker > 0, "cpus_per_worker", f"cpus_per_worker must be positive, got {self.cpus_per_worker}")
        p.check(not self.use_gpu or self.gpus_per_worker > 0, "gpus_per_worker",
                f"gpus_per_worker must be positive when use_gpu is true, got {self.gpus_per_worker}", also=("use_gpu",))
        p.check(self.max_failures >= -1, "max_failures",
                f"max_failures must be -1 (unlimited), 0 (none) or a positive count, got {self.max_failures}")
        p.check(not self.address or self.address == "auto" or "://" in self.address or ":" in self.address,
                "address", f"address must be 'auto', ray://HEAD:10001 or HEAD:6379, got {self.address!r}")
        p.raise_any()


@dataclass
class PretrainConfig:
    """``ptrain pretrain``: contrastive post-pretraining on shards, one process per rank (DeepSpeed)."""

    run_dir: str = opt("runs/pretrain", "run directory: config.yaml, metrics.jsonl, tb/, checkpoints/")
    max_steps: int = opt(1000, "optimizer steps of the whole run (the LR schedule spans them)")
    seed: int = opt(0, "seed of the model init, the data order and the augmentations")
    model: ModelConfig = section(ModelConfig, "the video-text model")
    data: DataConfig = section(DataConfig, "training and held-out shards")
    optim: OptimConfig = section(OptimConfig, "optimizer and schedule")
    engine: EngineConfig = section(EngineConfig, "DeepSpeed engine")
    checkpoint: CheckpointConfig = section(CheckpointConfig, "checkpoints and resume")
    log: LogConfig = section(LogConfig, "logging")
    eval: EvalDuringTrainConfig = section(EvalDuringTrainConfig, "retrieval eval during training")
    ray: RayTrainConfig = section(RayTrainConfig, "Ray Train instead of a launcher (ray.enabled=true)")

    def __post_init__(self):
        p = Problems()
        p.check(self.max_steps >= 1, "max_steps", f"max_steps must be >= 1, got {self.max_steps}")
        p.check(bool(self.run_dir), "run_dir",
                "run_dir is required: the directory for checkpoints, logs and the resolved config")
        p.check(not (self.eval.every_steps and not self.data.eval_sources), "eval.every_steps",
                "eval.every_steps is set but data.eval_sources is empty; give held-out shards or set eval.every_steps=0",
                also=("data.eval_sources",))
        for key, batch in (("engine.micro_batch_size", self.engine.micro_batch_size),
                           ("eval.batch_size", self.eval.batch_size)):
            why = batch_problem(key, batch, self.model.num_frames, self.model.frame_size)
            p.check(why is None, key, why or "", also=("model.num_frames", "model.frame_size"))
        p.raise_any()


@dataclass
class FinetuneEvalConfig:
    """Model selection during fine-tuning: the validation split every N epochs, the test split once at the end."""

    every_epochs: int = opt(1, "evaluate data.eval_sources (the validation split) every N epochs and at the end; 0 = never")
    metric: str = opt("t2v_R1", "the metric that selects the best export (higher is better; MdR/MnR: lower)")
    select_on: Literal["val", "test"] = opt(
        "val", "val: select on the validation split (no split: the last epoch is kept, and the results say so); "
               "test: select on the test split, only when asked (the results then say so in words)")
    batch_size: int = opt(32, "videos per eval batch")
    protocol: Literal["auto", "single", "multi", "paragraph"] = opt("auto", "the benchmark protocol (see ptrain eval)")
    max_samples: int = opt(0, "evaluate the first N videos only (0 = all)")

    def __post_init__(self):
        p = Problems()
        p.check(self.every_epochs >= 0, "every_epochs", f"every_epochs must be >= 0 (0 = never), got {self.every_epochs}")
        p.check(bool(re.fullmatch(r"(t2v|v2t|v2t_strict)_(R\d+|MdR|MnR)", self.metric)), "metric",
                f"metric must be like t2v_R1, v2t_R5, t2v_MdR or v2t_strict_MnR, got {self.metric!r}")
        p.check(self.batch_size >= 1, "batch_size", f"batch_size must be >= 1, got {self.batch_size}")
        p.check(self.max_samples >= 0, "max_samples", f"max_samples must be >= 0, got {self.max_samples}")
        p.raise_any()


@dataclass
class FinetuneConfig:
    """``ptrain finetune``: a benchmark recipe from a pretraining export, an imported checkpoint or a CLIP."""

    init: str = opt("", "what the model starts from: an export dir, a run or step_N dir (its export; every tensor, "
                        "heads included), a `ptrain convert` export, or a CLIP (OpenAI .pt, HF dir or id, or a named "
                        "random size) with fresh heads initialised as CLIP4Clip does")
    benchmark: str = opt("", "the benchmark's name, for results and reports (msrvtt, msvd, lsmdc, ...)")
    run_dir: str = opt("runs/finetune", "run directory: config.yaml, metrics.jsonl, checkpoints/, best/, results/")
    epochs: int = opt(5, "epochs over data.sources (an epoch counts every (video, caption) pair with "
                         "data.caption_sampling=expand, every video otherwise)")
    seed: int = opt(0, "seed of the data order, the caption draws and the augmentations")
    test: list[str] = opt([], "test split shards, evaluated once at the end with the selected export")
    model: ModelConfig = section(ModelConfig, "the video-text model (architecture from init when it is an export)")
    data: DataConfig = section(DataConfig, "training shards (sources) and the validation split (eval_sources)")
    optim: OptimConfig = section(OptimConfig, "optimizer and schedule")
    engine: EngineConfig = section(EngineConfig, "DeepSpeed engine")
    checkpoint: CheckpointConfig = section(CheckpointConfig, "checkpoints and resume (every_steps 0 = every epoch)")
    log: LogConfig = section(LogConfig, "logging")
    eval: FinetuneEvalConfig = section(FinetuneEvalConfig, "model selection and the final test")
    ray: RayTrainConfig = section(RayTrainConfig, "Ray Train instead of a launcher (ray.enabled=true)")

    def __post_init__(self):
        p = Problems()
        p.check(bool(self.init), "init", "init is required: init=EXPORT_DIR (a pretraining or converted export) or "
                                         "init=CLIP (an OpenAI .pt, a HF dir or id, or ViT-B/32 for random weights)")
        p.check(bool(self.run_dir), "run_dir", "run_dir is required: the directory for checkpoints, logs and results")
        p.check(self.epochs >= 1, "epochs", f"epochs must be >= 1, got {self.epochs}")
        p.check(not (self.eval.select_on == "test" and not self.test), "eval.select_on",
                "eval.select_on=test needs test=[DIR] (the test split's shards)", also=("test",))
        p.raise_any()


@dataclass
class EvalConfig:
    """``ptrain eval``: embed held-out shards with an export and report retrieval metrics under a protocol."""

    export: str = opt("", "export dir (model.safetensors + config.json), a step_N checkpoint or a run dir (newest COMPLETE)")
    shards: list[str] = opt([], "held-out shard directories / patterns (every sample once)")
    protocol: Literal["auto", "single", "multi", "paragraph"] = opt(
        "auto", "single caption (MSR-VTT 1k-A, LSMDC), multi-caption (MSVD, VATEX, MSR-VTT full), paragraph "
                "(ActivityNet, DiDeMo; R@50 too); auto: from the shards' metadata")
    device: Literal["auto", "cpu", "cuda"] = opt("auto", "auto: the GPU of this rank when there is one")
    dtype: Literal["fp32", "bf16"] = opt("fp32", "compute dtype of the encoders (bf16: faster on GPUs)")
    batch_size: int = opt(32, "videos per eval batch (captions are encoded in batches of the same size)")
    num_workers: int = opt(0, "DataLoader worker processes decoding the shards")
    frame_sampling: Literal["uniform", "segment"] = opt(
        "uniform", "shards storing more frames than the export takes: uniform subset or the middle of T segments")
    max_samples: int = opt(0, "evaluate the first N videos only (0 = all)")
    caption_filter: str = opt("", "regex: only captions matching it are text queries (the gallery keeps every clip)")
    dsl: bool = opt(False, "also report dual-softmax (DSL) re-weighted numbers, side by side with the raw ones")
    qb_norm: bool = opt(False, "also report QB-Norm (querybank normalisation) text->video numbers beside the raw ones")
    qb_norm_bank: list[str] = opt([], "shards whose captions form the QB-Norm query bank (training captions, never "
                                      "the test queries)")
    allow_resize: bool = opt(False, "evaluate shards of another frame size or count than the export (resized and "
                                    "padded); refused by default, naming both")
    out: str = opt("", "results.json path (results.md is written beside it) or a directory for both; '' = print only")

    def __post_init__(self):
        p = Problems()
        p.check(bool(self.export), "export", "export is required: export=RUN/checkpoints/step_N/export (or a run dir)")
        p.check(bool(self.shards), "shards", "shards is required: shards=[DIR] with held-out shards written by `ptrain shard`")
        p.check(self.batch_size >= 1, "batch_size", f"batch_size must be >= 1, got {self.batch_size}")
        p.check(self.num_workers >= 0, "num_workers", f"num_workers must be >= 0, got {self.num_workers}")
        p.check(self.max_samples >= 0, "max_samples", f"max_samples must be >= 0 (0 = all), got {self.max_samples}")
        p.check(not self.qb_norm or bool(self.qb_norm_bank), "qb_norm_bank",
                "qb_norm needs qb_norm_bank=[DIR]: shards of other captions (e.g. the training split) as the query bank",
                also=("qb_norm",))
        p.raise_any()
