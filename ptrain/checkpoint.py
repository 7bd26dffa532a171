"""Checkpoints: save every N steps, keep the last K intact ones, resume from the newest intact one, on any world size.

Layout of ``RUN/checkpoints/step_NNNNNNNN/`` (NNNNNNNN = optimizer steps done):

    deepspeed/            DeepSpeed's own files (per-rank ZeRO partitions; client state = trainer state)
    zero_to_fp32.py       DeepSpeed's offline consolidation script (written by DeepSpeed; ptrain never runs it)
    consolidated/         full fp32 weights (weights.safetensors) + full Adam moments (moments.safetensors)
    rng/rank_NNNNN.*      each rank's torch / numpy / python RNG state
    export/               model.safetensors + config.json: what downstream jobs read (ptrain.load); also the
                          Hugging Face tokenizer/preprocessor files and README.md (run dir, step, data sources)
    trainer_state.json    step, samples seen, data cursor, world size, ZeRO stage, precision
    COMPLETE              written last: the size and sha256 of every other file; a directory without it is ignored

Resume (:func:`select_resume`, every rank): rank 0 verifies the newest COMPLETE checkpoint (:func:`verify`: every
file's size and sha256 against the marker, every file parsed: JSON, safetensors headers, DeepSpeed's pickles
scanned for anything but tensors and plain containers) and falls back to the next older one, with a warning naming
what was wrong, until one is intact; the damaged ones are moved to ``checkpoints/damaged/``. Nothing in a
checkpoint is unpickled with code execution: DeepSpeed's files go through a loader that allows only tensors, plain
containers and four named DeepSpeed classes (``Engine.load``), the rest is JSON and safetensors.

Same world size, ZeRO stage and precision -> DeepSpeed's ``load_checkpoint`` (bit-exact). Otherwise -> the
consolidated tensors are scattered into the new engine's partitions (:meth:`ptrain.engine.Engine.load_full_state`):
same fp32 master weights, Adam moments and step count, so the continued run equals the uninterrupted one up to the
summation order of the gradient reduction. The data cursor is the optimizer step: the loader seeks to it
(``build_train_loader(start_step=)``).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import shutil
import time
import zipfile
from pathlib import Path
from typing import Any, Callable

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
DAMAGED = "damaged"  # checkpoints/damaged/step_N: checkpoints that failed verification, kept for inspection
MARKER_FORMAT = 2  # COMPLETE with "files": {path: {"bytes", "sha256"}}; format 1 (no hashes) is checked by parsing
# The only non-tensor classes DeepSpeed 0.19 pickles into its checkpoint files (ZeRO 0-3, bf16 / fp16 / fp32; found
# by saving real checkpoints and listing their pickle globals). Anything else is refused, never constructed.
DEEPSPEED_PICKLE_GLOBALS = (
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.utils.tensor_fragment.fragment_address",
)
MAX_PICKLE_BYTES = 256 << 20  # a data.pkl beyond this is not a tensor checkpoint's (its tensors are separate records)
MAX_SAFETENSORS_HEADER = 100_000_000  # the safetensors library's own limit on a header
_STATE_KEYS = {"step": int, "samples_seen": int, "world_size": int, "zero_stage": int, "precision": str, "data": dict}


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: the message names the checkpoint, the file and the fix."""


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
    """The newest COMPLETE checkpoint ``cfg.resume`` names (auto | none | a step or run directory), or None; not
    verified yet (:func:`select_resume` does that). Cheap: runs before any rank starts."""
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


def check_run_dir(run_dir: str | Path) -> None:
    """ValueError naming ``run_dir`` when a run cannot write there (a file, read-only, full); creates it."""
    p = Path(run_dir)
    if p.exists() and not p.is_dir():
        raise ValueError(f"run_dir={run_dir} is a file, not a directory; set run_dir to a directory (new or a run's)")
    probe = p / f".ptrain_write_test.{os.getpid()}"
    try:
        p.mkdir(parents=True, exist_ok=True)
        with open(probe, "wb") as f:
            f.write(b"\0" * 65536)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise ValueError(f"run_dir={run_dir} is not writable ({e.strerror or e}); point run_dir at a writable "
                         "directory with free space") from None
    finally:
        probe.unlink(missing_ok=True)


