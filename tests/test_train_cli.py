"""`robustwrap train`: fine-tune, certify the validation split, save or push; under torchrun; the paper presets.

Everything runs on timm's `test_vit` at 32x32 and generated PNG folders: in-process through
`robustwrap.cli.main`, except one run of `python -m torch.distributed.run --nproc_per_node 2 -m
robustwrap train` on two gloo processes.
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import load_file
from torchvision.datasets import ImageFolder

import robustwrap
from robustwrap import cli
from robustwrap.cli import main
from robustwrap.dataset import certify_dataset
from robustwrap.report import CertificationReport

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--model", "timm:test_vit", "--image-size", "32", "--num-classes", "3", "--workers", "0", "--no-progress"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """`train/` (4 images per class) and `val/` (2 per class) of 3 classes named by id, random 36x36 PNGs."""
    root = tmp_path_factory.mktemp("train_data")
    rng = np.random.default_rng(0)
    for split, n in (("train", 4), ("val", 2)):
        for c in "012":
            (root / split / c).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 255, (36, 36, 3), dtype=np.uint8)).save(root / split / c / f"{i}.png")
    return root


def run(argv, capsys) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def val_set(model, folder: Path):
    return cli._loading._load_data(str(folder), None, "timm:test_vit", model)[0]


def test_train_saves_the_trained_model_with_its_measured_accuracy(data, tmp_path, capsys):
    out = tmp_path / "model"
    code, printed, err = run(["train", *TINY, "--num-masks", "3", "--epochs", "2", "--batch-size", "4", "--data", data / "train", "--val-data", data / "val", "--out", out], capsys)
    assert code == 0, err
    model = robustwrap.from_pretrained(str(out)).eval()
    assert (model.defense, len(model.mask_set), model.patch) == ("patchcleanser", 9, (5, 5))
    info = model.pretrained_info
    assert (info["strategy"], info["training"]["epochs"], info["training"]["processes"], info["training"]["batch_size"]) == ("multisize_greedy", 2, 1, 4)
    # The recorded figures are a measurement of the saved model: certifying it again gives them.
    again = certify_dataset(model, val_set(model, data / "val"), progress=False)
    metrics = info["metrics"]
    assert metrics["num_images"] == again.num_images == 6
    for key in ("vanilla_accuracy", "clean_accuracy", "certified_accuracy"):
        assert metrics[key] == round(getattr(again, key), 4)
    assert metrics["command"] == f"robustwrap certify --model {out} --data {data / 'val'}"
    card = (out / "README.md").read_text()
    assert f"value: {metrics['certified_accuracy']}" in card and "certified accuracy" in card
    assert f"certified accuracy      {100 * again.certified_accuracy:.2f}%" in printed
    # It was trained: the saved weights are not those it started from (the same seed's random init).
    torch.manual_seed(0)
    start = timm.create_model("test_vit", img_size=32, num_classes=3).state_dict()
    saved = load_file(out / "model.safetensors")
    assert saved.keys() == start.keys()
    assert any(not torch.equal(saved[k], start[k]) for k in saved)


def test_a_diverged_run_stops_in_one_line_and_saves_nothing(data, tmp_path, capsys):
    out = tmp_path / "model"
    argv = ["train", *TINY, "--num-masks", "3", "--strategy", "none", "--epochs", "2", "--lr", "1e30", "--data", data / "train", "--out", out]
    code, _, err = run(argv, capsys)
    # epoch 1's one step (finite loss) leaves huge weights; epoch 2's loss is nan: it stops there, before the save
    assert code == 1 and err.startswith("robustwrap train: error: fit_masking: the loss was not finite (nan or inf) in 1 of 1 batches of epoch 2"), err
    assert "lower lr" in err and "Traceback" not in err
    assert not (out / "model.safetensors").exists()


def test_without_val_data_nothing_is_certified(data, tmp_path, capsys):
    out = tmp_path / "model"
    argv = ["train", *TINY, "--num-masks", "3", "--strategy", "greedy", "--epochs", "1", "--lr", "0.037", "--data", data / "train", "--out", out]
    code, printed, err = run(argv, capsys)
    assert code == 0, err
    info = robustwrap.from_pretrained(str(out)).pretrained_info
    assert "metrics" not in info and "dataset" not in info
    assert info["strategy"] == "greedy"
    assert info["training"]["lr"] == 0.037 and ", lr 0.037, " in printed  # --lr reaches the optimizer (default 0.001 for a ViT)
    assert "nothing was certified" in printed and "certification report" not in printed
    # --dataset-name names the data set in the config and the card even when nothing is certified on it
    code, _, err = run([*argv[:-1], tmp_path / "named", "--dataset-name", "tiny3"], capsys)
    assert code == 0, err
    assert robustwrap.from_pretrained(str(tmp_path / "named")).pretrained_info["dataset"] == "tiny3"
    assert "datasets:\n- tiny3\n" in (tmp_path / "named" / "README.md").read_text()


@pytest.mark.parametrize("switch", ["--no-drop-tokens", "--drop-tokens"])
def test_train_smoothing_takes_drop_tokens(data, tmp_path, capsys, switch):
    out = tmp_path / "model"
    smoothing = ["--defense", "smoothing", "--ablation-size", "8", "--patch", "4", switch]
    code, _, err = run(["train", *TINY, *smoothing, "--epochs", "1", "--batch-size", "6", "--data", data / "train", "--out", out], capsys)
    assert code == 0, err
    saved = robustwrap.from_pretrained(str(out))
    # a timm ViT drops tokens unless told not to; the saved settings are what was trained
    assert saved.drop_tokens is (switch == "--drop-tokens") and saved.settings()["drop_tokens"] is (switch == "--drop-tokens")


@pytest.mark.parametrize("augment", [False, True])
def test_training_images_get_the_model_preprocessing_or_timm_augmentation(data, tmp_path, capsys, monkeypatch, augment):
    import robustwrap.fit

    seen = []
    real = robustwrap.fit.fit_masking

    def spy(model, loader, **kwargs):
        seen.append(loader)
        return real(model, loader, **kwargs)

    monkeypatch.setattr(robustwrap.fit, "fit_masking", spy)
    argv = ["train", *TINY, "--num-masks", "3", "--strategy", "random_mask", "--epochs", "1", "--batch-size", "5", "--data", data / "train", "--out", tmp_path / "m"]
    code, _, err = run([*argv, *(["--augment"] if augment else [])], capsys)
    assert code == 0, err
    [loader] = seen
    names = [type(t).__name__ for t in loader.dataset.transform.transforms]
    expected = ["RandomResizedCropAndInterpolation", "RandomHorizontalFlip"] if augment else ["Resize", "CenterCrop"]
    assert names[: len(expected)] == expected
    assert type(loader.sampler).__name__ == "RandomSampler" and loader.batch_size == 5


def test_resume_continues_to_the_same_weights(data, tmp_path, capsys):
    common = ["train", *TINY, "--num-masks", "3", "--strategy", "random_cutout", "--batch-size", "4", "--data", data / "train"]
    assert run([*common, "--epochs", "2", "--out", tmp_path / "whole"], capsys)[0] == 0
    assert run([*common, "--epochs", "1", "--checkpoint-dir", tmp_path / "ckpt", "--out", tmp_path / "first"], capsys)[0] == 0
    code, _, err = run([*common, "--epochs", "2", "--checkpoint-dir", tmp_path / "ckpt", "--resume", "--out", tmp_path / "resumed"], capsys)
    assert code == 0, err
    whole, resumed = load_file(tmp_path / "whole" / "model.safetensors"), load_file(tmp_path / "resumed" / "model.safetensors")
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)
    assert not all(torch.equal(whole[k], v) for k, v in load_file(tmp_path / "first" / "model.safetensors").items())
    # --resume on a folder without a checkpoint says so, and starts from epoch 1 (the same weights as "first").
    (tmp_path / "empty").mkdir()
    code, printed, err = run([*common, "--epochs", "1", "--checkpoint-dir", tmp_path / "empty", "--resume", "--out", tmp_path / "fresh"], capsys)
    assert code == 0, err
    assert printed.startswith(f"--resume: {tmp_path / 'empty'} holds no checkpoint yet; training starts at epoch 1\n")
    first, fresh = load_file(tmp_path / "first" / "model.safetensors"), load_file(tmp_path / "fresh" / "model.safetensors")
    assert all(torch.equal(first[k], fresh[k]) for k in first)


@pytest.fixture
def hub(monkeypatch):
    """A Hub that answers without a network: reachable, logged in as `me` (member of `org`) with a
    write token, and a push that records what it was sent (or fails with `hub.fail`)."""
    import huggingface_hub
    from huggingface_hub import constants

    state = type("Hub", (), {"pushed": [], "fail": None, "user": {"name": "me", "orgs": [{"name": "org"}], "auth": {"accessToken": {"role": "write"}}}})

    def push_to_hub(self, repo_id, **kwargs):
        if state.fail is not None:
            raise state.fail
        state.pushed.append((repo_id, self.pretrained_info))
        return f"https://huggingface.co/{repo_id}"

    def whoami(self, *args, **kwargs):
        if isinstance(state.user, Exception):
            raise state.user
        return state.user

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(robustwrap.hub, "_unreachable", lambda: None)
    monkeypatch.setattr(huggingface_hub.HfApi, "whoami", whoami)
    monkeypatch.setattr(robustwrap.RobustPatchClassifier, "push_to_hub", push_to_hub)
    return state


def test_push_sends_the_model_with_the_command_that_measures_it(data, tmp_path, capsys, monkeypatch, hub):
    monkeypatch.chdir(tmp_path)
    argv = ["train", *TINY, "--num-masks", "3", "--epochs", "1", "--data", data / "train", "--val-data", data / "val", "--dataset-name", "tiny3", "--push", "org/tiny"]
    code, printed, err = run(argv, capsys)
    assert code == 0, err
    [(repo, info)] = hub.pushed
    assert repo == "org/tiny" and info["dataset"] == "tiny3"
    assert info["metrics"]["command"] == f"robustwrap certify --model hf-hub:org/tiny --data {data / 'val'}"
    assert "pushed to https://huggingface.co/org/tiny" in printed
    assert list(tmp_path.iterdir()) == []  # the folder that guards against a failed push is gone after a good one


def test_a_failed_push_keeps_the_trained_model_on_disk(data, tmp_path, capsys, monkeypatch, hub):
    """Issue 23.7: the model is written before the push; when the push fails, the folder is named."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny").mkdir()  # taken: the model goes to tiny-2
    hub.fail = ConnectionError("403 Forbidden: you cannot write to org/tiny")
    code, printed, err = run(["train", *TINY, "--num-masks", "3", "--epochs", "1", "--data", data / "train", "--push", "org/tiny"], capsys)
    assert code == cli.EXIT_ERROR and "epoch 1/1:" in printed and err.count("\n") == 1
    assert "--push org/tiny failed (403 Forbidden: you cannot write to org/tiny); the trained model is saved in tiny-2/" in err
    assert robustwrap.from_pretrained(str(tmp_path / "tiny-2")).pretrained_info["training"]["epochs"] == 1
    # With --out as well, the model is in --out, pushed or not.
    code, printed, err = run(["train", *TINY, "--num-masks", "3", "--epochs", "1", "--data", data / "train", "--push", "org/tiny", "--out", tmp_path / "o"], capsys)
    assert code == cli.EXIT_ERROR and f"saved in {tmp_path / 'o'}/" in err and (tmp_path / "o" / "model.safetensors").is_file()
    hub.fail = None
    code, printed, err = run(["train", *TINY, "--num-masks", "3", "--epochs", "1", "--data", data / "train", "--push", "org/tiny", "--out", tmp_path / "p"], capsys)
    assert code == 0, err
    assert f"saved to {tmp_path / 'p'}/" in printed and "pushed to" in printed and (tmp_path / "p" / "model.safetensors").is_file()


