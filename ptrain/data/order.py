"""The global sample order (world-size independent): a pure function of (shard sample counts, weights, seed, global index).

    plan = SamplePlan(counts=[100, 100, 80], sources=[0, 0, 1], weights=[1.0, 1.0], seed=0,
                      resampled=False, shards_per_block=8)
    epoch, shard, sample = plan.locate(12345)   # the 12346th sample the run ever reads

Nothing here depends on the world size or the number of loader workers: global batch ``g`` is the
positions ``[g*G, (g+1)*G)`` with ``G = micro_batch * world * grad_accum``, and every rank reads its
slice by seeking. So a run saved with N ranks resumes with M ranks and reads the same samples.

An epoch is laid out in *blocks*: shards are shuffled (seeded by seed and epoch), cut into blocks of
``shards_per_block`` shards, and the samples of a block are permuted (seeded by seed, epoch, block).
A block plays the role of a shuffle buffer, with the difference that it is addressable: the position
of a global index is found with one bisection plus one permutation of one block (no state to carry).

- ``resampled=False``: every sample of every shard exactly once per epoch.
- ``resampled=True``: each block slot is a shard drawn with replacement, its source chosen with
  probability proportional to ``weight / mean samples per shard`` of that source, so the expected
  fraction of *samples* from a source is proportional to its weight; an epoch has ``samples_per_epoch``
  samples (a "virtual epoch").
"""

from __future__ import annotations

import bisect
from collections import OrderedDict
from typing import Sequence

import numpy as np

# tags that keep the random streams of one (seed, epoch) independent
_SHARD_ORDER, _BLOCK_PERM, _DRAWS, _SUBSTITUTE = 0, 1, 2, 3


class SamplePlan:
    """Maps a global sample index to ``(epoch, shard id, sample index within the shard)``."""

    def __init__(
        self,
        counts: Sequence[int],
        sources: Sequence[int],
        weights: Sequence[float],
        *,
        seed: int,
        resampled: bool,
        samples_per_epoch: int = 0,
        shards_per_block: int = 8,
    ):
        self.counts = np.asarray(counts, dtype=np.int64)
        self.sources = np.asarray(sources, dtype=np.int64)
        if len(self.counts) == 0 or self.counts.min() < 1:
            raise ValueError("a sample plan needs at least one shard and every shard needs at least one sample")
        self.seed = int(seed)
        self.resampled = bool(resampled)
        self.block = int(shards_per_block)
        total = int(self.counts.sum())
        self.epoch_size = int(samples_per_epoch) if resampled and samples_per_epoch else total
        if resampled:
            weights = np.asarray(weights, dtype=np.float64)
            present = np.unique(self.sources)
            self._source_shards = [np.flatnonzero(self.sources == s) for s in present]
            mean = np.array([self.counts[ids].mean() for ids in self._source_shards])
            p = weights[present] / mean
            self._source_p = p / p.sum()
        self._epochs: OrderedDict[int, tuple[np.ndarray, list[int]]] = OrderedDict()
        self._blocks: OrderedDict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = OrderedDict()

    def _rng(self, *tags: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, *tags])

    def epoch_layout(self, epoch: int) -> tuple[np.ndarray, list[int]]:
        """(shard id per block slot, start position of each block) for one epoch, cached."""
        if epoch in self._epochs:
            self._epochs.move_to_end(epoch)
            return self._epochs[epoch]
        if not self.resampled:
            slots = self._rng(epoch, _SHARD_ORDER).permutation(len(self.counts))
        else:
            # draw shards in chunks until the epoch's samples are covered
            rng, drawn, covered = self._rng(epoch, _DRAWS), [], 0
            chunk = max(64, int(2 * self.epoch_size / self.counts.mean()) + self.block)
            while covered < self.epoch_size:
                src = rng.choice(len(self._source_p), size=chunk, p=self._source_p)
                pick = rng.random(chunk)
                ids = np.empty(chunk, dtype=np.int64)
                for s, shard_ids in enumerate(self._source_shards):
                    sel = src == s
                    ids[sel] = shard_ids[(pick[sel] * len(shard_ids)).astype(np.int64)]
                drawn.append(ids)
                covered += int(self.counts[ids].sum())
            slots = np.concatenate(drawn)
            ends = np.cumsum(self.counts[slots])
            used = int(np.searchsorted(ends, self.epoch_size)) + 1
            slots = slots[: -(-used // self.block) * self.block]  # whole blocks
        sizes = np.add.reduceat(self.counts[slots], np.arange(0, len(slots), self.block))
        starts = [0, *np.cumsum(sizes)[:-1].tolist()]
        self._epochs[epoch] = (slots, starts)
        while len(self._epochs) > 2:
            self._epochs.popitem(last=False)
        return slots, starts

    def _block_members(self, epoch: int, b: int) -> tuple[np.ndarray, np.ndarray]:
        """(shard id, sample index) of every position of block ``b``, in the permuted order, cached."""
        key = (epoch, b)
        if key in self._blocks:
            self._blocks.move_to_end(key)
            return self._blocks[key]
        slots, _ = self.epoch_layout(epoch)
        shards = slots[b * self.block : (b + 1) * self.block]
        counts = self.counts[shards]
        shard_of = np.repeat(shards, counts)
        sample_of = np.arange(int(counts.sum())) - np.repeat(np.cumsum(counts) - counts, counts)
        perm = self._rng(epoch, _BLOCK_PERM, b).permutation(len(shard_of))
        self._blocks[key] = (shard_of[perm], sample_of[perm])
        while len(self._blocks) > 8:
            self._blocks.popitem(last=False)
        return self._blocks[key]

    def _where(self, index: int) -> tuple[int, int, int]:
        if index < 0:
            raise IndexError(f"global sample index must be >= 0, got {index}")
        epoch, pos = divmod(int(index), self.epoch_size)
        _, starts = self.epoch_layout(epoch)
        b = bisect.bisect_right(starts, pos) - 1
        return epoch, b, pos - starts[b]

    def locate(self, index: int) -> tuple[int, int, int]:
        """``(epoch, shard id, sample index in that shard)`` of global sample ``index``."""
        epoch, b, j = self._where(index)
        shard_of, sample_of = self._block_members(epoch, b)
        return epoch, int(shard_of[j]), int(sample_of[j])

    def substitute(self, index: int, attempt: int) -> tuple[int, int]:
        """A seeded stand-in ``(shard id, sample)`` from the same block for an unreadable sample.

        Deterministic in (seed, index, attempt), so a resumed run substitutes the same way.
        """
        epoch, b, _ = self._where(index)
        shard_of, sample_of = self._block_members(epoch, b)
        j = int(self._rng(epoch, _SUBSTITUTE, int(index), attempt).integers(len(shard_of)))
        return int(shard_of[j]), int(sample_of[j])
