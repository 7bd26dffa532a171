"""Config of `ptrain shard`: ShardConfig with its plan and ray sections (stdlib only: `ptrain shard --help` is instant).

    ptrain shard videos=DIR captions=caption.json out=SHARDS plan.num_frames=8 plan.sampling=uniform ray.num_cpus=4
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Literal, Optional

from ptrain.config import InvalidValues, opt, section
from ptrain.data.format import MAX_FRAMES
from sharding.sources import SOURCES


@dataclass
class PlanConfig:
    """How timestamped ASR segments become clips and clips become frame timestamps."""

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
        problems = []
        if self.num_frames < 1:
            problems.append(f"num_frames must be at least 1, got {self.num_frames}")
        elif self.num_frames > MAX_FRAMES:
            problems.append(f"num_frames must be at most {MAX_FRAMES} (a sample's frames are KEY.000.jpg .. "
                            f"KEY.{MAX_FRAMES - 1}.jpg), got {self.num_frames}")
        if self.fps <= 0:
            problems.append(f"fps must be positive, got {self.fps}")
        if self.max_seconds <= 0:
            problems.append(f"max_seconds must be positive, got {self.max_seconds}")
        if self.min_seconds < 0:
            problems.append(f"min_seconds must be >= 0, got {self.min_seconds}")
        elif self.min_seconds > self.max_seconds > 0:
            problems.append(f"min_seconds ({self.min_seconds}) is larger than max_seconds ({self.max_seconds}); "
                            "lower min_seconds or raise max_seconds")
        if self.max_gap_seconds < 0:
            problems.append(f"max_gap_seconds must be >= 0, got {self.max_gap_seconds}")
        if self.end_tolerance_seconds < 0:
            problems.append(f"end_tolerance_seconds must be >= 0, got {self.end_tolerance_seconds}")
        if problems:
            raise InvalidValues(problems)


@dataclass
class RayConfig:
    """Where the sharding tasks run."""

    address: Optional[str] = opt(
        None, "unset: start a local Ray (embedded default); 'auto' or 'ray://host:10001' joins a cluster"
    )
    num_cpus: Optional[int] = opt(None, "CPUs of the local Ray (unset: all); ignored when joining a cluster")
    cpus_per_task: float = opt(1.0, "CPUs reserved by each decode and write task")

    def __post_init__(self):
        problems = []
        if self.cpus_per_task <= 0:
            problems.append(f"cpus_per_task must be positive, got {self.cpus_per_task}")
        if self.num_cpus is not None and self.num_cpus < 1:
            problems.append(f"num_cpus must be at least 1 (or unset: all cores), got {self.num_cpus}")
        if problems:
            raise InvalidValues(problems)


@dataclass
class ShardConfig:
    """`ptrain shard`: videos + their annotations (a source) -> WebDataset tars of JPEG frames."""

    source: str = opt("howto100m", f"input kind, the reader of the annotations: one of {', '.join(SOURCES)}")
    videos: str = opt("", "directory of <video_id>.<ext> files (mp4, webm, mkv, avi), searched recursively")
    captions: str = opt("", "source howto100m: caption.json / raw_caption.json: {video_id: {start: [...], end: "
                            "[...], text: [...]}}")
    video_list: Optional[str] = opt(None, "source howto100m: optional CSV (HowTo100M_v1.csv style, column video_id) "
                                          "selecting videos")
    annotations: str = opt("", "benchmark sources: directory of the annotation files as released")
    split: str = opt("", "benchmark split name")
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

    def __post_init__(self):
        problems = []
        if self.source not in SOURCES:
            close = difflib.get_close_matches(self.source, list(SOURCES), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            problems.append(f"source must be one of {', '.join(repr(s) for s in SOURCES)}, got {self.source!r}{hint}")
        if not self.videos:
            problems.append("videos is required: pass videos=DIR, the directory of the videos")
        if self.source == "howto100m" and not self.captions:
            problems.append("captions is required: pass captions=FILE, the caption.json")
        if not self.out:
            problems.append("out is required: pass out=DIR, the directory for the shards")
        if self.frame_size < 8:
            problems.append(f"frame_size must be at least 8, got {self.frame_size}")
        if not 1 <= self.jpeg_quality <= 100:
            problems.append(f"jpeg_quality must be in 1..100, got {self.jpeg_quality}")
        if self.max_samples_per_shard < 1:
            problems.append(f"max_samples_per_shard must be at least 1, got {self.max_samples_per_shard}")
        if self.videos_per_decode_task < 1:
            problems.append(f"videos_per_decode_task must be at least 1, got {self.videos_per_decode_task}")
        if self.shards_per_task < 1:
            problems.append(f"shards_per_task must be at least 1, got {self.shards_per_task}")
        if self.video_timeout_s <= 0:
            problems.append(f"video_timeout_s must be positive, got {self.video_timeout_s}")
        if self.decoder_threads < 0:
            problems.append(f"decoder_threads must be >= 0, got {self.decoder_threads}")
        if not self.name or any(c in self.name for c in "/\\.") or self.name.startswith("-"):
            problems.append(f"name must be a plain file prefix without '/', '\\' or '.', got {self.name!r}")
        if problems:
            raise InvalidValues(problems)
