"""The `robustwrap` command: certify, masks, predict, models, one-line errors and the timm paths.

Everything runs in-process through `robustwrap.cli.main` on timm's tiny test networks, except one
subprocess test of the real process (exit codes, one-line errors, `--help` without torch). The full
re-certification of the zoo's 1,000 held-out digits is `benchmarks/reproduce_zoo.py`.
"""

from __future__ import annotations

import argparse
import importlib
import io
import json
import os
import re
import subprocess
import sys
import types
from typing import ClassVar

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import save_file
from timm.data import create_transform, resolve_data_config
from torchvision.datasets import ImageFolder

import robustwrap
import robustwrap.models
from robustwrap import cli
from robustwrap.cli import main, parse_class_map, parse_patch
from robustwrap.dataset import certify_dataset
from robustwrap.report import CertificationReport

ARCH = "test_convnext"  # timm's tiny test network: 160x160 inputs, ~0.3M parameters


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


def base_model(files):
    from safetensors.torch import load_file

    base = timm.create_model(ARCH, num_classes=3)
    base.load_state_dict(load_file(files / "model.safetensors"))
    return base


def python_model(files, patch=0.1):
    """What the CLI should build, written out independently."""
    base = base_model(files)
    model = robustwrap.wrap(base, patch=patch, num_masks=2).eval()
    transform = create_transform(**resolve_data_config(model=base))
    return model, transform


def subset_folder(files, tmp_path, classes):
    """An ImageFolder holding only `classes` (folder names) of the 3x3 images."""
    folder = tmp_path / "subset"
    for name, source in classes.items():
        (folder / name).mkdir(parents=True)
        for i in range(3):
            Image.open(files / "data" / source / f"{i}.png").save(folder / name / f"{i}.png")
    return folder


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


def test_parse_class_map(tmp_path):
    assert parse_class_map("cat=3, dog = 0") == {"cat": 3, "dog": 0}
    (tmp_path / "map.json").write_text('{"cat": 3, "dog": 0}')
    assert parse_class_map(str(tmp_path / "map.json")) == {"cat": 3, "dog": 0}
    (tmp_path / "names.json").write_text('["dog", "x", "y", "cat"]')
    assert parse_class_map(str(tmp_path / "names.json")) == ["dog", "x", "y", "cat"]
    with pytest.raises(ValueError, match="expected name=id"):
        parse_class_map("cat=three")
    with pytest.raises(FileNotFoundError, match="no such file"):
        parse_class_map(str(tmp_path / "none.json"))
    (tmp_path / "bad.json").write_text('{"cat": "3"}')
    with pytest.raises(ValueError, match="got a JSON dict"):
        parse_class_map(str(tmp_path / "bad.json"))


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


class _ClosedPipe(io.StringIO):
    """A stdout whose reader went away, as `robustwrap masks --plot x.png | head` after head exits."""

    def write(self, text):
        raise BrokenPipeError(32, "Broken pipe")


def test_masks_picture_is_written_when_stdout_is_closed(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "stdout", _ClosedPipe())
    assert main(["masks", "--image-size", "64", "--patch", "8", "--plot", str(tmp_path / "m.png")]) == 0
    with Image.open(tmp_path / "m.png") as image:
        assert image.format == "PNG"


