"""Certified detection and top-k: the rules against references written view by view, the tau
boundary, a broken variant caught, and soundness by exhaustive patch search on tiny models."""

from __future__ import annotations

import itertools
import json
import math

import pytest
import timm
import torch
from conftest import LocalMeans, PeakNet, evidence_images, local_means_guard, masked_copy, noise_images, sharp_cleanser, sharp_peaknet
from torch import nn

import robustwrap
from robustwrap import models  # noqa: F401  (registers the BagNets with timm)
from robustwrap.defenses import detection
from robustwrap.defenses.detection import (
    as_tau,
    certify_detection_views,
    confident_labels,
    detect_views,
    evidence_topk,
    in_top_k,
    votes_topk,
    window_views,
)
from robustwrap.defenses.patchguard import evidence_bounds, masking_certificate
from robustwrap.defenses.smoothing import certificate


# ------------------------------------------------------------------------------ references
def softmax(row: list[float]) -> list[float]:
    top = max(row)
    exps = [math.exp(v - top) for v in row]
    return [e / sum(exps) for e in exps]


def first_argmax(row: list[float]) -> int:
    return row.index(max(row))  # the first maximum: the smallest class id


def reference_detect(logits: list[float], views: list[list[float]], tau: float) -> tuple[int, bool]:
    """The published rule (Minority Reports, PatchGuard++'s `pg2_detection`), view by view, with
    ties to the smallest id: `(prediction, alert)`."""
    p = first_argmax(logits)
    alert = False
    for view in views:
        probs = softmax(view)
        label = first_argmax(view)
        if label != p and probs[label] > tau:
            alert = True
    return p, alert


def reference_certified(logits: list[float], views: list[list[float]], y: int, tau: float, margin: float = 0.0) -> bool:
    """The published certificate (`pg2_detection_provable`) with the alert's strict `> tau`, and the margin guard."""
    if first_argmax(logits) != y or (margin > 0 and logits[y] - max(v for c, v in enumerate(logits) if c != y) <= margin):
        return False
    for view in views:
        probs = softmax(view)
        if first_argmax(view) != y or not probs[y] > tau:
            return False
        if margin > 0:
            if view[y] - max(v for c, v in enumerate(view) if c != y) <= margin:
                return False
            if tau > 0 and math.log(probs[y]) - math.log(tau) <= margin:
                return False
    return True


