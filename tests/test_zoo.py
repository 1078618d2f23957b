"""The zoo: the embedded default loads offline, checks out against the manifest, works via torch.hub."""

from __future__ import annotations

import copy
import importlib.metadata
import json
import math
import re
from pathlib import Path

import pytest
import safetensors.torch
import timm
import torch
from PIL import Image
from timm.data import create_transform, resolve_data_config

import robustwrap
from robustwrap import hub, zoo
from robustwrap.cli import main
from robustwrap.dataset import model_fingerprint
from robustwrap.defenses.base import DEFAULT_MARGIN
from robustwrap.defenses.patchcleanser import PatchCleanser
from robustwrap.geometry import MaskSet
from robustwrap.report import CertificationReport

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
    mnist = sorted(e["name"] for e in manifest["models"] if e["name"].startswith("mnist_"))
    assert zoo.list_models("mnist_*") == mnist and 0 < len(mnist) < len(manifest["models"]) and zoo.list_models("no-such-*") == []
    for entry in manifest["models"]:
        if "base" in entry:  # Hub-backed: the paper's claims, no measurement of ours (test_hub_backed_entries_*)
            assert not entry.get("embedded") and not entry.get("metrics")
            continue
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


@pytest.mark.parametrize("name", [e["name"] for e in zoo._manifest()["models"] if e.get("embedded")])
def test_embedded_figures_belong_to_the_embedded_weights(name):
    """Issue 23.2: the figures a zoo folder carries are fingerprinted with its weights and settings (so a
    re-save keeps them); a change of a defense's settings() must re-measure or re-fingerprint them."""
    model = robustwrap.create_model(name)
    assert model.pretrained_info["metrics"]["fingerprint"] == model_fingerprint(model)


def test_fine_tuned_default_does_not_claim_the_zoo_figures(tmp_path):
    """Issue 23.2's reproduction: fine-tune the zoo's model, save: its card must not claim the zoo's 66%."""
    model = robustwrap.create_model(zoo.DEFAULT_MODEL)
    claimed = model.pretrained_info["metrics"]["certified_accuracy"]
    x, y = heldout(model, 8)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)
    robustwrap.fit_masking(model, loader, epochs=1, lr=0.5, progress=False)
    with pytest.warns(UserWarning, match="measured on other weights"):
        model.eval().save_pretrained(tmp_path)
    card = (tmp_path / "README.md").read_text()
    assert "model-index" not in card and f"value: {claimed}" not in card
    assert "metrics" not in json.loads((tmp_path / "config.json").read_text())["robustwrap"]["info"]


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


# ------------------------------------------------------------------------ Hub-backed papers' models
HUB_BACKED = [name for name in zoo.list_models() if "base" in zoo.zoo_entry(name)]
VIT = "vit_base_patch16_224.augreg_in21k_ft_in1k"


