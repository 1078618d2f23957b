"""PatchCURE with an input size of its own: the patch in input pixels, the SRF behind the resize.

Two base models of 36x36 images behind a x3 upsampling of 12x12 inputs: `bagnet_tiny` (local
logits, no LRF) and a toy pair (an SRF of 3x3 cells, an LRF on the masked grid). The references
never use robustwrap's views: they resize the image with `torch.nn.functional.interpolate`, run
the SRF and set the cells of the masks to 0 (or sum the kept local logits) in explicit loops, and
find the cells a patch changes by running the real model on every patched input.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

import robustwrap
from robustwrap.geometry import patch_pixels
from robustwrap.models import bagnet_tiny

SMALL, MODEL, PATCH = 12, 36, 2
MODES = ["nearest", "bilinear", "bicubic"]


def _resize(x: torch.Tensor, mode: str) -> torch.Tensor:
    return F.interpolate(x, size=(MODEL, MODEL), mode=mode, align_corners=None if mode == "nearest" else False)


class Cells(nn.Module):
    """An SRF of 3x3-pixel cells: cell (a, b) sees rows [3a, 3a + 3) and columns likewise."""

    receptive_field, feature_stride, feature_offset = 3, 3, 0

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, stride=3)

    def forward(self, x):
        return torch.tanh(self.conv(x))


class Head(nn.Module):
    """An LRF: a bias towards class 0 plus a linear vote of every cell (masked cells are 0)."""

    num_classes = 3

    def __init__(self):
        super().__init__()
        self.vote = nn.Conv2d(4, 3, 1, bias=False)
        self.bias = nn.Parameter(torch.tensor([1.0, 0.0, 0.0]))
        with torch.no_grad():  # weak votes: the bias decides some images whatever a patch does, not all
            self.vote.weight.mul_(0.05)

    def forward(self, features, kept):
        return self.vote(features).sum((-2, -1)) + self.bias


def _pair(mode: str, **options) -> robustwrap.PatchCURE:
    torch.manual_seed(0)
    return robustwrap.wrap(
        Cells(), PATCH, defense="patchcure", lrf=Head(), image_size=MODEL, input_size=SMALL, resize=mode, **options
    ).eval()


def _bagnet(mode: str, **options) -> robustwrap.PatchCURE:
    torch.manual_seed(0)
    base = bagnet_tiny(num_classes=3, in_chans=3).eval()
    return robustwrap.wrap(base, PATCH, defense="patchcure", image_size=MODEL, input_size=SMALL, resize=mode, **options).eval()


def _images(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, SMALL, SMALL, generator=torch.Generator().manual_seed(seed))


def _changed(srf: nn.Module, x: torch.Tensor, patched: torch.Tensor, mode: str) -> torch.Tensor:
    """`(N, h, w)` bool: the cells of each patched image that differ from the clean image's (beyond float noise of the batch)."""
    with torch.no_grad():
        clean = srf(_resize(x.expand_as(patched), mode))
        return ((srf(_resize(patched, mode)) - clean).abs() > 1e-5).any(1)


def _patched(x: torch.Tensor) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """`x` (one image) with a strong random patch at every input-pixel position."""
    positions = [(t, u) for t in range(SMALL - PATCH + 1) for u in range(SMALL - PATCH + 1)]
    out = x.repeat(len(positions), 1, 1, 1)
    noise = torch.randn(len(positions), 3, PATCH, PATCH, generator=torch.Generator().manual_seed(1)) * 5
    for n, (t, u) in enumerate(positions):
        out[n, :, t : t + PATCH, u : u + PATCH] = noise[n]
    return out, positions


