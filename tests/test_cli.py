"""The `robustwrap` command: certify, masks, predict, models, and one-line errors."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import save_file
from timm.data import create_transform, resolve_data_config
from torchvision.datasets import ImageFolder

import robustwrap
from robustwrap.cli import main, parse_patch
from robustwrap.dataset import certify_dataset
from robustwrap.report import CertificationReport

ARCH = "test_convnext"  # timm's tiny test network: 160x160 inputs, ~0.3M parameters


def _hub_ready() -> bool:
    try:
        from robustwrap import hub
    except ImportError:
        return False
    return isinstance(getattr(hub, "DEFAULT_MODEL", None), str) and hub.DEFAULT_MODEL in hub.list_models()


needs_hub = pytest.mark.skipif(not _hub_ready(), reason="needs robustwrap.hub with the embedded default model")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A 3-class timm checkpoint (safetensors and pickle) and an ImageFolder of 3x3 small PNGs."""
    root = tmp_path_factory.mktemp("cli")
    torch.manual_seed(0)
    save_file(timm.create_model(ARCH, num_classes=3).state_dict(), root / "model.safetensors")
    torch.save({}, root / "model.pth")
    rng = np.random.default_rng(0)
    for c in "abc":
        (root / "data" / c).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 255, (48, 40, 3), dtype=np.uint8)).save(root / "data" / c / f"{i}.png")
    return root


def run(argv, capsys) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def timm_args(files, *more):
    return ["--model", f"timm:{ARCH}", "--checkpoint", files / "model.safetensors", "--num-masks", "2", *more]


def python_model(files, patch=0.1):
    """What the CLI should build, written out independently."""
    from safetensors.torch import load_file

    base = timm.create_model(ARCH, num_classes=3)
    base.load_state_dict(load_file(files / "model.safetensors"))
    model = robustwrap.wrap(base, patch=patch, num_masks=2).eval()
    transform = create_transform(**resolve_data_config(model=base))
    return model, transform


# --------------------------------------------------------------------------------------- patch
@pytest.mark.parametrize(
    ("text", "expected"),
    [("32", [32]), ("32px", [32]), ("2%", [0.02]), ("0.02", [0.02]), (".5", [0.5]), ("1%,2%, 3%", [0.01, 0.02, 0.03]), ("0.5%", [0.005])],
)
def test_parse_patch(text, expected):
    assert parse_patch(text) == pytest.approx(expected)
    assert [type(v) for v in parse_patch(text)] == [type(v) for v in expected]


@pytest.mark.parametrize("text", ["abc", "0", "0%", "100%", "150%", "1.5", "2%%", "", "1%,", "-3", "2 %x"])
def test_bad_patch_strings_are_refused(text):
    with pytest.raises(argparse.ArgumentTypeError, match=r"expected pixels \(32\), a percentage"):
        parse_patch(text)


# --------------------------------------------------------------------------------------- masks
def test_masks_table_and_picture(tmp_path, capsys):
    code, out, err = run(["masks", "--image-size", "224", "--patch", "2%", "--num-masks", "6", "--plot", tmp_path / "masks.png"], capsys)
    assert code == 0 and err == ""
    assert "patch 32x32 px (2.04% of 224x224); 36 masks (6x6) of 64x64 px, stride 33x33" in out
    assert "row starts (top):   0 33 66 99 132 160" in out
    assert "36 one-mask + 630 two-mask = 666" in out
    assert "  35  160   160      64     64" in out
    with Image.open(tmp_path / "masks.png") as image:
        assert image.format == "PNG"


def test_masks_with_stride_and_rectangular_image(capsys):
    code, out, _ = run(["masks", "--image-size", "224", "--patch", "32", "--stride", "32"], capsys)
    assert code == 0 and "49 masks (7x7) of 63x63 px, stride 32x32" in out and "0 32 64 96 128 160 161" in out
    code, out, _ = run(["masks", "--image-size", "28x56", "--patch", "4", "--num-masks", "3"], capsys)
    assert code == 0 and "of 28x56" in out


