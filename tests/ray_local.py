"""A loopback Ray cluster of a test's own: `ray start --head` with token authentication, every port on 127.0.0.1,
and optionally a second node (`ray start --address HEAD`) with CPUs and a custom resource of its own.

    with loopback_cluster() as cluster:      # cluster.dashboard = "http://127.0.0.1:PORT", cluster.env for clients
        subprocess.run(["ptrain", "submit", "--address", cluster.dashboard, ...], env=cluster.client_env())
    with loopback_cluster(num_cpus=1, second_node_cpus=1) as cluster:   # cluster.second_session: that node's
        ...                                                              # processes; resource SECOND_NODE on it

The cluster runs in a process session of its own (teardown kills every process of it, also those Ray renames to
``ray::...``) with its own temporary directory (``RAY_TMPDIR``: no ``/tmp/ray/ray_current_cluster`` of ours is left
for a later ``ray.init()`` to find) and its own token (never the user's ``~/.ray/auth_token``). Ray replaces a
``--node-ip-address`` of 127.0.0.1 by the machine's address and then listens on all interfaces, unless
``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` (its single-machine mode), which keeps every Ray port on loopback. In that
mode ``ray start`` refuses to start a second node; the second node's ``ray start`` is Ray's own CLI with that one
refusal lifted (and 127.0.0.1 kept as given), while the node's processes still run in single-machine mode. It runs
in a process session of its own, so a test can tell the two nodes' processes apart.
"""

import json
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
SECOND_NODE = "ptrain_test_second_node"  # the custom resource that names the second node (1 per CPU of it)
# `ray start` of the second node: Ray's CLI, told that multi-node is allowed (it refuses in single-machine mode) and
# that 127.0.0.1 stays 127.0.0.1 (it would otherwise swap in the machine's address); only this CLI process is patched
_RAY_START_NODE = ("import sys\n"
                   "import ray._private.ray_constants as constants, ray._private.services as services\n"
                   "constants.ENABLE_RAY_CLUSTER = True\n"
                   "services.resolve_ip_for_localhost = lambda host: host\n"
                   "from ray.scripts.scripts import main\n"
                   "sys.argv[0] = 'ray'\n"
                   "sys.exit(main())\n")


@dataclass
class Cluster:
    dashboard: str  # http://127.0.0.1:PORT
    env: dict  # the cluster's own environment (token, RAY_TMPDIR, loopback mode)
    session: int  # the process session of every process of the cluster
    ports: dict  # what we asked Ray to listen on, by flag name
    second_session: int | None = None  # the process session of the second node (None: a head alone)

    @property
    def sessions(self) -> list[int]:
        return [self.session] + ([self.second_session] if self.second_session is not None else [])

    def client_env(self, token: bool = True, **extra) -> dict:
        """The environment of a client on this machine: the token (unless token=False) but not RAY_AUTH_MODE, as a
        user's shell would have it; HOME inside the cluster's directory, so no ~/.ray/auth_token is read."""
        env = {k: v for k, v in self.env.items() if k != "RAY_AUTH_MODE"}
        if not token:
            env.pop("RAY_AUTH_TOKEN", None)
        env["HOME"] = str(Path(self.env["RAY_TMPDIR"]) / "home")
        env.update(extra)
        return env


def _distinct_ports(flags: tuple, taken: set = frozenset()) -> dict[str, int]:
    """A free loopback port per flag, no two the same: the OS may hand out a port just released again, and Ray
    refuses to start when two of its components are given one port."""
    ports: dict[str, int] = {}
    for flag in flags:
        port = free_port()
        while port in taken or port in ports.values():
            port = free_port()
        ports[flag] = port
    return ports


@contextmanager
def loopback_cluster(num_cpus: int = 2, second_node_cpus: int = 0, extra_env: dict | None = None,
                     second_node_env: dict | None = None) -> Iterator[Cluster]:
    """``extra_env``: more environment for every process of the cluster (its workers inherit it);
    ``second_node_env``: more for the second node's processes alone."""
    temp = tempfile.mkdtemp(prefix="rt", dir="/tmp")  # short: Ray's socket paths must stay < 108 characters
    (Path(temp) / "home").mkdir()
    # every port of our own: Ray's fixed defaults (dashboard agent 52365, client server 10001) can be held by a
    # cluster stopped a moment ago or by someone else's Ray on this machine
    ports = _distinct_ports(("port", "dashboard-port", "dashboard-agent-listen-port", "dashboard-agent-grpc-port",
                             "metrics-export-port", "runtime-env-agent-port", "ray-client-server-port"))
    # RAY_memory_monitor_refresh_ms=0: Ray's memory monitor kills tasks when the *machine* is near full, which on a
    # shared machine is other people's memory; a test of ours must not fail for that
    env = dict(os.environ, RAY_ADDRESS="", RAY_TMPDIR=temp, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32),
               RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_USAGE_STATS_ENABLED="0", RAY_memory_monitor_refresh_ms="0",
               OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", **(extra_env or {}))
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_SIZE", "MASTER_ADDR", "MASTER_PORT", "RAY_API_SERVER_ADDRESS"):
        env.pop(k, None)
    start = subprocess.Popen([RAY_BIN, "start", "--head", "--node-ip-address", "127.0.0.1", "--dashboard-host",
                              "127.0.0.1", *[f"--{flag}={port}" for flag, port in ports.items()],
                              "--num-cpus", str(num_cpus), "--disable-usage-stats"],
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             start_new_session=True)
    second = None
    try:
        out, _ = start.communicate(timeout=180)
        assert start.returncode == 0, out[-3000:]
        cluster = Cluster(f"http://127.0.0.1:{ports['dashboard-port']}", env, start.pid, ports)
        if second_node_cpus:
            # the agent ports of its own too: the head's are taken, and Ray's defaults are fixed numbers
            node_ports = _distinct_ports(("dashboard-agent-listen-port", "dashboard-agent-grpc-port",
                                          "metrics-export-port", "runtime-env-agent-port"), set(ports.values()))
            second = subprocess.Popen(
                [sys.executable, "-c", _RAY_START_NODE, "start", f"--address=127.0.0.1:{ports['port']}",
                 "--node-ip-address", "127.0.0.1", *[f"--{flag}={port}" for flag, port in node_ports.items()],
                 "--num-cpus", str(second_node_cpus), "--resources", json.dumps({SECOND_NODE: second_node_cpus}),
                 "--disable-usage-stats"],
                env={**env, **(second_node_env or {})}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                start_new_session=True)
            out, _ = second.communicate(timeout=180)
            assert second.returncode == 0, out[-3000:]
            cluster.second_session = second.pid
        yield cluster
    finally:
        if second is not None:
            kill_session(second.pid)
        kill_session(start.pid)
        shutil.rmtree(temp, ignore_errors=True)
