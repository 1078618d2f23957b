"""PatchCURE through the user's paths: the command line (certify, predict, masks), saved folders and torch.hub.

A 64x64 timm test ViT (16 px tokens: a 4x4 token grid), split after 2 of its blocks with windows
of 1x1 token; an ImageFolder of four PNGs.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

import robustwrap
from robustwrap import cli
from robustwrap.cli import main
from robustwrap.dataset import certify_dataset
from robustwrap.report import CertificationReport

ROOT = Path(__file__).resolve().parents[1]
SIZE = 64
CURE = ["--defense", "patchcure", "--window", "1x1", "--split", "2", "--patch", "4"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("cure")
    torch.manual_seed(0)
    save_file(timm.create_model("test_vit", img_size=SIZE, num_classes=4).state_dict(), root / "vit.safetensors")
    rng = np.random.default_rng(0)
    for c in "abcd":
        (root / "data" / c).mkdir(parents=True)
        Image.fromarray(rng.integers(0, 255, (SIZE, SIZE, 3), dtype=np.uint8)).save(root / "data" / c / "0.png")
    return root


def _model_args(files) -> list:
    return ["--model", "timm:test_vit", "--image-size", str(SIZE), "--checkpoint", files / "vit.safetensors"]


def _wrapped(files, **options) -> robustwrap.PatchCURE:
    vit = timm.create_model("test_vit", img_size=SIZE, num_classes=4)
    vit.load_state_dict(load_file(files / "vit.safetensors"))
    return robustwrap.wrap(vit.eval(), patch=4, defense="patchcure", **{"window": (1, 1), "split": 2, **options}).eval()


def run(argv, capsys) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _records(report: CertificationReport) -> list[tuple]:
    return sorted((r.index, r.prediction, r.certified, r.num_views, r.extras["srf_passes"]) for r in report.records)


# ------------------------------------------------------------------------------------ certify
def test_certify_wraps_a_timm_vit_with_window_split_and_mask_stride_and_draws_the_feature_masks(files, tmp_path, capsys):
    argv = ["certify", *_model_args(files), *CURE, "--mask-stride", "2", "--data", files / "data", "--no-progress"]
    code, out, err = run([*argv, "--report", tmp_path / "r.json", "--plot", tmp_path / "plots"], capsys)
    assert code == 0, err
    report = CertificationReport.load(tmp_path / "r.json")
    model = _wrapped(files, mask_stride=2)
    assert report.defense == "patchcure" and report.settings == json.loads(json.dumps(model.settings()))
    assert (report.settings["window"], report.settings["split"], report.settings["mask_stride"]) == ([1, 1], 2, [2, 2])
    data = cli._loading._image_folder(files / "data", {c: i for i, c in enumerate("abcd")}, cli._loading._preprocessing(model)[0], "RGB")
    assert _records(report) == _records(certify_dataset(model, data, progress=False))
    assert "srf_passes (mean)" in out and "feature views per image" in out and f"of {model.full_views}" in out
    assert "window [1, 1], split 2, mask_stride [2, 2]" in out
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == ["masks.png", "report.png", "views.png"]


def test_a_saved_patchcure_model_keeps_its_settings_on_the_command_line_and_through_torch_hub(files, tmp_path, capsys):
    model = _wrapped(files, mask_stride=2)
    model.save_pretrained(tmp_path / "cure")
    code, _, err = run(
        ["certify", "--model", tmp_path / "cure", "--data", files / "data", "--no-progress", "--report", tmp_path / "r.json"], capsys
    )
    assert code == 0, err
    assert CertificationReport.load(tmp_path / "r.json").settings == json.loads(json.dumps(model.settings()))
    # An option of the defense re-wraps the base model with the model's own settings for the rest.
    code, _, err = run(
        [
            "certify",
            "--model",
            tmp_path / "cure",
            "--mask-stride",
            "1",
            "--data",
            files / "data",
            "--no-progress",
            "--report",
            tmp_path / "s.json",
        ],
        capsys,
    )
    assert code == 0, err
    settings = CertificationReport.load(tmp_path / "s.json").settings
    assert (settings["window"], settings["split"], settings["mask_stride"], settings["patch"]) == ([1, 1], 2, [1, 1], [4, 4])
    loaded = torch.hub.load(str(ROOT), "robust_model", str(tmp_path / "cure"), source="local")
    assert isinstance(loaded, robustwrap.PatchCURE) and loaded.settings() == model.settings()
    x = torch.randn(2, 3, SIZE, SIZE)
    assert torch.equal(loaded.eval()(x), model(x))


def test_an_option_of_patchcure_on_another_defense_is_refused_by_name(files, capsys):
    code, _, err = run(
        ["certify", *_model_args(files), "--num-masks", "2", "--split", "2", "--data", files / "data", "--no-progress"], capsys
    )
    assert code == 1
    assert "--split is an option of defense 'patchcure', not of 'patchcleanser'" in err
    code, _, err = run(
        ["certify", *_model_args(files), "--defense", "patchcure", "--window", "1x1", "--data", files / "data", "--no-progress"], capsys
    )
    assert code == 1 and "--window and --split go together" in err


def test_attack_audits_a_saved_patchcure_model_on_the_command_line(files, tmp_path, capsys):
    _wrapped(files).save_pretrained(tmp_path / "cure")
    code, out, err = run(["attack", "--model", tmp_path / "cure", "--data", files / "data", "--steps", "2", "--no-progress"], capsys)
    assert code == 0, err
    assert "defense                    patchcure" in out and "certificates               OK" in out


# ------------------------------------------------------------------------------------ predict
def test_predict_prints_the_patchcure_threat_model_and_the_exact_prediction(files, capsys):
    image = files / "data" / "b" / "0.png"
    code, out, err = run(["predict", image, *_model_args(files), *CURE, "--json"], capsys)
    assert code == 0, err
    document = json.loads(out)
    model = _wrapped(files)
    assert document["threat_model"] == f"patchcure: window 1x1 tokens, split 2; {model.describe()}"
    x = cli._loading._preprocessing(model)[0](Image.open(image).convert("RGB"))[None]
    assert document["images"][0]["prediction"] == model.predict(x).item()
    assert document["images"][0]["certified"] == bool(model.certify(x, model.predict(x)).certified.item())


# -------------------------------------------------------------------------------------- masks
def test_masks_shows_the_feature_mask_set_of_a_vit_split_and_draws_it_on_the_image(tmp_path, capsys):
    code, out, err = run(["masks", "--defense", "patchcure", "--window", "14x2", "--patch", "32", "--plot", tmp_path / "cure.png"], capsys)
    assert code == 0, err
    lines = out.splitlines()
    assert (
        lines[0] == "patch 32x32 px (2.04% of 224x224); 1x6 masks of 1x2 cells (224x64 px) on a 1x7 grid, mask stride 1x1 cells; 21 views"
    )
    assert "views per image: 6 one-mask + 15 two-mask = 21 (K(K+1)/2)" in out
    assert (tmp_path / "cure.png").stat().st_size > 0
    # The same mask set as the defense's own, on a ViT split of the same geometry.
    vit = timm.create_model("test_vit", img_size=SIZE, num_classes=4).eval()
    model = robustwrap.wrap(vit, patch=10, defense="patchcure", window=(1, 1), split=1, mask_stride=2)
    code, out, _ = run(
        ["masks", "--defense", "patchcure", "--window", "1", "--image-size", SIZE, "--patch", "10", "--mask-stride", "2"], capsys
    )
    assert code == 0 and out.splitlines()[0] == model.describe()
    boxes = [tuple(int(v) for v in line.split()[1:5]) for line in out.splitlines()[6:]]
    assert boxes == list(model.feature_mask_set.boxes)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--patch", "32"], "--defense patchcure needs --window WHxWW"),
        (["--window", "5", "--patch", "32"], "makes 80x80 px cells, which do not tile the 224x224 image"),
        (["--window", "14x2", "--num-masks", "3"], "--num-masks is an option of defense 'patchcleanser', not of 'patchcure'"),
        (["--window", "14x2", "--patch", "200"], "no image could be certified"),
    ],
)
def test_masks_errors_name_the_options(argv, message, capsys):
    code, _, err = run(["masks", "--defense", "patchcure", *argv], capsys)
    assert code == 1 and message in err


def test_the_report_of_a_local_logit_model_names_no_window_or_split():
    import robustwrap.models  # noqa: F401 - registers the BagNets with timm

    torch.manual_seed(0)
    model = robustwrap.wrap(timm.create_model("bagnet_tiny", num_classes=3).eval(), patch=5, defense="patchcure", mask_stride=2).eval()
    x = torch.randn(2, 1, 32, 32)
    report = certify_dataset(model, torch.utils.data.TensorDataset(x, torch.tensor([0, 1])), progress=False)
    settings = next(line for line in report.summary().splitlines() if line.strip().startswith("settings"))
    assert settings.endswith("margin 0.1, mask_stride [2, 2]") and "window" not in settings


def test_view_grid_and_plot_views_draw_the_feature_views_of_an_image(files):
    from robustwrap.dataset import view_grid
    from robustwrap.plots import plot_feature_mask_set, plot_views

    model = _wrapped(files, mask_stride=2)  # masks of 3x3 cells at 0 and 1 (flush with the edge) on each axis of 4
    x = torch.randn(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    one_mask, grid = view_grid(model, x[0])
    assert torch.equal(grid, model.certify(x, torch.zeros(1, dtype=torch.long), early_exit=False).grid[0])
    assert torch.equal(one_mask, grid.diagonal())
    masks = model.feature_mask_set
    figure = plot_views(one_mask, grid, 0, masks, x[0], image_size=model.image_size)
    assert len(figure.axes) == 4  # the image, the one-mask labels, the two-mask grid and its colour bar
    with pytest.raises(ValueError, match=r"image must have shape \(C, 4, 4\)"):  # the masks' grid of cells is not the image
        plot_views(one_mask, grid, 0, masks, x[0])
    srf = model.srf
    figure = plot_feature_mask_set(masks, model.image_size, model.patch, srf.receptive_field, srf.feature_stride, srf.feature_offset, x[0])
    assert figure._suptitle.get_text() == model.describe()
