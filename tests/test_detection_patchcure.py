"""PatchCURE's certified detection: the one-mask views of the feature mask set.

The views and the unmasked logits are checked against a reference of the published rule built
here (the SRF's features with one mask's cells at 0 through the LRF, or float64 sums of the kept
local logits, one view at a time by slicing), and the certificate by a search over every patch
position judged by `detect`; a feature mask set that misses patches is caught by that search.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import reference_detection_rule, silent_wrong_labels
from test_patchcure import GlobalLRF, LocalLogits, PatchSRF, _kept, _tiny_vit

import robustwrap
from robustwrap.defenses import patchcure
from robustwrap.geometry import MaskSet


@torch.no_grad()
def reference_views(model: patchcure.PatchCURE, image: torch.Tensor) -> tuple[list[float], list[list[float]]]:
    """The unmasked logits and one view per feature mask of one image, by slicing the SRF's features."""
    srf, lrf = model.srf, model.lrf
    features = srf(image[None])
    grid = tuple(features.shape[2:])

    def logits(kept: torch.Tensor) -> list[float]:
        if lrf is None:
            return (features[0].double() * kept).sum((1, 2)).tolist()
        return lrf(features * kept, kept[None])[0].tolist()

    return logits(torch.ones(grid, dtype=torch.bool)), [logits(_kept(grid, [box])) for box in model.feature_mask_set.boxes]


def _pair(tau: float, scale: float = 2.0) -> patchcure.PatchCURE:
    lrf = GlobalLRF()
    with torch.no_grad():
        lrf.conv.weight.mul_(scale)  # logits a few units apart: views reach high confidences
    model = robustwrap.PatchCURE(PatchSRF(), lrf, patch=3, image_size=16, margin=0.0).eval()
    model.tau = tau
    return model


def _local(tau: float, bias: float = 0.2) -> patchcure.PatchCURE:
    torch.manual_seed(0)
    return robustwrap.wrap(LocalLogits(bias=bias), patch=3, defense="patchcure", image_size=16, margin=0.0, tau=tau).eval()


@pytest.mark.parametrize("tau", [0.0, 0.5, 0.8])
@pytest.mark.parametrize("kind", ["pair", "srf_only"])
def test_views_and_certificates_equal_the_published_rule_on_sliced_features(kind, tau):
    model = _pair(tau) if kind == "pair" else _local(tau)
    x = torch.randn(12, 1, 16, 16, generator=torch.Generator().manual_seed(1)) * (1.0 if kind == "pair" else 0.5)
    labels = model.predict_vanilla(x)
    labels[::4] = (labels[::4] + 1) % model.num_classes  # some wrong labels
    found, cert = model.detect(x), model.certify_detection(x, labels)
    outcomes = []
    for b in range(x.shape[0]):
        unmasked, views = reference_views(model, x[b])
        p, alert, certified = reference_detection_rule(unmasked, views, int(labels[b]), tau)
        assert (int(found.prediction[b]), bool(found.alert[b])) == (p, alert)
        assert (int(cert.prediction[b]), bool(cert.alert[b]), bool(cert.certified[b])) == (p, alert, certified)
        outcomes.append((alert, certified))
    k = len(model.feature_mask_set)
    assert torch.equal(cert.num_views, torch.full((12,), k + 1))
    if tau == 0.0:  # the data exercise both outcomes of both answers
        assert {a for a, _ in outcomes} == {True, False} and {c for _, c in outcomes} == {True, False}


def test_views_of_a_vit_split_equal_the_published_rule_on_its_sliced_features():
    pytest.importorskip("robustwrap.windows")  # the ViT split
    model = robustwrap.wrap(_tiny_vit(), patch=5, defense="patchcure", window=(2, 2), split=1, margin=0.0, tau=0.3).eval()
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(4) % 4
    found, cert = model.detect(x), model.certify_detection(x, labels)
    for b in range(4):
        unmasked, views = reference_views(model, x[b])
        p, alert, certified = reference_detection_rule(unmasked, views, int(labels[b]), 0.3)
        assert (int(found.prediction[b]), bool(found.alert[b]), bool(cert.certified[b])) == (p, alert, certified)


