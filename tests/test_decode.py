"""sharding.decode: frames chosen by presentation time, the same with seeking or decoding through, both decoders."""

import json
import os
from pathlib import Path

import av
import pytest

import sharding.decode.pyav as pyav_decoder
from sharding.decode.extract import extract_clips
from sharding.decode.video import ExtractError
from sharding.decode.worker import DecodeWorker


def all_pts(path):
    with av.open(str(path)) as c:
        s = c.streams.video[0]
        start = float(s.start_time * s.time_base) if s.start_time else 0.0
        return [f.time - start for f in c.decode(s)]


def good_videos(corpus):
    meta = json.loads((corpus / "sample_meta.json").read_text())
    return meta, {vid: corpus / v["file"] for vid, v in meta["videos"].items()}


def test_vfr_frames_are_the_ones_on_screen_at_each_target(sample_corpus):
    meta, paths = good_videos(sample_corpus)
    vid = next(v for v, m in meta["videos"].items() if m["kind"].endswith("vfr"))
    pts = all_pts(paths[vid])
    gaps = {round(b - a, 4) for a, b in zip(pts, pts[1:])}
    assert len(gaps) > 5, "the test video should have a variable frame rate"
    targets = [0.37, 1.11, 2.05, 2.5, 4.44]
    _info, per_clip = extract_clips(paths[vid], [(0.0, 5.0, targets)], frame_size=32)
    got = [t for t, _ in per_clip[0]]
    expected = [max(p for p in pts if p <= t + 1e-6) for t in targets]
    assert got == pytest.approx(expected, abs=1e-5)


def test_seeking_gives_the_same_frames_as_decoding_through(sample_corpus, monkeypatch):
    meta, paths = good_videos(sample_corpus)
    for vid, path in list(paths.items())[:4]:
        d = meta["videos"][vid]["duration"]
        clips = [(0.2, 2.0, [0.5, 1.5]), (d * 0.6, d * 0.9, [d * 0.65, d * 0.85])]
        info, seek = extract_clips(path, clips, frame_size=32)
        monkeypatch.setattr(pyav_decoder, "_keyframe_times", lambda *a: [])
        _, through = extract_clips(path, clips, frame_size=32)
        monkeypatch.undo()
        assert seek == through, f"{vid} ({info.codec}): seeking changed the frames"


def test_decord_and_pyav_pick_the_same_frames(sample_corpus):
    meta, paths = good_videos(sample_corpus)
    vid = next(v for v, m in meta["videos"].items() if m["kind"] == "mp4_h264")
    clips = [(0.0, 3.0, [0.5, 1.5, 2.5]), (3.0, 5.0, [3.2, 4.9])]
    _, a = extract_clips(paths[vid], clips, frame_size=32, decoder="pyav")
    info, b = extract_clips(paths[vid], clips, frame_size=32, decoder="decord")
    assert info.decoder == "decord"
    assert [t for c in a for t, _ in c] == pytest.approx([t for c in b for t, _ in c], abs=1e-3)


@pytest.mark.parametrize("decoder", ["pyav", "decord"])
def test_whole_video_failures_are_classified(sample_corpus, tmp_path, decoder):
    videos = sample_corpus / "videos"
    expected = {"bad_corrupt": "corrupt", "bad_truncated": "truncated", "bad_empty": "empty",
                "bad_audio": "no_video_stream"}
    for vid, cls in expected.items():
        path = next(videos.glob(f"{vid}.*"))
        with pytest.raises(ExtractError) as ei:
            extract_clips(path, [(0, 1, [0.5])], frame_size=32, decoder=decoder)
        assert ei.value.cls == cls and str(path) in ei.value.message, (decoder, ei.value)
    with pytest.raises(ExtractError) as ei:
        extract_clips(tmp_path / "nope.mp4", [(0, 1, [0.5])], frame_size=32, decoder=decoder)
    assert ei.value.cls == "missing"


def test_span_beyond_end_fails_only_that_clip(sample_corpus):
    meta, paths = good_videos(sample_corpus)
    vid, path = next(iter(paths.items()))
    d = meta["videos"][vid]["duration"]
    info, per_clip = extract_clips(path, [(0, 2, [1.0]), (d + 2, d + 4, [d + 3])], frame_size=32)
    assert isinstance(per_clip[0], list) and isinstance(per_clip[1], ExtractError)
    assert per_clip[1].cls == "span_beyond_end"


def test_worker_kills_a_hung_decode_and_serves_the_next(sample_corpus, tmp_path):
    fifo = tmp_path / "stuck.mp4"
    os.mkfifo(fifo)
    _meta, paths = good_videos(sample_corpus)
    worker = DecodeWorker()
    try:
        with pytest.raises(ExtractError) as ei:
            worker.run(fifo, [(0, 1, [0.5])], timeout=2, frame_size=32)
        assert ei.value.cls == "timeout" and "video_timeout_s" in ei.value.message
        info, per_clip = worker.run(next(iter(paths.values())), [(0, 1, [0.5])], timeout=60, frame_size=32)
        assert len(per_clip[0]) == 1
    finally:
        worker.close()


