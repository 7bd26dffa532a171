"""Shard writing and verification: atomic, reproducible tars + sidecars, and the resume scan of an output directory.

A shard is committed in this order: write ``.<name>.tar.tmp`` -> fsync -> rename to ``<name>.tar`` -> fsync the
directory -> write the sidecar ``<name>.json`` the same way. The sidecar is the done marker: a tar without a sidecar,
or whose size or sha256 disagree with it, is not committed and is rewritten by the next run.

Tars are a pure function of their samples: members sorted by name, mtime 0, uid/gid 0, mode 0644, GNU format
(long names), so a rerun produces byte-identical files. Member names, keys and the sidecar's schema are the shard
contract's (``ptrain.data.format``): members are only ``KEY.txt``, ``KEY.json`` and ``KEY.NNN.jpg``.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import tarfile
from pathlib import Path

from ptrain.data.format import (
    FORMAT_VERSION,
    check_key,
    check_sidecar,
    encode_sample,
    make_sidecar,
    sidecar_path,
    split_member,
)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


class _HashingWriter(io.RawIOBase):
    def __init__(self, f):
        self.f = f
        self.sha = hashlib.sha256()
        self.size = 0

    def writable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.size

    def write(self, b) -> int:
        self.sha.update(b)
        self.size += len(b)
        return self.f.write(b)


def write_shard(out: Path, stem: str, samples: list[tuple[str, dict[str, bytes]]], extra: dict) -> dict:
    """Write ``samples`` ([(key, {suffix: bytes})], suffix like ``txt`` or ``003.jpg``) as ``out/stem.tar`` and its
    sidecar; return the sidecar dict. The sidecar's ``offsets[i]`` is ``[start, length]`` of sample ``keys[i]``
    in the tar (its headers and members), so a reader can seek straight to a sample."""
    members = []
    for key, parts in samples:
        check_key(key)
        for suffix, data in parts.items():
            name = f"{key}.{suffix}"
            if split_member(name) is None:
                raise ValueError(f"{name}: shards hold only KEY.txt, KEY.json and KEY.NNN.jpg members")
            members.append((name, data))
    members.sort(key=lambda m: m[0])
    tar_path = out / f"{stem}.tar"
    tmp = out / f".{stem}.tar.tmp"
    with open(tmp, "wb") as f:
        hw = _HashingWriter(f)
        spans: dict[str, list[int]] = {}  # key -> [byte offset of its first header, length of its members]
        with tarfile.open(fileobj=hw, mode="w", format=tarfile.GNU_FORMAT) as tar:
            for name, data in members:
                start = tar.offset
                info = tarfile.TarInfo(name)
                info.size = len(data)
                info.mtime = 0
                info.mode = 0o644
                info.uid = info.gid = 0
                info.uname = info.gname = ""
                tar.addfile(info, io.BytesIO(data))
                span = spans.setdefault(split_member(name)[0], [start, 0])
                span[1] = tar.offset - span[0]
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, tar_path)
    _fsync_dir(out)
    keys = sorted(k for k, _ in samples)
    sidecar = make_sidecar(tar_path.name, keys, [spans[k] for k in keys if k in spans], hw.size,
                           hw.sha.hexdigest(), **extra)
    write_atomic(Path(sidecar_path(str(tar_path))), json.dumps(sidecar, indent=1, sort_keys=True).encode())
    return sidecar


def file_sha256(path: Path) -> tuple[int, str]:
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
            size += len(chunk)
    return size, h.hexdigest()


class ForeignShardsError(RuntimeError):
    """The output directory holds shard files this plan did not write (other inputs, settings or versions)."""


def foreign_plan_message(out: Path, marker_plan: str, plan_hash: str) -> str:
    return (f"{out}: holds shards of a different plan ({marker_plan[:12]}; this run is {plan_hash[:12]}): the "
            "inputs or output-affecting settings changed. Shard into a new out=DIR, or delete the old shards "
            "(and .ptrain_shard/) if you mean to replace them.")


def shard_facts(out: Path, stem: str) -> dict | None:
    """``{"tar": [bytes, mtime_ns], "json": [bytes, mtime_ns]}`` of a committed shard's two files (two stats, no
    read), or None when one is missing: what a resume compares with the group record to trust a shard unread."""
    try:
        t = os.stat(out / f"{stem}.tar")
        j = os.stat(out / f"{stem}.json")
    except FileNotFoundError:
        return None
    return {"tar": [t.st_size, t.st_mtime_ns], "json": [j.st_size, j.st_mtime_ns]}


def _check_stem(out: Path, stem: str, plan_hash: str, versions: dict, removed: list[str],
                names: set[str] | None = None) -> dict | None:
    """Verify one planned shard in full (sidecar read and checked, tar re-hashed): its sidecar when committed;
    otherwise its files are removed (they are a crash's leftovers) and None returned."""
    def present(name: str) -> bool:
        return name in names if names is not None else (out / name).exists()

    for tmp in (f".{stem}.tar.tmp", f".{stem}.json.tmp"):
        if present(tmp):
            (out / tmp).unlink(missing_ok=True)
            removed.append(tmp)
    tar_path = out / f"{stem}.tar"
    side = Path(sidecar_path(str(tar_path)))
    if not present(tar_path.name):
        if present(side.name):
            side.unlink(missing_ok=True)
            removed.append(side.name)
        return None
    sidecar = None
    if side.is_file():
        try:
            sidecar = json.loads(side.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            sidecar = None
    if isinstance(sidecar, dict) and sidecar.get("versions") not in (None, versions):
        raise ForeignShardsError(
            f"{tar_path}: written with {sidecar.get('versions')}, this run has {versions}; a resume must use "
            "the same library versions to produce identical shards. Finish with the old environment, or "
            "shard into a new out=DIR."
        )
    if isinstance(sidecar, dict) and sidecar.get("format_version", 1) != FORMAT_VERSION:
        # same plan and libraries, but samples of another shard format: never mix two formats in one output
        raise ForeignShardsError(
            f"{tar_path}: written in shard format {sidecar.get('format_version', 1)!r}, this run writes format "
            f"{FORMAT_VERSION}; a resume must write the same format. Finish with the ptrain that started it, or "
            "shard into a new out=DIR."
        )
    try:  # a sidecar that is not well formed is a damaged commit of ours: the shard is written again
        sidecar = check_sidecar(sidecar, where=str(side)) if sidecar is not None else None
    except ValueError:
        sidecar = None
    ok = (
        isinstance(sidecar, dict)
        and sidecar.get("plan_hash") == plan_hash
        and tar_path.stat().st_size == sidecar.get("bytes")
        and file_sha256(tar_path)[1] == sidecar.get("sha256")
    )
    if ok:
        return sidecar
    tar_path.unlink()
    side.unlink(missing_ok=True)
    removed.append(tar_path.name)
    return None


def _check_owner(out: Path, stems, plan_hash: str, marker_plan: str | None, names: set[str]) -> None:
    if marker_plan is None:
        ours = next((s for s in stems if f"{s}.tar" in names or f"{s}.json" in names), None)
        if ours is not None:
            raise ForeignShardsError(
                f"{out}: holds {ours}.tar/.json but no {out.name}/.ptrain_shard/plan.json: these files were not "
                "written by `ptrain shard`. Shard into a new out=DIR, or move those files away."
            )
    elif marker_plan != plan_hash:
        raise ForeignShardsError(foreign_plan_message(out, marker_plan, plan_hash))


def scan_output(out: Path, stems: list[str], plan_hash: str, versions: dict, marker_plan: str | None
                ) -> tuple[dict[str, dict], list[str]]:
    """Find the committed shards among the planned ``stems``, verifying each in full, and clean up what a crash
    left of ours.

    Returns ``({stem: sidecar}, removed_names)``. Only files of the planned stems are looked at: their partial
    files (``.STEM.tar.tmp``, ``.STEM.json.tmp``), a tar without a sidecar (a crash between rename and sidecar)
    and a tar whose size or sha256 disagree with its sidecar are removed. Anything that this plan did not write
    is never touched: shard files in a directory without our plan marker (``marker_plan`` is None), a marker or
    sidecar of another plan, or a sidecar written with other library versions or in another shard format raise
    ``ForeignShardsError``. Sidecars are checked with the contract's ``check_sidecar``: a malformed one is a damaged
    commit (its shard is removed and written again).
    """
    removed: list[str] = []
    committed: dict[str, dict] = {}
    names = set(os.listdir(out))
    _check_owner(out, stems, plan_hash, marker_plan, names)
    for stem in stems:
        sidecar = _check_stem(out, stem, plan_hash, versions, removed, names)
        if sidecar is not None:
            committed[stem] = sidecar
    return committed, removed


def summary(sidecar: dict, facts: dict | None) -> dict:
    """What the manifest and a group record keep of a committed shard (never its keys or offsets)."""
    return {"shard": sidecar["shard"], "samples": sidecar["samples"], "bytes": sidecar["bytes"],
            "sha256": sidecar["sha256"], "facts": facts}


def resume_scan(out: Path, groups: list[tuple[int, list[str]]], records: dict[int, dict], plan_hash: str,
                versions: dict, marker_plan: str | None, verify: str = "quick", rng=None
                ) -> tuple[dict[str, dict], set[int], list[str], int]:
    """Which shard groups of the plan are done, trusting their records: ``(committed {stem: summary}, done group
    indices, removed file names, shards re-hashed)``.

    ``groups`` is ``[(group index, [shard stems])]`` and ``records`` the group records a finished writer left
    (``{group index: record}``). A shard of a recorded group whose tar and sidecar have the size and mtime the
    record states is trusted without opening either file (``verify="quick"``); ``verify="full"`` re-hashes every
    one, and a fraction (``"0.01"``) a random sample of them. Any other shard is verified in full (``_check_stem``):
    those of the groups that were running when a run stopped. A group is done when it has a record and all its
    shards are committed. The directory is listed once; nothing else of it is read."""
    removed: list[str] = []
    committed: dict[str, dict] = {}
    done: set[int] = set()
    names = set(os.listdir(out))
    _check_owner(out, (s for _g, stems in groups for s in stems), plan_hash, marker_plan, names)
    fraction = 1.0 if verify == "full" else 0.0 if verify == "quick" else float(verify)
    rehashed = 0
    for g, stems in groups:
        rec = records.get(g)
        if rec is not None and rec.get("versions") != versions:
            raise ForeignShardsError(
                f"{out}: shard group {g} was written with {rec.get('versions')}, this run has {versions}; a resume "
                "must use the same library versions to produce identical shards. Finish with the old environment, "
                "or shard into a new out=DIR.")
        all_in = rec is not None
        for stem in stems:
            known = rec["shards"].get(stem) if rec is not None else None
            both = f"{stem}.tar" in names and f"{stem}.json" in names
            spot_check = fraction and (fraction >= 1.0 or (rng or random).random() < fraction)
            if known is not None and both and not spot_check and shard_facts(out, stem) == known.get("facts"):
                committed[stem] = known
                continue
            leftovers = (f"{stem}.tar", f"{stem}.json", f".{stem}.tar.tmp", f".{stem}.json.tmp")
            if known is not None or any(name in names for name in leftovers):
                rehashed += both
                sidecar = _check_stem(out, stem, plan_hash, versions, removed, names)
                if sidecar is not None:
                    committed[stem] = summary(sidecar, shard_facts(out, stem))
                    continue
            all_in = False
        if all_in:
            done.add(g)
    return committed, done, removed, rehashed


def clip_sample(clip, info, frames: list) -> tuple[str, dict[str, bytes]]:
    """One planned clip as the members of a shard sample (``ptrain.data.format``). An ASR clip's caption is its
    text; a benchmark sample (``clip.bench``) holds every caption of its video (the first is KEY.txt), its ``split``,
    ``span`` (null: the whole video), paragraph ``sentences`` and the record's extra fields (one whose name a
    sample field already has is kept as ``annotation_<name>``: ActivityNet's annotated ``duration``)."""
    meta = {
        "video_id": clip.video_id, "clip_index": clip.clip_index, "start": clip.start, "end": clip.end,
        "frame_times": [pts for pts, _ in frames], "target_times": clip.targets, "fps": round(info.fps, 6),
        "width": info.width, "height": info.height, "duration": round(info.duration, 6),
    }
    bench = clip.bench
    if bench is None:
        meta.update(text=clip.text, captions=[clip.text], segments=clip.segments)
    else:
        meta.update(text=bench["captions"][0], captions=bench["captions"], split=bench["split"], span=bench["span"])
        if bench.get("sentences"):
            meta["sentences"] = [{"start": a, "end": b, "text": t} for a, b, t in bench["sentences"]]
        taken = set(meta) | {"key", "format_version", "segments", "sentences"}
        meta.update({(f"annotation_{k}" if k in taken else k): v for k, v in bench.get("meta", {}).items()})
    return clip.key, encode_sample(clip.key, meta, [jpg for _pts, jpg in frames])


def caption_counts(samples: list[tuple[str, dict[str, bytes]]]) -> list[int]:
    """Captions of each sample (``(key, members)``, in the order given): the sidecar's ``captions``."""
    return [len(json.loads(members["json"])["captions"]) for _key, members in samples]
