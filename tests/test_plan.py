"""The clip planner and frame-time selection (pure functions)."""

import json

import pytest

from ptrain.data.format import sample_key, sanitize_id
from sharding.config import PlanConfig
from sharding.plan import (
    clean_segments,
    clip_frame_times,
    clip_rows,
    pack_groups,
    plan_clips,
    plan_video,
    planned_clip,
    select_frames,
)
from sharding.sources import CaptionError, Segment
from sharding.sources.howto100m import load_captions


def seg(s, e, t):
    return Segment(float(s), float(e), t)


def test_clean_rolling_repeats_and_overlaps():
    raw = [
        seg(0.0, 2.5, "so today we are"),
        seg(2.0, 4.5, "we are going to make"),  # rolling head repeats "we are", overlaps in time
        seg(2.0, 4.5, "we are going to make"),  # exact duplicate
        seg(4.0, 6.0, "going to make"),  # fully repeated: only extends the previous
        seg(6.5, 8.0, "a   cake\n"),
    ]
    out = clean_segments(raw)
    assert [s.text for s in out] == ["so today we are", "going to make", "a cake"]
    # no overlap left, order kept
    assert all(a.end <= b.start for a, b in zip(out, out[1:]))
    assert out[1].start == 2.5 and out[1].end == 6.0


def test_clean_sorts_and_drops_empty():
    out = clean_segments([seg(5, 6, "b c"), seg(0, 1, "  "), seg(1, 2, "a")])
    assert [s.text for s in out] == ["a", "b c"]


def test_zero_length_segments_merge_only_on_real_overlap():
    segs = [seg(3, 3, "a b c d e"), seg(20, 20, "x y z w")]
    out = clean_segments(segs)
    # widened to ZERO_LENGTH_SECONDS, never swallowed by a segment that ended long before
    assert [(s.start, s.end, s.text) for s in out] == [(3, 3.5, "a b c d e"), (20, 20.5, "x y z w")]
    clips = plan_clips(segs, min_seconds=2, min_words=3, max_seconds=20, max_gap_seconds=4)
    assert [(c.start, c.end, c.text) for c in clips] == [(3, 3.5, "a b c d e"), (20, 20.5, "x y z w")]
    # a zero-length segment inside another one is still merged into it
    inside = clean_segments([seg(0, 4, "one two"), seg(2, 2, "three")])
    assert [(s.start, s.end, s.text) for s in inside] == [(0, 4, "one two three")]
    # a zero-length clip has one frame time, not num_frames copies of it
    assert clip_frame_times(5, 5, num_frames=4, sampling="uniform") == [5]
    assert clip_frame_times(5, 5, num_frames=4, sampling="fps") == [5]
    # and one that starts inside another but ends after it is trimmed to start at its end
    after = clean_segments([seg(0, 4, "one two"), seg(3.8, 3.8, "three")])
    assert [(s.start, s.end, s.text) for s in after] == [(0, 4, "one two"), (4, 4.3, "three")]


def test_rolling_repeat_is_removed_only_when_segments_overlap_or_touch():
    far = clean_segments([seg(0, 2, "stir and"), seg(10, 12, "and serve")])
    assert [s.text for s in far] == ["stir and", "and serve"]  # said again 8 s later: kept
    touching = clean_segments([seg(0, 2, "stir and"), seg(2.05, 4, "and serve")])
    assert [s.text for s in touching] == ["stir and", "serve"]
    overlapping = clean_segments([seg(0, 2, "stir and"), seg(1.5, 4, "and serve")])
    assert [(s.start, s.text) for s in overlapping] == [(0, "stir and"), (2, "serve")]
    assert [s.text for s in clean_segments([seg(0, 2, "stir it"), seg(10, 12, "stir it")])] == ["stir it", "stir it"]


def test_plan_clips_grows_to_min_seconds_and_words():
    segs = [seg(i, i + 1, f"w{i} x") for i in range(12)]  # 1 s, 2 words each
    clips = plan_clips(segs, min_seconds=3.0, min_words=4, max_seconds=10.0)
    assert [(c.start, c.end) for c in clips] == [(0, 3), (3, 6), (6, 9), (9, 12)]
    assert clips[0].text == "w0 x w1 x w2 x"
    assert len(clips[0].segments) == 3


