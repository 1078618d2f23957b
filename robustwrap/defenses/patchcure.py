"""PatchCURE: PatchCleanser's double masking on the feature grid of a small-receptive-field model.

Xiang, Wu, Dai, Petit, Jana, Mittal, "PatchCURE", USENIX Security 2024. The network is split in
two: a small-receptive-field part (the SRF), whose feature cell `(a, b)` sees only a window of
pixels, and the rest (the LRF). A patch can only change the cells of one `wh x ww` block of the
grid (`geometry.feature_window`), so PatchCleanser's rule and certificate hold for views that
set the cells of two masks to 0: the SRF runs once per image, the LRF once per masked view. A
model that returns local logits needs no LRF: a view's logits are the sum of the local logits
over its kept cells, in float64. The proof obligations (the SRF is local, every patch's cells lie
inside one mask, a masked cell does not depend on the input, then PatchCleanser's argument
applies) are on the Concepts page (docs/concepts.md#patchcure).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, fields
from typing import Any, ClassVar

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .._args import as_image_size, as_labels, as_margin, positive_int
from .._unwrap import joins_processes
from ..geometry import MaskSet, patch_pixels
from ..views import ViewRunner, auto_sync_every, call_model, eval_mode
from .base import DEFAULT_MARGIN, DEFAULT_PATCH, RobustPatchClassifier, TrainingRecipe, resolve_image_size
from .detection import DEFAULT_TAU
from .patchcleanser import PatchCleanserResult, certify_views, predict_views
from .patchguard import _GEOMETRY, DEFAULT_EVIDENCE_MARGIN, _geometry, _window

__all__ = ["PatchCURE", "PatchCUREResult", "SplitModel"]

# float64 numbers held per pass of SRF-only views (each view's kept cells and its class sums), 2 MiB:
# BagNet-33 at 224 px with 1,000 classes (24x24 cells) takes 166 of its 41,905 views per image per
# pass, never a K x K x classes tensor. Each view is a matrix product with its image's local logits,
# which are not copied per view: gathering them (1,000 x 576 per view) made every view cost as much
# memory traffic as a pass of the local logits: certifying one image took 171 s on one CPU core, now 5 s.
_SUM_ELEMENTS = 1 << 18
# The SRF's locality is verified at construction by probing every pixel (`models.check_receptive_field`,
# one trial: H*W passes of one image in float64) when that costs at most this many FLOPs, counted
# on one blank pass (`torch.utils.flop_counter`), and the image at most _LOCALITY_PROBE_PIXELS:
# toy and MNIST-sized SRFs are checked at every wrap (bagnet_tiny at 32 px would take 1e11 FLOPs, 14 s
# on one CPU core, so it is not), larger ones are the user's to check once.
_LOCALITY_PROBE_FLOPS = 1e9
_LOCALITY_PROBE_PIXELS = 64 * 64
# The `forward` setting of a ViT split that runs the PatchCURE authors' forward (their checkpoints' function).
AUTHORS_FORWARD = "patchcure-authors"


# ------------------------------------------------------------------------------- the split
class SplitModel(nn.Module):
    """A user's SRF and LRF held as one base model, so that they move, train and save together.

    `forward(x)` is the undefended model: `lrf(srf(x), kept)` with every cell kept.

    Args:
        srf: `(B, C, H, W)` images to features `(B, C', h, w)`; declares `receptive_field`,
            `feature_stride` and `feature_offset`.
        lrf: `(features (N, C', h, w), kept (N, h, w) bool)` to logits `(N, num_classes)`.
    """

    def __init__(self, srf: nn.Module, lrf: nn.Module):
        super().__init__()
        self.srf = srf
        self.lrf = lrf

    @property
    def in_chans(self) -> int | None:
        """The SRF's `in_chans`, if it says."""
        value = getattr(self.srf, "in_chans", None)
        return value if isinstance(value, int) and not isinstance(value, bool) else None

    @property
    def num_classes(self) -> int | None:
        """The LRF's `num_classes`, if it says."""
        value = getattr(self.lrf, "num_classes", None)
        return value if isinstance(value, int) and not isinstance(value, bool) else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.srf(x)
        return self.lrf(features, torch.ones(features.shape[0], *features.shape[2:], dtype=torch.bool, device=features.device))


def _check_lrf(lrf) -> None:
    """Refuse an LRF that cannot take `(features, kept)`, before any forward pass.

    Raises:
        TypeError: `lrf` is not an `nn.Module`, or its forward cannot take two arguments; the
            message shows how to adapt a one-argument module.
    """
    if not isinstance(lrf, nn.Module):
        raise TypeError(f"lrf must be a torch.nn.Module mapping (features, kept) to logits, got {type(lrf).__name__}")
    try:
        signature = inspect.signature(lrf.forward)
    except (TypeError, ValueError):  # a builtin forward: nothing to check before calling it
        return
    try:
        signature.bind(None, None)
    except TypeError:
        raise TypeError(
            f"lrf must take two arguments, lrf(features, kept): masked features (N, C', h, w) with masked cells at 0, and "
            f"kept (N, h, w) bool, True for the cells not masked; {type(lrf).__name__}.forward{signature} does not. An LRF "
            "that needs only the features can ignore kept: def forward(self, features, kept): return self.body(features)"
        ) from None


