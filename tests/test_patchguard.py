"""PatchGuard: feature windows, robust masking and its certificate against brute force, soundness
against exhaustive patch search, the defended class, and provable adversarial training's loss."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from conftest import ViewCounter
from torch import nn

import robustwrap
from robustwrap import models  # noqa: F401  (registers the BagNets with timm)
from robustwrap.defenses.patchguard import (
    DEFAULT_EVIDENCE_MARGIN,
    PatchGuard,
    PatchGuardResult,
    evidence_bounds,
    masking_certificate,
    provable_adversarial_loss,
    robust_masking,
)
from robustwrap.geometry import feature_window


# ----------------------------------------------------------------------------- references
def brute_window(n: int, p: int, r: int, s: int, o: int, m: int) -> int:
    """The window along one axis, by sets: the features each patch position touches."""
    best = 0
    for t in range(n - p + 1):
        touched = [a for a in range(m) if set(range(s * a - o, s * a - o + r)) & set(range(t, t + p))]
        if touched:
            best = max(best, touched[-1] - touched[0] + 1)
    return best


def _wsum(m: np.ndarray, i: int, j: int, wh: int, ww: int) -> float:
    return float(m[i : i + wh, j : j + ww].sum())


def brute_force(local: np.ndarray, y: int, window, threshold: float, clip):
    """The robust-masking rule and its certificate for one image `(C, h, w)`, literally, with loops."""
    c, h, w = local.shape
    wh, ww = window
    x = np.clip(local, 0.0, np.inf if clip is None else clip)
    wins = [(i, j) for i in range(h - wh + 1) for j in range(w - ww + 1)]
    evidence = []
    for k in range(c):
        g = float(x[k].sum())
        top = max(_wsum(x[k], i, j, wh, ww) for i, j in wins)
        if g > 0 and top / g > threshold:
            g -= top
        evidence.append(g)
    prediction = max(range(c), key=lambda k: (evidence[k], -k))
    lower, upper = [], []
    for ui, uj in wins:
        upper.append([(float(x[k].sum()) - _wsum(x[k], ui, uj, wh, ww)) / (1 - threshold) for k in range(c)])
        reduced = x[y].copy()
        reduced[ui : ui + wh, uj : uj + ww] = 0.0
        total = float(reduced.sum())
        biggest = max(_wsum(reduced, i, j, wh, ww) for i, j in wins)
        if total > 0 and biggest / total > threshold:
            lower.append(total - biggest)
        else:
            near = [_wsum(reduced, i, j, wh, ww) for i, j in wins if abs(i - ui) < wh and abs(j - uj) < ww]
            lower.append(total - max(near))
    certified = prediction == y and all(
        lower[u] > upper[u][k] or (lower[u] == upper[u][k] and y < k) for u in range(len(wins)) for k in range(c) if k != y
    )
    others = [k for k in range(c) if k != y]
    margin = min(lower[u] - max(upper[u][k] for k in others) for u in range(len(wins))) if others else math.inf
    return evidence, prediction, lower, upper, certified, margin


def random_maps(seed: int, b: int = 12, c: int = 4, h: int = 5, w: int = 6) -> torch.Tensor:
    """Integer-valued local logits (sums are exact in float64) with ties, zeros, all-negative classes,
    and (for the images from 6 on) the label `i % c` holding spread evidence, so some images certify."""
    gen = torch.Generator().manual_seed(seed)
    maps = torch.randint(-3, 6, (b, c, h, w), generator=gen).double()
    maps[1] = 0.0  # nothing at all
    for i in range(6, b):
        maps[i] = torch.randint(-3, 2, (c, h, w), generator=gen).double()
        maps[i, i % c] += 6.0
    if c >= 4:
        maps[0, 1] = maps[0, 0]  # two identical classes: a tie everywhere
        maps[2, 2] = -torch.rand(h, w, generator=gen, dtype=torch.float64) - 1  # an all-negative class
        maps[3, :2] = torch.randint(0, 2, (2, h, w), generator=gen).double()  # sparse small ties
        maps[4, 0] = 1.0  # evidence spread evenly
        maps[5, 3] = torch.where(maps[5, 3] > 3, 40.0, 0.0)  # concentrated evidence
        maps[7, 1] = maps[7, 3]  # the label and another class tie everywhere
    return maps


# ------------------------------------------------------------------------------- geometry
def test_window_of_bagnets_at_224_with_a_2_percent_patch():
    assert feature_window(224, 32, 17, 8, 0, 26) == (6, 6)  # BagNet-17, PatchGuard's setting
    assert feature_window(224, 32, 33, 8, 0, 24) == (8, 8)  # BagNet-33
    assert feature_window(224, 0.02, 9, 8, 0, 27) == (5, 5)  # 0.02 of 224x224 is 32 px


@pytest.mark.parametrize("n, p, r, s, o", [(40, 7, 5, 2, 0), (40, 7, 5, 3, 1), (33, 4, 9, 4, 0), (30, 5, 3, 1, 1), (64, 10, 9, 2, 0), (25, 3, 6, 5, 2)])
def test_window_matches_enumeration_by_sets(n, p, r, s, o):
    m = (n + o - r) // s + 1
    expect = brute_window(n, p, r, s, o, m)
    assert feature_window((n, n), (p, p), r, s, o, m) == (expect, expect)
    # Away from the edges it is the closed form of the papers (o = 0) or at most one more.
    assert expect in (math.ceil((p + r - 1) / s), math.ceil((p + r - 1) / s) + 1)
    if o == 0:
        assert expect == math.ceil((p + r - 1) / s)


def test_window_per_axis_and_clipped_at_the_edges():
    # 9 px wide inputs give 3 feature columns, all of which a 5 px patch can touch; rows still certify.
    assert feature_window((32, 9), (5, 5), 5, 2, 0, (14, 3)) == (5, 3) == (brute_window(32, 5, 5, 2, 0, 14), brute_window(9, 5, 5, 2, 0, 3))
    wh, ww = feature_window((32, 20), (5, 5), (5, 5), (2, 8), 0, (14, 2))
    assert wh == brute_window(32, 5, 5, 2, 0, 14) and ww == brute_window(20, 5, 5, 8, 0, 2)


def test_window_that_covers_the_whole_map_is_an_error():
    with pytest.raises(ValueError, match=r"whole .* feature map \(PatchGuard's local logits"):
        feature_window(32, 30, 5, 2, 0, 14)
    with pytest.raises(ValueError, match="larger than"):
        feature_window(32, 33, 5, 2, 0, 14)
    with pytest.raises(ValueError, match="receptive_field"):
        feature_window(32, 5, 0, 2, 0, 14)
    with pytest.raises(ValueError, match="feature_stride"):
        feature_window(32, 5, 5, 0, 0, 14)


# ------------------------------------------------------------------------ rule vs brute force
@pytest.mark.parametrize("threshold, clip", [(0.0, None), (0.25, None), (0.5, None), (0.0, 3.0), (0.25, 2.0)])
@pytest.mark.parametrize("window", [(2, 3), (1, 1), (3, 2)])
def test_rule_and_certificate_match_brute_force(threshold, clip, window):
    maps = random_maps(seed=7 + window[0])
    labels = torch.arange(maps.shape[0]) % maps.shape[1]
    evidence = robust_masking(maps, window, threshold, clip)
    cert = masking_certificate(maps, labels, window, threshold, clip)
    lower, upper = evidence_bounds(maps, labels, window, threshold, clip)
    assert evidence.dtype == torch.float64 and cert.margin.dtype == torch.float64
    for i in range(maps.shape[0]):
        ev, pred, lo, up, ok, margin = brute_force(maps[i].numpy(), int(labels[i]), window, threshold, clip)
        assert evidence[i].tolist() == ev
        assert int(cert.prediction[i]) == pred
        assert lower[i].tolist() == lo
        assert upper[i].T.tolist() == up
        assert bool(cert.certified[i]) == ok, i
        assert float(cert.margin[i]) == margin
    # Both outcomes occur.
    assert 0 < int(cert.certified.sum()) < maps.shape[0]


def test_rule_matches_brute_force_on_real_valued_maps():
    gen = torch.Generator().manual_seed(3)
    maps = torch.randn(20, 5, 6, 6, generator=gen, dtype=torch.float64) + torch.linspace(0, 1.5, 5, dtype=torch.float64)[None, :, None, None]
    labels = torch.randint(0, 5, (20,), generator=gen)
    for threshold in (0.0, 0.2):
        cert = masking_certificate(maps, labels, (2, 2), threshold)
        for i in range(20):
            ev, pred, _, _, ok, margin = brute_force(maps[i].numpy(), int(labels[i]), (2, 2), threshold, None)
            assert np.allclose(cert.evidence[i].numpy(), ev, rtol=0, atol=1e-12)
            assert int(cert.prediction[i]) == pred
            assert abs(float(cert.margin[i]) - margin) < 1e-12
            if abs(margin) > 1e-9:
                assert bool(cert.certified[i]) == ok


@pytest.mark.parametrize("threshold", [0.0, 0.3])
def test_bounds_hold_for_any_change_inside_a_window(threshold):
    """The bounds themselves, not their formula: rewrite the local logits inside window u (any
    values: random, huge, negative, zero) and the masked evidence stays within [L_y(u), U_c(u)]."""
    gen = torch.Generator().manual_seed(11)
    maps = torch.randint(-2, 5, (6, 3, 6, 6), generator=gen).double()
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    window = (2, 3)
    lower, upper = evidence_bounds(maps, labels, window, threshold)
    wins = list(itertools.product(range(6 - 2 + 1), range(6 - 3 + 1)))
    contents = [
        lambda shape: torch.randint(-3, 8, shape, generator=gen).double(),
        lambda shape: torch.full(shape, 1e6, dtype=torch.float64),
        lambda shape: torch.full(shape, -5.0, dtype=torch.float64),
        lambda shape: torch.zeros(shape, dtype=torch.float64),
        lambda shape: torch.randint(0, 2, shape, generator=gen).double() * 1000,
    ]
    for u, (i, j) in enumerate(wins):
        for make in contents:
            for sub in ((2, 3), (1, 2), (2, 1)):  # the patch's features: all or part of the window
                attacked = maps.clone()
                attacked[:, :, i : i + sub[0], j : j + sub[1]] = make((6, 3, *sub))
                g = robust_masking(attacked, window, threshold)
                assert bool((g[torch.arange(6), labels] >= lower[:, u]).all())
                assert bool((g <= upper[:, :, u] + 1e-9 * upper[:, :, u].abs().clamp(min=1)).all())


def test_worked_example_of_the_patchguard_slides():
    """3x3 maps, 1x1 window, the attacker controls the top-left feature: cat <= 5, dog >= 20."""
    for corner_cat, corner_dog in ((0.0, 0.0), (9.0, 0.0), (0.0, 9.0), (100.0, 3.0)):
        cat = torch.tensor([[corner_cat, 0, 0], [1, 0, 1], [2, 0, 1]], dtype=torch.float64)
        dog = torch.tensor([[corner_dog, 2, 2], [0, 7, 6], [1, 5, 4]], dtype=torch.float64)
        maps = torch.stack([cat, dog])[None]
        dog_id, cat_id = torch.tensor([1]), 0
        lower, upper = evidence_bounds(maps, dog_id, (1, 1))
        assert float(upper[0, cat_id, 0]) == 5.0  # window 0 is the top-left feature
        assert float(lower[0, 0]) == 20.0
    maps = torch.stack([torch.tensor([[0, 0, 0], [1, 0, 1], [2, 0, 1]]), torch.tensor([[0, 2, 2], [0, 7, 6], [1, 5, 4]])]).double()[None]
    cert = masking_certificate(maps, torch.tensor([1]), (1, 1))
    assert int(cert.prediction) == 1 and bool(cert.certified)
    assert robust_masking(maps, (1, 1)).tolist() == [[3.0, 20.0]]  # cat 5 - 2, dog 27 - 7


def test_ties_go_to_the_smallest_class_id_and_the_margin_guard():
    # Label evidence spread evenly (9 ones: L = 9 - 1 - 1 = 7 in every window) against a single 7
    # (U = 7 in every window but its own): the bounds tie at worst. The tie certifies label 0
    # against class 1, not label 1 against class 0.
    ones, spot = torch.ones(3, 3), torch.zeros(3, 3)
    spot[1, 1] = 7.0
    maps = torch.stack([torch.stack([ones, spot, torch.zeros(3, 3)]), torch.stack([spot, ones, torch.zeros(3, 3)])]).double()
    cert = masking_certificate(maps, torch.tensor([0, 1]), (1, 1))
    assert cert.prediction.tolist() == [0, 1]
    assert cert.certified.tolist() == [True, False]
    assert cert.margin.tolist() == [0.0, 0.0]
    # Robust masking itself: identical evidence goes to the smallest id.
    assert robust_masking(torch.stack([spot, spot])[None].double(), (1, 1)).argmax(1).tolist() == [0]
    # A margin guard > 0 refuses the tie; a positive worst-case margin passes only a smaller guard.
    assert masking_certificate(maps, torch.tensor([0, 1]), (1, 1), margin=1e-6).certified.tolist() == [False, False]
    maps = random_maps(seed=7)
    labels = torch.arange(maps.shape[0]) % maps.shape[1]
    plain = masking_certificate(maps, labels, (2, 2))
    positive = plain.certified & (plain.margin > 0)
    assert bool(positive.any())
    guard = float(plain.margin[positive].min())
    assert masking_certificate(maps, labels, (2, 2), margin=guard / 2).certified[positive].all()
    assert not masking_certificate(maps, labels, (2, 2), margin=guard).certified[plain.margin == guard].any()


def test_single_class_and_chunking():
    maps = random_maps(seed=1, b=5, c=1)
    cert = masking_certificate(maps, torch.zeros(5, dtype=torch.long), (2, 2))
    assert cert.margin.tolist() == [math.inf] * 5 and cert.certified.all()
    import robustwrap.defenses.patchguard as pg

    maps = random_maps(seed=2, b=9)
    labels = torch.arange(9) % 4
    whole = masking_certificate(maps, labels, (2, 2))
    small, pg._CHUNK_ELEMENTS = pg._CHUNK_ELEMENTS, 1  # one image per chunk
    try:
        chunked = masking_certificate(maps, labels, (2, 2))
    finally:
        pg._CHUNK_ELEMENTS = small
    assert torch.equal(whole.certified, chunked.certified) and torch.equal(whole.margin, chunked.margin)


# ---------------------------------------------------------------- soundness on a real model
class LocalMeans(nn.Module):
    """Local logits: class c is the mean of channel c over a 3x3 window, stride 2 (r = 3, s = 2, o = 0),
    plus a little of every channel, so a patch pushes up the class of the channel it makes large."""

    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.conv = nn.Conv2d(2, 2, 3, stride=2)
        with torch.no_grad():
            self.conv.weight.copy_(0.02 * torch.randn(2, 2, 3, 3))
            self.conv.weight[0, 0] += 1 / 9
            self.conv.weight[1, 1] += 1 / 9
            self.conv.bias.zero_()

    def forward(self, x):
        return self.conv(x)


def _images(n: int = 8, side: int = 20, strength: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Images whose label's channel carries evidence, from barely (worst-case margin near 0) to plenty."""
    gen = torch.Generator().manual_seed(5)
    labels = torch.arange(n) % 2
    x = torch.rand(n, 2, side, side, generator=gen) * 0.4 - 0.3
    strengths = torch.linspace(0.05, 0.6, n).tolist() if strength is None else [strength] * n
    for i, y in enumerate(labels.tolist()):
        x[i, y] += strengths[i] * (0.6 + 0.8 * torch.rand(side, side, generator=gen))
    return x, labels


