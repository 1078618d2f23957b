"""PatchGuard: robust masking of local logits, its evidence-bound certificate, and the defended model.

A small-receptive-field model (a BagNet, `robustwrap.models`) returns local logits
`(B, num_classes, h, w)`; a patch can only change the features inside one `wh x ww` window
(`robustwrap.geometry.feature_window`). Robust masking clips the logits to `[0, clip]`, sums
each class's evidence over the map and removes the class's largest window when it holds more
than a fraction `T` of it. The certificate bounds every class's masked evidence under any patch
(see the Concepts page, docs/concepts.md#robust-masking and docs/concepts.md#patchguard-certificate).
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .. import models  # check_receptive_field; importing it also registers the BagNets with timm (timm.create_model("bagnet17"))
from .._args import as_image_size, as_pair, positive_int
from .._unwrap import unwrap
from ..geometry import feature_window, patch_pixels
from ..views import call_model, eval_mode, model_device_dtype
from .base import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_PATCH,
    CertifyResult,
    RobustPatchClassifier,
    TrainingRecipe,
    _check_base_model,
    resolve_image_size,
)
from .detection import DEFAULT_TAU, evidence_topk, in_top_k, window_views

# The certificate margin on the evidence (`L_y(u) - U_c(u) > margin`): the evidence sums up to a
# window's worth of local logits, so rounding changes add up. On the zoo's BagNet in float32 the
# largest change of a certificate margin between views per pass and the inference copy is 1.4e-3
# (benchmarks/speed.md); 0.1 leaves a factor of about 70 (median size of a certificate margin: 177).
DEFAULT_EVIDENCE_MARGIN = 0.1

__all__ = [
    "DEFAULT_EVIDENCE_MARGIN",
    "PatchGuard",
    "PatchGuardResult",
    "robust_masking",
    "evidence_bounds",
    "masking_certificate",
    "MaskingCertificate",
    "provable_adversarial_loss",
    "window_sums",
    "clip_evidence",
]

# Provable adversarial training's default learning rate: the authors' on ImageNet and Imagenette. At
# 0.01 a model that cannot yet certify its images shrinks its output towards a constant (the loss of
# a constant output, ln C, is below its own) and can collapse to one class within 3 epochs
# (benchmarks/patchguard_collapse.py); at 0.001 it keeps its predictions apart while the loss falls.
_PROVABLE_LR = 0.001

# Elements of float64 work per chunk of images in the certificate (128 MiB): a 224 px BagNet-17
# batch of 64 with 1,000 classes would otherwise need about 1.5 GiB at once.
_CHUNK_ELEMENTS = 1 << 24


# ----------------------------------------------------------------------------------- rule
def clip_evidence(local_logits: torch.Tensor, clip: float | None = None) -> torch.Tensor:
    """Local logits clipped to `[0, clip]` (`[0, inf)` without a ceiling): the evidence."""
    return local_logits.clamp(min=0.0, max=clip)


def window_sums(maps: torch.Tensor, window: tuple[int, int]) -> torch.Tensor:
    """Sum of every full `wh x ww` window of `(..., h, w)` maps: `(..., h - wh + 1, w - ww + 1)`.

    Sum pooling (`avg_pool2d` with `divisor_override=1`): one kernel, no per-window loop, and each
    sum adds the window's own entries (no prefix-sum cancellation), so integer-valued maps give
    exact sums. The window is clipped to the map.
    """
    *lead, h, w = maps.shape
    wh, ww = min(window[0], h), min(window[1], w)
    flat = maps.reshape(-1, 1, h, w)
    sums = F.avg_pool2d(flat, (wh, ww), stride=1, divisor_override=1)
    return sums.reshape(*lead, h - wh + 1, w - ww + 1)


def _exceeds(top: torch.Tensor, total: torch.Tensor, threshold: float) -> torch.Tensor:
    """`total > 0 and top / total > threshold`, elementwise (the masking condition)."""
    positive = total > 0
    return positive & (top / torch.where(positive, total, torch.ones_like(total)) > threshold)


def _masked(evidence: torch.Tensor, window: tuple[int, int], threshold: float) -> torch.Tensor:
    total = evidence.sum((-2, -1))
    top = window_sums(evidence, window).amax((-2, -1))
    return torch.where(_exceeds(top, total, threshold), total - top, total)


def robust_masking(local_logits: torch.Tensor, window: tuple[int, int], threshold: float = 0.0, clip: float | None = None) -> torch.Tensor:
    """The masked evidence `g` `(B, C)` of local logits `(B, C, h, w)` (robust masking).

    Per class `c`: clip to `[0, clip]`, `g_c` = sum over the map, `S` = the largest window sum; if
    `g_c > 0` and `S / g_c > threshold`, `g_c -= S`. The prediction is `g.argmax(1)` (smallest
    class id on ties). Computed in the dtype of `local_logits` and differentiable (the attack's
    surrogate); `PatchGuard` passes float64.

    Args:
        local_logits: `(B, C, h, w)`.
        window: `(wh, ww)`, the window of `feature_window`.
        threshold: the detection threshold `T` in `[0, 1)`.
        clip: optional ceiling of the clipped logits.
    """
    return _masked(clip_evidence(local_logits, clip), window, threshold)


@dataclass(frozen=True)
class MaskingCertificate:
    """Outcome of `masking_certificate` for a batch.

    Attributes:
        prediction: `(B,)` robust-masking prediction (smallest class id on ties).
        certified: `(B,)` bool: the prediction is the label and no patch inside any window can change it.
        margin: `(B,)` float64, the worst case over windows `u` of `L_y(u) - max_{c != y} U_c(u)`
            (`inf` with a single class).
        evidence: `(B, C)` float64 masked evidence `g`.
    """

    prediction: torch.Tensor
    certified: torch.Tensor
    margin: torch.Tensor
    evidence: torch.Tensor


def _label_lower_bound(ev_y: torch.Tensor, window: tuple[int, int], threshold: float) -> torch.Tensor:
    """`L_y(u)` `(B, nU)` for evidence maps `ev_y` `(B, h, w)` of the label, every window `u`.

    `L'` is the map with window `u` zeroed (the attacker's features at their least); `M` its
    largest window sum. If `M / sum(L') > T`, masking surely removes a window: `L = sum(L') - M`.
    Otherwise a window is only removed if the patch makes it the largest, so it overlaps `u`:
    `L = sum(L') - max over windows overlapping u of their L' sum`.
    """
    b, h, w = ev_y.shape
    wh, ww = min(window[0], h), min(window[1], w)
    nh, nw = h - wh + 1, w - ww + 1
    dev = ev_y.device
    rows = torch.arange(h, device=dev)
    cols = torch.arange(w, device=dev)
    top = torch.arange(nh, device=dev)
    left = torch.arange(nw, device=dev)
    # keep[u, i, j]: pixel (i, j) lies outside window u.
    in_rows = (rows[None, :] >= top[:, None]) & (rows[None, :] < top[:, None] + wh)  # (nh, h)
    in_cols = (cols[None, :] >= left[:, None]) & (cols[None, :] < left[:, None] + ww)  # (nw, w)
    keep = ~(in_rows[:, None, :, None] & in_cols[None, :, None, :]).reshape(nh * nw, h, w)
    reduced = ev_y[:, None] * keep[None]  # (B, nU, h, w): zeros are exact
    sums = window_sums(reduced, (wh, ww)).reshape(b, nh * nw, nh * nw)  # [b, u, v]
    total = reduced.sum((-2, -1))  # (B, nU)
    biggest = sums.amax(-1)
    if threshold == 0:
        return total - biggest  # a map with evidence always has a positive largest window
    overlap = ((top[:, None] - top[None, :]).abs() < wh)[:, None, :, None] & ((left[:, None] - left[None, :]).abs() < ww)[None, :, None, :]
    overlap = overlap.reshape(nh * nw, nh * nw)  # [u, v]
    near = torch.where(overlap[None], sums, torch.zeros_like(sums)).amax(-1)
    return torch.where(_exceeds(biggest, total, threshold), total - biggest, total - near)


def evidence_bounds(
    local_logits: torch.Tensor, labels: torch.Tensor, window: tuple[int, int], threshold: float = 0.0, clip: float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The bounds on the masked evidence under a patch inside each window `u`, in float64.

    Upper bound of every class `c`: `U_c(u) = (g_c - S_c(u)) / (1 - T)`, with `g` and `S` of the
    clipped, unmasked map (whatever the patch writes in `u`, masking removes at least as much as
    it adds there, or, without masking, at most a fraction `T` of the total). Lower bound of the
    label `L_y(u)`: see `_label_lower_bound`. Windows `u` are the full `wh x ww` blocks of the map,
    row-major; the features one patch touches always lie inside one of them.

    Args:
        local_logits: `(B, C, h, w)` (cast to float64).
        labels: `(B,)` class ids.
        window: `(wh, ww)` of `feature_window` (clipped to the map).
        threshold: `T` in `[0, 1)`.
        clip: optional ceiling of the clipped logits.

    Returns:
        `(lower, upper)`: `(B, nU)` for the label and `(B, C, nU)` for every class.
    """
    x = clip_evidence(local_logits.detach().to(torch.float64), clip)
    b, c, h, w = x.shape
    wh, ww = min(window[0], h), min(window[1], w)
    upper = (x.sum((-2, -1))[..., None] - window_sums(x, (wh, ww)).reshape(b, c, -1)) / (1.0 - threshold)
    lower = _label_lower_bound(x[torch.arange(b, device=x.device), labels.to(x.device)], (wh, ww), threshold)
    return lower, upper


def masking_certificate(
    local_logits: torch.Tensor,
    labels: torch.Tensor,
    window: tuple[int, int],
    threshold: float = 0.0,
    clip: float | None = None,
    margin: float = 0.0,
    k: int = 1,
) -> MaskingCertificate:
    """Certify robust masking against any patch whose features lie in one window (float64).

    With the bounds of `evidence_bounds`, the image is certified iff its prediction is `y` and
    for every window `u` and class `c != y`: `L_y(u) - U_c(u) > margin`, where with `margin = 0`
    a tie `L_y(u) == U_c(u)` also counts when `y < c` (ties go to the smallest class id). Images
    are processed in chunks to bound memory; windows are handled by pooling, not a Python loop.

    Args:
        local_logits: `(B, C, h, w)` local logits (any floating dtype; cast to float64).
        labels: `(B,)` class ids.
        window: `(wh, ww)` of `feature_window`.
        threshold: `T` in `[0, 1)`.
        clip: optional ceiling of the clipped logits.
        margin: the margin guard, `>= 0`.
        k: certify that `y` stays in the top `k` (`detection.evidence_topk`; `1`: the prediction).

    Returns:
        A `MaskingCertificate` (`certified` for the top `k`; `margin` is the top-1 worst case).
    """
    local_logits = local_logits.detach().to(torch.float64)
    b, c, h, w = local_logits.shape
    labels = labels.to(local_logits.device)
    evidence = robust_masking(local_logits, window, threshold, clip)
    prediction = evidence.argmax(1)  # the first maximum: the smallest class id on ties
    n_windows = (h - min(window[0], h) + 1) * (w - min(window[1], w) + 1)
    per_image = c * (h * w + 3 * n_windows) + 2 * n_windows * (h * w + n_windows)
    chunk = max(1, _CHUNK_ELEMENTS // per_image)
    ids = torch.arange(c, device=local_logits.device)
    margins, oks = [], []
    for start in range(0, b, chunk):
        ys = labels[start : start + chunk]
        lower, upper = evidence_bounds(local_logits[start : start + chunk], ys, window, threshold, clip)
        # The classes that would win a tie against y (smaller ids) and those that would lose it.
        u_below = upper.masked_fill(~(ids[None, :] < ys[:, None])[..., None], -torch.inf).amax(1)  # (n, nU)
        u_above = upper.masked_fill(~(ids[None, :] > ys[:, None])[..., None], -torch.inf).amax(1)
        worst = (lower - torch.maximum(u_below, u_above)).amin(-1)
        if k > 1:
            ok = evidence_topk(lower, upper, ys, k, margin)
        elif margin > 0:
            ok = worst > margin
        else:
            ok = ((lower > u_below) & (lower >= u_above)).all(-1)
        margins.append(worst)
        oks.append(ok)
    certified = torch.cat(oks) & in_top_k(evidence, labels, k)
    return MaskingCertificate(prediction=prediction, certified=certified, margin=torch.cat(margins), evidence=evidence)


def provable_adversarial_loss(
    local_logits: torch.Tensor, labels: torch.Tensor, window: tuple[int, int], clip: float | None = None
) -> torch.Tensor:
    """PatchGuard's provable adversarial training loss (mean over the batch), with a gradient everywhere.

    The paper's loss (Xiang et al., 2021; the authors' `aggregation='adv'`): clip the local
    logits to `[0, clip]`, remove the true class's largest window (the evidence a patch could take
    away from it), average over the map, and take the cross-entropy. A model trained so keeps its
    label's evidence spread out, which is what the certificate needs.

    One change (docs/concepts.md#patchguard-training): the true class's local logits below 0 are
    counted as they are instead of as 0. Clipping has no gradient below 0, so with the paper's
    loss a model whose local logits all became negative (one epoch at a learning rate a little
    too high suffices) sees every score 0, a loss of exactly `ln(num_classes)` and no gradient
    ever again. Here the true class's score is `sum(min(logit, clip)) - largest clipped window`,
    at most the paper's, so the loss is at least the paper's (equal when none of the true class's
    local logits is negative) and always pushes the true class's negative local logits up. The
    other classes keep the paper's clipped score: pushing their logits further below 0 would
    change no evidence.

    Args:
        local_logits: `(B, C, h, w)` from the base model in train mode.
        labels: `(B,)` class ids.
        window: `(wh, ww)` of the defended model's threat model.
        clip: the ceiling of the defended model (None: `[0, inf)`).
    """
    evidence = clip_evidence(local_logits, clip)
    b, c, h, w = evidence.shape
    rows = torch.arange(b, device=evidence.device)
    top = window_sums(evidence[rows, labels], window).amax((-2, -1))  # (B,)
    scores = evidence.sum((-2, -1))
    own = local_logits[rows, labels]
    own = (own if clip is None else own.clamp(max=clip)).sum((-2, -1)) - top  # the true class, unclipped below 0
    scores = torch.where(F.one_hot(labels, c).bool(), own[:, None], scores)
    return F.cross_entropy(scores / (h * w), labels)


# ----------------------------------------------------------------------------- classifier
@dataclass(frozen=True)
class PatchGuardResult(CertifyResult):
    """Per-image outcome of `PatchGuard.certify`.

    Attributes:
        prediction: `(B,)` the robust-masking prediction.
        certified: `(B,)` bool: no patch of the threat model can change the prediction, and it
            equals the label.
        num_views: `(B,)` forward passes per image: always 1.
        margin: `(B,)` float64, the worst case over windows of the label's lower bound minus the
            largest upper bound of another class (`> 0`, or `== 0` with only larger class ids
            tying, means certified when `margin` setting is 0; negative: not certified).
    """

    margin: torch.Tensor


def _geometry(value, name: str, minimum: int | None) -> tuple[int, int]:
    """An int or a pair of ints (>= `minimum` if given) as a pair, or a ValueError naming `name`."""
    pair = as_pair(value, name)
    if not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in pair) or (
        minimum is not None and min(pair) < minimum
    ):
        need = "an int" if minimum is None else f"an int >= {minimum}"
        raise ValueError(f"{name} must be {need} or a pair of them, got {value!r}")
    return int(pair[0]), int(pair[1])


def _as_threshold(value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) or not 0.0 <= float(value) < 1.0:
        raise ValueError(f"threshold (the detection threshold T) must be a float in [0, 1), got {value!r}")
    return float(value)


def _as_clip(value) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) or not 0.0 < float(value) < float("inf"):
        raise ValueError(f"clip (the ceiling of the clipped local logits) must be None or a finite float > 0, got {value!r}")
    return float(value)