# ------------------------------------------------------------------------------------ the window
def _declared_cells(mode: str, srf: nn.Module, grid: tuple[int, int]) -> int:
    """The largest extent of the cells whose declared window meets the model pixels a patch reaches, over every position."""
    r, s, o = srf.receptive_field, srf.feature_stride, srf.feature_offset
    if isinstance(r, (tuple, list)):
        (r, _), (s, _), (o, _) = r, s, o
    most = 0
    for t in range(SMALL - PATCH + 1):
        keep = torch.zeros(1, 1, SMALL, 1, dtype=torch.float64)
        keep[0, 0, t : t + PATCH] = torch.rand(PATCH, 1, dtype=torch.float64) + 0.5  # positive values do not cancel
        up = F.interpolate(
            keep.expand(1, 1, SMALL, SMALL), size=(MODEL, MODEL), mode=mode, **({} if mode == "nearest" else {"align_corners": False})
        )
        reached = (up[0, 0, :, 0] != 0).nonzero()[:, 0]
        low, high = int(reached.min()), int(reached.max()) + 1
        cells = [a for a in range(grid[0]) if s * a - o < high and s * a - o + r > low]
        most = max(most, cells[-1] - cells[0] + 1)
    return most


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("make", [_bagnet, _pair], ids=["bagnet_tiny", "pair"])
def test_feature_window_holds_every_input_patch_of_the_real_model(make, mode):
    """Every 2 px patch of the 12 px input changes cells inside one feature mask only, and the window is the footprint's."""
    model = make(mode)
    srf = model.srf
    grid = model.feature_mask_set.image_size
    wh, ww = model.feature_window
    assert wh == ww == _declared_cells(mode, srf, grid)
    if mode == "nearest":  # 2 input px are 6 model px, two 3 px cells of the toy SRF
        assert make is _bagnet or wh == 2
    x = _images(1)
    patched, positions = _patched(x)
    changed = _changed(srf, x, patched, mode)
    boxes = model.feature_mask_set.boxes
    extent = 0
    for n in range(len(positions)):
        rows, cols = changed[n].nonzero().unbind(1)
        top, left, bottom, right = int(rows.min()), int(cols.min()), int(rows.max()), int(cols.max())
        extent = max(extent, bottom - top + 1, right - left + 1)
        assert any(t <= top and bottom < t + h and u <= left and right < u + w for t, u, h, w in boxes), positions[n]
    assert extent <= wh


def test_the_resize_only_widens_the_window_beyond_nearest():
    """A bicubic resize reaches more model pixels than a nearest one: its window is wider, never narrower."""
    assert _pair("bicubic").feature_window > _pair("nearest").feature_window
    assert _bagnet("bicubic").feature_window >= _bagnet("bilinear").feature_window >= _bagnet("nearest").feature_window


# ------------------------------------------------------------------------------------- certify
def _reference_grid(model: robustwrap.PatchCURE, x: torch.Tensor, mode: str) -> torch.Tensor:
    """`(B, K, K)` labels of every feature view: the resized image through the SRF, two masks' cells at 0, then the LRF (or sums)."""
    srf, lrf = model.srf, model.lrf
    keep = model.feature_mask_set.keep_masks()
    with torch.no_grad():
        features = srf(_resize(x, mode))
        k = keep.shape[0]
        grid = torch.empty(x.shape[0], k, k, dtype=torch.long)
        for i in range(k):
            for j in range(k):
                kept = (keep[i] & keep[j])[None].expand(x.shape[0], -1, -1)
                if lrf is None:
                    logits = (features.double() * kept[:, None]).sum((-2, -1))
                else:
                    logits = lrf(torch.where(kept[:, None], features, torch.zeros(())), kept)
                grid[:, i, j] = logits.argmax(1)
    return grid


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("make", [_bagnet, _pair], ids=["bagnet_tiny", "pair"])
def test_certify_equals_resizing_the_image_and_masking_its_features(make, mode):
    model = make(mode, margin=0.0)
    x = _images(3)
    y = torch.tensor([0, 1, 2])
    result = model.certify(x, y, early_exit=False)
    reference = _reference_grid(model, x, mode)
    assert torch.equal(result.grid, reference)
    assert torch.equal(result.one_mask, reference.diagonal(dim1=1, dim2=2))
    assert torch.equal(result.certified, (reference == y[:, None, None]).flatten(1).all(1))
    assert torch.equal(result.prediction, model.predict(x)) and torch.equal(model(x).argmax(1), result.prediction)
    assert torch.equal(model.certify(x, y).certified, result.certified)  # early exit: the same result
    every = torch.ones(1, *model.feature_mask_set.image_size, dtype=torch.bool).expand(3, -1, -1)
    with torch.no_grad():
        features = model.srf(_resize(x, mode))
        vanilla = (features.double().sum((-2, -1)) if model.lrf is None else model.lrf(features, every)).argmax(1)
    assert torch.equal(model.predict_vanilla(x), vanilla)
    with pytest.raises(ValueError, match="images must be 12x12"):
        model.certify(torch.zeros(1, 3, MODEL, MODEL), y[:1])


