"""The HowTo100M caption reader's two paths: ijson's builder (fast, bounded) reads what the event loop reads."""

import json
import random
import subprocess
import sys

import pytest

from sharding.sources import CaptionError
from sharding.sources import howto100m as h


def _read(path, entries):
    """What ``iter_captions`` makes of a file when its entries come from ``entries``: the segments, or the error."""
    out = []
    try:
        seen = set()
        for vid, entry in entries(path):
            if vid in seen:
                raise CaptionError(f"{vid} twice")
            seen.add(vid)
            out.append((vid, h._segments(path, vid, entry)))
    except CaptionError as e:
        out.append(("error", str(e)))
    return out


def _video(rng, i):
    n = rng.randint(0, 6)
    texts = [rng.choice(["[Music]", "so we [Applause] go", "a b", "", "noise [n", "x]]{{", "ünïcödé"]) for _ in range(n)]
    return {"start": [i + k for k in range(n)], "end": [i + k + 0.5 for k in range(n)], "text": texts}


ODD = [  # (caption.json text, what it exercises)
    ('{"a": {"start": [0], "end": [1], "text": ["x"]}, "b": {"start": [[0]], "end": [1], "text": ["y"]}}', "nested"),
    ('{"a": {"start": [0], "end": [1], "text": ["x"], "meta": {"k": 1}}}', "object value"),
    ('{"a": {"start": [0], "end": [1], "text": ["x"], "meta": [1, "two"]}}', "extra flat key: kept"),
    ('{"a": [1, 2]}', "a list entry"),
    ('{"a": [1, [2]]}', "a nested list entry"),
    ('{"a": 7}', "a number entry"),
    ('{"a": {"start": [0], "end": [1], "text": [null]}}', "a null text: empty"),
    ('{"a": {"start": [], "end": [], "text": []}}', "no segments"),
    ('{"a": {"start": [0], "end": [1]}}', "a missing key"),
    ('{"a": {"start": [0, 1], "end": [1], "text": ["x"]}}', "unequal lengths"),
    ('{"a": {"start": [0], "end": [1], "text": ["x"]}, "a": {"start": [0], "end": [1], "text": ["x"]}}', "twice"),
    ('{"a": {"start": [0], "start": [5], "end": [6], "text": ["x"]}}', "an inner key twice: the last"),
    ('{"a": {"start": [0], "end": [1], "text": ["x"]}', "truncated"),
    ('{"a": {"start": [0], "end": [1], "text": ["x"]}} ]', "trailing data"),
    ('{"a": {"start": [0], "end": [1], "text": ["x"]}} {}', "a second document"),
    ('[{"a": 1}]', "a top-level list"),
    ("", "empty file"),
    ("   \n ", "only whitespace"),
    ("{}", "no videos"),
    ('{"a": {"start": [0, 1e999], "end": [1, 2], "text": ["x", "y"]}}', "an overflowing number"),
    ('{"a": {"start": [0, 10000000000000000000000], "end": [1, 2], "text": ["x", "y"]}}', "a huge integer"),
    ('{"a": {"start": [true], "end": [1], "text": ["x"]}}', "a boolean time"),
    ('{"a": {"start": [0], "end": [1], "text": ["\\ud83d"]}}', "a lone surrogate escape"),
    ('{"a": {"start": [0], "end": [1], "text": ["x"]}, "b": {"start": [0], "end": [1], "text": [x]}}', "bad token"),
    ('{"": {"": [[1]]}}', "empty keys"),
    (" " * 5000 + '{"a": {"start": [0], "end": [1], "text": ["x"]}}', "leading whitespace beyond the first read"),
]


def _files(tmp_path):
    rng = random.Random(5)
    for k, (text, _why) in enumerate(ODD):
        p = tmp_path / f"odd{k}.json"
        p.write_bytes(text.encode("utf-8", "surrogatepass"))
        yield p
    for k in range(5):  # many chunks of ordinary videos, brackets in their texts, then something odd at the end
        videos = {f"v{i}": _video(rng, i) for i in range(rng.randint(50, 4000))}
        body = json.dumps(videos, ensure_ascii=rng.random() < 0.5)
        tail = ["", ', "bad": {"start": [[[[0]]]]}', ', "bad": ' + "[" * 3000 + "]" * 3000, ', "v1": {}',
                ', "cut": {"start": [0'][k]
        p = tmp_path / f"many{k}.json"
        p.write_text(body[:-1] + tail + ("}" if k != 4 else ""), encoding="utf-8")
        yield p


def test_the_builder_reads_what_the_event_loop_reads(tmp_path):
    for p in _files(tmp_path):
        assert _read(p, h._entries) == _read(p, h._event_entries), p.read_text()[:300]


def test_brackets_in_asr_texts_keep_the_builder_and_nesting_leaves_it(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(h, "_event_entries", lambda p, real=h._event_entries: calls.append(p) or real(p))
    # videos of 111 segments, their texts full of "[Music]", and one of 40,000 (a 1 MB entry)
    segs = {"start": list(range(111)), "end": list(range(1, 112)), "text": ["[Music] [Applause] so we"] * 111}
    videos = {f"v{i}": segs for i in range(300)}
    videos["long"] = {"start": list(range(40_000)), "end": list(range(1, 40_001)), "text": ["[Music]"] * 40_000}
    videos |= {f"w{i}": segs for i in range(300)}
    (tmp_path / "c.json").write_text(json.dumps(videos))
    assert len(list(h.iter_captions(tmp_path / "c.json"))) == 601 and calls == []
    # nesting: the builder stops before it sees the deep part, and the event loop names the video
    (tmp_path / "d.json").write_text(json.dumps(videos)[:-1] + ', "deep": {"start": ' + "[" * 50_000 + "]" * 50_000
                                     + "}}")
    with pytest.raises(CaptionError, match="video 'deep': 'start' nests a list"):
        list(h.iter_captions(tmp_path / "d.json"))
    assert calls == [tmp_path / "d.json"]


CHILD = """
import resource, sys
from sharding.sources import CaptionError
from sharding.sources.howto100m import iter_captions
try:
    list(iter_captions(sys.argv[1]))
except CaptionError:
    pass
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)
"""


@pytest.mark.parametrize("depth", [8_000, 30_000])
def test_nesting_costs_the_builder_little_memory(tmp_path, depth):
    # a builder that followed a list nested 8,000 (30,000) deep would keep as many path prefixes of up to 40 KB
    # (150 KB): 150 MB (2 GB), quadratic in the depth; bounded, it stops at the first chunk
    p = tmp_path / "deep.json"
    p.write_text('{"v": {"start": ' + "[" * depth + "]" * depth + ', "end": [], "text": []}}')
    base = tmp_path / "flat.json"
    base.write_text('{"v": {"start": [0], "end": [1], "text": ["a"]}}')

    def peak(path):
        res = subprocess.run([sys.executable, "-c", CHILD, str(path)], capture_output=True, text=True, check=True)
        return int(res.stdout)

    assert peak(p) - peak(base) < 25  # MiB