# The geometry a PatchGuard base model declares, with each value's minimum (None: any int).
_GEOMETRY = {"receptive_field": 1, "feature_stride": 1, "feature_offset": None}

# A geometry declared for a model is verified with `models.check_receptive_field` when that costs
# at most this many floating-point operations of the model (torch's FlopCounterMode, summed over the
# probes): about a second in float64 on one CPU core, where the check runs (1.6 to 3 GFLOP/s measured
# on BagNet-sized models, 0.3 on a two-layer CNN whose probes are mostly overhead).
_CHECK_FLOPS = 2e9


def _missing_geometry(missing: Sequence[str], how: str) -> str:
    return (
        f"PatchGuard needs the base model's {', '.join(missing)}: the model has no such attribute{'s' if len(missing) > 1 else ''}, so {how} "
        "(receptive_field r, feature_stride s and feature_offset o say that local logit (a, b) sees only input rows "
        "[s*a - o, s*a - o + r) and columns likewise; robustwrap.models.bagnet17 and friends carry them)"
    )


def _redeclare(missing: Sequence[str]) -> str:
    """How to give a newly assigned model the geometry it does not carry."""
    keywords = ", ".join(f"{name}=..." for name in missing)
    return (
        "declare it for this model (a geometry declared for the previous model does not carry over to another one): "
        f"m.set_model(model, {keywords}), or give the model those attributes (model.{missing[0]} = ...)"
    )