# ---------------------------------------------------------------------------------- help, usage
@pytest.mark.parametrize("command", [[], ["certify"], ["masks"], ["predict"], ["models"], ["attack"]])
def test_help(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([*command, "--help"])
    assert exit_.value.code == 0 and "usage: robustwrap" in capsys.readouterr().out


def _help(command, capsys) -> str:
    with pytest.raises(SystemExit):
        main([command, "--help"])
    return " ".join(capsys.readouterr().out.split())  # argparse wraps lines


def test_help_documents_speed_options_and_predict_takes_one_patch(capsys):
    certify = _help("certify", capsys)
    assert f"the first {cli.certify.DEFAULT_LIMIT} of its 1,000 shipped held-out digits" in certify and "--limit all" in certify
    for option in ("--threads", "--views-per-pass", "--images-per-step", "--precision", "--class-map", "--pretrained", "--image-size", "--traceback"):
        assert option in certify
    assert "--batch-size" not in certify and "--amp" not in certify  # the old names are hidden
    assert "comma list (1%,2%,3%) is a sweep" in certify
    predict = _help("predict", capsys)
    assert "sweep" not in predict and "comma list" not in predict and "--json" in predict
    with pytest.raises(SystemExit) as exit_:
        main(["predict", "x.png", "--patch", "1%,2%"])
    assert exit_.value.code == 2 and "expected one patch" in capsys.readouterr().err


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.strip() == f"robustwrap {robustwrap.__version__}"


def test_bad_usage_exits_2_with_one_message(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["masks", "--patch", "abc"])
    code = exit_.value.code
    err = capsys.readouterr().err
    assert code == 2 and "argument --patch: expected pixels (32)" in err and "Traceback" not in err
    with pytest.raises(SystemExit) as exit_:
        main(["masks", "--num-masks", "3", "--stride", "4"])
    assert exit_.value.code == 2 and "not allowed with argument" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        main(["certify", "--limit", "some"])
    assert exit_.value.code == 2 and "a positive integer or 'all'" in capsys.readouterr().err


# ------------------------------------------------------------------------------------- certify
def test_certify_timm_checkpoint_on_an_image_folder(files, tmp_path, capsys):
    code, out, err = run(["certify", *timm_args(files), "--data", files / "data", "--patch", "10%", "--report", tmp_path / "r.json", "--plot", tmp_path / "plots"], capsys)
    assert code == 0, err
    assert "certified accuracy" in out and "patch 51x51 px (10.16% of 160x160); 4 masks (2x2)" in out
    assert "clean" in err and "certified" in err and "9/9" in err  # the progress bar
    assert f"report: {tmp_path / 'r.json'}" in out and "nothing was saved" not in out
    report = CertificationReport.load(tmp_path / "r.json")
    assert report.model == f"timm:{ARCH}" and report.num_images == 9
    # Same numbers as the Python API with the model's own timm preprocessing.
    model, transform = python_model(files)
    expected = certify_dataset(model, ImageFolder(str(files / "data"), transform=transform), progress=False)
    assert [(r.index, r.label, r.prediction, r.certified, r.num_views) for r in report.records] == [
        (r.index, r.label, r.prediction, r.certified, r.num_views) for r in expected.records
    ]
    assert [r.label for r in report.records] == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == ["masks.png", "report.png", "views.png"]


def test_certify_patch_sweep_report_loads_back(files, tmp_path, capsys):
    argv = ["certify", *timm_args(files), "--data", files / "data", "--patch", "10%,20%", "--limit", "3", "--no-progress"]
    code, out, err = run([*argv, "--report", tmp_path / "sweep.json", "--plot", tmp_path / "plots"], capsys)
    assert code == 0, err
    reports = CertificationReport.load_many(tmp_path / "sweep.json")
    assert [r.patch_sizes for r in reports] == [((51, 51),), ((72, 72),)]
    assert all(r.num_images == 3 for r in reports)
    assert "51x51 px     10.16%" in out and "72x72 px     20.25%" in out  # the sweep table
    assert "a list of reports, one per patch size" in out
    assert (tmp_path / "plots" / "sweep.png").is_file() and (tmp_path / "plots" / "views_72px.png").is_file()


def test_certify_results_and_resume(files, tmp_path, capsys):
    argv = ["certify", *timm_args(files), "--data", files / "data", "--patch", "10%", "--no-progress", "--results", tmp_path / "r.jsonl"]
    assert run([*argv, "--report", tmp_path / "a.json"], capsys)[0] == 0
    code, _, err = run(argv, capsys)
    assert code == 1 and "already exists: pass --resume" in err
    lines = (tmp_path / "r.jsonl").read_text().splitlines(keepends=True)
    (tmp_path / "r.jsonl").write_text("".join(lines[:5]) + lines[5][:10])  # killed mid-line
    assert run([*argv, "--resume", "--report", tmp_path / "b.json"], capsys)[0] == 0
    a, b = CertificationReport.load(tmp_path / "a.json"), CertificationReport.load(tmp_path / "b.json")
    assert [(r.index, r.prediction, r.certified) for r in a.records] == [(r.index, r.prediction, r.certified) for r in b.records]
    assert len((tmp_path / "r.jsonl").read_text().splitlines()) == 1 + 9
    code, _, err = run(["certify", *timm_args(files), "--data", files / "data", "--resume"], capsys)
    assert code == 1 and "--resume continues a --results file" in err


# --------------------------------------------------------------------------- folders -> classes
@pytest.fixture
def timm_folder(files, tmp_path):
    """A folder saved by timm (config.json + model.safetensors, no robustwrap section), with label names."""
    folder = tmp_path / "timm_model"
    timm.models.save_for_hf(base_model(files), str(folder), model_config={"label_names": ["a", "b", "c"]}, safe_serialization=True)
    return folder


def test_plain_timm_folder_and_a_subset_mapped_through_label_names(files, timm_folder, tmp_path, capsys):
    data = subset_folder(files, tmp_path, {"c": "c", "a": "a"})  # 2 of the 3 classes, named as the model's labels
    code, out, err = run(["certify", "--model", f"local-dir:{timm_folder}", "--patch", "10%", "--num-masks", "2", "--data", data, "--no-progress", "--report", tmp_path / "r.json"], capsys)
    assert code == 0, err
    report = CertificationReport.load(tmp_path / "r.json")
    assert [r.label for r in report.records] == [0, 0, 0, 2, 2, 2]  # not 0..1: "c" is class 2
    model, transform = python_model(files)
    x = torch.stack([transform(Image.open(data / c / f"{i}.png").convert("RGB")) for c in "ac" for i in range(3)])
    assert [r.prediction for r in report.records] == model.predict(x).tolist()
    assert "patch 51x51 px (10.16% of 160x160); 4 masks (2x2)" in out


def test_class_map_and_integer_folders(files, tmp_path, capsys):
    data = subset_folder(files, tmp_path, {"b": "b", "x": "c"})
    argv = ["certify", *timm_args(files, "--patch", "10%"), "--data", data, "--no-progress", "--report", tmp_path / "r.json"]
    code, _, err = run([*argv, "--class-map", "x=0,b=2"], capsys)
    assert code == 0, err
    assert [r.label for r in CertificationReport.load(tmp_path / "r.json").records] == [2, 2, 2, 0, 0, 0]
    (tmp_path / "names.json").write_text(json.dumps(["x", "nothing", "b"]))
    assert run([*argv, "--class-map", tmp_path / "names.json"], capsys)[0] == 0
    assert [r.label for r in CertificationReport.load(tmp_path / "r.json").records] == [2, 2, 2, 0, 0, 0]
    code, _, err = run([*argv, "--class-map", "x=0,b=7"], capsys)
    assert code == 1 and "outside the model's 0..2" in err
    code, _, err = run([*argv, "--class-map", "x=0"], capsys)
    assert code == 1 and "does not name the class folders b" in err
    # Folders named by number are names like any other: a subset of them is as ambiguous as cat/dog.
    numbered = tmp_path / "numbered"
    subset_folder(files, numbered, {"2": "a", "1": "b"})
    code, _, err = run(["certify", *timm_args(files, "--patch", "10%"), "--data", numbered / "subset", "--no-progress"], capsys)
    assert code == 1 and "2 class folders (1, 2) for a model of 3 classes" in err and "ambiguous; pass --class-map" in err


def test_folders_named_by_number_get_torchvision_imagefolder_class_ids(tmp_path, capsys):
    """Folders 0..11 are numbered as torchvision's ImageFolder (and the Python guides) number them:
    sorted as strings, so folder "10" is class 2, not class 10."""
    rng = np.random.default_rng(0)
    for c in range(12):
        (tmp_path / "data" / str(c)).mkdir(parents=True)
        Image.fromarray(rng.integers(0, 255, (36, 36, 3), dtype=np.uint8)).save(tmp_path / "data" / str(c) / "0.png")
    torch.manual_seed(0)
    save_file(timm.create_model("test_vit", img_size=32, num_classes=12).state_dict(), tmp_path / "vit.safetensors")
    argv = ["certify", "--model", "timm:test_vit", "--image-size", "32", "--checkpoint", tmp_path / "vit.safetensors", "--patch", "4"]
    code, _, err = run([*argv, "--num-masks", "2", "--data", tmp_path / "data", "--no-progress", "--report", tmp_path / "r.json"], capsys)
    assert code == 0, err
    records = sorted(CertificationReport.load(tmp_path / "r.json").records, key=lambda r: r.index)
    expected = ImageFolder(str(tmp_path / "data")).targets
    assert [r.label for r in records] == expected and expected[2] == 2 and ImageFolder(str(tmp_path / "data")).classes[2] == "10"


def test_an_ambiguous_subset_folder_is_refused(files, timm_folder, tmp_path, capsys):
    data = subset_folder(files, tmp_path, {"cat": "a", "dog": "b"})
    code, _, err = run(["certify", *timm_args(files), "--data", data, "--no-progress"], capsys)
    assert code == 1 and err.count("\n") == 1
    assert "2 class folders (cat, dog) for a model of 3 classes" in err and "ambiguous; pass --class-map" in err
    half = tmp_path / "half"
    subset_folder(files, half, {"a": "a", "dog": "b"})
    code, _, err = run(["certify", "--model", timm_folder, "--data", half / "subset", "--no-progress"], capsys)
    assert code == 1 and "class folders a are label names of the model but dog are not" in err


# ------------------------------------------------------------------------------------ errors
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
        (lambda f, t: timm_args(f, "--data", t / "bad", "--class-map", "a=0"), "cannot read image"),
        (lambda f, t: ["--model", "timm:no_such_net", "--checkpoint", f / "model.safetensors", "--data", f / "data"], "unknown timm architecture"),
        (lambda f, t: ["--model", "timm:test_vit", "--checkpoint", f / "model.safetensors", "--data", f / "data"], "does not fit timm:test_vit"),
        (lambda f, t: ["--model", f"timm:{ARCH}", "--checkpoint", f / "model.pth", "--data", f / "data"], "pickle checkpoints can run code and are refused"),
        (lambda f, t: ["--model", f"timm:{ARCH}", "--data", f / "data"], "needs --pretrained (timm's weights) or --checkpoint"),
        (lambda f, t: ["--model", f"timm:{ARCH}", "--checkpoint", t / "none.safetensors", "--data", f / "data"], "no such file"),
        (lambda f, t: ["--model", f"local-dir:{t / 'nowhere'}", "--data", f / "data"], "nowhere: no such folder"),
        (lambda f, t: timm_args(f, "--data", f / "data", "--device", "tpu:banana"), "--device must be"),
        (lambda f, t: timm_args(f, "--data", f / "data", "--patch", "200"), "larger than the 160x160 image"),
        (lambda f, t: timm_args(f, "--data", f / "data", "--amp"), "--amp was removed"),
    ],
)
def test_errors_are_one_line_and_exit_1(files, tmp_path, bad_folder, capsys, args, message):
    code, _, err = run(["certify", "--no-progress", *args(files, tmp_path)], capsys)
    assert code == 1
    assert err.count("\n") == 1 and err.startswith("robustwrap certify: error: ") and message in err, err
    assert "Traceback" not in err


def test_traceback_option_and_unexpected_errors(files, tmp_path, monkeypatch, capsys):
    argv = ["certify", "--no-progress", *timm_args(files, "--data", tmp_path / "missing")]
    with pytest.raises(FileNotFoundError, match="no such folder"):
        main([*map(str, argv), "--traceback"])
    capsys.readouterr()

    def bug(args):
        raise RuntimeError("an internal bug")

    monkeypatch.setattr(cli.masks, "_masks", bug)
    with pytest.raises(RuntimeError, match="an internal bug"):  # surfaces with its traceback, not as one line
        main(["masks"])
    assert "internal error (RuntimeError)" in capsys.readouterr().err


