"""The shard loader read back through the real pipeline: shards written in the `ptrain shard` format
(tests/data_fixtures.py), then keys, shapes, dtypes, masks, exactly-once coverage across ranks and
workers, exact resume across world sizes, damage handling and weighted mixing."""

from __future__ import annotations

import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import simplejpeg
import torch

from data_fixtures import make_frame, write_shard, write_shards
from ptrain.config import load_config
from ptrain.data import DataConfig, build_eval_loader, build_train_loader
from ptrain.data.order import SamplePlan
from ptrain.data.shards import discover, expand_braces, index_tar

SIZES = dict(num_frames=4, frame_size=32, max_words=16)


@pytest.fixture(scope="module", params=[False, True], ids=["walk", "offsets"])
def shard_dir(tmp_path_factory, request) -> tuple[Path, list[str]]:
    """3 shards x 8 samples; without / with per-sample byte spans in the sidecars."""
    d = tmp_path_factory.mktemp("shards")
    keys = write_shards(d, num_shards=3, samples_per_shard=8, frames=[2, 4, 6], size=(32, 40),
                        offsets=request.param)
    return d, keys


def _take(loader, n):
    it = iter(loader)
    return [next(it) for _ in range(n)]


def test_eval_reads_back_every_sample_in_order(shard_dir):
    d, keys = shard_dir
    cfg = DataConfig(eval_sources=[str(d)], num_workers=0)
    loader = build_eval_loader(cfg, batch_size=5, **SIZES)
    batches = list(loader)
    assert len(loader) == len(batches) == 5 and loader.num_samples == 24
    got = [k for b in batches for k, v in zip(b["keys"], b["valid"].tolist()) if v]
    assert got == keys
    b = batches[0]
    assert b["frames"].shape == (5, 4, 3, 32, 32) and b["frames"].dtype == torch.uint8
    for name in ("frame_mask", "input_ids", "attention_mask", "group_ids", "valid", "index"):
        assert b[name].dtype == torch.int64, name
    assert b["input_ids"].shape == b["attention_mask"].shape == (5, 16)
    assert (b["input_ids"][:, 0] == 49406).all()  # SOT
    # frame counts cycle 2, 4, 6 (6 -> uniformly subsampled to 4); padding is masked out
    counts = {k: n for bb in batches for k, n in zip(bb["keys"], bb["frame_mask"].sum(1).tolist())}
    assert sorted(set(counts[k] for k in keys)) == [2, 4]
    assert (b["frames"][0, 2:] == 0).all()  # a 2-frame clip: frames 2, 3 are padding
    # the 6-frame sample keeps frames [0, 1, 3, 5] (np.linspace floored), in order
    six = next(i for i, bb in enumerate(batches) for k in bb["keys"] if k == keys[2])
    row = batches[six]["keys"].index(keys[2])
    reds = batches[six]["frames"][row, :, 0].float().mean(dim=(1, 2))
    assert (np.diff(reds.numpy()) > 5).all()  # frame levels rise with t
    with tarfile.open(d / "shard-000000.tar") as tf:
        raw = [simplejpeg.decode_jpeg(tf.extractfile(f"{keys[2]}.{t:03d}.jpg").read(), fastdct=True,
                                      fastupsample=True) for t in (0, 1, 3, 5)]
    expect = torch.from_numpy(np.stack([r[:, 4:36] for r in raw])).permute(0, 3, 1, 2)  # center 32 of 40
    assert torch.equal(batches[six]["frames"][row], expect)
    # same video -> same group id; last batch padded with valid=0 and one blank frame
    assert b["group_ids"][0] == b["group_ids"][1] != b["group_ids"][2]
    last = batches[-1]
    assert last["valid"].tolist() == [1, 1, 1, 1, 0] and last["keys"][-1] == ""
    assert last["frame_mask"][-1].tolist() == [1, 0, 0, 0]
    assert b["meta"][0]["video_id"] == b["video_ids"][0]


