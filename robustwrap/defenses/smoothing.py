"""(De)Randomized Smoothing: votes of ablated views, the Δ certificate, exact early exit, the classifier.

Levine & Feizi, "(De)Randomized Smoothing for Certifiable Defense against Patch Attacks",
NeurIPS 2020; Salman et al., "Certified Patch Robustness via Smoothed Vision Transformers",
CVPR 2022. Each view keeps one band (or block) of the image and ablates the rest; the views
vote, and a patch can only change the votes of the `Δ` views whose kept region it meets. The
rules implemented here are written out on the Concepts page (docs/concepts.md#smoothing,
#smoothing-delta, #smoothing-certificate and #smoothing-early-exit).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from .._args import as_fill, as_image_size, positive_int, read_patch
from .._unwrap import joins_processes, unwrap
from ..geometry import ABLATIONS, AblationSet, patch_pixels, patch_side, resize_footprint
from ..tokens import (
    SUPPORTED,
    TokenGrid,
    axis_token_keep,
    embed_patches,
    forward_ablated,
    supports_token_dropping,
    token_grid,
    views_per_pass,
)
from ..views import auto_channels_last, auto_sync_every, call_model, eval_mode, fill_like, forward_views, mask_images
from .base import DEFAULT_MARGIN, DEFAULT_PATCH, CertifyResult, RobustPatchClassifier, TrainingRecipe, resize_images, resolve_image_size, resolve_input_size
from .detection import votes_topk

__all__ = ["DerandomizedSmoothing", "SmoothingResult", "RandomAblation", "ENCODINGS"]

ENCODINGS = ("fill", "levine2020")

# ----------------------------------------------------------------------------------- rule


def plain_votes(logits: torch.Tensor, threshold: float | None = None) -> torch.Tensor:
    """`(N, C)` bool: the classes each view votes for (docs/concepts.md#smoothing).

    Args:
        logits: `(N, C)` logits of `N` views.
        threshold: `None`: one vote for the argmax (ties to the smallest class id); a float
            `θ` in (0, 1]: a vote for every class whose softmax is `>= θ` (0, 1 or several).
    """
    if threshold is None:
        votes = torch.zeros(logits.shape, dtype=torch.bool, device=logits.device)
        return votes.scatter_(1, logits.argmax(1, keepdim=True), True)  # argmax: the first maximum
    return logits.float().softmax(1) >= threshold


def guarded_votes(logits: torch.Tensor, threshold: float | None = None, margin: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """`(sure, possible)`, each `(N, C)` bool: the votes a view casts whatever its logits' last bits.

    The margin guard (docs/concepts.md#margin): another batch composition or kernel may move a logit
    by a little, so for a certificate a view counts for a class only if its vote survives any
    move of the logit differences up to `margin` (`sure`), and may count for every class it could
    vote for after such a move (`possible`). With argmax votes a view is sure for its argmax `y`
    iff `logit_y - max_other > margin`, and possible for every `c` with `max - logit_c <= margin`;
    with threshold votes the same holds for `log softmax_c - log θ` against `± margin`. With
    `margin == 0` both are the plain votes: the papers' rule.
    """
    plain = plain_votes(logits, threshold)
    if margin == 0:
        return plain, plain
    logits = logits.float()
    if threshold is None:
        top2 = logits.topk(min(2, logits.shape[1]), dim=1).values
        gap = top2[:, 0] - top2[:, -1] if logits.shape[1] > 1 else torch.full_like(top2[:, 0], math.inf)
        sure = plain & (gap > margin)[:, None]
        possible = plain | (top2[:, :1] - logits <= margin)
        return sure, possible
    slack = logits.log_softmax(1) - math.log(threshold)
    return plain & (slack > margin), plain | (slack >= -margin)


def smoothed_prediction(counts: torch.Tensor) -> torch.Tensor:
    """`(B,)` the class with the most votes, the smallest class id on ties."""
    return counts.argmax(1)  # argmax returns the first maximum


def _beats(low: torch.Tensor, high: torch.Tensor, winner: torch.Tensor, slack: int | torch.Tensor = 0) -> torch.Tensor:
    """`(B, C)`: `low - high[:, c] > slack`, or `== slack` with `winner < c`, for every class `c`.

    The one tie rule of the defense: an equality goes to the smaller class id.
    """
    classes = torch.arange(high.shape[1], device=high.device)
    diff = low[:, None] - high - slack
    return (diff > 0) | ((diff == 0) & (winner[:, None] < classes))


def certificate(counts: torch.Tensor, sure: torch.Tensor, possible: torch.Tensor, labels: torch.Tensor, delta: int) -> torch.Tensor:
    """`(B,)` bool: the smoothed prediction is `labels` and no patch meeting `delta` views changes it.

    Certified iff `argmax_c n_c = y` and, for every `c != y`, `n_y - n_c > 2Δ`, or `== 2Δ` and
    `y < c`: a patch changes at most `Δ` views, each taking one vote from `y` and giving one to
    `c`. `n_y` counts the `sure` votes and `n_c` the `possible` ones (the margin guard).

    Args:
        counts: `(B, C)` plain votes (they give the prediction).
        sure: `(B, C)` votes that hold under the margin guard.
        possible: `(B, C)` votes that may appear under the margin guard.
        labels: `(B,)` the labels `y`.
        delta: `Δ`, the most views one patch meets.
    """
    rows = torch.arange(labels.shape[0], device=labels.device)
    wins = _beats(sure[rows, labels], possible, labels, 2 * delta)
    wins[rows, labels] = True
    return (smoothed_prediction(counts) == labels) & wins.all(1)


def decided(
    counts: torch.Tensor,
    sure: torch.Tensor,
    possible: torch.Tensor,
    remaining: torch.Tensor,
    labels: torch.Tensor | None,
    delta: int,
) -> torch.Tensor:
    """`(B,)` bool: the remaining views cannot change the prediction (nor, with `labels`, the certificate).

    After `v` of `V` views, with `R = V - v` left, every final count lies in `[n_c, n_c + R]`
    (a view gives a class at most one vote). The prediction is fixed when the leader `k` wins
    against every `c` even if `k` gets no more votes and `c` all `R`; the certificate is fixed
    true when, on top of a prediction fixed to `y`, `n_y - (n_c + R)` still passes for every
    `c`; fixed false when the prediction is fixed to another class, or some `c` fails even with
    `(n_y + R) - n_c`. Both tests use only these bounds, so stopping when they hold gives exactly
    the result of evaluating every view.

    Args:
        counts, sure, possible: `(B, C)` votes of the views evaluated so far (see `certificate`).
        remaining: `(B,)` views not evaluated yet.
        labels: `(B,)` labels `y`, or `None` to ask only about the prediction.
        delta: `Δ`.
    """
    rows = torch.arange(counts.shape[0], device=counts.device)
    leader = smoothed_prediction(counts)
    r = remaining[:, None]
    prediction_fixed = _beats(counts[rows, leader], counts + r, leader)
    prediction_fixed[rows, leader] = True
    prediction_fixed = prediction_fixed.all(1)
    if labels is None:
        return prediction_fixed
    others = torch.ones_like(counts, dtype=torch.bool)
    others[rows, labels] = False
    passes_worst = _beats(sure[rows, labels], possible + r, labels, 2 * delta) | ~others
    passes_best = _beats(sure[rows, labels] + remaining, possible, labels, 2 * delta) | ~others
    certified_fixed = (leader == labels) & passes_worst.all(1)
    refused_fixed = (leader != labels) | ~passes_best.all(1)
    return prediction_fixed & (certified_fixed | refused_fixed)


# ----------------------------------------------------------------------------------- views


def ablate(
    x: torch.Tensor,
    image: torch.Tensor,
    view: torch.Tensor,
    axis_keep: tuple[torch.Tensor, torch.Tensor],
    encoding: str = "fill",
    fill: float | tuple[float, ...] = 0.0,
) -> torch.Tensor:
    """The ablated views `(image[n], view[n])` of `x`, built on `x`'s device by broadcasting.

    Args:
        x: `(B, C, H, W)` images.
        image: `(N,)` long, which image each view is of.
        view: `(N,)` long, which view (an index of the `AblationSet`).
        axis_keep: `AblationSet.axis_keep(x.device)`: per-axis keep masks.
        encoding: `"fill"`: ablated pixels are `fill` (`C` channels); `"levine2020"`: `(x, 1 - x)`
            on kept pixels and `0` in both on ablated pixels (`2C` channels).
        fill: the ablated pixel value for `"fill"`, a scalar or one value per channel.

    Returns:
        `(N, C, H, W)` views, or `(N, 2C, H, W)` with `"levine2020"`.
    """
    rows, cols = axis_keep
    n_cols = cols.shape[0]
    keep = rows[view // n_cols][:, :, None] & cols[view % n_cols][:, None, :]
    kept = x[image]
    if encoding == "fill":
        return mask_images(kept, keep, fill_like(fill, x))
    return torch.cat([kept, 1 - kept], 1) * keep[:, None].to(kept.dtype)


@dataclass(frozen=True)
class ViewTokens:
    """Which tokens the views of an `AblationSet` keep on a ViT's grid (`drop_tokens`).

    Attributes:
        grid: the base model's token grid (`robustwrap.tokens.token_grid`).
        axis_keep: `(rows (R, gh), cols (Q, gw))` bool, per view position on each axis: the
            token rows and columns that meet the kept pixels.
        pixel_keep: `(rows (R, H), cols (Q, W))` bool: the set's `axis_keep`, the pixels kept;
            with a resize, the model pixels that depend on a kept input pixel.
    """

    grid: TokenGrid
    axis_keep: tuple[torch.Tensor, torch.Tensor]
    pixel_keep: tuple[torch.Tensor, torch.Tensor]

    @classmethod
    def of(
        cls, grid: TokenGrid | None, ablation_set: AblationSet, device: torch.device, footprint: tuple | None = None
    ) -> ViewTokens | None:
        """The kept tokens of `ablation_set`'s views on `grid`, or `None` without token dropping.

        With a `footprint` (`robustwrap.geometry.resize_footprint`: the views are resized from
        the set's input pixels to the model's), a model pixel counts as kept when it depends on
        a kept input pixel, so a token is dropped only when none of its pixels does.
        """
        if grid is None:
            return None
        pixels = ablation_set.axis_keep(device)
        if footprint is not None:
            pixels = tuple((keep[:, :, None] & torch.as_tensor(f, device=device)[None]).any(1) for keep, f in zip(pixels, footprint))
        return cls(grid, axis_token_keep(pixels, grid), pixels)

    def keep(self, view: torch.Tensor) -> torch.Tensor:
        """`(N, gh, gw)` bool: the tokens each view keeps; view `-1` (an unablated image) keeps all."""
        rows, cols = self.axis_keep
        n_cols = cols.shape[0]
        index = view.clamp(min=0)
        keep = rows[index // n_cols][:, :, None] & cols[index % n_cols][:, None, :]
        return keep | (view < 0)[:, None, None]

    def most_kept(self) -> int:
        """The most patch tokens one view keeps."""
        rows, cols = self.axis_keep
        return int(rows.sum(1).max()) * int(cols.sum(1).max())

    def logits(
        self,
        model: nn.Module,
        images: torch.Tensor,
        image: torch.Tensor,
        view: torch.Tensor,
        fill: torch.Tensor | None = None,
        embedded: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The ViT's logits on views `(image[n], view[n])` of `images`, no view built (`robustwrap.tokens.forward_ablated`).

        Args:
            images: `(B, C, H, W)` images encoded as the model takes them (`encode_full`).
            view: `(N,)` view indices, `-1` for an unablated image.
            fill: the ablated pixels' value (`fill_like`; `0` for `"levine2020"`), or `None` when
                `images` are already the ablated views.
            embedded: `robustwrap.tokens.embed_patches(model, images)`, shared between calls.
        """
        rows, cols = self.pixel_keep
        n_cols = cols.shape[0]
        index, unablated = view.clamp(min=0), (view < 0)[:, None]
        return forward_ablated(
            model, images, image, rows[index // n_cols] | unablated, cols[index % n_cols] | unablated, self.grid, fill, embedded
        )


def view_logits(
    model: nn.Module, views: torch.Tensor, view: torch.Tensor, tokens: ViewTokens | None, num_classes: int | None = None
) -> torch.Tensor:
    """The base model's logits on ablated views: the one function of the defense's views.

    Prediction, certification, training (`RandomAblation.logits`) and the attack's surrogate
    all compute this function: `model(views)`, or with `tokens` (token dropping) the ViT on the
    prefix tokens and the patch tokens each view keeps. (Prediction and certification do not
    build the views: they call `ViewTokens.logits` on the images, which computes the same.)

    Args:
        model: the base classifier (or its inference copy).
        views: `(N, C, H, W)` ablated views (as `ablate` builds them; `2C` channels with `"levine2020"`).
        view: `(N,)` long, the view index of each (`-1`: nothing ablated).
        tokens: `ViewTokens` with token dropping, else `None`.
        num_classes: the class count the logits must have, or `None` to accept any.
    """
    if tokens is None:
        return forward_views(model, views, num_classes)
    image = torch.arange(views.shape[0], device=views.device)
    return forward_views(lambda v: tokens.logits(model, v, image, view), views, num_classes)


def token_fill(fill: float | tuple[float, ...], encoding: str, x: torch.Tensor) -> torch.Tensor:
    """The value of ablated pixels in the encoded images the model takes: `fill`, or `0` for `"levine2020"`."""
    return fill_like(fill, x) if encoding == "fill" else x.new_zeros(())


def encode_full(x: torch.Tensor, encoding: str) -> torch.Tensor:
    """`x` with nothing ablated, as the base model takes it (`(x, 1 - x)` for `"levine2020"`)."""
    return torch.cat([x, 1 - x], 1) if encoding == "levine2020" else x


class RandomAblation:
    """Training augmentation of (De)Randomized Smoothing: one randomly placed ablated view per image.

    The `fit_masking` strategy `"random_ablation"` (the default for a smoothing model): each
    image becomes one of its views, chosen uniformly, with the defended model's ablation, size,
    stride, encoding and fill, so the base model trains on what it certifies.

    With an input size of its own (`resize`), the views are at the defended model's input size
    and `logits` resizes them to the base model's, as certification does.

    Args:
        ablation_set: the views (`DerandomizedSmoothing.ablation_set`).
        encoding: `"fill"` or `"levine2020"`; with `"levine2020"` the output has `2C` channels.
        fill: ablated pixel value for `"fill"`.
        generator: a `torch.Generator` for the view choice (on the images' device), for
            reproducible training; `None` uses torch's global generator.
        drop_tokens: the views drop the tokens they do not keep (a ViT): train through
            `logits(model, views, view)`, which runs the base model as certification does.
        resize: `(image_size, mode)`: the defended model resizes its views to the base model's
            `image_size` with `mode` (`DerandomizedSmoothing.resize`), or `None`.
    """

    def __init__(
        self,
        ablation_set: AblationSet,
        encoding: str = "fill",
        fill: float | Sequence[float] = 0.0,
        generator: torch.Generator | None = None,
        drop_tokens: bool = False,
        resize: tuple[tuple[int, int], str] | None = None,
    ):
        if not isinstance(ablation_set, AblationSet):
            raise TypeError(f"ablation_set must be a robustwrap AblationSet, got {type(ablation_set).__name__}")
        if not isinstance(drop_tokens, bool):
            raise TypeError(f"drop_tokens must be True or False, got {drop_tokens!r}")
        self.ablation_set = ablation_set
        self.encoding = _as_encoding(encoding)
        self.fill = as_fill(fill)
        self.generator = generator
        self.drop_tokens = drop_tokens
        self.resize = resize

    @classmethod
    def from_model(cls, model: DerandomizedSmoothing, generator: torch.Generator | None = None) -> RandomAblation:
        """The augmentation with `model`'s current ablation set, encoding, fill and token dropping."""
        resize = None if model.resize is None else (model.image_size, model.resize)
        return cls(model.ablation_set, model.encoding, model.fill, generator, drop_tokens=model.drop_tokens, resize=resize)

    @property
    def views_in_forward(self) -> bool:
        """Whether the model makes the views in its forward (`logits`): with `drop_tokens`."""
        return self.drop_tokens

    def logits(self, model: nn.Module, views: torch.Tensor, view: torch.Tensor) -> torch.Tensor:
        """The base model's output on training views, computed as certification computes it (`view_logits`).

        Args:
            model: the base classifier being trained (its mode and gradients are left alone).
            views: `(B, C, H, W)` views from this augmentation (`2C` channels with `"levine2020"`),
                or unablated images.
            view: `(B,)` long: each image's view index (`return_indices=True`), `-1` for an image
                left unablated (all its tokens kept); `None`: every image unablated.

        Raises:
            ValueError: `drop_tokens` and `model`'s token grid cannot be read.
            TypeError: `drop_tokens` and `model` is (or wraps) a `DistributedDataParallel` (whose
                forward these views would bypass).
        """
        footprint = None
        if self.resize is not None:
            size, mode = self.resize
            footprint = resize_footprint(self.ablation_set.image_size, size, mode)
            views = resize_images(views, size, mode)
        if not self.drop_tokens or view is None:
            return model(views)
        if joins_processes(model):
            raise TypeError(
                "token-dropping views run the ViT's parts, not its forward, so a DistributedDataParallel around it would not "
                "synchronise their gradients: call logits(model.module, ...) inside the forward of a module that your "
                "DistributedDataParallel wraps, or train with robustwrap.fit_masking, which does"
            )
        model = unwrap(model)  # a compiled or DataParallel ViT: its parts run, never the wrapper's forward
        grid = token_grid(model, tuple(views.shape[2:]))
        if grid is None:
            raise ValueError(f"this RandomAblation drops tokens, which needs {SUPPORTED}; got a {type(model).__name__}")
        return view_logits(model, views, view, ViewTokens.of(grid, self.ablation_set, views.device, footprint))

    def __call__(self, x: torch.Tensor, y: torch.Tensor | None = None, *, return_indices: bool = False):
        """Replace each image of `x` `(B, C, H, W)` by one random ablated view; `y` is not used.

        Returns:
            The views (`(B, 2C, H, W)` for `"levine2020"`), and with `return_indices` also the
            `(B,)` view indices.

        Raises:
            ValueError: for images that are not `(B, C, H, W)` of the set's image size.
        """
        h, w = self.ablation_set.image_size
        if not isinstance(x, torch.Tensor) or x.ndim != 4 or tuple(x.shape[2:]) != (h, w):
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"images must be (B, C, {h}, {w}) for this ablation set, got {got}")
        view = torch.randint(len(self.ablation_set), (x.shape[0],), generator=self.generator, device=x.device)
        image = torch.arange(x.shape[0], device=x.device)
        out = ablate(x, image, view, self.ablation_set.axis_keep(x.device), self.encoding, self.fill)
        return (out, view) if return_indices else out


# ----------------------------------------------------------------------------- classifier


@dataclass(frozen=True)
class SmoothingResult(CertifyResult):
    """Per-image outcome of `DerandomizedSmoothing.certify`.

    Attributes:
        prediction: `(B,)` the smoothed prediction (most votes; the smallest class id on ties).
        certified: `(B,)` bool: no patch of the threat model can change the prediction, and it
            equals the label.
        num_views: `(B,)` ablated views run through the model for each image.
        counts: `(B, num_classes)` votes of the evaluated views; with `early_exit=False` the
            votes of all `V` views.
        delta: `Δ`, the most views one patch of the threat model meets.
    """

    counts: torch.Tensor
    delta: int


def _as_encoding(encoding) -> str:
    if encoding not in ENCODINGS:
        raise ValueError(f"encoding must be one of {', '.join(map(repr, ENCODINGS))}, got {encoding!r}")
    return str(encoding)


def _as_threshold(threshold) -> float | None:
    if threshold is None:
        return None
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)):
        raise TypeError(f"threshold must be None (argmax votes) or a float in (0, 1], got {threshold!r}")
    value = float(threshold)
    if not 0.0 < value <= 1.0:  # also refuses NaN
        raise ValueError(f"threshold must be in (0, 1] (a view votes for every class whose softmax is >= threshold), got {threshold!r}")
    return value