def test_errors_through_a_real_process(files, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "robustwrap.cli", "certify", *map(str, timm_args(files, "--data", tmp_path / "nowhere"))]
    done = subprocess.run(command, check=False, capture_output=True, text=True, env=env)
    assert done.returncode == 1 and done.stderr.strip().count("\n") == 0 and "no such folder" in done.stderr
    done = subprocess.run([sys.executable, "-m", "robustwrap.cli", "certify", "--patch", "2 percent"], check=False, capture_output=True, text=True, env=env)
    assert done.returncode == 2 and "argument --patch" in done.stderr and "Traceback" not in done.stderr


@pytest.mark.parametrize(
    ("argv", "code"),
    [(["--help"], 0), (["certify", "--help"], 0), (["attack", "--patch", "2%", "--help"], 0), (["certify", "--limit", "some"], 2), (["masks", "--patch", "abc"], 2), (["models"], 0)],
)
def test_help_usage_errors_and_models_import_neither_torch_nor_timm(argv, code):
    """The answers that need no model come before torch and timm are imported (10 s of CPU)."""
    script = (
        "import sys, json\nfrom robustwrap.cli import main\n"
        "try:\n    code = main(json.loads(sys.argv[1]))\nexcept SystemExit as exit_:\n    code = exit_.code\n"
        "heavy = sorted(m for m in ('torch', 'timm', 'matplotlib', 'torchvision', 'huggingface_hub') if m in sys.modules)\n"
        "own = sorted(m for m in sys.modules if m.startswith('robustwrap'))\n"
        "print(json.dumps({'code': code, 'heavy': heavy, 'own': own}), file=sys.stderr)"
    )
    done = subprocess.run([sys.executable, "-c", script, json.dumps(argv)], check=False, capture_output=True, text=True, timeout=120)
    seen = json.loads(done.stderr.strip().splitlines()[-1])
    assert seen["code"] == code and seen["heavy"] == []
    assert {m for m in seen["own"] if not m.startswith("robustwrap.cli.")} <= {"robustwrap", "robustwrap.cli", "robustwrap._args"}  # _args: --patch's spellings
    if argv == ["models"]:
        from robustwrap import zoo

        assert all(name in done.stdout for name in zoo.list_models()) and f"{zoo.DEFAULT_MODEL} *" in done.stdout


def test_the_package_imports_on_first_use_and_attack_stays_the_function():
    """`import robustwrap` is free; every public name and submodule still resolves, and importing the
    submodule `robustwrap.attack` (as the CLI's `from .attack import audit` does) never hides the function."""
    script = (
        "import sys, json, types\nimport robustwrap\nfirst = 'torch' in sys.modules\n"
        "import robustwrap.attack\nfrom robustwrap.attack import audit\n"
        "a = robustwrap.attack\nfrom robustwrap import attack as b\n"
        "import timm\nbefore_models = timm.is_model('bagnet_tiny')\nimport robustwrap.models\n"
        "print(json.dumps({'first': first, 'function': isinstance(a, types.FunctionType) and a is b and a.__module__ == 'robustwrap.attack',"
        " 'module': sys.modules['robustwrap.attack'].attack is a, 'before': before_models, 'after': timm.is_model('bagnet_tiny'),"
        " 'names': [n for n in robustwrap.__all__ if getattr(robustwrap, n, None) is None]}))"
    )
    done = subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, text=True, timeout=300)
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen == {"first": False, "function": True, "module": True, "before": False, "after": True, "names": []}
    module = importlib.import_module("robustwrap.attack")  # `import robustwrap.attack as m` gives the function
    assert isinstance(module, types.ModuleType) and robustwrap.attack is module.attack and robustwrap.audit is module.audit
    assert set(robustwrap.__all__) <= set(dir(robustwrap))
    with pytest.raises(AttributeError, match="has no attribute 'no_such_name'"):
        robustwrap.no_such_name  # noqa: B018


# ------------------------------------------------------------------------------------- timm
def test_timm_options_image_size_num_classes_in_chans(tmp_path, capsys):
    torch.manual_seed(1)
    vit = timm.create_model("test_vit", num_classes=5, in_chans=1, img_size=64)  # a fixed-size model built at 64x64
    save_file(vit.state_dict(), tmp_path / "vit.safetensors")
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (70, 70), dtype=np.uint8)).save(tmp_path / "x.png")
    argv = ["predict", tmp_path / "x.png", "--model", "timm:test_vit", "--checkpoint", tmp_path / "vit.safetensors", "--patch", "8", "--json"]
    code, _, err = run(argv, capsys)
    assert code == 1 and "does not fit timm:test_vit" in err  # built at its default size, the checkpoint does not load
    code, out, err = run([*argv, "--image-size", "64", "--num-classes", "5", "--in-chans", "1"], capsys)
    assert code == 0, err
    document = json.loads(out)
    assert document["threat_model"].startswith("patch 8x8 px (1.56% of 64x64)")
    model = robustwrap.wrap(vit, patch=8).eval()
    config = resolve_data_config({"input_size": (1, 64, 64), "mean": (0.5,), "std": (0.5,)}, model=vit)  # test_vit's mean and std: 0.5
    x = create_transform(**config)(Image.open(tmp_path / "x.png").convert("L"))[None]
    assert document["images"][0]["prediction"] == model.predict(x).item()
    code, _, err = run(["predict", tmp_path / "x.png", "--num-classes", "5"], capsys)
    assert code == 1 and "--num-classes apply to timm models" in err


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    """An offline Hugging Face cache in `tmp_path`, empty until a test puts weights in it."""
    import huggingface_hub.constants
    import huggingface_hub.file_download

    # Older huggingface_hub versions copy the constants into file_download at import.
    for module in (huggingface_hub.constants, huggingface_hub.file_download):
        for name, value in (("HF_HUB_OFFLINE", True), ("HF_HUB_CACHE", str(tmp_path / "hf"))):
            if hasattr(module, name):
                monkeypatch.setattr(module, name, value)
    return tmp_path / "hf"


def test_timm_pretrained_from_the_cache_and_offline_error(files, hf_cache, capsys):
    image = files / "data" / "a" / "0.png"
    argv = ["predict", image, "--model", f"timm:{ARCH}", "--pretrained", "--patch", "10%", "--num-masks", "2", "--json"]
    code, _, err = run(argv, capsys)
    assert code == 1 and err.count("\n") == 1 and "are not in the Hugging Face cache and HF_HUB_OFFLINE is set" in err and "--checkpoint" in err
    # timm's pretrained weights, as a download would have cached them
    torch.manual_seed(2)
    pretrained = timm.create_model(ARCH)
    repo = hf_cache / f"models--{pretrained.pretrained_cfg['hf_hub_id'].replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    (repo / "snapshots" / ("0" * 40)).mkdir(parents=True)
    save_file(pretrained.state_dict(), repo / "snapshots" / ("0" * 40) / "model.safetensors")
    code, out, err = run(argv, capsys)
    assert code == 0, err
    model = robustwrap.wrap(pretrained, patch=0.1, num_masks=2).eval()
    x = create_transform(**resolve_data_config(model=pretrained))(Image.open(image).convert("RGB"))[None]
    assert json.loads(out)["images"][0]["prediction"] == model.predict(x).item()


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


def test_predict_a_folder_as_json(files, capsys):
    code, out, err = run(["predict", files / "data", *timm_args(files, "--patch", "10%"), "--json"], capsys)
    assert code == 0, err
    document = json.loads(out)
    paths = sorted((files / "data").rglob("*.png"))
    assert [r["image"] for r in document["images"]] == [str(p) for p in paths]
    model, transform = python_model(files)
    x = torch.stack([transform(Image.open(p).convert("RGB")) for p in paths])
    prediction = model.predict(x)
    result = model.certify(x, prediction)
    assert [r["prediction"] for r in document["images"]] == prediction.tolist()
    assert [r["certified"] for r in document["images"]] == result.certified.tolist()
    assert [r["case"] for r in document["images"]] == [{1: "I", 2: "II", 3: "III"}[c] for c in result.case.tolist()]
    assert document["threat_model"] == model.mask_set.describe()


def test_predict_unreadable_image(files, bad_folder, capsys):
    code, _, err = run(["predict", bad_folder / "a" / "1.png", *timm_args(files)], capsys)
    assert code == 1 and "cannot read image" in err and err.count("\n") == 1


