"""``engine.compile``: a compiled DeepSpeed ZeRO-2 step (gradient checkpointing, token masking) equals the eager step
on one rank (in process) and on 2 gloo ranks (``launch/pretrain.sh``); where the backend cannot compile, training
warns, logs it and goes on eagerly; ZeRO-3 is refused with a sentence.

The compile tests are ``slow``: inductor compiles C++ kernels for the tiny model (~20-100 s on 2 cores)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from data_fixtures import write_shards
from net import free_port, rank_env
from ptrain.configs import EngineConfig
from ptrain.loss import build_loss
from ptrain.model import ModelConfig

os.environ.setdefault("DS_ACCELERATOR", "cpu")
E = pytest.importorskip("ptrain.engine")

REPO = Path(__file__).resolve().parent.parent
TINY = ModelConfig(clip="tiny", head="seqTransf", num_frames=3, frame_size=32, max_words=8, cross_layers=1,
                   grad_checkpointing=True, mask_ratio=0.5)


def test_compile_with_zero3_is_refused():
    with pytest.raises(ValueError, match="compile=true does not work with zero_stage=3"):
        EngineConfig(zero_stage=3, compile=True)
    assert EngineConfig(zero_stage=2, compile=True).compile


def _run(compile_: bool, steps: int = 3):
    """Losses and final weights of ``steps`` ZeRO-2 steps on fixed batches (the 2nd step unmasked)."""
    from ptrain.masking import build_token_masker
    from ptrain.model import build_model

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        model = build_model(TINY)
    # why SGD: Adam turns float noise in near-zero gradients (e.g. key biases, whose true gradient is 0) into
    # full-size steps, so only a linear update lets the weights be compared, not just the losses
    sgd = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    engine = E.Engine(model, sgd, EngineConfig(zero_stage=2, precision="fp32", micro_batch_size=4, compile=compile_))
    masker = build_token_masker(TINY, model.num_patches, seed=0, max_steps=steps)
    loss_fn, g, losses = build_loss(TINY), torch.Generator().manual_seed(0), []
    for step in range(steps):
        frames = torch.randint(0, 256, (4, 3, 3, 32, 32), dtype=torch.uint8, generator=g)
        ids = torch.randint(1, 1000, (4, 8), generator=g)
        ids[:, 0], ids[:, -1] = 49406, 49407
        keep = None if step == 1 else masker({"index": torch.arange(4) + 4 * step, "frames": frames}, step)
        mask = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 1, 1], [1, 0, 0]])
        out = engine(frames, mask, ids, torch.ones(4, 8, dtype=torch.long),
                     **({} if keep is None else {"token_keep": keep}))
        loss, _ = loss_fn(out, torch.arange(4))
        engine.backward(loss)
        engine.step()
        losses.append(float(loss.detach()))
    weights = {n: p.detach().clone() for n, p in engine.module.named_parameters()}
    return engine, losses, weights


@pytest.mark.slow
def test_compiled_step_equals_the_eager_step(world_of_one):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", RuntimeWarning)
        engine, got, got_w = _run(True)
    if not engine.compiled:  # no toolchain here: the fallback must have said so, loudly
        assert any("runs EAGERLY" in str(w.message) for w in caught), [str(w.message) for w in caught]
        pytest.skip(f"torch.compile cannot run here: {engine.compile_note}")
    assert "torch.compile" in engine.compile_note and engine.ds.is_compiled
    _, want, want_w = _run(False)
    assert got == pytest.approx(want, rel=1e-5, abs=1e-6)
    for name in want_w:
        torch.testing.assert_close(got_w[name], want_w[name], rtol=1e-4, atol=1e-6, msg=name)


def test_a_compile_failure_on_the_first_forward_falls_back_to_eager(world_of_one, monkeypatch):
    """The probe passed but the real model fails to compile: the step warns, runs eagerly, and stays eager."""
    from ptrain.model import build_model

    monkeypatch.setattr(E, "compile_probe", lambda backend="inductor", device=None: None)  # no real compile here
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        model = build_model(TINY)
    engine = E.Engine(model, torch.optim.SGD(model.parameters(), lr=0.1),
                      EngineConfig(zero_stage=2, precision="fp32", micro_batch_size=2, compile=True))
    assert engine.compiled and engine.ds.is_compiled

    def broken(*args, **kwargs):
        raise torch._dynamo.exc.InternalTorchDynamoError("inductor fell over")

    engine.module._compiled_call_impl = broken  # what nn.Module.compile installed, made to fail
    frames = torch.randint(0, 256, (2, 3, 3, 32, 32), dtype=torch.uint8)
    ids = torch.tensor([[49406, 5, 49407, 0, 0, 0, 0, 0]] * 2)
    inputs = (frames, torch.ones(2, 3, dtype=torch.long), ids, (ids > 0).long())
    with pytest.warns(RuntimeWarning, match="inductor fell over.*training runs EAGERLY"):
        out = engine(*inputs)
    assert not engine.compiled and not engine.ds.is_compiled and "EAGERLY" in engine.compile_note
    torch.testing.assert_close(out["video"], engine.ds.module(*inputs)["video"])


def _env(**extra):
    return rank_env(**{"PYTHONWARNINGS": os.environ.get("PYTHONWARNINGS"), **extra})


def _overrides(shards: Path, run: Path, *more: str) -> list[str]:
    return [f"run_dir={run}", "max_steps=4", "seed=1", "model.clip=tiny", "model.head=seqTransf", "model.num_frames=3",
            "model.frame_size=32", "model.max_words=8", "model.cross_layers=1", "model.grad_checkpointing=true",
            "model.mask_ratio=0.5", "optim.unmasked_tail_steps=1", f"data.sources=[{shards}]", "data.num_workers=0",
            "engine.zero_stage=2", "engine.precision=fp32", "engine.micro_batch_size=4", "log.every_steps=1",
            "log.tensorboard=false", "checkpoint.every_steps=0", "optim.lr=1e-3", "optim.coef_lr=1", *more]


def _losses(run: Path) -> list[float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in sorted((r for r in rows if r["kind"] == "train"), key=lambda r: r["step"])]


def test_without_a_compiler_training_warns_and_runs_eagerly(tmp_path):
    """No C++ compiler for inductor (CXX names none, an empty kernel cache): the run says so and trains eagerly."""
    shards = tmp_path / "shards"
    write_shards(shards, num_shards=1, samples_per_shard=8, frames=(3,), size=(32, 32))
    # inductor's compiler only (the CXX variable would also break DeepSpeed's own C++ ops); a fresh kernel cache so
    # that no kernel compiled earlier on this machine is reused
    driver = ("import sys, torch._inductor.config as c; c.cpp.cxx = (sys.argv[1],); from ptrain.cli import main; "
              "sys.exit(main(['pretrain', *sys.argv[2:]]))")
    proc = subprocess.run([sys.executable, "-c", driver, str(tmp_path / "no-such-compiler"),
                           *_overrides(shards, tmp_path / "run"), "max_steps=2", "engine.compile=true"],
                          env=_env(TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "inductor")), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "RuntimeWarning" in proc.stderr and "training runs EAGERLY" in proc.stderr
    assert "the inductor backend failed on a probe" in proc.stderr
    assert len(_losses(tmp_path / "run")) == 2


@pytest.mark.slow
def test_two_gloo_ranks_compiled_equal_eager(tmp_path):
    """launch/pretrain.sh, 2 CPU ranks, ZeRO-2 + gradient checkpointing + token masking (unmasked last step):
    the compiled run logs the losses of the eager run."""
    shards = tmp_path / "shards"
    write_shards(shards, num_shards=2, samples_per_shard=8, frames=(2, 3), size=(32, 40))
    config = tmp_path / "tiny.yaml"
    config.write_text("seed: 1\n")  # the launcher takes a config file; the values are the overrides below
    losses = {}
    for compile_ in (False, True):
        run = tmp_path / f"run_{compile_}"
        cmd = [str(REPO / "launch" / "pretrain.sh"), "--master-port", str(free_port()), "--gpus", "2", str(config),
               *_overrides(shards, run, f"engine.compile={str(compile_).lower()}", "engine.micro_batch_size=2")]
        proc = subprocess.run(cmd, env=_env(PYTHONWARNINGS="ignore"), capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, proc.stderr[-5000:]
        assert "ZeRO-2 fp32 on 2 rank(s)" in proc.stderr
        if compile_:
            if "runs EAGERLY" in proc.stderr:
                pytest.skip("torch.compile cannot run here (the run said so and trained eagerly)")
            assert "engine.compile=true: the model's forward and backward run under torch.compile" in proc.stderr
        losses[compile_] = _losses(run)
    assert len(losses[True]) == 4
    assert losses[True] == pytest.approx(losses[False], rel=1e-4)
