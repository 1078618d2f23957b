"""Hub format: save/load round trips through a folder and an offline HF cache; strict, safe loading."""

from __future__ import annotations

import json
import pickle
import shutil
import socket
import types
from pathlib import Path

import huggingface_hub
import pytest
import safetensors.torch
import timm
import torch
import torchvision
from huggingface_hub import ModelCard
from huggingface_hub import constants as hf_constants
from torch import nn

import robustwrap
from robustwrap import hub
from robustwrap.cli import main as cli_main
from robustwrap.dataset import model_fingerprint
from robustwrap.defenses.base import RobustPatchClassifier
from robustwrap.defenses.patchcleanser import PatchCleanser
from robustwrap.geometry import MaskSet

# timm < 1.0.26 reads a local-dir: checkpoint with torch.load, which cannot read safetensors
# (hf-hub: names load safetensors on every timm version pyproject allows).
TIMM_LOADS_LOCAL_SAFETENSORS = tuple(int(v) for v in timm.__version__.split(".")[:3]) >= (1, 0, 26)

INFO = {
    "strategy": "multisize_greedy",
    "dataset": "mnist",
    "metrics": {"vanilla_accuracy": 0.9, "clean_accuracy": 0.875, "certified_accuracy": 0.5, "split": "heldout"},
}


def tiny_timm(seed=0, num_classes=5):
    torch.manual_seed(seed)
    return timm.create_model("test_resnet", num_classes=num_classes, in_chans=1)


def robust(seed=0, **options):
    """A defended tiny model whose figures carry its fingerprint, as `CertificationReport.metrics` gives them."""
    model = robustwrap.wrap(tiny_timm(seed), image_size=32, patch=0.02, batch_size=64, **options).eval()
    model.pretrained_info = json.loads(json.dumps(INFO))
    model.pretrained_info["metrics"]["fingerprint"] = model_fingerprint(model)
    return model


def digits(n=4):
    return torch.randn(n, 1, 32, 32, generator=torch.Generator().manual_seed(1))


def same_model(a, b, x=None):
    x = digits() if x is None else x
    assert type(a) is type(b)
    assert a.settings() == b.settings()
    assert torch.equal(a(x), b(x))


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    """An offline Hugging Face cache.

    huggingface_hub reads its constants at import (and version 0.23 copies HF_HUB_CACHE into
    `file_download`), so patch them where they are read.
    """
    cache = tmp_path / "hf-cache"
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.file_download, "HF_HUB_CACHE", str(cache), raising=False)
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def publish(repo_id: str, folder: Path, sha: str, refs: tuple[str, ...] = ("main",)) -> None:
        repo = cache / f"models--{repo_id.replace('/', '--')}"
        shutil.copytree(folder, repo / "snapshots" / sha)
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        for ref in refs:
            (repo / "refs" / ref).write_text(sha)

    publish.cache = cache
    return publish


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens on it once closed: connections are refused at once


# ------------------------------------------------------------------------------ format v2
def test_local_folder_round_trip(tmp_path):
    model = robust()
    model.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["architecture"] == "test_resnet" and config["num_classes"] == 5
    assert config["model_args"] == {"num_classes": 5, "in_chans": 1, "global_pool": "avg"}
    assert config["pretrained_cfg"]["input_size"] == [1, 32, 32] and config["pretrained_cfg"]["num_classes"] == 5
    assert "hf_hub_id" not in config["pretrained_cfg"]  # where the source weights came from is not this repo
    section = config["robustwrap"]
    assert section["mask_set"]["patch_sizes"] == [[5, 5]] and len(section["mask_set"]["boxes"]) == 36
    assert set(safetensors.torch.load_file(tmp_path / "model.safetensors")) == set(model.model.state_dict())

    for loaded in (
        RobustPatchClassifier.from_pretrained(tmp_path),
        PatchCleanser.from_pretrained(str(tmp_path)),
        robustwrap.from_pretrained(str(tmp_path)),
        robustwrap.from_pretrained(f"local-dir:{tmp_path}"),
    ):
        same_model(loaded, model)
        assert loaded.mask_set == model.mask_set and not loaded.training
        assert loaded.pretrained_info == model.pretrained_info


def test_section_is_version_2_with_the_settings_exactly(tmp_path):
    """Issue 11: format_version 2, the defense, m.settings() verbatim (precision, margin) and info."""
    model = robust(precision="bfloat16")
    model.save_pretrained(tmp_path)
    section = json.loads((tmp_path / "config.json").read_text())["robustwrap"]
    assert section["format_version"] == 2 and section["defense"] == "patchcleanser"
    assert {k: v for k, v in section.items() if k not in ("format_version", "base", "info")} == json.loads(json.dumps(model.settings()))
    assert section["precision"] == "bfloat16" and section["info"] == model.pretrained_info
    assert section["base"] == {"library": "timm", "architecture": "test_resnet"}
    loaded = robustwrap.from_pretrained(str(tmp_path))
    assert loaded.precision == "bfloat16" and loaded.settings() == model.settings()


