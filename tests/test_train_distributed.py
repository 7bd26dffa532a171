"""Multi-rank training through launch/pretrain.sh (DeepSpeed launcher, 2 CPU ranks over gloo) on shards
cut from the sample corpus: ZeRO-2 and ZeRO-3, a lost rank then resume, resume at 1 rank from a
2-rank checkpoint, and two "nodes" launched separately with --no-ssh on loopback.

All runs share one config (tiny CLIP, fp32, global batch 8, 60 steps, checkpoints every 20 steps), so
their per-step losses can be compared with the uninterrupted ZeRO-2 run.
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from net import free_port, rank_env, session_pids

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
LAUNCH = REPO / "launch" / "pretrain.sh"
STEPS = 60


def _launch(config: Path, *overrides, flags=(), env=None, timeout=300) -> subprocess.CompletedProcess:
    cmd = [str(LAUNCH), "--master-port", str(free_port()), *flags, str(config), *overrides]
    return subprocess.run(cmd, env=env or rank_env(), capture_output=True, text=True, timeout=timeout)


def _losses(run: Path) -> dict[int, float]:
    """Logged loss per step."""
    out = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if row["kind"] == "train":
            out[row["step"]] = row["loss"]
    return out


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from ptrain_demo.corpus import generate

    root = tmp_path_factory.mktemp("dist")
    # 16 videos -> ~64 clips: enough for a tiny model to leave its collapsed start within 60 steps
    sample_corpus = root / "corpus"
    generate(sample_corpus, num_videos=16, seed=1, bad_videos=False, min_duration=8.0, max_duration=12.0)
    shards = root / "shards"
    proc = subprocess.run(
        [sys.executable, "-m", "ptrain", "shard", f"videos={sample_corpus / 'videos'}",
         f"captions={sample_corpus / 'caption.json'}", f"out={shards}", "plan.num_frames=4", "plan.sampling=uniform",
         "frame_size=32", "plan.min_seconds=1.5", "plan.min_words=3", "plan.max_seconds=4", "max_samples_per_shard=16",
         "ray.num_cpus=2", "progress=false"],
        env=rank_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    config = root / "tiny.yaml"
    config.write_text(
        f"max_steps: {STEPS}\nseed: 0\n"
        "model: {clip: tiny, head: seqTransf, num_frames: 4, frame_size: 32, max_words: 16, cross_layers: 1}\n"
        f"data: {{sources: [{shards}], num_workers: 0, crop: center}}\n"
        "optim: {lr: 5.0e-4, coef_lr: 1.0, warmup_steps: 10, weight_decay: 0.0}\n"
        "engine: {zero_stage: 2, precision: fp32, micro_batch_size: 4}\n"
        "checkpoint: {every_steps: 20, keep_last: 3}\n"
        "log: {every_steps: 1, tensorboard: false}\n"
    )
    return {"root": root, "config": config, "shards": shards, "corpus": sample_corpus}


@pytest.fixture(scope="module")
def zero2(setup):
    run = setup["root"] / "zero2"
    proc = _launch(setup["config"], f"run_dir={run}")
    assert proc.returncode == 0, proc.stderr[-5000:]
    return run, proc.stderr, proc.stdout


def test_no_shared_memory_left_behind(zero2):
    """DeepSpeed's CPU shared-memory all-reduce is not started (its /dev/shm segments were never removed and its
    JIT build's lock, left by a killed rank, hung every later run)."""
    run, log, out = zero2
    port = re.search(r"master 127\.0\.0\.1:(\d+)", log).group(1)
    assert not list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))
    assert "shm_comm" not in log + out  # DeepSpeed says "... deepspeed_shm_comm_op built successfully" when it loads it


def test_zero2_two_ranks_loss_falls_and_export_loads(zero2):
    import ptrain

    run, log, _ = zero2
    assert "ZeRO-2 fp32 on 2 rank(s)" in log and "negatives per query 7" in log
    losses = _losses(run)
    assert sorted(losses) == list(range(1, STEPS + 1))
    first, last = sum(losses[s] for s in range(1, 11)) / 10, sum(losses[s] for s in range(STEPS - 9, STEPS + 1)) / 10
    # Another machine's rounding makes a different run after a few dozen steps, as a different seed does: at
    # lr 1e-3 seeds 0-3 gave last/first 0.95 / 0.90 / 0.79 (a 0.9 bound failed in CI); at 5e-4 0.88 / 0.87 /
    # 0.82 / 0.88, so 0.95 is about three spreads away from what any seed gave.
    assert last < 0.95 * first, losses
    kept = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert kept == ["step_00000020", "step_00000040", "step_00000060"]
    model = ptrain.load(run / "checkpoints" / "step_00000060" / "export")
    assert model.cfg.head == "seqTransf" and model.cfg.num_frames == 4