def test_hub_backed_entries_are_the_papers_timm_weights_and_settings():
    """PatchCleanser's ImageNet models: timm 0.4.12's defaults, today's tags, the paper's 2% patch and 6x6 masks."""
    assert sorted(HUB_BACKED) == sorted([VIT, "resnetv2_50x1_bit.goog_distilled_in1k", "resmlp_24_224.fb_distilled_in1k"])
    for name in HUB_BACKED:
        entry = zoo.zoo_entry(name)
        arch, _, tag = name.partition(".")  # timm's arch.tag grammar
        assert entry["base"]["model"] == name and entry["architecture"] == arch and tag and name in timm.list_pretrained(f"{arch}.*")
        cfg = timm.get_pretrained_cfg(name)  # in the package: offline
        assert entry["base"]["hf_hub_id"] == cfg.hf_hub_id == f"timm/{name}" and entry["weights"] == f"hf-hub:{cfg.hf_hub_id}"
        assert entry["settings"] == {"patch": 32, "num_masks": 6} and list(cfg.input_size[1:]) == entry["image_size"] == [224, 224]
        assert math.ceil(math.sqrt(0.02 * 224 * 224)) == entry["settings"]["patch"]  # 2% of the area
        masks = MaskSet.square(entry["image_size"], entry["settings"]["patch"], num_masks=entry["settings"]["num_masks"])
        assert masks.describe() == entry["threat_model"] and len(masks) == entry["num_masks"] and entry["patch"] == [32, 32]
        card = zoo.model_card(name)
        assert entry["measure_with"] in card and f"hf download {cfg.hf_hub_id}" in card and "huggingface_hub < 0.34: huggingface-cli download" in card and "HF_HUB_OFFLINE=1" in card
        assert "**Reported by the paper's authors**" in card and entry["paper"]["claims"]
        for claim in entry["paper"]["claims"]:
            assert claim["reported_by"] == "the paper's authors" and claim["source"] in card
            assert f"**{100 * claim['clean_accuracy']:.1f}% clean** and **{100 * claim['certified_accuracy']:.1f}% certified**" in card
            assert f"the undefended model: {100 * claim['vanilla_accuracy']:.1f}%" in card
    # The authors' leaderboard (ImageNet, 2% patch, prediction recovery), k=6: (clean, certified, vanilla),
    # timm's weights first, then the authors' fine-tuned checkpoint.
    figures = {
        name: [(c["clean_accuracy"], c["certified_accuracy"], c["vanilla_accuracy"]) for c in zoo.zoo_entry(name)["paper"]["claims"]]
        for name in HUB_BACKED
    }
    assert figures == {
        VIT: [(0.838, 0.616, 0.848), (0.839, 0.621, 0.848)],
        "resmlp_24_224.fb_distilled_in1k": [(0.796, 0.531, 0.808), (0.794, 0.538, 0.802)],
        "resnetv2_50x1_bit.goog_distilled_in1k": [(0.811, 0.416, 0.828), (0.816, 0.530, 0.823)],
    }
    for name in HUB_BACKED:  # the second claim is the checkpoint `robustwrap import` turns into a folder
        arch = zoo.zoo_entry(name)["paper"]["timm_0_4_12_name"]
        assert f"{arch}_cutout2_128_imagenet.pth" in zoo.zoo_entry(name)["paper"]["claims"][1]["model"]
        assert f"robustwrap import {arch}_cutout2_128_imagenet.pth --format patchcleanser" in zoo.model_card(name)


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    """A hand-built, offline Hugging Face cache, laid out as `hf download` leaves it."""
    from huggingface_hub import constants

    cache = tmp_path / "hf-cache"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)

    def add(repo_id: str, model: torch.nn.Module) -> Path:
        repo = cache / f"models--{repo_id.replace('/', '--')}"
        commit = "0123456789abcdef0123456789abcdef01234567"
        (repo / "refs").mkdir(parents=True)
        (repo / "refs" / "main").write_text(commit)
        snapshot = repo / "snapshots" / commit
        snapshot.mkdir(parents=True)
        (snapshot / "config.json").write_text(json.dumps({"architecture": model.pretrained_cfg["architecture"]}))
        safetensors.torch.save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(snapshot / "model.safetensors"))
        return snapshot / "model.safetensors"

    return add


@pytest.fixture
def tiny_paper_entry(monkeypatch):
    """The ViT entry with its base swapped for timm's tiny test ViT (a real timm Hub repo: timm/test_vit.r160_in1k)."""
    manifest = zoo._manifest()
    entry = copy.deepcopy(zoo.zoo_entry(VIT))
    entry.update(name="tiny_paper_model", base={**entry["base"], "model": "test_vit.r160_in1k", "hf_hub_id": "timm/test_vit.r160_in1k"})
    monkeypatch.setattr(zoo, "_manifest", lambda: {**manifest, "models": [*manifest["models"], entry]})
    return entry


def test_hub_backed_entry_loads_from_the_hf_cache(hf_cache, tiny_paper_entry):
    torch.manual_seed(0)
    published = timm.create_model("test_vit.r160_in1k").eval()
    hf_cache("timm/test_vit.r160_in1k", published)
    model = robustwrap.create_model("tiny_paper_model")
    assert model.defense == "patchcleanser" and model.mask_set == MaskSet.square(160, 32, num_masks=6)
    assert model.model.pretrained_cfg["hf_hub_id"] == "timm/test_vit.r160_in1k"  # timm's data config travels with the model
    x = torch.randn(2, 3, 160, 160)
    with torch.no_grad():
        assert torch.equal(model.model(x), published(x))
    assert model.pretrained_info["paper"]["claims"] == tiny_paper_entry["paper"]["claims"]
    assert robustwrap.from_pretrained("tiny_paper_model").settings() == model.settings()
    random_init = robustwrap.create_model("tiny_paper_model", pretrained=False)
    assert random_init.settings() == model.settings()
    with torch.no_grad():
        assert not torch.equal(random_init.model(x), published(x))