def test_info_cannot_shadow_a_setting(tmp_path):
    """Issue 9.6: free-form pretrained_info is nested under its own key."""
    model = robust()
    shadows = {"fill": 9.0, "mask_set": "junk", "precision": "float16", "defense": "smoothing", "format_version": 7}
    model.pretrained_info = {**model.pretrained_info, **shadows}
    model.save_pretrained(tmp_path)
    loaded = robustwrap.from_pretrained(str(tmp_path))
    same_model(loaded, model)
    assert loaded.fill == model.fill and loaded.precision == "float32"
    assert loaded.pretrained_info == model.pretrained_info


def test_version_1_config_loads_as_patchcleanser(tmp_path):
    """Issue 11: today's format (no defense; settings and info at the top of the section)."""
    model = robust()
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    ms = model.mask_set
    config["robustwrap"] = {
        "format_version": 1,
        "image_size": [32, 32],
        "in_chans": 1,
        "num_classes": 5,
        "fill": 0.0,
        "batch_size": 7,
        "mask_set": {**ms.to_dict(), "description": ms.describe()},
        "base": {"library": "timm", "architecture": "test_resnet"},
        **INFO,
    }
    (tmp_path / "config.json").write_text(json.dumps(config))
    loaded = RobustPatchClassifier.from_pretrained(tmp_path)
    assert isinstance(loaded, PatchCleanser) and loaded.defense == "patchcleanser"
    assert loaded.precision == "float32" and loaded.margin == 0.0 and loaded.batch_size == 7
    loaded.batch_size = 64  # another batch composition may move logits in the last bits
    loaded.margin = model.margin  # version 1 meant margin 0; the model saved here has today's default
    same_model(loaded, model)
    assert loaded.pretrained_info == INFO


DEFENSE_CASES = {
    "patchcleanser": lambda: robustwrap.wrap(tiny_timm(), image_size=32, patch=5, num_masks=3, precision="bfloat16", margin=0.5),
    "smoothing-column": lambda: robustwrap.wrap(tiny_timm(), image_size=32, patch=5, defense="smoothing", ablation="column", size=4, stride=3, threshold=0.3),
    "smoothing-levine2020": lambda: robustwrap.wrap(
        timm.create_model("test_resnet", num_classes=5, in_chans=2), image_size=32, patch=5, defense="smoothing", ablation="block", size=8, encoding="levine2020"
    ),
    "patchguard": lambda: robustwrap.wrap(timm.create_model("bagnet_tiny", num_classes=5), image_size=32, patch=3, defense="patchguard"),
}


@pytest.mark.parametrize("case", sorted(DEFENSE_CASES))
def test_every_defense_round_trips_through_folder_and_hf_cache(tmp_path, hf_cache, case):
    """Issue 11: format version 2 carries any defense; loading dispatches on its name."""
    torch.manual_seed(0)
    model = DEFENSE_CASES[case]().eval()
    model.pretrained_info = {"dataset": "noise"}
    model.save_pretrained(tmp_path / "repo")
    section = json.loads((tmp_path / "repo" / "config.json").read_text())["robustwrap"]
    assert section["defense"] == model.defense and section["info"] == {"dataset": "noise"}
    hf_cache("acme/any-defense", tmp_path / "repo", "f" * 40)
    for loaded in (robustwrap.from_pretrained(str(tmp_path / "repo")), RobustPatchClassifier.from_pretrained("hf-hub:acme/any-defense")):
        same_model(loaded, model)
        assert loaded.pretrained_info == {"dataset": "noise"}
    if not isinstance(model, PatchCleanser):
        with pytest.raises(TypeError, match=f"holds a {type(model).__name__} .*, not a PatchCleanser"):
            PatchCleanser.from_pretrained(str(tmp_path / "repo"))


def test_loading_dispatches_on_the_defense_name(tmp_path, monkeypatch):
    """The class named by `defense` builds the model, through its from_settings."""
    calls = []

    class Recorded(PatchCleanser):
        @classmethod
        def from_settings(cls, base, settings, **runtime):
            calls.append(settings["defense"])
            return super().from_settings(base, settings, **runtime)

    model = robust()
    model.save_pretrained(tmp_path)
    monkeypatch.setattr(hub, "_defense_classes", lambda: {"patchcleanser": Recorded})
    loaded = robustwrap.from_pretrained(str(tmp_path))
    assert type(loaded) is Recorded and calls == ["patchcleanser"]
    with pytest.raises(TypeError, match="holds a Recorded"):
        hub.load(str(tmp_path), expect=torchvision.models.ResNet)
    monkeypatch.setattr(hub, "_defense_classes", lambda: {"smoothing": Recorded})
    with pytest.raises(ValueError, match="unknown defense 'patchcleanser'; this robustwrap knows smoothing"):
        robustwrap.from_pretrained(str(tmp_path))


# ----------------------------------------------------------------------- timm compatibility
def test_config_comes_from_public_timm_api(tmp_path, monkeypatch):
    """Issue 9.6: no private timm writer (save_config_for_hf(data_config=) exists in timm 1.0.31 only)."""
    source = Path(hub.__file__).read_text()
    assert "timm.models._" not in source and "from timm.models._" not in source

    def boom(*args, **kwargs):
        raise AssertionError("private timm API used")

    import timm.models._hub as private

    monkeypatch.setattr(private, "save_config_for_hf", boom)
    model = robust()
    model.save_pretrained(tmp_path)
    same_model(robustwrap.from_pretrained(str(tmp_path)), model)


