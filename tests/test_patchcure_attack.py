"""robustwrap.attack and robustwrap.audit on PatchCURE: the feature-view surrogate and the audit of its certificate.

Tiny models (16x16 images of 4x4-pixel cells), fixed seeds. The surrogate's footprint of a patch
(the cells it reaches) is compared with the cells listed one by one from the declared geometry;
certified images are attacked at every position and searched by brute force.
"""

from __future__ import annotations

import itertools

import pytest
import timm
import torch
from torch import nn

import robustwrap
from robustwrap.attack import OBJECTIVES, attack, audit
from robustwrap.defenses import patchcure
from robustwrap.geometry import MaskSet

BOUNDS = (-2.0, 2.0)
SIZE, PATCH = 16, 3


class PaddedSRF(nn.Module):
    """Features of 6x6 pixel windows at stride 4, padded by 1: cell a sees rows [4a - 1, 4a + 5)."""

    receptive_field, feature_stride, feature_offset = 6, 4, 1

    def __init__(self, dim: int = 6, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Conv2d(3, dim, 6, stride=4, padding=1)

    def forward(self, x):
        return torch.relu(self.embed(x))


class BlockSRF(nn.Module):
    """Features of non-overlapping 4x4 pixel blocks (r = s = 4, o = 0)."""

    receptive_field, feature_stride, feature_offset = 4, 4, 0

    def __init__(self, dim: int = 6, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Conv2d(3, dim, 4, stride=4)

    def forward(self, x):
        return torch.relu(self.embed(x))


class MaxLRF(nn.Module):
    """A 3x3 convolution over the grid and a spatial max: a patch's cells can take over any view they are kept in."""

    def __init__(self, dim: int = 6, num_classes: int = 4, seed: int = 1):
        super().__init__()
        torch.manual_seed(seed)
        self.conv = nn.Conv2d(dim, num_classes, 3, padding=1)
        self.num_classes = num_classes

    def forward(self, features, kept):
        return self.conv(features).amax((2, 3))


class LocalLogits(nn.Module):
    """Local logits of 4x4 pixel blocks, class 0 favoured by a bias per cell."""

    receptive_field, feature_stride, feature_offset = 4, 4, 0

    def __init__(self, seed: int = 2):
        super().__init__()
        torch.manual_seed(seed)
        self.conv = nn.Conv2d(3, 3, 4, stride=4)
        with torch.no_grad():
            self.conv.bias.copy_(torch.tensor([0.2, 0.0, 0.0]))
        self.num_classes = 3

    def forward(self, x):
        return self.conv(x)


def _pair(srf=None):
    return robustwrap.PatchCURE(srf or BlockSRF(), MaxLRF(), patch=PATCH, image_size=SIZE).eval()


def _local():
    return robustwrap.wrap(LocalLogits(), patch=PATCH, defense="patchcure", image_size=SIZE).eval()


def _vit():
    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", img_size=SIZE, patch_size=4, depth=2, embed_dim=12, num_heads=2, num_classes=4)
    return robustwrap.wrap(vit.eval(), patch=PATCH, defense="patchcure", window=(1, 1), split=1, margin=0.0).eval()


def _data(model, n: int, scale: float, seed: int):
    x = (scale * torch.randn(n, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))).clamp(*BOUNDS)
    return x, model.predict(x)


def _brute_force(model, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """`(B,)` bool: a patch of extreme or random content at some position changes the robust prediction."""
    gen = torch.Generator().manual_seed(9)
    contents = [torch.full((3, PATCH, PATCH), v) for v in BOUNDS] + [torch.rand(3, PATCH, PATCH, generator=gen) * 4 - 2 for _ in range(2)]
    broken = torch.zeros(x.shape[0], dtype=torch.bool)
    for b in range(x.shape[0]):
        views = []
        for top, left, content in itertools.product(range(SIZE - PATCH + 1), range(SIZE - PATCH + 1), contents):
            view = x[b].clone()
            view[:, top : top + PATCH, left : left + PATCH] = content
            views.append(view)
        broken[b] = bool((torch.cat([model.predict(v) for v in torch.stack(views).split(256)]) != y[b]).any())
    return broken


# --------------------------------------------------------------------------------- the surrogate
@pytest.mark.parametrize("srf", [BlockSRF, PaddedSRF])
def test_the_footprint_is_the_cells_the_patch_reaches_at_every_position(srf):
    model = _pair(srf())
    x, y = _data(model, 1, 1.0, 0)
    objective = OBJECTIVES["patchcure"](model, x, y, y, False, model.patch, "margin")
    r, s, o = (getattr(model.srf, name) for name in ("receptive_field", "feature_stride", "feature_offset"))
    grid = model.feature_mask_set.image_size
    positions = torch.tensor(list(itertools.product(range(SIZE - PATCH + 1), repeat=2)))
    corner, size = objective._footprint(positions)
    for (top, left), c, z in zip(positions.tolist(), corner.tolist(), size.tolist()):
        cells = [[a for a in range(n) if s * a - o < start + PATCH and s * a - o + r > start] for start, n in zip((top, left), grid)]
        assert (c, z) == ([cells[0][0], cells[1][0]], [len(cells[0]), len(cells[1])])


@pytest.mark.parametrize("build,flips", [(_pair, 10), (_local, 8), (_vit, 1)], ids=["pair", "local-logits", "vit-split"])
def test_the_attack_flips_uncertified_images_and_sees_only_the_views_a_patch_reaches(build, flips):
    """Flips where brute force finds them (it flips 11, 10 and 2 of the 12 images), from a fraction of the views."""
    model = build()
    x, y = _data(model, 12, 1.0, 3)
    certified = model.certify(x, y).certified
    result = attack(
        model, x, y, steps=10, locations=("guided", 4), bounds=BOUNDS, generator=torch.Generator().manual_seed(0), progress=False
    )
    assert int(result.success.sum()) >= flips
    assert not bool((result.success & certified).any())
    assert torch.equal(result.success, model.predict(result.x_adv) != y)  # judged by the exact prediction
    assert result.naive_views_per_step == model.full_views and 0 < result.views_per_step < model.full_views
    # the SRF runs for every surrogate view, the clean evidence and each exact check
    assert result.num_views > result.objective_views > 0 and result.forward_passes > 0


# ----------------------------------------------------------------------------------- the audit
@pytest.mark.filterwarnings("ignore:images reach")
@pytest.mark.parametrize("build", [_pair, _local, _vit], ids=["pair", "local-logits", "vit-split"])
def test_certified_images_are_never_flipped_by_the_attack_at_every_position_nor_by_brute_force(build):
    model = build()
    x, y = _data(model, 12, 0.3, 4)
    certified = model.certify(x, y).certified
    assert int(certified.sum()) >= 2
    x, y = x[certified], y[certified]
    attacked = attack(model, x, y, steps=4, locations="all", bounds=BOUNDS, generator=torch.Generator().manual_seed(0), progress=False)
    assert not bool(attacked.success.any()) and torch.equal(model.predict(attacked.x_adv), y)
    assert not bool(_brute_force(model, x, y).any())
    report = audit(model, (x, y), steps=4, budget=10**6, bounds=BOUNDS, progress=False)
    assert report.ok and report.defense == "patchcure" and report.empirical_accuracy >= report.certified_accuracy == 1.0


def test_the_audit_catches_a_feature_mask_set_that_misses_patches_across_two_cells(monkeypatch, tmp_path):
    model = _pair()
    x, y = _data(model, 16, 0.3, 5)
    # Masks of one cell miss every patch that straddles two cells: the certificate is wrong.
    monkeypatch.setattr(patchcure, "_cell_masks", lambda grid, window, stride: MaskSet.rect(grid, (1, 1), stride=stride))
    certified = model.certify(x, y).certified
    assert bool((_brute_force(model, x, y) & certified).any())
    report = audit(model, (x, y), steps=10, budget=10**6, bounds=BOUNDS, output=tmp_path, progress=False)
    assert not report.ok and report.findings
    for finding in report.findings:
        assert bool(certified[finding.index]) and finding.adversarial_prediction != finding.label
        assert (tmp_path / f"finding-{finding.index}.json").is_file()
