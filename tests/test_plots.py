"""Pictures: a report (any defense), a mask set, one image's views, a sweep; matplotlib only on demand."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from test_report import MASKS, make_report, record, smoothing_report

from robustwrap import MaskSet
from robustwrap.geometry import AblationSet, feature_window, patch_pixels
from robustwrap.plots import plot_ablation_set, plot_feature_window, plot_mask_set, plot_report, plot_sweep, plot_views
from robustwrap.report import sweep_table


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
    plot_mask_set(MaskSet.square(28, 4, num_masks=5), None, tmp_path / "plain.png")  # a plain background too
    with pytest.raises(ValueError, match="shape"):
        plot_mask_set(mask_set, torch.randn(3, 32, 32))


def test_plot_mask_set_draws_the_masks_and_a_patch_mask_0_covers():
    mask_set = MaskSet.rect((28, 24), (3, 4), num_masks=(4, 3))
    fig = plot_mask_set(mask_set)

    def box(rectangle):  # (top, left, h, w) of a drawn rectangle, in pixels
        return int(rectangle.get_y() + 0.5), int(rectangle.get_x() + 0.5), int(rectangle.get_height()), int(rectangle.get_width())

    cols = mask_set.grid[1]
    assert [box(r) for r in fig.axes[0].patches] == [tuple(mask_set.boxes[k]) for k in (0, 1, cols)]
    mask0, mask1, patch = fig.axes[1].patches
    assert box(mask0) == tuple(mask_set.boxes[0]) and box(mask1) == tuple(mask_set.boxes[1])
    top, left, ph, pw = box(patch)
    assert (ph, pw) == tuple(mask_set.patch_sizes[0])
    hidden = ~mask_set.keep_masks()[0]

    def covers(t, l):
        return bool(hidden[t : t + ph, l : l + pw].all()) and t + ph <= hidden.shape[0] and l + pw <= hidden.shape[1]

    # mask 0 covers the patch drawn, and no longer covers it one pixel further down or right
    assert covers(top, left) and not covers(top + 1, left) and not covers(top, left + 1)


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


def test_report_plot_works_for_any_defense(tmp_path):
    fig = plot_report(smoothing_report(), tmp_path / "smoothing.png")
    assert len(fig.axes) == 2  # no double-masking cases: accuracy and views
    assert [bar.get_height() for bar in fig.axes[0].patches] == pytest.approx([100 * 2 / 3, 100 * 2 / 3, 100 / 3])
    assert "smoothing" in fig.get_suptitle() and "3x3 px" in fig.get_suptitle()
    assert png_size(tmp_path / "smoothing.png")[0] == "PNG"
    assert len(make_report().plot().axes) == 3  # report.plot is plot_report; PatchCleanser adds its cases


def test_sweep_of_another_defense(tmp_path):
    fig = plot_sweep([smoothing_report()], tmp_path / "sweep.png")
    assert list(fig.axes[0].lines[0].get_ydata()) == pytest.approx([100 / 3])


def test_matplotlib_is_imported_only_for_pictures():
    code = "import sys, robustwrap, robustwrap.report, robustwrap.dataset, robustwrap.plots; print(any(m.startswith('matplotlib') for m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


# ------------------------------------------- issue 18: the geometry of smoothing and PatchGuard
@pytest.mark.parametrize(("ablation", "size", "stride", "image", "patch"), [("column", 4, 1, 32, 5), ("row", 3, 2, (20, 24), (4, 6)), ("block", 6, 3, (30, 28), 5)])
def test_plot_ablation_set_counts_the_views_a_patch_meets(tmp_path, ablation, size, stride, image, patch):
    views = AblationSet(image, ablation, size, stride)
    fig = plot_ablation_set(views, patch, tmp_path / "views.png")
    met = np.asarray(fig.axes[1].images[0].get_array())
    keep = views.keep_masks().numpy()
    ph, pw = patch_pixels(patch, views.image_size)
    h, w = views.image_size
    brute = np.array([[int(keep[:, t : t + ph, l : l + pw].any(axis=(1, 2)).sum()) for l in range(w - pw + 1)] for t in range(h - ph + 1)])
    assert np.array_equal(met, brute) and met.max() == views.delta(patch)
    assert f"2Δ={2 * views.delta(patch)}" in fig.get_suptitle()
    assert png_size(tmp_path / "views.png")[0] == "PNG"


@pytest.mark.parametrize(("image", "patch", "r", "s", "o"), [(224, 32, 17, 8, 0), (32, 5, 5, 2, 0), ((40, 36), (3, 7), (5, 3), (2, 1), (2, 1))])
def test_plot_feature_window_draws_the_window_a_patch_touches(tmp_path, image, patch, r, s, o):
    (h, w), pair = (image, image) if isinstance(image, int) else image, lambda v: v if isinstance(v, tuple) else (v, v)
    size = tuple((n + 2 * oo - rr) // ss + 1 for n, rr, ss, oo in zip((h, w), pair(r), pair(s), pair(o)))
    fig = plot_feature_window((h, w), patch, r, s, o, size, tmp_path / "window.png")
    touched = np.asarray(fig.axes[1].images[0].get_array()) > 0
    rows, cols = np.flatnonzero(touched.any(axis=1)), np.flatnonzero(touched.any(axis=0))
    window = feature_window((h, w), patch, r, s, o, size)
    assert touched.shape == size and (len(rows), len(cols)) == window and touched.sum() == window[0] * window[1]
    # the features drawn are exactly those whose receptive field meets the drawn patch
    patch_box = next(p for p in fig.axes[0].patches if p.get_label().startswith("patch"))
    top, left = int(patch_box.get_y() + 0.5), int(patch_box.get_x() + 0.5)
    ph, pw = patch_pixels(patch, (h, w))
    (rh, rw), (sh, sw), (oh, ow) = pair(r), pair(s), pair(o)
    meets = [[sh * a - oh < top + ph and sh * a - oh + rh > top and sw * b - ow < left + pw and sw * b - ow + rw > left for b in range(size[1])] for a in range(size[0])]
    assert np.array_equal(touched, np.array(meets))
    assert png_size(tmp_path / "window.png")[0] == "PNG"