def _patch_search(predict, x: torch.Tensor, p: int) -> torch.Tensor:
    """`(B,)` bool: some patch position and content changes the prediction (every position)."""
    b, c, h, w = x.shape
    gen = torch.Generator().manual_seed(9)
    big = 1000.0
    contents = [
        torch.full((c, p, p), big),
        torch.full((c, p, p), -big),
        torch.tensor([big, -big])[:, None, None].expand(c, p, p),
        torch.tensor([-big, big])[:, None, None].expand(c, p, p),
        torch.randn(c, p, p, generator=gen) * big,
        torch.rand(c, p, p, generator=gen) * 4 - 2,
    ]
    clean = predict(x)
    broken = torch.zeros(b, dtype=torch.bool)
    for i in range(b):
        views = []
        for top, left, content in itertools.product(range(h - p + 1), range(w - p + 1), contents):
            view = x[i].clone()
            view[:, top : top + p, left : left + p] = content
            views.append(view)
        preds = torch.cat([predict(v) for v in torch.stack(views).split(512)])
        broken[i] = bool((preds != clean[i]).any())
    return broken


@pytest.mark.filterwarnings("ignore:images reach")  # the search's extreme patches are meant to be out of range
def test_certified_images_survive_every_patch_and_a_smaller_window_does_not():
    x, y = _images()
    model = LocalMeans().eval()
    p = 3
    # margin 0, the paper's rule: the certificate must hold even without the margin guard
    guard = PatchGuard(model, p, image_size=20, receptive_field=3, feature_stride=2, feature_offset=0, margin=0.0).eval()
    assert guard.window == (3, 3) == (feature_window(20, p, 3, 2, 0, 9))
    result = guard.certify(x, y)
    assert isinstance(result, PatchGuardResult)
    assert bool(result.certified.any()) and float(result.margin[result.certified].min()) < 0.5  # some barely
    broken = _patch_search(guard.predict, x, p)
    assert not bool((broken & result.certified).any()), "a certified image was broken by a patch"
    # Declaring r = 1 (what a model that looked only at its own pixel would have) would make the
    # window one smaller: that certificate is wrong, and the same search proves it. So the model
    # is probed when a geometry is declared for it, and that declaration is refused.
    with pytest.raises(ValueError, match=r"declared for this model \(receptive_field=\(1, 1\).*does not hold.*reach \(3, 3\) pixels"):
        PatchGuard(model, p, image_size=20, receptive_field=1, feature_stride=2, feature_offset=0)
    window = feature_window(20, p, 1, 2, 0, 9)
    assert window == (2, 2)
    with torch.no_grad():
        wrong = masking_certificate(model(x), y, window)
        broken_small = _patch_search(lambda v: robust_masking(model(v), window).argmax(1), x, p)
    assert bool((broken_small & wrong.certified).any())