def _silent_wrong_labels(model: patchcure.PatchCURE, x: torch.Tensor, labels: torch.Tensor, certified: torch.Tensor) -> tuple[int, int]:
    """`conftest.silent_wrong_labels` at every 3x3 patch position with extreme, opposite and random contents."""
    gen = torch.Generator().manual_seed(7)
    p = 3
    contents = [torch.full((1, p, p), 50.0), torch.full((1, p, p), -50.0), torch.randn(1, p, p, generator=gen) * 50]
    return silent_wrong_labels(model, x, labels, certified, p, contents)


@pytest.mark.filterwarnings("ignore:images reach")  # the search's extreme patches are meant to be out of range
@pytest.mark.parametrize("tau", [0.0, 0.6])
def test_certified_images_never_end_in_a_silent_wrong_label_and_a_mask_set_that_misses_patches_does(monkeypatch, tau):
    model = _local(tau)
    x = torch.randn(10, 1, 16, 16, generator=torch.Generator().manual_seed(4)) * 0.5
    y = torch.zeros(10, dtype=torch.long)
    cert = model.certify_detection(x, y)
    assert 0 < int(cert.certified.sum()) < 10
    silent, alerts = _silent_wrong_labels(model, x, y, cert.certified)
    assert silent == 0 and alerts > 0  # the patches do flip labels: the alert is what catches them

    # Masks of one cell miss the patches that straddle two cells: the same search finds silent wrong labels.
    monkeypatch.setattr(patchcure, "_cell_masks", lambda grid, window, stride: MaskSet.rect(grid, (1, 1), stride=stride))
    broken = model.certify_detection(x, y)
    assert _silent_wrong_labels(model, x, y, broken.certified)[0] > 0


@pytest.mark.filterwarnings("ignore:images reach")
def test_certified_images_of_a_pair_never_end_in_a_silent_wrong_label():
    model = _pair(0.0)
    x = torch.randn(10, 1, 16, 16, generator=torch.Generator().manual_seed(2))
    labels = model.predict_vanilla(x)
    cert = model.certify_detection(x, labels)
    assert bool(cert.certified.any())
    assert _silent_wrong_labels(model, x, labels, cert.certified)[0] == 0


def test_tau_is_a_setting_of_patchcure_in_wrap_settings_the_hub_and_fingerprints(tmp_path):
    from robustwrap.dataset import model_fingerprint

    model = _local(0.25)
    assert model.tau == 0.25 and model.settings()["tau"] == 0.25
    with pytest.raises(ValueError, match="tau must be a float in"):
        model.tau = 1.0
    before = model_fingerprint(model)
    model.tau = 0.5
    assert model_fingerprint(model) != before
    rebuilt = robustwrap.RobustPatchClassifier.from_settings(model.model, json.loads(json.dumps(model.settings())))
    assert isinstance(rebuilt, patchcure.PatchCURE) and rebuilt.tau == 0.5

    torch.manual_seed(0)
    import timm

    bagnet = timm.create_model("bagnet_tiny", num_classes=3, in_chans=1).eval()
    saved = robustwrap.wrap(bagnet, patch=3, defense="patchcure", image_size=16, tau=0.3).eval()
    saved.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["robustwrap"]["tau"] == 0.3
    loaded = robustwrap.from_pretrained(str(tmp_path))
    x = torch.randn(4, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    labels = saved.predict_vanilla(x)
    assert loaded.tau == 0.3
    first, second = saved.certify_detection(x, labels), loaded.certify_detection(x, labels)
    assert torch.equal(first.certified, second.certified) and torch.equal(first.alert, second.alert)
