"""Seekable streams over local shards: the training stream (global sample order, exact resume) and the eval stream.

    stream = TrainStream(shards, weights, cfg, spec, tokenizer, micro_batch_size=32, rank=r, world_size=w,
                         grad_accum=1, seed=0, start_step=step)
    for batch in stream: ...     # this rank's micro-batches, forever (a DataLoader runs it in workers)

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
import itertools
from collections import Counter, OrderedDict
from typing import Any, Iterator

import numpy as np
import torch
from torch.utils.data import IterableDataset

from ptrain.data import jpeg
from ptrain.data.config import DataConfig
from ptrain.data.format import SampleError, decode_sample
from ptrain.data.order import SamplePlan
from ptrain.data.sample import Batch, ClipSpec, SampleMissing, choose_caption, decode_clip, worker_slot
from ptrain.data.shards import Shard, TarIndex, index_tar, read_sample, read_sidecar, read_span


class DataUnreadable(RuntimeError):
    """Training cannot go on: every sample tried for one position (and its substitutes) was unreadable."""


class ShardReader:
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

    def drain_damaged(self) -> list[str]:
        out, self.damaged = self.damaged, []
        return out

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


def read_into(reader: ShardReader, sid: int, k: int, spec: ClipSpec, rng, batch: Batch, b: int, index: int,
              stats: Counter, caption_of=None) -> bool:
    """Read sample ``k`` of shard ``sid`` into row ``b`` (its caption: ``caption_of(sample)``, default the .txt one);
    on damage count why, blank the row, return False."""
    try:
        key, members = reader.read(sid, k)
        sample, n = decode_clip(members, spec, rng, batch.frames_BTHWC[b])
        sample.key = key
        batch.fill(b, sample, n, index, caption_of(sample) if caption_of is not None else None)
        return True
    except SampleMissing:
        stats["samples_missing"] += 1
    except (SampleError, jpeg.JpegError):
        stats["samples_corrupt"] += 1
    except OSError:
        stats["samples_unreadable"] += 1
    batch.blank(b)
    return False


def batch_stats(stats: Counter, batch: Batch, damaged: list[str]) -> dict[str, Any]:
    """What a batch reports to the loader: counters, the shards found damaged, the format versions read."""
    out = dict(stats, _damaged=damaged)
    for version, n in batch.versions.items():
        out[f"format_v{version}"] = n  # samples read in that shard format version
    return out


def caption_counts(shards: list[Shard]) -> list[np.ndarray]:
    """Captions of every sample of every shard, in the order ``ShardReader.read`` numbers them: from the sidecar's
    ``captions`` when it has them, else from one pass over the samples' JSON (frames are read too, once)."""
    out = []
    for sid, shard in enumerate(shards):
        try:
            side = read_sidecar(shard.path) or {}
        except ValueError:
            side = {}
        counts = side.get("captions")
        if not (isinstance(counts, list) and len(counts) == shard.samples):
            reader, counts = ShardReader([shard]), []
            for k in range(shard.samples):
                try:
                    counts.append(len(decode_sample(reader.read(0, k)[1]).captions))
                except (SampleMissing, SampleError, OSError):
                    counts.append(1)  # unreadable: its one slot is substituted like any damaged sample
        out.append(np.maximum(np.asarray(counts, dtype=np.int64), 1))
    return out


