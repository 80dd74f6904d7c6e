"""Small torch.distributed helpers: every function is a no-op on a single process (``init_distributed``
sets the process group up under torchrun).

The trainer keeps the policy a plain ``nn.Module`` (no DDP wrapper): gradients accumulate
locally over steps and micro-batches, and :func:`all_reduce_grads` averages them once per
optimizer step (the explicit equivalent of DDP's ``no_sync`` on the inner steps).
"""
from __future__ import annotations

import os
from typing import Iterable

import torch
import torch.distributed as dist


def is_dist() -> bool:
    """True when a process group is initialized with more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_dist() else 0


def world() -> int:
    return dist.get_world_size() if is_dist() else 1


def all_gather_cat(t: torch.Tensor) -> torch.Tensor:
    """Concatenate ``t`` [n, ...] of every rank along dim 0 in rank order -> [world * n, ...]."""
    if not is_dist():
        return t
    parts = [torch.empty_like(t) for _ in range(world())]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts, 0)


def all_reduce_grads(params: Iterable[torch.nn.Parameter]) -> None:
    """grad <- mean over ranks of grad, in one flat all_reduce (missing grads count as zeros)."""
    if not is_dist():
        return
    params = [p for p in params if p.requires_grad]
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    flat = torch.cat([p.grad.reshape(-1) for p in params])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= world()
    offset = 0
    for p in params:
        n = p.grad.numel()
        p.grad.copy_(flat[offset:offset + n].view_as(p.grad))
        offset += n


def init_distributed(device_name: str) -> tuple[int, int, torch.device]:
    """(rank, world_size, device); under torchrun (WORLD_SIZE > 1) initializes the process group:
    nccl on CUDA (device ``cuda:LOCAL_RANK``), gloo on CPU."""
    from ..utils import resolve_device

    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    device = resolve_device(device_name)
    if world_size <= 1:
        return 0, 1, device
    rank_, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank_, world_size, device


def barrier() -> None:
    """Wait for every rank (no-op without a process group)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def any_rank(flag: bool, device: torch.device) -> bool:
    """True when ``flag`` is True on any rank (one all_reduce; the flag itself on one process)."""
    if not is_dist():
        return flag
    t = torch.tensor([float(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def destroy() -> None:
    """Destroy the process group, if any."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
