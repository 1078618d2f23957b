"""The `robustwrap` command: certify a data set, show a mask set, predict images, list the zoo.

```
robustwrap certify                                  # the embedded default model on its held-out digits
robustwrap certify --model hf-hub:org/name --data val/ --patch 1%,2%,3% --plot out/
robustwrap masks --image-size 224 --patch 2% --num-masks 6 --plot masks.png
robustwrap predict digit.png --model mnist-...
robustwrap models
```

Every failure the user can cause (a missing folder, an unreadable image, an unknown model, a bad
patch string) ends with one line on stderr and a non-zero exit code, never a traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from .defenses.patchcleanser import RobustPatchClassifier, wrap
from .geometry import MaskSet
from .report import CASE_NAMES, CertificationReport

__all__ = ["main", "parse_patch"]

EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


def main(argv: Sequence[str] | None = None) -> int:
    """Run the `robustwrap` command.

    Args:
        argv: the arguments after the program name (default: `sys.argv[1:]`).

    Returns:
        The exit code: 0 on success, 1 for an error (printed as one line on stderr), 2 for bad
        usage, 130 when interrupted.
    """
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        args.run(args)
    except BrokenPipeError:
        # The reader of stdout went away (`robustwrap masks | head`): not an error of ours.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        hint = " (finished images are in --results; rerun with --resume)" if getattr(args, "results", None) else ""
        print(f"robustwrap {args.command}: interrupted{hint}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as error:  # noqa: BLE001 - the command's contract: one line, never a traceback
        print(f"robustwrap {args.command}: error: {_one_line(error)}", file=sys.stderr)
        return EXIT_ERROR
    return 0


# ------------------------------------------------------------------------------------- parser
def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="robustwrap", description="Certifiably patch-robust image classifiers (PatchCleanser double masking).")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    certify = commands.add_parser(
        "certify",
        help="certify a data set: clean, certified and vanilla accuracy",
        description="Certify a model on a data set. With no arguments: the embedded default model on its shipped held-out digits.",
    )
    _model_options(certify)
    certify.add_argument("--data", help="an image folder laid out like torchvision's ImageFolder, or a built-in data set name (default: the zoo model's own)")
    certify.add_argument("--batch-size", type=_positive, help="images per certification step (default 32)")
    certify.add_argument("--limit", type=_positive, help="certify only the first N images")
    certify.add_argument("--amp", action="store_true", help="run the model under autocast (mixed precision)")
    certify.add_argument("--results", type=Path, help="JSON-lines file of per-image results, written as they come")
    certify.add_argument("--resume", action="store_true", help="continue an interrupted run from --results")
    certify.add_argument("--report", type=Path, help="write the report as JSON (a list of reports for a patch sweep)")
    certify.add_argument("--plot", type=Path, metavar="DIR", help="write pictures (report, mask set, one image's views, sweep) to DIR")
    certify.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    certify.set_defaults(run=_certify)

    masks = commands.add_parser("masks", help="show a mask set's geometry as a table and a picture")
    masks.add_argument("--image-size", type=_image_size, default=(224, 224), help="H or HxW (default 224)")
    masks.add_argument("--patch", type=_single_patch, default=0.02, help="pixels (32), a percentage of the image area (2%%) or a fraction (0.02); default 2%%")
    _grid_options(masks)
    masks.add_argument("--plot", type=Path, metavar="FILE", help="draw the mask set to FILE (e.g. masks.png)")
    masks.set_defaults(run=_masks)

    predict = commands.add_parser("predict", help="robust label of images, with the double-masking case and certificate")
    predict.add_argument("images", nargs="+", type=Path, metavar="IMAGE")
    _model_options(predict)
    predict.set_defaults(run=_predict)

    models = commands.add_parser("models", help="the model zoo")
    models.set_defaults(run=_models)
    return parser


def _model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="zoo name, local folder, hf-hub:org/name[@rev], or timm:<arch> with --checkpoint (default: the embedded default)")
    parser.add_argument("--checkpoint", type=Path, help="weights for --model timm:<arch>, a .safetensors file")
    parser.add_argument(
        "--patch",
        type=parse_patch,
        help="patch as pixels (32), a percentage of the image area (2%%) or a fraction (0.02); a comma list (1%%,2%%,3%%) is a sweep (default: the model's own)",
    )
    _grid_options(parser)
    parser.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda if available)")


def _grid_options(parser: argparse.ArgumentParser) -> None:
    grid = parser.add_mutually_exclusive_group()
    grid.add_argument("--num-masks", type=_positive, help="masks per axis (default 6, or the model's own)")
    grid.add_argument("--stride", type=_positive, help="mask stride in pixels, instead of --num-masks")


def parse_patch(text: str) -> list[int | float]:
    """Read `--patch`: pixels (`32`, `32px`), a percentage of the area (`2%`) or a fraction (`0.02`), comma-separated.

    Returns:
        One entry per patch: an int for pixels, a float in (0, 1) for a fraction of the area.

    Raises:
        argparse.ArgumentTypeError: for anything else (a negative, zero or oversized value, a
            percentage of 100 or more, a fraction of 1 or more), saying the three ways to write one.
            A bare number is pixels, as `patch=32` is in Python.
    """
    values = []
    for item in text.split(","):
        item = item.strip().lower()
        value: int | float | None = None
        if re.fullmatch(r"\d+(px)?", item):
            value = int(item.removesuffix("px"))
            value = value if value > 0 else None
        elif re.fullmatch(r"\d*\.?\d+%", item):
            percent = float(item[:-1])
            value = percent / 100 if 0 < percent < 100 else None
        elif re.fullmatch(r"\d*\.\d+", item):
            fraction = float(item)
            value = fraction if 0 < fraction < 1 else None
        if value is None:
            raise argparse.ArgumentTypeError(
                f"expected pixels (32), a percentage of the image area (2%), a fraction of it (0.02), or a comma list of them; got {text!r}"
            )
        values.append(value)
    return values


def _single_patch(text: str) -> int | float:
    values = parse_patch(text)
    if len(values) != 1:
        raise argparse.ArgumentTypeError(f"expected one patch, got {len(values)} in {text!r}")
    return values[0]


def _positive(text: str) -> int:
    if not re.fullmatch(r"\d+", text.strip()) or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return int(text)


def _image_size(text: str) -> tuple[int, int]:
    match = re.fullmatch(r"(\d+)(?:[x,](\d+))?", text.strip().lower())
    if not match or int(match[1]) < 1 or (match[2] is not None and int(match[2]) < 1):
        raise argparse.ArgumentTypeError(f"expected H or HxW in pixels (224, 224x200), got {text!r}")
    return int(match[1]), int(match[2] or match[1])


# ------------------------------------------------------------------------------------ commands
def _certify(args: argparse.Namespace) -> None:
    from .dataset import certify_dataset, view_grid
    from .report import plot_mask_set, plot_sweep, plot_views, sweep_table

    if args.resume and args.results is None:
        raise ValueError("--resume continues a --results file; pass --results FILE too")
    model, model_name = _load_model(args.model, args.checkpoint, _device(args.device))
    dataset, data_name = _load_data(args.data, model_name, model)
    models = [_with_threat_model(model, patch, args.num_masks, args.stride) for patch in (args.patch or [None])]
    sweep = len(models) > 1
    tags = [_tag(defended.mask_set) if sweep else "" for defended in models]
    for tag in tags if args.results is not None and not args.resume else []:
        if _results_exist(_suffixed(args.results, tag)):
            raise ValueError(f"--results {_suffixed(args.results, tag)} already exists: pass --resume to continue it, or remove it")

    reports = []
    for defended, tag in zip(models, tags):
        results = _suffixed(args.results, tag) if args.results is not None else None
        if sweep:
            print(f"== {defended.mask_set.describe()}", file=sys.stderr)
        report = certify_dataset(
            defended,
            dataset,
            **({"batch_size": args.batch_size} if args.batch_size else {}),
            limit=args.limit,
            results_path=results,
            resume=args.resume,
            progress=args.progress,
            amp=args.amp,
        )
        report = dataclasses.replace(report, model=model_name, data=data_name)
        reports.append(report)
        print(report.summary())
        print()
        if args.plot is not None:
            args.plot.mkdir(parents=True, exist_ok=True)
            index = _interesting_image(report)
            image, label = dataset[index]
            report.plot(args.plot / f"report{tag}.png")
            plot_mask_set(defended.mask_set, image, args.plot / f"masks{tag}.png")
            one_mask, grid = view_grid(defended, image)
            plot_views(one_mask, grid, int(label), defended.mask_set, image, args.plot / f"views{tag}.png", class_names=_class_names(defended))
    if sweep:
        print(sweep_table(reports))
        if args.plot is not None:
            plot_sweep(reports, args.plot / "sweep.png")
    if args.report is not None:
        documents = [json.loads(r.to_json()) for r in reports]
        args.report.parent.mkdir(parents=True, exist_ok=True)
        args.report.write_text(json.dumps(documents if sweep else documents[0], indent=1) + "\n")
    if args.plot is not None:
        print(f"pictures in {args.plot}/: " + ", ".join(sorted(p.name for p in args.plot.glob("*.png"))))


def _masks(args: argparse.Namespace) -> None:
    from .report import plot_mask_set

    grid = {"stride": args.stride} if args.stride else {"num_masks": args.num_masks} if args.num_masks else {}
    mask_set = MaskSet.square(args.image_size, args.patch, **grid)
    k = len(mask_set)
    tops = sorted({b[0] for b in mask_set.boxes})
    lefts = sorted({b[1] for b in mask_set.boxes})
    print(mask_set.describe())
    print(f"views per image: {k} one-mask + {k * (k - 1) // 2} two-mask = {k * (k + 1) // 2} (K(K+1)/2)")
    print(f"row starts (top):   {' '.join(map(str, tops))}")
    print(f"col starts (left):  {' '.join(map(str, lefts))}")
    print()
    rows = [("mask", "top", "left", "height", "width")] + [(str(i), *map(str, box)) for i, box in enumerate(mask_set.boxes)]
    print(_columns(rows))
    if args.plot is not None:
        plot_mask_set(mask_set, path=args.plot)
        print(f"\npicture: {args.plot}")


def _predict(args: argparse.Namespace) -> None:
    model, _ = _load_model(args.model, args.checkpoint, _device(args.device))
    models = [_with_threat_model(model, patch, args.num_masks, args.stride) for patch in (args.patch or [None])]
    if len(models) > 1:
        raise ValueError("predict takes one --patch, not a list")
    model = models[0]
    transform, mode = _preprocessing(model)
    x = torch.stack([transform(_read_image(path, mode)) for path in args.images])
    prediction = model.predict(x)
    # Certifying against the prediction itself says whether any patch could change it.
    result = model.certify(x, prediction)
    names = _class_names(model)
    k = len(model.mask_set)
    rows = [("image", "prediction", "case", "one-mask views", "certified")]
    for path, label, case, one_mask, certified in zip(args.images, prediction.tolist(), result.case.tolist(), result.one_mask, result.certified.tolist()):
        agree = int((one_mask == label).sum())
        shown = f"{label} ({names[label]})" if names and label < len(names) else str(label)
        rows.append((str(path), shown, CASE_NAMES[case], "all agree" if agree == k else f"{agree}/{k} agree", "yes" if certified else "no"))
    print(model.mask_set.describe())
    print(_columns(rows, align_left=True))


def _patch(entry: dict) -> str:
    """A manifest entry's patch as `5x5 px (2.44%)`."""
    patch = entry.get("patch")
    if not isinstance(patch, list):
        return _value(patch)
    return f"{patch[0]}x{patch[1]} px ({entry['patch_percent']:.2f}%)" if "patch_percent" in entry else f"{patch[0]}x{patch[1]} px"


