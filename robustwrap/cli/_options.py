"""The command line's shared pieces: exit codes, option builders and argparse types, the defense groups."""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

EXIT_ERROR = 1
EXIT_USAGE = 2
# `robustwrap attack`: a certified image whose prediction the attack changed (a bug in robustwrap).
# 3, not 2: argparse already exits with 2 for bad usage.
EXIT_BROKEN_CERTIFICATE = 3
EXIT_INTERRUPTED = 130

PRECISIONS = ("float32", "bfloat16", "float16")
# robustwrap.defenses.base.RESIZE_MODES, written out so that `robustwrap --help` does not import torch.
RESIZE_MODES = ("nearest", "bilinear", "bicubic")

# The keys of robustwrap.DEFENSES, written out so that `robustwrap --help` does not import torch
# (tests/test_cli.py checks that they agree).
DEFENSE_NAMES = ("patchcleanser", "smoothing", "patchguard", "patchcure")

# Each defense's own command-line options: argparse dest -> (the defenses that take it, the
# option's name in `robustwrap.wrap` / their `from_patch`). Smoothing's and PatchGuard's `threshold=` are
# different things (a softmax vote threshold in (0, 1]; a detection threshold in [0, 1)), and
# smoothing's `stride=` is not PatchCleanser's mask stride, so on the command line each gets a
# name of its own: an option of one defense is never silently read as another's.
DEFENSE_OPTIONS: dict[str, tuple[tuple[str, ...], str]] = {
    "num_masks": (("patchcleanser",), "num_masks"),
    "stride": (("patchcleanser",), "stride"),
    "ablation": (("smoothing",), "ablation"),
    "ablation_size": (("smoothing",), "size"),
    "ablation_stride": (("smoothing",), "stride"),
    "vote_threshold": (("smoothing",), "threshold"),
    "encoding": (("smoothing",), "encoding"),
    "drop_tokens": (("smoothing", "patchcleanser"), "drop_tokens"),
    "receptive_field": (("patchguard",), "receptive_field"),
    "feature_stride": (("patchguard",), "feature_stride"),
    "feature_offset": (("patchguard",), "feature_offset"),
    "detection_threshold": (("patchguard",), "threshold"),
    "clip": (("patchguard",), "clip"),
    "window": (("patchcure",), "window"),
    "split": (("patchcure",), "split"),
    "mask_stride": (("patchcure",), "mask_stride"),
}
# The options that are switches (`--drop-tokens` / `--no-drop-tokens`) rather than a value.
SWITCHES = ("--drop-tokens",)


