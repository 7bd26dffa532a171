"""A loopback Ray cluster of a test's own: `ray start --head` with token authentication, every port on 127.0.0.1.

    with loopback_cluster() as cluster:      # cluster.dashboard = "http://127.0.0.1:PORT", cluster.env for clients
        subprocess.run(["ptrain", "submit", "--address", cluster.dashboard, ...], env=cluster.client_env())

The cluster runs in a process session of its own (teardown kills every process of it, also those Ray renames to
``ray::...``) with its own temporary directory (``RAY_TMPDIR``: no ``/tmp/ray/ray_current_cluster`` of ours is left
for a later ``ray.init()`` to find) and its own token (never the user's ``~/.ray/auth_token``). Ray replaces a
``--node-ip-address`` of 127.0.0.1 by the machine's address and then listens on all interfaces, unless
``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` (its single-machine mode), which keeps every Ray port on loopback.
"""

import os
import secrets
import shutil
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from net import free_port, kill_session

RAY_BIN = str(Path(sys.executable).with_name("ray"))


@dataclass
class Cluster:
    dashboard: str  # http://127.0.0.1:PORT
    env: dict  # the cluster's own environment (token, RAY_TMPDIR, loopback mode)
    session: int  # the process session of every process of the cluster
    ports: dict  # what we asked Ray to listen on, by flag name

    def client_env(self, token: bool = True, **extra) -> dict:
        """The environment of a client on this machine: the token (unless token=False) but not RAY_AUTH_MODE, as a
        user's shell would have it; HOME inside the cluster's directory, so no ~/.ray/auth_token is read."""
        env = {k: v for k, v in self.env.items() if k != "RAY_AUTH_MODE"}
        if not token:
            env.pop("RAY_AUTH_TOKEN", None)
        env["HOME"] = str(Path(self.env["RAY_TMPDIR"]) / "home")
        env.update(extra)
        return env


@contextmanager
def loopback_cluster(num_cpus: int = 2) -> Iterator[Cluster]:
    temp = tempfile.mkdtemp(prefix="rt", dir="/tmp")  # short: Ray's socket paths must stay < 108 characters
    (Path(temp) / "home").mkdir()
    # every port of our own: Ray's fixed defaults (dashboard agent 52365, client server 10001) can be held by a
    # cluster stopped a moment ago or by someone else's Ray on this machine
    ports = {flag: free_port() for flag in ("port", "dashboard-port", "dashboard-agent-listen-port",
                                             "dashboard-agent-grpc-port", "metrics-export-port",
                                             "runtime-env-agent-port", "ray-client-server-port")}
    # RAY_memory_monitor_refresh_ms=0: Ray's memory monitor kills tasks when the *machine* is near full, which on a
    # shared machine is other people's memory; a test of ours must not fail for that
    env = dict(os.environ, RAY_ADDRESS="", RAY_TMPDIR=temp, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32),
               RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_USAGE_STATS_ENABLED="0", RAY_memory_monitor_refresh_ms="0",
               OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_SIZE", "MASTER_ADDR", "MASTER_PORT", "RAY_API_SERVER_ADDRESS"):
        env.pop(k, None)
    start = subprocess.Popen([RAY_BIN, "start", "--head", "--node-ip-address", "127.0.0.1", "--dashboard-host",
                              "127.0.0.1", *[f"--{flag}={port}" for flag, port in ports.items()],
                              "--num-cpus", str(num_cpus), "--disable-usage-stats"],
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             start_new_session=True)
    try:
        out, _ = start.communicate(timeout=180)
        assert start.returncode == 0, out[-3000:]
        yield Cluster(f"http://127.0.0.1:{ports['dashboard-port']}", env, start.pid, ports)
    finally:
        kill_session(start.pid)
        shutil.rmtree(temp, ignore_errors=True)