def test_plan_clips_caps_and_gaps_and_tail():
    # a single segment longer than max_seconds is split into equal pieces, its words shared out in proportion
    long = plan_clips([seg(0, 50, "a very long monologue here")], min_seconds=5, min_words=1, max_seconds=20)
    assert [(round(c.start, 6), round(c.end, 6), c.text) for c in long] == [
        (0, 16.666667, "a very"), (16.666667, 33.333333, "long"), (33.333333, 50, "monologue here")]
    few = plan_clips([seg(10, 70, "only two")], min_seconds=5, min_words=1, max_seconds=20)
    assert [(c.start, c.end, c.text) for c in few] == [(10, 30, "only"), (50, 70, "two")]  # a wordless piece: dropped
    gap = plan_clips([seg(0, 1, "a b"), seg(30, 31, "c d")], min_seconds=5, min_words=1, max_seconds=60,
                     max_gap_seconds=4)
    assert [c.text for c in gap] == ["a b", "c d"]  # never merged across the silence
    tail = plan_clips([seg(0, 5, "one two three"), seg(5, 6, "four")], min_seconds=5, min_words=2, max_seconds=20)
    assert [c.text for c in tail] == ["one two three four"]  # a too-short tail joins the previous clip
    assert tail[0].end == 6


def test_plan_clips_never_exceeds_max_seconds():
    segs = [seg(i * 3, i * 3 + 3, f"word{i}") for i in range(20)] + [seg(61, 95, " ".join(f"w{i}" for i in range(17)))]
    clips = plan_clips(segs, min_seconds=8, min_words=3, max_seconds=10)
    for c in clips:
        assert c.end - c.start <= 10 + 1e-9
        assert c.text
    # no word is lost or repeated by the splitting
    assert " ".join(c.text for c in clips).split() == [f"word{i}" for i in range(20)] + [f"w{i}" for i in range(17)]
    assert [(c.start, c.end) for c in clips][-4:] == [(61, 69.5), (69.5, 78), (78, 86.5), (86.5, 95)]


def test_frame_times_uniform_and_fps():
    assert clip_frame_times(10, 14, num_frames=4, sampling="uniform") == [10.5, 11.5, 12.5, 13.5]
    assert clip_frame_times(0, 5, num_frames=12, sampling="fps", fps=1) == [0.5, 1.5, 2.5, 3.5, 4.5]
    assert clip_frame_times(0, 0.4, num_frames=12, sampling="fps", fps=1) == [0.2]
    times = clip_frame_times(0, 20, num_frames=4, sampling="fps", fps=1, slice="uniform")
    assert times == [0.5, 6.5, 12.5, 19.5]  # np.linspace(0, 19, 4, dtype=int) = [0, 6, 12, 19]
    assert clip_frame_times(0, 20, num_frames=3, sampling="fps", fps=1, slice="head") == [0.5, 1.5, 2.5]
    assert clip_frame_times(0, 20, num_frames=3, sampling="fps", fps=1, slice="tail") == [17.5, 18.5, 19.5]
    for t in clip_frame_times(3.2, 9.9, num_frames=12, sampling="fps", fps=2):
        assert 3.2 <= t <= 9.9


def test_select_frames_by_presentation_time_vfr():
    pts = [0.0, 0.1, 0.15, 0.9, 1.0, 2.5]  # variable frame rate
    # on screen at t: the last frame with pts <= t; before the first frame: the first frame
    assert select_frames([0.12, 0.5, 1.2, 3.0, 0.15], pts) == [1, 2, 4, 5, 2]
    assert select_frames([0.0], [0.04, 0.08]) == [0]


def test_select_frames_keeps_frames_inside_their_clip():
    pts = [i / 25 for i in range(51)]  # 25 fps
    # clip [1.01, 1.5]: the frame on screen at 1.02 was shown at 1.00, before the clip: take 1.04, the clip's first
    assert select_frames([1.02, 1.3], pts, [(1.01, 1.5), (1.01, 1.5)]) == [26, 32]
    assert select_frames([1.02], pts) == [25]  # without bounds: the frame on screen
    # a clip too short to hold a frame keeps the one on screen at its start
    assert select_frames([1.02], pts, [(1.01, 1.03)]) == [25]


def test_fps_slicing_matches_numpy_linspace():
    import numpy as np

    for n in range(2, 60):
        for k in range(1, n):
            times = clip_frame_times(0, n, num_frames=k, sampling="fps", fps=1, slice="uniform")
            expected = [i + 0.5 for i in np.linspace(0, n - 1, k, dtype=int)]
            assert times == expected, (n, k)


def test_keys_are_sanitised_and_unique():
    for vid in ["../../etc/passwd", "a.b.c", "a/b", "x y", ".hidden"]:
        key = sample_key(vid, 3)
        assert "." not in key and "/" not in key and ".." not in key
        assert key.endswith("_0003")
    assert sanitize_id("abcDEF_12-3") == "abcDEF_12-3"  # YouTube ids are kept as they are
    assert sanitize_id("a.b") != sanitize_id("a/b")


