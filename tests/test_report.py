"""CertificationReport: counts from records, JSON round trip, the table, and the pictures."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
from PIL import Image

from robustwrap import MaskSet
from robustwrap.report import CertificationReport, ImageRecord, plot_mask_set, plot_sweep, plot_views, sweep_table

MASKS = MaskSet.square(16, 3, num_masks=3)  # 9 masks: 45 views in a full grid


def record(index, label, prediction, certified=False, case=1, vanilla=None, views=20, seconds=0.5):
    return ImageRecord(index, label, prediction, certified, case, label if vanilla is None else vanilla, views, (prediction,) * 9, seconds)


def make_report(mask_set=MASKS, fill=0.0, records=None) -> CertificationReport:
    records = records or (
        record(0, 1, 1, certified=True, views=45),
        record(1, 2, 2, case=2, views=12),
        record(2, 0, 3, case=3, vanilla=3, views=10),
        record(3, 3, 3, case=1, vanilla=0, views=33),
    )
    return CertificationReport("peaknet", "tiny", mask_set, fill, 4, tuple(records), amp=False, fingerprint="abc")


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
    assert dataclasses.replace(report, fill=0.5) != report


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
    with pytest.raises(ValueError, match="not an image record"):
        CertificationReport.from_json(json.dumps(document))


def test_empty_report_has_no_accuracy_rather_than_a_division_error():
    empty = dataclasses.replace(make_report(), records=())
    assert math.isnan(empty.certified_accuracy) and math.isnan(empty.views_per_image)
    assert "-" in empty.summary()
    assert CertificationReport.from_json(empty.to_json()) == empty


# ------------------------------------------------------------------------------------ pictures
def png_size(path):
    with Image.open(path) as image:
        return image.format, image.size


def test_report_plot_bars_are_the_accuracies(tmp_path):
    fig = make_report().plot(tmp_path / "report.png")
    heights = [bar.get_height() for bar in fig.axes[0].patches]
    assert heights == pytest.approx([50.0, 75.0, 25.0])
    fmt, (w, h) = png_size(tmp_path / "report.png")
    assert fmt == "PNG" and w > 800 and h > 300


def test_plot_mask_set_over_an_image(tmp_path):
    mask_set = MaskSet.square(224, 0.02)
    image = torch.randn(3, 224, 224)
    fig = plot_mask_set(mask_set, image, tmp_path / "masks.png")
    coverage = fig.axes[0].images[0].get_array()
    assert coverage.shape == (224, 224) and coverage.min() == 1 and coverage.max() == 9  # covered everywhere
    assert png_size(tmp_path / "masks.png")[0] == "PNG"
    plot_mask_set(MaskSet.square(28, 4), None, tmp_path / "plain.png")  # a plain background too
    with pytest.raises(ValueError, match="shape"):
        plot_mask_set(mask_set, torch.randn(3, 32, 32))


def test_plot_views_marks_every_failing_view(tmp_path):
    one_mask = torch.tensor([1, 1, 1, 2, 1, 1, 1, 1, 1])
    grid = torch.full((9, 9), 1)
    grid[3, :] = grid[:, 3] = 2
    grid[0, 8] = grid[8, 0] = -1  # a view that was not evaluated
    fig = plot_views(one_mask, grid, 1, MASKS, torch.randn(3, 16, 16), tmp_path / "views.png", class_names=["a", "b", "c"])
    crosses = fig.axes[2].collections[0].get_offsets()
    assert len(crosses) == 17  # row 3 and column 3, P_33 once; the unevaluated view is not a failure
    assert sorted({(int(x), int(y)) for x, y in crosses} - {(3, i) for i in range(9)} - {(i, 3) for i in range(9)}) == []
    assert len(fig.axes[1].patches) == 1  # mask 3 is the only one-mask view that is not the label
    assert "Case II" in fig.get_suptitle() and "NOT certified" in fig.get_suptitle()
    assert png_size(tmp_path / "views.png")[0] == "PNG"
    with pytest.raises(ValueError, match="one_mask must have 9 labels"):
        plot_views(one_mask[:4], grid, 1, MASKS)


def test_plot_sweep_is_certified_accuracy_against_patch_size(tmp_path):
    reports = [
        make_report(mask_set=MaskSet.square(16, p, num_masks=3), records=[record(i, 0, 0, certified=i < c) for i in range(4)])
        for p, c in ((5, 1), (2, 4), (3, 2))
    ]
    fig = plot_sweep(reports, tmp_path / "sweep.png")
    line = fig.axes[0].lines[0]
    assert list(line.get_xdata()) == pytest.approx([100 * 4 / 256, 100 * 9 / 256, 100 * 25 / 256])
    assert list(line.get_ydata()) == [100.0, 50.0, 25.0]
    assert png_size(tmp_path / "sweep.png")[0] == "PNG"
    table = sweep_table(reports).splitlines()
    assert len(table) == 5 and "5x5 px" in table[2] and "25.00%" in table[2]
    with pytest.raises(ValueError, match="at least one"):
        plot_sweep([])