def test_plain_timm_loads_the_base_model(tmp_path, hf_cache):
    model = robust(3)
    model.save_pretrained(tmp_path / "repo")
    hf_cache("acme/robust-digits", tmp_path / "repo", "c" * 40)
    x = digits()
    bases = [timm.create_model("hf-hub:acme/robust-digits", pretrained=True)]
    if TIMM_LOADS_LOCAL_SAFETENSORS:
        bases.append(timm.create_model(f"local-dir:{tmp_path / 'repo'}", pretrained=True))
    for base in bases:
        with torch.no_grad():
            assert torch.equal(base.eval()(x), model.model(x))
        assert tuple(base.pretrained_cfg["input_size"]) == (1, 32, 32) and base.num_classes == 5


def test_fixed_input_size_model_round_trips(tmp_path):
    """A ViT built for 32x32 records its img_size, so its position embedding rebuilds."""
    torch.manual_seed(0)
    vit = timm.create_model("test_vit", img_size=32, num_classes=3, in_chans=1)
    model = robustwrap.wrap(vit, image_size=32, patch=4, num_masks=3).eval()
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["model_args"]["img_size"] == [32, 32]
    same_model(robustwrap.from_pretrained(str(tmp_path)), model)


def test_vit_with_another_patch_size_round_trips(tmp_path):
    """A ViT for small images built with 4x4 tokens records its patch_size (its patch_embed and
    pos_embed shapes depend on it), so smoothing's token-dropping models save and load."""
    torch.manual_seed(0)
    vit = timm.create_model("test_vit", img_size=16, patch_size=4, num_classes=3)
    model = robustwrap.wrap(vit, defense="smoothing", image_size=16, patch=3, size=4).eval()
    assert model.drop_tokens
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["model_args"]["patch_size"] == [4, 4]
    x = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    same_model(robustwrap.from_pretrained(str(tmp_path)), model, x)


@pytest.mark.parametrize(
    "changed",
    [{"embed_dim": 96, "depth": 2}, {"num_heads": 4}, {"embed_dim": 96, "depth": 1, "num_heads": 2, "mlp_ratio": 2.0, "qkv_bias": False}],
)
def test_vit_built_with_other_arguments_round_trips(tmp_path, changed):
    """Issue 23.16: a ViT built with another width, depth, heads or MLP saves what timm needs to rebuild it.

    `num_heads` changes no weight's shape: a repo that did not record it would load and compute something else.
    """
    torch.manual_seed(0)
    base = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, num_classes=3, **changed)
    model = robustwrap.wrap(base, patch=0.02).eval()
    model.save_pretrained(tmp_path)
    model_args = json.loads((tmp_path / "config.json").read_text())["model_args"]
    assert {k: model_args[k] for k in changed} == changed
    try:  # timm builds the architecture's defaults on the meta device (timm < 1.0.2x cannot: then every argument is recorded)
        with torch.device("meta"):
            timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, num_classes=3)
        assert "class_token" not in model_args  # only what differs from the name's
    except RuntimeError:
        assert model_args["class_token"] is True
    x = torch.randn(2, 3, 32, 32)
    same_model(robustwrap.from_pretrained(tmp_path), model, x)
    if TIMM_LOADS_LOCAL_SAFETENSORS:
        with torch.no_grad():
            assert torch.equal(timm.create_model(f"local-dir:{tmp_path}", pretrained=True).eval()(x), base(x))


def test_edited_head_is_refused_at_save_and_leaves_no_folder(tmp_path):
    """Issue 9.6: saving refuses what loading cannot rebuild (checked on the meta device)."""
    base = tiny_timm()
    base.fc = nn.Sequential(nn.Dropout(0.1), nn.Linear(base.fc.in_features, 5))
    model = robustwrap.wrap(base, image_size=32, patch=0.02).eval()
    with pytest.raises(ValueError, match=r"cannot save this test_resnet base model: .*fc\.1\.weight.*reset_classifier"):
        model.save_pretrained(tmp_path / "out")
    assert not (tmp_path / "out").exists()
    base.reset_classifier(7)  # timm's own way to change the head does round-trip
    model = robustwrap.wrap(base, image_size=32, patch=0.02).eval()
    model.save_pretrained(tmp_path / "ok")
    same_model(robustwrap.from_pretrained(str(tmp_path / "ok")), model)


def test_torchvision_base_round_trip(tmp_path):
    torch.manual_seed(0)
    net = torchvision.models.get_model("resnet18", weights=None, num_classes=3)
    model = robustwrap.wrap(net, image_size=32, patch=4, num_masks=3).eval()
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert "architecture" not in config  # not a timm repo: documented as robustwrap-only
    assert config["robustwrap"]["base"] == {"library": "torchvision", "architecture": "resnet18", "kwargs": {"num_classes": 3}}
    same_model(robustwrap.from_pretrained(str(tmp_path)), model, torch.randn(2, 3, 32, 32))