def _model_geometry(model: nn.Module, name: str) -> tuple[int, int] | None:
    """`model`'s own declaration of `name` (checked), or None if it has no such attribute."""
    attr = getattr(model, name, None)
    return None if attr is None else _geometry(attr, f"the model's {name}", _GEOMETRY[name])


def _declarations(model: nn.Module, given: dict[str, Any]) -> dict[str, tuple[int, int]]:
    """The geometry declared for `model`: the given values (None: not given) it does not carry itself.

    Raises:
        ValueError: a value that is not an int or pair (of the minimum), one that contradicts the
            model's own attribute, or a value neither given nor carried by the model.
    """
    missing = [name for name, value in given.items() if value is None and _model_geometry(model, name) is None]
    if missing:
        raise ValueError(_missing_geometry(missing, "pass " + ", ".join(f"{name}=" for name in missing)))
    declared = {}
    for name, value in given.items():
        if value is None:
            continue
        pair, own = _geometry(value, name, _GEOMETRY[name]), _model_geometry(model, name)
        if own is None:
            declared[name] = pair
        elif pair != own:
            raise ValueError(
                f"{name}={value!r} contradicts the model's own {name}={getattr(model, name)!r}; the geometry is read from the model: "
                f"leave {name} unset to use the model's, or change the model's attribute if it is wrong"
            )
    return declared