def test_eval_two_ranks_two_workers_exactly_once(shard_dir):
    d, keys = shard_dir
    cfg = DataConfig(eval_sources=[str(d)], num_workers=2)
    seen, lengths = [], []
    for rank in range(2):
        batches = list(build_eval_loader(cfg, batch_size=4, rank=rank, world_size=2, **SIZES))
        lengths.append(len(batches))
        seen += [k for b in batches for k, v in zip(b["keys"], b["valid"].tolist()) if v]
    assert lengths == [3, 3]
    assert sorted(seen) == sorted(keys) and len(seen) == len(keys)


def test_train_one_epoch_two_ranks_two_workers_exactly_once(shard_dir):
    d, keys = shard_dir
    cfg = DataConfig(sources=[str(d)], num_workers=2, shuffle_shards=2)
    per_step = 24 // 4  # one epoch = 24 samples, global batch 2 micro x 2 ranks
    seen = []
    for rank in range(2):
        for b in _take(build_train_loader(cfg, micro_batch_size=2, rank=rank, world_size=2, seed=7, **SIZES),
                       per_step):
            assert b["frames"].shape == (2, 4, 3, 32, 32) and len(b["keys"]) == 2
            seen += b["keys"]
    assert sorted(seen) == sorted(keys)
    # shuffled: not the tar order
    first = _take(build_train_loader(cfg, micro_batch_size=4, seed=7, **SIZES), 1)[0]["keys"]
    assert first != keys[:4]


def _steps(cfg, world, accum, micro, start, stop, seed=3):
    """{step: [keys in global order]} and {key: frames} from `world` simulated ranks."""
    out: dict[int, list[str]] = {}
    frames = {}
    for rank in range(world):
        loader = build_train_loader(cfg, micro_batch_size=micro, rank=rank, world_size=world, seed=seed,
                                    grad_accum=accum, start_step=start, **SIZES)
        for b in _take(loader, (stop - start) * accum):
            # global order: micro-step major, rank minor
            slot = out.setdefault(b["step"], [None] * (world * accum))
            slot[b["micro_step"] * world + rank] = b["keys"]
            for i, k in enumerate(b["keys"]):
                frames[(b["index"][i].item(), k)] = b["frames"][i].clone()
    return {s: [k for part in v for k in part] for s, v in out.items()}, frames


@pytest.mark.parametrize("before,after", [((2, 1), (1, 2)), ((1, 2), (2, 1))])
def test_resume_at_step_k_equals_uninterrupted_across_world_sizes(shard_dir, before, after):
    d, _ = shard_dir
    cfg = DataConfig(sources=[str(d)], num_workers=0, crop="random_resized")
    micro = 3  # global batch 6 in both layouts: 3 x world x accum
    full, full_frames = _steps(cfg, *before, micro, 0, 6)  # 36 samples: crosses the 24-sample epoch
    resumed, resumed_frames = _steps(cfg, *after, micro, 4, 6)
    assert sorted(resumed) == [4, 5]
    for s in (4, 5):
        assert resumed[s] == full[s] and len(full[s]) == 6
    for key, f in resumed_frames.items():  # augmentation is a function of the global position
        assert torch.equal(f, full_frames[key])


def test_resume_with_another_global_batch_goes_on_from_samples_seen(shard_dir):
    """Saved at step 4 with global batch 6 (24 samples read); resumed on 1 rank with batch 4: the next
    samples are positions 24, 25, ... of the uninterrupted order, none read twice or skipped."""
    d, _ = shard_dir
    cfg = DataConfig(sources=[str(d)], num_workers=0)
    full, _ = _steps(cfg, 2, 1, 3, 0, 8)  # global batch 6: positions 0..47
    order = [k for s in range(8) for k in full[s]]
    loader = build_train_loader(cfg, micro_batch_size=4, seed=3, start_step=4, start_sample=24, **SIZES)
    batches = _take(loader, 3)
    assert [b["step"] for b in batches] == [4, 5, 6]
    assert [i for b in batches for i in b["index"].tolist()] == list(range(24, 36))
    assert [k for b in batches for k in b["keys"]] == order[24:36]
    assert loader.samples_before(6) == 32 and loader.epoch_at(6) == pytest.approx(32 / 24)
    # the default cursor is step x global batch: an unchanged batch needs no start_sample
    same = _take(build_train_loader(cfg, micro_batch_size=6, seed=3, start_step=4, **SIZES), 1)[0]
    assert same["index"].tolist() == list(range(24, 30))


