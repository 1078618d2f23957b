"""robustwrap.attack and robustwrap.audit: the adaptive patch attack on defended models.

Tiny models (a 3x3 conv with a spatial max: no mask invariance, so a patch can take over any
view it is visible in), 12x12 images, fixed seeds.
"""

from __future__ import annotations

import json

import pytest
import safetensors.torch
import torch
from conftest import PeakNet, ViewCounter
from torch import nn

import robustwrap
from robustwrap.attack import attack, audit, input_bounds
from robustwrap.defenses.smoothing import DerandomizedSmoothing
from robustwrap.geometry import MaskSet

BOUNDS = (-2.0, 2.0)
SIZE, PATCH = 12, 3


def _data(n: int, scale: float = 1.0, seed: int = 1, net: nn.Module | None = None):
    """Random images inside BOUNDS, labelled by the base model (so every image is clean-correct for it)."""
    gen = torch.Generator().manual_seed(seed)
    x = (scale * torch.randn(n, 3, SIZE, SIZE, generator=gen)).clamp(*BOUNDS)
    with torch.no_grad():
        y = (net or PeakNet()).eval()(x).argmax(1)
    return x, y


class LocalNet(nn.Module):
    """Local logits of a 3x3 conv without padding: a PatchGuard base model (r = 3, s = 1, o = 0)."""

    receptive_field, feature_stride, feature_offset = 3, 1, 0

    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        return self.conv(x)


class ShortDeltaSmoothing(DerandomizedSmoothing):
    """A deliberately broken certificate: one view fewer than a patch can really meet."""

    @property
    def delta(self) -> int:
        return super().delta - 1


def _smoothing(net=None):
    return robustwrap.wrap((net or PeakNet()).eval(), patch=PATCH, defense="smoothing", size=3, image_size=SIZE).eval()


def _patchguard(patch=PATCH):
    return robustwrap.wrap(LocalNet().eval(), patch=patch, defense="patchguard", image_size=SIZE).eval()


def _patchcleanser(net=None):
    return robustwrap.wrap((net or PeakNet()).eval(), patch=PATCH, image_size=SIZE, num_masks=3).eval()


def _inside(loc, shape=(PATCH, PATCH)):
    """`(B, H, W)` bool: the patch box of each image."""
    box = torch.zeros(loc.shape[0], SIZE, SIZE, dtype=torch.bool)
    for b, (top, left) in enumerate(loc.tolist()):
        box[b, top : top + shape[0], left : left + shape[1]] = True
    return box


# ------------------------------------------------------------------------------ the attack itself
def test_attack_flips_most_uncertified_and_beats_the_defense_less_than_the_base():
    net = PeakNet().eval()
    model = _patchcleanser(net)
    x, y = _data(24, net=net)
    cert = model.certify(x, y)
    target = (cert.prediction == y) & ~cert.certified
    assert int(target.sum()) >= 10  # the test means something
    defended = attack(
        model, x, y, steps=20, locations=("guided", 6), bounds=BOUNDS, generator=torch.Generator().manual_seed(0), progress=False
    )
    base = attack(
        net, x, y, patch=PATCH, steps=20, locations=("random", 6), bounds=BOUNDS, generator=torch.Generator().manual_seed(0), progress=False
    )
    assert float(defended.success[target].float().mean()) >= 0.8
    assert not bool((defended.success & cert.certified).any())
    assert int(base.success.sum()) > int(defended.success.sum())
    # success and prediction are the exact defended prediction of x_adv
    assert torch.equal(model.predict(defended.x_adv), defended.prediction)
    assert torch.equal(defended.success, defended.prediction != y)
    assert torch.equal(net(base.x_adv).argmax(1), base.prediction)


def test_x_adv_differs_only_inside_the_patch_box_and_within_bounds():
    model = _patchcleanser()
    x, y = _data(6)
    low, high = -1.5, 1.25
    result = attack(model, x, y, steps=5, locations=4, bounds=(low, high), generator=torch.Generator().manual_seed(0), progress=False)
    box = _inside(result.location)
    changed = (result.x_adv != x).any(1)
    assert not bool((changed & ~box).any())
    for b, (top, left) in enumerate(result.location.tolist()):
        assert torch.equal(result.x_adv[b, :, top : top + PATCH, left : left + PATCH], result.patch[b])
    assert float(result.patch.min()) >= low and float(result.patch.max()) <= high
    assert result.patch.shape == (6, 3, PATCH, PATCH)