@pytest.mark.parametrize("mode", MODES)
def test_a_certified_image_is_never_flipped_by_any_input_patch(mode):
    """Brute force over every 2 px patch position of the 12 px input (random strong contents) against the certificate."""
    model = _pair(mode)
    x = _images(4, seed=2)
    result = model.certify(x, torch.zeros(4, dtype=torch.long))
    assert result.certified.any(), "the test needs a certified image"
    for b in result.certified.nonzero()[:, 0].tolist():
        patched, _ = _patched(x[b : b + 1])
        assert (model.predict(patched) == 0).all()


def test_detection_runs_the_views_of_the_resized_image():
    """Certified detection's unmasked logits are the LRF on every cell of the resized image."""
    model = _pair("bilinear")
    x = _images(2)
    unmasked, views, _ = model._detection_logits(x)
    every = torch.ones(2, *model.feature_mask_set.image_size, dtype=torch.bool)
    with torch.no_grad():
        torch.testing.assert_close(unmasked, model.lrf(model.srf(_resize(x, "bilinear")), every))
    assert views.shape[1] == len(model.feature_mask_set)
    model.detect(x)


# --------------------------------------------------------------------------- settings, save/load
def test_input_size_is_saved_loaded_and_shown(tmp_path):
    model = _bagnet("bilinear")
    settings = model.settings()
    assert settings["input_size"] == [SMALL, SMALL] and settings["resize"] == "bilinear" and settings["image_size"] == [MODEL, MODEL]
    assert settings["patch"] == [PATCH, PATCH]
    assert "inputs resized to 36x36" in model.describe() and "of 12x12" in model.describe()
    model.save_pretrained(tmp_path / "saved")
    loaded = robustwrap.from_pretrained(str(tmp_path / "saved"))
    assert loaded.settings() == settings and loaded.feature_window == model.feature_window
    x, y = _images(2), torch.zeros(2, dtype=torch.long)
    assert torch.equal(loaded.certify(x, y).grid, model.certify(x, y).grid)
    assert "12x12" in (tmp_path / "saved" / "README.md").read_text()
    # A model that does not resize keeps the settings it always had.
    assert "input_size" not in robustwrap.wrap(model.model, PATCH, defense="patchcure", image_size=MODEL).settings()
    again = type(model).from_settings(model.model, settings)
    assert again.settings() == settings and again.input_size == (SMALL, SMALL)
    # A patch given as a share of the area is a share of the input's area, assigned or at wrap.
    wrapped = robustwrap.wrap(model.model, 0.05, defense="patchcure", image_size=MODEL, input_size=SMALL)
    assert wrapped.patch == patch_pixels(0.05, SMALL) != patch_pixels(0.05, MODEL)
    model.patch = 0.05
    assert model.patch == patch_pixels(0.05, SMALL)


def test_cli_certifies_in_input_pixels_and_keeps_a_saved_models_input_size(tmp_path, capsys):
    from PIL import Image
    from safetensors.torch import save_file

    from robustwrap.cli import main

    model = _bagnet("bilinear")
    save_file(model.model.state_dict(), tmp_path / "model.safetensors")
    rng = np.random.default_rng(0)
    for c in "abc":
        (tmp_path / "data" / c).mkdir(parents=True)
        Image.fromarray(rng.integers(0, 255, (SMALL, SMALL, 3), dtype=np.uint8)).save(tmp_path / "data" / c / "0.png")
    argv = [
        "certify",
        "--model",
        "timm:bagnet_tiny",
        "--checkpoint",
        tmp_path / "model.safetensors",
        "--in-chans",
        "3",
        "--num-classes",
        "3",
    ]
    argv += ["--defense", "patchcure", "--patch", PATCH, "--image-size", MODEL, "--input-size", SMALL, "--resize", "bilinear"]
    argv += ["--data", tmp_path / "data", "--no-progress", "--report", tmp_path / "r.json"]
    assert main([str(a) for a in argv]) == 0
    assert "12x12 inputs resized (bilinear) to 36x36" in capsys.readouterr().out
    report = robustwrap.CertificationReport.load(tmp_path / "r.json")
    assert report.settings["input_size"] == [SMALL, SMALL] and report.settings["resize"] == "bilinear"
    model.save_pretrained(tmp_path / "saved")
    argv = ["certify", "--model", tmp_path / "saved", "--data", tmp_path / "data", "--no-progress", "--report", tmp_path / "s.json"]
    assert main([str(a) for a in argv]) == 0
    assert "12x12 inputs resized (bilinear) to 36x36" in capsys.readouterr().out
    again = robustwrap.CertificationReport.load(tmp_path / "s.json")
    assert [(r.prediction, r.certified) for r in again.records] == [(r.prediction, r.certified) for r in report.records]