@pytest.mark.parametrize("command", [[], ["certify"], ["masks"], ["predict"], ["models"]])
def test_help(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([*command, "--help"])
    assert exit_.value.code == 0 and "usage: robustwrap" in capsys.readouterr().out


def test_bad_usage_exits_2_with_one_message(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["masks", "--patch", "abc"])
    code = exit_.value.code
    err = capsys.readouterr().err
    assert code == 2 and "argument --patch: expected pixels (32)" in err and "Traceback" not in err
    with pytest.raises(SystemExit) as exit_:
        main(["masks", "--num-masks", "3", "--stride", "4"])
    assert exit_.value.code == 2 and "not allowed with argument" in capsys.readouterr().err


# ------------------------------------------------------------------------------------- certify
def test_certify_timm_checkpoint_on_an_image_folder(files, tmp_path, capsys):
    code, out, err = run(["certify", *timm_args(files), "--data", files / "data", "--patch", "10%", "--report", tmp_path / "r.json", "--plot", tmp_path / "plots"], capsys)
    assert code == 0, err
    assert "certified accuracy" in out and "patch 51x51 px (10.16% of 160x160); 4 masks (2x2)" in out
    assert "clean" in err and "certified" in err and "9/9" in err  # the progress bar
    report = CertificationReport.load(tmp_path / "r.json")
    assert report.model == f"timm:{ARCH}" and report.num_images == 9
    # Same numbers as the Python API with the model's own timm preprocessing.
    model, transform = python_model(files)
    expected = certify_dataset(model, ImageFolder(str(files / "data"), transform=transform), progress=False)
    assert report.records == expected.records
    assert [r.label for r in report.records] == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == ["masks.png", "report.png", "views.png"]


def test_certify_patch_sweep(files, tmp_path, capsys):
    argv = ["certify", *timm_args(files), "--data", files / "data", "--patch", "10%,20%", "--limit", "3", "--no-progress"]
    code, out, err = run([*argv, "--report", tmp_path / "sweep.json", "--plot", tmp_path / "plots"], capsys)
    assert code == 0, err
    reports = [CertificationReport.from_json(json.dumps(d)) for d in json.loads((tmp_path / "sweep.json").read_text())]
    assert [r.mask_set.patch_sizes for r in reports] == [((51, 51),), ((72, 72),)]
    assert all(r.num_images == 3 for r in reports)
    assert "51x51 px     10.16%" in out and "72x72 px     20.25%" in out  # the sweep table
    assert (tmp_path / "plots" / "sweep.png").is_file() and (tmp_path / "plots" / "views_72px.png").is_file()


def test_certify_results_and_resume(files, tmp_path, capsys):
    argv = ["certify", *timm_args(files), "--data", files / "data", "--patch", "10%", "--no-progress", "--results", tmp_path / "r.jsonl"]
    assert run([*argv, "--report", tmp_path / "a.json"], capsys)[0] == 0
    code, _, err = run(argv, capsys)
    assert code == 1 and "already exists: pass --resume" in err
    lines = (tmp_path / "r.jsonl").read_text().splitlines(keepends=True)
    (tmp_path / "r.jsonl").write_text("".join(lines[:5]) + lines[5][:10])  # killed mid-line
    assert run([*argv, "--resume", "--report", tmp_path / "b.json"], capsys)[0] == 0
    assert CertificationReport.load(tmp_path / "a.json") == CertificationReport.load(tmp_path / "b.json")
    assert len((tmp_path / "r.jsonl").read_text().splitlines()) == 1 + 9
    code, _, err = run(["certify", *timm_args(files), "--data", files / "data", "--resume"], capsys)
    assert code == 1 and "--resume continues a --results file" in err


@pytest.fixture
def bad_folder(files, tmp_path):
    folder = tmp_path / "bad"
    (folder / "a").mkdir(parents=True)
    Image.open(files / "data" / "a" / "0.png").save(folder / "a" / "0.png")
    (folder / "a" / "1.png").write_bytes(b"this is not a png")
    return folder


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (lambda f, t: timm_args(f, "--data", t / "missing"), "missing: no such folder, and not a built-in data set"),
        (lambda f, t: timm_args(f, "--data", f / "model.pth"), "is a file; expected a folder of class folders"),
        (lambda f, t: timm_args(f, "--data", t / "bad"), "cannot read image"),
        (lambda f, t: ["--model", "timm:no_such_net", "--checkpoint", f / "model.safetensors", "--data", f / "data"], "unknown timm architecture"),
        (lambda f, t: ["--model", "timm:test_vit", "--checkpoint", f / "model.safetensors", "--data", f / "data"], "does not fit timm:test_vit"),
        (lambda f, t: ["--model", f"timm:{ARCH}", "--checkpoint", f / "model.pth", "--data", f / "data"], "pickle checkpoints can run code and are refused"),
        (lambda f, t: ["--model", f"timm:{ARCH}", "--data", f / "data"], "needs --checkpoint"),
        (lambda f, t: ["--model", f"timm:{ARCH}", "--checkpoint", t / "none.safetensors", "--data", f / "data"], "no such file"),
        (lambda f, t: timm_args(f, "--data", f / "data", "--device", "tpu:banana"), "--device must be"),
        (lambda f, t: timm_args(f, "--data", f / "data", "--patch", "200"), "larger than the 160x160 image"),
    ],
)
def test_errors_are_one_line_and_exit_1(files, tmp_path, bad_folder, capsys, args, message):
    code, _, err = run(["certify", "--no-progress", *args(files, tmp_path)], capsys)
    assert code == 1
    assert err.count("\n") == 1 and err.startswith("robustwrap certify: error: ") and message in err, err
    assert "Traceback" not in err


