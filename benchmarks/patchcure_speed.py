"""PatchCURE's measured certification speed against pixel PatchCleanser on the same ViT, next to the FLOP ratio.

ViT-Ti/16 at 224 px (random weights: the time does not depend on them), a 32 px patch (2% of
the image). Pixel PatchCleanser with 6x6 masks certifies an image with `36 * 37 / 2 = 666` full
forward passes; PatchCURE with windows of 14x2 tokens and `split = k` with one SRF pass and
`6 * 7 / 2 = 21` LRF views (blocks `[k, 12)`), or at `k = 12` (SRF only) with sums of local
logits. Every view is evaluated (`certify(..., early_exit=False)`), so the work does not depend
on the weights or the image. The configurations are timed alternately, one image each, for
`--repeats` rounds, in CPU seconds of this one-thread process (`time.process_time`: time the
process waits for a core on a shared machine does not count; wall seconds are printed too).
Per split it prints, as JSON, the best time of each, `measured` = PatchCleanser's best /
PatchCURE's best (also the median over rounds of the per-round ratios), `flops` = the FLOP ratio
that `benchmarks/patchcure_flops.py` counts, and `measured_over_flops` (target: at least 0.8).

    OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE python benchmarks/patchcure_speed.py [--repeats 3] [--splits 6 9 11 12]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import timm
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from patchcure_flops import count, geometry_arguments  # the same FLOP counting and settings as the FLOP benchmark

import robustwrap


def seconds(model, x: torch.Tensor, y: torch.Tensor, views: int) -> tuple[float, float]:
    """CPU and wall seconds of certifying `x` with every view (checked to be `views` per image)."""
    cpu, wall = time.process_time(), time.perf_counter()
    result = model.certify(x, y, early_exit=False)
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    if int(result.num_views[0]) != views:
        raise RuntimeError(f"{type(model).__name__} evaluated {int(result.num_views[0])} views, expected every view ({views})")
    return cpu, wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    geometry_arguments(parser)
    parser.add_argument("--repeats", type=int, default=3, help="alternating rounds (default 3)")
    parser.add_argument("--batch-size", type=int, default=32, help="views per forward pass of both defenses (default 32)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    counted = count(args.model, tuple(args.window), args.splits, args.patch, args.pixel_masks)
    torch.manual_seed(0)
    vit = timm.create_model(args.model, num_classes=1000).eval()
    x, y = torch.randn(1, 3, 224, 224), torch.zeros(1, dtype=torch.long)
    pixel = robustwrap.wrap(vit, args.patch, num_masks=args.pixel_masks, batch_size=args.batch_size).eval()
    k = len(pixel.mask_set)
    defended = {"patchcleanser": (pixel, k * (k + 1) // 2)}
    for split in args.splits:
        cure = robustwrap.wrap(vit, args.patch, defense="patchcure", window=tuple(args.window), split=split, batch_size=args.batch_size)
        defended[split] = (cure.eval(), cure.full_views)
    # warm-up: first-call allocations and kernel choices are not timed (a pass of the ViT for
    # PatchCleanser, whose 666 passes would hide them anyway)
    with torch.no_grad():
        vit(x)
    for name, (model, views) in defended.items():
        if name != "patchcleanser":
            seconds(model, x, y, views)
    cpu: dict = {name: [] for name in defended}
    wall: dict = {name: [] for name in defended}
    for _ in range(args.repeats):
        for name, (model, views) in defended.items():
            c, w = seconds(model, x, y, views)
            cpu[name].append(c)
            wall[name].append(w)

    pc = cpu["patchcleanser"]
    rows = []
    for row in counted["patchcure"]:
        t = cpu[row["split"]]
        measured = min(pc) / min(t)
        rows.append(
            {
                "split": row["split"],
                "views": row["views"],
                "cpu_seconds": round(min(t), 3),
                "wall_seconds": round(min(wall[row["split"]]), 3),
                "measured": round(measured, 1),
                "measured_median": round(statistics.median(a / b for a, b in zip(pc, t)), 1),
                "measured_wall": round(min(wall["patchcleanser"]) / min(wall[row["split"]]), 1),
                "flops": round(row["patchcleanser_over_patchcure"], 1),
                "measured_over_flops": round(measured / row["patchcleanser_over_patchcure"], 2),
                "images_per_cpu_second": round(1 / min(t), 2),
            }
        )
    print(
        json.dumps(
            {
                "benchmark": "patchcure_speed",
                "model": args.model,
                "image": 224,
                "patch": args.patch,
                "window": list(args.window),
                "repeats": args.repeats,
                "batch_size": args.batch_size,
                "threads": torch.get_num_threads(),
                "machine": platform.processor() or platform.machine(),
                "patchcleanser": {
                    "views": counted["patchcleanser"]["views"],
                    "cpu_seconds": round(min(pc), 2),
                    "wall_seconds": round(min(wall["patchcleanser"]), 2),
                    "images_per_cpu_second": round(1 / min(pc), 4),
                },
                "patchcure": rows,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
