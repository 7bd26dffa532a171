"""One sample into one batch row: the members parsed by the shard contract, JPEG frames decoded, picked and cropped,
and the ``Batch`` that collects rows and tokenizes their captions with the model's tokenizer.

    spec = ClipSpec(num_frames=12, frame_size=224, max_words=32, crop="random")
    batch = Batch(micro_batch, spec, tokenizer)          # tokenizer: ptrain.model.tokenizer.get_tokenizer(vocab)
    sample = decode_clip(members, spec, rng, batch.frames_BTHWC[b])   # rng=None: eval (center crop)
    batch.fill(b, sample, n_frames, index)
    tensors = batch.finish()                              # frames [B,T,3,S,S] uint8, frame_mask, input_ids, ...
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import get_worker_info

from ptrain.data import jpeg, transforms
from ptrain.data.format import Sample, SampleError, decode_sample

__all__ = ["Batch", "ClipSpec", "SampleError", "SampleMissing", "choose_caption", "decode_clip", "group_id",
           "pick_frames", "worker_slot"]


class SampleMissing(LookupError):
    """A sample the sidecar promises but the tar does not hold (cut or damaged shard)."""


def group_id(video_id: str) -> int:
    """A stable non-negative int64 for a video id (same video -> same id on every rank and run)."""
    digest = hashlib.blake2b(video_id.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def worker_slot() -> tuple[int, int]:
    """(this DataLoader worker's id, number of workers); (0, 1) in the main process."""
    info = get_worker_info()
    return (info.id, info.num_workers) if info is not None else (0, 1)


@dataclass(frozen=True)
class ClipSpec:
    """What one sample becomes: frame count and size, text length, transform and decoder choices."""

    num_frames: int
    frame_size: int
    max_words: int
    crop: str = "center"
    min_scale: float = 0.5
    hflip: bool = False
    decoder: str = "simplejpeg"
    fast: bool = True
    channels_last: bool = True
    frame_sampling: str = "uniform"  # more stored frames than num_frames: "uniform" or "segment" (DataConfig)
    all_captions: bool = False  # eval: the batch also carries every caption of each sample, tokenized


def pick_frames(n: int, spec: ClipSpec, rng: np.random.Generator | None) -> list[int]:
    """Which of a sample's ``n`` stored frames to use (all of them when they fit).

    ``uniform``: CLIP4Clip's evenly spaced subset (``np.linspace``, floored), the same every time. ``segment``: the
    stored frames cut into ``num_frames`` equal segments; training takes a random frame of each (``rng``), so every
    epoch sees another subset of what the shard stores, evaluation (``rng=None``) the middle frame of each."""
    T = spec.num_frames
    if n <= T:
        return list(range(n))
    if spec.frame_sampling == "segment":
        edges = np.floor(np.linspace(0, n, T + 1)).astype(int)  # segments wider than one frame (n > T): never empty
        lo, hi = edges[:-1], edges[1:]
        if rng is None:
            return ((lo + hi - 1) // 2).tolist()
        return [int(rng.integers(a, b)) for a, b in zip(lo, hi)]
    return np.linspace(0, n - 1, num=T, dtype=int).tolist()


def decode_clip(members: dict[str, bytes], spec: ClipSpec, rng: np.random.Generator | None,
                out_THWC: np.ndarray) -> tuple[Sample, int]:
    """Decode one sample's frames into ``out_THWC`` ([num_frames, S, S, 3] uint8, zero beyond the real frames).
    Returns (the parsed sample, its real frame count). ``rng=None`` means eval (center crop)."""
    sample = decode_sample(members)
    names = sample.frames
    pick = pick_frames(len(names), spec, rng)
    S = spec.frame_size
    box, flip = None, False
    for t, i in enumerate(pick):
        img = jpeg.decode(names[i], min_short=S, decoder=spec.decoder, fast=spec.fast)
        if box is None:  # one box (and flip) for the whole clip keeps motion consistent
            h, w = img.shape[:2]
            if rng is None:
                box = transforms.center_box(h, w, S)
            else:
                box = transforms.train_box(h, w, S, spec.crop, rng, spec.min_scale)
                flip = spec.hflip and bool(rng.random() < 0.5)
        out_THWC[t] = transforms.apply_box(img, box, S, flip, bicubic=rng is None)
    return sample, len(pick)


def choose_caption(mode: str, sample: Sample, seed: int, epoch: int, item: int = 0) -> str:
    """The caption a training row uses: ``first`` the sample's .txt caption, ``random`` one drawn from (seed, epoch,
    key) so every epoch picks anew and a resume picks the same, ``expand`` caption number ``item``."""
    if mode == "first" or len(sample.captions) == 1 and mode == "random":
        return sample.text
    if mode == "expand":
        return sample.captions[item % len(sample.captions)]
    draw = np.random.default_rng([seed, epoch, group_id("caption:" + sample.key)]).integers(len(sample.captions))
    return sample.captions[int(draw)]


class Batch:
    """Preallocated arrays for one batch, filled row by row; ``finish`` tokenizes and returns tensors."""

    def __init__(self, B: int, spec: ClipSpec, tokenizer):
        self.spec, self.tokenizer = spec, tokenizer
        self.frames_BTHWC = np.zeros((B, spec.num_frames, spec.frame_size, spec.frame_size, 3), np.uint8)
        self.frame_mask_BT = np.zeros((B, spec.num_frames), np.int64)
        self.texts = [""] * B
        self.keys = [""] * B
        self.video_ids = [""] * B
        self.metas: list[dict | None] = [None] * B
        self.index_B = np.full(B, -1, np.int64)
        self.captions: list[list[str]] = [[] for _ in range(B)]  # every caption of each row (spec.all_captions)
        self.versions: dict[int, int] = {}  # shard format versions of the samples read

    def fill(self, b: int, sample: Sample, n: int, index: int, caption: str | None = None) -> None:
        """Row ``b`` := ``sample`` (frames already decoded into it); ``caption`` is the text it trains with
        (default: the sample's .txt caption)."""
        self.frame_mask_BT[b, :n] = 1
        self.texts[b] = sample.text if caption is None else caption
        self.keys[b], self.metas[b], self.index_B[b] = sample.key, sample.meta, index
        self.video_ids[b] = sample.video_id
        self.captions[b] = list(sample.captions)
        self.versions[sample.version] = self.versions.get(sample.version, 0) + 1

    def blank(self, b: int) -> None:
        self.frames_BTHWC[b] = 0

    def finish(self) -> dict[str, Any]:
        ids_BL, mask_BL = self.tokenizer(self.texts, max_words=self.spec.max_words)
        frames = torch.from_numpy(self.frames_BTHWC)
        # [B,T,S,S,3] memory viewed as [B,T,3,S,S]: the channel transpose costs ~40 us/frame on a CPU core
        frames = frames.permute(0, 1, 4, 2, 3)
        if not self.spec.channels_last:
            frames = frames.contiguous()
        out = {
            "frames": frames,
            "frame_mask": torch.from_numpy(self.frame_mask_BT),
            "input_ids": torch.from_numpy(np.asarray(ids_BL, dtype=np.int64)),
            "attention_mask": torch.from_numpy(np.asarray(mask_BL, dtype=np.int64)),
            # a row without a video id is its own group (a negative id from its key), never a positive of another
            "group_ids": torch.tensor([group_id(v) if v else -1 - group_id("key:" + k)
                                       for v, k in zip(self.video_ids, self.keys)], dtype=torch.int64),
            "keys": list(self.keys),
            "video_ids": list(self.video_ids),
            "texts": list(self.texts),
            "index": torch.from_numpy(self.index_B),
        }
        if self.spec.all_captions:  # every caption of every row, for the multi-caption eval protocols
            flat = [c for caps in self.captions for c in caps]
            ids, mask = self.tokenizer(flat, max_words=self.spec.max_words) if flat else (np.zeros((0, 1)),) * 2
            out["captions"] = [list(c) for c in self.captions]
            out["caption_ids"] = torch.from_numpy(np.asarray(ids, dtype=np.int64))
            out["caption_mask"] = torch.from_numpy(np.asarray(mask, dtype=np.int64))
            out["caption_row"] = torch.tensor([b for b, caps in enumerate(self.captions) for _ in caps], dtype=torch.int64)
        return out
