"""PatchCleanser's token masks on a timm ViT (`drop_tokens`, ViP / PatchCensor): masked tokens dropped.

Each view is checked against a reference built here without robustwrap's token code: the masked
image by slicing, the tokens that meet an unmasked pixel by looping over the grid, and timm's own
modules (`patch_embed`, `_pos_embed`, `blocks`, `norm`, `forward_head`) on those tokens. Detection
certificates are checked by a search over every patch position judged by `detect`, and the
setting by the Hub round trip.
"""

from __future__ import annotations

import itertools
import json
import math

import pytest
import timm
import torch
from conftest import PeakNet, masked_copy, reference_detection_rule, silent_wrong_labels

import robustwrap
from robustwrap.defenses import patchcleanser
from robustwrap.defenses.patchcleanser import token_mask_set
from robustwrap.geometry import MaskSet

TOKEN_MASKS = token_mask_set(16, 3, 4, num_masks=3)  # 3x3 masks of 2x2 tokens on the 4x4 grid of `_vit`


def _vit(bias: float = 1.0, scale: float = 15.0, seed: int = 0) -> torch.nn.Module:
    """A 16x16 ViT of 4x4 tokens (4x4 grid); class 0 lifted by `bias`, logits scaled so views reach high confidences."""
    torch.manual_seed(seed)
    vit = timm.create_model("vit_tiny_patch16_224", img_size=16, patch_size=4, depth=2, embed_dim=12, num_heads=2, num_classes=3)
    with torch.no_grad():
        vit.head.weight.mul_(scale)
        vit.head.bias.copy_(torch.tensor([bias, 0.0, 0.0]))
    return vit.eval()


