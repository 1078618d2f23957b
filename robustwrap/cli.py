"""The `robustwrap` command: certify a data set, attack it, show a defense's views, predict images, list the zoo.

```
robustwrap certify                                  # the embedded default model on the first 100 shipped digits
robustwrap certify --limit all                      # ... on all 1,000 of them
robustwrap certify --model hf-hub:org/name --data val/ --patch 1%,2%,3% --plot out/ --report sweep.json
robustwrap certify --model timm:resnet18 --pretrained --data val/ --patch 2%
robustwrap certify --model timm:resnet18 --pretrained --data val/ --defense smoothing --ablation-size 19
robustwrap attack --limit 10 --output findings/       # clean, certified and empirical robust accuracy
robustwrap masks --image-size 224 --patch 2% --num-masks 6 --plot masks.png
robustwrap predict digit.png digits/ --json
robustwrap models
```

`--defense patchcleanser|smoothing|patchguard` picks the defense; each has its own option group
(PatchCleanser: `--num-masks`, `--stride`; smoothing: `--ablation`, `--ablation-size`,
`--ablation-stride`, `--vote-threshold`, `--encoding`; PatchGuard: `--receptive-field`,
`--feature-stride`, `--feature-offset`, `--detection-threshold`, `--clip`), and an option of
another defense is refused in one line. Every failure the user can cause (a missing folder, an
unreadable image, an unknown model, a bad patch string) ends with one line on stderr and exit code 1; an unexpected error (a bug) surfaces
with its traceback, and `--traceback` shows the traceback of the expected ones too. The threat
model, the settings and what a certificate proves are explained on the Concepts page
(docs/concepts.md).

`robustwrap --help`, a usage error and `robustwrap models` import neither torch nor timm nor
matplotlib (the package imports nothing until a name is used, and the zoo's manifest is read as
JSON): each subcommand's handler imports what it uses when it runs.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # imported lazily at run time: `robustwrap --help` must not pay for torch
    import torch
    from torch import nn

    from .defenses import RobustPatchClassifier
    from .report import CertificationReport

__all__ = ["main", "parse_class_map", "parse_patch"]

EXIT_ERROR = 1
EXIT_USAGE = 2
# `robustwrap attack`: a certified image whose prediction the attack changed (a bug in robustwrap).
# 3, not 2: argparse already exits with 2 for bad usage.
EXIT_BROKEN_CERTIFICATE = 3
EXIT_INTERRUPTED = 130

# Errors a user can cause: a wrong option, a missing or unreadable file, no network, a missing
# optional package. They are printed as one line; anything else is a bug and keeps its traceback.
EXPECTED_ERRORS: tuple[type[BaseException], ...] = (ValueError, TypeError, OSError, ImportError)

# `robustwrap certify` with no --data and no --limit certifies this many of the zoo model's own
# images. Measured on a 2-core CPU (benchmarks/speed.md): the embedded MNIST model needs about
# 0.12 s of CPU per digit on one thread (a certified digit takes all 666 views), so 100 digits and
# the start take about 20 s; all 1,000 take 81 s wall and 140 s of CPU on two threads (the quiet 2-core machine).
DEFAULT_LIMIT = 100

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm")
PRECISIONS = ("float32", "bfloat16", "float16")

# The keys of robustwrap.DEFENSES, written out so that `robustwrap --help` does not import torch
# (tests/test_cli.py checks that they agree).
DEFENSE_NAMES = ("patchcleanser", "smoothing", "patchguard")

# Each defense's own command-line options: argparse dest -> (defense, the option's name in
# `robustwrap.wrap` / the defense's `from_patch`). Smoothing's and PatchGuard's `threshold=` are
# different things (a softmax vote threshold in (0, 1]; a detection threshold in [0, 1)), and
# smoothing's `stride=` is not PatchCleanser's mask stride, so on the command line each gets a
# name of its own: an option of one defense is never silently read as another's.
DEFENSE_OPTIONS: dict[str, tuple[str, str]] = {
    "num_masks": ("patchcleanser", "num_masks"),
    "stride": ("patchcleanser", "stride"),
    "ablation": ("smoothing", "ablation"),
    "ablation_size": ("smoothing", "size"),
    "ablation_stride": ("smoothing", "stride"),
    "vote_threshold": ("smoothing", "threshold"),
    "encoding": ("smoothing", "encoding"),
    "receptive_field": ("patchguard", "receptive_field"),
    "feature_stride": ("patchguard", "feature_stride"),
    "feature_offset": ("patchguard", "feature_offset"),
    "detection_threshold": ("patchguard", "threshold"),
    "clip": ("patchguard", "clip"),
}

# `robustwrap attack` with no --limit attacks this many images: the audit attacks every correctly
# predicted image, certified ones included, and each may spend --budget surrogate views (forward
# and backward through the base model). Measured on a loaded 2-core CPU (load average 6): the
# embedded MNIST model took 224 s for 4 digits at 20,000 views per image, about a minute each.
# robustwrap.audit's own budget (2,000,000: every patch position of a 32x32 digit) is for a GPU.
DEFAULT_ATTACK_LIMIT = 10
DEFAULT_ATTACK_BUDGET = 20_000


def main(argv: Sequence[str] | None = None) -> int:
    """Run the `robustwrap` command.

    Args:
        argv: the arguments after the program name (default: `sys.argv[1:]`).

    Returns:
        The exit code: 0 on success, 1 for an error (printed as one line on stderr), 2 for bad
        usage, 3 when `robustwrap attack` changed the prediction of a certified image (a bug in
        robustwrap; the reproduction's folder is printed), 130 when interrupted.

    Raises:
        Exception: an unexpected error (a bug, not a wrong input) is re-raised with its traceback,
            after a line that says so; with `--traceback`, every error is re-raised.
    """
    parser = _parser()
    args = parser.parse_args(argv)
    # Only the commands that run a model have --threads; the others must not import torch to set it.
    threads = _threads(args.threads, args.command) if hasattr(args, "threads") else contextlib.nullcontext()
    try:
        with threads:
            code = args.run(args)
    except BrokenPipeError:
        # The reader of stdout went away (`robustwrap masks | head`): not an error of ours.
        _silence_stdout()
        return 0
    except KeyboardInterrupt:
        hint = " (finished images are in --results; rerun with --resume)" if getattr(args, "results", None) else ""
        print(f"robustwrap {args.command}: interrupted{hint}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except EXPECTED_ERRORS as error:
        if args.traceback:
            raise
        print(f"robustwrap {args.command}: error: {_one_line(error)}", file=sys.stderr)
        return EXIT_ERROR
    except Exception as error:
        if _is_out_of_memory(error) and not args.traceback:
            print(f"robustwrap {args.command}: error: out of memory: lower --views-per-pass (views per forward pass)", file=sys.stderr)
            return EXIT_ERROR
        print(f"robustwrap {args.command}: internal error ({type(error).__name__}); the traceback follows, please report it", file=sys.stderr)
        raise
    return code or 0


def _silence_stdout() -> None:
    """Point stdout at /dev/null so that Python's exit flush does not fail again on the closed pipe."""
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # not a real file (e.g. captured in a test)
        pass


def _is_out_of_memory(error: BaseException) -> bool:
    torch = sys.modules.get("torch")
    oom = getattr(getattr(torch, "cuda", None), "OutOfMemoryError", None) if torch is not None else None
    return oom is not None and isinstance(error, oom)


def _busy_cores() -> tuple[float, int] | None:
    """`(load, cores)` when the machine's 1-minute load average already fills every core, else None."""
    try:
        load = os.getloadavg()[0]
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    except (OSError, AttributeError):
        return None
    return (load, cores) if cores > 1 and load >= cores else None


class _threads:
    """Run with `n` intra-op torch threads, then restore the previous number.

    `n` is `--threads`, else `OMP_NUM_THREADS` when set, else 1 when the machine is already busy
    (load average >= cores: torch's one thread per core then oversubscribes the cores, and on a
    loaded 2-core machine made `robustwrap certify` 7x slower than one thread), else torch's default.
    """

    def __init__(self, n: int | None, command: str) -> None:
        self.note = None
        if n is None:
            env = os.environ.get("OMP_NUM_THREADS", "").strip()
            if env:
                n = int(env) if env.isdigit() and int(env) > 0 else None
            elif command in ("certify", "predict", "attack") and (busy := _busy_cores()) is not None:
                n = 1
                self.note = (
                    f"robustwrap {command}: the machine is busy (load {busy[0]:.1f} on {busy[1]} cores): running torch on 1 thread "
                    "(--threads N or OMP_NUM_THREADS=N to choose)"
                )
        self.n, self.previous = n, None

    def __enter__(self) -> None:
        if self.n is not None:
            import torch

            if self.note is not None:
                print(self.note, file=sys.stderr)
            self.previous = torch.get_num_threads()
            torch.set_num_threads(self.n)

    def __exit__(self, *exc: object) -> None:
        if self.previous is not None:
            import torch

            torch.set_num_threads(self.previous)


# ------------------------------------------------------------------------------------- parser
def _version() -> str:
    from . import __version__

    return f"robustwrap {__version__}"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="robustwrap",
        description="Certifiably patch-robust image classifiers: certify a model against an adversarial patch, "
        "show a mask set, predict images, list the model zoo.",
        epilog="'robustwrap COMMAND --help' explains a command. The concepts (threat model, patch units, what a "
        "certificate proves) are on the Concepts page of the documentation (docs/concepts.md).",
    )
    parser.add_argument("--version", action="version", version=_version())
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--traceback", action="store_true", help="show the full traceback of an error instead of one line")

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
    certify.set_defaults(run=_certify)

    attack = commands.add_parser(
        "attack",
        parents=[common],
        help="attack the defended model: clean, certified and empirical robust accuracy, and a certificate audit",
        description=(
            "Certify a data set, then attack every correctly predicted image with an adaptive patch attack on the "
            "defended prediction (robustwrap.audit). Prints clean, certified and empirical robust accuracy side by "
            f"side. With no arguments: the embedded default model on the first {DEFAULT_ATTACK_LIMIT} of its shipped "
            "held-out digits."
        ),
        epilog=(
            f"Exit codes: 0 when every certificate held, {EXIT_BROKEN_CERTIFICATE} when the attack changed the "
            "prediction of a certified image (a bug in robustwrap: the image, patch and location are saved under "
            "--output as a reproduction; please report it), 1 for an error, 2 for bad usage. --patch changes the "
            "threat model that is certified and attacked (the model is re-wrapped), as in certify."
        ),
    )
    _model_options(attack, sweep=False)
    data = attack.add_argument_group("data")
    data.add_argument("--data", help="an image folder laid out like torchvision's ImageFolder, or a built-in data set name (default: the zoo model's own)")
    data.add_argument("--class-map", metavar="MAP", help="class ids of the --data folders, as for certify")
    data.add_argument(
        "--limit",
        type=_limit,
        metavar="N|all",
        help=f"attack only the first N images, or 'all' (default {DEFAULT_ATTACK_LIMIT}: each correctly predicted image "
        "may cost up to --budget views through the base model)",
    )
    data.add_argument("--images-per-step", type=_positive, metavar="N", help="images per certify and attack batch (default 32)")
    search = attack.add_argument_group("attack")
    search.add_argument("--steps", type=_positive, default=150, metavar="N", help="sign-gradient steps per start (default 150)")
    search.add_argument("--step-size", type=_positive_float, default=0.05, metavar="F", help="step as a fraction of the input range (default 0.05)")
    search.add_argument("--restarts", type=_positive, default=1, metavar="N", help="random starts per patch position (default 1)")
    search.add_argument(
        "--budget",
        type=_positive,
        default=DEFAULT_ATTACK_BUDGET,
        metavar="N",
        help=f"surrogate views per image the attack may spend (default {DEFAULT_ATTACK_BUDGET:,}; robustwrap.audit's own "
        "default of 2,000,000 is the exhaustive setting for a GPU): every patch position when they fit, else the "
        "positions the defense's evidence ranks highest",
    )
    search.add_argument("--bounds", type=float, nargs=2, metavar=("LOW", "HIGH"), help="valid input range in the model's input space (default: from the model's mean and std)")
    search.add_argument("--seed", type=int, default=0, help="seed of the random starts (default 0)")
    output = attack.add_argument_group("output")
    output.add_argument("--output", type=Path, default=Path("attack-findings"), metavar="DIR", help="folder for reproductions of broken certificates (default attack-findings; written only when there is one)")
    output.add_argument("--report", type=Path, metavar="FILE.json", help="write the audit report (accuracies, settings, every image) as JSON")
    output.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    attack.set_defaults(run=_attack)

    masks = commands.add_parser(
        "masks",
        parents=[common],
        help="show a defense's views for a patch: a mask set, ablated bands or blocks, or a PatchGuard window",
        description="The geometry of a defense at a threat model, without a model, as a table and (--plot) a picture: "
        "PatchCleanser's mask set, smoothing's ablated views and the number a patch meets, or PatchGuard's feature window.",
    )
    masks.add_argument("--image-size", type=_image_size, default=(224, 224), help="H or HxW (default 224)")
    masks.add_argument("--patch", type=_single_patch, default=0.02, help="pixels (32), a percentage of the image area (2%%) or a fraction (0.02); default 2%%")
    masks.add_argument("--defense", choices=DEFENSE_NAMES, default="patchcleanser", help="the defense whose views to show (default patchcleanser)")
    _defense_groups(masks)
    masks.add_argument(
        "--plot",
        type=Path,
        metavar="FILE",
        help="draw the geometry to FILE (e.g. masks.png): PatchCleanser's mask set, smoothing's views and how many a patch "
        "meets, or PatchGuard's window of local logits",
    )
    masks.set_defaults(run=_masks)

    predict = commands.add_parser(
        "predict",
        parents=[common],
        help="robust label of images, with the double-masking case and certificate",
        description="The robust label of each image, its double-masking case, and whether any patch could change it.",
    )
    predict.add_argument("images", nargs="+", type=Path, metavar="IMAGE", help="image files, or folders (searched recursively for images)")
    _model_options(predict, sweep=False)
    predict.add_argument("--json", action="store_true", help="print one JSON document instead of a table")
    predict.set_defaults(run=_predict)

    models = commands.add_parser("models", parents=[common], help="the model zoo")
    models.set_defaults(run=_models)
    _import_parser(commands, common)
    _train_parser(commands, common)
    return parser


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
    from ._args import read_patch

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