def _srf_geometry(srf: nn.Module) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int]]:
    """`(r, s, o)` the SRF declares (PatchGuard's contract: cell `(a, b)` sees rows `[s*a - o, s*a - o + r)`).

    Raises:
        ValueError: a declaration is missing or invalid (the message says how to declare it).
    """
    missing = [name for name in _GEOMETRY if getattr(srf, name, None) is None]
    if missing:
        raise ValueError(
            f"PatchCURE needs the SRF's {', '.join(missing)}: {type(srf).__name__} has no such attribute, so no patch can be bounded "
            "to a block of cells. Declare them on the module (srf.receptive_field = r, srf.feature_stride = s, srf.feature_offset = o: "
            "cell (a, b) sees only input rows [s*a - o, s*a - o + r) and columns likewise); robustwrap.models.bagnet17 and friends, "
            "and robustwrap.windows.split_vit, declare them. For a timm ViT pass window= and split="
        )
    return tuple(_geometry(getattr(srf, name), f"the SRF's {name}", minimum) for name, minimum in _GEOMETRY.items())


@functools.lru_cache(maxsize=64)
def _cell_masks(grid: tuple[int, int], window: tuple[int, int], mask_stride: tuple[int, int]) -> MaskSet:
    """The feature mask set: PatchCleanser's mask set on the `grid` of cells for a `window`-cell "patch".

    Masks of `window + stride - 1` cells at `mask_stride` cells (the last flush with the edge), so
    every `window` block of cells lies inside one mask (`MaskSet` checks it exhaustively).
    """
    return MaskSet.rect(grid, window, stride=mask_stride)


def _feature_masks(
    image_size: tuple[int, int],
    patch: tuple[int, int],
    receptive_field: tuple[int, int],
    feature_stride: tuple[int, int],
    feature_offset: tuple[int, int],
    grid: tuple[int, int],
    mask_stride: tuple[int, int],
    input_size: tuple[int, int] | None = None,
    resize: str | None = None,
) -> MaskSet:
    """The feature mask set of an SRF geometry on a `grid` of cells (what `PatchCURE.feature_mask_set` is, without a model).

    With `input_size` and `resize` the patch is in input pixels and its cells are those its
    footprint in model pixels meets (`geometry.feature_window`, as PatchGuard's window).

    Raises:
        ValueError: the geometry does not fit the grid, or a patch's cells could cover the whole grid.
    """
    window = _window(image_size, patch, receptive_field, feature_stride, feature_offset, grid, input_size, resize)
    return _cell_masks(grid, window, mask_stride)


def _describe_cells(
    image_size: tuple[int, int],
    patch: tuple[int, int],
    masks: MaskSet,
    receptive_field: tuple[int, int],
    feature_stride: tuple[int, int],
    mask_stride: tuple[int, int],
    input_size: tuple[int, int] | None = None,
) -> str:
    """`PatchCURE.describe`: the patch in (input) pixels, the feature mask set in cells and model pixels, the grid and the views."""
    (h, w), (ph, pw), (r, s) = image_size, patch, (receptive_field, feature_stride)
    (mh, mw), grid, k = masks.mask_size, masks.image_size, len(masks)
    # The pixels a mask's cells see together: (m - 1) strides plus one receptive field, within the image.
    px = (min((mh - 1) * s[0] + r[0], h), min((mw - 1) * s[1] + r[1], w))
    ih, iw = input_size or image_size
    resized = "" if input_size is None else f" inputs resized to {h}x{w}"
    return (
        f"patch {ph}x{pw} px ({100 * ph * pw / (ih * iw):.2f}% of {ih}x{iw}{resized}); {masks.grid[0]}x{masks.grid[1]} masks of {mh}x{mw} cells "
        f"({px[0]}x{px[1]} px) on a {grid[0]}x{grid[1]} grid, mask stride {mask_stride[0]}x{mask_stride[1]} cells; {k * (k + 1) // 2} views"
    )


def _lrf_logits(lrf: nn.Module, features: torch.Tensor, kept: torch.Tensor, num_classes: int | None) -> torch.Tensor:
    """`lrf(features, kept)`, checked to be `(N, num_classes)` logits."""
    logits = call_model(lrf, features, kept)
    if not isinstance(logits, torch.Tensor) or logits.ndim != 2 or logits.shape[0] != features.shape[0]:
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ValueError(
            f"the LRF must map (N, C', h, w) features and (N, h, w) kept cells to (N, num_classes) logits; for {features.shape[0]} views it returned {shape}"
        )
    if num_classes is not None and logits.shape[1] != num_classes:
        raise ValueError(f"the LRF returned {logits.shape[1]} classes, expected num_classes={num_classes}")
    return logits


@dataclass(frozen=True)
class _FeatureViews(ViewRunner):
    """Views of a feature grid: the cells of masks `i` and `j` set to 0, the rest through the LRF (`model`)."""

    def run(self, x: torch.Tensor, image: torch.Tensor, i: torch.Tensor, j: torch.Tensor, fill: torch.Tensor | None = None) -> torch.Tensor:
        keep = self.keep if self.keep.device == x.device else self.keep.to(x.device)
        kept = keep[i] & keep[j]
        # A masked cell is the constant 0 whatever the image (proof obligation P3).
        views = torch.where(kept.unsqueeze(1), x[image], torch.zeros((), dtype=x.dtype, device=x.device))
        return _lrf_logits(self.model, views, kept, self.num_classes)


@dataclass(frozen=True)
class _LocalSums(ViewRunner):
    """Views of a local-logit map `(B, C, h, w)` (float64): the sum of the local logits over the cells kept.

    No model runs (`model` is unused). A pass of `batch_size` views holds their kept cells and
    their sums; each image's views are one product of their kept cells with its local logits.
    """

    def run(self, x: torch.Tensor, image: torch.Tensor, i: torch.Tensor, j: torch.Tensor, fill: torch.Tensor | None = None) -> torch.Tensor:
        keep = self.keep if self.keep.device == x.device else self.keep.to(x.device)
        kept = (keep[i] & keep[j]).flatten(1).to(x.dtype)  # (n, h*w), exactly 0 or 1
        local = x.flatten(2)  # (B, C, h*w), not copied
        sums = torch.empty(image.shape[0], x.shape[1], dtype=x.dtype, device=x.device)
        with torch.autocast(x.device.type, enabled=False):  # autocast would multiply in half precision
            for b in torch.unique(image).tolist():
                views = (image == b).nonzero()[:, 0]
                sums[views] = kept[views] @ local[b].T
        return sums