def test_errors_through_a_real_process(files, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "robustwrap.cli", "certify", *map(str, timm_args(files, "--data", tmp_path / "nowhere"))]
    done = subprocess.run(command, check=False, capture_output=True, text=True, env=env)
    assert done.returncode == 1 and done.stderr.strip().count("\n") == 0 and "no such folder" in done.stderr
    done = subprocess.run([sys.executable, "-m", "robustwrap.cli", "certify", "--patch", "2 percent"], check=False, capture_output=True, text=True, env=env)
    assert done.returncode == 2 and "argument --patch" in done.stderr and "Traceback" not in done.stderr


# ------------------------------------------------------------------------------------- predict
def test_predict_images(files, capsys):
    images = [files / "data" / "a" / "0.png", files / "data" / "c" / "2.png"]
    code, out, err = run(["predict", *images, *timm_args(files, "--patch", "10%")], capsys)
    assert code == 0, err
    model, transform = python_model(files)
    x = torch.stack([transform(Image.open(p).convert("RGB")) for p in images])
    prediction = model.predict(x)
    result = model.certify(x, prediction)
    rows = out.splitlines()[3:]
    assert len(rows) == 2
    for row, path, label, case, certified in zip(rows, images, prediction.tolist(), result.case.tolist(), result.certified.tolist()):
        cells = row.split()
        assert cells[0] == str(path) and cells[1] == str(label)
        assert cells[2] == {1: "I", 2: "II", 3: "III"}[case] and cells[-1] == ("yes" if certified else "no")


def test_predict_unreadable_image(files, bad_folder, capsys):
    code, _, err = run(["predict", bad_folder / "a" / "1.png", *timm_args(files)], capsys)
    assert code == 1 and "cannot read image" in err and err.count("\n") == 1


# ---------------------------------------------------------------------------- embedded default
@needs_hub
def test_certify_with_no_arguments_runs_the_embedded_default(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "robustwrap.cli", "certify"], check=False, capture_output=True, text=True, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "certified accuracy" in done.stdout and "vanilla clean accuracy" in done.stdout
    assert "certified" in done.stderr  # the progress bar with the running accuracy
    # the command reproduces, on a fresh run, exactly the figures the zoo manifest records
    from robustwrap import hub

    metrics = hub.zoo_entry(hub.DEFAULT_MODEL)["metrics"]
    n = metrics["num_images"]
    for label, key in (("vanilla clean accuracy", "vanilla_accuracy"), ("clean accuracy", "clean_accuracy"), ("certified accuracy", "certified_accuracy")):
        line = next(row for row in done.stdout.splitlines() if row.strip().startswith(label))
        assert f"({round(metrics[key] * n)}/{n})" in line, (line, metrics)