def _images(n: int = 10, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------ references
@torch.no_grad()
def reference_logits(vit: torch.nn.Module, image: torch.Tensor, boxes) -> list[float]:
    """The ViT on `image` with `boxes` set to 0 and only the tokens that meet an unmasked pixel, through timm's modules."""
    view = masked_copy(image, boxes, 0.0)
    t = vit.patch_embed.patch_size[0]
    grid = image.shape[1] // t
    unmasked = torch.ones(image.shape[1:], dtype=torch.bool)
    for top, left, h, w in boxes:
        unmasked[top : top + h, left : left + w] = False
    kept = [a * grid + b for a in range(grid) for b in range(grid) if unmasked[a * t : (a + 1) * t, b * t : (b + 1) * t].any()]
    tokens = vit._pos_embed(vit.patch_embed(view[None]))  # prefix tokens, then every patch token with its position
    prefix = vit.num_prefix_tokens
    tokens = torch.cat([tokens[:, :prefix], tokens[:, [prefix + k for k in kept]]], 1)
    return vit.forward_head(vit.norm(vit.blocks(vit.norm_pre(tokens))))[0].tolist()


# ------------------------------------------------------------------------------ the mask set
def test_token_masks_are_whole_tokens_and_cover_every_patch():
    masks = token_mask_set(16, 3, 4, stride=4)  # a 3 px patch meets at most 2 tokens per axis
    assert masks.covers(3) and masks.mask_size == (8, 8) and masks.stride == (4, 4)
    assert all(v % 4 == 0 for box in masks.boxes for v in box)
    assert token_mask_set(32, 5, 4, stride=8).boxes == tuple((t, l, 12, 12) for t in (0, 8, 16, 20) for l in (0, 8, 16, 20))
    with pytest.raises(ValueError, match="stride of token masks must be a multiple of the 4x4 tokens, got 6x6 px"):
        token_mask_set(32, 5, 4, stride=6)
    with pytest.raises(ValueError, match="a multiple of the 4x4 tokens, got 18x18"):
        token_mask_set(18, 3, 4)
    # drop_tokens does not choose the masks: assigned after wrap it is the same function as at wrap
    assert robustwrap.wrap(_vit(), patch=3, drop_tokens=True, num_masks=3).mask_set == MaskSet.square(16, 3, num_masks=3)


# ------------------------------------------------------------------------------ views = reference
@pytest.mark.parametrize("aligned", [True, False])
def test_every_view_equals_the_reference_and_prediction_certification_follow(aligned):
    vit = _vit()
    masks = token_mask_set(16, 3, 4, num_masks=3) if aligned else MaskSet.square(16, 3, num_masks=3)  # pixel masks cut tokens
    model = robustwrap.wrap(vit, mask_set=masks, drop_tokens=True, margin=0.0).eval()
    boxes = model.mask_set.boxes
    x = _images(4)
    full = model.certify(x, torch.zeros(4, dtype=torch.long), early_exit=False)
    runner = model._runner(x)
    _, one_logits = runner.one_mask(x)
    plain = robustwrap.wrap(vit, mask_set=model.mask_set, margin=0.0).eval()  # the same masks, pixels filled
    for b, i in itertools.product(range(4), range(len(boxes))):
        want = reference_logits(vit, x[b], [boxes[i]])
        assert torch.allclose(one_logits[b, i], torch.tensor(want), atol=1e-5)
        for j in range(i, len(boxes)):
            pair = reference_logits(vit, x[b], [boxes[i], boxes[j]])
            assert int(full.grid[b, i, j]) == max(range(3), key=lambda c: (pair[c], -c))
    assert torch.equal(model.predict(x), full.prediction)
    assert not torch.allclose(plain._runner(x).one_mask(x)[1], one_logits)  # dropping is not filling


@pytest.mark.parametrize("tau", [0.0, 0.6])
def test_detection_equals_the_published_rule_on_reference_views(tau):
    x = _images(10)
    for seed in range(4):  # the first ViT whose views alert at tau 0 (timm's random init differs between versions)
        vit = _vit(bias=1.1, seed=seed)
        model = robustwrap.wrap(vit, mask_set=TOKEN_MASKS, drop_tokens=True, margin=0.0, tau=tau).eval()
        labels = model.predict_vanilla(x)
        labels[::4] = (labels[::4] + 1) % 3
        found, cert = model.detect(x), model.certify_detection(x, labels)
        if tau != 0.0 or bool(found.alert.any()):
            break
    outcomes = set()
    for b in range(10):
        with torch.no_grad():
            unmasked = vit(x[b : b + 1])[0].tolist()
        views = [reference_logits(vit, x[b], [box]) for box in model.mask_set.boxes]
        p, alert, certified = reference_detection_rule(unmasked, views, int(labels[b]), tau)
        assert (int(found.prediction[b]), bool(found.alert[b])) == (p, alert)
        assert (int(cert.prediction[b]), bool(cert.alert[b]), bool(cert.certified[b])) == (p, alert, certified)
        outcomes.add((alert, certified))
    assert torch.equal(cert.num_views, torch.full((10,), len(model.mask_set) + 1))
    if tau == 0.0:
        assert {a for a, _ in outcomes} == {True, False} and {c for _, c in outcomes} == {True, False}


def test_a_broken_token_selection_is_caught_by_the_reference(monkeypatch):
    """Keeping every token (the pixels filled, nothing dropped) is another function: the reference sees it."""
    vit = _vit()
    model = robustwrap.wrap(vit, mask_set=TOKEN_MASKS, drop_tokens=True).eval()
    x = _images(2)
    monkeypatch.setattr(patchcleanser, "token_keep", lambda keep, grid: torch.ones(keep.shape[0], *grid.grid, dtype=torch.bool))
    _, one_logits = model._runner(x).one_mask(x)
    want = torch.tensor([reference_logits(vit, x[0], [box]) for box in model.mask_set.boxes])
    assert not torch.allclose(one_logits[0], want, atol=1e-5)


# ------------------------------------------------------------------------------ soundness
def _silent_wrong_labels(model, x: torch.Tensor, labels: torch.Tensor, certified: torch.Tensor, p: int = 3) -> tuple[int, int]:
    """`conftest.silent_wrong_labels` with extreme, opposite, random and one-hot patch contents."""
    gen = torch.Generator().manual_seed(5)
    c = x.shape[1]
    contents = [torch.full((c, p, p), 20.0), torch.full((c, p, p), -20.0), torch.randn(c, p, p, generator=gen) * 20]
    contents += [torch.eye(c)[k][:, None, None].expand(c, p, p) * 40 - 20 for k in range(c)]
    return silent_wrong_labels(model, x, labels, certified, p, contents)


def _certified(tau: float):
    model = robustwrap.wrap(_vit(1.3), mask_set=TOKEN_MASKS, drop_tokens=True, margin=0.0, tau=tau).eval()
    x = _images(4)
    labels = model.predict_vanilla(x)
    cert = model.certify_detection(x, labels)
    assert bool(cert.certified.any())
    return model, x, labels, cert


@pytest.mark.filterwarnings("ignore:images reach")
@pytest.mark.parametrize("tau", [0.0, 0.4])
def test_certified_images_never_end_in_a_silent_wrong_label(tau):
    model, x, labels, cert = _certified(tau)
    silent, alerts = _silent_wrong_labels(model, x, labels, cert.certified)
    assert silent == 0 and alerts > 0  # the patches flip labels: the alert is what catches them


@pytest.mark.filterwarnings("ignore:images reach")
def test_masks_of_one_token_miss_patches_and_the_search_finds_silent_wrong_labels():
    """Masks of one token miss the patches that straddle two tokens: the search of the test above catches them."""
    model, x, labels, _ = _certified(0.0)
    model.mask_set = MaskSet((16, 16), tuple((t, l, 4, 4) for t in range(0, 16, 4) for l in range(0, 16, 4)), ((1, 1),))
    broken = model.certify_detection(x, labels)
    assert _silent_wrong_labels(model, x, labels, broken.certified)[0] > 0


# ------------------------------------------------------------------------------ the setting
def test_drop_tokens_is_a_setting_in_settings_the_hub_and_fingerprints(tmp_path):
    from robustwrap.dataset import model_fingerprint

    vit = timm.create_model("test_vit", num_classes=4, img_size=64).eval()
    model = robustwrap.wrap(vit, mask_set=token_mask_set(64, 10, 16, num_masks=3), drop_tokens=True, tau=0.2).eval()
    settings = json.loads(json.dumps(model.settings()))
    assert settings["drop_tokens"] is True
    plain = robustwrap.wrap(vit, mask_set=model.mask_set, tau=0.2).eval()
    assert "drop_tokens" not in plain.settings()  # pixel masking: settings (and fingerprints) as before the setting
    assert model_fingerprint(plain) != model_fingerprint(model)
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["robustwrap"]["drop_tokens"] is True
    loaded = robustwrap.from_pretrained(str(tmp_path))
    assert loaded.drop_tokens and loaded.settings() == model.settings()
    x = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    y = model.predict(x)
    assert torch.equal(loaded.predict(x), y)
    first, second = model.certify_detection(x, y), loaded.certify_detection(x, y)
    assert torch.equal(first.certified, second.certified) and torch.equal(first.alert, second.alert)
    with pytest.raises(ValueError, match="settings drop_tokens must be true or false"):
        robustwrap.RobustPatchClassifier.from_settings(vit, {**settings, "drop_tokens": "yes"})


def test_drop_tokens_is_refused_with_the_reason():
    with pytest.raises(ValueError, match="drop_tokens=True needs a model whose token grid can be read"):
        robustwrap.wrap(PeakNet().eval(), patch=3, image_size=12, num_masks=3, drop_tokens=True)
    with pytest.raises(TypeError, match="drop_tokens must be True or False, got 1"):
        robustwrap.wrap(_vit(), patch=3, num_masks=3).drop_tokens = 1
    with pytest.raises(ValueError, match="drop_tokens needs the mask set's pixels to be the ViT's"):
        robustwrap.wrap(_vit(), patch=3, input_size=8, num_masks=3, drop_tokens=True)
    model = robustwrap.wrap(_vit(), patch=3, num_masks=3, drop_tokens=True).eval()
    model.model = PeakNet(num_classes=3).eval()  # a model without tokens: the next call says so
    with pytest.raises(ValueError, match="drop_tokens=True needs a model whose token grid can be read"):
        model.predict(_images(1))


# ------------------------------------------------------------------------------ training
@pytest.mark.filterwarnings("ignore:fit_masking. in epoch 1 the model predicts one class")  # six images, one step
def test_fit_masking_trains_on_token_views_and_refuses_pixel_strategies():
    """The loss fit_masking reports for one step is the cross entropy of the reference views of the masks it drew."""
    import copy

    import torch.nn.functional as F

    model = robustwrap.wrap(_vit(), mask_set=TOKEN_MASKS, drop_tokens=True)
    x, y = _images(6), torch.arange(6) % 3
    before = copy.deepcopy(model.model)
    torch.manual_seed(7)
    history = robustwrap.fit_masking(model, [(x, y)], strategy="random_mask", epochs=1, lr=0.1, progress=False)
    torch.manual_seed(7)
    masks = torch.randint(len(TOKEN_MASKS), (6, 2)).tolist()
    boxes = TOKEN_MASKS.boxes
    logits = torch.tensor([reference_logits(before, x[b], [boxes[i], boxes[j]]) for b, (i, j) in enumerate(masks)])
    assert history.final.loss == pytest.approx(F.cross_entropy(logits, y).item(), rel=1e-5)
    assert any(not torch.equal(a, b) for a, b in zip(model.model.state_dict().values(), before.state_dict().values(), strict=True))

    greedy = robustwrap.fit_masking(model, [(x, y)], strategy="greedy", epochs=1, lr=1e-9, progress=False)
    assert greedy.strategy == "greedy" and math.isfinite(greedy.final.loss)
    with pytest.raises(ValueError, match="with drop_tokens train with strategy='random_mask', 'greedy' or 'none'"):
        robustwrap.fit_masking(model, [(x, y)], strategy="multisize_greedy", progress=False)


# --------------------------------------------------------------------------------- attack
@pytest.mark.parametrize("guarantee", ["prediction", "detection"])
def test_the_attack_surrogate_runs_the_views_the_defense_runs(guarantee):
    """With `drop_tokens` the attack's views drop the masked tokens as the defense's do: its logits are the reference's."""
    import importlib

    attack_module = importlib.import_module("robustwrap.attack")  # the module: `robustwrap.attack` is also the function
    vit = _vit()
    model = robustwrap.wrap(vit, mask_set=TOKEN_MASKS, drop_tokens=True, margin=0.0).eval()
    x, y = _images(2), torch.tensor([0, 1])
    kind = attack_module.DETECTION_OBJECTIVES if guarantee == "detection" else attack_module.OBJECTIVES
    objective = kind["patchcleanser"](model, x, y, y, False, (3, 3), "ce")
    k = len(TOKEN_MASKS)
    boxes = TOKEN_MASKS.boxes
    if guarantee == "detection":  # views 0..K-1 mask one mask, view K none
        view = torch.arange(k + 1)
        masks = [[boxes[v]] if v < k else [] for v in view.tolist()]
    else:  # views i * K + j
        view = torch.tensor([i * k + j for i in range(k) for j in range(i, k)])
        masks = [[boxes[v // k], boxes[v % k]] for v in view.tolist()]
    with torch.no_grad():
        for n in range(2):
            got = objective.forward(objective.render(x[n].expand(len(view), -1, -1, -1), view))
            expected = torch.tensor([reference_logits(vit, x[n], m) for m in masks])
            assert torch.allclose(got, expected, atol=1e-4), (got - expected).abs().max()
            pixel = vit(masked_copy_all(x[n], masks))  # the filled views on every token: another function
            assert not torch.allclose(got, pixel, atol=1e-3)
    assert objective.base is vit
    result = robustwrap.attack(model, x, y, steps=2, restarts=1, guarantee=guarantee, progress=False)
    assert result.forward_passes > 0


def masked_copy_all(image: torch.Tensor, masks) -> torch.Tensor:
    return torch.stack([masked_copy(image, m, 0.0) for m in masks])