@pytest.mark.parametrize(
    ("repo", "setup", "message"),
    [
        ("org/bad name", None, "--push 'org/bad name' is not a Hub repo id (ORG/NAME or NAME)"),
        ("a/b/c", None, "--push 'a/b/c' is not a Hub repo id"),
        ("org/tiny", "offline", "--push org/tiny: the Hugging Face Hub cannot be reached (HF_HUB_OFFLINE is set); train with --out DIR"),
        ("org/tiny", "unreachable", "--push org/tiny: the Hugging Face Hub cannot be reached (huggingface.co:443 cannot be reached (timed out))"),
        ("org/tiny", "no login", "--push org/tiny: not logged in to the Hugging Face Hub; run `hf auth login` or set HF_TOKEN"),
        ("org/tiny", "refused token", "--push org/tiny: the Hugging Face Hub did not confirm your login (401 Unauthorized: invalid token)"),
        ("org/tiny", "read token", "--push org/tiny: the Hugging Face token of me is read-only"),
        ("other/tiny", None, "--push other/tiny: me cannot write to 'other' (writable: me, org)"),
    ],
)
def test_push_that_cannot_succeed_is_refused_before_training(data, tmp_path, capsys, monkeypatch, hub, repo, setup, message):
    """Issue 23.7: a bad repo id, no network, no login or no write access fail in one line before the first epoch."""
    from huggingface_hub import constants
    from huggingface_hub.errors import LocalTokenNotFoundError

    import robustwrap.fit

    if setup == "offline":
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    elif setup == "unreachable":
        monkeypatch.setattr(robustwrap.hub, "_unreachable", lambda: "huggingface.co:443 cannot be reached (timed out)")
    elif setup == "no login":
        hub.user = LocalTokenNotFoundError("Token is required")
    elif setup == "refused token":
        hub.user = ConnectionRefusedError("401 Unauthorized: invalid token")
    elif setup == "read token":
        hub.user = {**hub.user, "auth": {"accessToken": {"role": "read"}}}
    monkeypatch.setattr(robustwrap.fit, "fit_masking", lambda *a, **k: pytest.fail("trained before refusing --push"))
    monkeypatch.chdir(tmp_path)
    code, printed, err = run(["train", *TINY, "--data", data / "train", "--push", repo], capsys)
    assert (code, printed) == (cli.EXIT_ERROR, "") and err.count("\n") == 1
    assert err.startswith(f"robustwrap train: error: {message}"), err
    assert list(tmp_path.iterdir()) == [] and hub.pushed == []


