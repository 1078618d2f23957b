"""(De)Randomized Smoothing: Δ by enumeration, the vote rule, exact early exit, soundness, bad input."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from conftest import PeakNet, ViewCounter
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import robustwrap
from robustwrap.defenses.base import DEFAULT_MARGIN
from robustwrap.defenses.smoothing import (
    DerandomizedSmoothing,
    RandomAblation,
    SmoothingResult,
    certificate,
    decided,
    guarded_votes,
    plain_votes,
)
from robustwrap.geometry import AblationSet

# ---------------------------------------------------------------------------- brute force


def brute_keep(image_size, ablation, size, stride) -> np.ndarray:
    """`(V, H, W)` keep masks written out pixel by pixel from the definition."""
    h, w = image_size
    rows = [range(h)] if ablation == "column" else [[(q + t) % h for t in range(size)] for q in range(0, h, stride)]
    cols = [range(w)] if ablation == "row" else [[(q + t) % w for t in range(size)] for q in range(0, w, stride)]
    masks = []
    for kept_rows in rows:
        for kept_cols in cols:
            keep = np.zeros((h, w), dtype=bool)
            for r in kept_rows:
                for c in kept_cols:
                    keep[r, c] = True
            masks.append(keep)
    return np.stack(masks)


def brute_delta(keep: np.ndarray, ph: int, pw: int) -> int:
    """The most views meeting one patch, over every patch position of the 2-D image."""
    _, h, w = keep.shape
    return max(int(keep[:, t : t + ph, l : l + pw].any(axis=(1, 2)).sum()) for t in range(h - ph + 1) for l in range(w - pw + 1))


def brute_view(image: torch.Tensor, keep: np.ndarray, encoding: str, fill: float) -> torch.Tensor:
    """One ablated view of one image, by a Python loop over its pixels."""
    c, h, w = image.shape
    if encoding == "levine2020":
        out = torch.zeros(2 * c, h, w)
        for r in range(h):
            for col in range(w):
                if keep[r, col]:
                    out[:c, r, col] = image[:, r, col]
                    out[c:, r, col] = 1 - image[:, r, col]
        return out
    out = torch.full((c, h, w), fill)
    for r in range(h):
        for col in range(w):
            if keep[r, col]:
                out[:, r, col] = image[:, r, col]
    return out


def brute_counts(model: nn.Module, x: torch.Tensor, keep: np.ndarray, encoding: str, fill: float, threshold, num_classes: int) -> torch.Tensor:
    """Votes of every view of every image: one forward pass per view, votes read in Python."""
    counts = torch.zeros(x.shape[0], num_classes, dtype=torch.long)
    with torch.no_grad():
        for b in range(x.shape[0]):
            for v in range(keep.shape[0]):
                logits = model(brute_view(x[b], keep[v], encoding, fill)[None])[0].tolist()
                if threshold is None:
                    counts[b, logits.index(max(logits))] += 1  # list.index: the first maximum
                else:
                    z = sum(math.exp(t - max(logits)) for t in logits)
                    for c, t in enumerate(logits):
                        if math.exp(t - max(logits)) / z >= threshold:
                            counts[b, c] += 1
    return counts


def brute_certified(counts: torch.Tensor, labels: torch.Tensor, delta: int) -> list[bool]:
    """The certificate of the Concepts page, in Python."""
    out = []
    for row, y in zip(counts.tolist(), labels.tolist()):
        prediction = row.index(max(row))
        ok = prediction == y and all(row[y] - row[c] > 2 * delta or (row[y] - row[c] == 2 * delta and y < c) for c in range(len(row)) if c != y)
        out.append(ok)
    return out


def patch_attack(image: torch.Tensor, ph: int, pw: int, generator: torch.Generator) -> torch.Tensor:
    """`image` with a `ph x pw` patch pasted at every position (stride 1), random and extreme content."""
    c, h, w = image.shape
    contents = [torch.full((c, ph, pw), v) for v in (-10.0, 0.0, 1.0, 10.0)]
    contents += [torch.randn(c, ph, pw, generator=generator) * 3 for _ in range(4)]
    contents += [(torch.rand(c, ph, pw, generator=generator) > 0.5).float() * 20 - 10 for _ in range(2)]
    out = []
    for t in range(h - ph + 1):
        for l in range(w - pw + 1):
            for content in contents:
                patched = image.clone()
                patched[:, t : t + ph, l : l + pw] = content
                out.append(patched)
    return torch.stack(out)


# ----------------------------------------------------------------------------- geometry


@settings(max_examples=150, deadline=None)
@given(
    h=st.integers(1, 11),
    w=st.integers(1, 11),
    ablation=st.sampled_from(["column", "row", "block"]),
    data=st.data(),
)
def test_delta_and_keep_masks_match_brute_force(h, w, ablation, data):
    limit = {"column": w, "row": h, "block": min(h, w)}[ablation]
    size = data.draw(st.integers(1, limit), label="size")
    stride = data.draw(st.integers(1, max(h, w) + 2), label="stride")
    ph = data.draw(st.integers(1, h), label="ph")
    pw = data.draw(st.integers(1, w), label="pw")
    aset = AblationSet((h, w), ablation, size, stride)
    keep = brute_keep((h, w), ablation, size, stride)
    assert np.array_equal(aset.keep_masks().numpy(), keep)
    assert len(aset) == keep.shape[0]
    assert aset.delta((ph, pw)) == brute_delta(keep, ph, pw)


@pytest.mark.parametrize(
    ("width", "size", "patch", "stride", "closed_form", "true_delta"),
    [(30, 4, 5, 4, 2, 3), (224, 19, 32, 10, 5, 6)],
)
def test_delta_wrap_around_beats_the_closed_form(width, size, patch, stride, closed_form, true_delta):
    aset = AblationSet((width, width), "column", size, stride)
    assert math.ceil((patch + size - 1) / stride) == closed_form
    assert aset.delta(patch) == true_delta
    # The patch on columns 0..p-1 meets the wrapped-around last views too.
    keep = aset.keep_masks()
    touched = keep[:, :, :patch].any(2).any(1).nonzero()[:, 0].tolist()
    assert len(touched) == true_delta
    assert touched[-1] == len(aset) - 1


def test_delta_at_stride_one_and_blocks():
    assert AblationSet((32, 32), "column", 4, 1).delta(5) == 8  # min(pw + b - 1, V)
    assert AblationSet((32, 32), "column", 30, 1).delta(5) == 32
    assert AblationSet((12, 20), "row", 3, 1).delta((4, 1)) == 6
    assert AblationSet((12, 12), "block", 4, 1).delta((2, 3)) == 5 * 6
    assert AblationSet((32, 32), "column", 4, 1).delta(0.02) == AblationSet((32, 32), "column", 4, 1).delta(5)  # ceil(sqrt(20.48))


def test_ablation_set_dict_round_trip_and_validation():
    aset = AblationSet((10, 12), "block", 3, 2)
    assert AblationSet.from_dict(aset.to_dict()) == aset
    assert aset.grid == (5, 6) and len(aset) == 30
    assert aset.positions()[7] == (2, 2)
    with pytest.raises(ValueError, match="ablation must be one of"):
        AblationSet.from_dict({**aset.to_dict(), "ablation": "diagonal"})
    with pytest.raises(ValueError, match="size must be a positive int"):
        AblationSet.from_dict({**aset.to_dict(), "size": "3"})
    with pytest.raises(ValueError, match="stride must be a positive int"):
        AblationSet.from_dict({**aset.to_dict(), "stride": 0})
    with pytest.raises(ValueError, match="missing stride"):
        AblationSet.from_dict({"image_size": [10, 12], "ablation": "row", "size": 2})
    with pytest.raises(ValueError, match="image_size"):
        AblationSet.from_dict({**aset.to_dict(), "image_size": 10})
    with pytest.raises(TypeError, match="must be a dict"):
        AblationSet.from_dict([10, 12])
    with pytest.raises(ValueError, match="at most the smaller image side"):
        AblationSet((10, 12), "block", 11, 1)
    with pytest.raises(ValueError, match="at most the image height 10"):
        AblationSet((10, 12), "row", 11, 1)


# ---------------------------------------------------------------------------------- rule


def test_votes_ties_and_thresholds():
    logits = torch.tensor([[1.0, 3.0, 3.0], [2.0, 2.0, 2.0], [0.0, 0.0, 5.0]])
    assert plain_votes(logits).int().tolist() == [[0, 1, 0], [1, 0, 0], [0, 0, 1]]
    # softmax of row 1 is 1/3 each: three votes at 0.3, none at 0.4
    assert plain_votes(logits, 0.3).sum(1).tolist() == [2, 3, 1]
    assert plain_votes(logits, 0.4).sum(1).tolist() == [2, 0, 1]
    sure, possible = guarded_votes(logits, None, 0.0)
    assert torch.equal(sure, plain_votes(logits)) and torch.equal(possible, plain_votes(logits))


def test_margin_guard_against_brute_force():
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(400, 4, generator=gen)
    logits[:50, 1] = logits[:50, 0] + 0.05  # near ties
    margin = 0.2
    sure, possible = guarded_votes(logits, None, margin)
    for row, s, p in zip(logits.tolist(), sure.tolist(), possible.tolist()):
        top = row.index(max(row))
        gap = max(row) - max(v for c, v in enumerate(row) if c != top)
        assert s == [c == top and gap > margin for c in range(4)]
        assert p == [max(row) - v <= margin for v in row]
    sure, possible = guarded_votes(logits, 0.3, margin)
    log_p = logits.log_softmax(1)
    assert torch.equal(sure, log_p - math.log(0.3) > margin)
    assert torch.equal(possible, log_p - math.log(0.3) >= -margin)


def test_certificate_against_brute_force_with_ties():
    gen = torch.Generator().manual_seed(0)
    counts = torch.randint(0, 9, (500, 4), generator=gen)
    counts[:100, 2] = counts[:100, 0] + 4  # differences of exactly 2Δ for Δ = 2
    labels = torch.randint(0, 4, (500,), generator=gen)
    labels[:100] = torch.where(torch.arange(100) % 2 == 0, 2, 0)
    for delta in (0, 1, 2, 3):
        got = certificate(counts, counts, counts, labels, delta).tolist()
        assert got == brute_certified(counts, labels, delta)


def _completions(counts, remaining, threshold_votes):
    """Every final count vector reachable from `counts` with `remaining` more views."""
    c = len(counts)
    choices = list(itertools.product((0, 1), repeat=c)) if threshold_votes else [tuple(int(i == k) for i in range(c)) for k in range(c)]
    for picks in itertools.combinations_with_replacement(choices, remaining):
        yield [n + sum(p[k] for p in picks) for k, n in enumerate(counts)]


@pytest.mark.parametrize("threshold_votes", [False, True])
def test_early_exit_bounds_are_sound_against_every_completion(threshold_votes):
    """`decided` stops an image exactly when every way the remaining views could vote gives the same answer."""
    stops = 0
    for num_classes in (2, 3):
        cases = [(counts, y) for counts in itertools.product(range(4), repeat=num_classes) for y in range(num_classes)]
        t = torch.tensor([counts for counts, _ in cases])
        labels = torch.tensor([y for _, y in cases])
        for remaining in range(4):
            r = torch.full((len(cases),), remaining)
            for delta in (0, 1):
                prediction_fixed = decided(t, t, t, r, None, delta).tolist()
                both_fixed = decided(t, t, t, r, labels, delta).tolist()
                for (counts, y), fixed_p, fixed_b in zip(cases, prediction_fixed, both_fixed):
                    finals = list(_completions(list(counts), remaining, threshold_votes))
                    predictions = [f.index(max(f)) for f in finals]
                    certified = brute_certified(torch.tensor(finals), torch.full((len(finals),), y), delta)
                    # sound: a stop never hides a different outcome; tight: an open image has one to find
                    assert fixed_p == (len(set(predictions)) == 1)
                    assert fixed_b == (len(set(zip(predictions, certified))) == 1)
                    stops += fixed_b
                assert remaining > 0 or all(both_fixed)
    assert stops > 100


# ---------------------------------------------------------------------------- classifier

CONFIGS = [
    ("column", 3, 1, None, "fill"),
    ("row", 2, 2, None, "fill"),
    ("block", 3, 2, None, "fill"),
    ("column", 2, 1, 0.3, "fill"),
    ("block", 3, 3, 0.25, "levine2020"),
    ("row", 3, 1, None, "levine2020"),
]


@pytest.mark.parametrize(("ablation", "size", "stride", "threshold", "encoding"), CONFIGS)
def test_counts_and_certificates_match_a_brute_force_loop(ablation, size, stride, threshold, encoding):
    h, w, c, num_classes = 9, 12, 2, 4
    net = PeakNet(num_classes, 2 * c if encoding == "levine2020" else c, seed=2)
    fill = 0.0 if encoding == "levine2020" else 0.25
    model = DerandomizedSmoothing(
        net, (1, 2), image_size=(h, w), ablation=ablation, size=size, stride=stride, threshold=threshold, encoding=encoding, fill=fill, batch_size=7
    ).eval()
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(5, c, h, w, generator=gen)
    y = torch.randint(0, num_classes, (5,), generator=gen)
    keep = brute_keep((h, w), ablation, size, stride)
    delta = brute_delta(keep, 1, 2)
    expected = brute_counts(net, x, keep, encoding, fill, threshold, num_classes)
    full = model.certify(x, y, early_exit=False)
    assert isinstance(full, SmoothingResult)
    assert full.delta == delta == model.delta
    assert torch.equal(full.counts, expected)
    assert full.num_views.tolist() == [keep.shape[0]] * 5
    assert full.prediction.tolist() == [row.index(max(row)) for row in expected.tolist()]
    assert full.certified.tolist() == brute_certified(expected, y, delta)
    # the prediction's own label is certified exactly when the brute force says so
    own = model.certify(x, full.prediction)
    assert own.certified.tolist() == brute_certified(expected, full.prediction, delta)
    assert model.predict(x).tolist() == full.prediction.tolist()
    logits = model(x)
    assert logits.argmax(1).tolist() == full.prediction.tolist()
    assert torch.allclose(logits, expected.float() / keep.shape[0])


def sharp_net(seed: int = 1) -> PeakNet:
    """A PeakNet with 10x larger logits, so that softmax votes and margins have something to bite."""
    net = PeakNet(3, 1, seed=seed)
    with torch.no_grad():
        net.conv.weight.mul_(10)
        net.conv.bias.mul_(10)
    return net


@pytest.mark.parametrize("threshold", [None, 0.4])
@pytest.mark.parametrize("margin", [0.0, 0.1])
def test_early_exit_equals_full_evaluation_with_fewer_views(threshold, margin):
    net = sharp_net()
    model = DerandomizedSmoothing(net, 2, image_size=16, size=2, threshold=threshold, margin=margin, batch_size=50).eval()
    x = torch.rand(60, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    y = model.predict(x)
    y[::3] = (y[::3] + 1) % 3  # some wrong labels: refused early
    counter = ViewCounter(net)
    full = model.certify(x, y, early_exit=False)
    full_views = counter.images
    fast = model.certify(x, y)
    fast_views = counter.images - full_views
    counter.remove()
    assert full_views == full.total_views == 60 * 16
    assert fast_views == fast.total_views < full_views
    assert torch.equal(fast.prediction, full.prediction)
    assert torch.equal(fast.certified, full.certified)
    assert bool(full.certified.any()) and not bool(full.certified.all())
    assert bool((fast.num_views < 16).any())
    assert bool((fast.counts <= full.counts).all())


def test_batches_mix_images_and_results_do_not_depend_on_batch_size():
    net = PeakNet(3, 1, seed=1)
    x = torch.rand(9, 1, 10, 10, generator=torch.Generator().manual_seed(4))
    y = torch.zeros(9, dtype=torch.long)
    results = []
    for batch_size in (1, 7, 64, 1000):
        model = DerandomizedSmoothing(net, 2, image_size=10, size=2, batch_size=batch_size, num_classes=3).eval()
        counter = ViewCounter(net)
        results.append(model.certify(x, y, early_exit=False))
        assert counter.calls == math.ceil(9 * 10 / batch_size)
        counter.remove()
    for result in results[1:]:
        assert torch.equal(result.counts, results[0].counts)
        assert torch.equal(result.certified, results[0].certified)


def test_margin_only_weakens_certificates_and_never_changes_predictions():
    net = PeakNet(3, 1, seed=1)
    x = torch.rand(40, 1, 12, 12, generator=torch.Generator().manual_seed(0))
    plain = DerandomizedSmoothing(net, 2, image_size=12, size=2).eval()
    y = plain.predict(x)
    base = plain.certify(x, y, early_exit=False)
    for margin in (1e-3, 0.3, 1e6):
        guarded = DerandomizedSmoothing(net, 2, image_size=12, size=2, margin=margin).eval()
        result = guarded.certify(x, y, early_exit=False)
        assert torch.equal(result.prediction, base.prediction)
        assert torch.equal(result.counts, base.counts)
        assert not bool((result.certified & ~base.certified).any())
    assert bool(base.certified.any()) and not bool(result.certified.any())  # a huge margin certifies nothing


@pytest.mark.parametrize(("ablation", "size", "stride"), [("column", 2, 1), ("row", 2, 1), ("block", 3, 3)])
def test_soundness_no_patch_changes_a_certified_prediction_and_delta_minus_one_breaks(ablation, size, stride):
    net = PeakNet(3, 1, seed=1)
    model = DerandomizedSmoothing(net, 2, image_size=12, ablation=ablation, size=size, stride=stride, batch_size=512).eval()
    x = torch.rand(200, 1, 12, 12, generator=torch.Generator().manual_seed(0))
    y = model.predict(x)
    full = model.certify(x, y, early_exit=False)
    gen = torch.Generator().manual_seed(0)
    certified = full.certified.nonzero()[:, 0]
    assert certified.numel() >= 2
    for i in certified[:3].tolist():
        assert bool((model.predict(patch_attack(x[i], 2, 2, gen)) == y[i]).all())
    # The same search breaks a certificate computed with Δ - 1: the test can fail.
    weaker = certificate(full.counts, full.counts, full.counts, y, full.delta - 1) & ~full.certified
    assert weaker.any()
    broken = False
    for i in weaker.nonzero()[:, 0][:8].tolist():
        if bool((model.predict(patch_attack(x[i], 2, 2, gen)) != y[i]).any()):
            broken = True
            break
    assert broken


def test_levine2020_encoding_and_vanilla_logits():
    net = PeakNet(3, 4, seed=0)
    model = DerandomizedSmoothing(net, 2, image_size=10, size=2, encoding="levine2020").eval()
    x = torch.rand(2, 2, 10, 10)
    assert torch.equal(model.vanilla_logits(x), net(torch.cat([x, 1 - x], 1)))
    view = RandomAblation.from_model(model)(x)
    assert view.shape == (2, 4, 10, 10)
    kept = view.abs().sum(1) > 0
    assert torch.equal(view[:, :2][kept.unsqueeze(1).expand(-1, 2, -1, -1)], x[kept.unsqueeze(1).expand(-1, 2, -1, -1)])


def test_random_ablation_gives_one_view_per_image():
    aset = AblationSet((8, 10), "column", 3, 2)
    augment = RandomAblation(aset, fill=-1.0, generator=torch.Generator().manual_seed(0))
    x = torch.rand(16, 3, 8, 10)
    out, views = augment(x, return_indices=True)
    keep = brute_keep((8, 10), "column", 3, 2)
    for b in range(16):
        assert torch.equal(out[b], brute_view(x[b], keep[views[b]], "fill", -1.0))
    assert len(set(views.tolist())) > 1
    again = RandomAblation(aset, fill=-1.0, generator=torch.Generator().manual_seed(0))(x)
    assert torch.equal(again, out)


# ------------------------------------------------------------------------ wrap, settings


def test_wrap_builds_smoothing_and_settings_round_trip():
    net = PeakNet(3, 1, seed=0)
    model = robustwrap.wrap(net.eval(), patch=0.02, defense="smoothing", image_size=32, ablation="column", size=4, stride=2, threshold=0.4)
    assert isinstance(model, robustwrap.DerandomizedSmoothing) and not model.training
    assert model.defense == "smoothing" and model.patch == (5, 5)
    assert model.delta == AblationSet((32, 32), "column", 4, 2).delta(5) == 4
    settings = model.settings()
    assert settings == {
        "defense": "smoothing",
        "image_size": [32, 32],
        "fill": 0.0,
        "precision": "float32",
        "margin": DEFAULT_MARGIN,
        "ablation": "column",
        "size": 4,
        "stride": 2,
        "patch": [5, 5],
        "threshold": 0.4,
        "encoding": "fill",
        "drop_tokens": False,
    }
    rebuilt = robustwrap.RobustPatchClassifier.from_settings(net, settings, batch_size=3)
    assert isinstance(rebuilt, DerandomizedSmoothing) and rebuilt.settings() == settings and rebuilt.batch_size == 3
    assert rebuilt.model is net  # the base weights are the same module
    for key, value in [("size", 0), ("stride", "2"), ("threshold", 1.5), ("encoding", "rgb"), ("ablation", "diagonal"), ("patch", [5])]:
        with pytest.raises(ValueError, match=key):
            DerandomizedSmoothing.from_settings(net, {**settings, key: value})
    with pytest.raises(ValueError, match="unknown smoothing settings"):
        DerandomizedSmoothing.from_settings(net, {**settings, "num_masks": 6})
    model.threshold = None
    assert model.settings()["threshold"] is None
    cleanser = robustwrap.wrap(model.model, patch=5, image_size=32)
    assert cleanser.model is net


def _bad(**options):
    base = {"image_size": 12, "size": 3}
    return {**base, **options}


@pytest.mark.parametrize(
    ("options", "error", "match"),
    [
        (_bad(size=0), ValueError, "size must be a positive int"),
        (_bad(size=13), ValueError, "at most the image width 12"),
        ({"image_size": 12}, ValueError, "size is required"),
        (_bad(stride=0), ValueError, "stride must be a positive int"),
        (_bad(threshold=0.0), ValueError, r"threshold must be in \(0, 1\]"),
        (_bad(threshold=1.5), ValueError, r"threshold must be in \(0, 1\]"),
        (_bad(threshold="0.5"), TypeError, "threshold"),
        (_bad(ablation="diagonal"), ValueError, "ablation must be one of"),
        (_bad(encoding="rgb"), ValueError, "encoding must be one of"),
        (_bad(encoding="levine2020"), ValueError, "first conv takes 3 channels"),
        (_bad(stride=6), ValueError, r"Δ=1 of the V=2 views .* 2Δ=2 >= V"),
        (_bad(size=11), ValueError, r"Δ=12 of the V=12 views"),
    ],
)
def test_bad_input_is_refused_before_any_forward_pass(options, error, match):
    net = PeakNet(3, 3)
    counter = ViewCounter(net)
    with pytest.raises(error, match=match):
        robustwrap.wrap(net, patch=2, defense="smoothing", **options)
    assert counter.calls == 0


def test_options_of_other_defenses_and_bad_images_are_refused():
    net = PeakNet(3, 3)
    counter = ViewCounter(net)
    with pytest.raises(ValueError, match="num_masks= is an option of defense 'patchcleanser'"):
        robustwrap.wrap(net, patch=2, defense="smoothing", image_size=12, size=3, num_masks=6)
    with pytest.raises(ValueError, match="unknown defense 'smooth'"):
        robustwrap.wrap(net, patch=2, defense="smooth", image_size=12, size=3)
    model = robustwrap.wrap(net, patch=2, defense="smoothing", image_size=12, size=3, num_classes=3).eval()
    with pytest.raises(ValueError, match="12x12"):
        model.certify(torch.rand(2, 3, 10, 12), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"labels must be in \[0, 3\)"):
        model.certify(torch.rand(2, 3, 12, 12), torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="patch 13x13 is larger"):
        model.patch = 13
    with pytest.raises(ValueError, match="2Δ"):
        model.ablation_set = AblationSet((12, 12), "column", 12, 1)
    assert model.patch == (2, 2) and model.size == 3
    levine = robustwrap.wrap(PeakNet(3, 4), patch=2, defense="smoothing", image_size=12, size=3, encoding="levine2020")
    with pytest.raises(ValueError, match="images must have 2 channels"):
        levine.predict(torch.rand(2, 4, 12, 12))
    with pytest.raises(ValueError, match="fill has no effect"):
        levine.fill = 0.5
    assert counter.calls == 0


@pytest.mark.parametrize("encoding", ["fill", "levine2020"])
def test_hub_folder_round_trip(tmp_path, encoding):
    timm = pytest.importorskip("timm")
    net = timm.create_model("test_resnet", num_classes=3, in_chans=2 if encoding == "levine2020" else 1, pretrained=False)
    model = robustwrap.wrap(net, patch=5, defense="smoothing", image_size=32, ablation="row", size=6, stride=2, encoding=encoding, margin=0.01).eval()
    model.save_pretrained(tmp_path)
    loaded = robustwrap.from_pretrained(str(tmp_path)).eval()
    assert isinstance(loaded, DerandomizedSmoothing) and loaded.settings() == model.settings()
    x = torch.rand(3, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0, 1, 2])
    a, b = model.certify(x, y), loaded.certify(x, y)
    assert torch.equal(a.counts, b.counts) and torch.equal(a.certified, b.certified)


# ------------------------------------------------------------------------ speed (issue 14)
@pytest.mark.parametrize("margin", [0.0, 0.05])
def test_stepped_scheduling_and_layout_change_no_result(monkeypatch, margin):
    """Planning several passes per host synchronisation (accelerators) and channels_last views
    give the same predictions, certificates and (full) vote counts as one pass per step."""
    import timm

    from robustwrap.defenses import smoothing

    net = timm.create_model("test_resnet", num_classes=4).eval()
    model = robustwrap.wrap(net, patch=3, defense="smoothing", image_size=32, size=6, stride=3, margin=margin, batch_size=5).eval()
    x = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    y = model.predict(x)
    y[::2] = (y[::2] + 1) % 4
    base = [model.certify(x, y), model.certify(x, y, early_exit=False)]
    monkeypatch.setattr(smoothing, "auto_sync_every", lambda device: 3)
    for flag in (False, True):
        monkeypatch.setattr(smoothing, "auto_channels_last", lambda model, device=None, flag=flag: flag)
        layouts = []
        handle = net.register_forward_hook(lambda module, inputs, output, layouts=layouts: layouts.append(inputs[0].is_contiguous(memory_format=torch.channels_last)))
        stepped = [model.certify(x, y), model.certify(x, y, early_exit=False)]
        handle.remove()
        # Both settings were used (else the equalities below would prove nothing): views in the
        # layout asked for, and early exit decided per step of 3 passes (other views ran).
        assert set(layouts) == {flag}
        assert not torch.equal(base[0].num_views, stepped[0].num_views)
        for a, b in zip(base, stepped):
            assert torch.equal(a.prediction, b.prediction) and torch.equal(a.certified, b.certified)
        assert torch.equal(base[1].counts, stepped[1].counts)
        assert (stepped[1].num_views == model.full_views).all()


def test_batch_size_defaults_to_auto():
    from robustwrap.views import auto_batch_size

    net = PeakNet(3, 4)
    model = robustwrap.wrap(net, patch=2, defense="smoothing", image_size=12, size=3)
    assert model.batch_size == auto_batch_size(net, (12, 12))
    assert robustwrap.wrap(net, patch=2, defense="smoothing", image_size=12, size=3, batch_size=3).batch_size == 3
