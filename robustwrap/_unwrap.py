"""Reading through the wrappers users put around a model: DistributedDataParallel, DataParallel, `torch.compile`.

Each wrapper holds the model it wraps (`.module`; a compiled module's `_orig_mod`) and they nest
(`torch.compile(DistributedDataParallel(model))`). A wrapper is not the model: it lacks the
model's attributes (`num_classes`, `pretrained_cfg`, a ViT's `patch_embed`), its class is not
the model's (`isinstance(m, VisionTransformer)`), its state dict keys carry a prefix, and a
compiled module forwards attribute reads but not `len()`, which timm's data config calls. So
everything read from a base model is read from `unwrap(model)`.

Running is another matter: a compiled model runs compiled and a DataParallel one on its devices,
so forward passes go through the wrapper. Only a DistributedDataParallel is left out when one
process runs the model alone (a mask search on its own images, inference on its own shard): its
forward joins the other processes (it broadcasts BatchNorm buffers and arms the gradient
reduction), so `local_module(model)` is what such code calls.
"""

from __future__ import annotations

import sys

from torch import nn
from torch.nn.parallel import DataParallel, DistributedDataParallel


def _wrapped(module: nn.Module) -> nn.Module | None:
    """The module `module` wraps, or `None` when it is not a wrapper."""
    if isinstance(module, (DistributedDataParallel, DataParallel)):
        return module.module
    # A compiled module's class is defined by torch._dynamo, which `torch.compile` imports: when it
    # is not loaded nothing can be compiled, and importing it only to ask would cost seconds.
    eval_frame = sys.modules.get("torch._dynamo.eval_frame")
    if eval_frame is not None and isinstance(module, eval_frame.OptimizedModule):
        return module._orig_mod
    return None


def _chain(model: nn.Module) -> list[nn.Module]:
    """`model`, then each module it wraps in turn: the model itself is the last."""
    chain = [model]
    inner = _wrapped(model)
    while inner is not None:
        chain.append(inner)
        inner = _wrapped(inner)
    return chain


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside every DistributedDataParallel, DataParallel and compiled wrapper around `model`.

    What every attribute of a base model is read from (classes, channels, timm's data config,
    PatchGuard's geometry, a ViT's token grid, the weights that are saved).
    """
    return _chain(model)[-1]


def joins_processes(model: nn.Module) -> bool:
    """Whether calling `model` talks to other processes: a DistributedDataParallel is among its wrappers."""
    return any(isinstance(layer, DistributedDataParallel) for layer in _chain(model))


def local_module(model: nn.Module) -> nn.Module:
    """What one process runs `model` through on its own: `model`, or the module inside its innermost DistributedDataParallel.

    A compiled or DataParallel model is kept, so it runs compiled or on its devices, unless it
    wraps a DistributedDataParallel: `torch.compile(DistributedDataParallel(model))` runs the
    bare `model`, the only module of that chain that does not join the other processes.
    """
    chain = _chain(model)
    last = max((i for i, layer in enumerate(chain) if isinstance(layer, DistributedDataParallel)), default=None)
    return model if last is None else chain[last + 1]
