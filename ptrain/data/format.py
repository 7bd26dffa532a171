"""THE shard contract between `ptrain shard` and the loaders: member names, sample encoding, sidecar schema, keys.

    members = encode_sample(key, meta, frames_jpeg)          # {"txt": b"..", "json": b"..", "000.jpg": b"..", ...}
    sample = decode_sample(members)                          # Sample(key, text, captions, meta, frames, version)
    side = make_sidecar("shard-000000.tar", keys, offsets, size, sha256, plan_hash=..., versions=...)
    side = check_sidecar(json.loads(raw), where="OUT/shard-000000.json")   # ValueError naming the problem

Everything that writes or reads a shard goes through this module (``sharding/write.py``, ``sharding/job.py``, the
loaders in ``ptrain/data``, the test fixtures); ``docs/format.md`` describes the same contract in words. Stdlib only.

Format versions (``FORMAT_VERSION``; a sample's JSON says which one wrote it, version 1 wrote none):

- 2: ``captions`` is the list of caption *texts* of the sample (the retrieval queries: one for an ASR clip, every
  caption of a video for a benchmark), ``segments`` the merged ASR segments with their times, plus optional
  ``split`` and, for paragraph benchmarks, ``sentences`` (each ``{"start", "end", "text"}``).
- 1: ``captions`` held the merged ASR segments (``{"start", "end", "text"}``) and the one caption was ``text``.
  :func:`decode_sample` reads it as version 2 (``segments`` = the old ``captions``, ``captions`` = ``[text]``).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from typing import Any

FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)

# a key: the sanitised video id (letters, digits, '_' and '-') + '_' + the clip index; never a dot or a slash
KEY_RE = re.compile(r"^[A-Za-z0-9_-]+$")
_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")
# members of a sample: KEY.txt, KEY.json, KEY.NNN.jpg; anything else in a tar is ignored unread
MEMBER_RE = re.compile(r"^([^./\\]+)\.(\d+\.jpg|json|txt)$")
ALLOWED_EXTENSIONS = (".txt", ".json", ".jpg")
MAX_FRAMES = 1000  # frame suffixes are three digits
# the least a sample takes in a tar: three members (.jpg, .json, .txt), each a 512-byte header and a data block
MIN_SAMPLE_BYTES = 3 * 1024
# the most a reader takes from a tar: a member (a JPEG frame of any sane size, a caption), a sample's span and a
# sidecar. Bigger is damage, never an allocation; `ptrain shard` writes far less (a 224-pixel frame is ~20 KB).
MAX_MEMBER_BYTES = 64 << 20
MAX_SAMPLE_BYTES = 256 << 20
MAX_SIDECAR_BYTES = 64 << 20

MANIFEST = "manifest.json"
ERRORS = "errors.jsonl"
PROGRESS = "progress.json"  # a shard run's progress, rewritten as it runs (sharding/job.py)


class SampleError(ValueError):
    """A sample that cannot be used: bad JSON or caption, no frames, a metadata field of the wrong type."""


# ----------------------------------------------------------------------------------------------
# keys and names


def sanitize_id(video_id: str) -> str:
    """A key-safe form of a video id: no dots (WebDataset splits keys at the first dot), no slashes, no '..'.

    Unsafe characters become '-', and a short hash of the original is appended whenever anything changed, so two
    different ids can never collide. The original id is kept in the sample's JSON (``video_id``)."""
    safe = _UNSAFE.sub("-", video_id).strip("-") or "video"
    if safe != video_id:
        safe = f"{safe[:80]}-{hashlib.sha1(video_id.encode('utf-8')).hexdigest()[:8]}"
    return safe


def sample_key(video_id: str, clip_index: int) -> str:
    """``<sanitised video id>_<clip:04d>``."""
    return f"{sanitize_id(video_id)}_{clip_index:04d}"


def check_key(key: str) -> str:
    if not isinstance(key, str) or not KEY_RE.match(key):
        raise ValueError(f"unsafe sample key {key!r}: a key has only letters, digits, '_' and '-' (no '.' or '/')")
    return key


