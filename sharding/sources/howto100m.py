"""The HowTo100M source: ``caption.json`` (timed ASR segments per video) and the optional ``HowTo100M_v1.csv`` list.

    source = HowTo100M("caption.json", video_list="HowTo100M_v1.csv")   # or HowTo100M.from_config(shard_cfg)
    for record in source.records():        # VideoRecord(video_id, segments=[Segment, ...]) in list order
        ...

Without a video list every captioned video is yielded, sorted by id; with one, the listed ids in file order, a
listed id absent from the captions as a record with ``skip_reason`` set. The caption file is validated whole before
the first record (a malformed entry stops the job at once, naming the file, the video id and the problem).
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any, Iterator

from sharding.sources import CaptionError, Segment, VideoRecord, file_facts


class HowTo100M:
    """Videos with their timestamped ASR captions (``{video_id: {"start": [...], "end": [...], "text": [...]}}``)."""

    name = "howto100m"

    def __init__(self, captions: str | Path, video_list: str | Path | None = None):
        self.captions = captions
        self.video_list = video_list

    @classmethod
    def from_config(cls, cfg: Any) -> "HowTo100M":
        """From the ``captions`` and ``video_list`` keys of a ShardConfig."""
        return cls(cfg.captions, cfg.video_list)

    def records(self) -> Iterator[VideoRecord]:
        captions = load_captions(self.captions)
        ids = load_video_list(self.video_list) if self.video_list else sorted(captions)
        for vid in ids:
            if vid not in captions:
                yield VideoRecord(vid, skip_reason=f"{vid}: listed in {self.video_list} but absent from "
                                                   f"{self.captions}")
            else:
                yield VideoRecord(vid, segments=captions[vid])

    def describe(self) -> dict[str, Any]:
        return {"source": self.name, "captions": file_facts(self.captions), "video_list": file_facts(self.video_list)}


def load_captions(path: str | Path) -> dict[str, list[Segment]]:
    """Read and validate a HowTo100M ``caption.json``; fail fast on the first malformed entry."""
    p = Path(path)
    if not p.is_file():
        raise CaptionError(f"{p}: caption file not found; pass captions=FILE pointing at caption.json")
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CaptionError(f"{p}: not valid UTF-8 JSON ({e}); expected {{video_id: {{start, end, text}}}}") from None
    if not isinstance(data, dict):
        raise CaptionError(f"{p}: the top level must be an object {{video_id: {{start, end, text}}}}, "
                           f"got {type(data).__name__}")
    out: dict[str, list[Segment]] = {}
    for vid, entry in data.items():
        where = f"{p}: video {vid!r}"
        if not isinstance(entry, dict):
            raise CaptionError(f"{where}: expected an object with start/end/text lists, got {type(entry).__name__}")
        missing = [k for k in ("start", "end", "text") if k not in entry]
        if missing:
            raise CaptionError(f"{where}: missing key(s) {', '.join(missing)}")
        starts, ends, texts = entry["start"], entry["end"], entry["text"]
        if not all(isinstance(x, list) for x in (starts, ends, texts)):
            raise CaptionError(f"{where}: start, end and text must be lists")
        if not len(starts) == len(ends) == len(texts):
            raise CaptionError(
                f"{where}: start, end and text have different lengths ({len(starts)}, {len(ends)}, {len(texts)})"
            )
        segs = []
        for i, (s, e, t) in enumerate(zip(starts, ends, texts)):
            if isinstance(s, bool) or isinstance(e, bool) or not isinstance(s, (int, float)) \
                    or not isinstance(e, (int, float)):
                raise CaptionError(f"{where}: segment {i}: start/end must be numbers (seconds), got {s!r}, {e!r}")
            if not (math.isfinite(s) and math.isfinite(e)) or s < 0:
                raise CaptionError(f"{where}: segment {i}: times must be finite and >= 0, got {s!r}, {e!r}")
            if e < s:
                raise CaptionError(f"{where}: segment {i}: end {e} is before start {s}")
            if t is None:
                t = ""
            if not isinstance(t, str):
                raise CaptionError(f"{where}: segment {i}: text must be a string, got {type(t).__name__}")
            try:
                t.encode("utf-8")
            except UnicodeEncodeError:
                raise CaptionError(f"{where}: segment {i}: text is not valid Unicode (a lone surrogate escape?): "
                                   f"{t!r}; fix or drop that segment") from None
            segs.append(Segment(float(s), float(e), t))
        out[str(vid)] = segs
    return out


def load_video_list(path: str | Path) -> list[str]:
    """Video ids from a ``HowTo100M_v1.csv``-style file (a ``video_id`` column), in file order, unique."""
    p = Path(path)
    if not p.is_file():
        raise CaptionError(f"{p}: video list not found; pass video_list=CSV or leave it unset")
    with p.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or "video_id" not in reader.fieldnames:
            raise CaptionError(f"{p}: needs a header with a video_id column (HowTo100M_v1.csv style)")
        ids = [row["video_id"].strip() for row in reader if row.get("video_id")]
    return list(dict.fromkeys(ids))
