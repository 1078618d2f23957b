"""Throughput of fine-tuning and certification per device, to turn into GPU-hours (docs/guides/at-scale.md).

For each timm model (random weights, 10 classes, 224x224; resnet18 and vit_tiny_patch16_224 by
default) wrapped with PatchCleanser at the papers' threat model (2% patch = 32 px, 6x6 masks),
prints one JSON object with, per model:
  - `greedy_search_views_per_s`: Greedy Cutout's search alone (`robustwrap.GreedyCutout`, 2K-1 = 71
    masked views per training image, no gradient, eval mode); the views are counted by a hook;
  - `train_images_per_s`: `fit_masking` with `strategy="random_mask"` (no search): forward, backward
    and SGD step on masked images;
  - `greedy_train_images_per_s`: `fit_masking` with `strategy="greedy"` (search + training), the
    rate that Greedy Cutout fine-tuning runs at;
  - `certify_views_per_s`: `certify(early_exit=False)`, every one of the K(K+1)/2 = 666 views of an
    image (a certified image needs all of them; early exit only shortens uncertified ones).
Each figure is one timed run after one warm-up; on a shared machine they vary by tens of percent.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/at_scale.py [--models resnet18,vit_tiny_patch16_224]
        [--image-size 224] [--train-images 4] [--search-images 2] [--certify-images 1] [--threads 1] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path

import timm
import torch
from torch.utils.data import DataLoader, TensorDataset

import robustwrap
from robustwrap.augment import create_augmentation

sys.path.insert(0, str(Path(__file__).resolve().parent))
from certify_throughput import timed  # the one timer of the speed benchmarks

NUM_CLASSES = 10



def create(arch: str, size: int) -> robustwrap.PatchCleanser:
    """`arch` with random weights at `size` x `size`, wrapped with the papers' 2% patch and 6x6 masks."""
    torch.manual_seed(0)
    extra = {"img_size": size} if "vit" in arch else {}
    return robustwrap.wrap(timm.create_model(arch, num_classes=NUM_CLASSES, **extra), patch=0.02, num_masks=6, image_size=size)


def fit_rate(arch: str, size: int, strategy: str, x: torch.Tensor, y: torch.Tensor, batch: int, device: torch.device) -> float:
    """Training images per second of one `fit_masking` epoch (its own clock, validation excluded)."""
    defended = create(arch, size).to(device)
    loader = DataLoader(TensorDataset(x, y), batch_size=batch)
    robustwrap.fit_masking(defended, DataLoader(TensorDataset(x[:2], y[:2]), batch_size=2), strategy=strategy, epochs=1, progress=False)  # warm-up
    history = robustwrap.fit_masking(defended, loader, strategy=strategy, epochs=1, progress=False)
    return len(x) / history.final.seconds


def measure(arch: str, args: argparse.Namespace, device: torch.device) -> dict:
    g = torch.Generator().manual_seed(0)
    n = max(2, args.train_images, args.search_images, args.certify_images)  # 2: BatchNorm trains on 2 images or more
    x = torch.randn(n, 3, args.image_size, args.image_size, generator=g).to(device)
    y = torch.randint(NUM_CLASSES, (n,), generator=g).to(device)
    defended = create(arch, args.image_size).to(device).eval()
    base = defended.model

    views = [0]
    hook = base.register_forward_hook(lambda module, inputs, output: views.__setitem__(0, views[0] + inputs[0].shape[0]))
    search = create_augmentation("greedy", defended.mask_set, base, fill=defended.fill, batch_size=defended.batch_size)
    search(x[:1], y[:1])  # warm-up
    views[0] = 0
    xs, ys = x[: args.search_images], y[: args.search_images]
    seconds = timed(lambda: search(xs, ys), device)
    search_views = views[0]
    hook.remove()

    defended.certify(x[:1], y[:1])  # warm-up (early exit: one forward pass of views suffices)
    xc, yc = x[: args.certify_images], y[: args.certify_images]
    result = [None]
    certify_seconds = timed(lambda: result.__setitem__(0, defended.certify(xc, yc, early_exit=False)), device)
    certify_views = int(result[0].num_views.sum())

    xt, yt = x[: args.train_images], y[: args.train_images]
    return {
        "model": arch,
        "params_millions": round(sum(p.numel() for p in base.parameters()) / 1e6, 2),
        "threat_model": defended.mask_set.describe(),
        "views_per_pass": defended.batch_size,
        "greedy_search_views_per_image": search_views / len(xs),
        "greedy_search_views_per_s": round(search_views / seconds, 2),
        "train_images_per_s": round(fit_rate(arch, args.image_size, "random_mask", xt, yt, args.train_images, device), 3),
        "greedy_train_images_per_s": round(fit_rate(arch, args.image_size, "greedy", xt, yt, args.train_images, device), 3),
        "certify_views_per_image": certify_views / len(xc),
        "certify_views_per_s": round(certify_views / certify_seconds, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="resnet18,vit_tiny_patch16_224", help="comma list of timm architectures (random weights)")
    parser.add_argument("--image-size", type=int, default=224, help="input size in pixels (default 224, the papers')")
    parser.add_argument("--train-images", type=int, default=4, help="images of the timed fit_masking epochs (one batch)")
    parser.add_argument("--search-images", type=int, default=2, help="images of the timed Greedy Cutout search")
    parser.add_argument("--certify-images", type=int, default=1, help="images of the timed certification (666 views each)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: the machine may be shared)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    results = [measure(arch, args, device) for arch in args.models.split(",")]
    machine = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine(),
        "threads": args.threads,
        "cores": os.cpu_count(),
        "load_average_1min": round(os.getloadavg()[0], 2),
        "torch": torch.__version__,
        "timm": timm.__version__,
    }
    print(json.dumps({"machine": machine, "results": results}, indent=1))


if __name__ == "__main__":
    main()