@dataclass(frozen=True)
class _Declared:
    """Geometry declared to a PatchGuard for one base model: it holds for that model only.

    Attributes:
        model: the base model (the module a `DistributedDataParallel` wraps) it was declared for.
        geometry: name -> `(rows, columns)`, for the names the model does not carry itself.
    """

    model: nn.Module | None
    geometry: dict[str, tuple[int, int]]

    def of(self, model: nn.Module) -> dict[str, tuple[int, int]]:
        """The declarations made for `model` (none for any other model)."""
        return self.geometry if self.model is model else {}


def _probe_flops(model: nn.Module, in_chans: int, size: tuple[int, int]) -> int | None:
    """Floating-point operations of one forward pass of a blank `size` image, or None if the model cannot take it."""
    device, dtype = model_device_dtype(model)
    blank = torch.zeros(1, in_chans, *size, device=device, dtype=dtype)
    with eval_mode(model), torch.no_grad(), FlopCounterMode(display=False) as counter:
        try:
            out = model(blank)
        except Exception:  # noqa: BLE001  (whatever a model raises for a size it cannot take: try another size)
            return None
    return counter.get_total_flops() if isinstance(out, torch.Tensor) and out.ndim == 4 else None


@functools.lru_cache(maxsize=64)
def _window(image_size, patch, receptive_field, feature_stride, feature_offset, feature_size, input_size=None, resize=None) -> tuple[int, int]:
    """`feature_window`, after checking that the declared geometry fits the map the model returned."""
    for axis, (n, r, s, o, m) in enumerate(zip(image_size, receptive_field, feature_stride, feature_offset, feature_size)):
        first_end, last_start = r - o, s * (m - 1) - o
        if first_end <= 0 or last_start >= n:
            name = ("rows", "columns")[axis]
            raise ValueError(
                f"the declared geometry (receptive_field={r}, feature_stride={s}, feature_offset={o}) puts features of the "
                f"{m}-long map outside the {n} image {name} (feature 0 ends at {first_end}, feature {m - 1} starts at "
                f"{last_start}): it does not describe this model; robustwrap.models.check_receptive_field verifies a declaration"
            )
    return feature_window(image_size, patch, receptive_field, feature_stride, feature_offset, feature_size, input_size=input_size, resize=resize)