# ------------------------------------------------------------------------------------ commands
def _certify(args: argparse.Namespace) -> None:
    import dataclasses
    import warnings

    from .dataset import ResultsFileError, certify_dataset
    from .report import CertificationReport

    images_per_step = _images_per_step(args)
    if args.amp:
        raise ValueError("--amp was removed: precision is a setting of the defended model; pass --precision bfloat16 (CPU) or --precision float16 (CUDA)")
    if args.resume and args.results is None:
        raise ValueError("--resume continues a --results file; pass --results FILE too")
    model, model_name = _load_model(args)
    models = [_with_settings(model, patch, args) for patch in (args.patch or [None])]
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
                    defended, dataset, batch_size=images_per_step, limit=limit, results_path=results, resume=args.resume, progress=args.progress
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
        from .report import sweep_table

        print(sweep_table(reports))
        if args.plot is not None:
            from .plots import plot_sweep

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
    from .plots import plot_mask_set, plot_views

    folder.mkdir(parents=True, exist_ok=True)
    report.plot(folder / f"report{tag}.png")
    mask_set = getattr(defended, "mask_set", None)
    if mask_set is None:  # a defense without masks has no mask-set or views picture
        return
    from .dataset import view_grid

    index = _interesting_image(report)
    image, label = dataset[index]
    plot_mask_set(mask_set, image, folder / f"masks{tag}.png")
    one_mask, grid = view_grid(defended, image)
    plot_views(one_mask, grid, int(label), mask_set, image, folder / f"views{tag}.png", class_names=_label_names(defended))


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