def latest_intact(run_dir: str | Path) -> Path | None:
    """The newest COMPLETE checkpoint whose files are all there, at their recorded sizes, and parse (no hashing)."""
    return next((p for p in reversed(complete_checkpoints(run_dir)) if not verify(p, hashes=False)), None)


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


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _manifest(out: Path) -> dict[str, dict[str, Any]]:
    """{relative path: {bytes, sha256}} of every file of ``out`` but COMPLETE; a collective (each rank hashes a
    share)."""
    names = None
    if du.rank() == 0:
        names = sorted(str(f.relative_to(out)) for f in out.rglob("*") if f.is_file() and f.name != COMPLETE)
    names = du.broadcast_object(names)
    mine = {n: {"bytes": (out / n).stat().st_size, "sha256": _sha256(out / n)}
            for n in names[du.rank()::du.world_size()]}
    merged: dict[str, dict[str, Any]] = {}
    for part in du.all_gather_objects(mine):
        merged.update(part)
    return merged


_WRITE_FAILURES = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO)
# what torch.save (its zip writer notices the bytes it lost: "unexpected pos") and safetensors say when the underlying
# write failed; neither keeps the errno
_WRITE_FAILURE_TEXT = ("file write failed", "unexpected pos", "no space left", "file too large", "filetoolarge",
                       "storagefull", "read-only file system", "disk quota", "permission denied", "input/output error")


