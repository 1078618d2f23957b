"""Certification throughput against the forward-pass bound (issue: the core).

Prints JSON: seconds per certified image for `certify(early_exit=False)` on a timm resnet18 at
224x224 with 36 masks (666 views per image), measured side by side in one run with
  (a) the bound: the bare model on the same number of views at the same batch size, and
  (b) a naive loop: one `(i, j)` pair per forward pass over the batch of images.
Random weights are fine: the work does not depend on them with early exit off.

    python benchmarks/certify_throughput.py [--images 2] [--batch-size 64] [--repeats 2] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import timm
import torch

import robustwrap
from robustwrap.views import mask_images


def timed(fn, device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2, help="best of this many runs of each method")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--arch", default="resnet18")
    args = parser.parse_args()

    device = torch.device(args.device)
    torch.manual_seed(0)
    base = timm.create_model(args.arch, num_classes=1000).to(device).eval()
    model = robustwrap.wrap(base, patch=0.02, num_masks=6, batch_size=args.batch_size).eval()
    k = len(model.mask_set)
    views_per_image = k * (k + 1) // 2
    x = torch.randn(args.images, 3, 224, 224, device=device)
    y = torch.zeros(args.images, dtype=torch.long, device=device)
    n_views = args.images * views_per_image
    model.num_classes  # resolve once, outside the timings

    blank = torch.randn(args.batch_size, 3, 224, 224, device=device)
    chunks = [min(args.batch_size, n_views - s) for s in range(0, n_views, args.batch_size)]

    def bound():
        with torch.inference_mode():
            for n in chunks:
                base(blank[:n])

    result = {}

    def ours():
        result["certify"] = model.certify(x, y, early_exit=False)

    keep = model.mask_set.keep_masks(device)
    i_idx, j_idx = torch.triu_indices(k, k)
    fill = torch.zeros((), device=device)

    def pair_loop():
        with torch.inference_mode():
            for i, j in zip(i_idx.tolist(), j_idx.tolist()):
                base(mask_images(x, keep[i] & keep[j], fill)).argmax(1)

    methods = {"bound_bare_model": bound, "robustwrap_certify": ours, "pair_per_forward_loop": pair_loop}
    bound()  # warm-up: allocator and kernels
    times = {name: float("inf") for name in methods}
    for _ in range(args.repeats):
        for name, fn in methods.items():  # interleaved so that drift hits every method alike
            times[name] = min(times[name], timed(fn, device))
    assert result["certify"].total_views == n_views

    per_image = {name: t / args.images for name, t in times.items()}
    print(
        json.dumps(
            {
                "arch": args.arch,
                "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
                "cpu_threads": torch.get_num_threads(),
                "platform": platform.processor() or platform.machine(),
                "torch": torch.__version__,
                "image_size": 224,
                "mask_set": model.mask_set.describe(),
                "images": args.images,
                "views_per_image": views_per_image,
                "batch_size": args.batch_size,
                "repeats": args.repeats,
                "seconds_per_image": {name: round(t, 3) for name, t in per_image.items()},
                "ratio_certify_to_bound": round(per_image["robustwrap_certify"] / per_image["bound_bare_model"], 3),
                "ratio_pair_loop_to_certify": round(per_image["pair_per_forward_loop"] / per_image["robustwrap_certify"], 3),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
