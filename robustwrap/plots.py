"""Pictures of certification results: a report, a mask set, one image's views, a patch-size sweep,
and the geometry of the other defenses (smoothing's ablated views, PatchGuard's feature window, PatchCURE's
feature mask set).

Everything here draws results; nothing runs a model (`robustwrap.dataset.view_grid` computes the
views that `plot_views` draws), except `plot_detection`, which runs the one-mask views of one
image's certified detection: they are what it draws, and no result keeps them. The pictures use matplotlib's object API
(`matplotlib.figure.Figure`, no pyplot), so they never change a notebook's backend and render
headless; matplotlib is imported only when a picture is drawn, so `import robustwrap` does not
import it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from ._args import as_image_size, as_pair
from .defenses import patchcleanser as rule
from .geometry import AblationSet, MaskSet, feature_window, patch_pixels
from .report import CASE_NAMES, CertificationReport

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from .defenses import RobustPatchClassifier

__all__ = [
    "plot_ablation_set",
    "plot_detection",
    "plot_feature_mask_set",
    "plot_feature_window",
    "plot_mask_set",
    "plot_report",
    "plot_sweep",
    "plot_views",
]


# ------------------------------------------------------------------------------------- reports
def plot_report(report: CertificationReport, path: str | Path | None = None) -> Figure:
    """Accuracy bars, the defense's breakdown (PatchCleanser: the cases) and the views per image.

    `report.plot(path)` draws the same picture.

    Args:
        report: the report to draw.
        path: where to save the PNG (or any format matplotlib knows by the suffix).

    Returns:
        The matplotlib `Figure`.

    Raises:
        ImportError: if matplotlib is not installed (`pip install matplotlib`).
    """
    has_cases = bool(report.case_counts)
    fig = _figure((13, 4.2) if has_cases else (9.5, 4.2))
    axes = fig.subplots(1, 3 if has_cases else 2, gridspec_kw={"width_ratios": [1, 1.2, 1.4] if has_cases else [1, 1.4]})
    ax_acc, ax_views = axes[0], axes[-1]

    names = ["vanilla\n(undefended)", "clean\n(defended)", "certified"]
    values = [100 * report.vanilla_accuracy, 100 * report.clean_accuracy, 100 * report.certified_accuracy]
    bars = ax_acc.bar(names, values, color=["#9e9e9e", "#4c72b0", "#2e7d32"])
    for bar, value in zip(bars, values):
        ax_acc.text(bar.get_x() + bar.get_width() / 2, value + 1.5, f"{value:.1f}%", ha="center", va="bottom", fontsize=10)
    ax_acc.set_ylim(0, 112)
    ax_acc.set_ylabel("accuracy (%)")
    ax_acc.set_title(f"accuracy on {report.num_images} images")

    if has_cases:
        ax_case = axes[1]
        labels = [f"Case {CASE_NAMES[c]}" for c in CASE_NAMES]
        records = report.records
        certified = [sum(r.certified for r in records if r.extras["case"] == c) for c in CASE_NAMES]
        correct = [sum(r.correct and not r.certified for r in records if r.extras["case"] == c) for c in CASE_NAMES]
        wrong = [sum(not r.correct for r in records if r.extras["case"] == c) for c in CASE_NAMES]
        ax_case.bar(labels, certified, color="#2e7d32", label="correct, certified")
        ax_case.bar(labels, correct, bottom=certified, color="#81c784", label="correct, not certified")
        ax_case.bar(labels, wrong, bottom=[a + b for a, b in zip(certified, correct)], color="#c62828", label="wrong")
        for x, total in enumerate(a + b + c for a, b, c in zip(certified, correct, wrong)):
            ax_case.text(x, total, str(total), ha="center", va="bottom", fontsize=10)
        ax_case.set_ylabel("images")
        ax_case.set_ylim(0, max(1, report.num_images) * 1.15)
        ax_case.set_title("double-masking case of each prediction")
        ax_case.legend(fontsize=8, loc="upper right")

    views = [r.num_views for r in report.records]
    full = report.full_views
    low = report.num_masks if report.num_masks is not None else min(views, default=0)
    high = max([full or 0, *views, low + 1])
    ax_views.hist(views, bins=min(40, max(1, high - low + 1)), range=(low, high + 1), color="#4c72b0")
    if full:
        formula = "K(K+1)/2" if report.num_masks is not None else "full evaluation"
        ax_views.axvline(full, color="#c62828", linestyle="--", label=f"{formula} = {full}")
    if report.records:
        ax_views.axvline(report.views_per_image, color="black", linestyle=":", label=f"mean {report.views_per_image:.1f}")
    ax_views.set_xlabel("views evaluated per image")
    ax_views.set_ylabel("images")
    ax_views.set_title("cost: views per image (early exit)")
    if full or report.records:
        ax_views.legend(fontsize=8, loc="upper center")

    fig.suptitle(f"{report.model} on {report.data}: {report.defense}, {report.threat_model()}", fontsize=10)
    return _save(fig, path)


# -------------------------------------------------------------------------------------- sweeps
def plot_sweep(reports: Sequence[CertificationReport], path: str | Path | None = None) -> Figure:
    """Certified (and clean) accuracy against the patch size, for reports of one model and data.

    Args:
        reports: one report per patch size (e.g. `robustwrap certify --patch 1%,2%,3%`).
        path: where to save the picture.

    Returns:
        The matplotlib `Figure`.

    Raises:
        ValueError: for no reports, or a report whose threat model has several patch shapes
            (a union has no single size to put on the axis).
    """
    if not reports:
        raise ValueError("plot_sweep needs at least one report, got none")
    for r in reports:
        if len(r.patch_sizes) != 1:
            raise ValueError(f"plot_sweep needs one patch shape per report, got {r.patch_sizes}")
    ordered = sorted(reports, key=lambda r: r.patch_percent[0])
    x = [r.patch_percent[0] for r in ordered]
    fig = _figure((7, 4.5))
    ax = fig.subplots()
    ax.plot(x, [100 * r.certified_accuracy for r in ordered], "o-", color="#2e7d32", linewidth=2, label="certified accuracy")
    ax.plot(x, [100 * r.clean_accuracy for r in ordered], "s--", color="#4c72b0", label="clean accuracy (defended)")
    ax.plot(x, [100 * r.vanilla_accuracy for r in ordered], ":", color="#9e9e9e", label="vanilla clean accuracy (undefended)")
    for r, xv in zip(ordered, x):
        ph, pw = r.patch_sizes[0]
        masks = f", K={r.num_masks}" if r.num_masks is not None else ""
        ax.annotate(f"{100 * r.certified_accuracy:.1f}%\n{ph}x{pw} px{masks}", (xv, 100 * r.certified_accuracy), textcoords="offset points", xytext=(0, -26), ha="center", fontsize=8)
    ax.set_xlabel("patch size (% of image area)")
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 105)
    pad = max(0.1, 0.08 * (max(x) - min(x)))
    ax.set_xlim(min(x) - pad, max(x) + pad)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower left")
    first = ordered[0]
    ax.set_title(f"{first.model} on {first.data} ({first.num_images} images)", fontsize=10)
    return _save(fig, path)


# ------------------------------------------------------------------------------------- images
def plot_mask_set(mask_set: MaskSet, image: torch.Tensor | None = None, path: str | Path | None = None) -> Figure:
    """The mask set drawn over an image: how many masks cover each pixel, and one mask with a patch.

    Args:
        mask_set: the masks.
        image: `(C, H, W)` image in any value range (shown min-max scaled), or `None` for a
            plain background.
        path: where to save the picture.

    Returns:
        The matplotlib `Figure`.

    Raises:
        ValueError: if the image size is not the mask set's.
    """
    from matplotlib.patches import Rectangle

    shown = _display_image(image, mask_set.image_size)
    fig = _figure((10.5, 5.2))
    ax_all, ax_one = fig.subplots(1, 2)
    # Outlines of dozens of overlapping masks read as a plain grid; the overlap is the point,
    # so the left panel is the count of masks over each pixel, without the image under it.
    coverage = (~mask_set.keep_masks()).sum(0).numpy()
    levels = int(coverage.max())
    heat = ax_all.imshow(coverage, cmap=_colormap("YlGnBu").resampled(levels), vmin=0.5, vmax=levels + 0.5, interpolation="nearest")
    bar = fig.colorbar(heat, ax=ax_all, ticks=range(1, levels + 1), fraction=0.046, pad=0.03)
    bar.set_label("masks covering the pixel")
    cols = mask_set.grid[1] if mask_set.grid is not None else len(mask_set)
    for k, name, colour in [(0, "mask 0", "#d81b60"), (1, "mask 1", "#ef6c00"), (cols, f"mask {cols} (next row)", "#6a1b9a")]:
        if k < len(mask_set) and (k == 0 or k != cols or mask_set.grid is not None):
            top, left, bh, bw = mask_set.boxes[k]
            ax_all.add_patch(Rectangle((left - 0.5, top - 0.5), bw, bh, fill=False, edgecolor=colour, linewidth=2, label=name))
    ax_all.legend(fontsize=8, loc="lower right")
    grid = f" ({mask_set.grid[0]}x{mask_set.grid[1]})" if mask_set.grid is not None else ""
    ax_all.set_title(f"all {len(mask_set)} masks{grid}: overlap, three outlined", fontsize=10)
    ax_one.imshow(shown, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    for ax in (ax_all, ax_one):
        ax.set_xticks([])
        ax.set_yticks([])

    top, left, bh, bw = mask_set.boxes[0]
    ax_one.add_patch(Rectangle((left - 0.5, top - 0.5), bw, bh, facecolor=(0.85, 0.11, 0.38, 0.4), edgecolor="#d81b60", linewidth=2, label=f"mask 0: {bh}x{bw} px"))
    if len(mask_set) > 1:
        t1, l1, h1, w1 = mask_set.boxes[1]
        ax_one.add_patch(Rectangle((l1 - 0.5, t1 - 0.5), w1, h1, fill=False, edgecolor="#ef6c00", linewidth=2, linestyle="--", label="mask 1"))
    ph, pw = mask_set.patch_sizes[0]
    # The patch sits at the far corner of mask 0: the last position that mask still covers.
    ax_one.add_patch(Rectangle((left + bw - pw - 0.5, top + bh - ph - 0.5), pw, ph, facecolor=(1.0, 0.84, 0.0, 0.85), edgecolor="#ffd600", linewidth=2, label=f"patch {ph}x{pw} px"))
    ax_one.legend(fontsize=8, loc="lower right")
    ax_one.set_title("one mask and a patch it covers", fontsize=10)
    fig.suptitle(mask_set.describe(), fontsize=10)
    return _save(fig, path)


def plot_ablation_set(ablation_set: AblationSet, patch: int | float | str | Sequence[int], path: str | Path | None = None) -> Figure:
    """Smoothing's ablated views: what one view keeps, and how many views a patch meets where it lies.

    Args:
        ablation_set: the views (`robustwrap.geometry.AblationSet`).
        patch: the patch, as `wrap` takes it (pixels, area fraction, `(ph, pw)` or a string).
        path: where to save the picture.

    Returns:
        The matplotlib `Figure`. Its right panel's image is the count of views a patch meets at
        each top-left corner; the largest count is `Δ`, the votes one patch can change.
    """
    from matplotlib.patches import Rectangle

    h, w = ablation_set.image_size
    ph, pw = patch_pixels(patch, (h, w))
    rows, cols = ablation_set.axis_keep()
    # A view meets the patch when its band (block) meets the patch's rows and its columns, so the
    # count is the product of the two axes' counts (a column band keeps every row: one "row view").
    met = _views_met(rows.numpy(), ph)[:, None] * _views_met(cols.numpy(), pw)[None, :]
    delta = int(met.max())
    top, left = _central(met == delta)
    keep = ablation_set.keep_masks().numpy()
    view = int(keep[:, top : top + ph, left : left + pw].any(axis=(1, 2)).argmax())  # the first view the patch meets
    fig = _figure((10.5, 5.2))
    ax_view, ax_met = fig.subplots(1, 2)
    kept = keep[view]
    ax_view.imshow(np.where(kept, 0.92, 0.35), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    ax_view.add_patch(Rectangle((left - 0.5, top - 0.5), pw, ph, facecolor=(1.0, 0.84, 0.0, 0.85), edgecolor="#ffd600", linewidth=2, label=f"patch {ph}x{pw} px meeting {delta} views"))
    ax_view.legend(fontsize=8, loc="lower right")
    ax_view.set_title(f"view {view} of {len(ablation_set)} keeps the light pixels", fontsize=10)
    heat = ax_met.imshow(met, cmap=_colormap("YlGnBu").resampled(max(delta, 1)), vmin=0.5, vmax=delta + 0.5, interpolation="nearest")
    bar = fig.colorbar(heat, ax=ax_met, fraction=0.046, pad=0.03)
    bar.set_label("views the patch meets")
    ax_met.set_title(f"views a patch meets, by its top-left corner: at most Δ={delta}", fontsize=10)
    for ax in (ax_view, ax_met):
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(f"{ablation_set.describe()}: a certificate needs a vote margin above 2Δ={2 * delta}", fontsize=10)
    return _save(fig, path)


def plot_feature_window(
    image_size: int | Sequence[int],
    patch: int | float | str | Sequence[int],
    receptive_field: int | Sequence[int],
    feature_stride: int | Sequence[int],
    feature_offset: int | Sequence[int],
    feature_size: int | Sequence[int],
    path: str | Path | None = None,
) -> Figure:
    """PatchGuard's geometry: a patch where it touches the most local logits, and that window on the map.

    Args:
        image_size: `H` or `(H, W)` of the inputs.
        patch: the patch, as `wrap` takes it.
        receptive_field: `r`, an int or `(rh, rw)`: feature `(a, b)` sees input rows
            `[s*a - o, s*a - o + r)` and columns likewise.
        feature_stride: `s`, an int or `(sh, sw)`.
        feature_offset: `o`, an int or `(oh, ow)` (0 for an unpadded model such as BagNet).
        feature_size: `(h, w)` of the local-logit map.
        path: where to save the picture.

    Returns:
        The matplotlib `Figure`. Its right panel's image is 1 on the features the patch touches:
        a block of the window's size (`robustwrap.geometry.feature_window`).

    Raises:
        ValueError: for invalid geometry, as `feature_window`.
    """
    from matplotlib.patches import Rectangle

    (h, w), (ph, pw) = as_image_size(image_size), patch_pixels(patch, image_size)
    window = feature_window((h, w), (ph, pw), receptive_field, feature_stride, feature_offset, feature_size)
    r, s, o, size = (as_pair(v, name) for v, name in ((receptive_field, "r"), (feature_stride, "s"), (feature_offset, "o"), (feature_size, "feature_size")))
    top, rows = _widest_touch(h, ph, int(r[0]), int(s[0]), int(o[0]), int(size[0]))
    left, cols = _widest_touch(w, pw, int(r[1]), int(s[1]), int(o[1]), int(size[1]))
    touched = rows[:, None] & cols[None, :]
    fig = _figure((10.5, 5.2))
    ax_image, ax_map = fig.subplots(1, 2)
    ax_image.imshow(np.full((h, w), 0.92), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    a, b = np.flatnonzero(rows), np.flatnonzero(cols)
    # The pixels the touched features see, and one feature's receptive field.
    y0, x0 = int(s[0]) * a[0] - int(o[0]), int(s[1]) * b[0] - int(o[1])
    y1, x1 = int(s[0]) * a[-1] - int(o[0]) + int(r[0]), int(s[1]) * b[-1] - int(o[1]) + int(r[1])
    ax_image.add_patch(Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False, edgecolor="#1e88e5", linewidth=2, label=f"seen by the {len(a)}x{len(b)} touched features"))
    ax_image.add_patch(Rectangle((x0 - 0.5, y0 - 0.5), int(r[1]), int(r[0]), fill=False, edgecolor="#6a1b9a", linewidth=1.5, linestyle="--", label=f"one receptive field, {r[0]}x{r[1]} px"))
    ax_image.add_patch(Rectangle((left - 0.5, top - 0.5), pw, ph, facecolor=(1.0, 0.84, 0.0, 0.85), edgecolor="#ffd600", linewidth=2, label=f"patch {ph}x{pw} px"))
    ax_image.set_xlim(min(-0.5, x0 - 0.5), max(w - 0.5, x1 - 0.5))
    ax_image.set_ylim(max(h - 0.5, y1 - 0.5), min(-0.5, y0 - 0.5))
    ax_image.legend(fontsize=8, loc="lower right")
    ax_image.set_title(f"{h}x{w} image: a patch where it touches the most features", fontsize=10)
    ax_map.imshow(touched.astype(float), cmap=_colormap("YlGnBu"), vmin=0, vmax=1.2, interpolation="nearest")
    ax_map.add_patch(Rectangle((b[0] - 0.5, a[0] - 0.5), window[1], window[0], fill=False, edgecolor="#d81b60", linewidth=2))
    ax_map.set_title(f"{size[0]}x{size[1]} local logits: it touches a {window[0]}x{window[1]} window", fontsize=10)
    for ax in (ax_image, ax_map):
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(
        f"PatchGuard: receptive field {r[0]}x{r[1]} px, stride {s[0]}x{s[1]}, offset {o[0]}x{o[1]}; robust masking removes each "
        f"class's largest {window[0]}x{window[1]} window of evidence",
        fontsize=10,
    )
    return _save(fig, path)


def plot_feature_mask_set(
    mask_set: MaskSet,
    image_size: int | Sequence[int],
    patch: int | float | str | Sequence[int],
    receptive_field: int | Sequence[int],
    feature_stride: int | Sequence[int],
    feature_offset: int | Sequence[int] = 0,
    image: torch.Tensor | None = None,
    path: str | Path | None = None,
) -> Figure:
    """PatchCURE's feature mask set drawn on the image: the cells, and masks of cells by the pixels they see.

    Left, the grid of cells (each cell's first receptive field outlined) and how many masks cover
    each cell; right, the image with mask 0's cells and the pixels they see, mask 1, and a patch
    inside mask 0's pixels: every cell the patch reaches is one of mask 0's.

    Args:
        mask_set: the feature mask set (`PatchCURE.feature_mask_set`: its "pixels" are cells).
        image_size: `H` or `(H, W)` of the inputs.
        patch: the patch, as `wrap` takes it.
        receptive_field: `r`: cell `(a, b)` sees input rows `[s*a - o, s*a - o + r)` and columns likewise.
        feature_stride: `s`, an int or `(sh, sw)`.
        feature_offset: `o`, an int or `(oh, ow)` (0 for a ViT split).
        image: `(C, H, W)` image in any value range, or `None` for a plain background.
        path: where to save the picture.

    Returns:
        The matplotlib `Figure`.

    Raises:
        ValueError: if the image is not `image_size`.
    """
    from matplotlib.patches import Rectangle

    from .defenses.patchcure import _describe_cells

    (h, w), (ph, pw) = as_image_size(image_size), patch_pixels(patch, image_size)
    geometry = ((receptive_field, "receptive_field"), (feature_stride, "feature_stride"), (feature_offset, "feature_offset"))
    r, s, o = (tuple(int(n) for n in as_pair(value, name)) for value, name in geometry)
    shown = _display_image(image, (h, w))

    def pixels(box) -> tuple[int, int, int, int]:
        """`(top, left, height, width)` in pixels that the cells of `box` see, within the image."""
        top, left, bh, bw = box
        y0, x0 = max(0, s[0] * top - o[0]), max(0, s[1] * left - o[1])
        y1, x1 = min(h, s[0] * (top + bh - 1) - o[0] + r[0]), min(w, s[1] * (left + bw - 1) - o[1] + r[1])
        return y0, x0, y1 - y0, x1 - x0

    fig = _figure((10.5, 5.2))
    ax_cells, ax_image = fig.subplots(1, 2)
    coverage = (~mask_set.keep_masks()).sum(0).numpy()
    levels = max(1, int(coverage.max()))
    heat = ax_cells.imshow(coverage, cmap=_colormap("YlGnBu").resampled(levels), vmin=0.5, vmax=levels + 0.5, interpolation="nearest")
    bar = fig.colorbar(heat, ax=ax_cells, ticks=range(1, levels + 1), fraction=0.046, pad=0.03)
    bar.set_label("masks covering the cell")
    gh, gw = mask_set.image_size
    ax_cells.set_title(f"{gh}x{gw} cells, each sees {r[0]}x{r[1]} px at a stride of {s[0]}x{s[1]} px", fontsize=10)
    ax_image.imshow(shown, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    for a in range(gh + 1):  # the cell borders at the stride (a ViT split's windows)
        ax_image.axhline(min(h, max(0, s[0] * a - o[0])) - 0.5, color="#90a4ae", linewidth=0.6)
    for b in range(gw + 1):
        ax_image.axvline(min(w, max(0, s[1] * b - o[1])) - 0.5, color="#90a4ae", linewidth=0.6)
    shapes = [(0, "#d81b60", "-"), (1, "#ef6c00", "--")]
    for k, colour, style in shapes:
        if k < len(mask_set):
            box = mask_set.boxes[k]
            top, left, bh, bw = pixels(box)
            label = f"mask {k}: {box[2]}x{box[3]} cells, {bh}x{bw} px"
            face = (0.85, 0.11, 0.38, 0.3) if k == 0 else "none"
            line = {"edgecolor": colour, "linewidth": 2, "linestyle": style}
            ax_image.add_patch(Rectangle((left - 0.5, top - 0.5), bw, bh, facecolor=face, label=label, **line))
            ax_cells.add_patch(Rectangle((box[1] - 0.5, box[0] - 0.5), box[3], box[2], fill=False, **line))
    # The patch at the first position past the cells before mask 0 (a cell before it sees up to
    # s*top - o + r - s): it reaches only mask 0's cells, as every patch reaches one mask's only.
    top, left = mask_set.boxes[0][:2]
    y = min(h - ph, 0 if top == 0 else s[0] * top - o[0] + r[0] - s[0])
    x = min(w - pw, 0 if left == 0 else s[1] * left - o[1] + r[1] - s[1])
    ax_image.add_patch(
        Rectangle((x - 0.5, y - 0.5), pw, ph, facecolor=(1.0, 0.84, 0.0, 0.85), edgecolor="#ffd600", linewidth=2, label=f"patch {ph}x{pw} px")
    )
    ax_image.legend(fontsize=8, loc="lower right")
    ax_image.set_title("on the image: masks of cells by the pixels they see", fontsize=10)
    for ax in (ax_cells, ax_image):
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(_describe_cells((h, w), (ph, pw), mask_set, r, s, _mask_stride(mask_set)), fontsize=10)
    return _save(fig, path)


def _mask_stride(mask_set: MaskSet) -> tuple[int, int]:
    """The stride of a feature mask set: its masks are `window + stride - 1` cells for a `window`-cell "patch"."""
    (mh, mw), (wh, ww) = mask_set.mask_size, mask_set.patch_sizes[0]
    return mh - wh + 1, mw - ww + 1


def plot_views(
    one_mask: torch.Tensor,
    grid: torch.Tensor,
    label: int,
    mask_set: MaskSet,
    image: torch.Tensor | None = None,
    path: str | Path | None = None,
    class_names: Sequence[str] | None = None,
    image_size: int | Sequence[int] | None = None,
) -> Figure:
    """For one image: the one-mask labels laid out like the masks, and the two-mask grid.

    Views whose label differs from `label` (the views that break the certificate) are framed
    on the one-mask grid and crossed on the two-mask heatmap; a view that was not evaluated is
    grey.

    Args:
        one_mask: `(K,)` one-mask labels `P_i`.
        grid: `(K, K)` two-mask labels `P_ij` (symmetric, `-1` where not evaluated).
        label: the true label.
        mask_set: the masks (their grid lays out the one-mask labels).
        image: `(C, H, W)` the image, in any value range, to show beside the grids.
        path: where to save the picture.
        class_names: names for the class ids, for the titles.
        image_size: `(H, W)` of `image` when the masks are not on its pixels (PatchCURE's
            feature mask set, on a grid of cells); default: the mask set's.

    Returns:
        The matplotlib `Figure`.

    Raises:
        ValueError: if the shapes do not match the mask set (or the image `image_size`).
    """
    from matplotlib.colors import BoundaryNorm, ListedColormap
    from matplotlib.ticker import MaxNLocator

    k = len(mask_set)
    one_mask = torch.as_tensor(one_mask).reshape(-1).cpu().long()
    grid = torch.as_tensor(grid).cpu().long()
    if one_mask.numel() != k or tuple(grid.shape) != (k, k):
        raise ValueError(f"one_mask must have {k} labels and grid shape ({k}, {k}) for this mask set, got {one_mask.numel()} and {tuple(grid.shape)}")
    grid = grid.clone()
    grid[torch.arange(k), torch.arange(k)] = one_mask
    decision = rule.decide(one_mask[None], grid[None])
    prediction, case = int(decision.label[0]), int(decision.case[0])
    certified = bool(rule.certified(grid[None], torch.tensor([label]))[0])

    def name(c: int) -> str:
        return f"{c} ({class_names[c]})" if class_names is not None and 0 <= c < len(class_names) else str(c)

    classes = sorted({int(v) for v in grid.unique() if v >= 0} | {int(label)})
    palette = _colormap("tab10" if len(classes) <= 10 else "tab20")
    cmap = ListedColormap([(0.8, 0.8, 0.8)] + [palette(i % palette.N) for i in range(len(classes))])
    index_of = {c: i + 1 for i, c in enumerate(classes)}
    index_of[-1] = 0
    norm = BoundaryNorm([i - 0.5 for i in range(len(classes) + 2)], cmap.N)

    panels = 3 if image is not None else 2
    fig = _figure((4.6 * panels + 0.8, 5))
    axes = fig.subplots(1, panels, gridspec_kw={"width_ratios": [1] * (panels - 1) + [1.25]})
    if image is not None:
        size = mask_set.image_size if image_size is None else as_image_size(image_size)
        axes[0].imshow(_display_image(image, size), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        axes[0].set_xticks([])
        axes[0].set_yticks([])
        axes[0].set_title(f"label {name(label)}", fontsize=10)

    ax_one = axes[-2]
    rows, cols = mask_set.grid if mask_set.grid is not None and mask_set.grid[0] * mask_set.grid[1] == k else (1, k)
    colour_index = np.vectorize(index_of.__getitem__, otypes=[int])
    ax_one.imshow(colour_index(one_mask.reshape(rows, cols).numpy()), cmap=cmap, norm=norm)
    for r in range(rows):
        for c in range(cols):
            value = int(one_mask[r * cols + c])
            bad = value != label
            ax_one.text(c, r, str(value), ha="center", va="center", fontsize=11 if k <= 64 else 7, fontweight="bold" if bad else None)
            if bad:
                ax_one.add_patch(_rect(c, r, "black"))
    ax_one.set_xticks(range(cols))
    ax_one.set_yticks(range(rows))
    ax_one.set_title(f"one-mask labels P_i, laid out as the masks (framed: not {label})", fontsize=10)

    ax_two = axes[-1]
    image_ = ax_two.imshow(colour_index(grid.numpy()), cmap=cmap, norm=norm, interpolation="nearest")
    fail_i, fail_j = ((grid != label) & (grid >= 0)).nonzero(as_tuple=True)
    ax_two.scatter(fail_j.numpy(), fail_i.numpy(), marker="x", color="black", s=max(6, 2400 / k**1.5), linewidths=1)
    for axis in (ax_two.xaxis, ax_two.yaxis):
        axis.set_major_locator(MaxNLocator(integer=True))
    ax_two.set_xlabel("mask j")
    ax_two.set_ylabel("mask i")
    ax_two.set_title(f"two-mask labels P_ij (x: not {label}, {len(fail_i)} of {k * k} cells)", fontsize=10)
    bar = fig.colorbar(image_, ax=ax_two, ticks=range(len(classes) + 1), fraction=0.046, pad=0.04)
    bar.ax.set_yticklabels(["not run"] + [name(c) for c in classes], fontsize=8)
    bar.set_label("class")

    verdict = "certified" if certified else "NOT certified"
    fig.suptitle(f"prediction {name(prediction)} (Case {CASE_NAMES[case]}), label {name(label)}: {verdict}", fontsize=11)
    return _save(fig, path)


# ------------------------------------------------------------------------------------ detection
def plot_detection(
    model: RobustPatchClassifier,
    image: torch.Tensor,
    label: int | None = None,
    path: str | Path | None = None,
    class_names: Sequence[str] | None = None,
) -> Figure:
    """Certified detection of one image: each one-mask view's label and confidence, which views alert, and the output.

    The views are laid out as their masks (PatchCleanser's mask grid, PatchGuard's feature
    windows, row-major). A view alerts when its label differs from the unmasked prediction with
    softmax confidence `> model.tau`; those are framed in black. The title gives the output (the
    label, or ALERT) and, with `label`, whether the image is certified: every view shows `label`
    with confidence above `tau`, so that no patch can make the output another label without an
    alert (docs/concepts.md#certified-detection).

    Args:
        model: a defended model with certified detection (PatchCleanser, PatchGuard).
        image: `(C, H, W)` one image, as the model expects it.
        label: the true label; None: certify against the model's own output.
        path: where to save the picture.
        class_names: names for the class ids, for the titles.

    Returns:
        The matplotlib `Figure`.

    Raises:
        NotImplementedError: the defense has no detection rule (the message says why).
        ValueError: for an image the model cannot take, or a label out of range.
    """
    from matplotlib.colors import BoundaryNorm, ListedColormap

    from .defenses.detection import certify_detection_views, confident_labels, detect_views

    if getattr(model, "_no_detection", "it is not a defended model") is not None:
        raise NotImplementedError(
            f"plot_detection: {type(model).__name__} cannot detect: {getattr(model, '_no_detection', 'it is not a defended model')}"
        )
    if not isinstance(image, torch.Tensor) or image.ndim != 3:
        raise ValueError(
            f"image must be one (C, H, W) tensor, got {tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__}"
        )
    x = model._check_images(image[None])
    logits, views, _ = model._detection_logits(x)
    tau = model.tau
    found = detect_views(logits, views, tau)
    prediction, alert = int(found.prediction[0]), bool(found.alert[0])
    y = prediction if label is None else int(model._check_labels(torch.tensor([label]), 1)[0])
    certified = bool(certify_detection_views(logits, views, torch.tensor([y], device=logits.device), tau, model.margin)[0])
    labels, confident = (t[0].cpu() for t in confident_labels(views, tau))
    confidence = views[0].detach().double().softmax(-1).gather(-1, labels[:, None].to(views.device))[:, 0].cpu()
    alerting = confident & (labels != prediction)
    rows, cols = _detection_layout(model, labels.numel())

    def name(c: int) -> str:
        return f"{c} ({class_names[c]})" if class_names is not None and 0 <= c < len(class_names) else str(c)

    classes = sorted({int(v) for v in labels.unique()} | {prediction, y})
    palette = _colormap("tab10" if len(classes) <= 10 else "tab20")
    cmap = ListedColormap([palette(i % palette.N) for i in range(len(classes))])
    norm = BoundaryNorm([i - 0.5 for i in range(len(classes) + 1)], cmap.N)
    index = torch.tensor([classes.index(int(v)) for v in labels]).reshape(rows, cols).numpy()

    fig = _figure((4.4 + 0.55 * max(cols, 6), 4.8))
    ax_image, ax_views = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1, max(1.2, cols / max(rows, 1))]})
    ax_image.imshow(_display_image(image, tuple(image.shape[1:])), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    ax_image.set_xticks([])
    ax_image.set_yticks([])
    ax_image.set_title(f"unmasked prediction {name(prediction)}" + ("" if label is None else f", label {name(y)}"), fontsize=10)
    shown = ax_views.imshow(index, cmap=cmap, norm=norm)
    for k in range(labels.numel()):
        r, c = divmod(k, cols)
        text = f"{int(labels[k])}\n{100 * float(confidence[k]):.0f}%"
        # a view at confidence <= tau neither alerts nor counts for the certificate: greyed out
        weight, colour = ("bold", "black") if bool(alerting[k]) else (None, "black" if bool(confident[k]) else "0.45")
        ax_views.text(c, r, text, ha="center", va="center", fontsize=9 if rows * cols <= 64 else 6, fontweight=weight, color=colour)
        if bool(alerting[k]):
            ax_views.add_patch(_rect(c, r, "black"))
    ax_views.set_xticks(range(cols))
    ax_views.set_yticks(range(rows))
    ax_views.set_title(
        f"one-mask views: label, confidence (framed: {int(alerting.sum())} of {labels.numel()} alert; grey: <= tau)",
        fontsize=9,
    )
    bar = fig.colorbar(shown, ax=ax_views, ticks=range(len(classes)), fraction=0.046, pad=0.04)
    bar.ax.set_yticklabels([name(c) for c in classes], fontsize=8)
    bar.set_label("class")
    output = "ALERT" if alert else f"label {name(prediction)}"
    verdict = f"certified for {name(y)}" if certified else f"NOT certified for {name(y)}"
    fig.suptitle(f"certified detection at tau {tau:g}: output {output}; {verdict}", fontsize=11)
    return _save(fig, path)


def _detection_layout(model: RobustPatchClassifier, k: int) -> tuple[int, int]:
    """`(rows, cols)` of `k` one-mask views: the mask set's grid, PatchGuard's windows over its map, else one row."""
    mask_set = getattr(model, "mask_set", None)
    if mask_set is not None and mask_set.grid is not None and mask_set.grid[0] * mask_set.grid[1] == k:
        return tuple(mask_set.grid)
    feature_size = getattr(model, "_feature_size", None)
    if callable(feature_size):
        (h, w), (wh, ww) = feature_size(), model.window
        rows, cols = h - min(wh, h) + 1, w - min(ww, w) + 1
        if rows * cols == k:
            return rows, cols
    return 1, k


# ------------------------------------------------------------------------------------- plumbing
def _figure(size: tuple[float, float]) -> Figure:
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise ImportError("pictures need matplotlib: pip install matplotlib") from None
    return Figure(figsize=size, dpi=110, layout="constrained")


def _save(fig: Figure, path: str | Path | None) -> Figure:
    if path is not None:
        fig.savefig(path)
    return fig


def _colormap(name: str):
    from matplotlib import colormaps

    return colormaps[name]


def _rect(c: int, r: int, colour: str):
    from matplotlib.patches import Rectangle

    return Rectangle((c - 0.45, r - 0.45), 0.9, 0.9, fill=False, edgecolor=colour, linewidth=2.5)


def _views_met(keep: np.ndarray, p: int) -> np.ndarray:
    """For each start of a `p`-pixel patch along one axis, how many positions `(V, n)` keep one of its pixels."""
    return np.lib.stride_tricks.sliding_window_view(keep, p, axis=1).any(axis=2).sum(axis=0)


def _central(best: np.ndarray) -> tuple[int, ...]:
    """The index of a True entry of `best` nearest to its centre (where a picture shows it best)."""
    where = np.argwhere(best)
    centre = (np.array(best.shape) - 1) / 2
    return tuple(int(v) for v in where[np.abs(where - centre).sum(axis=1).argmin()])


def _widest_touch(n: int, p: int, r: int, s: int, o: int, m: int) -> tuple[int, np.ndarray]:
    """`(start, touched)`: a patch start along one axis that touches the most of the `m` features
    (feature `a` sees `[s*a - o, s*a - o + r)`), the most central one, and which features it touches."""
    start = s * np.arange(m) - o
    t = np.arange(n - p + 1)[:, None]
    touched = (start[None, :] < t + p) & (start[None, :] + r > t)
    counts = touched.sum(axis=1)
    best = _central(counts == counts.max())[0]
    return best, touched[best]


def _display_image(image: torch.Tensor | None, size: tuple[int, int]):
    """`(H, W)` or `(H, W, 3)` floats in [0, 1]: the image min-max scaled (it is usually normalised)."""
    h, w = size
    if image is None:
        return torch.full((h, w), 0.92).numpy()
    image = torch.as_tensor(image).detach().cpu().float()
    if image.ndim != 3 or tuple(image.shape[1:]) != (h, w):
        raise ValueError(f"image must have shape (C, {h}, {w}) for this mask set, got {tuple(image.shape)}")
    lo, hi = image.min(), image.max()
    image = (image - lo) / (hi - lo) if hi > lo else torch.zeros_like(image)
    return image[0].numpy() if image.shape[0] == 1 else image[:3].permute(1, 2, 0).numpy()
