"""Hub format: save/load round trips through a folder and an offline HF cache; strict, safe loading."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

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
from robustwrap.defenses.patchcleanser import RobustPatchClassifier


def tiny_timm(seed=0, num_classes=5):
    torch.manual_seed(seed)
    return timm.create_model("test_resnet", num_classes=num_classes, in_chans=1)


def robust(seed=0):
    model = robustwrap.wrap(tiny_timm(seed), image_size=32, patch=0.02, batch_size=64).eval()
    model.pretrained_info = {
        "strategy": "multisize_greedy",
        "dataset": "mnist",
        "metrics": {"vanilla_accuracy": 0.9, "clean_accuracy": 0.875, "certified_accuracy": 0.5, "split": "heldout"},
    }
    return model


def digits(n=4):
    return torch.randn(n, 1, 32, 32, generator=torch.Generator().manual_seed(1))


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    """An offline Hugging Face cache (huggingface_hub reads its constants at import, so patch them)."""
    cache = tmp_path / "hf-cache"
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def publish(repo_id: str, folder: Path, sha: str, refs: tuple[str, ...] = ("main",)) -> None:
        repo = cache / f"models--{repo_id.replace('/', '--')}"
        shutil.copytree(folder, repo / "snapshots" / sha)
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        for ref in refs:
            (repo / "refs" / ref).write_text(sha)

    return publish


def test_local_folder_round_trip(tmp_path):
    model = robust()
    model.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["architecture"] == "test_resnet" and config["num_classes"] == 5
    assert config["pretrained_cfg"]["input_size"] == [1, 32, 32]
    section = config["robustwrap"]
    assert section["format_version"] == 1 and section["strategy"] == "multisize_greedy"
    assert section["mask_set"]["patch_sizes"] == [[5, 5]] and len(section["mask_set"]["boxes"]) == 36
    assert set(safetensors.torch.load_file(tmp_path / "model.safetensors")) == set(model.model.state_dict())

    x = digits()
    for loaded in (RobustPatchClassifier.from_pretrained(tmp_path), robustwrap.from_pretrained(str(tmp_path)), robustwrap.from_pretrained(f"local-dir:{tmp_path}")):
        assert loaded.mask_set == model.mask_set and loaded.fill == model.fill
        assert torch.equal(loaded(x), model(x))
        assert not loaded.training
        assert loaded.pretrained_info == model.pretrained_info


def test_model_card_metadata(tmp_path):
    robust().save_pretrained(tmp_path)
    card = ModelCard.load(tmp_path / "README.md")
    results = {r.metric_name: r.metric_value for r in card.data.eval_results}
    threat = "5x5 px patch (2.44% of 32x32), 36 masks"
    assert results == {
        "vanilla clean accuracy (undefended base model)": 0.9,
        f"defended clean accuracy ({threat})": 0.875,
        f"certified accuracy ({threat})": 0.5,
    }
    assert card.data.library_name == "timm" and "robustwrap" in card.data.tags
    assert card.data.eval_results[0].dataset_name == "mnist"


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
    assert torch.equal(RobustPatchClassifier.from_pretrained("acme/robust-digits", revision="v2")(x), second(x))
    with pytest.raises(FileNotFoundError, match="hf-hub:acme/robust-digits@v3"):
        robustwrap.from_pretrained("hf-hub:acme/robust-digits@v3")
    with pytest.raises(ValueError, match="two revisions"):
        robustwrap.from_pretrained("hf-hub:acme/robust-digits@v2", revision="main")


def test_plain_timm_loads_the_base_model(tmp_path, hf_cache):
    model = robust(3)
    model.save_pretrained(tmp_path / "repo")
    hf_cache("acme/robust-digits", tmp_path / "repo", "c" * 40)
    base = timm.create_model("hf-hub:acme/robust-digits", pretrained=True).eval()
    x = digits()
    with torch.no_grad():
        assert torch.equal(base(x), model.model(x))
    assert base.pretrained_cfg["input_size"] == (1, 32, 32)


def test_torchvision_base_round_trip(tmp_path):
    torch.manual_seed(0)
    net = torchvision.models.get_model("resnet18", weights=None, num_classes=3)
    model = robustwrap.wrap(net, image_size=32, patch=4, num_masks=3).eval()
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert "architecture" not in config  # not a timm repo: documented as robustwrap-only
    assert config["robustwrap"]["base"] == {"library": "torchvision", "architecture": "resnet18", "kwargs": {"num_classes": 3}}
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(robustwrap.from_pretrained(str(tmp_path))(x), model(x))


def test_custom_module_cannot_be_saved(tmp_path):
    model = robustwrap.wrap(nn.Sequential(nn.Conv2d(1, 2, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten()), image_size=16, patch=3)
    with pytest.raises(TypeError, match="cannot save a Sequential base model"):
        model.save_pretrained(tmp_path)


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
    with pytest.raises(FileNotFoundError, match="no model.safetensors; robustwrap loads weights only from safetensors"):
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


def test_missing_config_unknown_version_unknown_architecture(tmp_path):
    robust().save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        hub.load_folder(tmp_path)
    bad = json.loads(json.dumps(config))
    bad["robustwrap"]["format_version"] = 99
    (tmp_path / "config.json").write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="format_version 99; this robustwrap reads version 1"):
        hub.load_folder(tmp_path)
    bad = json.loads(json.dumps(config))
    bad["robustwrap"]["base"]["architecture"] = "no_such_net"
    (tmp_path / "config.json").write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="'no_such_net' .* is not a timm model"):
        hub.load_folder(tmp_path)
    del config["robustwrap"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="no 'robustwrap' section"):
        hub.load_folder(tmp_path)


def test_zoo_sha256_is_checked(tmp_path, monkeypatch):
    model = robust()
    model.save_pretrained(tmp_path / "zoo_model")
    real = hub.sha256_of(tmp_path / "zoo_model" / "model.safetensors")
    entry = {"name": "toy", "embedded": "zoo_model", "sha256": real}
    monkeypatch.setattr(hub, "_ZOO", tmp_path)
    monkeypatch.setattr(hub, "_manifest", lambda: {"default": "toy", "models": [entry]})
    assert hub.list_models() == ["toy"]
    x = digits()
    assert torch.equal(robustwrap.create_model("toy")(x), model(x))
    assert torch.equal(robustwrap.from_pretrained("toy")(x), model(x))
    random_init = robustwrap.create_model("toy", pretrained=False)
    assert random_init.mask_set == model.mask_set and not torch.equal(random_init(x), model(x))
    entry["sha256"] = "0" * 64
    with pytest.raises(ValueError, match="the zoo manifest records 0000"):
        robustwrap.create_model("toy")
    with pytest.raises(ValueError, match="unknown robustwrap model 'nope'; the zoo has: toy"):
        robustwrap.create_model("nope")


def test_ambiguous_names_are_refused():
    with pytest.raises(ValueError, match="write 'hf-hub:acme/x' .* or 'local-dir:acme/x'"):
        robustwrap.from_pretrained("acme/x")
