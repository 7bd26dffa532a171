"""The HowTo100M source: ``caption.json`` (timed ASR segments per video), read as a stream, and the optional list.

    source = HowTo100M("caption.json", video_list="HowTo100M_v1.csv")   # or HowTo100M.from_config(shard_cfg)
    for record in source.records():        # VideoRecord(video_id, segments=[Segment, ...]) in caption-file order
        ...

``caption.json`` (about 5 GB for the 1.22M videos of HowTo100M) is never held whole: ``iter_captions`` parses it
incrementally with ijson (its C backend, yajl2_c, where it is installed) and yields one validated video at a time,
so the reader's memory is one video's entry plus the set of ids seen (duplicates are reported by id). The nesting
is bounded by the format's (object / object / list / scalar): anything deeper is refused as soon as it opens.
yajl reads a lone surrogate escape (``"\\ud83d"``, not Unicode) as ``?``; ijson's pure-Python backend keeps it, and
the segment is then refused.

Records come in the order of ``caption.json``; with a video list, only the listed videos, still in caption-file
order, then the listed ids absent from the captions as records with ``skip_reason`` set (in list order). A malformed
entry stops the job, naming the file, the video id and the problem (the planner has touched no video by then).
"""

from __future__ import annotations

import csv
import math
import operator
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from sharding.sources import CaptionError, Segment, VideoRecord, file_facts

# The longest video a caption time may point into. HowTo100M's longest videos last a few hours; a time beyond this
# bound is a broken timestamp (an epoch time, 1e300), refused before it reaches any arithmetic.
MAX_VIDEO_SECONDS = 48 * 3600.0
_FORMAT = "{video_id: {start: [...], end: [...], text: [...]}}"


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
        listed = load_video_list(self.video_list) if self.video_list else None
        wanted = set(listed) if listed is not None else None
        for vid, segments in iter_captions(self.captions):
            if wanted is None or vid in wanted:
                if wanted is not None:
                    wanted.discard(vid)
                yield VideoRecord(vid, segments=segments)
        for vid in listed or ():
            if vid in wanted:
                yield VideoRecord(vid, skip_reason=f"{vid}: listed in {self.video_list} but absent from "
                                                   f"{self.captions}")

    def describe(self) -> dict[str, Any]:
        return {"source": self.name, "captions": file_facts(self.captions), "video_list": file_facts(self.video_list)}


def _json_error(p: Path, e: Exception, vid: str | None) -> CaptionError:
    near = f" (in or after video {vid!r})" if vid is not None else ""
    why = " ".join(str(e).split())[:200]
    return CaptionError(f"{p}: not valid UTF-8 JSON{near}: {type(e).__name__}: {why}; expected {_FORMAT}")


def _entries(p: Path) -> Iterator[tuple[str, Any]]:
    """``(key, value)`` of the top-level object, in file order. Built by ijson's C builder (``kvitems``) while
    ``_Bounded`` vouches that no container nesting can make that costly, else (a JSON error too, to name its video)
    by ``_event_entries`` from the start, skipping the entries already given."""
    import ijson

    given = 0
    with p.open("rb") as f:
        head = f.read(4096).lstrip(b" \t\r\n")
        f.seek(0)
        if head[:1] == b"{":  # anything else is the event loop's to refuse (a top-level list gives no entry here)
            reader = _Bounded(f)
            entries = ijson.kvitems(reader, "", use_float=True, buf_size=_CHUNK)
            while True:
                try:
                    entry = next(entries)
                except StopIteration:
                    return
                except Exception:  # noqa: BLE001 -- the event loop reads the file again and says what is wrong
                    break
                reader.entries = given = given + 1
                yield entry
    for i, entry in enumerate(_event_entries(p)):
        if i >= given:
            yield entry


# ijson's builders keep a prefix string per open container (the path: video id, key, "item", ...), so a container
# nested d deep costs memory ~ d x (d + the key's length): quadratic. The bytes and the brackets read since the
# last whole entry bound both; past this product the file is read by the event loop, which refuses deep nesting at
# once (and goes on at its own pace: about 1.5x the builder's time per video, from the start of the file). With
# chunks of 8 KiB, a HowTo100M-like file (5 KB and 4 brackets a video) stays near 2e5, an entry of 2 MB still fits
# (80 KB after a chunk of tiny entries, 400 brackets), and the builder can be made to hold no more than ~45 MB.
_BUILDER_BUDGET = 2**25
_CHUNK = 8 * 1024
# A bracket followed by a byte that cannot follow an opening bracket in JSON (a letter other than t, f, n: the
# ASR's "[Music]", "[Applause]") is inside a string: it opens nothing and is not counted.
_AFTER_OPENER = b" \t\r\n\"-0123456789tfn[{]}"


class _Unbounded(Exception):
    """Raised inside ijson's read: the builder must not see more of this file."""