# ---------------------------------------------------------------------------- embedded default
def test_certify_the_embedded_default_on_a_few_digits(tmp_path, capsys):
    """The README's command, in-process on 3 digits (benchmarks/reproduce_zoo.py runs all 1,000)."""
    from robustwrap import zoo

    code, out, err = run(["certify", "--limit", "3", "--no-progress", "--report", tmp_path / "r.json"], capsys)
    assert code == 0, err
    assert "certified accuracy" in out and "vanilla clean accuracy" in out
    report = CertificationReport.load(tmp_path / "r.json")
    model = zoo.from_pretrained(zoo.DEFAULT_MODEL)
    data = zoo.builtin_dataset(zoo.zoo_entry(zoo.DEFAULT_MODEL)["dataset"], transform=cli._loading._preprocessing(model)[0])
    expected = certify_dataset(model, data, limit=3, progress=False)
    assert [(r.label, r.prediction, r.certified, r.vanilla_prediction) for r in report.records] == [
        (r.label, r.prediction, r.certified, r.vanilla_prediction) for r in expected.records
    ]


def test_models_lists_the_zoo(capsys):
    from robustwrap import zoo

    code, out, _ = run(["models"], capsys)
    assert code == 0
    assert f"{zoo.DEFAULT_MODEL} *" in out
    assert all(name in out for name in zoo.list_models())
    entry = zoo.zoo_entry(zoo.DEFAULT_MODEL)
    row = next(line for line in out.splitlines() if line.startswith(f"{zoo.DEFAULT_MODEL} *"))
    assert f"{100 * entry['metrics']['certified_accuracy']:.1f}%" in row and f"({entry['patch_percent']:.2f}%)" in row


def test_predict_with_the_embedded_default(tmp_path, capsys):
    from robustwrap import zoo

    data = zoo.builtin_dataset(zoo.zoo_entry(zoo.DEFAULT_MODEL)["dataset"])  # PIL images
    paths = []
    for index in range(3):
        image, _ = data[index]
        image.save(tmp_path / f"{index}.png")
        paths.append(tmp_path / f"{index}.png")
    code, out, err = run(["predict", *paths], capsys)
    assert code == 0, err
    model = zoo.from_pretrained(zoo.DEFAULT_MODEL).eval()
    transform = create_transform(**resolve_data_config({"input_size": (model.in_chans or 3, *model.image_size)}, model=model.model))
    mode = "L" if model.in_chans == 1 else "RGB"
    expected = model.predict(torch.stack([transform(Image.open(p).convert(mode)) for p in paths])).tolist()
    assert [int(row.split()[1]) for row in out.splitlines()[3:]] == expected


def test_unknown_zoo_model_is_one_line(capsys):
    code, _, err = run(["certify", "--model", "no-such-model-anywhere", "--limit", "1"], capsys)
    assert code == 1 and err.count("\n") == 1 and "Traceback" not in err


# --------------------------------------------------- issue 18: each defense's own predict columns
def _table(out: str) -> tuple[list[str], list[list[str]]]:
    """The header and rows of the table `predict` prints (cells are separated by two spaces or more)."""
    lines = out.splitlines()
    rule = next(i for i, line in enumerate(lines) if set(line.replace(" ", "")) == {"-"})
    split = [re.split(r"\s{2,}", line.strip()) for line in lines[rule - 1 :] if line.strip()]
    return split[0], split[2:]


def test_predict_prints_the_smoothing_votes(files, capsys):
    images = [files / "data" / "a" / "0.png", files / "data" / "b" / "1.png"]
    code, out, err = run(["predict", *images, "--model", f"timm:{ARCH}", "--checkpoint", files / "model.safetensors", *SMOOTHING], capsys)
    assert code == 0, err
    model = robustwrap.wrap(base_model(files), 8, defense="smoothing", size=40, stride=20).eval()
    transform = create_transform(**resolve_data_config(model=model.model))
    x = torch.stack([transform(Image.open(p).convert("RGB")) for p in images])
    prediction = model.predict(x)
    result = model.certify(x, prediction, early_exit=False)
    header, rows = _table(out)
    assert header == ["image", "prediction", "votes", "runner-up", "certified"]  # no PatchCleanser case or one-mask views
    assert f"by more than 2Δ = {2 * model.delta}" in out
    for row, label, counts, certified in zip(rows, prediction.tolist(), result.counts.tolist(), result.certified.tolist()):
        runner_up = max((c for c in range(3) if c != label), key=lambda c: (counts[c], -c))
        assert row[1:] == [str(label), f"{counts[label]} of {len(model.ablation_set)}", f"{counts[runner_up]} for {runner_up}", "yes" if certified else "no"]
    code, out, err = run(["predict", images[0], "--model", f"timm:{ARCH}", "--checkpoint", files / "model.safetensors", *SMOOTHING, "--json"], capsys)
    record = json.loads(out)["images"][0]
    assert "case" not in record and (record["votes"], record["num_views"], record["delta"]) == (result.counts[0, prediction[0]].item(), len(model.ablation_set), model.delta)


def test_predict_prints_the_patchguard_margin(bagnet_checkpoint, tmp_path, capsys):
    from safetensors.torch import load_file

    from robustwrap import zoo

    paths = []
    for index in range(2):
        zoo.builtin_dataset("mnist-heldout")[index][0].save(tmp_path / f"{index}.png")
        paths.append(tmp_path / f"{index}.png")
    code, out, err = run(["predict", *paths, "--model", "timm:bagnet_tiny", "--checkpoint", bagnet_checkpoint, "--defense", "patchguard"], capsys)
    assert code == 0, err
    base = timm.create_model("bagnet_tiny")
    base.load_state_dict(load_file(bagnet_checkpoint))
    model = robustwrap.wrap(base, defense="patchguard").eval()
    x = torch.stack([cli._loading._preprocessing(model)[0](Image.open(p).convert("L")) for p in paths])
    prediction = model.predict(x)
    result = model.certify(x, prediction)
    header, rows = _table(out)
    assert header == ["image", "prediction", "worst-case evidence margin", "certified"]
    assert [row[1:] for row in rows] == [
        [str(label), f"{margin:.4g}", "yes" if certified else "no"] for label, margin, certified in zip(prediction.tolist(), result.margin.tolist(), result.certified.tolist())
    ]


def test_masks_plot_draws_every_defense(tmp_path, capsys):
    from robustwrap.geometry import AblationSet, feature_window

    argv = ["masks", "--image-size", "32", "--patch", "5", "--defense", "smoothing", "--ablation-size", "4", "--plot", tmp_path / "views.png"]
    code, out, err = run(argv, capsys)
    assert code == 0, err
    assert f"Δ={AblationSet(32, 'column', 4).delta(5)} of the V=32 views" in out and out.rstrip().endswith(f"picture: {tmp_path / 'views.png'}")
    argv = ["masks", "--image-size", "224", "--patch", "32", "--defense", "patchguard", "--receptive-field", "17", "--feature-stride", "8", "--plot", tmp_path / "window.png"]
    code, out, err = run(argv, capsys)
    assert code == 0, err
    assert feature_window(224, 32, 17, 8, 0, 26) == (6, 6) and "6x6 window" in out and out.rstrip().endswith(f"picture: {tmp_path / 'window.png'}")
    for name in ("views.png", "window.png"):
        with Image.open(tmp_path / name) as image:
            assert image.format == "PNG"


# --------------------------------------------------------------- the zoo path, with a stub zoo
class _StubZoo:
    """`robustwrap.zoo` answering for one zoo model, the tiny timm network, with its own 9 images."""

    DEFAULT_MODEL = "tiny"
    BUILTIN_DATASETS: ClassVar[dict[str, str]] = {"tiny-data": "nine random images"}
    entry: ClassVar[dict] = {
        "name": "tiny",
        "architecture": ARCH,
        "dataset": "tiny-data",
        "patch": [3, 3],
        "patch_percent": 10.0,
        "num_masks": 2,
        "metrics": {"clean_accuracy": 0.5, "certified_accuracy": 0.25},
    }

    def __init__(self, files):
        self.files = files
        self.models = []

    def list_models(self, pattern="*"):
        return ["tiny"]

    def zoo_entry(self, name):
        return self.entry

    def from_pretrained(self, spec):
        if spec != "tiny":
            raise ValueError(f"unknown model {spec!r}")
        self.models.append(python_model(self.files)[0])
        return self.models[-1]

    def builtin_dataset(self, name, transform=None):
        return ImageFolder(str(self.files / "data"), transform=transform)


