"""The one module that imports DeepSpeed: the DeepSpeed config derived from ``EngineConfig``, and ``Engine``.

    from ptrain.engine import Engine
    engine = Engine(model, build_optimizer(model, cfg.optim), cfg.engine)   # deepspeed.initialize
    out = engine(frames, mask, ids, attn); engine.backward(loss); engine.step()
    engine.clamp_(model.logit_scale.log_scale, max_log_scale)               # in the fp32 master copy
    engine.compiled, engine.compile_note                                   # engine.compile=true: the outcome
    weights, moments = engine.gather_full_state()                          # world-size-free state (collective)
    engine.save(directory, tag, client_state) / engine.load(directory, tag)

The DeepSpeed JSON is derived from :class:`ptrain.configs.EngineConfig` by :func:`deepspeed_config` and never
written by hand. The optimizer (torch AdamW over ``ptrain.optim.param_groups``) and the schedule are plain torch;
the process group is ``ptrain.distributed``'s. ZeRO's partitioned fp32 master weights and Adam moments can be
gathered into full tensors (:meth:`Engine.gather_full_state`) and scattered back into an engine of any world size
and ZeRO stage (:meth:`Engine.load_full_state`): that is how a checkpoint saved on N ranks resumes on M ranks
(DeepSpeed's own ZeRO files refuse a different data-parallel size).

``engine.compile=true`` compiles the model's forward (and so its backward, through AOTAutograd) with
``torch.compile`` the way DeepSpeed 0.19.8 offers it: ``DeepSpeedEngine.compile()`` after ``initialize``, which
calls ``nn.Module.compile()`` on the wrapped module *in place*. Parameter names, ZeRO's gradient hooks, state dicts,
checkpoints and exports stay exactly as without compile (``torch.compile(model)`` before ``initialize`` would wrap
it in an ``OptimizedModule`` and prefix every name with ``_orig_mod.``). Only ``forward`` is compiled; the
inference API (``encode_video``/``encode_text``, used by evaluation) stays eager. Before compiling, a tiny
forward + backward is compiled with the same backend: where the toolchain is missing (no C/C++ compiler for
inductor on CPU, no Triton on a GPU) that probe fails, a ``RuntimeWarning`` says why, and training runs eagerly;
a compile failure on the model's first forward falls back the same way. Never silently: ``engine.compiled`` and
``engine.compile_note`` say what happened, and the trainer logs the note.
"""

from __future__ import annotations

import importlib
import pickle
import warnings
from typing import Any

import deepspeed
import torch
from deepspeed.utils import (
    safe_get_full_fp32_param,
    safe_get_full_optimizer_state,
    safe_set_full_fp32_param,
    safe_set_full_optimizer_state,
)
from torch import nn

from ptrain import distributed as du
from ptrain.checkpoint import DEEPSPEED_PICKLE_GLOBALS
from ptrain.configs import EngineConfig

ADAM_MOMENTS = ("exp_avg", "exp_avg_sq")


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
    if comm == "auto" and not du.on_cuda() and cfg.precision != "fp32":
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
        f"({du.device_name()}); params {n_params / 1e6:.2f}M, trainable {n_trainable / 1e6:.2f}M\n"
        f"global batch {ds['train_batch_size']} = micro {micro} x ranks {world_size} x accumulation {accum}; "
        f"contrastive negatives per query {negatives} (= {how}; accumulation does not add negatives)\n"
        f"gradient clipping {ds['gradient_clipping'] or 'off'}; activation checkpointing "
        f"{'on (CLIP layers, model.grad_checkpointing)' if grad_checkpointing else 'off'}"
    )


def _skip_cpu_shm_op() -> None:
    """Keep DeepSpeed from building and starting its CPU shared-memory all-reduce (``deepspeed_shm_comm``).

    On the CPU accelerator, ``deepspeed.initialize`` JIT-compiles that op under a lock file in the torch extensions
    cache and maps a ~66 MB ``/dev/shm/deepspeed_allreduce_buffer_*`` segment per rank that is never unlinked. Both
    bit us: a rank killed while it held the lock (a lost rank, a timeout) left the lock behind and every later run on
    the machine hung at start-up, silently; the segments piled up to 21 GB of a 24 GB machine's memory in a day of
    runs. The op only serves DeepSpeed's inference all-reduce; training reduces through torch.distributed (gloo),
    so nothing here uses it. GPU accelerators do not have it."""
    if du.device().type != "cpu":
        return
    try:
        import deepspeed.ops as ops

        ops.__compatible_ops__["deepspeed_shm_comm"] = False  # build_shm_op() returns None for an incompatible op
    except (ImportError, AttributeError, TypeError):  # another DeepSpeed layout: it keeps its default
        pass


