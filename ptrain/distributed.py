"""THE distribution seam: process-group set-up, rank / world / device, and every collective ptrain uses.

    from ptrain import distributed as dist_utils
    dist_utils.init(timeout_s=1800)                                  # any launcher, or none (a world of one)
    rank, world, dev = dist_utils.rank(), dist_utils.world_size(), dist_utils.device()
    all_feats_ND = dist_utils.all_gather_with_grad(local_feats_BD)   # gradient flows back to every rank

Launchers only establish the process group; nothing else in ptrain asks which one ran it. ``init`` reads the
standard environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``), which the
``deepspeed`` launcher (``launch/pretrain.sh``) and ``torchrun`` both set; without any of it, it makes a world of
one with an in-process store (no port at all); a process group that already exists (Ray Train sets one up) is used
as it is.

Network binding: when ``MASTER_ADDR`` is a loopback address, rank 0 binds the rendezvous store to that address
itself (torch's own store listens on every interface), and gloo's and NCCL's sockets go to the loopback interface
(``GLOO_SOCKET_IFNAME`` / ``NCCL_SOCKET_IFNAME`` = ``lo`` unless set); a ``MASTER_PORT`` in use is then one clear
error at once. A non-loopback ``MASTER_ADDR`` (multi-node) and torchrun's agent store keep torch's defaults
(docs/threat_model.md).

The rank and world size come from ``torch.distributed`` once a group exists, else from that environment, else 0 / 1.
The device is CUDA ``LOCAL_RANK`` when CUDA is there (and ``DS_ACCELERATOR`` does not say ``cpu``), else the CPU.
Gathers require the same local batch size on every rank (the loaders guarantee it).
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

# Environment variables a launcher sets in every rank it starts (torchrun adds TORCHELASTIC_*, deepspeed CROSS_*).
LAUNCHER_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name, "")
    try:
        return int(raw) if raw != "" else default
    except ValueError:
        raise ValueError(f"environment variable {name}={raw!r} is not an integer; unset it or fix the launcher.") from None


def launched() -> bool:
    """Whether this process is a rank started by a launcher (deepspeed, torchrun, mpirun with the env set)."""
    return all(name in os.environ for name in LAUNCHER_ENV)


def launcher_name() -> str:
    if "TORCHELASTIC_RUN_ID" in os.environ:
        return "torchrun"
    if "CROSS_RANK" in os.environ:
        return "deepspeed"
    return "launcher" if launched() else "none"


def free_loopback_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def on_cuda() -> bool:
    return torch.cuda.is_available() and os.environ.get("DS_ACCELERATOR", "cuda") != "cpu"


class PortInUse(ValueError):
    """``MASTER_PORT`` is taken on this machine (another run, or another service)."""


def loopback_ip(addr: str) -> str | None:
    """The address to bind for ``addr`` when every address it resolves to is a loopback one, else None."""
    try:
        infos = socket.getaddrinfo(addr, None, type=socket.SOCK_STREAM)
        ips = [ipaddress.ip_address(info[4][0]) for info in infos]
    except (socket.gaierror, ValueError, UnicodeError):
        return None
    return str(ips[0]) if ips and all(ip.is_loopback for ip in ips) else None


def _bound_listener(ip: str, port: int) -> socket.socket:
    """A listening socket on ``ip:port`` only; PortInUse when the port is taken there."""
    sock = socket.socket(socket.AF_INET6 if ":" in ip else socket.AF_INET, socket.SOCK_STREAM)
    # why: as torch's own store does, so a port left in TIME_WAIT by a finished run can be reused at once
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((ip, port))
        sock.listen(4096)
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise PortInUse(
                f"MASTER_PORT={port} is already in use on {ip} (another run or service listens there; "
                f"`ss -ltnp 'sport = :{port}'` shows which); pick a free port with launch/pretrain.sh --master-port P "
                "or MASTER_PORT=P") from None
        raise
    return sock


def check_master_port(addr: str, port: int) -> None:
    """Before any rank starts (launch/launcher.sh): PortInUse when ``port`` is taken on ``addr`` and ``addr`` is an
    address of this machine; nothing when the master is another machine (its port cannot be checked from here)."""
    try:
        ip = str(ipaddress.ip_address(socket.getaddrinfo(addr, None, type=socket.SOCK_STREAM)[0][4][0]))
    except (socket.gaierror, ValueError, UnicodeError, IndexError):
        return
    try:
        sock = _bound_listener(ip, port)  # PortInUse (a ValueError) goes up
    except OSError:  # EADDRNOTAVAIL: not an address of this machine
        return
    sock.close()


def _loopback_store(ip: str, port: int, rank: int, world: int, timeout: timedelta):
    """The rendezvous store of a single-machine world, listening on ``ip`` (a loopback address) only."""
    if rank != 0:
        return dist.TCPStore(ip, port, world, False, timeout)
    sock = _bound_listener(ip, port)
    try:
        store = dist.TCPStore(ip, port, world, True, timeout, multi_tenant=True, master_listen_fd=sock.fileno())
    except BaseException:
        sock.close()
        raise
    sock.detach()  # the store's server owns the descriptor now
    return store


def _loopback_interface() -> str | None:
    """The name of the loopback network interface (Linux: ``lo``), if this machine has one by that name."""
    try:
        return next((name for _, name in socket.if_nameindex() if name == "lo"), None)
    except OSError:
        return None


def init(timeout_s: int = 1800) -> None:
    """Join (or create) the process group of this run. A group that exists (Ray Train's workers get one, with
    ``RANK``/``LOCAL_RANK``/``WORLD_SIZE`` set) is used as it is; only this rank's CUDA device is selected.
    PortInUse: ``MASTER_PORT`` taken."""
    if is_initialized():
        if on_cuda():  # why: Ray shares CUDA_VISIBLE_DEVICES among a node's workers; rank r uses its LOCAL_RANK-th
            torch.cuda.set_device(local_rank())
        return
    backend = "nccl" if on_cuda() else "gloo"
    timeout = timedelta(seconds=timeout_s)
    if not launched():  # plain `ptrain pretrain` without a launcher: a world of one, its store inside this process
        # why: nothing rendezvouses with a world of one, so an inherited MASTER_PORT (maybe taken) is replaced too
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(free_loopback_port()))
        if on_cuda():
            torch.cuda.set_device(local_rank())
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
        return
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        if name not in os.environ:
            raise RuntimeError(f"{name} is not set although RANK/WORLD_SIZE are: the launcher ({launcher_name()}) "
                               "must set the rendezvous address; set MASTER_ADDR and MASTER_PORT")
    if on_cuda():
        torch.cuda.set_device(local_rank())
    rank_, world = _env_int("RANK", 0), _env_int("WORLD_SIZE", 1)
    ip = loopback_ip(os.environ["MASTER_ADDR"])
    # torchrun's agent already serves the store on MASTER_PORT: the ranks only connect to it
    agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true"
    if ip is None or agent_store:
        dist.init_process_group(backend, timeout=timeout, rank=rank_, world_size=world)
        return
    lo = _loopback_interface()
    if lo is not None:  # a loopback rendezvous means one machine: gloo's and NCCL's own sockets stay on it too
        os.environ.setdefault("GLOO_SOCKET_IFNAME", lo)
        os.environ.setdefault("NCCL_SOCKET_IFNAME", lo)
    store = _loopback_store(ip, _env_int("MASTER_PORT", 0), rank_, world, timeout)
    dist.init_process_group(backend, store=store, rank=rank_, world_size=world, timeout=timeout)


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_initialized() else _env_int("RANK", 0)


def world_size() -> int:
    return dist.get_world_size() if is_initialized() else _env_int("WORLD_SIZE", 1)


def local_rank() -> int:
    return _env_int("LOCAL_RANK", 0)


def is_main() -> bool:
    return rank() == 0


def device() -> torch.device:
    return torch.device("cuda", local_rank()) if on_cuda() else torch.device("cpu")


def device_name() -> str:
    if on_cuda():
        return torch.cuda.get_device_name(local_rank())
    return f"cpu ({os.cpu_count()} cores)"


def barrier() -> None:
    if is_initialized():
        dist.barrier()


def _grouped() -> bool:
    return is_initialized() and dist.get_world_size() > 1


def all_gather_with_grad(x_BD: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x_BD`` from every rank (rank order); the backward sums every rank's gradient for this rank's
    rows (``torch.distributed.nn``), so averaging parameter gradients over ranks (DeepSpeed) gives exactly the
    gradient of the mean per-rank loss on one big batch (tested). Identity without a group."""
    if not _grouped():
        return x_BD
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(x_BD.contiguous()), dim=0)