@pytest.fixture
def stub_zoo(files, monkeypatch):
    zoo = _StubZoo(files)
    monkeypatch.setattr(cli._loading, "_zoo", lambda: zoo)
    return zoo


def test_certify_defaults_to_the_zoo_default_and_its_data(files, stub_zoo, tmp_path, capsys):
    code, _, err = run(["certify", "--no-progress", "--limit", "all", "--report", tmp_path / "r.json"], capsys)
    assert code == 0, err
    report = CertificationReport.load(tmp_path / "r.json")
    assert (report.model, report.data, report.num_images) == ("tiny", "tiny-data", 9)
    model, transform = python_model(files)
    expected = certify_dataset(model, ImageFolder(str(files / "data"), transform=transform), progress=False)
    assert [(r.prediction, r.certified) for r in report.records] == [(r.prediction, r.certified) for r in expected.records]
    code, _, err = run(["certify", "--model", "unknown-thing", "--no-progress"], capsys)
    assert code == 1 and err == "robustwrap certify: error: unknown model 'unknown-thing'\n"


def test_the_default_run_certifies_a_documented_subset(stub_zoo, monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(cli.certify, "DEFAULT_LIMIT", 4)
    code, out, err = run(["certify", "--no-progress"], capsys)
    assert code == 0, err
    assert re.search(r"^ *data +tiny-data \(4 images, \d+ classes\)$", out, re.MULTILINE), out  # the report of the 4 certified, not of 9
    assert "certified the first 4 of 9 images (the quick default); --limit all certifies all of them" in out
    assert "nothing was saved: --report FILE.json keeps the report, --results FILE.jsonl the per-image results" in out
    code, out, err = run(["certify", "--no-progress", "--limit", "all", "--results", tmp_path / "r.jsonl"], capsys)
    assert code == 0 and "(9 images" in out and "the quick default" not in out and f"per-image results: {tmp_path / 'r.jsonl'}" in out


def test_threads_views_per_pass_and_images_per_step(stub_zoo, monkeypatch, capsys):
    seen = {"threads": set(), "views": []}
    calls = []
    real = robustwrap.dataset.certify_dataset

    def hook(module, inputs, output):
        seen["threads"].add(torch.get_num_threads())
        seen["views"].append(inputs[0].shape[0])

    def spy(model, data, **kwargs):
        calls.append((model.batch_size, kwargs["batch_size"]))
        model.model.register_forward_hook(hook)
        return real(model, data, **kwargs)

    monkeypatch.setattr(robustwrap.dataset, "certify_dataset", spy)
    before = torch.get_num_threads()
    argv = ["certify", "--no-progress", "--limit", "4"]
    code, _, err = run([*argv, "--threads", "2", "--views-per-pass", "5", "--images-per-step", "2"], capsys)
    assert code == 0, err
    assert seen["threads"] == {2} and torch.get_num_threads() == before
    assert calls == [(5, 2)] and max(seen["views"]) == 5  # views per forward pass
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    seen["threads"].clear()
    assert run(argv, capsys)[0] == 0
    own = python_model(stub_zoo.files)[0].batch_size  # the model's own views per pass
    assert own != 5 and seen["threads"] == {3} and calls[-1] == (own, None)  # and the library's images per step
    code, _, err = run([*argv, "--batch-size", "3"], capsys)
    assert code == 0 and calls[-1] == (own, 3) and "--batch-size is deprecated and means images per certify step" in err
    code, _, err = run([*argv, "--batch-size", "3", "--images-per-step", "2"], capsys)
    assert code == 1 and "pass only --images-per-step" in err


def test_one_thread_by_default_on_a_busy_machine(stub_zoo, monkeypatch, capsys):
    seen = set()
    real = robustwrap.dataset.certify_dataset

    def spy(model, data, **kwargs):
        model.model.register_forward_hook(lambda module, inputs, output: seen.add(torch.get_num_threads()) and None)
        return real(model, data, **kwargs)

    monkeypatch.setattr(robustwrap.dataset, "certify_dataset", spy)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(cli, "_busy_cores", lambda: (6.5, 2))
    torch.set_num_threads(2)
    try:
        code, _, err = run(["certify", "--no-progress", "--limit", "2"], capsys)
        assert code == 0 and seen == {1} and "the machine is busy (load 6.5 on 2 cores): running torch on 1 thread" in err
        seen.clear()
        code, _, err = run(["certify", "--no-progress", "--limit", "2", "--threads", "2"], capsys)
        assert code == 0 and seen == {2} and "busy" not in err
        monkeypatch.setattr(cli, "_busy_cores", lambda: None)
        seen.clear()
        code, _, err = run(["certify", "--no-progress", "--limit", "2"], capsys)
        assert code == 0 and seen == {2} and "busy" not in err  # an idle machine keeps torch's default
    finally:
        torch.set_num_threads(1)


def test_precision_option_is_the_models_setting(stub_zoo, tmp_path, capsys):
    code, _, err = run(["certify", "--no-progress", "--limit", "2", "--precision", "bfloat16", "--report", tmp_path / "r.json"], capsys)
    assert code == 0, err
    assert stub_zoo.models[-1].precision == "bfloat16" and CertificationReport.load(tmp_path / "r.json").precision == "bfloat16"


def test_builtin_data_name_that_is_also_a_folder_is_ambiguous(stub_zoo, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny-data").mkdir()
    code, _, err = run(["certify", "--data", "tiny-data", "--no-progress"], capsys)
    assert code == 1 and "write ./tiny-data for the folder" in err


def test_models_table_from_the_zoo(stub_zoo, monkeypatch, capsys):
    monkeypatch.setattr(cli.models, "_manifest", lambda: {"default": stub_zoo.DEFAULT_MODEL, "models": [stub_zoo.entry]})
    code, out, _ = run(["models"], capsys)
    assert code == 0
    row = next(line for line in out.splitlines() if line.startswith("tiny *"))
    assert row.split()[2:] == [ARCH, "tiny-data", "3x3", "px", "(10.00%)", "2", "50.0%", "25.0%", "-"]


# ------------------------------------------------------------------------------------ defenses
SMOOTHING = ["--defense", "smoothing", "--ablation-size", "40", "--ablation-stride", "20", "--patch", "8"]


def test_defense_names_and_options_match_the_library():
    from robustwrap.defenses import DEFENSES, _options

    assert cli._options.DEFENSE_NAMES == tuple(DEFENSES)
    for dest, (defenses, option) in cli._options.DEFENSE_OPTIONS.items():
        for defense in defenses:
            assert option in _options(DEFENSES[defense]), (dest, defense, option)


def test_certify_with_smoothing_records_the_defense(files, tmp_path, capsys):
    argv = ["certify", "--model", f"timm:{ARCH}", "--checkpoint", files / "model.safetensors", *SMOOTHING, "--vote-threshold", "0.3"]
    code, _, err = run([*argv, "--data", files / "data", "--limit", "3", "--no-progress", "--report", tmp_path / "r.json"], capsys)
    assert code == 0, err
    report = CertificationReport.load(tmp_path / "r.json")
    assert report.defense == "smoothing" and report.num_images == 3
    assert (report.settings["ablation"], report.settings["size"], report.settings["stride"], report.settings["threshold"]) == ("column", 40, 20, 0.3)
    assert report.settings["patch"] == [8, 8]
    model = robustwrap.wrap(base_model(files), 8, defense="smoothing", size=40, stride=20, threshold=0.3).eval()
    assert report.settings == json.loads(json.dumps(model.settings()))
    transform = create_transform(**resolve_data_config(model=model.model))
    expected = certify_dataset(model, ImageFolder(str(files / "data"), transform=transform), limit=3, progress=False)
    assert [(r.prediction, r.certified, r.num_views) for r in report.records] == [(r.prediction, r.certified, r.num_views) for r in expected.records]
    assert [r.delta for r in report.records] == [model.delta] * 3  # the defense's own record field


@pytest.fixture(scope="module")
def bagnet_checkpoint(tmp_path_factory):
    """Random weights of the tiny BagNet that `import robustwrap` registers with timm (1x32x32, 10 classes)."""
    torch.manual_seed(3)
    path = tmp_path_factory.mktemp("bagnet") / "bagnet.safetensors"
    save_file(timm.create_model("bagnet_tiny").state_dict(), path)
    return path


def test_certify_and_predict_with_patchguard_on_digits(bagnet_checkpoint, tmp_path, capsys):
    from safetensors.torch import load_file

    model_args = ["--model", "timm:bagnet_tiny", "--checkpoint", bagnet_checkpoint, "--defense", "patchguard"]
    guard = ["--detection-threshold", "0.2", "--clip", "5"]
    code, out, err = run(["certify", *model_args, *guard, "--data", "mnist-heldout", "--limit", "2", "--no-progress", "--report", tmp_path / "r.json"], capsys)
    assert code == 0, err
    report = CertificationReport.load(tmp_path / "r.json")
    assert report.defense == "patchguard" and report.num_images == 2 and report.data == "mnist-heldout"
    base = timm.create_model("bagnet_tiny")
    base.load_state_dict(load_file(bagnet_checkpoint))
    model = robustwrap.wrap(base, defense="patchguard", threshold=0.2, clip=5.0).eval()
    assert report.settings == json.loads(json.dumps(model.settings()))
    assert (report.settings["threshold"], report.settings["clip"], report.settings["receptive_field"]) == (0.2, 5.0, [5, 5])
    from robustwrap import zoo

    data = zoo.builtin_dataset("mnist-heldout", transform=cli._loading._preprocessing(model)[0])
    expected = certify_dataset(model, data, limit=2, progress=False)
    assert [(r.prediction, r.certified, r.num_views) for r in report.records] == [(r.prediction, r.certified, 1) for r in expected.records]
    image, _ = zoo.builtin_dataset("mnist-heldout")[0]
    image.save(tmp_path / "digit.png")
    code, out, err = run(["predict", tmp_path / "digit.png", *model_args, *guard, "--json"], capsys)
    assert code == 0, err
    document = json.loads(out)
    assert "patchguard: receptive field 5x5 px, stride 2x2, offset 0x0, window 5x5, detection threshold 0.2, clip 5.0" in document["threat_model"]
    x = cli._loading._preprocessing(model)[0](Image.open(tmp_path / "digit.png").convert("L"))[None]
    assert document["images"][0]["prediction"] == model.predict(x).item()
    assert document["images"][0]["certified"] == bool(model.certify(x, model.predict(x)).certified.item())


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--defense", "smoothing", "--ablation-size", "40", "--num-masks", "2"], "--num-masks is an option of defense 'patchcleanser', not of 'smoothing'"),
        (["--defense", "patchguard", "--vote-threshold", "0.5"], "--vote-threshold is an option of defense 'smoothing', not of 'patchguard'"),
        (["--detection-threshold", "0.1"], "--detection-threshold is an option of defense 'patchguard', not of 'patchcleanser'"),
        (["--defense", "smoothing", "--ablation-stride", "20"], "--ablation-size is required"),  # the library's own error, in option names
        (["--defense", "smoothing", "--ablation-size", "40", "--vote-threshold", "1.5"], "--vote-threshold must be in (0, 1]"),
    ],
)
def test_an_option_of_another_defense_is_refused_in_one_line(files, monkeypatch, capsys, argv, message):
    forwards = []
    real = timm.create_model

    def counted(*args, **kwargs):
        model = real(*args, **kwargs)
        model.register_forward_hook(lambda *_: forwards.append(1))
        return model

    monkeypatch.setattr(timm, "create_model", counted)
    base = ["certify", "--model", f"timm:{ARCH}", "--checkpoint", files / "model.safetensors", "--data", files / "data", "--no-progress"]
    code, _, err = run([*base, *argv], capsys)
    assert code == 1 and err.count("\n") == 1 and message in err, err
    assert forwards == []  # refused before any forward pass