def frame_suffix(index: int) -> str:
    """The member suffix of frame ``index``: ``003.jpg``."""
    if not 0 <= index < MAX_FRAMES:
        raise ValueError(f"frame index {index} is outside 0..{MAX_FRAMES - 1}")
    return f"{index:03d}.jpg"


def split_member(name: str) -> tuple[str, str] | None:
    """``"abc_0001.003.jpg"`` -> ``("abc_0001", "003.jpg")``; None for a name that is not a sample member."""
    m = MEMBER_RE.match(name)
    return (m.group(1), m.group(2)) if m else None


def shard_stem(name: str, index: int) -> str:
    """``<name>-NNNNNN``: the tar is ``<stem>.tar`` and its sidecar ``<stem>.json``."""
    return f"{name}-{index:06d}"


def sidecar_path(tar_path: str) -> str:
    return tar_path[: -len(".tar")] + ".json" if tar_path.endswith(".tar") else tar_path + ".json"


# ----------------------------------------------------------------------------------------------
# samples


@dataclass
class Sample:
    """One decoded sample (frames still JPEG bytes, in temporal order)."""

    key: str
    text: str  # KEY.txt: the training caption of an ASR clip, the first caption of a benchmark video
    captions: list[str]  # every caption text of the sample (the retrieval queries); never empty
    meta: dict[str, Any]  # KEY.json, upgraded to the current version
    frames: list[bytes] = field(default_factory=list)
    version: int = FORMAT_VERSION

    @property
    def video_id(self) -> str:
        """The video's id; '' only when the JSON says so (the row is then its own contrastive group)."""
        return str(self.meta["video_id"]) if "video_id" in self.meta else self.key.rsplit("_", 1)[0]


def encode_sample(key: str, meta: dict[str, Any], frames: list[bytes], text: str | None = None) -> dict[str, bytes]:
    """The members of one sample, ``{suffix: bytes}``. ``meta`` must hold ``captions`` (a non-empty list of caption
    texts); ``text`` (KEY.txt) defaults to ``meta["text"]``, else the first caption. ``format_version`` and ``key``
    are added to the JSON, which is written with sorted keys (byte-identical for the same inputs)."""
    check_key(key)
    captions = meta.get("captions")
    if not isinstance(captions, list) or not captions or not all(isinstance(c, str) for c in captions):
        raise ValueError(f"sample {key}: meta['captions'] must be a non-empty list of caption texts, got {captions!r}")
    if text is None:
        text = meta["text"] if isinstance(meta.get("text"), str) else captions[0]
    if len(frames) > MAX_FRAMES:
        raise ValueError(f"sample {key}: {len(frames)} frames, at most {MAX_FRAMES}")
    members = {
        "txt": text.encode("utf-8"),
        "json": json.dumps({**meta, "key": key, "format_version": FORMAT_VERSION}, sort_keys=True,
                           ensure_ascii=False).encode("utf-8"),
    }
    for j, jpg in enumerate(frames):
        members[frame_suffix(j)] = jpg
    return members


def _upgrade(meta: dict[str, Any], text: str) -> tuple[dict[str, Any], int]:
    """Metadata of any readable version as version 2, and the version it was written in."""
    version = meta.get("format_version", 1)
    if isinstance(version, bool) or not isinstance(version, int) or version not in READABLE_VERSIONS:
        raise SampleError(f"format_version {version!r} is not one this ptrain reads ({READABLE_VERSIONS}); "
                          "upgrade ptrain or re-shard")
    if version == 1:
        old = meta.get("captions")
        meta = dict(meta)
        meta["segments"] = old if isinstance(old, list) else []
        meta["captions"] = [text]
        meta["format_version"] = 1
    return meta, version


