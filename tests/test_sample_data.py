"""``ptrain sample-data``: the generated corpus keeps every promise the sharder, loader and demo rely on.

One 7-video corpus (every container/codec kind, videos of 8-10 s) is generated per module and decoded
back with PyAV; a second run with the same seed must be byte-identical.
"""

from __future__ import annotations

import copy
import csv
import json
import re
from pathlib import Path

import av
import numpy as np
import pytest

from ptrain.cli import main as cli_main
from ptrain.config import load_config
from ptrain_demo.corpus import (
    COLOURS,
    KINDS,
    WEIRD_ID,
    SampleDataConfig,
    generate,
    plan,
    render_frames,
    shape_centres,
)

SEED = 3
NUM = 7
SAID = {"left": ("left",), "right": ("right",), "up": ("up", "upwards", "top"), "down": ("down", "downwards", "bottom")}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    out = tmp_path_factory.mktemp("sample") / "raw"
    meta = generate(out, num_videos=NUM, seed=SEED, min_duration=8.0, max_duration=10.0)
    return out, meta


@pytest.fixture(scope="module")
def decoded(corpus):
    """video_id -> _decode(...) of every good video, decoded once for the module."""
    out, meta = corpus
    return {vid: _decode(out / spec["file"]) for vid, spec in meta["videos"].items()}


def _decode(path: Path):
    """(frames as RGB arrays, pts in seconds, stream info) of the first video stream."""
    with av.open(str(path)) as c:
        s = c.streams.video[0]
        frames, times = [], []
        for f in c.decode(s):
            frames.append(f.to_ndarray(format="rgb24"))
            times.append(float(f.pts * f.time_base))
        info = {
            "codec": s.codec_context.name,
            "width": s.codec_context.width,
            "height": s.codec_context.height,
            "rate": float(s.average_rate or 0),
            "duration": c.duration / 1e6,
        }
    return frames, np.array(times), info


