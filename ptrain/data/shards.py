"""Shard discovery, sidecars and the per-sample byte-offset index of a tar (no torch).

    shards = discover(["/data/howto100m", "/data/x/shard-{000000..000009}.tar"])
    index = index_tar(shards[0].path)           # walks tar headers only, never member data
    members = read_sample(f, index.samples[k])   # {"000.jpg": b"...", "json": b"...", "txt": b"..."}

Why our own reader and not ``webdataset.WebDataset``: exact resume needs random access to one sample by
byte offset, which a sequential tar stream cannot do, and webdataset's default decoders would unpickle
``.pyd``/``.pth`` members unless WDS_SECURE is set. Here only ``.jpg``, ``.json`` and ``.txt`` members
are ever read, and member names are never used as file system paths (nothing is extracted).
"""

from __future__ import annotations

import glob
import json
import logging
import os
import re
import tarfile
from dataclasses import dataclass, field
from typing import IO, Iterator

# members a sample may have; anything else in a tar is ignored unread
_MEMBER_RE = re.compile(r"^([^./\\]+)\.(\d+\.jpg|json|txt)$")
_URL_RE = re.compile(r"^(pipe:|[a-zA-Z][a-zA-Z0-9+.-]*://)")
log = logging.getLogger(__name__)
_BLOCK = 512
_ZERO_BLOCK = bytes(_BLOCK)


@dataclass(frozen=True)
class Shard:
    """One complete shard: its tar, its sample count (from the sidecar) and which source it belongs to."""

    path: str
    samples: int
    source: int = 0
    stream: bool = False  # a URL or pipe: read sequentially, no seeking


@dataclass
class SampleEntry:
    """Where one sample's members live inside its tar."""

    key: str
    members: dict[str, tuple[int, int]] = field(default_factory=dict)  # suffix -> (data offset, size)

    @property
    def num_frames(self) -> int:
        return sum(1 for s in self.members if s.endswith(".jpg"))


@dataclass
class TarIndex:
    """Samples of one tar in tar order, and what the walk found wrong."""

    samples: list[SampleEntry]
    by_key: dict[str, int]
    truncated: bool = False  # the walk ended at damage (cut file, garbled header), not at end-of-archive
    ignored_members: int = 0  # members with another extension or a bad name
    incomplete_samples: int = 0  # samples without .json, .txt or frames (e.g. cut by the damage)


def is_url(path: str) -> bool:
    return bool(_URL_RE.match(path))


def expand_braces(pattern: str) -> list[str]:
    """``a-{000..002}.tar`` -> 3 names (zero padding kept); ``{x,y}`` alternatives; nested left to right."""
    m = re.search(r"\{([^{}]*)\}", pattern)
    if not m:
        return [pattern]
    head, body, tail = pattern[: m.start()], m.group(1), pattern[m.end() :]
    rng = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if rng:
        lo, hi = rng.group(1), rng.group(2)
        width = len(lo) if lo.startswith("0") or len(lo) == len(hi) else 0
        step = 1 if int(hi) >= int(lo) else -1
        items = [str(i).zfill(width) for i in range(int(lo), int(hi) + step, step)]
    else:
        items = body.split(",")
    return [out for item in items for out in expand_braces(head + item + tail)]


def sidecar_path(tar_path: str) -> str:
    return tar_path[: -len(".tar")] + ".json" if tar_path.endswith(".tar") else tar_path + ".json"


def read_sidecar(tar_path: str) -> dict | None:
    """The sidecar of a local shard, or None when it is missing (the shard is incomplete)."""
    try:
        with open(sidecar_path(tar_path), "rb") as f:
            data = json.loads(f.read())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise ValueError(
            f"{sidecar_path(tar_path)}: unreadable sidecar ({e}); delete it and re-run ptrain shard"
        ) from None
    if not isinstance(data, dict) or not isinstance(data.get("samples"), int) or data["samples"] < 0:
        raise ValueError(f"{sidecar_path(tar_path)}: sidecar has no integer 'samples'; re-run ptrain shard")
    return data


def _local_tars(spec: str) -> list[str]:
    paths: list[str] = []
    for pattern in expand_braces(spec):
        if os.path.isdir(pattern):
            paths.extend(sorted(glob.glob(os.path.join(glob.escape(pattern), "*.tar"))))
        elif glob.has_magic(pattern):
            paths.extend(sorted(p for p in glob.glob(pattern) if p.endswith(".tar")))
        else:
            paths.append(pattern)
    return paths


