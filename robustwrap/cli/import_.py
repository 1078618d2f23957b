"""`robustwrap import`: turn a checkpoint the authors of a defense published into a robustwrap folder."""

from __future__ import annotations

import argparse
from pathlib import Path

from ._loading import _describe
from ._options import (
    PRECISIONS,
    _check_defense_options,
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
    parser.add_argument(
        "--out", required=True, type=Path, metavar="DIR", help="the folder to write: new, empty, or an earlier robustwrap save (replaced)"
    )
    parser.add_argument("--model", help="timm architecture of the network (default: from the file name)")
    parser.add_argument("--num-classes", type=_positive, metavar="N", help="classes of the head (default: from the file name's data set)")
    parser.add_argument("--image-size", type=_image_size, help="H or HxW input size (default: the authors')")
    parser.add_argument("--patch", type=_single_patch, help="pixels (32), a percentage of the image area (2%%) or a fraction (0.02) (default: the authors')")
    parser.add_argument("--dataset", help="data set name recorded in the folder (default: from the file name)")
    parser.add_argument("--precision", choices=PRECISIONS, help="numeric precision of the defended model (default float32)")
    parser.add_argument("--margin", type=_non_negative_float, metavar="M", help="certificate margin (default: robustwrap's; 0 is the papers' rule)")
    _defense_groups(parser)
    parser.set_defaults(run=_import, defense=None)


def _import(args: argparse.Namespace) -> None:
    from ..convert import import_checkpoint
    from ..hub import check_save_folder, save_folder

    check_save_folder(args.out, argument="--out")
    defense = IMPORT_FORMATS[args.format]
    options = _check_defense_options(args, defense, defense)
    options.update({k: getattr(args, k) for k in ("precision", "margin") if getattr(args, k) is not None})
    with _in_option_words(defense, model="--model", dataset="--dataset"):
        model = import_checkpoint(
            args.file, args.format, model=args.model, num_classes=args.num_classes, image_size=args.image_size, patch=args.patch, dataset=args.dataset, **options
        )
    save_folder(model, args.out)
    print(f"{args.file.name} -> {args.out}: {model.model.pretrained_cfg.get('architecture')}, {model.num_classes} classes; {_describe(model)}")
    print(f"certify it: robustwrap certify --model {args.out} --data FOLDER --limit all")