def test_custom_module_cannot_be_saved_and_leaves_no_folder(tmp_path):
    """Issue 10.8: a failed save_pretrained leaves no empty folder behind."""
    model = robustwrap.wrap(nn.Sequential(nn.Conv2d(1, 2, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten()), image_size=16, patch=3, num_masks=3)
    with pytest.raises(TypeError, match="cannot save a Sequential base model"):
        model.save_pretrained(tmp_path / "new" / "model")
    assert not (tmp_path / "new").exists()


def test_failed_write_removes_the_folder_it_created(tmp_path, monkeypatch):
    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(hub.safetensors.torch, "save_file", disk_full)
    with pytest.raises(OSError, match="No space left"):
        robust().save_pretrained(tmp_path / "model")
    assert not (tmp_path / "model").exists()
    (tmp_path / "kept").mkdir()
    with pytest.raises(OSError):
        robust().save_pretrained(tmp_path / "kept")
    assert (tmp_path / "kept").is_dir()  # a folder the user had stays


def test_save_pretrained_refuses_a_folder_of_other_files(tmp_path):
    """Issue 23.16: one rule for save_pretrained and the CLI's --out: a new or empty folder, or an earlier save."""
    folder = tmp_path / "project"
    folder.mkdir()
    (folder / "README.md").write_text("my project")
    refusal = r"save_directory .*project is neither empty nor an earlier robustwrap save \(it holds README.md\).*overwrite=True"
    with pytest.raises(FileExistsError, match=refusal):
        robust().save_pretrained(folder)
    assert sorted(p.name for p in folder.iterdir()) == ["README.md"] and (folder / "README.md").read_text() == "my project"
    with pytest.raises(FileExistsError, match="is a file, not a folder"):
        robust().save_pretrained(folder / "README.md")

    robust().save_pretrained(folder, overwrite=True)
    same_model(robustwrap.from_pretrained(folder), robust())

    # An earlier save is replaced, as huggingface_hub's save_pretrained replaces one; its other files stay.
    (tmp_path / "saved").mkdir()
    robust(seed=0).save_pretrained(tmp_path / "saved")
    (tmp_path / "saved" / "notes.txt").write_text("epoch 1")
    robust(seed=3).save_pretrained(tmp_path / "saved")
    same_model(robustwrap.from_pretrained(tmp_path / "saved"), robust(seed=3))
    assert (tmp_path / "saved" / "notes.txt").read_text() == "epoch 1"


def test_cli_out_follows_the_save_pretrained_rule(tmp_path, capsys):
    """Issue 23.16: `robustwrap train --out` refuses (before training) what save_pretrained refuses, and takes what it takes."""
    from PIL import Image

    for c in "01":
        (tmp_path / "train" / c).mkdir(parents=True)
        Image.fromarray(torch.randint(0, 256, (32, 32, 3), dtype=torch.uint8).numpy()).save(tmp_path / "train" / c / "a.png")
    argv = ["train", "--model", "timm:test_resnet", "--image-size", "32", "--num-classes", "2", "--num-masks", "3"]
    argv += ["--workers", "0", "--no-progress", "--epochs", "1", "--data", str(tmp_path / "train"), "--out"]
    (tmp_path / "project").mkdir()
    (tmp_path / "project" / "config.json").write_text("{}")
    with pytest.raises(FileExistsError) as python_refusal:
        hub.check_save_folder(tmp_path / "project", argument="--out")
    assert cli_main([*argv, str(tmp_path / "project")]) == 1
    printed = capsys.readouterr()
    assert printed.err == f"robustwrap train: error: {python_refusal.value}\n" and "epoch" not in printed.out
    assert (tmp_path / "project" / "config.json").read_text() == "{}"

    robust().save_pretrained(tmp_path / "earlier")
    assert cli_main([*argv, str(tmp_path / "earlier")]) == 0, capsys.readouterr().err
    assert robustwrap.from_pretrained(tmp_path / "earlier").num_classes == 2  # the trained model replaced the earlier save


def test_save_pretrained_config_argument_is_refused(tmp_path):
    """Issue 10.8: config= is not silently ignored: it raises, and nothing is written."""
    with pytest.raises(TypeError, match=r"save_pretrained\(config=...\) is not supported.*pretrained_info"):
        robust().save_pretrained(tmp_path / "m", config={"fill": 1.0})
    assert not (tmp_path / "m").exists()


# ------------------------------------------------------------------------------ model card
def test_model_card_metadata(tmp_path):
    robust().save_pretrained(tmp_path)
    card = ModelCard.load(tmp_path / "README.md")
    results = {r.metric_name: r.metric_value for r in card.data.eval_results}
    threat = "patchcleanser, 5x5 px patch (2.44% of 32x32), 36 masks"
    assert results == {
        "vanilla clean accuracy (undefended base model)": 0.9,
        f"defended clean accuracy ({threat})": 0.875,
        f"certified accuracy ({threat})": 0.5,
    }
    assert card.data.library_name == "timm" and "robustwrap" in card.data.tags and "patchcleanser" in card.data.tags
    assert card.data.eval_results[0].dataset_name == "mnist"
    assert "github.com/robustwrap" not in card.text  # no made-up URLs


def noise_digits(n=6, seed=2):
    """`n` noise images of the tiny model's shape with labels cycling over its 5 classes."""
    images = torch.randn(n, 1, 32, 32, generator=torch.Generator().manual_seed(seed))
    return torch.utils.data.TensorDataset(images, torch.arange(n) % 5)


def figures(folder: Path) -> tuple[dict | None, list]:
    """`(the metrics config.json carries, the card's model-index results)` of a saved folder."""
    info = json.loads((folder / "config.json").read_text())["robustwrap"]["info"]
    return info.get("metrics"), ModelCard.load(folder / "README.md").data.eval_results or []


def one_training_step(model):
    loader = torch.utils.data.DataLoader(noise_digits(4), batch_size=4)
    robustwrap.fit_masking(model, loader, strategy="none", epochs=1, lr=0.5, progress=False)
    model.eval()


def assign_another_model(model):
    model.model = tiny_timm(seed=1)


def edit_a_weight(model):
    with torch.no_grad():
        model.model.conv1[0].weight[0, 0, 0, 0] += 1.0


def change_a_setting(model):
    model.fill = 0.5


@pytest.mark.parametrize("change", [one_training_step, assign_another_model, edit_a_weight, change_a_setting])
def test_measured_figures_never_travel_to_other_weights(tmp_path, change):
    """Issue 23.2: a card and a config claim only what was measured on the weights and settings they hold."""
    model = robustwrap.wrap(tiny_timm(), image_size=32, patch=0.02).eval()
    report = robustwrap.certify_dataset(model, noise_digits(), progress=False)
    model.pretrained_info = {"dataset": "noise", "metrics": report.metrics(split="val", command="python measure.py")}
    model.save_pretrained(tmp_path / "measured")
    metrics, results = figures(tmp_path / "measured")
    assert metrics == report.metrics(split="val", command="python measure.py") and metrics["fingerprint"] == report.fingerprint
    assert {r.metric_value for r in results} == {metrics[k] for k in ("vanilla_accuracy", "clean_accuracy", "certified_accuracy")}
    assert report.fingerprint in (tmp_path / "measured" / "README.md").read_text()

    # Loading and saving again keeps them: the same weights and settings.
    loaded = robustwrap.from_pretrained(tmp_path / "measured")
    loaded.save_pretrained(tmp_path / "again")
    assert figures(tmp_path / "again") == (metrics, results)

    change(loaded)
    with pytest.warns(UserWarning, match=r"measured on other weights or settings.*left out of config.json and the model card"):
        loaded.save_pretrained(tmp_path / "changed")
    metrics, results = figures(tmp_path / "changed")
    assert metrics is None and results == []
    assert "certified accuracy" not in (tmp_path / "changed" / "README.md").read_text()
    info = robustwrap.from_pretrained(tmp_path / "changed").pretrained_info
    if change is one_training_step:  # fit_masking records the run that made the new weights, and it travels with them
        assert info.pop("training")["epochs"] == 1 and info.pop("strategy") == "none"
    assert info == {"dataset": "noise"}
    # Measuring the changed model again gives figures that travel with it.
    loaded.pretrained_info["metrics"] = robustwrap.certify_dataset(loaded, noise_digits(), progress=False).metrics()
    loaded.save_pretrained(tmp_path / "remeasured")
    assert figures(tmp_path / "remeasured")[0] == loaded.pretrained_info["metrics"]


def test_random_weights_of_a_saved_model_carry_no_figures(tmp_path):
    """`weights=False` (`pretrained=False`) builds random weights: the saved figures are not theirs."""
    robust().save_pretrained(tmp_path)
    random_init = hub.load_folder(tmp_path, weights=False)
    assert "metrics" not in random_init.pretrained_info and random_init.pretrained_info["dataset"] == INFO["dataset"]
    assert hub.load_folder(tmp_path).pretrained_info["metrics"]["certified_accuracy"] == INFO["metrics"]["certified_accuracy"]


def test_figures_without_a_fingerprint_are_left_out(tmp_path):
    """Typed-in accuracies cannot be checked against the weights: the card does not claim them."""
    model = robust()
    del model.pretrained_info["metrics"]["fingerprint"]
    with pytest.warns(UserWarning, match="carry no fingerprint"):
        model.save_pretrained(tmp_path)
    assert figures(tmp_path) == (None, [])


def test_trained_figures_belong_to_the_saved_weights(tmp_path, capsys):
    """Issue 23.2: `robustwrap train` records figures of the weights it saves; training them further drops them."""
    from PIL import Image

    for split, n in (("train", 2), ("val", 1)):
        for c in "012":
            (tmp_path / split / c).mkdir(parents=True)
            for i in range(n):
                pixels = torch.randint(0, 256, (36, 36, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(i))
                Image.fromarray(pixels.numpy()).save(tmp_path / split / c / f"{i}.png")
    out = tmp_path / "trained"
    argv = ["train", "--model", "timm:test_vit", "--image-size", "32", "--num-classes", "3", "--num-masks", "3"]
    argv += ["--workers", "0", "--no-progress", "--epochs", "1", "--data", str(tmp_path / "train"), "--val-data", str(tmp_path / "val")]
    argv += ["--out", str(out)]
    assert cli_main(argv) == 0, capsys.readouterr().err
    trained = robustwrap.from_pretrained(out)
    metrics, results = figures(out)
    assert metrics["fingerprint"] == model_fingerprint(trained) and len(results) == 3
    images = torch.utils.data.TensorDataset(torch.rand(3, 3, 32, 32), torch.arange(3))
    robustwrap.fit_masking(trained, torch.utils.data.DataLoader(images, batch_size=3), strategy="none", epochs=1, progress=False)
    with pytest.warns(UserWarning, match="measured on other weights"):
        trained.eval().save_pretrained(tmp_path / "further")
    assert figures(tmp_path / "further") == (None, [])


def test_pushed_card_names_the_real_repo_id(monkeypatch):
    """Issue 9.6: the card goes through generate_model_card with the repo id the Hub returned."""
    pushed = {}

    def create_repo(self, repo_id, **kwargs):
        return types.SimpleNamespace(repo_id=repo_id if "/" in repo_id else f"someone/{repo_id}")

    def upload_folder(self, *, repo_id, folder_path, **kwargs):
        pushed[repo_id] = {p.name: p.read_text() if p.suffix != ".safetensors" else None for p in Path(folder_path).iterdir()}
        return f"https://example.invalid/{repo_id}/commit/1"

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    model = robust()
    seen = []
    original = type(model).generate_model_card
    monkeypatch.setattr(type(model), "generate_model_card", lambda self, *a, **k: seen.append(k.get("repo_id")) or original(self, *a, **k))
    model.push_to_hub("digits")
    card = pushed["someone/digits"]["README.md"]
    assert 'robustwrap.from_pretrained("hf-hub:someone/digits")' in card and 'timm.create_model("hf-hub:someone/digits"' in card
    assert "<org>" not in card and seen == ["someone/digits"]
    assert ModelCard(card).data.model_name == "someone/digits"
    assert sorted(pushed["someone/digits"]) == ["README.md", "config.json", "model.safetensors"]
    assert len(ModelCard(card).data.eval_results) == 3

    # Issue 23.2: a push of changed weights carries none of the old figures.
    edit_a_weight(model)
    with pytest.warns(UserWarning, match="measured on other weights"):
        model.push_to_hub("digits")
    assert ModelCard(pushed["someone/digits"]["README.md"]).data.eval_results is None
    assert "metrics" not in json.loads(pushed["someone/digits"]["config.json"])["robustwrap"]["info"]


# ------------------------------------------------------------------- names and the HF cache
def test_offline_hf_cache_by_repo_id_and_revision(tmp_path, hf_cache):
    first, second = robust(0), robust(1)
    first.save_pretrained(tmp_path / "a")
    second.save_pretrained(tmp_path / "b")
    sha_a, sha_b = "a" * 40, "b" * 40
    hf_cache("acme/robust-digits", tmp_path / "a", sha_a, refs=("main",))
    hf_cache("acme/robust-digits", tmp_path / "b", sha_b, refs=("v2",))
    x = digits()
    assert torch.equal(robustwrap.from_pretrained("hf-hub:acme/robust-digits")(x), first(x))
    assert torch.equal(robustwrap.from_pretrained("hf-hub:acme/robust-digits@v2")(x), second(x))
    assert torch.equal(robustwrap.from_pretrained("hf-hub:acme/robust-digits", revision=sha_b)(x), second(x))
    with pytest.raises(FileNotFoundError, match="hf-hub:acme/robust-digits@v3 is not in the Hugging Face cache"):
        robustwrap.from_pretrained("hf-hub:acme/robust-digits@v3")
    with pytest.raises(ValueError, match="two revisions"):
        robustwrap.from_pretrained("hf-hub:acme/robust-digits@v2", revision="main")


@pytest.mark.parametrize("load", [robustwrap.from_pretrained, RobustPatchClassifier.from_pretrained, PatchCleanser.from_pretrained])
def test_both_from_pretrained_accept_every_spelling(tmp_path, hf_cache, load):
    """Issue 9.6: hf-hub:org/x, org/x, local-dir:/path and folders, for the function and the class."""
    first, second = robust(0), robust(1)
    first.save_pretrained(tmp_path / "a")
    second.save_pretrained(tmp_path / "b")
    hf_cache("acme/robust-digits", tmp_path / "a", "a" * 40, refs=("main",))
    hf_cache("acme/robust-digits", tmp_path / "b", "b" * 40, refs=("v2",))
    for name in ("hf-hub:acme/robust-digits", "acme/robust-digits", f"local-dir:{tmp_path / 'a'}", str(tmp_path / "a"), tmp_path / "a"):
        same_model(load(name), first)
    for name, kwargs in (("hf-hub:acme/robust-digits@v2", {}), ("acme/robust-digits@v2", {}), ("acme/robust-digits", {"revision": "v2"})):
        same_model(load(name, **kwargs), second)


def test_name_errors():
    with pytest.raises(ValueError, match="is not an existing folder, local-dir:<folder>, hf-hub:<org>/<name>"):
        robustwrap.from_pretrained("no such thing")
    with pytest.raises(ValueError, match="hf-hub:<org>/<name>"):
        robustwrap.from_pretrained("hf-hub:not-a-repo")


def test_missing_local_dir_says_it_does_not_exist(tmp_path):
    """Issue 10.8: not 'not a robustwrap folder' for a folder that is not there."""
    for load in (robustwrap.from_pretrained, RobustPatchClassifier.from_pretrained):
        with pytest.raises(FileNotFoundError, match=f"folder {tmp_path / 'nope'} does not exist"):
            load(f"local-dir:{tmp_path / 'nope'}")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json in .*empty: not a robustwrap model folder"):
        robustwrap.from_pretrained(f"local-dir:{tmp_path / 'empty'}")


def test_uncached_model_offline_fails_in_one_line(hf_cache):
    """Issue 10.7: with HF_HUB_OFFLINE=1, one line: not cached, how to get it."""
    with pytest.raises(FileNotFoundError) as info:
        robustwrap.from_pretrained("hf-hub:acme/never-downloaded")
    message = str(info.value)
    assert "\n" not in message and info.value.__suppress_context__
    assert "hf-hub:acme/never-downloaded is not in the Hugging Face cache" in message and "HF_HUB_OFFLINE is set" in message
    assert "download it once where the Hub can be reached" in message and str(hf_cache.cache) in message


def test_uncached_model_without_network_fails_fast_in_one_line(tmp_path, hf_cache, monkeypatch):
    """Issue 10.7: without HF_HUB_OFFLINE and without network, no half-minute of retries.

    The endpoint is a closed local port; the cache is asked with local_files_only=True (no
    retries), and the message says that HF_HUB_OFFLINE=1 skips the network.
    """
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(hf_constants, "ENDPOINT", f"http://127.0.0.1:{closed_port()}")
    asked = []
    real = hub.hf_hub_download
    monkeypatch.setattr(hub, "hf_hub_download", lambda *a, **k: asked.append(k["local_files_only"]) or real(*a, **k))
    with pytest.raises(FileNotFoundError) as info:
        robustwrap.from_pretrained("acme/never-downloaded")
    message = str(info.value)
    assert "\n" not in message and "is not in the Hugging Face cache" in message and "cannot be reached" in message
    assert "set HF_HUB_OFFLINE=1 to skip the network and fail at once" in message
    assert asked == [True]
    model = robust()  # a cached model loads from the cache at once
    model.save_pretrained(tmp_path / "repo")
    hf_cache("acme/cached", tmp_path / "repo", "e" * 40)
    same_model(robustwrap.from_pretrained("hf-hub:acme/cached"), model)


# ------------------------------------------------------------------------ untrusted files
class _Boom:
    """Unpickling this writes a marker file: proof that a loader unpickled it."""

    marker: Path

    def __reduce__(self):
        return (Path.write_text, (self.marker, "unpickled!"))


def test_pickle_checkpoint_is_refused_and_never_unpickled(tmp_path):
    robust().save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    boom = _Boom()
    boom.marker = tmp_path / "marker"
    (tmp_path / "pytorch_model.bin").write_bytes(pickle.dumps(boom))
    with pytest.raises(FileNotFoundError, match=r"found pytorch_model.bin: pickle checkpoints are refused"):
        robustwrap.from_pretrained(str(tmp_path))
    assert not boom.marker.exists()


def test_pickle_only_hub_repo_is_refused(tmp_path, hf_cache):
    robust().save_pretrained(tmp_path / "repo")
    (tmp_path / "repo" / "model.safetensors").rename(tmp_path / "repo" / "pytorch_model.bin")
    hf_cache("acme/pickled", tmp_path / "repo", "d" * 40)
    with pytest.raises(FileNotFoundError, match="model.safetensors is not in the Hugging Face cache.*only from safetensors"):
        robustwrap.from_pretrained("hf-hub:acme/pickled")


def test_corrupted_safetensors(tmp_path):
    robust().save_pretrained(tmp_path)
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="is not a readable safetensors file"):
        robustwrap.from_pretrained(str(tmp_path))


def test_missing_and_extra_keys(tmp_path):
    model = robust()
    model.save_pretrained(tmp_path)
    state = safetensors.torch.load_file(tmp_path / "model.safetensors")
    removed = sorted(state)[0]
    del state[removed]
    safetensors.torch.save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=rf"missing keys \['{removed}'\]"):
        robustwrap.from_pretrained(str(tmp_path))
    state[removed] = model.model.state_dict()[removed]
    state["extra.weight"] = torch.zeros(1)
    safetensors.torch.save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"unexpected keys \['extra.weight'\]"):
        robustwrap.from_pretrained(str(tmp_path))


