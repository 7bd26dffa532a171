"""Jobs on a loopback Ray cluster through `ptrain submit`: Ray Train losing a worker and finishing as an uninterrupted
run would, submission idempotence, `ptrain jobs` (list, logs, stop), token authentication and the listening sockets.

Each test starts and stops its own cluster (tests/ray_local.py). The training config is tiny (fp32, 2 CPU workers,
global batch 8, 30 steps, checkpoints every 10), so a run and its comparison with the launcher's take about a minute.
"""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from net import free_port, session_pids
from ray_local import loopback_cluster

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
PTRAIN = [sys.executable, "-m", "ptrain"]
STEPS = 30
SHARD_ARGS = ["max_samples_per_shard=4", "frame_size=32", "plan.num_frames=4", "plan.sampling=uniform",
              "plan.min_seconds=1.5", "plan.max_seconds=4", "progress=false"]


def _ptrain(cluster, *args, token=True, timeout=600) -> subprocess.CompletedProcess:
    return subprocess.run([*PTRAIN, *args], env=cluster.client_env(token=token), capture_output=True, text=True,
                          timeout=timeout)


def _submitted_id(proc: subprocess.CompletedProcess) -> str:
    found = re.search(r"^submitted (\S+) to ", proc.stdout, re.M)
    assert found, proc.stdout[-3000:] + proc.stderr[-3000:]
    return found.group(1)


def _client(cluster):
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(cluster.dashboard, headers={"Authorization": f"Bearer {cluster.env['RAY_AUTH_TOKEN']}"})


def _active(client, job_id: str) -> bool:
    return str(client.get_job_status(job_id).value) in ("PENDING", "RUNNING")


def _wait_for_end(client, job_id: str, timeout: float = 600) -> str:
    deadline = time.monotonic() + timeout
    while (status := str(client.get_job_status(job_id).value)) in ("PENDING", "RUNNING"):
        assert time.monotonic() < deadline, f"job {job_id} still {status}:\n{client.get_job_logs(job_id)[-5000:]}"
        time.sleep(0.5)
    return status


def _write_configs(root: Path, shards: Path) -> Path:
    """A training config that includes a base file in another directory (both travel with the job)."""
    (root / "common").mkdir(parents=True, exist_ok=True)
    (root / "common" / "base.yaml").write_text(
        "model: {clip: tiny, head: seqTransf, num_frames: 4, frame_size: 32, max_words: 16, cross_layers: 1}\n"
        "optim: {lr: 1.0e-3, coef_lr: 1.0, warmup_steps: 5, weight_decay: 0.0}\n"
        "engine: {zero_stage: 2, precision: fp32, micro_batch_size: 4}\n"
        "log: {every_steps: 1, tensorboard: false, progress_bar: false}\n")
    (root / "runs").mkdir(exist_ok=True)
    config = root / "runs" / "tiny.yaml"
    config.write_text(f"include: ../common/base.yaml\nmax_steps: {STEPS}\nseed: 0\n"
                      f"data: {{sources: [{shards}], num_workers: 0, crop: center}}\n"
                      "checkpoint: {every_steps: 10, keep_last: 3}\n")
    return config


def _train_rows(run: Path) -> list[dict]:
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "train"]


def _shard(cluster, corpus: Path, out: Path, *flags) -> subprocess.CompletedProcess:
    return _ptrain(cluster, "submit", "--address", cluster.dashboard, *flags, "shard", f"videos={corpus / 'videos'}",
                   f"captions={corpus / 'caption.json'}", f"out={out}", *SHARD_ARGS)


def _worker_pids(session: int) -> dict[int, str]:
    out = {}
    for pid in session_pids(session):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if cmd.startswith("ray::RayTrainWorker"):
            out[pid] = cmd
    return out


