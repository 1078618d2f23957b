"""Plumbing for runs under `torch.distributed` (torchrun): which process this is, and talking to the others.

Shared by `certify_dataset` (which shards images by rank) and `fit_masking` (which trains one
model with `DistributedDataParallel`). Without an initialised process group every function is
the single-process case: rank 0 of 1, nothing to wait for or add up.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch


def rank_and_world() -> tuple[int, int]:
    """`(rank, world size)` of this process; `(0, 1)` outside `torch.distributed`."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def barrier(world: int) -> None:
    """Wait until every process gets here (nothing to wait for in a single process)."""
    if world > 1:
        torch.distributed.barrier()


def sum_across(values: torch.Tensor, world: int) -> torch.Tensor:
    """`values` summed over every process, in place (a tensor on the model's device: NCCL needs CUDA)."""
    if world > 1:
        torch.distributed.all_reduce(values)
    return values


def gather_objects(obj: Any, world: int, device: torch.device) -> list[Any]:
    """Every process's `obj`, in rank order, on every process.

    Object collectives run on the current CUDA device with NCCL; `device` is made current for
    the call so that a script that never called `torch.cuda.set_device` still works.
    """
    if world == 1:
        return [obj]
    found: list[Any] = [None] * world
    current = torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
    with current:
        torch.distributed.all_gather_object(found, obj)
    return found
