"""Shared fixtures: one generated sample corpus per test session (videos + captions + ground truth), and a gloo
process group of one for the tests that build a DeepSpeed engine in the pytest process."""

import os

import pytest

from net import free_port


@pytest.fixture(scope="session")
def sample_corpus(tmp_path_factory):
    """7 good videos (every container/codec kind, one VFR, one weird id) + the bad ones, 6-9 s each."""
    from ptrain_demo.corpus import generate

    root = tmp_path_factory.mktemp("sample_corpus")
    generate(root, num_videos=7, seed=3, bad_videos=True, min_duration=6.0, max_duration=9.0)
    return root


@pytest.fixture(scope="module")
def world_of_one():
    """A gloo process group of one for a module, torn down afterwards (other tests expect none)."""
    import torch.distributed as dist

    saved = {k: os.environ.get(k) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_SIZE="1", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(free_port()))
    from ptrain import distributed as du

    du.init()
    yield
    if dist.is_initialized():
        dist.destroy_process_group()
    # DeepSpeed keeps a clone of the world group in module globals; the next module's new world would meet the
    # destroyed one ("Group ... is not registered"). A process makes one world in production, so only tests see it.
    from deepspeed.utils import groups

    groups._WORLD_GROUP = None
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
