"""The loader builders: shard discovery -> a seekable (or URL) stream -> a DataLoader that collects the counters.

    loader = build_train_loader(cfg.data, num_frames=12, frame_size=224, max_words=32, micro_batch_size=32,
                                rank=rank, world_size=world, seed=cfg.seed, grad_accum=accum, start_step=step,
                                tokenizer=cfg.model.tokenizer or None)
    for batch in loader:        # micro-batches of this rank, in order, forever
        ...                     # loader.stats: counters of skipped / substituted samples, format versions read

The tokenizer is the model's (``tokenizer``: a vocabulary path, None = the CLIP BPE file shipped with ptrain), so
the ids the loader makes are the ones the model was built for. See ``seekable.py`` for the sample order.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Iterator

from torch.utils.data import DataLoader, IterableDataset

from ptrain.data.config import DataConfig
from ptrain.data.sample import ClipSpec
from ptrain.data.seekable import EvalStream, TrainStream, caption_counts
from ptrain.data.shards import Shard, discover
from ptrain.model.tokenizer import get_tokenizer


class Loader:
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

    def format_versions(self) -> dict[int, int]:
        """{shard format version: samples read in it} so far."""
        return {int(k[len("format_v"):]): v for k, v in self.stats.items() if k.startswith("format_v")}


class TrainLoader(Loader):
    """Infinite iterable of this rank's micro-batches; ``stats``; ``global_batch_size``; ``epoch_size``."""

    def __init__(self, dataset: TrainStream, cfg: DataConfig, discovery_stats: dict):
        super().__init__(dataset, cfg, discovery_stats)
        d = dataset
        self.micro_batch_size = d.micro
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


class EvalLoader(Loader):
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


def discover_sources(cfg: DataConfig) -> tuple[list[Shard], dict]:
    """The complete shards of ``cfg.sources`` and the discovery counters; ValueError naming a source without
    shards (call it before building anything else: a bad path is then reported at once)."""
    if not cfg.sources:
        raise ValueError("data.sources is empty; set data.sources=[DIR] to the output of `ptrain shard`")
    stats: dict = {}
    return discover([s["path"] for s in cfg.sources], stats=stats), stats


def build_train_loader(cfg: DataConfig, *, num_frames: int, frame_size: int, max_words: int,
                       micro_batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0,
                       start_step: int = 0, grad_accum: int = 1, start_sample: int | None = None,
                       tokenizer: str | None = None, discovered: tuple[list[Shard], dict] | None = None
                       ) -> TrainLoader:
    """This rank's training micro-batches from optimizer step ``start_step`` (exact resume by seeking).

    ``start_sample``: global samples consumed before ``start_step`` (default ``start_step`` x the global
    batch); pass the checkpoint's ``samples_seen`` so that a resume with another global batch goes on
    from the first unread sample. ``discovered``: the result of :func:`discover_sources` when already made."""
    _check_sizes(num_frames, frame_size, max_words, micro_batch_size, rank, world_size)
    if grad_accum < 1 or start_step < 0 or (start_sample is not None and start_sample < 0):
        raise ValueError(f"grad_accum must be >= 1 and start_step, start_sample >= 0, got {grad_accum}, {start_step} "
                         f"and {start_sample}")
    shards, stats = discovered if discovered is not None else discover_sources(cfg)
    spec = ClipSpec(num_frames, frame_size, max_words, cfg.crop, cfg.min_scale, cfg.hflip, cfg.decoder,
                    cfg.fast_dct, cfg.channels_last, cfg.frame_sampling)
    cls, captions = TrainStream, None
    if any(s.stream for s in shards):  # URLs / pipes cannot be seeked: the streaming fallback, for all shards
        from ptrain.data.stream import StreamTrainStream, with_counts

        if cfg.caption_sampling == "expand":
            raise ValueError("data.caption_sampling=expand needs local shards (every caption is an item of the global "
                             "order); streamed URL/pipe sources support first and random")
        shards = with_counts([Shard(s.path, s.samples, s.source, True) for s in shards])
        cls = StreamTrainStream
    elif cfg.caption_sampling == "expand":
        captions = caption_counts(shards)
    tok = get_tokenizer(tokenizer)  # loaded once here: forked workers inherit it
    ds = cls(shards, [s["weight"] for s in cfg.sources], cfg, spec, tok, micro_batch_size=micro_batch_size,
             rank=rank, world_size=world_size, grad_accum=grad_accum, seed=seed, start_step=start_step,
             start_sample=start_sample, captions=captions)
    return TrainLoader(ds, cfg, stats)


def build_eval_loader(cfg: DataConfig, *, num_frames: int, frame_size: int, max_words: int, batch_size: int,
                      rank: int = 0, world_size: int = 1, sources: list[str] | None = None,
                      tokenizer: str | None = None, all_captions: bool = False) -> EvalLoader:
    """Every sample of ``sources`` (default ``cfg.eval_sources``) once, in order, center-cropped. ``all_captions``:
    batches also carry every caption of each sample, tokenized (``captions``, ``caption_ids``, ``caption_row``)."""
    _check_sizes(num_frames, frame_size, max_words, batch_size, rank, world_size)
    paths = list(sources) if sources is not None else [s["path"] for s in cfg.eval_sources]
    if not paths:
        raise ValueError("no eval shards: set data.eval_sources=[DIR] (or pass sources=[...])")
    stats: dict = {}
    shards = discover(paths, stats=stats)
    if any(s.stream for s in shards):
        raise ValueError("eval shards must be local files (URL/pipe: sources are not supported for eval); copy them")
    spec = ClipSpec(num_frames, frame_size, max_words, "center", 1.0, False, cfg.decoder, cfg.fast_dct,
                    cfg.channels_last, cfg.frame_sampling, all_captions)
    stream = EvalStream(shards, spec, get_tokenizer(tokenizer), batch_size=batch_size, rank=rank,
                        world_size=world_size)
    return EvalLoader(stream, cfg, stats)