def test_targeted_attack_reaches_the_target():
    net = PeakNet().eval()
    model = _patchcleanser(net)
    x, y = _data(8, net=net)
    cert = model.certify(x, y)
    target = (y + 1) % 4
    result = attack(
        model,
        x,
        y,
        steps=20,
        locations=("guided", 4),
        targeted=target,
        bounds=BOUNDS,
        generator=torch.Generator().manual_seed(0),
        progress=False,
    )
    assert torch.equal(result.success, result.prediction == target)
    assert int(result.success.sum()) >= 1
    assert not bool((result.success & cert.certified).any())


def test_forward_passes_are_counted_and_the_surrogate_is_a_fraction_of_every_view():
    model = _patchcleanser()
    x, y = _data(4)
    counter = ViewCounter(model.model)
    result = attack(model, x, y, steps=6, locations=2, bounds=BOUNDS, generator=torch.Generator().manual_seed(0), progress=False)
    counter.remove()
    assert result.forward_passes == counter.calls
    assert result.num_views == counter.images
    assert result.naive_views_per_step == 9 * 10 // 2  # K(K+1)/2 views, K = 9
    assert 0 < result.views_per_step < result.naive_views_per_step / 2


def test_locations_kinds():
    model = _patchcleanser()
    x, y = _data(3, scale=0.0)  # blank images: nothing to flip easily, every run is tried

    def gen():
        return torch.Generator().manual_seed(0)

    kwargs = {"steps": 1, "bounds": BOUNDS, "progress": False}
    positions = [(0, 0), (9, 9), (4, 5)]
    result = attack(model, x, y, locations=positions, generator=gen(), **kwargs)
    assert all(tuple(loc) in positions for loc in result.location.tolist())
    per_image = torch.tensor([[[2, 3]], [[0, 9]], [[9, 0]]])
    result = attack(model, x, y, locations=per_image, generator=gen(), **kwargs)
    assert result.location.tolist() == [[2, 3], [0, 9], [9, 0]]
    result = attack(model, x, y, locations=("grid", 9), generator=gen(), **kwargs)
    assert all(t in (0, 9) and l in (0, 9) for t, l in result.location.tolist())
    one = attack(model, x, y, locations=1, generator=gen(), **kwargs)
    assert one.objective_steps <= 3  # one run of one step per image (none if its random start already won)


def test_all_locations_on_certified_images_tries_every_position_and_never_succeeds():
    net = PeakNet().eval()
    model = _patchcleanser(net)
    x, y = _data(16, scale=0.3, net=net)
    certified = model.certify(x, y).certified
    assert int(certified.sum()) >= 2
    x, y = x[certified], y[certified]
    result = attack(model, x, y, steps=3, locations="all", bounds=BOUNDS, generator=torch.Generator().manual_seed(0), progress=False)
    assert not bool(result.success.any())
    assert result.objective_steps == x.shape[0] * (SIZE - PATCH + 1) ** 2 * 3


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"locations": "everywhere"}, "locations"),
        ({"locations": ("grid", 0)}, "grid stride"),
        ({"locations": [(11, 0)]}, "inside the 12x12"),
        ({"steps": 0}, "steps"),
        ({"step_size": 2.0}, "step_size"),
        ({"loss": "hinge"}, "loss"),
        ({"patch": 13}, "larger than"),
    ],
)
def test_bad_arguments_raise_before_any_forward_pass(kwargs, match):
    model = _patchcleanser()
    x, y = _data(2)
    counter = ViewCounter(model.model)
    with pytest.raises((ValueError, TypeError), match=match):
        attack(model, x, y, **{"bounds": BOUNDS, "progress": False, **kwargs})
    counter.remove()
    assert counter.calls == 0


