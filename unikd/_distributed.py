"""Process-group setup for torchrun / DDP, and the few collectives the trainer needs.

torchrun sets ``RANK``, ``LOCAL_RANK`` and ``WORLD_SIZE`` (and does the rendezvous, multi-node included); this
module only reads them. NCCL is used on GPU, gloo on CPU. Without those variables everything is a no-op and the
process is rank 0 of 1. Only rank 0 writes files (``DistInfo.is_main``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from unikd._errors import UnikdError


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the job."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1


def resolve_device(device: str, local_rank: int = 0) -> torch.device:
    """``train.device`` ("auto" | "cpu" | "cuda") to a ``torch.device``; under torchrun, GPU ``local_rank``."""
    if device not in ("auto", "cpu", "cuda"):
        raise UnikdError(f"train.device: {device!r} is not one of auto, cpu, cuda")
    if device == "cuda" and not torch.cuda.is_available():
        raise UnikdError("train.device: 'cuda' was requested but CUDA is not available; use train.device=auto or cpu")
    if device == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", local_rank)


def init_distributed(device: str) -> tuple[DistInfo, torch.device, bool]:
    """Join the torchrun job if there is one.

    Returns ``(info, device, initialized_here)``; when ``initialized_here`` the caller destroys the process group
    at the end (a group that already existed, e.g. created by a test harness, is left alone).
    """
    if dist.is_available() and dist.is_initialized():
        info = DistInfo(dist.get_rank(), int(os.environ.get("LOCAL_RANK", 0)), dist.get_world_size())
        return info, resolve_device(device, info.local_rank), False
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    info = DistInfo(int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0)), world_size)
    torch_device = resolve_device(device, info.local_rank)
    if world_size == 1:
        return info, torch_device, False
    if torch_device.type == "cuda":
        torch.cuda.set_device(torch_device)
        dist.init_process_group("nccl", device_id=torch_device)
    else:
        dist.init_process_group("gloo")
    return info, torch_device, True


def all_reduce(tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """Reduce ``tensor`` in place across ranks (``op`` "sum" or "max") and return it; identity in one process."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return tensor
