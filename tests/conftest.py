"""Shared fixtures: one generated sample corpus per test session (videos + captions + ground truth)."""

import pytest


@pytest.fixture(scope="session")
def sample_corpus(tmp_path_factory):
    """7 good videos (every container/codec kind, one VFR, one weird id) + the bad ones, 6-9 s each."""
    from ptrain_demo.corpus import generate

    root = tmp_path_factory.mktemp("sample_corpus")
    generate(root, num_videos=7, seed=3, bad_videos=True, min_duration=6.0, max_duration=9.0)
    return root