def test_masks_refuses_an_option_of_another_defense(capsys):
    code, _, err = run(["masks", "--defense", "smoothing", "--ablation-size", "4", "--num-masks", "3"], capsys)
    assert code == 1 and err == "robustwrap masks: error: --num-masks is an option of defense 'patchcleanser', not of 'smoothing'\n"


def test_masks_shows_smoothing_views_and_the_patchguard_window(capsys):
    code, out, err = run(["masks", "--image-size", "32", "--patch", "5", "--defense", "smoothing", "--ablation-size", "4"], capsys)
    assert code == 0, err
    assert "4 px columns on 32x32, stride 1; 32 views" in out and "Δ=8 of the V=32 views" in out and "2Δ=16" in out
    assert out.splitlines()[-1].split() == ["31", "0", "31"]  # the last view keeps columns 31, 0, 1, 2
    code, out, err = run(["masks", "--patch", "32", "--defense", "patchguard", "--receptive-field", "17", "--feature-stride", "8"], capsys)
    assert code == 0, err
    assert "local logits 26x26" in out and "a 6x6 window" in out  # BagNet-17 at 224 with a 32 px patch (issue 12)
    code, out, _ = run(["masks", "--patch", "32", "--defense", "patchguard", "--receptive-field", "33", "--feature-stride", "8"], capsys)
    assert "local logits 24x24" in out and "a 8x8 window" in out  # BagNet-33
    code, _, err = run(["masks", "--defense", "patchguard", "--receptive-field", "17"], capsys)
    assert code == 1 and "needs --feature-stride" in err


def test_a_defended_model_keeps_its_defense_unless_asked(files, stub_zoo, tmp_path, capsys):
    argv = ["certify", "--no-progress", "--limit", "2", "--report", tmp_path / "r.json"]
    code, _, err = run([*argv, "--defense", "patchcleanser"], capsys)
    assert code == 0, err
    own = stub_zoo.models[-1]
    report = CertificationReport.load(tmp_path / "r.json")
    assert report.defense == "patchcleanser" and report.settings == json.loads(json.dumps(own.settings()))
    code, _, err = run([*argv, "--ablation-size", "40"], capsys)  # smoothing's option on a PatchCleanser model
    assert code == 1 and "not of 'patchcleanser'; this model's defense is 'patchcleanser': pass --defense smoothing to re-wrap it" in err
    code, _, err = run([*argv, *SMOOTHING], capsys)
    assert code == 0, err
    report = CertificationReport.load(tmp_path / "r.json")
    assert report.defense == "smoothing" and (report.settings["size"], report.settings["stride"]) == (40, 20)
    rewrapped = robustwrap.wrap(stub_zoo.models[-1].model, 8, defense="smoothing", size=40, stride=20).eval()  # its base weights
    data = ImageFolder(str(files / "data"), transform=cli._loading._preprocessing(rewrapped)[0])
    expected = certify_dataset(rewrapped, data, limit=2, progress=False)
    assert [(r.prediction, r.certified) for r in report.records] == [(r.prediction, r.certified) for r in expected.records]


def test_rewrapping_keeps_the_models_own_settings(files):
    smoothing = robustwrap.wrap(base_model(files), 8, defense="smoothing", size=40, stride=20, threshold=0.4, margin=0.5)
    args = cli._parser().parse_args(["predict", "x.png", "--patch", "6"])
    again = cli._loading._with_settings(smoothing, 6, args)
    assert again.model is smoothing.model and again.patch == (6, 6)
    assert (again.size, again.stride, again.threshold, again.margin, again.batch_size) == (40, 20, 0.4, 0.5, smoothing.batch_size)
    args = cli._parser().parse_args(["predict", "x.png", "--vote-threshold", "0.6", "--margin", "0.25", "--views-per-pass", "7"])
    again = cli._loading._with_settings(smoothing, None, args)
    assert (again.patch, again.size, again.threshold, again.margin, again.batch_size) == ((8, 8), 40, 0.6, 0.25, 7)
    args = cli._parser().parse_args(["predict", "x.png"])
    assert cli._loading._with_settings(smoothing, None, args) is smoothing  # nothing asked: the model as it is
    args = cli._parser().parse_args(["predict", "x.png", "--defense", "patchcleanser", "--num-masks", "2"])
    moved = cli._loading._with_settings(smoothing, None, args)
    assert moved.defense == "patchcleanser" and moved.model is smoothing.model and moved.mask_set.grid == (2, 2)


