"""Runs batches of masked views of many images through a model (the "view runner").

The runner turns `(image, i, j)` view specs into logits: it builds the views on the model's
device by broadcasting (`where(keep_i & keep_j, x[image], fill)`), runs them in forward passes
of `batch_size` views that mix images and masks, and skips views whose answer can no longer
matter. It is stateless: a `ViewRunner` is built for one call from the defended model's current
settings (model, keep masks, fill, batch size), so a setting changed on the defended model is
used by the next call. It never decides anything: which views to evaluate, and what their
labels mean, come from the caller (a defense's rule and scheduling in `robustwrap.defenses`).
"""

from __future__ import annotations

import collections
import contextlib
import contextvars
import copy
import enum
import functools
import math
import types
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.modules import module as module_hooks

from .geometry import MaskSet

__all__ = [
    "ViewRunner",
    "PairOutcome",
    "model_device_dtype",
    "forward_views",
    "mask_images",
    "fill_like",
    "eval_mode",
    "triangle_pairs",
    "row_pairs",
    "auto_batch_size",
    "auto_channels_last",
    "auto_sync_every",
    "top2_gap",
    "InferenceCopy",
    "build_inference_copy",
    "observe_forward",
    "call_model",
]

# Views per forward pass when the user does not say (`batch_size=None`): a pixel budget per pass,
# rounded down to a power of two and clamped to [8, 256]. Measured on the project's 2-core CPU
# (benchmarks/speed.md): certifying with timm's test_resnet at 32x32 through its inference copy
# runs 1.1-1.4x more views per second at 256 views per pass than at 64, and resnet18 at 224x224
# runs 1.2-1.3x faster at 8 views per pass than at 64 (issue 14), so the CPU budget is 2**18
# pixels (256 views of 32x32, 64 of 64x64, 8 of 181x181). GPU speed is unmeasured (no GPU was
# available): the CUDA budget is a conservative 2**22 pixels (64 views of 224x224), large passes
# being what keeps a GPU busy.
CPU_PIXELS_PER_PASS = 1 << 18
CUDA_PIXELS_PER_PASS = 1 << 22
MIN_AUTO_BATCH, MAX_AUTO_BATCH = 8, 256
# Forward passes between two device-to-host synchronisations of the scheduler on an accelerator
# (on the CPU there is nothing to wait for, so it decides after every pass and skips the most).
ACCELERATOR_SYNC_EVERY = 4


def model_device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    """The device and floating dtype of a model's first floating parameter or buffer (CPU/float32 if none)."""
    for tensor in (*model.parameters(), *model.buffers()):
        if tensor.is_floating_point():
            return tensor.device, tensor.dtype
    return torch.device("cpu"), torch.float32


