"""`CertificationReport`: what `certify_dataset` found, as a table, as JSON and as pictures.

Everything here reads results; nothing runs a model. The pictures use matplotlib's object API
(`matplotlib.figure.Figure`, no pyplot), so they never change a notebook's backend and render
headless; matplotlib is imported only when a picture is asked for.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from .defenses import patchcleanser as rule
from .geometry import MaskSet

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["CertificationReport", "ImageRecord", "plot_mask_set", "plot_sweep", "plot_views", "sweep_table"]

REPORT_FORMAT = "robustwrap.CertificationReport"
REPORT_VERSION = 1
CASE_NAMES = {rule.CASE_UNANIMOUS: "I", rule.CASE_DISAGREER: "II", rule.CASE_MAJORITY: "III"}


@dataclass(frozen=True)
class ImageRecord:
    """The outcome for one image of a data set.

    Attributes:
        index: position of the image in the data set.
        label: the true label.
        prediction: the robust (double-masking) prediction.
        certified: no patch of the threat model can change the prediction, and it equals `label`.
        case: 1, 2 or 3: the double-masking case that gave the prediction.
        vanilla_prediction: the undefended base model's prediction on the unmasked image.
        num_views: masked views run through the model for this image.
        one_mask: the `K` one-mask labels `P_i`.
        seconds: this image's share of the time of the step that certified it; not compared,
            so that reports of the same results are equal however they were timed.
    """

    index: int
    label: int
    prediction: int
    certified: bool
    case: int
    vanilla_prediction: int
    num_views: int
    one_mask: tuple[int, ...]
    seconds: float = field(default=0.0, compare=False)

    @property
    def correct(self) -> bool:
        """The robust prediction equals the label."""
        return self.prediction == self.label

    @property
    def vanilla_correct(self) -> bool:
        """The undefended base model's prediction equals the label."""
        return self.vanilla_prediction == self.label

    def to_dict(self) -> dict:
        """The record as a JSON-ready dict."""
        record = asdict(self)
        record["one_mask"] = list(self.one_mask)
        return record

    @classmethod
    def from_dict(cls, record: dict) -> ImageRecord:
        """The record back from `to_dict`.

        Raises:
            ValueError: if a field is missing or has the wrong type, so that a damaged results
                file is reported instead of counted.
        """
        try:
            return cls(
                index=_int(record["index"]),
                label=_int(record["label"]),
                prediction=_int(record["prediction"]),
                certified=_bool(record["certified"]),
                case=_int(record["case"]),
                vanilla_prediction=_int(record["vanilla_prediction"]),
                num_views=_int(record["num_views"]),
                one_mask=tuple(_int(v) for v in record["one_mask"]),
                seconds=float(record.get("seconds", 0.0)),
            )
        except (KeyError, TypeError, ValueError) as error:
            raise ValueError(f"not an image record ({type(error).__name__}: {error}): {record!r:.200}") from None


def _int(value) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"expected an int, got {value!r}")
    return value


def _bool(value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"expected true or false, got {value!r}")
    return value


