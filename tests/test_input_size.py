"""Threat models in the input's own pixels: a defended model with an input size of its own (`input_size`, `resize`).

The references below never use robustwrap's views: they ablate (or mask) the small image with
explicit loops, upsample each view with `torch.nn.functional.interpolate`, and run the base
model on it (with token dropping: on the tokens holding a model pixel that a kept input pixel
reaches, found by resizing random positive values on the kept pixels).
"""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch
from torch import nn
from torch.nn import functional as F

import robustwrap
from robustwrap.geometry import feature_window, resize_footprint

SMALL = 16


def _resize(x: torch.Tensor, size, mode: str) -> torch.Tensor:
    return F.interpolate(x, size=size, mode=mode, align_corners=None if mode == "nearest" else False)


def _vit(img_size: int, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = timm.create_model("vit_tiny_patch16_224", img_size=img_size, patch_size=8, depth=1, num_classes=5).eval()
    with torch.no_grad():  # larger weights: views disagree, so the vote counts say something
        for p in model.parameters():
            p.mul_(4.0)
    return model


class SmallCNN(nn.Module):
    """A classifier of 48x48 images whose logits depend on every pixel."""

    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.conv = nn.Conv2d(3, 6, 5, stride=3)
        self.head = nn.Linear(6 * 15 * 15, 4)
        self.num_classes = 4

    def forward(self, x):
        return self.head(torch.tanh(self.conv(x)).flatten(1))


def _images(n: int, side: int = SMALL, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, side, side, generator=torch.Generator().manual_seed(seed))


def _column_keeps(n: int, size: int, stride: int) -> list[torch.Tensor]:
    keeps = []
    for q in range(0, n, stride):
        keep = torch.zeros(n, n, dtype=torch.bool)
        keep[:, [(q + t) % n for t in range(size)]] = True
        keeps.append(keep)
    return keeps


def _reference_vit_logits(model, view: torch.Tensor, model_keep: torch.Tensor | None) -> torch.Tensor:
    """timm's public parts on the kept tokens of a model-size view (all tokens when `model_keep` is None)."""
    if model_keep is None:
        return model(view[None])[0]
    ph, pw = model.patch_embed.patch_size
    h, w = model_keep.shape
    token_keep = model_keep.reshape(h // ph, ph, w // pw, pw).any(3).any(1).flatten()
    tokens = model._pos_embed(model.patch_embed(view[None]))
    tokens = tokens[:, torch.cat([torch.ones(model.num_prefix_tokens, dtype=torch.bool), token_keep])]
    for block in model.blocks:
        tokens = block(tokens)
    return model.forward_head(model.norm(tokens))[0]


def _reached(keep: torch.Tensor, size, mode: str) -> torch.Tensor:
    """The model pixels that some kept input pixel reaches (random positive values do not cancel)."""
    values = torch.rand(keep.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) + 0.5
    return _resize((values * keep)[None, None], size, mode)[0, 0] != 0


def _reference_counts(model, x, size, stride, mode, model_size, drop, fill=0.0) -> torch.Tensor:
    counts = torch.zeros(x.shape[0], 5, dtype=torch.long)
    with torch.no_grad():
        for b in range(x.shape[0]):
            for keep in _column_keeps(x.shape[-1], size, stride):
                view = _resize(torch.where(keep, x[b], torch.tensor(fill))[None], model_size, mode)[0]
                logits = _reference_vit_logits(model, view, _reached(keep, model_size, mode) if drop else None)
                counts[b, int(logits.argmax())] += 1
    return counts


# ------------------------------------------------------------------------------- the paper's Δ
def test_smoothed_vit_cifar_geometry_has_the_papers_delta():
    """Smoothed ViT's CIFAR-10 setting: 32 px images, band 4, patch 5, stride 1, upsampled x7 to 224.

    In input pixels Δ = 4 + 5 - 1 = 8 (a vote margin of 17, the paper's); the same views expressed
    in 224 px model pixels (bands of 28 at stride 7 against a 35 px patch anywhere) give Δ = 9.
    """
    vit = timm.create_model("vit_tiny_patch16_224", depth=1, num_classes=10)
    model = robustwrap.wrap(vit, defense="smoothing", input_size=32, size=4, patch=5)
    assert model.input_size == (32, 32) and model.image_size == (224, 224) and model.resize == "nearest"
    assert (model.delta, model.full_views, model.patch) == (8, 32, (5, 5))
    in_model_pixels = robustwrap.wrap(vit, defense="smoothing", size=28, stride=7, patch=35)
    assert (in_model_pixels.delta, in_model_pixels.full_views) == (9, 32)


# ---------------------------------------------------------------------- smoothing vs a reference
@pytest.mark.parametrize(
    "model_size, mode, drop",
    [
        (64, "nearest", True),  # x4: a token is 2x2 input pixels, embedded once
        (48, "nearest", True),  # x3: token edges fall inside input pixels
        (48, "bilinear", True),  # the views are built, resized, and run on the tokens they reach
        (48, "bicubic", True),
        (48, "bicubic", False),
        (64, "nearest", False),
    ],
)
def test_smoothing_votes_equal_ablating_the_small_image_and_upsampling_each_view(model_size, mode, drop):
    vit = _vit(model_size)
    model = robustwrap.wrap(vit, defense="smoothing", input_size=SMALL, resize=mode, size=3, stride=2, patch=4, drop_tokens=drop).eval()
    x = _images(3)
    result = model.certify(x, torch.zeros(3, dtype=torch.long), early_exit=False)
    expected = _reference_counts(vit, x, 3, 2, mode, (model_size, model_size), drop)
    assert torch.equal(result.counts, expected)
    assert len(set(map(tuple, expected.tolist()))) > 1 or expected.max() < model.full_views  # views disagree
    assert result.delta == model.delta == 3  # bands of 3 at stride 2: a 4 px patch meets 3 of them
    assert torch.equal(model.predict(x), result.prediction) and torch.equal(model(x).argmax(1), result.prediction)


def test_smoothing_takes_input_size_images_only():
    model = robustwrap.wrap(_vit(48), defense="smoothing", input_size=SMALL, size=3, patch=4).eval()
    with pytest.raises(ValueError, match="16x16"):
        model.predict(torch.randn(1, 3, 48, 48))


# ------------------------------------------------------------------------------- PatchCleanser
def test_patchcleanser_masks_in_input_pixels_equal_masking_the_small_image_and_upsampling():
    base = SmallCNN().eval()
    model = robustwrap.wrap(base, patch=4, num_masks=3, image_size=48, input_size=SMALL, resize="bilinear").eval()
    assert model.mask_set.image_size == (SMALL, SMALL) and model.patch == (4, 4) and model.image_size == (48, 48)
    x = _images(4)
    result = model.certify(x, torch.zeros(4, dtype=torch.long), early_exit=False)
    boxes = model.mask_set.boxes
    grid = torch.empty(4, len(boxes), len(boxes), dtype=torch.long)
    with torch.no_grad():
        for i, (ri, ci, hi, wi) in enumerate(boxes):
            for j, (rj, cj, hj, wj) in enumerate(boxes):
                keep = torch.ones(SMALL, SMALL, dtype=torch.bool)
                keep[ri : ri + hi, ci : ci + wi] = False
                keep[rj : rj + hj, cj : cj + wj] = False
                grid[:, i, j] = base(_resize(torch.where(keep, x, torch.tensor(0.0)), (48, 48), "bilinear")).argmax(1)
    assert torch.equal(result.grid, grid) and torch.equal(result.one_mask, grid.diagonal(dim1=1, dim2=2))
    assert len(set(grid.flatten().tolist())) > 1  # the views disagree somewhere: the comparison says something
    assert torch.equal(model.predict(x), result.prediction)


# ---------------------------------------------------------------------------------- PatchGuard
def _brute_window(input_size, image_size, patch, r, s, o, m, mode) -> int:
    """Per axis: every patch position in input pixels, the model pixels its perturbation changes, the features those meet."""
    extent = 0
    for t in range(input_size - patch + 1):
        delta = torch.zeros(1, 1, 1, input_size, dtype=torch.float64)
        delta[..., t : t + patch] = torch.rand(patch, dtype=torch.float64, generator=torch.Generator().manual_seed(t)) + 0.5
        changed = (_resize(delta, (1, image_size), mode)[0, 0, 0] != 0).nonzero()[:, 0]
        lo, hi = int(changed.min()), int(changed.max()) + 1
        touched = [a for a in range(m) if s * a - o < hi and s * a - o + r > lo]
        extent = max(extent, touched[-1] - touched[0] + 1)
    return extent


@pytest.mark.parametrize("mode", ["nearest", "bilinear", "bicubic"])
@pytest.mark.parametrize("n_in, n, p, r, s, o", [(16, 48, 4, 9, 4, 0), (20, 64, 3, 17, 8, 0), (12, 96, 2, 11, 6, 2), (16, 40, 2, 5, 2, 1)])
def test_feature_window_from_the_footprint_equals_brute_force(mode, n_in, n, p, r, s, o):
    m = (n + o - r) // s + 1
    expected = _brute_window(n_in, n, p, r, s, o, m, mode)
    assert feature_window((n, n), p, r, s, o, (m, m), input_size=(n_in, n_in), resize=mode) == (expected, expected)


def test_footprint_of_nearest_is_the_pixels_image_and_wider_for_bicubic():
    rows, cols = resize_footprint((8, 4), (56, 12), "nearest")
    assert rows.shape == (8, 56) and cols.shape == (4, 12)
    assert np.array_equal(rows, np.repeat(np.eye(8, dtype=bool), 7, axis=1))
    wide, _ = resize_footprint((8, 4), (56, 12), "bicubic")
    assert (wide | rows).sum() == wide.sum() > rows.sum()


def test_patchguard_window_holds_every_patch_of_the_real_model():
    """A BagNet behind a bicubic x3 resize: every 3 px patch of the 16 px input changes local logits inside one window only."""
    torch.manual_seed(0)
    base = timm.create_model("bagnet_tiny", num_classes=3, in_chans=1).eval()
    model = robustwrap.wrap(base, 3, defense="patchguard", image_size=48, input_size=SMALL, resize="bicubic").eval()
    wh, ww = model.window
    flat = robustwrap.wrap(base, 9, defense="patchguard", image_size=48)  # the 3 px patch as 9 model pixels, nothing widened
    assert wh > flat.window[0]  # bicubic's support widens the footprint
    x = torch.randn(1, 1, SMALL, SMALL)
    with torch.no_grad():
        clean = base(_resize(x, (48, 48), "bicubic"))
        for t in range(0, SMALL - 3 + 1, 2):
            for u in range(0, SMALL - 3 + 1, 3):
                patched = x.clone()
                patched[..., t : t + 3, u : u + 3] = torch.randn(1, 1, 3, 3) * 5
                rows, cols = (base(_resize(patched, (48, 48), "bicubic")) != clean).any(1)[0].nonzero().unbind(1)
                assert int(rows.max() - rows.min()) < wh and int(cols.max() - cols.min()) < ww
    result = model.certify(x, torch.zeros(1, dtype=torch.long))
    assert torch.equal(result.prediction, model.predict(x))


# ---------------------------------------------------------------------------- settings, errors
def test_input_size_is_saved_loaded_and_shown(tmp_path):
    vit = _vit(48)
    model = robustwrap.wrap(vit, defense="smoothing", input_size=SMALL, resize="bilinear", size=3, patch=4).eval()
    settings = model.settings()
    assert settings["input_size"] == [SMALL, SMALL] and settings["resize"] == "bilinear" and settings["image_size"] == [48, 48]
    assert "16x16 inputs resized (bilinear) to 48x48" in repr(model)
    model.save_pretrained(tmp_path / "saved")
    loaded = robustwrap.from_pretrained(str(tmp_path / "saved"))
    assert loaded.settings() == settings
    x = _images(2)
    assert torch.equal(
        loaded.certify(x, torch.zeros(2, dtype=torch.long)).counts, model.certify(x, torch.zeros(2, dtype=torch.long)).counts
    )
    card = (tmp_path / "saved" / "README.md").read_text()
    assert "16x16" in card and "bilinear" in card
    # A model that does not resize keeps the settings it always had.
    assert "input_size" not in robustwrap.wrap(vit, defense="smoothing", size=3, patch=4).settings()


def test_patchcleanser_and_patchguard_settings_round_trip():
    cleanser = robustwrap.wrap(SmallCNN(), patch=4, num_masks=3, image_size=48, input_size=SMALL)
    again = type(cleanser).from_settings(cleanser.model, cleanser.settings())
    assert again.settings() == cleanser.settings() and again.input_size == (SMALL, SMALL) and again.resize == "nearest"
    guard = robustwrap.wrap(
        timm.create_model("bagnet_tiny", num_classes=3, in_chans=1), 3, defense="patchguard", image_size=48, input_size=SMALL
    )
    rebuilt = type(guard).from_settings(guard.model, guard.settings())
    assert rebuilt.settings() == guard.settings() and rebuilt.window == guard.window


def test_bad_input_sizes_are_clear_errors():
    vit = _vit(48)
    with pytest.raises(ValueError, match="input_size=64 is larger than the 48x48"):
        robustwrap.wrap(vit, defense="smoothing", input_size=64, size=3, patch=4)
    with pytest.raises(ValueError, match="size"):
        robustwrap.wrap(vit, defense="smoothing", input_size=SMALL, size=20, patch=4)
    with pytest.raises(ValueError, match="patch"):
        robustwrap.wrap(SmallCNN(), patch=20, image_size=48, input_size=SMALL)
    with pytest.raises(ValueError, match="resize must be one of"):
        robustwrap.wrap(vit, defense="smoothing", input_size=SMALL, resize="area", size=3, patch=4)
    with pytest.raises(ValueError, match="resize='bilinear' needs an input_size"):
        robustwrap.wrap(vit, defense="smoothing", resize="bilinear", size=3, patch=4)


# ---------------------------------------------------------------------------------------- attack
@pytest.mark.parametrize("defense", ["patchcleanser", "smoothing-nearest", "smoothing-bilinear", "patchguard"])
def test_the_attacks_patch_is_in_input_pixels(defense):
    """The attack places a 3x3 patch on the 16x16 input (not a 3x3 one on the resized image), through each defense's surrogate."""
    if defense == "patchcleanser":
        model = robustwrap.wrap(SmallCNN(), patch=3, num_masks=3, image_size=48, input_size=SMALL)
    elif defense == "patchguard":
        model = robustwrap.wrap(
            timm.create_model("bagnet_tiny", num_classes=3, in_chans=3), 3, defense="patchguard", image_size=48, input_size=SMALL
        )
    else:
        model = robustwrap.wrap(_vit(48), defense="smoothing", input_size=SMALL, resize=defense.split("-")[1], size=3, stride=2, patch=3)
    model.eval()
    x = _images(2)
    result = robustwrap.attack(model, x, torch.zeros(2, dtype=torch.long), steps=2, restarts=1, locations=2, bounds=(-3.0, 3.0))
    assert result.x_adv.shape == x.shape
    changed = (result.x_adv != x).any(1)
    assert changed.any()
    for b in range(2):
        rows, cols = changed[b].nonzero().unbind(1)
        if rows.numel():
            assert int(rows.max() - rows.min()) < 3 and int(cols.max() - cols.min()) < 3
    assert torch.equal(result.prediction, model.predict(result.x_adv))


# -------------------------------------------------------------------------------------- training
def test_fit_masking_trains_on_resized_images():
    """One SGD step of `fit_masking` (no masking) equals the same step on the base model of the resized images."""
    x, y = _images(4), torch.tensor([0, 1, 2, 3])
    model = robustwrap.wrap(SmallCNN(), patch=4, num_masks=3, image_size=48, input_size=SMALL, resize="bilinear")
    reference = SmallCNN()
    robustwrap.fit_masking(model, [(x, y)], strategy="none", epochs=1, lr=0.1, progress=False)
    optimizer = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9)
    F.cross_entropy(reference(_resize(x, (48, 48), "bilinear")), y).backward()
    optimizer.step()
    for trained, expected in zip(model.model.parameters(), reference.parameters()):
        torch.testing.assert_close(trained, expected)


@pytest.mark.parametrize("mode", ["nearest", "bicubic"])
def test_training_views_run_as_certification_runs_them(mode):
    """`RandomAblation` of a resized token-dropping model: its logits are the reference's for each view, and fit_masking runs them."""
    vit = _vit(48)
    model = robustwrap.wrap(vit, defense="smoothing", input_size=SMALL, resize=mode, size=3, stride=2, patch=4)
    augment = robustwrap.defenses.smoothing.RandomAblation.from_model(model, torch.Generator().manual_seed(0))
    x = _images(3)
    views, view = augment(x, return_indices=True)
    assert views.shape == x.shape
    with torch.no_grad():
        logits = augment.logits(vit, views, view)
        keeps = _column_keeps(SMALL, 3, 2)
        for n in range(3):
            keep = keeps[int(view[n])]
            expected = _reference_vit_logits(vit, _resize(views[n : n + 1], (48, 48), mode)[0], _reached(keep, (48, 48), mode))
            torch.testing.assert_close(logits[n], expected, rtol=1e-4, atol=1e-4)
    robustwrap.fit_masking(model, [(x, torch.tensor([0, 1, 2]))], epochs=1, progress=False)


# ------------------------------------------------------------------------------------------- CLI
def test_cli_certifies_in_input_pixels_and_keeps_a_saved_models_input_size(tmp_path, capsys):
    """`robustwrap certify --input-size 40 --resize bilinear`: the Python API's numbers; a saved model keeps its input size."""
    from PIL import Image
    from safetensors.torch import save_file
    from timm.data import create_transform, resolve_data_config
    from torchvision.datasets import ImageFolder

    from robustwrap.cli import main

    torch.manual_seed(0)
    base = timm.create_model("test_convnext", num_classes=3).eval()  # 160x160 inputs
    save_file(base.state_dict(), tmp_path / "model.safetensors")
    rng = np.random.default_rng(0)
    for c in "abc":
        (tmp_path / "data" / c).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(rng.integers(0, 255, (48, 40, 3), dtype=np.uint8)).save(tmp_path / "data" / c / f"{i}.png")
    argv = ["certify", "--model", "timm:test_convnext", "--checkpoint", tmp_path / "model.safetensors", "--num-masks", "2", "--patch", "5"]
    argv += ["--input-size", "40", "--resize", "bilinear", "--data", tmp_path / "data", "--no-progress", "--report", tmp_path / "r.json"]
    assert main([str(a) for a in argv]) == 0
    out = capsys.readouterr().out
    assert "40x40 inputs resized (bilinear) to 160x160" in out
    model = robustwrap.wrap(base, patch=5, num_masks=2, input_size=40, resize="bilinear").eval()
    transform = create_transform(**resolve_data_config({"input_size": (3, 40, 40)}, model=base))
    expected = robustwrap.certify_dataset(model, ImageFolder(str(tmp_path / "data"), transform=transform), progress=False)
    report = robustwrap.CertificationReport.load(tmp_path / "r.json")
    assert [(r.prediction, r.certified, r.num_views) for r in report.records] == [
        (r.prediction, r.certified, r.num_views) for r in expected.records
    ]
    assert report.settings["input_size"] == [40, 40] and report.settings["resize"] == "bilinear"
    model.save_pretrained(tmp_path / "saved")
    argv = ["certify", "--model", tmp_path / "saved", "--data", tmp_path / "data", "--no-progress", "--report", tmp_path / "s.json"]
    assert main([str(a) for a in argv]) == 0
    assert "40x40 inputs resized (bilinear) to 160x160" in capsys.readouterr().out
    again = robustwrap.CertificationReport.load(tmp_path / "s.json")
    assert [(r.prediction, r.certified) for r in again.records] == [(r.prediction, r.certified) for r in report.records]
