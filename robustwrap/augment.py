"""Masking augmentations for mask-invariance fine-tuning (PatchCleanser and Greedy Cutout recipes).

Two layers, as in torchvision's transforms v2: pure functions that mask a batch given the masks
(`apply_masks` by mask-set index, `apply_boxes` by pixel box), and thin callable classes that
choose the masks. All of them go through `robustwrap.views.mask_images`, the masking path of
inference and certification, so training sees exactly the pixels certification will see.

Every class is called as `aug(x, y)` and returns the masked batch; with `return_indices=True` it
also returns what it chose: `(B, 2)` mask indices, or `(B, n_holes, 4)` boxes for `RandomCutout`.
The searching classes (`GreedyCutout`, `MultiSizeGreedyCutout`, `GridCutout`) take the model at
construction, so that one object drops into any training loop (the strategies and their costs are
on the Concepts page, docs/concepts.md#training):

```python
aug = GreedyCutout(mask_set, model, fill=0.0)
for x, y in loader:
    loss = F.cross_entropy(model(aug(x, y)), y)
```
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ._args import as_fill, as_labels, as_pair, check_label_range, positive_int
from ._unwrap import local_module
from .defenses import RobustPatchClassifier
from .geometry import MaskSet
from .views import ViewRunner, eval_mode, fill_like, mask_images, model_device_dtype, triangle_pairs

__all__ = [
    "apply_masks",
    "apply_boxes",
    "RandomCutout",
    "RandomMaskCutout",
    "GreedyCutout",
    "MultiSizeGreedyCutout",
    "GridCutout",
    "create_augmentation",
]

Fill = float | Sequence[float]

# PatchCleanser trains with Cutout of 2 holes of 128 px on 224 px images; other sizes scale it.
_CUTOUT_HOLE, _CUTOUT_IMAGE = 128, 224


# ------------------------------------------------------------------------------------- functional
def apply_masks(x: torch.Tensor, mask_set: MaskSet, indices: torch.Tensor, fill: Fill = 0.0) -> torch.Tensor:
    """Hide, in each image, the masks of `mask_set` given by index.

    Args:
        x: `(B, C, H, W)` images at the mask set's image size.
        mask_set: the masks.
        indices: `(B,)` or `(B, n)` integer mask indices: image `b` hides the union of masks
            `indices[b]`.
        fill: value of masked pixels in the model's input space: a scalar or one value per channel.

    Returns:
        A masked copy of `x`; `x` itself is left unchanged.

    Raises:
        ValueError: for images not of the mask set's size, or indices of the wrong shape or out of
            range, since either would otherwise mask the wrong pixels or fail deep inside torch.
    """
    _check_images(x, mask_set.image_size, "x")
    if not isinstance(indices, torch.Tensor) or indices.is_floating_point() or indices.dtype == torch.bool:
        raise TypeError(f"indices must be an integer tensor of shape ({x.shape[0]},) or ({x.shape[0]}, n), got {_describe(indices)}")
    if indices.ndim == 1:
        indices = indices[:, None]
    if indices.ndim != 2 or indices.shape[0] != x.shape[0]:
        raise ValueError(f"indices must have shape ({x.shape[0]},) or ({x.shape[0]}, n), got {tuple(indices.shape)}")
    if indices.numel() and bool(((indices < 0) | (indices >= len(mask_set))).any()):
        raise ValueError(
            f"indices must be in [0, {len(mask_set)}) for this mask set, got values from {int(indices.min())} to {int(indices.max())}"
        )
    keep = mask_set.keep_masks(x.device)[indices.to(x.device)].all(1)
    return mask_images(x, keep, fill_like(as_fill(fill), x))


def apply_boxes(x: torch.Tensor, boxes: torch.Tensor, fill: Fill = 0.0) -> torch.Tensor:
    """Hide, in each image, rectangles given in pixels (the parts outside the image are ignored).

    Args:
        x: `(B, C, H, W)` images.
        boxes: `(B, n, 4)` integer `(top, left, height, width)`: image `b` hides the union of `boxes[b]`.
        fill: value of masked pixels in the model's input space: a scalar or one value per channel.

    Returns:
        A masked copy of `x`.

    Raises:
        ValueError: for boxes not of shape `(B, n, 4)`, which could not be matched to the images.
    """
    _check_images(x, None, "x")
    if not isinstance(boxes, torch.Tensor) or boxes.is_floating_point() or boxes.dtype == torch.bool:
        raise TypeError(f"boxes must be an integer tensor of shape ({x.shape[0]}, n, 4), got {_describe(boxes)}")
    if boxes.ndim != 3 or boxes.shape[0] != x.shape[0] or boxes.shape[2] != 4:
        raise ValueError(f"boxes must have shape ({x.shape[0]}, n, 4) as (top, left, height, width), got {tuple(boxes.shape)}")
    boxes = boxes.to(x.device)
    rows = torch.arange(x.shape[-2], device=x.device)[:, None]
    cols = torch.arange(x.shape[-1], device=x.device)[None, :]
    top, left, height, width = (boxes[..., c, None, None] for c in range(4))
    inside = (rows >= top) & (rows < top + height) & (cols >= left) & (cols < left + width)
    return mask_images(x, ~inside.any(1), fill_like(as_fill(fill), x))


# -------------------------------------------------------------------------------- random masks
class RandomCutout:
    """PatchCleanser's training recipe: `n_holes` square holes at uniformly random centres.

    Centres are uniform over the pixels; holes are clipped at the border (Cutout, DeVries and
    Taylor 2017), independently for every image. The defaults are the paper's 2 holes of 128 px
    on a 224 px image, scaled to the input size (16 px on 28 px).

    Args:
        n_holes: holes per image.
        size: hole side in pixels, or `(h, w)`; default `round(128 / 224 * side)` per axis.
        fill: value of masked pixels in the model's input space: a scalar or one value per channel.
        generator: random generator for the centres (default: torch's global generator). Centres
            are drawn on the CPU, so a seed gives the same holes on every device.

    Raises:
        ValueError: for `n_holes` or `size` that are not positive integers.
    """

    def __init__(
        self, n_holes: int = 2, size: int | Sequence[int] | None = None, *, fill: Fill = 0.0, generator: torch.Generator | None = None
    ):
        self.n_holes = positive_int(n_holes, "n_holes")
        self.size = None if size is None else tuple(positive_int(v, "size") for v in as_pair(size, "size"))
        self.fill = as_fill(fill)
        self.generator = generator

    def hole_size(self, image_size: Sequence[int]) -> tuple[int, int]:
        """The `(h, w)` of a hole on images of `image_size` `(H, W)`."""
        if self.size is not None:
            return self.size
        return tuple(max(1, round(_CUTOUT_HOLE * n / _CUTOUT_IMAGE)) for n in image_size)

    def __call__(self, x: torch.Tensor, y: torch.Tensor | None = None, *, return_indices: bool = False):
        """Cut `n_holes` holes out of every image of `x`.

        Args:
            x: `(B, C, H, W)` images.
            y: labels, accepted and ignored so that every augmentation is called alike.
            return_indices: also return the holes.

        Returns:
            The masked batch, and with `return_indices` the `(B, n_holes, 4)` clipped boxes
            `(top, left, height, width)`.
        """
        _check_images(x, None, "x")
        b, (h, w) = x.shape[0], x.shape[-2:]
        hh, hw = self.hole_size((h, w))
        cy = torch.randint(h, (b, self.n_holes), generator=self.generator)
        cx = torch.randint(w, (b, self.n_holes), generator=self.generator)
        top, left = (cy - hh // 2).clamp(0, h), (cx - hw // 2).clamp(0, w)
        bottom, right = (cy - hh // 2 + hh).clamp(0, h), (cx - hw // 2 + hw).clamp(0, w)
        boxes = torch.stack([top, left, bottom - top, right - left], -1)
        masked = apply_boxes(x, boxes, self.fill)
        return (masked, boxes.to(x.device)) if return_indices else masked

    def __repr__(self) -> str:
        size = "scaled" if self.size is None else f"{self.size[0]}x{self.size[1]}"
        return f"RandomCutout(n_holes={self.n_holes}, size={size}, fill={self.fill})"


class _MaskSetAugmentation:
    """Shared plumbing of the augmentations that hide masks of a mask set."""

    def __init__(self, mask_set: MaskSet, fill: Fill):
        if not isinstance(mask_set, MaskSet):
            raise TypeError(f"mask_set must be a robustwrap.MaskSet, got {type(mask_set).__name__}")
        self.mask_set = mask_set
        self.fill = as_fill(fill)


class RandomMaskCutout(_MaskSetAugmentation):
    """Two masks drawn uniformly and independently from the certification mask set, per image.

    Drawing the same mask twice gives a one-mask view, which certification evaluates too.

    Args:
        mask_set: the mask set the model will be certified with.
        fill: value of masked pixels in the model's input space: a scalar or one value per channel.
        generator: random generator (default: torch's global generator); draws happen on the CPU.
    """

    def __init__(self, mask_set: MaskSet, *, fill: Fill = 0.0, generator: torch.Generator | None = None):
        super().__init__(mask_set, fill)
        self.generator = generator

    def __call__(self, x: torch.Tensor, y: torch.Tensor | None = None, *, return_indices: bool = False):
        """Hide two random masks in every image of `x`.

        Args:
            x: `(B, C, H, W)` images at the mask set's image size.
            y: labels, accepted and ignored so that every augmentation is called alike.
            return_indices: also return the chosen masks.

        Returns:
            The masked batch, and with `return_indices` the `(B, 2)` mask indices.
        """
        _check_images(x, self.mask_set.image_size, "x")
        indices = torch.randint(len(self.mask_set), (x.shape[0], 2), generator=self.generator).to(x.device)
        masked = apply_masks(x, self.mask_set, indices, self.fill)
        return (masked, indices) if return_indices else masked

    def __repr__(self) -> str:
        return f"RandomMaskCutout(masks={len(self.mask_set)}, fill={self.fill})"


# ------------------------------------------------------------------------------- greedy search
class _MaskSearch(_MaskSetAugmentation):
    """Shared plumbing of the searching augmentations: loss of candidate views, in batches."""

    def __init__(self, mask_set: MaskSet, model: nn.Module, *, fill: Fill = 0.0, batch_size: int = 64):
        super().__init__(mask_set, fill)
        if isinstance(model, RobustPatchClassifier):
            # Its eval-mode forward is the robust prediction; the search needs the base logits.
            model = model.model
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        # Each process searches its own images: through a DistributedDataParallel wrapper every
        # forward would sync BatchNorm buffers with the other processes, which search other images
        # (a compiled model still runs compiled).
        self.model = local_module(model)
        self.batch_size = positive_int(batch_size, "batch_size")
        self._keep: dict[torch.device, torch.Tensor] = {}

    def _candidates(self) -> MaskSet:
        """The masks a view of the search may hide (the view runner indexes them)."""
        return self.mask_set

    def _runner(self, device: torch.device) -> ViewRunner:
        """Candidate views are built and run by the view runner that certification uses."""
        if device not in self._keep:  # the mask set never changes: build its keep masks once per device
            self._keep[device] = self._candidates().keep_masks(device)
        return ViewRunner(self.model, self._keep[device], self.fill, self.batch_size)

    def __call__(self, x: torch.Tensor, y: torch.Tensor, *, return_indices: bool = False):
        """Mask each image of `x` with the two masks the search finds worst for its label in `y`.

        The search runs under `torch.no_grad()` with the model in eval mode (every submodule's
        mode is restored afterwards), on the model's device, `batch_size` views per forward pass
        with the views of all images of a round sharing passes. It never updates BatchNorm
        statistics, and for a model wrapped in `DistributedDataParallel` it runs the inner
        module, so inside a DDP training loop each process searches its own images without
        talking to the others (no buffer or gradient synchronisation).

        Args:
            x: `(B, C, H, W)` images at the mask set's image size.
            y: `(B,)` integer labels.
            return_indices: also return the chosen masks.

        Returns:
            The masked batch (on `x`'s device), and with `return_indices` the `(B, 2)` mask indices.

        Raises:
            TypeError, ValueError: for images or labels of the wrong type, shape or range.
        """
        _check_images(x, self.mask_set.image_size, "x")
        y = as_labels(y, x.shape[0], "y")
        device, dtype = model_device_dtype(self.model)
        with torch.no_grad(), eval_mode(self.model):
            indices = self._search(x.to(device=device, dtype=dtype), y.to(device))
        indices = indices.to(x.device)
        masked = apply_masks(x, self.mask_set, indices, self.fill)
        return (masked, indices) if return_indices else masked

    def _search(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """`(B, 2)` the two masks chosen for each image; the subclasses' one job."""
        raise NotImplementedError

    def _losses(self, x: torch.Tensor, y: torch.Tensor, image: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Per-view cross entropy of the views `x[image]` hiding candidate masks `a` and `b`, as `(N,)` float32."""
        return _view_losses(self._runner(x.device), x, y, image, a, b, self.batch_size)


def _view_losses(
    runner: ViewRunner, x: torch.Tensor, y: torch.Tensor, image: torch.Tensor, a: torch.Tensor, b: torch.Tensor, batch_size: int
) -> torch.Tensor:
    """Per-view cross entropy of `runner`'s views `(image, a, b)` of `x`, `batch_size` per pass, as `(N,)` float32.

    Whatever a view is (pixels of an image, cells of PatchCURE's feature grid), the searches score it alike.
    """
    losses = torch.empty(image.numel(), dtype=torch.float32, device=x.device)
    for s in range(0, image.numel(), batch_size):
        part = slice(s, s + batch_size)
        logits = runner.run(x, image[part], a[part], b[part])
        if s == 0:
            check_label_range(y, logits.shape[1], "y")
        losses[part] = F.cross_entropy(logits.float(), y[image[part]], reduction="none")
    return losses


def _greedy_pair(losses, b: int, k: int, device: torch.device) -> torch.Tensor:
    """Greedy Cutout's `(b, 2)` masks among `k`: the worst mask `m1`, then the worst `m2` with it.

    `losses(image, first, second)` scores the views of images `image` hiding masks `first` and `second`.
    """
    image = torch.arange(b, device=device).repeat_interleave(k)
    mask = torch.arange(k, device=device).repeat(b)
    m1 = losses(image, mask, mask).view(b, k).argmax(1)
    if k == 1:
        return torch.stack([m1, m1], 1)
    others = torch.arange(k - 1, device=device).expand(b, -1)
    others = others + (others >= m1[:, None])  # every mask but m1, ascending
    image = torch.arange(b, device=device).repeat_interleave(k - 1)
    m2 = others.gather(1, losses(image, m1[image], others.flatten()).view(b, k - 1).argmax(1, keepdim=True))[:, 0]
    return torch.stack([m1, m2], 1)


class GreedyCutout(_MaskSearch):
    """Greedy Cutout (Saha et al., TMLR 2023): the worst mask, then the worst second mask with it.

    Round 1 evaluates every one-mask view and keeps the mask `m1` of highest loss; round 2
    evaluates `m1` together with every other mask and keeps the worst `m2`. `2K - 1` views per
    image: 17 for 9 masks, 71 for 36.

    Args:
        mask_set: the mask set the model will be certified with.
        model: the classifier being trained (the base model of a `RobustPatchClassifier`, and the
            inner module of a `DistributedDataParallel`, are searched with).
        fill: value of masked pixels in the model's input space: a scalar or one value per channel.
        batch_size: views per forward pass of the search.
    """

    @property
    def views_per_image(self) -> int:
        """`2K - 1`."""
        return max(2 * len(self.mask_set) - 1, 1)

    def _search(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return _greedy_pair(lambda image, a, b: self._losses(x, y, image, a, b), x.shape[0], len(self.mask_set), x.device)

    def __repr__(self) -> str:
        return f"GreedyCutout(masks={len(self.mask_set)}, fill={self.fill}, batch_size={self.batch_size})"


class MultiSizeGreedyCutout(_MaskSearch):
    """Multi-size Greedy Cutout (Saha et al., TMLR 2023): search coarse masks first, then their parts.

    The coarse set is `mask_set.coarsen(2)`, each coarse mask the union of (up to) 4 fine masks.
    Round 1: the worst coarse mask, then the worst of its fine masks, `f1`. Round 2, on `x`
    masked by `f1`: the worst coarse mask, then the worst of its fine masks, `f2` (which may be
    `f1` again). 26 views per image for a 6x6 set instead of 71 for `GreedyCutout`.

    Args:
        mask_set: the grid mask set the model will be certified with.
        model: the classifier being trained (the base model of a `RobustPatchClassifier`, and the
            inner module of a `DistributedDataParallel`, are searched with).
        fill: value of masked pixels in the model's input space: a scalar or one value per channel.
        batch_size: views per forward pass of the search.

    Raises:
        ValueError: for a mask set that is not a grid (a union), which has no coarse masks.
    """

    def __init__(self, mask_set: MaskSet, model: nn.Module, *, fill: Fill = 0.0, batch_size: int = 64):
        self.coarse = mask_set.coarsen(2)
        super().__init__(mask_set, model, fill=fill, batch_size=batch_size)
        width = max(len(c) for c in self.coarse.children)
        # Children padded with -1: with an odd grid the last coarse row/column merges fewer masks.
        self._children = torch.tensor([c + (-1,) * (width - len(c)) for c in self.coarse.children])

    @property
    def views_per_image(self) -> int:
        """`2 * (coarse masks + 4)`: exact for an even grid, an upper bound for an odd one."""
        return 2 * (len(self.coarse) + self._children.shape[1])

    def _candidates(self) -> MaskSet:
        """Fine masks followed by coarse ones: coarse mask `c` is candidate `K + c`.

        Built directly, not with `|`, which would drop a coarse box equal to a fine one (an odd
        grid's corner) and shift the indices.
        """
        return MaskSet(self.mask_set.image_size, self.mask_set.boxes + self.coarse.boxes, self.mask_set.patch_sizes)

    def _search(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        f1 = self._worst_fine(x, y, None)
        return torch.stack([f1, self._worst_fine(x, y, f1)], 1)

    def _worst_fine(self, x: torch.Tensor, y: torch.Tensor, hidden: torch.Tensor | None) -> torch.Tensor:
        """One round: the worst coarse mask, then its worst fine mask, with `hidden` fine masks already hidden."""
        b, k, kc = x.shape[0], len(self.mask_set), len(self.coarse)
        children = self._children.to(x.device)
        image = torch.arange(b, device=x.device).repeat_interleave(kc)
        coarse = torch.arange(kc, device=x.device).repeat(b) + k
        first = coarse if hidden is None else hidden[image]
        worst_coarse = self._losses(x, y, image, first, coarse).view(b, kc).argmax(1)

        kids = children[worst_coarse]
        valid = kids >= 0
        image = torch.arange(b, device=x.device)[:, None].expand_as(kids)[valid]
        fine = kids[valid]
        first = fine if hidden is None else hidden[image]
        losses = torch.full(kids.shape, -math.inf, device=x.device)
        losses[valid] = self._losses(x, y, image, first, fine)
        return kids.gather(1, losses.argmax(1, keepdim=True))[:, 0]

    def __repr__(self) -> str:
        return (
            f"MultiSizeGreedyCutout(masks={len(self.mask_set)}, coarse={len(self.coarse)}, fill={self.fill}, batch_size={self.batch_size})"
        )


class GridCutout(_MaskSearch):
    """The exhaustive worst pair: every two-mask view `(i, j)`, `i <= j`, of the mask set.

    The views are exactly those certification checks, `K(K + 1) / 2` per image (45 for 9 masks,
    666 for 36): the most faithful and by far the most expensive search.

    Args:
        mask_set: the mask set the model will be certified with.
        model: the classifier being trained (the base model of a `RobustPatchClassifier`, and the
            inner module of a `DistributedDataParallel`, are searched with).
        fill: value of masked pixels in the model's input space: a scalar or one value per channel.
        batch_size: views per forward pass of the search.
    """

    @property
    def views_per_image(self) -> int:
        """`K(K + 1) / 2`."""
        k = len(self.mask_set)
        return k * (k + 1) // 2

    def _search(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        pairs, _ = triangle_pairs(torch.arange(b, device=x.device), len(self.mask_set), diagonal=True)
        losses = self._losses(x, y, pairs[:, 0], pairs[:, 1], pairs[:, 2])
        return pairs.view(b, -1, 3).gather(1, losses.view(b, -1).argmax(1)[:, None, None].expand(-1, 1, 3))[:, 0, 1:]

    def __repr__(self) -> str:
        return f"GridCutout(masks={len(self.mask_set)}, fill={self.fill}, batch_size={self.batch_size})"


# ---------------------------------------------------------------------------------------- names
_SEARCHES = {"greedy": GreedyCutout, "multisize_greedy": MultiSizeGreedyCutout, "grid": GridCutout}
_NAMES = ("random_cutout", "random_mask", *_SEARCHES)


def create_augmentation(
    name: str, mask_set: MaskSet, model: nn.Module | None = None, *, fill: Fill = 0.0, batch_size: int = 64
) -> RandomCutout | RandomMaskCutout | GreedyCutout | MultiSizeGreedyCutout | GridCutout:
    """Build an augmentation by name.

    Args:
        name: `"random_cutout"` (`RandomCutout`), `"random_mask"` (`RandomMaskCutout`), `"greedy"`
            (`GreedyCutout`), `"multisize_greedy"` (`MultiSizeGreedyCutout`) or `"grid"` (`GridCutout`).
        mask_set: the mask set the model will be certified with.
        model: the classifier being trained; required by the searching augmentations.
        fill: value of masked pixels in the model's input space: a scalar or one value per channel.
        batch_size: views per forward pass of a search.

    Returns:
        The augmentation, called as `aug(x, y)`.

    Raises:
        ValueError: for an unknown name, or a searching augmentation without a model to search with.
    """
    if not isinstance(name, str) or name not in _NAMES:
        raise ValueError(f"augmentation name must be one of {', '.join(map(repr, _NAMES))}; got {name!r}")
    if name == "random_cutout":
        return RandomCutout(fill=fill)
    if name == "random_mask":
        return RandomMaskCutout(mask_set, fill=fill)
    if model is None:
        raise ValueError(f"augmentation {name!r} searches for the worst masks with a model; pass model=")
    return _SEARCHES[name](mask_set, model, fill=fill, batch_size=batch_size)


# ------------------------------------------------------------------------------------- plumbing
def _describe(value) -> str:
    return f"dtype {value.dtype}" if isinstance(value, torch.Tensor) else type(value).__name__


def _check_images(x, image_size: tuple[int, int] | None, name: str) -> None:
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(f"{name} must be a floating tensor of shape (B, C, H, W), got {_describe(x)}")
    if x.ndim != 4:
        raise ValueError(f"{name} must have shape (B, C, H, W), got {tuple(x.shape)}")
    if image_size is not None and tuple(x.shape[-2:]) != tuple(image_size):
        raise ValueError(f"{name} must be {image_size[0]}x{image_size[1]} images for this mask set, got {x.shape[-2]}x{x.shape[-1]}")
