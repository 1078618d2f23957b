"""PatchCleanser: the double-masking rule, its view scheduling, and the defended classifier.

Xiang, Mahloujifar, Mittal, "PatchCleanser", USENIX Security 2022. The rules implemented here
are written out on the Concepts page (`docs/concepts.md#double-masking` and
`docs/concepts.md#certification`).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from .._args import as_image_size, as_labels
from ..geometry import MaskSet, patch_pixels
from ..tokens import SUPPORTED, TokenGrid, forward_kept, token_grid, token_keep
from ..views import (
    ViewRunner,
    auto_channels_last,
    eval_mode,
    fill_like,
    forward_views,
    mask_images,
    model_device_dtype,
    row_pairs,
    triangle_pairs,
)
from .base import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_MARGIN,
    DEFAULT_PATCH,
    CertifyResult,
    RobustPatchClassifier,
    TrainingRecipe,
    resolve_image_size,
    resolve_input_size,
)
from .detection import DEFAULT_TAU

__all__ = ["PatchCleanser", "PatchCleanserResult", "token_mask_set"]

# ----------------------------------------------------------------------------------- rule
CASE_UNANIMOUS = 1  # Case I: every one-mask label agrees
CASE_DISAGREER = 2  # Case II: a disagreeing mask whose whole two-mask row agrees with it
CASE_MAJORITY = 3  # Case III: fall back to the majority one-mask label


@dataclass(frozen=True)
class Decision:
    """The double-masking decision for a batch.

    Attributes:
        label: `(B,)` the robust prediction.
        case: `(B,)` 1, 2 or 3 (Case I, II, III of the double-masking rule).
        winner: `(B,)` the mask `i` whose row decided a Case II image, `-1` otherwise.
        majority: `(B,)` the majority one-mask label (smallest class id on ties).
    """

    label: torch.Tensor
    case: torch.Tensor
    winner: torch.Tensor
    majority: torch.Tensor


def majority(one_mask: torch.Tensor) -> torch.Tensor:
    """The most frequent label of each row of `(B, K)` one-mask labels; ties go to the smallest id."""
    num_classes = int(one_mask.max()) + 1
    counts = torch.zeros(one_mask.shape[0], num_classes, dtype=torch.long, device=one_mask.device)
    counts.scatter_add_(1, one_mask, torch.ones_like(one_mask))
    return counts.argmax(1)  # argmax returns the first maximum: the smallest class id


def disagreers(one_mask: torch.Tensor) -> torch.Tensor:
    """`(B, K)` bool: the masks whose one-mask label differs from the majority."""
    return one_mask != majority(one_mask)[:, None]


def _rows_agree(one_mask: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """`(B, K)` bool: row `i` is complete and every `P_ij` equals `P_i` (diagonal included)."""
    return (grid == one_mask[:, :, None]).all(dim=2)


def decide(one_mask: torch.Tensor, grid: torch.Tensor) -> Decision:
    """Apply the double-masking rule (`docs/concepts.md#double-masking`).

    Args:
        one_mask: `(B, K)` long, `P_i`.
        grid: `(B, K, K)` long, `P_ij`; only the rows of disagreeing masks are read, and `-1`
            marks a view that was not evaluated (its row then counts as not agreeing).

    Returns:
        The `Decision`: Case I if all `P_i` agree; else Case II with the first (smallest `i`)
        disagreer whose whole row equals `P_i`; else Case III with the majority label.
    """
    y_maj = majority(one_mask)
    disagree = one_mask != y_maj[:, None]
    wins = disagree & _rows_agree(one_mask, grid)
    has_winner = wins.any(1)
    winner = torch.where(has_winner, wins.int().argmax(1), torch.full_like(y_maj, -1))
    unanimous = ~disagree.any(1)
    label = torch.where(has_winner, one_mask.gather(1, winner.clamp(min=0)[:, None])[:, 0], y_maj)
    case = torch.full_like(y_maj, CASE_MAJORITY)
    case[has_winner] = CASE_DISAGREER
    case[unanimous] = CASE_UNANIMOUS
    return Decision(label=label, case=case, winner=winner, majority=y_maj)


def certified(grid: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The certification rule: `(B,)` bool, True iff `P_ij == y` for every `i <= j`.

    A view left at `-1` (not evaluated) never equals a label, so an image is only certified when
    its whole upper triangle, diagonal included, was evaluated and agrees with `target`.
    """
    k = grid.shape[1]
    upper = torch.triu(torch.ones(k, k, dtype=torch.bool, device=grid.device))
    return ((grid == target[:, None, None]) | ~upper).all(dim=2).all(dim=1)


def rows_to_cancel(
    row_image: torch.Tensor, row_mask: torch.Tensor, done: torch.Tensor, failed: torch.Tensor, num_images: int | None = None
) -> torch.Tensor:
    """Which pending two-mask rows can no longer change a Case II decision.

    In Case II the first (smallest `i`) agreeing disagreer row wins. Once every row of an image
    below some row has failed and that row has agreed completely, the rows after it are moot.

    Args:
        row_image: `(G,)` the image of each row.
        row_mask: `(G,)` the mask index `i` of each row.
        done: `(G,)` the row was fully evaluated and agreed.
        failed: `(G,)` some view of the row disagreed.
        num_images: more than the largest image index (e.g. the batch size); given, the call
            does not synchronise with the device.

    Returns:
        `(G,)` bool: rows to stop evaluating.
    """
    if row_image.numel() == 0:
        return torch.zeros_like(done)
    big = torch.iinfo(torch.long).max
    size = int(row_image.max()) + 1 if num_images is None else num_images
    first_open = torch.full((size,), big, dtype=torch.long, device=row_image.device)
    first_open.scatter_reduce_(0, row_image, torch.where(failed, big, row_mask), reduce="amin")
    # The first row that has not failed is the only candidate winner; if it is done, it won.
    first = first_open[row_image]
    winner_done = torch.zeros_like(first_open, dtype=torch.bool)
    winner_done.scatter_reduce_(0, row_image, done & (row_mask == first), reduce="amax")
    return winner_done[row_image] & (row_mask > first)