@pytest.mark.parametrize(
    ("more", "message"),
    [
        (["--resume"], "--resume continues the run in --checkpoint-dir; pass --checkpoint-dir DIR too"),
        (["--resume", "--checkpoint-dir", "no/such/dir"], "--resume: --checkpoint-dir no/such/dir does not exist; leave out --resume"),
        (["--strategy", "cutout"], "--strategy must be one of patchcleanser: multisize_greedy, greedy, grid, random_mask, random_cutout, none; "),
        (["--defense", "smoothing", "--ablation-size", "8", "--strategy", "greedy"], "--strategy greedy does not train defense 'smoothing'; its strategies: random_ablation, none"),
        (["--defense", "smoothing", "--num-masks", "3"], "--num-masks is an option of defense 'patchcleanser', not of 'smoothing'"),
    ],
)
def test_bad_options_fail_in_one_line_before_training(data, tmp_path, capsys, monkeypatch, more, message):
    monkeypatch.chdir(tmp_path)  # relative paths of `more` land here if a regression writes them
    code, printed, err = run(["train", *TINY, "--data", data / "train", "--out", tmp_path / "m", *more], capsys)
    assert code == cli.EXIT_ERROR and printed == ""
    assert err.startswith(f"robustwrap train: error: {message}") and err.count("\n") == 1
    assert not (tmp_path / "m").exists()


