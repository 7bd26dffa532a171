"""The URL stream: the fallback for shards that cannot be seeked (URLs and ``pipe:`` commands), read front to back.

    sources: ["https://host/howto/shard-{000000..000999}.tar"]     # or "pipe:aws s3 cp s3://b/x-{..}.tar -"

What it keeps from the seekable loader: the same global shard order (``SamplePlan`` epochs and blocks,
so weighted mixing and virtual epochs work the same), splitting by rank and DataLoader worker, a
seeded shuffle, per-sample augmentation seeds, damage counted and skipped. What it gives up:

- *exact* resume. Resume is at shuffle-block granularity: ``start_sample`` (the samples consumed
  before ``start_step``) is a global position; the stream restarts at the first shard of the block
  holding it, so up to one block of samples (``shuffle_shards`` shards) is seen again; and the split
  of shards over streams depends on ``world_size x num_workers``, so a different world size reads a
  different (equally valid) order.
- full micro-batches from one block: each (rank, worker) stream reads whole shards of its own, and a
  shuffle buffer (``8 x micro_batch`` samples, encoded bytes only) mixes their samples.

Every shard's sidecar (the ``.json`` beside the ``.tar``, same URL with the suffix swapped) is read
once at start-up for its sample count, in parallel threads.
"""

from __future__ import annotations

import itertools
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Iterator

import numpy as np

from ptrain.data import jpeg
from ptrain.data.sample import SampleError, choose_caption, decode_clip, worker_slot
from ptrain.data.seekable import DataUnreadable, TrainStream, batch_stats
from ptrain.data.shards import Shard, iter_tar_stream, open_stream, read_stream_sidecar


def sidecar_url(url: str) -> str:
    i = url.rfind(".tar")
    if i < 0:
        raise ValueError(f"shard URL {url!r} does not name a .tar file; list shards as NAME-{{000000..000099}}.tar")
    return url[:i] + ".json" + url[i + 4 :]


def _count(url: str) -> int:
    try:
        return int(read_stream_sidecar(sidecar_url(url))["samples"])  # bounded and checked: counts back allocations
    except Exception as e:  # noqa: BLE001 - reported with the URL below
        raise ValueError(
            f"cannot read the sidecar of {url} ({sidecar_url(url)}: {type(e).__name__}: {e}); streamed shards "
            "need their .json sidecars next to them (copy them along with the .tar files)"
        ) from None


def with_counts(shards: list[Shard], threads: int = 16) -> list[Shard]:
    """The streamed shards with their sample counts from the sidecars; empty shards dropped."""
    with ThreadPoolExecutor(threads) as pool:
        counts = list(pool.map(_count, [s.path for s in shards]))
    return [Shard(s.path, n, s.source, True) for s, n in zip(shards, counts) if n > 0]


class StreamTrainStream(TrainStream):
    """This rank-worker's micro-batches read from its own streamed shards (see the module docstring)."""

    def _my_shards(self, plan, me: int, streams: int) -> Iterator[tuple[int, int, int]]:
        """(epoch, slot, shard id) of this stream from the block holding ``start_step`` on, forever."""
        epoch, pos = divmod(self.start_sample, plan.epoch_size)
        _, starts = plan.epoch_layout(epoch)
        first = (int(np.searchsorted(starts, pos, side="right")) - 1) * plan.block
        for e in itertools.count(epoch):
            slots, _ = plan.epoch_layout(e)
            for j in range(first if e == epoch else 0, len(slots)):
                if j % streams == me:
                    yield e, j, int(slots[j])

    def _samples(self, plan, me: int, streams: int, stats: Counter):
        """(augmentation seed, key, members) of this stream's shards, in order; a failed stream is counted.
        DataUnreadable when a whole epoch of this stream's shards yields nothing (it would loop forever)."""
        first = current = self.start_sample // plan.epoch_size
        got = False
        for e, j, sid in self._my_shards(plan, me, streams):
            if e != current:
                if current != first and not got:
                    raise DataUnreadable(
                        f"data.sources: no sample could be read from any shard of this stream in epoch {current} "
                        f"(e.g. {self.shards[sid].path}; {dict(stats)}): re-shard them or point data.sources at "
                        "readable shards")
                current, got = e, False
            try:
                with open_stream(self.shards[sid].path) as f:
                    for i, (key, members) in enumerate(iter_tar_stream(f, stats)):
                        got = True
                        yield (self.seed, e, j, i), key, members
            except (OSError, ValueError):  # the stream itself failed (pipe exit status, HTTP error)
                stats["shards_unreadable"] += 1

    def __iter__(self) -> Iterator[dict[str, Any]]:
        wid, nw = worker_slot()
        plan = self.make_plan()
        me, streams = self.rank * nw + wid, self.world * nw
        rng = np.random.default_rng([self.seed, self.start_step, me, 0x57])
        buffer: list[tuple[tuple[int, ...], str, dict[str, bytes]]] = []  # shuffle buffer of encoded samples
        stats: Counter = Counter()  # one object for the whole run: iter_tar_stream adds to it too
        batch, filled, m = self.new_batch(), 0, self.start_step * self.accum + wid
        # Undecodable samples in a row beyond two epochs of this stream (plus the buffer) mean that none of its
        # samples decodes: every good one would have come round (shuffling only delays it by the buffer).
        slots, _ = plan.epoch_layout(self.start_sample // plan.epoch_size)
        mine = sum(self.shards[int(sid)].samples for j, sid in enumerate(slots) if j % streams == me)
        limit, bad_run = max(2 * mine + 8 * self.micro, self.cfg.max_substitutes), 0
        for item in self._samples(plan, me, streams, stats):
            buffer.append(item)
            if len(buffer) < 8 * self.micro:
                continue
            seed, key, members = buffer.pop(int(rng.integers(len(buffer))))
            try:
                sample, n = decode_clip(members, self.spec, np.random.default_rng([*seed, 0xA06]),
                                        batch.frames_BTHWC[filled])
            except (SampleError, jpeg.JpegError):  # skipped: the next buffered sample takes the row
                stats["samples_corrupt"] += 1
                batch.blank(filled)
                bad_run += 1
                if bad_run > limit:
                    raise DataUnreadable(
                        f"data.sources: none of the last {bad_run} samples of this stream decoded (two whole passes "
                        f"over its shards; {dict(stats)}): the shards' JSON or JPEGs are damaged throughout; re-shard "
                        "them or point data.sources at readable shards") from None
                continue
            bad_run = 0
            sample.key = key
            batch.fill(filled, sample, n, -1, choose_caption(self.cfg.caption_sampling, sample, self.seed, seed[1]))
            filled += 1
            if filled == self.micro:
                out = batch.finish()
                out["step"], out["micro_step"] = m // self.accum, m % self.accum
                out["_stats"] = batch_stats(stats, batch, [])
                stats.clear()
                yield out
                batch, filled, m = self.new_batch(), 0, m + nw
