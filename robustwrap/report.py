"""`CertificationReport`: what `certify_dataset` found, as records, a table and JSON.

Everything here reads results; nothing runs a model and nothing draws (the pictures are in
`robustwrap.plots`). A report works for every defense: each `ImageRecord` has the fields all
defenses share and the defense's own per-image fields in `extras` (PatchCleanser: `case`,
`one_mask`; (De)Randomized Smoothing: `counts`, `delta`; PatchGuard: `margin`), and the report
carries the defended model's `settings()` as they were when it was certified.
"""

from __future__ import annotations

import json
import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .defenses import patchcleanser as rule
from .geometry import MaskSet

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["CertificationReport", "ImageRecord", "sweep_table"]

REPORT_FORMAT = "robustwrap.CertificationReport"
REPORT_VERSION = 2
CASE_NAMES = {rule.CASE_UNANIMOUS: "I", rule.CASE_DISAGREER: "II", rule.CASE_MAJORITY: "III"}

# The JSON keys of the fields every record has; any other key of a record is a defense's own field.
_COMMON = ("index", "label", "prediction", "certified", "vanilla_prediction", "num_views", "image_hash", "seconds")


@dataclass(frozen=True)
class ImageRecord:
    """The outcome for one image of a data set, for any defense.

    The defense's own per-image fields are in `extras` and can also be read as attributes
    (`record.case`, `record.one_mask` for PatchCleanser; `record.counts` for smoothing).

    Attributes:
        index: position of the image in the data set.
        label: the true label.
        prediction: the defended model's prediction.
        certified: no patch of the threat model can change the prediction, and it equals `label`.
        vanilla_prediction: the undefended base model's prediction on the unmasked image.
        num_views: masked (or ablated) views run through the model for this image.
        image_hash: content hash of the image tensor as certified (see
            `robustwrap.dataset.image_hash`); a resumed run checks it against the data set.
            Empty when unknown.
        extras: the defense's own per-image fields, JSON values (lists are kept as tuples):
            PatchCleanser `case` (1, 2 or 3) and `one_mask` (the `K` one-mask labels).
        seconds: this image's share of the time of the step that certified it; not compared,
            so that reports of the same results are equal however they were timed.
    """

    index: int
    label: int
    prediction: int
    certified: bool
    vanilla_prediction: int
    num_views: int
    image_hash: str = ""
    extras: dict[str, Any] = field(default_factory=dict, hash=False)
    seconds: float = field(default=0.0, compare=False)

    def __post_init__(self) -> None:
        for name in ("index", "label", "prediction", "vanilla_prediction", "num_views"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise TypeError(f"{name} must be an int, got {value!r:.80}")
            object.__setattr__(self, name, int(value))
        if not isinstance(self.certified, (bool, np.bool_)):
            raise TypeError(f"certified must be a bool, got {self.certified!r:.80}")
        object.__setattr__(self, "certified", bool(self.certified))
        if not isinstance(self.image_hash, str):
            raise TypeError(f"image_hash must be a string, got {self.image_hash!r:.80}")
        if not isinstance(self.extras, Mapping):
            raise TypeError(f"extras must be a dict of the defense's per-image fields, got {type(self.extras).__name__}")
        extras = {}
        for name, value in self.extras.items():
            if not isinstance(name, str) or not name.isidentifier() or name.startswith("_") or name in _COMMON or name == "extras":
                raise ValueError(f"extras names must be identifiers other than the common fields {_COMMON}, got {name!r}")
            extras[name] = _freeze(value, name)
        object.__setattr__(self, "extras", extras)

    def __getattr__(self, name: str) -> Any:
        # Only called when ordinary lookup fails: the defense's own fields read as attributes.
        extras = self.__dict__.get("extras")
        if not name.startswith("_") and extras is not None and name in extras:
            return extras[name]
        known = f" (this record's defense fields: {', '.join(sorted(extras))})" if extras else ""
        raise AttributeError(f"{type(self).__name__} has no attribute {name!r}{known}")

    @property
    def correct(self) -> bool:
        """The defended prediction equals the label."""
        return self.prediction == self.label

    @property
    def vanilla_correct(self) -> bool:
        """The undefended base model's prediction equals the label."""
        return self.vanilla_prediction == self.label

    def to_dict(self) -> dict:
        """The record as a JSON-ready dict: the common fields with the defense's fields beside them."""
        record = {
            "index": self.index,
            "label": self.label,
            "prediction": self.prediction,
            "certified": self.certified,
            "vanilla_prediction": self.vanilla_prediction,
            "num_views": self.num_views,
        }
        record.update({name: _thaw(value) for name, value in self.extras.items()})
        record["image_hash"] = self.image_hash
        record["seconds"] = self.seconds
        return record

    @classmethod
    def from_dict(cls, record: dict) -> ImageRecord:
        """The record back from `to_dict` (every key that is not a common field is a defense field).

        Raises:
            ValueError: if a field is missing or has the wrong type, so that a damaged results
                file is reported instead of counted.
        """
        try:
            if not isinstance(record, dict):
                raise TypeError(f"expected a JSON object, got {type(record).__name__}")
            image_hash = record.get("image_hash", "")
            if not isinstance(image_hash, str):
                raise TypeError(f"image_hash must be a string, got {image_hash!r}")
            seconds = record.get("seconds", 0.0)
            if isinstance(seconds, bool) or not isinstance(seconds, numbers.Real):
                raise TypeError(f"seconds must be a number, got {seconds!r}")
            return cls(
                index=_int(record["index"], "index"),
                label=_int(record["label"], "label"),
                prediction=_int(record["prediction"], "prediction"),
                certified=_bool(record["certified"], "certified"),
                vanilla_prediction=_int(record["vanilla_prediction"], "vanilla_prediction"),
                num_views=_int(record["num_views"], "num_views"),
                image_hash=image_hash,
                extras={k: v for k, v in record.items() if k not in _COMMON},
                seconds=float(seconds),
            )
        except KeyError as error:
            raise ValueError(f"not an image record{_which(record)}: it has no {error.args[0]!r} field") from None
        except (TypeError, ValueError) as error:
            raise ValueError(f"not an image record{_which(record)}: {error}") from None


def _which(record) -> str:
    """`" (index 3)"` for a record that got as far as its index, so that the damaged one can be found."""
    index = record.get("index") if isinstance(record, dict) else None
    return f" (index {index})" if isinstance(index, int) and not isinstance(index, bool) else ""


def _int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {value!r:.80}")
    return value


def _bool(value, name: str) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be true or false, got {value!r:.80}")
    return value


def _freeze(value, name: str):
    """A JSON value with lists as tuples (records stay immutable and compare after a JSON round trip)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if hasattr(value, "tolist") and not isinstance(value, (list, tuple)):  # a tensor or numpy value
        return _freeze(value.tolist(), name)
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v, name) for v in value)
    raise TypeError(f"extras[{name!r}] must be a JSON value (number, bool, string, list), got {type(value).__name__}")


def _thaw(value):
    return [_thaw(v) for v in value] if isinstance(value, tuple) else value


@dataclass(frozen=True)
class CertificationReport:
    """Clean and certified accuracy of a defended model on a data set, with per-image records.

    Every count is derived from `records`, so a report cannot disagree with itself. Two reports
    compare equal when they hold the same results for the same model and settings; timings are
    not compared (a resumed or many-process run equals a straight one).

    Attributes:
        model: what was certified (a zoo name, a path, an architecture).
        data: what it was certified on.
        defense: the defense's name (`"patchcleanser"`, `"smoothing"`, `"patchguard"`).
        settings: the defended model's `settings()` when it was certified: everything that
            defines the defended function (threat model, fill, precision, margin and the
            defense's own settings). Stored as its JSON form (tuples become lists).
        num_classes: classes of the model.
        records: one `ImageRecord` per image, by index.
        fingerprint: hash of the base model's weights and `settings` (see
            `robustwrap.dataset.model_fingerprint`).
        full_views: views of a full evaluation of one image (no early exit), when the defense
            states it; for PatchCleanser `K(K+1)/2`, derived from the mask set when not given.
    """

    model: str
    data: str
    defense: str
    settings: dict[str, Any] = field(hash=False)
    num_classes: int
    records: tuple[ImageRecord, ...]
    fingerprint: str = ""
    full_views: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.settings, Mapping):
            raise TypeError(f"settings must be the model's settings() dict, got {type(self.settings).__name__}")
        try:
            settings = json.loads(json.dumps(dict(self.settings)))  # the JSON form: what a saved report reads back
        except (TypeError, ValueError) as error:
            raise TypeError(f"settings must be JSON-able (the model's settings()), got {error}") from None
        object.__setattr__(self, "settings", settings)
        object.__setattr__(self, "records", tuple(self.records))
        if self.full_views is None and self.mask_set is not None:
            k = len(self.mask_set)
            object.__setattr__(self, "full_views", k * (k + 1) // 2)

    # -------------------------------------------------------------------------------- settings
    @cached_property
    def mask_set(self) -> MaskSet | None:
        """PatchCleanser's mask set (the threat model), from `settings`; `None` for other defenses."""
        spec = self.settings.get("mask_set")
        return MaskSet.from_dict(spec) if spec is not None else None

    @property
    def fill(self) -> float | tuple[float, ...] | None:
        """The masked (ablated) pixel value in the model's input space."""
        fill = self.settings.get("fill")
        return tuple(fill) if isinstance(fill, list) else fill

    @property
    def precision(self) -> str | None:
        """The numeric precision the model was certified at (`"float32"`, `"bfloat16"`, `"float16"`)."""
        return self.settings.get("precision")

    @property
    def margin(self) -> float | None:
        """The model's margin guard when it was certified (the Concepts page, docs/concepts.md#margin)."""
        return self.settings.get("margin")

    @property
    def image_size(self) -> tuple[int, int]:
        """`(H, W)` of the defended model's inputs, the pixels of its threat model (its `input_size`)."""
        if self.mask_set is not None:
            return self.mask_set.image_size
        h, w = self.settings.get("input_size", self.settings["image_size"])
        return int(h), int(w)

    @property
    def patch_sizes(self) -> tuple[tuple[int, int], ...]:
        """The patch shape(s) `(ph, pw)` in pixels of the threat model."""
        if self.mask_set is not None:
            return tuple(self.mask_set.patch_sizes)
        ph, pw = self.settings["patch"]
        return ((int(ph), int(pw)),)

    @property
    def patch_percent(self) -> tuple[float, ...]:
        """Each patch of the threat model as a percentage of the image area."""
        h, w = self.image_size
        return tuple(100 * ph * pw / (h * w) for ph, pw in self.patch_sizes)

    def threat_model(self) -> str:
        """The threat model in words, with the patch in pixels and as a share of the image area."""
        h, w = self.image_size
        resized = ""
        if "input_size" in self.settings:  # a model that resizes its inputs: the threat model is in input pixels
            mh, mw = self.settings["image_size"]
            resized = f", {h}x{w} inputs resized ({self.settings.get('resize')}) to {mh}x{mw}"
        if self.mask_set is not None:
            return self.mask_set.describe() + resized
        return "; ".join(f"patch {ph}x{pw} px ({p:.2f}% of {h}x{w})" for (ph, pw), p in zip(self.patch_sizes, self.patch_percent)) + resized

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
        """PatchCleanser: images decided by Case I, II and III (keys 1, 2, 3); `{}` for other defenses."""
        if not any("case" in r.extras for r in self.records) and self.defense != "patchcleanser":
            return {}
        counts = dict.fromkeys(CASE_NAMES, 0)
        for r in self.records:
            counts[r.extras["case"]] += 1
        return counts

    @property
    def num_masks(self) -> int | None:
        """PatchCleanser: `K`, the masks of the mask set; `None` for other defenses."""
        return len(self.mask_set) if self.mask_set is not None else None

    @property
    def total_views(self) -> int:
        """Masked (or ablated) views run through the model for all images."""
        return sum(r.num_views for r in self.records)

    @property
    def views_per_image(self) -> float:
        """Mean views per image (compare with `full_views`)."""
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
    def guarantee(self) -> str:
        """What was certified: `"prediction"`, `"detection"` or `"top<k>"` (`certify_dataset(guarantee=...)`)."""
        return str(self.settings.get("guarantee", "prediction"))

    @property
    def alerts(self) -> int:
        """Detection: clean images on which the model raised an alert (every one is a false alert)."""
        return sum(bool(r.extras.get("alert", False)) for r in self.records)

    @property
    def false_alert_rate(self) -> float:
        """Detection: the share of clean images with an alert, in [0, 1]."""
        return self._fraction(self.alerts)

    @property
    def clean_correct_without_alert(self) -> int:
        """Detection: clean images whose output is the label with no alert."""
        return sum(r.correct and not r.extras.get("alert", False) for r in self.records)

    @property
    def clean_accuracy_without_alert(self) -> float:
        """Detection: clean accuracy counting an alert as not correct, in [0, 1]."""
        return self._fraction(self.clean_correct_without_alert)

    def _fraction(self, count: int) -> float:
        return count / self.num_images if self.records else math.nan

    def _extras_means(self) -> dict[str, float]:
        """The mean of each numeric scalar defense field (e.g. smoothing's `delta`, PatchGuard's `margin`)."""
        means = {}
        names = dict.fromkeys(name for r in self.records for name in r.extras)
        for name in names:
            values = [r.extras.get(name) for r in self.records]
            if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
                means[name] = sum(values) / len(values)
        return means

    # ------------------------------------------------------------------------------------ text
    def summary(self) -> str:
        """A readable table of the report (what `robustwrap certify` prints)."""
        n = self.num_images
        rows = [
            ("model", self.model),
            ("data", f"{self.data} ({n} images, {self.num_classes} classes)"),
            ("defense", self.defense),
            ("threat model", self.threat_model()),
            ("settings", _settings_line(self.settings)),
            ("", ""),
            ("vanilla clean accuracy", f"{_pct(self.vanilla_accuracy)}  ({self.vanilla_correct}/{n})  undefended base model"),
            ("clean accuracy", f"{_pct(self.clean_accuracy)}  ({self.clean_correct}/{n})  " + ("label, alerts aside" if self.guarantee == "detection" else "defended")),
            (_CERTIFIED_NAMES.get(self.guarantee, f"certified {self.guarantee} accuracy"), f"{_pct(self.certified_accuracy)}  ({self.certified}/{n})"),
        ]
        if self.guarantee == "detection":
            without = f"{_pct(self.clean_accuracy_without_alert)}  ({self.clean_correct_without_alert}/{n})"
            rows += [("clean accuracy without alert", without), ("false alerts", f"{_pct(self.false_alert_rate)}  ({self.alerts}/{n})")]
        if self.defense == "patchcleanser" and self.guarantee == "prediction":  # detection has no double-masking cases
            cases = self.case_counts
            rows.append(("cases I / II / III", " / ".join(str(cases[c]) for c in CASE_NAMES)))
        else:
            rows += [(f"{name} (mean)", f"{value:.3g}") for name, value in self._extras_means().items()]
        predicted = {r.prediction for r in self.records}
        if n > 1 and len(predicted) == 1:
            share = sum(r.label in predicted for r in self.records)
            warning = (
                f"the model predicts one class ({predicted.pop()}) for every image: clean accuracy = class share ({_pct(share / n)}), "
                "which bounds the certified accuracy; the model has not learnt the task"
            )
            rows.append(("warning", warning))
        views = _number(self.views_per_image, ".1f")
        if self.full_views:
            formula = f"K(K+1)/2, K={self.num_masks}" if self.defense == "patchcleanser" and self.num_masks else "full evaluation"
            if self.guarantee == "detection":
                formula = "the one-mask views and the unmasked image"
            views += f" of {self.full_views} ({formula}): {_pct(self.views_per_image / self.full_views)}"
        if self.defense == "patchcure":
            # PatchCURE's views are feature views (the LRF, or sums of local logits) after one SRF pass per image
            rows += [("feature views per image", f"{views}; plus one SRF pass per image")]
        else:
            rows.append(("views per image", views))
        rows.append(("speed", f"{_speed(self.images_per_second)} per process"))
        return _table(rows, title="robustwrap certification report")

    def metrics(self, split: str | None = None, command: str | None = None) -> dict[str, Any]:
        """The measured accuracies as a saved model carries them: `model.pretrained_info["metrics"]`.

        They keep the report's `fingerprint`: `save_pretrained` and `push_to_hub` write them into
        `config.json` and the model card only while the model still has the weights and settings
        they were measured on, so a card never claims what other weights scored.

        Args:
            split: the data set's split (`"val"`, `"test"`), named in the card's metadata.
            command: how to measure them again (e.g. a `robustwrap certify` command line).

        Returns:
            `vanilla_accuracy`, `clean_accuracy`, `certified_accuracy` (rounded to 4 digits),
            `num_images`, `fingerprint`, and `split` and `command` when given.
        """
        metrics: dict[str, Any] = {
            "vanilla_accuracy": round(self.vanilla_accuracy, 4),
            "clean_accuracy": round(self.clean_accuracy, 4),
            "certified_accuracy": round(self.certified_accuracy, 4),
            "num_images": self.num_images,
        }
        if split is not None:
            metrics["split"] = split
        if command is not None:
            metrics["command"] = command
        metrics["fingerprint"] = self.fingerprint
        return metrics

    # ------------------------------------------------------------------------------------ JSON
    def to_document(self) -> dict:
        """The report as a JSON-ready dict (what `to_json` writes)."""
        summary = {
            "num_images": self.num_images,
            "vanilla_accuracy": self.vanilla_accuracy,
            "clean_accuracy": self.clean_accuracy,
            "certified_accuracy": self.certified_accuracy,
            "patch_pixels": [list(p) for p in self.patch_sizes],
            "patch_percent": list(self.patch_percent),
            "views_per_image": self.views_per_image,
            "full_views": self.full_views,
            "seconds": self.seconds,
            "images_per_second": self.images_per_second,
            "guarantee": self.guarantee,
        }
        if self.guarantee == "detection":
            summary.update(clean_accuracy_without_alert=self.clean_accuracy_without_alert, false_alert_rate=self.false_alert_rate)
        if self.defense == "patchcleanser" and self.guarantee == "prediction":
            summary["cases"] = {CASE_NAMES[c]: v for c, v in self.case_counts.items()}
            summary["num_masks"] = self.num_masks
        else:
            summary.update({f"mean_{name}": value for name, value in self._extras_means().items()})
        return {
            "format": REPORT_FORMAT,
            "version": REPORT_VERSION,
            "model": self.model,
            "data": self.data,
            "defense": self.defense,
            "settings": self.settings,
            "num_classes": self.num_classes,
            "full_views": self.full_views,
            "fingerprint": self.fingerprint,
            "summary": {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in summary.items()},
            "records": [r.to_dict() for r in self.records],
        }

    def to_json(self, indent: int | None = None) -> str:
        """The report as JSON: settings, a summary block of the counts, and every record.

        `CertificationReport.from_json(report.to_json()) == report`.
        """
        return json.dumps(self.to_document(), indent=indent)

    @classmethod
    def from_document(cls, document: Any) -> CertificationReport:
        """A report from `to_document`'s dict (the `summary` block is recomputed, not read).

        Raises:
            ValueError: if `document` is not a robustwrap report, so that another JSON file is
                not mistaken for one.
        """
        if not isinstance(document, dict) or document.get("format") != REPORT_FORMAT:
            raise ValueError(f"not a robustwrap report: expected a JSON object with format {REPORT_FORMAT!r}")
        if document.get("version") != REPORT_VERSION:
            raise ValueError(
                f"report format version {document.get('version')!r} is not supported (expected {REPORT_VERSION}); "
                "certify again with this robustwrap version to get a report it can read"
            )
        try:
            full_views = document.get("full_views")
            if full_views is not None:
                full_views = _int(full_views, "full_views")
            return cls(
                model=_str(document["model"], "model"),
                data=_str(document["data"], "data"),
                defense=_str(document["defense"], "defense"),
                settings=_dict(document["settings"], "settings"),
                num_classes=_int(document["num_classes"], "num_classes"),
                records=tuple(ImageRecord.from_dict(r) for r in _list(document["records"], "records")),
                fingerprint=_str(document.get("fingerprint", ""), "fingerprint"),
                full_views=full_views,
            )
        except (KeyError, TypeError) as error:
            raise ValueError(
                f"not a robustwrap report: a field is missing or has the wrong type ({type(error).__name__}: {error})"
            ) from None

    @classmethod
    def from_json(cls, text: str) -> CertificationReport:
        """A report from `to_json`'s output (the `summary` block is recomputed, not read).

        Raises:
            ValueError: if `text` is not a robustwrap report, so that another JSON file is not
                mistaken for one.
        """
        document = _parse_json(text)
        if isinstance(document, list) and document and all(isinstance(d, dict) and d.get("format") == REPORT_FORMAT for d in document):
            raise ValueError(f"this JSON holds a list of {len(document)} reports (a sweep): read it with CertificationReport.load_many")
        return cls.from_document(document)

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
            ValueError: if it is not a robustwrap report, or holds several (a sweep written by
                `save_many`: read it with `load_many`).
        """
        try:
            return cls.from_json(Path(path).read_text())
        except ValueError as error:
            raise ValueError(f"{path}: {error}") from None

    @staticmethod
    def save_many(path: str | Path, reports: Sequence[CertificationReport]) -> Path:
        """Write several reports (e.g. one per patch size of a sweep) to one JSON file, as a list.

        ```python
        CertificationReport.save_many("sweep.json", reports)
        assert CertificationReport.load_many("sweep.json") == reports
        ```

        Args:
            path: the file to write.
            reports: the reports, in the order `load_many` returns them.

        Returns:
            The path.

        Raises:
            TypeError: if `reports` is not a non-empty sequence of `CertificationReport`s.
        """
        if isinstance(reports, CertificationReport) or not isinstance(reports, Sequence) or not reports:
            raise TypeError(f"reports must be a non-empty list of CertificationReport, got {type(reports).__name__}")
        for i, report in enumerate(reports):
            if not isinstance(report, CertificationReport):
                raise TypeError(f"reports[{i}] must be a CertificationReport, got {type(report).__name__}")
        path = Path(path)
        path.write_text(json.dumps([r.to_document() for r in reports], indent=1) + "\n")
        return path

    @classmethod
    def load_many(cls, path: str | Path) -> list[CertificationReport]:
        """Read every report of a file: a list written by `save_many`, or one report written by `save`.

        So `load_many` reads any report file `robustwrap certify --report` writes.

        Returns:
            The reports, in file order (a single report comes back as a list of one).

        Raises:
            OSError: if the file cannot be read.
            ValueError: if it holds something else than robustwrap reports.
        """
        document = _parse_json(Path(path).read_text(), path)
        documents = document if isinstance(document, list) else [document]
        if not documents:
            raise ValueError(f"{path}: not a robustwrap report: an empty list")
        reports = []
        for i, item in enumerate(documents):
            try:
                reports.append(cls.from_document(item))
            except ValueError as error:
                where = f"{path} (report {i})" if isinstance(document, list) else str(path)
                raise ValueError(f"{where}: {error}") from None
        return reports

    # -------------------------------------------------------------------------------- pictures
    def plot(self, path: str | Path | None = None) -> Figure:
        """Accuracy bars, the defense's breakdown and the views per image: `robustwrap.plots.plot_report`.

        Args:
            path: where to save the PNG (or any format matplotlib knows by the suffix).

        Returns:
            The matplotlib `Figure`.

        Raises:
            ImportError: if matplotlib is not installed (`pip install matplotlib`).
        """
        from .plots import plot_report

        return plot_report(self, path)


# -------------------------------------------------------------------------------------- sweeps
def sweep_table(reports: Sequence[CertificationReport]) -> str:
    """One row per report of a patch-size sweep: patch, defense, clean and certified accuracy, views."""
    header = ("patch", "% of area", "defense", "vanilla", "clean", "certified", "views/image")
    rows = [header]
    for r in reports:
        defense = f"{r.defense} K={r.num_masks}" if r.num_masks is not None else r.defense
        views = f"{r.views_per_image:.1f}" + (f"/{r.full_views}" if r.full_views else "")
        rows.append(
            (
                ", ".join(f"{ph}x{pw} px" for ph, pw in r.patch_sizes),
                ", ".join(f"{p:.2f}%" for p in r.patch_percent),
                defense,
                _pct(r.vanilla_accuracy),
                _pct(r.clean_accuracy),
                _pct(r.certified_accuracy),
                views,
            )
        )
    widths = [max(len(row[c]) for row in rows) for c in range(len(header))]
    lines = ["  ".join(cell.rjust(w) for cell, w in zip(row, widths)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


# ------------------------------------------------------------------------------------- plumbing
def _parse_json(text: str, path: str | Path | None = None):
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        where = f"{path}: " if path is not None else ""
        raise ValueError(f"{where}not a robustwrap report: invalid JSON ({error})") from None


def _str(value, name: str) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a string, got {value!r:.80}")
    return value


def _dict(value, name: str) -> dict:
    if not isinstance(value, dict):
        raise TypeError(f"{name} must be a JSON object, got {value!r:.80}")
    return value


def _list(value, name: str) -> list:
    if not isinstance(value, list):
        raise TypeError(f"{name} must be a JSON list, got {value!r:.80}")
    return value


# How the summary names the certified share for each guarantee (a top-k guarantee: "certified top5 accuracy").
_CERTIFIED_NAMES = {"prediction": "certified accuracy", "detection": "certified detection accuracy"}


def _settings_line(settings: Mapping[str, Any]) -> str:
    """The scalar settings that the threat model line does not show, e.g. `fill 0.0, precision float32, margin 0.0`."""
    shown = ("defense", "image_size", "input_size", "resize", "mask_set", "patch")
    if settings.get("guarantee") != "detection":
        shown += ("tau",)  # the detection threshold does not act on other certificates
    # PatchCURE's window and split are None for a model that is not a ViT split: nothing to say
    unset = ("window", "split") if settings.get("defense") == "patchcure" else ()
    parts = [f"{k} {v}" for k, v in settings.items() if k not in shown and not isinstance(v, dict) and not (k in unset and v is None)]
    return ", ".join(parts) if parts else "-"


def _pct(value: float) -> str:
    return "-" if math.isnan(value) else f"{100 * value:.2f}%"


def _number(value: float, spec: str) -> str:
    """`value` formatted, or "-" where there is none (a report without images), as `_pct` writes it."""
    return "-" if math.isnan(value) else format(value, spec)


def _speed(images_per_second: float) -> str:
    """Images per second, or seconds per image below one image a second (a large model on a CPU),
    where one decimal of images/s would print 0.0."""
    if math.isnan(images_per_second) or images_per_second >= 1:
        return f"{_number(images_per_second, '.1f')} images/s"
    seconds = 1 / images_per_second
    return f"{seconds:.3g} s/image" if seconds < 100 else f"{seconds:.0f} s/image"


def _table(rows: Sequence[tuple[str, str]], title: str) -> str:
    width = max(len(name) for name, _ in rows)
    body = [f"  {name.ljust(width)}  {value}" if name else "" for name, value in rows]
    rule_ = "-" * max(len(line) for line in [title, *body])
    return "\n".join([title, rule_, *body])
