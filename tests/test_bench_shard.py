"""Benchmark splits through `ptrain shard`: tiny annotation files in each benchmark's real format and generated
videos -> one sample per video with every caption (a paragraph with its timed sentences), whole-video frame times
placed on the video's duration when it is decoded, spans cut at the video's end, missing videos recorded; read back
through the loaders (every caption, expand from the sidecars, another frame subset per epoch) and `ptrain eval`
picking the protocol from the shards. The Ray jobs are slow; planning, placing and decoding are tested without Ray."""

from __future__ import annotations

import json
import pickle
import warnings
from fractions import Fraction
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from ptrain.config import ConfigError, load_config
from ptrain.data.format import sanitize_id
from sharding.config import ShardConfig
from sharding.decode.pyav import write_video
from sharding.decode.video import ExtractError
from sharding.decode.worker import DecodeWorker, decode_planned
from sharding.job import run as shard_run
from sharding.plan import clip_frame_times, index_videos, place_clip, plan_record, planned_clip
from sharding.sources import Segment, VideoRecord

FAST = ["frame_size=32", "progress=false", "ray.num_cpus=2", "max_samples_per_shard=2", "shards_per_task=2"]
RATE = 10  # frames per second of the generated videos


def make_video(path: Path, seconds: float, seed: int = 0) -> Path:
    """A 64x48 video of ``seconds`` s at 10 fps whose frame k has mean level 4k (mod 250): the frame is its time."""
    encoder = {".avi": "mpeg4", ".flv": "flv", ".wmv": "wmv2"}.get(path.suffix, "libx264")
    rng = np.random.default_rng(seed)
    frames = ((None, np.clip(rng.normal(4 * k % 250, 3, (48, 64, 3)), 0, 255).astype(np.uint8))
              for k in range(round(seconds * RATE)))
    path.parent.mkdir(parents=True, exist_ok=True)
    write_video(path, frames, encoder=encoder, rate=Fraction(RATE), width=64, height=48)
    return path


def shard_cfg(*args: str) -> ShardConfig:
    return load_config(ShardConfig, None, [*args, *FAST])


# ----------------------------------------------------------------------------------------------
# annotation files in the releases' formats (as tests/test_sources.py writes them)


MSVD = {  # raw-captions.pkl: pre-tokenised captions; ids start with '-' (sanitised in keys)
    "-4wsuPCjDBc_5_15": [["a", "squirrel", "is", "eating", "a", "peanut"], ["a", "chipmunk", "eats"]],
    "zzit5b_-ukg_5_20": [["a", "man", "rides", "a", "bike"], ["someone", "is", "riding"], ["a", "biker"]],
    "-7KMZQEsJW4_205_208": [["a", "man", "is", "cutting", "a", "bottle"]],  # its video is missing
}
MSVD_SECONDS = {"-4wsuPCjDBc_5_15": 5.0, "zzit5b_-ukg_5_20": 7.0}

ANET = {  # val_1.json: paragraphs with timed sentences; files are named without v_ (or, in some copies, with it)
    "v_QOlSCBRmfWY": {"duration": 9.3, "timestamps": [[0.5, 3.0], [2.5, 7.0], [6.0, 9.0]],
                      "sentences": ["A young woman stands in a room.", " She begins to dance.", " She spins."]},
    "v_ehGHCYKzyZ8": {"duration": 5.0, "timestamps": [[0, 2.5], [2.1, 5.0]],
                      "sentences": ["A man stands on a beach.", " He throws a frisbee."]},
}
ANET_FILES = {"v_QOlSCBRmfWY": "QOlSCBRmfWY.mp4", "v_ehGHCYKzyZ8": "v_ehGHCYKzyZ8.mkv"}

JSFUSION = [("video7010", "a dog runs on the grass", 4.0), ("video1", "a man is singing", 6.0)]