def discover(specs: list[str], stats: dict | None = None) -> list[Shard]:
    """Complete shards of every source spec, in a stable order (sources in order, paths sorted).

    A local tar without a sidecar is incomplete (still being written, or its job failed): it is
    skipped and counted in ``stats["shards_incomplete"]``; one with an unreadable sidecar is skipped
    and counted in ``stats["shards_bad_sidecar"]``. A source that yields no shard is an error.
    """
    stats = stats if stats is not None else {}
    out: list[Shard] = []
    for i, spec in enumerate(specs):
        source = i
        found: list[Shard] = []
        if is_url(spec):
            for url in expand_braces(spec):
                found.append(Shard(path=url, samples=-1, source=source, stream=True))
        else:
            for path in _local_tars(spec):
                if not os.path.isfile(path):
                    raise ValueError(f"shard source {spec!r}: {path} does not exist; check the path or pattern")
                try:
                    side = read_sidecar(path)
                except ValueError as e:  # a garbled sidecar: the shard cannot be trusted, skip it
                    stats["shards_bad_sidecar"] = stats.get("shards_bad_sidecar", 0) + 1
                    log.warning("skipping shard: %s", e)
                    continue
                if side is None:
                    stats["shards_incomplete"] = stats.get("shards_incomplete", 0) + 1
                    continue
                if side["samples"] > 0:
                    found.append(Shard(path=path, samples=side["samples"], source=source))
        if not found:
            raise ValueError(
                f"shard source {spec!r} has no complete shard (a shard is <name>-NNNNNN.tar with its .json "
                "sidecar); point it at a `ptrain shard` output directory or a pattern matching its .tar files"
            )
        out.extend(found)
    return out


def _split_name(name: str) -> tuple[str, str] | None:
    m = _MEMBER_RE.match(name)
    return (m.group(1), m.group(2)) if m else None


def _octal(field: bytes) -> int:
    if field[:1] and field[0] & 0x80:  # GNU base-256 for sizes >= 8 GiB
        return int.from_bytes(field[1:], "big")
    digits = field.strip(b" \0")
    return int(digits, 8) if digits else 0


def _pax_records(data: bytes) -> dict[str, str]:
    out, pos = {}, 0
    while pos < len(data):
        space = data.index(b" ", pos)
        length = int(data[pos:space])
        key, _, value = data[space + 1 : pos + length - 1].partition(b"=")
        out[key.decode("utf-8", "replace")] = value.decode("utf-8", "replace")
        pos += length
    return out