def _attack(args: argparse.Namespace) -> int:
    """`robustwrap attack`: certify, attack every correct image, print the three accuracies; 3 on a broken certificate."""
    from .attack import audit

    model, model_name = _load_model(args)
    defended = _with_settings(model, (args.patch or [None])[0], args)
    dataset, data_name = _load_data(args.data, args.class_map, model_name, defended)
    limit = None if args.limit == "all" else args.limit if args.limit is not None else DEFAULT_ATTACK_LIMIT
    options: dict[str, Any] = {"batch_size": args.images_per_step} if args.images_per_step is not None else {}
    report = audit(
        defended,
        dataset,
        steps=args.steps,
        step_size=args.step_size,
        restarts=args.restarts,
        budget=args.budget,
        limit=limit,
        bounds=tuple(args.bounds) if args.bounds is not None else None,
        seed=args.seed,
        output=args.output,
        progress=args.progress,
        **options,
    )
    shown = min(limit, len(dataset)) if limit is not None else len(dataset)
    print(f"model {model_name}, data {data_name} ({shown} of {len(dataset)} images); {_describe(defended)}")
    print(report.summary())
    if args.report is not None:
        args.report.parent.mkdir(parents=True, exist_ok=True)
        report.save(args.report)
        print(f"report: {args.report}")
    if not report.ok:
        indices = ", ".join(str(f.index) for f in report.findings)
        print(
            f"robustwrap attack: the attack changed the prediction of {len(report.findings)} certified image(s) ({indices}): "
            f"a bug in robustwrap; reproductions (image, patch, location, settings) saved in {args.output}/, please report them",
            file=sys.stderr,
        )
        return EXIT_BROKEN_CERTIFICATE
    return 0


def _masks(args: argparse.Namespace) -> None:
    from .geometry import MaskSet

    _check_defense_options(args, args.defense, None)
    if args.defense != "patchcleanser":
        text = _smoothing_views(args) if args.defense == "smoothing" else _patchguard_window(args)
        print(text + (f"\n\npicture: {args.plot}" if args.plot is not None else ""))
        return
    grid = {"stride": args.stride} if args.stride else {"num_masks": args.num_masks} if args.num_masks else {}
    mask_set = MaskSet.square(args.image_size, args.patch, **grid)
    if args.plot is not None:
        # The picture first: `robustwrap masks --plot x.png | head` closes stdout early.
        from .plots import plot_mask_set

        plot_mask_set(mask_set, path=args.plot)
    k = len(mask_set)
    tops = sorted({b[0] for b in mask_set.boxes})
    lefts = sorted({b[1] for b in mask_set.boxes})
    lines = [
        mask_set.describe(),
        f"views per image: {k} one-mask + {k * (k - 1) // 2} two-mask = {k * (k + 1) // 2} (K(K+1)/2)",
        f"row starts (top):   {' '.join(map(str, tops))}",
        f"col starts (left):  {' '.join(map(str, lefts))}",
        "",
    ]
    rows = [("mask", "top", "left", "height", "width")] + [(str(i), *map(str, box)) for i, box in enumerate(mask_set.boxes)]
    lines.append(_columns(rows))
    if args.plot is not None:
        lines.append(f"\npicture: {args.plot}")
    print("\n".join(lines))


def _smoothing_views(args: argparse.Namespace) -> str:
    """`robustwrap masks --defense smoothing`: the ablated views, Δ and the vote margin a certificate needs."""
    from .defenses.smoothing import _check_certifiable
    from .geometry import AblationSet, patch_side

    if args.ablation_size is None:
        raise ValueError("--defense smoothing needs --ablation-size N (the band width / block side in pixels)")
    views = AblationSet(args.image_size, args.ablation or "column", args.ablation_size, args.ablation_stride or 1)
    h, w = views.image_size
    side = patch_side(args.patch, (h, w)) if isinstance(args.patch, float) else args.patch
    delta = views.delta(side)
    _check_certifiable(views, (side, side))
    if args.plot is not None:  # the picture first: `robustwrap masks --plot x.png | head` closes stdout early
        from .plots import plot_ablation_set

        plot_ablation_set(views, side, path=args.plot)
    rows = [("view", "top", "left")] + [(str(i), str(r), str(c)) for i, (r, c) in enumerate(views.positions())]
    lines = [
        f"patch {side}x{side} px ({100 * side * side / (h * w):.2f}% of {h}x{w}); {views.describe()}",
        f"a patch meets at most Δ={delta} of the V={len(views)} views: a certificate needs a vote margin above 2Δ={2 * delta}",
        "",
        _columns(rows),
    ]
    return "\n".join(lines)