def test_the_margin_setting_is_the_certificate_margin():
    """`guard.margin` is read by `certify`: an image certified with a worst-case margin `m` at
    margin 0 is no longer certified once the setting reaches `m` (assigned after wrap)."""
    x, y = _images()
    guard = PatchGuard(LocalMeans(), 3, image_size=20, receptive_field=3, feature_stride=2, feature_offset=0, margin=0.0).eval()
    plain = guard.certify(x, y)
    margins = plain.margin[plain.certified]
    assert margins.numel() >= 2 and float(margins.min()) < float(margins.max())
    guard.margin = float(margins.min())
    guarded = guard.certify(x, y)
    assert torch.equal(guarded.certified, plain.certified & (plain.margin > guard.margin))
    assert int(guarded.certified.sum()) == int(plain.certified.sum()) - 1


@pytest.mark.filterwarnings("ignore:images reach")
def test_certified_bagnet_images_survive_every_patch():
    """The same on a random `bagnet_tiny`: class 3's bias is raised until some images certify and
    others do not, so the certified ones have small worst-case margins (the hardest case)."""
    torch.manual_seed(0)
    model = timm.create_model("bagnet_tiny", num_classes=4, in_chans=2).eval()
    x, _ = _images(n=8, side=16, strength=1.0)
    guard = robustwrap.wrap(model, patch=3, defense="patchguard", image_size=16).eval()
    for lift in torch.arange(0.0, 3.0, 0.1).tolist():
        with torch.no_grad():
            model.fc.bias.copy_(torch.tensor([0.0, 0.0, 0.0, lift]))
        result = guard.certify(x, guard.predict(x))
        if 0 < int(result.certified.sum()) < 8:
            break
    assert 0 < int(result.certified.sum()) < 8
    assert float(result.margin[result.certified].min()) < 1.0
    broken = _patch_search(guard.predict, x, 3)
    assert not bool((broken & result.certified).any())


