"""Writers of small shards in the exact `ptrain shard` format, for the loader tests and benchmark.

    keys = write_shards(tmp_path, num_shards=3, samples_per_shard=5, frames=[2, 4, 6], size=(32, 40))

Format: ``ptrain/data/format.py`` (docs/format.md): ``<name>-NNNNNN.tar`` with members sorted by name
(``KEY.000.jpg ... KEY.json KEY.txt``, encoded by ``encode_sample``), fixed mtime/uid/gid, and a sidecar
``<name>-NNNNNN.json`` (``make_sidecar``) written after the tar. These writers build the tar themselves (USTAR,
optionally without offsets) so that tests can also make shards the real writer never would. Frame ``t`` of a
sample is a textured image whose mean red value encodes ``t`` (``frame_level(t)``), so tests can tell frames apart.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import simplejpeg

from ptrain.data.format import encode_sample, make_sidecar, shard_stem


def frame_level(t: int) -> int:
    """Mean red value written into frame ``t`` (distinguishable after JPEG)."""
    return 20 + 15 * (t % 15)


def make_frame(h: int, w: int, t: int, seed: int, noise: float = 6.0) -> np.ndarray:
    """A textured RGB frame: smooth moving gradients plus mild noise (JPEG sizes like real video)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    phase = seed * 0.37 + t * 0.2
    base = np.stack([np.sin(x / (7 + c) + phase) * np.cos(y / (11 + c) - phase) for c in range(3)], -1) * 60 + 128
    base += rng.normal(0, noise, base.shape)
    base[..., 0] += frame_level(t) - base[..., 0].mean()
    return np.clip(base, 0, 255).astype(np.uint8)


def _add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode, info.uid, info.gid = len(data), 0, 0o644, 0, 0
    info.uname = info.gname = ""
    tf.addfile(info, io.BytesIO(data))


def write_shard(out: Path, name: str, index: int, samples: list[dict], offsets: bool = False) -> Path:
    """One tar + sidecar. A sample is ``{"key", "video_id", "caption", "frames": [HWC uint8], **meta}``;
    ``"extra": {suffix: bytes}`` adds more members (e.g. a ``.pyd`` that the loader must ignore).
    ``offsets``: also store each sample's ``[start, length]`` byte span in the sidecar."""
    out.mkdir(parents=True, exist_ok=True)
    tar_path = out / f"{shard_stem(name, index)}.tar"
    members: list[tuple[str, bytes]] = []
    for s in samples:
        frames = s["frames"]
        h, w = (simplejpeg.decode_jpeg_header(frames[0])[:2] if isinstance(frames[0], bytes) else frames[0].shape[:2]) \
            if frames else (0, 0)
        times = [0.5 + i for i in range(len(frames))]
        meta = {"video_id": s["video_id"], "clip_index": s.get("clip_index", 0), "start": 0.0,
                "end": float(len(frames)), "frame_times": times, "captions": s.get("captions", [s["caption"]]),
                "text": s["caption"],
                "segments": [{"start": 0.0, "end": float(len(frames)), "text": s["caption"]}], "fps": 25.0,
                "width": w, "height": h, "duration": 60.0}
        jpgs = [f if isinstance(f, bytes) else simplejpeg.encode_jpeg(f, quality=90, colorspace="RGB") for f in frames]
        parts = encode_sample(s["key"], meta, jpgs)  # a sample without frames too: the loader must skip it
        members.extend((f"{s['key']}.{suffix}", data) for suffix, data in parts.items())
        for suffix, data in s.get("extra", {}).items():
            members.append((f"{s['key']}.{suffix}", data))
    with tarfile.open(tar_path, "w", format=tarfile.USTAR_FORMAT) as tf:
        for member_name, data in sorted(members):
            _add(tf, member_name, data)
    blob = tar_path.read_bytes()
    spans: dict[str, list[int]] = {}
    with tarfile.open(tar_path) as tf:
        for m in tf:
            key = m.name.split(".", 1)[0]
            end = m.offset_data + -(-m.size // 512) * 512
            spans.setdefault(key, [m.offset, end])[1] = end
    spans_list = [[spans[s["key"]][0], spans[s["key"]][1] - spans[s["key"]][0]] for s in samples]
    sidecar = make_sidecar(tar_path.name, [s["key"] for s in samples], spans_list, len(blob),
                           hashlib.sha256(blob).hexdigest(), plan_hash="test", versions={"test": 1})
    if not offsets:
        del sidecar["offsets"]
    (out / f"{name}-{index:06d}.json").write_text(json.dumps(sidecar))
    return tar_path


def write_shards(out: Path, *, num_shards: int, samples_per_shard: int, frames=(4,), size=(32, 40),
                 name: str = "shard", clips_per_video: int = 2, noise: float = 6.0, offsets: bool = False) -> list[str]:
    """``num_shards`` shards; sample ``j`` has ``frames[j % len(frames)]`` frames of ``size`` (h, w).
    Returns every key in shard then tar order."""
    keys = []
    g = 0
    for i in range(num_shards):
        samples = []
        for _ in range(samples_per_shard):
            video, clip = divmod(g, clips_per_video)
            key = f"{name}vid{video:05d}_{clip:04d}"
            n = frames[g % len(frames)]
            samples.append({"key": key, "video_id": f"{name}vid{video:05d}", "clip_index": clip,
                            "caption": f"clip {g} of video {video}",
                            "frames": [make_frame(size[0], size[1], t, g, noise) for t in range(n)]})
            g += 1
        samples.sort(key=lambda s: s["key"])
        keys.extend(s["key"] for s in samples)
        write_shard(Path(out), name, i, samples, offsets)
    return keys
