"""Streaming shard loader for training and evaluation (docs/data.md).

    from ptrain.data import DataConfig, build_train_loader, build_eval_loader
    loader = build_train_loader(cfg.data, num_frames=12, frame_size=224, max_words=32, micro_batch_size=32,
                                rank=rank, world_size=world, seed=seed, grad_accum=accum, start_step=step)

Modules: ``config`` (DataConfig, no torch), ``shards`` (discovery, sidecars, tar offset index),
``plan`` (the global, world-size independent sample order), ``jpeg`` (decoding), ``transforms``
(crops, CLIP normalisation), ``pipeline`` (datasets, batching, the loaders), ``stream`` (the
fallback for URL / ``pipe:`` sources, which cannot be seeked). Importing this package
does not import torch; the builders do.
"""

from ptrain.data.config import DataConfig

__all__ = ["DataConfig", "build_train_loader", "build_eval_loader", "normalize"]


def __getattr__(name):  # torch is imported only when a loader is built
    if name in ("build_train_loader", "build_eval_loader"):
        from ptrain.data import pipeline

        return getattr(pipeline, name)
    if name == "normalize":
        from ptrain.data.transforms import normalize

        return normalize
    raise AttributeError(f"module 'ptrain.data' has no attribute {name!r}")