def auto_batch_size(model: nn.Module, image_size: Sequence[int], device: torch.device | None = None) -> int:
    """Views per forward pass when the user gives none: a pixel budget per pass for the device.

    A power of two in `[8, 256]`: `2**18` pixels per pass on the CPU (256 views at 32x32, 64 at
    64x64, 8 at 224x224) and `2**22` on an accelerator (256 at 32x32, 64 at 224x224; unmeasured
    there, see benchmarks/speed.md). Results never depend on it.

    Args:
        model: the base classifier (its device is used when `device` is None).
        image_size: `(H, W)` of the views.
        device: the device the views run on.
    """
    device = model_device_dtype(model)[0] if device is None else torch.device(device)
    h, w = image_size
    cpu = device.type == "cpu"
    budget = CPU_PIXELS_PER_PASS if cpu else CUDA_PIXELS_PER_PASS
    views = max(1, budget // max(1, h * w))
    views = 1 << (views.bit_length() - 1)  # round down to a power of two
    return max(MIN_AUTO_BATCH, min(MAX_AUTO_BATCH, views))


def auto_channels_last(model: nn.Module, device: torch.device | None = None) -> bool:
    """Whether views run in `channels_last` memory format: convolutional networks on the CPU.

    Measured on the project's 2-core CPU (benchmarks/speed.md): resnet18 at 224 runs about 1.2x
    more views per second with `channels_last` views, timm's test_resnet at 32x32 is no slower
    (2.35x faster on a quiet machine, issue 14), and a ViT has a single patch-embedding
    convolution. So: `channels_last` when the model has at least two `Conv2d` layers and runs
    on the CPU. On CUDA the default stays contiguous (GPU
    speed is unmeasured here). Only the views (and the inference copy, `build_inference_copy`)
    change layout, never the user's model; the layout can move logits in their last bits, which
    is what the certificate margin is for, and `predict` and `certify` always use the same layout.

    Args:
        model: the base classifier.
        device: the device the views run on (default: the model's).
    """
    device = model_device_dtype(model)[0] if device is None else torch.device(device)
    if device.type != "cpu":
        return False
    convs = 0
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            convs += 1
            if convs >= 2:
                return True
    return False


# ------------------------------------------------------------------------- the inference copy
def _worth_copying(model: nn.Module) -> bool:
    return sum(isinstance(m, nn.Conv2d) for m in model.modules()) >= 2


def build_inference_copy(model: nn.Module) -> nn.Module | None:
    """A copy of `model` (in eval mode) that computes the same function faster on the CPU, or `None`.

    For a convolutional network (at least two `Conv2d`): each `BatchNorm2d` that only follows a
    `Conv2d` is folded into it (`torch.fx.experimental.optimization.fuse`, exact types only, so
    timm's `BatchNormAct2d` and other subclasses are left alone) and the weights are stored in
    `channels_last`, the layout the views run in. A model `torch.fx` cannot trace is copied and
    converted without folding. `None` for anything else (a ViT, a single-convolution model):
    the model itself is as fast. The user's model is never changed.

    Measured on the project's 2-core CPU, one thread (benchmarks/speed.md): timm's test_resnet at
    32x32 runs about 2x more views per second than the model itself with channels_last views.
    """
    if not _worth_copying(model):
        return None
    fast = None
    if any(type(m) is nn.BatchNorm2d for m in model.modules()):
        from torch.fx.experimental.optimization import fuse

        try:
            fast = fuse(model, inplace=False)
        except Exception:  # noqa: BLE001 (untraceable control flow, unsupported ops: fall back to the plain copy)
            fast = None
    if fast is None:
        try:
            fast = copy.deepcopy(model)
        except Exception:  # noqa: BLE001
            return None
    fast.eval().requires_grad_(False)
    return fast.to(memory_format=torch.channels_last)


# What a module's forward may read for the copy to stand in for it (docs/concepts.md#inference-copy):
# its class's code, which must be one of these libraries' (their forwards read only the module's
# own state below; their global switches, such as timm's fused attention, choose between
# implementations of one function), and its state. Any other class (a user's `nn.Module`, an
# `fx.GraphModule`, a scripted or compiled module) may read anything: the model then runs itself.
TRUSTED_CLASS_PREFIXES = ("torch.nn.modules.", "torch.nn.utils.parametrize", "torchvision.", "timm.")
TRUSTED_MODULE = "robustwrap.models"
# Where a function, class or `functools.partial` held as a plain attribute may come from: code
# whose result depends on its arguments only.
TRUSTED_CODE_ROOTS = frozenset({"torch", "torchvision", "timm", "builtins", "math", "operator", "_operator"})
# Module attributes that are tables rather than values: parameters, buffers and children are
# described one by one, forward hooks must be empty, the other hooks do not run in a no-grad forward.
_TABLES = frozenset(nn.Module().__dict__) - {"training"}
_MAX_DEPTH = 16


class _Outside(Exception):
    """The model reads state outside the definition: it must run itself."""


def _trusted_class(cls: type) -> bool:
    return all(c is object or c.__module__.startswith(TRUSTED_CLASS_PREFIXES) or c.__module__ == TRUSTED_MODULE for c in cls.__mro__)


def _trusted_code(obj) -> bool:
    module = getattr(obj, "__module__", None)
    if not isinstance(module, str) or (module.split(".")[0] not in TRUSTED_CODE_ROOTS and module != TRUSTED_MODULE):
        return False
    return isinstance(obj, (type, types.BuiltinFunctionType, types.BuiltinMethodType)) or (
        isinstance(obj, types.FunctionType) and obj.__closure__ is None
    )


_SCALARS = (type(None), bool, int, str, bytes, torch.dtype, torch.device, torch.layout, torch.memory_format)
_CONTAINERS = (tuple, list, torch.Size)


def _freeze(value, path: str, tensors: list[tuple[str, torch.Tensor]], depth: int = 0):
    """`value` as a comparable description (tensors are moved to `tensors`), or `_Outside`."""
    kind = type(value)
    if kind in _SCALARS or isinstance(value, enum.Enum):
        return kind, value
    if kind is float:  # hex: -0.0 and 0.0 differ, a NaN equals itself
        return kind, value.hex()
    if kind is complex:
        return kind, value.real.hex(), value.imag.hex()
    if kind in (torch.Tensor, nn.Parameter):
        tensors.append((path, value))
        return torch.Tensor, len(tensors) - 1
    if depth >= _MAX_DEPTH:
        raise _Outside(path)
    if kind in _CONTAINERS:
        return kind, tuple(_freeze(v, f"{path}[{i}]", tensors, depth + 1) for i, v in enumerate(value))
    if kind in (dict, collections.OrderedDict):
        return kind, tuple(
            (_freeze(k, path, tensors, depth + 1), _freeze(v, f"{path}[{k!r}]", tensors, depth + 1)) for k, v in value.items()
        )
    if kind in (set, frozenset):
        return kind, frozenset(_freeze(v, path, tensors, depth + 1) for v in value)
    if kind is functools.partial:
        return (
            kind,
            _freeze(value.func, path, tensors, depth + 1),
            _freeze(value.args, path, tensors, depth + 1),
            _freeze(value.keywords, path, tensors, depth + 1),
        )
    if _trusted_code(value):
        return "code", value
    raise _Outside(path)


def _describe(model: nn.Module) -> tuple[tuple, list[tuple[str, torch.Tensor]]]:
    """Everything the model's forward may read, as `(description, tensors)`; `_Outside` if it may read more.

    Per module of the tree (in order, shared modules at each of their names): its name, class
    (every class of its MRO from a trusted library), mode, parameter, buffer and child names, and
    every other `__dict__` entry (its plain attributes, instance-level `forward` included) by
    value; the values of parameters, buffers and tensor attributes go to `tensors`. A module in
    train mode or with forward hooks (they must see every view), or a global forward hook, is
    outside too.
    """
    if any(getattr(module_hooks, name) for name in ("_global_forward_hooks", "_global_forward_pre_hooks")):
        raise _Outside("global forward hooks")
    tensors: list[tuple[str, torch.Tensor]] = []
    described = []
    for name, m in model.named_modules(remove_duplicate=False):
        if not _trusted_class(type(m)) or m.training or m._forward_hooks or m._forward_pre_hooks:
            raise _Outside(name)
        attributes = tuple((key, _freeze(value, f"{name}.{key}", tensors)) for key, value in m.__dict__.items() if key not in _TABLES)
        parameters = tuple((key, None if p is None else _freeze(p, f"{name}.{key}", tensors)) for key, p in m._parameters.items())
        buffers = tuple((key, None if b is None else _freeze(b, f"{name}.{key}", tensors)) for key, b in m._buffers.items())
        children = tuple((key, child is None) for key, child in m._modules.items())
        described.append((name, type(m), attributes, parameters, buffers, children))
    return tuple(described), tensors


def _same_values(snapshot: list[tuple[str, torch.Tensor]], tensors: list[tuple[str, torch.Tensor]]) -> bool:
    if len(snapshot) != len(tensors):
        return False
    for (name_a, a), (name_b, b) in zip(snapshot, tensors):
        if name_a != name_b or a.dtype != b.dtype or a.device != b.device or a.shape != b.shape or not torch.equal(a, b):
            return False
    return True


def _agrees(model: nn.Module, fast: nn.Module, example: torch.Tensor) -> bool:
    """The copy gives the model's output on `example` (float32, up to rounding)."""
    with torch.autocast(example.device.type, enabled=False):
        try:
            want, got = model(example), fast(example)
        except Exception:  # noqa: BLE001
            return False
    if not isinstance(want, torch.Tensor) or not isinstance(got, torch.Tensor) or want.shape != got.shape:
        return False
    want, got = want.double(), got.double()
    return bool(((want - got).abs().max() <= 1e-3 * (1 + want.abs().max())).item()) if want.numel() else True


@dataclass
class _CopyState:
    model: weakref.ref
    description: tuple
    snapshot: list[tuple[str, torch.Tensor]] | None
    module: nn.Module | None


class InferenceCopy:
    """The module the views run through: a faster copy of the base model, used only while provably the same.

    `module(model, example)` returns `build_inference_copy(model)` when inference runs on the CPU
    without gradients and everything the model's forward may read is known (docs/concepts.md,
    *The inference copy*): every module's class is from torch.nn, torchvision, timm or
    robustwrap.models, every module is in eval mode without forward hooks, and every plain
    attribute is a value (number, string, tensor, container of those, library function). Else
    it returns `model`. All of that state (parameters, buffers and tensor attributes by value,
    `torch.equal`, so a change through `.data` counts) is snapshotted when the copy is built and
    compared at every call: any difference builds a new copy. A copy whose output on `example`
    differs from the model's is discarded. It is a cache, not state: it is not saved, copied or
    pickled.
    """

    def __init__(self) -> None:
        self._state: _CopyState | None = None

    def __getstate__(self) -> dict:
        return {"_state": None}

    def __deepcopy__(self, memo: dict) -> InferenceCopy:
        return InferenceCopy()

    def module(self, model: nn.Module, example: torch.Tensor) -> nn.Module:
        """The module to run `model`'s views through now.

        Args:
            model: the base classifier, in eval mode.
            example: the call's inputs `(B, C, H, W)`; a new copy is checked on the first one.
        """
        if torch.is_grad_enabled() or example.device.type != "cpu" or not example.numel():
            return model
        try:
            description, tensors = _describe(model)
        except _Outside:
            return model
        state = self._state
        if state is not None and state.model() is model and state.description == description:
            if state.module is None:  # no copy for this model: nothing to prove, it runs itself
                return model
            if _same_values(state.snapshot, tensors):
                return state.module
        # The values the copy is built from, taken before anything runs the model.
        snapshot = [(name, t.detach().clone()) for name, t in tensors] if _worth_copying(model) else None
        fast = build_inference_copy(model)
        if fast is not None and not _agrees(model, fast, example[:1]):
            fast = None
        self._state = _CopyState(weakref.ref(model), description, snapshot, fast)
        return model if fast is None else fast


# ------------------------------------------------------------------------- forward observers
_OBSERVERS: contextvars.ContextVar[tuple[Callable[[int], None], ...]] = contextvars.ContextVar("robustwrap_forward_observers", default=())


@contextlib.contextmanager
def observe_forward(callback: Callable[[int], None]) -> Iterator[None]:
    """Call `callback(n)` after every forward pass of a base model on `n` images or views, in this context.

    How progress bars follow certification: it sees the passes of the base model and of its
    inference copy alike (a forward hook on the model would make it run itself).
    """
    token = _OBSERVERS.set((*_OBSERVERS.get(), callback))
    try:
        yield
    finally:
        _OBSERVERS.reset(token)


def call_model(model: nn.Module, x: torch.Tensor, *inputs: torch.Tensor):
    """`model(x, *inputs)`, then every observer of `observe_forward` is told about the `len(x)` inputs."""
    out = model(x, *inputs)
    for callback in _OBSERVERS.get():
        callback(int(x.shape[0]))
    return out


def auto_sync_every(device: torch.device) -> int:
    """Forward passes between the scheduler's host synchronisations: 1 on the CPU, 4 on an accelerator."""
    return 1 if torch.device(device).type == "cpu" else ACCELERATOR_SYNC_EVERY


def top2_gap(logits: torch.Tensor) -> torch.Tensor:
    """`(N,)` float32 (or wider): the top logit minus the runner-up (`inf` for a single class).

    For a view whose label is `y` this is `logit_y - max_other`, the quantity the margin guard
    compares with `margin` (docs/concepts.md#margin).
    """
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    if logits.shape[1] < 2:
        return torch.full(logits.shape[:1], math.inf, dtype=logits.dtype, device=logits.device)
    top2 = logits.topk(2, dim=1).values
    return top2[:, 0] - top2[:, 1]


def mask_images(x: torch.Tensor, keep: torch.Tensor, fill: torch.Tensor) -> torch.Tensor:
    """Set masked pixels to `fill`: the one masking path used by inference, certification and training.

    Args:
        x: `(N, C, H, W)` images.
        keep: `(N, H, W)` or `(H, W)` bool, True where a pixel is kept.
        fill: scalar or `(C, 1, 1)` fill value, in the model's input space.
    """
    return torch.where(keep.unsqueeze(-3), x, fill)


def fill_like(fill: float | tuple[float, ...], x: torch.Tensor) -> torch.Tensor:
    """`fill` as a scalar or `(C, 1, 1)` tensor on `x`'s device in its dtype, for `mask_images`.

    Raises:
        ValueError: for a per-channel fill whose length is not `x`'s channel count, which would
            otherwise fail inside `torch.where` with a broadcasting error.
    """
    if isinstance(fill, tuple):
        if len(fill) != x.shape[1]:
            raise ValueError(f"fill has {len(fill)} values (one per channel) but the images have {x.shape[1]} channels")
        return torch.tensor(fill, dtype=x.dtype, device=x.device).reshape(-1, 1, 1)
    return torch.tensor(fill, dtype=x.dtype, device=x.device)


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Put `model` in eval mode, then give every submodule back its own mode.

    Restoring per module (not `model.train(was_training)`) keeps submodules a user froze in
    eval mode, such as BatchNorm layers during fine-tuning, frozen.
    """
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


def forward_views(model: nn.Module, views: torch.Tensor, num_classes: int | None = None) -> torch.Tensor:
    """`model(views)`, checked to be `(N, num_classes)` logits.

    Args:
        model: the base classifier.
        views: `(N, C, H, W)` views, on the model's device.
        num_classes: the class count the logits must have, or `None` to accept any.

    Raises:
        ValueError: if the model does not return `(N, C)` logits (or not `num_classes` of them),
            which would otherwise surface as a confusing indexing error in a defense's rule.
    """
    logits = call_model(model, views)
    if not isinstance(logits, torch.Tensor) or logits.ndim != 2 or logits.shape[0] != views.shape[0]:
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ValueError(
            f"the base model must map (N, C, H, W) images to (N, num_classes) logits; for {views.shape[0]} images it returned {shape}"
        )
    if num_classes is not None and logits.shape[1] != num_classes:
        raise ValueError(f"the base model returned {logits.shape[1]} classes, expected num_classes={num_classes}")
    return logits


@dataclass
class PairOutcome:
    """What `ViewRunner.evaluate_pairs` found.

    Attributes:
        labels: `(N,)` label of each view, `-1` for a view that was skipped.
        failed: `(G,)` some evaluated view of the group disagreed with its expected label (or,
            for a guarded group, showed it by no more than the margin).
        done: `(G,)` every view of the group was evaluated and agreed.
        logit_sum: `(G, C)` float32 sum of the logits of the group's evaluated views, if asked.
        num_views: views actually run through the model.
        sure: `(N,)` bool, the view's top logit beats the runner-up by more than the margin
            (True for skipped views); `None` when the margin is 0.
    """

    labels: torch.Tensor
    failed: torch.Tensor
    done: torch.Tensor
    logit_sum: torch.Tensor | None
    num_views: int
    sure: torch.Tensor | None = None


@dataclass(frozen=True)
class ViewRunner:
    """Runs masked views of a batch through `model`; built per call, it keeps nothing between calls.

    `run` says what a view is: here, pixels of the images outside masks `i` and `j` through the
    base model. The scheduling (`one_mask`, `evaluate_pairs`) only calls `run`, so a subclass
    that overrides it evaluates other views on the same schedule (PatchCURE's views are cells of
    a feature grid).

    Attributes:
        model: the base classifier, `(N, C, H, W) -> (N, num_classes)`.
        keep: `(K, H, W)` bool keep masks (True where a pixel is kept), or a `MaskSet` to build
            them from; view `(i, j)` hides masks `i` and `j` (`i == j`: one mask). They are
            moved to the images' device when they are elsewhere.
        fill: masked pixel value in the model's input space: a scalar or one value per channel.
        batch_size: views per forward pass; `None` picks `auto_batch_size` for the model,
            image size and device.
        num_classes: the class count the logits must have, or `None` to accept any.
        channels_last: run the views in `channels_last` memory format; `None` picks
            `auto_channels_last` (convolutional networks on the CPU). Speed only, but it can
            move logits in their last bits: every call of a defended model resolves it the
            same way, so `predict` and `certify` run the same computation.
        sync_every: forward passes between two host synchronisations of the scheduler; `None`
            picks `auto_sync_every` (1 on the CPU, 4 on an accelerator). Results never depend
            on it; with more than 1 a few views of already-decided groups may run.
    """

    model: nn.Module
    keep: torch.Tensor
    fill: float | Sequence[float]
    batch_size: int | None = None
    num_classes: int | None = field(default=None)
    channels_last: bool | None = None
    sync_every: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.keep, MaskSet):
            object.__setattr__(self, "keep", self.keep.keep_masks())
        if self.batch_size is None:
            object.__setattr__(self, "batch_size", auto_batch_size(self.model, tuple(self.keep.shape[-2:])))
        if self.channels_last is None:
            object.__setattr__(self, "channels_last", auto_channels_last(self.model))
        if self.sync_every is None:
            object.__setattr__(self, "sync_every", auto_sync_every(model_device_dtype(self.model)[0]))

    def __len__(self) -> int:
        """The number of masks `K`."""
        return self.keep.shape[0]

    # -------------------------------------------------------------------------------- plumbing
    def run(self, x: torch.Tensor, image: torch.Tensor, i: torch.Tensor, j: torch.Tensor, fill: torch.Tensor | None = None) -> torch.Tensor:
        """Logits `(n, C)` of the views `(image, i, j)`, in one forward pass (n <= batch_size).

        `fill` is `fill_like(self.fill, x)`, made once per call by the caller (or here).
        """
        keep = self.keep if self.keep.device == x.device else self.keep.to(x.device)
        views = mask_images(x[image], keep[i] & keep[j], fill_like(self.fill, x) if fill is None else fill)
        if self.channels_last:
            views = views.contiguous(memory_format=torch.channels_last)
        return forward_views(self.model, views, self.num_classes)

    # --------------------------------------------------------------------------------- views
    def one_mask(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Every one-mask view of every image.

        Args:
            x: `(B, C, H, W)` images, already on the model's device and dtype.

        Returns:
            `(labels (B, K), logits (B, K, C))`; logits in float32 or wider.
        """
        b, k = x.shape[0], len(self)
        flat = torch.arange(b * k, device=x.device)
        image, mask = flat // k, flat % k
        fill = fill_like(self.fill, x)
        bs = self.batch_size
        chunks = [self.run(x, image[s : s + bs], mask[s : s + bs], mask[s : s + bs], fill) for s in range(0, b * k, bs)]
        logits = torch.cat(chunks)
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32)).reshape(b, k, -1)
        return logits.argmax(-1), logits

    def evaluate_pairs(
        self,
        x: torch.Tensor,
        pairs: torch.Tensor,
        owners: torch.Tensor,
        expect: torch.Tensor,
        *,
        early_exit: bool = True,
        on_step: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
        need_logits: bool = False,
        priority: torch.Tensor | None = None,
        guard: torch.Tensor | None = None,
        margin: float = 0.0,
    ) -> PairOutcome:
        """Evaluate two-mask views, grouped, skipping the views of groups that no longer matter.

        Each view belongs to one or two groups (a pair `(i, j)` sits in row `i` and row `j`); a
        group is a set of views that must all show `expect[g]`. Views are taken round-robin over
        groups, `batch_size` per forward pass, so that a group that fails early stops costing;
        within a group they are taken in ascending `priority` (the views most likely to
        disagree first: fail fast). Bookkeeping stays on the device: the host looks at it once
        every `sync_every` forward passes, to drop the views of finished groups.

        Args:
            x: `(B, C, H, W)` images on the model's device and dtype.
            pairs: `(N, 3)` long `(image, i, j)`.
            owners: `(N, 2)` long group ids of each view, `-1` in the second column if only one.
            expect: `(G,)` long, the label every view of group `g` must show.
            early_exit: skip the views whose groups have all failed or been cancelled.
            on_step: `(done, failed) -> cancel` called after each step of forward passes with
                early exit; groups it returns True for are skipped from then on.
            need_logits: also return the per-group sum of logits.
            priority: `(N,)` order of the views within their (first) group, smallest first;
                `None` keeps the given order. Only `num_views` depends on it.
            guard: `(G,)` bool, the groups the margin guard applies to (certificates): a view
                fails such a group unless it shows `expect[g]` by more than `margin`. `None`: none.
            margin: the certificate margin (`0` is the plain rule: label equality only).

        Returns:
            The `PairOutcome`.
        """
        device = x.device
        n, g = pairs.shape[0], expect.shape[0]
        fill = fill_like(self.fill, x)
        labels = torch.full((n,), -1, dtype=torch.long, device=device)
        fail_count = torch.zeros(g, dtype=torch.long, device=device)
        cancelled = torch.zeros(g, dtype=torch.bool, device=device)
        has_second = owners[:, 1] >= 0
        second = owners[:, 1].clamp(min=0)
        per_group = torch.bincount(owners[:, 0], minlength=g)
        remaining = per_group + torch.bincount(second[has_second], minlength=g)
        guarded = margin > 0 and guard is not None
        sure = torch.ones(n, dtype=torch.bool, device=device) if margin > 0 else None
        logit_sum = None
        num_views = 0

        # Round-robin order: the r-th view of every group before the (r+1)-th view of any; the
        # views of a group ranked by priority.
        order = torch.arange(n, device=device) if priority is None else torch.sort(priority, stable=True).indices
        by_group = order[torch.sort(owners[order, 0], stable=True).indices]
        starts = torch.cumsum(per_group, 0) - per_group
        rank = torch.empty_like(by_group)
        rank[by_group] = torch.arange(n, device=device) - starts[owners[by_group, 0]]
        pending = torch.sort(rank * (g + 1) + owners[:, 0], stable=True).indices

        step = self.batch_size * self.sync_every
        while pending.numel():
            if early_exit:
                live = ~((fail_count > 0) | cancelled)
                pending = pending[live[owners[pending, 0]] | (has_second[pending] & live[second[pending]])]
                if not pending.numel():
                    break
            batch, pending = pending[:step], pending[step:]
            for s in range(0, batch.numel(), self.batch_size):
                take = batch[s : s + self.batch_size]
                logits = self.run(x, pairs[take, 0], pairs[take, 1], pairs[take, 2], fill)
                num_views += take.numel()
                got = logits.argmax(1)
                labels[take] = got
                if sure is not None:
                    view_sure = top2_gap(logits) > margin
                    sure[take] = view_sure
                if logit_sum is None and need_logits:
                    logit_sum = torch.zeros(g, logits.shape[1], dtype=torch.promote_types(logits.dtype, torch.float32), device=device)
                for column in (0, 1):
                    group = owners[take, column]
                    valid = group >= 0
                    group = group.clamp(min=0)
                    bad = got != expect[group]
                    if guarded:
                        bad |= guard[group] & ~view_sure
                    fail_count.index_add_(0, group, (bad & valid).long())
                    remaining.index_add_(0, group, -valid.long())
                    if need_logits:
                        logit_sum.index_add_(0, group, torch.where(valid[:, None], logits.to(logit_sum.dtype), 0.0))
            if early_exit and on_step is not None:
                failed = fail_count > 0
                cancelled |= on_step((remaining == 0) & ~failed, failed)

        if logit_sum is None and need_logits:
            logit_sum = torch.zeros(g, self.num_classes or 0, device=device)
        failed = fail_count > 0
        return PairOutcome(
            labels=labels, failed=failed, done=(remaining == 0) & ~failed, logit_sum=logit_sum, num_views=num_views, sure=sure
        )


