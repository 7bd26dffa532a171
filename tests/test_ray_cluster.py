"""`ptrain shard` submitted as a Ray job to a loopback `ray start --head` cluster (joins it with ray.address=auto)."""

import json
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from net import free_port

pytestmark = pytest.mark.slow


def processes_under(temp_dir: str) -> list[int]:
    """PIDs of the processes of the cluster this test started (they all name its private temp dir)."""
    import psutil

    pids = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            if any(temp_dir in arg for arg in (p.info["cmdline"] or [])):
                pids.append(p.info["pid"])
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return pids


@pytest.fixture
def ray_cluster(tmp_path_factory):
    temp_dir = str(tmp_path_factory.mktemp("rt"))  # short path: Ray's socket names must stay < 108 chars
    gcs, dash = free_port(), free_port()
    ray_bin = str(Path(sys.executable).with_name("ray"))
    # token authentication with a token of this test's own (never the user's ~/.ray/auth_token)
    env = dict(os.environ, RAY_ADDRESS="", RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32))
    subprocess.run([ray_bin, "start", "--head", "--port", str(gcs), "--node-ip-address", "127.0.0.1",
                    "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash), "--num-cpus", "2",
                    "--temp-dir", temp_dir, "--disable-usage-stats"], check=True, env=env, capture_output=True)
    try:
        yield f"http://127.0.0.1:{dash}", env
    finally:
        for pid in processes_under(temp_dir):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_shard_job_submitted_to_a_cluster(sample_corpus, ray_cluster, tmp_path):
    address, env = ray_cluster
    out = tmp_path / "shards"
    ray_bin = str(Path(sys.executable).with_name("ray"))
    cmd = [ray_bin, "job", "submit", "--address", address, "--", sys.executable, "-m", "ptrain", "shard",
           f"videos={sample_corpus / 'videos'}", f"captions={sample_corpus / 'caption.json'}", f"out={out}",
           "max_samples_per_shard=3", "frame_size=32", "num_frames=4", "min_seconds=2", "ray.address=auto",
           "progress=false"]
    deadline = time.time() + 120  # the job agent may need a moment after `ray start` on a busy machine
    while True:
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
        retry = "Failed to connect" in result.stderr or "try again later" in result.stderr
        if result.returncode == 0 or time.time() > deadline or not retry:
            break
        time.sleep(2)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "succeeded" in result.stdout.lower()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["complete"] and manifest["samples"] > 0
