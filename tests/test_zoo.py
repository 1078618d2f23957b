"""The zoo: the embedded default loads offline, checks out against the manifest, works via torch.hub."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch
from timm.data import create_transform, resolve_data_config

import robustwrap
from robustwrap import hub, zoo
from robustwrap.defenses.base import DEFAULT_MARGIN
from robustwrap.defenses.patchcleanser import PatchCleanser

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def default_model():
    return robustwrap.create_model(zoo.DEFAULT_MODEL)


def heldout(model, n):
    data = zoo.builtin_dataset(zoo.zoo_entry(zoo.DEFAULT_MODEL)["dataset"], transform=create_transform(**resolve_data_config(model=model.model)))
    images, labels = zip(*(data[i] for i in range(n)))
    return torch.stack(images), torch.tensor(labels)


def test_manifest_lists_only_measured_weights():
    manifest = json.loads((ROOT / "hub" / "manifest.json").read_text())
    assert manifest == json.loads((ROOT / "robustwrap" / "zoo" / "manifest.json").read_text())
    assert manifest["default"] in zoo.list_models()
    for entry in manifest["models"]:
        folder = ROOT / "robustwrap" / "zoo" / entry["embedded"] if entry.get("embedded") else None
        assert folder is not None and hub.sha256_of(folder / "model.safetensors") == entry["sha256"]
        assert {"vanilla_accuracy", "clean_accuracy", "certified_accuracy", "num_images", "command"} <= set(entry["metrics"])
        assert entry["measured_with"].startswith("python hub/recipes/")


def test_embedded_default_matches_its_entry(default_model):
    entry = zoo.zoo_entry(zoo.DEFAULT_MODEL)
    assert default_model.mask_set.describe() == entry["threat_model"]
    assert len(default_model.mask_set) == entry["num_masks"] == 36
    assert list(default_model.mask_set.patch_size) == entry["patch"]
    assert default_model.pretrained_info["metrics"]["certified_accuracy"] == entry["metrics"]["certified_accuracy"]
    assert len(zoo.builtin_dataset(entry["dataset"])) == entry["metrics"]["num_images"]


def test_shipped_version_1_config_loads_as_patchcleanser(default_model, tmp_path):
    """Issue 11: the embedded model's first config (format version 1, kept in tests/data) still
    loads, as a float32 PatchCleanser with margin 0, the rule it was certified with."""
    import shutil

    folder = Path(str(zoo._ZOO / zoo.zoo_entry(zoo.DEFAULT_MODEL)["embedded"]))
    shutil.copy(folder / "model.safetensors", tmp_path / "model.safetensors")
    shutil.copy(ROOT / "tests" / "data" / "mnist_test_resnet_msgc_v1_config.json", tmp_path / "config.json")
    section = json.loads((tmp_path / "config.json").read_text())["robustwrap"]
    assert section["format_version"] == 1 and "defense" not in section
    old = robustwrap.from_pretrained(str(tmp_path))
    assert type(old) is PatchCleanser and old.defense == "patchcleanser"
    assert old.precision == "float32" and old.margin == 0.0 and old.fill == 0.0
    assert old.batch_size == section["batch_size"]
    assert old.settings()["mask_set"] == {k: v for k, v in section["mask_set"].items() if k != "description"} | {
        "num_masks": old.settings()["mask_set"].get("num_masks")
    }
    assert old.pretrained_info == {k: section[k] for k in ("strategy", "dataset", "metrics")}
    # today's shipped config: the same model and threat model, format 2, the default margin
    shipped = json.loads((folder / "config.json").read_text())["robustwrap"]
    assert shipped["format_version"] == 2 and default_model.margin == DEFAULT_MARGIN == shipped["margin"]
    assert default_model.settings() | {"margin": 0.0} == old.settings()


def test_embedded_default_certifies_real_digits(default_model):
    x, y = heldout(default_model, 64)
    result = default_model.certify(x, y)
    assert (result.prediction == y).float().mean() >= 0.9  # random weights would give about 10%
    assert result.certified.any()
    assert not (result.certified & (result.prediction != y)).any()


def test_resaved_default_round_trips_as_version_2(default_model, tmp_path):
    default_model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["robustwrap"]["format_version"] == 2
    again = robustwrap.from_pretrained(str(tmp_path))
    x, _ = heldout(default_model, 8)
    assert again.settings() == default_model.settings() and torch.equal(again(x), default_model(x))
    assert again.pretrained_info == default_model.pretrained_info


@pytest.mark.skipif(
    tuple(int(v) for v in timm.__version__.split(".")[:3]) < (1, 0, 26),
    reason="timm < 1.0.26 reads a local-dir: checkpoint with torch.load, which cannot read safetensors",
)
def test_plain_timm_loads_the_embedded_base(default_model):
    folder = Path(str(zoo._ZOO / zoo.zoo_entry(zoo.DEFAULT_MODEL)["embedded"]))
    base = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    x, _ = heldout(default_model, 8)
    with torch.no_grad():
        assert torch.equal(base(x), default_model.model(x))


def test_zoo_sha256_is_checked(tmp_path, monkeypatch):
    torch.manual_seed(0)
    model = robustwrap.wrap(timm.create_model("test_resnet", num_classes=5, in_chans=1), image_size=32, patch=0.02).eval()
    model.save_pretrained(tmp_path / "zoo_model")
    real = hub.sha256_of(tmp_path / "zoo_model" / "model.safetensors")
    entry = {"name": "toy", "embedded": "zoo_model", "sha256": real}
    monkeypatch.setattr(zoo, "_ZOO", tmp_path)
    monkeypatch.setattr(zoo, "_manifest", lambda: {"default": "toy", "models": [entry]})
    assert zoo.list_models() == ["toy"] and hub.list_models() == ["toy"]  # the old home still answers
    x = torch.randn(2, 1, 32, 32)
    assert torch.equal(robustwrap.create_model("toy")(x), model(x))
    assert torch.equal(robustwrap.from_pretrained("toy")(x), model(x))
    random_init = robustwrap.create_model("toy", pretrained=False)
    assert random_init.mask_set == model.mask_set and not torch.equal(random_init(x), model(x))
    with pytest.raises(TypeError, match="revision='v2' does not apply to the zoo model 'toy'"):
        robustwrap.from_pretrained("toy", revision="v2")
    entry["sha256"] = "0" * 64
    with pytest.raises(ValueError, match="the zoo manifest records 0000"):
        robustwrap.create_model("toy")
    with pytest.raises(ValueError, match="unknown robustwrap model 'nope'; the zoo has: toy"):
        robustwrap.create_model("nope")


def test_torch_hub_entry_points(default_model):
    hubconf = torch.hub._import_module("hubconf", str(ROOT / "hubconf.py"))
    listed = sorted(f for f in dir(hubconf) if callable(getattr(hubconf, f)) and not f.startswith("_"))
    assert listed == sorted([*zoo.list_models(), "robust_model"])  # what torch.hub.list shows
    x, _ = heldout(default_model, 8)
    by_name = torch.hub.load(str(ROOT), zoo.DEFAULT_MODEL, source="local")
    generic = torch.hub.load(str(ROOT), "robust_model", zoo.DEFAULT_MODEL, source="local")
    assert torch.equal(by_name(x), default_model(x)) and torch.equal(generic(x), default_model(x))
    untrained = torch.hub.load(str(ROOT), zoo.DEFAULT_MODEL, source="local", pretrained=False)
    assert untrained.mask_set == default_model.mask_set and not torch.equal(untrained(x), default_model(x))


def test_hubconf_survives_an_entry_without_metrics(monkeypatch):
    """Issue 9.7: one manifest entry without metrics must not break torch.hub for every model."""
    manifest = zoo._manifest()
    bare = {"name": "unmeasured", "embedded": manifest["models"][0]["embedded"], "sha256": manifest["models"][0]["sha256"]}
    monkeypatch.setattr(zoo, "_manifest", lambda: {**manifest, "models": [*manifest["models"], bare]})
    hubconf = torch.hub._import_module("hubconf_unmeasured", str(ROOT / "hubconf.py"))
    assert callable(hubconf.unmeasured) and callable(getattr(hubconf, zoo.DEFAULT_MODEL))
    assert "certified accuracy not measured" in hubconf.unmeasured.__doc__
    assert "certified accuracy 66.0%" in getattr(hubconf, zoo.DEFAULT_MODEL).__doc__
    unmeasured = torch.hub.load(str(ROOT), "unmeasured", source="local")  # through torch.hub itself
    assert unmeasured.settings() == robustwrap.create_model(zoo.DEFAULT_MODEL).settings()