@dataclass(frozen=True)
class CertificationReport:
    """Clean and certified accuracy of a defended model on a data set, with per-image records.

    Every count is derived from `records`, so a report cannot disagree with itself. Two reports
    compare equal when they hold the same results for the same model and threat model; timings
    are not compared (a resumed or many-process run equals a straight one).

    Attributes:
        model: what was certified (a zoo name, a path, an architecture).
        data: what it was certified on.
        mask_set: the threat model: patch size(s) and the mask set.
        fill: the masked pixel value in the model's input space.
        num_classes: classes of the model.
        records: one `ImageRecord` per image, by index.
        amp: whether the model ran under autocast (mixed precision).
        fingerprint: hash of the weights, mask set, fill and precision (see `certify_dataset`).
    """

    model: str
    data: str
    mask_set: MaskSet
    fill: float | tuple[float, ...]
    num_classes: int
    records: tuple[ImageRecord, ...]
    amp: bool = False
    fingerprint: str = ""

    # ---------------------------------------------------------------------------------- counts
    @property
    def num_images(self) -> int:
        """Images certified."""
        return len(self.records)

    @property
    def vanilla_correct(self) -> int:
        """Images the undefended base model classifies correctly."""
        return sum(r.vanilla_correct for r in self.records)

    @property
    def clean_correct(self) -> int:
        """Images the defended model classifies correctly."""
        return sum(r.correct for r in self.records)

    @property
    def certified(self) -> int:
        """Images correctly classified with a certificate: no patch can change the prediction."""
        return sum(r.certified for r in self.records)

    @property
    def vanilla_accuracy(self) -> float:
        """Clean accuracy of the undefended base model, in [0, 1]."""
        return self._fraction(self.vanilla_correct)

    @property
    def clean_accuracy(self) -> float:
        """Clean accuracy of the defended model, in [0, 1]."""
        return self._fraction(self.clean_correct)

    @property
    def certified_accuracy(self) -> float:
        """Certified accuracy (certified images / all images), in [0, 1]."""
        return self._fraction(self.certified)

    @property
    def case_counts(self) -> dict[int, int]:
        """Images decided by Case I, II and III (keys 1, 2, 3)."""
        counts = dict.fromkeys(CASE_NAMES, 0)
        for r in self.records:
            counts[r.case] += 1
        return counts

    @property
    def num_masks(self) -> int:
        """`K`, the masks of the mask set."""
        return len(self.mask_set)

    @property
    def full_views(self) -> int:
        """`K(K+1)/2`: the views of a full two-mask grid, diagonal included, per image."""
        return self.num_masks * (self.num_masks + 1) // 2

    @property
    def total_views(self) -> int:
        """Masked views run through the model for all images."""
        return sum(r.num_views for r in self.records)

    @property
    def views_per_image(self) -> float:
        """Mean masked views per image (compare with `full_views`)."""
        return self.total_views / self.num_images if self.records else math.nan

    @property
    def seconds(self) -> float:
        """Time spent certifying, summed over the images (and so over processes and resumed runs)."""
        return sum(r.seconds for r in self.records)

    @property
    def images_per_second(self) -> float:
        """Images certified per second of one process (`num_images / seconds`)."""
        seconds = self.seconds
        return self.num_images / seconds if seconds > 0 else math.nan

    @property
    def patch_percent(self) -> tuple[float, ...]:
        """Each patch of the threat model as a percentage of the image area."""
        h, w = self.mask_set.image_size
        return tuple(100 * ph * pw / (h * w) for ph, pw in self.mask_set.patch_sizes)

    def _fraction(self, count: int) -> float:
        return count / self.num_images if self.records else math.nan

    # ------------------------------------------------------------------------------------ text
    def summary(self) -> str:
        """A readable table of the report (what `robustwrap certify` prints)."""
        n = self.num_images
        cases = self.case_counts
        rows = [
            ("model", self.model),
            ("data", f"{self.data} ({n} images, {self.num_classes} classes)"),
            ("threat model", self.mask_set.describe()),
            ("fill", f"{self.fill}" + ("  (autocast)" if self.amp else "")),
            ("", ""),
            ("vanilla clean accuracy", f"{_pct(self.vanilla_accuracy)}  ({self.vanilla_correct}/{n})  undefended base model"),
            ("clean accuracy", f"{_pct(self.clean_accuracy)}  ({self.clean_correct}/{n})  defended"),
            ("certified accuracy", f"{_pct(self.certified_accuracy)}  ({self.certified}/{n})"),
            ("cases I / II / III", " / ".join(str(cases[c]) for c in CASE_NAMES)),
            ("views per image", f"{self.views_per_image:.1f} of {self.full_views} (K(K+1)/2, K={self.num_masks}): {_pct(self.views_per_image / self.full_views)}"),
            ("speed", f"{self.images_per_second:.1f} images/s per process"),
        ]
        return _table(rows, title="robustwrap certification report")

    # ------------------------------------------------------------------------------------ JSON
    def to_json(self, indent: int | None = None) -> str:
        """The report as JSON: settings, a summary block of the counts, and every record.

        `CertificationReport.from_json(report.to_json()) == report`.
        """
        summary = {
            "num_images": self.num_images,
            "vanilla_accuracy": self.vanilla_accuracy,
            "clean_accuracy": self.clean_accuracy,
            "certified_accuracy": self.certified_accuracy,
            "cases": {CASE_NAMES[c]: v for c, v in self.case_counts.items()},
            "patch_pixels": [list(p) for p in self.mask_set.patch_sizes],
            "patch_percent": list(self.patch_percent),
            "num_masks": self.num_masks,
            "views_per_image": self.views_per_image,
            "full_views": self.full_views,
            "seconds": self.seconds,
            "images_per_second": self.images_per_second,
        }
        document = {
            "format": REPORT_FORMAT,
            "version": REPORT_VERSION,
            "model": self.model,
            "data": self.data,
            "mask_set": self.mask_set.to_dict(),
            "fill": list(self.fill) if isinstance(self.fill, tuple) else self.fill,
            "num_classes": self.num_classes,
            "amp": self.amp,
            "fingerprint": self.fingerprint,
            "summary": {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in summary.items()},
            "records": [r.to_dict() for r in self.records],
        }
        return json.dumps(document, indent=indent)

    @classmethod
    def from_json(cls, text: str) -> CertificationReport:
        """A report from `to_json`'s output (the `summary` block is recomputed, not read).

        Raises:
            ValueError: if `text` is not a robustwrap report, so that another JSON file is not
                mistaken for one.
        """
        try:
            document = json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(f"not a robustwrap report: invalid JSON ({error})") from None
        if not isinstance(document, dict) or document.get("format") != REPORT_FORMAT:
            raise ValueError(f"not a robustwrap report: expected a JSON object with format {REPORT_FORMAT!r}")
        if document.get("version") != REPORT_VERSION:
            raise ValueError(f"report format version {document.get('version')!r} is not supported (expected {REPORT_VERSION})")
        fill = document["fill"]
        return cls(
            model=document["model"],
            data=document["data"],
            mask_set=MaskSet.from_dict(document["mask_set"]),
            fill=tuple(fill) if isinstance(fill, list) else fill,
            num_classes=document["num_classes"],
            records=tuple(ImageRecord.from_dict(r) for r in document["records"]),
            amp=document["amp"],
            fingerprint=document["fingerprint"],
        )

    def save(self, path: str | Path) -> Path:
        """Write `to_json()` to `path` (indented); returns the path."""
        path = Path(path)
        path.write_text(self.to_json(indent=1) + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path) -> CertificationReport:
        """Read a report written by `save`.

        Raises:
            OSError: if the file cannot be read.
            ValueError: if it is not a robustwrap report.
        """
        return cls.from_json(Path(path).read_text())

    # -------------------------------------------------------------------------------- pictures
    def plot(self, path: str | Path | None = None) -> Figure:
        """Accuracy bars, the cases split by outcome, and the views per image against a full grid.

        Args:
            path: where to save the PNG (or any format matplotlib knows by the suffix).

        Returns:
            The matplotlib `Figure`.

        Raises:
            ImportError: if matplotlib is not installed (`pip install matplotlib`).
        """
        fig = _figure((13, 4.2))
        ax_acc, ax_case, ax_views = fig.subplots(1, 3, gridspec_kw={"width_ratios": [1, 1.2, 1.4]})

        names = ["vanilla\n(undefended)", "clean\n(defended)", "certified"]
        values = [100 * self.vanilla_accuracy, 100 * self.clean_accuracy, 100 * self.certified_accuracy]
        bars = ax_acc.bar(names, values, color=["#9e9e9e", "#4c72b0", "#2e7d32"])
        for bar, value in zip(bars, values):
            ax_acc.text(bar.get_x() + bar.get_width() / 2, value + 1.5, f"{value:.1f}%", ha="center", va="bottom", fontsize=10)
        ax_acc.set_ylim(0, 112)
        ax_acc.set_ylabel("accuracy (%)")
        ax_acc.set_title(f"accuracy on {self.num_images} images")

        labels = [f"Case {CASE_NAMES[c]}" for c in CASE_NAMES]
        certified = [sum(r.certified for r in self.records if r.case == c) for c in CASE_NAMES]
        correct = [sum(r.correct and not r.certified for r in self.records if r.case == c) for c in CASE_NAMES]
        wrong = [sum(not r.correct for r in self.records if r.case == c) for c in CASE_NAMES]
        ax_case.bar(labels, certified, color="#2e7d32", label="correct, certified")
        ax_case.bar(labels, correct, bottom=certified, color="#81c784", label="correct, not certified")
        ax_case.bar(labels, wrong, bottom=[a + b for a, b in zip(certified, correct)], color="#c62828", label="wrong")
        for x, total in enumerate(a + b + c for a, b, c in zip(certified, correct, wrong)):
            ax_case.text(x, total, str(total), ha="center", va="bottom", fontsize=10)
        ax_case.set_ylabel("images")
        ax_case.set_ylim(0, max(1, self.num_images) * 1.15)
        ax_case.set_title("double-masking case of each prediction")
        ax_case.legend(fontsize=8, loc="upper right")

        views = [r.num_views for r in self.records]
        ax_views.hist(views, bins=min(40, max(1, self.full_views - self.num_masks + 1)), range=(self.num_masks, self.full_views + 1), color="#4c72b0")
        ax_views.axvline(self.full_views, color="#c62828", linestyle="--", label=f"full grid K(K+1)/2 = {self.full_views}")
        if self.records:
            ax_views.axvline(self.views_per_image, color="black", linestyle=":", label=f"mean {self.views_per_image:.1f}")
        ax_views.set_xlabel("masked views evaluated per image")
        ax_views.set_ylabel("images")
        ax_views.set_title("cost: views per image (early exit)")
        ax_views.legend(fontsize=8, loc="upper center")

        fig.suptitle(f"{self.model} on {self.data}: {self.mask_set.describe()}", fontsize=10)
        return _save(fig, path)


