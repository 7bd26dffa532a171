"""Multi-caption samples (benchmark shards) in the loaders: caption sampling per epoch (first, random, expand),
frame subsets when a shard stores more frames than the model takes (uniform, segment), all captions at eval."""

from collections import Counter

import numpy as np
import pytest

from data_fixtures import frame_level, make_frame, write_shard
from ptrain.data import DataConfig, build_eval_loader, build_train_loader

SIZES = dict(num_frames=4, frame_size=32, max_words=12)


@pytest.fixture(scope="module")
def multi(tmp_path_factory):
    """2 shards x 3 videos; video v has v % 3 + 1 captions and 8 stored frames."""
    root = tmp_path_factory.mktemp("multi")
    for shard in range(2):
        samples = []
        for i in range(3):
            v = shard * 3 + i
            caps = [f"video {v} caption {c}" for c in range(v % 3 + 1)]
            samples.append({"key": f"vid{v:03d}_0000", "video_id": f"vid{v:03d}", "caption": caps[0], "captions": caps,
                            "frames": [make_frame(32, 32, t, v) for t in range(8)]})
        write_shard(root, "shard", shard, samples, offsets=True)
    return root


def _epoch_texts(root, mode, steps, seed=0, start_step=0):
    cfg = DataConfig(sources=[str(root)], num_workers=0, caption_sampling=mode, shuffle_shards=2)
    loader = build_train_loader(cfg, micro_batch_size=2, seed=seed, start_step=start_step, **SIZES)
    it = iter(loader)
    return [t for _ in range(steps) for t in next(it)["texts"]], loader


def test_expand_makes_every_video_caption_pair_one_item_of_the_epoch(multi):
    texts, loader = _epoch_texts(multi, "expand", 6)  # 12 pairs = one epoch in 6 batches of 2
    assert loader.epoch_size == 12
    assert sorted(texts) == sorted(f"video {v} caption {c}" for v in range(6) for c in range(v % 3 + 1))


def test_random_draws_one_caption_per_video_per_epoch_reproducibly(multi):
    texts, loader = _epoch_texts(multi, "random", 3 * 4)  # 4 epochs of 6 videos
    assert loader.epoch_size == 6
    epochs = [texts[i * 6:(i + 1) * 6] for i in range(4)]
    for epoch in epochs:  # every video once per epoch, with one of its own captions
        assert sorted(t.split(" caption")[0] for t in epoch) == [f"video {v}" for v in range(6)]
    chosen = Counter(t for t in texts if t.startswith("video 2 "))
    assert len(chosen) > 1  # the 3-caption video gets different captions across epochs
    again, _ = _epoch_texts(multi, "random", 3 * 4)
    assert again == texts
    resumed, _ = _epoch_texts(multi, "random", 3, start_step=9)  # a resume at step 9 draws what step 9 drew
    assert resumed == texts[18:24]


def test_first_is_the_txt_caption(multi):
    texts, _ = _epoch_texts(multi, "first", 3)
    assert all(t.endswith("caption 0") for t in texts)


def test_expand_resumes_exactly(multi):
    full, _ = _epoch_texts(multi, "expand", 8)
    resumed, _ = _epoch_texts(multi, "expand", 3, start_step=5)
    assert resumed == full[10:16]


def test_segment_sampling_varies_in_training_and_is_centred_in_eval(multi):
    def levels(batch, row):
        red = batch["frames"][row, :, 0].float().mean(dim=(-1, -2)).numpy()
        return [int(np.argmin([abs(r - frame_level(t)) for t in range(8)])) for r in red]

    seen = set()
    cfg = DataConfig(sources=[str(multi)], num_workers=0, frame_sampling="segment", crop="center")
    loader = iter(build_train_loader(cfg, micro_batch_size=2, **SIZES))
    for _ in range(9):  # 3 epochs
        batch = next(loader)
        for row in range(2):
            picked = levels(batch, row)
            assert all(2 * t <= f < 2 * t + 2 for t, f in enumerate(picked)), picked  # one frame from each segment
            seen.add(tuple(picked))
    assert len(seen) > 1
    uniform = next(iter(build_train_loader(DataConfig(sources=[str(multi)], num_workers=0, crop="center"),
                                           micro_batch_size=2, **SIZES)))
    assert levels(uniform, 0) == [0, 2, 4, 7]  # CLIP4Clip's np.linspace(0, 7, 4) floored
    ev = next(iter(build_eval_loader(DataConfig(num_workers=0, frame_sampling="segment"), batch_size=2,
                                     sources=[str(multi)], **SIZES)))
    assert levels(ev, 0) == [0, 2, 4, 6]  # the middle (lower) frame of each 2-frame segment


def test_eval_batches_carry_every_caption(multi):
    batches = list(build_eval_loader(DataConfig(num_workers=0), batch_size=4, sources=[str(multi)],
                                     all_captions=True, **SIZES))
    caps = [c for b in batches for row, v in zip(b["captions"], b["valid"].tolist()) if v for c in row]
    assert len(caps) == sum(v % 3 + 1 for v in range(6))
    first = batches[0]
    assert first["caption_ids"].shape[0] == len(first["caption_row"]) == sum(len(c) for c in first["captions"])
    assert first["caption_row"].tolist()[:3] == [0, 1, 1]