def _model_options(parser: argparse.ArgumentParser, sweep: bool) -> None:
    model = parser.add_argument_group("model")
    model.add_argument(
        "--model",
        help="a zoo name (robustwrap models), a robustwrap folder, hf-hub:org/name[@rev], timm:<arch> (with --pretrained "
        "or --checkpoint), or local-dir:FOLDER saved by timm (config.json + model.safetensors); default: the embedded default",
    )
    model.add_argument("--checkpoint", type=Path, help="weights for --model timm:<arch>, a .safetensors file")
    model.add_argument("--pretrained", action="store_true", help="--model timm:<arch> with timm's pretrained weights (downloaded once, then read from the Hugging Face cache)")
    model.add_argument("--image-size", type=_image_size, help="H or HxW input size of a timm model (timm:<arch> or a timm folder); default: the size it is built for")
    model.add_argument("--num-classes", type=_positive, metavar="N", help="classes of a timm model's head (default: the checkpoint's or timm's)")
    model.add_argument("--in-chans", type=_positive, metavar="N", help="input channels of a timm model (default: the checkpoint's or 3)")

    threat = parser.add_argument_group("threat model and defense")
    threat.add_argument(
        "--defense",
        choices=DEFENSE_NAMES,
        help="the defense (default: the model's own; patchcleanser for a timm model). A defended model keeps its "
        "defense and settings unless --defense, --patch or an option of a defense group below asks to re-wrap its base model",
    )
    if sweep:
        patch_help = "patch as pixels (32), a percentage of the image area (2%%) or a fraction (0.02); a comma list (1%%,2%%,3%%) is a sweep (default: the model's own, 2%% for a timm model)"
        threat.add_argument("--patch", type=parse_patch, help=patch_help)
    else:
        patch_help = "patch as pixels (32), a percentage of the image area (2%%) or a fraction (0.02) (default: the model's own, 2%% for a timm model)"
        threat.add_argument("--patch", type=_patch_list_of_one, help=patch_help)
    threat.add_argument(
        "--input-size",
        type=_image_size,
        help="h or hxw: the defended model takes images of this size and resizes them to the base model's inside its forward; "
        "the patch, masks and ablations are in these input pixels (Smoothed ViT's CIFAR-10: 32 upsampled to 224; default: no resize)",
    )
    threat.add_argument("--resize", choices=RESIZE_MODES, help="interpolation of the --input-size resize (default: nearest)")
    threat.add_argument("--precision", choices=PRECISIONS, help="numeric precision of the defended model (autocast; default: the model's own, float32 for a timm model)")
    threat.add_argument(
        "--margin",
        type=_non_negative_float,
        metavar="M",
        help="certificate margin: a view or logit counts for a certificate only if it holds when the logits move by up "
        "to M (default: the model's own; for a timm model 1e-3, 0.1 for PatchGuard's evidence; 0 is the papers' rule); see the Concepts page",
    )
    _defense_groups(parser)

    run = parser.add_argument_group("speed")
    run.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    run.add_argument(
        "--views-per-pass",
        type=_positive,
        metavar="N",
        help="masked views per forward pass of the model (default: the model's own): lower it when memory runs out, raise it on a GPU",
    )
    run.add_argument(
        "--threads",
        type=_positive,
        metavar="N",
        help="CPU threads for torch (default: OMP_NUM_THREADS when set; else 1 when the machine is already busy, "
        "i.e. its load average fills every core; else torch's default of one per core). Use --threads 1 when other "
        "jobs share the machine or several robustwrap commands run at once (oversubscribed cores made a run 7x slower "
        "on a loaded 2-core machine; small models gain little from threads anyway), and more threads for a large "
        "model on an otherwise idle CPU",
    )