def msvd_data(root: Path) -> tuple[Path, Path]:
    ann, videos = root / "msvd_ann", root / "msvd_videos"
    ann.mkdir()
    (ann / "raw-captions.pkl").write_bytes(pickle.dumps(MSVD, protocol=2))
    for split in ("train", "val"):
        (ann / f"{split}_list.txt").write_text("zzit5b_-ukg_5_20\n")
    (ann / "test_list.txt").write_text("-4wsuPCjDBc_5_15\n-7KMZQEsJW4_205_208\nzzit5b_-ukg_5_20\n")
    for i, (vid, seconds) in enumerate(MSVD_SECONDS.items()):
        make_video(videos / f"{vid}.avi", seconds, seed=i)  # MSVD ships .avi
    return ann, videos


def anet_data(root: Path) -> tuple[Path, Path]:
    ann, videos = root / "anet_ann", root / "anet_videos"
    ann.mkdir()
    (ann / "val_1.json").write_text(json.dumps(ANET))
    (ann / "train.json").write_text(json.dumps({}))
    for i, (vid, name) in enumerate(ANET_FILES.items()):
        make_video(videos / "sub" / name, ANET[vid]["duration"], seed=10 + i)
    return ann, videos


def msrvtt_data(root: Path) -> tuple[Path, Path]:
    ann, videos = root / "msrvtt_ann", root / "msrvtt_videos"
    ann.mkdir()
    (ann / "MSRVTT_JSFUSION_test.csv").write_text(
        "key,vid_key,video_id,sentence\n" + "".join(f"ret{i},msr{i},{v},{s}\n" for i, (v, s, _) in enumerate(JSFUSION)))
    for i, (vid, _s, seconds) in enumerate(JSFUSION):
        make_video(videos / f"{vid}.mp4", seconds, seed=20 + i)
    return ann, videos


# ----------------------------------------------------------------------------------------------
# planning (pure) and placing on a duration


PLAN = SimpleNamespace(num_frames=4, sampling="fps", fps=1.0, slice="uniform", min_seconds=5.0, min_words=4,
                       max_seconds=20.0, max_gap_seconds=4.0)


def test_a_benchmark_record_is_one_row_with_every_caption_and_a_whole_video_marker():
    rec = VideoRecord("-4wsuPCjDBc_5_15", captions=["a squirrel", "a chipmunk eats"], split="test",
                      meta={"category": 3})
    (row,) = plan_record(rec, PLAN)
    assert plan_record(rec, PLAN) == [row]  # pure: the same record and settings give the same row
    clip = planned_clip(rec.video_id, row)
    assert clip.key == f"{sanitize_id(rec.video_id)}_0000" and clip.key.startswith("4wsuPCjDBc_5_15-")
    assert (clip.start, clip.end, clip.targets, clip.text) == (0.0, None, None, "a squirrel")
    assert clip.bench == {"captions": ["a squirrel", "a chipmunk eats"], "split": "test", "span": None,
                          "sampling": [4, "fps", 1.0, "uniform"], "meta": {"category": 3}}
    # a span (DiDeMo) gets its frame times now; the paragraph keeps its timed sentences
    didemo = VideoRecord("x.mov", file_id="x", captions=["a b"], split="val", span=(0.0, 30.0),
                         sentences=[Segment(0.0, 6.25, "a"), Segment(22.5, 30.0, "b")])
    (row,) = plan_record(didemo, PLAN)
    clip = planned_clip(didemo.video_id, row)
    assert (clip.start, clip.end, clip.targets) == (0.0, 30.0, clip_frame_times(0, 30, num_frames=4))
    assert clip.bench["span"] == [0.0, 30.0] and clip.bench["sentences"] == [[0.0, 6.25, "a"], [22.5, 30.0, "b"]]
    assert plan_record(VideoRecord("y", captions=[], span=(0.0, 30.0)), PLAN) == []  # nothing to retrieve it by