def triangle_pairs(images: torch.Tensor, k: int, *, diagonal: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """All views `(i, j)` with `i < j` (or `i <= j`) of each image, each image its own group.

    Returns:
        `(pairs (N, 3), owners (N, 2))` for `ViewRunner.evaluate_pairs`; image `images[g]` is group `g`.
    """
    i, j = torch.triu_indices(k, k, offset=0 if diagonal else 1, device=images.device)
    per = i.numel()
    group = torch.arange(images.numel(), device=images.device).repeat_interleave(per)
    pairs = torch.stack([images[group], i.repeat(images.numel()), j.repeat(images.numel())], 1)
    return pairs, torch.stack([group, torch.full_like(group, -1)], 1)


def row_pairs(row_image: torch.Tensor, row_mask: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The off-diagonal views of two-mask rows, each unordered pair once, owned by its rows.

    Row `g` is `(row_image[g], row_mask[g])` and needs the views `(r, j)` for every `j != r`.
    When rows `i` and `j` of one image are both asked for, view `(i, j)` is evaluated once and
    belongs to both (`(i, j)` and `(j, i)` are the same view).

    Returns:
        `(pairs (N, 3), owners (N, 2))` for `ViewRunner.evaluate_pairs`; row `g` is group `g`.
    """
    device = row_image.device
    rows = row_image.numel()
    other = torch.arange(k, device=device).repeat(rows)
    group = torch.arange(rows, device=device).repeat_interleave(k)
    keep = other != row_mask[group]
    other, group = other[keep], group[keep]
    lo, hi = torch.minimum(row_mask[group], other), torch.maximum(row_mask[group], other)
    key = (row_image[group] * k + lo) * k + hi
    key, order = torch.sort(key, stable=True)
    group = group[order]
    unique, counts = torch.unique_consecutive(key, return_counts=True)
    first = torch.cumsum(counts, 0) - counts
    owners = torch.stack([group[first], torch.where(counts > 1, group[(first + 1).clamp(max=key.numel() - 1)], -1)], 1)
    pairs = torch.stack([unique // (k * k), (unique // k) % k, unique % k], 1)
    return pairs, owners
