"""The one module that imports DeepSpeed: config derivation, parameter groups, the engine, state I/O.

    from ptrain import engine as E
    E.init_distributed(cfg.engine)                         # gloo on CPU, nccl on GPU (rank/world from env)
    E.freeze_clip_layers(model, cfg.optim.freeze_layer_num)
    eng, ds_config = E.build_engine(model, cfg.optim, cfg.engine)
    E.set_lr(eng, E.lr_multiplier(step, cfg.optim, cfg.max_steps))

The DeepSpeed JSON is derived from :class:`ptrain.schema.EngineConfig` by :func:`deepspeed_config`
and never written by hand. The optimizer is torch AdamW with four groups: {CLIP, new} x {decay,
no decay}; CLIP runs at ``lr * coef_lr``. ZeRO's partitioned fp32 master weights and Adam moments
can be gathered into full tensors (:func:`gather_full_state`) and scattered back into an engine of
any world size and ZeRO stage (:func:`load_full_state`): that is how a checkpoint saved on N ranks
resumes on M ranks (DeepSpeed's own ZeRO files refuse a different data-parallel size).
"""

from __future__ import annotations

import math
import os
import re
import socket
from datetime import timedelta
from typing import Any

import deepspeed
import torch
from deepspeed.accelerator import get_accelerator
from deepspeed.utils import (
    safe_get_full_fp32_param,
    safe_get_full_optimizer_state,
    safe_set_full_fp32_param,
    safe_set_full_optimizer_state,
)
from torch import nn

from ptrain.schema import EngineConfig, OptimConfig

ADAM_MOMENTS = ("exp_avg", "exp_avg_sq")
# Names that never get weight decay besides 1-D tensors (norms, biases, class embedding, log-temperature).
_NO_DECAY_2D = re.compile(r"(token_embedding|position_embedding|position_embeddings)\.weight$")
# CLIP parameters that CLIP4Clip freezes whatever freeze_layer_num >= 0 is (HF names).
_CLIP_STEM = re.compile(r"^clip\.(vision_model\.embeddings|vision_model\.pre_layrnorm|text_model\.embeddings)\.")
_CLIP_LAYER = re.compile(r"^clip\.(vision_model|text_model)\.encoder\.layers\.(\d+)\.")
# Peak dense bf16/fp16 TFLOP/s of known accelerators (vendor datasheets, without sparsity).
_PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 70.0, "V100": 125.0}


# ----------------------------------------------------------------------------------------------
# process group


def on_cpu() -> bool:
    return get_accelerator().device_name() == "cpu"


def _free_loopback_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(cfg: EngineConfig) -> None:
    """Join the process group from RANK/WORLD_SIZE/MASTER_ADDR (set by the deepspeed launcher)."""
    if "RANK" not in os.environ:  # plain `ptrain pretrain` without a launcher: a world of one
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_SIZE="1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_loopback_port()))
    deepspeed.init_distributed(timeout=timedelta(seconds=cfg.dist_timeout_s), verbose=False)
    if not on_cpu():
        get_accelerator().set_device(int(os.environ.get("LOCAL_RANK", "0")))


def device() -> torch.device:
    return torch.device(get_accelerator().current_device_name())


def device_name() -> str:
    if on_cpu():
        return f"cpu ({os.cpu_count()} cores)"
    return get_accelerator().get_device_name() or get_accelerator().device_name()


def peak_flops(cfg: EngineConfig) -> float | None:
    """Peak FLOP/s of one device for MFU: the config value, else a known GPU's datasheet number."""
    if cfg.peak_tflops > 0:
        return cfg.peak_tflops * 1e12
    if on_cpu() or cfg.precision == "fp32":
        return None
    name = device_name()
    for key, tflops in _PEAK_TFLOPS.items():
        if key in name:
            return tflops * 1e12
    return None


# ----------------------------------------------------------------------------------------------
# DeepSpeed config


