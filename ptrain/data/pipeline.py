"""Train and eval loaders: global sample plan -> seek into tars -> decode + crop -> tokenized batches.

    loader = build_train_loader(cfg.data, num_frames=12, frame_size=224, max_words=32,
                                micro_batch_size=32, rank=rank, world_size=world, seed=cfg.seed,
                                grad_accum=accum, start_step=resume_step)
    for batch in loader:        # micro-batches of this rank, in order, forever
        ...                     # loader.stats: counters of skipped / substituted samples

Micro-batch ``m`` (``m = step * grad_accum + micro_step``) of rank ``r`` holds the global positions
``start_sample + (m - start_step*grad_accum)*M + r*micro + [0, micro)`` with ``M = micro * world``:
the union over one optimizer step is the same ``G = micro * world * grad_accum`` positions for any
world size. ``start_sample`` is the number of samples the run has consumed before ``start_step``
(``step * G`` when the global batch never changed; the checkpoint's ``samples_seen`` after a resume
with another global batch, so no sample is read twice or skipped). DataLoader workers take
micro-batches round robin (worker ``w`` makes ``m0 + w, m0 + w + W, ...``), and DataLoader hands
them back in that order, so the stream is identical for any number of workers.

An unreadable sample (bad JPEG or JSON, missing from a truncated tar) never stops training: it is
counted and replaced by a seeded draw from its shuffle block (``SamplePlan.substitute``), so every
micro-batch stays full (all ranks must gather equal batch sizes) and a resumed run substitutes the same.
"""

from __future__ import annotations

import bisect
import hashlib
import itertools
import json
from collections import Counter, OrderedDict
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ptrain.data import jpeg, transforms
from ptrain.data.config import DataConfig
from ptrain.data.plan import SamplePlan
from ptrain.model.tokenizer import get_tokenizer
from ptrain.data.shards import Shard, TarIndex, discover, index_tar, read_sample, read_sidecar, read_span


class SampleError(ValueError):
    """A sample that cannot be used (bad JSON/caption, no frames, undecodable frame)."""


class SampleMissing(LookupError):
    """A sample the sidecar promises but the tar does not hold (cut or damaged shard)."""


