"""Mask-set geometry: the R-covering mask sets of PatchCleanser (DESIGN.md section 1).

Pure geometry: boxes, the exhaustive covering check, coarsening and unions. Nothing here runs a
model; `keep_masks` is the only place a tensor is built, so the engine can mask on the device.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from ._args import DefaultInt, as_image_size, as_pair, is_default, positive_int

__all__ = ["MaskSet", "Box", "patch_side", "DEFAULT_NUM_MASKS"]

Box = tuple[int, int, int, int]  # (top, left, height, width)

# A default that knows it is one, so that `stride=` alone is not "both num_masks and stride".
DEFAULT_NUM_MASKS = DefaultInt(6)


def patch_side(fraction: float, image_size: int | Sequence[int]) -> int:
    """Side in pixels of a square patch covering `fraction` of the image area.

    `side = ceil(sqrt(fraction * H * W))`: 0.01, 0.02 and 0.03 of 224x224 give 23, 32 and 39 px.

    Raises:
        ValueError: if `fraction` is not in (0, 1), since larger values are not a fraction of
            the area and would silently become a patch bigger than the image.
    """
    h, w = as_image_size(image_size)
    if isinstance(fraction, bool) or not 0.0 < float(fraction) < 1.0:
        raise ValueError(f"patch as a fraction of the image area must be in (0, 1), got {fraction!r}")
    area = float(fraction) * h * w
    side = math.ceil(math.sqrt(area))
    # 0.04 * 100 * 100 is 400.00000000000006 in floating point; that must still give 20, not 21.
    if (side - 1) ** 2 >= area * (1 - 1e-12):
        side -= 1
    return side


def _axis_starts(n: int, p: int, k: int | None, stride: int | None) -> tuple[int, int, tuple[int, ...]]:
    """DESIGN.md section 1 along one axis: returns (stride s, mask side m, starts)."""
    s = math.ceil((n - p + 1) / k) if stride is None else stride
    m = min(p + s - 1, n)
    starts = list(range(0, n - m + 1, s))
    if starts[-1] != n - m:
        starts.append(n - m)
    return s, m, tuple(starts)


@dataclass(frozen=True, eq=True)
class MaskSet:
    """A set of rectangular masks that covers every position of a patch (an R-covering set).

    Build one with `MaskSet.square` or `MaskSet.rect`; `coarsen` and `|` derive new sets. Every
    constructor checks covering exhaustively, so a `MaskSet` that exists is a sound mask set.

    Attributes:
        image_size: `(H, W)` of the inputs.
        boxes: masks as `(top, left, height, width)`, row-major.
        patch_sizes: every patch shape `(ph, pw)` the set covers (several for a union).
        mask_size: `(mh, mw)` for a regular grid, `None` for a coarsened set or a union.
        stride: `(sh, sw)` for a regular grid, `None` for a coarsened set or a union.
        grid: `(rows, cols)` of a regular or coarsened grid, `None` for a union.
        children: for a coarsened set, the fine-mask indices merged into each coarse mask.
    """

    image_size: tuple[int, int]
    boxes: tuple[Box, ...]
    patch_sizes: tuple[tuple[int, int], ...]
    mask_size: tuple[int, int] | None = None
    stride: tuple[int, int] | None = None
    grid: tuple[int, int] | None = None
    children: tuple[tuple[int, ...], ...] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        h, w = self.image_size
        for box in self.boxes:
            top, left, bh, bw = box
            if bh < 1 or bw < 1 or top < 0 or left < 0 or top + bh > h or left + bw > w:
                raise ValueError(f"mask {box} (top, left, height, width) is not inside the {h}x{w} image")
        if not self.boxes:
            raise ValueError("a mask set needs at least one mask")
        for patch in self.patch_sizes:
            if not self.covers(patch):
                raise ValueError(
                    f"the {len(self)} masks do not cover every position of a {patch[0]}x{patch[1]} patch "
                    f"on a {h}x{w} image; a certificate from this set would be unsound"
                )

    # ----------------------------------------------------------------------------- constructors
    @classmethod
    def square(
        cls,
        image_size: int | Sequence[int],
        patch: int | float,
        num_masks: int | Sequence[int] | None = DEFAULT_NUM_MASKS,
        stride: int | Sequence[int] | None = None,
    ) -> MaskSet:
        """The mask set for a square patch.

        Args:
            image_size: `H` for a square image or `(H, W)`.
            patch: side in pixels (int), or a fraction of the image area (float in (0, 1)).
            num_masks: masks per axis `k` (default 6, so 36 masks), or `(kh, kw)`.
            stride: mask stride in pixels instead of `num_masks`; an int or `(sh, sw)`.

        Returns:
            The mask set of DESIGN.md section 1, row-major.

        Raises:
            ValueError: for a non-positive or oversized patch, `num_masks < 1`, or both or neither
                of `num_masks` and `stride` (the two are alternative ways to size the grid).
        """
        size = as_image_size(image_size)
        if isinstance(patch, (tuple, list)):
            raise ValueError(f"patch of MaskSet.square is one side, got {patch!r}; use MaskSet.rect for (ph, pw)")
        if isinstance(patch, float):
            side = patch_side(patch, size)
        elif isinstance(patch, (int, np.integer)) and not isinstance(patch, bool):
            side = int(patch)
        else:
            raise TypeError(f"patch must be an int (pixels) or a float in (0, 1) (area fraction), got {patch!r}")
        return cls.rect(size, (side, side), num_masks=num_masks, stride=stride)

    @classmethod
    def rect(
        cls,
        image_size: int | Sequence[int],
        patch: Sequence[int],
        num_masks: int | Sequence[int] | None = DEFAULT_NUM_MASKS,
        stride: int | Sequence[int] | None = None,
    ) -> MaskSet:
        """The mask set for a rectangular `(ph, pw)` patch, sized per axis by the same formula.

        Args:
            image_size: `H` for a square image or `(H, W)`.
            patch: `(ph, pw)` in pixels.
            num_masks: masks per axis (default 6), or `(kh, kw)`.
            stride: mask stride in pixels instead of `num_masks`; an int or `(sh, sw)`.

        Returns:
            The mask set of DESIGN.md section 1, row-major.

        Raises:
            ValueError: as `MaskSet.square`.
        """
        h, w = as_image_size(image_size)
        if not isinstance(patch, (tuple, list)) or len(patch) != 2:
            raise ValueError(f"patch of MaskSet.rect must be a pair (ph, pw) of ints in pixels, got {patch!r}")
        ph, pw = (positive_int(v, "patch") for v in patch)
        if ph > h or pw > w:
            raise ValueError(f"patch {ph}x{pw} is larger than the {h}x{w} image")
        explicit_k = num_masks is not None and not is_default(num_masks)
        if stride is not None and explicit_k:
            raise ValueError(f"pass num_masks or stride, not both (got num_masks={num_masks!r}, stride={stride!r})")
        if stride is None and num_masks is None:
            raise ValueError("pass num_masks (masks per axis) or stride (pixels); got neither")
        if stride is not None:
            strides = tuple(positive_int(v, "stride") for v in as_pair(stride, "stride"))
            ks = (None, None)
        else:
            ks = tuple(positive_int(v, "num_masks") for v in as_pair(num_masks, "num_masks"))
            strides = (None, None)
        sh, mh, rows = _axis_starts(h, ph, ks[0], strides[0])
        sw, mw, cols = _axis_starts(w, pw, ks[1], strides[1])
        boxes = tuple((t, l, mh, mw) for t in rows for l in cols)
        return cls((h, w), boxes, ((ph, pw),), (mh, mw), (sh, sw), (len(rows), len(cols)))

    # ------------------------------------------------------------------------------- properties
    def __len__(self) -> int:
        return len(self.boxes)

    @property
    def patch_size(self) -> tuple[int, int]:
        """The `(ph, pw)` patch this set covers.

        Raises:
            ValueError: for a union of several patch shapes, where one size would be a lie;
                read `patch_sizes` instead.
        """
        if len(self.patch_sizes) != 1:
            raise ValueError(f"this union covers several patch shapes {self.patch_sizes}; read patch_sizes")
        return self.patch_sizes[0]

    def describe(self) -> str:
        """One line: patches in pixels and % of the image area, grid, mask size and stride."""
        h, w = self.image_size
        patches = ", ".join(f"{ph}x{pw} px ({100 * ph * pw / (h * w):.2f}% of {h}x{w})" for ph, pw in self.patch_sizes)
        text = f"patch {patches}; {len(self)} masks"
        if self.grid is not None:
            text += f" ({self.grid[0]}x{self.grid[1]})"
        if self.mask_size is not None:
            text += f" of {self.mask_size[0]}x{self.mask_size[1]} px, stride {self.stride[0]}x{self.stride[1]}"
        return text

    # ---------------------------------------------------------------------------------- geometry
    def covers(self, patch: int | float | Sequence[int]) -> bool:
        """Whether every position of `patch` lies inside at least one mask (checked exhaustively).

        Args:
            patch: side in pixels, area fraction in (0, 1), or `(ph, pw)`.
        """
        h, w = self.image_size
        if isinstance(patch, float):
            patch = patch_side(patch, self.image_size)
        ph, pw = (positive_int(v, "patch") for v in as_pair(patch, "patch"))
        if ph > h or pw > w:
            raise ValueError(f"patch {ph}x{pw} is larger than the {h}x{w} image")
        # covered[t, l]: the patch with top-left corner (t, l) fits inside some mask. A box covers
        # exactly the rectangle of corners t in [top, top + bh - ph], l in [left, left + bw - pw].
        covered = np.zeros((h - ph + 1, w - pw + 1), dtype=bool)
        for top, left, bh, bw in self.boxes:
            if bh >= ph and bw >= pw:
                covered[top : top + bh - ph + 1, left : left + bw - pw + 1] = True
        return bool(covered.all())

    def keep_masks(self, device: torch.device | str | None = None) -> torch.Tensor:
        """`(K, H, W)` bool tensor, True where a pixel is kept and False inside mask `k`."""
        h, w = self.image_size
        keep = torch.ones((len(self), h, w), dtype=torch.bool, device=device)
        for k, (top, left, bh, bw) in enumerate(self.boxes):
            keep[k, top : top + bh, left : left + bw] = False
        return keep

    def coarsen(self, factor: int = 2) -> MaskSet:
        """Merge `factor x factor` neighbouring masks of a grid into one coarse mask (their union box).

        A 6x6 set gives a 3x3 set whose masks are each the exact union of 4 fine masks; with an
        odd count the last coarse row/column merges fewer. `children` maps each coarse mask to
        its fine masks (row-major), as Multi-size Greedy Cutout needs.

        Raises:
            ValueError: for a set that is not a grid (a union), or `factor < 1`.
        """
        factor = positive_int(factor, "factor")
        if self.grid is None:
            raise ValueError("coarsen needs a grid mask set (square, rect or coarsened), not a union")
        rows, cols = self.grid
        boxes, children = [], []
        for r0 in range(0, rows, factor):
            for c0 in range(0, cols, factor):
                kids = tuple(r * cols + c for r in range(r0, min(r0 + factor, rows)) for c in range(c0, min(c0 + factor, cols)))
                tops = [self.boxes[k][0] for k in kids]
                lefts = [self.boxes[k][1] for k in kids]
                bottoms = [self.boxes[k][0] + self.boxes[k][2] for k in kids]
                rights = [self.boxes[k][1] + self.boxes[k][3] for k in kids]
                boxes.append((min(tops), min(lefts), max(bottoms) - min(tops), max(rights) - min(lefts)))
                children.append(kids)
        grid = (math.ceil(rows / factor), math.ceil(cols / factor))
        return MaskSet(self.image_size, tuple(boxes), self.patch_sizes, grid=grid, children=tuple(children))

    def to_dict(self) -> dict:
        """Every field as JSON-ready lists, so that `MaskSet.from_dict` rebuilds the same set."""

        def listed(value):
            return None if value is None else [list(v) if isinstance(v, tuple) else v for v in value]

        return {
            "image_size": list(self.image_size),
            "patch_sizes": listed(self.patch_sizes),
            "boxes": listed(self.boxes),
            "mask_size": listed(self.mask_size),
            "stride": listed(self.stride),
            "grid": listed(self.grid),
            "children": listed(self.children),
        }

    @classmethod
    def from_dict(cls, data: dict) -> MaskSet:
        """The set back from `to_dict` (extra keys are ignored; the covering check runs again).

        Raises:
            ValueError: if the boxes do not cover the patch sizes, as for any constructor.
        """

        def tupled(value):
            return None if value is None else tuple(tuple(v) if isinstance(v, list) else v for v in value)

        return cls(
            image_size=tupled(data["image_size"]),
            boxes=tupled(data["boxes"]),
            patch_sizes=tupled(data["patch_sizes"]),
            mask_size=tupled(data.get("mask_size")),
            stride=tupled(data.get("stride")),
            grid=tupled(data.get("grid")),
            children=tupled(data.get("children")),
        )

    def __or__(self, other: MaskSet) -> MaskSet:
        """The union of two mask sets on the same image: it covers the patch shapes of both."""
        if not isinstance(other, MaskSet):
            return NotImplemented
        if other.image_size != self.image_size:
            raise ValueError(f"cannot unite mask sets for {self.image_size} and {other.image_size} images")
        boxes = self.boxes + tuple(b for b in other.boxes if b not in self.boxes)
        patches = self.patch_sizes + tuple(p for p in other.patch_sizes if p not in self.patch_sizes)
        return MaskSet(self.image_size, boxes, patches)
