"""The adaptive patch attack: surrogate cost per step, and empirical vs certified accuracy (issue 13).

Prints JSON with two sections:

- `views_per_step`: for each defense, the base-model views one gradient step of the
  defense-aware surrogate needs (`AttackResult.views_per_step`), against a naive attack that
  runs every view of the defense at every step (`naive_views_per_step`), and their ratio.
  PatchCleanser and smoothing wrap the zoo's MNIST base model with its threat model (a 5x5
  patch on 32x32); PatchGuard a random-weight `bagnet_tiny` (its local logits are one view).
  Each attacks the model's own predictions on the first `--images` held-out digits.
- `accuracy`: for every zoo model, `robustwrap.audit` on the first `--images` held-out digits:
  clean, certified and empirical robust accuracy side by side, and whether every certificate
  held (empirical >= certified).

    python benchmarks/attack.py [--images 16] [--steps 20] [--budget 20000] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import timm
import torch
from timm.data import create_transform, resolve_data_config

import robustwrap
from robustwrap import zoo


def digits(model, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first `count` held-out digits of a zoo model's data set, as its preprocessing gives them."""
    data = zoo.builtin_dataset("mnist-heldout", transform=create_transform(**resolve_data_config(model=model.model)))
    images, labels = zip(*(data[i] for i in range(count)))
    return torch.stack(images), torch.tensor(labels)


def views_per_step(images: int, steps: int) -> list[dict]:
    zoo_model = robustwrap.create_model(zoo.DEFAULT_MODEL).eval()
    x, _ = digits(zoo_model, images)
    base = zoo_model.model
    bagnet = timm.create_model("bagnet_tiny", num_classes=10, in_chans=1)
    bagnet.pretrained_cfg = {**bagnet.pretrained_cfg, "mean": base.pretrained_cfg["mean"], "std": base.pretrained_cfg["std"]}
    defended = {
        "patchcleanser": zoo_model,
        "smoothing": robustwrap.wrap(base, patch=zoo_model.patch, defense="smoothing", size=4).eval(),
        "patchguard": robustwrap.wrap(bagnet, patch=zoo_model.patch, defense="patchguard", image_size=32).eval(),
    }
    rows = []
    for name, model in defended.items():
        start = time.perf_counter()
        # The model's own predictions as labels: every image costs real steps (random weights too).
        result = robustwrap.attack(
            model, x, model.predict(x), steps=steps, locations=("guided", 2), generator=torch.Generator().manual_seed(0), progress=False
        )
        rows.append(
            {
                "defense": name,
                "views_per_step": round(result.views_per_step, 2),
                "naive_views_per_step": result.naive_views_per_step,
                "ratio": round(result.views_per_step / result.naive_views_per_step, 4),
                "success_rate": result.success_rate,
                "forward_passes": result.forward_passes,
                "seconds": round(time.perf_counter() - start, 1),
            }
        )
    return rows


def accuracy(images: int, steps: int, budget: int) -> list[dict]:
    rows = []
    for name in [n for n in robustwrap.list_models() if zoo.zoo_entry(n).get("embedded")]:  # the MNIST models; the papers' need ImageNet
        model = robustwrap.create_model(name).eval()
        x, y = digits(model, images)
        start = time.perf_counter()
        report = robustwrap.audit(model, (x, y), steps=steps, budget=budget, progress=False)
        entry = zoo.zoo_entry(name)
        rows.append(
            {
                "model": name,
                "defense": report.defense,
                "patch": list(report.patch),
                "images": report.num_images,
                "clean_accuracy": report.clean_accuracy,
                "certified_accuracy": report.certified_accuracy,
                "empirical_robust_accuracy": report.empirical_accuracy,
                "certificates_held": report.ok,
                "positions_per_certified_image": sorted({r.positions for r in report.records if r.certified}),
                "zoo_certified_accuracy_1000": entry.get("metrics", {}).get("certified_accuracy"),
                "seconds": round(time.perf_counter() - start, 1),
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=16, help="held-out digits per measurement")
    parser.add_argument("--steps", type=int, default=20, help="attack steps per run")
    parser.add_argument("--budget", type=int, default=20_000, help="audit: surrogate views per image")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    out = {
        "benchmark": "attack",
        "torch": torch.__version__,
        "machine": platform.machine(),
        "threads": args.threads,
        "images": args.images,
        "steps": args.steps,
        "budget": args.budget,
        "views_per_step": views_per_step(args.images, args.steps),
        "accuracy": accuracy(args.images, args.steps, args.budget),
    }
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