def test_bounds_come_from_the_timm_mean_and_std_else_are_required():
    model = _patchcleanser()
    x, y = _data(2)
    with pytest.raises(ValueError, match="bounds is required"):
        attack(model, x, y, progress=False)
    with pytest.raises(ValueError, match="patch is required"):
        attack(model.model, x, y, bounds=BOUNDS, progress=False)
    net = PeakNet(in_chans=3)
    net.pretrained_cfg = {"mean": (0.5, 0.25, 0.0), "std": (0.5, 0.25, 1.0)}
    low, high = input_bounds(net, channels=3)
    assert low.tolist() == [-1.0, -1.0, 0.0] and high.tolist() == [1.0, 3.0, 1.0]


# ---------------------------------------------------------------------------------------- audit
def _broken_patchcleanser(net):
    """The 3x3 mask set with its centre mask removed: patches around the centre are hidden by no mask."""
    sound = _patchcleanser(net).mask_set
    broken = MaskSet(sound.image_size, sound.boxes[:4] + sound.boxes[5:], patch_sizes=())  # skips the covering check
    return robustwrap.wrap(net, mask_set=broken).eval()


def test_audit_of_a_sound_certificate_finds_nothing():
    net = PeakNet().eval()
    model = _patchcleanser(net)
    x, y = _data(16, scale=0.3, net=net)
    report = audit(model, (x, y), steps=5, budget=10**6, bounds=BOUNDS, progress=False)
    assert report.ok and report.findings == []
    assert report.certified_accuracy > 0
    assert report.empirical_accuracy >= report.certified_accuracy
    assert all(r.positions == (SIZE - PATCH + 1) ** 2 for r in report.records if r.certified)  # every position fit the budget
    summary = report.summary()
    assert "certified accuracy" in summary and "empirical robust accuracy" in summary and "OK" in summary


def test_audit_catches_a_mask_set_that_no_longer_covers(tmp_path):
    net = PeakNet().eval()
    model = _broken_patchcleanser(net)
    x, y = _data(16, scale=0.3, net=net)
    report = audit(model, (x, y), patch=PATCH, steps=10, budget=10**6, bounds=BOUNDS, output=tmp_path, progress=False)
    assert not report.ok
    assert report.empirical_accuracy < report.certified_accuracy
    boxes = torch.tensor(model.mask_set.boxes)
    for finding in report.findings:
        image = x[finding.index]
        assert bool(model.certify(image[None], y[finding.index : finding.index + 1]).certified[0])
        saved = safetensors.torch.load_file(f"{tmp_path}/finding-{finding.index}.safetensors")
        assert torch.equal(saved["image"], image)
        assert int(model.predict(saved["x_adv"][None])[0]) == finding.adversarial_prediction != finding.label
        meta = json.loads((tmp_path / f"finding-{finding.index}.json").read_text())
        assert meta["location"] == list(finding.location) and meta["label"] == finding.label
        # the patch sits where no mask of the broken set hides it
        top, left = finding.location
        hidden = (
            (boxes[:, 0] <= top)
            & (boxes[:, 1] <= left)
            & (boxes[:, 0] + boxes[:, 2] >= top + PATCH)
            & (boxes[:, 1] + boxes[:, 3] >= left + PATCH)
        )
        assert not bool(hidden.any())
    assert "FAILED" in report.summary()
    saved = report.save(tmp_path / "audit.json")
    assert json.loads(saved.read_text())["ok"] is False


# ------------------------------------------------------------------- smoothing and PatchGuard
BUILDERS = {"patchcleanser": _patchcleanser, "smoothing": _smoothing, "patchguard": _patchguard}


@pytest.mark.parametrize("defense", ["smoothing", "patchguard"])
def test_certified_images_of_each_defense_are_never_flipped_at_any_position(defense):
    model = BUILDERS[defense]()
    x, _ = _data(16, scale=0.3, seed=3)
    y = model.predict(x)
    result = model.certify(x, y)
    assert int(result.certified.sum()) >= 2
    x, y = x[result.certified], y[result.certified]
    attacked = attack(model, x, y, steps=4, locations="all", bounds=BOUNDS, generator=torch.Generator().manual_seed(0), progress=False)
    assert not bool(attacked.success.any())
    assert torch.equal(model.predict(attacked.x_adv), y)


