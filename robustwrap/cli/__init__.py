"""The `robustwrap` command: certify, attack, masks, predict, models, import and train.

```
robustwrap certify                                  # the embedded default model on the first 100 shipped digits
robustwrap certify --limit all                      # ... on all 1,000 of them
robustwrap certify --model hf-hub:org/name --data val/ --patch 1%,2%,3% --plot out/ --report sweep.json
robustwrap certify --model timm:resnet18 --pretrained --data val/ --patch 2%
robustwrap certify --model timm:resnet18 --pretrained --data val/ --defense smoothing --ablation-size 19
robustwrap attack --limit 10 --output findings/       # clean, certified and empirical robust accuracy
robustwrap masks --image-size 224 --patch 2% --num-masks 6 --plot masks.png
robustwrap predict digit.png digits/ --json
robustwrap models                                   # the model zoo
robustwrap import vit_base_patch16_224_imagenette.pth --format patchcleanser --out pc-vit/   # a published checkpoint
robustwrap train --model timm:resnet18 --pretrained --data train/ --val-data val/ --out my-model/
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

Each command is a module of this package (`certify`, `attack`, `masks`, `predict`, `models`,
`import_`, `train`) that registers its subparser and holds its handler; `_options` builds the
shared options (model, threat model, defense groups) and reads their values, `_loading` loads
models and data (it is imported at start-up but imports torch, timm and torchvision only inside
the functions the handlers call), and `_format` prints.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Sequence

from . import attack, certify, import_, masks, models, predict, train
from ._format import _one_line
from ._options import EXIT_BROKEN_CERTIFICATE, EXIT_ERROR, EXIT_INTERRUPTED, EXIT_USAGE, parse_class_map, parse_patch

__all__ = ["EXIT_BROKEN_CERTIFICATE", "EXIT_ERROR", "EXIT_INTERRUPTED", "EXIT_USAGE", "main", "parse_class_map", "parse_patch"]

# Errors a user can cause: a wrong option, a missing or unreadable file, no network, a missing
# optional package. They are printed as one line; anything else is a bug and keeps its traceback.
EXPECTED_ERRORS: tuple[type[BaseException], ...] = (ValueError, TypeError, OSError, ImportError, FloatingPointError)


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
    from .. import __version__

    return f"robustwrap {__version__}"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="robustwrap",
        description="Certifiably patch-robust image classifiers: certify a model against an adversarial patch, attack it, "
        "show a defense's views, predict images, list the model zoo, import a published checkpoint, train a model.",
        epilog="'robustwrap COMMAND --help' explains a command. The concepts (threat model, patch units, what a "
        "certificate proves) are on the Concepts page of the documentation (docs/concepts.md).",
    )
    parser.add_argument("--version", action="version", version=_version())
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--traceback", action="store_true", help="show the full traceback of an error instead of one line")

    for command in (certify, attack, masks, predict, models, import_, train):  # the order of `robustwrap --help`
        command.register(commands, common)
    return parser
