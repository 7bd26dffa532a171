"""The planner plans what it planned before it was made faster: the same plan hash (which covers every byte of every
plan line), clips, frames and shards, pinned for the sample corpus and a synthetic HowTo100M-like caption file.

The pinned values were made by the planner of main at cd758f5 (before the columns / numpy / orjson / batching
planner), on the same inputs: ``benchmarks/check_plan.py --base cd758f5`` compares the two planners line by line and
says where they differ. A change that means to change plans (new settings, a new plan format) changes these values
on purpose; anything else that changes them has changed what is planned.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from sharding.config import PlanConfig, ShardConfig
from sharding.job import _plan

ROOT = Path(__file__).resolve().parents[1]


def _bench_plan():
    spec = importlib.util.spec_from_file_location("bench_plan", ROOT / "benchmarks" / "bench_plan.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def planned(captions: Path, videos: Path, out: Path, **settings) -> tuple:
    (out / ".ptrain_shard").mkdir(parents=True)
    cfg = ShardConfig(videos=str(videos), captions=str(captions), out=str(out), progress=False, **settings)
    stored, reused, _source = _plan(cfg, out / ".ptrain_shard")
    assert not reused
    m = stored.manifest
    return stored.plan_hash, m["clips"], m["frames"], m["shards"]


def test_sample_corpus_plans_as_before(sample_corpus, tmp_path):
    got = planned(sample_corpus / "caption.json", sample_corpus / "videos", tmp_path / "out",
                  video_list=str(sample_corpus / "HowTo100M_v1.csv"))
    assert got == ("f47c425ff6f6339c3ce710f72021bf39b258abdf8e1cd9ea092de2ba1fd1c981", 11, 79, 1)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> Path:
    """300 videos of ``bench_plan.py``'s corpus: rolling, overlapping ASR in HowTo100M's format (1.5 MB)."""
    return _bench_plan().make_corpus(tmp_path_factory.mktemp("synthetic"), 300)


@pytest.mark.parametrize("plan, expected", [
    (PlanConfig(), ("af0dd8d5c83752ede47e5263d3045e70424effdac64a8d9a4bc6ee79c830d600", 13615, 81740, 14)),
    (PlanConfig(min_seconds=3.0, min_words=4, max_seconds=9.0, max_gap_seconds=2.0, num_frames=5, sampling="uniform"),
     ("0bafa1d2a273b4fe2d643a67e90aa3807de4aadf87c74dd439c4912b53b3a505", 18862, 94310, 20)),
    (PlanConfig(num_frames=4, fps=2.0, slice="tail"),
     ("84a7ffd884bfc7ac63a00024541f3c613c3426d8ef68858928b7bbdb90380555", 13615, 54460, 14)),
], ids=["defaults", "uniform-short-clips", "fps2-tail"])
def test_synthetic_howto100m_plans_as_before(synthetic, tmp_path, plan, expected):
    assert planned(synthetic / "caption.json", synthetic / "videos", tmp_path / "out", plan=plan) == expected


def test_batches_plan_as_one_video_at_a_time(synthetic, monkeypatch, tmp_path):
    """Batch bounds do not change the plan: one video per batch, and a segment bound that closes batches early."""
    import sharding.plan as plan_module

    expected = ("af0dd8d5c83752ede47e5263d3045e70424effdac64a8d9a4bc6ee79c830d600", 13615, 81740, 14)
    for i, (videos, segments) in enumerate(((1, 1 << 16), (256, 500))):
        monkeypatch.setattr(plan_module, "BATCH_VIDEOS", videos)
        monkeypatch.setattr(plan_module, "BATCH_SEGMENTS", segments)
        assert planned(synthetic / "caption.json", synthetic / "videos", tmp_path / f"out{i}") == expected
