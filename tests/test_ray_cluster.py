"""`ptrain shard` submitted as a Ray job to a loopback `ray start --head` cluster (joins it with ray.address=auto)."""

import json
import os
import secrets
import subprocess
import sys
import time
from pathlib import Path

import pytest

from net import free_port, kill_session

pytestmark = pytest.mark.slow


@pytest.fixture
def ray_cluster(tmp_path_factory):
    temp_dir = str(tmp_path_factory.mktemp("rt"))  # short path: Ray's socket names must stay < 108 chars
    gcs, dash = free_port(), free_port()
    # every port of our own: Ray's fixed defaults (dashboard agent 52365, client server 10001) can still be held
    # by the agent of a cluster stopped a moment ago, or by someone else's Ray on this machine
    ports = [f"--{flag}={free_port()}" for flag in ("dashboard-agent-listen-port", "dashboard-agent-grpc-port",
                                                   "metrics-export-port", "runtime-env-agent-port",
                                                   "ray-client-server-port")]
    ray_bin = str(Path(sys.executable).with_name("ray"))
    # token authentication with a token of this test's own (never the user's ~/.ray/auth_token)
    env = dict(os.environ, RAY_ADDRESS="", RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32))
    # a session of its own: teardown kills every process of this cluster, also those Ray renames (ray::...)
    start = subprocess.Popen([ray_bin, "start", "--head", "--port", str(gcs), "--node-ip-address", "127.0.0.1",
                              "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash), *ports,
                              "--num-cpus", "2", "--temp-dir", temp_dir, "--disable-usage-stats"],
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             start_new_session=True)
    try:
        out, _ = start.communicate(timeout=180)
        assert start.returncode == 0, out[-3000:]
        yield f"http://127.0.0.1:{dash}", env
    finally:
        kill_session(start.pid)


def test_shard_job_submitted_to_a_cluster(sample_corpus, ray_cluster, tmp_path):
    address, env = ray_cluster
    out = tmp_path / "shards"
    ray_bin = str(Path(sys.executable).with_name("ray"))
    cmd = [ray_bin, "job", "submit", "--address", address, "--", sys.executable, "-m", "ptrain", "shard",
           f"videos={sample_corpus / 'videos'}", f"captions={sample_corpus / 'caption.json'}", f"out={out}",
           "max_samples_per_shard=3", "frame_size=32", "plan.num_frames=4", "plan.min_seconds=2", "ray.address=auto",
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