def label_margins(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """`logit_y - max_{c != y} logit_c` for each view and label: `(..., C)` logits, `(...)` labels.

    Positive: the view shows `y`, by that much; the margin guard compares it with `margin`
    (docs/concepts.md#margin). Also the fail-fast score: the smaller, the likelier a view
    with that mask disagrees.
    """
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    mine = logits.gather(-1, labels[..., None])
    others = logits.scatter(-1, labels[..., None], -math.inf)
    return (mine - others.amax(-1, keepdim=True))[..., 0]


def pair_priority(one_margin: torch.Tensor, pairs: torch.Tensor) -> torch.Tensor:
    """Fail-fast order of two-mask views `(image, i, j)`: the sum of the one-mask margins of `i`
    and `j` (`one_margin (B, K)`, see `label_margins`); the smallest first."""
    return one_margin[pairs[:, 0], pairs[:, 1]] + one_margin[pairs[:, 0], pairs[:, 2]]


def _grid(one_mask: torch.Tensor, pairs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The symmetric `(B, K, K)` label grid: one-mask labels on the diagonal, `-1` where not evaluated."""
    b, k = one_mask.shape
    grid = torch.full((b, k, k), -1, dtype=torch.long, device=one_mask.device)
    grid[pairs[:, 0], pairs[:, 1], pairs[:, 2]] = labels
    grid[pairs[:, 0], pairs[:, 2], pairs[:, 1]] = labels
    idx = torch.arange(k, device=one_mask.device)
    grid[:, idx, idx] = one_mask
    return grid


def _robust_logits(decision, one_mask, one_logits, row_image, row_mask, row_logit_sum) -> torch.Tensor:
    """Mean logits of the views that voted for the robust label (`docs/concepts.md#double-masking`)."""
    b, k = one_mask.shape
    voters = one_mask == decision.label[:, None]  # Case I: all K; Case III: the majority
    logits = (one_logits * voters[..., None]).sum(1) / voters.sum(1, keepdim=True)
    case2 = decision.case == CASE_DISAGREER
    if case2.any():
        row_of = torch.full((b, k), -1, dtype=torch.long, device=one_mask.device)
        row_of[row_image, row_mask] = torch.arange(row_image.numel(), device=one_mask.device)
        images = case2.nonzero()[:, 0]
        winner = decision.winner[images]
        row_sum = row_logit_sum[row_of[images, winner]] + one_logits[images, winner]
        logits[images] = row_sum / k
    # A mean of vectors that each have their maximum at `label` has its maximum there too, but
    # rounding can make a near-tie come out as a smaller class id; bump the label just above.
    top = logits.max(1).values
    wrong = logits.argmax(1) != decision.label
    if wrong.any():
        logits[wrong, decision.label[wrong]] = torch.nextafter(top[wrong], torch.full_like(top[wrong], math.inf))
    return logits


# ----------------------------------------------------------------------------- token masks
@dataclass(frozen=True)
class _TokenViews(ViewRunner):
    """Views of a timm ViT with the tokens a view hides dropped (ViP, PatchCensor; `drop_tokens`).

    View `(i, j)` is the image with the pixels of masks `i` and `j` set to `fill`, run on the
    patch tokens that meet a kept pixel (`robustwrap.tokens.token_keep`) through the one
    token-dropping forward, `robustwrap.tokens.forward_kept`: a token whose pixels are all masked
    is absent, not filled. `model` is the ViT itself (`grid` is its token grid).
    """

    grid: TokenGrid | None = None

    def run(self, x: torch.Tensor, image: torch.Tensor, i: torch.Tensor, j: torch.Tensor, fill: torch.Tensor | None = None) -> torch.Tensor:
        keep = self.keep if self.keep.device == x.device else self.keep.to(x.device)
        kept = keep[i] & keep[j]
        views = mask_images(x[image], kept, fill_like(self.fill, x) if fill is None else fill)
        # forward_views checks the logits and tells the progress bar's observers, as for any pass
        run = lambda v: forward_kept(self.model, v, token_keep(kept, self.grid), self.grid)
        return forward_views(run, views, self.num_classes)


def token_mask_set(
    image_size: int | Sequence[int],
    patch: int | float | Sequence[int],
    token_size: int | Sequence[int],
    num_masks: int | Sequence[int] | None = None,
    stride: int | Sequence[int] | None = None,
) -> MaskSet:
    """A mask set whose masks are whole tokens of a ViT's grid: with `drop_tokens`, each mask drops whole tokens.

    A patch of `p` pixels meets at most `ceil((p - 1) / t) + 1` tokens of `t` pixels per axis
    (its token footprint); the masks are PatchCleanser's mask set for that footprint on the token
    grid (`MaskSet.rect` in tokens), scaled to pixels, so every mask is a block of whole tokens.
    As for every `MaskSet`, covering every pixel position of the patch is checked exhaustively.
    ViP and PatchCensor use such masks at a stride of one token (`stride=t`).

    Args:
        image_size: `H` or `(H, W)`, a whole number of tokens per axis.
        patch: side in pixels (int), fraction of the image area (float in (0, 1)), or `(ph, pw)`.
        token_size: `t` or `(th, tw)`: pixels per token (the ViT's patch size).
        num_masks: masks per axis, or `(kh, kw)`; default 6 unless `stride` is given.
        stride: mask stride in pixels, a multiple of the token size; instead of `num_masks`.

    Raises:
        ValueError: an image size or stride that is not a whole number of tokens, or a patch
            whose footprint is the whole token grid.
    """
    size = as_image_size(image_size)
    ph, pw = patch_pixels(patch, size)
    th, tw = as_image_size(token_size)
    (h, w) = size
    if h % th or w % tw:
        raise ValueError(f"token masks need an image size that is a multiple of the {th}x{tw} tokens, got {h}x{w}")
    grid = (h // th, w // tw)
    footprint = (-(-(ph - 1) // th) + 1, -(-(pw - 1) // tw) + 1)
    if footprint[0] > grid[0] or footprint[1] > grid[1]:
        raise ValueError(f"a {ph}x{pw} px patch can meet {footprint[0]}x{footprint[1]} tokens, more than the {grid[0]}x{grid[1]} grid")
    cells = None
    if stride is not None:
        sh, sw = as_image_size(stride)
        if sh % th or sw % tw:
            raise ValueError(f"stride of token masks must be a multiple of the {th}x{tw} tokens, got {sh}x{sw} px")
        cells = (sh // th, sw // tw)
    with warnings.catch_warnings():  # a shortfall is said below, in pixels
        warnings.simplefilter("ignore", UserWarning)
        tokens = MaskSet.rect(grid, footprint, num_masks=num_masks, stride=cells)
    boxes = tuple((top * th, left * tw, bh * th, bw * tw) for top, left, bh, bw in tokens.boxes)
    (mh, mw), (sh, sw) = tokens.mask_size, tokens.stride
    mask_set = MaskSet(size, boxes, ((ph, pw),), (mh * th, mw * tw), (sh * th, sw * tw), tokens.grid, num_masks=tokens.num_masks)
    if mask_set.shortfall():
        warnings.warn(mask_set.shortfall(), UserWarning, stacklevel=2)
    return mask_set


# ----------------------------------------------------------------------------- classifier
@dataclass(frozen=True)
class PatchCleanserResult(CertifyResult):
    """Per-image outcome of `PatchCleanser.certify`.

    Attributes:
        prediction: `(B,)` the robust (double-masking) prediction.
        certified: `(B,)` bool: no patch of the threat model can change the prediction, and it
            equals the label.
        num_views: `(B,)` masked views run through the model for each image.
        case: `(B,)` 1, 2 or 3: the double-masking case that gave the prediction.
        one_mask: `(B, K)` the one-mask labels `P_i`.
        grid: `(B, K, K)` the two-mask labels `P_ij` (symmetric, diagonal `P_ii = P_i`), `-1`
            where early exit skipped a view; with `early_exit=False` it is complete.
    """

    case: torch.Tensor
    one_mask: torch.Tensor
    grid: torch.Tensor


# ----------------------------------------------------------------------------- scheduling
# The rule and the certificate above only read labels; these two functions decide which views to
# evaluate. They run over any `ViewRunner`, whatever a view is: PatchCleanser's runner masks
# pixels and runs the base model, PatchCURE's masks cells of a feature grid and runs the rest of
# the network (or sums local logits). `x` is what the runner's views are cut from.
def predict_views(
    runner: ViewRunner, x: torch.Tensor, one_mask: torch.Tensor, one_logits: torch.Tensor, need_logits: bool
) -> tuple[Decision, torch.Tensor | None]:
    """The double-masking decision of a batch whose one-mask views are known.

    Only the two-mask rows of the masks that disagree with the majority are evaluated, and a
    row stops as soon as it cannot change a Case II decision (`rows_to_cancel`).

    Args:
        runner: the view runner of the call.
        x: `(B, ...)` what the runner's views are cut from (images, or a feature grid).
        one_mask: `(B, K)` one-mask labels, from `runner.one_mask(x)`.
        one_logits: `(B, K, C)` their logits.
        need_logits: also return the robust logits (`docs/concepts.md#double-masking`).

    Returns:
        `(decision, robust logits or None)`.
    """
    k = len(runner)
    row_image, row_mask = disagreers(one_mask).nonzero(as_tuple=True)
    pairs, owners = row_pairs(row_image, row_mask, k)
    outcome = runner.evaluate_pairs(
        x,
        pairs,
        owners,
        one_mask[row_image, row_mask],
        on_step=lambda done, failed: rows_to_cancel(row_image, row_mask, done, failed, x.shape[0]),
        need_logits=need_logits,
    )
    decision = decide(one_mask, _grid(one_mask, pairs, outcome.labels))
    if not need_logits:
        return decision, None
    return decision, _robust_logits(decision, one_mask, one_logits, row_image, row_mask, outcome.logit_sum)


def certify_views(
    runner: ViewRunner,
    x: torch.Tensor,
    y: torch.Tensor,
    one_mask: torch.Tensor,
    one_logits: torch.Tensor,
    margin: float,
    early_exit: bool = True,
) -> PatchCleanserResult:
    """Certify a batch whose one-mask views are known: the schedule of `PatchCleanser.certify`.

    With `early_exit`, only images whose every one-mask view (surely) shows `y` go on to their
    off-diagonal views, the likeliest to disagree first, each image stopping at its first failing
    view; the others get the rows of their disagreeing masks, to predict. Without it, every view
    `i <= j` of every image is evaluated. The result is the same; only `num_views` differs.

    Args:
        runner: the view runner of the call.
        x: `(B, ...)` what the runner's views are cut from (images, or a feature grid).
        y: `(B,)` labels, on `x`'s device.
        one_mask: `(B, K)` one-mask labels, from `runner.one_mask(x)`.
        one_logits: `(B, K, C)` their logits.
        margin: the certificate margin (`docs/concepts.md#margin`).
        early_exit: skip views that cannot change the result.

    Returns:
        A `PatchCleanserResult`; `num_views` counts the `K` one-mask views and the two-mask views evaluated.
    """
    b, k = one_mask.shape
    one_margin = label_margins(one_logits, y[:, None].expand(b, k))  # (B, K): how surely mask i shows y
    # The margin guard (docs/concepts.md#margin): a view counts for y only if it shows y by more than `margin`.
    one_sure = one_margin > margin if margin > 0 else one_mask == y[:, None]
    if early_exit:
        # Only images whose every one-mask view (surely) shows y can be certified: check
        # their off-diagonal views, those likeliest to disagree first (fail fast). Others
        # need the rows of their disagreeing masks to predict.
        candidate = one_sure.all(1)
        cert_pairs, cert_owners = triangle_pairs(candidate.nonzero()[:, 0], k)
        row_image, row_mask = (disagreers(one_mask) & ~candidate[:, None]).nonzero(as_tuple=True)
        rpairs, rowners = row_pairs(row_image, row_mask, k)
        n_cert = int(candidate.sum())
        pairs = torch.cat([cert_pairs, rpairs])
        owners = torch.cat([cert_owners, torch.where(rowners >= 0, rowners + n_cert, -1)])
        expect = torch.cat([y[candidate], one_mask[row_image, row_mask]])
        guard = torch.arange(expect.shape[0], device=x.device) < n_cert
        # rows keep their order (priority 0 after the certificate views' sums of margins)
        priority = torch.cat([pair_priority(one_margin, cert_pairs), torch.zeros(rpairs.shape[0], device=x.device)])

        def on_step(done, failed):
            cancel = torch.zeros_like(done)
            cancel[n_cert:] = rows_to_cancel(row_image, row_mask, done[n_cert:], failed[n_cert:], b)
            return cancel

        outcome = runner.evaluate_pairs(x, pairs, owners, expect, on_step=on_step, priority=priority, guard=guard, margin=margin)
    else:
        pairs, owners = triangle_pairs(torch.arange(b, device=x.device), k)
        guard = torch.ones(b, dtype=torch.bool, device=x.device)
        outcome = runner.evaluate_pairs(x, pairs, owners, y, early_exit=False, guard=guard, margin=margin)
    grid = _grid(one_mask, pairs, outcome.labels)
    decision = decide(one_mask, grid)
    is_certified = certified(grid, y)
    if margin > 0:
        unsure = torch.bincount(pairs[~outcome.sure, 0], minlength=b) > 0
        is_certified &= one_sure.all(1) & ~unsure
    evaluated = pairs[outcome.labels >= 0, 0]
    num_views = torch.full((b,), k, dtype=torch.long, device=x.device) + torch.bincount(evaluated, minlength=b)
    return PatchCleanserResult(
        prediction=decision.label,
        certified=is_certified,
        num_views=num_views,
        case=decision.case,
        one_mask=one_mask,
        grid=grid,
    )


class PatchCleanser(RobustPatchClassifier):
    """A classifier defended by PatchCleanser double masking (Xiang et al., USENIX Security 2022).

    In eval mode `forward` returns robust logits; in train mode it is the base model's forward,
    so a wrapped model trains like the original. Build one with `robustwrap.wrap(model,
    patch=...)` or `PatchCleanser.from_patch`, or directly from a `MaskSet`.

    The keep masks live in a non-persistent buffer built from `mask_set`, so `.to(device)` and
    `nn.DataParallel` replication move them, and assigning `m.mask_set = other` rebuilds them:
    the next call certifies against the new set and `settings()` reports it.

    Args:
        model: the base classifier, `(B, C, H, W) -> (B, num_classes)` logits.
        mask_set: the R-covering mask set (its `image_size` is the input size).
        image_size: `H` or `(H, W)` of the base model's inputs when it differs from the mask
            set's: the defended model then resizes its inputs (the mask set's size) to it, and
            masks in input pixels before the resize (docs/concepts.md#input-pixels). Default:
            the mask set's, or with `input_size`/`resize` the size a timm model was built for.
        input_size: the mask set's image size, if given (it must agree).
        resize: the interpolation of that resize: `"nearest"` (default), `"bilinear"` or `"bicubic"`.
        fill: value of masked pixels in the model's input space (after normalisation): a scalar
            or one value per channel. Train and certify with the same fill.
        batch_size: masked views per forward pass; `None` (default) picks one for the model,
            image size and device (`robustwrap.views.auto_batch_size`).
        precision: `"float32"`, `"bfloat16"` or `"float16"` autocast of every forward pass.
        margin: certificate margin, a float >= 0 (0 is the papers' rule).
        num_classes: classes of the base model; read from `model.num_classes` when it has one,
            else found with one forward pass of a blank image the first time it is needed.
        drop_tokens: run each masked view of a timm ViT on the tokens that meet an unmasked
            pixel only (ViP, PatchCensor; docs/concepts.md#token-masks): a setting of the
            defended function, used by prediction, certification and detection alike.

    Raises:
        TypeError: if `model` is not an `nn.Module` or is already defended, or `mask_set` is
            not a `MaskSet`.
        ValueError: for a bad `fill`, `batch_size`, `precision`, `margin` or `num_classes`, or
            `drop_tokens` for a model whose token grid cannot be read.
    """

    defense = "patchcleanser"
    _geometry_name = "mask set"
    _no_detection = None  # Minority Reports: the one-mask views of its own mask set
    _no_top_k = "double masking's views give labels only, which bound no other class's rank"
    # robustwrap.augment's masking; Multi-size Greedy Cutout by default (Saha et al., TMLR 2023).
    training_strategies: ClassVar[tuple[str, ...]] = ("none", "random_cutout", "random_mask", "greedy", "multisize_greedy", "grid")
    default_strategy: ClassVar[str] = "multisize_greedy"
    # The patch, masks per axis and stride only build the mask set, which is the one source of
    # truth (a union or coarsened set has no single `num_masks`): change them through it.
    _not_assignable: ClassVar[dict[str, str]] = {
        name: f"{name} is a setting of the mask set, not of the defended model: assign a new one, e.g. "
        "m.mask_set = robustwrap.MaskSet.square(m.input_size, patch, num_masks=6) (or stride=..., MaskSet.rect for a rectangle)"
        for name in ("patch", "num_masks", "stride")
    }

    def __init__(
        self,
        model: nn.Module,
        mask_set: MaskSet,
        *,
        image_size: int | Sequence[int] | None = None,
        input_size: int | Sequence[int] | None = None,
        resize: str | None = None,
        fill: float | Sequence[float] = 0.0,
        batch_size: int | None = None,
        precision: str = "float32",
        margin: float = DEFAULT_MARGIN,
        num_classes: int | None = None,
        drop_tokens: bool = False,
    ):
        if not isinstance(mask_set, MaskSet):
            raise TypeError(f"mask_set must be a robustwrap.MaskSet, got {type(mask_set).__name__}")
        if input_size is not None and as_image_size(input_size) != mask_set.image_size:
            raise ValueError(
                f"input_size={input_size!r} does not match the mask set's image size {mask_set.image_size} (masks are in input pixels)"
            )
        resized = image_size is not None or input_size is not None or resize is not None
        image_size = resolve_image_size(model, image_size) if resized else mask_set.image_size
        super().__init__(
            model,
            image_size=image_size,
            input_size=mask_set.image_size,
            resize=resize,
            fill=fill,
            batch_size=batch_size,
            precision=precision,
            margin=margin,
            num_classes=num_classes,
        )
        self.mask_set = mask_set
        self.drop_tokens = drop_tokens

    # ------------------------------------------------------------------------------ settings
    @property
    def mask_set(self) -> MaskSet:
        """The R-covering mask set; assigning one rebuilds the keep masks (on their device)."""
        return self._mask_set

    @mask_set.setter
    def mask_set(self, value: MaskSet) -> None:
        if not isinstance(value, MaskSet):
            raise TypeError(f"mask_set must be a robustwrap.MaskSet, got {type(value).__name__}")
        old = self._buffers.get("_keep")
        keep = value.keep_masks(old.device if old is not None else model_device_dtype(self._inner_model)[0])
        if old is None:
            self.register_buffer("_keep", keep, persistent=False)
        else:
            self._buffers["_keep"] = keep
        if self._resize is None:
            self._image_size = value.image_size
        else:  # the masks are in input pixels: a set of another size is another input size, resized alike
            self._input_size, self._resize = resolve_input_size(self._image_size, value.image_size, self._resize)
        self._mask_set = value

    @property
    def drop_tokens(self) -> bool:
        """Whether each masked view of a ViT runs on the tokens that meet an unmasked pixel only.

        A token whose pixels are all masked is dropped (absent from attention, not filled), as in
        ViP and PatchCensor; with a mask set of whole tokens (`token_mask_set`) every mask drops
        whole tokens. It changes the defended function, so it is recorded in `settings()`.
        """
        return self.__dict__.get("_drop_tokens", False)

    @drop_tokens.setter
    def drop_tokens(self, value: bool) -> None:
        if not isinstance(value, bool):
            raise TypeError(f"drop_tokens must be True or False, got {value!r} ({type(value).__name__})")
        if value:
            self._token_grid_of(self._inner_model)
        self.__dict__["_drop_tokens"] = value

    def _token_grid_of(self, model: nn.Module) -> TokenGrid:
        """`model`'s token grid on the mask set's images, for `drop_tokens`.

        Raises:
            ValueError: the grid cannot be read (not timm's ViT family), the image size is not a
                whole number of tokens, or the inputs are resized (masks in input pixels would
                not be whole tokens of the model's grid).
        """
        if self._resize is not None:
            raise ValueError(
                f"drop_tokens needs the mask set's pixels to be the ViT's: this model resizes its {self.input_size} inputs to "
                f"{self.image_size}; wrap without input_size/resize, or use drop_tokens=False"
            )
        grid = token_grid(model, self.image_size)
        if grid is None:
            raise ValueError(
                f"drop_tokens=True needs a model whose token grid can be read: {SUPPORTED}; got a {type(model).__name__}. "
                "Use drop_tokens=False"
            )
        return grid

    @property
    def patch(self) -> tuple[int, int]:
        """`(ph, pw)` in pixels: the patch of the threat model (a union of shapes raises; read `mask_set.patch_sizes`)."""
        return self.mask_set.patch_size

    def _defense_settings(self) -> dict[str, Any]:
        sizes = [list(p) for p in self.mask_set.patch_sizes]
        # only when on: the settings (and results fingerprints) of pixel-masking models stay as they were
        tokens = {"drop_tokens": True} if self.drop_tokens else {}
        return {"mask_set": self.mask_set.to_dict(), "patch": sizes[0] if len(sizes) == 1 else sizes, **tokens}

    @classmethod
    def _options_from_settings(cls, settings: dict[str, Any]) -> tuple[dict[str, Any], tuple[str, ...]]:
        if "mask_set" not in settings:
            raise ValueError(f"patchcleanser settings lack mask_set (keys: {sorted(settings)})")
        try:
            mask_set = MaskSet.from_dict(settings["mask_set"])
        except TypeError as error:
            raise ValueError(f"settings mask_set: {error}") from None
        if "patch" in settings:
            sizes = [list(p) for p in mask_set.patch_sizes]
            if settings["patch"] != (sizes[0] if len(sizes) == 1 else sizes):
                raise ValueError(f"settings patch {settings['patch']!r} disagrees with the mask set's patch sizes {sizes}")
        drop_tokens = settings.get("drop_tokens", False)
        if not isinstance(drop_tokens, bool):
            raise ValueError(f"settings drop_tokens must be true or false, got {drop_tokens!r}")
        # The mask set is in input pixels: the base model's size is its own only when the inputs are resized.
        resized = {"image_size": settings["image_size"]} if "input_size" in settings else {}
        return {"mask_set": mask_set, "drop_tokens": drop_tokens, **resized}, ("mask_set", "patch", "drop_tokens")

    def _training_recipe(self, strategy: str, fill: float | tuple[float, ...], batch_size: int) -> TrainingRecipe:
        if self.drop_tokens and strategy != "none":
            return TrainingRecipe(augment=_TokenMasking(self, strategy, batch_size))
        # the searches run their candidate views at input size through the resize, as certification does
        return _masking_recipe(strategy, self.mask_set, self._behind_resize(self.model), fill, batch_size)

    def _training_geometry(self) -> dict[str, Any]:
        return _masking_geometry(self.mask_set)

    @classmethod
    def from_patch(
        cls,
        model: nn.Module,
        patch: int | float | Sequence[int] | None = None,
        *,
        num_masks: int | Sequence[int] | None = None,
        stride: int | Sequence[int] | None = None,
        mask_set: MaskSet | None = None,
        image_size: int | Sequence[int] | None = None,
        input_size: int | Sequence[int] | None = None,
        resize: str | None = None,
        fill: float | Sequence[float] = 0.0,
        batch_size: int | None = None,
        precision: str = "float32",
        margin: float = DEFAULT_MARGIN,
        num_classes: int | None = None,
        tau: float = DEFAULT_TAU,
        drop_tokens: bool = False,
    ) -> PatchCleanser:
        """PatchCleanser for a threat model: the mask set for `patch`, or a ready `mask_set`.

        Args:
            model: the base classifier.
            patch: side in pixels (int), fraction of the image area (float in (0, 1); default
                0.02), or `(ph, pw)` in pixels for a rectangle.
            num_masks: masks per axis (default 6, i.e. 36 masks), or `(kh, kw)`.
            stride: mask stride in pixels, instead of `num_masks`.
            mask_set: a ready `MaskSet`, instead of `patch`/`num_masks`/`stride`.
            image_size: `H` or `(H, W)` of the base model's inputs; defaults to the size a timm model was built for.
            input_size: `h` or `(h, w)` of the defended model's inputs, resized to `image_size` in
                its forward; the patch and the masks are in its pixels (default: no resize).
            resize: `"nearest"` (default), `"bilinear"` or `"bicubic"`: the interpolation of that resize.
            fill: masked pixel value in the model's input space.
            batch_size: masked views per forward pass (default `None`: chosen for the model,
                image size and device, `robustwrap.views.auto_batch_size`).
            precision: autocast precision of every forward pass (default `"float32"`).
            margin: certificate margin, a float >= 0 (default `DEFAULT_MARGIN`, 1e-3; 0 is the papers' rule).
            num_classes: classes of the base model, if it has no `num_classes` attribute.
            tau: confidence threshold of certified detection, in `[0, 1)` (default 0; `detect`).
            drop_tokens: a timm ViT's masked views drop the tokens they hide (default False). It does
                not change the mask set: for masks of whole tokens (ViP's, PatchCensor's) pass
                `mask_set=token_mask_set(...)`.

        Returns:
            The defended model, in the same train/eval mode as `model`.

        Raises:
            ValueError: for an impossible threat model, both `mask_set` and patch settings, or
                no `image_size` where the model does not carry one.
        """
        if mask_set is not None:
            given = [n for n, v in (("patch", patch), ("num_masks", num_masks), ("stride", stride)) if v is not None]
            if given:
                raise ValueError(f"pass either mask_set or patch/num_masks/stride, not both (got mask_set and {', '.join(given)})")
            if not isinstance(mask_set, MaskSet):
                raise TypeError(f"mask_set must be a robustwrap.MaskSet, got {type(mask_set).__name__}")
            if image_size is not None and input_size is None and resize is None and as_image_size(image_size) != mask_set.image_size:
                raise ValueError(f"image_size={image_size!r} does not match the mask set's image size {mask_set.image_size}")
        else:
            size = resolve_image_size(model, image_size)
            if input_size is not None:  # the masks are in input pixels
                size = resolve_input_size(size, input_size, resize)[0] or size
            patch = DEFAULT_PATCH if patch is None else patch
            if isinstance(patch, (tuple, list)):
                mask_set = MaskSet.rect(size, patch, num_masks=num_masks, stride=stride)
            else:
                mask_set = MaskSet.square(size, patch, num_masks=num_masks, stride=stride)
        resized = {} if input_size is None and resize is None else {"image_size": image_size, "input_size": input_size, "resize": resize}
        defended = cls(
            model,
            mask_set,
            **resized,
            fill=fill,
            batch_size=batch_size,
            precision=precision,
            margin=margin,
            num_classes=num_classes,
            drop_tokens=drop_tokens,
        )
        defended.tau = tau
        return defended

    def extra_repr(self) -> str:
        resized = "" if self.resize is None else f"input_size={self.input_size}, resize={self.resize}, image_size={self.image_size}, "
        tokens = ", drop_tokens=True" if self.drop_tokens else ""
        return f"{resized}mask_set={self.mask_set.describe()}{tokens}, fill={self.fill}, batch_size={self.batch_size}, precision={self.precision}, margin={self.margin}"

    # ----------------------------------------------------------------------------- inference
    def _runner(self, x: torch.Tensor) -> ViewRunner:
        """The view runner for one call on `x`, from the current settings (in eval mode, without gradients).

        With `drop_tokens`, views of the ViT on the tokens they keep (`_TokenViews`). Otherwise its views run through the model's inference copy (`robustwrap.views.InferenceCopy`) when
        there is one, in `channels_last` for convolutional networks on the CPU.
        """
        attr = getattr(self._inner_model, "num_classes", None)
        known = attr if isinstance(attr, int) and not isinstance(attr, bool) else self._num_classes
        if self.drop_tokens:  # the ViT's own parts run (no inference copy: a ViT has none)
            vit = self._inner_model
            return _TokenViews(
                vit, self._keep, self.fill, self.batch_size, num_classes=known, channels_last=False, grid=self._token_grid_of(vit)
            )
        module = self._inference_model(x)
        return ViewRunner(
            module, self._keep, self.fill, self.batch_size, num_classes=known, channels_last=auto_channels_last(self._inner_model)
        )

    def _one_mask(self, runner: ViewRunner, x: torch.Tensor) -> tuple[ViewRunner, torch.Tensor, torch.Tensor]:
        one_mask, one_logits = runner.one_mask(x)
        if runner.num_classes is None:
            self._num_classes = one_logits.shape[-1]  # learnt from the views, so no blank probe is needed
            runner = dataclasses.replace(runner, num_classes=self._num_classes)
        return runner, one_mask, one_logits

    def _robust_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Robust logits: the mean of the logits of the masked views that voted for the robust label.

        So `forward(x).argmax(1) == predict(x)`; float32 (or wider) whatever the model's dtype.
        """
        return self._infer(x, need_logits=True)[1]

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Robust labels `(B,)` by double masking (in either mode; the base model runs in eval mode)."""
        return self._infer(x, need_logits=False)[0].label

    def _infer(self, x: torch.Tensor, need_logits: bool) -> tuple[Decision, torch.Tensor | None]:
        x = self._check_images(x)
        with eval_mode(self._inner_model), torch.no_grad(), self.autocast():
            runner, one_mask, one_logits = self._one_mask(self._runner(x), x)
            return predict_views(runner, x, one_mask, one_logits, need_logits)

    def certify(self, x: torch.Tensor, y: torch.Tensor, early_exit: bool = True, k: int = 1) -> PatchCleanserResult:
        """Certify a batch against every patch of the threat model.

        An image is certified iff all `K(K+1)/2` views `P_ij`, `i <= j`, show its label `y`
        (`docs/concepts.md#certification`), each by more than the model's `margin`
        (`logit_y - max_other > margin`; with `margin=0` label equality, the papers' rule;
        `docs/concepts.md#margin`). With `early_exit` an image stops being evaluated at its first
        failing view, and its views are tried likeliest-to-fail first (smallest sum of the two
        masks' one-mask margins); the result is identical, only `num_views` is smaller.

        Args:
            x: `(B, C, H, W)` images, floating, as the model expects them.
            y: `(B,)` integer labels in `[0, num_classes)`.
            early_exit: skip views that cannot change the result (default True).
            k: `1`: double masking has no top-k certificate (its views' labels say nothing
                about the other classes' ranks), so `k > 1` is refused.

        Returns:
            A `PatchCleanserResult` with the robust prediction, certification, views evaluated
            per image, case, one-mask labels and the two-mask label grid.

        Raises:
            TypeError, ValueError: for bad images or labels, or `k != 1`, before any forward pass.
        """
        x = self._check_images(x)
        y = self._check_labels(y, x.shape[0]).to(x.device)
        self._check_top_k(k)
        with eval_mode(self._inner_model), torch.no_grad(), self.autocast():
            runner, one_mask, one_logits = self._one_mask(self._runner(x), x)
            return certify_views(runner, x, y, one_mask, one_logits, self.margin, early_exit)

    # ------------------------------------------------------------------------------ detection
    def _detection_logits(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The unmasked logits and the `K` one-mask views of the mask set (no second round).

        Minority Reports (Xiang et al.; the authors' `misc/pc_mr.py`): the mask set covers every
        patch, so one one-mask view never sees it. `K + 1` forward passes per image.
        """
        with eval_mode(self._inner_model), torch.no_grad(), self.autocast():
            runner = self._runner(x)
            runner, _, views = self._one_mask(runner, x)
            flat = x.contiguous(memory_format=torch.channels_last) if runner.channels_last else x
            logits = torch.cat([forward_views(runner.model, part, runner.num_classes) for part in flat.split(runner.batch_size)])
        num_views = torch.full((x.shape[0],), views.shape[1] + 1, dtype=torch.long, device=x.device)
        return logits.to(views.dtype), views, num_views


# ------------------------------------------------------------------------------- training
def _masking_recipe(strategy: str, mask_set: MaskSet, model: nn.Module, fill: float | tuple[float, ...], batch_size: int) -> TrainingRecipe:
    """PatchCleanser's training: images masked by a `robustwrap.augment` strategy of `mask_set` (none for `"none"`).

    Also what `fit_masking` trains a bare classifier with, given the mask set it will be certified with.
    """
    if strategy == "none":
        return TrainingRecipe()
    from ..augment import create_augmentation  # training code, imported when a model trains

    return TrainingRecipe(augment=create_augmentation(strategy, mask_set, model, fill=fill, batch_size=batch_size))


class _TokenMasking:
    """PatchCleanser's training views with `drop_tokens`: two masks per image, the ViT run on the tokens they keep.

    The views are made in the forward (`logits`) by the runner certification uses
    (`_TokenViews`), so the ViT trains on the function it is certified with:

    - `"random_mask"`: two masks of the mask set per image, uniformly and independently;
    - `"greedy"`: Greedy Cutout: the mask of highest loss, then the worst second mask with it,
      each candidate a token view (eval mode, no gradients).

    The other strategies choose their masks among pixel views (coarsened masks, random holes),
    so they are refused with `drop_tokens`.

    Args:
        defense: the PatchCleanser model (its mask set, fill and token grid are read at every call).
        strategy: `"random_mask"` or `"greedy"`.
        batch_size: views per pass of the greedy search.
    """

    views_in_forward = True
    strategies: ClassVar[tuple[str, ...]] = ("random_mask", "greedy")

    def __init__(self, defense: PatchCleanser, strategy: str, batch_size: int) -> None:
        if strategy not in self.strategies:
            raise ValueError(
                f"strategy {strategy!r} chooses its masks among pixel views; with drop_tokens train with strategy='random_mask', "
                "'greedy' or 'none' (their views drop tokens as certification does)"
            )
        self.defense, self.strategy, self.batch_size = defense, strategy, batch_size

    def __call__(self, x: torch.Tensor, y: torch.Tensor, *, return_indices: bool = False):
        """The images `x` (unchanged: their views are made in `logits`), and with `return_indices` the `(B, 2)` masks."""
        b, k = x.shape[0], len(self.defense.mask_set)
        if self.strategy == "random_mask":  # drawn on the CPU, as RandomMaskCutout's, whatever the device
            masks = torch.randint(k, (b, 2)).to(x.device)
        else:
            from ..augment import _greedy_pair, _view_losses  # training code, imported when a model trains

            defense = self.defense
            with eval_mode(defense._inner_model), torch.no_grad(), defense.autocast():
                runner = defense._runner(x)
                losses = functools.partial(_view_losses, runner, x, as_labels(y, b, "y").to(x.device), batch_size=self.batch_size)
                masks = _greedy_pair(losses, b, k, x.device)
        return (x, masks) if return_indices else x

    def logits(self, base: nn.Module, x: torch.Tensor, masks: torch.Tensor | None) -> torch.Tensor:
        """The views' logits `(B, num_classes)`, with gradients: each image with its two masks hidden, on the tokens it keeps.

        Args:
            base: the ViT being trained.
            x: `(B, C, H, W)` images.
            masks: `(B, 2)` mask indices per image, `-1` (or `None` for all) for an image left clean.
        """
        defense = self.defense
        keep = defense.mask_set.keep_masks(x.device)
        keep = torch.cat([keep, torch.ones_like(keep[:1])])  # one more "mask" that keeps every pixel: an image left clean
        if masks is None:
            masks = torch.full((x.shape[0], 2), -1, dtype=torch.long, device=x.device)
        masks = torch.where(masks < 0, keep.shape[0] - 1, masks)
        runner = _TokenViews(base, keep, defense.fill, x.shape[0], channels_last=False, grid=defense._token_grid_of(base))
        return runner.run(x, torch.arange(x.shape[0], device=x.device), masks[:, 0], masks[:, 1])

    def __repr__(self) -> str:
        return f"_TokenMasking(strategy={self.strategy!r}, masks={len(self.defense.mask_set)}, batch_size={self.batch_size})"


def _masking_geometry(mask_set: MaskSet) -> dict[str, Any]:
    """The masks a checkpoint of PatchCleanser's training records."""
    return {"mask_set": [list(b) for b in mask_set.boxes]}