class PatchGuard(RobustPatchClassifier):
    """A local-logit model defended by PatchGuard robust masking (Xiang et al., USENIX Security 2021).

    The base model maps `(B, C, H, W)` images to local logits `(B, num_classes, h, w)`, where
    feature `(a, b)` sees only input rows `[s*a - o, s*a - o + r)` and columns likewise (a BagNet
    from `robustwrap.models`, or any model with that property). A patch then touches at most a
    `wh x ww` window of features (`window`). Robust masking clips the logits to `[0, clip]` and
    removes each class's largest window of evidence; the certificate bounds every class's masked
    evidence under any patch (docs/concepts.md#robust-masking, #patchguard-certificate).

    In eval mode `forward` returns the masked evidence `g` `(B, num_classes)` as float64 (the rule
    and the certificate run in float64; `forward(x).argmax(1) == predict(x)`), differentiable
    when gradients are enabled; in train mode it is the base model's forward (the local logits).
    One forward pass per image, in `precision`; no pixel is masked, so `fill` is unused.

    Args:
        model: the local-logit model.
        patch: the threat model's patch: side in pixels (int), fraction of the image area (float
            in (0, 1)), or `(ph, pw)`.
        image_size: `H` or `(H, W)` of the base model's inputs (the geometry's pixels).
        input_size: `h` or `(h, w)`: the defended model takes images of this size and resizes them
            to `image_size` inside its forward; the patch is in these input pixels, and the window
            covers the features that the model pixels it can reach touch
            (`geometry.feature_window`, docs/concepts.md#input-pixels). `None` (default): no resize.
        resize: the interpolation of that resize: `"nearest"` (default), `"bilinear"` or `"bicubic"`.
        receptive_field: `r` (int or `(rh, rw)`, >= 1), for a model without a `receptive_field`
            attribute: declared for this model only (another model assigned later brings its
            own attribute or is declared with `set_model`) and verified on it where that is cheap
            (`models.check_receptive_field`); the model's own attribute is read at every use (so
            it follows `m.model = other`), and a value that contradicts it is refused.
        feature_stride: `s` (int or pair, >= 1); likewise `model.feature_stride`.
        feature_offset: `o` (int or pair; 0 for unpadded models); likewise `model.feature_offset`.
        threshold: the detection threshold `T` in `[0, 1)` (default 0: always mask).
        clip: optional ceiling of the clipped local logits (default None: `[0, inf)`).
        fill: as for every defense (`RobustPatchClassifier`); unused, since no pixel is masked.
        batch_size: images per forward pass (speed and memory only).
        precision: `"float32"`, `"bfloat16"` or `"float16"` autocast of the base model.
        margin: certificate margin, a float >= 0 (0 is the paper's rule).
        num_classes: classes of the base model, if it has no `num_classes` attribute.

    Raises:
        TypeError: if `model` is not an `nn.Module` or is already defended.
        ValueError: a missing or invalid geometry (the message says how to declare it), a
            declaration that contradicts the model's attributes or that the model is seen to
            violate, `threshold` outside [0, 1), a bad `clip` or patch.

    Warns:
        UserWarning: a declared geometry too costly to verify on this model (the message says
            how to verify it once).
    """

    defense = "patchguard"
    _geometry_name = "PatchGuard model"
    _no_detection = None  # PatchGuard++: the local-logit map minus one feature window
    _no_top_k = None  # the evidence bounds rank every class against the label
    # Provable adversarial training (the loss removes the true class's largest window of evidence, no
    # masking), or plain training on the mean local logits.
    training_strategies: ClassVar[tuple[str, ...]] = ("provable_adversarial", "none")
    default_strategy: ClassVar[str] = "provable_adversarial"

    def __init__(
        self,
        model: nn.Module,
        patch: int | float | Sequence[int],
        *,
        image_size: int | Sequence[int],
        input_size: int | Sequence[int] | None = None,
        resize: str | None = None,
        receptive_field: int | Sequence[int] | None = None,
        feature_stride: int | Sequence[int] | None = None,
        feature_offset: int | Sequence[int] | None = None,
        threshold: float = 0.0,
        clip: float | None = None,
        fill: float | Sequence[float] = 0.0,
        batch_size: int = DEFAULT_BATCH_SIZE,
        precision: str = "float32",
        margin: float = DEFAULT_EVIDENCE_MARGIN,
        num_classes: int | None = None,
    ):
        given = {"receptive_field": receptive_field, "feature_stride": feature_stride, "feature_offset": feature_offset}
        # Checked before the base class's blank forward pass; a non-module is refused there.
        declared = _declarations(unwrap(model), given) if isinstance(model, nn.Module) else {}
        super().__init__(
            model,
            image_size=image_size,
            input_size=input_size,
            resize=resize,
            fill=fill,
            batch_size=batch_size,
            precision=precision,
            margin=margin,
            num_classes=num_classes,
        )
        # Declarations for what the model does not say itself, bound to this model: the model's own
        # attributes are read at every use (they follow in-place changes), and another model
        # assigned later must bring its own geometry or be declared anew (`set_model`).
        self._declared_geometry = _Declared(self._inner_model, declared)
        self._patch = patch_pixels(patch, self.input_size)
        self.threshold = threshold
        self.clip = clip
        self._verify_declared()

    # ------------------------------------------------------------------------------ geometry
    def _geometry_of(self, name: str) -> tuple[int, int]:
        own = _model_geometry(self._inner_model, name)
        if own is not None:
            return own
        declared = self._declared_geometry.of(self._inner_model)
        if name not in declared:  # the model lost its attribute after it was checked
            raise ValueError(_missing_geometry([name], _redeclare([name])))
        return declared[name]

    def _set_geometry(self, name: str, value) -> None:
        model = self._inner_model
        with self._window_kept_possible("_declared_geometry"):
            declared = {**self._declared_geometry.of(model), **_declarations(model, {name: value})}
            self._declared_geometry = _Declared(model, declared)  # a new object: a shallow copy keeps its own
            self._verify_declared()

    def _verify_declared(self) -> None:
        """Refuse a declared geometry the model violates, found by `models.check_receptive_field`.

        A receptive field declared smaller than what the model sees makes every certificate
        unsound, so whatever was declared for the model (at `wrap`, by assignment, `set_model`, or
        read back from a saved config) is probed: at the image size if that is cheap, else on a
        small image (a few features per axis), else not at all, with a warning saying how to run
        the check. The geometry the model carries as attributes is the model's own claim (its
        author's, as for `robustwrap.models`' BagNets) and is not probed unless something is declared.
        """
        if not self._declared_geometry.of(self._inner_model):
            return
        self.window  # noqa: B018  (the declaration must first fit the model's map)
        model, in_chans = self._inner_model, self.in_chans or 3
        r, s, o = self.receptive_field, self.feature_stride, self.feature_offset
        geometry = f"receptive_field={r}, feature_stride={s}, feature_offset={o}"
        small = tuple(min(n, ri + 2 * si + 2 * abs(oi)) for n, ri, si, oi in zip(self.image_size, r, s, o))
        cost = None
        for size in dict.fromkeys([self.image_size, small]):  # the image size first: the map certificates use
            flops = _probe_flops(model, in_chans, size)
            if flops is None:
                continue
            cost = flops * size[0] * size[1]
            if cost > _CHECK_FLOPS:
                continue
            report = models.check_receptive_field(model, size, receptive_field=r, feature_stride=s, feature_offset=o, in_chans=in_chans, trials=1, strict=False)
            if not report.ok:
                raise ValueError(
                    f"the geometry declared for this model ({geometry}) does not hold: on {size[0]}x{size[1]} probe images a pixel outside "
                    f"a feature's declared window changed that feature ({report.violations} (feature, pixel) pairs, e.g. feature (a, b), "
                    f"pixel (row, col): {list(report.examples[:3])}; the model is seen to reach {report.observed_receptive_field} pixels). "
                    "A receptive field declared smaller than what the model sees makes every certificate unsound: declare what the model "
                    "really sees (robustwrap.models.check_receptive_field(model, size, receptive_field=..., feature_stride=..., "
                    "feature_offset=...) tests a geometry)"
                )
            return
        why = "the model could not be probed" if cost is None else f"checking it would take about {cost:.2g} floating-point operations"
        warnings.warn(
            f"the geometry declared for this model ({geometry}) was not verified ({why}); a receptive field declared too small "
            "makes every certificate unsound: verify it once with robustwrap.models.check_receptive_field(model, size, ...) on a "
            "small image, then give the model the attributes receptive_field, feature_stride and feature_offset",
            UserWarning,
            stacklevel=3,
        )

    @contextlib.contextmanager
    def _window_kept_possible(self, attribute: str) -> Iterator[None]:
        """Refuse, as `wrap` does, an assignment inside the block that makes the window impossible
        (the patch's window covering the whole map): `attribute` gets its previous value back."""
        previous = self.__dict__[attribute]
        try:
            yield
            self.window  # noqa: B018
        except BaseException:
            self.__dict__[attribute] = previous
            raise

    @property
    def receptive_field(self) -> tuple[int, int]:
        """`r` per axis: the model's `receptive_field` attribute (read at every use), else the one declared for this model.

        Assigning declares it for the current model, as at `wrap`: accepted where the model does
        not say (and, where cheap, the model is seen to keep to it), or says the same; a value
        that contradicts the model or that the model is seen to violate is refused.
        """
        return self._geometry_of("receptive_field")

    @receptive_field.setter
    def receptive_field(self, value: int | Sequence[int]) -> None:
        self._set_geometry("receptive_field", value)

    @property
    def feature_stride(self) -> tuple[int, int]:
        """`s` per axis: the model's `feature_stride` attribute, else the declared one (see `receptive_field`)."""
        return self._geometry_of("feature_stride")

    @feature_stride.setter
    def feature_stride(self, value: int | Sequence[int]) -> None:
        self._set_geometry("feature_stride", value)

    @property
    def feature_offset(self) -> tuple[int, int]:
        """`o` per axis: the model's `feature_offset` attribute, else the declared one (see `receptive_field`)."""
        return self._geometry_of("feature_offset")

    @feature_offset.setter
    def feature_offset(self, value: int | Sequence[int]) -> None:
        self._set_geometry("feature_offset", value)

    def _model_changed(self) -> None:
        """A new base model: its own geometry is used from now on; what it does not carry must have
        been declared for it (`set_model`), not for a previous model; the window must exist for it
        (one blank pass) and what is declared must hold (`_verify_declared`)."""
        model = self._inner_model
        declared = self._declared_geometry.of(model)
        missing = [name for name in _GEOMETRY if _model_geometry(model, name) is None and name not in declared]
        if missing:
            raise ValueError(_missing_geometry(missing, _redeclare(missing)))
        self.window  # noqa: B018
        self._verify_declared()
        # Only what this model does not say itself stays declared (and no reference to an old model).
        self._declared_geometry = _Declared(model, {name: pair for name, pair in declared.items() if _model_geometry(model, name) is None})

    def set_model(
        self,
        model: nn.Module,
        *,
        receptive_field: int | Sequence[int] | None = None,
        feature_stride: int | Sequence[int] | None = None,
        feature_offset: int | Sequence[int] | None = None,
    ) -> None:
        """Assign a new base model together with the geometry declared for it.

        `m.model = other` takes the geometry from `other`'s attributes; a geometry declared for
        the previous model (at `wrap` or by assignment) belongs to that model and never carries
        over, so a model without those attributes is declared here, as `wrap` declares it. The
        declaration is verified on the model where that is cheap (as at `wrap`); everything else
        is checked as `m.model = other` checks it. On any error nothing changes.

        Args:
            model: the new local-logit model.
            receptive_field: `r`, if `model` has no `receptive_field` attribute.
            feature_stride: `s`, if `model` has no `feature_stride` attribute.
            feature_offset: `o`, if `model` has no `feature_offset` attribute.

        Raises:
            TypeError: `model` is not an `nn.Module`, or is already defended.
            ValueError: a value missing, invalid or contradicting the model's own attribute, a
                declaration the model is seen to violate, or anything `m.model = model` refuses.
        """
        _check_base_model(model)
        inner = unwrap(model)
        given = {"receptive_field": receptive_field, "feature_stride": feature_stride, "feature_offset": feature_offset}
        previous = self._declared_geometry
        self._declared_geometry = _Declared(inner, _declarations(inner, given))
        try:
            self.model = model
        except BaseException:
            self._declared_geometry = previous
            raise

    # ------------------------------------------------------------------------------ settings
    @property
    def patch(self) -> tuple[int, int]:
        """`(ph, pw)` in pixels: the patch of the threat model (assign pixels, a pair or an area fraction)."""
        return self._patch

    @patch.setter
    def patch(self, value: int | float | Sequence[int]) -> None:
        with self._window_kept_possible("_patch"):
            self._patch = patch_pixels(value, self.input_size)

    @property
    def threshold(self) -> float:
        """The detection threshold `T` in `[0, 1)`: a window is removed when it holds more than `T` of its class's evidence."""
        return self._threshold

    @threshold.setter
    def threshold(self, value: float) -> None:
        self._threshold = _as_threshold(value)

    @property
    def clip(self) -> float | None:
        """Ceiling of the clipped local logits (None: clip to `[0, inf)`)."""
        return self._clip

    @clip.setter
    def clip(self, value: float | None) -> None:
        self._clip = _as_clip(value)

    @property
    def window(self) -> tuple[int, int]:
        """`(wh, ww)`: the most feature rows and columns one patch can touch (`geometry.feature_window`).

        Read from the local-logit map of one blank image the first time (per base model).
        """
        return self._window_for(self._feature_size())

    def _window_for(self, feature_size: tuple[int, int]) -> tuple[int, int]:
        resized = (None, None) if self.resize is None else (self.input_size, self.resize)
        return _window(self.image_size, self.patch, self.receptive_field, self.feature_stride, self.feature_offset, tuple(feature_size), *resized)

    def _feature_size(self) -> tuple[int, int]:
        cached = self.__dict__.get("_map_size")
        if cached is None or cached[0] is not self._inner_model:
            self._blank_pass()
        return self.__dict__["_map_size"][1]

    def _blank_pass(self) -> None:
        """One blank image through the base model: records its map size and class count."""
        blank = torch.zeros(1, self.in_chans or 3, *self.input_size)
        with eval_mode(self._inner_model), torch.no_grad():
            self._local_logits(self._prepare(blank))

    @property
    def num_classes(self) -> int:
        """Number of classes of the local logits (one blank forward pass the first time, if the model does not say)."""
        attr = getattr(self._inner_model, "num_classes", None)
        if isinstance(attr, int) and not isinstance(attr, bool):
            return attr
        if self._num_classes is None:  # also after `m.model = m.model`, whose map size is still known
            self._blank_pass()
        return self._num_classes

    @num_classes.setter
    def num_classes(self, value) -> None:
        raise AttributeError("num_classes is read from the base model; assign m.model to change it")

    def _training_recipe(self, strategy: str, fill: float | tuple[float, ...], batch_size: int) -> TrainingRecipe:
        provable = strategy == "provable_adversarial"
        return TrainingRecipe(
            loss=lambda local, y: self.training_loss(local, y, provable=provable),
            scores=lambda local: local.float().mean((-2, -1)),
            lr=_PROVABLE_LR if provable else None,
            local_logits=True,
        )

    def _training_geometry(self) -> dict[str, Any]:
        return {"guard": {k: v for k, v in self.settings().items() if k not in ("fill", "precision", "margin")}}

    def _defense_settings(self) -> dict[str, Any]:
        return {
            "patch": list(self.patch),
            "receptive_field": list(self.receptive_field),
            "feature_stride": list(self.feature_stride),
            "feature_offset": list(self.feature_offset),
            "threshold": self.threshold,
            "clip": self.clip,
        }

    @classmethod
    def _options_from_settings(cls, settings: dict[str, Any]) -> tuple[dict[str, Any], tuple[str, ...]]:
        keys = ("patch", "receptive_field", "feature_stride", "feature_offset", "threshold", "clip")
        missing = [k for k in keys if k not in settings]
        if missing:
            raise ValueError(f"patchguard settings lack {', '.join(missing)} (keys: {sorted(settings)})")
        for key in keys[:4]:
            value = settings[key]
            if not isinstance(value, (list, tuple)) or len(value) != 2:
                raise ValueError(f"settings {key} must be a pair [rows, columns] of ints, got {value!r}")
        image_size = settings.get("image_size")
        if not isinstance(image_size, (list, tuple)):
            raise ValueError(f"settings image_size must be [H, W], got {image_size!r}")
        options = {
            "image_size": as_image_size(tuple(image_size)),
            "patch": tuple(positive_int(v, "patch") for v in settings["patch"]),
            "receptive_field": _geometry(list(settings["receptive_field"]), "receptive_field", 1),
            "feature_stride": _geometry(list(settings["feature_stride"]), "feature_stride", 1),
            "feature_offset": _geometry(list(settings["feature_offset"]), "feature_offset", None),
            "threshold": _as_threshold(settings["threshold"]),
            "clip": _as_clip(settings["clip"]),
        }
        return options, keys

    @classmethod
    def from_patch(
        cls,
        model: nn.Module,
        patch: int | float | Sequence[int] | None = None,
        *,
        receptive_field: int | Sequence[int] | None = None,
        feature_stride: int | Sequence[int] | None = None,
        feature_offset: int | Sequence[int] | None = None,
        threshold: float = 0.0,
        clip: float | None = None,
        image_size: int | Sequence[int] | None = None,
        input_size: int | Sequence[int] | None = None,
        resize: str | None = None,
        fill: float | Sequence[float] = 0.0,
        batch_size: int = DEFAULT_BATCH_SIZE,
        precision: str = "float32",
        margin: float = DEFAULT_EVIDENCE_MARGIN,
        num_classes: int | None = None,
        tau: float = DEFAULT_TAU,
    ) -> PatchGuard:
        """PatchGuard for a threat model: what `robustwrap.wrap(model, patch, defense="patchguard", ...)` calls.

        One blank image goes through the model to find the local-logit map, so a model that
        does not return local logits, or a patch whose window would cover the whole map, is
        refused here rather than at the first prediction.

        Args:
            model: the local-logit model (e.g. `robustwrap.models.bagnet17(num_classes=10)`).
            patch: side in pixels (int), fraction of the image area (float in (0, 1); default
                0.02), or `(ph, pw)`.
            receptive_field: `r`, if the model has no `receptive_field` attribute.
            feature_stride: `s`, if the model has no `feature_stride` attribute.
            feature_offset: `o`, if the model has no `feature_offset` attribute.
            threshold: detection threshold `T` in `[0, 1)` (default 0).
            clip: optional ceiling of the clipped local logits.
            image_size: `H` or `(H, W)` of the base model's inputs; defaults to the size a timm model was built for.
            input_size: `h` or `(h, w)` of the defended model's inputs, resized to `image_size` in
                its forward; the patch is in its pixels (default: no resize).
            resize: `"nearest"` (default), `"bilinear"` or `"bicubic"`: the interpolation of that resize.
            fill: as for every defense (unused: no pixel is masked).
            batch_size: images per forward pass (default 64).
            precision: autocast precision of the base model (default `"float32"`).
            margin: certificate margin on the evidence, a float >= 0 (default `DEFAULT_EVIDENCE_MARGIN`, 0.1; 0 is the paper's rule).
            num_classes: classes of the base model, if it has no `num_classes` attribute.
            tau: confidence threshold of certified detection (PatchGuard++), in `[0, 1)` (default 0; `detect`).

        Returns:
            The defended model, in the same train/eval mode as `model`.

        Raises:
            ValueError: as `PatchGuard`, plus a base model whose output is not `(B, C, h, w)` and
                a patch that could touch the whole feature map.
        """
        size = resolve_image_size(model, image_size)
        defended = cls(
            model,
            DEFAULT_PATCH if patch is None else patch,
            image_size=size,
            input_size=input_size,
            resize=resize,
            receptive_field=receptive_field,
            feature_stride=feature_stride,
            feature_offset=feature_offset,
            threshold=threshold,
            clip=clip,
            fill=fill,
            batch_size=batch_size,
            precision=precision,
            margin=margin,
            num_classes=num_classes,
        )
        defended.tau = tau
        defended.window  # noqa: B018  (fail now on a model without local logits or an impossible window)
        return defended

    def extra_repr(self) -> str:
        geometry = f"receptive_field={self.receptive_field}, feature_stride={self.feature_stride}, feature_offset={self.feature_offset}"
        return f"patch={self.patch}, {geometry}, threshold={self.threshold}, clip={self.clip}, batch_size={self.batch_size}, precision={self.precision}, margin={self.margin}"

    # ----------------------------------------------------------------------------- inference
    def _local_logits(self, x: torch.Tensor) -> torch.Tensor:
        """The base model's local logits for prepared images, `batch_size` at a time, in `precision`."""
        outs = []
        with self.autocast():
            module = self._inference_model(x)
            for chunk in x.split(self.batch_size):
                out = call_model(module, chunk)
                if not isinstance(out, torch.Tensor) or out.ndim != 4 or out.shape[0] != chunk.shape[0]:
                    shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
                    raise ValueError(
                        f"PatchGuard needs a base model that returns local logits (B, num_classes, h, w), one class-evidence "
                        f"vector per feature of a small receptive field (e.g. robustwrap.models.bagnet17); for {chunk.shape[0]} "
                        f"images this model returned {shape}. A classifier with (B, num_classes) logits sees the whole image in "
                        "every logit, so PatchGuard cannot bound a patch's effect: use defense='patchcleanser' for it"
                    )
                outs.append(out)
        local = torch.cat(outs)
        self._map_size = (self._inner_model, (int(local.shape[2]), int(local.shape[3])))
        if self._num_classes is None:
            self._num_classes = int(local.shape[1])
        return local

    def _robust_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The masked evidence `g` `(B, num_classes)`, float64."""
        x = self._check_images(x)
        local = self._local_logits(x)
        return robust_masking(local.to(torch.float64), self._window_for(local.shape[2:]), self.threshold, self.clip)

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Robust labels `(B,)` by robust masking (in either mode; the base model runs in eval mode)."""
        with eval_mode(self._inner_model), torch.no_grad():
            return self._robust_forward(x).argmax(1)

    def predict_vanilla(self, x: torch.Tensor) -> torch.Tensor:
        """The undefended prediction `(B,)`: local logits averaged over the map (a BagNet's own
        head), argmax with the smallest class id on ties; same checks, device and precision."""
        x = self._check_images(x)
        with eval_mode(self._inner_model), torch.no_grad():
            return self._local_logits(x).float().mean((-2, -1)).argmax(1)

    def certify(self, x: torch.Tensor, y: torch.Tensor, early_exit: bool = True, k: int = 1) -> PatchGuardResult:
        """Certify a batch against every patch of the threat model (one forward pass per image).

        Robust masking of the local logits gives the prediction; the evidence bounds of
        `masking_certificate` (float64, every window at once) the certificate: for every window
        `u` and class `c != y`, `L_y(u) - U_c(u) > margin` (with `margin = 0`, a tie counts when
        `y < c`). See docs/concepts.md#patchguard-certificate.

        Args:
            x: `(B, C, H, W)` images, floating, as the model expects them.
            y: `(B,)` integer labels in `[0, num_classes)`.
            early_exit: accepted for the common interface; there is nothing to skip.
            k: certify that `y` stays among the `k` best classes under any patch (default 1: the
                prediction): for every window at most `k - 1` classes' upper bounds are not
                below the label's lower bound (docs/concepts.md#top-k).

        Returns:
            A `PatchGuardResult` with the prediction, certification, `num_views` (1 per image)
            and the worst-case top-1 `margin` per image.

        Raises:
            TypeError, ValueError: for bad images, labels or `k`, before any forward pass.
        """
        x = self._check_images(x)
        y = self._check_labels(y, x.shape[0]).to(x.device)
        k = self._check_top_k(k)
        with eval_mode(self._inner_model), torch.no_grad():
            local = self._local_logits(x)
        cert = masking_certificate(local, y, self._window_for(local.shape[2:]), self.threshold, self.clip, self.margin, k)
        return PatchGuardResult(
            prediction=cert.prediction,
            certified=cert.certified,
            num_views=torch.ones(x.shape[0], dtype=torch.long, device=x.device),
            margin=cert.margin,
        )

    # ------------------------------------------------------------------------------ detection
    def _detection_logits(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """PatchGuard++ (`detection.window_views`): the mean local logits, and that mean without
        each feature window; one forward pass per image."""
        with eval_mode(self._inner_model), torch.no_grad():
            local = self._local_logits(x)
        logits, views = window_views(local, self._window_for(local.shape[2:]))
        return logits, views, torch.ones(x.shape[0], dtype=torch.long, device=x.device)

    # ------------------------------------------------------------------------------ training
    def training_loss(self, local_logits: torch.Tensor, labels: torch.Tensor, provable: bool = True) -> torch.Tensor:
        """The training loss for local logits from the base model in train mode.

        `provable=True` (the default training of this defense): `provable_adversarial_loss` with
        this model's window and `clip`. `provable=False`: plain training, the cross-entropy of the
        local logits averaged over the map (a BagNet's usual training).
        """
        if local_logits.ndim != 4:
            raise ValueError(f"local_logits must have shape (B, num_classes, h, w), got {tuple(local_logits.shape)}")
        if not provable:
            return F.cross_entropy(local_logits.float().mean((-2, -1)), labels)
        return provable_adversarial_loss(local_logits.float(), labels, self._window_for(local_logits.shape[2:]), self.clip)
