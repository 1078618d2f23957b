"""`robustwrap attack`: certify, then attack every correctly predicted image (`robustwrap.audit`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from ._loading import _check_tau, _describe, _load_data, _load_model, _set_tau, _with_settings
from ._options import EXIT_BROKEN_CERTIFICATE, _limit, _model_options, _positive, _positive_float, _tau_option

# `robustwrap attack` with no --limit attacks this many images: the audit attacks every correctly
# predicted image, certified ones included, and each may spend --budget surrogate views (forward
# and backward through the base model). Measured on a loaded 2-core CPU (load average 6): the
# embedded MNIST model took 224 s for 4 digits at 20,000 views per image, about a minute each.
# robustwrap.audit's own budget (2,000,000: every patch position of a 32x32 digit) is for a GPU.
DEFAULT_ATTACK_LIMIT = 10
DEFAULT_ATTACK_BUDGET = 20_000


def register(commands, common: argparse.ArgumentParser) -> None:
    """`robustwrap attack`: its subparser."""
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
    search.add_argument(
        "--detect",
        action="store_true",
        help="audit certified detection instead of the prediction (PatchCleanser, PatchGuard, PatchCURE): certify with "
        "certify_detection and attack the detector; a certified image attacked into a wrong label without an alert is a finding",
    )
    _tau_option(search)
    output = attack.add_argument_group("output")
    output.add_argument("--output", type=Path, default=Path("attack-findings"), metavar="DIR", help="folder for reproductions of broken certificates (default attack-findings; written only when there is one)")
    output.add_argument("--report", type=Path, metavar="FILE.json", help="write the audit report (accuracies, settings, every image) as JSON")
    output.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    attack.set_defaults(run=_attack)


def _attack(args: argparse.Namespace) -> int:
    """`robustwrap attack`: certify, attack every correct image, print the three accuracies; 3 on a broken certificate."""
    from ..attack import audit

    _check_tau(args)
    model, model_name = _load_model(args)
    defended = _with_settings(model, (args.patch or [None])[0], args)
    _set_tau(args, [defended])
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
        guarantee="detection" if args.detect else "prediction",
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
            f"robustwrap attack: the attack changed the {'detected label' if args.detect else 'prediction'} of "
            f"{len(report.findings)} certified image(s) ({indices}): "
            f"a bug in robustwrap; reproductions (image, patch, location, settings) saved in {args.output}/, please report them",
            file=sys.stderr,
        )
        return EXIT_BROKEN_CERTIFICATE
    return 0