def _write_failure(e: BaseException, out: Path) -> bool:
    """Whether ``e`` (raised while writing ``out``) is the file system refusing a write, not a bug."""
    if isinstance(e, OSError) and e.errno in _WRITE_FAILURES:
        return True
    if any(t in str(e).lower() for t in _WRITE_FAILURE_TEXT):
        return True
    try:  # whatever the message: a file system that is now full or read-only explains it
        st = os.statvfs(out.parent)
        return st.f_bavail * st.f_frsize < (16 << 20) or not os.access(out.parent, os.W_OK)
    except OSError:
        return False


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (a full, read-only or quota-limited file system)."""


def save(engine, model_cfg: ModelConfig, run_dir: str | Path, state: dict[str, Any], cfg: CheckpointConfig,
         card: dict[str, Any] | None = None) -> Path:
    """Write ``step_{state['step']}`` (every rank must call this); returns its path. ``card``: more lines for the
    export's model card (beside :func:`card_info`'s). CheckpointWriteError when the file system refuses a write (the
    partial directory has no COMPLETE marker and is ignored)."""
    out = step_dir(run_dir, state["step"])
    try:
        return _save(engine, model_cfg, run_dir, out, state, cfg, card)
    except Exception as e:  # noqa: BLE001 - only write failures are translated, the rest goes up as it is
        if not _write_failure(e, out):
            raise
        raise CheckpointWriteError(
            f"could not write checkpoint {out} ({str(e).strip().splitlines()[-1][:300]}): the file system of run_dir "
            f"is full, read-only or over quota; free space (or set run_dir elsewhere) and re-run to resume from the "
            f"newest intact checkpoint (the partial {out.name} has no {COMPLETE} marker and is ignored)") from None


def _save(engine, model_cfg: ModelConfig, run_dir: str | Path, out: Path, state: dict[str, Any],
          cfg: CheckpointConfig, card: dict[str, Any] | None = None) -> Path:
    rank = du.rank()
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
    files = _manifest(out)  # after the barrier: every rank's files are closed
    if rank == 0:
        _write_json(out / COMPLETE, {"step": state["step"], "time": time.time(), "format": MARKER_FORMAT,
                                     "files": files})
        prune(run_dir, cfg.keep_last)
    return out


def prune(run_dir: str | Path, keep_last: int) -> list[Path]:
    """Keep the newest ``keep_last`` intact checkpoints (files present at their recorded sizes and parsing; a damaged
    one never counts as kept); delete the older ones, damaged or not, and incomplete ones older than the newest kept.
    Damaged checkpoints newer than every intact one stay for inspection (resume moves them to damaged/)."""
    complete = complete_checkpoints(run_dir)
    intact = [p for p in complete if not verify(p, hashes=False)]
    keep = set(intact[-keep_last:])
    newest_kept = _step_of(intact[-1]) if intact else -1
    oldest_kept = min((_step_of(p) for p in keep), default=-1)
    removed = []
    for p in checkpoints_dir(run_dir).glob("step_*"):
        stale_partial = not (p / COMPLETE).is_file() and _step_of(p) < newest_kept
        stale_complete = p in complete and p not in keep and _step_of(p) < oldest_kept
        if stale_complete or stale_partial:
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


# ----------------------------------------------------------------------------------------------
# verify


def _inside(root: Path, rel: Any) -> Path | None:
    """``root / rel`` when ``rel`` is a plain relative path that stays inside ``root`` (a marker is untrusted too)."""
    if not isinstance(rel, str) or not rel or os.path.isabs(rel) or ".." in Path(rel).parts:
        return None
    return root / rel


def _json_problem(path: Path, rel: str, want: type = dict) -> tuple[Any, str | None]:
    """(parsed value, None) or (None, what is wrong) for a small JSON file of a checkpoint."""
    if not path.is_file():
        return None, f"{rel} is missing"
    try:
        if path.stat().st_size > 64 << 20:
            return None, f"{rel} is {path.stat().st_size} bytes, far more than such a file holds"
        value = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        return None, f"{rel} does not parse as JSON ({str(e).splitlines()[0][:120]})"
    if not isinstance(value, want):
        return None, f"{rel} holds a JSON {type(value).__name__}, not an {want.__name__}"
    return value, None


def _safetensors_problem(path: Path, rel: str) -> str | None:
    """A safetensors file whose header does not parse or whose tensors do not end exactly at the end of the file."""
    if not path.is_file():
        return f"{rel} is missing"
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else -1
            if n < 2 or 8 + n > size:
                return f"{rel} is truncated (its header does not fit in its {size} bytes)"
            if n > MAX_SAFETENSORS_HEADER:
                return f"{rel}: its header claims {n} bytes, more than safetensors allows ({MAX_SAFETENSORS_HEADER})"
            header = json.loads(f.read(n))
        ends = [int(t["data_offsets"][1]) for k, t in header.items() if k != "__metadata__"]
    except (OSError, ValueError, TypeError, KeyError, IndexError) as e:
        return f"{rel} is not a readable safetensors file ({str(e).splitlines()[0][:120]})"
    expected = 8 + n + max(ends, default=0)
    if expected != size:
        return f"{rel} is {'truncated' if size < expected else 'padded'}: {size} bytes, its header describes {expected}"
    return None


def _pickle_problem(path: Path, rel: str) -> str | None:
    """A DeepSpeed ``.pt`` that is not a readable torch zip, or whose pickle names anything beyond tensors, plain
    containers and :data:`DEEPSPEED_PICKLE_GLOBALS` (read statically: nothing is unpickled here)."""
    from torch.serialization import get_unsafe_globals_in_checkpoint

    try:
        with zipfile.ZipFile(path) as z:  # the central directory is at the end: a truncated file fails here
            pkl = [i for i in z.infolist() if i.filename.endswith("/data.pkl") or i.filename == "data.pkl"]
        if len(pkl) != 1:
            return f"{rel} is not a torch checkpoint (no single data.pkl record)"
        if pkl[0].file_size > MAX_PICKLE_BYTES:
            return f"{rel}: its pickle record is {pkl[0].file_size} bytes, far more than a checkpoint of tensors holds"
        unsafe = get_unsafe_globals_in_checkpoint(str(path))
    except (OSError, zipfile.BadZipFile, ValueError, RuntimeError, EOFError) as e:
        return f"{rel} is not a readable torch checkpoint, truncated or damaged ({str(e).splitlines()[0][:120]})"
    except Exception as e:  # noqa: BLE001 - the static pickle scan meeting garbage opcodes
        first = str(e).splitlines()[0][:120] if str(e) else ""
        return f"{rel}: its pickle does not parse ({type(e).__name__}: {first})"
    bad = sorted(set(unsafe) - set(DEEPSPEED_PICKLE_GLOBALS))
    if bad:
        return (f"{rel} refers to {', '.join(bad[:4])} in its pickle, which a checkpoint of tensors never needs "
                "(loading it could run code): refused")
    return None


def verify(path: str | Path, hashes: bool = True) -> list[str]:
    """What is wrong with checkpoint ``path``, one line per problem (empty: intact). Every file listed in COMPLETE
    must have its recorded size (and, with ``hashes``, its sha256); whatever the marker says, trainer_state.json, the
    RNG and export JSON must parse, every safetensors header must describe its file exactly, and DeepSpeed's files
    must be there (one model file, or one per rank under ZeRO-3; one optimizer file per rank under ZeRO 1-3) and be
    torch zips whose pickles name nothing beyond :data:`DEEPSPEED_PICKLE_GLOBALS`."""
    path = Path(path)
    problems: list[str] = []
    marker, why = _json_problem(path / COMPLETE, COMPLETE)
    if why:
        return [why]
    files = marker.get("files")
    if files is not None and not isinstance(files, dict):
        problems.append(f"{COMPLETE}: 'files' is not a mapping of file -> size and sha256")
        files = None
    for rel, entry in (files or {}).items():
        f = _inside(path, rel)
        if f is None or not isinstance(entry, dict):
            problems.append(f"{COMPLETE} lists {str(rel)[:120]!r}, which is not a file inside the checkpoint")
        elif not f.is_file():
            problems.append(f"{rel} is missing")
        elif f.stat().st_size != entry.get("bytes"):
            problems.append(f"{rel} is {f.stat().st_size} bytes but was saved with {entry.get('bytes')}")
        elif hashes and _sha256(f) != entry.get("sha256"):
            problems.append(f"{rel} has changed since it was saved (sha256 differs)")
    state, why = _json_problem(path / STATE_FILE, STATE_FILE)
    if why:
        return problems + [why]
    wrong = [k for k, t in _STATE_KEYS.items() if not isinstance(state.get(k), t) or isinstance(state.get(k), bool)]
    if wrong:
        return problems + [f"{STATE_FILE} lacks or has a wrong type for {', '.join(wrong)}"]
    world, zero = state["world_size"], state["zero_stage"]
    if not 1 <= world <= 1 << 20 or zero not in (0, 1, 2, 3):
        return problems + [f"{STATE_FILE}: world_size {world} / zero_stage {zero} out of range"]
    if state["step"] != _step_of(path):
        problems.append(f"{STATE_FILE} says step {state['step']} but the directory is {path.name}")
    ds = path / NATIVE_TAG
    if not ds.is_dir():
        problems.append(f"{NATIVE_TAG}/ is missing")
    else:
        pts = sorted(ds.glob("*.pt"))
        n_model = sum(p.name.endswith("model_states.pt") for p in pts)
        n_optim = sum(p.name.endswith("optim_states.pt") for p in pts)
        if n_model != (world if zero == 3 else 1) or n_optim != (world if zero else 0):
            problems.append(f"{NATIVE_TAG}/ holds {n_model} model and {n_optim} optimizer file(s); a ZeRO-{zero} "
                            f"checkpoint of {world} rank(s) has {world if zero == 3 else 1} and {world if zero else 0}")
        problems += [p for f in pts if (p := _pickle_problem(f, f"{NATIVE_TAG}/{f.name}"))]
    tensors = ["consolidated/weights.safetensors", "export/model.safetensors"]
    tensors += ["consolidated/moments.safetensors"] if (path / "consolidated/moments.safetensors").exists() else []
    tensors += [f"rng/rank_{r:05d}.safetensors" for r in range(world)]
    problems += [p for rel in tensors if (p := _safetensors_problem(path / rel, rel))]
    for rel in ["export/config.json", *(f"rng/rank_{r:05d}.json" for r in range(world))]:
        if (why := _json_problem(path / rel, rel)[1]) is not None:
            problems.append(why)
    return problems


def _set_aside(path: Path, run_dir: str | Path) -> Path:
    """Move a damaged checkpoint of this run to checkpoints/damaged/ (out of resume's and prune's way)."""
    target_dir = checkpoints_dir(run_dir) / DAMAGED
    target_dir.mkdir(parents=True, exist_ok=True)
    target, n = target_dir / path.name, 1
    while target.exists():
        target, n = target_dir / f"{path.name}.{n}", n + 1
    os.replace(path, target)
    return target


def _choose(run_dir: str | Path, cfg: CheckpointConfig) -> dict[str, Any]:
    """Rank 0's decision for :func:`select_resume`: {"path", "warnings", "error"}."""
    try:
        first = resolve_resume(run_dir, cfg)
    except (FileNotFoundError, FileExistsError) as e:
        return {"path": None, "warnings": [], "error": str(e)}
    if first is None:
        return {"path": None, "warnings": [], "error": None}
    explicit = cfg.resume not in ("auto", "none") and (Path(cfg.resume) / COMPLETE).is_file()
    # only this run's own damaged checkpoints are moved aside; another run's directory is left as it is
    own = first.parent.resolve() == checkpoints_dir(run_dir).resolve()
    candidates = [first] if explicit else list(reversed(complete_checkpoints(first.parent.parent)))
    damaged: dict[Path, list[str]] = {}
    for p in candidates:
        problems = verify(p)
        if problems:  # at most 5 named (a forged world size could list a million missing files)
            damaged[p] = problems[:5] + ([f"and {len(problems) - 5} more"] if len(problems) > 5 else [])
            continue
        warnings = []
        for d, why in damaged.items():
            moved = f" and moved to {_set_aside(d, run_dir)}" if own else ""
            warnings.append(f"checkpoint {d} is damaged, skipped{moved}: {'; '.join(why)}")
        if damaged:
            warnings.append(f"resuming from the newest intact checkpoint {p}")
        return {"path": str(p), "warnings": warnings, "error": None}
    listing = "; ".join(f"{p.name}: {', '.join(why)}" for p, why in damaged.items())
    if explicit:
        return {"path": None, "warnings": [], "error": f"checkpoint.resume={cfg.resume} is damaged: {listing}; "
                "pick another checkpoint (or resume=auto)"}
    aside = checkpoints_dir(run_dir) / DAMAGED
    if cfg.if_all_damaged == "start_over":
        for p in damaged if own else ():
            _set_aside(p, run_dir)
        return {"path": None, "error": None, "warnings": [
            f"every checkpoint is damaged ({listing}); starting over from step 0 as checkpoint.if_all_damaged="
            f"start_over asks{f' (they were moved to {aside})' if own else ''}"]}
    return {"path": None, "warnings": [], "error": (
        f"every complete checkpoint of {first.parent.parent} is damaged: {listing}. Restore them from a copy, or "
        f"start over with checkpoint.if_all_damaged=start_over (the damaged ones are moved to {aside}), or use a "
        "new run_dir")}


