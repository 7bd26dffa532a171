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
import tarfile
from pathlib import Path

from ptrain.data.format import (
    FORMAT_VERSION,
    check_key,
    check_sidecar,
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


def scan_output(out: Path, stems: list[str], plan_hash: str, versions: dict, marker_plan: str | None
                ) -> tuple[dict[str, dict], list[str]]:
    """Find the committed shards among the planned ``stems`` and clean up what a crash left of ours.

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
    ours = [s for s in stems if (out / f"{s}.tar").exists() or (out / f"{s}.json").exists()]
    if marker_plan is None and ours:
        raise ForeignShardsError(
            f"{out}: holds {ours[0]}.tar/.json but no {out.name}/.ptrain_shard/plan.json: these files were not "
            "written by `ptrain shard`. Shard into a new out=DIR, or move those files away."
        )
    if marker_plan is not None and marker_plan != plan_hash:
        raise ForeignShardsError(
            f"{out}: holds shards of a different plan ({marker_plan[:12]}; this run is {plan_hash[:12]}): the "
            "inputs or output-affecting settings changed. Shard into a new out=DIR, or delete the old shards "
            "(and .ptrain_shard/) if you mean to replace them."
        )
    for stem in stems:
        for tmp in (out / f".{stem}.tar.tmp", out / f".{stem}.json.tmp"):
            if tmp.exists():
                tmp.unlink()
                removed.append(tmp.name)
        tar_path = out / f"{stem}.tar"
        side = Path(sidecar_path(str(tar_path)))
        if not tar_path.exists():
            if side.exists():
                side.unlink()
                removed.append(side.name)
            continue
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
            committed[stem] = sidecar
        else:
            tar_path.unlink()
            side.unlink(missing_ok=True)
            removed.append(tar_path.name)
    return committed, removed