def _defense_groups(parser: argparse.ArgumentParser) -> None:
    """One option group per defense, mirroring the options of its `from_patch` (see `DEFENSE_OPTIONS`)."""
    cleanser = parser.add_argument_group("PatchCleanser (--defense patchcleanser)")
    grid = cleanser.add_mutually_exclusive_group()
    grid.add_argument("--num-masks", type=_positive, help="masks per axis (default 6, or the model's own)")
    grid.add_argument("--stride", type=_positive, help="mask stride in pixels, instead of --num-masks")

    smoothing = parser.add_argument_group("(De)Randomized Smoothing (--defense smoothing)")
    smoothing.add_argument("--ablation", choices=("column", "row", "block"), help="views keep one column band, row band or block (default column, or the model's own)")
    smoothing.add_argument("--ablation-size", type=_positive, metavar="N", help="band width / block side in pixels (required for a new smoothing model)")
    smoothing.add_argument("--ablation-stride", type=_positive, metavar="N", help="pixels between neighbouring views (default 1, or the model's own)")
    smoothing.add_argument(
        "--vote-threshold",
        type=float,
        metavar="THETA",
        help="each view votes for every class whose softmax is >= THETA, in (0, 1] (default: one argmax vote per view)",
    )
    smoothing.add_argument("--encoding", choices=("fill", "levine2020"), help="ablated pixels are the fill value, or levine2020's 2C-channel (x, 1-x) input (default fill)")
    smoothing.add_argument(
        "--drop-tokens",
        action=argparse.BooleanOptionalAction,
        help="each view of a vision transformer runs on the tokens that meet its retained region only, as Smoothed ViT "
        "does; it changes the defended function (default: on for timm's ViT family, off for other models, or the model's own). "
        "Also PatchCleanser's: its masked views drop the tokens their masks cover whole (default off)",
    )

    guard = parser.add_argument_group("PatchGuard (--defense patchguard)")
    guard.add_argument("--receptive-field", type=_int_pair(1), metavar="R", help="receptive field of a local logit, R or RHxRW px (default: the model's own attribute, as BagNets carry)")
    guard.add_argument("--feature-stride", type=_int_pair(1), metavar="S", help="pixels between neighbouring local logits, S or SHxSW (default: the model's own)")
    guard.add_argument("--feature-offset", type=_int_pair(0), metavar="O", help="padding offset of the first local logit, O or OHxOW (default: the model's own; 0 unpadded)")
    guard.add_argument(
        "--detection-threshold",
        type=float,
        metavar="T",
        help="robust masking removes a class's window only when it holds more than T of that class's evidence, in [0, 1) (default 0: always)",
    )
    guard.add_argument("--clip", type=_positive_float, metavar="C", help="ceiling of the clipped local logits (default: none, clip to [0, inf))")

    cure = parser.add_argument_group("PatchCURE (--defense patchcure)")
    cure.add_argument(
        "--window",
        type=_int_pair(1),
        metavar="WH[xWW]",
        help="split a timm ViT: tokens per window of the windowed first blocks, e.g. 14x2 (with --split; default: the model's own)",
    )
    cure.add_argument(
        "--split",
        type=_count,
        metavar="K",
        help="windowed blocks of a ViT split (the SRF), the rest run per masked view; K = depth: every block, no LRF (with --window)",
    )
    cure.add_argument(
        "--mask-stride", type=_int_pair(1), metavar="S", help="feature mask stride in cells, S or SHxSW (default 1, or the model's own)"
    )


def parse_patch(text: str) -> list[int | float]:
    """Read `--patch`: pixels (`32`, `32px`), a percentage of the area (`2%`) or a fraction (`0.02`), comma-separated.

    Each item is read as `wrap(patch="2%")` reads a string, so the command line and the Python API
    take the same spellings.

    Args:
        text: the option's value.

    Returns:
        One entry per patch: an int for pixels, a float in (0, 1) for a fraction of the area.

    Raises:
        argparse.ArgumentTypeError: for anything else (a negative, zero or oversized value, a
            percentage of 100 or more, a fraction of 1 or more), saying the three ways to write one.
            A bare number is pixels, as `patch=32` is in Python.
    """
    from .._args import read_patch

    try:
        return [read_patch(item) for item in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected pixels (32), a percentage of the image area (2%), a fraction of it (0.02), or a comma list of them; got {text!r}"
        ) from None


def parse_class_map(text: str) -> dict[str, int] | list[str]:
    """Read `--class-map`: `name=id,name=id`, or a JSON file holding `{"name": id}` or a list of class names.

    Args:
        text: the option's value.

    Returns:
        A `{folder name: class id}` dict, or a list of class names (the name at index `i` is class `i`).

    Raises:
        FileNotFoundError: for a file name (ending in `.json`) that does not exist.
        ValueError: for anything else, saying the two ways to write one.
    """
    expected = "expected name=id,name=id or a JSON file with {\"name\": id} or a list of class names"
    if "=" not in text or text.strip().endswith(".json"):
        path = Path(text)
        if not path.is_file():
            raise FileNotFoundError(f"--class-map {text}: no such file ({expected})")
        try:
            value = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ValueError(f"--class-map {text} is not valid JSON ({error})") from None
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return value
        if isinstance(value, dict) and all(isinstance(v, int) and not isinstance(v, bool) for v in value.values()):
            return {str(k): v for k, v in value.items()}
        raise ValueError(f"--class-map {text}: {expected}, got a JSON {type(value).__name__}")
    mapping: dict[str, int] = {}
    for item in text.split(","):
        name, sep, ident = item.rpartition("=")
        if not sep or not name.strip() or not re.fullmatch(r"\s*\d+\s*", ident):
            raise ValueError(f"--class-map: {expected}; got {item!r} in {text!r}")
        mapping[name.strip()] = int(ident)
    return mapping


