"""Plumbing for runs under `torch.distributed` (torchrun): which process this is, and talking to the others.

Shared by `certify_dataset` (which shards images by rank) and `fit_masking` (which trains one
model with `DistributedDataParallel`). Without an initialised process group every function is
the single-process case: rank 0 of 1, nothing to wait for or add up.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import nn


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


def average_running_statistics(model: nn.Module, world: int) -> None:
    """Make every process's normalisation running statistics their mean over the processes, in place.

    Under `DistributedDataParallel` each process updates its BatchNorm running statistics on its
    own batches, so after an epoch the copies differ, and a search or validation in eval mode, or a
    checkpoint (written by rank 0), would depend on the process. Averaging them (as timm's
    `distribute_bn` does) gives every process the same model again. Only statistics that training
    updates are averaged: a normalisation layer frozen in eval mode keeps its own.
    """
    if world == 1:
        return
    stats = [
        buffer
        for module in model.modules()
        if isinstance(module, nn.modules.batchnorm._NormBase) and module.training and module.track_running_stats
        for buffer in (module.running_mean, module.running_var)
        if buffer is not None
    ]
    if not stats:
        return
    flat = torch.cat([b.detach().reshape(-1).double() for b in stats])
    torch.distributed.all_reduce(flat)
    flat /= world
    for buffer, mean in zip(stats, flat.split([b.numel() for b in stats])):
        buffer.copy_(mean.view_as(buffer))


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