def test_place_clip_covers_the_whole_video_and_cuts_a_span_at_the_end():
    whole = planned_clip("v", plan_record(VideoRecord("v", captions=["c"]), PLAN)[0])
    placed = place_clip(whole, 9.3)
    assert (placed.start, placed.end) == (0.0, 9.3)
    assert placed.targets == [round(t, 6) for t in clip_frame_times(0.0, 9.3, num_frames=4)]  # 9 s -> 4 evenly spaced
    assert placed.targets[0] == 0.5 and placed.targets[-1] == 8.5
    span = planned_clip("d", plan_record(VideoRecord("d", captions=["c"], span=(0.0, 30.0)), PLAN)[0])
    assert place_clip(span, 31.0) is span  # inside the video: as planned
    cut = place_clip(span, 6.0)
    assert (cut.end, cut.targets) == (6.0, clip_frame_times(0.0, 6.0, num_frames=4))
    late = planned_clip("l", plan_record(VideoRecord("l", captions=["c"], span=(40.0, 50.0)), PLAN)[0])
    assert place_clip(late, 30.0) == "span [40.00, 50.00] s starts at or after the video's end (30.00 s)"
    asr = planned_clip("a", [0, -1, 0.0, 5.0, "t", [], [2.5]])
    assert place_clip(asr, 1.0) is asr  # ASR clips are judged by the decoder (span_beyond_end with tolerance)


def test_decode_places_samples_on_the_header_duration_in_the_worker(tmp_path):
    whole = make_video(tmp_path / "whole.mp4", 9.3)
    short = make_video(tmp_path / "short.mov", 6.0, seed=1)
    cfg = SimpleNamespace(**{**vars(PLAN), "num_frames": 8, "fps": 2.0})  # 2x frames: up to 8 at 2 fps
    worker = DecodeWorker()
    try:
        clip = planned_clip("w", plan_record(VideoRecord("w", captions=["c"]), cfg)[0])
        info, (placed,), (frames,) = decode_planned(worker, whole, [clip], timeout=60, frame_size=32)
        assert (placed.start, placed.end) == (0.0, 9.3) and info.duration == pytest.approx(9.3)
        assert placed.targets == [round(t, 6) for t in clip_frame_times(0.0, 9.3, num_frames=8, fps=2.0)]
        times = [t for t, _ in frames]
        assert len(times) == 8 and 0.0 <= times[0] < 0.5 and 8.5 < times[-1] <= 9.3  # spread over the whole video
        # a DiDeMo span (0, 30) on a 6-s video: its 6 s at 2 fps (8 of the 12), never past the end; a span that
        # starts after the end is span_beyond_end, and nothing is decoded for it
        span = planned_clip("d", plan_record(VideoRecord("d", captions=["c"], span=(0.0, 30.0)), cfg)[0])
        late = planned_clip("l", plan_record(VideoRecord("l", captions=["c"], span=(40.0, 50.0)), cfg)[0])
        info, (cut, _late), (frames, err) = decode_planned(worker, short, [span, late], timeout=60, frame_size=32)
        assert cut.end == 6.0 and len(frames) == 8 and all(0.0 <= t <= 6.0 for t, _ in frames)
        assert isinstance(err, ExtractError) and err.cls == "span_beyond_end"
        info, _, (err,) = decode_planned(worker, short, [late], timeout=60, frame_size=32)
        assert info is None and err.cls == "span_beyond_end"
        with pytest.raises(ExtractError) as ei:
            decode_planned(worker, tmp_path / "absent.mp4", [clip], timeout=60, frame_size=32)
        assert ei.value.cls == "missing"
    finally:
        worker.close()