def test_workers_do_not_change_the_stream(shard_dir):
    d, _ = shard_dir
    a = _take(build_train_loader(DataConfig(sources=[str(d)], num_workers=0), micro_batch_size=3, **SIZES), 5)
    b = _take(build_train_loader(DataConfig(sources=[str(d)], num_workers=2), micro_batch_size=3, **SIZES), 5)
    assert [x["keys"] for x in a] == [x["keys"] for x in b]
    assert all(torch.equal(x["frames"], y["frames"]) for x, y in zip(a, b))


def _damaged_dir(tmp_path: Path, offsets: bool) -> tuple[Path, list[str], list[str], str]:
    """Two good shards, one with a corrupt JPEG, one cut short. Returns (dir, all keys, lost keys, bad key)."""
    keys = write_shards(tmp_path, num_shards=2, samples_per_shard=6, frames=[3], offsets=offsets)
    bad = {"key": "zbad_0000", "video_id": "zbad", "caption": "a broken frame",
           "frames": [make_frame(32, 40, 0, 1), b"\xff\xd8\xff\xe0 not really a jpeg", make_frame(32, 40, 2, 1)]}
    ok = [{"key": f"zok{i}_0000", "video_id": f"zok{i}", "caption": f"ok {i}",
           "frames": [make_frame(32, 40, t, 50 + i) for t in range(3)]} for i in range(3)]
    write_shard(tmp_path, "shard", 2, sorted([bad, *ok], key=lambda s: s["key"]), offsets)
    cut = [{"key": f"ycut{i}_0000", "video_id": f"ycut{i}", "caption": f"cut {i}",
            "frames": [make_frame(32, 40, t, 90 + i) for t in range(3)]} for i in range(6)]
    tar = write_shard(tmp_path, "shard", 3, cut, offsets)
    blob = tar.read_bytes()
    tar.write_bytes(blob[: int(len(blob) * 0.55)])  # sidecar still promises 6 samples
    index = index_tar(str(tar))
    assert index.truncated
    kept = [s.key for s in index.samples]
    lost = [s["key"] for s in cut if s["key"] not in kept]
    all_keys = keys + sorted(s["key"] for s in [bad, *ok]) + [s["key"] for s in cut]
    return tmp_path, all_keys, lost, "zbad_0000"