# -------------------------------------------------------------------------------------- attack
def test_attack_prints_the_three_accuracies(tmp_path, capsys):
    argv = ["attack", "--limit", "2", "--steps", "2", "--budget", "500", "--no-progress", "--output", tmp_path / "findings"]
    code, out, err = run([*argv, "--report", tmp_path / "audit.json"], capsys)
    assert code == 0, err
    for line in ("clean accuracy", "certified accuracy", "empirical robust accuracy", "OK: none of"):
        assert line in out
    assert "(2 of 1000 images)" in out and f"report: {tmp_path / 'audit.json'}" in out
    document = json.loads((tmp_path / "audit.json").read_text())
    assert document["ok"] is True and document["num_images"] == 2 and document["defense"] == "patchcleanser"
    assert document["attack"]["steps"] == 2 and document["attack"]["budget"] == 500
    assert document["empirical_accuracy"] >= document["certified_accuracy"]
    assert not (tmp_path / "findings").exists()  # written only for a broken certificate


def test_attack_exits_3_and_saves_a_reproduction_on_a_broken_certificate(monkeypatch, tmp_path, capsys):
    from robustwrap import zoo

    model = zoo.from_pretrained(zoo.DEFAULT_MODEL)
    clean: set[bytes] = set()
    certify, predict = model.certify, model.predict

    def broken_certify(x, y, early_exit=True):  # every correct image "certified"
        clean.update(image.cpu().numpy().tobytes() for image in x)
        result = certify(x, y, early_exit)
        return type(result)(**{**result.__dict__, "certified": result.prediction == y})

    def fragile_predict(x):  # any patch changes the prediction
        labels = predict(x)
        pasted = torch.tensor([image.cpu().numpy().tobytes() not in clean for image in x])
        return torch.where(pasted, (labels + 1) % model.num_classes, labels)

    model.certify, model.predict = broken_certify, fragile_predict
    monkeypatch.setattr(cli._loading, "_from_pretrained", lambda spec: model)
    code, out, err = run(["attack", "--limit", "2", "--steps", "1", "--budget", "100", "--no-progress", "--output", tmp_path / "findings"], capsys)
    assert code == cli.EXIT_BROKEN_CERTIFICATE == 3
    assert "FAILED" in out and "a bug in robustwrap" in err and f"saved in {tmp_path / 'findings'}/" in err
    assert sorted(p.name for p in (tmp_path / "findings").iterdir()) == ["finding-0.json", "finding-0.safetensors", "finding-1.json", "finding-1.safetensors"]
    assert json.loads((tmp_path / "findings" / "finding-0.json").read_text())["settings"] == model.settings()


# ----------------------------------------------------------- --results: cut-off lines and refusals
REMEDY = "; remove the file or choose another --results"


def certify_argv(files, path, *more):
    return ["certify", *timm_args(files), "--data", files / "data", "--no-progress", "--results", path, *more]


def one_error_line(err: str) -> str:
    """The error line of a command that failed; it must be its only line on stderr."""
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert "results_path" not in err and "resume=" not in err  # Python's words, not the command line's
    return lines[0]


def test_a_line_cut_off_mid_write_is_dropped_with_a_warning_and_redone(files, tmp_path, capsys):
    path = tmp_path / "r.jsonl"
    assert run([*certify_argv(files, path, "--patch", "10%"), "--report", tmp_path / "a.json"], capsys)[0] == 0
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:5]) + lines[5][:14])  # header, images 0-3, and the start of image 4's line
    code, _, err = run([*certify_argv(files, path, "--patch", "10%"), "--resume", "--report", tmp_path / "b.json"], capsys)
    assert code == 0, err
    assert err == (
        f"robustwrap certify: warning: results file {path}: its last line (line 6, the record of image 4) was cut off mid-write "
        "by an interruption; it is dropped and image 4 is certified again\n"
    )
    a, b = CertificationReport.load(tmp_path / "a.json"), CertificationReport.load(tmp_path / "b.json")
    assert a.records == b.records
    assert [json.loads(line)["index"] for line in path.read_text().splitlines()[1:]] == list(range(9))


def test_refusals_speak_the_command_line(files, tmp_path, capsys):
    path = tmp_path / "r.jsonl"
    assert run(certify_argv(files, path, "--patch", "10%"), capsys)[0] == 0
    lines = path.read_text().splitlines(keepends=True)

    code, _, err = run([*certify_argv(files, path, "--patch", "20%"), "--resume"], capsys)
    assert code == 1
    (m, _), (n, _) = (python_model(files, patch)[0].mask_set.mask_size for patch in (0.1, 0.2))
    (s, _), (t, _) = (python_model(files, patch)[0].mask_set.stride for patch in (0.1, 0.2))
    assert one_error_line(err) == (
        f"robustwrap certify: error: --results {path} holds results of another model or threat model (patch 51x51 there, 72x72 now; "
        f"mask_set (patch_sizes [51x51] there, [72x72] now; mask_size {m}x{m} there, {n}x{n} now; stride {s}x{s} there, {t}x{t} now; "
        "also boxes))" + REMEDY
    )

    # Other class ids for the same images: refused at the first image whose label moved.
    path.write_text("".join(lines[:6]))
    code, _, err = run([*certify_argv(files, path, "--patch", "10%", "--class-map", "a=2,b=0,c=1"), "--resume"], capsys)
    assert code == 1
    assert one_error_line(err) == (
        f"robustwrap certify: error: --results {path} holds a record for image 0 with label 0, and data now gives image 0 label 2; the "
        "labels (a target_transform, the class order of an image folder) changed since those results were written" + REMEDY
    )

    path.write_text("".join(lines[:3]) + "{not json\n" + "".join(lines[3:6]))
    code, _, err = run([*certify_argv(files, path, "--patch", "10%"), "--resume"], capsys)
    assert code == 1
    assert one_error_line(err) == (
        f"robustwrap certify: error: --results {path} has a damaged line 4 (not valid JSON); an interruption cuts off only the last "
        "line, so something else changed the file" + REMEDY
    )


# ------------------------------------------------------------------------- errors in option names
# A keyword of the Python API (`receptive_field=`, `size`, `drop_tokens=True`) in a command's error.
PYTHON_KEYWORD = re.compile(
    r"(?<![\w-])(?:receptive_field|feature_stride|feature_offset|num_masks|drop_tokens|image_size|num_classes)\b|(?<![\w-])(?:size|stride|threshold|patch)="
)


@pytest.mark.parametrize(
    ("argv", "start", "wording"),
    [
        # PatchGuard with a base model that declares no geometry, and none on the command line
        (["--defense", "patchguard"], "PatchGuard needs", ["pass --receptive-field", "--feature-stride", "--feature-offset"]),
        (["--defense", "smoothing"], "--ablation-size is required", ["(e.g. --ablation-size 19 for column bands"]),
        (["--defense", "smoothing", "--ablation-size", "40", "--drop-tokens"], "--drop-tokens needs a model whose token grid", ["Use --no-drop-tokens"]),
        (["--defense", "smoothing", "--ablation-size", "40", "--patch", "150"], "a 150x150 patch meets", ["a smaller --ablation-size or --ablation-stride"]),
        (["--patch", "500"], "--patch 500x500 is larger than the 160x160 image", []),
    ],
)
def test_errors_of_the_defense_name_the_options(files, capsys, argv, start, wording):
    base = ["certify", "--model", f"timm:{ARCH}", "--checkpoint", files / "model.safetensors", "--data", files / "data", "--no-progress"]
    code, _, err = run([*base, *argv], capsys)
    assert code == 1 and err.count("\n") == 1 and err.startswith(f"robustwrap certify: error: {start}"), err
    assert all(words in err for words in wording), err
    # The model's own attributes keep their names ("the base model's receptive_field"); nothing asks for a keyword.
    assert not PYTHON_KEYWORD.search(re.sub(r"model's [a-z_, ]+:", "", err)), err


