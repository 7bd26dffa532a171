"""Checkpoints: save every N steps, keep the last K, resume from the newest COMPLETE one, on any world size.

Layout of ``RUN/checkpoints/step_NNNNNNNN/`` (NNNNNNNN = optimizer steps done):

    deepspeed/            DeepSpeed's own files (per-rank ZeRO partitions; client state = trainer state)
    zero_to_fp32.py       DeepSpeed's offline consolidation script (written by DeepSpeed)
    consolidated/         full fp32 weights (weights.safetensors) + full Adam moments (moments.safetensors)
    rng/rank_NNNNN.*      each rank's torch / numpy / python RNG state
    export/               model.safetensors + config.json: what downstream jobs read (ptrain.load); also the
                          Hugging Face tokenizer/preprocessor files and README.md (run dir, step, data sources)
    trainer_state.json    step, samples seen, data cursor, world size, ZeRO stage, precision
    COMPLETE              written last; a directory without it is ignored and pruned

Resume: same world size, ZeRO stage and precision -> DeepSpeed's ``load_checkpoint`` (bit-exact).
Otherwise -> the consolidated tensors are scattered into the new engine's partitions
(:meth:`ptrain.engine.Engine.load_full_state`): same fp32 master weights, Adam moments and step count, so
the continued run equals the uninterrupted one up to the summation order of the gradient reduction.
The data cursor is the optimizer step: the loader seeks to it (``build_train_loader(start_step=)``).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from safetensors.torch import load_file, save_file

from ptrain import distributed as du
from ptrain.model.config import ModelConfig
from ptrain.configs import CheckpointConfig

NATIVE_TAG = "deepspeed"
STATE_FILE = "trainer_state.json"
COMPLETE = "COMPLETE"


def checkpoints_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def step_dir(run_dir: str | Path, step: int) -> Path:
    return checkpoints_dir(run_dir) / f"step_{step:08d}"


def _step_of(path: Path) -> int:
    try:
        return int(path.name.split("_", 1)[1])
    except (IndexError, ValueError):
        return -1


def complete_checkpoints(run_dir: str | Path) -> list[Path]:
    """COMPLETE checkpoints of a run, oldest first."""
    root = checkpoints_dir(run_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.glob("step_*") if p.is_dir() and (p / COMPLETE).is_file() and _step_of(p) >= 0]
    return sorted(found, key=_step_of)


def latest_complete(run_dir: str | Path) -> Path | None:
    found = complete_checkpoints(run_dir)
    return found[-1] if found else None


def resolve_resume(run_dir: str | Path, cfg: CheckpointConfig) -> Path | None:
    """The checkpoint to resume from (``cfg.resume``: auto | none | a step directory), or None."""
    if cfg.resume == "none":
        existing = latest_complete(run_dir)
        if existing is not None:
            # why: a fresh run's checkpoints would be pruned together with (and mistaken for) the old run's
            raise FileExistsError(
                f"checkpoint.resume=none but run_dir {run_dir} already holds checkpoints (newest {existing.name}); "
                f"use a new run_dir, delete {checkpoints_dir(run_dir)}, or resume=auto to continue that run"
            )
        return None
    if cfg.resume == "auto":
        return latest_complete(run_dir)
    path = Path(cfg.resume)
    if path.is_dir() and not (path / COMPLETE).is_file() and latest_complete(path) is not None:
        path = latest_complete(path)  # a run directory: its newest checkpoint
    if not (path / COMPLETE).is_file():
        raise FileNotFoundError(
            f"checkpoint.resume={cfg.resume}: not a complete checkpoint (no {COMPLETE} marker); "
            f"pass a RUN/checkpoints/step_N directory, a run directory, or resume=auto"
        )
    return path


def find_export(path: str | Path) -> Path:
    """An export directory from an export dir, a step_N checkpoint or a run directory (newest COMPLETE)."""
    p = Path(path)
    if (p / "config.json").is_file() and (p / "model.safetensors").is_file():
        return p
    if (p / "export" / "config.json").is_file():
        return p / "export"
    latest = latest_complete(p)
    if latest is not None:
        return latest / "export"
    raise FileNotFoundError(
        f"{p}: no export found; pass an export directory (model.safetensors + config.json), "
        f"a RUN/checkpoints/step_N directory or a run directory with a COMPLETE checkpoint"
    )


# ----------------------------------------------------------------------------------------------
# save


_EXPORT_TWIN: dict[str, Any] = {}


def card_info(run_dir: str | Path, state: dict[str, Any]) -> dict[str, Any]:
    """What an export's model card says about the run that wrote it: the run directory, the step, and from
    ``RUN/config.yaml`` (written at the run's start) the data sources and what the model started from."""
    info: dict[str, Any] = {"made by": "a ptrain training run (checkpoint export)", "run_dir": str(run_dir),
                            "step": state.get("step"), "samples seen": state.get("samples_seen")}
    try:
        cfg = yaml.safe_load((Path(run_dir) / "config.yaml").read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        cfg = None
    if isinstance(cfg, dict):
        data = cfg.get("data") if isinstance(cfg.get("data"), dict) else {}
        for key, label in (("sources", "data sources"), ("eval_sources", "eval sources")):
            entries = data.get(key) if isinstance(data.get(key), list) else []
            info[label] = [_source_text(e) for e in entries]
        model = cfg.get("model") if isinstance(cfg.get("model"), dict) else {}
        info["init"] = cfg.get("init") or model.get("clip")  # a fine-tune names its init; a pretraining run its CLIP
        info["max_steps"] = cfg.get("max_steps")
    return {k: v for k, v in info.items() if v not in (None, [], "")}


def _source_text(entry: Any) -> str:
    """A data source as the card lists it: its path, and its weight when mixing."""
    if not isinstance(entry, dict):
        return str(entry)
    weight = entry.get("weight")
    return f"{entry.get('path')}" + ("" if weight in (None, 1, 1.0) else f" (weight {weight})")


def export_weights(module, model_cfg: ModelConfig, weights: dict[str, torch.Tensor], out: Path,
                   info: dict[str, Any] | None = None) -> Path:
    """Rank 0: load gathered fp32 ``weights`` into a plain (non-DeepSpeed) twin of ``module`` and ``save_export`` it.

    The twin is built from the module's own CLIP config (not from ``model_cfg.clip``, which may name an export or an
    imported checkpoint) and carries the module's tokenizer vocabulary."""
    from transformers import CLIPModel

    from ptrain.model import save_export
    from ptrain.model.clip import enable_3d_patch
    from ptrain.model.video_text import VideoTextModel

    key = json.dumps([model_cfg.__dict__, module.clip.config.to_dict()], sort_keys=True, default=str)
    twin = _EXPORT_TWIN.get(key)
    if twin is None:  # why: built once per run; a plain module never triggers ZeRO-3 gathers on one rank
        clip = CLIPModel(module.clip.config)
        del clip.logit_scale  # ours is the 1-D LogitScale
        if model_cfg.linear_patch == "3d":
            enable_3d_patch(clip)
        twin = VideoTextModel(model_cfg, clip, 1.0, init_from_clip=False).float().eval()
        _EXPORT_TWIN.clear()
        _EXPORT_TWIN[key] = twin
    twin.load_state_dict(weights, strict=True)
    twin.tokenizer_path = getattr(module, "tokenizer_path", None)
    return save_export(twin, out, info=info)


def _rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors["torch_cuda"] = torch.cuda.get_rng_state()
    np_state = np.random.get_state()
    py_state = random.getstate()
    meta = {
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
        "python": [py_state[0], list(py_state[1]), py_state[2]],
    }
    return tensors, meta


def _restore_rng(directory: Path, rank: int) -> bool:
    tensors_file, meta_file = directory / f"rank_{rank:05d}.safetensors", directory / f"rank_{rank:05d}.json"
    if not tensors_file.is_file() or not meta_file.is_file():
        return False
    tensors = load_file(str(tensors_file))
    torch.set_rng_state(tensors["torch_cpu"])
    if "torch_cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["torch_cuda"])
    meta = json.loads(meta_file.read_text())
    n = meta["numpy"]
    np.random.set_state((n[0], np.asarray(n[1], dtype=np.uint32), *n[2:]))
    p = meta["python"]
    random.setstate((p[0], tuple(p[1]), p[2]))
    return True


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
    os.replace(tmp, path)


def save(engine, model_cfg: ModelConfig, run_dir: str | Path, state: dict[str, Any], cfg: CheckpointConfig,
         card: dict[str, Any] | None = None) -> Path:
    """Write ``step_{state['step']}`` (every rank must call this); returns its path. ``card``: more lines for the
    export's model card (beside :func:`card_info`'s)."""
    rank = du.rank()
    out = step_dir(run_dir, state["step"])
    if rank == 0:
        if out.exists():  # a half-written directory of an interrupted earlier attempt
            shutil.rmtree(out)
        (out / "rng").mkdir(parents=True)
    du.barrier()
    state = dict(state, optimizer_steps=engine.optimizer_step_count(), saved_at=time.time())
    engine.save(str(out), NATIVE_TAG, client_state={"trainer_state": state})
    weights, moments = engine.gather_full_state()
    tensors, meta = _rng_state()
    save_file(tensors, str(out / "rng" / f"rank_{rank:05d}.safetensors"))
    _write_json(out / "rng" / f"rank_{rank:05d}.json", meta)
    if rank == 0:
        (out / "consolidated").mkdir()
        save_file(weights, str(out / "consolidated" / "weights.safetensors"))
        if cfg.consolidated_optimizer and moments:
            save_file(moments, str(out / "consolidated" / "moments.safetensors"))
        export_weights(engine.module, model_cfg, weights, out / "export", {**card_info(run_dir, state), **(card or {})})
        _write_json(out / STATE_FILE, state)
    du.barrier()
    if rank == 0:
        _write_json(out / COMPLETE, {"step": state["step"], "time": time.time()})
        prune(run_dir, cfg.keep_last)
    return out


def prune(run_dir: str | Path, keep_last: int) -> list[Path]:
    """Delete all but the newest ``keep_last`` complete checkpoints, and incomplete ones older than them."""
    complete = complete_checkpoints(run_dir)
    keep = set(complete[-keep_last:])
    newest_kept = _step_of(complete[-1]) if complete else -1
    removed = []
    for p in checkpoints_dir(run_dir).glob("step_*"):
        stale_partial = not (p / COMPLETE).is_file() and _step_of(p) < newest_kept
        if (p in complete and p not in keep) or stale_partial:
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


# ----------------------------------------------------------------------------------------------
# load


def load(engine, path: Path, zero_stage: int, precision: str) -> tuple[dict[str, Any], str]:
    """Restore ``engine`` (+ this rank's RNG) from checkpoint ``path``; returns (trainer state, how)."""
    state = json.loads((path / STATE_FILE).read_text())
    world = du.world_size()
    same_layout = (state["world_size"], state["zero_stage"], state["precision"]) == (world, zero_stage, precision)
    if same_layout:
        engine.load(str(path), NATIVE_TAG)
        how = "DeepSpeed state (same world size and ZeRO stage)"
    else:
        moments_file = path / "consolidated" / "moments.safetensors"
        if not moments_file.is_file():
            raise FileNotFoundError(
                f"{path} was saved on {state['world_size']} rank(s) with ZeRO-{state['zero_stage']} {state['precision']} "
                f"but this run has {world} rank(s), ZeRO-{zero_stage} {precision}, and the checkpoint has no consolidated "
                f"optimizer state ({moments_file}, written when checkpoint.consolidated_optimizer=true); relaunch "
                f"with the original layout, or start a new run from its weights"
            )
        weights = load_file(str(path / "consolidated" / "weights.safetensors"))
        moments = load_file(str(moments_file))
        engine.load_full_state(weights, moments, state.get("optimizer_steps", state["step"]))
        how = (
            f"consolidated fp32 state (saved on {state['world_size']} rank(s) ZeRO-{state['zero_stage']} "
            f"{state['precision']}, now {world} rank(s) ZeRO-{zero_stage} {precision})"
        )
    if not _restore_rng(path / "rng", du.rank()):
        # A rank that did not exist when saving: a fresh stream that still depends only on (seed, step, rank).
        torch.manual_seed(hash((state.get("seed", 0), state["step"], du.rank())) & 0x7FFFFFFF)
    return state, how