def test_load_captions_fails_fast_with_file_video_and_problem(tmp_path):
    f = tmp_path / "caption.json"
    f.write_text(json.dumps({"good": {"start": [0], "end": [1], "text": ["a"]},
                             "vid7": {"start": [0, 1], "end": [1], "text": ["a", "b"]}}))
    with pytest.raises(CaptionError, match=r"caption.json: video 'vid7': start, end and text have different lengths"):
        load_captions(f)
    f.write_text(json.dumps({"v": {"start": [2], "end": [1], "text": ["a"]}}))
    with pytest.raises(CaptionError, match="video 'v': segment 0: end 1 is before start 2"):
        load_captions(f)
    f.write_text(json.dumps({"v": {"start": ["x"], "end": [1], "text": ["a"]}}))
    with pytest.raises(CaptionError, match="must be numbers"):
        load_captions(f)
    f.write_text(json.dumps({"v": {"start": [0], "text": ["a"]}}))
    with pytest.raises(CaptionError, match="missing key"):
        load_captions(f)
    f.write_text('{"v": {"start": [0], "end": [1], "text": ["\\ud83d"]}}')  # a lone surrogate: valid JSON
    import ijson

    if ijson.backend == "yajl2_c":  # yajl reads it as '?': valid text, never a lone surrogate in a plan
        assert load_captions(f)["v"][0].text == "?"
    else:
        with pytest.raises(CaptionError, match="video 'v': segment 0: text is not valid Unicode"):
            load_captions(f)
    f.write_text("{not json")
    with pytest.raises(CaptionError, match="not valid UTF-8 JSON"):
        load_captions(f)
    with pytest.raises(CaptionError, match="not found"):
        load_captions(tmp_path / "nope.json")


def test_pack_groups_spreads_videos_and_is_deterministic():
    cfg = PlanConfig(min_seconds=2, min_words=1, max_seconds=10, num_frames=4, sampling="uniform")

    def stream(ids):
        return ((vid, clip_rows([seg(j * 2, j * 2 + 2, f"a b c{j}") for j in range(6)], cfg)) for vid in ids)

    ids = [f"v{i}" for i in range(5)]
    groups = list(pack_groups(stream(ids), max_samples_per_shard=4, shards_per_task=2))
    clips = [planned_clip(vid, row) for g in groups for vid, rows in g.videos for row in rows]
    assert len(clips) == 30 and len({c.key for c in clips}) == 30
    # groups of at most 8 clips, in stream order; shards numbered on from group to group
    assert [[vid for vid, _ in g.videos] for g in groups] == [["v0"], ["v1"], ["v2"], ["v3"], ["v4"]]
    assert [g.shards for g in groups] == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]]
    per_shard = {}
    for c in clips:
        per_shard.setdefault(c.shard, []).append(c)
    assert all(len(v) <= 4 for v in per_shard.values()) and len(per_shard) == 10
    # a video's clips land in more than one shard, dealt round robin (clip 0 of every video first)
    assert {c.shard for c in clips if c.video_id == "v0"} == {0, 1}
    big = list(pack_groups(stream(ids), max_samples_per_shard=10, shards_per_task=2))
    assert [[vid for vid, _ in g.videos] for g in big] == [["v0", "v1", "v2"], ["v3", "v4"]]
    first = [(planned_clip(vid, row).key, row[1]) for vid, rows in big[0].videos for row in rows]
    # within a group: clip 0 of v0, v1, v2, then clip 1 ... dealt over 2 shards
    assert dict(first)["v0_0000"] == 0 and dict(first)["v1_0000"] == 1 and dict(first)["v2_0000"] == 0
    again = list(pack_groups(stream(ids), max_samples_per_shard=10, shards_per_task=2))
    assert [(g.first_shard, g.videos) for g in again] == [(g.first_shard, g.videos) for g in big]
    # the order of the stream is the order of the plan (the caption file's): another order, another packing
    other = list(pack_groups(stream(list(reversed(ids))), max_samples_per_shard=10, shards_per_task=2))
    assert [[vid for vid, _ in g.videos] for g in other] == [["v4", "v3", "v2"], ["v1", "v0"]]


def test_a_bogus_long_segment_is_split_per_word_not_per_piece():
    from sharding.plan import split_long_segments
    from sharding.sources import Segment

    # an epoch timestamp as an end time asks for ~1e8 pieces of 20 s: only the 3 that hold a word exist
    parts = split_long_segments([Segment(0.0, 1.7e9, "a b c")], 20.0)
    assert [p.text for p in parts] == ["a", "b", "c"]
    assert all(p.end - p.start <= 20.0 + 1e-6 and 0 <= p.start < p.end <= 1.7e9 for p in parts)