def test_geometry_contradicting_the_model_names_the_option(bagnet_checkpoint, capsys):
    argv = ["certify", "--model", "timm:bagnet_tiny", "--checkpoint", bagnet_checkpoint, "--defense", "patchguard", "--data", "mnist-heldout"]
    code, _, err = run([*argv, "--receptive-field", "7", "--no-progress"], capsys)
    assert code == 1 and err.startswith("robustwrap certify: error: --receptive-field 7 contradicts the model's own receptive_field=5"), err
    assert "receptive_field=7" not in err and "leave --receptive-field unset" in err


def test_masks_errors_name_the_options(capsys):
    code, _, err = run(["masks", "--image-size", "32", "--patch", "30", "--defense", "smoothing", "--ablation-size", "4"], capsys)
    assert code == 1 and "Use a smaller --ablation-size or --ablation-stride, or a smaller patch" in err and not PYTHON_KEYWORD.search(err), err


def test_import_errors_name_the_options(tmp_path, capsys):
    torch.manual_seed(0)
    path = tmp_path / "vit_base_patch16_224_imagenette.pth"  # PatchCleanser's own file name and layout
    torch.save({"model_state_dict": torch.nn.DataParallel(timm.create_model("test_vit", num_classes=10)).state_dict()}, path)
    code, _, err = run(["import", path, "--format", "patchcleanser", "--out", tmp_path / "o", "--model", "test_vit", "--patch", "500"], capsys)
    assert (code, err) == (1, "robustwrap import: error: --patch 500x500 is larger than the 160x160 image\n")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("word", ["receptive_field r", "image size", "a 150x150 patch meets", "the model's own receptive_field=5"])
def test_option_words_leave_english_and_the_models_attributes_alone(word):
    options = {"receptive_field": "--receptive-field", "size": "--ablation-size", "patch": "--patch", "image_size": "--image-size"}
    translated = cli._options._option_words(f"it says {word}", options)
    assert translated == f"it says {word.replace('receptive_field r', '--receptive-field r')}"


# --------------------------------------------------------------------------------- drop_tokens
def test_drop_tokens_options_reach_smoothing():
    vit = timm.create_model("test_vit", img_size=32, num_classes=3).eval()

    def wrapped(model, *more):
        args = cli._parser().parse_args(["predict", "x.png", "--defense", "smoothing", "--ablation-size", "8", *more])
        return cli._loading._with_settings(model, 4, args)

    default, on, off = wrapped(vit), wrapped(vit, "--drop-tokens"), wrapped(vit, "--no-drop-tokens")
    assert (default.drop_tokens, on.drop_tokens, off.drop_tokens) == (True, True, False)  # None: on for timm's ViTs
    assert off.settings()["drop_tokens"] is False and on.settings()["drop_tokens"] is True
    # A defended model is re-wrapped with the option and keeps its other settings.
    again = wrapped(off, "--drop-tokens")
    assert again.drop_tokens is True and (again.size, again.patch, again.model) == (8, (4, 4), vit)
    assert cli._loading._with_settings(off, None, cli._parser().parse_args(["predict", "x.png"])).drop_tokens is False
    # train and import take it as well; masks, predict and certify through the same option group.
    for command in (["train", "--data", "d", "--out", "o"], ["import", "f.pth", "--format", "drs", "--out", "o"]):
        args = cli._parser().parse_args([*command, "--no-drop-tokens"])
        assert cli._options._check_defense_options(args, "smoothing", "smoothing") == {"drop_tokens": False}


def test_drop_tokens_is_an_option_of_smoothing_and_patchcleanser(files, capsys):
    code, _, err = run(["certify", *timm_args(files, "--data", files / "data", "--drop-tokens")], capsys)
    assert code == 1 and err.startswith("robustwrap certify: error: --drop-tokens needs a model whose token grid can be read"), err
    argv = ["certify", "--model", f"timm:{ARCH}", "--checkpoint", files / "model.safetensors", "--defense", "patchguard"]
    code, _, err = run([*argv, "--receptive-field", "9", "--feature-stride", "4", "--data", files / "data", "--drop-tokens"], capsys)
    assert (code, err) == (1, "robustwrap certify: error: --drop-tokens is an option of defenses 'smoothing' and 'patchcleanser', not of 'patchguard'\n")


def test_drop_tokens_reaches_patchcleanser_and_a_rewrap_keeps_its_token_masks():
    from robustwrap.defenses.patchcleanser import token_mask_set

    vit = timm.create_model("test_vit", img_size=32, patch_size=8, num_classes=3).eval()
    grid = vit.patch_embed.patch_size[0]

    def wrapped(model, patch, *more):
        return cli._loading._with_settings(model, patch, cli._parser().parse_args(["predict", "x.png", *more]))

    assert (wrapped(vit, 4).drop_tokens, wrapped(vit, 4, "--drop-tokens").drop_tokens) == (False, True)
    masks = token_mask_set(32, 5, grid, stride=grid)
    pixel = robustwrap.wrap(vit, mask_set=masks).eval()
    # the switch alone keeps the model's own (token) mask set; a --patch rebuilds the masks and keeps drop_tokens
    on = wrapped(pixel, None, "--drop-tokens")
    assert len(masks) == 9 and on.drop_tokens is True and on.mask_set == masks and on.model is vit
    assert wrapped(on, None, "--views-per-pass", "3").drop_tokens is True
    moved = wrapped(on, 6)
    assert moved.drop_tokens is True and tuple(moved.mask_set.patch_sizes) == ((6, 6),) and moved.mask_set != masks
    assert wrapped(on, None, "--no-drop-tokens").mask_set == masks


def test_a_grey_model_rebuilt_for_colour_images_gets_its_normalisation_on_every_channel(tmp_path, capsys):
    """bagnet_tiny's data config has one mean and std (grey digits); built with in_chans=3 and saved,
    `certify --model DIR` normalises each colour channel with them instead of refusing the model."""
    import robustwrap.models  # noqa: F401 - registers bagnet_tiny with timm

    torch.manual_seed(0)
    base = timm.create_model("bagnet_tiny", num_classes=2, in_chans=3).eval()
    robustwrap.wrap(base, defense="patchguard", patch=3).eval().save_pretrained(tmp_path / "m")
    for c in "01":
        (tmp_path / "data" / c).mkdir(parents=True)
        Image.new("RGB", (32, 32), (200, 100, 0)).save(tmp_path / "data" / c / "a.png")
    loaded = robustwrap.from_pretrained(str(tmp_path / "m"))
    transform, mode = cli._loading._preprocessing(loaded)
    x = transform(Image.new("RGB", (32, 32), (200, 100, 0)))
    mean, std = base.pretrained_cfg["mean"][0], base.pretrained_cfg["std"][0]
    assert mode == "RGB" and torch.allclose(x[:, 0, 0], (torch.tensor([200, 100, 0]) / 255 - mean) / std, atol=1e-6)
    code, _, err = run(["certify", "--model", str(tmp_path / "m"), "--data", str(tmp_path / "data"), "--no-progress"], capsys)
    assert code == 0, err


def test_built_in_grey_digits_are_converted_to_a_colour_model_channels(tmp_path, capsys):
    """`certify --data mnist-heldout` with a 3-channel model: the grey digits become RGB, as the grey
    PNGs of an image folder do, and are certified as such (not an internal error)."""
    torch.manual_seed(0)
    base = timm.create_model("bagnet_tiny", num_classes=10, in_chans=3).eval()
    robustwrap.wrap(base, defense="patchguard", patch=3).eval().save_pretrained(tmp_path / "m")
    argv = ["certify", "--model", tmp_path / "m", "--data", "mnist-heldout", "--limit", "2", "--no-progress", "--report", tmp_path / "r.json"]
    code, _, err = run(argv, capsys)
    assert code == 0, err
    loaded = robustwrap.from_pretrained(str(tmp_path / "m")).eval()
    transform, mode = cli._loading._preprocessing(loaded)
    digits = [robustwrap.zoo.builtin_dataset("mnist-heldout")[i] for i in range(2)]
    x = torch.stack([transform(image.convert(mode)) for image, _ in digits])
    report = CertificationReport.load(tmp_path / "r.json")
    assert mode == "RGB" and x.shape[1] == 3
    assert [(r.label, r.prediction) for r in report.records] == list(zip([label for _, label in digits], loaded.predict(x).tolist()))