def test_broken_config_json_names_the_file(tmp_path):
    """Issue 10.8: not a bare JSONDecodeError."""
    robust().save_pretrained(tmp_path)
    text = (tmp_path / "config.json").read_text()
    (tmp_path / "config.json").write_text(text[: len(text) // 2])
    with pytest.raises(ValueError, match=rf"{tmp_path / 'config.json'} is not valid JSON \(.* at line \d+, column \d+\)") as info:
        robustwrap.from_pretrained(str(tmp_path))
    assert info.value.__suppress_context__
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="must hold a JSON object, got list"):
        robustwrap.from_pretrained(str(tmp_path))


def test_missing_config_unknown_version_unknown_architecture(tmp_path):
    robust().save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        hub.load_folder(tmp_path)
    bad = json.loads(json.dumps(config))
    bad["robustwrap"]["format_version"] = 99
    (tmp_path / "config.json").write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="format_version 99; this robustwrap reads versions 1, 2"):
        hub.load_folder(tmp_path)
    bad = json.loads(json.dumps(config))
    bad["robustwrap"]["base"]["architecture"] = bad["architecture"] = "no_such_net"
    (tmp_path / "config.json").write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="'no_such_net' .* is not a timm model"):
        hub.load_folder(tmp_path)
    del config["robustwrap"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="no 'robustwrap' section"):
        hub.load_folder(tmp_path)