def _patchguard_window(args: argparse.Namespace) -> str:
    """`robustwrap masks --defense patchguard`: the feature window one patch can touch."""
    from .geometry import feature_window, patch_side

    missing = [f"--{d.replace('_', '-')}" for d in ("receptive_field", "feature_stride") if getattr(args, d) is None]
    if missing:
        raise ValueError(f"--defense patchguard needs {' and '.join(missing)} (and --feature-offset when the model pads)")
    h, w = args.image_size
    r, s, o = (v if isinstance(v, tuple) else (v, v) for v in (args.receptive_field, args.feature_stride, args.feature_offset or 0))
    # A map that covers the image as a convolution padded by o on each side does.
    size = tuple((n + 2 * oo - rr) // ss + 1 for n, rr, ss, oo in zip((h, w), r, s, o))
    if min(size) < 1:
        raise ValueError(f"a receptive field of {r[0]}x{r[1]} px does not fit in the {h}x{w} image")
    side = patch_side(args.patch, (h, w)) if isinstance(args.patch, float) else args.patch
    window = feature_window((h, w), side, r, s, o, size)
    if args.plot is not None:  # the picture first: `robustwrap masks --plot x.png | head` closes stdout early
        from .plots import plot_feature_window

        plot_feature_window((h, w), side, r, s, o, size, path=args.plot)
    geometry = f"receptive field {r[0]}x{r[1]} px, stride {s[0]}x{s[1]}, offset {o[0]}x{o[1]}; (H + 2o - r) // s + 1 per axis"
    return (
        f"patch {side}x{side} px ({100 * side * side / (h * w):.2f}% of {h}x{w}); local logits {size[0]}x{size[1]} ({geometry})\n"
        f"a patch touches at most a {window[0]}x{window[1]} window of local logits: robust masking removes each class's "
        f"largest {window[0]}x{window[1]} window of evidence"
    )


def _predict(args: argparse.Namespace) -> None:
    import torch

    paths = _image_paths(args.images)
    model, _ = _load_model(args)
    model = _with_settings(model, (args.patch or [None])[0], args)
    transform, mode = _preprocessing(model)
    names = _label_names(model)
    records = []
    step = 32
    for start in range(0, len(paths), step):
        chunk = paths[start : start + step]
        x = torch.stack([transform(_read_image(path, mode)) for path in chunk])
        prediction = model.predict(x)
        for path, label, fields in zip(chunk, prediction.tolist(), _evidence(model, x, prediction)):
            records.append({"image": str(path), "prediction": label, "label_name": names[label] if names and label < len(names) else None, **fields})
    if args.json:
        print(json.dumps({"model": args.model, "threat_model": _describe(model), "images": records}, indent=1))
        return
    columns = PREDICT_COLUMNS.get(model.defense, ())
    rows = [("image", "prediction", *(header for header, _ in columns), "certified")]
    for r in records:
        shown = f"{r['prediction']} ({r['label_name']})" if r["label_name"] is not None else str(r["prediction"])
        rows.append((r["image"], shown, *(cell(r) for _, cell in columns), "yes" if r["certified"] else "no"))
    print(_describe(model))
    if model.defense == "smoothing":
        print(f"certified: the votes beat the runner-up's by more than 2Δ = {2 * model.delta} (by 2Δ when the runner-up is a larger class id)")
    elif model.defense == "patchguard":
        print(f"certified: the worst-case evidence margin over every patch position is above the margin setting {model.margin:g} (0 counts when margin is 0 and ties go to the label)")
    print(_columns(rows, align_left=True))


def _evidence(model: RobustPatchClassifier, x: torch.Tensor, prediction: torch.Tensor) -> list[dict[str, Any]]:
    """Per image: whether it is certified against its own prediction (whether any patch could change
    it), with the evidence of the model's defense that decides it (`PREDICT_COLUMNS` shows it)."""
    from .report import CASE_NAMES

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


def _patch(entry: dict) -> str:
    """A manifest entry's patch as `5x5 px (2.44%)`."""
    patch = entry.get("patch")
    if not isinstance(patch, list):
        return _value(patch)
    return f"{patch[0]}x{patch[1]} px ({entry['patch_percent']:.2f}%)" if "patch_percent" in entry else f"{patch[0]}x{patch[1]} px"


def _weights(entry: dict) -> str:
    """Where a manifest entry's weights are: in the package, or on the Hub (the network is needed once)."""
    if entry.get("embedded"):
        return "embedded"
    source = entry.get("weights") or (f"hf-hub:{entry['repo_id']}" if entry.get("repo_id") else None)
    return f"{source} (network once)" if source else "-"


def _manifest() -> dict[str, Any]:
    """The zoo's manifest (`robustwrap/zoo/manifest.json`, what `robustwrap.zoo` reads), as JSON.

    `robustwrap models` lists it from here: importing `robustwrap.zoo` would import torch.
    """
    from importlib import resources

    return json.loads((resources.files("robustwrap") / "zoo" / "manifest.json").read_text())


def _models(args: argparse.Namespace) -> None:
    manifest = _manifest()
    rows = [("name", "architecture", "data", "patch", "masks", "clean", "certified", "weights")]
    for entry in sorted(manifest["models"], key=lambda entry: entry["name"]):
        name = entry["name"]
        marker = " *" if name == manifest["default"] else ""
        metrics = entry.get("metrics") or {}
        rows.append(
            (
                name + marker,
                str(entry.get("architecture", "-")),
                str(entry.get("dataset", "-")),
                _patch(entry),
                _value(entry.get("num_masks")),
                _accuracy(metrics.get("clean_accuracy")),
                _accuracy(metrics.get("certified_accuracy")),
                _weights(entry),
            )
        )
    print(_columns(rows, align_left=True))
    print("\n* the default model (robustwrap certify with no --model)")
    print("embedded: shipped in the package, loads offline; hf-hub:...: downloaded once into the Hugging Face cache, then HF_HUB_OFFLINE=1 works")


# -------------------------------------------------------------------------------------- import
# `robustwrap import`: the format names the authors' code; each saves for one defense.
IMPORT_FORMATS = {"patchcleanser": "patchcleanser", "patchguard": "patchguard", "smoothed-vit": "smoothing", "drs": "smoothing"}


def _import_parser(commands, common: argparse.ArgumentParser) -> None:
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
    parser.add_argument("--out", required=True, type=Path, metavar="DIR", help="the folder to write (must not exist or be empty)")
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
    from .convert import import_checkpoint
    from .hub import save_folder

    if args.out.exists() and (not args.out.is_dir() or any(args.out.iterdir())):
        raise ValueError(f"--out {args.out} already exists and is not an empty folder")
    defense = IMPORT_FORMATS[args.format]
    options = _check_defense_options(args, defense, defense)
    options.update({k: getattr(args, k) for k in ("precision", "margin") if getattr(args, k) is not None})
    model = import_checkpoint(
        args.file, args.format, model=args.model, num_classes=args.num_classes, image_size=args.image_size, patch=args.patch, dataset=args.dataset, **options
    )
    save_folder(model, args.out)
    print(f"{args.file.name} -> {args.out}: {model.model.pretrained_cfg.get('architecture')}, {model.num_classes} classes; {_describe(model)}")
    print(f"certify it: robustwrap certify --model {args.out} --data FOLDER --limit all")


# --------------------------------------------------------------------------------------- train
def _train_parser(commands, common: argparse.ArgumentParser) -> None:
    """`robustwrap train`: certify's model, threat-model and defense options, plus data, training and output."""
    train = commands.add_parser(
        "train",
        parents=[common],
        help="fine-tune a defended model, certify a validation split, save or push it",
        description=(
            "Fine-tune a model for certification (robustwrap.fit_masking, the defense's own strategy by default: Multi-size "
            "Greedy Cutout for PatchCleanser), certify --val-data with the trained model (robustwrap.certify_dataset), "
            "record the measured accuracies in its config and model card, and write a Hub-format folder (--out) or push "
            "it (--push). The model, threat-model and defense options are certify's."
        ),
        epilog=(
            "Many processes: 'torchrun --nproc_per_node N -m robustwrap train ...' trains one model on N processes (NCCL, "
            "one GPU each; gloo on CPUs), --batch-size images per process and step; validation is split between them; "
            "only rank 0 prints, saves and pushes. See the 'At scale' guide of the documentation."
        ),
    )
    _model_options(train, sweep=False)
    data = train.add_argument_group("data")
    data.add_argument("--data", required=True, help="training images: an image folder laid out like torchvision's ImageFolder, or a built-in data set name")
    data.add_argument("--val-data", help="validation images, certified after training; the accuracies go into the model card (default: none, nothing is certified)")
    data.add_argument("--class-map", metavar="MAP", help="class ids of the class folders of --data and --val-data, as for certify")
    data.add_argument("--dataset-name", metavar="NAME", help="the data set's name in the model card (default: the --val-data folder's name)")
    data.add_argument(
        "--augment",
        action="store_true",
        help="train on timm's training augmentation at the model's data config (random resized crop, horizontal flip) "
        "instead of its evaluation preprocessing (resize, center crop)",
    )
    data.add_argument("--workers", type=_count, default=4, metavar="N", help="data-loading worker processes per training process (default 4; 0 loads in the main process)")
    fit = train.add_argument_group("training")
    fit.add_argument("--epochs", type=_positive, default=10, metavar="N", help="epochs (default 10, the papers'; the learning rate drops x0.1 after half)")
    fit.add_argument("--batch-size", type=_positive, default=64, metavar="N", help="training images per step and process (default 64; under torchrun a step trains N x the number of processes)")
    fit.add_argument("--lr", type=_positive_float, metavar="LR", help="learning rate of SGD with momentum 0.9 (default 0.01 for a convolutional network, 0.001 for a transformer)")
    fit.add_argument(
        "--strategy",
        metavar="NAME",
        help="masking strategy: multisize_greedy, greedy, grid, random_mask, random_cutout (PatchCleanser), random_ablation "
        "(smoothing), provable_adversarial (PatchGuard), or none (clean fine-tuning); default: the defense's own",
    )
    fit.add_argument("--seed", type=int, default=0, help="seed of the shuffling, the strategies' randomness and a random initialisation (default 0)")
    fit.add_argument("--checkpoint-dir", type=Path, metavar="DIR", help="write a resumable checkpoint here after every epoch")
    fit.add_argument("--resume", action="store_true", help="continue the run in --checkpoint-dir from its last epoch (same weights as an uninterrupted run)")
    fit.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    output = train.add_argument_group("output (one of them is required)").add_mutually_exclusive_group(required=True)
    output.add_argument("--out", type=Path, metavar="DIR", help="write the trained model to a new folder in the Hub format (robustwrap.from_pretrained(DIR) loads it)")
    output.add_argument("--push", metavar="ORG/NAME", help="push the trained model to this Hugging Face Hub repo")
    train.set_defaults(run=_train)


def _count(text: str) -> int:
    if not re.fullmatch(r"\d+", text.strip()):
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return int(text)


def _train(args: argparse.Namespace) -> None:
    """`robustwrap train`: fit_masking on --data, certify_dataset on --val-data, then save or push (rank 0 only)."""
    import torch
    from torch.utils.data import DataLoader, DistributedSampler

    from .dataset import certify_dataset
    from .fit import STRATEGIES, fit_masking

    if args.strategy is not None and args.strategy not in STRATEGIES:
        raise ValueError(f"--strategy must be one of {', '.join(STRATEGIES)}, got {args.strategy!r}")
    if args.resume and args.checkpoint_dir is None:
        raise ValueError("--resume continues the run in --checkpoint-dir; pass --checkpoint-dir DIR too")
    if args.out is not None and args.out.exists() and (not args.out.is_dir() or any(args.out.iterdir())):
        # Checked before hours of training, not when the model is written.
        raise ValueError(f"--out {args.out} exists and is not an empty folder: choose a new one")
    rank, world, started = _start_distributed(args)
    try:
        torch.manual_seed(args.seed)
        model, model_name = _load_model(args)
        defended = _with_settings(model, (args.patch or [None])[0], args)
        train_set, _ = _load_data(args.data, args.class_map, model_name, defended)
        if args.augment:
            train_set.transform = _preprocessing(defended, training=True)[0]
        val_set, val_name = _load_data(args.val_data, args.class_map, model_name, defended) if args.val_data is not None else (None, None)
        # Under torchrun each process trains on its own shard; DistributedSampler shuffles with the
        # same seed on every rank, so the shards never overlap.
        sampler = DistributedSampler(train_set, shuffle=True, seed=args.seed) if world > 1 else None
        loader = DataLoader(train_set, batch_size=args.batch_size, shuffle=sampler is None, sampler=sampler, num_workers=args.workers)
        history = fit_masking(
            defended,
            loader,
            strategy=args.strategy,
            epochs=args.epochs,
            lr=args.lr,
            checkpoint_dir=args.checkpoint_dir,
            resume=args.resume,
            progress=args.progress and rank == 0,
        )
        defended.eval()
        report = certify_dataset(defended, val_set, progress=args.progress and rank == 0) if val_set is not None else None
        defended.pretrained_info = _trained_info(args, history, report, val_name, world)
        if rank == 0:
            _write_trained(args, defended, history, report, world)
    finally:
        if started:
            torch.distributed.destroy_process_group()


def _start_distributed(args: argparse.Namespace) -> tuple[int, int, bool]:
    """`(rank, world size, started)`: under torchrun (WORLD_SIZE set), join its process group if
    nobody has: NCCL with one GPU per process (cuda:LOCAL_RANK), gloo on CPUs."""
    import torch

    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), False
    if "WORLD_SIZE" not in os.environ:
        return 0, 1, False
    device = _device(args.device)
    if device.type == "cuda":
        if device.index is not None and int(os.environ["WORLD_SIZE"]) > 1:
            raise ValueError(f"--device {args.device}: under torchrun each process takes the GPU of its LOCAL_RANK; pass --device cuda or leave it out")
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size(), True


