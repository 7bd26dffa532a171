"""A local Ray for one `ptrain shard` run that dies with its driver, even a driver killed with SIGKILL.

    head = LocalRay.start(num_cpus=4, hold_fd=lock_fd)   # `ray start --head` in a process session of its own
    ray.init(address=head.address, ...)
    ...
    head.stop()                                          # or the driver dies: the keeper stops Ray either way

``ray.init()`` alone starts Ray's processes in the driver's session, and when the driver is killed its dashboard and
runtime-env agents linger for about a minute. Here a small keeper process (``python -m sharding.localray``, no ray
import) starts a new session, runs ``ray start --head`` in it (every Ray process it starts stays in that session),
reports the address and then blocks reading its stdin, whose write end only the driver holds. When the driver
exits or is killed, the kernel closes that pipe: the keeper wakes, sends SIGTERM to every other process of its
session, then SIGKILL to what is left after a grace period, and exits.

Ports: Ray binds its GCS, raylet, object manager and worker gRPC servers on all interfaces, and resolves
127.0.0.1 as a node address to the machine's routable IP (see docs/ports_sharding.md). What the keeper controls:
no dashboard, no usage stats, and every port Ray would otherwise take at a fixed default (dashboard agent 52365,
client server 10001, metrics 44217/44227) is a free port of its own, so two runs on one machine never collide.
The keeper can also hold a file descriptor of the driver's (the output directory's lock) until Ray is gone, so a
rerun cannot start while the killed run's workers still write.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

GRACE_S = 5.0  # SIGTERM, then this long before SIGKILL


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _session_pids(session: int, me: int) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        try:
            if os.getsid(int(entry)) != session:
                continue
            with open(f"/proc/{entry}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if state not in ("Z", "X"):
            pids.append(int(entry))
    return pids


def _kill_session() -> None:
    """SIGTERM every other process of this session, then SIGKILL the rest until none is left."""
    me, session = os.getpid(), os.getsid(0)
    deadline = time.monotonic() + GRACE_S
    sig = signal.SIGTERM
    while pids := _session_pids(session, me):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        if time.monotonic() > deadline:
            sig = signal.SIGKILL
        time.sleep(0.1)
        try:  # reap our own children (`ray start` and what it left as our children)
            while os.waitpid(-1, os.WNOHANG)[0]:
                pass
        except ChildProcessError:
            pass


def _keeper(argv: list[str]) -> int:
    """The keeper's body: start Ray, say where it is, wait for the driver to go, stop Ray."""
    signal.signal(signal.SIGTERM, lambda *_: (_kill_session(), os._exit(0)))
    port = _free_port()
    ray_bin = str(Path(sys.executable).with_name("ray"))
    ports = {flag: _free_port() for flag in ("dashboard-agent-listen-port", "dashboard-agent-grpc-port",
                                            "metrics-export-port", "runtime-env-agent-port",
                                            "ray-client-server-port")}
    cmd = [ray_bin, "start", "--head", "--port", str(port), "--node-ip-address", "127.0.0.1",
           "--include-dashboard", "false", "--dashboard-host", "127.0.0.1", "--disable-usage-stats",
           *[f"--{k}={v}" for k, v in ports.items()], *argv]
    # RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0: Ray's single-machine mode, where it keeps the 127.0.0.1 node address
    # instead of swapping in the machine's routable one, so its servers listen on loopback only
    env = dict(os.environ, DASHBOARD_METRIC_PORT=str(_free_port()), AUTOSCALER_METRIC_PORT=str(_free_port()),
               RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")
    started = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True, env=env)
    if started.returncode != 0:
        tail = " | ".join(line.strip() for line in started.stdout.strip().splitlines()[-3:])
        print(f"failed ray start exited with {started.returncode}: {tail}", flush=True)
        _kill_session()
        return 1
    try:
        print(f"ready 127.0.0.1:{port}", flush=True)  # BrokenPipeError when the driver died while Ray started
        sys.stdin.buffer.read()  # returns at EOF: the driver closed its end, exited or was killed
    except OSError:
        pass
    finally:
        _kill_session()
        _forget_address(f"127.0.0.1:{port}")
    return 0


def _address_file() -> Path:
    """Where ``ray start`` records the newest local cluster (what a bare ``ray.init()`` joins)."""
    tmp = os.environ.get("RAY_TMPDIR") or (os.environ.get("TMPDIR") if sys.platform.startswith("linux") else None)
    return Path(tmp or "/tmp") / "ray" / "ray_current_cluster"


def _forget_address(address: str) -> None:
    """``ray stop`` removes the address file; killing the session does not. Left behind, it points a later bare
    ``ray.init()`` (the user's, or another tool's) at this dead cluster. Removed only while it still names ours."""
    path = _address_file()
    try:
        if path.read_text().strip() == address:
            path.unlink()
    except OSError:
        pass


class LocalRay:
    """A started keeper: ``address`` of its Ray head; ``stop()`` ends it (the driver's death does the same)."""

    def __init__(self, proc: subprocess.Popen, address: str):
        self.proc = proc
        self.address = address

    @property
    def session(self) -> int:
        return self.proc.pid

    @classmethod
    def start(cls, num_cpus: int | None = None, hold_fd: int | None = None, auth_mode: str = "token",
              timeout: float = 300.0) -> "LocalRay":
        """``auth_mode``: the ``RAY_AUTH_MODE`` the driver's Ray was imported with (both ends must agree); with
        ``token``, the token is the driver's ``RAY_AUTH_TOKEN`` (the keeper and Ray inherit the environment)."""
        args = ["--num-cpus", str(num_cpus)] if num_cpus else []
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"RAY_AUTH_MODE": auth_mode}
        proc = subprocess.Popen([sys.executable, "-m", "sharding.localray", *args], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, text=True, env=env, start_new_session=True,
                                pass_fds=(hold_fd,) if hold_fd is not None else ())
        line = ""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and proc.poll() is None and not line:
            line = proc.stdout.readline().strip()
        if not line.startswith("ready "):
            proc.stdin.close()
            proc.wait(30)
            raise RuntimeError(line.removeprefix("failed ") or f"the Ray keeper exited with {proc.returncode}")
        return cls(proc, line.split(" ", 1)[1])

    def stop(self, timeout: float = 60.0) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc.stdout.close()


if __name__ == "__main__":
    sys.exit(_keeper(sys.argv[1:]))