@pytest.mark.parametrize("offsets", [False, True], ids=["walk", "offsets"])
def test_truncated_shard_and_corrupt_jpeg_are_counted_and_skipped(tmp_path, offsets):
    d, all_keys, lost, bad = _damaged_dir(tmp_path, offsets)
    assert 1 <= len(lost) < 6  # the samples before the damage survive
    cfg = DataConfig(sources=[str(d)], eval_sources=[str(d)], num_workers=0)
    ev = build_eval_loader(cfg, batch_size=8, **SIZES)
    batches = list(ev)
    valid = [k for b in batches for k, v in zip(b["keys"], b["valid"].tolist()) if v]
    assert valid == [k for k in all_keys if k not in lost and k != bad]
    assert ev.stats["samples_missing"] == len(lost)
    assert ev.stats["samples_corrupt"] == 1 and ev.stats["shards_damaged"] == 1

    tr = build_train_loader(cfg, micro_batch_size=2, seed=1, **SIZES)
    epoch = _take(tr, len(all_keys) // 2)
    seen = [k for b in epoch for k in b["keys"]]
    assert len(seen) == len(all_keys) and "" not in seen  # every micro-batch stays full
    assert not set(seen) & (set(lost) | {bad})
    assert tr.stats["samples_missing"] >= len(lost) and tr.stats["samples_corrupt"] >= 1
    assert tr.stats["samples_substituted"] == tr.stats["samples_missing"] + tr.stats["samples_corrupt"]
    assert tr.stats["shards_damaged"] == 1


def test_index_tar_ignores_foreign_members_and_incomplete_shards(tmp_path):
    s = {"key": "v_0000", "video_id": "v", "caption": "c", "frames": [make_frame(32, 32, 0, 0)],
         "extra": {"pyd": b"\x80\x04pickle", "pth": b"torch"}}
    tar = write_shard(tmp_path, "shard", 0, [s])
    idx = index_tar(str(tar))
    assert [e.key for e in idx.samples] == ["v_0000"] and idx.ignored_members == 2 and not idx.truncated
    assert set(idx.samples[0].members) == {"000.jpg", "json", "txt"}
    (tmp_path / "shard-000001.tar").write_bytes(tar.read_bytes())  # no sidecar: still being written
    stats: dict = {}
    assert [x.path for x in discover([str(tmp_path)], stats=stats)] == [str(tar)]
    assert stats["shards_incomplete"] == 1
    (tmp_path / "shard-000002.tar").write_bytes(tar.read_bytes())
    (tmp_path / "shard-000002.json").write_text("{not json")
    stats = {}
    assert [x.path for x in discover([str(tmp_path)], stats=stats)] == [str(tar)]
    assert stats == {"shards_incomplete": 1, "shards_bad_sidecar": 1}
    with pytest.raises(ValueError, match="no complete shard"):
        discover([str(tmp_path / "nothing-*.tar")])


def test_plan_epoch_is_a_permutation_and_weights_mix_by_samples():
    counts = [10, 7, 3, 12, 9]
    plan = SamplePlan(counts, [0] * 5, [1.0], seed=5, resampled=False, shards_per_block=2)
    pos = [plan.locate(i)[1:] for i in range(sum(counts))]
    assert sorted(pos) == sorted((s, k) for s, c in enumerate(counts) for k in range(c))
    n = sum(counts)
    nxt = [plan.locate(n + i) for i in range(n)]
    assert {e for e, _, _ in nxt} == {1} and sorted(x[1:] for x in nxt) == sorted(pos)
    assert [x[1:] for x in nxt] != pos  # each epoch is reshuffled
    # two sources with different shard sizes: weight 3 : 1 must give ~75% of the samples to source 0
    counts = [100] * 40 + [20] * 30
    sources = [0] * 40 + [1] * 30
    plan = SamplePlan(counts, sources, [3.0, 1.0], seed=0, resampled=True, samples_per_epoch=20000,
                      shards_per_block=4)
    n = 3 * 20000
    frac = np.mean([sources[plan.locate(i)[1]] == 0 for i in range(0, n, 3)])
    assert abs(frac - 0.75) < 0.04, frac
    assert plan.locate(20000)[0] == 1  # virtual epoch length


def test_config_sources_and_errors(tmp_path):
    cfg = load_config(DataConfig, None, ["sources=/data/a", "eval_sources=[/data/b]"])
    assert cfg.sources == [{"path": "/data/a", "weight": 1.0}]
    cfg = load_config(DataConfig, None, ["sources=[{path: /a, weight: 3}, /b]", "resampled=true"])
    assert [s["weight"] for s in cfg.sources] == [3.0, 1.0]
    with pytest.raises(ValueError, match="resampled"):
        DataConfig(sources=[{"path": "/a", "weight": 3}, "/b"])
    with pytest.raises(ValueError, match="weight"):
        DataConfig(sources=[{"path": "/a", "weight": 0}])
    with pytest.raises(ValueError, match="data.sources is empty"):
        build_train_loader(DataConfig(), micro_batch_size=2, **SIZES)
    with pytest.raises(ValueError, match="cannot read the sidecar"):
        build_train_loader(DataConfig(sources=[f"pipe:cat {tmp_path}/s-{{000..001}}.tar"], allow_pipe=True), micro_batch_size=2,
                           **SIZES)
    assert expand_braces("a-{008..010}.tar") == ["a-008.tar", "a-009.tar", "a-010.tar"]
    assert expand_braces("{x,y}/{1..2}") == ["x/1", "x/2", "y/1", "y/2"]


def test_importing_config_does_not_import_torch():
    import subprocess
    import sys

    code = "import sys, ptrain.data, ptrain.data.config; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_streaming_pipe_sources_fallback(tmp_path):
    """URL / pipe: sources stream front to back: every sample comes round, damage is counted."""
    d, all_keys, lost, bad = _damaged_dir(tmp_path, offsets=False)
    url = f"pipe:cat {d}/shard-{{000000..000003}}.tar"
    cfg = DataConfig(sources=[url], num_workers=0, allow_pipe=True)
    loader = build_train_loader(cfg, micro_batch_size=2, seed=0, **SIZES)
    batches = _take(loader, 3 * len(all_keys) // 2)  # three epochs' worth
    seen = Counter(k for b in batches for k in b["keys"])
    assert set(seen) == set(all_keys) - set(lost) - {bad}
    assert [b["step"] for b in batches[:3]] == [0, 1, 2] and all(len(b["keys"]) == 2 for b in batches)
    assert loader.stats["shards_truncated"] >= 1 and loader.stats["samples_corrupt"] >= 1
    # resume is at shuffle-block granularity: it starts again at the step asked for
    resumed = _take(build_train_loader(cfg, micro_batch_size=2, seed=0, start_step=5, **SIZES), 2)
    assert [b["step"] for b in resumed] == [5, 6]


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_walk_tar_matches_tarfile(tmp_path, fmt):
    from data_fixtures import _add

    from ptrain.data.shards import walk_tar

    path = tmp_path / "x.tar"
    with tarfile.open(path, "w", format=fmt) as tf:
        _add(tf, "a_0000.000.jpg", b"j" * 700)
        if fmt != tarfile.USTAR_FORMAT:
            _add(tf, "b" * 150 + "_0000.txt", b"long name")  # GNU 'L' / pax path records
            _add(tf, "ünï_0000.txt", b"non-ascii")
        d = tarfile.TarInfo("sub")
        d.type = tarfile.DIRTYPE
        tf.addfile(d)
        _add(tf, "sub/c_0000.json", b"{}")
    with tarfile.open(path) as tf:
        expect = [(m.name, m.offset_data, m.size) for m in tf if m.isfile()]
    assert walk_tar(str(path)) == (expect, False)
    blob = path.read_bytes()
    path.write_bytes(blob[:900])  # cut inside the first member's data
    assert walk_tar(str(path)) == ([], True)
    path.write_bytes(blob[:512 + 1024] + b"\x01" * 512 + blob[2048:])  # garbage where a header should be
    members, damaged = walk_tar(str(path))
    assert damaged and members == expect[:1]


def test_transforms_crops_flip_and_reduced_decode():
    from ptrain.data import jpeg, transforms

    img = make_frame(48, 80, 0, 3)
    rng = np.random.default_rng(0)
    for mode in ("random", "random_resized", "center"):
        box = transforms.train_box(48, 80, 32, mode, rng, min_scale=0.3)
        out = transforms.apply_box(img, box, 32, bicubic=mode == "center")
        assert out.shape == (32, 32, 3) and out.dtype == np.uint8
    box = transforms.center_box(48, 80, 48)  # no resize: an exact slice, and a flip mirrors it
    assert np.array_equal(transforms.apply_box(img, box, 48), img[:, 16:64])
    assert np.array_equal(transforms.apply_box(img, box, 48, flip=True), img[:, 16:64][:, ::-1])
    # a 64-short-side JPEG decoded for a 32 model: DCT scale 1/2; for 48: full size (7/8-like scales are slow)
    buf = simplejpeg.encode_jpeg(make_frame(64, 96, 0, 1), quality=90)
    assert jpeg.decode(buf, min_short=32).shape == (32, 48, 3)
    assert jpeg.decode(buf, min_short=48).shape == (64, 96, 3)
    assert jpeg.decode(buf, min_short=32, decoder="pil").shape == (32, 48, 3)
    full_s, full_p = jpeg.decode(buf, fast=False), jpeg.decode(buf, decoder="pil")
    assert np.abs(full_s.astype(int) - full_p).mean() < 1.0  # both are libjpeg-turbo
    with pytest.raises(jpeg.JpegError):
        jpeg.decode(buf[: len(buf) // 2])
    with pytest.raises(jpeg.JpegError):
        jpeg.decode(buf[: len(buf) // 2], decoder="pil")
    frames = torch.full((1, 1, 3, 2, 2), 255, dtype=torch.uint8)
    norm = transforms.normalize(frames)
    mean, std = torch.tensor(transforms.CLIP_MEAN), torch.tensor(transforms.CLIP_STD)
    assert torch.allclose(norm[0, 0, :, 0, 0], (1 - mean) / std)


def test_hflip_flag_flips_whole_clips(shard_dir):
    d, _ = shard_dir
    plain = _take(build_train_loader(DataConfig(sources=[str(d)], num_workers=0), micro_batch_size=8,
                                     **SIZES), 1)[0]
    flipped = _take(build_train_loader(DataConfig(sources=[str(d)], num_workers=0, hflip=True),
                                       micro_batch_size=8, **SIZES), 1)[0]
    assert plain["keys"] == flipped["keys"]
    same = [torch.equal(a, b) for a, b in zip(plain["frames"], flipped["frames"])]
    mirrored = [torch.equal(a, b.flip(-1)) for a, b in zip(plain["frames"], flipped["frames"])]
    assert all(s or m for s, m in zip(same, mirrored)) and any(mirrored) and any(same)


def test_reads_shards_written_by_the_sharder(tmp_path):
    """The contract with `ptrain shard`: shards from sharding.write read back key for key."""
    import json

    from sharding.write import write_shard as sharder_write

    keys = []
    for s in range(2):
        samples = []
        for i in range(3):
            key = f"v{s}{i}_{i:04d}"
            parts = {f"{t:03d}.jpg": simplejpeg.encode_jpeg(make_frame(32, 40, t, i), quality=90) for t in range(3)}
            parts["json"] = json.dumps({"video_id": f"v{s}{i}", "clip_index": i, "frame_times": [0, 1, 2]}).encode()
            parts["txt"] = f"caption {s} {i}".encode()
            samples.append((key, parts))
            keys.append(key)
        sharder_write(tmp_path, f"shard-{s:06d}", samples, {"plan_hash": "x"})
    batches = list(build_eval_loader(DataConfig(eval_sources=[str(tmp_path)], num_workers=0), batch_size=4, **SIZES))
    assert [k for b in batches for k, v in zip(b["keys"], b["valid"].tolist()) if v] == sorted(keys)
    assert batches[0]["texts"][0] == "caption 0 0" and batches[0]["frame_mask"][0].tolist() == [1, 1, 1, 0]


def test_two_weighted_sources_resampled_end_to_end(tmp_path):
    a = write_shards(tmp_path / "a", num_shards=2, samples_per_shard=4, frames=[2], name="a")
    b = write_shards(tmp_path / "b", num_shards=2, samples_per_shard=4, frames=[2], name="b")
    cfg = DataConfig(sources=[{"path": str(tmp_path / "a"), "weight": 3}, str(tmp_path / "b")], resampled=True,
                     samples_per_epoch=40, shuffle_shards=1, num_workers=0)
    loader = build_train_loader(cfg, micro_batch_size=4, seed=2, **SIZES)
    assert loader.epoch_size == 40 and loader.epoch_at(10) == 1.0
    keys = [k for batch in _take(loader, 10) for k in batch["keys"]]
    assert set(keys) <= set(a) | set(b) and any(k in b for k in keys) and sum(k in a for k in keys) > len(keys) / 2


def test_rows_without_a_video_id_are_their_own_groups():
    from ptrain.data.format import Sample
    from ptrain.data.sample import Batch, ClipSpec, group_id
    from ptrain.model.tokenizer import get_tokenizer

    batch = Batch(3, ClipSpec(**SIZES), get_tokenizer())
    for b, (key, vid) in enumerate([("a_0000", ""), ("b_0000", ""), ("c_0001", "c")]):
        sample = Sample(key, "a caption", ["a caption"], {"video_id": vid})
        batch.fill(b, sample, 1, -1)  # index -1: a streamed sample
    groups = batch.finish()["group_ids"].tolist()
    assert groups[2] == group_id("c") >= 0
    assert groups[0] < 0 and groups[1] < 0 and groups[0] != groups[1]  # never positives of each other