def test_a_header_without_a_video_duration_is_measured_from_the_packets(tmp_path):
    """Matroska with an audio track states no video duration: the video's packets give it (nothing decoded)."""
    import av

    from sharding.decode.extract import probe_duration

    path = tmp_path / "av.mkv"
    with av.open(str(path), "w") as c:
        v = c.add_stream("libx264", rate=RATE)
        v.width, v.height, v.pix_fmt = 64, 48, "yuv420p"
        a = c.add_stream("aac", rate=16000)
        a.layout = "mono"
        for k in range(40):  # 4 s of video
            c.mux(v.encode(av.VideoFrame.from_ndarray(np.full((48, 64, 3), 5 * k, np.uint8), format="rgb24")))
        c.mux(v.encode(None))
        for i in range(0, 6 * 16000, 1024):  # 6 s of audio: the container's duration is not the video's
            frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
            frame.sample_rate, frame.pts = 16000, i
            c.mux(a.encode(frame))
        c.mux(a.encode(None))
    assert probe_duration(path) == pytest.approx(4.0)


def test_the_benchmarks_video_extensions_are_indexed(tmp_path):
    for name in ("a.3gp", "b.wmv", "c.mpg", "d.mpeg", "e.flv", "f.MOV", "g.txt"):
        (tmp_path / name).write_bytes(b"x")
    assert sorted(index_videos(tmp_path).found) == ["a", "b", "c", "d", "e", "f"]


def test_dry_run_of_a_benchmark_counts_the_missing_video_and_finds_files_by_either_id(tmp_path, capsys):
    ann, videos = msvd_data(tmp_path)
    out = tmp_path / "out"
    cfg = shard_cfg("source=msvd", f"annotations={ann}", f"videos={videos}", "split=test", f"out={out}",
                    "dry_run=true", "dry_run_videos=1", "plan.num_frames=4")
    assert shard_run(cfg) == 0
    report = json.loads((out / "dry_run.json").read_text())
    assert (report["videos_listed"], report["videos_planned"], report["clips"]) == (3, 2, 2)
    assert report["missing_videos"] == 1 and report["frames"] == 2 * 4  # whole videos count their most frames
    assert report["estimate"]["sample_clips"] == 1 and report["estimate"]["output_bytes"] > 0
    assert "-7KMZQEsJW4_205_208" in capsys.readouterr().out

    ann, videos = anet_data(tmp_path)  # one file named by its file id (no v_), one by the annotation's id
    out = tmp_path / "anet"
    assert shard_run(shard_cfg("source=activitynet", f"annotations={ann}", f"videos={videos}", "split=val1",
                               f"out={out}", "dry_run=true", "dry_run_videos=0")) == 0
    report = json.loads((out / "dry_run.json").read_text())
    assert (report["videos_planned"], report["missing_videos"]) == (2, 0)


def test_bad_annotations_stop_the_job_with_one_line_and_exit_2(tmp_path, capsys):
    ann, videos = msvd_data(tmp_path)
    (ann / "test_list.txt").unlink()
    cfg = shard_cfg("source=msvd", f"annotations={ann}", f"videos={videos}", "split=test", f"out={tmp_path / 'o'}")
    assert shard_run(cfg) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "test_list.txt: not found; split 'test' of msvd needs test_list.txt" in err
    (ann / "test_list.txt").write_text("-4wsuPCjDBc_5_15\nnot_in_the_pickle\n")
    assert shard_run(cfg) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "no captions for video 'not_in_the_pickle', which test_list.txt lists" in err
    assert not list((tmp_path / "o").glob("shard-*"))
    with pytest.raises(ConfigError, match=r"split must be one of train, val, test for source=msvd, got 'tset'"):
        shard_cfg("source=msvd", f"annotations={ann}", f"videos={videos}", "split=tset", f"out={tmp_path / 'o'}")