# ---------------------------------------------------------------------------------- mask sets


# -------------------------------------------------------------------------------------- sweeps
def sweep_table(reports: Sequence[CertificationReport]) -> str:
    """One row per report of a patch-size sweep: patch, masks, clean and certified accuracy."""
    header = ("patch", "% of area", "masks", "vanilla", "clean", "certified", "views/image")
    rows = [header]
    for r in reports:
        rows.append(
            (
                ", ".join(f"{ph}x{pw} px" for ph, pw in r.mask_set.patch_sizes),
                ", ".join(f"{p:.2f}%" for p in r.patch_percent),
                str(r.num_masks),
                _pct(r.vanilla_accuracy),
                _pct(r.clean_accuracy),
                _pct(r.certified_accuracy),
                f"{r.views_per_image:.1f}/{r.full_views}",
            )
        )
    widths = [max(len(row[c]) for row in rows) for c in range(len(header))]
    lines = ["  ".join(cell.rjust(w) for cell, w in zip(row, widths)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


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
        if len(r.mask_set.patch_sizes) != 1:
            raise ValueError(f"plot_sweep needs one patch shape per report, got {r.mask_set.patch_sizes}")
    ordered = sorted(reports, key=lambda r: r.patch_percent[0])
    x = [r.patch_percent[0] for r in ordered]
    fig = _figure((7, 4.5))
    ax = fig.subplots()
    ax.plot(x, [100 * r.certified_accuracy for r in ordered], "o-", color="#2e7d32", linewidth=2, label="certified accuracy")
    ax.plot(x, [100 * r.clean_accuracy for r in ordered], "s--", color="#4c72b0", label="clean accuracy (defended)")
    ax.plot(x, [100 * r.vanilla_accuracy for r in ordered], ":", color="#9e9e9e", label="vanilla clean accuracy (undefended)")
    for r, xv in zip(ordered, x):
        ph, pw = r.mask_set.patch_sizes[0]
        ax.annotate(f"{100 * r.certified_accuracy:.1f}%\n{ph}x{pw} px, K={r.num_masks}", (xv, 100 * r.certified_accuracy), textcoords="offset points", xytext=(0, -26), ha="center", fontsize=8)
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


def plot_views(
    one_mask: torch.Tensor,
    grid: torch.Tensor,
    label: int,
    mask_set: MaskSet,
    image: torch.Tensor | None = None,
    path: str | Path | None = None,
    class_names: Sequence[str] | None = None,
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

    Returns:
        The matplotlib `Figure`.

    Raises:
        ValueError: if the shapes do not match the mask set.
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
        axes[0].imshow(_display_image(image, mask_set.image_size), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
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


def _pct(value: float) -> str:
    return "-" if math.isnan(value) else f"{100 * value:.2f}%"


def _table(rows: Sequence[tuple[str, str]], title: str) -> str:
    width = max(len(name) for name, _ in rows)
    body = [f"  {name.ljust(width)}  {value}" if name else "" for name, value in rows]
    rule_ = "-" * max(len(line) for line in [title, *body])
    return "\n".join([title, rule_, *body])
