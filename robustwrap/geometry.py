"""Mask-set geometry: the R-covering mask sets of PatchCleanser (the Concepts page,
`docs/concepts.md#mask-sets`).

Pure geometry: boxes, the exhaustive covering check, coarsening and unions. Nothing here runs a
model; `keep_masks` is the only place a tensor is built, so the view runner can mask on the device.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from ._args import as_image_size, as_pair, positive_int, read_patch

__all__ = ["MaskSet", "Box", "patch_side", "patch_pixels", "DEFAULT_NUM_MASKS"]

Box = tuple[int, int, int, int]  # (top, left, height, width)

# Masks per axis when neither `num_masks` nor `stride` is given.
DEFAULT_NUM_MASKS = 6


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


def patch_pixels(patch: int | float | str | Sequence[int], image_size: int | Sequence[int]) -> tuple[int, int]:
    """`(ph, pw)` in pixels of a patch given as a side (int), an area fraction (float), `(ph, pw)`,
    or a string spelled as `robustwrap --patch` takes one (`"32px"`, `"2%"`, `"0.02"`).

    The one reading of a threat model's patch that mask sets, ablation sets, feature windows, the
    defenses and the attack share.

    Raises:
        ValueError: for a side that is not a positive int, a fraction outside (0, 1), a string
            that is not a patch spelling, or a patch larger than the image (no position would
            exist to certify against).
    """
    h, w = as_image_size(image_size)
    patch = read_patch(patch)
    if isinstance(patch, float):
        patch = patch_side(patch, (h, w))
    ph, pw = (positive_int(v, "patch") for v in as_pair(patch, "patch"))
    if ph > h or pw > w:
        raise ValueError(f"patch {ph}x{pw} is larger than the {h}x{w} image")
    return ph, pw


def _axis_starts(n: int, p: int, k: int | None, stride: int | None) -> tuple[int, int, tuple[int, ...]]:
    """The mask-set formula along one axis: returns (stride s, mask side m, starts)."""
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
        num_masks: `(kh, kw)` masks per axis that were asked for, when the set was built from
            `num_masks` (the formula can give fewer: `describe` says so); not part of equality.
    """

    image_size: tuple[int, int]
    boxes: tuple[Box, ...]
    patch_sizes: tuple[tuple[int, int], ...]
    mask_size: tuple[int, int] | None = None
    stride: tuple[int, int] | None = None
    grid: tuple[int, int] | None = None
    children: tuple[tuple[int, ...], ...] | None = field(default=None, repr=False)
    num_masks: tuple[int, int] | None = field(default=None, repr=False, compare=False)

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
        patch: int | float | str,
        num_masks: int | Sequence[int] | None = None,
        stride: int | Sequence[int] | None = None,
    ) -> MaskSet:
        """The mask set for a square patch.

        Args:
            image_size: `H` for a square image or `(H, W)`.
            patch: side in pixels (int), a fraction of the image area (float in (0, 1)), or a
                string as on the command line (`"32px"`, `"2%"`, `"0.02"`).
            num_masks: masks per axis `k`, or `(kh, kw)`; default 6 (36 masks) unless `stride`
                is given.
            stride: mask stride in pixels instead of `num_masks`; an int or `(sh, sw)`.

        Returns:
            The mask set of the Concepts page (`docs/concepts.md#mask-sets`), row-major.

        Raises:
            ValueError: for a non-positive or oversized patch, `num_masks < 1`, or both
                `num_masks` and `stride` (the two are alternative ways to size the grid).
        """
        size = as_image_size(image_size)
        patch = read_patch(patch)
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
        num_masks: int | Sequence[int] | None = None,
        stride: int | Sequence[int] | None = None,
    ) -> MaskSet:
        """The mask set for a rectangular `(ph, pw)` patch, sized per axis by the same formula.

        Args:
            image_size: `H` for a square image or `(H, W)`.
            patch: `(ph, pw)` in pixels.
            num_masks: masks per axis, or `(kh, kw)`; default 6 unless `stride` is given.
            stride: mask stride in pixels instead of `num_masks`; an int or `(sh, sw)`.

        Returns:
            The mask set of the Concepts page (`docs/concepts.md#mask-sets`), row-major.

        Raises:
            ValueError: as `MaskSet.square`.

        Warns:
            UserWarning: when the formula gives fewer masks per axis than `num_masks` asks for
                (a patch almost as large as the image leaves few distinct positions).
        """
        h, w = as_image_size(image_size)
        if not isinstance(patch, (tuple, list)) or len(patch) != 2:
            raise ValueError(f"patch of MaskSet.rect must be a pair (ph, pw) of ints in pixels, got {patch!r}")
        ph, pw = (positive_int(v, "patch") for v in patch)
        if ph > h or pw > w:
            raise ValueError(f"patch {ph}x{pw} is larger than the {h}x{w} image")
        if stride is not None and num_masks is not None:
            raise ValueError(f"pass num_masks or stride, not both (got num_masks={num_masks!r}, stride={stride!r})")
        if stride is None and num_masks is None:
            num_masks = DEFAULT_NUM_MASKS
        if stride is not None:
            strides = tuple(positive_int(v, "stride") for v in as_pair(stride, "stride"))
            ks = (None, None)
        else:
            ks = tuple(positive_int(v, "num_masks") for v in as_pair(num_masks, "num_masks"))
            strides = (None, None)
        sh, mh, rows = _axis_starts(h, ph, ks[0], strides[0])
        sw, mw, cols = _axis_starts(w, pw, ks[1], strides[1])
        boxes = tuple((t, l, mh, mw) for t in rows for l in cols)
        requested = None if ks[0] is None else (ks[0], ks[1])
        mask_set = cls((h, w), boxes, ((ph, pw),), (mh, mw), (sh, sw), (len(rows), len(cols)), num_masks=requested)
        if mask_set.shortfall():
            warnings.warn(mask_set.shortfall(), UserWarning, stacklevel=2)
        return mask_set

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

    def shortfall(self) -> str:
        """Why this grid has fewer masks per axis than `num_masks` asked for ("" when it has them all)."""
        if self.num_masks is None or self.grid is None or tuple(self.grid) == tuple(self.num_masks):
            return ""
        (h, w), (ph, pw) = self.image_size, self.patch_sizes[0]
        return (
            f"num_masks={self.num_masks[0]}x{self.num_masks[1]} cannot be honoured for a {ph}x{pw} px patch on a {h}x{w} image: "
            f"the mask-set formula gives {self.grid[0]}x{self.grid[1]} masks (mask side min(p + s - 1, N) reaches the image edge "
            f"in fewer steps); pass a smaller num_masks or a stride to choose the grid yourself"
        )

    def describe(self) -> str:
        """One line: patches in pixels and % of the image area, grid, mask size and stride.

        A grid with fewer masks per axis than `num_masks` asked for says so.
        """
        h, w = self.image_size
        patches = ", ".join(f"{ph}x{pw} px ({100 * ph * pw / (h * w):.2f}% of {h}x{w})" for ph, pw in self.patch_sizes)
        text = f"patch {patches}; {len(self)} masks"
        if self.grid is not None:
            text += f" ({self.grid[0]}x{self.grid[1]})"
        if self.mask_size is not None:
            text += f" of {self.mask_size[0]}x{self.mask_size[1]} px, stride {self.stride[0]}x{self.stride[1]}"
        if self.shortfall():
            text += f" (num_masks={self.num_masks[0]}x{self.num_masks[1]} asked for; the formula gives {self.grid[0]}x{self.grid[1]})"
        return text

    # ---------------------------------------------------------------------------------- geometry
    def covers(self, patch: int | float | Sequence[int]) -> bool:
        """Whether every position of `patch` lies inside at least one mask (checked exhaustively).

        Args:
            patch: side in pixels, area fraction in (0, 1), or `(ph, pw)`.
        """
        h, w = self.image_size
        ph, pw = patch_pixels(patch, self.image_size)
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
            "num_masks": listed(self.num_masks),
        }

    @classmethod
    def from_dict(cls, data: dict) -> MaskSet:
        """The set back from `to_dict` (extra keys are ignored; the covering check runs again).

        The dict may come from an untrusted file (a Hub config), so every field is checked for
        type and range before it is used.

        Raises:
            TypeError: if `data` is not a dict.
            ValueError: for a missing key, a field of the wrong type or range (e.g. a float box),
                or boxes that do not cover the patch sizes, as for any constructor.
        """
        if not isinstance(data, dict):
            raise TypeError(f"a mask set must be a dict (MaskSet.to_dict), got {type(data).__name__}")
        missing = [key for key in ("image_size", "boxes", "patch_sizes") if key not in data]
        if missing:
            raise ValueError(f"mask set dict lacks {', '.join(missing)} (keys: {sorted(data)})")

        def ints(value, name: str, length: int, minimum: int) -> tuple[int, ...]:
            ok = isinstance(value, (list, tuple)) and len(value) == length
            ok = ok and all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v >= minimum for v in value)
            if not ok:
                raise ValueError(f"mask set field {name} must be a list of {length} ints >= {minimum}, got {value!r}")
            return tuple(int(v) for v in value)

        def many(value, name: str, length: int, minimum: int) -> tuple[tuple[int, ...], ...]:
            if not isinstance(value, (list, tuple)) or not value:
                raise ValueError(f"mask set field {name} must be a non-empty list, got {value!r}")
            return tuple(ints(v, f"{name}[{i}]", length, minimum) for i, v in enumerate(value))

        def optional_pair(name: str) -> tuple[int, int] | None:
            value = data.get(name)
            return None if value is None else ints(value, name, 2, 1)

        children = data.get("children")
        if children is not None:
            if not isinstance(children, (list, tuple)):
                raise ValueError(f"mask set field children must be a list of lists of mask indices, got {children!r}")
            children = tuple(ints(c, f"children[{i}]", len(c) if isinstance(c, (list, tuple)) else -1, 0) for i, c in enumerate(children))
        boxes = many(data["boxes"], "boxes", 4, 0)
        return cls(
            image_size=ints(data["image_size"], "image_size", 2, 1),
            boxes=boxes,
            patch_sizes=many(data["patch_sizes"], "patch_sizes", 2, 1),
            mask_size=optional_pair("mask_size"),
            stride=optional_pair("stride"),
            grid=optional_pair("grid"),
            children=children,
            num_masks=optional_pair("num_masks"),
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


# ------------------------------------------------------------------------- ablation sets (DRS)

ABLATIONS = ("column", "row", "block")


def _axis_keep(n: int, size: int, stride: int) -> np.ndarray:
    """`(positions, n)` bool: view `k` keeps `{(k * stride + t) mod n : 0 <= t < size}` on one axis."""
    q = np.arange(0, n, stride)
    return (np.arange(n)[None, :] - q[:, None]) % n < size


def _axis_delta(keep: np.ndarray, patch: int) -> int:
    """The most views of one axis whose kept pixels meet a `patch`-wide interval inside the axis.

    Enumerates every start `t` of the interval `[t, t + patch)` against the actual kept sets, so a
    stride that does not divide the side (the wrap-around gap) is counted as it is.
    """
    n = keep.shape[1]
    # hits[t, k]: view k keeps a pixel of [t, t + patch), from prefix sums of the kept pixels.
    prefix = np.concatenate([np.zeros((keep.shape[0], 1), dtype=np.int64), np.cumsum(keep, axis=1)], axis=1)
    starts = np.arange(n - patch + 1)
    hits = (prefix[:, starts + patch] - prefix[:, starts]) > 0
    return int(hits.sum(axis=0).max())


@dataclass(frozen=True, eq=True)
class AblationSet:
    """The ablated views of (De)Randomized Smoothing: each keeps one band or block (wrapping around).

    `ablation="column"`: view `q` keeps the columns `{(q + t) mod W : 0 <= t < size}` and ablates
    every other pixel, for `q = 0, stride, 2 stride, ... < W`; `"row"` does the same on rows;
    `"block"` keeps the `size x size` block with corner `(q_r, q_c)`, positions on both axes,
    row-major (`q_r` outer). See the Concepts page, docs/concepts.md#smoothing.

    Attributes:
        image_size: `(H, W)` of the inputs.
        ablation: `"column"`, `"row"` or `"block"`.
        size: band width (columns), band height (rows) or block side, in pixels.
        stride: distance in pixels between neighbouring view positions on an ablated axis.
    """

    image_size: tuple[int, int]
    ablation: str = "column"
    size: int = 1
    stride: int = 1

    def __post_init__(self) -> None:
        object.__setattr__(self, "image_size", as_image_size(self.image_size))
        if not isinstance(self.ablation, str) or self.ablation not in ABLATIONS:
            raise ValueError(f"ablation must be one of {', '.join(map(repr, ABLATIONS))}, got {self.ablation!r}")
        object.__setattr__(self, "size", positive_int(self.size, "size"))
        object.__setattr__(self, "stride", positive_int(self.stride, "stride"))
        h, w = self.image_size
        limit = {"column": w, "row": h, "block": min(h, w)}[self.ablation]
        if self.size > limit:
            side = {"column": f"the image width {w}", "row": f"the image height {h}", "block": f"the smaller image side of {h}x{w}"}[self.ablation]
            raise ValueError(f"size (the {self.ablation} {'side' if self.ablation == 'block' else 'band width'}) must be at most {side}, got {self.size}")

    # ------------------------------------------------------------------------------- per axis
    def _row_keep(self) -> np.ndarray:
        """`(positions, H)`: one all-kept position when rows are not ablated."""
        h = self.image_size[0]
        if self.ablation == "column":
            return np.ones((1, h), dtype=bool)
        return _axis_keep(h, self.size, self.stride)

    def _col_keep(self) -> np.ndarray:
        """`(positions, W)`: one all-kept position when columns are not ablated."""
        w = self.image_size[1]
        if self.ablation == "row":
            return np.ones((1, w), dtype=bool)
        return _axis_keep(w, self.size, self.stride)

    @property
    def grid(self) -> tuple[int, int]:
        """`(row positions, column positions)`; view `v` is `(v // cols, v % cols)`."""
        return self._row_keep().shape[0], self._col_keep().shape[0]

    def __len__(self) -> int:
        rows, cols = self.grid
        return rows * cols

    @property
    def num_views(self) -> int:
        """`V`, the number of views."""
        return len(self)

    def positions(self) -> list[tuple[int, int]]:
        """The `(q_r, q_c)` corner of every view, in view order (`0` on an axis that is not ablated)."""
        rows, cols = self.grid
        step_r = 0 if self.ablation == "column" else self.stride
        step_c = 0 if self.ablation == "row" else self.stride
        return [(r * step_r, c * step_c) for r in range(rows) for c in range(cols)]

    def describe(self) -> str:
        """One line: ablation, size, stride and number of views."""
        h, w = self.image_size
        shape = f"{self.size}x{self.size} px blocks" if self.ablation == "block" else f"{self.size} px {self.ablation}s"
        return f"{shape} on {h}x{w}, stride {self.stride}; {len(self)} views"

    # ------------------------------------------------------------------------------- geometry
    def delta(self, patch: int | float | Sequence[int]) -> int:
        """`Δ`: the most views whose kept region meets one patch, over every patch position.

        Found by enumerating every position of the patch inside the image against the actual
        views, per axis (a block view meets the patch iff both its row and its column range
        do, so for blocks `Δ` is the product of the two axes' maxima). Never the closed form
        `ceil((p + size - 1) / stride)`, which is too small when the stride does not divide the
        image side (W=30, size 4, patch 5, stride 4: the closed form says 2, a patch meets 3).

        Args:
            patch: side in pixels, area fraction in (0, 1), or `(ph, pw)` in pixels.

        Raises:
            ValueError: for a patch that is not positive or does not fit in the image.
        """
        h, w = self.image_size
        ph, pw = patch_pixels(patch, self.image_size)
        return _axis_delta(self._row_keep(), ph) * _axis_delta(self._col_keep(), pw)

    def axis_keep(self, device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """`(rows (R, H), cols (Cq, W))` bool keep masks per axis position on `device`."""
        return (
            torch.as_tensor(self._row_keep(), device=device),
            torch.as_tensor(self._col_keep(), device=device),
        )

    def keep_masks(self, device: torch.device | str | None = None, views: torch.Tensor | None = None) -> torch.Tensor:
        """`(V, H, W)` bool, True where view `v` keeps a pixel; only the `views` given, if any.

        Built on `device` by broadcasting the per-axis masks, so a batch of block views never
        needs all `H*W` masks at once.
        """
        rows, cols = self.axis_keep(device)
        if views is None:
            views = torch.arange(len(self), device=device)
        views = torch.as_tensor(views, dtype=torch.long, device=rows.device)
        n_cols = cols.shape[0]
        return rows[views // n_cols][:, :, None] & cols[views % n_cols][:, None, :]

    # --------------------------------------------------------------------------- serialisation
    def to_dict(self) -> dict:
        """JSON-ready settings; `AblationSet.from_dict` rebuilds the same set."""
        return {"image_size": list(self.image_size), "ablation": self.ablation, "size": self.size, "stride": self.stride}

    @classmethod
    def from_dict(cls, data: dict) -> AblationSet:
        """The set back from `to_dict` (extra keys are ignored), validated like any constructor.

        Raises:
            TypeError: if `data` is not a dict.
            ValueError: for a missing key, or a value of the wrong type or out of range (the
                dict may come from an untrusted config file).
        """
        if not isinstance(data, dict):
            raise TypeError(f"an ablation set must be a dict with image_size, ablation, size and stride, got {type(data).__name__}")
        missing = [k for k in ("image_size", "ablation", "size", "stride") if k not in data]
        if missing:
            raise ValueError(f"the ablation set is missing {', '.join(missing)} (got keys {sorted(data)})")
        image_size = data["image_size"]
        if not isinstance(image_size, (list, tuple)) or len(image_size) != 2:
            raise ValueError(f"image_size of an ablation set must be a pair [H, W], got {image_size!r}")
        return cls(tuple(image_size), data["ablation"], data["size"], data["stride"])


__all__ += ["ABLATIONS", "AblationSet"]


# ------------------------------------------------------------------ input pixels (a resize)


def _axis_footprint(n_in: int, n_out: int, mode: str) -> np.ndarray:
    """`(n_in, n_out)` bool: output pixel `j` of a 1-D resize depends on input pixel `i` (a non-zero weight).

    The weights are read off the resize itself, by resizing the identity (rows of one-hot
    images), in float32 and float64 alike: a weight that is zero in one precision and not in
    the other counts, so the footprint holds whatever precision the model resizes in.
    """
    footprint = np.zeros((n_in, n_out), dtype=bool)
    corners = None if mode == "nearest" else False
    for dtype in (torch.float32, torch.float64):
        eye = torch.eye(n_in, dtype=dtype).reshape(n_in, 1, 1, n_in)
        out = torch.nn.functional.interpolate(eye, size=(1, n_out), mode=mode, align_corners=corners)
        footprint |= (out.reshape(n_in, n_out) != 0).numpy()
    return footprint


def resize_footprint(input_size: int | Sequence[int], image_size: int | Sequence[int], mode: str) -> tuple[np.ndarray, np.ndarray]:
    """Which model pixels of a resize from `input_size` to `image_size` each input pixel reaches, per axis.

    A defended model with an input size of its own resizes its `input_size` images to the base
    model's `image_size` (`torch.nn.functional.interpolate`, separable). Model pixel `(a, b)`
    depends on input pixel `(i, j)` iff `rows[i, a]` and `cols[j, b]`: with `"nearest"` each model
    pixel copies one input pixel, so an input pixel reaches exactly its image; `"bilinear"` and
    `"bicubic"` reach that image widened by the kernel's support (docs/concepts.md#input-pixels).

    Args:
        input_size: `h` or `(h, w)` of the inputs.
        image_size: `H` or `(H, W)` of the base model's inputs.
        mode: `"nearest"`, `"bilinear"` or `"bicubic"`.

    Returns:
        `(rows (h, H), cols (w, W))` bool arrays.
    """
    (h, w), (hh, ww) = as_image_size(input_size), as_image_size(image_size)
    return _axis_footprint(h, hh, mode), _axis_footprint(w, ww, mode)


def _covered(footprint: np.ndarray, p: int) -> np.ndarray:
    """`(n_in - p + 1, n_out)` bool: the model pixels a `p`-wide input patch at each start reaches."""
    cumulative = np.concatenate([np.zeros((1, footprint.shape[1]), dtype=np.int64), footprint.cumsum(0)])
    return cumulative[p:] - cumulative[:-p] > 0


__all__ += ["resize_footprint"]


# ------------------------------------------------------------------ feature windows (PatchGuard)


def _axis_feature_window(n: int, p: int, r: int, s: int, o: int, m: int, footprint: np.ndarray | None = None) -> int:
    """The most features of one axis that a `p`-wide patch inside `[0, n)` can touch.

    Feature `a` (of `m`) sees pixels `[s*a - o, s*a - o + r)`; every patch start `t` is tried.
    The features one patch touches are consecutive, so the extent is last - first + 1. With a
    `footprint` (`(n_in, n)`, `resize_footprint`) the patch is in input pixels, inside
    `[0, n_in)`, and touches the model pixels `[first, last]` of those it reaches.
    """
    if footprint is None:
        t = np.arange(n - p + 1)[:, None]
        low, high = t, t + p
    else:
        covered = _covered(footprint, p)
        low = np.where(covered, np.arange(n)[None, :], n).min(1)[:, None]
        high = np.where(covered, np.arange(n)[None, :] + 1, 0).max(1)[:, None]
    start = s * np.arange(m)[None, :] - o
    touched = (start < high) & (start + r > low)
    idx = np.arange(m)[None, :]
    first = np.where(touched, idx, m).min(axis=1)
    last = np.where(touched, idx, -1).max(axis=1)
    return int(np.maximum(last - first + 1, 0).max())


def feature_window(
    image_size: int | Sequence[int],
    patch: int | float | Sequence[int],
    receptive_field: int | Sequence[int],
    feature_stride: int | Sequence[int],
    feature_offset: int | Sequence[int],
    feature_size: int | Sequence[int],
    *,
    input_size: int | Sequence[int] | None = None,
    resize: str | None = None,
) -> tuple[int, int]:
    """The PatchGuard window: the most feature rows and columns one patch can touch.

    Feature `(a, b)` of an `h x w` local-logit map sees input rows `[s*a - o, s*a - o + r)` and
    columns likewise. Every position of the patch inside the image is enumerated, per axis, with
    the features it touches; the window side is the largest such extent, so any patch's
    features lie inside one window (see the Concepts page, docs/concepts.md#patchguard). For
    BagNet (`s = 8`, `o = 0`) at 224 px with a 32 px patch it is 6 for `r = 17` and 8 for `r = 33`,
    `ceil((p + r - 1) / s)` away from the map's edges.

    With an `input_size` of its own (the defended model resizes its inputs to `image_size`), the
    patch is in input pixels: every position of it is enumerated with its footprint in model
    pixels (`resize_footprint`: the model pixels that can depend on it under `resize`), and the
    features that footprint touches.

    Args:
        image_size: `H` or `(H, W)` of the base model's inputs (the geometry's pixels).
        patch: side in pixels (int), fraction of the image area (float in (0, 1)), or `(ph, pw)`;
            of the input image when `input_size` is given.
        receptive_field: `r`, an int or `(rh, rw)`, at least 1.
        feature_stride: `s`, an int or `(sh, sw)`, at least 1.
        feature_offset: `o`, an int or `(oh, ow)` (0 for unpadded models such as BagNet; a
            padded model has `o > 0`).
        feature_size: `(h, w)` of the local-logit map (`h` alone for a square one).
        input_size: `h` or `(h, w)` of the inputs the defended model resizes to `image_size`, or
            `None` when it takes `image_size` images.
        resize: the interpolation of that resize (`"nearest"`, `"bilinear"`, `"bicubic"`).

    Returns:
        `(wh, ww)`, each at least 1 and at most the map's side.

    Raises:
        ValueError: for invalid geometry, a patch larger than the image, or a window that covers
            the whole map: the attacker would then control every feature, robust masking removes
            all evidence, and no image could ever be certified.
    """
    h, w = as_image_size(image_size)
    footprint = (None, None) if input_size is None else resize_footprint(input_size, (h, w), resize or "nearest")
    ph, pw = patch_pixels(patch, (h, w) if input_size is None else as_image_size(input_size))
    rs = [positive_int(v, "receptive_field") for v in as_pair(receptive_field, "receptive_field")]
    ss = [positive_int(v, "feature_stride") for v in as_pair(feature_stride, "feature_stride")]
    os_ = as_pair(feature_offset, "feature_offset")
    if not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in os_):
        raise ValueError(f"feature_offset must be an int or a pair of ints, got {feature_offset!r}")
    fh, fw = (positive_int(v, "feature_size") for v in as_pair(feature_size, "feature_size"))
    window = (
        max(1, _axis_feature_window(h, ph, rs[0], ss[0], int(os_[0]), fh, footprint[0])),
        max(1, _axis_feature_window(w, pw, rs[1], ss[1], int(os_[1]), fw, footprint[1])),
    )
    if window == (fh, fw):
        raise ValueError(
            f"a {ph}x{pw} patch on {input_size or (h, w)} inputs can touch a {window[0]}x{window[1]} window of features, the whole "
            f"{fh}x{fw} feature map (PatchGuard's local logits, PatchCURE's SRF features; receptive field {tuple(rs)}, stride "
            f"{tuple(ss)}): the attacker would control all evidence and no image could be certified; use a smaller patch, a "
            "smaller receptive field (for a ViT split, a smaller window) or larger inputs"
        )
    return window


__all__ += ["feature_window"]