def _corrupt(section, path, value):
    *parents, last = path
    for key in parents:
        section = section[key]
    section[last] = value


@pytest.mark.parametrize(
    "path, value, message",
    [
        (("mask_set", "boxes", 0), [0, 0, 9.0, 9], r"mask set field boxes\[0\] must be a list of 4 ints >= 0, got \[0, 0, 9.0, 9\]"),
        (("mask_set", "boxes", 0), [0, -1, 9, 9], r"boxes\[0\] must be a list of 4 ints >= 0, got \[0, -1, 9, 9\]"),
        (("mask_set", "boxes", 0), [0, 0, 0, 9], r"mask \(0, 0, 0, 9\) \(top, left, height, width\) is not inside the 32x32 image"),
        (("mask_set", "boxes", 0), [30, 0, 9, 9], r"mask \(30, 0, 9, 9\) .* is not inside the 32x32 image"),
        (("mask_set", "boxes"), "all of them", r"mask set field boxes must be a non-empty list, got 'all of them'"),
        (("mask_set", "boxes"), [], r"mask set field boxes must be a non-empty list, got \[\]"),
        (("mask_set", "image_size"), [32, -32], r"mask set field image_size must be a list of 2 ints >= 1, got \[32, -32\]"),
        (("mask_set", "patch_sizes"), [[5, 5.5]], r"patch_sizes\[0\] must be a list of 2 ints >= 1"),
        (("mask_set", "stride"), "5", r"mask set field stride must be a list of 2 ints >= 1, got '5'"),
        (("mask_set", "children"), [[1, "x"]], r"mask set field children\[0\] must be a list of"),
        (("mask_set",), [1, 2], r"a mask set must be a dict \(MaskSet.to_dict\), got list"),
        (("image_size",), [32.0, 32], r"image_size must be a positive int or a pair \(H, W\) of positive ints, got \[32.0, 32\]"),
        (("fill",), "grey", r"fill must be a number or a sequence of one number per channel, got 'grey'"),
        (("fill",), [0.0, None], r"fill must be a number or a sequence"),
        (("precision",), "float64", r"precision must be one of 'float32', 'bfloat16', 'float16', got 'float64'"),
        (("margin",), -1.0, r"margin must be a finite float >= 0, got -1.0"),
        (("margin",), "big", r"margin must be a float >= 0, got 'big'"),
        (("patch",), [5, -5], r"settings patch \[5, -5\] disagrees with the mask set's patch sizes \[\[5, 5\]\]"),
        (("defense",), 3, r"'defense' must be a string, got 3"),
        (("defense",), "voodoo", r"unknown defense 'voodoo'"),
        (("info",), ["a"], r"robustwrap.info must be an object, got list"),
        (("base",), "timm", r"robustwrap.base must be an object"),
        (("base", "architecture"), 7, r"robustwrap.base.architecture .* must be a string"),
    ],
)
def test_untrusted_config_values_raise_clear_errors(tmp_path, path, value, message):
    """Issue 9.6: a config from the Hub is untrusted: types and ranges are checked, naming the file."""
    robust().save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    _corrupt(config["robustwrap"], path, value)
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=message) as info:
        robustwrap.from_pretrained(str(tmp_path))
    assert str(tmp_path / "config.json") in str(info.value)