def _trained_info(args: argparse.Namespace, history, report: CertificationReport | None, val_name: str | None, world: int) -> dict[str, Any]:
    """The model's `pretrained_info`: how it was trained and, with --val-data, what was measured and how to measure it again."""
    import shlex

    final = history.final
    info: dict[str, Any] = {
        "strategy": history.strategy,
        "training": {
            "data": args.data,
            "epochs": len(history),
            "batch_size": args.batch_size * world,
            "processes": world,
            "lr": history.lr,
            "seed": args.seed,
            "augment": args.augment,
            "final_loss": round(final.loss, 4),
            "final_masked_accuracy": round(final.accuracy, 4),
        },
    }
    if report is None:
        return info
    model = f"hf-hub:{args.push}" if args.push is not None else str(args.out)
    command = ["robustwrap", "certify", "--model", model, "--data", args.val_data]
    if args.class_map is not None:
        command += ["--class-map", args.class_map]
    info["dataset"] = args.dataset_name or Path(val_name).name
    info["metrics"] = {
        "vanilla_accuracy": round(report.vanilla_accuracy, 4),
        "clean_accuracy": round(report.clean_accuracy, 4),
        "certified_accuracy": round(report.certified_accuracy, 4),
        "num_images": report.num_images,
        "split": "val",
        "command": shlex.join(command),
    }
    return info