class TrainStream(IterableDataset):
    """This rank's micro-batches from ``start_step`` on, forever (see the module docstring).

    ``caption_sampling=expand``: the global order runs over (sample, caption) items, ``counts`` per shard being its
    caption total, so an epoch holds every pair once; ``captions`` are the per-sample counts (``caption_counts``)."""

    def __init__(self, shards: list[Shard], weights: list[float], cfg: DataConfig, spec: ClipSpec, tokenizer, *,
                 micro_batch_size: int, rank: int, world_size: int, grad_accum: int, seed: int, start_step: int,
                 start_sample: int | None = None, captions: list[np.ndarray] | None = None):
        self.shards, self.weights, self.cfg, self.spec, self.tokenizer = shards, weights, cfg, spec, tokenizer
        self.captions = captions if cfg.caption_sampling == "expand" else None
        # item k of shard s -> (sample, caption): the first item of each sample, per shard
        self._firsts = [np.concatenate([[0], np.cumsum(c)[:-1]]) for c in self.captions] if self.captions else None
        self.micro, self.rank, self.world, self.accum = micro_batch_size, rank, world_size, grad_accum
        self.seed, self.start_step = seed, start_step
        G = micro_batch_size * world_size * grad_accum
        self.start_sample = start_step * G if start_sample is None else int(start_sample)

    def position(self, m: int) -> int:
        """Global position of the first sample of micro-batch ``m`` (over all ranks)."""
        return self.start_sample + (m - self.start_step * self.accum) * self.micro * self.world

    def make_plan(self) -> SamplePlan:
        counts = [int(c.sum()) for c in self.captions] if self.captions else [s.samples for s in self.shards]
        return SamplePlan(
            counts, [s.source for s in self.shards], self.weights, seed=self.seed,
            resampled=self.cfg.resampled, samples_per_epoch=self.cfg.samples_per_epoch,
            shards_per_block=self.cfg.shuffle_shards,
        )

    def _sample_of(self, sid: int, k: int) -> tuple[int, int]:
        """(sample, caption number) of item ``k`` of shard ``sid`` (items are samples unless captions expand)."""
        if self._firsts is None:
            return k, 0
        j = int(np.searchsorted(self._firsts[sid], k, side="right")) - 1
        return j, k - int(self._firsts[sid][j])

    def new_batch(self) -> Batch:
        return Batch(self.micro, self.spec, self.tokenizer)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        wid, nw = worker_slot()
        plan, reader = self.make_plan(), ShardReader(self.shards)
        for m in itertools.count(self.start_step * self.accum + wid, nw):
            base = self.position(m) + self.rank * self.micro
            yield self._batch(plan, reader, range(base, base + self.micro), m)

    def _batch(self, plan: SamplePlan, reader: ShardReader, positions: range, m: int) -> dict[str, Any]:
        batch, stats = self.new_batch(), Counter()
        for b, index in enumerate(positions):
            epoch, sid, k = plan.locate(index)
            rng = np.random.default_rng([self.seed, index, 0xA06])  # augmentation: a function of the position
            for attempt in range(self.cfg.max_substitutes + 1):
                j, item = self._sample_of(sid, k)
                caption_of = lambda sample, e=epoch, c=item: choose_caption(  # noqa: E731
                    self.cfg.caption_sampling, sample, self.seed, e, c)
                if read_into(reader, sid, j, self.spec, rng, batch, b, index, stats, caption_of):
                    break
                sid, k = plan.substitute(index, attempt)
                stats["samples_substituted"] += 1
            else:
                raise DataUnreadable(
                    f"data.sources: global sample {index} and {self.cfg.max_substitutes} substitutes in a row were "
                    f"unreadable (in shards such as {self.shards[sid].path}; {dict(stats)}): the shards' JSON or "
                    "JPEGs are damaged throughout; re-shard them or point data.sources at readable shards"
                )
        out = batch.finish()
        out["step"], out["micro_step"] = m // self.accum, m % self.accum
        out["_stats"] = batch_stats(stats, batch, reader.drain_damaged())
        return out


class EvalStream(IterableDataset):
    """Every sample of the eval shards once, in shard then tar order; the last batch padded.

    Batch ``g`` holds positions ``[g*B, (g+1)*B)``; rank ``r`` takes batches ``r, r+world, ...`` and
    every rank gets the same number of batches (extra ones are all padding), so collectives line up.
    Padding and unreadable samples have ``valid = 0`` (a blank one-frame clip and an empty caption).
    """

    def __init__(self, shards: list[Shard], spec: ClipSpec, tokenizer, *, batch_size: int, rank: int,
                 world_size: int):
        self.shards, self.spec, self.tokenizer = shards, spec, tokenizer
        self.B, self.rank, self.world = batch_size, rank, world_size
        self.starts = np.cumsum([0] + [s.samples for s in shards]).tolist()
        self.total = self.starts[-1]
        self.batches_per_rank = -(-(-(-self.total // self.B)) // self.world)

    def __len__(self) -> int:
        return self.batches_per_rank

    def __iter__(self) -> Iterator[dict[str, Any]]:
        wid, nw = worker_slot()
        reader = ShardReader(self.shards)
        for j in range(wid, self.batches_per_rank, nw):
            g = j * self.world + self.rank
            batch, stats = Batch(self.B, self.spec, self.tokenizer), Counter()
            valid = np.zeros(self.B, np.int64)
            for b in range(self.B):
                index = g * self.B + b
                if index < self.total:
                    sid = bisect.bisect_right(self.starts, index) - 1
                    if read_into(reader, sid, index - self.starts[sid], self.spec, None, batch, b, index, stats):
                        valid[b] = 1
                        continue
                batch.frame_mask_BT[b, 0] = 1  # a blank frame keeps mean pooling finite
            out = batch.finish()
            out["valid"] = torch.from_numpy(valid)
            out["meta"] = batch.metas
            out["_stats"] = batch_stats(stats, batch, reader.drain_damaged())
            yield out