def _as_patch(patch, image_size: tuple[int, int]) -> tuple[int, int]:
    patch = read_patch(patch)
    if isinstance(patch, float):
        side = patch_side(patch, image_size)
        return side, side
    if isinstance(patch, (tuple, list)) and len(patch) != 2:
        raise ValueError(f"patch must be a side in pixels, an area fraction in (0, 1) or (ph, pw) in pixels, got {patch!r}")
    if not isinstance(patch, (int, tuple, list)) or isinstance(patch, bool):
        raise TypeError(f"patch must be an int (pixels), a float in (0, 1) (area fraction) or (ph, pw), got {patch!r}")
    return patch_pixels(patch, image_size)


def _check_levine_fill(fill) -> None:
    # levine2020 ablates to 0 in both channels: any other fill would be silently ignored.
    if fill != 0:
        raise ValueError(f"fill has no effect with encoding='levine2020' (ablated pixels are 0 in both channels); got fill={fill!r}")


def _built_for_partial_tokens(model: nn.Module, image_size: tuple[int, int]) -> bool:
    """Whether `model` is a ViT built for `image_size` inputs that are not a whole number of its
    tokens: timm's strict `PatchEmbed` then takes them, and its convolution leaves the last pixel
    rows or columns out of every token."""
    embed = getattr(model, "patch_embed", None)
    patch, built = getattr(embed, "patch_size", None), getattr(embed, "img_size", None)
    if not getattr(embed, "strict_img_size", False) or not isinstance(patch, (tuple, list)) or not isinstance(built, (tuple, list)):
        return False
    return tuple(built) == tuple(image_size) and (image_size[0] % patch[0] != 0 or image_size[1] % patch[1] != 0)