# ------------------------------------------------------------------------- defended class
def _tiny(num_classes: int = 3) -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model("bagnet_tiny", num_classes=num_classes, in_chans=1)


def test_wrap_builds_patchguard_from_the_model_geometry():
    model = _tiny()
    guard = robustwrap.wrap(model, patch=0.02, defense="patchguard")
    assert isinstance(guard, PatchGuard) and guard.defense == "patchguard"
    assert guard.image_size == (32, 32) and guard.patch == (5, 5)  # 2% of 32x32 -> 5 px
    assert (guard.receptive_field, guard.feature_stride, guard.feature_offset) == ((5, 5), (2, 2), (0, 0))
    assert guard.window == (5, 5) == feature_window(32, 5, 5, 2, 0, 14)
    assert guard.training == model.training
    settings = guard.settings()
    assert settings == {
        "defense": "patchguard",
        "image_size": [32, 32],
        "fill": 0.0,
        "precision": "float32",
        "margin": DEFAULT_EVIDENCE_MARGIN,
        "patch": [5, 5],
        "receptive_field": [5, 5],
        "feature_stride": [2, 2],
        "feature_offset": [0, 0],
        "threshold": 0.0,
        "clip": None,
        "tau": 0.0,
    }
    rebuilt = robustwrap.RobustPatchClassifier.from_settings(model, settings)
    assert isinstance(rebuilt, PatchGuard) and rebuilt.settings() == settings
    other = PatchGuard.from_settings(model, {**settings, "threshold": 0.25, "clip": 4.0, "margin": 0.5})
    assert (other.threshold, other.clip, other.margin) == (0.25, 4.0, 0.5)