def test_hub_backed_entry_checks_the_sha256_the_manifest_records(hf_cache, tiny_paper_entry):
    """An entry that records the sha256 of its timm weights loads them only when they match."""
    torch.manual_seed(0)
    path = hf_cache("timm/test_vit.r160_in1k", timm.create_model("test_vit.r160_in1k").eval())
    tiny_paper_entry["sha256"] = hub.sha256_of(path)
    assert robustwrap.create_model("tiny_paper_model").defense == "patchcleanser"
    tiny_paper_entry["sha256"] = "0" * 64
    with pytest.raises(ValueError, match=rf"{re.escape(str(path))} has sha256 {hub.sha256_of(path)}, but the zoo manifest records 0{{64}}: refusing"):
        robustwrap.create_model("tiny_paper_model")


def installed_download_command() -> str:
    """`hf download` or `huggingface-cli download`: whichever console script the installed huggingface_hub ships."""
    scripts = {e.name for e in importlib.metadata.distribution("huggingface_hub").entry_points if e.group == "console_scripts"}
    return "hf download" if "hf" in scripts else "huggingface-cli download"


@pytest.mark.parametrize(("version", "program"), [("0.23.0", "huggingface-cli"), ("0.33.4", "huggingface-cli"), ("0.34.0", "hf"), ("1.0.0", "hf"), ("2.4.0", "hf")])
def test_download_command_is_the_installed_huggingface_hubs(hf_cache, tiny_paper_entry, monkeypatch, version, program):
    """Issue 23.16: huggingface_hub 0.34 added `hf` and 1.0 removed `huggingface-cli`: messages name what is installed."""
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "__version__", version)
    with pytest.raises(FileNotFoundError, match=rf"`{program} download timm/test_vit.r160_in1k model.safetensors`"):
        robustwrap.create_model("tiny_paper_model")
    with pytest.raises(FileNotFoundError, match=rf"`{program} download acme/never-downloaded`"):
        robustwrap.from_pretrained("hf-hub:acme/never-downloaded")


def test_uncached_hub_backed_entry_fails_in_one_line(hf_cache, tiny_paper_entry):
    with pytest.raises(FileNotFoundError) as error:
        robustwrap.create_model("tiny_paper_model")
    message = str(error.value)
    assert "\n" not in message and "needs the network once" in message and "HF_HUB_OFFLINE is set" in message
    assert f"`{installed_download_command()} timm/test_vit.r160_in1k model.safetensors`" in message and "HF_HUB_OFFLINE=1" in message


def test_cli_certifies_a_hub_backed_entry(hf_cache, tiny_paper_entry, tmp_path, capsys):
    torch.manual_seed(0)
    hf_cache("timm/test_vit.r160_in1k", timm.create_model("test_vit.r160_in1k"))
    for label in ("0", "1"):
        (tmp_path / "val" / label).mkdir(parents=True)
        Image.fromarray(torch.randint(0, 256, (170, 180, 3), dtype=torch.uint8).numpy()).save(tmp_path / "val" / label / "a.png")
    args = ["certify", "--model", "tiny_paper_model", "--data", str(tmp_path / "val"), "--no-progress", "--report", str(tmp_path / "r.json")]
    # 2 of 1000 classes, and a model without label names: which two is the user's to say
    assert main(args) == 1 and "--class-map" in capsys.readouterr().err
    assert main([*args, "--class-map", "0=0,1=1"]) == 0, capsys.readouterr().err
    report = CertificationReport.load(tmp_path / "r.json")
    model = robustwrap.create_model("tiny_paper_model")
    transform = create_transform(**resolve_data_config(model=model.model))
    images = torch.stack([transform(Image.open(tmp_path / "val" / label / "a.png").convert("RGB")) for label in ("0", "1")])
    assert [r.prediction for r in report.records] == model.predict(images).tolist()
    assert main(["certify", "--model", "tiny_paper_model"]) == 1  # its data set is not shipped
    assert "--data is required for --model tiny_paper_model: its data set (imagenet-1k) is not shipped" in capsys.readouterr().err


