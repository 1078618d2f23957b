"""Token dropping for (De)Randomized Smoothing on ViTs: views/s and seconds per image, on and off (issue 20).

For each model (timm `vit_tiny_patch16_224`, `vit_small_patch16_224` at 224x224, random weights:
speed does not depend on them) and each ablation (19 px columns at stride 1: 224 views, Salman
et al.'s ImageNet setting; 75 px blocks at stride 10: 23 x 23 = 529 views), certifies the same
images with `drop_tokens=True` and `drop_tokens=False` side by side, interleaved, best of
`--repeats`, every view evaluated (`certify(early_exit=False)`), and prints one JSON line per
setting plus the ratio:

    OMP_WAIT_POLICY=PASSIVE python benchmarks/tokens.py [--models vit_tiny_patch16_224,vit_small_patch16_224]
        [--ablations column,block] [--images 1] [--repeats 1] [--threads 1] [--device cpu]

A 19 px column meets 2 or 3 of the 14 token columns (28 or 42 of 196 patch tokens), a 75 px
block 5 x 5 to 6 x 6 tokens, so a view costs a fraction of a full forward pass.
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import timm
import torch

import robustwrap

ABLATIONS = {"column": {"ablation": "column", "size": 19, "stride": 1}, "block": {"ablation": "block", "size": 75, "stride": 10}}


def measure(model, x: torch.Tensor, y: torch.Tensor, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    model.certify(x, y, early_exit=False)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="vit_tiny_patch16_224,vit_small_patch16_224")
    parser.add_argument("--ablations", default="column,block")
    parser.add_argument("--images", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(
        json.dumps(
            {
                "machine": platform.processor() or platform.machine(),
                "threads": args.threads,
                "device": str(device),
                "torch": torch.__version__,
                "timm": timm.__version__,
            }
        )
    )
    for name in args.models.split(","):
        torch.manual_seed(0)
        base = timm.create_model(name, num_classes=10).to(device).eval()
        x = torch.randn(args.images, 3, 224, 224, device=device)
        y = torch.zeros(args.images, dtype=torch.long, device=device)
        for ablation in args.ablations.split(","):
            models = {
                setting: robustwrap.wrap(base, patch=0.02, defense="smoothing", drop_tokens=setting, **ABLATIONS[ablation]).eval()
                for setting in (True, False)
            }
            views = models[True].full_views * args.images
            for model in models.values():  # warm-up: one image, a few views' worth of kernels
                model.predict(x[:1])
            best = {setting: float("inf") for setting in models}
            for _ in range(args.repeats):
                for setting, model in models.items():
                    best[setting] = min(best[setting], measure(model, x, y, device))
            row = {"model": name, "ablation": models[True].ablation_set.describe(), "images": args.images}
            for setting, seconds in best.items():
                key = "drop_tokens" if setting else "all_tokens"
                row[key] = {"views_per_s": round(views / seconds, 1), "s_per_image": round(seconds / args.images, 2)}
            row["speedup"] = round(best[False] / best[True], 2)
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
