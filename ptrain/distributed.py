"""Rank/world helpers and feature gathers (the only collectives the model library uses).

    from ptrain import distributed as dist_utils
    rank, world = dist_utils.rank(), dist_utils.world_size()     # process group, else env, else 0/1
    all_feats_ND = dist_utils.all_gather_with_grad(local_feats_BD) # gradient flows back to every rank

The rank and world size come from ``torch.distributed`` when a process group is initialised, else
from the launcher's environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``), else 0 / 1. Gathers
require the same local batch size on every rank (the loaders guarantee it).
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name, "")
    try:
        return int(raw) if raw != "" else default
    except ValueError:
        raise ValueError(f"environment variable {name}={raw!r} is not an integer; unset it or fix the launcher.") from None


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


def barrier() -> None:
    if is_initialized():
        dist.barrier()


class _AllGatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums every rank's gradient for this rank's slice.

    Every rank computes a loss from the gathered tensor; the gradient w.r.t. rank r's rows is the
    sum over ranks of d(loss_k)/d(rows_r). With the usual gradient *averaging* across ranks, the
    parameter gradient then equals that of the mean per-rank loss on one big batch (tested)."""

    @staticmethod
    def forward(ctx, x_BD):
        world = dist.get_world_size()
        parts = [torch.empty_like(x_BD) for _ in range(world)]
        dist.all_gather(parts, x_BD.contiguous())
        ctx.rank, ctx.batch = dist.get_rank(), x_BD.shape[0]
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad_ND):
        grad_ND = grad_ND.contiguous()
        dist.all_reduce(grad_ND, op=dist.ReduceOp.SUM)
        return grad_ND[ctx.rank * ctx.batch : (ctx.rank + 1) * ctx.batch]


def all_gather_with_grad(x_BD: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x_BD`` from every rank (rank order) with gradient; identity without a group."""
    if not is_initialized() or dist.get_world_size() == 1:
        return x_BD
    return _AllGatherWithGrad.apply(x_BD)


def all_gather_no_grad(x_BD: torch.Tensor) -> torch.Tensor:
    """Concatenate from every rank; only this rank's own rows keep their gradient (open_clip's
    ``gather_with_grad=False``: cheaper backward, gradients of the other ranks' rows are dropped)."""
    if not is_initialized() or dist.get_world_size() == 1:
        return x_BD
    parts = [torch.empty_like(x_BD) for _ in range(dist.get_world_size())]
    with torch.no_grad():
        dist.all_gather(parts, x_BD.contiguous())
    parts[dist.get_rank()] = x_BD
    return torch.cat(parts, dim=0)


def all_gather_tensor(x: torch.Tensor) -> torch.Tensor:
    """Concatenate a non-differentiable tensor (ids, masks) from every rank."""
    if not is_initialized() or dist.get_world_size() == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=0)