def _single_patch(text: str) -> int | float:
    values = parse_patch(text)
    if len(values) != 1:
        raise argparse.ArgumentTypeError(f"expected one patch, got {len(values)} in {text!r}")
    return values[0]


def _patch_list_of_one(text: str) -> list[int | float]:
    return [_single_patch(text)]


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 < value < math.inf:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 <= value < math.inf:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}")
    return value


def _int_pair(minimum: int):
    """An argparse type reading `N` or `HxW` (integers >= `minimum`) as an int or an `(h, w)` pair."""

    def parse(text: str) -> int | tuple[int, int]:
        match = re.fullmatch(r"(\d+)(?:[x,](\d+))?", text.strip().lower())
        if not match or min(int(v) for v in match.groups() if v is not None) < minimum:
            raise argparse.ArgumentTypeError(f"expected N or HxW, integers >= {minimum}, got {text!r}")
        return int(match[1]) if match[2] is None else (int(match[1]), int(match[2]))

    parse.__name__ = "pixels"
    return parse


def _positive(text: str) -> int:
    if not re.fullmatch(r"\d+", text.strip()) or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return int(text)


def _crop_pct(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"expected a fraction in (0, 1], got {text!r}")
    return value


def _count(text: str) -> int:
    if not re.fullmatch(r"\d+", text.strip()):
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return int(text)


def _limit(text: str) -> int | str:
    if text.strip().lower() == "all":
        return "all"
    if not re.fullmatch(r"\d+", text.strip()) or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'all', got {text!r}")
    return int(text)


def _image_size(text: str) -> tuple[int, int]:
    match = re.fullmatch(r"(\d+)(?:[x,](\d+))?", text.strip().lower())
    if not match or int(match[1]) < 1 or (match[2] is not None and int(match[2]) < 1):
        raise argparse.ArgumentTypeError(f"expected H or HxW in pixels (224, 224x200), got {text!r}")
    return int(match[1]), int(match[2] or match[1])


def _defense_options(args: argparse.Namespace) -> dict[str, Any]:
    """The defense-group options given on the command line, `{argparse dest: value}`."""
    return {dest: getattr(args, dest) for dest in DEFENSE_OPTIONS if getattr(args, dest, None) is not None}


def _check_defense_options(args: argparse.Namespace, defense: str, own: str | None) -> dict[str, Any]:
    """`{wrap option: value}` of the given defense-group options, all of which must belong to `defense`.

    Raises:
        ValueError: for an option of another defense, in the words of `robustwrap.wrap`'s error
            ("num_masks= is an option of defense 'patchcleanser', not of 'smoothing'"), naming the flag.
    """
    options = {}
    for dest, value in _defense_options(args).items():
        owners, name = DEFENSE_OPTIONS[dest]
        if defense not in owners:
            owner = owners[0]
            how = f"; this model's defense is {own!r}: pass --defense {owner} to re-wrap it" if own == defense and args.defense is None else ""
            whose = f"defense {owner!r}" if len(owners) == 1 else "defenses " + " and ".join(repr(o) for o in owners)
            raise ValueError(f"--{dest.replace('_', '-')} is an option of {whose}, not of {defense!r}{how}")
        options[name] = value
    return options


# The command line's name of each keyword of `robustwrap.wrap` that is not a defense-group option.
COMMON_OPTIONS = {
    "patch": "--patch",
    "image_size": "--image-size",
    "input_size": "--input-size",
    "resize": "--resize",
    "num_classes": "--num-classes",
    "precision": "--precision",
    "margin": "--margin",
}