def select_resume(run_dir: str | Path, cfg: CheckpointConfig, warn: Callable[[str], None]) -> Path | None:
    """The verified checkpoint to resume from, or None (start at step 0). A collective: every rank calls it after
    ``ptrain.distributed.init``; rank 0 verifies and decides (falling back past damaged checkpoints, each named
    through ``warn``) and every rank gets the same answer. CheckpointError when nothing usable is left and the
    config does not ask to start over."""
    decision = _choose(run_dir, cfg) if du.rank() == 0 else None
    decision = du.broadcast_object(decision)
    for line in decision["warnings"]:
        warn(line)
    if decision["error"]:
        raise CheckpointError(decision["error"])
    return Path(decision["path"]) if decision["path"] else None


# ----------------------------------------------------------------------------------------------
# load


def load(engine, path: Path, zero_stage: int, precision: str) -> tuple[dict[str, Any], str]:
    """Restore ``engine`` (+ this rank's RNG) from checkpoint ``path`` (verified by :func:`select_resume`); returns
    (trainer state, how). CheckpointError: a DeepSpeed file refused by the restricted loader, or no way to load."""
    state = json.loads((path / STATE_FILE).read_text())
    world = du.world_size()
    same_layout = (state["world_size"], state["zero_stage"], state["precision"]) == (world, zero_stage, precision)
    if same_layout:
        try:  # DeepSpeed's files through a loader that unpickles tensors and plain containers only
            engine.load(str(path), NATIVE_TAG)
        except ValueError as e:
            raise CheckpointError(f"checkpoint {path}: {e}") from None
        how = "DeepSpeed state (same world size and ZeRO stage)"
    else:
        moments_file = path / "consolidated" / "moments.safetensors"
        if not moments_file.is_file():
            raise CheckpointError(
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