def test_forward_predict_certify_one_view_per_image():
    model = _tiny(num_classes=4)
    guard = PatchGuard.from_patch(model, 5, batch_size=3).eval()
    x = torch.randn(5, 1, 32, 32)
    counter = ViewCounter(model)
    g = guard(x)
    assert counter.images == 5 and counter.calls == 2  # batch_size images per pass
    assert g.dtype == torch.float64 and g.shape == (5, 4)
    with torch.no_grad():
        local = model(x).double()
    assert torch.equal(g, robust_masking(local, guard.window))
    assert torch.equal(guard.predict(x), g.argmax(1))
    counter.images = 0
    result = guard.certify(x, g.argmax(1))
    assert counter.images == 5 and result.num_views.tolist() == [1] * 5 and result.total_views == 5
    ref = masking_certificate(local, g.argmax(1), guard.window)
    assert torch.equal(result.certified, ref.certified) and torch.equal(result.margin, ref.margin)
    assert not result.margin.requires_grad and not result.margin.is_inference()
    # forward is differentiable (the attack's surrogate goes through it)
    xg = x.clone().requires_grad_(True)
    guard(xg)[:, 0].sum().backward()
    assert xg.grad is not None
    counter.remove()


def test_vanilla_prediction_is_the_mean_of_the_local_logits():
    model = _tiny(num_classes=4)
    guard = PatchGuard.from_patch(model, 5).eval()
    x = torch.randn(6, 1, 32, 32)
    with torch.no_grad():
        expect = model(x).mean((2, 3)).argmax(1)
    assert torch.equal(guard.predict_vanilla(x), expect)