def _write_trained(args: argparse.Namespace, model: RobustPatchClassifier, history, report: CertificationReport | None, world: int) -> None:
    """Print the epochs and the report, then save to --out or push to --push (rank 0 only)."""
    for stats in history.epochs:
        print(f"epoch {stats.epoch}/{len(history)}: loss {stats.loss:.4f}, accuracy on masked images {_accuracy(stats.accuracy)}, lr {stats.lr:g}, {stats.seconds:.1f} s")
    print(f"{world} process(es) x {args.batch_size} images per step; {_describe(model)}")
    if report is not None:
        print(report.summary())
    else:
        print("no --val-data: nothing was certified, the model card records no accuracy")
    if args.push is not None:
        url = model.push_to_hub(args.push)
        print(f"pushed to {url}; robustwrap.from_pretrained('hf-hub:{args.push}') loads it")
    else:
        model.save_pretrained(args.out)
        print(f"saved to {args.out}/; robustwrap.from_pretrained('{args.out}') loads it")


# -------------------------------------------------------------------------------------- models
def _device(name: str | None) -> torch.device:
    import torch

    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device must be cpu, cuda, cuda:N, ..., got {name!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine")
    return device


def _load_model(args: argparse.Namespace) -> tuple[RobustPatchClassifier | nn.Module, str]:
    """The model named by `--model` (and its timm options), on `--device`, in eval mode.

    A zoo, folder or Hub model comes defended; a timm model comes as its plain base model, which
    `_with_settings` wraps with the chosen defense.
    """
    device = _device(args.device)
    spec: str | None = args.model
    timm_only = [f"--{n.replace('_', '-')}" for n in ("num_classes", "in_chans", "image_size") if getattr(args, n) is not None]
    if spec is not None and spec.startswith("timm:"):
        model = _load_timm(spec.removeprefix("timm:"), args)
    else:
        weights = [o for o, given in (("--checkpoint", args.checkpoint is not None), ("--pretrained", args.pretrained)) if given]
        if weights:
            raise ValueError(f"{' and '.join(weights)} go with --model timm:<arch>; other models carry their own weights")
        folder = _folder_of(spec) if spec is not None else None
        if folder is not None and _is_plain_timm_folder(folder):
            model = _load_timm_folder(folder, args)
        else:
            if timm_only:
                raise ValueError(
                    f"{', '.join(timm_only)} apply to timm models (timm:<arch> or a folder saved by timm); "
                    f"{spec or 'the default model'} is a robustwrap model with its own input size, classes and channels"
                )
            zoo = _zoo()
            spec = spec if spec is not None else zoo.DEFAULT_MODEL
            model = _from_pretrained(spec)
    return model.to(device).eval(), spec


def _from_pretrained(spec: str) -> RobustPatchClassifier:
    """A zoo name, a robustwrap folder or a Hub repo (`robustwrap.zoo.from_pretrained`)."""
    return _zoo().from_pretrained(spec)


def _folder_of(spec: str) -> Path | None:
    """The folder `--model` names (`local-dir:FOLDER` or an existing folder), else None."""
    if spec.startswith("local-dir:"):
        folder = Path(spec.removeprefix("local-dir:"))
        if not folder.is_dir():
            raise FileNotFoundError(f"--model {spec}: no such folder")
        return folder
    return Path(spec) if os.path.isdir(spec) else None


def _read_config(folder: Path) -> dict[str, Any]:
    path = folder / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"--model {folder}: no config.json in the folder (expected a model saved by robustwrap or by timm)")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is not valid JSON ({error})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path} holds a JSON {type(config).__name__}, expected an object")  # noqa: TRY004 - a bad file, not a bad argument
    return config


def _is_plain_timm_folder(folder: Path) -> bool:
    """A folder saved by timm (`save_pretrained`/`push_to_hub`): config.json without a robustwrap section."""
    return "robustwrap" not in _read_config(folder)


def _load_timm_folder(folder: Path, args: argparse.Namespace) -> nn.Module:
    """The timm model of a folder saved by timm, with its safetensors weights loaded strictly."""
    import timm

    from . import models  # noqa: F401 - registers the BagNets with timm: timm:bagnet17 is a timm model
    from .hub import load_state_strictly, read_safetensors

    config = _read_config(folder)
    if not isinstance(config.get("architecture"), str) or not timm.is_model(config["architecture"]):
        raise ValueError(f"{folder / 'config.json'} names architecture {config.get('architecture')!r}, which is not a timm model (timm {timm.__version__})")
    weights = folder / "model.safetensors"
    if not weights.is_file():
        pickles = sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt", ".pkl"))
        found = f" (found {', '.join(pickles)}: pickle checkpoints can run code and are refused)" if pickles else ""
        raise FileNotFoundError(f"--model {folder}: no model.safetensors{found}")
    state = read_safetensors(weights, str(weights))
    model = _create_timm(f"local-dir:{folder}", args, _sizes_from_state(config["architecture"], state))
    load_state_strictly(model, state, str(weights), f"the timm {config['architecture']} in {folder / 'config.json'}")
    return model


def _load_timm(arch: str, args: argparse.Namespace) -> nn.Module:
    """A timm `arch` with the weights of `--checkpoint` (loaded strictly) or timm's `--pretrained` ones."""
    import timm

    from . import models  # noqa: F401 - registers the BagNets with timm: timm:bagnet17 is a timm model
    from .hub import load_state_strictly, read_safetensors

    checkpoint: Path | None = args.checkpoint
    if not arch:
        raise ValueError("--model timm:<arch> needs an architecture name, e.g. timm:resnet18")
    if checkpoint is None and not args.pretrained and args.command != "train":
        raise ValueError(f"--model timm:{arch} needs --pretrained (timm's weights) or --checkpoint FILE.safetensors (your trained weights)")
    if checkpoint is not None and args.pretrained:
        raise ValueError("pass --pretrained or --checkpoint, not both")
    if not timm.is_model(arch):
        raise ValueError(f"--model timm:{arch}: unknown timm architecture (see timm.list_models())")
    if checkpoint is None and not args.pretrained:
        return _create_timm(arch, args, {})  # `robustwrap train` from random initialisation
    if checkpoint is None:
        return _timm_pretrained(arch, args)
    if checkpoint.suffix != ".safetensors":
        raise ValueError(f"--checkpoint must be a .safetensors file (pickle checkpoints can run code and are refused), got {checkpoint}")
    if not checkpoint.is_file():
        raise FileNotFoundError(f"--checkpoint {checkpoint}: no such file")
    state = read_safetensors(checkpoint, f"--checkpoint {checkpoint}")
    model = _create_timm(arch, args, _sizes_from_state(arch, state))
    load_state_strictly(model, state, f"--checkpoint {checkpoint}", f"timm:{arch}")
    return model