def integer_logits(seed: int, b: int = 40, k: int = 5, c: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """Small integer logits: many exact ties between classes, and many views at the same confidence.
    Class `b % c` of image `b` is lifted by 0 to 4 everywhere, so some images have agreeing views."""
    gen = torch.Generator().manual_seed(seed)
    logits, views = torch.randint(-2, 3, (b, c), generator=gen).double(), torch.randint(-2, 3, (b, k, c), generator=gen).double()
    lift = torch.randint(0, 5, (b,), generator=gen).double()
    rows = torch.arange(b)
    logits[rows, rows % c] += lift
    views[rows, :, rows % c] += lift[:, None]
    return logits, views


# ------------------------------------------------------------------------------ the rule
@pytest.mark.parametrize("tau", [0.0, 0.3, 0.5, 0.6])
@pytest.mark.parametrize("margin", [0.0, 0.5])
def test_rule_matches_the_published_rule_view_by_view(tau, margin):
    for seed in range(3):
        logits, views = integer_logits(seed)
        labels = torch.arange(logits.shape[0]) % logits.shape[1]
        found = detect_views(logits, views, tau)
        certified = certify_detection_views(logits, views, labels, tau, margin)
        for b in range(logits.shape[0]):
            p, alert = reference_detect(logits[b].tolist(), views[b].tolist(), tau)
            assert int(found.prediction[b]) == p and bool(found.alert[b]) == alert
            assert bool(certified[b]) == reference_certified(logits[b].tolist(), views[b].tolist(), int(labels[b]), tau, margin)
    assert bool(found.alert.any()) and bool(certified.any()) or tau > 0.5


def test_a_view_at_confidence_exactly_tau_neither_alerts_nor_certifies():
    # two classes at equal logits: softmax exactly 0.5, the label is class 0 (the smallest id)
    tied = torch.zeros(1, 1, 2, dtype=torch.float64)
    labels, confident = confident_labels(tied, 0.5)
    assert int(labels) == 0 and not bool(confident)
    assert bool(confident_labels(tied, math.nextafter(0.5, 0.0))[1])
    # the unmasked model says 1; the view says 0 at exactly tau: no alert (not > tau) ...
    assert not bool(detect_views(torch.tensor([[0.0, 1.0]]), tied, 0.5).alert)
    # ... so the image cannot be certified for 0 by that view, whatever the unmasked label
    assert not bool(certify_detection_views(torch.tensor([[1.0, 0.0]]), tied, torch.tensor([0]), 0.5))
    assert bool(certify_detection_views(torch.tensor([[1.0, 0.0]]), tied, torch.tensor([0]), math.nextafter(0.5, 0.0)))


def _silent_wrong_answer(certify, logits: torch.Tensor, views: torch.Tensor, labels: torch.Tensor, tau: float) -> bool:
    """Whether some image `certify` certifies is attacked into a wrong label without an alert, judged
    by `detect_views`. The attacker sets the unmasked logits to any class and every view but one
    (the one hiding the patch, kept as it is) to a view that agrees with its choice."""
    certified = certify(logits, views, labels, tau, 0.0)
    _, k, c = views.shape
    for i in certified.nonzero()[:, 0].tolist():
        for kept, wrong in itertools.product(range(k), range(c)):
            if wrong == int(labels[i]):
                continue
            attacked = torch.full((1, k, c), -30.0, dtype=torch.float64)
            attacked[0, :, wrong] = 30.0
            attacked[0, kept] = views[i, kept]
            unmasked = torch.full((1, c), -30.0, dtype=torch.float64)
            unmasked[0, wrong] = 30.0
            if not bool(detect_views(unmasked, attacked, tau).alert):
                return True
    return False


def test_the_exhaustive_attack_finds_no_silent_wrong_answer_and_catches_a_broken_variant():
    """One comparison for the alert and the certificate: with `>=` in the certificate (the
    authors' codes), a view at confidence exactly tau certifies an attackable image."""

    def broken(logits, views, labels, tau, margin):
        probs = views.softmax(-1)
        return (logits.argmax(-1) == labels) & ((views.argmax(-1) == labels[:, None]) & (probs.amax(-1) >= tau)).all(-1)

    for seed in range(3):
        logits, views = integer_logits(seed, c=2)
        labels = logits.argmax(-1)
        for tau in (0.0, 0.5, 0.7310585786300049):  # 0.5 and sigmoid(1) are confidences these views reach exactly
            assert not _silent_wrong_answer(certify_detection_views, logits, views, labels, tau)
    assert _silent_wrong_answer(broken, *integer_logits(0, c=2)[:2], integer_logits(0, c=2)[0].argmax(-1), 0.5)


def test_tau_is_validated_naming_the_argument():
    assert as_tau(0) == 0.0 and as_tau(0.5) == 0.5
    for bad, error in [
        (1.0, ValueError),
        (-0.1, ValueError),
        (math.nan, ValueError),
        ("0.5", TypeError),
        (True, TypeError),
        (None, TypeError),
    ]:
        with pytest.raises(error, match="tau must be a float in \\[0, 1\\)"):
            as_tau(bad)


# ------------------------------------------------------------------------------ PatchCleanser


@pytest.mark.parametrize("tau", [0.0, 0.4, 0.8])
def test_patchcleanser_detection_matches_views_built_by_slicing(tau):
    model = sharp_cleanser(tau)
    x = noise_images()
    labels = model.predict_vanilla(x)
    labels[::3] = (labels[::3] + 1) % 4  # some wrong labels
    found, cert = model.detect(x), model.certify_detection(x, labels)
    net, boxes = model.model, model.mask_set.boxes
    with torch.no_grad():
        for b in range(x.shape[0]):
            unmasked = net(x[b : b + 1])[0].tolist()
            views = [net(masked_copy(x[b], [box], 0.0)[None])[0].tolist() for box in boxes]
            p, alert = reference_detect(unmasked, views, tau)
            assert (int(found.prediction[b]), bool(found.alert[b])) == (p, alert)
            assert (int(cert.prediction[b]), bool(cert.alert[b])) == (p, alert)
            assert bool(cert.certified[b]) == reference_certified(unmasked, views, int(labels[b]), tau, model.margin)
    assert torch.equal(cert.num_views, torch.full((10,), len(boxes) + 1))
    assert bool(cert.certified.any()) and not bool(cert.certified.all())


def _attacks(image: torch.Tensor, p: int, gen: torch.Generator):
    """Every patch position, each with adversarial contents (saturated, per-channel extremes, noise)."""
    c, h, w = image.shape
    contents = [torch.full((c, p, p), 6.0), torch.full((c, p, p), -6.0), torch.randn(c, p, p, generator=gen) * 6]
    contents += [torch.eye(c)[i][:, None, None].expand(c, p, p) * 12 - 6 for i in range(c)]
    for top, left in itertools.product(range(h - p + 1), range(w - p + 1)):
        for content in contents:
            out = image.clone()
            out[:, top : top + p, left : left + p] = content
            yield out


def _survives(model, x: torch.Tensor, labels: torch.Tensor, certified: torch.Tensor, p: int) -> tuple[bool, int]:
    """`(no certified image attacked into a silent wrong label, attacks that raised an alert)`, judged by `detect`."""
    gen = torch.Generator().manual_seed(3)
    alerts = 0
    for i in certified.nonzero()[:, 0].tolist():
        attacked = torch.stack(list(_attacks(x[i], p, gen)))
        found = model.detect(attacked)
        if bool(((found.prediction != labels[i]) & ~found.alert).any()):
            return False, alerts
        alerts += int(found.alert.sum())
    return True, alerts


@pytest.mark.filterwarnings("ignore:images reach")
@pytest.mark.parametrize("tau", [0.0, 0.5])
def test_patchcleanser_certified_images_never_end_in_a_silent_wrong_label(tau):
    model = sharp_cleanser(tau, margin=0.0)
    x = noise_images(6, seed=1)
    labels = model.predict_vanilla(x)
    cert = model.certify_detection(x, labels)
    assert bool(cert.certified.any())
    sound, alerts = _survives(model, x, labels, cert.certified, 3)
    assert sound and alerts > 0  # the attacks do change predictions: the alert is what catches them


def test_a_model_whose_views_sit_exactly_at_tau():
    """A 2-class model that always outputs equal logits: every view has confidence exactly 0.5."""

    class Flat(nn.Module):
        num_classes = 2

        def forward(self, x):
            return x.sum((1, 2, 3))[:, None].expand(-1, 2) * 0

    model = robustwrap.wrap(Flat(), patch=3, image_size=12, num_masks=3, margin=0.0).eval()
    x, zero = noise_images(2), torch.zeros(2, dtype=torch.long)
    model.tau = 0.5
    assert not bool(model.certify_detection(x, zero).certified.any()) and not bool(model.detect(x).alert.any())
    model.tau = math.nextafter(0.5, 0.0)
    assert bool(model.certify_detection(x, zero).certified.all())


# ------------------------------------------------------------------------------ PatchGuard++


def reference_pg2(local: list, window: tuple[int, int]) -> tuple[list[float], list[list[float]]]:
    """PatchGuard++ (`utils/defense_utils.py`'s `pg2_detection`), window by window: the mean local
    logits, and the mean minus each full window's sum over the map size."""
    c, h, w = len(local), len(local[0]), len(local[0][0])
    mean = [sum(sum(row) for row in local[k]) / (h * w) for k in range(c)]
    views = []
    for top, left in itertools.product(range(h - window[0] + 1), range(w - window[1] + 1)):
        inside = [sum(local[k][i][j] for i in range(top, top + window[0]) for j in range(left, left + window[1])) for k in range(c)]
        views.append([mean[k] - inside[k] / (h * w) for k in range(c)])
    return mean, views


@pytest.mark.parametrize("tau", [0.0, 0.34, 0.5])
def test_patchguard_detection_matches_the_published_rule_window_by_window(tau):
    guard = local_means_guard(tau)
    x, labels = evidence_images()
    found, cert = guard.detect(x), guard.certify_detection(x, labels)
    with torch.no_grad():
        local = guard.model(x).double()
    for b in range(x.shape[0]):
        mean, views = reference_pg2(local[b].tolist(), guard.window)
        assert (int(found.prediction[b]), bool(found.alert[b])) == reference_detect(mean, views, tau)
        assert bool(cert.certified[b]) == reference_certified(mean, views, int(labels[b]), tau)
    assert torch.equal(cert.num_views, torch.ones(12, dtype=torch.long))
    assert bool(cert.certified.any()) and not bool(cert.certified.all())


@pytest.mark.filterwarnings("ignore:images reach")
@pytest.mark.parametrize("tau", [0.0, 0.4])
def test_patchguard_certified_images_never_end_in_a_silent_wrong_label(tau):
    guard = local_means_guard(tau)
    x, labels = evidence_images()
    cert = guard.certify_detection(x, labels)
    assert bool(cert.certified.any())
    sound, alerts = _survives(guard, x, labels, cert.certified, 3)
    assert sound and alerts > 0
    # a window one feature too small is an unsound declaration, and the same search shows it
    # (declared as the model's own attributes, which PatchGuard trusts: a declaration given to it is probed and refused)
    lying = LocalMeans()
    lying.receptive_field, lying.feature_stride, lying.feature_offset = 1, 2, 0
    small = robustwrap.PatchGuard(lying, 3, image_size=15, margin=0.0).eval()
    assert small.window == (2, 2)
    assert not _survives(small, x, labels, small.certify_detection(x, labels).certified, 3)[0]


def test_window_views_are_the_map_minus_each_window():
    local = torch.randn(2, 3, 5, 4, dtype=torch.float64)
    logits, views = window_views(local, (2, 3))
    assert views.shape == (2, 4 * 2, 3)
    for b in range(2):
        mean, reference = reference_pg2(local[b].tolist(), (2, 3))
        assert torch.allclose(logits[b], torch.tensor(mean, dtype=torch.float64))
        assert torch.allclose(views[b], torch.tensor(reference, dtype=torch.float64))


# ------------------------------------------------------------------------------ top-k
def brute_votes_topk(votes: list[set[int]], y: int, delta: int, k: int, num_classes: int, one_vote: bool) -> bool:
    """Every choice of `delta` views and every new vote they can cast: `y` stays in the top k."""
    ballots = (
        [{c} for c in range(num_classes)]
        if one_vote
        else [set(s) for n in range(num_classes + 1) for s in itertools.combinations(range(num_classes), n)]
    )
    for changed in itertools.combinations(range(len(votes)), delta):
        for new in itertools.product(ballots, repeat=delta):
            counts = [0] * num_classes
            for v, ballot in enumerate(votes):
                for c in new[changed.index(v)] if v in changed else ballot:
                    counts[c] += 1
            above = sum(1 for c in range(num_classes) if counts[c] > counts[y] or (counts[c] == counts[y] and c < y))
            if above >= k:
                return False
    return True


@pytest.mark.parametrize("one_vote", [True, False])
def test_vote_top_k_against_every_attack_on_the_votes(one_vote):
    gen = torch.Generator().manual_seed(0)
    c, views = 4, 7
    compared = exact = 0
    for _ in range(120):
        if one_vote:
            votes = [{int(v)} for v in torch.randint(0, c, (views,), generator=gen)]
        else:
            votes = [{cl for cl in range(c) if bool(torch.rand(1, generator=gen) < 0.3)} for _ in range(views)]
        counts = torch.zeros(1, c, dtype=torch.long)
        for ballot in votes:
            for cl in ballot:
                counts[0, cl] += 1
        for y, delta, k in itertools.product(range(c), (1, 2), (1, 2, 3)):
            rule = bool(votes_topk(counts, counts, counts, torch.tensor([y]), delta, k, one_vote))
            brute = brute_votes_topk(votes, y, delta, k, c, one_vote)
            assert not rule or brute, "the top-k certificate holds where an attack exists"
            if k == 1:
                assert rule == bool(certificate(counts, counts, counts, torch.tensor([y]), delta))
            # exact where the worst case is real: delta views that voted for y alone
            if sum(1 for ballot in votes if ballot == {y}) >= delta:
                compared += 1
                exact += rule == brute
    assert compared > 100 and exact == compared


def reference_evidence_topk(lower: list[float], upper: list[list[float]], y: int, k: int) -> bool:
    for u in range(len(lower)):
        passing = [c for c in range(len(upper)) if c != y and not (lower[u] > upper[c][u] or (lower[u] == upper[c][u] and y < c))]
        if len(passing) > k - 1:
            return False
    return True


@pytest.mark.parametrize("threshold", [0.0, 0.2])
def test_evidence_top_k_against_a_reference_and_k1_equals_the_certificate(threshold):
    gen = torch.Generator().manual_seed(1)
    local = torch.randint(0, 4, (30, 4, 5, 5), generator=gen).double()  # integer maps: ties between bounds occur
    labels = torch.randint(0, 4, (30,), generator=gen)
    lower, upper = evidence_bounds(local, labels, (2, 2), threshold)
    for k in (1, 2, 3, 4):
        got = masking_certificate(local, labels, (2, 2), threshold, k=k).certified
        evidence = masking_certificate(local, labels, (2, 2), threshold).evidence
        for b in range(30):
            expected = reference_evidence_topk(lower[b].tolist(), upper[b].tolist(), int(labels[b]), k) and bool(
                in_top_k(evidence[b : b + 1], labels[b : b + 1], k)
            )
            assert bool(got[b]) == expected
        if k == 1:
            assert torch.equal(evidence_topk(lower, upper, labels, 1) & (evidence.argmax(1) == labels), got)
    assert bool(masking_certificate(local, labels, (2, 2), threshold, k=4).certified.all())


@pytest.mark.filterwarnings("ignore:images reach")
def test_patchguard_top_k_survives_every_patch_and_k1_is_the_certificate():
    guard = local_means_guard()
    x, labels = evidence_images()
    today = guard.certify(x, labels)
    assert torch.equal(guard.certify(x, labels, k=1).certified, today.certified)
    top2 = guard.certify(x, labels, k=2)
    assert bool((top2.certified & ~today.certified).any()) and not bool((today.certified & ~top2.certified).any())
    gen = torch.Generator().manual_seed(3)
    for i in top2.certified.nonzero()[:, 0].tolist():
        attacked = torch.stack(list(_attacks(x[i], 3, gen)))
        assert bool(in_top_k(guard(attacked), labels[i].expand(attacked.shape[0]), 2).all())


@pytest.mark.filterwarnings("ignore:images reach")
@pytest.mark.parametrize("threshold", [None, 0.3])
def test_smoothing_top_k_survives_every_patch_and_k1_is_the_certificate(threshold):
    net = PeakNet(num_classes=4, seed=0).eval()
    model = robustwrap.wrap(net, patch=2, image_size=16, defense="smoothing", size=2, threshold=threshold, margin=0.0).eval()
    x = noise_images(4, seed=4, side=16)
    labels = model.predict(x)
    today = model.certify(x, labels)
    one = model.certify(x, labels, k=1)
    full = model.certify(x, labels, early_exit=False)
    assert torch.equal(one.certified, today.certified)
    assert torch.equal(votes_topk(full.counts, full.counts, full.counts, labels, model.delta, 1, threshold is None), today.certified)
    top2 = model.certify(x, labels, k=2)
    assert not bool((today.certified & ~top2.certified).any())
    assert bool(top2.certified.any())
    gen = torch.Generator().manual_seed(3)
    for i in top2.certified.nonzero()[:, 0].tolist():
        attacked = torch.stack(list(_attacks(x[i], 2, gen)))
        counts = model.certify(attacked, labels[i].expand(attacked.shape[0]), early_exit=False).counts
        assert bool(in_top_k(counts, labels[i].expand(attacked.shape[0]), 2).all())


def test_bagnet_k1_equals_the_certificate():
    torch.manual_seed(0)
    guard = robustwrap.wrap(
        timm.create_model("bagnet_tiny", num_classes=5, in_chans=2).eval(), patch=3, defense="patchguard", image_size=16
    ).eval()
    x = torch.randn(6, 2, 16, 16, generator=torch.Generator().manual_seed(0))
    labels = guard.predict(x)
    assert torch.equal(guard.certify(x, labels, k=1).certified, guard.certify(x, labels).certified)
    assert bool(guard.certify(x, labels, k=5).certified.all())  # every class is in the top 5 of 5


# ------------------------------------------------------------------------------ the user's path
def test_refusals_say_why():
    smooth = robustwrap.wrap(PeakNet().eval(), patch=2, image_size=12, defense="smoothing", size=2).eval()
    x, y = noise_images(2), torch.zeros(2, dtype=torch.long)
    with pytest.raises(NotImplementedError, match="no published rule"):
        smooth.detect(x)
    with pytest.raises(NotImplementedError, match="no published rule"):
        smooth.certify_detection(x, y)
    with pytest.raises(AttributeError, match="has no detection"):
        smooth.tau = 0.5
    assert "tau" not in smooth.settings()
    with pytest.raises(ValueError, match="k=2: PatchCleanser can only certify k=1"):
        sharp_cleanser().certify(x, y, k=2)
    with pytest.raises(ValueError, match=r"k must be in \[1, num_classes=4\], got 5"):
        smooth.certify(x, y, k=5)
    with pytest.raises(TypeError, match="k must be an int"):
        smooth.certify(x, y, k=2.0)
    with pytest.raises(ValueError, match="tau must be a float in"):
        sharp_cleanser().tau = 1.0


def test_tau_travels_with_the_model(tmp_path):
    model = robustwrap.wrap(sharp_peaknet(), patch=3, image_size=12, num_masks=3, tau=0.25).eval()
    with pytest.raises(ValueError, match="tau= is an option of defense 'patchcleanser' / 'patchguard' / 'patchcure', not of 'smoothing'"):
        robustwrap.wrap(PeakNet(), patch=2, image_size=12, defense="smoothing", size=2, tau=0.25)
    settings = json.loads(json.dumps(model.settings()))
    assert settings["tau"] == 0.25
    assert robustwrap.RobustPatchClassifier.from_settings(model.model, settings).tau == 0.25
    old = {key: value for key, value in settings.items() if key != "tau"}  # configs written before detection
    assert robustwrap.RobustPatchClassifier.from_settings(model.model, old).tau == detection.DEFAULT_TAU
    with pytest.raises(ValueError, match="tau must be a float in"):
        robustwrap.RobustPatchClassifier.from_settings(model.model, {**settings, "tau": 2})
    with pytest.raises(ValueError, match="tau"):
        robustwrap.RobustPatchClassifier.from_settings(model.model, {**settings, "tau": "high"})
    torch.manual_seed(0)
    guard = robustwrap.wrap(
        timm.create_model("bagnet_tiny", num_classes=3, in_chans=1).eval(), patch=3, defense="patchguard", image_size=16
    ).eval()
    guard.tau = 0.3
    guard.save_pretrained(tmp_path / "saved")
    assert json.loads((tmp_path / "saved" / "config.json").read_text())["robustwrap"]["tau"] == 0.3
    loaded = robustwrap.from_pretrained(str(tmp_path / "saved"))
    x = torch.randn(4, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    assert loaded.tau == 0.3
    labels = guard.predict_vanilla(x)
    assert torch.equal(loaded.certify_detection(x, labels).certified, guard.certify_detection(x, labels).certified)
    # the fingerprint of results follows tau
    from robustwrap.dataset import model_fingerprint

    before = model_fingerprint(model)
    model.tau = 0.5
    assert model_fingerprint(model) != before


# ------------------------------------------------------------------------------ data sets and reports
def test_certify_dataset_under_each_guarantee(tmp_path):
    from torch.utils.data import TensorDataset

    from robustwrap.dataset import ResultsFileError

    model = sharp_cleanser(0.4)
    x = noise_images(10)
    labels = model.predict_vanilla(x)
    labels[::4] = (labels[::4] + 1) % 4
    data = TensorDataset(x, labels)
    path = tmp_path / "detect.jsonl"
    report = robustwrap.certify_dataset(model, data, batch_size=4, results_path=path, progress=False, guarantee="detection")
    cert = model.certify_detection(x, labels)
    correct = cert.prediction == labels
    assert report.guarantee == "detection" and report.settings["guarantee"] == "detection" and report.settings["tau"] == 0.4
    assert report.certified == int(cert.certified.sum()) and report.alerts == int(cert.alert.sum())
    assert report.clean_correct_without_alert == int((correct & ~cert.alert).sum()) < report.clean_correct
    assert report.false_alert_rate == int(cert.alert.sum()) / 10 and report.full_views == len(model.mask_set) + 1
    summary = report.summary()
    assert "certified detection accuracy" in summary and "clean accuracy without alert" in summary and "false alerts" in summary
    document = json.loads(report.to_json())["summary"]
    assert document["false_alert_rate"] == report.false_alert_rate and document["guarantee"] == "detection"
    assert robustwrap.CertificationReport.from_json(report.to_json()) == report
    # resumable: the same run continues; another tau or another guarantee is refused, never mixed in
    assert robustwrap.certify_dataset(model, data, batch_size=4, results_path=path, progress=False, guarantee="detection") == report
    model.tau = 0.5
    with pytest.raises(ResultsFileError):
        robustwrap.certify_dataset(model, data, batch_size=4, results_path=path, progress=False, guarantee="detection")
    model.tau = 0.4
    with pytest.raises(ResultsFileError):
        robustwrap.certify_dataset(model, data, batch_size=4, results_path=path, progress=False)
    plain = robustwrap.certify_dataset(model, data, batch_size=4, progress=False, guarantee="top1")
    assert plain.guarantee == "prediction" and plain == robustwrap.certify_dataset(model, data, batch_size=4, progress=False)

    guard = local_means_guard()
    gx, gy = evidence_images()
    top2 = robustwrap.certify_dataset(guard, TensorDataset(gx, gy), batch_size=5, progress=False, guarantee="top2")
    assert top2.guarantee == "top2" and top2.certified == int(guard.certify(gx, gy, k=2).certified.sum())
    assert "certified top2 accuracy" in top2.summary()
    with pytest.raises(ValueError, match="guarantee='detection': DerandomizedSmoothing cannot certify detection"):
        smooth = robustwrap.wrap(PeakNet().eval(), patch=2, image_size=12, defense="smoothing", size=2).eval()
        robustwrap.certify_dataset(smooth, data, progress=False, guarantee="detection")
    with pytest.raises(ValueError, match="k=2: PatchCleanser can only certify k=1"):
        robustwrap.certify_dataset(model, data, progress=False, guarantee="top2")
    with pytest.raises(ValueError, match="guarantee must be 'prediction', 'detection' or 'top<k>'"):
        robustwrap.certify_dataset(model, data, progress=False, guarantee="top-5")


def test_cli_certifies_detection_and_top_k_and_predict_shows_alerts(tmp_path, capsys):
    from PIL import Image
    from safetensors.torch import save_file

    from robustwrap import zoo
    from robustwrap.cli import main
    from robustwrap.cli._loading import _preprocessing

    torch.manual_seed(3)
    base = timm.create_model("bagnet_tiny")
    save_file(base.state_dict(), tmp_path / "bagnet.safetensors")
    model_args = ["--model", "timm:bagnet_tiny", "--checkpoint", str(tmp_path / "bagnet.safetensors"), "--defense", "patchguard"]
    common = ["--data", "mnist-heldout", "--limit", "3", "--no-progress"]
    assert main(["certify", *model_args, *common, "--detect", "--tau", "0.1", "--report", str(tmp_path / "d.json")]) == 0
    out = capsys.readouterr().out
    assert "certified detection accuracy" in out and "false alerts" in out
    report = robustwrap.CertificationReport.load(tmp_path / "d.json")
    guard = robustwrap.wrap(base.eval(), defense="patchguard", tau=0.1).eval()
    data = zoo.builtin_dataset("mnist-heldout", transform=_preprocessing(guard)[0])
    expected = robustwrap.certify_dataset(guard, data, limit=3, progress=False, guarantee="detection")
    assert report.settings == expected.settings and report.guarantee == "detection"
    assert [(r.prediction, r.certified, r.extras["alert"]) for r in report.records] == [
        (r.prediction, r.certified, r.extras["alert"]) for r in expected.records
    ]
    assert main(["certify", *model_args, *common, "--top-k", "3", "--report", str(tmp_path / "t.json")]) == 0
    assert "certified top3 accuracy" in capsys.readouterr().out
    assert robustwrap.CertificationReport.load(tmp_path / "t.json").guarantee == "top3"
    assert main(["certify", *model_args, *common, "--tau", "0.1"]) != 0
    assert "--tau is the confidence threshold of --detect" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # argparse: one guarantee at a time
        main(["certify", *model_args, *common, "--detect", "--top-k", "3"])
    assert "--top-k: not allowed with argument --detect" in capsys.readouterr().err

    zoo.builtin_dataset("mnist-heldout")[0][0].save(tmp_path / "digit.png")
    assert main(["predict", str(tmp_path / "digit.png"), *model_args, "--detect", "--tau", "0.1", "--json"]) == 0
    document = json.loads(capsys.readouterr().out)["images"][0]
    x = _preprocessing(guard)[0](Image.open(tmp_path / "digit.png").convert("L"))[None]
    found = guard.detect(x)
    assert document["prediction"] == int(found.prediction) and document["alert"] == bool(found.alert)
    assert document["certified"] == bool(guard.certify_detection(x, found.prediction).certified)
    assert main(["predict", str(tmp_path / "digit.png"), *model_args, "--detect"]) == 0
    assert "certified detection at tau 0" in capsys.readouterr().out