def _models(args: argparse.Namespace) -> None:
    from . import hub

    rows = [("name", "architecture", "data", "patch", "masks", "clean", "certified")]
    for name in hub.list_models():
        entry = hub.zoo_entry(name)
        marker = " *" if name == hub.DEFAULT_MODEL else ""
        rows.append(
            (
                name + marker,
                str(entry.get("architecture", "-")),
                str(entry.get("dataset", "-")),
                _patch(entry),
                _value(entry.get("num_masks")),
                _accuracy(entry.get("metrics", {}).get("clean_accuracy")),
                _accuracy(entry.get("metrics", {}).get("certified_accuracy")),
            )
        )
    print(_columns(rows, align_left=True))
    print("\n* the default model (robustwrap certify with no --model)")


# -------------------------------------------------------------------------------------- models
def _device(name: str | None) -> torch.device:
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device must be cpu, cuda, cuda:N, ..., got {name!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine")
    return device


def _load_model(spec: str | None, checkpoint: Path | None, device: torch.device) -> tuple[RobustPatchClassifier, str]:
    """The defended model named by `--model` (and `--checkpoint`), on `device`, in eval mode."""
    if spec is not None and spec.startswith("timm:"):
        model = wrap(_load_timm(spec.removeprefix("timm:"), checkpoint))
    else:
        if checkpoint is not None:
            raise ValueError("--checkpoint goes with --model timm:<arch>; other models carry their own weights")
        from . import hub

        spec = spec if spec is not None else hub.DEFAULT_MODEL
        model = hub.from_pretrained(spec)
    return model.to(device).eval(), spec


def _load_timm(arch: str, checkpoint: Path | None):
    """A timm `arch` with the weights of a safetensors `checkpoint`, loaded strictly."""
    import timm

    from .hub import load_state_strictly, read_safetensors

    if not arch:
        raise ValueError("--model timm:<arch> needs an architecture name, e.g. timm:resnet18")
    if checkpoint is None:
        raise ValueError(f"--model timm:{arch} needs --checkpoint FILE.safetensors with the trained weights")
    if checkpoint.suffix != ".safetensors":
        raise ValueError(f"--checkpoint must be a .safetensors file (pickle checkpoints can run code and are refused), got {checkpoint}")
    if not checkpoint.is_file():
        raise FileNotFoundError(f"--checkpoint {checkpoint}: no such file")
    if not timm.is_model(arch):
        raise ValueError(f"--model timm:{arch}: unknown timm architecture (see timm.list_models())")
    state = read_safetensors(checkpoint, f"--checkpoint {checkpoint}")
    model = timm.create_model(arch, pretrained=False)
    # The head and stem sizes of a fine-tuned checkpoint are read from it, as timm's own
    # pretrained loading adapts num_classes and in_chans.
    cfg = model.pretrained_cfg
    sizes = {}
    head = state.get(f"{cfg.get('classifier')}.weight") if isinstance(cfg.get("classifier"), str) else None
    stem = state.get(f"{cfg.get('first_conv')}.weight") if isinstance(cfg.get("first_conv"), str) else None
    if head is not None and head.ndim >= 2 and head.shape[0] != model.num_classes:
        sizes["num_classes"] = head.shape[0]
    if stem is not None and stem.ndim == 4 and stem.shape[1] != 3:
        sizes["in_chans"] = stem.shape[1]
    if sizes:
        model = timm.create_model(arch, pretrained=False, **sizes)
    load_state_strictly(model, state, f"--checkpoint {checkpoint}", f"timm:{arch}")
    return model


def _with_threat_model(model: RobustPatchClassifier, patch, num_masks: int | None, stride: int | None) -> RobustPatchClassifier:
    """`model`, or the same base model re-wrapped with another patch or mask grid."""
    if patch is None and num_masks is None and stride is None:
        return model
    if patch is None:
        if len(model.mask_set.patch_sizes) != 1:
            raise ValueError("this model's mask set covers several patch shapes; pass --patch to choose one")
        ph, pw = model.mask_set.patch_sizes[0]
        patch = ph if ph == pw else (ph, pw)
    grid = {"stride": stride} if stride else {"num_masks": num_masks} if num_masks else {}
    if not grid and model.mask_set.grid is not None and model.mask_set.mask_size is not None:
        grid = {"num_masks": model.mask_set.grid}
    defended = wrap(model.model, patch=patch, image_size=model.image_size, fill=model.fill, batch_size=model.batch_size, num_classes=model.num_classes, **grid)
    return defended.eval()


def _class_names(model: RobustPatchClassifier) -> list[str] | None:
    cfg = getattr(model.model, "pretrained_cfg", None)
    names = cfg.get("label_names") if isinstance(cfg, dict) else None
    return list(names) if names else None


# ---------------------------------------------------------------------------------------- data
def _load_data(spec: str | None, model_name: str, model: RobustPatchClassifier):
    """`(dataset, name)` for `--data`: a built-in data set name or an ImageFolder directory."""
    hub = _hub()
    builtin = hub.BUILTIN_DATASETS if hub is not None else {}
    if spec is None:
        if hub is None or model_name not in hub.list_models():
            raise ValueError(f"--data is required for --model {model_name} (only zoo models name their own data set)")
        spec = hub.zoo_entry(model_name)["dataset"]
        return hub.builtin_dataset(spec, transform=_preprocessing(model)[0]), spec
    path = Path(spec)
    if spec in builtin:
        if path.exists():
            raise ValueError(f"--data {spec!r} is both a built-in data set and a folder here; write ./{spec} for the folder")
        return hub.builtin_dataset(spec, transform=_preprocessing(model)[0]), spec
    if not path.exists():
        known = f" (built-in: {', '.join(builtin)})" if builtin else ""
        raise FileNotFoundError(f"--data {spec}: no such folder, and not a built-in data set{known}")
    if not path.is_dir():
        raise ValueError(f"--data {spec} is a file; expected a folder of class folders of images (torchvision ImageFolder)")
    from torchvision.datasets import ImageFolder

    transform, mode = _preprocessing(model)
    try:
        dataset = ImageFolder(str(path), transform=transform, loader=functools.partial(_read_image, mode=mode))
    except FileNotFoundError as error:
        raise FileNotFoundError(f"--data {spec}: {error} (expected class folders of images, as torchvision's ImageFolder)") from None
    if len(dataset.classes) > model.num_classes:
        raise ValueError(f"--data {spec} has {len(dataset.classes)} class folders but the model has {model.num_classes} classes")
    return dataset, spec


def _preprocessing(model: RobustPatchClassifier):
    """`(transform, PIL mode)` from the model's own data config (timm's resolve_data_config)."""
    from timm.data import create_transform, resolve_data_config

    channels = model.in_chans or 3
    h, w = model.image_size
    config = resolve_data_config({"input_size": (channels, h, w)}, model=model.model)
    for key in ("mean", "std"):
        if len(config[key]) != channels:
            raise ValueError(f"the model's data config has {len(config[key])} {key} values but the model takes {channels} channels")
    return create_transform(**config), "L" if channels == 1 else "RGB"


def _read_image(path: str | Path, mode: str):
    from PIL import Image

    try:
        with Image.open(path) as image:
            return image.convert(mode)
    except FileNotFoundError:
        raise FileNotFoundError(f"no such image: {path}") from None
    except (OSError, ValueError) as error:
        raise OSError(f"cannot read image {path}: {_one_line(error)}") from None


def _hub():
    """`robustwrap.hub`, or None in an install without the model zoo."""
    try:
        from . import hub
    except ImportError:
        return None
    return hub


def _results_exist(path: Path) -> bool:
    return path.exists() or any(path.parent.glob(path.name + ".rank*"))


def _suffixed(path: Path, tag: str) -> Path:
    return path.with_name(f"{path.stem}{tag}{path.suffix}") if tag else path


def _tag(mask_set: MaskSet) -> str:
    ph, pw = mask_set.patch_sizes[0]
    return f"_{ph}px" if ph == pw else f"_{ph}x{pw}px"


def _interesting_image(report: CertificationReport) -> int:
    """The image to picture: the first correct but uncertified one, else the first wrong one, else the first."""
    for wanted in (lambda r: r.correct and not r.certified, lambda r: not r.correct):
        for record in report.records:
            if wanted(record):
                return record.index
    return report.records[0].index


# ------------------------------------------------------------------------------------ printing
def _columns(rows: Sequence[Sequence[str]], align_left: bool = False) -> str:
    widths = [max(len(row[c]) for row in rows) for c in range(len(rows[0]))]
    just = str.ljust if align_left else str.rjust
    lines = ["  ".join(just(cell, w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _value(value) -> str:
    return "-" if value is None else str(value)


def _accuracy(value) -> str:
    if isinstance(value, float) and 0 <= value <= 1:
        return f"{100 * value:.1f}%"
    return _value(value)


def _one_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    text = lines[0] if lines else type(error).__name__
    if isinstance(error, KeyError) and len(error.args) == 1 and isinstance(error.args[0], str):
        text = error.args[0]  # str(KeyError) would wrap the message in quotes
    if not isinstance(error, (ValueError, TypeError, OSError, KeyError, ImportError)):
        text = f"{type(error).__name__}: {text}"
    return text


if __name__ == "__main__":
    sys.exit(main())