# ----------------------------------------------------------------------------------------------
# the Ray job, the loaders and `ptrain eval` (slow: three local Ray jobs)


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    """MSVD test (multi-caption, a missing video, ids with a leading '-', 2x frames: up to 8 at 2 fps), ActivityNet
    val1 (paragraphs over whole videos, 8 frames at 1 fps) and MSR-VTT test1kA (one caption, 4 frames at 1 fps)."""
    root = tmp_path_factory.mktemp("bench_shard")
    outs = {}
    for name, data, split, plan in (("msvd", msvd_data, "test", ["plan.fps=2", "plan.num_frames=8"]),
                                    ("activitynet", anet_data, "val1", ["plan.num_frames=8"]),
                                    ("msrvtt", msrvtt_data, "test1kA", ["plan.num_frames=4"])):
        ann, videos = data(root)
        outs[name] = root / f"{name}_{split}"
        assert shard_run(shard_cfg(f"source={name}", f"annotations={ann}", f"videos={videos}", f"split={split}",
                                   f"out={outs[name]}", *plan)) == 0
    return outs


def eval_samples(out: Path, num_frames: int = 4) -> list[dict]:
    """Every sample of a shard directory through the eval loader with all captions: key, captions, meta."""
    from ptrain.data import DataConfig, build_eval_loader

    loader = build_eval_loader(DataConfig(num_workers=0), num_frames=num_frames, frame_size=32, max_words=16,
                               batch_size=4, sources=[str(out)], all_captions=True)
    rows = []
    for batch in loader:
        for b, valid in enumerate(batch["valid"].tolist()):
            if valid:
                rows.append({"key": batch["keys"][b], "text": batch["texts"][b], "captions": batch["captions"][b],
                             "meta": batch["meta"][b], "frames": int(batch["frame_mask"][b].sum())})
    return rows


def sidecars(out: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(out.glob("shard-*.json"))]


@pytest.mark.slow
def test_multi_caption_samples_hold_every_caption_and_the_missing_video_is_recorded(sharded):
    out = sharded["msvd"]
    rows = {r["meta"]["video_id"]: r for r in eval_samples(out)}
    assert sorted(rows) == sorted(MSVD_SECONDS)
    for vid, row in rows.items():
        assert row["captions"] == [" ".join(t) for t in MSVD[vid]]  # every caption, the pickle's order
        assert row["text"] == row["captions"][0] and row["key"] == f"{sanitize_id(vid)}_0000"
        meta = row["meta"]
        assert (meta["split"], meta["span"], meta["start"], meta["end"]) == ("test", None, 0.0, MSVD_SECONDS[vid])
        # 2x frames: up to 8 at 2 fps over the whole video, inside it, the planned times of its header's duration
        assert meta["target_times"] == clip_frame_times(0.0, MSVD_SECONDS[vid], num_frames=8, fps=2.0)
        assert len(meta["frame_times"]) == 8 and all(0.0 <= t <= MSVD_SECONDS[vid] for t in meta["frame_times"])
        assert meta["frame_times"][-1] > MSVD_SECONDS[vid] - 1.0
    errors = [json.loads(line) for line in (out / "errors.jsonl").read_text().splitlines()]
    assert [(e["video_id"], e["class"]) for e in errors] == [("-7KMZQEsJW4_205_208", "missing")]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["failures_by_class"] == {"missing": 1} and manifest["samples"] == 2 and manifest["complete"]
    # the sidecars count each sample's captions, in key order: expand plans an epoch from them
    counts = {k: c for side in sidecars(out) for k, c in zip(side["keys"], side["captions"])}
    assert counts == {f"{sanitize_id(v)}_0000": len(MSVD[v]) for v in MSVD_SECONDS}