def deepspeed_config(cfg: EngineConfig, world_size: int) -> dict[str, Any]:
    """The DeepSpeed JSON for ``cfg`` (validated again by DeepSpeed itself in ``initialize``)."""
    zero: dict[str, Any] = {"stage": cfg.zero_stage}
    if cfg.zero_stage > 0:
        zero.update(
            contiguous_gradients=True,
            overlap_comm=cfg.overlap_comm,
            reduce_bucket_size=cfg.reduce_bucket_size,
        )
    if cfg.zero_stage in (1, 2):
        zero["allgather_bucket_size"] = cfg.reduce_bucket_size
    if cfg.zero_stage == 3:
        # why: our exports gather the fp32 masters themselves; no 16-bit copy inside DeepSpeed's files
        zero.update(stage3_gather_16bit_weights_on_model_save=False, stage3_prefetch_bucket_size=cfg.reduce_bucket_size)
    ds: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
        "gradient_accumulation_steps": cfg.grad_accum,
        "train_batch_size": cfg.micro_batch_size * cfg.grad_accum * world_size,
        "gradient_clipping": float(cfg.grad_clip),
        "zero_optimization": zero,
        "bf16": {"enabled": cfg.precision == "bf16"},
        "fp16": {"enabled": cfg.precision == "fp16", "loss_scale": 0, "initial_scale_power": 16, "hysteresis": 2},
        # why: we pass a torch AdamW; DeepSpeed otherwise refuses untested client optimizers under ZeRO
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }
    comm = cfg.communication_dtype
    if comm == "auto" and on_cpu() and cfg.precision != "fp32":
        comm = "fp32"  # gloo cannot reduce bf16 (pytorch/pytorch#111131)
    if comm != "auto":
        ds["communication_data_type"] = comm
    accum = cfg.grad_accum_dtype
    if accum == "auto" and cfg.precision == "bf16" and cfg.zero_stage == 1:
        accum = "fp32"  # BF16_Optimizer: fp32 gradient accumulation, the safe choice for CLIP-sized models
    if accum != "auto":
        ds["data_types"] = {"grad_accum_dtype": accum}
    return ds


def describe(ds: dict[str, Any], world_size: int, n_params: int, n_trainable: int, grad_checkpointing: bool,
             local_negatives: bool = False) -> str:
    """The start-of-run summary: global batch and, separately, the contrastive negatives per step.
    ``local_negatives``: the loss scores the local micro-batch only (tightTransf's cross encoder)."""
    micro, accum = ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]
    negatives = micro - 1 if local_negatives else micro * world_size - 1
    how = "micro - 1: the cross encoder scores local pairs only" if local_negatives else "micro x ranks - 1"
    return (
        f"DeepSpeed ZeRO-{ds['zero_optimization']['stage']} "
        f"{'bf16' if ds['bf16']['enabled'] else 'fp16' if ds['fp16']['enabled'] else 'fp32'} on {world_size} rank(s) "
        f"({device_name()}); params {n_params / 1e6:.2f}M, trainable {n_trainable / 1e6:.2f}M\n"
        f"global batch {ds['train_batch_size']} = micro {micro} x ranks {world_size} x accumulation {accum}; "
        f"contrastive negatives per query {negatives} (= {how}; accumulation does not add negatives)\n"
        f"gradient clipping {ds['gradient_clipping'] or 'off'}; activation checkpointing "
        f"{'on (CLIP layers, model.grad_checkpointing)' if grad_checkpointing else 'off'}"
    )


# ----------------------------------------------------------------------------------------------
# freezing, parameter groups, schedule


def freeze_clip_layers(model: nn.Module, freeze_layer_num: int) -> list[str]:
    """CLIP4Clip freezing: k >= 0 freezes CLIP's embeddings, pre-norm and layers < k; -1 none. Returns names."""
    frozen = []
    if freeze_layer_num < 0:
        return frozen
    for name, p in model.named_parameters():
        layer = _CLIP_LAYER.match(name)
        if _CLIP_STEM.match(name) or (layer and int(layer.group(2)) < freeze_layer_num):
            p.requires_grad_(False)
            frozen.append(name)
    return frozen


def _no_decay(name: str, p: torch.Tensor) -> bool:
    return p.ndim < 2 or bool(_NO_DECAY_2D.search(name)) or "logit_scale" in name