def all_gather_no_grad(x_BD: torch.Tensor) -> torch.Tensor:
    """Concatenate from every rank; only this rank's own rows keep their gradient (open_clip's
    ``gather_with_grad=False``: cheaper backward, gradients of the other ranks' rows are dropped)."""
    if not _grouped():
        return x_BD
    parts = [torch.empty_like(x_BD) for _ in range(dist.get_world_size())]
    with torch.no_grad():
        dist.all_gather(parts, x_BD.contiguous())
    parts[dist.get_rank()] = x_BD
    return torch.cat(parts, dim=0)


def all_gather_tensor(x: torch.Tensor) -> torch.Tensor:
    """Concatenate a non-differentiable tensor (ids, masks, features at eval) from every rank, in rank order."""
    if not _grouped():
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=0)


def all_gather_objects(item: Any) -> list[Any]:
    """``[item of rank 0, item of rank 1, ...]`` (picklable Python objects of our own making only)."""
    if not _grouped():
        return [item]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, item)
    return out


def broadcast_object(item: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``item`` on every rank (a picklable Python object of our own making only)."""
    if not _grouped():
        return item
    box = [item]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum ``x`` over ranks in place (and return it)."""
    if _grouped():
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


def all_reduce_max(x: torch.Tensor) -> torch.Tensor:
    if _grouped():
        dist.all_reduce(x, op=dist.ReduceOp.MAX)
    return x


def destroy(timeout_s: float = 60.0) -> None:
    """Leave the process group together: a barrier first, so no rank tears down its gloo pairs while a
    peer is still using them (gloo then aborts the peer: "terminate called without an active
    exception"). A peer that is gone makes the barrier fail after ``timeout_s``; the group is destroyed
    either way."""
    if not is_initialized():
        return
    try:
        if world_size() > 1:
            if dist.get_backend() == "gloo":
                dist.monitored_barrier(timeout=timedelta(seconds=timeout_s))
            else:
                dist.barrier()
    except RuntimeError:
        pass
    finally:
        dist.destroy_process_group()
