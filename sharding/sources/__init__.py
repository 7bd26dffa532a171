"""The sharding input seam: one reader per kind of input, each yielding the videos to shard with their text.

    from sharding.sources import open_source
    source = open_source("howto100m", cfg)             # cfg: the ShardConfig (each source reads only its keys)
    for record in source.records():                    # VideoRecord, in a stable order (the plan depends on it)
        ...
    source.describe()                                  # {input file: size, mtime, ...}: what the plan was made from

A source knows its annotation format and nothing about videos on disk, decoding or shards: it yields records, the
planner (``sharding/plan.py``) turns them into clips and the job decodes and writes them. Two kinds of record:

- timed ASR (HowTo100M): ``segments`` holds the timestamped captions; the planner cuts clips from them;
- benchmark videos (MSR-VTT, MSVD, LSMDC, ActivityNet, DiDeMo, VATEX): ``captions`` holds every caption of the video
  in the split (one sample per video, never one run-on text), ``span`` the part of the file to sample (None: the
  whole video), ``sentences`` the timed sentences of a paragraph benchmark.

A listed video whose annotations hold nothing for it is still yielded, with ``skip_reason`` set: the job records
it (class ``no_captions``) in the order the list gives, and plans nothing for it. A malformed annotation file raises
``CaptionError`` naming the file, the video and the problem (the job stops before touching a video).

Adding a source is one module here with a ``Source`` class and one row in ``SOURCES``.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, NamedTuple, Protocol


class CaptionError(ValueError):
    """A malformed annotation file: names the file, the video id and what is wrong."""


class Segment(NamedTuple):
    """A timed piece of text (seconds). A named tuple: the planner makes ~100 per video, and a tuple is the
    cheapest immutable record Python builds."""

    start: float
    end: float
    text: str


@dataclass
class VideoRecord:
    """One video to shard, as its annotations describe it."""

    video_id: str  # the id as the annotations spell it (kept in every sample's JSON)
    file_id: str = ""  # the file name stem to look for under videos=DIR ('' = video_id)
    segments: list[Segment] = field(default_factory=list)  # timed ASR captions (clips are cut from these)
    captions: list[str] = field(default_factory=list)  # benchmark: every caption of the video in this split
    split: str | None = None  # benchmark split name
    span: tuple[float, float] | None = None  # benchmark: the part of the file to sample; None = the whole video
    sentences: list[Segment] = field(default_factory=list)  # paragraph benchmarks: the sentences with their times
    meta: dict[str, Any] = field(default_factory=dict)  # extra JSON fields for every sample of this video
    skip_reason: str = ""  # set: listed, but the annotations hold no text for it (a no_captions failure, not planned)

    @property
    def stem(self) -> str:
        return self.file_id or self.video_id


class Source(Protocol):
    """What the job asks of a source."""

    name: str

    def records(self) -> Iterator[VideoRecord]:
        """Every video to shard, in a stable order; errors name the file, the video and the fix."""

    def describe(self) -> dict[str, Any]:
        """The inputs the records come from (paths with size and mtime) and the source's settings."""


# name -> "module:class"; imported only when used
SOURCES: dict[str, str] = {
    "howto100m": "sharding.sources.howto100m:HowTo100M",
    "msrvtt": "sharding.sources.msrvtt:MSRVTT",
    "msvd": "sharding.sources.msvd:MSVD",
    "lsmdc": "sharding.sources.lsmdc:LSMDC",
    "activitynet": "sharding.sources.activitynet:ActivityNet",
    "didemo": "sharding.sources.didemo:DiDeMo",
    "vatex": "sharding.sources.vatex:VATEX",
}


def file_facts(path: str | Path | None) -> dict[str, Any] | None:
    """``{"path", "bytes", "mtime"}`` of an input file (None for an unset one): what ``describe`` reports."""
    if not path:
        return None
    st = Path(path).stat()
    return {"path": str(path), "bytes": st.st_size, "mtime": st.st_mtime}


def open_source(name: str, cfg: Any) -> Source:
    """The source called ``name``, built from the keys of ``cfg`` it reads."""
    if name not in SOURCES:
        raise ValueError(f"unknown source {name!r}; known: {', '.join(sorted(SOURCES))}")
    module, cls = SOURCES[name].split(":")
    return getattr(importlib.import_module(module), cls).from_config(cfg)
