"""Adaptive patch attack on a defended model, and the certificate audit built on it.

The attack looks for a patch (content and position) that changes the **defended** prediction.
Its loss goes through a differentiable surrogate of each defense, built only from the views a
patch at that position can change (the Concepts page, docs/concepts.md, describes the defenses):

- PatchCleanser: the one-mask views that do not hide the patch, and the two-mask views of the
  rows that could win a Case II decision (rows whose views with the masks hiding the patch
  already disagree with the label). Every other view is hidden from the patch: a constant.
- (De)Randomized Smoothing: the votes of the views whose kept band or block meets the patch
  (at most `Δ` views); the others cannot change and are constants.
- PatchGuard: the local logits, clipped at zero, summed per class after robust masking removes
  each class's largest window: the defended evidence itself.
- PatchCURE: PatchCleanser's views on the feature grid: the SRF's features of the patched image
  with the cells of one or two masks set to 0, through the LRF (or, for a model that returns
  local logits, their float64 sum over the kept cells); only the views in which a cell the patch
  reaches is kept.

Success is only ever judged by the exact `defended.predict`. A certified image can therefore
never be attacked successfully unless the certificate is wrong, which is what `audit` checks.

With `guarantee="detection"` the attack targets certified detection instead: success is a wrong
label *without* an alert from the exact `defended.detect` (an alert is a failure of the attack).
The surrogate pushes the unmasked image and every one-mask view the patch can change towards one
wrong label, so that no view disagrees with the output (PatchCleanser: its one-mask views;
PatchGuard: PatchGuard++'s views, the local-logit map minus each feature window).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ._args import as_labels, positive_int
from ._unwrap import local_module, unwrap
from .geometry import _covered, patch_pixels, resize_footprint
from .views import eval_mode, fill_like, mask_images, model_device_dtype

__all__ = [
    "ALERT",
    "GUARANTEES",
    "AttackResult",
    "AuditFinding",
    "AuditRecord",
    "AuditReport",
    "Locations",
    "attack",
    "audit",
    "input_bounds",
]

DEFAULT_STEPS = 150
DEFAULT_STEP_SIZE = 0.05
DEFAULT_RESTARTS = 1
DEFAULT_NUM_LOCATIONS = 20
DEFAULT_BUDGET = 2_000_000
LOSSES = ("margin", "ce")
GUARANTEES = ("prediction", "detection")
"""What an attack breaks: the defended prediction, or certified detection's output (a label or an alert)."""
ALERT = -1
"""The `prediction` of an image whose detection output is an alert (`guarantee="detection"`): never a class id."""
LOCATION_KINDS = ("all", "guided", "random", "grid")
# Checks with the exact prediction per run: often enough to catch a content that flips the label
# for a few steps only, rare enough to cost a few percent of the surrogate's views.
CHECKS_PER_RUN = 10
# Two-mask rows of a PatchCleanser surrogate per position: each costs about K views per step.
MAX_ROWS = 2
# Views per step of one wave, in units of the batch size: big enough to batch well on a CPU.
WAVE_BATCHES = 8

Locations = Literal["all", "guided", "random"] | int | tuple[str, int] | Sequence[tuple[int, int]] | torch.Tensor
"""Where to put the patch (top, left):

- `"all"`: every position (the exhaustive search; feasible on small images);
- `"random"` / `("random", n)` / `n`: `n` uniformly drawn positions per image (default 20);
- `"guided"` / `("guided", n)`: the `n` positions the defense's own evidence ranks most promising;
- `("grid", s)`: every `s` pixels on both axes, plus the positions flush with the far edges;
- explicit: `[(top, left), ...]` or an `(N, 2)` tensor for every image, or a `(B, N, 2)` tensor.
"""


# ------------------------------------------------------------------------------------ results
@dataclass(frozen=True)
class AttackResult:
    """Outcome of `robustwrap.attack`, one entry per image.

    Attributes:
        x_adv: `(B, C, H, W)` the images with the patch pasted: the successful patch where the
            attack succeeded, else the run whose surrogate loss ended lowest.
        success: `(B,)` bool: the exact defended prediction of `x_adv` is not the label
            (untargeted) or is the target (targeted).
        location: `(B, 2)` `(top, left)` of the patch in `x_adv`.
        patch: `(B, C, ph, pw)` the patch content, in the model's input space.
        prediction: `(B,)` the exact `defended.predict(x_adv)`; with `guarantee="detection"` the
            label of `defended.detect(x_adv)`, or `ALERT` (-1) where it alerts.
        forward_passes: calls of the base model's forward during the attack (clean evidence,
            surrogate steps and exact checks); for PatchCURE, of its SRF (a ViT split's patch
            embedding, a pair's `srf`), which runs once per image and per surrogate view.
        num_views: images through the base model (PatchCURE: its SRF) during the attack (all calls together).
        objective_views: images through the base model for the surrogate's gradient steps only.
        objective_steps: gradient steps summed over every (image, location, restart) run.
        naive_views_per_step: views per step of an attack evaluating every view of the defense.
        guarantee: what was attacked, one of `GUARANTEES`.
    """

    x_adv: torch.Tensor
    success: torch.Tensor
    location: torch.Tensor
    patch: torch.Tensor
    prediction: torch.Tensor
    forward_passes: int
    num_views: int
    objective_views: int
    objective_steps: int
    naive_views_per_step: int
    guarantee: str = "prediction"

    @property
    def success_rate(self) -> float:
        """Fraction of images attacked successfully."""
        return float(self.success.float().mean())

    @property
    def views_per_step(self) -> float:
        """Surrogate views per gradient step of one run (compare with `naive_views_per_step`)."""
        return self.objective_views / max(self.objective_steps, 1)