# ---------------------------------------------------------------------------------- the attack
@pytest.mark.parametrize("make", [_bagnet, _pair], ids=["bagnet_tiny", "pair"])
def test_the_attacks_patch_is_in_input_pixels(make):
    """The attack places a 2x2 patch on the 12x12 input through PatchCURE's surrogate, on the resized image's features."""
    from robustwrap.attack import OBJECTIVES

    model = make("bicubic")
    x, y = _images(2), torch.zeros(2, dtype=torch.long)
    result = robustwrap.attack(model, x, y, steps=2, restarts=1, locations=2, bounds=(-3.0, 3.0))
    changed = (result.x_adv != x).any(1)
    assert changed.any()
    for b in range(2):
        rows, cols = changed[b].nonzero().unbind(1)
        if rows.numel():
            assert int(rows.max() - rows.min()) < PATCH and int(cols.max() - cols.min()) < PATCH
    assert torch.equal(result.prediction, model.predict(result.x_adv))
    # the detection attack runs its views on the resized image's features too, judged by `detect`
    found = robustwrap.attack(model, x, y, steps=2, restarts=1, locations=2, bounds=(-3.0, 3.0), guarantee="detection")
    detected = model.detect(found.x_adv)
    assert torch.equal(found.success, (detected.prediction != y) & ~detected.alert)
    # The surrogate's footprint of each position holds the cells a patch there changes (brute force on the real model).
    objective = OBJECTIVES["patchcure"](model, x, y, y, False, model.patch, "margin")
    patched, positions = _patched(x[:1])
    corner, size = objective._footprint(torch.tensor(positions))
    changed = _changed(model.srf, x[:1], patched, "bicubic")
    for n in range(len(positions)):
        rows, cols = changed[n].nonzero().unbind(1)
        assert corner[n, 0] <= rows.min() and rows.max() < corner[n, 0] + size[n, 0], positions[n]
        assert corner[n, 1] <= cols.min() and cols.max() < corner[n, 1] + size[n, 1], positions[n]


# ------------------------------------------------------------------------------------ training
@pytest.mark.parametrize("make", [_bagnet, _pair], ids=["bagnet_tiny", "pair"])
def test_training_views_and_train_forward_run_behind_the_resize(make):
    model = make("bilinear")
    x = _images(2)
    masking = model._training_recipe("random_mask", model.fill, 4).augment
    masks = torch.tensor([[0, 1], [-1, -1]])
    keep = model.feature_mask_set.keep_masks()
    every = torch.ones_like(keep[0])
    with torch.no_grad():
        features = model.srf(_resize(x, "bilinear"))
        got = masking.logits(model.model, x, masks)
        for b, kept in enumerate([keep[0] & keep[1], every]):
            if model.lrf is None:
                expected = (features[b].double() * kept).sum((-2, -1)) / kept.numel()
            else:
                expected = model.lrf(torch.where(kept, features[b : b + 1], torch.zeros(())), kept[None])[0]
            torch.testing.assert_close(got[b], expected.to(got.dtype))
        model.train()  # the train-mode forward: the undefended split model on the resized images, in train mode (BatchNorm)
        trained, expected = model(x), model.model(_resize(x, "bilinear"))
        model.eval()
    torch.testing.assert_close(trained, expected)
    robustwrap.fit_masking(model, [(x, torch.tensor([0, 1]))], strategy="greedy", epochs=1, lr=0.01, progress=False)