class Engine:
    """A model and its optimizer under DeepSpeed: forward, backward, step, the temperature clamp, full state, I/O.

    ``engine.module`` is the plain ``nn.Module`` (its parameters may be ZeRO-3 partitions); ``engine.optimizer``
    exposes torch's ``param_groups`` (``ptrain.optim.set_lr`` works on it)."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, cfg: EngineConfig,
                 compile_backend: str = "inductor"):
        self.cfg = cfg
        self.config = deepspeed_config(cfg, du.world_size())
        _skip_cpu_shm_op()
        self.ds, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=self.config)
        self.compiled, self.compile_note = False, "engine.compile=false: eager"
        if cfg.compile:
            self.compiled, self.compile_note = _compile(self.ds, compile_backend)

    @property
    def module(self) -> nn.Module:
        return self.ds.module

    @property
    def optimizer(self):
        return self.ds.optimizer

    def __call__(self, *args, **kwargs):
        if not self.compiled:
            return self.ds(*args, **kwargs)
        try:
            return self.ds(*args, **kwargs)
        except torch._dynamo.exc.TorchDynamoException as e:
            # why: a compile failure on the real model (the probe passed) must not end the run: go on eagerly
            self.compiled = False
            self.compile_note = _fall_back(self.ds, f"compiling the model's forward failed: {_first_line(e)}")
            return self.ds(*args, **kwargs)

    def backward(self, loss: torch.Tensor) -> None:
        self.ds.backward(loss)

    def step(self) -> None:
        """DeepSpeed steps the optimizer at the accumulation boundary (call after every micro-batch)."""
        self.ds.step()

    def grad_norm(self) -> torch.Tensor | None:
        """The last step's global gradient norm as a 0-dim tensor (not read on the host), or None."""
        value = self.ds.get_global_grad_norm()
        if value is None:
            return None
        return value.detach().reshape(()) if torch.is_tensor(value) else torch.tensor(float(value))

    def clamp_(self, p: torch.Tensor, max_value: float) -> None:
        """Clamp parameter ``p`` of the module to ``max_value`` in the optimizer's fp32 master (and the module copy);
        a collective under ZeRO."""
        _clamp_parameter_(p, max_value)

    def gather_full_state(self) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Full fp32 weights of every parameter and full Adam moments of the trainable ones (CPU tensors);
        a collective: every rank must call it."""
        return _gather_full_state(self.ds)

    def load_full_state(self, weights, moments, step_count: int) -> None:
        """Scatter full weights + Adam moments (from :meth:`gather_full_state`, any world size) into this engine."""
        _load_full_state(self.ds, weights, moments, step_count)

    def optimizer_step_count(self) -> int:
        return _optimizer_step_count(self.ds)

    def save(self, directory: str, tag: str, client_state: dict[str, Any]) -> None:
        """DeepSpeed's own checkpoint (every rank must call it)."""
        self.ds.save_checkpoint(directory, tag=tag, client_state=client_state, save_latest=False)

    def load(self, directory: str, tag: str) -> dict[str, Any]:
        """Load DeepSpeed's own checkpoint (same world size and ZeRO stage); returns the client state. Every file
        is read by :func:`load_deepspeed_file` (no code runs); ValueError names a refused file."""
        engine = self.ds.checkpoint_engine
        own_load = engine.load
        # why: DeepSpeed's TorchCheckpointEngine unpickles with weights_only=False; all its reads go through .load
        engine.load = load_deepspeed_file
        try:
            path, client = self.ds.load_checkpoint(
                directory, tag=tag, load_optimizer_states=True, load_lr_scheduler_states=False, load_module_strict=True
            )
        finally:
            engine.load = own_load
        if path is None:
            raise FileNotFoundError(f"{directory}/{tag}: DeepSpeed found no checkpoint to load")
        return client or {}


def _deepspeed_pickle_classes() -> list[type]:
    classes = []
    for name in DEEPSPEED_PICKLE_GLOBALS:
        module, attr = name.rsplit(".", 1)
        classes.append(getattr(importlib.import_module(module), attr))
    return classes


def load_deepspeed_file(path: str, map_location=None) -> Any:
    """One of DeepSpeed's checkpoint files, unpickled with ``weights_only=True``: tensors, plain containers and the
    DeepSpeed classes of ``ptrain.checkpoint.DEEPSPEED_PICKLE_GLOBALS`` only; anything else (a pickle that would
    call a function) is refused with a ValueError naming the file, before it is constructed."""
    with torch.serialization.safe_globals(_deepspeed_pickle_classes()):
        try:
            return torch.load(path, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as e:
            what = next((line.strip() for line in str(e).splitlines() if "GLOBAL" in line or "Unsupported" in line),
                        str(e).splitlines()[0] if str(e) else "")
            raise ValueError(f"{path}: refused to unpickle it: it holds more than tensors and plain containers "
                             f"({what[:200]}); a checkpoint written by ptrain never does, so it was altered: "
                             "resume from another checkpoint") from None


# ----------------------------------------------------------------------------------------------
# torch.compile


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0] if text else ''}"[:400]


