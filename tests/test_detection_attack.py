"""The attack and audit judged by certified detection, the plot of the alerting masks, and the
command line keeping a loaded model's detection threshold."""

from __future__ import annotations

import itertools
import json

import pytest
import timm
import torch
from conftest import LocalMeans, evidence_images, local_means_guard, masked_copy, noise_images, sharp_cleanser, sharp_peaknet

import robustwrap
from robustwrap import (
    cli,
    models,  # noqa: F401  (registers the BagNets with timm)
)
from robustwrap.attack import ALERT
from robustwrap.plots import plot_detection

BOUNDS = (-6.0, 6.0)  # the range of the images and of the exhaustive search's contents


def _silent_wrong(model, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """`(B,)` bool: `detect` outputs a label other than `labels` without an alert."""
    found = model.detect(x)
    return (found.prediction != labels) & ~found.alert


def _exhaustive(model, image: torch.Tensor, label: int, p: int) -> bool:
    """Some patch position and content of a fixed family makes the output a wrong label without an alert."""
    gen = torch.Generator().manual_seed(3)
    c, h, w = image.shape
    contents = [torch.full((c, p, p), 6.0), torch.full((c, p, p), -6.0), torch.randn(c, p, p, generator=gen) * 6]
    contents += [torch.eye(c)[i][:, None, None].expand(c, p, p) * 12 - 6 for i in range(c)]
    attacked = []
    for top, left in itertools.product(range(h - p + 1), range(w - p + 1)):
        for content in contents:
            out = image.clone()
            out[:, top : top + p, left : left + p] = content
            attacked.append(out)
    return bool(_silent_wrong(model, torch.stack(attacked), torch.full((len(attacked),), label)).any())


# ------------------------------------------------------------------------------ the attack
@pytest.mark.parametrize("defense", ["patchcleanser", "patchguard"])
def test_detection_attack_succeeds_only_on_a_wrong_label_without_an_alert(defense):
    model, (x, labels) = (
        (sharp_cleanser(0.0, margin=0.0), (noise_images(6, seed=1), None))
        if defense == "patchcleanser"
        else (local_means_guard(0.0), evidence_images())
    )
    labels = model.predict_vanilla(x) if labels is None else labels
    result = robustwrap.attack(model, x, labels, guarantee="detection", locations="all", steps=20, bounds=BOUNDS, progress=False)
    found = model.detect(result.x_adv)
    assert result.guarantee == "detection"
    assert torch.equal(result.success, (found.prediction != labels) & ~found.alert)
    assert torch.equal(result.prediction, torch.where(found.alert, ALERT, found.prediction))
    certified = model.certify_detection(x, labels).certified
    assert bool(certified.any()) and not bool(result.success[certified].any())
    assert bool(result.success.any())  # the surrogate does find silent wrong labels on uncertified images
    # the prediction attack's successes are not the detection attack's: the alert catches many of them
    plain = robustwrap.attack(model, x, labels, locations="all", steps=20, bounds=BOUNDS, progress=False)
    assert plain.guarantee == "prediction" and bool((plain.success & model.detect(plain.x_adv).alert).any())


def test_targeted_detection_attack_needs_the_target_without_an_alert():
    model = sharp_cleanser(0.0, margin=0.0)
    x = noise_images(6, seed=1)
    labels = model.predict_vanilla(x)
    target = (labels + 1) % 4
    result = robustwrap.attack(
        model, x, labels, targeted=target, guarantee="detection", locations="all", steps=20, bounds=BOUNDS, progress=False
    )
    found = model.detect(result.x_adv)
    assert torch.equal(result.success, (found.prediction == target) & ~found.alert)


def test_detection_attack_refusals_name_the_argument_and_the_reason():
    x = noise_images(2)
    y = torch.zeros(2, dtype=torch.long)
    with pytest.raises(ValueError, match="guarantee must be one of 'prediction', 'detection', got 'top5'"):
        robustwrap.attack(sharp_cleanser(), x, y, guarantee="top5", bounds=BOUNDS, progress=False)
    smoothing = robustwrap.wrap(sharp_peaknet(), patch=2, image_size=12, defense="smoothing", size=2).eval()
    with pytest.raises(ValueError, match="guarantee='detection': DerandomizedSmoothing cannot detect, since .*detection"):
        robustwrap.attack(smoothing, x, y, guarantee="detection", bounds=BOUNDS, progress=False)
    with pytest.raises(ValueError, match="plain classifier"):
        robustwrap.attack(sharp_peaknet(), x, y, patch=3, guarantee="detection", bounds=BOUNDS, progress=False)
    with pytest.raises(ValueError, match="guarantee must be one of"):
        robustwrap.audit(sharp_cleanser(), (x, y), guarantee="Detection", bounds=BOUNDS, progress=False)


# ------------------------------------------------------------------------------ the audit
@pytest.mark.parametrize("defense", ["patchcleanser", "patchguard"])
def test_detection_audit_never_breaks_a_certified_image_and_brute_force_agrees(defense):
    model, (x, labels) = (
        (sharp_cleanser(0.8, margin=0.0), (noise_images(12, seed=1), None))
        if defense == "patchcleanser"
        else (local_means_guard(0.4), evidence_images())
    )
    labels = model.predict_vanilla(x) if labels is None else labels
    report = robustwrap.audit(model, (x, labels), guarantee="detection", steps=20, budget=10**6, bounds=BOUNDS, progress=False)
    assert report.ok and report.guarantee == "detection" and report.to_dict()["guarantee"] == "detection"
    cert = model.certify_detection(x, labels)
    assert [r.certified for r in report.records] == cert.certified.tolist()
    assert [r.prediction for r in report.records] == torch.where(cert.alert, ALERT, cert.prediction).tolist()
    assert report.certified_accuracy > 0 and report.empirical_accuracy >= report.certified_accuracy
    assert report.clean_accuracy == int(((cert.prediction == labels) & ~cert.alert).sum()) / len(labels)
    assert any(r.success for r in report.records)  # uncertified images do fall
    assert "certified detection accuracy" in report.summary() and "clean accuracy without alert" in report.summary()
    for i in cert.certified.nonzero()[:, 0].tolist():
        assert not _exhaustive(model, x[i], int(labels[i]), 3)


def test_detection_audit_catches_a_broken_certificate(tmp_path):
    """A certificate that ignores the views ("the clean output is y without an alert") is broken,
    and the detection attack shows it, with a reproduction."""
    model = sharp_cleanser(0.8, margin=0.0)
    x = noise_images(12, seed=1)
    labels = model.predict_vanilla(x)
    honest = model.certify_detection

    def broken(images, y):
        result = honest(images, y)
        return type(result)(**{**result.__dict__, "certified": (result.prediction == y) & ~result.alert})

    model.certify_detection = broken
    report = robustwrap.audit(
        model, (x, labels), guarantee="detection", steps=20, budget=10**6, bounds=BOUNDS, output=tmp_path, progress=False
    )
    assert not report.ok and "FAILED" in report.summary()
    finding = report.findings[0]
    assert bool(_silent_wrong(model, finding_image(finding)[None], torch.tensor([finding.label])).all())
    assert "detect(x_adv[None])" in json.loads((tmp_path / f"finding-{finding.index}.json").read_text())["reproduce"]
    assert not bool(honest(x, labels).certified[[f.index for f in report.findings]].any())


def finding_image(finding) -> torch.Tensor:
    """The attacked image of a finding: its image with its patch pasted at its location."""
    image = finding.image.clone()
    (top, left), (ph, pw) = finding.location, finding.patch.shape[1:]
    image[:, top : top + ph, left : left + pw] = finding.patch
    return image


# ------------------------------------------------------------------------------ the picture
@pytest.mark.parametrize("tau", [0.0, 0.8])
def test_plot_detection_frames_exactly_the_alerting_views(tmp_path, tau):
    model = sharp_cleanser(tau, margin=0.0)
    x = noise_images(12, seed=1)
    net, boxes = model.model, model.mask_set.boxes
    pictures = 0
    for i in range(4):
        with torch.no_grad():
            unmasked = int(net(x[i : i + 1]).argmax())
            probs = torch.stack([net(masked_copy(x[i], [box], 0.0)[None])[0].double().softmax(-1) for box in boxes])
        alerting = (probs.argmax(1) != unmasked) & (probs.amax(1) > tau)
        fig = plot_detection(model, x[i], path=tmp_path / f"{i}.png", class_names=["a", "b", "c", "d"])
        views = fig.axes[1]
        assert len(views.patches) == int(alerting.sum())  # one frame per alerting view
        framed = sorted((round(p.get_y() + 0.45) * 3 + round(p.get_x() + 0.45)) for p in views.patches)
        assert framed == alerting.nonzero()[:, 0].tolist()
        assert ("output ALERT" in fig.get_suptitle()) == bool(alerting.any())
        assert ("NOT certified" in fig.get_suptitle()) != bool(model.certify_detection(x[i : i + 1], torch.tensor([unmasked])).certified)
        pictures += (tmp_path / f"{i}.png").stat().st_size > 0
    assert pictures == 4


def test_plot_detection_lays_patchguard_views_out_as_its_windows_and_refuses_smoothing():
    guard = local_means_guard(0.4)
    x, labels = evidence_images()
    fig = plot_detection(guard, x[3], label=int(labels[3]))
    (h, w), (wh, ww) = guard._feature_size(), guard.window
    assert fig.axes[1].images[0].get_array().shape == (h - wh + 1, w - ww + 1)
    smoothing = robustwrap.wrap(sharp_peaknet(), patch=2, image_size=12, defense="smoothing", size=2).eval()
    with pytest.raises(NotImplementedError, match="cannot detect"):
        plot_detection(smoothing, noise_images(1)[0])


# ------------------------------------------------------------------------------ command line
def test_command_line_rewrapping_keeps_the_loaded_models_tau_and_predict_plots_the_views(tmp_path, capsys):
    from robustwrap import zoo
    from robustwrap.cli import main

    torch.manual_seed(3)
    guard = robustwrap.wrap(timm.create_model("bagnet_tiny").eval(), defense="patchguard", tau=0.3).eval()
    guard.save_pretrained(tmp_path / "saved")
    zoo.builtin_dataset("mnist-heldout")[0][0].save(tmp_path / "digit.png")
    argv = ["predict", str(tmp_path / "digit.png"), "--model", str(tmp_path / "saved"), "--detect"]
    assert main([*argv, "--patch", "3"]) == 0  # --patch re-wraps the loaded model
    assert "certified detection at tau 0.3" in capsys.readouterr().out
    assert main([*argv, "--plot", str(tmp_path / "views.png")]) == 0
    assert f"the one-mask views: {tmp_path / 'views.png'}" in capsys.readouterr().out and (tmp_path / "views.png").stat().st_size > 0
    assert main([*argv[:-1], "--plot", str(tmp_path / "other.png")]) != 0
    assert "--plot draws the one-mask views of --detect; pass --detect too" in capsys.readouterr().err
    loaded = robustwrap.from_pretrained(str(tmp_path / "saved"))
    for options in (["--patch", "4"], ["--clip", "5"]):
        args = cli._parser().parse_args(["predict", "x.png", *options])
        again = cli._loading._with_settings(loaded, 4 if "--patch" in options else None, args)
        assert again is not loaded and again.tau == 0.3
    args = cli._parser().parse_args(["predict", "x.png", "--defense", "patchcleanser"])
    assert cli._loading._with_settings(loaded, None, args).tau == 0.0  # another defense starts from its own defaults


def test_command_line_attack_audits_certified_detection(tmp_path, capsys):
    from robustwrap.cli import main

    argv = ["attack", "--limit", "2", "--steps", "2", "--budget", "300", "--no-progress", "--output", str(tmp_path / "findings")]
    assert main([*argv, "--detect", "--tau", "0.2", "--report", str(tmp_path / "audit.json")]) == 0
    out = capsys.readouterr().out
    assert "certified detection at tau 0.2" in out and "certified detection accuracy" in out and "OK: none of" in out
    document = json.loads((tmp_path / "audit.json").read_text())
    assert document["guarantee"] == "detection" and document["settings"]["tau"] == 0.2 and document["num_images"] == 2
    assert main([*argv, "--tau", "0.2"]) == 1
    assert "--tau is the confidence threshold of --detect; pass --detect too" in capsys.readouterr().err
    assert main([*argv, "--detect", "--defense", "smoothing", "--ablation-size", "4"]) == 1
    assert "detect" in capsys.readouterr().err


# ------------------------------------------------------------------------------ the zoo's figures
def test_reproduce_zoo_recertifies_each_guarantee_with_the_cli_and_catches_a_wrong_figure(monkeypatch):
    import importlib.util
    from pathlib import Path

    from timm.data import create_transform, resolve_data_config

    from robustwrap import zoo

    path = Path(__file__).parents[1] / "benchmarks" / "reproduce_zoo.py"
    spec = importlib.util.spec_from_file_location("reproduce_zoo", path)
    reproduce_zoo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(reproduce_zoo)
    name = "mnist_bagnet_tiny_pg"
    model = zoo.create_model(name)
    model.tau = 0.5
    data = zoo.builtin_dataset(zoo.zoo_entry(name)["dataset"], transform=create_transform(**resolve_data_config(model=model.model)))
    report = robustwrap.certify_dataset(model, data, limit=40, progress=False, guarantee="detection")
    row = {
        "model": name,
        "guarantee": "detection",
        "tau": 0.5,
        "num_images": report.num_images,
        "certified_count": report.certified,
        "clean_without_alert_count": report.clean_correct_without_alert,
    }
    prediction = {**row, "guarantee": "prediction"}  # the manifest's check, not repeated here
    certify, runs = reproduce_zoo._certify_report, []
    monkeypatch.setattr(reproduce_zoo, "_certify_report", lambda *args: runs.append((args, certify(*args))) or runs[-1][1])
    (result,) = reproduce_zoo.reproduce_guarantees(name, 1, [prediction, row])
    assert result["ok"], result
    assert [args for args, _ in runs] == [(name, 1, 40, ["--detect", "--tau", "0.5"])]  # one fresh CLI process
    assert result["command"] == f"robustwrap certify --model {name} --limit 40 --no-progress --detect --tau 0.5"
    monkeypatch.setattr(reproduce_zoo, "_certify_report", lambda *args: runs[0][1])  # the same run, against a wrong figure
    (result,) = reproduce_zoo.reproduce_guarantees(name, 1, [{**row, "clean_without_alert_count": row["clean_without_alert_count"] + 1}])
    assert not result["ok"] and result["figures"]["certified"]["recorded"] == result["figures"]["certified"]["measured"]


# ------------------------------------------------------------------------------ PatchCURE
def _cure(tau: float) -> robustwrap.PatchCURE:
    """SRF-only PatchCURE on `LocalMeans` (r = 3, s = 2, o = 0 declared on the model): its feature windows are PatchGuard++'s."""
    local = LocalMeans()
    local.receptive_field, local.feature_stride, local.feature_offset = 3, 2, 0
    return robustwrap.wrap(local, 3, defense="patchcure", image_size=15, margin=0.0, tau=tau).eval()


def test_patchcure_detection_attack_is_judged_by_detect_and_never_breaks_a_certified_image():
    model = _cure(0.4)
    x, labels = evidence_images()
    result = robustwrap.attack(model, x, labels, guarantee="detection", locations="all", steps=20, bounds=BOUNDS, progress=False)
    found = model.detect(result.x_adv)
    assert torch.equal(result.success, (found.prediction != labels) & ~found.alert)
    certified = model.certify_detection(x, labels).certified
    assert bool(certified.any()) and not bool(result.success[certified].any())
    assert bool(result.success.any())  # the surrogate does break uncertified images
    report = robustwrap.audit(model, (x, labels), guarantee="detection", steps=20, budget=10**6, bounds=BOUNDS, progress=False)
    assert report.ok and [r.certified for r in report.records] == certified.tolist()
    assert report.empirical_accuracy >= report.certified_accuracy > 0
    for i in certified.nonzero()[:, 0].tolist():
        assert not _exhaustive(model, x[i], int(labels[i]), 3)