def test_the_trained_model_must_go_somewhere(data, capsys):
    code, printed, err = run(["train", *TINY, "--data", data / "train"], capsys)
    assert (code, printed) == (cli.EXIT_ERROR, "")
    assert err == "robustwrap train: error: pass --out DIR (a new folder), --push ORG/NAME (a Hub repo) or both: where should the trained model go?\n"


def test_help_lists_the_strategies_fit_masking_takes_for_each_defense(capsys):
    """Issue 23.17: --help lists, per defense, exactly the strategies that train it (its default first)."""
    from robustwrap.fit import _resolve_defense

    vit = timm.create_model("test_vit", img_size=32, num_classes=3)
    models = {
        "patchcleanser": robustwrap.wrap(vit, patch=4, num_masks=3),
        "smoothing": robustwrap.wrap(vit, patch=4, defense="smoothing", size=8),
        "patchguard": robustwrap.wrap(robustwrap.models.bagnet_tiny(num_classes=3), patch=3, defense="patchguard"),
    }
    for defense, model in models.items():
        target = _resolve_defense(model, None, None)
        listed = cli.train._STRATEGIES[defense]
        assert (sorted(listed), listed[0]) == (sorted(target.strategies), target.default), defense
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "smoothing: random_ablation, none; patchguard: provable_adversarial, none" in text