def test_train_mode_is_the_base_model_and_predict_uses_eval():
    model = _tiny()
    guard = PatchGuard.from_patch(model, 5).train()
    x = torch.randn(2, 1, 32, 32)
    assert guard(x).shape == (2, 3, 14, 14)
    assert guard.predict(x).shape == (2,)
    assert guard.training and model.training


def test_settings_take_effect_at_the_next_call():
    guard = PatchGuard.from_patch(_tiny(), 5).eval()
    x = torch.randn(3, 1, 32, 32)
    with torch.no_grad():
        local = guard.model(x).double()
    guard.patch = 9
    assert guard.window == feature_window(32, 9, 5, 2, 0, 14) == (7, 7)
    guard.threshold = 0.3
    guard.clip = 0.5
    assert torch.equal(guard(x), robust_masking(local, (7, 7), 0.3, 0.5))
    assert guard.settings()["patch"] == [9, 9] and guard.settings()["threshold"] == 0.3
    with pytest.raises(ValueError, match="threshold"):
        guard.threshold = 1.0


def test_bfloat16_precision_certifies_from_bf16_local_logits():
    guard = PatchGuard.from_patch(_tiny(), 5, precision="bfloat16").eval()
    x = torch.randn(2, 1, 32, 32)
    result = guard.certify(x, torch.tensor([0, 1]))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        local = guard.model(x)
    assert local.dtype == torch.bfloat16
    assert torch.equal(result.margin, masking_certificate(local, torch.tensor([0, 1]), guard.window).margin)


class Global(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3)

    def forward(self, x):
        return self.conv(x).mean((2, 3))