@pytest.mark.slow
def test_expand_trains_on_every_pair_and_segment_sampling_draws_other_frames(sharded, monkeypatch):
    from ptrain.data import DataConfig, build_train_loader
    from ptrain.data import seekable

    out = sharded["msvd"]
    # the epoch is planned from the sidecars' caption counts: no sample is decoded for it
    monkeypatch.setattr(seekable, "decode_sample", lambda *a: pytest.fail("expand read a sample to count captions"))
    # centre crops: what differs between two reads of a sample is which of its stored frames were taken
    cfg = DataConfig(sources=[str(out)], num_workers=0, caption_sampling="expand", frame_sampling="segment",
                     crop="center")
    loader = build_train_loader(cfg, num_frames=4, frame_size=32, max_words=16, micro_batch_size=5, seed=1)
    assert loader.epoch_size == 5
    monkeypatch.undo()
    it = iter(loader)
    epochs = [next(it) for _ in range(3)]
    assert sorted(epochs[0]["texts"]) == sorted(" ".join(t) for v in MSVD_SECONDS for t in MSVD[v])
    # 8 stored frames, 4 taken: a random one of each of 4 segments, so another subset in another epoch
    frames = [e["frames"].float().mean(dim=(2, 3, 4)) for e in epochs]
    assert all(int(e["frame_mask"].sum()) == 5 * 4 for e in epochs)
    assert any(not np.allclose(frames[0][i], frames[k][j]) for k in (1, 2) for i in range(5) for j in range(5)
               if epochs[0]["keys"][i] == epochs[k]["keys"][j])


@pytest.mark.slow
def test_paragraph_samples_keep_their_sentences_over_the_whole_video(sharded):
    out = sharded["activitynet"]
    rows = {r["meta"]["video_id"]: r for r in eval_samples(out, num_frames=8)}
    assert sorted(rows) == sorted(ANET)
    for vid, row in rows.items():
        meta, entry = row["meta"], ANET[vid]
        assert row["captions"] == [" ".join(entry["sentences"])]  # the one paragraph, joined as CLIP4Clip joins it
        assert meta["sentences"] == [{"start": float(a), "end": float(b), "text": t}
                                     for (a, b), t in zip(entry["timestamps"], entry["sentences"])]
        # the whole video at 1 fps, at most 8 frames, evenly spaced: 9.3 s -> 8 of 9; 5 s -> 5
        d = entry["duration"]
        assert (meta["span"], meta["start"], meta["end"]) == (None, 0.0, d)
        assert meta["target_times"] == clip_frame_times(0.0, d, num_frames=8)
        assert row["frames"] == min(int(d), 8) and all(0.0 <= t <= d for t in meta["frame_times"])
        assert meta["annotation_duration"] == d and meta["split"] == "val1"  # the annotation's, kept apart
    assert json.loads((out / "manifest.json").read_text())["failures_by_class"] == {}


@pytest.mark.slow
def test_single_caption_samples_and_eval_picks_each_protocol(sharded, tmp_path):
    import torch

    from ptrain.cli import main as cli_main
    from ptrain.model import ModelConfig, build_model, save_export

    rows = eval_samples(sharded["msrvtt"])
    assert sorted((r["meta"]["video_id"], r["captions"]) for r in rows) == sorted((v, [s]) for v, s, _ in JSFUSION)
    assert all(r["frames"] == 4 and r["meta"]["split"] == "test1kA" for r in rows)
    assert all(side["captions"] == [1] * side["samples"] for side in sidecars(sharded["msrvtt"]))

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(0)
        model = build_model(ModelConfig(clip="tiny", head="meanP", num_frames=4, frame_size=32, max_words=16))
    save_export(model.eval(), tmp_path / "export")
    expected = {"msvd": ("multi", 5, 2, 1), "activitynet": ("paragraph", 2, 2, 0), "msrvtt": ("single", 2, 2, 0)}
    for name, (protocol, queries, videos, missing) in expected.items():
        out = tmp_path / f"{name}.json"
        assert cli_main(["eval", f"export={tmp_path / 'export'}", f"shards=[{sharded[name]}]", "protocol=auto",
                         "device=cpu", f"out={out}"]) == 0
        res = json.loads(out.read_text())
        assert (res["protocol"], res["protocol_from"]) == (protocol, "the shards")
        assert (res["all"]["n_text"], res["all"]["n_video"], res["missing_videos"]) == (queries, videos, missing)
        assert ("t2v_R50" in res["all"]) == (protocol == "paragraph")
