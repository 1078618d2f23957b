"""Certified detection and top-k certificates: the rules, as pure functions on logits, votes and bounds.

Detection (Minority Reports, PatchGuard++, ViP, PatchCensor) outputs a label or an alert. From the
unmasked logits and the logits of one-mask views (each view hides one region of a covering set:
pixel masks, dropped tokens, feature windows), the output is the unmasked prediction `p`, with an
alert when some view's label differs from `p` with softmax confidence above `tau`. An image is
certified for label `y` when `p = y` and every view shows `y` with confidence above `tau`: a patch
lies inside one hidden region, so that view is untouched and says `y` confidently, and any other
output than `y` raises the alert. The alert and the certificate use one comparison,
`confident_labels` (`softmax > tau`, strict in both): with `>=` in one place and `>` in the other
(as in the authors' codes), a view at confidence exactly `tau` would certify an image whose attacked
output is a silent wrong label (docs/concepts.md#certified-detection).

Top-k: `y` stays among the `k` best classes under any patch. PatchGuard's evidence bounds give it
per window (`evidence_topk`); smoothing's vote counts with `Δ` changed views (`votes_topk`).

A rule here never runs a model; the defenses compute the views and call these.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from ..views import top2_gap
from .base import CertifyResult

__all__ = [
    "DEFAULT_TAU",
    "DetectResult",
    "DetectionCertificate",
    "as_tau",
    "as_top_k",
    "certify_detection_views",
    "confident_labels",
    "detect_views",
    "evidence_topk",
    "in_top_k",
    "votes_topk",
    "window_views",
]

DEFAULT_TAU = 0.0
"""The default confidence threshold: any confident disagreement alerts (Minority Reports' rule)."""


def as_tau(tau) -> float:
    """`tau` as a float in `[0, 1)`, or a TypeError/ValueError naming `tau`.

    Raises:
        ValueError: outside `[0, 1)`: no softmax exceeds 1, so at `tau >= 1` no view would ever
            alert and no image would ever be certified.
    """
    if isinstance(tau, bool) or not isinstance(tau, (int, float, np.integer, np.floating)):
        raise TypeError(f"tau must be a float in [0, 1), got {tau!r} ({type(tau).__name__})")
    value = float(tau)
    if not math.isfinite(value) or not 0.0 <= value < 1.0:
        raise ValueError(f"tau must be a float in [0, 1) (a view alerts when its softmax confidence is > tau), got {tau!r}")
    return value


def as_top_k(k, num_classes: int) -> int:
    """`k` as an int in `[1, num_classes]`, or a TypeError/ValueError naming `k`."""
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
        raise TypeError(f"k must be an int >= 1 (certify that y stays among the k best classes), got {k!r} ({type(k).__name__})")
    if not 1 <= int(k) <= num_classes:
        raise ValueError(f"k must be in [1, num_classes={num_classes}], got {k}")
    return int(k)


# ------------------------------------------------------------------------------ detection
@dataclass(frozen=True)
class DetectResult:
    """The deployable output of detection, per image.

    Attributes:
        prediction: `(B,)` the unmasked model's label (smallest class id on ties).
        alert: `(B,)` bool: some view disagrees with `prediction` with confidence `> tau`;
            the output is then "alert", not `prediction`.
    """

    prediction: torch.Tensor
    alert: torch.Tensor


@dataclass(frozen=True)
class DetectionCertificate(CertifyResult):
    """Per-image outcome of `certify_detection`.

    Attributes:
        prediction: `(B,)` the unmasked model's label.
        alert: `(B,)` bool: the clean image raises an alert.
        certified: `(B,)` bool: no patch can make the output a label other than `y` without an
            alert, and the clean output is `y` without an alert.
        num_views: `(B,)` forward passes (or views) per image.
    """

    alert: torch.Tensor


def confident_labels(logits: torch.Tensor, tau: float, margin: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """`(labels, confident)` of views `(..., C)`: the argmax and whether it is confident, the one comparison.

    `confident` is `softmax(logits)[label] > tau` (strict), computed in float64. The alert and the
    certificate both call this; with `margin > 0` (the certificate's margin guard) a view is
    confident only if that holds after any move of the logit differences up to `margin`: its
    label beats every other class by more than `margin` and `log softmax - log tau > margin`.

    Args:
        logits: `(..., C)` logits.
        tau: the confidence threshold in `[0, 1)`.
        margin: `0` for the alert; the model's margin for the certificate.
    """
    logits = logits.detach().to(torch.float64)
    labels = logits.argmax(-1)  # the first maximum: the smallest class id on ties
    conf = logits.softmax(-1).gather(-1, labels[..., None])[..., 0]
    confident = conf > tau
    if margin > 0:
        flat = logits.reshape(-1, logits.shape[-1])
        confident &= top2_gap(flat).reshape(labels.shape) > margin
        if tau > 0:
            slack = logits.log_softmax(-1).gather(-1, labels[..., None])[..., 0] - math.log(tau)
            confident &= slack > margin
    return labels, confident


def detect_views(logits: torch.Tensor, views: torch.Tensor, tau: float) -> DetectResult:
    """Detection from the unmasked logits `(B, C)` and one-mask view logits `(B, K, C)`.

    The prediction `p` is the unmasked argmax (smallest class id on ties); alert iff some view's
    label differs from `p` with confidence `> tau` (`confident_labels`).
    """
    prediction = logits.detach().argmax(-1)
    labels, confident = confident_labels(views, tau)
    alert = ((labels != prediction[:, None]) & confident).any(-1)
    return DetectResult(prediction=prediction, alert=alert)


def certify_detection_views(
    logits: torch.Tensor, views: torch.Tensor, labels: torch.Tensor, tau: float, margin: float = 0.0
) -> torch.Tensor:
    """`(B,)` bool: the detection certificate for `labels` `y`.

    Certified iff the unmasked label is `y` and every view's label is `y` with confidence `> tau`
    (the alert's comparison, `confident_labels`), each by more than `margin` (the unmasked logits
    too). Then under any patch the view hiding it still says `y` confidently, so an output other
    than `y` alerts; and the clean output is `y` without an alert.

    Args:
        logits: `(B, C)` unmasked logits.
        views: `(B, K, C)` one-mask view logits, for a mask set that covers every patch.
        labels: `(B,)` the labels `y`.
        tau: the confidence threshold.
        margin: the margin guard (docs/concepts.md#margin); `0` is the papers' rule.
    """
    labels = labels.to(logits.device)
    logits = logits.detach().to(torch.float64)
    clean = logits.argmax(-1) == labels
    if margin > 0:
        clean &= top2_gap(logits) > margin
    view_labels, confident = confident_labels(views, tau, margin)
    return clean & ((view_labels == labels[:, None]) & confident).all(-1)


def window_views(local_logits: torch.Tensor, window: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """PatchGuard++'s logits: the unmasked mean of the local logits and one view per feature window.

    As the authors' `pg2_detection`: the local logits are not clipped; the unmasked logits are
    their mean over the `h x w` map, and view `u` is that mean without window `u`'s features
    (the sum outside `u` divided by `h * w`, so a softmax reads as the paper's). Windows are the
    full `wh x ww` blocks of the map (clipped to it), row-major, as PatchGuard's certificate's.
    In float64, and differentiable: the detection attack's surrogate goes through it.

    Args:
        local_logits: `(B, C, h, w)`.
        window: `(wh, ww)` of `geometry.feature_window`.

    Returns:
        `(logits (B, C), views (B, nU, C))`.
    """
    from .patchguard import window_sums  # the defense module imports this one

    local = local_logits.to(torch.float64)
    b, c, h, w = local.shape
    total = local.sum((-2, -1))
    inside = window_sums(local, window).reshape(b, c, -1)
    return total / (h * w), ((total[..., None] - inside) / (h * w)).transpose(1, 2)


# ------------------------------------------------------------------------------------ top-k
def in_top_k(scores: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
    """`(B,)` bool: `labels` are among the `k` best of `scores` `(B, C)`, ties to the smallest class id.

    Class `c` ranks above `y` iff `s_c > s_y`, or `s_c == s_y` and `c < y`.
    """
    rows = torch.arange(scores.shape[0], device=scores.device)
    mine = scores[rows, labels][:, None]
    classes = torch.arange(scores.shape[1], device=scores.device)
    above = (scores > mine) | ((scores == mine) & (classes[None] < labels[:, None]))
    return above.sum(1) < k


def evidence_topk(lower: torch.Tensor, upper: torch.Tensor, labels: torch.Tensor, k: int, margin: float = 0.0) -> torch.Tensor:
    """`(B,)` bool: PatchGuard's bounds keep `y` in the top `k` for every window.

    Under a patch inside window `u` the label's masked evidence is at least `L_y(u)` and class
    `c`'s at most `U_c(u)`. A class `c` the bounds rank below `y` (`L_y(u) - U_c(u) > margin`;
    with `margin = 0`, `L_y(u) > U_c(u)`, or `==` and `y < c`) cannot pass `y`; so if at most
    `k - 1` classes are not ranked below `y` for every window, `y` stays in the top `k`. At `k = 1`
    this is `masking_certificate`'s condition.

    Args:
        lower: `(B, nU)` the label's lower bounds (`evidence_bounds`).
        upper: `(B, C, nU)` every class's upper bounds (the label's own row is ignored).
        labels: `(B,)` the labels `y`.
        k: how many classes may rank at or above `y`, `y` included.
        margin: the margin guard.
    """
    b, c, _ = upper.shape
    classes = torch.arange(c, device=upper.device)
    diff = lower[:, None, :] - upper
    if margin > 0:
        below = diff > margin
    else:
        below = (diff > 0) | ((diff == 0) & (labels[:, None, None] < classes[None, :, None]))
    below[torch.arange(b, device=upper.device), labels] = True  # y itself
    return ((~below).sum(1) <= k - 1).all(-1)


def votes_topk(
    counts: torch.Tensor, sure: torch.Tensor, possible: torch.Tensor, labels: torch.Tensor, delta: int, k: int, one_vote: bool
) -> torch.Tensor:
    """`(B,)` bool: smoothing's votes keep `y` in the top `k` under any `Δ` changed views.

    A patch meets at most `Δ` views; in the worst case each took a vote from `y` and now votes
    for other classes, so after the patch `n'_y >= n_y - Δ` and `n'_c <= n_c + a_c` with `a_c <= Δ`
    extra votes for `c`. Class `c` ranks above `y` iff `n'_c > n'_y`, or `==` and `c < y`, so it
    needs `need_c = max(0, n_y - Δ - n_c + [c > y])` extra votes. `y` leaves the top `k` iff `k`
    classes get their need:
    - argmax votes (`one_vote`): a view gives one vote, so `Σ a_c <= Δ`: certified iff the `k`
      smallest `need_c` sum to more than `Δ`;
    - threshold votes: a view may vote for several classes, so every class can get its `Δ`:
      certified iff fewer than `k` classes have `need_c <= Δ` (exact while `1/θ >= k`; beyond
      that a view's votes are fewer and the certificate may be conservative, never wrong).
    At `k = 1` both are `n_y - n_c > 2Δ`, or `== 2Δ` and `y < c`: the prediction certificate.
    `n_y` counts the `sure` votes and `n_c` the `possible` ones (the margin guard). The clean
    counts must also rank `y` in the top `k`.

    Args:
        counts: `(B, C)` plain votes.
        sure: `(B, C)` votes counted for a class only when its view shows it by more than the margin (`certificate`).
        possible: `(B, C)` votes a class may have under the margin guard.
        labels: `(B,)` the labels `y`.
        delta: `Δ`.
        k: the `k` of top-k.
        one_vote: each view votes for one class (argmax votes).
    """
    b, c = counts.shape
    rows = torch.arange(b, device=counts.device)
    classes = torch.arange(c, device=counts.device)
    n_y = sure[rows, labels][:, None]
    need = (n_y - delta - possible + (classes[None] > labels[:, None]).long()).clamp(min=0)
    need[rows, labels] = delta + 1  # y does not pass itself: among the k smallest, it makes the sum exceed Δ
    if one_vote:
        robust = need.topk(k, dim=1, largest=False).values.sum(1) > delta
    else:
        robust = (need <= delta).sum(1) < k
    return robust & in_top_k(counts, labels, k)