def _walk(read, size: int) -> tuple[list[tuple[str, int, int]], str]:
    """Regular-file members ``(name, data offset, size)`` from tar headers read with ``read(off, n)``
    over ``size`` bytes, and why the walk stopped: ``"end"`` (zero end-of-archive block), ``"eof"``
    (exactly at ``size``) or ``"damaged"`` (cut header, bad checksum, data past ``size``)."""
    out: list[tuple[str, int, int]] = []
    off, long_name, pax = 0, None, {}
    while True:
        if off == size:
            return out, "eof"
        hdr = read(off, _BLOCK)
        if len(hdr) < _BLOCK:
            return out, "damaged"
        if hdr == _ZERO_BLOCK:
            return out, "end"
        try:
            stored = _octal(hdr[148:156])
            member_size = _octal(hdr[124:136])
        except ValueError:
            return out, "damaged"
        if stored != sum(hdr[:148]) + 256 + sum(hdr[156:]):  # the checksum counts its own field as spaces
            return out, "damaged"
        kind = hdr[156:157]
        data_off = off + _BLOCK
        if data_off + member_size > size:
            return out, "damaged"
        if kind in (b"x", b"L"):  # a pax header or GNU long name describes the next member
            data = read(data_off, member_size)
            if kind == b"L":
                long_name = data.rstrip(b"\0").decode("utf-8", "replace")
            else:
                try:
                    pax = _pax_records(data)
                except ValueError:
                    return out, "damaged"
        elif kind in (b"0", b"\0", b"7"):
            name = hdr[:100].rstrip(b"\0").decode("utf-8", "replace")
            if hdr[257:262] == b"ustar" and hdr[345] != 0:
                name = hdr[345:500].rstrip(b"\0").decode("utf-8", "replace") + "/" + name
            name = pax.get("path", long_name or name)
            member_size = int(pax.get("size", member_size))
            if data_off + member_size > size:
                return out, "damaged"
            out.append((name, data_off, member_size))
            long_name, pax = None, {}
        elif kind != b"g":  # directories, links: nothing to read (a global pax header changes nothing we use)
            long_name, pax = None, {}
        off = data_off + -(-member_size // _BLOCK) * _BLOCK


def walk_tar(path: str) -> tuple[list[tuple[str, int, int]], bool]:
    """``([(name, data offset, size) of regular files], damaged)`` of a local tar, from its headers.

    One 512-byte ``pread`` per member; member data is skipped by offset, never read (~5x faster than
    ``tarfile``: ~0.17 s for a 1000-sample, 14000-member shard). Understands ustar, pax and GNU long
    names. ``damaged``: the walk ended anywhere but at a zero end-of-archive block.
    """
    size = os.path.getsize(path)
    fd = os.open(path, os.O_RDONLY)
    try:
        members, status = _walk(lambda off, n: os.pread(fd, n, off), size)
    finally:
        os.close(fd)
    return members, status != "end"


def parse_span(blob: bytes) -> tuple[str, dict[str, tuple[int, int]]] | None:
    """``(key, {suffix: (offset in blob, size)})`` of the one sample whose tar span is ``blob``
    (starting at a header); None when the span is not well-formed or holds several keys."""
    members, status = _walk(lambda off, n: blob[off : off + n], len(blob))
    if status == "damaged":
        return None
    key, out = None, {}
    for name, off, n in members:
        parts = _split_name(name)
        if parts is None:
            continue
        if key not in (None, parts[0]):
            return None
        key = parts[0]
        out[parts[1]] = (off, n)
    return (key, out) if key is not None else None


def index_tar(path: str) -> TarIndex:
    """The per-sample offset index of a local tar (see :func:`walk_tar`).

    A sample is kept only when it has its ``.json``, ``.txt`` and at least one frame; a tar cut short
    keeps the samples before the damage and sets ``truncated``.
    """
    members, damaged = walk_tar(path)
    samples: list[SampleEntry] = []
    by_key: dict[str, int] = {}
    ignored = 0
    for name, off, n in members:
        parts = _split_name(name)
        if parts is None:
            ignored += 1
            continue
        key, suffix = parts
        idx = by_key.get(key)
        if idx is None:
            by_key[key] = idx = len(samples)
            samples.append(SampleEntry(key))
        samples[idx].members[suffix] = (off, n)
    # members sort as KEY.NNN.jpg < KEY.json < KEY.txt, so a sample with its .txt is whole
    complete = [s for s in samples if "json" in s.members and "txt" in s.members and s.num_frames > 0]
    return TarIndex(
        samples=complete,
        by_key={s.key: i for i, s in enumerate(complete)},
        truncated=damaged,
        ignored_members=ignored,
        incomplete_samples=len(samples) - len(complete),
    )


def read_span(f: IO[bytes], start: int, length: int) -> tuple[str, dict[str, bytes]]:
    """``(key, {suffix: bytes})`` of one sample from its ``[start, start + length)`` byte span, as
    listed in a sidecar's ``offsets`` (no walk over the whole tar). EOFError / ValueError when damaged."""
    f.seek(start)
    blob = f.read(length)
    if len(blob) != length:
        raise EOFError(f"the tar ends inside the sample at byte {start}")
    parsed = parse_span(blob)
    if parsed is None:
        raise ValueError(f"no well-formed sample at byte {start}")
    key, members = parsed
    return key, {suffix: blob[off : off + n] for suffix, (off, n) in members.items()}


def read_sample(f: IO[bytes], entry: SampleEntry) -> dict[str, bytes]:
    """The member bytes of one sample, read with one seek (a sample's members are contiguous)."""
    spans = sorted(entry.members.values())
    start, end = spans[0][0], spans[-1][0] + spans[-1][1]
    f.seek(start)
    blob = f.read(end - start)
    if len(blob) != end - start:
        raise EOFError(f"sample {entry.key}: the tar ends inside it")
    return {suffix: blob[off - start : off - start + n] for suffix, (off, n) in entry.members.items()}


def iter_tar_stream(stream: IO[bytes], stats: dict) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Samples of a tar read front to back (URLs, pipes): ``(key, {suffix: bytes})``.

    Reading stops quietly at damage (counted in ``stats["shards_truncated"]``); the samples before it
    are kept, a sample cut in half is dropped and counted.
    """
    current: tuple[str, dict[str, bytes]] | None = None
    try:
        with tarfile.open(fileobj=stream, mode="r|") as tf:
            for info in tf:
                parts = _split_name(info.name) if info.isfile() else None
                if parts is None:
                    continue
                key, suffix = parts
                data = tf.extractfile(info).read()
                if len(data) != info.size:
                    raise tarfile.ReadError("unexpected end of data")
                if current is not None and current[0] != key:
                    yield current
                    current = None
                if current is None:
                    current = (key, {})
                current[1][suffix] = data
    except (tarfile.TarError, EOFError, OSError):
        stats["shards_truncated"] = stats.get("shards_truncated", 0) + 1
        if current is not None:
            stats["samples_truncated"] = stats.get("samples_truncated", 0) + 1
        return
    if current is not None:
        yield current


def open_stream(url: str) -> IO[bytes]:
    """A readable byte stream for a URL or ``pipe:CMD`` source (webdataset's gopen: curl, pipes, files)."""
    from webdataset.gopen import gopen

    return gopen(url, "rb")