def test_bad_input():
    with pytest.raises(ValueError, match=r"local logits \(B, num_classes, h, w\).*returned \(1, 3\).*patchcleanser"):
        PatchGuard.from_patch(Global(), 3, image_size=16, receptive_field=3, feature_stride=1, feature_offset=0)
    with pytest.raises(ValueError, match="needs the base model's receptive_field"):
        PatchGuard.from_patch(Global(), 3, image_size=16)
    with pytest.raises(ValueError, match="feature_stride"):
        PatchGuard.from_patch(nn.Conv2d(1, 3, 3), 3, image_size=16, receptive_field=3, feature_stride=0, feature_offset=0)
    with pytest.raises(ValueError, match="receptive_field"):
        PatchGuard.from_patch(nn.Conv2d(1, 3, 3), 3, image_size=16, receptive_field=0, feature_stride=1, feature_offset=0)
    with pytest.raises(ValueError, match="contradicts the model's own receptive_field=5"):
        PatchGuard.from_patch(_tiny(), 5, receptive_field=3)
    for bad in (1.0, -0.1, 2, True, "0.5"):
        with pytest.raises(ValueError, match=r"threshold .* \[0, 1\)"):
            PatchGuard.from_patch(_tiny(), 5, threshold=bad)
    with pytest.raises(ValueError, match="clip"):
        PatchGuard.from_patch(_tiny(), 5, clip=0.0)
    with pytest.raises(ValueError, match="whole"):
        robustwrap.wrap(_tiny(), patch=30, defense="patchguard")
    for option, value in (("num_masks", 6), ("mask_set", None), ("stride", 4)):
        with pytest.raises(ValueError, match=f"{option}= is an option of defense 'patchcleanser'"):
            robustwrap.wrap(_tiny(), patch=5, defense="patchguard", **{option: value})
    # A declared stride that puts features outside the image is not this model's geometry.
    with pytest.raises(ValueError, match="does not describe this model"):
        PatchGuard.from_patch(nn.Conv2d(1, 3, 3), 3, image_size=16, receptive_field=3, feature_stride=4, feature_offset=0)
    guard = PatchGuard.from_patch(_tiny(), 5).eval()
    with pytest.raises(ValueError, match=r"labels must be in \[0, 3\)"):
        guard.certify(torch.zeros(1, 1, 32, 32), torch.tensor([3]))
    with pytest.raises(ValueError, match="32x32"):
        guard.predict(torch.zeros(1, 1, 28, 28))
    settings = guard.settings()
    for key, value in (("threshold", 1.5), ("receptive_field", [0, 5]), ("patch", "5"), ("clip", -1.0)):
        with pytest.raises(ValueError, match=key):
            PatchGuard.from_settings(guard.model, {**settings, key: value})
    with pytest.raises(ValueError, match="mask_set"):
        PatchGuard.from_settings(guard.model, {**settings, "mask_set": {}})


def test_hub_round_trip_rebuilds_the_bagnet_by_its_timm_name(tmp_path):
    model = timm.create_model("bagnet_tiny", num_classes=3)
    guard = robustwrap.wrap(model, patch=5, defense="patchguard", threshold=0.1, clip=6.0, margin=0.01).eval()
    guard.save_pretrained(tmp_path)
    loaded = robustwrap.from_pretrained(str(tmp_path))
    assert isinstance(loaded, PatchGuard) and type(loaded.model).__name__ == "BagNet"
    assert loaded.settings() == guard.settings()
    x = torch.randn(3, 1, 32, 32)
    assert torch.equal(loaded(x), guard(x))
    y = guard.predict(x)
    assert torch.equal(loaded.certify(x, y).margin, guard.certify(x, y).margin)


# ------------------------------------------------------------------------------- training
def test_provable_adversarial_loss_is_clip_remove_the_label_window_average_cross_entropy():
    gen = torch.Generator().manual_seed(0)
    local = torch.randn(3, 4, 5, 5, generator=gen, requires_grad=True)
    y = torch.tensor([0, 2, 3])
    loss = provable_adversarial_loss(local, y, (2, 2), clip=1.5)
    x = local.detach().clamp(0, 1.5)
    logits = x.sum((2, 3))
    for i in range(3):
        biggest = max(float(x[i, y[i], a : a + 2, b : b + 2].sum()) for a in range(4) for b in range(4))
        logits[i, y[i]] = local.detach()[i, y[i]].clamp(max=1.5).sum() - biggest  # the label's negative logits count
    assert torch.allclose(loss, F.cross_entropy(logits / 25, y))
    loss.backward()
    assert local.grad is not None and local.grad.abs().sum() > 0
    guard = PatchGuard.from_patch(_tiny(4), 5)
    local = torch.randn(2, 4, 14, 14)
    assert torch.equal(guard.training_loss(local, torch.tensor([1, 2])), provable_adversarial_loss(local, torch.tensor([1, 2]), (5, 5)))
    assert torch.allclose(guard.training_loss(local, torch.tensor([1, 2]), provable=False), F.cross_entropy(local.mean((2, 3)), torch.tensor([1, 2])))