@pytest.mark.parametrize("defense", ["smoothing", "patchguard"])
def test_the_attack_works_on_each_defense(defense):
    """Some uncertified images flip; the surrogate sees only the views a patch can change."""
    model = BUILDERS[defense]()
    x, _ = _data(16, seed=3)
    y = model.predict(x)
    cert = model.certify(x, y)
    result = attack(
        model, x, y, steps=10, locations=("guided", 4), bounds=BOUNDS, generator=torch.Generator().manual_seed(0), progress=False
    )
    assert int(result.success.sum()) >= 4
    assert not bool((result.success & cert.certified).any())
    assert torch.equal(result.success, model.predict(result.x_adv) != y)
    if defense == "smoothing":
        assert result.naive_views_per_step == 12 and result.views_per_step <= model.delta  # Δ of V views
    else:
        assert result.views_per_step == 1.0


def test_audit_catches_smoothing_with_delta_one_short():
    net = PeakNet().eval()
    model = _smoothing(net)
    x, _ = _data(16, scale=0.3, seed=3)
    y = model.predict(x)
    assert audit(model, (x, y), steps=5, bounds=BOUNDS, progress=False).ok
    model.__class__ = ShortDeltaSmoothing
    report = audit(model, (x, y), steps=5, bounds=BOUNDS, progress=False)
    assert not report.ok
    for finding in report.findings:
        assert bool(model.certify(x[finding.index][None], y[finding.index : finding.index + 1]).certified[0])


def test_audit_catches_patchguard_with_a_window_one_smaller():
    sound, broken = _patchguard(), _patchguard(patch=PATCH - 1)
    assert broken.window == (sound.window[0] - 1, sound.window[1] - 1)
    x, _ = _data(16, scale=0.3, seed=1)
    y = sound.predict(x)
    assert audit(sound, (x, y), steps=5, bounds=BOUNDS, progress=False).ok
    report = audit(broken, (x, y), patch=PATCH, steps=5, bounds=BOUNDS, progress=False)
    assert not report.ok
    for finding in report.findings:
        assert bool(broken.certify(x[finding.index][None], y[finding.index : finding.index + 1]).certified[0])
        assert (
            int(broken.predict(_paste(x[finding.index], finding.patch, finding.location)))
            == finding.adversarial_prediction
            != finding.label
        )


def _paste(image, patch, location):
    top, left = location
    out = image.clone()[None]
    out[0, :, top : top + patch.shape[1], left : left + patch.shape[2]] = patch
    return out


class _Linear(nn.Module):
    """Two classes, linear in the pixels, class 0 ahead by a bias no 3x3 patch can overcome."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(0.05 * torch.randn(2, 64, generator=torch.Generator().manual_seed(3)))
        self.bias = nn.Parameter(torch.tensor([6.0, 0.0]))

    def forward(self, x):
        return x.flatten(1) @ self.weight.T + self.bias


def test_a_failed_attack_returns_the_run_whose_loss_ended_lowest():
    """On a linear model one full-range signed step takes every patch to the same corner of the
    input box whatever its random start, so each location's final loss is known in closed form;
    the attack fails everywhere and must return the location whose loss is lowest."""
    net = _Linear()
    x, y = torch.rand(1, 1, 8, 8, generator=torch.Generator().manual_seed(4)), torch.tensor([0])
    locations = [(0, 0), (0, 5), (2, 3), (5, 0), (5, 5), (3, 1)]
    toward_1 = (net.weight[1] - net.weight[0]).detach().view(8, 8) > 0  # the sign of -CE's descent direction
    losses = []
    for top, left in locations:
        z = x.clone()
        z[0, 0, top : top + 3, left : left + 3] = toward_1[top : top + 3, left : left + 3].float()
        with torch.no_grad():
            losses.append(float(-torch.nn.functional.cross_entropy(net(z), y)))
    assert len(set(losses)) == len(losses)  # one lowest
    result = attack(net, x, y, patch=3, steps=2, step_size=1.0, restarts=1, locations=locations, loss="ce", bounds=(0.0, 1.0), progress=False)
    assert not result.success.any()
    best = locations[losses.index(min(losses))]
    assert tuple(result.location[0].tolist()) == best
    assert torch.equal(result.patch[0, 0], toward_1[best[0] : best[0] + 3, best[1] : best[1] + 3].float())