SLOW_HOOK = Path(__file__).parent / "hooks" / "slow"  # sitecustomize.py: PTRAIN_TEST_START_DELAY_S slows start-up


def test_a_slow_decoder_start_does_not_count_against_the_video(sample_corpus, monkeypatch):
    _meta, paths = good_videos(sample_corpus)
    # every process started from here on sleeps 3 s at start-up: the spawned decoder child does
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(SLOW_HOOK), *filter(None, [os.environ.get("PYTHONPATH")])]))
    monkeypatch.setenv("PTRAIN_TEST_START_DELAY_S", "3")
    worker = DecodeWorker()
    try:
        info, per_clip = worker.run(next(iter(paths.values())), [(0, 1, [0.5])], timeout=2, frame_size=32)
        assert len(per_clip[0]) == 1
    finally:
        worker.close()
    worker = DecodeWorker(start_timeout=0.5)  # but a child that never comes up is a clear error
    with pytest.raises(ExtractError) as ei:
        worker.run(next(iter(paths.values())), [(0, 1, [0.5])], timeout=60, frame_size=32)
    assert ei.value.cls == "decoder_crash" and "did not start" in ei.value.message
    worker.close()


def cut_video(path, codec, options, seconds=4, fps=25, keep=0.5):
    """A noise video (every frame costs about the same bytes) of ``seconds`` s, cut after ``keep`` of its bytes."""
    import numpy as np

    rng = np.random.default_rng(0)
    with av.open(str(path), "w", options=options) as c:
        s = c.add_stream(codec, rate=fps)
        s.width, s.height, s.pix_fmt = 64, 48, "yuv420p"
        s.codec_context.gop_size = fps
        for _ in range(seconds * fps):
            for p in s.encode(av.VideoFrame.from_ndarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8),
                                                         format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    return path


@pytest.mark.parametrize("name,codec,options,decoders", [
    # moov first: the header survives the cut; decord cannot open it, so decoder=decord falls back to PyAV
    ("faststart.mp4", "libx264", {"movflags": "+faststart"}, {"pyav": "pyav", "decord": "pyav"}),
    ("cut.mkv", "mpeg4", {}, {"pyav": "pyav", "decord": "decord"}),  # FFmpeg reads it to the cut without an error
])
def test_half_cut_file_keeps_its_readable_clips_and_fails_the_rest_as_truncated(tmp_path, name, codec, options,
                                                                                 decoders):
    path = cut_video(tmp_path / name, codec, options)
    dense = [(0.0, 1.0, [0.1, 0.3, 0.5, 0.7, 0.9]), (1.0, 1.5, [1.1, 1.3]), (1.5, 2.5, [1.7, 1.9, 2.1, 2.3]),
             (2.5, 3.2, [2.6, 3.0]), (3.2, 3.9, [3.3, 3.8])]
    sparse = [(0.0, 1.0, [0.5]), (2.5, 3.5, [3.0]), (3.0, 3.9, [3.5])]  # seeks to keyframes past the cut
    for decoder, used in decoders.items():
        for clips, readable in ((dense, 2), (sparse, 1)):
            info, per_clip = extract_clips(path, clips, frame_size=32, decoder=decoder)
            assert info.decoder == used and info.truncated and info.duration < 2.0 < info.header_duration, (decoder, info)
            for (start, end, targets), result in zip(clips[:readable], per_clip[:readable]):
                assert isinstance(result, list), (decoder, start, result)
                for (t, _jpg), target in zip(result, targets):
                    assert start - 1e-6 <= t <= end and abs(t - target) <= 1 / 25 + 1e-6
            for result in per_clip[readable:]:  # not copies of the last decoded frame, and not span_beyond_end
                assert isinstance(result, ExtractError) and result.cls == "truncated", (decoder, result)
                assert "truncated" in result.message


@pytest.mark.parametrize("decoder", ["pyav", "decord"])
def test_a_frame_shown_before_the_clip_starts_is_replaced_by_the_clips_first(tmp_path, decoder):
    path = cut_video(tmp_path / "v.mkv", "mpeg4", {}, keep=1.0)  # 25 fps: frames at 0.00, 0.04, ...
    clips = [(1.01, 1.5, [1.02, 1.3]), (2.0, 2.5, [2.01]), (3.01, 3.03, [3.02])]
    _info, per_clip = extract_clips(path, clips, frame_size=32, decoder=decoder)
    assert [[t for t, _ in c] for c in per_clip] == [[1.04, 1.28], [2.0], [3.0]]  # the last: no frame inside it