def test_cli_uncached_hub_backed_entry_is_one_line(hf_cache, tiny_paper_entry, tmp_path, capsys):
    (tmp_path / "val" / "0").mkdir(parents=True)
    assert main(["certify", "--model", "tiny_paper_model", "--data", str(tmp_path / "val")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "needs the network once" in err and f"{installed_download_command()} timm/test_vit.r160_in1k" in err


def test_models_command_marks_embedded_and_network_entries(capsys):
    assert main(["models"]) == 0
    rows = {line.split()[0]: line for line in capsys.readouterr().out.splitlines() if line.split()}
    for name in zoo.list_models():
        entry = zoo.zoo_entry(name)
        expected = "embedded" if entry.get("embedded") else f"{entry['weights']} (network once)"
        assert rows[name].endswith(expected), rows[name]


def test_torch_hub_entry_points_of_hub_backed_models(hf_cache, tiny_paper_entry):
    hubconf = torch.hub._import_module("hubconf_papers", str(ROOT / "hubconf.py"))
    assert "timm's weights from hf-hub:timm/vit_base_patch16_224.augreg_in21k_ft_in1k" in getattr(hubconf, VIT).__doc__
    torch.manual_seed(0)
    published = timm.create_model("test_vit.r160_in1k").eval()
    hf_cache("timm/test_vit.r160_in1k", published)
    model = torch.hub.load(str(ROOT), "tiny_paper_model", source="local")
    x = torch.randn(1, 3, 160, 160)
    with torch.no_grad():
        assert torch.equal(model.model(x), published(x))


@pytest.mark.parametrize("name", ["mnist_test_resnet_msgc", "mnist_test_resnet_drs", "mnist_bagnet_tiny_pg"])
def test_top_1_is_the_prediction_certificate_on_every_embedded_zoo_model(name):
    """`certify(x, y, k=1)` is today's certificate, image for image, on the shipped models (issue 25)."""
    model = robustwrap.create_model(name)
    x, y = heldout(model, 12)
    plain, top1 = model.certify(x, y), model.certify(x, y, k=1)
    assert torch.equal(plain.certified, top1.certified) and torch.equal(plain.prediction, top1.prediction)
    if model.defense != "patchcleanser":  # top-5 is defined: it never certifies less than top-1
        assert bool((model.certify(x, y, k=5).certified >= plain.certified).all())


# -------------------------------------------------------------------------- PatchCURE models
CURE_SPLITS = {"mnist_vit_cure_k4": 4, "mnist_vit_cure_k2": 2, "mnist_bagnet_tiny_cure": None}


def test_patchcure_zoo_models_are_what_their_entries_say(tmp_path, capsys):
    """Issue 24.5: a ViT trained here at two splits (SRF only, and two global blocks) and the zoo's
    PatchGuard BagNet, same weights, load offline as PatchCURE with the settings, feature mask set
    and views their entries record; the CLI certifies them as `benchmarks/reproduce_zoo.py` does
    (here on 3 digits), with the results of `certify_dataset` on the same digits."""
    entries = {e["name"]: e for e in zoo._manifest()["models"] if e.get("defense") == "patchcure"}
    assert {name: e["split"] for name, e in entries.items()} == CURE_SPLITS
    for name, entry in entries.items():
        model = robustwrap.create_model(name)
        assert isinstance(model, robustwrap.PatchCURE) and model.split == entry["split"]
        assert (None if model.window is None else list(model.window)) == entry["window"]
        assert list(model.feature_window) == entry["feature_window"] and len(model.feature_mask_set) == entry["num_masks"]
        assert model.full_views == entry["num_views"] and 1 <= entry["metrics"]["views_per_image"] <= entry["num_views"]
        assert model.lrf is None if entry["split"] in (None, len(getattr(model.model, "blocks", ()))) else model.lrf is not None
        assert main(["certify", "--model", name, "--limit", "3", "--no-progress", "--report", str(tmp_path / f"{name}.json")]) == 0
        report = CertificationReport.load(tmp_path / f"{name}.json")
        data = zoo.builtin_dataset(entry["dataset"], transform=create_transform(**resolve_data_config(model=model.model)))
        expected = robustwrap.certify_dataset(model, data, limit=3, progress=False)
        assert [(r.prediction, r.certified, r.vanilla_prediction) for r in report.records] == [
            (r.prediction, r.certified, r.vanilla_prediction) for r in expected.records
        ]
    capsys.readouterr()
    cure, guard = robustwrap.create_model("mnist_bagnet_tiny_cure"), robustwrap.create_model("mnist_bagnet_tiny_pg")
    assert entries["mnist_bagnet_tiny_cure"]["init_from"] == "mnist_bagnet_tiny_pg"
    assert cure.model.state_dict().keys() == guard.model.state_dict().keys()
    assert all(torch.equal(v, guard.model.state_dict()[k]) for k, v in cure.model.state_dict().items())