def _check_certifiable(ablation_set: AblationSet, patch: tuple[int, int]) -> None:
    """Raise when `2Δ >= V`: the vote margin needed exceeds what any image can reach."""
    delta, views = ablation_set.delta(patch), len(ablation_set)
    if 2 * delta >= views:
        raise ValueError(
            f"a {patch[0]}x{patch[1]} patch meets up to Δ={delta} of the V={views} views ({ablation_set.describe()}), "
            f"and a certificate needs a vote margin of 2Δ={2 * delta} >= V: no image can be certified "
            "(at 2Δ = V only a unanimous vote for class 0 could be). Use a smaller size or stride, or a smaller patch"
        )


class DerandomizedSmoothing(RobustPatchClassifier):
    """A classifier defended by (De)Randomized Smoothing (Levine & Feizi 2020; Salman et al. 2022).

    Each view keeps one band of `size` pixels (`ablation="column"` or `"row"`) or one
    `size x size` block (`"block"`), wrapping around the image, at positions `0, stride,
    2 stride, ...`, and ablates every other pixel. Every view votes (for its argmax class, or
    with `threshold` for every class whose softmax is `>= threshold`); the prediction is the
    class with the most votes, the smallest class id on ties. A patch meets at most `Δ` views
    (`delta`, found by enumerating every patch position), so the prediction `y` is certified
    when `n_y - n_c > 2Δ` (or `== 2Δ` and `y < c`) for every other class `c`
    (docs/concepts.md#smoothing-certificate).

    In eval mode `forward` returns the vote fractions `counts / V` (their argmax is `predict`);
    in train mode it is the base model's forward. Train the base model on ablated views with
    `fit_masking` (strategy `"random_ablation"`, see `RandomAblation`).

    Args:
        model: the base classifier, `(B, C, H, W) -> (B, num_classes)` logits (`2C` input
            channels with `encoding="levine2020"`).
        patch: the threat model: side in pixels (int), fraction of the image area (float in
            (0, 1); default 0.02), or `(ph, pw)` in pixels.
        image_size: `H` or `(H, W)` of the base model's inputs; defaults to the size a timm
            model was built for.
        input_size: `h` or `(h, w)`: the defended model takes images of this size and resizes
            them to `image_size` inside its forward (Smoothed ViT's CIFAR-10 models: 32 px
            upsampled to 224); the patch, `size`, `stride` and `fill` are in these input pixels
            (docs/concepts.md#input-pixels). `None` (default): no resize.
        resize: the interpolation of that resize: `"nearest"` (default), `"bilinear"` or `"bicubic"`.
        ablation: `"column"` (default), `"row"` or `"block"`.
        size: band width / block side in pixels (required).
        stride: pixels between neighbouring view positions (default 1: every position).
        threshold: `None` (default) for argmax votes, or a float in (0, 1] for softmax-threshold votes.
        encoding: `"fill"` (default): ablated pixels are `fill`; `"levine2020"`: the base model
            takes `2C` channels `(x, 1 - x)`, `0` in both where ablated (Levine & Feizi's networks).
        drop_tokens: run each view of a vision transformer on the tokens that meet its retained
            region only (plus the class, distillation and register tokens), as Smoothed ViT does
            (docs/concepts.md#token-dropping). `None` (default): on for timm's ViT family
            (`VisionTransformer` and the models built on it), off for other models and for a ViT
            built for images that are not a whole number of its tokens (views ablate pixels); it
            changes the defended function, so it is recorded in `settings()`.
        fill: ablated pixel value in the model's input space (`"fill"` encoding only).
        batch_size: views per forward pass (default `None`: chosen for the model, image size and
            device, `robustwrap.views.auto_batch_size`); views of several images share a pass.
            With `drop_tokens` a pass holds as many views as hold about the tokens of
            `batch_size` images.
        precision: `"float32"`, `"bfloat16"` or `"float16"` autocast of every forward pass.
        margin: certificate margin, a float >= 0 (0 is the papers' rule): for a certificate a
            view's vote counts for `y` only if it holds when the logits move by up to `margin`,
            and for another class if such a move could give it (docs/concepts.md#margin).
        num_classes: classes of the base model, if it has no `num_classes` attribute.

    Raises:
        TypeError: for a model that is not an `nn.Module`, or a threshold / patch of the wrong type.
        ValueError: `size` missing, `< 1` or larger than the image; `stride < 1`; `threshold`
            outside (0, 1]; an unknown `ablation` or `encoding`; `"levine2020"` with a base model
            that does not take an even number (`2C`) of channels or with a non-zero `fill`;
            a patch so large that `2Δ >= V` (nothing could be certified); `drop_tokens=True`
            with a model whose token grid cannot be read, or an image size that is not a
            multiple of its token size.
    """

    defense = "smoothing"
    _geometry_name = "ablation set"
    _no_detection = (
        "no published rule turns smoothing's votes into a certified alert (its views keep a band or block, none of them hides the "
        "patch's region); use PatchCleanser or PatchGuard for certified detection"
    )
    _no_top_k = None  # the vote counts bound every class's votes
    # One random ablated view per image (`RandomAblation`) by default, or clean fine-tuning.
    training_strategies: ClassVar[tuple[str, ...]] = ("none", "random_ablation")
    default_strategy: ClassVar[str] = "random_ablation"

    def __init__(
        self,
        model: nn.Module,
        patch: int | float | Sequence[int] | None = None,
        *,
        image_size: int | Sequence[int] | None = None,
        input_size: int | Sequence[int] | None = None,
        resize: str | None = None,
        ablation: str = "column",
        size: int | None = None,
        stride: int = 1,
        threshold: float | None = None,
        encoding: str = "fill",
        drop_tokens: bool | None = None,
        fill: float | Sequence[float] = 0.0,
        batch_size: int | None = None,
        precision: str = "float32",
        margin: float = DEFAULT_MARGIN,
        num_classes: int | None = None,
    ):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if ablation not in ABLATIONS:
            raise ValueError(f"ablation must be one of {', '.join(map(repr, ABLATIONS))}, got {ablation!r}")
        if size is None:
            raise ValueError(
                f"size is required: the {'block side' if ablation == 'block' else 'band width'} in pixels "
                "(e.g. size=19 for column bands on 224x224, Salman et al.; size=4 on 32x32, Levine & Feizi)"
            )
        encoding = _as_encoding(encoding)
        threshold = _as_threshold(threshold)
        resolved = resolve_image_size(model, image_size)
        input_size, resize = resolve_input_size(resolved, input_size, resize)
        ablation_set = AblationSet(input_size or resolved, ablation, size, stride)
        patch = _as_patch(DEFAULT_PATCH if patch is None else patch, input_size or resolved)
        _check_certifiable(ablation_set, patch)
        # Base channel checks would read a levine2020 model's 2C channels as the fill's length.
        super().__init__(
            model,
            image_size=resolved,
            input_size=input_size,
            resize=resize,
            fill=0.0,
            batch_size=batch_size,
            precision=precision,
            margin=margin,
            num_classes=num_classes,
        )
        self._ablation_set = ablation_set
        self._patch = patch
        self._encoding = encoding
        self.threshold = threshold
        self.fill = fill
        self._check_encoding()
        self.drop_tokens = drop_tokens

    # ------------------------------------------------------------------------------ settings
    @property
    def ablation_set(self) -> AblationSet:
        """The views; assign a new `AblationSet` (same image size) to change ablation, size or stride."""
        return self._ablation_set

    @ablation_set.setter
    def ablation_set(self, value: AblationSet) -> None:
        if not isinstance(value, AblationSet):
            raise TypeError(f"ablation_set must be a robustwrap AblationSet, got {type(value).__name__}")
        if value.image_size != self.input_size:
            raise ValueError(f"ablation_set is for {value.image_size} images, this model certifies {self.input_size}")
        _check_certifiable(value, self._patch)
        self._ablation_set = value

    @property
    def ablation(self) -> str:
        """`"column"`, `"row"` or `"block"` (from `ablation_set`; assigning builds a new one)."""
        return self._ablation_set.ablation

    @ablation.setter
    def ablation(self, value: str) -> None:
        self.ablation_set = AblationSet(self.input_size, value, self.size, self.stride)

    @property
    def size(self) -> int:
        """Band width / block side in pixels (from `ablation_set`; assigning builds a new one)."""
        return self._ablation_set.size

    @size.setter
    def size(self, value: int) -> None:
        self.ablation_set = AblationSet(self.input_size, self.ablation, value, self.stride)

    @property
    def stride(self) -> int:
        """Pixels between neighbouring view positions (from `ablation_set`; assigning builds a new one)."""
        return self._ablation_set.stride

    @stride.setter
    def stride(self, value: int) -> None:
        self.ablation_set = AblationSet(self.input_size, self.ablation, self.size, value)

    @property
    def patch(self) -> tuple[int, int]:
        """`(ph, pw)` in pixels: the patch of the threat model."""
        return self._patch

    @patch.setter
    def patch(self, value: int | float | Sequence[int]) -> None:
        patch = _as_patch(value, self.input_size)
        _check_certifiable(self._ablation_set, patch)
        self._patch = patch

    @property
    def delta(self) -> int:
        """`Δ`: the most views one patch of the threat model meets (by enumeration)."""
        return self._ablation_set.delta(self._patch)

    @property
    def full_views(self) -> int:
        """`V`: the views of one image's full evaluation."""
        return len(self._ablation_set)

    @property
    def threshold(self) -> float | None:
        """`None` for argmax votes, or `θ` in (0, 1] for votes of every class with softmax `>= θ`."""
        return self._threshold

    @threshold.setter
    def threshold(self, value: float | None) -> None:
        self._threshold = _as_threshold(value)

    @property
    def encoding(self) -> str:
        """`"fill"` or `"levine2020"` (the base model then takes `2C` channels)."""
        return self._encoding

    @encoding.setter
    def encoding(self, value: str) -> None:
        previous = self._encoding
        self._encoding = _as_encoding(value)
        try:
            self._check_encoding()
        except ValueError:
            self._encoding = previous
            raise

    @property
    def drop_tokens(self) -> bool:
        """Whether each view runs on the tokens that meet its retained region only (a ViT).

        Assigned `None` (the default), it follows the base model at every read: on for timm's
        ViT family (off for a ViT built for images that are not a whole number of its tokens),
        off otherwise, so `m.model = other` re-derives it; assigned `True` or
        `False`, it is that. `settings()` records the value read here.
        """
        return self._token_grid() is not None

    @drop_tokens.setter
    def drop_tokens(self, value: bool | None) -> None:
        if value is not None and not isinstance(value, bool):
            raise TypeError(f"drop_tokens must be None (on for timm's ViT family), True or False, got {value!r}")
        previous = self.__dict__.get("_drop_tokens")
        self._drop_tokens = value
        try:
            self._token_grid()
        except ValueError:
            self._drop_tokens = previous
            raise

    def _token_grid(self) -> TokenGrid | None:
        """The base model's token grid when views drop tokens, else `None`; read from the model at every call.

        Raises:
            ValueError: `drop_tokens=True` and the grid cannot be read, or the image size is not
                a multiple of the token size.
        """
        if self._drop_tokens is False:
            return None
        try:
            grid = token_grid(self._inner_model, self.image_size)
        except ValueError:
            if self._drop_tokens or not _built_for_partial_tokens(self._inner_model, self.image_size):
                raise
            # None follows the model: a ViT built for images that are not a multiple of its tokens
            # (its last pixel rows or columns meet no token) cannot drop tokens exactly, so its views
            # ablate pixels, as any other model's do.
            return None
        if grid is None and self._drop_tokens:
            raise ValueError(
                f"drop_tokens=True needs a model whose token grid can be read: {SUPPORTED}; "
                f"got a {type(self._inner_model).__name__}. Use drop_tokens=False (or None: on for those models only)"
            )
        return grid

    @property
    def fill(self) -> float | tuple[float, ...]:
        """Ablated pixel value in the model's input space (`"fill"` encoding)."""
        return RobustPatchClassifier.fill.fget(self)

    @fill.setter
    def fill(self, value: float | Sequence[float]) -> None:
        if self.__dict__.get("_encoding") == "levine2020":
            _check_levine_fill(value)
            self._fill = 0.0
            return
        RobustPatchClassifier.fill.fset(self, value)

    def _model_changed(self) -> None:
        self._check_encoding()  # the new model must take 2C channels under levine2020, as at wrap

    def _check_encoding(self) -> None:
        if self._encoding != "levine2020":
            return
        _check_levine_fill(self.fill)
        channels = self.in_chans
        if channels is not None and channels % 2:
            raise ValueError(
                f"encoding='levine2020' feeds the base model 2C channels (x, 1 - x), but its first conv takes {channels} channels; "
                "use encoding='fill', or a base model built for 2C input channels"
            )

    def _training_recipe(self, strategy: str, fill: float | tuple[float, ...], batch_size: int) -> TrainingRecipe:
        encoding = self.encoding  # clean images are encoded as the views are (levine2020's 2C channels)
        augment = None
        if strategy == "random_ablation":
            resize = None if self.resize is None else (self.image_size, self.resize)
            augment = RandomAblation(self.ablation_set, encoding, fill, drop_tokens=self.drop_tokens, resize=resize)
        return TrainingRecipe(augment=augment, encode=lambda x: encode_full(x, encoding))

    def _training_geometry(self) -> dict[str, Any]:
        settings = self.settings()
        return {"views": {key: settings[key] for key in ("ablation", "size", "stride", "encoding", "drop_tokens")}}

    def _defense_settings(self) -> dict[str, Any]:
        geometry = self._ablation_set.to_dict()
        geometry.pop("image_size")
        return {
            **geometry,
            "patch": list(self._patch),
            "threshold": self._threshold,
            "encoding": self._encoding,
            "drop_tokens": self.drop_tokens,
        }

    @classmethod
    def _options_from_settings(cls, settings: dict[str, Any]) -> tuple[dict[str, Any], tuple[str, ...]]:
        keys = ("ablation", "size", "stride", "patch", "threshold", "encoding")
        missing = [k for k in keys if k not in settings]
        if missing:
            raise ValueError(f"smoothing settings lack {', '.join(missing)} (keys: {sorted(settings)})")
        # Settings written before token dropping existed describe views that keep every token.
        drop_tokens = settings.get("drop_tokens", False)
        boolean = isinstance(drop_tokens, bool)
        if not boolean:
            raise ValueError(f"settings drop_tokens must be true or false, got {drop_tokens!r}")
        patch = settings["patch"]
        pixels = isinstance(patch, (list, tuple)) and len(patch) == 2 and all(isinstance(v, int) and not isinstance(v, bool) for v in patch)
        if not pixels:
            raise ValueError(f"settings patch must be [ph, pw] in pixels, got {patch!r}")
        image_size = settings.get("image_size")
        if not isinstance(image_size, (list, tuple)) or len(image_size) != 2:
            raise ValueError(f"settings image_size must be [H, W], got {image_size!r}")
        try:
            threshold = _as_threshold(settings["threshold"])
            options = {
                "image_size": as_image_size(tuple(image_size)),
                "ablation": settings["ablation"],
                "size": positive_int(settings["size"], "size"),
                "stride": positive_int(settings["stride"], "stride"),
                "patch": tuple(patch),
                "threshold": threshold,
                "encoding": _as_encoding(settings["encoding"]),
                "drop_tokens": drop_tokens,
            }
        except TypeError as error:
            raise ValueError(f"settings: {error}") from None
        return options, (*keys, "drop_tokens")

    @classmethod
    def from_patch(
        cls,
        model: nn.Module,
        patch: int | float | Sequence[int] | None = None,
        *,
        ablation: str = "column",
        size: int | None = None,
        stride: int = 1,
        threshold: float | None = None,
        encoding: str = "fill",
        drop_tokens: bool | None = None,
        image_size: int | Sequence[int] | None = None,
        input_size: int | Sequence[int] | None = None,
        resize: str | None = None,
        fill: float | Sequence[float] = 0.0,
        batch_size: int | None = None,
        precision: str = "float32",
        margin: float = DEFAULT_MARGIN,
        num_classes: int | None = None,
    ) -> DerandomizedSmoothing:
        """Smoothing for a threat model: what `robustwrap.wrap(model, patch, defense="smoothing", ...)` calls.

        Args:
            model: the base classifier.
            patch: side in pixels, area fraction in (0, 1) (default 0.02), or `(ph, pw)`.
            ablation: `"column"` (default), `"row"` or `"block"`.
            size: band width / block side in pixels (required).
            stride: pixels between view positions (default 1).
            threshold: `None` (argmax votes) or a float in (0, 1].
            encoding: `"fill"` (default) or `"levine2020"`.
            drop_tokens: run each view on the tokens meeting its retained region (a ViT);
                `None` (default): on for timm's ViT family, off otherwise.
            image_size: `H` or `(H, W)` of the base model's inputs; defaults to the size a timm model was built for.
            input_size: `h` or `(h, w)` of the defended model's inputs, resized to `image_size`
                in its forward; the patch, `size` and `stride` are in its pixels (default: no resize).
            resize: `"nearest"` (default), `"bilinear"` or `"bicubic"`: the interpolation of that resize.
            fill: ablated pixel value in the model's input space.
            batch_size: views per forward pass (default `None`: chosen for the model, image
                size and device).
            precision: autocast precision of every forward pass (default `"float32"`).
            margin: certificate margin, a float >= 0 (default `DEFAULT_MARGIN`, 1e-3; 0 is the papers' rule).
            num_classes: classes of the base model, if it has no `num_classes` attribute.

        Returns:
            The defended model, in the same train/eval mode as `model`.

        Raises:
            TypeError, ValueError: as `DerandomizedSmoothing`.
        """
        defended = cls(
            model,
            patch,
            image_size=image_size,
            input_size=input_size,
            resize=resize,
            ablation=ablation,
            size=size,
            stride=stride,
            threshold=threshold,
            encoding=encoding,
            drop_tokens=drop_tokens,
            fill=fill,
            batch_size=batch_size,
            precision=precision,
            margin=margin,
            num_classes=num_classes,
        )
        return defended

    def extra_repr(self) -> str:
        vote = "argmax" if self._threshold is None else f"softmax >= {self._threshold}"
        ph, pw = self._patch
        resized = "" if self.resize is None else f"{self.input_size[0]}x{self.input_size[1]} inputs resized ({self.resize}) to {self.image_size[0]}x{self.image_size[1]}, "
        return (
            f"{resized}{self._ablation_set.describe()}, patch {ph}x{pw} px (Δ={self.delta}), votes {vote}, encoding={self._encoding}, "
            f"drop_tokens={self._drop_tokens if self._drop_tokens is not None else supports_token_dropping(self._inner_model, self.image_size)}, "
            f"fill={self.fill}, batch_size={self.batch_size}, precision={self.precision}, margin={self.margin}"
        )

    # ------------------------------------------------------------------------------- inputs
    def _check_images(self, x) -> torch.Tensor:
        """As the base check; with `"levine2020"` the images have `C` channels and the model `2C`."""
        self._check_encoding()
        if self._encoding != "levine2020" or not isinstance(x, torch.Tensor) or x.ndim != 4 or not x.is_floating_point():
            return super()._check_images(x)
        channels = self.in_chans
        if channels is not None and 2 * x.shape[1] != channels:
            raise ValueError(
                f"images must have {channels // 2} channels: encoding='levine2020' feeds the base model (x, 1 - x), "
                f"and it takes {channels}; got {x.shape[1]} (shape {tuple(x.shape)})"
            )
        return super()._check_images(encode_full(x, "levine2020"))[:, : x.shape[1]]

    # ----------------------------------------------------------------------------- inference
    def vanilla_logits(self, x: torch.Tensor) -> torch.Tensor:
        """The base model's logits on `x` with nothing ablated (encoded as the base model takes it)."""
        x = self._check_images(x)
        with eval_mode(self._inner_model), torch.no_grad(), self.autocast():
            encoded = encode_full(x, self._encoding)
            return call_model(self._inference_model(encoded), encoded).float()

    def predict_vanilla(self, x: torch.Tensor) -> torch.Tensor:
        """The undefended base model's labels `(B,)` for `x` (encoded as the base model takes it)."""
        return self.vanilla_logits(x).argmax(1)

    def _robust_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Vote fractions `counts / V` of all `V` views, float32; their argmax is `predict(x)`.

        Counts are integers divided by the same `V`, so equal counts stay equal and `argmax`
        keeps the smallest class id on ties, as the prediction does.
        """
        x = self._check_images(x)
        counts, _, _, _ = self._vote(x, None, early_exit=False)
        return counts.float() / self.full_views

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Smoothed labels `(B,)` (in either mode; the base model runs in eval mode).

        An image stops being evaluated once the remaining views cannot change its prediction.
        """
        x = self._check_images(x)
        counts, _, _, _ = self._vote(x, None, early_exit=True)
        return smoothed_prediction(counts)

    def certify(self, x: torch.Tensor, y: torch.Tensor, early_exit: bool = True, k: int = 1) -> SmoothingResult:
        """Certify a batch against every patch of the threat model.

        Certified iff the smoothed prediction is `y` and `n_y - n_c > 2Δ` (or `== 2Δ` and
        `y < c`) for every other class `c`. With `early_exit` an image stops being evaluated as
        soon as the bounds `n_c <= final n_c <= n_c + R` (`R` views left) fix both its prediction
        and its certificate (docs/concepts.md#smoothing-early-exit); the prediction and the
        certificate are identical, only `num_views` (and the partial `counts`) are smaller.

        Args:
            x: `(B, C, H, W)` images, floating, as the model expects them.
            y: `(B,)` integer labels in `[0, num_classes)`.
            early_exit: skip views that cannot change the result (default True; with `k > 1`
                every view runs).
            k: certify that `y` stays among the `k` best classes under any patch (default 1: the
                prediction; `detection.votes_topk`, docs/concepts.md#top-k).

        Returns:
            A `SmoothingResult` with the prediction, certification, views per image, vote
            counts and `delta`.

        Raises:
            TypeError, ValueError: for bad images, labels or `k`, before any forward pass.
        """
        x = self._check_images(x)
        y = self._check_labels(y, x.shape[0]).to(x.device)
        k = self._check_top_k(k)
        delta = self.delta
        # the early exit's bounds decide the top-1 certificate only
        counts, sure, possible, seen = self._vote(x, y, early_exit=early_exit and k == 1, delta=delta)
        if k == 1:
            certified = certificate(counts, sure, possible, y, delta)
        else:
            certified = votes_topk(counts, sure, possible, y, delta, k, one_vote=self._threshold is None)
        return SmoothingResult(
            prediction=smoothed_prediction(counts),
            certified=certified,
            num_views=seen,
            counts=counts,
            delta=delta,
        )

    def _vote(
        self, x: torch.Tensor, labels: torch.Tensor | None, *, early_exit: bool, delta: int = 0
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Run the views of every image, `batch_size` per forward pass mixing images.

        Each image's views are taken in order; with `early_exit` an image leaves the schedule as
        soon as `decided` says its remaining views cannot change the answer asked for (the
        prediction, and with `labels` the certificate). With `drop_tokens` a pass holds as many
        views as hold about the tokens of `batch_size` full images, and its views that keep the
        same number of tokens run together (`robustwrap.tokens.forward_kept`).

        Returns:
            `(counts, sure, possible, seen)`: plain, guarded-sure and guarded-possible votes
            `(B, C)` (the same tensor when `margin == 0`), and views evaluated `(B,)`.
        """
        b, device = x.shape[0], x.device
        ablation_set, encoding, fill = self._ablation_set, self._encoding, self.fill
        threshold, margin, batch_size = self._threshold, self.margin, self.batch_size
        num_views = len(ablation_set)
        axis_keep = ablation_set.axis_keep(device)
        resize = self.resize
        footprint = None if resize is None else resize_footprint(self.input_size, self.image_size, resize)
        tokens = ViewTokens.of(self._token_grid(), ablation_set, device, footprint)
        # With a nearest resize each model pixel copies one input pixel, so the views of the
        # resized images keep the model pixels that copy kept input pixels: the images are
        # embedded once. Another interpolation mixes kept and ablated pixels: each view is
        # built, resized and run on the tokens that meet it.
        embed_once = tokens is not None and resize in (None, "nearest")
        if tokens is not None:
            batch_size = views_per_pass(batch_size, tokens.grid, tokens.most_kept())
        attr = getattr(self._inner_model, "num_classes", None)
        num_classes = attr if isinstance(attr, int) and not isinstance(attr, bool) else self._num_classes
        # Speed only, identical for predict and certify: views in channels_last for convolutional
        # networks on the CPU, one host synchronisation per step of passes (robustwrap.views).
        channels_last, sync_every = auto_channels_last(self._inner_model, device), auto_sync_every(device)
        counts = sure = possible = None
        seen = torch.zeros(b, dtype=torch.long, device=device)
        open_ = torch.ones(b, dtype=torch.bool, device=device)
        with eval_mode(self._inner_model), torch.no_grad(), self.autocast():
            # token dropping runs the model's own blocks: no inference copy stands in for them
            module = self._inference_model(encode_full(x[:1], encoding)) if tokens is None else self._inner_model
            if embed_once:  # each image embedded once; a view re-embeds only the tokens it keeps partly
                encoded = self.resize_input(encode_full(x, encoding))
                embedded, ablated = embed_patches(module, encoded), token_fill(fill, encoding, encoded)
            while True:
                if early_exit and counts is not None:
                    open_ &= ~decided(counts, sure, possible, num_views - seen, labels, delta)
                open_ &= seen < num_views
                active = open_.nonzero()[:, 0]
                if active.numel() == 0:
                    break
                # Offset-major over the open images: each takes its next views in order, and a
                # pass is filled with up to batch_size views of as many images as needed.
                # A step is `sync_every` passes planned at once (the host synchronises once per
                # step, to find the open images; 1 pass on the CPU, several on an accelerator).
                step = batch_size * sync_every
                per_image = -(-step // active.numel())
                image = active.repeat(per_image)
                view = seen[image] + torch.arange(per_image, device=device).repeat_interleave(active.numel())
                valid = view < num_views
                image, view = image[valid][:step], view[valid][:step]
                for start in range(0, image.numel(), batch_size):
                    part, part_view = image[start : start + batch_size], view[start : start + batch_size]
                    if not embed_once:
                        views = ablate(x, part, part_view, axis_keep, encoding, fill)
                        if tokens is not None:  # the resized view, run on the tokens that meet its kept pixels
                            views = self.resize_input(views)
                        elif channels_last:
                            views = views.contiguous(memory_format=torch.channels_last)
                        logits = view_logits(module, views, part_view, tokens, num_classes).float()
                    else:
                        # forward_views counts the pass's views and checks its logits; the views are (part, part_view)
                        run = lambda _: tokens.logits(module, encoded, part, part_view, ablated, embedded)  # noqa: B023 - called at once
                        logits = forward_views(run, part, num_classes).float()
                    if counts is None:
                        # learnt from the views when the model does not say, so no blank probe is needed
                        num_classes = self._num_classes = logits.shape[1]
                        counts = torch.zeros(b, num_classes, dtype=torch.long, device=device)
                        sure, possible = (counts, counts) if margin == 0 else (torch.zeros_like(counts), torch.zeros_like(counts))
                    plain = plain_votes(logits, threshold)
                    counts.index_add_(0, part, plain.long())
                    if margin != 0:
                        guard_sure, guard_possible = guarded_votes(logits, threshold, margin)
                        sure.index_add_(0, part, guard_sure.long())
                        possible.index_add_(0, part, guard_possible.long())
                    seen += torch.bincount(part, minlength=b)
        return counts, sure, possible, seen