class _Bounded:
    """A file for ijson's builder that refuses to hand out a chunk that could open containers beyond the budget.

    ijson reads a chunk, parses it whole and yields the entries it completed before it reads again; so at a read,
    the entry still open began in the chunk where the last entry ended (or later), and its depth and key length
    are at most the brackets and bytes read since that chunk, this one included, which are checked first."""

    def __init__(self, f):
        self.f = f
        self.entries = 0  # entries yielded so far (set by the reader of ``kvitems``)
        self._seen = 0
        self._open = self._bytes = 0  # brackets and bytes since the chunk where the last entry ended
        self._last = (0, 0)  # the previous chunk's brackets and bytes
        self._not_after = np.array([c not in _AFTER_OPENER for c in range(256)])

    def _openers(self, chunk: bytes) -> int:
        """How many "[" and "{" of ``chunk`` may open a container (at array speed: a few us for 8 KiB)."""
        b = np.frombuffer(chunk, dtype=np.uint8)
        at = np.flatnonzero((b | 32) == ord("{"))  # "[" is 0x5b, "{" 0x7b: the only bytes that are 0x7b with bit 5 set
        if not len(at):
            return 0
        if at[-1] == len(b) - 1:  # the last byte: what follows it is in the next chunk; counted
            return len(at) - int(np.count_nonzero(self._not_after[b[at[:-1] + 1]]))
        return len(at) - int(np.count_nonzero(self._not_after[b[at + 1]]))

    def read(self, n: int = -1) -> bytes:
        chunk = self.f.read(n)
        brackets = self._openers(chunk)
        if self.entries != self._seen:
            self._seen = self.entries
            self._open, self._bytes = self._last
        self._open += brackets
        self._bytes += len(chunk)
        self._last = (brackets, len(chunk))
        if self._open * self._bytes > _BUILDER_BUDGET:
            raise _Unbounded(f"{self._open} brackets in {self._bytes} bytes without a whole entry")
        return chunk


def _event_entries(p: Path) -> Iterator[tuple[str, Any]]:
    """``(key, value)`` of the top-level object, built from parser events with the nesting bounded by the format:
    an object of objects of lists of scalars. Anything nested deeper is refused at once (a builder that followed it
    would spend memory quadratic in the depth, or recurse until the stack overflows)."""
    import ijson

    with p.open("rb") as f:
        events = ijson.basic_parse(f, use_float=True)
        key = None
        try:
            first = next(events, None)
            if first is None or first[0] != "start_map":
                kind = "nothing" if first is None else first[0].replace("start_", "").replace("map", "object")
                raise CaptionError(f"{p}: the top level must be an object {_FORMAT}, got {kind}")
            for event, key in events:
                if event == "end_map":
                    for _extra in events:  # anything after the top-level object (yajl raises on most of it)
                        raise CaptionError(f"{p}: data after the top-level object; expected {_FORMAT}")
                    return
                if event != "map_key":  # cannot happen with a conforming parser; never loop on it
                    raise CaptionError(f"{p}: unexpected {event} at the top level")
                event, value = next(events, (None, None))
                if event is None:
                    raise CaptionError(f"{p}: the file ends inside the entry of video {key!r}")
                if event == "start_map":
                    value = _video_object(p, key, events)
                elif event == "start_array":
                    value = _scalar_list(p, key, "", events)
                yield key, value
        except (ijson.JSONError, UnicodeDecodeError, ValueError) as e:
            if isinstance(e, CaptionError):
                raise
            raise _json_error(p, e, key) from None


def _video_object(p: Path, vid: str, events) -> dict[str, Any]:
    entry: dict[str, Any] = {}
    for event, key in events:
        if event == "end_map":
            return entry
        event, value = next(events, (None, None))
        if event is None:
            break
        if event == "start_array":
            value = _scalar_list(p, vid, key, events)
        elif event == "start_map":
            raise CaptionError(f"{p}: video {vid!r}: {key!r} holds an object; the format nests no deeper than "
                               f"{_FORMAT} (lists of numbers or strings)")
        entry[key] = value
    raise CaptionError(f"{p}: video {vid!r}: the file ends inside its entry")


def _scalar_list(p: Path, vid: str, key: str, events) -> list:
    out: list = []
    append = out.append
    for event, value in events:
        if event == "end_array":
            return out
        if event in ("start_map", "start_array"):
            where = f"video {vid!r}: {key!r}" if key else f"video {vid!r}"
            raise CaptionError(f"{p}: {where} nests a list or an object in a list; the format nests no deeper than "
                               f"{_FORMAT} (lists of numbers or strings)")
        append(value)
    raise CaptionError(f"{p}: video {vid!r}: the file ends inside its entry")


def iter_captions(path: str | Path) -> Iterator[tuple[str, list[Segment]]]:
    """``(video_id, segments)`` for every video of a HowTo100M ``caption.json``, in file order, validated one video
    at a time; CaptionError (naming the file, the video and the problem) on the first malformed entry, and on an id
    that appears twice (a JSON reader would silently keep only the last entry). A segment is a plain ``(start, end,
text)`` tuple: the fields of a Segment, which the planner reads by position."""
    p = Path(path)
    if not p.is_file():
        raise CaptionError(f"{p}: caption file not found; pass captions=FILE pointing at caption.json")
    seen: set[str] = set()
    for vid, entry in _entries(p):
        if vid in seen:
            raise CaptionError(f"{p}: video {vid!r} appears twice; a JSON reader would keep only the last entry and "
                               "drop the first one's segments: merge the two entries or remove one")
        seen.add(vid)
        yield vid, _segments(p, vid, entry)


