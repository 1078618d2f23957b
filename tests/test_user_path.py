"""The path a user takes, end to end, for each defense: wrap, change a setting and the base model,
fine-tune, certify a batch and a data set, save, load, and certify the saved folder with the CLI.

Each step is checked against the others where they must agree: the settings of the live model,
its saved config and the loaded model; the loaded model's certificates and fingerprint; the CLI's
report against `certify_dataset`'s, record by record; and the train/eval mode of every submodule
the user set (a frozen BatchNorm stays frozen through `wrap`, the assignment and `fit_masking`).
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from timm.data import create_transform, resolve_data_config
from torch import nn
from torch.utils.data import DataLoader
from torchvision.datasets import ImageFolder

import robustwrap
import robustwrap.models  # registers bagnet_tiny with timm
from robustwrap import MaskSet
from robustwrap.cli import main
from robustwrap.dataset import model_fingerprint
from robustwrap.report import CertificationReport

NUM_CLASSES = 3


def _timm(name: str, seed: int, **kwargs) -> nn.Module:
    torch.manual_seed(seed)
    return timm.create_model(name, num_classes=NUM_CLASSES, **kwargs)


def _frozen(model: nn.Module) -> nn.Module:
    """`model` in train mode with its first normalisation layer put in eval mode (frozen statistics)."""
    model.train()
    norm = next(m for m in model.modules() if isinstance(m, (nn.BatchNorm2d, nn.LayerNorm)))
    norm.eval()
    return model


def _modes(model: nn.Module) -> dict[str, bool]:
    return {name: module.training for name, module in model.named_modules()}


def _buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: b.clone() for name, b in model.named_buffers()}


# Per defense: the first base model, wrap's options, the setting assigned after wrap, the new base
# model assigned after it, and the image side.
CASES = {
    "patchcleanser": (
        lambda: _frozen(_timm("test_resnet", 0)),
        {"patch": 3, "num_masks": 3, "image_size": 16},
        {"mask_set": MaskSet.square(16, 3, num_masks=2), "margin": 0.01},
        lambda: _frozen(_timm("test_resnet", 1)),
        16,
    ),
    "smoothing": (
        lambda: _frozen(_timm("test_vit", 0, img_size=16, patch_size=4)),
        {"patch": 3, "size": 4, "image_size": 16},
        {"stride": 2, "threshold": 0.3},
        lambda: _frozen(_timm("test_vit", 1, img_size=16, patch_size=4)),
        16,
    ),
    "patchguard": (
        lambda: _frozen(_timm("bagnet_tiny", 0)),  # grey images, as the BagNet's data config says
        {"patch": 3, "image_size": 24},
        {"clip": 0.5, "threshold": 0.2},
        lambda: _frozen(_timm("bagnet_tiny", 1)),
        24,
    ),
}


def _image_folder(root, size: int, mode: str, per_class: int = 4):
    """Class folders `0`..`2` of random PNGs in PIL `mode` (a different colour bias per class)."""
    rng = np.random.default_rng(0)
    for label in range(NUM_CLASSES):
        (root / str(label)).mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 100, (size, size, 3))
            pixels[..., label] += 155
            Image.fromarray(pixels.astype(np.uint8)).convert(mode).save(root / str(label) / f"{i}.png")
    return root


def _read(mode: str):
    def read(path):
        with Image.open(path) as image:
            return image.convert(mode)

    return read


def _same_certificates(got, want) -> None:
    for field in ("prediction", "certified", "num_views", "margin"):
        if hasattr(want, field):
            assert torch.equal(getattr(got, field), getattr(want, field)), field


@pytest.mark.parametrize("defense", sorted(CASES))
def test_the_path_a_user_takes(defense, tmp_path, capsys):
    first, options, assigned, second, size = CASES[defense]

    base = first()
    modes = _modes(base)
    m = robustwrap.wrap(base, defense=defense, **options)
    assert _modes(m.model) == modes and m.training  # wrap changed no submodule's mode
    if defense == "smoothing":
        assert m.drop_tokens

    for name, value in assigned.items():
        setattr(m, name, value)
        assert getattr(m, name) == value
    other = second()
    modes = _modes(other)
    m.model = other
    assert m.model is other and _modes(other) == modes
    for name, value in assigned.items():
        assert getattr(m, name) == value  # a new base model keeps the settings assigned before it
    fresh = robustwrap.wrap(second(), defense=defense, **options)
    for name, value in assigned.items():
        setattr(fresh, name, value)
    assert m.settings() == fresh.settings() and model_fingerprint(m) == model_fingerprint(fresh)

    mode = "L" if m.in_chans == 1 else "RGB"
    folder = _image_folder(tmp_path / "data", size, mode)
    config = resolve_data_config({"input_size": (m.in_chans, size, size)}, model=m.model)
    data = ImageFolder(str(folder), transform=create_transform(**config), loader=_read(mode))
    before = _buffers(other)
    robustwrap.fit_masking(m, DataLoader(data, batch_size=3, shuffle=True), epochs=1, progress=False)
    assert _modes(other) == modes  # the frozen layer is still frozen, the rest still trains
    statistics = {name: torch.equal(b, before[name]) for name, b in _buffers(other).items() if name.endswith("running_mean")}
    frozen = {
        f"{name}.running_mean" for name, module in other.named_modules() if isinstance(module, nn.BatchNorm2d) and not module.training
    }
    assert {name for name, same in statistics.items() if same} == frozen  # only the frozen BatchNorm kept its statistics
    assert (len(frozen), len(statistics) > 1) == ((0, False) if defense == "smoothing" else (1, True))
    m.eval()

    x = torch.stack([data[i][0] for i in range(len(data))])
    y = torch.tensor(data.targets)
    result = m.certify(x, y)
    report = robustwrap.certify_dataset(m, data, progress=False)
    assert [r.prediction for r in report.records] == result.prediction.tolist()
    assert [r.certified for r in report.records] == result.certified.tolist()
    assert [r.num_views for r in report.records] == result.num_views.tolist()
    assert report.certified > 0  # the comparisons below see certified images, not only refusals

    saved = tmp_path / "model"
    m.save_pretrained(saved)
    section = json.loads((saved / "config.json").read_text())["robustwrap"]
    assert {k: v for k, v in section.items() if k not in ("format_version", "base", "info")} == json.loads(json.dumps(m.settings()))
    loaded = robustwrap.from_pretrained(str(saved)).eval()
    assert type(loaded) is type(m) and loaded.settings() == m.settings()
    assert model_fingerprint(loaded) == model_fingerprint(m)
    _same_certificates(loaded.certify(x, y), result)

    code = main(
        [
            "certify",
            "--model",
            str(saved),
            "--data",
            str(folder),
            "--limit",
            "all",
            "--no-progress",
            "--report",
            str(tmp_path / "report.json"),
        ]
    )
    assert code == 0, capsys.readouterr().err
    cli = CertificationReport.load(tmp_path / "report.json")
    counts = ("num_images", "vanilla_correct", "clean_correct", "certified", "total_views")
    assert [getattr(cli, c) for c in counts] == [getattr(report, c) for c in counts]
    untimed = [[dataclasses.replace(r, seconds=0.0) for r in rep.records] for rep in (cli, report)]
    assert untimed[0] == untimed[1]  # same images (hashes), labels, predictions, certificates
    assert cli.settings == m.settings()
