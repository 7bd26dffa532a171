"""Streaming shard loader for training and evaluation (docs/data.md).

    from ptrain.data import DataConfig, build_train_loader, build_eval_loader
    loader = build_train_loader(cfg.data, num_frames=12, frame_size=224, max_words=32, micro_batch_size=32,
                                rank=rank, world_size=world, seed=seed, grad_accum=accum, start_step=step)

Modules, bottom up: ``config`` (DataConfig, no torch), ``format`` (THE shard contract: member names, sample
encoding, sidecar schema, keys; shared with ``sharding/``), ``shards`` (discovery, sidecars, tar offset index),
``order`` (the global, world-size independent sample order), ``jpeg`` and ``transforms`` (decoding, crops),
``sample`` (one sample into a batch row; the Batch and its tokenizer), ``seekable`` (the train and eval streams over
local shards), ``stream`` (the fallback for URL / ``pipe:`` sources, which cannot be seeked) and ``loader`` (the
builders). Importing this package does not import torch; the builders do.
"""

from ptrain.data.config import DataConfig

__all__ = ["DataConfig", "build_train_loader", "build_eval_loader", "discover_sources", "normalize"]


def __getattr__(name):  # torch is imported only when a loader is built
    if name in ("build_train_loader", "build_eval_loader", "discover_sources"):
        from ptrain.data import loader

        return getattr(loader, name)
    if name == "normalize":
        from ptrain.data.transforms import normalize

        return normalize
    raise AttributeError(f"module 'ptrain.data' has no attribute {name!r}")