def group_id(video_id: str) -> int:
    """A stable non-negative int64 for a video id (same video -> same id on every rank and run)."""
    digest = hashlib.blake2b(video_id.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


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


def decode_sample(
    members: dict[str, bytes], spec: ClipSpec, rng: np.random.Generator | None, out_THWC: np.ndarray
) -> tuple[int, str, dict]:
    """Decode one sample's frames into ``out_THWC`` ([num_frames, S, S, 3] uint8, zero beyond the
    real frames). Returns (real frame count, caption, metadata). ``rng=None`` means eval (center crop)."""
    try:
        meta = json.loads(members["json"])
        caption = members["txt"].decode("utf-8")
    except (KeyError, ValueError, UnicodeDecodeError) as e:
        raise SampleError(f"bad caption or metadata ({type(e).__name__}: {e})") from None
    if not isinstance(meta, dict):
        raise SampleError("metadata JSON is not an object")
    names = sorted((k for k in members if k.endswith(".jpg")), key=lambda k: int(k.split(".", 1)[0]))
    if not names:
        raise SampleError("no frames")
    # more frames than the model takes: CLIP4Clip's uniform subsample (np.linspace, floored)
    pick = np.linspace(0, len(names) - 1, num=spec.num_frames, dtype=int) if len(names) > spec.num_frames \
        else range(len(names))
    S = spec.frame_size
    box, flip = None, False
    for t, i in enumerate(pick):
        img = jpeg.decode(members[names[i]], min_short=S, decoder=spec.decoder, fast=spec.fast)
        if box is None:  # one box (and flip) for the whole clip keeps motion consistent
            h, w = img.shape[:2]
            if rng is None:
                box = transforms.center_box(h, w, S)
            else:
                box = transforms.train_box(h, w, S, spec.crop, rng, spec.min_scale)
                flip = spec.hflip and bool(rng.random() < 0.5)
        out_THWC[t] = transforms.apply_box(img, box, S, flip, bicubic=rng is None)
    return len(pick), caption, meta


class _Batch:
    """Preallocated arrays for one batch, filled row by row."""

    def __init__(self, B: int, spec: ClipSpec):
        self.spec = spec
        self.frames_BTHWC = np.zeros((B, spec.num_frames, spec.frame_size, spec.frame_size, 3), np.uint8)
        self.frame_mask_BT = np.zeros((B, spec.num_frames), np.int64)
        self.texts = [""] * B
        self.keys = [""] * B
        self.video_ids = [""] * B
        self.metas: list[dict | None] = [None] * B
        self.index_B = np.full(B, -1, np.int64)

    def fill(self, b: int, key: str, n: int, caption: str, meta: dict, index: int) -> None:
        self.frame_mask_BT[b, :n] = 1
        self.texts[b], self.keys[b], self.metas[b], self.index_B[b] = caption, key, meta, index
        self.video_ids[b] = str(meta.get("video_id", key.rsplit("_", 1)[0]))

    def finish(self) -> dict[str, Any]:
        ids_BL, mask_BL = get_tokenizer()(self.texts, max_words=self.spec.max_words)
        frames = torch.from_numpy(self.frames_BTHWC)
        # [B,T,S,S,3] memory viewed as [B,T,3,S,S]: the channel transpose costs ~40 us/frame on a CPU core
        frames = frames.permute(0, 1, 4, 2, 3)
        if not self.spec.channels_last:
            frames = frames.contiguous()
        return {
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


class _LocalShards:
    """Per-worker open tar files and how to find a sample in each (LRU), opened lazily after the fork.

    With ``offsets`` in the sidecar (``[[start, length], ...]`` per sample, in key order) a sample is
    one read of its span; otherwise the tar's headers are walked once (``index_tar``) when the shard
    is first opened.
    """

    def __init__(self, shards: list[Shard], max_open: int = 16):
        self.shards = shards
        self.max_open = max_open
        self._open: OrderedDict[int, tuple[Any, TarIndex | None, list | None, list | None]] = OrderedDict()
        self.damaged: list[str] = []  # shards found damaged since the last drain
        self._known_damaged: set[str] = set()

    def _mark(self, path: str) -> None:
        if path not in self._known_damaged:
            self._known_damaged.add(path)
            self.damaged.append(path)

    def _get(self, sid: int):
        if sid in self._open:
            self._open.move_to_end(sid)
            return self._open[sid]
        shard = self.shards[sid]
        try:
            side = read_sidecar(shard.path) or {}
        except ValueError:
            side = {}
        keys, offsets = side.get("keys"), side.get("offsets")
        keys = keys if isinstance(keys, list) and len(keys) == shard.samples else None
        offsets = offsets if isinstance(offsets, list) and len(offsets) == shard.samples else None
        index = None
        if offsets is None:
            try:
                index = index_tar(shard.path)
            except Exception:  # noqa: BLE001 - a shard that cannot even be walked is counted, never fatal
                index = TarIndex(samples=[], by_key={}, truncated=True)
            if index.truncated:
                self._mark(shard.path)
        f = open(shard.path, "rb")
        self._open[sid] = (f, index, keys, offsets)
        while len(self._open) > self.max_open:
            self._open.popitem(last=False)[1][0].close()
        return self._open[sid]

    def read(self, sid: int, k: int) -> tuple[str, dict[str, bytes]]:
        """``(key, {suffix: bytes})`` of sample ``k`` of shard ``sid``; SampleMissing when damaged."""
        path = self.shards[sid].path
        f, index, keys, offsets = self._get(sid)
        if offsets is not None:
            try:
                key, members = read_span(f, int(offsets[k][0]), int(offsets[k][1]))
            except (EOFError, ValueError, TypeError, IndexError):
                key, members = None, {}
            if key is None or (keys is not None and key != keys[k]) or "txt" not in members:
                self._mark(path)
                raise SampleMissing(f"{path}: sample {k} is not at its sidecar offset (damaged shard)")
            return key, members
        if keys is not None:
            i = index.by_key.get(keys[k]) if k < len(keys) else None
        else:
            i = k if k < len(index.samples) else None
        if i is None:
            raise SampleMissing(f"{path}: sample {k} is missing (damaged shard)")
        entry = index.samples[i]
        return entry.key, read_sample(f, entry)


def _worker() -> tuple[int, int]:
    info = get_worker_info()
    return (info.id, info.num_workers) if info is not None else (0, 1)


class TrainStream(IterableDataset):
    """This rank's micro-batches from ``start_step`` on, forever (see the module docstring)."""

    def __init__(self, shards: list[Shard], weights: list[float], cfg: DataConfig, spec: ClipSpec, *,
                 micro_batch_size: int, rank: int, world_size: int, grad_accum: int, seed: int, start_step: int,
                 start_sample: int | None = None):
        self.shards, self.weights, self.cfg, self.spec = shards, weights, cfg, spec
        self.micro, self.rank, self.world, self.accum = micro_batch_size, rank, world_size, grad_accum
        self.seed, self.start_step = seed, start_step
        G = micro_batch_size * world_size * grad_accum
        self.start_sample = start_step * G if start_sample is None else int(start_sample)

    def position(self, m: int) -> int:
        """Global position of the first sample of micro-batch ``m`` (over all ranks)."""
        return self.start_sample + (m - self.start_step * self.accum) * self.micro * self.world

    def make_plan(self) -> SamplePlan:
        return SamplePlan(
            [s.samples for s in self.shards], [s.source for s in self.shards], self.weights, seed=self.seed,
            resampled=self.cfg.resampled, samples_per_epoch=self.cfg.samples_per_epoch,
            shards_per_block=self.cfg.shuffle_shards,
        )

    def __iter__(self) -> Iterator[dict[str, Any]]:
        wid, nw = _worker()
        plan, store = self.make_plan(), _LocalShards(self.shards)
        for m in itertools.count(self.start_step * self.accum + wid, nw):
            base = self.position(m) + self.rank * self.micro
            yield self._batch(plan, store, range(base, base + self.micro), m)

    def _batch(self, plan: SamplePlan, store: _LocalShards, positions: range, m: int) -> dict[str, Any]:
        batch, stats = _Batch(len(positions), self.spec), Counter()
        for b, index in enumerate(positions):
            _, sid, k = plan.locate(index)
            rng = np.random.default_rng([self.seed, index, 0xA06])  # augmentation: a function of the position
            for attempt in range(self.cfg.max_substitutes + 1):
                if _read_into(store, sid, k, self.spec, rng, batch, b, index, stats):
                    break
                sid, k = plan.substitute(index, attempt)
                stats["samples_substituted"] += 1
            else:
                raise RuntimeError(
                    f"{self.cfg.max_substitutes} substitutes in a row for global sample {index} were unreadable: "
                    "most of this shuffle block is damaged; check the shards (see loader.stats) or re-shard"
                )
        out = batch.finish()
        out["step"], out["micro_step"] = m // self.accum, m % self.accum
        out["_stats"] = dict(stats, _damaged=store.damaged[:])
        store.damaged.clear()
        return out


def _read_into(store, sid: int, k: int, spec, rng, batch, b: int, index: int, stats: Counter) -> bool:
    """Read sample ``k`` of shard ``sid`` into row ``b``; on damage count why, blank the row, return False."""
    try:
        key, members = store.read(sid, k)
        n, caption, meta = decode_sample(members, spec, rng, batch.frames_BTHWC[b])
        batch.fill(b, key, n, caption, meta, index)
        return True
    except SampleMissing:
        stats["samples_missing"] += 1
    except (SampleError, jpeg.JpegError):
        stats["samples_corrupt"] += 1
    except OSError:
        stats["samples_unreadable"] += 1
    batch.frames_BTHWC[b] = 0
    return False


class EvalStream(IterableDataset):
    """Every sample of the eval shards once, in shard then tar order; the last batch padded.

    Batch ``g`` holds positions ``[g*B, (g+1)*B)``; rank ``r`` takes batches ``r, r+world, ...`` and
    every rank gets the same number of batches (extra ones are all padding), so collectives line up.
    Padding and unreadable samples have ``valid = 0`` (a blank one-frame clip and an empty caption).
    """

    def __init__(self, shards: list[Shard], spec: ClipSpec, *, batch_size: int, rank: int, world_size: int):
        self.shards, self.spec, self.B, self.rank, self.world = shards, spec, batch_size, rank, world_size
        self.starts = np.cumsum([0] + [s.samples for s in shards]).tolist()
        self.total = self.starts[-1]
        self.batches_per_rank = -(-(-(-self.total // self.B)) // self.world)

    def __len__(self) -> int:
        return self.batches_per_rank

    def __iter__(self) -> Iterator[dict[str, Any]]:
        wid, nw = _worker()
        store = _LocalShards(self.shards)
        for j in range(wid, self.batches_per_rank, nw):
            g = j * self.world + self.rank
            batch, stats = _Batch(self.B, self.spec), Counter()
            valid = np.zeros(self.B, np.int64)
            for b in range(self.B):
                index = g * self.B + b
                if index < self.total:
                    sid = bisect.bisect_right(self.starts, index) - 1
                    if _read_into(store, sid, index - self.starts[sid], self.spec, None, batch, b, index, stats):
                        valid[b] = 1
                        continue
                batch.frame_mask_BT[b, 0] = 1  # a blank frame keeps mean pooling finite
            out = batch.finish()
            out["valid"] = torch.from_numpy(valid)
            out["meta"] = batch.metas
            out["_stats"] = dict(stats, _damaged=store.damaged[:])
            store.damaged.clear()
            yield out


class _Loader:
    """A DataLoader over one of the streams that collects the workers' counters into ``stats``."""

    def __init__(self, dataset: IterableDataset, cfg: DataConfig, discovery_stats: dict):
        self.dataset = dataset
        self.stats: Counter = Counter(discovery_stats)
        self._damaged: set[str] = set()
        kwargs = {"prefetch_factor": cfg.prefetch_factor, "persistent_workers": False} if cfg.num_workers else {}
        self._dl = DataLoader(dataset, batch_size=None, num_workers=cfg.num_workers, **kwargs)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for batch in self._dl:
            stats = batch.pop("_stats")
            self._damaged.update(stats.pop("_damaged"))
            self.stats.update(stats)
            self.stats["shards_damaged"] = len(self._damaged)
            yield batch


class TrainLoader(_Loader):
    """Infinite iterable of this rank's micro-batches; ``stats``; ``global_batch_size``; ``epoch_size``."""

    def __init__(self, dataset: TrainStream, cfg: DataConfig, discovery_stats: dict):
        super().__init__(dataset, cfg, discovery_stats)
        d = dataset
        self.global_batch_size = d.micro * d.world * d.accum
        self.epoch_size = d.make_plan().epoch_size
        self.num_shards = len(d.shards)
        self.start_step = d.start_step
        self.start_sample = d.start_sample

    def samples_before(self, step: int) -> int:
        """Global samples consumed before optimizer step ``step`` (``step >= start_step``)."""
        return self.start_sample + (step - self.start_step) * self.global_batch_size

    def epoch_at(self, step: int) -> float:
        """Epochs (fractional) completed before optimizer step ``step``."""
        return self.samples_before(step) / self.epoch_size


class EvalLoader(_Loader):
    """Finite iterable of padded eval batches (``valid`` marks real samples); ``num_samples``."""

    def __init__(self, dataset: EvalStream, cfg: DataConfig, discovery_stats: dict):
        super().__init__(dataset, cfg, discovery_stats)
        self.num_samples = dataset.total

    def __len__(self) -> int:
        return len(self.dataset)


def _check_sizes(num_frames: int, frame_size: int, max_words: int, batch: int, rank: int, world: int) -> None:
    if num_frames < 1 or frame_size < 8 or max_words < 3 or batch < 1:
        raise ValueError(
            f"need num_frames >= 1, frame_size >= 8, max_words >= 3 and a batch size >= 1; got "
            f"{num_frames}, {frame_size}, {max_words}, {batch}"
        )
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} is outside world_size {world}")


def build_train_loader(cfg: DataConfig, *, num_frames: int, frame_size: int, max_words: int,
                       micro_batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0,
                       start_step: int = 0, grad_accum: int = 1, start_sample: int | None = None) -> TrainLoader:
    """This rank's training micro-batches from optimizer step ``start_step`` (exact resume by seeking).

    ``start_sample``: global samples consumed before ``start_step`` (default ``start_step`` x the global
    batch); pass the checkpoint's ``samples_seen`` so that a resume with another global batch goes on
    from the first unread sample."""
    _check_sizes(num_frames, frame_size, max_words, micro_batch_size, rank, world_size)
    if grad_accum < 1 or start_step < 0 or (start_sample is not None and start_sample < 0):
        raise ValueError(f"grad_accum must be >= 1 and start_step, start_sample >= 0, got {grad_accum}, {start_step} "
                         f"and {start_sample}")
    if not cfg.sources:
        raise ValueError("data.sources is empty; set data.sources=[DIR] to the output of `ptrain shard`")
    stats: dict = {}
    shards = discover([s["path"] for s in cfg.sources], stats=stats)
    spec = ClipSpec(num_frames, frame_size, max_words, cfg.crop, cfg.min_scale, cfg.hflip, cfg.decoder,
                    cfg.fast_dct, cfg.channels_last)
    cls = TrainStream
    if any(s.stream for s in shards):  # URLs / pipes cannot be seeked: the streaming fallback, for all shards
        from ptrain.data.stream import StreamTrainStream, with_counts

        shards = with_counts([Shard(s.path, s.samples, s.source, True) for s in shards])
        cls = StreamTrainStream
    get_tokenizer()  # load the vocabulary once here: forked workers inherit it
    ds = cls(shards, [s["weight"] for s in cfg.sources], cfg, spec, micro_batch_size=micro_batch_size,
             rank=rank, world_size=world_size, grad_accum=grad_accum, seed=seed, start_step=start_step,
             start_sample=start_sample)
    return TrainLoader(ds, cfg, stats)


def build_eval_loader(cfg: DataConfig, *, num_frames: int, frame_size: int, max_words: int, batch_size: int,
                      rank: int = 0, world_size: int = 1, sources: list[str] | None = None) -> EvalLoader:
    """Every sample of ``sources`` (default ``cfg.eval_sources``) once, in order, center-cropped."""
    _check_sizes(num_frames, frame_size, max_words, batch_size, rank, world_size)
    paths = list(sources) if sources is not None else [s["path"] for s in cfg.eval_sources]
    if not paths:
        raise ValueError("no eval shards: set data.eval_sources=[DIR] (or pass sources=[...])")
    stats: dict = {}
    shards = discover(paths, stats=stats)
    if any(s.stream for s in shards):
        raise ValueError("eval shards must be local files (URL/pipe: sources are not supported for eval); copy them")
    spec = ClipSpec(num_frames, frame_size, max_words, "center", 1.0, False, cfg.decoder, cfg.fast_dct,
                    cfg.channels_last)
    get_tokenizer()
    return EvalLoader(EvalStream(shards, spec, batch_size=batch_size, rank=rank, world_size=world_size), cfg, stats)