def decode_sample(members: dict[str, bytes], key: str = "") -> Sample:
    """Parse one sample's members (JPEG frames stay bytes). SampleError when it is unusable."""
    try:
        meta = json.loads(members["json"])
        text = members["txt"].decode("utf-8")
    except KeyError as e:
        raise SampleError(f"member .{e.args[0]} missing") from None
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise SampleError(f"bad caption or metadata ({type(e).__name__}: {e})") from None
    if not isinstance(meta, dict):
        raise SampleError("metadata JSON is not an object")
    meta, version = _upgrade(meta, text)
    captions = meta.get("captions")
    if not isinstance(captions, list) or not captions or not all(isinstance(c, str) for c in captions):
        raise SampleError("metadata 'captions' is not a non-empty list of texts")
    frames = sorted((k for k in members if k.endswith(".jpg")), key=lambda k: int(k.split(".", 1)[0]))
    if not frames:
        raise SampleError("no frames")
    return Sample(key or str(meta.get("key", "")), text, list(captions), meta, [members[k] for k in frames], version)


# ----------------------------------------------------------------------------------------------
# sidecars


def make_sidecar(shard: str, keys: list[str], offsets: list[list[int]], size: int, sha256: str,
                 **extra: Any) -> dict[str, Any]:
    """The sidecar of a committed tar: ``shard`` (file name), ``samples``, ``keys`` (sorted), ``offsets``
    (``[start, length]`` of each key's members, in key order), ``bytes``, ``sha256``, ``format_version`` and the
    writer's ``extra`` fields (``plan_hash``, ``versions``, optionally ``captions``: caption counts in key order)."""
    return {"shard": shard, "samples": len(keys), "keys": list(keys), "offsets": [list(o) for o in offsets],
            "bytes": int(size), "sha256": sha256, "format_version": FORMAT_VERSION, **extra}


def check_sidecar(data: Any, where: str) -> dict[str, Any]:
    """``data`` if it is a well-formed sidecar; a ValueError naming ``where`` and the problem otherwise.

    Counts and spans are checked against each other and against ``bytes`` here, so no reader sizes an allocation
    or a read by a number the tar does not back (a sidecar of 10^12 samples or spans past the end is refused)."""
    def bad(why: str) -> ValueError:
        return ValueError(f"{where}: {why}; the shard is not trusted (re-run `ptrain shard` to rewrite it)")

    if not isinstance(data, dict):
        raise bad("the sidecar is not a JSON object")
    n = data.get("samples")
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise bad(f"'samples' must be a non-negative integer, got {n!r}")
    size = data.get("bytes")
    if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 0):
        raise bad(f"'bytes' must be a non-negative integer, got {size!r}")
    if size is not None and n * MIN_SAMPLE_BYTES > size:
        raise bad(f"{n} samples cannot fit in a {size}-byte tar")
    keys = data.get("keys")
    if keys is not None:
        if not isinstance(keys, list) or len(keys) != n or not all(isinstance(k, str) for k in keys):
            raise bad(f"'keys' must list {n} key strings (one per sample)")
    offsets = data.get("offsets")
    if offsets is not None:
        if not isinstance(offsets, list) or len(offsets) != n:
            raise bad(f"'offsets' must hold one [start, length] per sample ({n})")
        for o in offsets:
            if (not isinstance(o, list) or len(o) != 2 or not all(isinstance(x, int) and not isinstance(x, bool)
                                                                   for x in o) or o[0] < 0 or o[1] <= 0):
                raise bad(f"'offsets' entry {o!r} is not [start >= 0, length > 0]")
            if o[1] > MAX_SAMPLE_BYTES:
                raise bad(f"the span {o} is longer than a sample can be ({MAX_SAMPLE_BYTES} bytes)")
            if size is not None and o[0] + o[1] > size:
                raise bad(f"the span {o} lies past the end of the {size}-byte tar")
    captions = data.get("captions")
    if captions is not None and (not isinstance(captions, list) or len(captions) != n or not all(
            isinstance(c, int) and not isinstance(c, bool) and c >= 1 for c in captions)):
        raise bad(f"'captions' must hold one caption count >= 1 per sample ({n})")
    version = data.get("format_version", 1)
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise bad(f"'format_version' must be a positive integer, got {version!r}")
    if version > FORMAT_VERSION:
        raise bad(f"written in shard format {version}, this ptrain reads up to {FORMAT_VERSION}: upgrade ptrain")
    return data