@needs_hub
def test_models_lists_the_zoo(capsys):
    from robustwrap import hub

    code, out, _ = run(["models"], capsys)
    assert code == 0
    assert f"{hub.DEFAULT_MODEL} *" in out
    assert all(name in out for name in hub.list_models())
    entry = hub.zoo_entry(hub.DEFAULT_MODEL)
    row = next(line for line in out.splitlines() if line.startswith(f"{hub.DEFAULT_MODEL} *"))
    assert f"{100 * entry['metrics']['certified_accuracy']:.1f}%" in row and f"({entry['patch_percent']:.2f}%)" in row


@needs_hub
def test_predict_with_the_embedded_default(tmp_path, capsys):
    from robustwrap import hub

    data = hub.builtin_dataset(hub.zoo_entry(hub.DEFAULT_MODEL)["dataset"])  # PIL images
    paths = []
    for index in range(3):
        image, _ = data[index]
        image.save(tmp_path / f"{index}.png")
        paths.append(tmp_path / f"{index}.png")
    code, out, err = run(["predict", *paths], capsys)
    assert code == 0, err
    model = hub.from_pretrained(hub.DEFAULT_MODEL).eval()
    transform = create_transform(**resolve_data_config({"input_size": (model.in_chans or 3, *model.image_size)}, model=model.model))
    mode = "L" if model.in_chans == 1 else "RGB"
    expected = model.predict(torch.stack([transform(Image.open(p).convert(mode)) for p in paths])).tolist()
    assert [int(row.split()[1]) for row in out.splitlines()[3:]] == expected


@needs_hub
def test_unknown_zoo_model_is_one_line(capsys):
    code, _, err = run(["certify", "--model", "no-such-model-anywhere", "--limit", "1"], capsys)
    assert code == 1 and err.count("\n") == 1 and "Traceback" not in err


# --------------------------------------------------------------- the zoo path, with a stub zoo
@pytest.fixture
def stub_zoo(files, monkeypatch):
    """`robustwrap.hub` answering for one zoo model, the tiny timm network, with its own data."""
    hub = pytest.importorskip("robustwrap.hub")
    entry = {
        "name": "tiny",
        "architecture": ARCH,
        "dataset": "tiny-data",
        "patch": [3, 3],
        "patch_percent": 10.0,
        "num_masks": 2,
        "metrics": {"clean_accuracy": 0.5, "certified_accuracy": 0.25},
    }
    monkeypatch.setattr(hub, "DEFAULT_MODEL", "tiny")
    monkeypatch.setattr(hub, "BUILTIN_DATASETS", {"tiny-data": "nine random images"})
    monkeypatch.setattr(hub, "list_models", lambda pattern="*": ["tiny"])
    monkeypatch.setattr(hub, "zoo_entry", lambda name: entry)
    monkeypatch.setattr(hub, "from_pretrained", lambda spec: python_model(files)[0] if spec == "tiny" else (_ for _ in ()).throw(ValueError(f"unknown model {spec!r}")))
    monkeypatch.setattr(hub, "builtin_dataset", lambda name, transform=None: ImageFolder(str(files / "data"), transform=transform))
    return hub


def test_certify_defaults_to_the_zoo_default_and_its_data(files, stub_zoo, tmp_path, capsys):
    code, _, err = run(["certify", "--no-progress", "--report", tmp_path / "r.json"], capsys)
    assert code == 0, err
    report = CertificationReport.load(tmp_path / "r.json")
    assert (report.model, report.data, report.num_images) == ("tiny", "tiny-data", 9)
    model, transform = python_model(files)
    assert report.records == certify_dataset(model, ImageFolder(str(files / "data"), transform=transform), progress=False).records
    code, _, err = run(["certify", "--model", "unknown-thing", "--no-progress"], capsys)
    assert code == 1 and err == "robustwrap certify: error: unknown model 'unknown-thing'\n"


def test_builtin_data_name_that_is_also_a_folder_is_ambiguous(files, stub_zoo, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny-data").mkdir()
    code, _, err = run(["certify", "--data", "tiny-data", "--no-progress"], capsys)
    assert code == 1 and "write ./tiny-data for the folder" in err


def test_models_table_from_the_zoo(stub_zoo, capsys):
    code, out, _ = run(["models"], capsys)
    assert code == 0
    row = next(line for line in out.splitlines() if line.startswith("tiny *"))
    assert row.split()[2:] == [ARCH, "tiny-data", "3x3", "px", "(10.00%)", "2", "50.0%", "25.0%"]
