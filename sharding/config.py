"""Config of `ptrain shard`: ShardConfig with its plan and ray sections (stdlib only: `ptrain shard --help` is instant).

    ptrain shard videos=DIR captions=caption.json out=SHARDS plan.num_frames=8 plan.sampling=uniform ray.num_cpus=4
    ptrain shard configs/shard/msvd.yaml annotations=DIR videos=DIR split=test out=SHARDS      # a benchmark split
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Literal, Optional

from ptrain.config import Invalid, Problems, opt, section
from ptrain.data.format import MAX_FRAMES
from sharding.sources import SOURCES


@dataclass
class PlanConfig:
    """How timestamped ASR segments become clips, and clips (or a benchmark's videos, whole or their span) frame
    timestamps: num_frames, sampling, fps and slice apply to both."""

    min_seconds: float = opt(5.0, "grow a clip by merging neighbouring segments until it lasts this long (UniVL: 5 s)")
    min_words: int = opt(4, "... and until it has at least this many words")
    max_seconds: float = opt(
        20.0, "never grow a clip beyond this duration; a longer single segment is split into equal pieces, its words "
              "shared out in proportion to time"
    )
    max_gap_seconds: float = opt(4.0, "do not merge across a silence longer than this")
    num_frames: int = opt(12, "frames per clip (the maximum in fps mode)")
    sampling: Literal["uniform", "fps"] = opt(
        "fps", "'uniform': num_frames timestamps spread over the clip; 'fps': one every 1/fps s, capped at num_frames"
    )
    fps: float = opt(1.0, "frames per second in fps mode (CLIP4Clip pretraining: 1)")
    slice: Literal["head", "tail", "uniform"] = opt(
        "uniform", "fps mode, clip with more than num_frames frames: keep the first, last or evenly spaced ones"
    )
    end_tolerance_seconds: float = opt(
        1.0, "a clip ending more than this past the video's end is recorded as span_beyond_end and skipped"
    )

    def __post_init__(self):
        p = Problems()
        p.check(self.num_frames >= 1, "num_frames", f"num_frames must be at least 1, got {self.num_frames}")
        p.check(self.num_frames <= MAX_FRAMES, "num_frames",
                f"num_frames must be at most {MAX_FRAMES} (a sample's frames are KEY.000.jpg .. "
                f"KEY.{MAX_FRAMES - 1}.jpg), got {self.num_frames}")
        p.check(self.fps > 0, "fps", f"fps must be positive, got {self.fps}")
        p.check(self.max_seconds > 0, "max_seconds", f"max_seconds must be positive, got {self.max_seconds}")
        p.check(self.min_seconds >= 0, "min_seconds", f"min_seconds must be >= 0, got {self.min_seconds}")
        p.check(not (self.min_seconds >= 0 and self.min_seconds > self.max_seconds > 0), "min_seconds",
                f"min_seconds ({self.min_seconds}) is larger than max_seconds ({self.max_seconds}); "
                "lower min_seconds or raise max_seconds", also=("max_seconds",))
        p.check(self.max_gap_seconds >= 0, "max_gap_seconds", f"max_gap_seconds must be >= 0, got {self.max_gap_seconds}")
        p.check(self.end_tolerance_seconds >= 0, "end_tolerance_seconds",
                f"end_tolerance_seconds must be >= 0, got {self.end_tolerance_seconds}")
        p.raise_any()


@dataclass
class RayConfig:
    """Where the sharding tasks run."""

    address: Optional[str] = opt(
        None, "unset: start a local Ray (embedded default); 'auto' or 'ray://host:10001' joins a cluster"
    )
    num_cpus: Optional[int] = opt(None, "CPUs of the local Ray (unset: all); ignored when joining a cluster")
    cpus_per_task: float = opt(1.0, "CPUs reserved by each decode and write task")
    window: int = opt(
        0, "most Ray tasks (decode + write) in flight at once; 0: two per task slot of the cluster (its CPUs / "
           "cpus_per_task). The driver submits more only as tasks finish, so decoded frames never pile up"
    )

    def __post_init__(self):
        p = Problems()
        p.check(self.cpus_per_task > 0, "cpus_per_task", f"cpus_per_task must be positive, got {self.cpus_per_task}")
        p.check(self.window >= 0, "window", f"window must be >= 0 (0: two tasks per task slot), got {self.window}")
        p.check(self.num_cpus is None or self.num_cpus >= 1, "num_cpus",
                f"num_cpus must be at least 1 (or unset: all cores), got {self.num_cpus}")
        p.raise_any()


def _benchmark_splits(source: str) -> list[str] | None:
    """The split names of a benchmark source (None for another source or an unknown one)."""
    if source not in SOURCES or source == "howto100m":
        return None
    import importlib

    module, cls = SOURCES[source].split(":")
    splits = getattr(getattr(importlib.import_module(module), cls), "splits", None)
    return list(splits) if splits is not None else None


def _fraction(text: str) -> bool:
    try:
        return 0.0 < float(text) <= 1.0
    except ValueError:
        return False


@dataclass
class ShardConfig:
    """`ptrain shard`: videos + their annotations (a source) -> WebDataset tars of JPEG frames."""

    source: str = opt("howto100m", f"input kind, the reader of the annotations: one of {', '.join(SOURCES)}")
    videos: str = opt("", "directory of <video_id>.<ext> files (mp4, webm, mkv, avi, mov, m4v, 3gp, wmv, mpg, mpeg, "
                          "flv), searched recursively (a benchmark's video is found by its file id or its id); "
                          "or a list file: one video path per line, or a CSV with a video_id,path header (a "
                          "million-file tree is then not walked on every run)")
    captions: str = opt("", "source howto100m: caption.json / raw_caption.json: {video_id: {start: [...], end: "
                            "[...], text: [...]}}")
    video_list: Optional[str] = opt(None, "source howto100m: optional CSV (HowTo100M_v1.csv style, column video_id) "
                                          "selecting videos")
    annotations: str = opt("", "benchmark sources: directory of the annotation files as released")
    split: str = opt("", "benchmark sources: the split to shard (msrvtt: train9k, train7k, test1kA, trainfull, "
                         "valfull, testfull; activitynet: train, val1; vatex: train, val, test, test1k5; the others: "
                         "train, val, test). One sample per video with every caption; whole-video samples take "
                         "plan.num_frames at plan.fps over the video")
    out: str = opt("", "output directory for the shards, sidecars, manifest.json and errors.jsonl")
    name: str = opt("shard", "shard file prefix: OUT/<name>-NNNNNN.tar")
    plan: PlanConfig = section(PlanConfig, "clips from timed captions, frame times per clip")
    frame_size: int = opt(224, "resize so the short side is this many pixels")
    center_crop: bool = opt(False, "also crop the long side to frame_size (square frames)")
    jpeg_quality: int = opt(90, "JPEG quality of the stored frames")
    max_samples_per_shard: int = opt(1000, "at most this many clips per shard")
    shards_per_task: int = opt(
        2, "shards per shard group: a group's clips are dealt over its shards, and its writer task holds them in "
           "memory (~250 MB per 1000 clips of 12 frames at 224 px)"
    )
    videos_per_decode_task: int = opt(4, "videos per decode task (each video is decoded once, in one task)")
    decoder: Literal["pyav", "decord"] = opt("pyav", "video decoder; the other one is tried when the first fails")
    decoder_threads: int = opt(1, "decoder threads per task (set explicitly; 0 lets FFmpeg use every core)")
    video_timeout_s: float = opt(120.0, "per-video decode budget; a decode that takes longer is killed and recorded")
    ray: RayConfig = section(RayConfig, "Ray cluster")
    progress: bool = opt(True, "show a progress bar")
    dry_run: bool = opt(
        False, "plan only: report videos, clips, frames, shards, tasks and missing videos, and estimate the output "
               "bytes and core-hours from a few timed decodes (dry_run_videos); no shard is written"
    )
    dry_run_videos: int = opt(4, "videos the dry run decodes, timed, for its estimates (spread over the plan)")
    verify: str = opt(
        "quick", "how a rerun checks the shards already committed: 'quick' trusts a shard whose tar and sidecar "
                 "have the size and mtime its group record states (nothing is read); 'full' re-hashes every one; "
                 "a fraction such as 0.01 re-hashes that share, picked at random"
    )

    def __post_init__(self):
        p = Problems()
        if self.source not in SOURCES:
            close = difflib.get_close_matches(self.source, list(SOURCES), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            p.append(Invalid("source", f"source must be one of {', '.join(repr(s) for s in SOURCES)}, got "
                                       f"{self.source!r}{hint}"))
        p.check(bool(self.videos), "videos", "videos is required: pass videos=DIR, the directory of the videos")
        p.check(self.source != "howto100m" or bool(self.captions), "captions",
                "captions is required: pass captions=FILE, the caption.json")
        splits = _benchmark_splits(self.source)
        if splits is not None:
            p.check(bool(self.annotations), "annotations",
                    f"annotations is required for source={self.source}: pass annotations=DIR, the directory of its "
                    "annotation files (docs/benchmarks.md lists them)")
            p.check(self.split in splits, "split",
                    f"split must be one of {', '.join(splits)} for source={self.source}, got {self.split!r}")
        p.check(bool(self.out), "out", "out is required: pass out=DIR, the directory for the shards")
        p.check(self.frame_size >= 8, "frame_size", f"frame_size must be at least 8, got {self.frame_size}")
        p.check(1 <= self.jpeg_quality <= 100, "jpeg_quality", f"jpeg_quality must be in 1..100, got {self.jpeg_quality}")
        p.check(self.max_samples_per_shard >= 1, "max_samples_per_shard",
                f"max_samples_per_shard must be at least 1, got {self.max_samples_per_shard}")
        p.check(self.videos_per_decode_task >= 1, "videos_per_decode_task",
                f"videos_per_decode_task must be at least 1, got {self.videos_per_decode_task}")
        p.check(self.shards_per_task >= 1, "shards_per_task", f"shards_per_task must be at least 1, got {self.shards_per_task}")
        p.check(self.video_timeout_s > 0, "video_timeout_s", f"video_timeout_s must be positive, got {self.video_timeout_s}")
        p.check(self.decoder_threads >= 0, "decoder_threads", f"decoder_threads must be >= 0, got {self.decoder_threads}")
        p.check(self.dry_run_videos >= 0, "dry_run_videos", f"dry_run_videos must be >= 0, got {self.dry_run_videos}")
        p.check(self.verify in ("quick", "full") or _fraction(self.verify), "verify",
                f"verify must be 'quick', 'full' or a fraction in (0, 1] such as 0.01, got {self.verify!r}")
        p.check(bool(self.name) and not any(c in self.name for c in "/\\.") and not self.name.startswith("-"), "name",
                f"name must be a plain file prefix without '/', '\\' or '.', got {self.name!r}")
        p.raise_any()
