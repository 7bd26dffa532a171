"""The shard contract end to end, quickly: shards written by the sharder's writer through ptrain/data/format.py are
read back by the real train and eval loaders with the same frames, captions and metadata, and shards of format
version 1 (ASR segments under `captions`, no `format_version`) still read, counted as version 1."""

import json

import numpy as np
import simplejpeg
import torch

from data_fixtures import make_frame
from ptrain.data import DataConfig, build_eval_loader, build_train_loader
from ptrain.data.format import FORMAT_VERSION, encode_sample
from ptrain.data.jpeg import decode
from sharding.write import write_shard

SIZE, FRAMES = 32, 3


def _frames(i: int) -> list[bytes]:
    return [simplejpeg.encode_jpeg(make_frame(SIZE, SIZE, t, i), quality=95) for t in range(FRAMES)]


def _pixels(jpegs: list[bytes]) -> torch.Tensor:
    """[T, 3, H, W] uint8: what the loader should hand on for frames already at the model's size."""
    return torch.from_numpy(np.stack([decode(j) for j in jpegs])).permute(0, 3, 1, 2)


def _write(tmp_path):
    v2, v1, jpegs = tmp_path / "v2", tmp_path / "v1", {}
    v2.mkdir()
    v1.mkdir()
    samples = []
    for i in range(4):
        key = f"vid{i}_0000"
        jpegs[key] = _frames(i)
        meta = {"video_id": f"vid{i}", "captions": [f"caption {i} a", f"caption {i} b"], "split": "test",
                "segments": [{"start": 0.5, "end": 2.0, "text": f"asr {i}"}], "frame_times": [0.5, 1.0, 1.5]}
        samples.append((key, encode_sample(key, meta, jpegs[key])))
    write_shard(v2, "shard-000000", samples, {"plan_hash": "x"})
    old = []
    for i in range(4, 6):  # what `ptrain shard` wrote before format 2: the ASR segments were called captions
        key = f"vid{i}_0000"
        jpegs[key] = _frames(i)
        meta = {"video_id": f"vid{i}", "key": key, "frame_times": [0.5, 1.0, 1.5],
                "captions": [{"start": 0.5, "end": 2.0, "text": f"asr {i}"}]}
        parts = {f"{t:03d}.jpg": j for t, j in enumerate(jpegs[key])}
        parts.update(json=json.dumps(meta).encode(), txt=f"caption {i} a".encode())
        old.append((key, parts))
    write_shard(v1, "shard-000000", old, {"plan_hash": "y"})
    return v2, v1, jpegs


def test_writer_to_eval_and_train_loaders_round_trip(tmp_path):
    v2, v1, jpegs = _write(tmp_path)
    sizes = {"num_frames": FRAMES, "frame_size": SIZE, "max_words": 8}

    loader = build_eval_loader(DataConfig(eval_sources=[str(v2), str(v1)], num_workers=0), batch_size=8,
                               all_captions=True, **sizes)
    rows = {}
    for batch in loader:
        for b, key in enumerate(batch["keys"]):
            if batch["valid"][b]:
                rows[key] = (batch["frames"][b], batch["meta"][b], batch["captions"][b], batch["texts"][b])
    assert sorted(rows) == sorted(jpegs)
    assert loader.format_versions() == {FORMAT_VERSION: 4, 1: 2}
    for key, (frames, meta, captions, text) in rows.items():
        i = int(key[3])
        assert torch.equal(frames, _pixels(jpegs[key])), key
        assert meta["segments"] == [{"start": 0.5, "end": 2.0, "text": f"asr {i}"}]
        assert meta["video_id"] == f"vid{i}" and meta["frame_times"] == [0.5, 1.0, 1.5]
        assert text == f"caption {i} a"
        if i < 4:
            assert captions == [f"caption {i} a", f"caption {i} b"] and meta["split"] == "test"
            assert meta["format_version"] == FORMAT_VERSION
        else:  # version 1: the one caption is the text; the old `captions` are the segments
            assert captions == [f"caption {i} a"] and meta["format_version"] == 1

    train = build_train_loader(DataConfig(sources=[str(v2)], num_workers=0, crop="center"), micro_batch_size=2,
                               **sizes)
    seen = {}
    for batch in train:
        for b, key in enumerate(batch["keys"]):
            seen[key] = (batch["frames"][b], batch["texts"][b])
        if len(seen) == 4:
            break
    assert sorted(seen) == sorted(k for k in jpegs if int(k[3]) < 4)
    for key, (frames, text) in seen.items():
        assert torch.equal(frames, _pixels(jpegs[key])), key
        assert text == f"caption {key[3]} a"  # caption_sampling=first
    assert train.format_versions() == {FORMAT_VERSION: train.stats[f"format_v{FORMAT_VERSION}"]}