def test_howto100m_source_yields_listed_videos_in_order(tmp_path):
    from sharding.sources import open_source
    from sharding.sources.howto100m import HowTo100M

    seg_ = {"start": [0], "end": [6], "text": ["one two three four"]}
    (tmp_path / "caption.json").write_text(json.dumps({"b": seg_, "a": seg_, "c": seg_}))
    (tmp_path / "list.csv").write_text("video_id,rank\nc,1\nzz,2\na,3\nc,4\n")
    records = list(HowTo100M(tmp_path / "caption.json").records())
    assert [r.video_id for r in records] == ["b", "a", "c"]  # no list: every captioned video, in file order
    assert records[0].segments == [Segment(0.0, 6.0, "one two three four")] and records[0].stem == "b"

    class Cfg:  # the ShardConfig keys the source reads
        captions, video_list = str(tmp_path / "caption.json"), str(tmp_path / "list.csv")

    source = open_source("howto100m", Cfg)
    listed = list(source.records())
    # listed videos in caption-file order, then the listed ids without captions
    assert [(r.video_id, bool(r.segments)) for r in listed] == [("a", True), ("c", True), ("zz", False)]
    assert listed[2].skip_reason == f"zz: listed in {Cfg.video_list} but absent from {Cfg.captions}"
    facts = source.describe()
    assert facts["source"] == "howto100m" and facts["captions"]["bytes"] == (tmp_path / "caption.json").stat().st_size
    with pytest.raises(CaptionError, match="video list not found"):
        list(HowTo100M(tmp_path / "caption.json", tmp_path / "nope.csv").records())
    with pytest.raises(ValueError, match="unknown source 'msrvtt2'"):
        open_source("msrvtt2", Cfg)


def test_huge_finite_caption_times_are_refused_with_the_48_h_bound(tmp_path):
    f = tmp_path / "caption.json"
    for start, end in ((0, 1e300), (1e300, 1.7e308), (0, 172801), (0, 10**18)):
        f.write_text('{"ok": {"start": [0], "end": [1], "text": ["a"]}, "v": {"start": [%s], "end": [%s], '
                     '"text": ["a b"]}}' % (start, end))
        with pytest.raises(CaptionError, match=r"video 'v': segment 0: times must lie within 0 \.\. 172800 s \(48 h"):
            load_captions(f)
    for big in ("1e999", str(10**400)):  # beyond a double or a 64-bit integer: the parser refuses the file
        f.write_text('{"v": {"start": [0, %s], "end": [1, 2], "text": ["a", "b"]}}' % big)
        with pytest.raises(CaptionError, match="caption.json: not valid UTF-8 JSON .in or after video 'v'.*overflow"):
            load_captions(f)
    f.write_text('{"v": {"start": [0, 172800], "end": [1, 172800], "text": ["a", "b"]}}')  # the bound itself: kept
    assert load_captions(f)["v"][1] == Segment(172800.0, 172800.0, "b")


def test_caption_json_nested_beyond_the_format_is_refused_at_once(tmp_path):
    f = tmp_path / "caption.json"
    depth = 200_000  # json.loads: RecursionError; a builder that follows it: memory quadratic in the depth
    f.write_text('{"v": {"start": ' + "[" * depth + "]" * depth + ', "end": [], "text": []}}')
    with pytest.raises(CaptionError, match="video 'v': 'start' nests a list or an object in a list; the format nests "
                                           "no deeper than"):
        load_captions(f)
    f.write_text('{"v": {"start": [0], "end": [1], "text": ["a"], "meta": ' + "{" * 10 + "}" * 10 + "}}")
    with pytest.raises(CaptionError, match="video 'v': 'meta' holds an object; the format nests no deeper"):
        load_captions(f)
    f.write_text("[" * depth + "]" * depth)
    with pytest.raises(CaptionError, match="the top level must be an object .* got array"):
        load_captions(f)


def test_a_duplicate_video_key_is_reported_by_id(tmp_path):
    f = tmp_path / "caption.json"
    f.write_text('{"a": {"start": [0], "end": [6], "text": ["first entry"]}, "b": {"start": [0], "end": [6], '
                 '"text": ["x y"]}, "a": {"start": [10], "end": [16], "text": ["second entry"]}}')
    with pytest.raises(CaptionError, match="caption.json: video 'a' appears twice; a JSON reader would keep only the "
                                           "last entry and drop the first one's segments"):
        load_captions(f)