_NUMBERS = frozenset((float, int))
_STRINGS = frozenset((str,))


def _segments(p: Path, vid: str, entry: Any) -> list[Segment]:
    """The validated segments of one entry, as ``(start, end, text)`` tuples (what a Segment is; plain tuples are
    the cheapest to make, 136M times)."""
    if entry.__class__ is dict and len(entry) == 3:
        segs = _plain_segments(entry.get("start"), entry.get("end"), entry.get("text"))
        if segs is not None:
            return segs
    _refuse_nesting(p, vid, entry)
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
    segs = _plain_segments(starts, ends, texts)
    if segs is not None:
        return segs
    segs = []
    for i, (s, e, t) in enumerate(zip(starts, ends, texts)):
        if s.__class__ is not float or e.__class__ is not float:  # the fast path: both plain floats
            if isinstance(s, bool) or isinstance(e, bool) or not isinstance(s, (int, float)) \
                    or not isinstance(e, (int, float)):
                raise CaptionError(f"{where}: segment {i}: start/end must be numbers (seconds), got {s!r}, {e!r}")
            if abs(s) > MAX_VIDEO_SECONDS or abs(e) > MAX_VIDEO_SECONDS:  # a huge int would overflow float()
                raise CaptionError(f"{where}: segment {i}: times must lie within 0 .. {MAX_VIDEO_SECONDS:.0f} s "
                                   f"(48 h, the longest video this planner accepts), got {s!r}, {e!r}")
            s, e = float(s), float(e)
        if not (0.0 <= s <= MAX_VIDEO_SECONDS and e <= MAX_VIDEO_SECONDS):
            if not (math.isfinite(s) and math.isfinite(e)) or s < 0:
                raise CaptionError(f"{where}: segment {i}: times must be finite and >= 0, got {s!r}, {e!r}")
            raise CaptionError(f"{where}: segment {i}: times must lie within 0 .. {MAX_VIDEO_SECONDS:.0f} s "
                               f"(48 h, the longest video this planner accepts), got {s!r}, {e!r}")
        if e < s:
            raise CaptionError(f"{where}: segment {i}: end {ends[i]} is before start {starts[i]}")
        if t.__class__ is not str:
            if t is None:
                t = ""
            else:
                raise CaptionError(f"{where}: segment {i}: text must be a string, got {type(t).__name__}")
        try:
            t.encode("utf-8")
        except UnicodeEncodeError:
            raise CaptionError(f"{where}: segment {i}: text is not valid Unicode (a lone surrogate escape?): "
                               f"{t!r}; fix or drop that segment") from None
        segs.append((s, e, t))
    return segs


def _plain_segments(starts: Any, ends: Any, texts: Any) -> list[Segment] | None:
    """The segments of the common entry, checked list by list at C speed: three lists of one length, numbers (no
    bool) within bounds, end >= start, text strings of valid Unicode; None for anything else (the caller's loop
    names the first bad segment)."""
    if starts.__class__ is list and ends.__class__ is list and texts.__class__ is list \
            and 0 < len(starts) == len(ends) == len(texts) and _NUMBERS.issuperset(map(type, starts)) \
            and _NUMBERS.issuperset(map(type, ends)) and _STRINGS.issuperset(map(type, texts)) and min(starts) >= 0 \
            and max(ends) <= MAX_VIDEO_SECONDS and max(starts) <= MAX_VIDEO_SECONDS \
            and not any(map(operator.lt, ends, starts)):
        try:
            "".join(texts).encode("utf-8")
        except UnicodeEncodeError:
            return None
        return list(zip(map(float, starts), map(float, ends), texts))
    return None


def _refuse_nesting(p: Path, vid: str, entry: Any) -> None:
    """The event loop's refusal of a container nested deeper than the format, for an entry ijson's builder made:
    the first such container in file order (the builder keeps the last of two equal keys)."""
    in_object = isinstance(entry, dict)
    for key, value in entry.items() if in_object else [("", entry)]:
        if in_object and isinstance(value, dict):
            raise CaptionError(f"{p}: video {vid!r}: {key!r} holds an object; the format nests no deeper than "
                               f"{_FORMAT} (lists of numbers or strings)")
        if isinstance(value, list) and any(isinstance(x, (list, dict)) for x in value):
            where = f"video {vid!r}: {key!r}" if in_object and key else f"video {vid!r}"
            raise CaptionError(f"{p}: {where} nests a list or an object in a list; the format nests no deeper than "
                               f"{_FORMAT} (lists of numbers or strings)")


def load_captions(path: str | Path) -> dict[str, list[Segment]]:
    """A whole HowTo100M ``caption.json`` as ``{video_id: [Segment]}`` (small files, tests: the job streams it)."""
    return {vid: [Segment(*s) for s in segs] for vid, segs in iter_captions(path)}


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