# ----------------------------------------------------------------------------- classifier
@dataclass(frozen=True)
class PatchCUREResult(PatchCleanserResult):
    """Per-image outcome of `PatchCURE.certify`: PatchCleanser's fields on feature views.

    Attributes:
        prediction: `(B,)` the robust (double-masking) prediction.
        certified: `(B,)` bool: no patch of the threat model can change the prediction, and it
            equals the label.
        num_views: `(B,)` masked views evaluated per image: LRF passes, or local-logit sums for
            an SRF-only model (no LRF).
        case: `(B,)` 1, 2 or 3: the double-masking case that gave the prediction.
        one_mask: `(B, K)` the one-mask labels `P_i` of the feature mask set.
        grid: `(B, K, K)` the two-mask labels `P_ij`, `-1` where early exit skipped a view.
        srf_passes: `(B,)` passes of the image through the SRF: 1.
    """

    srf_passes: torch.Tensor


class PatchCURE(RobustPatchClassifier):
    """A classifier defended by PatchCURE (Xiang et al., USENIX Security 2024): double masking on a feature grid.

    Three ways in, each with its own base model:

    - a timm vision transformer and `window=(wh, ww)` tokens, `split=k`: blocks `[0, k)` attend
      inside windows only (the SRF, one cell per window), blocks `[k, depth)` are the model's
      own (the LRF); `split = depth` leaves no LRF (`robustwrap.windows.split_vit`);
    - a model returning local logits `(B, num_classes, h, w)` that declares `receptive_field`,
      `feature_stride` and `feature_offset` (a BagNet of `robustwrap.models`): no LRF, a view's
      logits are the float64 sum of the local logits over its kept cells;
    - your own pair, `PatchCURE(srf, lrf, patch=..., image_size=...)`: `srf` maps images to
      features `(B, C', h, w)` and declares the geometry; `lrf(features, kept)` maps features
      whose masked cells are 0, and `kept` `(N, h, w)` bool (True for the cells not masked), to
      logits `(N, num_classes)`. They are held together as a `SplitModel`.

    The SRF runs once per image; PatchCleanser's rule and certificate (and its schedule: early
    exit, one view for `(i, j)` and `(j, i)`, views of many images per pass) run on the feature
    mask set: masks of `feature_window + mask_stride - 1` cells at `mask_stride` cells. Every
    setting and everything derived from the model (the split, the geometry, the grid) is read
    at every call. In eval mode `forward` returns robust logits; in train mode the undefended
    split model's forward (`lrf(srf(x))` with every cell kept, or the local logits).

    Args:
        model: the SRF of a pair, a local-logit model, or a timm ViT (with `window` and `split`).
        lrf: the LRF of a pair (default None).
        patch: the patch: side in pixels (int), fraction of the image area (float in (0, 1)), or `(ph, pw)`.
        image_size: `H` or `(H, W)` of the base model's inputs.
        input_size: `h` or `(h, w)`: the defended model takes images of this size and resizes them
            to `image_size` inside its forward, before the SRF; the patch is in these input pixels,
            and its cells are those its footprint in model pixels meets (`geometry.feature_window`,
            docs/concepts.md#input-pixels). `None` (default): no resize.
        resize: the interpolation of that resize: `"nearest"` (default), `"bilinear"` or `"bicubic"`.
        window: `(wh, ww)` tokens per window of a ViT split (an int for a square window).
        split: the number of windowed ViT blocks `k`.
        mask_stride: the feature masks' stride in cells, an int or `(sh, sw)` (default 1).
        authors: a ViT split runs the PatchCURE authors' forward instead of timm's
            (`robustwrap.windows.split_vit(..., authors=True)`): what `robustwrap import
            --format patchcure` sets for their checkpoints (default False).
        fill: as for every defense; unused (masked cells are 0, no pixel is masked).
        batch_size: LRF views (and SRF images) per forward pass; `None` picks as many as full
            images of this size (an LRF view costs at most one pass of the whole model).
        precision: `"float32"`, `"bfloat16"` or `"float16"` autocast of the SRF and LRF.
        margin: certificate margin, a float >= 0; `None` (default) gives `DEFAULT_MARGIN` with an
            LRF and `DEFAULT_EVIDENCE_MARGIN` for sums of local logits (PatchGuard's, for the
            same sums).
        num_classes: classes, if the model does not say.

    Raises:
        TypeError: a model that is not an `nn.Module`, an LRF that cannot take `(features, kept)`.
        ValueError: a missing or invalid SRF geometry, a geometry that does not fit the feature
            grid, an SRF that sees outside its declared window (checked on inputs of up to 64x64
            pixels), a patch whose cells could cover the whole grid, `window` without `split`
            (or with an `lrf`), a bad `mask_stride` or patch.
    """

    defense = "patchcure"
    _geometry_name = "PatchCURE model"
    # Two random feature masks per image (the authors' recipe), Greedy Cutout on the feature grid, or every cell kept.
    training_strategies: ClassVar[tuple[str, ...]] = ("random_mask", "greedy", "none")
    default_strategy: ClassVar[str] = "random_mask"
    # Certified detection on the one-mask views of the feature mask set (docs/concepts.md#certified-detection).
    _no_detection: ClassVar[str | None] = None
    _not_assignable: ClassVar[dict[str, str]] = {
        "lrf": "lrf is part of the base model: assign a new pair, m.model = robustwrap.defenses.patchcure.SplitModel(m.srf, lrf)",
        "authors": "authors chooses the function the weights compute, fixed at wrap: robustwrap.wrap(m.model, defense='patchcure', "
        "window=m.window, split=m.split, authors=True) runs the PatchCURE authors' forward",
    }

    def __init__(
        self,
        model: nn.Module,
        lrf: nn.Module | None = None,
        *,
        patch: int | float | Sequence[int],
        image_size: int | Sequence[int],
        input_size: int | Sequence[int] | None = None,
        resize: str | None = None,
        window: int | Sequence[int] | None = None,
        split: int | None = None,
        mask_stride: int | Sequence[int] = 1,
        authors: bool = False,
        fill: float | Sequence[float] = 0.0,
        batch_size: int | None = None,
        precision: str = "float32",
        margin: float | None = None,
        num_classes: int | None = None,
    ):
        if lrf is not None:
            if window is not None or split is not None:
                raise ValueError(
                    "window= and split= split a timm ViT into SRF and LRF; with your own lrf, pass its SRF as model and neither"
                )
            if not isinstance(model, nn.Module):
                raise TypeError(f"model (the SRF) must be a torch.nn.Module, got {type(model).__name__}")
            _check_lrf(lrf)
            model = SplitModel(model, lrf)
        if not isinstance(authors, bool):
            raise TypeError(f"authors must be True or False, got {authors!r}")
        if authors and split is None:
            raise ValueError("authors=True runs the PatchCURE authors' forward of a ViT split: pass window= and split= as well")
        if (window is None) != (split is None):
            raise ValueError(
                f"window= and split= go together (the ViT split: windows of wh x ww tokens for the first k blocks), got window={window!r}, split={split!r}"
            )
        super().__init__(
            model,
            image_size=image_size,
            input_size=input_size,
            resize=resize,
            fill=fill,
            batch_size=batch_size,
            precision=precision,
            margin=DEFAULT_MARGIN if margin is None else margin,
            num_classes=num_classes,
        )
        self._patch = patch_pixels(patch, self.input_size)
        self._window_tokens = None if window is None else _geometry(window, "window", 1)
        self._split = None if split is None else _as_split(split)
        self._authors = authors
        self._mask_stride = _geometry(mask_stride, "mask_stride", 1)
        self._check(locality=True)
        if margin is None:
            self.__dict__["_margin"] = None  # the default follows the structure (`margin`)

    @property
    def margin(self) -> float:
        """Certificate margin (float >= 0; 0 is the papers' rule).

        Unless one was given (at `wrap` or assigned), the default of the current structure:
        `DEFAULT_MARGIN` with an LRF, `DEFAULT_EVIDENCE_MARGIN` for sums of local logits (an SRF
        only: a model of local logits, or a ViT split whose every block is windowed). So
        assigning `split` or another base model moves an unset margin with the structure.
        """
        given = self.__dict__.get("_margin")
        if given is not None:
            return given
        return DEFAULT_EVIDENCE_MARGIN if self.lrf is None else DEFAULT_MARGIN

    @margin.setter
    def margin(self, value: float) -> None:
        self.__dict__["_margin"] = as_margin(value)

    # ------------------------------------------------------------------------------ the split
    @property
    def srf(self) -> nn.Module:
        """The small-receptive-field part of the current base model (split anew at every read)."""
        return self._parts()[0]

    @property
    def lrf(self) -> nn.Module | None:
        """The rest of the network, evaluated per masked view; `None` for a model that returns local logits."""
        return self._parts()[1]

    def _parts(self, inner: nn.Module | None = None) -> tuple[nn.Module, nn.Module | None]:
        """`(SRF, LRF)` of `inner` (default: the current base model), split with this model's settings."""
        inner = self._inner_model if inner is None else inner
        if self._split is not None:
            from ..windows import split_vit  # the ViT split is token code, imported only for a ViT

            return split_vit(inner, self._window_tokens, self._split, authors=self._authors)
        if isinstance(inner, SplitModel):
            return inner.srf, inner.lrf
        return inner, None

    @contextlib.contextmanager
    def _inference(self, srf: nn.Module, lrf: nn.Module | None) -> Iterator[None]:
        """Eval mode for the base model and both parts, no gradients, `precision`.

        The parts are the base model itself, its submodules (a pair's) or a ViT split's wrappers
        around it, which hold no module of their own: the base model's modes are every mode that
        matters. A base model already in eval mode throughout (the usual case when certifying) is
        left as it is; setting and restoring every module's flag, once per part, cost a ViT-Ti 12%
        of an SRF-only certification of one image. A wrapper's own flag is set for whoever reads it.
        """
        with contextlib.ExitStack() as stack:
            inner = self._inner_model
            if any(module.training for module in inner.modules()):
                stack.enter_context(eval_mode(inner))
            for part in (srf, lrf):
                if part is not None:
                    part.training = False
            stack.enter_context(torch.no_grad())
            stack.enter_context(self.autocast())
            yield

    def _srf_features(self, srf: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """The SRF's features of prepared images at `input_size`, `batch_size` at a time (resized first when the model resizes).

        Through the inference copy when the SRF is the whole model.
        """
        module = self._inference_model(x) if srf is self._inner_model else self._behind_resize(srf)
        outs = []
        for chunk in x.split(self.batch_size):
            out = call_model(module, chunk)
            if not isinstance(out, torch.Tensor) or out.ndim != 4 or out.shape[0] != chunk.shape[0]:
                shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
                raise ValueError(
                    f"PatchCURE needs an SRF that returns a feature grid (B, C', h, w), or local logits (B, num_classes, h, w) without an "
                    f"LRF; for {chunk.shape[0]} images it returned {shape}. A classifier with (B, num_classes) logits sees the whole image in "
                    "every logit: use defense='patchcleanser' for it, or split a timm ViT with window= and split="
                )
            outs.append(out)
        return torch.cat(outs)

    def _probe(self) -> tuple[tuple[int, int], int]:
        """`(grid (h, w), classes)` from one blank image through the current split (once per model and split)."""
        key = (self._inner_model, self._window_tokens, self._split, self._authors)
        cached = self.__dict__.get("_probed")
        if cached is None or cached[0] != key:
            srf, lrf = self._parts()
            blank = self._prepare(torch.zeros(1, self.in_chans or 3, *self.input_size))
            with self._inference(srf, lrf):
                features = self._srf_features(srf, blank)
                grid = (int(features.shape[2]), int(features.shape[3]))
                classes = (
                    features.shape[1]
                    if lrf is None
                    else _lrf_logits(lrf, features, torch.ones(1, *grid, dtype=torch.bool, device=features.device), None).shape[1]
                )
            cached = self.__dict__["_probed"] = (key, grid, int(classes))
        return cached[1], cached[2]

    def _cell_mask_set(self, srf: nn.Module, grid: tuple[int, int]) -> MaskSet:
        resized = (None, None) if self.resize is None else (self.input_size, self.resize)
        return _feature_masks(self.image_size, self.patch, *_srf_geometry(srf), grid, self.mask_stride, *resized)

    def _check(self, locality: bool = False) -> None:
        """Refuse settings and models that give no sound feature mask set (one blank pass per new model or split).

        With `locality`, where probing every pixel is cheap (`_LOCALITY_PROBE_FLOPS`), it is done
        (`models.check_receptive_field`): an SRF that sees outside its declared window is refused.
        """
        srf = self.srf
        grid, _ = self._probe()
        self._cell_mask_set(srf, grid)
        h, w = self.image_size
        if locality and h * w <= _LOCALITY_PROBE_PIXELS:
            blank = self._prepare(torch.zeros(1, self.in_chans or 3, h, w))
            with self._inference(srf, None), FlopCounterMode(display=False) as counter:
                srf(blank)
            if counter.get_total_flops() * h * w <= _LOCALITY_PROBE_FLOPS:
                from ..models import check_receptive_field

                check_receptive_field(srf, self.image_size, in_chans=self.in_chans or 3, trials=1)

    def _model_changed(self) -> None:
        self._check(locality=True)

    @contextlib.contextmanager
    def _kept_valid(self, attribute: str, locality: bool = False) -> Iterator[None]:
        """Give `attribute` its previous value back when the assignment inside the block fails `_check`."""
        previous = self.__dict__[attribute]
        try:
            yield
            self._check(locality)
        except BaseException:
            self.__dict__[attribute] = previous
            raise

    # ------------------------------------------------------------------------------ settings
    @property
    def patch(self) -> tuple[int, int]:
        """`(ph, pw)` in input pixels: the patch of the threat model (assign pixels, a pair or an area fraction)."""
        return self._patch

    @patch.setter
    def patch(self, value: int | float | Sequence[int]) -> None:
        with self._kept_valid("_patch"):
            self._patch = patch_pixels(value, self.input_size)

    @property
    def mask_stride(self) -> tuple[int, int]:
        """`(sh, sw)`: the feature masks' stride in cells (1: masks of exactly `feature_window` cells)."""
        return self._mask_stride

    @mask_stride.setter
    def mask_stride(self, value: int | Sequence[int]) -> None:
        with self._kept_valid("_mask_stride"):
            self._mask_stride = _geometry(value, "mask_stride", 1)

    @property
    def window(self) -> tuple[int, int] | None:
        """`(wh, ww)` tokens per window of a ViT split, `None` for another base model."""
        return self._window_tokens

    @window.setter
    def window(self, value: int | Sequence[int]) -> None:
        if self._split is None:
            raise AttributeError(
                "window is a setting of a ViT split; this PatchCURE has none: wrap the ViT with robustwrap.wrap(vit, defense='patchcure', window=..., split=...)"
            )
        with self._kept_valid("_window_tokens", locality=True):
            self._window_tokens = _geometry(value, "window", 1)

    @property
    def split(self) -> int | None:
        """The number of windowed ViT blocks `k` (the SRF), `None` for another base model."""
        return self._split

    @split.setter
    def split(self, value: int) -> None:
        if self._split is None:
            raise AttributeError(
                "split is a setting of a ViT split; this PatchCURE has none: wrap the ViT with robustwrap.wrap(vit, defense='patchcure', window=..., split=...)"
            )
        with self._kept_valid("_split", locality=True):
            self._split = _as_split(value)

    @property
    def authors(self) -> bool:
        """Whether a ViT split runs the PatchCURE authors' forward (their checkpoints' function) instead of timm's."""
        return self._authors

    @property
    def feature_window(self) -> tuple[int, int]:
        """`(wh, ww)`: the most cells per axis one patch can touch (`geometry.feature_window` of the SRF's geometry)."""
        return self._window_and_masks()[1]

    @property
    def feature_mask_set(self) -> MaskSet:
        """The feature mask set: a `MaskSet` whose "pixels" are the cells of the feature grid."""
        return self._window_and_masks()[2]

    @property
    def full_views(self) -> int:
        """Views of a full evaluation of one image: `K(K+1)/2` for `K` feature masks."""
        k = len(self.feature_mask_set)
        return k * (k + 1) // 2

    def _window_and_masks(self) -> tuple[tuple[int, int], tuple[int, int], MaskSet]:
        srf = self.srf
        grid, _ = self._probe()
        masks = self._cell_mask_set(srf, grid)
        return grid, masks.patch_size, masks

    @property
    def num_classes(self) -> int:
        """Number of classes (the model's `num_classes`, else one blank pass through the split)."""
        attr = getattr(self._inner_model, "num_classes", None)
        if isinstance(attr, int) and not isinstance(attr, bool):
            return attr
        if self._num_classes is None:
            self._num_classes = self._probe()[1]
        return self._num_classes

    @num_classes.setter
    def num_classes(self, value) -> None:
        raise AttributeError("num_classes is read from the base model; assign m.model to change it")

    def describe(self) -> str:
        """One line: the patch in pixels, the feature mask set in cells and pixels, the grid and the views.

        E.g. `patch 32x32 px (2.04% of 224x224); 1x6 masks of 1x2 cells (224x64 px) on a 1x7 grid, mask stride 1x1 cells; 21 views`.
        """
        _, _, masks = self._window_and_masks()
        r, s, _ = _srf_geometry(self.srf)
        return _describe_cells(self.image_size, self.patch, masks, r, s, self.mask_stride, None if self.resize is None else self.input_size)

    def _training_recipe(self, strategy: str, fill: float | tuple[float, ...], batch_size: int) -> TrainingRecipe:
        return TrainingRecipe(augment=_FeatureMasking(self, strategy, batch_size))

    def _training_geometry(self) -> dict[str, Any]:
        return {"cure": {k: v for k, v in self.settings().items() if k not in ("fill", "precision", "margin")}}

    def _defense_settings(self) -> dict[str, Any]:
        settings = {
            "patch": list(self.patch),
            "window": None if self.window is None else list(self.window),
            "split": self.split,
            "mask_stride": list(self.mask_stride),
        }
        if self._authors:  # only then: the settings (and fingerprints) of every other model stay as they were
            settings["forward"] = AUTHORS_FORWARD
        return settings

    @classmethod
    def _options_from_settings(cls, settings: dict[str, Any]) -> tuple[dict[str, Any], tuple[str, ...]]:
        keys = ("patch", "window", "split", "mask_stride")
        missing = [k for k in keys if k not in settings]
        if missing:
            raise ValueError(f"patchcure settings lack {', '.join(missing)} (keys: {sorted(settings)})")
        for key in ("patch", "mask_stride") + (("window",) if settings["window"] is not None else ()):
            value = settings[key]
            if not isinstance(value, (list, tuple)) or len(value) != 2:
                raise ValueError(f"settings {key} must be a pair [rows, columns] of ints, got {value!r}")
        image_size = settings.get("image_size")
        if not isinstance(image_size, (list, tuple)):
            raise ValueError(f"settings image_size must be [H, W], got {image_size!r}")
        options = {
            "image_size": as_image_size(tuple(image_size)),
            "patch": tuple(positive_int(v, "patch") for v in settings["patch"]),
            "window": None if settings["window"] is None else _geometry(list(settings["window"]), "window", 1),
            "split": None if settings["split"] is None else _as_split(settings["split"]),
            "mask_stride": _geometry(list(settings["mask_stride"]), "mask_stride", 1),
        }
        if "forward" in settings:
            if settings["forward"] != AUTHORS_FORWARD:
                raise ValueError(f"settings forward must be {AUTHORS_FORWARD!r} (or absent: timm's forward), got {settings['forward']!r}")
            options["authors"] = True
            keys += ("forward",)
        return options, keys

    @classmethod
    def from_patch(
        cls,
        model: nn.Module,
        patch: int | float | Sequence[int] | None = None,
        *,
        lrf: nn.Module | None = None,
        window: int | Sequence[int] | None = None,
        split: int | None = None,
        mask_stride: int | Sequence[int] = 1,
        authors: bool = False,
        image_size: int | Sequence[int] | None = None,
        input_size: int | Sequence[int] | None = None,
        resize: str | None = None,
        fill: float | Sequence[float] = 0.0,
        batch_size: int | None = None,
        precision: str = "float32",
        margin: float | None = None,
        num_classes: int | None = None,
        tau: float = DEFAULT_TAU,
    ) -> PatchCURE:
        """PatchCURE for a threat model: what `robustwrap.wrap(model, patch, defense="patchcure", ...)` calls.

        Args:
            model: a timm ViT (with `window` and `split`), a local-logit model, or the SRF of a pair.
            patch: side in pixels (int), fraction of the image area (float in (0, 1); default
                0.02), or `(ph, pw)`.
            lrf: the LRF of a pair, `lrf(features, kept) -> logits`.
            window: `(wh, ww)` tokens per window of a ViT split.
            split: windowed ViT blocks `k` (`depth`: every block, no LRF).
            mask_stride: feature mask stride in cells (default 1, the paper's).
            authors: run the PatchCURE authors' forward of a ViT split (default False: timm's).
            image_size: `H` or `(H, W)`; defaults to the size a timm model was built for.
            input_size: `h` or `(h, w)` of the defended model's inputs, resized to `image_size` in
                its forward before the SRF; the patch is in its pixels (default: no resize).
            resize: `"nearest"` (default), `"bilinear"` or `"bicubic"`: the interpolation of that resize.
            fill: as for every defense (unused: no pixel is masked).
            batch_size: LRF views and SRF images per forward pass (default `None`: chosen for the
                image size and device).
            precision: autocast precision of the SRF and LRF (default `"float32"`).
            margin: certificate margin; `None` (default): `DEFAULT_MARGIN` (1e-3) with an LRF,
                `DEFAULT_EVIDENCE_MARGIN` (0.1) for sums of local logits.
            num_classes: classes, if the model does not say.
            tau: confidence threshold of certified detection, in `[0, 1)` (default 0; `detect`).

        Returns:
            The defended model, in the same train/eval mode as `model`.

        Raises:
            TypeError, ValueError: as `PatchCURE`.
        """
        size = resolve_image_size(model, image_size)
        defended = cls(
            model,
            lrf,
            patch=DEFAULT_PATCH if patch is None else patch,
            image_size=size,
            input_size=input_size,
            resize=resize,
            window=window,
            split=split,
            mask_stride=mask_stride,
            authors=authors,
            fill=fill,
            batch_size=batch_size,
            precision=precision,
            margin=margin,
            num_classes=num_classes,
        )
        defended.tau = tau
        return defended

    def extra_repr(self) -> str:
        split = f"window={self.window}, split={self.split}, " if self.split is not None else ""
        split += "authors=True, " if self._authors else ""
        return f"patch={self.patch}, {split}mask_stride={self.mask_stride}, batch_size={self.batch_size}, precision={self.precision}, margin={self.margin}"

    # ----------------------------------------------------------------------------- inference
    def _views(self, srf: nn.Module, lrf: nn.Module | None, x: torch.Tensor) -> tuple[ViewRunner, torch.Tensor]:
        """The call's view runner and what its views are cut from: the SRF's features of `x` (one pass per image).

        Without an LRF the features are local logits, cast to float64 for the sums.
        """
        features = self._srf_features(srf, x)
        keep = self._cell_mask_set(srf, (int(features.shape[2]), int(features.shape[3]))).keep_masks(features.device)
        return self._runner(lrf, keep, features), features.to(torch.float64) if lrf is None else features

    def _runner(self, lrf: nn.Module | None, keep: torch.Tensor, features: torch.Tensor) -> ViewRunner:
        """The view runner of `features` `(B, C', h, w)` with masks `keep` `(K, h, w)`: LRF views, or sums of local logits."""
        sync = auto_sync_every(features.device)
        if lrf is None:
            per_view = features.shape[1] + features.shape[2] * features.shape[3]
            return _LocalSums(
                None, keep, 0.0, max(1, _SUM_ELEMENTS // per_view), num_classes=features.shape[1], channels_last=False, sync_every=sync
            )
        return _FeatureViews(lrf, keep, 0.0, self.batch_size, num_classes=self.num_classes, channels_last=False, sync_every=sync)

    def _robust_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Robust logits: the mean of the logits of the feature views that voted for the robust label (float32 or wider)."""
        return self._infer(x, need_logits=True)[1]

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Robust labels `(B,)` by double masking on the feature grid (in either mode; the model runs in eval mode)."""
        return self._infer(x, need_logits=False)[0].label

    def _infer(self, x: torch.Tensor, need_logits: bool):
        x = self._check_images(x)
        srf, lrf = self._parts()
        with self._inference(srf, lrf):
            runner, features = self._views(srf, lrf, x)
            one_mask, one_logits = runner.one_mask(features)
            return predict_views(runner, features, one_mask, one_logits, need_logits)

    def certify(self, x: torch.Tensor, y: torch.Tensor, early_exit: bool = True) -> PatchCUREResult:
        """Certify a batch against every patch of the threat model.

        The SRF runs once per image; an image is certified iff all `K(K+1)/2` feature views
        `P_ij`, `i <= j`, show its label by more than the model's `margin`, PatchCleanser's
        certificate on the feature mask set (docs/concepts.md#patchcure). With `early_exit` only
        images whose one-mask views all show `y` go on to the two-mask views, each stopping at
        its first failing view; the result is the same, only `num_views` is smaller.

        Args:
            x: `(B, C, H, W)` images, floating, as the model expects them.
            y: `(B,)` integer labels in `[0, num_classes)`.
            early_exit: skip views that cannot change the result (default True).

        Returns:
            A `PatchCUREResult`.

        Raises:
            TypeError, ValueError: for bad images or labels, before any forward pass.
        """
        x = self._check_images(x)
        y = self._check_labels(y, x.shape[0]).to(x.device)
        srf, lrf = self._parts()
        with self._inference(srf, lrf):
            runner, features = self._views(srf, lrf, x)
            one_mask, one_logits = runner.one_mask(features)
            result = certify_views(runner, features, y, one_mask, one_logits, self.margin, early_exit)
        srf_passes = torch.ones(x.shape[0], dtype=torch.long, device=x.device)
        return PatchCUREResult(**{f.name: getattr(result, f.name) for f in fields(result)}, srf_passes=srf_passes)

    def _detection_logits(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The unmasked logits and the `K` one-mask views of the feature mask set (no second round).

        The SRF runs once per image; the call's own view runner gives the one-mask views (the LRF
        on the features with one mask's cells at 0, or float64 sums of the kept local logits) and,
        with a single mask that keeps every cell, the unmasked logits: `K + 1` LRF passes (or sums)
        per image. A patch changes the cells of one block, which lies inside one feature mask, so
        that mask's view never sees it (docs/concepts.md#certified-detection).
        """
        srf, lrf = self._parts()
        with self._inference(srf, lrf):
            runner, features = self._views(srf, lrf, x)
            _, views = runner.one_mask(features)
            every_cell = torch.ones(1, *features.shape[2:], dtype=torch.bool, device=features.device)
            _, unmasked = dataclasses.replace(runner, keep=every_cell).one_mask(features)
        num_views = torch.full((x.shape[0],), views.shape[1] + 1, dtype=torch.long, device=x.device)
        return unmasked[:, 0].to(views.dtype), views, num_views

    def predict_vanilla(self, x: torch.Tensor) -> torch.Tensor:
        """The undefended prediction `(B,)`: every cell kept (the LRF on all features, or the sum of all local logits)."""
        x = self._check_images(x)
        srf, lrf = self._parts()
        with self._inference(srf, lrf):
            features = self._srf_features(srf, x)
            if lrf is None:
                return features.to(torch.float64).sum((-2, -1)).argmax(1)
            kept = torch.ones(features.shape[0], *features.shape[2:], dtype=torch.bool, device=features.device)
            return torch.cat(
                [_lrf_logits(lrf, f, k, self.num_classes) for f, k in zip(features.split(self.batch_size), kept.split(self.batch_size))]
            ).argmax(1)

    def _train_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The undefended split model (a ViT's own forward is not the function this defense certifies).

        Raises:
            TypeError: a ViT split whose base model is (or wraps) a `DistributedDataParallel`:
                the split runs the ViT's parts, not the wrapper's forward, so its gradients would
                not be synchronised.
        """
        if self._split is None:
            return self.model(x)
        if joins_processes(self.model):
            raise TypeError(
                "the ViT split runs the ViT's parts, not its forward, so a DistributedDataParallel around the ViT would not "
                "synchronise their gradients: wrap the PatchCURE model itself, DistributedDataParallel(robustwrap.wrap(vit, "
                "defense='patchcure', ...)), or train with robustwrap.fit_masking, which does it for you"
            )
        srf, lrf = self._parts()
        features = srf(x)
        if lrf is None:
            return features
        return lrf(features, torch.ones(features.shape[0], *features.shape[2:], dtype=torch.bool, device=features.device))


# ----------------------------------------------------------------------------- training
class _FeatureMasking:
    """PatchCURE's training views: the features of each image with the cells of two feature masks at 0.

    `fit_masking` trains a PatchCURE model with it (`strategy` one of
    `PatchCURE.training_strategies`): the masks are made inside the forward (`logits`), the SRF
    and the LRF train together, and every view is computed by the function that certification
    evaluates: the LRF on the masked grid, or the float64 sum of the kept local logits divided by
    the number of cells (the authors' mean over the grid, masked cells counting 0: the same
    labels, at the scale of one cell's logits, so that the loss and the learning rate do not
    grow with the grid).

    - `"random_mask"` (the default): two masks of the feature mask set per image, uniformly and
      independently (the same mask twice is a one-mask view), the PatchCURE authors' recipe
      (their code draws one pair per batch);
    - `"greedy"`: Greedy Cutout on the feature grid: the mask of highest loss, then the worst
      second mask with it. The SRF runs once per image and the `2K - 1` views are LRF passes (or
      sums), in eval mode without gradients;
    - `"none"`: every cell kept (the undefended split model).

    Called as `masking(images, labels, return_indices=True)` it returns the images unchanged and
    `(B, 2)` mask indices (`-1`: every cell kept); `logits(base, images, masks)` is the output to train.

    Args:
        defense: the PatchCURE model (its split, feature mask set and batch size are read at every call).
        strategy: `"random_mask"`, `"greedy"` or `"none"`.
        batch_size: views per pass of the greedy search.
    """

    views_in_forward = True

    def __init__(self, defense: PatchCURE, strategy: str, batch_size: int) -> None:
        if strategy not in PatchCURE.training_strategies:
            raise ValueError(f"strategy must be one of {', '.join(map(repr, PatchCURE.training_strategies))}, got {strategy!r}")
        self.defense, self.strategy, self.batch_size = defense, strategy, positive_int(batch_size, "batch_size")

    def __call__(self, x: torch.Tensor, y: torch.Tensor, *, return_indices: bool = False):
        """The images `x` (unchanged: their masks are applied to their features), and with `return_indices` the `(B, 2)` masks."""
        b = x.shape[0]
        if self.strategy == "none":
            masks = torch.full((b, 2), -1, dtype=torch.long, device=x.device)
        elif self.strategy == "random_mask":  # drawn on the CPU, as RandomMaskCutout's, whatever the device
            masks = torch.randint(len(self.defense.feature_mask_set), (b, 2)).to(x.device)
        else:
            masks = self._greedy(x, as_labels(y, b, "y").to(x.device))
        return (x, masks) if return_indices else x

    def _greedy(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        from ..augment import _greedy_pair, _view_losses  # training code, imported when a model trains

        defense = self.defense
        srf, lrf = defense._parts()
        with defense._inference(srf, lrf):
            runner, features = defense._views(srf, lrf, x)
            k = int(runner.keep.shape[0])
            losses = functools.partial(_view_losses, runner, features, y, batch_size=self.batch_size)
            return _greedy_pair(losses, x.shape[0], k, x.device)

    def logits(self, base: nn.Module, x: torch.Tensor, masks: torch.Tensor | None) -> torch.Tensor:
        """The views' logits `(B, num_classes)`, with gradients: `srf(x)` once, then each image's masked features.

        Args:
            base: the base model being trained (split with the defense's settings).
            x: `(B, C, h, w)` images at the defended model's `input_size`.
            masks: `(B, 2)` feature mask indices per image, `-1` (or `None` for all) for an image
                with every cell kept.
        """
        defense = self.defense
        srf, lrf = defense._parts(base)
        features = srf(defense.resize_input(x))  # the views are masked features of the resized images, as certify's
        grid = (int(features.shape[2]), int(features.shape[3]))
        keep = defense._cell_mask_set(srf, grid).keep_masks(features.device)
        # one more "mask" that keeps every cell: the view of an image left clean
        keep = torch.cat([keep, torch.ones(1, *grid, dtype=torch.bool, device=keep.device)])
        if masks is None:
            masks = torch.full((x.shape[0], 2), -1, dtype=torch.long, device=x.device)
        masks = torch.where(masks < 0, keep.shape[0] - 1, masks)
        runner = defense._runner(lrf, keep, features)
        image = torch.arange(x.shape[0], device=x.device)
        if lrf is None:
            return runner.run(features.to(torch.float64), image, masks[:, 0], masks[:, 1]) / (grid[0] * grid[1])
        return runner.run(features, image, masks[:, 0], masks[:, 1])

    def __repr__(self) -> str:
        return f"_FeatureMasking(strategy={self.strategy!r}, masks={len(self.defense.feature_mask_set)}, batch_size={self.batch_size})"


def _as_split(value) -> int:
    """`split` as an int >= 0 (the windowed blocks; `split_vit` checks it against the depth)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"split (the number of windowed ViT blocks) must be an int >= 0, got {value!r}")
    return value
