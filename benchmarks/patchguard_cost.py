"""PatchGuard's certificate against the forward pass it certifies: seconds per image, side by side.

Certification with PatchGuard costs one forward pass of the local-logit model plus the window
arithmetic of `robustwrap.defenses.patchguard.masking_certificate` (robust masking and the
evidence bounds over every window, in float64). This measures both in one run, on BagNet-17 at
224 px with 1,000 classes (random weights: the cost does not depend on them) and a 32 px patch
(2% of the image; a 6x6 window of the 26x26 map), on random images:

- `forward`: the base model's forward pass alone (`inference_mode`, float32);
- `certificate`: `masking_certificate` alone, on the local logits that forward pass returned;
- `certify`: `PatchGuard.certify` end to end (both, plus the checks), for reference.

Each is timed `--repeats` times after a warm-up; the best run counts. Target: the certificate
costs less than the forward pass (`certificate_over_forward < 1`). Prints JSON.

    python benchmarks/patchguard_cost.py [--images 4] [--threads 1] [--repeats 3]
"""

from __future__ import annotations

import os

# libgomp reads these when torch loads: set them first. PASSIVE: idle OpenMP threads sleep
# instead of spinning, so a busy machine does not turn the spinning into noise in the figures.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import json
import platform
import time
from collections.abc import Callable

import torch

import robustwrap
from robustwrap.defenses.patchguard import masking_certificate
from robustwrap.models import bagnet17


def best_seconds(run: Callable[[], object], repeats: int) -> float:
    """The fastest of `repeats` runs of `run()`, in seconds."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=4, help="random 224 px images (default 4)")
    parser.add_argument("--batch-size", type=int, default=None, help="images per forward pass (default: all of them)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each part, after a warm-up; the best counts")
    parser.add_argument("--patch", type=int, default=32, help="patch side in pixels (default 32: 2%% of 224x224)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    for name in ("images", "threads", "repeats", "patch"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    batch = args.batch_size or args.images
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    model = bagnet17(num_classes=1000).eval().to(args.device)
    defended = robustwrap.wrap(model, defense="patchguard", patch=args.patch, image_size=224)
    x = torch.randn(args.images, 3, 224, 224, device=args.device)
    y = torch.randint(1000, (args.images,), device=args.device)
    window = defended.window

    def forward() -> torch.Tensor:
        with torch.inference_mode():
            return torch.cat([model(x[i : i + batch]) for i in range(0, args.images, batch)])

    def sync(run: Callable[[], object]) -> Callable[[], object]:
        def timed():
            out = run()
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            return out

        return timed

    local = sync(forward)()  # warm-up, and the local logits the certificate runs on
    certificate = sync(lambda: masking_certificate(local, y, window, defended.threshold, defended.clip, defended.margin))
    certify = sync(lambda: defended.certify(x, y))
    certificate()
    certify()
    seconds = {
        "forward": best_seconds(sync(forward), args.repeats) / args.images,
        "certificate": best_seconds(certificate, args.repeats) / args.images,
        "certify": best_seconds(certify, args.repeats) / args.images,
    }
    ratio = seconds["certificate"] / seconds["forward"]
    out = {
        "model": "bagnet17",
        "num_classes": 1000,
        "image_size": [224, 224],
        "patch": [args.patch, args.patch],
        "local_logits": list(local.shape[1:]),
        "window": list(window),
        "images": args.images,
        "batch_size": batch,
        "repeats": args.repeats,
        "device": args.device,
        "threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "seconds_per_image": {k: round(v, 5) for k, v in seconds.items()},
        "certificate_over_forward": round(ratio, 4),
        "target_certificate_below_forward": ratio < 1,
    }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
