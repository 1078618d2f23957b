"""`robustwrap import`: turn a checkpoint the authors of a defense published into a robustwrap folder."""

from __future__ import annotations

import argparse
from pathlib import Path

from ._loading import _describe, _timm_arch
from ._options import (
    PRECISIONS,
    _check_defense_options,
    _crop_pct,
    _defense_groups,
    _image_size,
    _in_option_words,
    _non_negative_float,
    _positive,
    _single_patch,
)

# `robustwrap import`: the format names the authors' code; each saves for one defense.
IMPORT_FORMATS = {
    "patchcleanser": "patchcleanser",
    "patchguard": "patchguard",
    "smoothed-vit": "smoothing",
    "drs": "smoothing",
    "patchcure": "patchcure",
}


def register(commands, common: argparse.ArgumentParser) -> None:
    """`robustwrap import`: its subparser."""
    parser = commands.add_parser(
        "import",
        parents=[common],
        help="turn a checkpoint the authors of a defense published into a robustwrap folder",
        description="Read a published checkpoint (torch.load(weights_only=True) only: a file that needs pickle code is "
        "refused and nothing is written) and write a robustwrap folder (config.json, model.safetensors, README.md) that "
        "robustwrap.from_pretrained and robustwrap certify --model DIR load. Settings come from the authors' file names "
        "where they carry them; the options below override them.",
    )
    parser.add_argument("file", type=Path, metavar="FILE", help="the checkpoint (.pth / .pt)")
    parser.add_argument("--format", required=True, choices=tuple(IMPORT_FORMATS), help="whose code saved it")
    parser.add_argument("--out", required=True, type=Path, metavar="DIR", help="the folder to write: new, empty, or an earlier robustwrap save (replaced)")
    parser.add_argument(
        "--model",
        metavar="timm:ARCH",
        help="timm architecture of the network, timm:<arch> as certify and train take it (default: from the file name and the weights)",
    )
    parser.add_argument(
        "--num-classes", type=_positive, metavar="N", help="classes of the head (default: the head's, else the file name's data set)"
    )
    parser.add_argument("--image-size", type=_image_size, help="H or HxW input size (default: the authors')")
    parser.add_argument(
        "--patch", type=_single_patch, help="pixels (32), a percentage of the image area (2%%) or a fraction (0.02) (default: the authors')"
    )
    parser.add_argument("--dataset", help="data set name recorded in the folder (default: from the file name)")
    preprocessing = parser.add_argument_group("preprocessing (recorded in the folder's data config; default: the authors')")
    preprocessing.add_argument(
        "--crop-pct",
        type=_crop_pct,
        metavar="F",
        help="the share of the resized image its center crop keeps (timm's crop_pct, in (0, 1]; 1 resizes without cropping)",
    )
    preprocessing.add_argument(
        "--crop-mode", metavar="MODE", help="timm's center, squash (resize to the input size, ignoring the aspect ratio) or border"
    )
    preprocessing.add_argument(
        "--interpolation", metavar="NAME", help="the resizing filter: bilinear, bicubic, nearest, box, hamming or lanczos"
    )
    parser.add_argument("--precision", choices=PRECISIONS, help="numeric precision of the defended model (default float32)")
    parser.add_argument(
        "--margin", type=_non_negative_float, metavar="M", help="certificate margin (default: robustwrap's; 0 is the papers' rule)"
    )
    _defense_groups(parser)
    parser.set_defaults(run=_import, defense=None)


def _import(args: argparse.Namespace) -> None:
    from ..convert import import_checkpoint
    from ..hub import check_save_folder, save_folder

    check_save_folder(args.out, argument="--out")
    defense = IMPORT_FORMATS[args.format]
    options = _check_defense_options(args, defense, defense)
    options.update({k: getattr(args, k) for k in ("precision", "margin") if getattr(args, k) is not None})
    arch = _import_arch(args.model)
    words = {k: f"--{k.replace('_', '-')}" for k in ("model", "dataset", "crop_pct", "crop_mode", "interpolation")}
    with _in_option_words(defense, **words):
        model = import_checkpoint(
            args.file,
            args.format,
            model=arch,
            num_classes=args.num_classes,
            image_size=args.image_size,
            patch=args.patch,
            dataset=args.dataset,
            crop_pct=args.crop_pct,
            crop_mode=args.crop_mode,
            interpolation=args.interpolation,
            **options,
        )
    save_folder(model, args.out)
    print(
        f"{args.file.name} -> {args.out}: {model.model.pretrained_cfg.get('architecture')}, {model.num_classes} classes; {_describe(model)}"
    )
    print(f"certify it: robustwrap certify --model {args.out} --data FOLDER --limit all")


def _import_arch(spec: str | None) -> str | None:
    """The timm architecture `--model` names: `timm:<arch>`, the spelling of certify and train (a bare
    `<arch>` is read alike: the network of a checkpoint is always a timm architecture)."""
    arch = _timm_arch(spec)
    if arch is not None or spec is None:
        return arch
    if ":" in spec or Path(spec).exists():
        raise ValueError(
            f"--model {spec}: import builds the network the checkpoint holds; name its timm architecture, e.g. --model timm:resnet50"
        )
    return spec
