"""The zoo: the embedded default loads offline, checks out against the manifest, works via torch.hub."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch
from timm.data import create_transform, resolve_data_config

import robustwrap
from robustwrap import hub

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def default_model():
    return robustwrap.create_model(hub.DEFAULT_MODEL)


def heldout(model, n):
    data = hub.builtin_dataset(hub.zoo_entry(hub.DEFAULT_MODEL)["dataset"], transform=create_transform(**resolve_data_config(model=model.model)))
    images, labels = zip(*(data[i] for i in range(n)))
    return torch.stack(images), torch.tensor(labels)


def test_manifest_lists_only_measured_weights():
    manifest = json.loads((ROOT / "hub" / "manifest.json").read_text())
    assert manifest == json.loads((ROOT / "robustwrap" / "zoo" / "manifest.json").read_text())
    assert manifest["default"] in hub.list_models()
    for entry in manifest["models"]:
        folder = ROOT / "robustwrap" / "zoo" / entry["embedded"] if entry.get("embedded") else None
        assert folder is not None and hub.sha256_of(folder / "model.safetensors") == entry["sha256"]
        assert {"vanilla_accuracy", "clean_accuracy", "certified_accuracy", "num_images", "command"} <= set(entry["metrics"])
        assert entry["measured_with"].startswith("python hub/recipes/")


def test_embedded_default_matches_its_entry(default_model):
    entry = hub.zoo_entry(hub.DEFAULT_MODEL)
    assert default_model.mask_set.describe() == entry["threat_model"]
    assert len(default_model.mask_set) == entry["num_masks"] == 36
    assert list(default_model.mask_set.patch_size) == entry["patch"]
    assert default_model.pretrained_info["metrics"]["certified_accuracy"] == entry["metrics"]["certified_accuracy"]
    assert len(hub.builtin_dataset(entry["dataset"])) == entry["metrics"]["num_images"]


def test_embedded_default_certifies_real_digits(default_model):
    x, y = heldout(default_model, 64)
    result = default_model.certify(x, y)
    assert (result.prediction == y).float().mean() >= 0.9  # random weights would give about 10%
    assert result.certified.any()
    assert not (result.certified & (result.prediction != y)).any()


def test_plain_timm_loads_the_embedded_base(default_model):
    folder = Path(str(hub._ZOO / hub.zoo_entry(hub.DEFAULT_MODEL)["embedded"]))
    base = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    x, _ = heldout(default_model, 8)
    with torch.no_grad():
        assert torch.equal(base(x), default_model.model(x))


def test_torch_hub_entry_points(default_model):
    hubconf = torch.hub._import_module("hubconf", str(ROOT / "hubconf.py"))
    listed = sorted(f for f in dir(hubconf) if callable(getattr(hubconf, f)) and not f.startswith("_"))
    assert listed == sorted([*hub.list_models(), "robust_model"])  # what torch.hub.list shows
    x, _ = heldout(default_model, 8)
    by_name = torch.hub.load(str(ROOT), hub.DEFAULT_MODEL, source="local")
    generic = torch.hub.load(str(ROOT), "robust_model", hub.DEFAULT_MODEL, source="local")
    assert torch.equal(by_name(x), default_model(x)) and torch.equal(generic(x), default_model(x))
    untrained = torch.hub.load(str(ROOT), hub.DEFAULT_MODEL, source="local", pretrained=False)
    assert untrained.mask_set == default_model.mask_set and not torch.equal(untrained(x), default_model(x))