def test_zero3_two_ranks_matches_zero2(setup, zero2):
    run = setup["root"] / "zero3"
    proc = _launch(setup["config"], f"run_dir={run}", "engine.zero_stage=3")
    assert proc.returncode == 0, proc.stderr[-5000:]
    assert "ZeRO-3 fp32 on 2 rank(s)" in proc.stderr
    ref, got = _losses(zero2[0]), _losses(run)
    assert [got[s] for s in ref] == pytest.approx([ref[s] for s in ref], rel=1e-3)
    assert (run / "checkpoints" / "step_00000060" / "export" / "model.safetensors").is_file()


def _rank_pid(session: int, rank: int) -> int | None:
    """The pid of the training process with RANK=rank in process session ``session``."""
    for pid in session_pids(session):
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if f"RANK={rank}".encode() in env and b"pretrain" in cmd and b"deepspeed.launcher" not in cmd:
            return pid
    return None


def test_lost_rank_then_resume_reproduces_losses(setup, zero2):
    run = setup["root"] / "killed"
    cmd = [str(LAUNCH), "--master-port", str(free_port()), str(setup["config"]), f"run_dir={run}"]
    proc = subprocess.Popen(cmd, env=rank_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        deadline = time.time() + 240
        while not (run / "checkpoints" / "step_00000020" / "COMPLETE").exists():
            assert proc.poll() is None and time.time() < deadline, "run ended before its first checkpoint"
            time.sleep(0.02)
        pid = _rank_pid(proc.pid, 1)
        assert pid is not None
        os.kill(pid, signal.SIGKILL)  # lose rank 1 mid-run
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode != 0
    assert not (run / "checkpoints" / f"step_{STEPS:08d}").exists(), "the run finished before the kill"
    assert "training failed" in err and "newest complete checkpoint" in err and "step_000000" in err, err[-3000:]
    assert "a rank was killed by signal 9 (SIGKILL)" in err, err[-3000:]
    resumed = _launch(setup["config"], f"run_dir={run}")
    assert resumed.returncode == 0, resumed.stderr[-5000:]
    assert "resumed from" in resumed.stderr and "DeepSpeed state" in resumed.stderr
    ref, got = _losses(zero2[0]), _losses(run)
    assert sorted(got) == list(range(1, STEPS + 1))
    assert [got[s] for s in ref] == [ref[s] for s in ref]  # same world size: bit-exact
    # the steps the killed attempt logged after its last checkpoint were dropped on resume: each step once
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["kind"] == "train"] == list(range(1, STEPS + 1))


def test_resume_on_one_rank_from_a_two_rank_checkpoint(setup, zero2):
    run = setup["root"] / "one_rank"
    shutil.copytree(zero2[0], run)
    for p in (run / "checkpoints").iterdir():
        if p.name != "step_00000020":
            shutil.rmtree(p)
    (run / "metrics.jsonl").write_text("")
    proc = _launch(setup["config"], f"run_dir={run}", "engine.micro_batch_size=8", env=rank_env(NUM_GPUS="1"))
    assert proc.returncode == 0, proc.stderr[-5000:]
    assert "saved on 2 rank(s) ZeRO-2 fp32, now 1 rank(s)" in proc.stderr
    ref, got = _losses(zero2[0]), _losses(run)
    assert sorted(got) == list(range(21, STEPS + 1))
    assert [got[s] for s in got] == pytest.approx([ref[s] for s in got], rel=1e-4)


def test_two_nodes_launched_separately_without_ssh(setup, zero2):
    run = setup["root"] / "two_nodes"
    hostfile = setup["root"] / "hostfile"
    hostfile.write_text("node0 slots=1\nnode1 slots=1\n")
    port = str(free_port())
    procs = [
        subprocess.Popen([str(LAUNCH), "--hostfile", str(hostfile), "--no-ssh", "--node-rank", str(r),
                          "--master-addr", "127.0.0.1", "--master-port", port, str(setup["config"]), f"run_dir={run}"],
                         env=rank_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for r in (0, 1)
    ]
    errs = [p.communicate(timeout=300)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errs[0][-3000:] + errs[1][-3000:]
    assert "on 2 rank(s)" in errs[0]
    ref, got = _losses(zero2[0]), _losses(run)
    assert [got[s] for s in ref] == pytest.approx([ref[s] for s in ref], rel=1e-6)