def _timm_pretrained(arch: str, args: argparse.Namespace) -> nn.Module:
    """timm's pretrained `arch`: from the Hugging Face cache, or downloaded when the Hub can be reached."""
    import timm

    cfg = timm.get_pretrained_cfg(arch)
    hf_id = getattr(cfg, "hf_hub_id", None)
    source = f"hf-hub:{hf_id}" if hf_id else "timm's download URL"
    advice = "run once with network access to cache them, or pass --checkpoint FILE.safetensors"
    if hf_id and not _hf_cached(hf_id, getattr(cfg, "hf_hub_filename", None)):
        from huggingface_hub import constants

        from .hub import _unreachable

        # Without a network, huggingface_hub retries for about 45 s before failing: say why at once.
        reason = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else _unreachable()
        if reason is not None:
            raise OSError(f"timm:{arch} --pretrained: the weights ({source}) are not in the Hugging Face cache and {reason}: {advice}")
    try:
        return _create_timm(arch, args, {}, pretrained=True)
    except OSError as error:  # huggingface_hub's LocalEntryNotFoundError and network errors are OSErrors
        raise OSError(
            f"timm:{arch} --pretrained: the weights ({source}) are not in the Hugging Face cache and could not be downloaded "
            f"({type(error).__name__}); {advice} (HF_HUB_OFFLINE=1 fails at once instead of retrying)"
        ) from error


def _hf_cached(repo_id: str, filename: str | None) -> bool:
    """Whether the Hugging Face cache holds weights of `repo_id` (timm reads safetensors first, else a .bin)."""
    from huggingface_hub import constants, try_to_load_from_cache

    names = [filename] if filename else ["model.safetensors", "open_clip_model.safetensors", "pytorch_model.bin"]
    return any(isinstance(try_to_load_from_cache(repo_id, name, cache_dir=constants.HF_HUB_CACHE), str) for name in names)


def _sizes_from_state(arch: str, state: dict) -> dict[str, int]:
    """The head and stem sizes of a checkpoint, as timm's own pretrained loading adapts them."""
    import timm

    cfg = timm.get_pretrained_cfg(arch)
    cfg = cfg.to_dict() if cfg is not None else {}
    sizes = {}
    head = state.get(f"{cfg.get('classifier')}.weight") if isinstance(cfg.get("classifier"), str) else None
    stem = state.get(f"{cfg.get('first_conv')}.weight") if isinstance(cfg.get("first_conv"), str) else None
    if head is not None and head.ndim >= 2:
        sizes["num_classes"] = head.shape[0]
    if stem is not None and stem.ndim == 4:
        sizes["in_chans"] = stem.shape[1]
    return sizes


def _create_timm(name: str, args: argparse.Namespace, sizes: dict[str, int], pretrained: bool = False) -> nn.Module:
    """`timm.create_model(name)` with `--num-classes`, `--in-chans` (else `sizes`) and `--image-size` where the model takes it."""
    import timm

    kwargs = dict(sizes)
    for key in ("num_classes", "in_chans"):
        if getattr(args, key) is not None:
            kwargs[key] = getattr(args, key)
    if args.image_size is not None:
        # Models with a fixed input size (ViTs) take img_size; convolutional ones take any size.
        try:
            return timm.create_model(name, pretrained=pretrained, img_size=args.image_size, **kwargs)
        except TypeError as error:
            if "img_size" not in str(error):
                raise
    return timm.create_model(name, pretrained=pretrained, **kwargs)


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
        owner, name = DEFENSE_OPTIONS[dest]
        if owner != defense:
            how = f"; this model's defense is {own!r}: pass --defense {owner} to re-wrap it" if own == defense and args.defense is None else ""
            raise ValueError(f"--{dest.replace('_', '-')} is an option of defense {owner!r}, not of {defense!r}{how}")
        options[name] = value
    return options


