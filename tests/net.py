"""Loopback ports, process sessions and the environment of the ranks the tests start."""

import os
import signal
import socket
import sys
import time
from pathlib import Path


RANK_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_SIZE", "MASTER_ADDR", "MASTER_PORT", "NUM_GPUS", "HOSTFILE")


def rank_env(**extra: str | None) -> dict[str, str]:
    """The environment for a `ptrain` / launcher subprocess: CPU accelerator, one thread per rank whatever the
    machine's core count (so runs compared with each other compute alike), warnings off, this venv's scripts on
    PATH, and none of the pytest process's own rank variables. ``extra`` overrides; a None value removes the key."""
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore",
               PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    for k in RANK_VARS:
        env.pop(k, None)
    for k, v in extra.items():
        if v is None:
            env.pop(k, None)
        else:
            env[k] = v
    return env


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (the OS picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def session_pids(session: int) -> list[int]:
    """The live (not zombie) processes of process session ``session``."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if os.getsid(int(entry.name)) != session:
                continue
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, ProcessLookupError, IndexError):
            continue
        if state not in ("Z", "X"):
            pids.append(int(entry.name))
    return pids


def kill_session(session: int, timeout: float = 30.0) -> None:
    """SIGKILL every process of ``session`` (started with ``start_new_session=True``; a process group would
    miss children that set their own, as Ray's workers do) until none is left."""
    deadline = time.monotonic() + timeout
    while pids := session_pids(session):
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        assert time.monotonic() < deadline, f"processes of session {session} outlived SIGKILL: {pids}"
        time.sleep(0.05)


def listeners(session: int) -> list[tuple[str, str, int]]:
    """(process command, address, port) of every listening TCP socket of the processes of ``session``."""
    import psutil

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


def is_loopback(ip: str) -> bool:
    return ip.startswith("127.") or ip in ("::1", "::ffff:127.0.0.1") or ip.startswith("::ffff:127.")
