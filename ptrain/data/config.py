"""`DataConfig`: where the shards are and how the loader reads them (stdlib only, no torch).

    data:
      sources:                       # training shards; a bare string means weight 1
        - {path: /data/howto100m, weight: 3}
        - {path: "/data/webvid/shard-{000000..000999}.tar", weight: 1}
      resampled: true                # weighted mixing needs resampled "virtual epochs"
      samples_per_epoch: 10000000
      eval_sources: [/data/msrvtt_test]

A source ``path`` is a shard directory (every ``*.tar`` with its sidecar), a glob, a brace pattern
(``name-{000000..000099}.tar``), one ``.tar`` file, or a URL / ``pipe:`` command (read as a stream,
see docs/data.md for what streaming gives up). A ``pipe:`` source runs a command named by the config, so it is
refused unless ``allow_pipe: true`` (and then it runs without a shell: docs/threat_model.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from ptrain.config import Invalid, Problems, opt


def normalize_sources(entries: list[Any], field: str) -> list[dict[str, Any]]:
    """``["dir", {"path": "x", "weight": 2}]`` -> ``[{"path": "dir", "weight": 1.0}, ...]`` or ValueError."""
    out = []
    for i, entry in enumerate(entries):
        if isinstance(entry, str):
            entry = {"path": entry}
        if not isinstance(entry, dict) or not isinstance(entry.get("path"), str) or not entry["path"]:
            raise ValueError(
                f"{field}[{i}] must be a path string or a mapping {{path: DIR_OR_PATTERN, weight: NUMBER}}, "
                f"got {entry!r}"
            )
        unknown = set(entry) - {"path", "weight"}
        if unknown:
            raise ValueError(f"{field}[{i}] has unknown keys {sorted(unknown)}; a source has only 'path' and 'weight'")
        try:
            weight = float(entry.get("weight", 1.0))
        except (TypeError, ValueError):
            raise ValueError(f"{field}[{i}].weight must be a number, got {entry.get('weight')!r}") from None
        if not weight > 0:
            raise ValueError(f"{field}[{i}].weight must be positive, got {weight}; drop the source instead of weight 0")
        out.append({"path": entry["path"], "weight": weight})
    return out


@dataclass
class DataConfig:
    """Shard loader for training and evaluation (ptrain/data)."""

    sources: list[Any] = opt([], "training shard sources: paths/patterns/URLs, or {path, weight} mappings")
    eval_sources: list[Any] = opt([], "held-out shard sources for evaluation (read in order, every sample once)")
    resampled: bool = opt(
        False,
        "false: every sample once per epoch (weights must be equal); true: virtual epochs of samples_per_epoch "
        "drawn shard-block-wise with replacement, sources mixed by weight",
    )
    samples_per_epoch: int = opt(0, "virtual epoch length in samples when resampled (0: all samples of all sources)")
    shuffle_shards: int = opt(
        8, "shuffle window: shards are shuffled, grouped in blocks of this many and samples permuted inside a block"
    )
    num_workers: int = opt(2, "DataLoader worker processes per rank (0: decode in the training process)")
    prefetch_factor: int = opt(2, "micro-batches each worker prepares ahead")
    crop: Literal["random", "random_resized", "center"] = opt(
        "random",
        "train crop: 'random' square window of the short-side-resized frame, 'random_resized' (scale range "
        "min_scale..1, aspect 3/4..4/3, then resized), 'center'; eval always uses center",
    )
    min_scale: float = opt(0.5, "smallest area fraction of random_resized crops")
    hflip: bool = opt(
        False, "random horizontal flip (off: a flip turns 'moves to the left' captions into wrong ones)"
    )
    decoder: Literal["simplejpeg", "pil"] = opt(
        "simplejpeg", "JPEG decoder; simplejpeg measured ~1.45x a PIL pipeline at equal size, ~2.4x when resizing"
    )
    fast_dct: bool = opt(True, "simplejpeg fastdct + fastupsample (slightly less exact, faster)")
    channels_last: bool = opt(
        True,
        "frames tensor [B,T,3,S,S] is a view of [B,T,S,S,3] memory (saves the CPU transpose; .to(device) keeps "
        "it; call .contiguous() if some code needs the NCHW layout)",
    )
    caption_sampling: Literal["first", "random", "expand"] = opt(
        "first",
        "training caption of a sample with several (benchmark shards): first (the .txt caption; an ASR clip has one), "
        "random (one per video per epoch, drawn from seed, epoch and key, so a resume draws the same), expand (every "
        "(video, caption) pair is a sample of the epoch, as CLIP4Clip's expand_msrvtt_sentences)",
    )
    frame_sampling: Literal["uniform", "segment"] = opt(
        "uniform",
        "a sample storing more frames than the model takes: uniform (CLIP4Clip's evenly spaced subset, the same every "
        "epoch) or segment (T equal segments: a random frame of each in training, the middle one in evaluation)",
    )
    max_substitutes: int = opt(
        64, "an unreadable sample is replaced by a seeded draw from its block; give up after this many in a row"
    )
    allow_pipe: bool = opt(
        False, "pipe: sources run a command from the config; off unless you trust the config (run without a shell)"
    )

    def __post_init__(self):
        p = Problems()
        for field in ("sources", "eval_sources"):
            try:
                setattr(self, field, normalize_sources(getattr(self, field), field))
            except ValueError as e:
                p.append(Invalid(field, str(e)))
        if not self.allow_pipe:
            for field in ("sources", "eval_sources"):
                for i, src in enumerate(getattr(self, field)):
                    p.check(not (isinstance(src, dict) and str(src["path"]).startswith("pipe:")), field,
                            f"{field}[{i}] {src['path']!r} is a pipe: source, which runs a command written in the "
                            "config; set data.allow_pipe=true only if you trust this config (the command then runs "
                            "without a shell), or point the source at the shard files", also=("allow_pipe",))
        p.check(self.resampled or len({s["weight"] for s in self.sources if isinstance(s, dict)}) <= 1, "sources",
                "sources have different weights but resampled is false; weighted mixing draws samples with "
                "replacement, so set resampled=true (and samples_per_epoch) or give every source the same weight",
                also=("resampled",))
        p.check(self.samples_per_epoch >= 0, "samples_per_epoch", f"samples_per_epoch must be >= 0, got {self.samples_per_epoch}")
        p.check(not (self.samples_per_epoch and not self.resampled), "samples_per_epoch",
                "samples_per_epoch is only used with resampled=true; set resampled=true or remove it", also=("resampled",))
        p.check(self.shuffle_shards >= 1, "shuffle_shards", f"shuffle_shards must be at least 1, got {self.shuffle_shards}")
        p.check(self.num_workers >= 0, "num_workers", f"num_workers must be >= 0, got {self.num_workers}")
        p.check(self.prefetch_factor >= 1, "prefetch_factor", f"prefetch_factor must be at least 1, got {self.prefetch_factor}")
        p.check(0 < self.min_scale <= 1, "min_scale", f"min_scale must be in (0, 1], got {self.min_scale}")
        p.check(self.max_substitutes >= 1, "max_substitutes", f"max_substitutes must be at least 1, got {self.max_substitutes}")
        p.raise_any()