def _own_options(model: RobustPatchClassifier, given: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """`(patch, options)` that rebuild `model`'s own defense as it is, for `wrap`, under the `given` options."""
    if model.defense == "patchcleanser":
        if len(model.mask_set.patch_sizes) != 1:
            raise ValueError("this model's mask set covers several patch shapes; pass --patch to choose one")
        ph, pw = model.mask_set.patch_sizes[0]
        own = {}
        if "num_masks" not in given and "stride" not in given and model.mask_set.grid is not None and model.mask_set.mask_size is not None:
            own = {"num_masks": model.mask_set.grid}
        return (ph if ph == pw else (ph, pw)), own
    names = {"smoothing": ("ablation", "size", "stride", "threshold", "encoding", "drop_tokens"), "patchguard": ("receptive_field", "feature_stride", "feature_offset", "threshold", "clip")}
    ph, pw = model.patch
    return (ph if ph == pw else (ph, pw)), {name: getattr(model, name) for name in names.get(model.defense, ())}


def _with_settings(model: RobustPatchClassifier | nn.Module, patch, args: argparse.Namespace) -> RobustPatchClassifier:
    """The defended model the command line asks for, in eval mode.

    A plain (timm) base model is wrapped with `--defense` (default PatchCleanser) and its group's
    options. A defended model keeps its defense and settings, unless `--defense`, `--patch` or an
    option of a defense group asks to re-wrap: then its base model (`.model`) is wrapped again, with
    the model's own settings for whatever the command line leaves out when the defense stays, and
    the defense's defaults when it changes. `--precision`, `--margin` and `--views-per-pass` are
    set on the result.
    """
    from .defenses import RobustPatchClassifier, wrap

    own = model.defense if isinstance(model, RobustPatchClassifier) else None
    defense = args.defense or own or "patchcleanser"
    options = _check_defense_options(args, defense, own)
    if own is None:
        model = wrap(model, patch, defense=defense, image_size=args.image_size, **options).eval()
    elif patch is not None or options or defense != own:
        common: dict[str, Any] = {"image_size": model.image_size, "fill": model.fill, "precision": model.precision, "margin": model.margin}
        if defense == own:
            own_patch, own_options = _own_options(model, options)
            patch = own_patch if patch is None else patch
            options = {**own_options, **options}
            common.update(batch_size=model.batch_size, num_classes=model.num_classes)
        model = wrap(model.model, patch, defense=defense, **common, **options).eval()
    if args.precision is not None:
        model.precision = args.precision
    if args.margin is not None:
        model.margin = args.margin
    if args.views_per_pass is not None:
        model.batch_size = args.views_per_pass
    return model


def _describe(model: RobustPatchClassifier) -> str:
    """One line: the threat model and the defense's own settings."""
    mask_set = getattr(model, "mask_set", None)
    if model.defense == "patchcleanser" and mask_set is not None:
        return mask_set.describe()
    (ph, pw), (h, w) = model.patch, model.image_size
    patch = f"patch {ph}x{pw} px ({100 * ph * pw / (h * w):.2f}% of {h}x{w})"
    if model.defense == "smoothing":
        votes = "argmax votes" if model.threshold is None else f"votes softmax >= {model.threshold}"
        return f"{patch}; smoothing: {model.ablation_set.describe()}, Δ={model.delta}, {votes}, encoding {model.encoding}"
    if model.defense == "patchguard":
        (wh, ww), (r, s, o) = model.window, (model.receptive_field, model.feature_stride, model.feature_offset)
        geometry = f"receptive field {r[0]}x{r[1]} px, stride {s[0]}x{s[1]}, offset {o[0]}x{o[1]}"
        return f"{patch}; patchguard: {geometry}, window {wh}x{ww}, detection threshold {model.threshold}, clip {model.clip}"
    return f"{patch}; {model.defense}"


def _label_names(model: RobustPatchClassifier) -> list[str] | None:
    """The model's class names (timm's `pretrained_cfg["label_names"]`), if it has one per class."""
    names = getattr(model, "label_names", None)
    if not names:
        cfg = getattr(model.model, "pretrained_cfg", None)
        names = cfg.get("label_names") if isinstance(cfg, dict) else None
    if not names or len(names) != model.num_classes:
        return None
    return [str(n) for n in names]


# ---------------------------------------------------------------------------------------- data
def _load_data(spec: str | None, class_map: str | None, model_name: str, model: RobustPatchClassifier):
    """`(dataset, name)` for `--data`: a built-in data set name or an ImageFolder directory."""
    zoo = _zoo()
    builtin = zoo.BUILTIN_DATASETS
    if spec is None:
        if model_name not in zoo.list_models():
            raise ValueError(f"--data is required for --model {model_name} (only zoo models name their own data set)")
        if class_map is not None:
            raise ValueError("--class-map goes with an image folder given by --data")
        spec = zoo.zoo_entry(model_name)["dataset"]
        if spec not in builtin:
            raise ValueError(f"--data is required for --model {model_name}: its data set ({spec}) is not shipped with robustwrap; pass --data FOLDER (your copy, in class folders)")
        return zoo.builtin_dataset(spec, transform=_preprocessing(model)[0]), spec
    path = Path(spec)
    if spec in builtin:
        if path.exists():
            raise ValueError(f"--data {spec!r} is both a built-in data set and a folder here; write ./{spec} for the folder")
        if class_map is not None:
            raise ValueError("--class-map goes with an image folder, not a built-in data set")
        return zoo.builtin_dataset(spec, transform=_preprocessing(model)[0]), spec
    if not path.exists():
        known = f" (built-in: {', '.join(builtin)})" if builtin else ""
        raise FileNotFoundError(f"--data {spec}: no such folder, and not a built-in data set{known}")
    if not path.is_dir():
        raise ValueError(f"--data {spec} is a file; expected a folder of class folders of images (torchvision ImageFolder)")
    folders = sorted(entry.name for entry in os.scandir(path) if entry.is_dir())
    if not folders:
        raise FileNotFoundError(f"--data {spec}: no class folders in it (expected class folders of images, as torchvision's ImageFolder)")
    class_to_idx = _class_ids(folders, model, parse_class_map(class_map) if class_map is not None else None, spec)
    transform, mode = _preprocessing(model)
    try:
        dataset = _image_folder(path, class_to_idx, transform, mode)
    except FileNotFoundError as error:
        raise FileNotFoundError(f"--data {spec}: {error} (expected class folders of images, as torchvision's ImageFolder)") from None
    return dataset, spec


def _class_ids(folders: list[str], model: RobustPatchClassifier, class_map: dict[str, int] | list[str] | None, spec: str) -> dict[str, int]:
    """The model's class id of each class folder of `--data` (see `--class-map`).

    Raises:
        ValueError: for folders that the class map or the model's label names do not name, ids
            out of range, more folders than classes, and a subset of the classes whose ids
            nothing determines.
    """
    n = model.num_classes
    shown = ", ".join(folders[:5]) + (", ..." if len(folders) > 5 else "")
    if isinstance(class_map, list):
        if len(class_map) != n:
            raise ValueError(f"--class-map lists {len(class_map)} class names but the model has {n} classes")
        class_map = {name: i for i, name in enumerate(class_map)}
    if class_map is not None:
        missing = [f for f in folders if f not in class_map]
        if missing:
            raise ValueError(f"--class-map does not name the class folders {', '.join(missing[:5])} of --data {spec}")
        bad = {f: class_map[f] for f in folders if not 0 <= class_map[f] < n}
        if bad:
            raise ValueError(f"--class-map gives class ids {bad} outside the model's 0..{n - 1}")
        return {f: class_map[f] for f in folders}
    if len(folders) > n:
        raise ValueError(f"--data {spec} has {len(folders)} class folders but the model has {n} classes")
    names = _label_names(model)
    if names is not None:
        if len(set(names)) != len(names):
            names = None  # duplicated names cannot identify a class
        else:
            known = [f for f in folders if f in names]
            if len(known) == len(folders):
                return {f: names.index(f) for f in folders}
            if known:
                unknown = [f for f in folders if f not in names]
                raise ValueError(
                    f"--data {spec}: the class folders {', '.join(known[:3])} are label names of the model but "
                    f"{', '.join(unknown[:3])} are not; pass --class-map name=id,... to say which class each folder is"
                )
    if all(re.fullmatch(r"\d+", f) and int(f) < n for f in folders):
        return {f: int(f) for f in folders}  # folders named by class id (0, 1, ..., 10, 11: not sorted as strings)
    if len(folders) == n:
        return {f: i for i, f in enumerate(folders)}  # torchvision's ImageFolder numbering: sorted names
    raise ValueError(
        f"--data {spec} has {len(folders)} class folders ({shown}) for a model of {n} classes, and "
        f"{'none of them is a label name of the model' if names else 'the model has no label names to match them'}: "
        "which classes they are is ambiguous; pass --class-map name=id,... (or a JSON file)"
    )


def _image_folder(path: Path, class_to_idx: dict[str, int], transform, mode: str):
    """torchvision's ImageFolder over `path` with the given class ids instead of `0..n-1`."""
    import functools

    from torchvision.datasets import ImageFolder

    class _Folder(ImageFolder):
        def find_classes(self, directory):
            return sorted(class_to_idx), dict(class_to_idx)

    return _Folder(str(path), transform=transform, loader=functools.partial(_read_image, mode=mode))


def _preprocessing(model: RobustPatchClassifier, training: bool = False):
    """`(transform, PIL mode)` from the model's own data config (timm's resolve_data_config); with
    `training`, timm's training augmentation (random resized crop, horizontal flip) at that config."""
    from timm.data import create_transform, resolve_data_config

    channels = model.in_chans or 3
    h, w = model.image_size
    config = resolve_data_config({"input_size": (channels, h, w)}, model=model.model)
    for key in ("mean", "std"):
        if channels == 1 and len(config[key]) == 3:
            # an RGB model rebuilt for grey images (--in-chans 1), as timm sums its first conv's RGB weights
            config[key] = (sum(config[key]) / 3,)
        if len(config[key]) != channels:
            raise ValueError(f"the model's data config has {len(config[key])} {key} values but the model takes {channels} channels")
    return create_transform(**config, is_training=training), "L" if channels == 1 else "RGB"


def _read_image(path: str | Path, mode: str):
    from PIL import Image

    try:
        with Image.open(path) as image:
            return image.convert(mode)
    except FileNotFoundError:
        raise FileNotFoundError(f"no such image: {path}") from None
    except (OSError, ValueError) as error:
        raise OSError(f"cannot read image {path}: {_one_line(error)}") from None


def _zoo():
    """`robustwrap.zoo`: the model zoo and its built-in data sets."""
    from . import zoo

    return zoo


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
