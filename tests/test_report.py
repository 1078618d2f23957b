"""CertificationReport: counts from records, JSON round trip (one report and many), the table, any defense."""

from __future__ import annotations

import dataclasses
import json
import math
import pickle

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

import robustwrap
from robustwrap import MaskSet
from robustwrap.dataset import certify_dataset
from robustwrap.report import CertificationReport, ImageRecord, sweep_table

MASKS = MaskSet.square(16, 3, num_masks=3)  # 9 masks: 45 views in a full grid


def record(index, label, prediction, certified=False, case=1, vanilla=None, views=20, seconds=0.5):
    return ImageRecord(
        index=index,
        label=label,
        prediction=prediction,
        certified=certified,
        vanilla_prediction=label if vanilla is None else vanilla,
        num_views=views,
        image_hash=f"{index:032x}",
        extras={"case": case, "one_mask": (prediction,) * 9},
        seconds=seconds,
    )


def patchcleanser_settings(mask_set=MASKS, fill=0.0) -> dict:
    """What a PatchCleanser model's settings() holds for this mask set and fill."""
    return {
        "defense": "patchcleanser",
        "image_size": list(mask_set.image_size),
        "fill": list(fill) if isinstance(fill, tuple) else fill,
        "precision": "float32",
        "margin": 0.0,
        "mask_set": mask_set.to_dict(),
        "patch": list(mask_set.patch_sizes[0]),
    }


def make_report(mask_set=MASKS, fill=0.0, records=None) -> CertificationReport:
    records = records or (
        record(0, 1, 1, certified=True, views=45),
        record(1, 2, 2, case=2, views=12),
        record(2, 0, 3, case=3, vanilla=3, views=10),
        record(3, 3, 3, case=1, vanilla=0, views=33),
    )
    return CertificationReport("peaknet", "tiny", "patchcleanser", patchcleanser_settings(mask_set, fill), 4, tuple(records), fingerprint="abc")


def test_counts_are_derived_from_the_records():
    report = make_report()
    assert report.num_images == 4
    assert (report.vanilla_correct, report.clean_correct, report.certified) == (2, 3, 1)
    assert (report.vanilla_accuracy, report.clean_accuracy, report.certified_accuracy) == (0.5, 0.75, 0.25)
    assert report.case_counts == {1: 2, 2: 1, 3: 1}
    assert (report.full_views, report.total_views, report.views_per_image) == (45, 100, 25.0)
    assert report.seconds == 2.0 and report.images_per_second == 2.0
    assert report.patch_percent == pytest.approx((100 * 9 / 256,))


def test_summary_table_names_every_number():
    text = make_report().summary()
    for expected in [
        "vanilla clean accuracy  50.00%  (2/4)",
        "clean accuracy          75.00%  (3/4)",
        "certified accuracy      25.00%  (1/4)",
        "cases I / II / III      2 / 1 / 1",
        "25.0 of 45",
        MASKS.describe(),
        "2.0 images/s",
    ]:
        assert expected in text


def test_summary_warns_when_every_prediction_is_one_class():
    """A collapsed model is "certified" on the images of the class it always predicts: say so."""
    records = [record(i, label, 2, certified=label == 2) for i, label in enumerate([0, 2, 1, 2, 3])]
    text = make_report(records=records).summary()
    assert "certified accuracy      40.00%  (2/5)" in text
    assert "warning                 the model predicts one class (2) for every image: clean accuracy = class share (40.00%)" in text
    mixed = [*records[:-1], record(4, 3, 3)]
    assert "warning" not in make_report(records=mixed).summary()
    assert "warning" not in make_report(records=records[1:2]).summary()  # one image: one prediction says nothing