@contextlib.contextmanager
def _in_option_words(defense: str, **more: str) -> Iterator[None]:
    """Re-raise a ValueError or TypeError of the Python API with its keywords written as the command's options.

    The defenses name their keywords (`pass receptive_field=`, `size is required`,
    `drop_tokens=True needs ...`); on the command line the user passed options, so the message
    names those (`pass --receptive-field`, `--ablation-size is required`, `--drop-tokens needs ...`).
    The keywords are `defense`'s group options (see `DEFENSE_OPTIONS`: smoothing's `stride=` is
    `--ablation-stride`, PatchCleanser's is `--stride`), `COMMON_OPTIONS`, and `more`
    (`{keyword: option}`). The translated error is raised from the original.
    """
    options = {name: f"--{dest.replace('_', '-')}" for dest, (owners, name) in DEFENSE_OPTIONS.items() if defense in owners}
    options.update(COMMON_OPTIONS, **more)
    try:
        yield
    except (ValueError, TypeError) as error:
        text = _option_words(str(error), options)
        if text == str(error):
            raise
        raise type(error)(text) if type(error) in (ValueError, TypeError) else ValueError(text) from error


def _option_words(text: str, options: dict[str, str]) -> str:
    """`text` with each keyword of `options` (`{keyword: option}`) written as its option.

    `name=value` becomes `--option value` (`True`/`False` of a switch: `--option`/`--no-option`), a
    bare `name=` or a name with an underscore becomes `--option`, and so does a plain word
    (`size`, `threshold`) where it starts the message, as the defenses start an error with the
    argument it is about, or stands in a list of keywords ("a smaller size or stride"). What the model carries is left alone: "the model's own
    receptive_field=17" is an attribute of the model, not an option.
    """
    names = "|".join(sorted(map(re.escape, options), key=len, reverse=True))
    keyword = re.compile(rf"(?<![\w.-])(?P<name>{names})(?:=(?P<value>\([^)]*\)|[^\s,;:()]*))?(?![\w-])")
    attribute = re.compile(rf"model's (?:own )?(?:(?:{names})(?:=\S*?)?(?:, | and |(?=\W)))+")

    def option(match: re.Match[str], start: int) -> str:
        name, value, flag = match["name"], match["value"], options[match["name"]]
        text = match.string
        listed = re.search(rf"(?<![\w.-])(?:{names})(?:, | or | and )$", text[: match.start()]) or re.match(
            rf"(?:, | or | and )(?:{names})(?![\w-])", text[match.end() :]
        )
        compound = re.search(r"\b(?:image|patch|batch|token|block|band|mask|feature|window) $", text[: match.start()])
        if value is None and "_" not in name and match.start() + start != 0 and (not listed or compound):
            # an English word ("size", "patch") in the middle of a sentence ("image size"), not in a list of keywords
            return match[0]
        if value in ("True", "False") and flag in SWITCHES:
            return flag if value == "True" else f"--no-{flag[2:]}"
        return f"{flag} {value}" if value else flag

    pieces, start = [], 0
    for owned in attribute.finditer(text):
        piece = text[start : owned.start()]
        pieces += [keyword.sub(lambda m, at=start: option(m, at), piece), owned[0]]
        start = owned.end()
    pieces.append(keyword.sub(lambda m, at=start: option(m, at), text[start:]))
    text = "".join(pieces)
    for flag in SWITCHES:  # `name=False (or None: ...)`: on the command line None is neither switch
        text = re.sub(rf"(--(?:no-)?{re.escape(flag[2:])}) \(or None: ", r"\1 (or neither switch: ", text)
    return text


def _tau_option(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """`--tau`, the confidence threshold of `--detect` (certify, predict, attack)."""
    parser.add_argument(
        "--tau", type=float, metavar="T", help="with --detect: the confidence threshold in [0, 1) above which a disagreeing view alerts (default: the model's, 0)"
    )