def test_untrusted_version_1_values_raise_clear_errors(tmp_path):
    robust().save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    section = config["robustwrap"]
    config["robustwrap"] = {"format_version": 1, "fill": 0.0, "batch_size": 0, "mask_set": section["mask_set"], "base": section["base"]}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="batch_size must be a positive int, got 0"):
        robustwrap.from_pretrained(str(tmp_path))
    config["robustwrap"].update(batch_size=8, mask_set={**section["mask_set"], "boxes": [[0, 0, 9.5, 9]]})
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"config.json: mask set field boxes\[0\] must be a list of 4 ints"):
        robustwrap.from_pretrained(str(tmp_path))


def test_mask_set_from_dict_checks_types():
    """The same checks guard MaskSet.from_dict itself (reports and results files use it too)."""
    good = MaskSet.square(32, 5, num_masks=3).to_dict()
    assert MaskSet.from_dict(good) == MaskSet.square(32, 5, num_masks=3)
    with pytest.raises(ValueError, match=r"boxes\[0\] must be a list of 4 ints >= 0"):
        MaskSet.from_dict({**good, "boxes": [[0, 0, 9.0, 9], *good["boxes"][1:]]})
    with pytest.raises(ValueError, match="image_size must be a list of 2 ints >= 1"):
        MaskSet.from_dict({**good, "image_size": [32, -1]})