def test_a_collapsed_model_certified_by_certify_dataset_is_flagged():
    """Through the user's path: a model that always says class 1, certified on a dataset."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    with torch.no_grad():
        net[0].bias.copy_(torch.tensor([0.0, 50.0, 0.0, 0.0]))
    model = robustwrap.wrap(net, mask_set=MASKS, num_classes=4).eval()
    images = TensorDataset(torch.randn(8, 3, 16, 16), torch.arange(8) % 4)
    report = certify_dataset(model, images, progress=False)
    assert report.clean_accuracy == 0.25
    assert "the model predicts one class (1) for every image: clean accuracy = class share (25.00%)" in report.summary()


@pytest.mark.parametrize(("seconds", "speed"), [(0.5, "2.0 images/s"), (83.3, "83.3 s/image"), (1234.4, "1234 s/image"), (1.0, "1.0 images/s")])
def test_slow_speeds_are_not_printed_as_zero(seconds, speed):
    """A large model on a CPU certifies an image in minutes: seconds per image, never "0.0 images/s"."""
    report = make_report(records=[record(i, 1, 1, seconds=seconds) for i in range(2)])
    assert f"speed                   {speed} per process" in report.summary()


@pytest.mark.parametrize(
    "report",
    [
        make_report(),
        make_report(mask_set=MaskSet.rect(20, (3, 5), num_masks=(2, 3)), fill=(0.1, -0.2, 0.3)),
        make_report(mask_set=MaskSet.square(24, 3, num_masks=4).coarsen(2)),
        make_report(mask_set=MaskSet.square(16, 3, num_masks=3) | MaskSet.square(16, 5, num_masks=3)),
    ],
)
def test_json_round_trip(report, tmp_path):
    again = CertificationReport.from_json(report.to_json())
    assert again == report
    assert again.mask_set.children == report.mask_set.children and again.fill == report.fill
    assert [r.seconds for r in again.records] == [r.seconds for r in report.records]
    assert CertificationReport.load(report.save(tmp_path / "report.json")) == report
    summary = json.loads(report.to_json())["summary"]
    assert summary["certified_accuracy"] == report.certified_accuracy and summary["cases"] == {"I": 2, "II": 1, "III": 1}


def test_equality_ignores_timing_only():
    report = make_report()
    assert dataclasses.replace(report, records=tuple(dataclasses.replace(r, seconds=9.0) for r in report.records)) == report
    assert dataclasses.replace(report, records=report.records[:3]) != report
    assert dataclasses.replace(report, settings={**report.settings, "fill": 0.5}) != report


@pytest.mark.parametrize(
    ("text", "match"),
    [("[1, 2]", "not a robustwrap report"), ("{nope", "invalid JSON"), ('{"format": "robustwrap.CertificationReport", "version": 99}', "version")],
)
def test_from_json_refuses_other_documents(text, match):
    with pytest.raises(ValueError, match=match):
        CertificationReport.from_json(text)


def test_damaged_record_is_named():
    document = json.loads(make_report().to_json())
    document["records"][1]["certified"] = "yes"
    with pytest.raises(ValueError, match=r"^not an image record \(index 1\): certified must be true or false, got 'yes'$"):
        CertificationReport.from_json(json.dumps(document))
    del document["records"][1]["certified"]
    with pytest.raises(ValueError, match=r"^not an image record \(index 1\): it has no 'certified' field$"):
        CertificationReport.from_json(json.dumps(document))


def test_empty_report_has_no_accuracy_rather_than_a_division_error():
    empty = dataclasses.replace(make_report(), records=())
    assert math.isnan(empty.certified_accuracy) and math.isnan(empty.views_per_image)
    text = empty.summary()
    assert "certified accuracy      -  (0/0)" in text and "views per image         - of 45" in text and "speed                   - images/s" in text
    assert "nan" not in text  # no image: no figure, written "-" on every line
    assert CertificationReport.from_json(empty.to_json()) == empty



def test_patchcleanser_settings_are_read_from_the_report():
    report = make_report(fill=(0.1, -0.2, 0.3))
    assert report.mask_set == MASKS and report.fill == (0.1, -0.2, 0.3)
    assert (report.precision, report.margin, report.num_masks) == ("float32", 0.0, 9)
    assert report.records[1].case == 2 and report.records[0].one_mask == (1,) * 9  # defense fields as attributes
    assert "precision float32, margin 0.0" in report.summary()


# ------------------------------------------------------------------------------------- sweeps
def test_save_many_and_load_many_round_trip_and_load_refers_to_load_many(tmp_path):
    reports = [make_report(), make_report(mask_set=MaskSet.square(16, 5, num_masks=2)), smoothing_report()]
    path = CertificationReport.save_many(tmp_path / "sweep.json", reports)
    assert CertificationReport.load_many(path) == reports
    assert isinstance(json.loads(path.read_text()), list)
    with pytest.raises(ValueError, match="list of 3 reports.*load_many"):
        CertificationReport.load(path)
    single = make_report().save(tmp_path / "one.json")
    assert CertificationReport.load_many(single) == [make_report()]  # load_many reads every report file
    (tmp_path / "bad.json").write_text(json.dumps([make_report().to_document(), {"format": "other"}]))
    with pytest.raises(ValueError, match=r"report 1\): not a robustwrap report"):
        CertificationReport.load_many(tmp_path / "bad.json")
    (tmp_path / "empty.json").write_text("[]")
    with pytest.raises(ValueError, match="empty list"):
        CertificationReport.load_many(tmp_path / "empty.json")
    with pytest.raises(TypeError, match="non-empty list"):
        CertificationReport.save_many(tmp_path / "x.json", [])
    with pytest.raises(TypeError, match=r"reports\[1\]"):
        CertificationReport.save_many(tmp_path / "x.json", [make_report(), "report"])


# ------------------------------------------------------------------------------ other defenses
def smoothing_settings() -> dict:
    return {
        "defense": "smoothing",
        "image_size": [16, 16],
        "fill": 0.0,
        "precision": "bfloat16",
        "margin": 0.0,
        "patch": [3, 3],
        "ablation": "column",
        "size": 4,
        "stride": 1,
        "threshold": None,
        "encoding": "fill",
    }


def smoothing_report() -> CertificationReport:
    """A report of a (De)Randomized Smoothing model: per-image vote counts and delta, 16 views each."""
    records = [
        ImageRecord(0, 1, 1, True, 1, 16, "a" * 32, {"counts": [0, 12, 4, 0], "delta": 3}, 0.25),
        ImageRecord(1, 2, 1, False, 1, 16, "b" * 32, {"counts": [2, 8, 6, 0], "delta": 3}, 0.25),
        ImageRecord(2, 0, 0, False, 0, 16, "c" * 32, {"counts": [9, 7, 0, 0], "delta": 3}, 0.25),
    ]
    return CertificationReport("peaknet", "tiny", "smoothing", smoothing_settings(), 4, tuple(records), fingerprint="def", full_views=16)


def test_records_carry_any_defense_fields_and_round_trip():
    report = smoothing_report()
    first = report.records[0]
    assert first.counts == (0, 12, 4, 0) and first.delta == 3 and first.extras == {"counts": (0, 12, 4, 0), "delta": 3}
    with pytest.raises(AttributeError, match="counts, delta"):
        first.case  # noqa: B018  (a PatchCleanser field: not on a smoothing record)
    assert ImageRecord.from_dict(first.to_dict()) == first
    assert first.to_dict()["counts"] == [0, 12, 4, 0]  # a defense field sits beside the common ones
    again = CertificationReport.from_json(report.to_json())
    assert again == report and again.records[1].counts == (2, 8, 6, 0)
    assert pickle.loads(pickle.dumps(first)) == first  # records are gathered across processes as objects
    assert report.case_counts == {} and report.mask_set is None and report.num_masks is None
    assert report.patch_sizes == ((3, 3),) and report.patch_percent == pytest.approx((100 * 9 / 256,))
    assert (report.clean_accuracy, report.certified_accuracy, report.vanilla_accuracy) == (pytest.approx(2 / 3), pytest.approx(1 / 3), pytest.approx(2 / 3))
    document = json.loads(report.to_json())
    assert document["defense"] == "smoothing" and document["settings"] == smoothing_settings()
    assert document["summary"]["mean_delta"] == 3 and "cases" not in document["summary"]


def test_summary_works_for_any_defense():
    text = smoothing_report().summary()
    for expected in [
        "defense                 smoothing",
        "patch 3x3 px (3.52% of 16x16)",
        "precision bfloat16, margin 0.0, ablation column, size 4, stride 1, threshold None, encoding fill",
        "certified accuracy      33.33%  (1/3)",
        "delta (mean)            3",
        "16.0 of 16 (full evaluation): 100.00%",
    ]:
        assert expected in text
    assert "cases" not in text
    table = sweep_table([smoothing_report(), make_report()]).splitlines()
    assert "smoothing" in table[2] and "16.0/16" in table[2] and "patchcleanser K=9" in table[3]


@pytest.mark.parametrize(
    ("extras", "error", "match"),
    [({"label": 3}, ValueError, "common fields"), ({"_x": 1}, ValueError, "identifiers"), ({"grid": object()}, TypeError, "JSON value"), ([1], TypeError, "dict")],
)
def test_bad_defense_fields_are_refused(extras, error, match):
    with pytest.raises(error, match=match):
        ImageRecord(0, 1, 1, True, 1, 4, "", extras)


def test_report_settings_must_be_json():
    with pytest.raises(TypeError, match="JSON-able"):
        dataclasses.replace(make_report(), settings={"fill": object()})
    document = json.loads(make_report().to_json())
    del document["settings"]
    with pytest.raises(ValueError, match="settings"):
        CertificationReport.from_document(document)


def test_common_fields_are_type_checked():
    with pytest.raises(TypeError, match="vanilla_prediction must be an int"):
        ImageRecord(0, 1, 1, True, [[0, 1], [1, 0]], 4)  # e.g. a label map instead of one label
    with pytest.raises(TypeError, match="certified must be a bool"):
        ImageRecord(0, 1, 1, 1, 1, 4)
    assert ImageRecord(0, 1, 1, True, 1, 4) == ImageRecord(0, 1, 1, True, 1, 4, "", {})
