"""`robustwrap certify`: certify a data set (a patch sweep, results files, reports, pictures)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from ._loading import _check_tau, _describe, _label_names, _load_data, _load_model, _set_tau, _with_settings
from ._options import _limit, _model_options, _positive, _tau_option

if TYPE_CHECKING:  # imported lazily at run time: `robustwrap --help` must not pay for torch
    from ..defenses import RobustPatchClassifier
    from ..report import CertificationReport

# `robustwrap certify` with no --data and no --limit certifies this many of the zoo model's own
# images. Measured on a 2-core CPU (benchmarks/speed.md): the embedded MNIST model needs about
# 0.12 s of CPU per digit on one thread (a certified digit takes all 666 views), so 100 digits and
# the start take about 20 s; all 1,000 take 81 s wall and 140 s of CPU on two threads (the quiet 2-core machine).
DEFAULT_LIMIT = 100


def register(commands, common: argparse.ArgumentParser) -> None:
    """`robustwrap certify`: its subparser."""
    certify = commands.add_parser(
        "certify",
        parents=[common],
        help="certify a data set: clean, certified and vanilla accuracy",
        description=(
            "Certify a model on a data set. With no arguments: the embedded default model on the first "
            f"{DEFAULT_LIMIT} of its 1,000 shipped held-out digits (about 20 seconds on a 2-core CPU; "
            "--limit all certifies all of them in 81 s wall, 140 s of CPU, and reproduces the zoo's figures)."
        ),
        epilog=(
            "Two batch sizes: --images-per-step is how many images one certify call takes (a results file "
            "is written and resumed per step); --views-per-pass is how many masked views of them go through "
            "the model in one forward pass (the speed/memory knob: lower it when memory runs out, raise it "
            "on a GPU). Preprocessing (resize, crop, mean, std) always comes from the model's own data "
            "config (timm's resolve_data_config)."
        ),
    )
    _model_options(certify, sweep=True)
    certify.add_argument("--data", help="an image folder laid out like torchvision's ImageFolder, or a built-in data set name (default: the zoo model's own)")
    certify.add_argument(
        "--class-map",
        metavar="MAP",
        help="class ids of the --data folders: name=id,name=id or a JSON file ({'name': id} or a list of class names). "
        "By default folders are matched to the model's label names when it has them, integer folder names are "
        "taken as ids, and a full set of folders is numbered in sorted order; a subset that matches nothing is refused",
    )
    certify.add_argument(
        "--limit",
        type=_limit,
        metavar="N|all",
        help=f"certify only the first N images, or 'all' (default: all; without --data, the first {DEFAULT_LIMIT} "
        "images of the zoo model's own data set, so that the default run takes about 20 seconds on a 2-core CPU)",
    )
    certify.add_argument("--images-per-step", type=_positive, metavar="N", help="images per certify step (default 32); see below")
    certify.add_argument("--batch-size", type=_positive, metavar="N", help=argparse.SUPPRESS)  # deprecated: --images-per-step
    certify.add_argument("--amp", action="store_true", help=argparse.SUPPRESS)  # removed: --precision
    certify.add_argument("--results", type=Path, help="JSON-lines file of per-image results, written as they come (resumable)")
    certify.add_argument("--resume", action="store_true", help="continue an interrupted run from --results")
    certify.add_argument("--report", type=Path, help="write the report as JSON (a list of reports for a patch sweep); robustwrap.CertificationReport.load_many reads both")
    certify.add_argument("--plot", type=Path, metavar="DIR", help="write pictures (report, mask set, one image's views, sweep) to DIR")
    certify.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    guarantee = certify.add_mutually_exclusive_group()
    guarantee.add_argument(
        "--detect",
        action="store_true",
        help="certify detection instead of the prediction: under any patch the output is the label or an alert "
        "(PatchCleanser, PatchGuard); the report adds clean accuracy without alert and the false-alert rate",
    )
    guarantee.add_argument("--top-k", type=_positive, metavar="K", help="certify that no patch pushes the label out of the K best classes (PatchGuard, smoothing)")
    _tau_option(certify)
    certify.set_defaults(run=_certify)


def _certify(args: argparse.Namespace) -> None:
    import dataclasses
    import warnings

    from ..dataset import ResultsFileError, certify_dataset
    from ..report import CertificationReport

    images_per_step = _images_per_step(args)
    if args.amp:
        raise ValueError("--amp was removed: precision is a setting of the defended model; pass --precision bfloat16 (CPU) or --precision float16 (CUDA)")
    if args.resume and args.results is None:
        raise ValueError("--resume continues a --results file; pass --results FILE too")
    _check_tau(args)
    model, model_name = _load_model(args)
    models = [_with_settings(model, patch, args) for patch in (args.patch or [None])]
    _set_tau(args, models)
    guarantee = "detection" if args.detect else f"top{args.top_k}" if args.top_k else "prediction"
    dataset, data_name = _load_data(args.data, args.class_map, model_name, models[0])
    limit: int | None = None if args.limit == "all" else args.limit
    subset = args.limit is None and args.data is None and len(dataset) > DEFAULT_LIMIT
    if subset:
        limit = DEFAULT_LIMIT
    sweep = len(models) > 1
    tags = [_tag(defended) if sweep else "" for defended in models]
    for tag in tags if args.results is not None and not args.resume else []:
        if _results_exist(_suffixed(args.results, tag)):
            raise ValueError(f"--results {_suffixed(args.results, tag)} already exists: pass --resume to continue it, or remove it")

    reports = []
    for defended, tag in zip(models, tags):
        results = _suffixed(args.results, tag) if args.results is not None else None
        if sweep:
            print(f"== {_describe(defended)}", file=sys.stderr)
        try:
            with warnings.catch_warnings():  # a torn last line of --results is a warning in the CLI's words, not Python's
                warnings.showwarning = lambda message, *_, **__: print(f"robustwrap certify: warning: {message}", file=sys.stderr)
                report = certify_dataset(
                    defended,
                    dataset,
                    batch_size=images_per_step,
                    limit=limit,
                    results_path=results,
                    resume=args.resume,
                    progress=args.progress,
                    guarantee=guarantee,
                )
        except ResultsFileError as error:
            raise ValueError(error.message("--results", "remove the file or choose another --results")) from error
        report = dataclasses.replace(report, model=model_name, data=data_name)
        reports.append(report)
        print(report.summary())
        print()
        if args.plot is not None:
            _plot_one(args.plot, tag, report, defended, dataset)
    if sweep:
        from ..report import sweep_table

        print(sweep_table(reports))
        if args.plot is not None:
            from ..plots import plot_sweep

            plot_sweep(reports, args.plot / "sweep.png")
    if args.report is not None:
        args.report.parent.mkdir(parents=True, exist_ok=True)
        if sweep:
            CertificationReport.save_many(args.report, reports)
        else:
            reports[0].save(args.report)
    _closing_notes(args, dataset, limit, subset, sweep)


def _images_per_step(args: argparse.Namespace) -> int | None:
    if args.batch_size is None:
        return args.images_per_step
    if args.images_per_step is not None:
        raise ValueError("--batch-size is the old name of --images-per-step: pass only --images-per-step")
    print(
        "robustwrap certify: warning: --batch-size is deprecated and means images per certify step: write "
        "--images-per-step (views per forward pass are --views-per-pass)",
        file=sys.stderr,
    )
    return args.batch_size


def _plot_one(folder: Path, tag: str, report: CertificationReport, defended: RobustPatchClassifier, dataset) -> None:
    from ..plots import plot_feature_mask_set, plot_mask_set, plot_views

    folder.mkdir(parents=True, exist_ok=True)
    report.plot(folder / f"report{tag}.png")
    mask_set = getattr(defended, "mask_set", None) or getattr(defended, "feature_mask_set", None)
    if mask_set is None:  # a defense without masks has no mask-set or views picture
        return
    from ..dataset import view_grid

    index = _interesting_image(report)
    image, label = dataset[index]
    if defended.defense == "patchcure":  # masks of cells, drawn by the pixels they see
        srf = defended.srf
        geometry = (srf.receptive_field, srf.feature_stride, srf.feature_offset)
        plot_feature_mask_set(mask_set, defended.image_size, defended.patch, *geometry, image=image, path=folder / f"masks{tag}.png")
    else:
        plot_mask_set(mask_set, image, folder / f"masks{tag}.png")
    one_mask, grid = view_grid(defended, image)
    path = folder / f"views{tag}.png"
    plot_views(one_mask, grid, int(label), mask_set, image, path, class_names=_label_names(defended), image_size=defended.image_size)


def _closing_notes(args: argparse.Namespace, dataset, limit: int | None, subset: bool, sweep: bool) -> None:
    """Say what was certified and where the results are (or how to keep them)."""
    notes = []
    if subset:
        notes.append(f"certified the first {limit} of {len(dataset)} images (the quick default); --limit all certifies all of them")
    if args.report is not None:
        notes.append(f"report: {args.report}" + (" (a list of reports, one per patch size)" if sweep else ""))
    if args.results is not None:
        notes.append(f"per-image results: {args.results}" + (" (one file per patch size, suffixed _<patch>px)" if sweep else ""))
    if args.plot is not None:
        notes.append(f"pictures in {args.plot}/: " + ", ".join(sorted(p.name for p in args.plot.glob("*.png"))))
    if args.report is None and args.results is None:
        notes.append("nothing was saved: --report FILE.json keeps the report, --results FILE.jsonl the per-image results (resumable with --resume)")
    print("\n".join(notes))


def _results_exist(path: Path) -> bool:
    return path.exists() or any(path.parent.glob(path.name + ".rank*"))


def _suffixed(path: Path, tag: str) -> Path:
    return path.with_name(f"{path.stem}{tag}{path.suffix}") if tag else path


def _tag(model: RobustPatchClassifier) -> str:
    ph, pw = model.patch
    return f"_{ph}px" if ph == pw else f"_{ph}x{pw}px"


def _interesting_image(report: CertificationReport) -> int:
    """The image to picture: the first correct but uncertified one, else the first wrong one, else the first."""
    for wanted in (lambda r: r.correct and not r.certified, lambda r: not r.correct):
        for record in report.records:
            if wanted(record):
                return record.index
    return report.records[0].index
