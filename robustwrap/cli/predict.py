"""`robustwrap predict`: the robust label of images, with the defense's evidence and certificate."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ._format import _columns
from ._loading import _check_tau, _describe, _label_names, _load_model, _preprocessing, _read_image, _set_tau, _with_settings
from ._options import _model_options, _tau_option

if TYPE_CHECKING:  # imported lazily at run time: `robustwrap --help` must not pay for torch
    import torch

    from ..defenses import RobustPatchClassifier

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm")


def register(commands, common: argparse.ArgumentParser) -> None:
    """`robustwrap predict`: its subparser."""
    predict = commands.add_parser(
        "predict",
        parents=[common],
        help="robust label of images, with the double-masking case and certificate",
        description="The robust label of each image, its double-masking case, and whether any patch could change it.",
    )
    predict.add_argument("images", nargs="+", type=Path, metavar="IMAGE", help="image files, or folders (searched recursively for images)")
    _model_options(predict, sweep=False)
    predict.add_argument("--json", action="store_true", help="print one JSON document instead of a table")
    predict.add_argument(
        "--detect",
        action="store_true",
        help="certified detection (PatchCleanser, PatchGuard): the unmasked label or an ALERT, and whether any patch could make "
        "the output another label without an alert",
    )
    _tau_option(predict)
    predict.add_argument(
        "--plot",
        type=Path,
        metavar="FILE",
        help="with --detect and one image: draw its one-mask views (label, confidence, which ones alert) and the output to FILE (.png, .svg, ...)",
    )
    predict.set_defaults(run=_predict)


def _predict(args: argparse.Namespace) -> None:
    import torch

    _check_tau(args)
    if args.plot is not None and not args.detect:
        raise ValueError("--plot draws the one-mask views of --detect; pass --detect too")
    paths = _image_paths(args.images)
    if args.plot is not None and len(paths) != 1:
        raise ValueError(f"--plot draws one image's views; {len(paths)} images were given")
    model, _ = _load_model(args)
    model = _with_settings(model, (args.patch or [None])[0], args)
    if args.detect and model._no_detection is not None:
        raise ValueError(f"--detect: {type(model).__name__} cannot detect: {model._no_detection}")
    _set_tau(args, [model])
    transform, mode = _preprocessing(model)
    names = _label_names(model)
    records = []
    step = 32
    for start in range(0, len(paths), step):
        chunk = paths[start : start + step]
        x = torch.stack([transform(_read_image(path, mode)) for path in chunk])
        if args.detect:
            found = model.certify_detection(x, model.detect(x).prediction)  # against its own output: could a patch change it silently?
            prediction = found.prediction
            evidence = [{"alert": bool(a), "certified": bool(c)} for a, c in zip(found.alert.tolist(), found.certified.tolist())]
        else:
            prediction = model.predict(x)
            evidence = _evidence(model, x, prediction)
        if args.plot is not None:
            from ..plots import plot_detection

            plot_detection(model, x[0], path=args.plot, class_names=names)
        for path, label, fields in zip(chunk, prediction.tolist(), evidence):
            records.append({"image": str(path), "prediction": label, "label_name": names[label] if names and label < len(names) else None, **fields})
    if args.json:
        print(json.dumps({"model": args.model, "threat_model": _describe(model), "images": records}, indent=1))
        return
    columns = DETECT_COLUMNS if args.detect else PREDICT_COLUMNS.get(model.defense, ())
    rows = [("image", "prediction", *(header for header, _ in columns), "certified")]
    for r in records:
        shown = f"{r['prediction']} ({r['label_name']})" if r["label_name"] is not None else str(r["prediction"])
        rows.append((r["image"], shown, *(cell(r) for _, cell in columns), "yes" if r["certified"] else "no"))
    print(_describe(model))
    if args.detect:
        print(
            f"certified detection at tau {model.tau:g}: under any patch the output is this label or an ALERT "
            "(every one-mask view shows it with confidence above tau)"
        )
    elif model.defense == "smoothing":
        print(f"certified: the votes beat the runner-up's by more than 2Δ = {2 * model.delta} (by 2Δ when the runner-up is a larger class id)")
    elif model.defense == "patchguard":
        print(f"certified: the worst-case evidence margin over every patch position is above the margin setting {model.margin:g} (0 counts when margin is 0 and ties go to the label)")
    print(_columns(rows, align_left=True))
    if args.plot is not None:
        print(f"the one-mask views: {args.plot}")


def _evidence(model: RobustPatchClassifier, x: torch.Tensor, prediction: torch.Tensor) -> list[dict[str, Any]]:
    """Per image: whether it is certified against its own prediction (whether any patch could change
    it), with the evidence of the model's defense that decides it (`PREDICT_COLUMNS` shows it)."""
    from ..report import CASE_NAMES

    if model.defense == "smoothing":
        result = model.certify(x, prediction, early_exit=False)  # the votes of all V views, not the first ones
    else:
        result = model.certify(x, prediction)
    fields: list[dict[str, Any]] = []
    for i, label in enumerate(prediction.tolist()):
        record: dict[str, Any] = {"certified": bool(result.certified[i])}
        if model.defense == "patchcleanser":
            record["case"] = CASE_NAMES[int(result.case[i])]
            record["one_mask_agree"] = int((result.one_mask[i] == label).sum())
            record["num_masks"] = int(result.one_mask.shape[1])
        elif model.defense == "smoothing":
            votes = result.counts[i].tolist()
            runner_up = max((c for c in range(len(votes)) if c != label), key=lambda c: (votes[c], -c), default=None)
            record["votes"] = votes[label]
            record["runner_up"] = runner_up
            record["runner_up_votes"] = votes[runner_up] if runner_up is not None else 0
            record["num_views"] = int(result.num_views[i])
            record["delta"] = int(result.delta)
        elif model.defense == "patchguard":
            record["evidence_margin"] = float(result.margin[i])
        fields.append(record)
    return fields


def _one_mask_cell(record: dict[str, Any]) -> str:
    agree, masks = record["one_mask_agree"], record["num_masks"]
    return "all agree" if agree == masks else f"{agree}/{masks} agree"


# `robustwrap predict --detect`'s column: the deployable output is the label unless an alert is raised.
DETECT_COLUMNS: tuple[tuple[str, Any], ...] = (("output", lambda r: "ALERT" if r["alert"] else "label"),)

# `robustwrap predict`'s columns for each defense, between the prediction and "certified": (header, cell).
PREDICT_COLUMNS: dict[str, tuple[tuple[str, Any], ...]] = {
    "patchcleanser": (("case", lambda r: r["case"]), ("one-mask views", _one_mask_cell)),
    "smoothing": (
        ("votes", lambda r: f"{r['votes']} of {r['num_views']}"),
        ("runner-up", lambda r: "-" if r["runner_up"] is None else f"{r['runner_up_votes']} for {r['runner_up']}"),
    ),
    "patchguard": (("worst-case evidence margin", lambda r: f"{r['evidence_margin']:.4g}"),),
}


def _image_paths(given: Sequence[Path]) -> list[Path]:
    """The image files named on the command line, folders expanded (recursively, sorted)."""
    paths: list[Path] = []
    for path in given:
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise FileNotFoundError(f"{path} is a folder without images ({', '.join(IMAGE_SUFFIXES)})")
            paths.extend(found)
        else:
            paths.append(path)  # a missing or unreadable file is reported when it is read
    return paths