@pytest.mark.parametrize(
    ("defense", "strategy"),
    [(["--defense", "smoothing", "--ablation-size", "8", "--patch", "4"], "random_ablation"), (["--defense", "patchguard", "--patch", "3"], "provable_adversarial")],
)
def test_each_defense_trains_with_the_strategies_help_lists(data, tmp_path, capsys, defense, strategy):
    bagnet = ["--model", "timm:bagnet_tiny", "--in-chans", "3", "--num-classes", "3", "--workers", "0", "--no-progress"]
    tiny = bagnet if "patchguard" in defense else TINY  # PatchGuard needs local logits
    code, _, err = run(["train", *tiny, *defense, "--strategy", strategy, "--epochs", "1", "--data", data / "train", "--out", tmp_path / "m"], capsys)
    assert code == 0, err
    assert robustwrap.from_pretrained(str(tmp_path / "m")).pretrained_info["strategy"] == strategy


@pytest.mark.parametrize(("cores", "workers"), [(1, 1), (2, 2), (16, 4)])
def test_workers_default_to_the_cores_this_process_may_use(monkeypatch, cores, workers):
    """Issue 23.17: on a 2-core machine the default is 2 workers, not 4 (torch's DataLoader warns above its cores)."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)), raising=False)
    assert cli._parser().parse_args(["train", "--data", "d", "--out", "o"]).workers == workers


def test_out_must_be_a_new_folder(data, tmp_path, capsys):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    code, _, err = run(["train", *TINY, "--data", data / "train", "--out", tmp_path / "m"], capsys)
    refusal = f"--out {tmp_path / 'm'} is neither empty nor an earlier robustwrap save (it holds config.json): writing a model there would"
    assert code == cli.EXIT_ERROR and err.startswith(f"robustwrap train: error: {refusal}")
    assert err.endswith("choose a new or empty folder\n") and err.count("\n") == 1
    assert (tmp_path / "m" / "config.json").read_text() == "{}"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--out", "o"], "the following arguments are required: --data"),
    ],
)
def test_usage_errors(capsys, argv, message):
    with pytest.raises(SystemExit) as exit_:
        main(["train", "--model", "timm:test_vit", *argv])
    assert exit_.value.code == cli.EXIT_USAGE
    assert message in capsys.readouterr().err


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_two_processes_train_one_model_and_rank_0_writes_it(data, tmp_path):
    out, logs = tmp_path / "model", tmp_path / "logs"
    argv = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--rdzv-backend", "c10d",
        "--rdzv-endpoint", f"127.0.0.1:{_free_port()}", "--log-dir", str(logs), "--redirects", "1",
        "-m", "robustwrap", "train", *TINY, "--num-masks", "3", "--epochs", "1", "--batch-size", "2",
        "--data", str(data / "train"), "--val-data", str(data / "val"), "--out", str(out),
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=180, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    # Rank 0 alone prints and saves; rank 1's stdout is empty.
    stdout = {int(p.parent.name): p.read_text() for p in logs.rglob("stdout.log")}
    assert sorted(stdout) == [0, 1] and stdout[1] == ""
    assert "2 process(es) x 2 images per step" in stdout[0] and f"saved to {out}/" in stdout[0]
    model = robustwrap.from_pretrained(str(out))
    info = model.pretrained_info
    assert (info["training"]["processes"], info["training"]["batch_size"]) == (2, 4)
    # The validation split was shared between the ranks and merged: all 6 images are counted once.
    assert info["metrics"]["num_images"] == 6
    certified = info["metrics"]["certified_accuracy"]
    assert f"certified accuracy      {100 * certified:.2f}%" in stdout[0]
    assert f"value: {certified}" in (out / "README.md").read_text()
    assert json.loads((out / "config.json").read_text())["robustwrap"]["info"] == info


# ---------------------------------------------------------------------------- paper presets
def _papers():
    spec = importlib.util.spec_from_file_location("papers_recipe", ROOT / "hub" / "recipes" / "papers.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


PAPERS = _papers()


def test_presets_name_timm_weights_on_the_hub():
    assert len(PAPERS.PRESETS) == 9
    for name, options in PAPERS.PRESETS.items():
        arch = options[options.index("--model") + 1].removeprefix("timm:")
        cfg = timm.get_pretrained_cfg(arch)
        assert cfg is not None and cfg.hf_hub_id == f"timm/{arch}" and cfg.input_size == (3, 224, 224)
        parsed = cli._parser().parse_args(PAPERS.command(name, "--data", "d", "--out", "o"))
        settings = (parsed.patch, parsed.num_masks, parsed.strategy, parsed.epochs, parsed.augment, parsed.pretrained, parsed.crop_pct)
        if name.endswith("_cifar10"):  # 32 px images resized to 224 without cropping, a 35 px patch
            assert settings == ([35], 6, "multisize_greedy", 10, False, True, 1.0)
        else:
            assert settings == ([0.02], 6, "multisize_greedy", 10, True, True, None)
        assert parsed.num_classes == (None if name.endswith("_imagenet") else 10)


@pytest.mark.parametrize("preset", sorted(PAPERS.PRESETS))
def test_each_preset_runs_its_first_step_on_a_tiny_stand_in(preset, data, tmp_path, capsys, monkeypatch):
    """The preset's command line through papers.py, with timm's tiny test network instead of the
    pretrained model, and one step (12 images, batch 12) of one epoch."""
    options = list(PAPERS.PRESETS[preset])
    options[options.index("--model") + 1] = "timm:test_vit"
    options.remove("--pretrained")
    monkeypatch.setitem(PAPERS.PRESETS, preset, options)
    # 3 class folders of a 10- or 1000-class model: which classes they are is said, not guessed
    tiny = ["--image-size", "32", "--workers", "0", "--no-progress", "--epochs", "1", "--batch-size", "12", "--class-map", "0=0,1=1,2=2"]
    if preset.endswith("_cifar10"):
        tiny += ["--patch", "2%"]  # 35 px is the papers' patch on 224 px; later options override the preset's
    code = PAPERS.main([preset, *tiny, "--data", str(data / "train"), "--val-data", str(data / "val"), "--out", str(tmp_path / "m")])
    printed, err = capsys.readouterr()
    assert code == 0, err
    assert "epoch 1/1:" in printed and "certified accuracy" in printed
    model = robustwrap.from_pretrained(str(tmp_path / "m"))
    assert (len(model.mask_set), model.mask_set.grid, model.patch) == (36, (6, 6), (5, 5))  # 2% of 32x32 is 5x5 px
    info = model.pretrained_info
    augment = not preset.endswith("_cifar10")
    assert (info["strategy"], info["training"]["augment"], info["training"]["epochs"]) == ("multisize_greedy", augment, 1)
    assert model.num_classes == (1000 if preset.endswith("_imagenet") else 10)
    assert model.model.pretrained_cfg["crop_pct"] == (1.0 if preset.endswith("_cifar10") else timm.get_pretrained_cfg("test_vit").crop_pct)
    assert info["metrics"]["num_images"] == 6


def test_crop_pct_is_saved_with_the_model_and_used_by_certify(data, tmp_path, capsys):
    """--crop-pct 1 (the papers' CIFAR-10 preprocessing: resize, no crop) travels in the saved
    pretrained_cfg, so certify of the saved folder preprocesses exactly as training did."""
    out = tmp_path / "m"
    code = main(["train", *TINY, "--data", str(data / "train"), "--epochs", "1", "--batch-size", "12", "--crop-pct", "1", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    config = json.loads((out / "config.json").read_text())
    assert config["pretrained_cfg"]["crop_pct"] == 1.0
    loaded = robustwrap.from_pretrained(str(out))
    transform, _ = cli._loading._preprocessing(loaded)
    image = Image.new("RGB", (48, 48), "white")
    image.paste((0, 0, 0), (0, 0, 3, 48))  # a black band at the left edge, which a center crop cuts into
    config = timm.data.resolve_data_config(model=loaded.model)
    expected = {crop: timm.data.create_transform(**{**config, "crop_pct": crop})(image) for crop in (1.0, timm.get_pretrained_cfg("test_vit").crop_pct)}
    assert not torch.equal(*expected.values())  # the setting matters on this image
    assert torch.equal(transform(image), expected[1.0])
    with pytest.raises(SystemExit) as exit_:
        main(["train", *TINY, "--data", str(data / "train"), "--crop-pct", "1.5", "--out", str(tmp_path / "n")])
    assert exit_.value.code == 2
    assert "argument --crop-pct: expected a fraction in (0, 1], got '1.5'" in capsys.readouterr().err


# ------------------------------------------------------------------------------ class order
def test_train_records_the_class_order_and_certify_checks_it(tmp_path, capsys):
    """Folders 0..11 get torchvision's ImageFolder ids (sorted as strings); the trained model records
    them as timm's label_names, so certify maps a subset by name and refuses folders it does not name."""
    rng = np.random.default_rng(0)
    for c in range(12):
        (tmp_path / "train" / str(c)).mkdir(parents=True)
        Image.fromarray(rng.integers(0, 255, (36, 36, 3), dtype=np.uint8)).save(tmp_path / "train" / str(c) / "0.png")
    tiny = [a if a != "3" else "12" for a in TINY]  # 12 classes
    out = tmp_path / "m"
    code, _, err = run(["train", *tiny, "--num-masks", "3", "--epochs", "1", "--data", tmp_path / "train", "--out", out], capsys)
    assert code == 0, err
    names = ImageFolder(str(tmp_path / "train")).classes
    assert json.loads((out / "config.json").read_text())["pretrained_cfg"]["label_names"] == names
    assert robustwrap.from_pretrained(str(out)).model.pretrained_cfg["label_names"] == names
    subset = tmp_path / "subset"
    for c in ("10", "3"):
        (subset / c).mkdir(parents=True)
        Image.open(tmp_path / "train" / c / "0.png").save(subset / c / "0.png")
    code, _, err = run(["certify", "--model", out, "--data", subset, "--no-progress", "--report", tmp_path / "r.json"], capsys)
    assert code == 0, err
    records = sorted(CertificationReport.load(tmp_path / "r.json").records, key=lambda r: r.index)
    assert [r.label for r in records] == [names.index("10"), names.index("3")] == [2, 5]
    renamed = tmp_path / "renamed"
    for c in range(12):
        (renamed / f"class{c}").mkdir(parents=True)
        Image.open(tmp_path / "train" / str(c) / "0.png").save(renamed / f"class{c}" / "0.png")
    code, _, err = run(["certify", "--model", out, "--data", renamed, "--no-progress"], capsys)
    assert code == cli.EXIT_ERROR and err.count("\n") == 1
    assert "none of its class folders (class0, class1, class10, class11, class2, ...) is a label name of the model (0, 1, 10, 11, 2, ...)" in err