def test_every_kind_written_and_listed(corpus):
    out, meta = corpus
    assert {v["kind"] for v in meta["videos"].values()} == set(KINDS)
    assert len(meta["videos"]) == NUM and WEIRD_ID in meta["videos"]
    ids = [vid for vid in meta["videos"]] + list(meta["bad_videos"])
    with open(out / "HowTo100M_v1.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["video_id", "category_1", "category_2", "rank", "task_id"]
    assert [r[0] for r in rows[1:]] == ids
    assert set(json.loads((out / "caption.json").read_text())) == set(ids)
    assert json.loads((out / "sample_meta.json").read_text()) == meta
    for vid in meta["videos"]:
        if vid != WEIRD_ID:
            assert re.fullmatch(r"[A-Za-z0-9_-]{11}", vid), vid


def test_good_videos_decode_with_promised_size_fps_duration(corpus, decoded):
    out, meta = corpus
    for vid, spec in meta["videos"].items():
        frames, times, info = decoded[vid]
        assert info["codec"] == spec["codec"], vid
        assert (info["width"], info["height"]) == (spec["width"], spec["height"]), vid
        assert len(frames) == spec["num_frames"], vid
        assert 8.0 - 0.2 <= spec["duration"] <= 10.0 + 0.2
        assert np.all(np.diff(times) > 0), vid
        if spec["vfr"]:
            np.testing.assert_allclose(times, spec["frame_times"], atol=1e-4)
            gaps = np.diff(times)
            # really variable: many distinct intervals, spread well beyond rounding noise
            assert len(np.unique(np.round(gaps, 4))) > 10 and gaps.std() / gaps.mean() > 0.15, vid
            assert abs(info["duration"] - spec["duration"]) < 2 * gaps.max(), vid
        else:
            assert info["rate"] == pytest.approx(spec["fps"], rel=1e-3), vid
            np.testing.assert_allclose(times - times[0], np.arange(len(times)) / spec["fps"], atol=2e-3)
            assert info["duration"] == pytest.approx(spec["duration"], abs=1.0 / spec["fps"] + 1e-3), vid


def _colour_box_centre(img, colour):
    """Centre of the bounding box of pixels close to ``colour`` (None if absent)."""
    close = np.abs(img.astype(np.int16) - np.array(colour, np.int16)).max(axis=-1) < 60
    ys, xs = np.nonzero(close)
    if len(xs) < 10:
        return None
    return (xs.min() + xs.max()) / 2, (ys.min() + ys.max()) / 2


def test_decoded_shapes_move_as_the_meta_says(corpus, decoded):
    out, meta = corpus
    for vid, spec in meta["videos"].items():
        frames, _, _ = decoded[vid]
        for ev in spec["events"]:
            colour = COLOURS[ev["colour"]]
            # visible in every frame of its event
            centres = [_colour_box_centre(frames[k], colour) for k in range(ev["first_frame"], ev["last_frame"] + 1)]
            assert all(c is not None for c in centres), (vid, ev)
            axis = 0 if ev["direction"] in ("left", "right") else 1
            lo, hi = ev["axis_range"]
            first, last = centres[0][axis], centres[-1][axis]
            want_first, want_last = (hi, lo) if ev["direction"] in ("left", "up") else (lo, hi)
            # within a few pixels (lossy codecs blur the triangle's thin tip and corners)
            tol = max(4, ev["size"] // 8)
            assert abs(first - want_first) <= tol and abs(last - want_last) <= tol, (vid, ev, first, last)


def test_direction_is_only_in_frame_order():
    spec = next(s for s in plan(6, seed=SEED)["meta"]["videos"].values() if not s["vfr"])
    ev = copy.deepcopy(spec["events"][0])
    for a, b in (("left", "right"), ("up", "down")):
        pos_a = shape_centres(spec, {**ev, "direction": a})
        pos_b = shape_centres(spec, {**ev, "direction": b})
        assert pos_a == pos_b[::-1]  # same positions, opposite order
        assert len(set(pos_a)) > 10
        # constant speed: steps differ by at most one pixel of rounding
        steps = np.abs(np.diff(np.array(pos_b), axis=0)).sum(axis=1)
        assert steps.max() - steps.min() <= 1
    # the rendered pixels put the shape exactly there (square: bbox centre == centre)
    one = {**spec, "noise": 0, "events": [{**ev, "shape": "square", "direction": "right"}]}
    for (k, img), want in zip(render_frames(one), shape_centres(one, one["events"][0])):
        assert _colour_box_centre(img, COLOURS[ev["colour"]]) == want


def test_captions_look_like_youtube_asr(corpus):
    out, meta = corpus
    captions = json.loads((out / "caption.json").read_text())
    overlaps = rolling = duplicates = 0
    for vid, cap in captions.items():
        assert set(cap) == {"start", "end", "text"}
        assert len(cap["start"]) == len(cap["end"]) == len(cap["text"]) > 0
        assert all(isinstance(x, float) for x in cap["start"] + cap["end"])
        assert cap["start"] == sorted(cap["start"])
        for i, (s, e, t) in enumerate(zip(cap["start"], cap["end"], cap["text"])):
            assert s < e and re.fullmatch(r"[a-z]+( [a-z]+)*", t), (vid, t)
            if i:
                overlaps += s < cap["end"][i - 1]
                prev = cap["text"][i - 1].split()
                duplicates += (s, e, t) == (cap["start"][i - 1], cap["end"][i - 1], cap["text"][i - 1])
                # rolling repeat: the segment opens with the previous segment's last 1-3 words
                rolling += t != cap["text"][i - 1] and any(t.split()[:k] == prev[-k:] for k in (1, 2, 3))
    assert overlaps > 20 and rolling > 10 and duplicates >= 1, (overlaps, rolling, duplicates)


def test_caption_segments_stay_inside_their_events(corpus):
    out, meta = corpus
    captions = json.loads((out / "caption.json").read_text())
    for vid, spec in meta["videos"].items():
        cap = captions[vid]
        beyond = meta["beyond_end"].get(vid)
        spoken = ""
        for s, e, t in zip(cap["start"], cap["end"], cap["text"]):
            if s == beyond:
                continue
            ev = next(ev for ev in spec["events"] if ev["start"] - 0.01 <= s < ev["end"])
            assert e <= ev["end"] + 0.31, (vid, s, e, ev)
            spoken += f" [{ev['start']}] {t}"
        for ev in spec["events"]:
            said = spoken.split(f"[{ev['start']}]")[1:]
            words = " ".join(said)
            assert ev["colour"] in words and ev["shape"] in words, (vid, ev, words)
            assert set(SAID[ev["direction"]]) & set(words.split()), (vid, ev, words)


def test_bad_entries(corpus):
    out, meta = corpus
    bad = meta["bad_videos"]
    assert {v["class"] for v in bad.values()} == {"corrupt", "truncated", "empty", "audio", "missing"}
    for vid, info in bad.items():
        assert vid.startswith("bad_" + info["class"])
        if info["class"] == "missing":
            assert info["file"] is None and not list((out / "videos").glob(vid + ".*"))
            continue
        path = out / info["file"]
        if info["class"] == "empty":
            assert path.stat().st_size == 0
        elif info["class"] == "audio":
            with av.open(str(path)) as c:
                assert len(c.streams.video) == 0 and len(c.streams.audio) == 1
        else:  # corrupt, truncated: PyAV refuses them
            with pytest.raises(av.error.FFmpegError):
                with av.open(str(path)) as c:
                    for _ in c.decode(video=0):
                        pass
    (vid, start), = meta["beyond_end"].items()
    assert start > meta["videos"][vid]["duration"]
    assert start in json.loads((out / "caption.json").read_text())[vid]["start"]


def test_same_seed_is_byte_identical(corpus, tmp_path):
    out, meta = corpus
    # encoded by 2 processes this time (the fixture used one): the bytes must not depend on it
    again = generate(tmp_path / "again", num_videos=NUM, seed=SEED, min_duration=8.0, max_duration=10.0, workers=2)
    assert again == meta
    files = sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(tmp_path / "again") for p in (tmp_path / "again").rglob("*") if p.is_file())
    for rel in files:
        assert (out / rel).read_bytes() == (tmp_path / "again" / rel).read_bytes(), rel
    other = plan(NUM, seed=SEED + 1, min_duration=8.0, max_duration=10.0)
    assert other["captions"] != plan(NUM, seed=SEED, min_duration=8.0, max_duration=10.0)["captions"]


def test_cli_and_config_errors(tmp_path, capsys):
    out = tmp_path / "cli"
    assert cli_main(["sample-data", f"out={out}", "num_videos=1", "bad_videos=false", "max_duration=8"]) == 0
    assert "wrote 1 videos" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["HowTo100M_v1.csv", "caption.json", "config.yaml",
                                                     "sample_meta.json", "videos"]
    resolved = load_config(SampleDataConfig, out / "config.yaml")  # the resolved config, read back
    assert (resolved.out, resolved.num_videos, resolved.bad_videos, resolved.max_duration) == (str(out), 1, False, 8)
    # a non-empty directory is refused unless overwrite=true
    assert cli_main(["sample-data", f"out={out}", "num_videos=1"]) == 2
    assert "overwrite=true" in capsys.readouterr().err
    assert cli_main(["sample-data", f"out={out}", "num_videos=1", "max_duration=8", "overwrite=true"]) == 0
    assert cli_main(["sample-data", "num_videos=3"]) == 2
    assert "out=DIR" in capsys.readouterr().err
    with pytest.raises(ValueError, match="min_duration"):
        SampleDataConfig(out="x", min_duration=9.0, max_duration=8.0)
