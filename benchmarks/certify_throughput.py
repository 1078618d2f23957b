"""Certification throughput of every defense against the forward-pass bound (issue 14).

For each model (the zoo's `mnist_test_resnet_msgc` at 32x32, timm `resnet18` and
`vit_small_patch16_224` at 224 with random weights) and each view defense (PatchCleanser,
(De)Randomized Smoothing), prints JSON with views per second of
  - `bound`: the bare model on the same number of views, at the layout and views per pass the
    defense picks (`robustwrap.views.auto_channels_last` / `auto_batch_size`),
  - `bound_inference_copy` (CPU, convolutional networks): the same for the model's inference
    copy (`robustwrap.views.build_inference_copy`: BatchNorm folded, channels_last weights), the
    module certification actually runs the views through; `full_over_inference_copy` is then the
    scheduler's own overhead,
  - `certify_full`: `certify(early_exit=False)` (every view),
  - `certify_early_exit`: `certify()`; its rate counts the views a full evaluation needs, so it
    shows the speed-up early exit gives (and its ratio to the bound the wall time it takes),
  - `naive_pair_loop` (PatchCleanser): one mask pair per forward pass over the images,
and the time ratios `certify_full / bound` (target <= 1.10) and `early exit time / bound time`
(target <= 0.80 on the zoo model). Methods are interleaved, best of `--repeats`.
PatchGuard runs one forward pass per image (no views), so it is not measured here.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/certify_throughput.py [--models zoo,resnet18,vit_small_patch16_224]
        [--images 2] [--zoo-images 40] [--repeats 2] [--threads 1] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import timm
import torch

import robustwrap
from robustwrap.views import auto_channels_last, build_inference_copy, mask_images


def timed(fn, device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def load(name: str, device: torch.device, images: int, zoo_images: int):
    if name == "zoo":
        zoo = robustwrap.create_model("mnist_test_resnet_msgc")
        base, size = zoo.model, 32
        from speed_vs_main import digits

        path = "/tmp/robustwrap_digits.pt"
        if not os.path.exists(path):
            digits(path)
        data = torch.load(path)
        x, y = data["x"][:zoo_images], data["y"][:zoo_images]
        return base.to(device).eval(), size, x.to(device), y.to(device), 5
    torch.manual_seed(0)
    base = timm.create_model(name, num_classes=1000).to(device).eval()
    x = torch.randn(images, 3, 224, 224, device=device)
    return base, 224, x, None, 0.02


def measure(name: str, defense: str, args, device) -> dict:
    base, size, x, y, patch = load(name, device, args.images, args.zoo_images)
    options = {"num_masks": 6} if defense == "patchcleanser" else {"size": 19 if size == 224 else 4, "stride": 1 if size == 32 else 8}
    model = robustwrap.wrap(base, patch=patch, defense=defense, image_size=size, **options).eval()
    model.num_classes  # resolve once, outside the timings
    if y is None:
        y = model.predict(x)  # random weights: certify against the model's own prediction
    full_views = int(model.certify(x[:1], y[:1], early_exit=False).num_views.sum()) * x.shape[0]
    batch_size, channels_last = model.batch_size, auto_channels_last(base)
    blank = torch.randn(batch_size, x.shape[1], size, size, device=device)
    if channels_last:
        blank = blank.contiguous(memory_format=torch.channels_last)
    chunks = [min(batch_size, full_views - s) for s in range(0, full_views, batch_size)]
    results = {}

    def bound():
        with torch.no_grad():
            for n in chunks:
                base(blank[:n])

    fast = build_inference_copy(base) if device.type == "cpu" else None

    def bound_copy():
        with torch.no_grad():
            for n in chunks:
                fast(blank[:n])

    def full():
        results["full"] = model.certify(x, y, early_exit=False)

    def early():
        results["early"] = model.certify(x, y)

    methods = {"bound": bound, "certify_full": full, "certify_early_exit": early}
    if fast is not None:
        methods["bound_inference_copy"] = bound_copy
    if defense == "patchcleanser":
        keep = model.mask_set.keep_masks(device)
        k = len(model.mask_set)
        i_idx, j_idx = torch.triu_indices(k, k)
        fill = torch.zeros((), device=device)

        def pair_loop():
            with torch.no_grad():
                for i, j in zip(i_idx.tolist(), j_idx.tolist()):
                    base(mask_images(x, keep[i] & keep[j], fill)).argmax(1)

        methods["naive_pair_loop"] = pair_loop
    bound()  # warm-up
    times = {m: float("inf") for m in methods}
    for _ in range(args.repeats):
        for m, fn in methods.items():
            times[m] = min(times[m], timed(fn, device))
    assert int(results["full"].num_views.sum()) == full_views
    assert torch.equal(results["full"].certified, results["early"].certified)
    return {
        "model": name,
        "defense": defense,
        "image_size": size,
        "images": x.shape[0],
        "full_views": full_views,
        "early_exit_views": int(results["early"].num_views.sum()),
        "batch_size": batch_size,
        "channels_last": channels_last,
        "views_per_second": {m: round(full_views / t, 1) for m, t in times.items()},
        "full_over_bound": round(times["certify_full"] / times["bound"], 3),
        "early_exit_over_bound": round(times["certify_early_exit"] / times["bound"], 3),
        # the scheduler's own overhead: certify against the module it actually runs the views through
        "full_over_inference_copy": round(times["certify_full"] / times["bound_inference_copy"], 3) if fast is not None else None,
        "early_exit_over_inference_copy": round(times["certify_early_exit"] / times["bound_inference_copy"], 3) if fast is not None else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="zoo,resnet18,vit_small_patch16_224")
    parser.add_argument("--defenses", default="patchcleanser,smoothing")
    parser.add_argument("--images", type=int, default=1, help="random images for the 224 models")
    parser.add_argument("--zoo-images", type=int, default=40, help="shipped digits for the zoo model")
    parser.add_argument("--repeats", type=int, default=2, help="best of this many interleaved runs")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    rows = [measure(m, d, args, device) for m in args.models.split(",") for d in args.defenses.split(",")]
    print(
        json.dumps(
            {
                "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
                "threads": torch.get_num_threads(),
                "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
                "platform": platform.processor() or platform.machine(),
                "torch": torch.__version__,
                "repeats": args.repeats,
                "results": rows,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    import sys

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    main()