def param_groups(model: nn.Module, cfg: OptimConfig) -> list[dict[str, Any]]:
    """{clip, new} x {decay, no_decay}; CLIP params and the temperature at lr * coef_lr."""
    names = model.param_group_names() if hasattr(model, "param_group_names") else None
    clip_names = set(names["clip"]) if names else None
    buckets: dict[tuple[str, bool], list[torch.Tensor]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        is_clip = name in clip_names if clip_names is not None else name.startswith(("clip.", "logit_scale."))
        buckets.setdefault(("clip" if is_clip else "new", _no_decay(name, p)), []).append(p)
    groups = []
    for (part, no_decay), params in sorted(buckets.items()):
        base_lr = cfg.lr * (cfg.coef_lr if part == "clip" else 1.0)
        groups.append(
            {
                "params": params,
                "name": f"{part}_{'no_decay' if no_decay else 'decay'}",
                "weight_decay": 0.0 if no_decay else cfg.weight_decay,
                "lr": base_lr,
                "base_lr": base_lr,
            }
        )
    return groups


def warmup_steps(cfg: OptimConfig, max_steps: int) -> int:
    return cfg.warmup_steps if cfg.warmup_steps >= 0 else int(round(cfg.warmup_fraction * max_steps))


def lr_multiplier(step: int, cfg: OptimConfig, max_steps: int) -> float:
    """LR factor for optimizer step ``step`` (0-based): linear warmup, then cosine (or constant)."""
    warm = warmup_steps(cfg, max_steps)
    if step < warm:
        return (step + 1) / warm
    if cfg.schedule == "constant" or max_steps <= warm:
        return 1.0
    progress = min(1.0, (step - warm) / max(1, max_steps - warm))
    return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def apply_group_hparams(engine, model: nn.Module, cfg: OptimConfig) -> None:
    """Re-apply this config's per-group base lr and weight decay (after loading a checkpoint).

    DeepSpeed's native load restores torch's param-group dicts as they were saved, so without this a
    resumed run would silently keep the old ``optim.lr`` / ``coef_lr`` / ``weight_decay``."""
    fresh = {g["name"]: g for g in param_groups(model, cfg)}
    for group in engine.optimizer.param_groups:
        ref = fresh.get(group.get("name"))
        if ref is not None:
            group["base_lr"], group["weight_decay"] = ref["base_lr"], ref["weight_decay"]


def clamp_parameter_(p: torch.Tensor, max_value: float) -> bool:
    """Clamp parameter ``p`` (of the engine's module) to ``max_value`` in the optimizer's fp32 master (and the
    module copy).

    A collective under ZeRO (every rank must call it). Used after each step for the log-temperature, as
    CLIP4Clip clamps it: a clamp inside the forward alone has zero gradient above the bound, so once an
    update crossed it the temperature could never come back down. Returns whether it clamped."""
    if not p.requires_grad:  # frozen (e.g. a tight head's unused temperature): nothing updates it
        return False
    if _zero_managed(p):
        full = safe_get_full_fp32_param(p)
        if full is None or float(full.max()) <= max_value:
            return False
        safe_set_full_fp32_param(p, full.clamp(max=max_value))
        if p.numel() == full.numel():  # ZeRO-1/2: the module holds the whole (low-precision) copy
            p.data.clamp_(max=max_value)
        return True
    if float(p.data.max()) <= max_value:
        return False
    p.data.clamp_(max=max_value)
    return True


def set_lr(engine, multiplier: float) -> dict[str, float]:
    """Set every group's lr to base_lr * multiplier; returns {group name: lr}."""
    out = {}
    for group in engine.optimizer.param_groups:
        group["lr"] = group["base_lr"] * multiplier
        out[group.get("name", str(len(out)))] = group["lr"]
    return out


# ----------------------------------------------------------------------------------------------
# the engine


def build_engine(model: nn.Module, optim_cfg: OptimConfig, cfg: EngineConfig):
    """Wrap ``model`` in a DeepSpeed engine with AdamW over :func:`param_groups`. Returns (engine, ds_config)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    ds = deepspeed_config(cfg, world)
    groups = param_groups(model, optim_cfg)
    if not groups:
        raise ValueError("no trainable parameters: optim.freeze_layer_num froze everything and the model has no head")
    optimizer = torch.optim.AdamW(groups, betas=tuple(optim_cfg.betas), eps=optim_cfg.eps, foreach=False)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds)
    return engine, ds


def grad_norm(engine) -> float | None:
    value = engine.get_global_grad_norm()
    if value is None:
        return None
    return float(value.item() if torch.is_tensor(value) else value)


# ----------------------------------------------------------------------------------------------
# state: DeepSpeed's native files and the world-size-free consolidated form


def save_native(engine, directory: str, tag: str, client_state: dict[str, Any]) -> None:
    """DeepSpeed's own checkpoint (every rank must call it)."""
    engine.save_checkpoint(directory, tag=tag, client_state=client_state, save_latest=False)


def load_native(engine, directory: str, tag: str) -> dict[str, Any]:
    """Load DeepSpeed's own checkpoint (same world size and ZeRO stage); returns the client state."""
    path, client = engine.load_checkpoint(
        directory, tag=tag, load_optimizer_states=True, load_lr_scheduler_states=False, load_module_strict=True
    )
    if path is None:
        raise FileNotFoundError(f"{directory}/{tag}: DeepSpeed found no checkpoint to load")
    return client or {}


def _base_optimizer(engine):
    opt = engine.optimizer
    return opt.optimizer if hasattr(opt, "optimizer") and isinstance(opt.optimizer, torch.optim.Optimizer) else opt


def _zero_managed(p: torch.Tensor) -> bool:
    # why: hasattr, not "is not None": a ZeRO-1/2 param whose fragment lives on another rank has
    # _hp_mapping = None here, yet every rank must enter the same gathers
    return hasattr(p, "ds_id") or hasattr(p, "_hp_mapping")


def _relink_zero12(engine) -> None:
    # why: ZeRO-1/2 link each param to its Adam-state fragment after the first step of the FIRST group
    # only (deepspeed 0.19.8), so the other groups' fragments stay empty; relinking fixes that
    opt = engine.optimizer
    if hasattr(opt, "_lazy_init_hp_params_optimizer_state"):
        opt._hp_optimizer_states_linked = False
        opt._lazy_init_hp_params_optimizer_state()


def optimizer_step_count(engine) -> int:
    for state in _base_optimizer(engine).state.values():
        if "step" in state:
            s = state["step"]
            return int(s.item() if torch.is_tensor(s) else s)
    return 0


def gather_full_state(engine) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Full fp32 weights of every parameter and full Adam moments of the trainable ones (CPU tensors).

    A collective: every rank must call it. Trainable weights come from the fp32 masters (not the
    bf16 module copy); frozen ones from the module, gathered under ZeRO-3."""
    _relink_zero12(engine)
    base = _base_optimizer(engine)
    weights: dict[str, torch.Tensor] = {}
    moments: dict[str, torch.Tensor] = {}
    has_state = len(base.state) > 0
    for name, p in engine.module.named_parameters():
        if p.requires_grad and _zero_managed(p):
            weights[name] = safe_get_full_fp32_param(p).detach().float().cpu().clone()
            if has_state:
                for key in ADAM_MOMENTS:
                    moments[f"{key}/{name}"] = safe_get_full_optimizer_state(p, key).detach().float().cpu().clone()
        else:
            with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
                weights[name] = p.detach().float().cpu().clone()
            if p.requires_grad and p in base.state:  # ZeRO-0 fp32: the torch optimizer holds full tensors
                for key in ADAM_MOMENTS:
                    moments[f"{key}/{name}"] = base.state[p][key].detach().float().cpu().clone()
    for name, buf in persistent_buffers(engine.module):
        weights[name] = buf.detach().float().cpu().clone() if buf.is_floating_point() else buf.detach().cpu().clone()
    return weights, moments


def persistent_buffers(module: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """Buffers that belong in a state dict (not the non-persistent ones such as cached constants)."""
    out = []
    for mod_name, mod in module.named_modules():
        for name, buf in mod.named_buffers(recurse=False):
            if buf is not None and name not in mod._non_persistent_buffers_set:
                out.append((f"{mod_name}.{name}" if mod_name else name, buf))
    return out


def load_full_state(engine, weights: dict[str, torch.Tensor], moments: dict[str, torch.Tensor], step_count: int) -> None:
    """Scatter full weights + Adam moments (from :func:`gather_full_state`, any world size) into ``engine``."""
    params = dict(engine.module.named_parameters())
    missing = sorted(set(params) - set(weights))
    if missing:
        raise ValueError(f"consolidated state lacks parameters {missing[:4]}...: it belongs to another model config")
    # Module copies first (the bf16/fp32 weights the forward uses), on every rank; ZeRO-3 re-partitions on exit.
    with deepspeed.zero.GatheredParameters(list(params.values()), modifier_rank=0):
        for name, p in params.items():
            p.data.copy_(weights[name].to(p.dtype))
    for name, buf in persistent_buffers(engine.module):
        if name in weights:
            buf.copy_(weights[name].to(buf.dtype))
    # Adam state tensors exist only after a first step; create them (zeros) so they can be filled.
    base = _base_optimizer(engine)
    flats = list(getattr(engine.optimizer, "fp32_partitioned_groups_flat", []))
    if not flats:
        flats = [fp for group in base.param_groups for fp in group["params"]]
    for fp in flats:
        base.state[fp] = {"step": torch.tensor(float(step_count)), **{k: torch.zeros_like(fp) for k in ADAM_MOMENTS}}
    _relink_zero12(engine)
    for name, p in params.items():
        if not p.requires_grad:
            continue
        if _zero_managed(p):
            safe_set_full_fp32_param(p, weights[name].to(device()))
            for key in ADAM_MOMENTS:
                if f"{key}/{name}" in moments:
                    safe_set_full_optimizer_state(p, moments[f"{key}/{name}"].to(device()), key)
        elif p in base.state:
            for key in ADAM_MOMENTS:
                if f"{key}/{name}" in moments:
                    base.state[p][key].copy_(moments[f"{key}/{name}"].to(base.state[p][key].dtype))
