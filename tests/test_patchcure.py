"""PatchCURE: double masking on the feature grid of a small-receptive-field model.

Every view label is compared with an independent reference built here (masked features through
the LRF, or float64 sums of local logits, one view at a time by slicing), the rule with
`conftest.brute_force_decide`, and the certificate with a patch search over every position.
"""

from __future__ import annotations

import itertools
import sys
import types

import pytest
import timm
import torch
from conftest import ViewCounter, brute_force_certified, brute_force_decide
from torch import nn

import robustwrap
import robustwrap.models
from robustwrap._args import as_pair
from robustwrap.defenses import patchcleanser, patchcure
from robustwrap.defenses.patchcure import PatchCURE, PatchCUREResult, SplitModel
from robustwrap.geometry import MaskSet
from robustwrap.models import check_receptive_field
from robustwrap.views import auto_batch_size


# ------------------------------------------------------------------------------- toy models
class PatchSRF(nn.Module):
    """Features of non-overlapping 4x4 pixel blocks: cell (a, b) sees rows [4a, 4a + 4) (r = s = 4, o = 0)."""

    receptive_field, feature_stride, feature_offset = 4, 4, 0

    def __init__(self, in_chans: int = 1, dim: int = 6, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Conv2d(in_chans, dim, 4, stride=4)
        self.mix = nn.Conv2d(dim, dim, 1)

    def forward(self, x):
        return self.mix(torch.relu(self.embed(x)))


class GlobalLRF(nn.Module):
    """Sees the whole grid (3x3 convolution, spatial max) and reads `kept` (the share of cells kept)."""

    def __init__(self, dim: int = 6, num_classes: int = 4, seed: int = 10):
        super().__init__()
        torch.manual_seed(seed)
        self.conv = nn.Conv2d(dim, num_classes, 3, padding=1)
        self.kept_weight = nn.Parameter(torch.randn(num_classes))
        self.num_classes = num_classes

    def forward(self, features, kept):
        return self.conv(features).amax((2, 3)) + kept.float().mean((1, 2))[:, None] * self.kept_weight


class LocalLogits(nn.Module):
    """Local logits of 4x4 pixel blocks, linear in the pixels: an extreme patch writes extreme evidence.

    Class 0 gets `bias` per cell, so clean images of small pixels all show class 0 by a margin
    that grows with `bias`: some certify, a patch can flip the others.
    """

    receptive_field, feature_stride, feature_offset = 4, 4, 0

    def __init__(self, num_classes: int = 3, bias: float = 0.3, seed: int = 2):
        super().__init__()
        torch.manual_seed(seed)
        self.conv = nn.Conv2d(1, num_classes, 4, stride=4)
        with torch.no_grad():
            self.conv.bias.copy_(torch.tensor([bias] + [0.0] * (num_classes - 1)))
        self.num_classes = num_classes

    def forward(self, x):
        return self.conv(x)


class SumLRF(nn.Module):
    """A linear read-out of the features summed over the grid (+ class 0 evidence per kept cell)."""

    def __init__(self, dim: int = 6, num_classes: int = 3, seed: int = 3):
        super().__init__()
        torch.manual_seed(seed)
        self.head = nn.Linear(dim, num_classes)
        self.num_classes = num_classes

    def forward(self, features, kept):
        return self.head(features.sum((2, 3))) + 0.2 * kept.sum((1, 2))[:, None] * torch.tensor([1.0, 0.0, 0.0])


def _pair(**kwargs) -> PatchCURE:
    return robustwrap.PatchCURE(
        PatchSRF(), GlobalLRF(), patch=kwargs.pop("patch", 3), image_size=kwargs.pop("image_size", 16), **kwargs
    ).eval()


# ------------------------------------------------------------------------------- references
def _cell_boxes(model: PatchCURE) -> list[tuple[int, int, int, int]]:
    return list(model.feature_mask_set.boxes)


def _kept(grid: tuple[int, int], boxes) -> torch.Tensor:
    """`(h, w)` bool, False inside every box, by slicing."""
    kept = torch.ones(grid, dtype=torch.bool)
    for top, left, bh, bw in boxes:
        kept[top : top + bh, left : left + bw] = False
    return kept


@torch.no_grad()
def _reference_grid(model: PatchCURE, x: torch.Tensor, srf: nn.Module, lrf: nn.Module | None) -> torch.Tensor:
    """Every `P_ij` `(B, K, K)`, one view at a time: masked features through the LRF, or float64 sums of the local logits."""
    boxes = _cell_boxes(model)
    k = len(boxes)
    labels = torch.empty(x.shape[0], k, k, dtype=torch.long)
    for b in range(x.shape[0]):
        features = srf(x[b : b + 1])
        grid = tuple(features.shape[2:])
        for i, j in itertools.product(range(k), range(k)):
            kept = _kept(grid, [boxes[i], boxes[j]])
            if lrf is None:
                logits = (features[0].double() * kept).sum((1, 2))[None]
            else:
                logits = lrf(features * kept, kept[None])
            labels[b, i, j] = logits.argmax(1)[0]
    return labels


def _check_against_reference(model: PatchCURE, x: torch.Tensor, y: torch.Tensor, srf: nn.Module, lrf: nn.Module | None) -> dict[str, int]:
    """Mismatches between the defense and the references: views, predictions, cases, certificates."""
    reference = _reference_grid(model, x, srf, lrf)
    full = model.certify(x, y, early_exit=False)
    fast = model.certify(x, y)
    mismatches = {"views": int((full.grid != reference).sum()), "prediction": 0, "case": 0, "certified": 0, "early_exit": 0}
    k = reference.shape[1]
    predicted = model.predict(x)
    for b in range(x.shape[0]):
        grid = reference[b].tolist()
        one = [grid[i][i] for i in range(k)]
        label, case = brute_force_decide(one, grid)
        mismatches["prediction"] += (
            int(label != int(predicted[b])) + int(label != int(full.prediction[b])) + int(label != int(fast.prediction[b]))
        )
        mismatches["case"] += int(case != int(full.case[b]))
        mismatches["certified"] += int(brute_force_certified(grid, int(y[b])) != bool(full.certified[b]))
    mismatches["early_exit"] = int((fast.certified != full.certified).sum())
    return mismatches


def _patch_search(predict, x: torch.Tensor, p: int) -> torch.Tensor:
    """`(B,)` bool: some patch (every position, extreme and random contents) changes the prediction."""
    b, c, h, w = x.shape
    gen = torch.Generator().manual_seed(9)
    big = 100.0
    contents = [
        torch.full((c, p, p), big),
        torch.full((c, p, p), -big),
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
        predictions = torch.cat([predict(v) for v in torch.stack(views).split(256)])
        broken[i] = bool((predictions != clean[i]).any())
    return broken


def _cells_touched(model: PatchCURE, top: int, left: int) -> tuple[range, range]:
    """The cells a patch at `(top, left)` can change, from the declared geometry (rows, columns)."""
    r, s, o = (as_pair(getattr(model.srf, n), n) for n in ("receptive_field", "feature_stride", "feature_offset"))
    (ph, pw), (gh, gw) = model.patch, model.feature_mask_set.image_size

    def touched(axis: int, start: int, p: int, n: int) -> range:
        cells = [a for a in range(n) if s[axis] * a - o[axis] < start + p and s[axis] * a - o[axis] + r[axis] > start]
        return range(min(cells), max(cells) + 1)

    return touched(0, top, ph, gh), touched(1, left, pw, gw)


def _uncovered_positions(model: PatchCURE) -> int:
    """Patch positions whose touched cells lie inside no feature mask (proof obligation P2)."""
    (h, w), (ph, pw) = model.image_size, model.patch
    missing = 0
    for top, left in itertools.product(range(h - ph + 1), range(w - pw + 1)):
        rows, cols = _cells_touched(model, top, left)
        inside = any(t <= rows[0] and rows[-1] < t + bh and c <= cols[0] and cols[-1] < c + bw for t, c, bh, bw in _cell_boxes(model))
        missing += not inside
    return missing


# ------------------------------------------------------------------------------- exactness
def test_every_view_of_a_pair_equals_masked_features_through_the_lrf():
    model = _pair(margin=0.0)
    x = torch.randn(40, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    y = torch.arange(40) % 4
    mismatches = _check_against_reference(model, x, y, model.srf, model.lrf)
    assert mismatches == {"views": 0, "prediction": 0, "case": 0, "certified": 0, "early_exit": 0}
    result = model.certify(x, y, early_exit=False)
    assert isinstance(result, PatchCUREResult)
    assert set(result.case.tolist()) == {1, 2, 3}  # every case of the rule is exercised
    assert torch.equal(result.srf_passes, torch.ones(40, dtype=torch.long))
    assert result.num_views.tolist() == [model.full_views] * 40  # every view i <= j once
    assert torch.equal(model(x).argmax(1), model.predict(x))


def test_every_view_of_a_pair_at_a_mask_stride_and_rectangle():
    model = _pair(patch=(3, 6), image_size=(16, 24), mask_stride=2, margin=0.0)
    assert model.feature_mask_set.mask_size == (3, 4)  # window (2, 3) cells + stride 2 - 1
    x = torch.randn(6, 1, 16, 24, generator=torch.Generator().manual_seed(1))
    assert _check_against_reference(model, x, torch.arange(6) % 4, model.srf, model.lrf)["views"] == 0
    assert _uncovered_positions(model) == 0


def test_wrong_majority_is_caught_by_the_reference(monkeypatch):
    model = _pair(margin=0.0)
    x = torch.randn(40, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    y = torch.arange(40) % 4

    monkeypatch.setattr(patchcleanser, "majority", lambda one_mask: one_mask[:, 0])  # the first mask's label, not the most frequent
    assert _check_against_reference(model, x, y, model.srf, model.lrf)["prediction"] > 0


def test_srf_only_certificates_equal_float64_sums_of_bagnet_local_logits():
    torch.manual_seed(0)
    bagnet = timm.create_model("bagnet_tiny", num_classes=4, in_chans=1).eval()
    report = check_receptive_field(bagnet, 16)
    assert report.ok
    with torch.no_grad():
        bagnet.fc.bias.copy_(torch.tensor([0.0, 0.0, 0.0, 0.18]))  # some images certify, others not
    model = robustwrap.wrap(bagnet, patch=3, defense="patchcure", image_size=16, margin=0.0).eval()
    assert model.lrf is None and model.srf is bagnet
    x = torch.randn(10, 1, 16, 16, generator=torch.Generator().manual_seed(3))
    y = model.predict(x)
    mismatches = _check_against_reference(model, x, y, bagnet, None)
    assert mismatches == {"views": 0, "prediction": 0, "case": 0, "certified": 0, "early_exit": 0}
    full = model.certify(x, y, early_exit=False)
    assert 0 < int(full.certified.sum()) < 10
    # Robust logits of a Case I image: the float64 mean of its one-mask sums (up to the inference copy's folded BatchNorm).
    logits = model(x)
    assert logits.dtype == torch.float64
    local = bagnet(x).double()
    for b in (full.case == 1).nonzero()[:, 0].tolist():
        sums = torch.stack([(local[b] * _kept(local.shape[2:], [box])).sum((1, 2)) for box in _cell_boxes(model)])
        assert torch.allclose(logits[b], sums.mean(0), rtol=1e-5, atol=1e-5)
    assert model.predict_vanilla(x).tolist() == bagnet(x).double().sum((2, 3)).argmax(1).tolist()


# ------------------------------------------------------------------------------- soundness
@pytest.mark.filterwarnings("ignore:images reach")  # the search's extreme patches are meant to be out of range
def test_certified_images_survive_every_patch_and_a_mask_set_that_does_not_cover_fails(monkeypatch):
    torch.manual_seed(0)
    model = robustwrap.wrap(LocalLogits(bias=0.2), patch=3, defense="patchcure", image_size=16).eval()
    x = torch.randn(10, 1, 16, 16, generator=torch.Generator().manual_seed(4)) * 0.5
    y = torch.zeros(10, dtype=torch.long)
    assert model.feature_window == (2, 2) and _uncovered_positions(model) == 0
    result = model.certify(x, y)
    assert 0 < int(result.certified.sum()) < 10
    assert not bool((_patch_search(model.predict, x, 3) & result.certified).any())

    # The same test with masks of one cell (they miss patches that straddle two cells) finds flips.
    monkeypatch.setattr(patchcure, "_cell_masks", lambda grid, window, stride: MaskSet.rect(grid, (1, 1), stride=stride))
    assert _uncovered_positions(model) > 0
    broken = model.certify(x, y)
    assert bool((_patch_search(model.predict, x, 3) & broken.certified).any())


@pytest.mark.filterwarnings("ignore:images reach")
def test_certified_images_of_a_pair_survive_every_patch():
    model = robustwrap.PatchCURE(PatchSRF(), SumLRF(), patch=3, image_size=16).eval()
    x = torch.randn(8, 1, 16, 16, generator=torch.Generator().manual_seed(5))
    y = torch.zeros(8, dtype=torch.long)
    result = model.certify(x, y)
    assert 0 < int(result.certified.sum()) < 8
    assert not bool((_patch_search(model.predict, x, 3) & result.certified).any())


# ------------------------------------------------------------------------------- locality (P1)
class LeakySRF(PatchSRF):
    """Declares 4x4 cells but adds the image mean to every cell: not local."""

    def forward(self, x):
        return super().forward(x) + x.mean((1, 2, 3))[:, None, None, None]


def test_an_srf_that_is_not_local_is_refused_at_wrap():
    with pytest.raises(ValueError, match="outside its declared receptive field"):
        robustwrap.PatchCURE(LeakySRF(), GlobalLRF(), patch=3, image_size=16)


def test_a_declared_geometry_that_does_not_fit_the_grid_is_refused():
    srf = PatchSRF()
    srf.feature_stride = 8  # the last of 4 cells would start at 24, outside 16 rows
    with pytest.raises(ValueError, match="declared geometry"):
        robustwrap.PatchCURE(srf, GlobalLRF(), patch=3, image_size=16)

    class Undeclared(nn.Module):
        def forward(self, x):
            return x[:, :, ::4, ::4]

    with pytest.raises(ValueError, match="receptive_field, feature_stride, feature_offset"):
        robustwrap.PatchCURE(Undeclared(), GlobalLRF(dim=1), patch=3, image_size=16)


def test_a_new_base_model_is_checked_and_refused_without_changing_the_defense():
    model = _pair()
    before = model.model
    with pytest.raises(ValueError, match="outside its declared receptive field"):
        model.model = SplitModel(LeakySRF(), GlobalLRF())
    assert model.model is before


# ------------------------------------------------------------------------------- feature mask set (P2)
def test_feature_mask_set_covers_every_patch_and_describes_cells_and_pixels():
    model = _pair(patch=3, image_size=24)
    assert model.feature_window == (2, 2)
    masks = model.feature_mask_set
    assert masks.image_size == (6, 6) and masks.mask_size == (2, 2) and len(masks) == 25
    assert model.full_views == 25 * 26 // 2
    assert _uncovered_positions(model) == 0
    assert (
        model.describe() == "patch 3x3 px (1.56% of 24x24); 5x5 masks of 2x2 cells (8x8 px) on a 6x6 grid, mask stride 1x1 cells; 325 views"
    )
    model.mask_stride = 3
    assert model.feature_mask_set.mask_size == (4, 4) and model.feature_mask_set.grid == (2, 2)
    assert _uncovered_positions(model) == 0
    assert model.settings()["mask_stride"] == [3, 3]
    # The geometry is the SRF's, read at every use: a wider receptive field widens the window.
    model.mask_stride = 1
    model.srf.receptive_field = 8
    assert model.feature_window == (3, 3) and model.feature_mask_set.mask_size == (3, 3)
    assert _uncovered_positions(model) == 0


def test_a_patch_whose_cells_cover_the_grid_is_refused_and_the_old_patch_kept():
    model = _pair(patch=3)
    with pytest.raises(ValueError, match=r"whole 4x4 feature map \(PatchGuard's local logits, PatchCURE's SRF features"):
        model.patch = 13
    assert model.patch == (3, 3)


# ------------------------------------------------------------------------------- masked cells (P3)
def test_masked_cells_are_zero_whatever_the_image():
    seen = []

    class Spy(GlobalLRF):
        def forward(self, features, kept):
            seen.append((features.clone(), kept.clone()))
            return super().forward(features, kept)

    model = robustwrap.PatchCURE(PatchSRF(), Spy(), patch=3, image_size=16).eval()
    model.predict(torch.randn(2, 1, 16, 16) * 10)
    features = torch.cat([f for f, _ in seen[1:]])  # seen[0] is the blank probe at wrap
    kept = torch.cat([k for _, k in seen[1:]])
    assert (~kept).any() and bool((features.permute(0, 2, 3, 1)[~kept] == 0).all())


# ------------------------------------------------------------------------------- memory
def test_srf_only_sums_are_chunked_by_a_count_of_numbers_per_pass(monkeypatch):
    budget = 4 * (3 + 4 * 4)  # four views of 3 classes on a 4x4 grid: their kept cells and sums
    monkeypatch.setattr(patchcure, "_SUM_ELEMENTS", budget)
    passes = []
    original = patchcure._LocalSums.run

    def counted(self, x, image, i, j, fill=None):
        out = original(self, x, image, i, j, fill)
        passes.append(image.numel() * (x.shape[2] * x.shape[3]) + out.numel())  # kept cells + sums held at once
        return out

    monkeypatch.setattr(patchcure._LocalSums, "run", counted)
    model = robustwrap.wrap(LocalLogits(), patch=3, defense="patchcure", image_size=16).eval()
    x = torch.randn(3, 1, 16, 16)
    result = model.certify(x, torch.zeros(3, dtype=torch.long), early_exit=False)
    assert max(passes) <= budget  # never more than the budget of float64 numbers at once
    assert len(passes) >= int(result.num_views.sum()) // 4 and sum(passes) == int(result.num_views.sum()) * (16 + 3)
    # BagNet-33 at 224 px: 289 masks, 41,905 views per image, 166 per pass of 1,000 classes on 24x24 cells.
    big = patchcure._cell_masks((24, 24), (8, 8), (1, 1))
    assert len(big) == 289 and len(big) * (len(big) + 1) // 2 == 41905
    assert (1 << 18) // (1000 + 24 * 24) == 166


# ------------------------------------------------------------------------------- settings and user path
def test_an_lrf_of_one_argument_is_refused_with_the_contract():
    with pytest.raises(TypeError, match=r"lrf\(features, kept\)"):
        robustwrap.PatchCURE(PatchSRF(), nn.Sequential(nn.Flatten(), nn.LazyLinear(3)), patch=3, image_size=16)
    with pytest.raises(TypeError, match="nn.Module"):
        robustwrap.PatchCURE(PatchSRF(), lambda f, k: f, patch=3, image_size=16)


def test_options_are_checked_by_name():
    with pytest.raises(ValueError, match="go together"):
        robustwrap.wrap(LocalLogits(), patch=3, defense="patchcure", image_size=16, window=2)
    with pytest.raises(ValueError, match="mask_stride"):
        robustwrap.wrap(LocalLogits(), patch=3, defense="patchcure", image_size=16, mask_stride=0)
    with pytest.raises(ValueError, match="split"):
        robustwrap.wrap(LocalLogits(), patch=3, defense="patchcure", image_size=16, window=2, split=-1)
    with pytest.raises(ValueError, match="window= and split= split a timm ViT"):
        robustwrap.PatchCURE(PatchSRF(), GlobalLRF(), patch=3, image_size=16, window=2, split=1)
    with pytest.raises(AttributeError, match="ViT split"):
        _pair().split = 2


def test_forward_in_train_mode_is_the_undefended_split_model():
    model = _pair()
    x = torch.randn(2, 1, 16, 16)
    robust = model.predict(x)
    model.train()
    kept = torch.ones(2, 4, 4, dtype=torch.bool)
    assert torch.equal(model(x), model.lrf(model.srf(x), kept))
    assert model.predict_vanilla(x).tolist() == model.lrf(model.srf(x), kept).argmax(1).tolist()
    assert torch.equal(model.predict(x), robust) and model.training  # predict is robust in either mode


def test_inference_sets_modes_only_when_needed_and_restores_them(monkeypatch):
    """Issue 24.6: certifying a model in eval mode toggles no module's mode (each toggle walked the
    whole model, once per part: 12% of an SRF-only ViT-Ti certification); from train mode every
    module runs in eval mode and gets its own mode back, a BatchNorm frozen in eval mode included."""
    model = _pair()
    model.model.lrf.frozen = nn.BatchNorm1d(4).eval()
    toggled, train = [], nn.Module.train

    def counting(self, mode=True):
        toggled.append(mode)
        return train(self, mode)

    monkeypatch.setattr(nn.Module, "train", counting)
    x, y = torch.randn(2, 1, 16, 16), torch.tensor([0, 1])
    model.certify(x, y)
    assert toggled == []
    monkeypatch.undo()
    model.train()
    model.model.lrf.frozen.eval()
    seen = []
    original = GlobalLRF.forward
    monkeypatch.setattr(GlobalLRF, "forward", lambda self, f, k: seen.append(self.training) or original(self, f, k))
    model.certify(x, y)
    assert seen and not any(seen)
    assert model.training and model.model.srf.training and model.model.lrf.training and not model.model.lrf.frozen.training


def test_pixel_checks_apply_to_the_images_and_lrf_passes_hold_batch_size_views():
    model = _pair(batch_size=5)
    with pytest.raises(ValueError, match="1 channels"):
        model.predict(torch.randn(2, 3, 16, 16))
    with pytest.raises(ValueError, match="16x16"):
        model.predict(torch.randn(2, 1, 4, 4))  # the grid's size is not the input's
    with pytest.warns(UserWarning, match="0-255"):
        model.predict(torch.rand(1, 1, 16, 16) * 255)
    counter = ViewCounter(model.lrf)
    result = model.certify(torch.randn(3, 1, 16, 16), torch.zeros(3, dtype=torch.long), early_exit=False)
    counter.remove()
    assert counter.images == int(result.num_views.sum()) and counter.images <= 5 * counter.calls
    # Views per pass when not given: as many as images of the input size (never counted in grid cells).
    model.batch_size = None
    assert model.batch_size == auto_batch_size(model.model, (16, 16))


def test_default_margins_and_views_per_pass():
    assert _pair().margin == robustwrap.defenses.base.DEFAULT_MARGIN
    local = robustwrap.wrap(LocalLogits(), patch=3, defense="patchcure", image_size=16)
    assert local.margin == patchcure.DEFAULT_EVIDENCE_MARGIN  # sums of local logits, as PatchGuard's evidence
    assert local.num_classes == 3 and local.in_chans == 1


def test_an_unset_margin_follows_the_structure_and_a_given_one_stays():
    """Assigning split = depth leaves no LRF (sums of local logits): the default margin moves with it, both ways."""
    import timm

    vit = timm.create_model("vit_tiny_patch16_224", img_size=64, patch_size=8, depth=2, num_classes=3)
    model = robustwrap.wrap(vit, defense="patchcure", window=(2, 2), split=1, patch=3)
    assert model.lrf is not None and model.margin == robustwrap.defenses.base.DEFAULT_MARGIN
    model.split = 2
    assert model.lrf is None and model.margin == patchcure.DEFAULT_EVIDENCE_MARGIN == model.settings()["margin"]
    model.split = 1
    assert model.margin == robustwrap.defenses.base.DEFAULT_MARGIN
    model.margin = 0.05
    model.split = 2
    assert model.margin == 0.05  # given: it stays
    given = robustwrap.wrap(vit, defense="patchcure", window=(2, 2), split=2, patch=3, margin=0.002)
    given.split = 1
    assert given.margin == 0.002


def test_settings_round_trip_for_a_pair_and_the_hub_for_a_bagnet(tmp_path):
    pair = _pair(mask_stride=(1, 2), margin=0.01)
    rebuilt = robustwrap.RobustPatchClassifier.from_settings(pair.model, pair.settings())
    assert isinstance(rebuilt, PatchCURE) and rebuilt.settings() == pair.settings()
    with pytest.raises(TypeError, match="cannot save"):
        pair.save_pretrained(tmp_path / "pair")  # a user's pair cannot be rebuilt from a Hub repo

    torch.manual_seed(0)
    bagnet = timm.create_model("bagnet_tiny", num_classes=3)
    model = robustwrap.wrap(bagnet, patch=5, defense="patchcure", mask_stride=2, margin=0.05).eval()
    model.save_pretrained(tmp_path / "bagnet")
    loaded = robustwrap.from_pretrained(str(tmp_path / "bagnet"))
    assert isinstance(loaded, PatchCURE) and loaded.settings() == model.settings()
    assert loaded.settings()["mask_stride"] == [2, 2] and loaded.settings()["split"] is None
    x = torch.randn(3, 1, 32, 32)
    y = model.predict(x)
    assert torch.equal(loaded(x), model(x))
    first, second = model.certify(x, y), loaded.certify(x, y)
    assert torch.equal(first.certified, second.certified) and torch.equal(first.num_views, second.num_views)


def test_certify_dataset_records_feature_views():
    model = _pair()
    x = torch.randn(5, 1, 16, 16)
    data = torch.utils.data.TensorDataset(x, torch.arange(5) % 4)
    report = robustwrap.certify_dataset(model, data, batch_size=2, progress=False)
    assert report.num_images == 5 and report.defense == "patchcure"
    assert all(r.extras["srf_passes"] == 1 for r in report.records)


def test_a_vit_split_asks_split_vit_at_every_call_and_stores_window_and_split(monkeypatch):
    """The ViT side lives in robustwrap.windows (`split_vit`); here a stand-in records its calls."""
    calls = []
    pair = SplitModel(PatchSRF(in_chans=3), GlobalLRF())

    def split_vit(vit, window, split, *, authors=False):
        calls.append((vit, window, split))
        return pair.srf, pair.lrf

    monkeypatch.setitem(sys.modules, "robustwrap.windows", types.SimpleNamespace(split_vit=split_vit))
    vit = timm.create_model("vit_tiny_patch16_224", img_size=16, patch_size=4, depth=2, embed_dim=12, num_heads=2, num_classes=4)
    model = robustwrap.wrap(vit, patch=3, defense="patchcure", window=(1, 1), split=1).eval()
    assert calls[0] == (vit, (1, 1), 1)
    assert model.settings()["window"] == [1, 1] and model.settings()["split"] == 1
    model.split = 2
    assert calls[-1] == (vit, (1, 1), 2) and model.split == 2
    n = len(calls)
    model.predict(torch.randn(2, 3, 16, 16))
    assert len(calls) == n + 1  # split anew for the call
    rebuilt = PatchCURE.from_settings(vit, model.settings())
    assert rebuilt.settings() == model.settings()


# ------------------------------------------------------------------------------- the real ViT split
def _tiny_vit(**kwargs) -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model(
        "vit_tiny_patch16_224", img_size=32, patch_size=4, depth=3, embed_dim=12, num_heads=2, num_classes=4, **kwargs
    ).eval()


@pytest.mark.parametrize("pool,split", [("token", 1), ("avg", 2), ("token", 3)])
def test_every_view_of_a_vit_split_equals_masked_features_through_its_lrf(pool, split):
    windows = pytest.importorskip("robustwrap.windows")  # the ViT split (robustwrap/windows.py)
    vit = _tiny_vit(**({"class_token": False, "global_pool": "avg"} if pool == "avg" else {}))
    model = robustwrap.wrap(vit, patch=5, defense="patchcure", window=(2, 2), split=split, margin=0.0).eval()
    assert (
        model.describe()
        == "patch 5x5 px (2.44% of 32x32); 3x3 masks of 2x2 cells (16x16 px) on a 4x4 grid, mask stride 1x1 cells; 45 views"
    )
    assert (model.lrf is None) == (split == 3) and _uncovered_positions(model) == 0
    srf, lrf = windows.split_vit(vit, (2, 2), split)
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(split))
    mismatches = _check_against_reference(model, x, torch.arange(4), srf, lrf)
    assert mismatches == {"views": 0, "prediction": 0, "case": 0, "certified": 0, "early_exit": 0}


def test_a_timm_vit_state_dict_loads_and_the_hub_round_trips_window_and_split(tmp_path):
    pytest.importorskip("robustwrap.windows")
    vit = timm.create_model("test_vit", num_classes=4, img_size=64).eval()
    model = robustwrap.wrap(vit, patch=10, defense="patchcure", window=(2, 1), split=3).eval()
    fresh = timm.create_model("test_vit", num_classes=4, img_size=64).state_dict()
    assert not model.model.load_state_dict(fresh, strict=True).missing_keys  # no new parameters
    model.save_pretrained(tmp_path)
    loaded = robustwrap.from_pretrained(str(tmp_path))
    assert loaded.settings() == model.settings() and (loaded.window, loaded.split) == ((2, 1), 3)
    x = torch.randn(3, 3, 64, 64)
    assert torch.equal(loaded(x), model(x))
    # Train mode trains the split model (windowed first blocks), not the ViT's global forward.
    model.train()
    with torch.enable_grad():
        trained = model(x)
    split = model.lrf(model.srf(x), torch.ones(3, 2, 4, dtype=torch.bool))
    assert torch.allclose(trained, split, atol=1e-6) and not torch.allclose(trained, vit(x), atol=1e-3)