def compile_probe(backend: str = "inductor", device: torch.device | None = None) -> str | None:
    """Compile and run a tiny forward + backward with ``backend`` on ``device``; None if it works, else why not."""
    dev = device or du.device()
    try:
        torch._dynamo.reset()  # why: a cached result of an earlier probe must not hide a changed toolchain
        net = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.LayerNorm(16), nn.Linear(16, 1)).to(dev)
        fn = torch.compile(net, backend=backend)
        fn(torch.randn(4, 8, device=dev)).sum().backward()
    except Exception as e:  # noqa: BLE001 - any failure means: this backend cannot compile here
        return _first_line(e)
    finally:
        torch._dynamo.reset()
    return None


def _fall_back(ds, reason: str) -> str:
    """Undo ``nn.Module.compile`` (eager from now on) and warn; returns the note for the log."""
    module = ds.module
    if hasattr(module, "_compiled_call_impl"):
        module._compiled_call_impl = None
    if hasattr(ds, "_is_compiled"):
        ds._is_compiled = False
    note = (f"engine.compile=true but torch.compile cannot be used here ({reason}); training runs EAGERLY "
            "(same results, no compile speed-up). Install a C/C++ compiler (inductor on CPU) or Triton (GPU), or "
            "set engine.compile=false to silence this.")
    warnings.warn(note, RuntimeWarning, stacklevel=3)
    return note


def _compile(ds, backend: str) -> tuple[bool, str]:
    """Compile ``ds.module``'s forward in place with DeepSpeed's ``engine.compile``; (compiled?, note)."""
    why = compile_probe(backend)
    if why is not None:
        return False, _fall_back(ds, f"the {backend} backend failed on a probe: {why}")
    try:
        # static shapes: the micro-batch is always full and the kept-token count changes at most once (the
        # unmasked tail), so one recompile there beats dynamic-shape kernels for the whole run
        ds.compile(backend=backend, compile_kwargs={"dynamic": False})
    except Exception as e:  # noqa: BLE001 - e.g. a torch without compile support
        return False, _fall_back(ds, f"DeepSpeed's engine.compile failed: {_first_line(e)}")
    return True, f"engine.compile=true: the model's forward and backward run under torch.compile (backend {backend})"


# ----------------------------------------------------------------------------------------------
# ZeRO state: the temperature clamp and the world-size-free consolidated form


def _clamp_parameter_(p: torch.Tensor, max_value: float) -> None:
    """Clamp parameter ``p`` (of the engine's module) to ``max_value`` in the optimizer's fp32 master (and the
    module copy); under ZeRO the gathered value is read on the host (one scalar per optimizer step).

    A collective under ZeRO (every rank must call it). Used after each step for the log-temperature, as
    CLIP4Clip clamps it: a clamp inside the forward alone has zero gradient above the bound, so once an
    update crossed it the temperature could never come back down."""
    if not p.requires_grad:  # frozen (e.g. a tight head's unused temperature): nothing updates it
        return
    if _zero_managed(p):
        full = safe_get_full_fp32_param(p)
        # why the host read: ZeRO-3 cannot write a 1-element parameter back on a rank that holds none of it
        # (DeepSpeed's set_full_hp_param fails there), so it is written only when it really crossed the bound
        if full is None or float(full.max()) <= max_value:
            return
        safe_set_full_fp32_param(p, full.clamp(max=max_value))
        if p.numel() == full.numel():  # ZeRO-1/2: the module holds the whole (low-precision) copy
            p.data.clamp_(max=max_value)
        return
    p.data.clamp_(max=max_value)


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


def _optimizer_step_count(engine) -> int:
    for state in _base_optimizer(engine).state.values():
        if "step" in state:
            s = state["step"]
            return int(s.item() if torch.is_tensor(s) else s)
    return 0


def _gather_full_state(engine) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
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


def _load_full_state(engine, weights: dict[str, torch.Tensor], moments: dict[str, torch.Tensor], step_count: int) -> None:
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
            safe_set_full_fp32_param(p, weights[name].to(du.device()))
            for key in ADAM_MOMENTS:
                if f"{key}/{name}" in moments:
                    safe_set_full_optimizer_state(p, moments[f"{key}/{name}"].to(du.device()), key)
        elif p in base.state:
            for key in ADAM_MOMENTS:
                if f"{key}/{name}" in moments:
                    base.state[p][key].copy_(moments[f"{key}/{name}"].to(base.state[p][key].dtype))