def test_ray_train_loses_a_worker_and_finishes_as_an_uninterrupted_run(sample_corpus, tmp_path):
    from safetensors.torch import load_file
    import torch

    with loopback_cluster() as cluster:
        shards = tmp_path / "shards"
        proc = _shard(cluster, sample_corpus, shards, "--follow")
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        config = _write_configs(tmp_path / "cfg", shards)

        # the uninterrupted reference: the deepspeed launcher's 2 CPU ranks, outside Ray
        ref = tmp_path / "ref"
        env = dict(cluster.env, DS_ACCELERATOR="cpu", PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
        proc = subprocess.run([str(REPO / "launch" / "pretrain.sh"), "--master-port", str(free_port()), str(config),
                               f"run_dir={ref}"], env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-5000:]

        # the same config submitted to the cluster under Ray Train; a worker is killed after the first checkpoint
        run = tmp_path / "killed"
        proc = _ptrain(cluster, "submit", "--address", cluster.dashboard, "pretrain", str(config), f"run_dir={run}",
                       "ray.num_workers=2", "ray.max_failures=2")
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        job_id = _submitted_id(proc)
        client = _client(cluster)
        deadline = time.monotonic() + 300
        while not (run / "checkpoints" / "step_00000010" / "COMPLETE").exists():
            assert time.monotonic() < deadline and _active(client, job_id), \
                client.get_job_logs(job_id)[-5000:]
            time.sleep(0.05)
        workers = _worker_pids(cluster.session)
        assert len(workers) == 2, workers
        victim = max(workers)
        os.kill(victim, signal.SIGKILL)
        finished_before_kill = (run / "checkpoints" / f"step_{STEPS:08d}" / "COMPLETE").exists()
        status = _wait_for_end(client, job_id)
        logs = client.get_job_logs(job_id)
    assert not finished_before_kill, "the run finished before the kill"
    assert status == "SUCCEEDED", logs[-8000:]
    # Ray restarted the group and it resumed from the last complete checkpoint (a first attempt starts fresh)
    assert re.search(r"resumed from \S+/checkpoints/step_000000[1-2]0 at step [12]0", logs), logs[-8000:]

    # the same steps and samples as the uninterrupted run, each step logged once, the same losses and weights
    rows, ref_rows = _train_rows(run), _train_rows(ref)
    assert [r["step"] for r in rows] == [r["step"] for r in ref_rows] == list(range(1, STEPS + 1))
    assert [r["samples_seen"] for r in rows] == [r["samples_seen"] for r in ref_rows]
    assert [r["loss"] for r in rows] == pytest.approx([r["loss"] for r in ref_rows], rel=1e-6)
    final, ref_final = (r / "checkpoints" / f"step_{STEPS:08d}" for r in (run, ref))
    state, ref_state = (json.loads((d / "trainer_state.json").read_text()) for d in (final, ref_final))
    assert (state["step"], state["samples_seen"]) == (ref_state["step"], ref_state["samples_seen"]) == (STEPS, STEPS * 8)
    weights, ref_weights = (load_file(str(d / "consolidated" / "weights.safetensors")) for d in (final, ref_final))
    assert weights.keys() == ref_weights.keys()
    for name in weights:
        torch.testing.assert_close(weights[name], ref_weights[name], rtol=1e-6, atol=1e-7, msg=name)


def _listeners(session: int) -> list[tuple[str, str, int]]:
    """(process command, address, port) of every listening TCP socket of the cluster's processes."""
    out = []
    for pid in session_pids(session):
        try:
            p = psutil.Process(pid)
            cmd = " ".join(p.cmdline())[:80]
            for c in p.net_connections(kind="tcp"):
                if c.status == psutil.CONN_LISTEN:
                    out.append((cmd, c.laddr.ip, c.laddr.port))
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return out


def _loopback(ip: str) -> bool:
    return ip.startswith("127.") or ip in ("::1", "::ffff:127.0.0.1") or ip.startswith("::ffff:127.")


def test_submit_is_idempotent_jobs_list_logs_stop_with_token_auth_on_loopback(sample_corpus, tmp_path):
    with loopback_cluster() as cluster:
        # token authentication: without the token the dashboard refuses, and ptrain says what to do
        proc = _ptrain(cluster, "jobs", "--address", cluster.dashboard, token=False)
        assert proc.returncode == 4, proc.stderr
        assert "refused" in proc.stderr and "ray get-auth-token" in proc.stderr and "RAY_AUTH_TOKEN" in proc.stderr

        # the same shard job twice runs once; --resubmit runs it again (its resume finds every shard committed)
        out = tmp_path / "shards"
        first = _shard(cluster, sample_corpus, out, "--follow")
        assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
        job_id = _submitted_id(first)
        assert job_id.startswith("ptrain-shard-") and f"job {job_id}: SUCCEEDED" in first.stdout
        manifest = json.loads((out / "manifest.json").read_text())
        assert manifest["complete"] and manifest["samples"] > 0
        again = _shard(cluster, sample_corpus, out)
        assert again.returncode == 3, again.stdout + again.stderr
        assert f"already submitted as {job_id} (SUCCEEDED)" in again.stderr
        listed = _ptrain(cluster, "jobs", "--address", cluster.dashboard)
        assert listed.returncode == 0, listed.stderr
        assert re.search(rf"^{job_id}\s+SUCCEEDED\s+shard\s.*{re.escape(str(out))}$", listed.stdout, re.M), listed.stdout
        logs = _ptrain(cluster, "jobs", "logs", job_id, "--address", cluster.dashboard)
        assert logs.returncode == 0 and "ptrain shard:" in logs.stdout and "ray.address=auto" in logs.stdout, logs.stdout
        rerun = _shard(cluster, sample_corpus, out, "--resubmit", "--follow")
        assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
        assert _submitted_id(rerun) == f"{job_id}-2"
        assert re.search(r"\d+ shards already committed \(0 re-hashed, [\d.]+ s\), 0/\d+ shard groups to run", rerun.stdout), rerun.stdout
        assert json.loads((out / "manifest.json").read_text())["samples"] == manifest["samples"]

        # a long fine-tune (keys only, no config file): while its Ray Train workers run, every listening socket is on
        # loopback except the process group's rendezvous store (torch's TCPStore on rank 0 binds all interfaces);
        # then it is stopped
        run = tmp_path / "long"
        proc = _ptrain(cluster, "submit", "--address", cluster.dashboard, "finetune", "init=tiny", f"run_dir={run}",
                       "epochs=100000", f"data.sources=[{out}]", "data.num_workers=0", "data.crop=center",
                       "model.head=meanP", "model.num_frames=4", "model.frame_size=32", "model.max_words=16",
                       "engine.precision=fp32", "engine.micro_batch_size=4", "checkpoint.every_steps=1000000",
                       "log.every_steps=1", "log.tensorboard=false")
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        long_id = _submitted_id(proc)
        client = _client(cluster)
        deadline = time.monotonic() + 300
        while not ((run / "metrics.jsonl").is_file() and (run / "metrics.jsonl").read_text().strip()):
            assert time.monotonic() < deadline and _active(client, long_id), \
                client.get_job_logs(long_id)[-5000:]
            time.sleep(0.2)
        listeners = _listeners(cluster.session)
        dashboard = [(a, p) for _, a, p in listeners if p == cluster.ports["dashboard-port"]]
        assert dashboard and all(_loopback(a) for a, _ in dashboard), dashboard
        elsewhere = [(cmd, a, p) for cmd, a, p in listeners if not _loopback(a)]
        assert len(elsewhere) <= 1 and all(cmd.startswith("ray::RayTrainWorker") for cmd, _, _ in elsewhere), \
            f"listening beyond loopback: {elsewhere}"
        assert _worker_pids(cluster.session)

        stopped = _ptrain(cluster, "jobs", "stop", long_id, "--address", cluster.dashboard)
        assert stopped.returncode == 0 and f"job {long_id}: STOPPED" in stopped.stdout, stopped.stdout + stopped.stderr
        deadline = time.monotonic() + 60
        while _worker_pids(cluster.session):  # the job's Ray Train workers go with it
            assert time.monotonic() < deadline, _worker_pids(cluster.session)
            time.sleep(0.2)
        listed = _ptrain(cluster, "jobs", "--address", cluster.dashboard)
        assert re.search(rf"^{long_id}\s+STOPPED\s+finetune\s", listed.stdout, re.M), listed.stdout