# ------------------------------------------------------------------------------------- bounds
def input_bounds(model: nn.Module, bounds: tuple | None = None, channels: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The valid input range per channel, in the model's input space.

    A timm model carries its normalisation in `pretrained_cfg` (`mean`, `std`); pixels in
    `[0, 1]` become `[(0 - mean) / std, (1 - mean) / std]` per channel. Without it, `bounds` is
    required.

    Args:
        model: a defended model or a base model.
        bounds: `(low, high)`, each a float or one float per channel; overrides `pretrained_cfg`.
        channels: the number of input channels, to broadcast scalars and check lengths.

    Returns:
        `(low, high)` float32 tensors of shape `(C,)` (or `(1,)` when `channels` is unknown).

    Raises:
        ValueError: when neither `bounds` nor a mean/std is known (an attack without a range
            would leave the space of real images), or for an empty or inverted range.
    """
    base = unwrap(getattr(model, "model", model) if _defense_of(model) else model)
    if bounds is None:
        cfg = getattr(base, "pretrained_cfg", None)
        if not (isinstance(cfg, dict) and cfg.get("mean") is not None and cfg.get("std") is not None):
            raise ValueError(
                "bounds is required: the base model has no timm pretrained_cfg mean/std to derive the valid input range "
                "from (pass e.g. bounds=(0.0, 1.0), or per channel bounds=((l1, l2, l3), (h1, h2, h3)))"
            )
        mean = torch.tensor(cfg["mean"], dtype=torch.float64).reshape(-1)
        std = torch.tensor(cfg["std"], dtype=torch.float64).reshape(-1)
        low, high = (0 - mean) / std, (1 - mean) / std
    else:
        if not isinstance(bounds, (tuple, list)) or len(bounds) != 2:
            raise ValueError(f"bounds must be a pair (low, high) of floats or per-channel sequences, got {bounds!r}")
        try:
            low, high = (torch.tensor(v, dtype=torch.float64).reshape(-1) for v in bounds)
        except (TypeError, ValueError) as error:
            raise ValueError(f"bounds must be a pair (low, high) of floats or per-channel sequences, got {bounds!r}") from error
    if channels is not None:
        for name, value in (("low", low), ("high", high)):
            if value.numel() not in (1, channels):
                raise ValueError(f"bounds: {name} has {value.numel()} values but the images have {channels} channels")
        low, high = low.expand(channels).clone(), high.expand(channels).clone()
    if low.numel() != high.numel() or not bool(torch.isfinite(low).all() and torch.isfinite(high).all()) or bool((low >= high).any()):
        raise ValueError(f"bounds must be finite with low < high in every channel, got low={low.tolist()} high={high.tolist()}")
    return low.float(), high.float()


# ------------------------------------------------------------------------------------ helpers
class _Counter:
    """Counts calls of a module's forward and the images that go through it (forward hooks).

    A vision transformer run on kept tokens (smoothing's `drop_tokens`, `robustwrap.tokens`)
    calls its `patch_embed` without its own forward: such a call counts as one pass too.
    """

    def __init__(self, module: nn.Module):
        self.calls = 0
        self.images = 0
        self._inside = 0
        run = local_module(module)  # what the objectives call (not a DistributedDataParallel)
        self._handles = [run.register_forward_pre_hook(self._enter), run.register_forward_hook(self._hook, always_call=True)]
        embed = getattr(unwrap(module), "patch_embed", None)
        if isinstance(embed, nn.Module):
            self._handles.append(embed.register_forward_hook(self._embed_hook))

    def _enter(self, module, inputs) -> None:
        self._inside += 1

    def _hook(self, module, inputs, output) -> None:
        self._inside -= 1
        self.calls += 1
        self.images += int(inputs[0].shape[0])

    def _embed_hook(self, module, inputs, output) -> None:
        if not self._inside:
            self.calls += 1
            self.images += int(inputs[0].shape[0])

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()


def _paste(x: torch.Tensor, patch: torch.Tensor, loc: torch.Tensor) -> torch.Tensor:
    """`x` (T, C, H, W) with `patch` (T, C, ph, pw) at `loc` (T, 2); differentiable in `patch`."""
    t, _, ph, pw = patch.shape
    rows = (loc[:, 0, None] + torch.arange(ph, device=x.device))[:, :, None]
    cols = (loc[:, 1, None] + torch.arange(pw, device=x.device))[:, None, :]
    out = x.clone()
    out[torch.arange(t, device=x.device)[:, None, None], :, rows, cols] = patch.permute(0, 2, 3, 1).to(out.dtype)
    return out


def _overlap(loc: torch.Tensor, patch: tuple[int, int] | torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """`(T, K)` pixels shared by the patch at each `loc` (T, 2) and each box (K, 4) `(top, left, h, w)`.

    `patch` is `(ph, pw)`, or `(T, 2)` sizes, one per position (PatchCURE's patches, in cells).
    """
    ph, pw = _sizes(patch)
    top, left = loc[:, 0, None], loc[:, 1, None]
    rows = (torch.minimum(top + ph, boxes[None, :, 0] + boxes[None, :, 2]) - torch.maximum(top, boxes[None, :, 0])).clamp(min=0)
    cols = (torch.minimum(left + pw, boxes[None, :, 1] + boxes[None, :, 3]) - torch.maximum(left, boxes[None, :, 1])).clamp(min=0)
    return rows * cols


def _sizes(patch: tuple[int, int] | torch.Tensor) -> tuple:
    """`(ph, pw)` of a fixed patch, or `(T, 1)` columns of per-position sizes `(T, 2)`, to broadcast against `(T, K)`."""
    return (patch[:, 0, None], patch[:, 1, None]) if isinstance(patch, torch.Tensor) else patch


def _view_margin(logits: torch.Tensor, label: torch.Tensor, targeted: bool) -> torch.Tensor:
    """Per-view margin to minimise: `z_y - max_{c != y} z_c` (untargeted), `max_{c != t} z_c - z_t` (targeted)."""
    own = logits.gather(1, label[:, None])[:, 0]
    other = logits.scatter(1, label[:, None], -math.inf).amax(1)
    return other - own if targeted else own - other


def _view_loss(logits: torch.Tensor, label: torch.Tensor, targeted: bool, loss: str) -> torch.Tensor:
    """`(N,)` loss to minimise per view: a hinge on the margin (a view that voted right stops pulling) or cross-entropy."""
    logits = logits.float()
    if loss == "margin":
        return _view_margin(logits, label, targeted).clamp(min=0)
    ce = F.cross_entropy(logits, label, reduction="none")
    return ce if targeted else -ce


# ----------------------------------------------------------------------------------- objectives
@dataclass
class _Views:
    """The surrogate's views of a set of runs: view `n` is view `view[n]` of run `task[n]`."""

    task: torch.Tensor
    view: torch.Tensor


class _Objective:
    """What the attack needs from one defense (or from an undefended model).

    Subclasses compute the clean evidence once (`__init__`), rank positions (`guide`), list the
    views a patch at a position can change (`plan`), build them (`render`) and score them
    (`loss`, per view, summed per run). `predict` is the exact prediction that judges success.
    """

    naive_views: int = 1

    @staticmethod
    def counted(base: nn.Module) -> nn.Module:
        """The module whose calls `AttackResult.forward_passes` counts: the base model."""
        return base

    def __init__(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, goal: torch.Tensor, targeted: bool, patch: tuple[int, int], loss: str
    ):
        self.model, self.x, self.y, self.goal, self.targeted, self.patch, self.loss_kind = model, x, y, goal, targeted, patch, loss

    @property
    def base(self) -> nn.Module:
        return self.model

    def autocast(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def guide(self, image: int, positions: torch.Tensor) -> torch.Tensor | None:
        """`(P,)` scores of `positions` for `image`, higher first; None without evidence."""
        return None

    def plan(self, image: torch.Tensor, loc: torch.Tensor) -> _Views:
        n = torch.arange(image.numel(), device=image.device)
        return _Views(task=n, view=torch.zeros_like(n))

    def render(self, x: torch.Tensor, view: torch.Tensor) -> torch.Tensor:
        return x

    def forward(self, views: torch.Tensor) -> torch.Tensor:
        return self.base(views)

    def loss(self, out: torch.Tensor, image: torch.Tensor, view: torch.Tensor) -> torch.Tensor:
        return _view_loss(out, self.goal[image], self.targeted, self.loss_kind)

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x).argmax(1)


class _BaseModelObjective(_Objective):
    """An undefended classifier: its own logits."""


class _DefendedObjective(_Objective):
    @property
    def base(self) -> nn.Module:
        # The attack needs no gradient sync: through a DistributedDataParallel, the model it wraps;
        # it takes views at the defended model's input size (resized first, when the model resizes).
        return self.model._behind_resize(self.model._local_model)

    def autocast(self) -> contextlib.AbstractContextManager:
        autocast = getattr(self.model, "autocast", None)
        return autocast() if callable(autocast) else contextlib.nullcontext()

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.predict(x)


class _TokenMasks(_DefendedObjective):
    """PatchCleanser's `drop_tokens` in the surrogate: a masked view runs on the tokens that meet its kept pixels.

    The defended model runs each masked view of a ViT on those tokens only
    (`robustwrap.tokens.forward_kept`), a different function from the ViT on every token of the
    filled view: the surrogate attacks that function, so a rendered view carries its kept pixels.
    Without `drop_tokens` (or for PatchCURE) views are plain images, as before.
    """

    def __init__(self, *args):
        super().__init__(*args)
        model = self.model
        on = getattr(model, "defense", None) == "patchcleanser" and getattr(model, "drop_tokens", False)
        self.token_grid = model._token_grid_of(model._inner_model) if on else None

    @property
    def base(self) -> nn.Module:
        # token dropping runs the ViT's parts, never a compiled or DataParallel wrapper's forward
        return self.model._inner_model if self.token_grid is not None else super().base

    def _masked(self, x: torch.Tensor, keep: torch.Tensor, fill: torch.Tensor):
        views = mask_images(x, keep, fill)
        return views if self.token_grid is None else (views, keep)

    def forward(self, rendered) -> torch.Tensor:
        if self.token_grid is None:
            return self.base(rendered)
        from .tokens import forward_kept, token_keep

        views, keep = rendered
        return forward_kept(self.model._inner_model, views, token_keep(keep, self.token_grid), self.token_grid)


class _PatchCleanserObjective(_TokenMasks):
    """Views `i * K + j`: the image with masks `i` and `j` (`i == j`: one mask) set to `fill`."""

    def __init__(self, *args):
        super().__init__(*args)
        mask_set = self._mask_set()
        self.k = len(mask_set)
        self.naive_views = self.k * (self.k + 1) // 2
        self.boxes = torch.tensor(mask_set.boxes, dtype=torch.long, device=self.x.device)
        self.keep = mask_set.keep_masks(self.x.device)
        # Every P_ij of the clean image: which rows already disagree (the guide) and which rows
        # could still win Case II for a wrong label (the two-mask views worth attacking).
        self.grid = self.model.certify(self.x, self.y, early_exit=False).grid
        one = self.grid.diagonal(dim1=1, dim2=2)
        goal = self.goal[:, None, None]
        self.wrong = self.grid == goal if self.targeted else self.grid != goal
        # A mask hiding the patch cannot turn Case II back to y when its own clean row disagrees
        # with its one-mask label, or that label is already wrong.
        self.row_open = (self.grid != one[:, :, None]).any(2) | (one != self.y[:, None])

    def _mask_set(self):
        return self.model.mask_set

    def _footprint(self, loc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`(corner (T, 2), size (T, 2))`: what the patch at each `loc` changes, in the units of the mask set's boxes."""
        return loc, torch.tensor(self.patch, device=loc.device).expand(loc.shape[0], 2)

    def _cover(self, loc: torch.Tensor) -> torch.Tensor:
        corner, size = self._footprint(loc)
        return _overlap(corner, size, self.boxes) == size.prod(1, keepdim=True)

    def guide(self, image: int, positions: torch.Tensor) -> torch.Tensor:
        cover = self._cover(positions)
        count = cover.sum(1)
        open_ = (cover & self.row_open[image][None]).sum(1)
        # A position no mask hides is seen by every view: the most promising of all.
        return torch.where(count > 0, open_.float() / count.clamp(min=1), torch.full_like(count, 2, dtype=torch.float))

    def plan(self, image: torch.Tensor, loc: torch.Tensor) -> _Views:
        k = self.k
        corner, size = self._footprint(loc)
        area = size.prod(1, keepdim=True)
        overlap = _overlap(corner, size, self.boxes)
        cover = overlap == area
        tasks, views = [], []
        one_t, one_i = (~cover).nonzero(as_tuple=True)
        tasks.append(one_t)
        views.append(one_i * k + one_i)
        # Rows i (not hiding the patch) whose views with every hiding mask already show a wrong
        # label: a Case II win for that label needs the rest of row i to follow.
        fixed_wrong = (self.wrong[image] | ~cover[:, None, :]).all(2) & cover.any(1, keepdim=True) & ~cover
        score = self.wrong[image].sum(2).float() * fixed_wrong
        rows = score.topk(min(MAX_ROWS, k), dim=1)
        for r in range(rows.indices.shape[1]):
            use = rows.values[:, r] > 0
            i = rows.indices[:, r]
            j = torch.arange(k, device=image.device)
            boxes_i, boxes_j = self.boxes[i], self.boxes
            # The patch is hidden in view (i, j) when the two masks together contain it.
            both = _pair_overlap(corner, size, boxes_i, boxes_j)
            visible = (overlap.gather(1, i[:, None]) + overlap - both < area) & use[:, None] & (j[None] != i[:, None])
            vt, vj = visible.nonzero(as_tuple=True)
            tasks.append(vt)
            views.append(torch.minimum(i[vt], vj) * k + torch.maximum(i[vt], vj))
        return _Views(task=torch.cat(tasks), view=torch.cat(views))

    def render(self, x: torch.Tensor, view: torch.Tensor):
        keep = self.keep[view // self.k] & self.keep[view % self.k]
        return self._masked(x, keep, fill_like(self.model.fill, x))


class _PatchCUREObjective(_PatchCleanserObjective):
    """PatchCleanser's surrogate on the feature grid: views `i * K + j` of the feature mask set.

    A patch changes only the cells whose receptive field it meets (its footprint, in cells), so
    the views that can change are chosen exactly as PatchCleanser's, with cells for pixels. A
    view runs the SRF on the patched image, sets the cells of masks `i` and `j` to 0 and runs the
    LRF; a model without an LRF sums the local logits over the kept cells, in float64.
    """

    def __init__(self, *args):
        from .defenses.patchcure import _srf_geometry

        model = args[0]
        self.srf, self.lrf = model._parts()
        self.geometry = _srf_geometry(self.srf)
        super().__init__(*args)

    @staticmethod
    def counted(base: nn.Module) -> nn.Module:
        from .defenses.patchcure import SplitModel

        # a pair's forward never runs (its SRF and LRF do); a ViT split's patch embedding is counted anyway
        inner = unwrap(base)
        return inner.srf if isinstance(inner, SplitModel) else base

    def _mask_set(self):
        return self.model.feature_mask_set

    def _footprint(self, loc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # Cell a sees model pixels [s*a - o, s*a - o + r): it meets the patch's [low, high) iff
        # ceil((low - r + 1 + o) / s) <= a <= floor((high - 1 + o) / s), within the grid; without
        # a resize [low, high) = [t, t + p).
        (r, s, o), grid, model = self.geometry, self.model.feature_mask_set.image_size, self.model
        first, last = [], []
        for axis in range(2):
            t = loc[:, axis]
            if model.resize is None:
                low, high = t, t + self.patch[axis]
            else:
                reach = _model_pixels(model.input_size[axis], model.image_size[axis], model.resize, self.patch[axis])
                low, high = (torch.as_tensor(v, device=t.device)[t] for v in reach)
            first.append((-torch.div(-(low - r[axis] + 1 + o[axis]), s[axis], rounding_mode="floor")).clamp(0, grid[axis] - 1))
            last.append(torch.div(high - 1 + o[axis], s[axis], rounding_mode="floor").clamp(0, grid[axis] - 1))
        corner = torch.stack(first, 1)
        return corner, torch.stack(last, 1) - corner + 1

    def render(self, x: torch.Tensor, view: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        kept = self.keep[view // self.k] & self.keep[view % self.k]
        with eval_mode(self.srf):
            features = self.srf(self.model.resize_input(x))  # the patched image at input size, resized as the defense does
        return features, kept

    def forward(self, rendered: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        features, kept = rendered
        if self.lrf is None:
            return (features.double() * kept[:, None]).sum((-2, -1))
        # A masked cell is the constant 0, as in the defense's own views.
        masked = torch.where(kept[:, None], features, torch.zeros((), dtype=features.dtype, device=features.device))
        with eval_mode(self.lrf):
            return self.lrf(masked, kept)


@functools.lru_cache(maxsize=64)
def _model_pixels(n_in: int, n: int, mode: str, p: int) -> tuple[np.ndarray, np.ndarray]:
    """`(low, high)`, per start `t` of a `p`-wide input patch: the model pixels `[low[t], high[t])` its footprint spans.

    The footprint of a resize from `n_in` to `n` pixels with `mode` (`geometry.resize_footprint`),
    from which the defense's feature window was built.
    """
    covered = _covered(resize_footprint(n_in, n, mode)[0], p)
    index = np.arange(n)[None, :]
    return np.where(covered, index, n).min(1), np.where(covered, index + 1, 0).max(1)


def _pair_overlap(loc: torch.Tensor, patch: tuple[int, int] | torch.Tensor, boxes_i: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """`(T, K)` pixels of the patch (`(ph, pw)` or `(T, 2)` sizes) inside both box `boxes_i[t]` and each `boxes[k]`."""
    top = torch.maximum(boxes_i[:, None, 0], boxes[None, :, 0])
    left = torch.maximum(boxes_i[:, None, 1], boxes[None, :, 1])
    bottom = torch.minimum(boxes_i[:, None, 0] + boxes_i[:, None, 2], boxes[None, :, 0] + boxes[None, :, 2])
    right = torch.minimum(boxes_i[:, None, 1] + boxes_i[:, None, 3], boxes[None, :, 1] + boxes[None, :, 3])
    ph, pw = _sizes(patch)
    rows = (torch.minimum(loc[:, 0, None] + ph, bottom) - torch.maximum(loc[:, 0, None], top)).clamp(min=0)
    cols = (torch.minimum(loc[:, 1, None] + pw, right) - torch.maximum(loc[:, 1, None], left)).clamp(min=0)
    return rows * cols


class _SmoothingObjective(_DefendedObjective):
    """Views are the ablated views of the defense (indices of its `AblationSet`).

    They run through `smoothing.view_logits`, the defense's own function of a view: with
    `drop_tokens` a rendered view carries its index, since the tokens it keeps depend on it.
    """

    def __init__(self, *args):
        super().__init__(*args)
        from .defenses import smoothing

        self._smoothing = smoothing
        model, x = self.model, self.x
        self.ablation_set = model.ablation_set
        self.naive_views = len(self.ablation_set)
        self.axis_keep = self.ablation_set.axis_keep(x.device)
        self.threshold = model.threshold
        footprint = None if model.resize is None else resize_footprint(model.input_size, model.image_size, model.resize)
        self.tokens = smoothing.ViewTokens.of(model._token_grid(), self.ablation_set, x.device, footprint)
        # As the defense runs them: without a resize or with a nearest one the images are
        # embedded once (no view built); another resize builds, resizes and runs each view.
        self.embed_once = self.tokens is not None and model.resize in (None, "nearest")
        # The clean votes of every view: the guide, and the runner-up class the patch should
        # hand its votes to (a vote moved from y to one class c counts twice against y).
        b, v = x.shape[0], self.naive_views
        image = torch.arange(b, device=x.device).repeat_interleave(v)
        view = torch.arange(v, device=x.device).repeat(b)
        logits = torch.cat(
            [
                self.forward(self.render(x[image[s : s + model.batch_size]], view[s : s + model.batch_size])).float()
                for s in range(0, b * v, model.batch_size)
            ]
        )
        self.votes = smoothing.plain_votes(logits, self.threshold).reshape(b, v, -1)
        counts = self.votes.sum(1)
        rows = torch.arange(b, device=x.device)
        if self.targeted:
            self.target = self.goal
        else:
            self.target = counts.scatter(1, self.y[:, None], -1).argmax(1)
        self.against = ~self.votes[rows, :, self.y] if not self.targeted else self.votes[rows, :, self.goal]

    @property
    def base(self) -> nn.Module:
        # token dropping runs the ViT's parts, never a compiled or DataParallel wrapper's forward
        return self.model._inner_model if self.tokens is not None else self.model._local_model

    def _affected(self, loc: torch.Tensor) -> torch.Tensor:
        """`(T, V)` bool: the views whose kept band or block meets the patch at each position."""
        rows, cols = self.axis_keep
        ph, pw = self.patch

        def hit(keep: torch.Tensor, start: torch.Tensor, size: int) -> torch.Tensor:
            prefix = F.pad(keep.long().cumsum(1), (1, 0))
            return (prefix[:, start + size] - prefix[:, start]).T > 0  # (T, positions)

        r, c = hit(rows, loc[:, 0], ph), hit(cols, loc[:, 1], pw)
        return (r[:, :, None] & c[:, None, :]).reshape(loc.shape[0], -1)

    def guide(self, image: int, positions: torch.Tensor) -> torch.Tensor:
        affected = self._affected(positions)
        against = (affected & self.against[image][None]).sum(1).float()
        return against + 1e-2 * affected.sum(1)

    def plan(self, image: torch.Tensor, loc: torch.Tensor) -> _Views:
        task, view = self._affected(loc).nonzero(as_tuple=True)
        return _Views(task=task, view=view)

    def render(self, x: torch.Tensor, view: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.embed_once:  # token dropping ablates inside the forward: no view is built
            return x, view
        image = torch.arange(x.shape[0], device=x.device)
        return self._smoothing.ablate(x, image, view, self.axis_keep, self.model.encoding, self.model.fill), view

    def forward(self, rendered: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, view = rendered
        if self.tokens is None:
            return self._smoothing.view_logits(self.base, x, view, None)
        vit = self.model._inner_model
        if not self.embed_once:
            return self._smoothing.view_logits(vit, self.model.resize_input(x), view, self.tokens)
        encoding = self.model.encoding
        encoded = self.model.resize_input(self._smoothing.encode_full(x, encoding))
        image = torch.arange(x.shape[0], device=x.device)
        return self.tokens.logits(vit, encoded, image, view, self._smoothing.token_fill(self.model.fill, encoding, encoded))

    def loss(self, out: torch.Tensor, image: torch.Tensor, view: torch.Tensor) -> torch.Tensor:
        out = out.float()
        target = self.target[image]
        if self.threshold is None or self.loss_kind == "ce":
            return _view_loss(out, target, True, self.loss_kind)
        # Threshold votes: drop the vote for the clean label, gain one for the target.
        log_p = out.log_softmax(1)
        cut = math.log(self.threshold)
        lose = (log_p.gather(1, self.y[image][:, None])[:, 0] - cut).clamp(min=0) if not self.targeted else 0
        return lose + (cut - log_p.gather(1, target[:, None])[:, 0]).clamp(min=0)


class _PatchGuardObjective(_DefendedObjective):
    """One view per run, the image itself; the loss goes through robust masking of its local logits."""

    def __init__(self, *args):
        super().__init__(*args)
        from .defenses import patchguard

        self._rule = patchguard
        model = self.model
        self.window = model.window
        local = self.base(self.x).float()
        self.map_size = tuple(local.shape[2:])
        # Worst case over classes c != y of L_y(u) - U_c(u), per window u: the guide.
        lower, upper = patchguard.evidence_bounds(local, self.y, self.window, model.threshold, model.clip)
        classes = torch.arange(upper.shape[1], device=upper.device)
        upper = upper.masked_fill((classes[None, :] == self.y[:, None])[..., None], -math.inf)
        nh = self.map_size[0] - min(self.window[0], self.map_size[0]) + 1
        self.gap = (lower - upper.amax(1)).reshape(self.x.shape[0], nh, -1)

    def guide(self, image: int, positions: torch.Tensor) -> torch.Tensor:
        # The window holding the features a patch touches starts at its first touched feature,
        # moved back to fit inside the map.
        r, s, o = self.model.receptive_field, self.model.feature_stride, self.model.feature_offset
        size, model_size = self.model.input_size, self.model.image_size
        corner = []
        for axis in range(2):
            start = positions[:, axis] * model_size[axis] // size[axis]  # where the patch's image starts in model pixels
            first = torch.div(start + o[axis] - r[axis] + 1 + s[axis] - 1, s[axis], rounding_mode="floor").clamp(min=0)
            corner.append(first.clamp(max=self.gap.shape[1 + axis] - 1))
        return -self.gap[image, corner[0], corner[1]]

    def loss(self, out: torch.Tensor, image: torch.Tensor, view: torch.Tensor) -> torch.Tensor:
        evidence = self._rule.robust_masking(out.float(), self.window, self.model.threshold, self.model.clip)
        if self.loss_kind == "ce":
            ce = F.cross_entropy(evidence, self.goal[image], reduction="none")
            return ce if self.targeted else -ce
        return _view_margin(evidence, self.goal[image], self.targeted)


class _DetectionObjective(_DefendedObjective):
    """Certified detection's output: the unmasked label, or `ALERT` when a one-mask view disagrees confidently.

    Every view the patch can change is pushed towards one wrong label `target` (targeted: the
    target; untargeted: the wrong class the clean views support most), unmasked image included:
    a view that shows the output's own label never alerts, whatever its confidence.
    """

    def __init__(self, *args):
        super().__init__(*args)
        from .defenses.detection import confident_labels

        model = self.model
        logits, views, _ = model._detection_logits(model._check_images(self.x))
        self.clean_views = views
        # (B, K) the clean one-mask views: their labels and whether they are confident (> tau)
        self.view_labels, self.view_confident = confident_labels(views, model.tau)
        if self.targeted:
            self.target = self.goal
        else:
            support = logits.softmax(-1) + views.softmax(-1).sum(1)
            self.target = support.scatter(1, self.y[:, None], -math.inf).argmax(1).to(self.y.device)

    def hopeless(self, image: int) -> torch.Tensor:
        """`(K,)` bool: the clean one-mask views that alert on any label but the target (a patch they hide cannot help)."""
        return self.view_confident[image] & (self.view_labels[image] != self.target[image])

    def loss(self, out: torch.Tensor, image: torch.Tensor, view: torch.Tensor) -> torch.Tensor:
        return _view_loss(out, self.target[image], True, self.loss_kind)

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        found = self.model.detect(x)
        return torch.where(found.alert, torch.full_like(found.prediction, ALERT), found.prediction)


class _PatchCleanserDetectionObjective(_TokenMasks, _DetectionObjective):
    """Views `0..K-1`: the image with mask `k` set to `fill`; view `K`: the unmasked image."""

    def __init__(self, *args):
        super().__init__(*args)
        mask_set = self._mask_set()
        self.k = len(mask_set)
        self.naive_views = self.k + 1
        self.boxes = torch.tensor(mask_set.boxes, dtype=torch.long, device=self.x.device)
        unmasked = torch.ones((1, *mask_set.image_size), dtype=torch.bool, device=self.x.device)
        self.keep = torch.cat([mask_set.keep_masks(self.x.device), unmasked])
        self.fill = fill_like(self.model.fill, self.x)

    # which masks hide the patch: PatchCleanser's own rule (pixels here, cells for PatchCURE)
    _mask_set = _PatchCleanserObjective._mask_set
    _footprint = _PatchCleanserObjective._footprint
    _cover = _PatchCleanserObjective._cover

    def guide(self, image: int, positions: torch.Tensor) -> torch.Tensor:
        # A view hiding the patch is fixed: one that already alerts on another label than the
        # target rules the position out; the more hiding views show the target, the better.
        cover = self._cover(positions)
        blocked = (cover & self.hopeless(image).to(cover.device)[None]).any(1)
        agree = (cover & (self.view_labels[image] == self.target[image]).to(cover.device)[None]).sum(1)
        return agree.float() / cover.sum(1).clamp(min=1) - 2.0 * blocked.float()

    def plan(self, image: torch.Tensor, loc: torch.Tensor) -> _Views:
        task, view = (~self._cover(loc)).nonzero(as_tuple=True)
        unmasked = torch.arange(loc.shape[0], device=loc.device)
        return _Views(task=torch.cat([unmasked, task]), view=torch.cat([torch.full_like(unmasked, self.k), view]))

    def render(self, x: torch.Tensor, view: torch.Tensor):
        return self._masked(x, self.keep[view], self.fill)


class _PatchGuardDetectionObjective(_DetectionObjective, _PatchGuardObjective):
    """One view per run, the image itself; the loss goes through PatchGuard++'s views of its local logits.

    The guide is PatchGuard's (the window of a position's features, `_PatchGuardObjective.guide`)
    on the detection views' own margins for the label: the smaller, the more promising.
    """

    def __init__(self, *args):
        super().__init__(*args)
        views = self.clean_views
        self.gap = _view_margin(views.flatten(0, 1), self.y.repeat_interleave(views.shape[1]), False).reshape(self.gap.shape)

    def loss(self, out: torch.Tensor, image: torch.Tensor, view: torch.Tensor) -> torch.Tensor:
        from .defenses.detection import window_views

        logits, views = window_views(out, self.model._window_for(out.shape[2:]))
        target = self.target[image]
        own = _view_loss(logits, target, True, self.loss_kind)
        each = _view_loss(views.flatten(0, 1), target.repeat_interleave(views.shape[1]), True, self.loss_kind)
        return own + each.reshape(views.shape[:2]).sum(1)


class _PatchCUREDetectionObjective(_PatchCleanserDetectionObjective):
    """PatchCleanser's detection surrogate on the feature grid: views `0..K-1` mask one feature mask, view `K` keeps every cell.

    The masks that hide a patch are those holding its footprint in cells; a view runs the SRF on
    the patched image and the LRF on the kept cells (or sums their local logits), as
    `_PatchCUREObjective` and the defense's own detection views do.
    """

    def __init__(self, *args):
        from .defenses.patchcure import _srf_geometry

        self.srf, self.lrf = args[0]._parts()
        self.geometry = _srf_geometry(self.srf)
        super().__init__(*args)

    counted = _PatchCUREObjective.__dict__["counted"]
    _mask_set = _PatchCUREObjective._mask_set
    _footprint = _PatchCUREObjective._footprint
    forward = _PatchCUREObjective.forward

    def render(self, x: torch.Tensor, view: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with eval_mode(self.srf):
            features = self.srf(self.model.resize_input(x))  # at input size, resized as the defense does
        return features, self.keep[view]


DETECTION_OBJECTIVES: dict[str, type[_Objective]] = {
    "patchcleanser": _PatchCleanserDetectionObjective,
    "patchguard": _PatchGuardDetectionObjective,
    "patchcure": _PatchCUREDetectionObjective,
}

OBJECTIVES: dict[str | None, type[_Objective]] = {
    None: _BaseModelObjective,
    "patchcleanser": _PatchCleanserObjective,
    "smoothing": _SmoothingObjective,
    "patchguard": _PatchGuardObjective,
    "patchcure": _PatchCUREObjective,
}


# ------------------------------------------------------------------------------------ locations
def _all_positions(image_size: tuple[int, int], patch: tuple[int, int], stride: int = 1, device=None) -> torch.Tensor:
    """`(P, 2)` patch corners every `stride` pixels, plus the corners flush with the far edges."""
    axes = []
    for n, p in zip(image_size, patch):
        starts = list(range(0, n - p + 1, stride))
        if starts[-1] != n - p:
            starts.append(n - p)
        axes.append(torch.tensor(starts, dtype=torch.long, device=device))
    return torch.cartesian_prod(*axes).reshape(-1, 2)


def _parse_locations(locations, batch: int, image_size: tuple[int, int], patch: tuple[int, int]):
    """`(kind, n, explicit)`: one of LOCATION_KINDS with its count or stride, or explicit `(B, N, 2)` positions."""
    if isinstance(locations, str):
        if locations not in ("all", "guided", "random"):
            raise ValueError(
                f"locations must be 'all', 'guided', 'random', an int, ('random'|'guided'|'grid', n) or positions; got {locations!r}"
            )
        return locations, DEFAULT_NUM_LOCATIONS, None
    if isinstance(locations, int) and not isinstance(locations, bool):
        return "random", positive_int(locations, "locations"), None
    if isinstance(locations, tuple) and len(locations) == 2 and isinstance(locations[0], str):
        kind, n = locations
        if kind not in ("random", "guided", "grid"):
            raise ValueError(f"locations as (kind, n) must have kind 'random', 'guided' or 'grid', got {kind!r}")
        return (
            kind,
            positive_int(n, f"locations[1] (the number of {kind} positions)" if kind != "grid" else "locations[1] (the grid stride)"),
            None,
        )
    try:
        explicit = torch.as_tensor(locations, dtype=torch.long) if not isinstance(locations, torch.Tensor) else locations.long()
    except (TypeError, ValueError) as error:
        raise TypeError(f"locations must be a string, an int, a (kind, n) pair or (top, left) positions; got {locations!r}") from error
    if explicit.ndim == 2:
        explicit = explicit[None].expand(batch, -1, -1)
    if explicit.ndim != 3 or explicit.shape[0] != batch or explicit.shape[2] != 2 or explicit.shape[1] == 0:
        raise ValueError(f"explicit locations must be (N, 2) or ({batch}, N, 2) (top, left) positions, got shape {tuple(explicit.shape)}")
    h, w = image_size
    ph, pw = patch
    bad = (explicit[..., 0] < 0) | (explicit[..., 0] > h - ph) | (explicit[..., 1] < 0) | (explicit[..., 1] > w - pw)
    if bool(bad.any()):
        raise ValueError(f"locations must keep the {ph}x{pw} patch inside the {h}x{w} image: top in [0, {h - ph}], left in [0, {w - pw}]")
    return "explicit", explicit.shape[1], explicit


def _choose(objective: _Objective, kind: str, n: int, explicit, image_size, patch, generator) -> list[torch.Tensor]:
    """Per image, the positions to try, most promising first."""
    device = objective.x.device
    batch = objective.x.shape[0]
    everywhere = _all_positions(image_size, patch, device=device)
    chosen = []
    for b in range(batch):
        if kind == "explicit":
            chosen.append(explicit[b].to(device))
            continue
        if kind == "grid":
            positions = _all_positions(image_size, patch, stride=n, device=device)
        else:
            positions = everywhere
        noise = torch.rand(positions.shape[0], generator=generator).to(device)
        if kind == "random":
            chosen.append(positions[noise.argsort()[: min(n, positions.shape[0])]])
            continue
        score = objective.guide(b, positions)
        order = noise.argsort() if score is None else torch.argsort(score.float() + 1e-3 * noise, descending=True)
        positions = positions[order]
        chosen.append(positions[:n] if kind == "guided" else positions)
    return chosen


# --------------------------------------------------------------------------------------- attack
def _check_args(steps, step_size, restarts, loss, batch_size) -> None:
    positive_int(steps, "steps")
    positive_int(restarts, "restarts")
    if isinstance(step_size, bool) or not isinstance(step_size, (int, float)) or not 0 < step_size <= 1:
        raise ValueError(f"step_size must be a float in (0, 1] (a fraction of the input range), got {step_size!r}")
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {', '.join(map(repr, LOSSES))}, got {loss!r}")
    if batch_size is not None:
        positive_int(batch_size, "batch_size")


def _defense_of(model: nn.Module) -> str | None:
    """The defense of a defended model, None for a plain classifier."""
    return getattr(model, "defense", None) or None


def _threat_patch(model: nn.Module, patch, image_size: tuple[int, int]) -> tuple[int, int]:
    if patch is None:
        own = getattr(model, "patch", None) if _defense_of(model) else None
        if own is None:
            raise ValueError("patch is required for a model without a defense (pass patch=side or (ph, pw) in pixels)")
        patch = own
    return patch_pixels(patch, image_size)


def attack(
    defended: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    patch: float | Sequence[int] | None = None,
    *,
    steps: int = DEFAULT_STEPS,
    step_size: float = DEFAULT_STEP_SIZE,
    restarts: int = DEFAULT_RESTARTS,
    locations: Locations = ("guided", DEFAULT_NUM_LOCATIONS),
    loss: str = "margin",
    targeted: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    batch_size: int | None = None,
    bounds: tuple | None = None,
    progress: bool = True,
    guarantee: str = "prediction",
) -> AttackResult:
    """Adaptive patch attack on the defended prediction, one image at a time.

    ```python
    result = robustwrap.attack(model, images, labels)          # the model's own threat model
    print(result.success_rate, result.location, result.prediction)
    ```

    For every image, location and restart the patch content starts uniformly at random in the
    valid input range, then takes `steps` sign-gradient steps of `step_size` times the range on
    a per-defense surrogate of the defended prediction (module docstring); only the patch
    pixels change, clamped to the range. Every `steps / 10` steps and at the end the exact
    `defended.predict` judges the candidate; an image stops at its first success.

    Defaults, and why: 150 steps of 0.05 of the range (the range of the patch-attack
    literature: a content can cross the whole range in 20 steps and still refine for 130), one
    random start per location and 20 locations ranked by the defense's evidence (guided): 20
    runs per image, as in the tens of restarts/locations the literature uses. A run costs its
    surrogate views per step, a small fraction of the defense's views (`views_per_step` vs
    `naive_views_per_step`).

    Args:
        defended: a defended model (`robustwrap.wrap(...)`) or a plain classifier (then the
            attack is on its logits and `patch` is required).
        x: `(B, C, H, W)` images, as the model expects them.
        y: `(B,)` labels.
        patch: side in pixels, area fraction, or `(ph, pw)`; None: the defended model's own
            threat model (`defended.patch`).
        steps: gradient steps per run.
        step_size: step as a fraction of each channel's input range.
        restarts: random starts per location.
        locations: where to put the patch; see `Locations` (`"all"`, `"random"`, `n`,
            `("random", n)`, `"guided"`, `("guided", n)`, `("grid", stride)`, or positions).
            `"guided"` ranks positions by the clean evidence of the defense: PatchCleanser, the
            positions whose hiding masks' two-mask rows already disagree; smoothing, the
            positions whose views vote least for the label; PatchGuard, the window of smallest
            certified margin. `"all"` tries every position, in that order.
        loss: `"margin"` (a hinge on each view's logit margin; default) or `"ce"`.
        targeted: `(B,)` target labels for a targeted attack (success = prediction is the
            target); None: untargeted (success = prediction is not `y`).
        generator: random starts and random positions (None: torch's global generator).
        batch_size: views per forward pass of the surrogate (None: `defended.batch_size`, or 64).
        bounds: `(low, high)` valid input range (floats or one per channel); None: from the
            base model's timm `pretrained_cfg` mean/std.
        progress: show a tqdm bar over the runs.
        guarantee: `"prediction"`: break `defended.predict`; `"detection"`: break certified
            detection, i.e. make `defended.detect` output a wrong label (untargeted) or the
            target (targeted) *without* an alert; an alert counts as a failure, and
            `prediction` is `ALERT` there. The surrogate pushes the unmasked image and every
            one-mask view the patch can change towards one wrong label (the module docstring).

    Returns:
        The `AttackResult`.

    Raises:
        TypeError, ValueError: for bad images, labels, patch, locations or settings, when no
            input range is known, and for `guarantee="detection"` on a model without
            certified detection (the message says why), before any forward pass.
    """
    setup = _setup(defended, x, y, patch, targeted, steps, step_size, restarts, loss, batch_size, bounds, guarantee)
    kind, n, explicit = _parse_locations(locations, setup.x.shape[0], setup.image_size, setup.patch)
    return _attack(
        setup, lambda objective: _choose(objective, kind, n, explicit, setup.image_size, setup.patch, generator), generator, progress
    )


@dataclass
class _Setup:
    """Validated attack arguments, on the base model's device."""

    defended: nn.Module
    defense: str | None
    base: nn.Module
    x: torch.Tensor
    y: torch.Tensor
    goal: torch.Tensor
    targeted: bool
    patch: tuple[int, int]
    image_size: tuple[int, int]
    bounds: tuple[torch.Tensor, torch.Tensor]
    steps: int
    step_size: float
    restarts: int
    loss: str
    batch_size: int
    guarantee: str = "prediction"


def _check_guarantee(defended: nn.Module, guarantee) -> None:
    """`guarantee` is one of GUARANTEES, and a detection attack has a detection rule to attack."""
    if guarantee not in GUARANTEES:
        raise ValueError(f"guarantee must be one of {', '.join(map(repr, GUARANTEES))}, got {guarantee!r}")
    if guarantee != "detection":
        return
    defense = _defense_of(defended)
    if defense is None:
        raise ValueError("guarantee='detection' attacks certified detection, which a plain classifier does not have: wrap it first")
    reason = getattr(defended, "_no_detection", None)
    if reason is not None:
        raise ValueError(f"guarantee='detection': {type(defended).__name__} cannot detect, since {reason}")
    if defense not in DETECTION_OBJECTIVES:
        raise ValueError(f"guarantee='detection': no detection attack for defense {defense!r}; known: {', '.join(DETECTION_OBJECTIVES)}")


def _setup(defended, x, y, patch, targeted, steps, step_size, restarts, loss, batch_size, bounds, guarantee="prediction") -> _Setup:
    """Check every argument before any forward pass."""
    if not isinstance(defended, nn.Module):
        raise TypeError(f"defended must be a robustwrap defended model or an nn.Module, got {type(defended).__name__}")
    if not isinstance(x, torch.Tensor) or x.ndim != 4 or not x.is_floating_point() or x.shape[0] == 0:
        raise ValueError(f"x must be a non-empty floating (B, C, H, W) tensor, got {getattr(x, 'shape', type(x).__name__)}")
    _check_args(steps, step_size, restarts, loss, batch_size)
    _check_guarantee(defended, guarantee)
    b = x.shape[0]
    y = as_labels(y, b, "y")
    goal = y if targeted is None else as_labels(targeted, b, "targeted")
    defense = _defense_of(defended)
    if defense not in OBJECTIVES:
        raise ValueError(f"no attack objective for defense {defense!r}; known: {', '.join(str(d) for d in OBJECTIVES if d)}")
    image_size = (x.shape[2], x.shape[3])
    if defense is not None and tuple(defended.input_size) != image_size:
        raise ValueError(f"x must be {defended.input_size[0]}x{defended.input_size[1]} for this model, got {image_size[0]}x{image_size[1]}")
    ph, pw = _threat_patch(defended, patch, image_size)
    low, high = input_bounds(defended, bounds, x.shape[1])
    if batch_size is None:
        batch_size = getattr(defended, "batch_size", None) if defense is not None else None
        batch_size = batch_size if isinstance(batch_size, int) else 64
    base = defended.model if defense is not None else defended
    device, dtype = model_device_dtype(base)
    return _Setup(
        defended=defended,
        defense=defense,
        base=base,
        x=x.detach().to(device=device, dtype=dtype),
        y=y.to(device),
        goal=goal.to(device),
        targeted=targeted is not None,
        patch=(ph, pw),
        image_size=image_size,
        bounds=(low, high),
        steps=int(steps),
        step_size=float(step_size),
        restarts=int(restarts),
        loss=loss,
        batch_size=int(batch_size),
        guarantee=guarantee,
    )


def _attack(setup: _Setup, pick: Callable[[_Objective], list[torch.Tensor]], generator, progress: bool) -> AttackResult:
    """Build the defense's objective from the clean images, pick positions, search."""
    counter = _Counter(OBJECTIVES[setup.defense].counted(setup.base))
    try:
        with eval_mode(setup.base), torch.no_grad():
            objectives = DETECTION_OBJECTIVES if setup.guarantee == "detection" else OBJECTIVES
            objective = objectives[setup.defense](setup.defended, setup.x, setup.y, setup.goal, setup.targeted, setup.patch, setup.loss)
        result = _search(
            objective,
            pick(objective),
            steps=setup.steps,
            step_size=setup.step_size,
            restarts=setup.restarts,
            bounds=setup.bounds,
            generator=generator,
            batch_size=setup.batch_size,
            progress=progress,
            counter=counter,
        )
        return dataclasses.replace(result, guarantee=setup.guarantee)
    finally:
        counter.close()


def _search(
    objective: _Objective, per_image: list[torch.Tensor], *, steps, step_size, restarts, bounds, generator, batch_size, progress, counter
) -> AttackResult:
    """Run `restarts` PGD runs at each image's positions, in waves that batch many runs together."""
    x, goal, targeted = objective.x, objective.goal, objective.targeted
    device = x.device
    b, c = x.shape[:2]
    ph, pw = objective.patch
    low, high = (v.to(device).reshape(1, c, 1, 1) for v in bounds)
    step = step_size * (high - low)
    # Runs in order: restart-major, so each image tries all its positions before a second start.
    queue = [[(loc, r) for r in range(restarts) for loc in locs] for locs in per_image]
    cursor = [0] * b
    done = torch.zeros(b, dtype=torch.bool, device=device)
    best_loss = torch.full((b,), math.inf, device=device)
    best_patch = torch.zeros(b, c, ph, pw, device=device)
    best_loc = torch.zeros(b, 2, dtype=torch.long, device=device)
    best_pred = torch.full((b,), -1, dtype=torch.long, device=device)
    objective_views = objective_steps = 0
    check_every = max(1, steps // CHECKS_PER_RUN)
    total_runs = sum(len(q) for q in queue)
    bar = _progress(progress, total_runs)
    base = objective.base

    def met(pred: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        # an alert (detection) is never a success, whatever the goal
        return (pred != ALERT) & (pred == goal[image] if targeted else pred != goal[image])

    while True:
        open_images = [i for i in range(b) if not done[i] and cursor[i] < len(queue[i])]
        if not open_images:
            break
        # A wave: the next runs of every unfinished image, about WAVE_BATCHES forward passes per step.
        sample = torch.stack([queue[i][cursor[i]][0] for i in open_images])
        per_run = max(1, objective.plan(torch.tensor(open_images, device=device), sample).task.numel() // len(open_images))
        take = max(1, (WAVE_BATCHES * batch_size) // (per_run * len(open_images)))
        image_list, loc_list = [], []
        for i in open_images:
            runs = queue[i][cursor[i] : cursor[i] + take]
            cursor[i] += len(runs)
            image_list += [i] * len(runs)
            loc_list += [loc for loc, _ in runs]
        image = torch.tensor(image_list, dtype=torch.long, device=device)
        loc = torch.stack(loc_list).to(device)
        t = image.numel()
        patch = low + (high - low) * torch.rand(t, c, ph, pw, generator=generator).to(device)
        views = objective.plan(image, loc)
        active = torch.ones(t, dtype=torch.bool, device=device)
        run_loss = torch.full((t,), math.inf, device=device)
        for s in range(steps + 1):
            if s % check_every == 0 or s == steps:
                live = active.nonzero()[:, 0]
                with eval_mode(base), torch.no_grad():
                    pred = _predict(objective, _paste(x[image[live]], patch[live], loc[live]), batch_size)
                hit = met(pred, image[live])
                if s == steps:
                    _keep_best(live, image, patch, loc, pred, run_loss, best_loss, best_patch, best_loc, best_pred)
                if hit.any():
                    winners = live[hit]
                    # One success per image: the first run of that image that succeeded.
                    for w in winners.tolist():
                        i = int(image[w])
                        if not done[i]:
                            done[i] = True
                            best_patch[i], best_loc[i], best_pred[i] = patch[w], loc[w], pred[(live == w).nonzero()[0, 0]]
                    active &= ~done[image]
            if s == steps or not active.any():
                break
            grad, run_loss, used = _gradient(objective, x, image, loc, patch, views, active, batch_size)
            objective_views += used
            objective_steps += int(active.sum())
            patch = torch.where(active[:, None, None, None], patch - step * grad.sign(), patch)
            patch = torch.maximum(torch.minimum(patch, high), low)
        bar.update(t)
    bar.close()

    x_adv = _paste(x, best_patch, best_loc)
    success = met(best_pred, torch.arange(b, device=device))
    return AttackResult(
        x_adv=x_adv,
        success=success,
        location=best_loc,
        patch=best_patch,
        prediction=best_pred,
        forward_passes=counter.calls,
        num_views=counter.images,
        objective_views=objective_views,
        objective_steps=objective_steps,
        naive_views_per_step=objective.naive_views,
    )


def _keep_best(live, image, patch, loc, pred, run_loss, best_loss, best_patch, best_loc, best_pred) -> None:
    """For images not yet attacked successfully: keep the run whose surrogate loss ended lowest."""
    for n, w in enumerate(live.tolist()):
        i = int(image[w])
        if float(run_loss[w]) < float(best_loss[i]) or int(best_pred[i]) < 0:
            best_loss[i] = run_loss[w]
            best_patch[i], best_loc[i], best_pred[i] = patch[w], loc[w], pred[n]


def _predict(objective: _Objective, x: torch.Tensor, batch_size: int) -> torch.Tensor:
    if x.shape[0] == 0:
        return torch.zeros(0, dtype=torch.long, device=x.device)
    return torch.cat([objective.predict(x[s : s + batch_size]).to(x.device) for s in range(0, x.shape[0], batch_size)])


def _gradient(objective: _Objective, x, image, loc, patch, views: _Views, active, batch_size) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Sum over each run's surrogate views of the per-view loss: its gradient w.r.t. the patch and its value."""
    keep = active[views.task]
    task, view = views.task[keep], views.view[keep]
    grad = torch.zeros_like(patch)
    total = torch.zeros(patch.shape[0], device=patch.device)
    leaf = patch.detach().requires_grad_(True)
    with eval_mode(objective.base), torch.enable_grad(), objective.autocast():
        for s in range(0, task.numel(), batch_size):
            tc, vc = task[s : s + batch_size], view[s : s + batch_size]
            xa = _paste(x[image[tc]], leaf[tc], loc[tc])
            out = objective.forward(objective.render(xa, vc))
            losses = objective.loss(out, image[tc], vc).float()
            (g,) = torch.autograd.grad(losses.sum(), leaf)
            grad += g
            total.index_add_(0, tc, losses.detach())
    total = torch.where(active, total, torch.full_like(total, math.inf))
    return grad, total, int(task.numel())


def _progress(enabled: bool, total: int):
    if enabled:
        from tqdm.auto import tqdm

        return tqdm(total=total, desc="attack", unit="run", leave=False)
    return _NoBar()


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


# ---------------------------------------------------------------------------------------- audit
@dataclass(frozen=True)
class AuditRecord:
    """One image of an audit.

    Attributes:
        index: position of the image in the data.
        label: its label.
        prediction: the defended prediction of the clean image (detection: its label, or `ALERT`).
        certified: the certificate said no patch can change the prediction (and it is right);
            detection: no patch can make the output a wrong label without an alert.
        attacked: the attack ran on it (only correctly predicted images are attacked).
        positions: patch positions the attack tried (`-1`: not attacked).
        success: the attack changed the prediction (detection: to a wrong label without an alert).
        adversarial_prediction: the exact prediction of the attacked image (`-1`: not attacked).
        location: `(top, left)` of the best patch (`None`: not attacked).
    """

    index: int
    label: int
    prediction: int
    certified: bool
    attacked: bool
    positions: int
    success: bool
    adversarial_prediction: int
    location: tuple[int, int] | None

    @property
    def robust(self) -> bool:
        """Correct, and the attack did not change it: counts for the empirical robust accuracy."""
        return self.prediction == self.label and not self.success


@dataclass(frozen=True)
class AuditFinding:
    """A certified image whose prediction the attack changed: a bug in robustwrap, with its reproduction.

    Attributes:
        index: position of the image in the data.
        label: its label (also the certified prediction).
        adversarial_prediction: the exact defended prediction with the patch.
        location: `(top, left)` of the patch.
        image: `(C, H, W)` the clean image, in the model's input space.
        patch: `(C, ph, pw)` the patch content.
        files: the reproduction files written (`.safetensors` with `image`, `x_adv`, `patch`;
            `.json` with label, location and the model's settings), empty without `output`.
    """

    index: int
    label: int
    adversarial_prediction: int
    location: tuple[int, int]
    image: torch.Tensor = field(repr=False)
    patch: torch.Tensor = field(repr=False)
    files: tuple[str, ...] = ()


@dataclass
class AuditReport:
    """Clean, certified and empirical robust accuracy side by side, and any broken certificate.

    Attributes:
        defense: the defense audited (None for an undefended model).
        settings: the defended model's `settings()`, when it has them.
        patch: `(ph, pw)` of the attack, in pixels.
        attack: the attack's settings (steps, step size, restarts, budget).
        records: one `AuditRecord` per image.
        findings: certified images the attack flipped; empty when every certificate held.
        guarantee: what was certified and attacked, one of `GUARANTEES`.
    """

    defense: str | None
    settings: dict
    patch: tuple[int, int]
    attack: dict
    records: list[AuditRecord]
    findings: list[AuditFinding]
    guarantee: str = "prediction"

    @property
    def ok(self) -> bool:
        """True when no certified image was flipped."""
        return not self.findings

    @property
    def num_images(self) -> int:
        return len(self.records)

    def _fraction(self, count: int) -> float:
        return count / self.num_images if self.records else 0.0

    @property
    def clean_accuracy(self) -> float:
        """Defended prediction correct, without a patch."""
        return self._fraction(sum(r.prediction == r.label for r in self.records))

    @property
    def certified_accuracy(self) -> float:
        """Correct and certified: a lower bound on the accuracy under any patch."""
        return self._fraction(sum(r.certified for r in self.records))

    @property
    def empirical_accuracy(self) -> float:
        """Correct and not flipped by this attack: an upper bound on the accuracy under any patch.

        At least the certified accuracy unless a certificate is wrong (then `findings` lists it).
        """
        return self._fraction(sum(r.robust for r in self.records))

    def summary(self) -> str:
        """A text table of the three accuracies and the certificate check."""
        n = self.num_images

        def count(pred) -> int:
            return sum(1 for r in self.records if pred(r))

        clean, cert, emp = count(lambda r: r.prediction == r.label), count(lambda r: r.certified), count(lambda r: r.robust)
        attacked_cert = count(lambda r: r.certified and r.attacked)
        flipped = count(lambda r: r.attacked and not r.certified and r.success)
        uncert = count(lambda r: r.attacked and not r.certified)
        a = self.attack
        detection = self.guarantee == "detection"
        check = (
            f"OK: none of {attacked_cert} certified images flipped"
            if self.ok
            else f"FAILED: {len(self.findings)} certified image(s) flipped (a robustwrap bug): {[f.index for f in self.findings]}"
        )
        rows = [
            ("defense", str(self.defense)),
            *(
                [("guarantee", f"certified detection at tau {self.settings.get('tau', 0):g}: a wrong label without an alert breaks it")]
                if detection
                else []
            ),
            ("patch", f"{self.patch[0]}x{self.patch[1]} px"),
            ("attack", f"{a['steps']} steps of {a['step_size']}, {a['restarts']} restart(s), budget {a['budget']:,} views/image"),
            ("", ""),
            ("clean accuracy without alert" if detection else "clean accuracy", f"{self._fraction(clean):.2%}  ({clean}/{n})"),
            ("certified detection accuracy" if detection else "certified accuracy", f"{self._fraction(cert):.2%}  ({cert}/{n})"),
            ("empirical robust accuracy", f"{self._fraction(emp):.2%}  ({emp}/{n})  attack flipped {flipped} of {uncert} uncertified"),
            ("certificates", check),
        ]
        width = max(len(k) for k, _ in rows)
        lines = ["robustwrap audit", "-" * 72] + [f"  {k:<{width}}  {v}".rstrip() for k, v in rows]
        return "\n".join(lines)

    def to_dict(self) -> dict:
        """JSON-ready: settings, the three accuracies, findings (without tensors) and every record."""
        return {
            "defense": self.defense,
            "guarantee": self.guarantee,
            "settings": self.settings,
            "patch": list(self.patch),
            "attack": self.attack,
            "num_images": self.num_images,
            "clean_accuracy": self.clean_accuracy,
            "certified_accuracy": self.certified_accuracy,
            "empirical_accuracy": self.empirical_accuracy,
            "ok": self.ok,
            "findings": [
                {
                    "index": f.index,
                    "label": f.label,
                    "adversarial_prediction": f.adversarial_prediction,
                    "location": list(f.location),
                    "files": list(f.files),
                }
                for f in self.findings
            ],
            "records": [
                {
                    **{
                        k: getattr(r, k)
                        for k in ("index", "label", "prediction", "certified", "attacked", "positions", "success", "adversarial_prediction")
                    },
                    "location": list(r.location) if r.location is not None else None,
                }
                for r in self.records
            ],
        }

    def save(self, path: str | Path) -> Path:
        """Write `to_dict()` as JSON."""
        path = Path(path)
        path.write_text(json.dumps(self.to_dict(), indent=1))
        return path


def _batches(data, batch_size: int, limit: int | None) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """`(first index, images, labels)` from `(x, y)` tensors, a map-style Dataset or a DataLoader."""
    from torch.utils.data import DataLoader, Dataset

    if isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data):
        x, y = data
        n = x.shape[0] if limit is None else min(limit, x.shape[0])
        for s in range(0, n, batch_size):
            yield s, x[s : min(s + batch_size, n)], y[s : min(s + batch_size, n)]
        return
    if isinstance(data, DataLoader):
        seen = 0
        for x, y in data:
            if limit is not None and seen >= limit:
                return
            if limit is not None:
                x, y = x[: limit - seen], y[: limit - seen]
            yield seen, x, torch.as_tensor(y)
            seen += x.shape[0]
        return
    if isinstance(data, Dataset) and hasattr(data, "__len__"):
        n = len(data) if limit is None else min(limit, len(data))
        for s in range(0, n, batch_size):
            items = [data[i] for i in range(s, min(s + batch_size, n))]
            yield s, torch.stack([torch.as_tensor(item[0]) for item in items]), torch.tensor([int(item[1]) for item in items])
        return
    raise TypeError(f"data must be a (images, labels) pair of tensors, a map-style Dataset or a DataLoader, got {type(data).__name__}")


def _within_budget(objective: _Objective, image_size, steps: int, restarts: int, budget: int, generator) -> list[torch.Tensor]:
    """Per image: every position if its surrogate views fit in `budget`, else the best-ranked prefix that does."""
    positions = _choose(objective, "all", 0, None, image_size, objective.patch, generator)
    chosen = []
    for b, order in enumerate(positions):
        views = objective.plan(torch.full((order.shape[0],), b, device=order.device), order)
        per_position = torch.bincount(views.task, minlength=order.shape[0]) * steps * restarts
        fits = int((per_position.cumsum(0) <= budget).sum())
        chosen.append(order[: max(1, fits)])
    return chosen


def audit(
    defended: nn.Module,
    data,
    *,
    patch: float | Sequence[int] | None = None,
    steps: int = DEFAULT_STEPS,
    step_size: float = DEFAULT_STEP_SIZE,
    restarts: int = DEFAULT_RESTARTS,
    budget: int = DEFAULT_BUDGET,
    limit: int | None = None,
    batch_size: int = 32,
    bounds: tuple | None = None,
    seed: int = 0,
    output: str | Path | None = None,
    progress: bool = True,
    guarantee: str = "prediction",
) -> AuditReport:
    """Certify, then attack every correctly predicted image; a flipped certified image is a bug.

    ```python
    report = robustwrap.audit(model, dataset, limit=100, output="audit")
    print(report.summary())          # clean, certified and empirical robust accuracy
    assert report.ok, report.findings
    ```

    Each image gets the strongest attack that fits `budget`: every patch position when the
    surrogate views of all of them (`steps x restarts` steps each) fit, else the positions the
    defense's evidence ranks highest, as many as fit. A certified image whose exact prediction
    the attack changes is reported in `findings`, and with `output` saved as a reproduction:
    `finding-<index>.safetensors` (`image`, `x_adv`, `patch`) and `finding-<index>.json`
    (label, predictions, location, the model's settings).

    Args:
        defended: the defended model.
        data (tuple | Dataset | DataLoader): `(images, labels)` tensors, a map-style `Dataset`
            of `(image, label)` or a `DataLoader`, with images as the model expects them.
        patch: the attack's patch; None: the model's own threat model (the one certified).
        steps: as in `robustwrap.attack`.
        step_size: as in `robustwrap.attack`.
        restarts: as in `robustwrap.attack`.
        budget: surrogate views per image (through the base model) the attack may spend.
        limit: audit the first `limit` images only.
        batch_size: images per certification and attack batch.
        bounds: the valid input range, as in `robustwrap.attack`.
        seed: seeds the random starts, so an audit is reproducible.
        output: folder for reproductions of findings (created when there is one).
        progress: show a tqdm bar over the images.
        guarantee: `"prediction"`: certify with `certify`, attack `predict`; `"detection"`:
            certify with `certify_detection` and attack `detect` (`robustwrap.attack`'s
            `guarantee`): the images attacked are those output correctly without an alert, and
            a certified image attacked into a wrong label without an alert is a finding.

    Returns:
        The `AuditReport`; `report.ok` is False when a certificate was broken.

    Raises:
        TypeError, ValueError: for bad data or settings, and for `guarantee="detection"` on a
            model without certified detection, before the first forward pass.
    """
    defense = _defense_of(defended)
    if defense is None:
        raise TypeError(f"audit needs a defended model with a certify method, got a plain {type(defended).__name__}")
    positive_int(budget, "budget")
    positive_int(batch_size, "batch_size")
    if limit is not None:
        positive_int(limit, "limit")
    _check_args(steps, step_size, restarts, "margin", None)
    _check_guarantee(defended, guarantee)
    detection = guarantee == "detection"
    generator = torch.Generator().manual_seed(int(seed))
    records: list[AuditRecord] = []
    findings: list[AuditFinding] = []
    total = (
        None
        if limit is None and not hasattr(data, "__len__")
        else (limit if limit is not None else len(data[0] if isinstance(data, (tuple, list)) else data))
    )
    bar = _progress(progress, total or 0)
    ph_pw = None
    for first, x, y in _batches(data, batch_size, limit):
        y = as_labels(y, x.shape[0], "labels")
        result = defended.certify_detection(x, y) if detection else defended.certify(x, y)
        prediction, certified = result.prediction.cpu(), result.certified.cpu()
        if detection:  # an alert is not a correct output: such images are not attacked
            prediction = torch.where(result.alert.cpu(), torch.full_like(prediction, ALERT), prediction)
        correct = (prediction == y.cpu()).nonzero()[:, 0]
        outcome = None
        if correct.numel():
            setup = _setup(defended, x[correct], y[correct], patch, None, steps, step_size, restarts, "margin", None, bounds, guarantee)
            ph_pw = setup.patch
            chosen: list[torch.Tensor] = []

            def pick(objective, chosen=chosen, image_size=setup.image_size):
                chosen.extend(_within_budget(objective, image_size, steps, restarts, budget, generator))
                return chosen

            outcome = _attack(setup, pick, generator, progress=False)
        row = {int(c): n for n, c in enumerate(correct.tolist())}
        for n in range(x.shape[0]):
            index = first + n
            a = row.get(n)
            if a is None:
                records.append(AuditRecord(index, int(y[n]), int(prediction[n]), bool(certified[n]), False, -1, False, -1, None))
                continue
            success = bool(outcome.success[a])
            location = tuple(int(v) for v in outcome.location[a])
            records.append(
                AuditRecord(
                    index,
                    int(y[n]),
                    int(prediction[n]),
                    bool(certified[n]),
                    True,
                    int(chosen[a].shape[0]),
                    success,
                    int(outcome.prediction[a]),
                    location,
                )
            )
            if success and bool(certified[n]):
                findings.append(_finding(defended, index, x[n], int(y[n]), outcome, a, output))
        bar.update(x.shape[0])
    bar.close()
    if ph_pw is None:
        ph_pw = _threat_patch(defended, patch, tuple(defended.input_size))
    settings = defended.settings() if callable(getattr(defended, "settings", None)) else {}
    attack_settings = {"steps": steps, "step_size": step_size, "restarts": restarts, "budget": budget, "seed": seed}
    return AuditReport(
        defense=defense, settings=settings, patch=ph_pw, attack=attack_settings, records=records, findings=findings, guarantee=guarantee
    )


def _finding(defended, index: int, image: torch.Tensor, label: int, outcome: AttackResult, a: int, output) -> AuditFinding:
    """Record (and with `output`, save) a certified image the attack flipped."""
    location = tuple(int(v) for v in outcome.location[a])
    files: tuple[str, ...] = ()
    if output is not None:
        import safetensors.torch

        folder = Path(output)
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {
            "image": image.detach().cpu().float().contiguous(),
            "x_adv": outcome.x_adv[a].detach().cpu().float().contiguous(),
            "patch": outcome.patch[a].detach().cpu().float().contiguous(),
        }
        weights = folder / f"finding-{index}.safetensors"
        safetensors.torch.save_file(tensors, str(weights))
        meta = {
            "index": index,
            "label": label,
            "certified_prediction": label,
            "adversarial_prediction": int(outcome.prediction[a]),
            "location": list(location),
            "patch_size": list(outcome.patch.shape[2:]),
            "settings": defended.settings() if callable(getattr(defended, "settings", None)) else None,
            "reproduce": (
                "certify_detection(image[None], label) says certified, yet detect(x_adv[None]) outputs another label without an alert; "
                if outcome.guarantee == "detection"
                else "certify(image[None], label) says certified, yet predict(x_adv[None]) != label; "
            )
            + "x_adv is image with patch pasted at location (top, left)",
        }
        note = folder / f"finding-{index}.json"
        note.write_text(json.dumps(meta, indent=1))
        files = (str(weights), str(note))
    return AuditFinding(
        index=index,
        label=label,
        adversarial_prediction=int(outcome.prediction[a]),
        location=location,
        image=image.detach().cpu(),
        patch=outcome.patch[a].detach().cpu(),
        files=files,
    )
