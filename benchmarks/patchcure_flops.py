"""PatchCURE's certification cost in FLOPs against pixel PatchCleanser on the same ViT.

`robustwrap.windows.split_vit` cuts ViT-Ti/16 at 224 px (random weights: FLOPs do not depend on
them) into its windowed part (SRF, blocks `[0, k)` on windows of 14x2 tokens, once per image)
and its global part (LRF, blocks `[k, 12)`, once per masked view). A 32 px patch (2% of the
image) touches at most 1x2 cells of the 1x7 feature grid, so the feature mask set has `K = 6`
masks of 1x2 cells and certifying an image with every view costs one SRF pass and
`K(K+1)/2 = 21` LRF views. Pixel PatchCleanser with 6x6 masks costs `36 * 37 / 2 = 666` full
forward passes of the same model. At `k = 12` (SRF only) the views are sums of local logits:
no LRF at all.

FLOPs are counted by `torch.utils.flop_counter.FlopCounterMode` (matrix products and
convolutions; a multiply-add is 2 FLOPs) for one image and one view, attention included: the
model is built with timm's explicit attention, since the counter does not see the fused CPU
kernel (whose cost, quadratic in a window's tokens, is where windows save most). Printed as JSON, per split:
`srf`, `lrf` (per view), `certify` (SRF + every view), `patchcleanser` (666 full passes) and
their ratio, the figure the speed benchmark's images/s should approach.

    python benchmarks/patchcure_flops.py [--splits 6 9 11 12] [--patch 32] [--window 14 2]
"""

from __future__ import annotations

import argparse
import json

import timm
import torch
from torch.utils.flop_counter import FlopCounterMode

from robustwrap.geometry import MaskSet, feature_window
from robustwrap.windows import split_vit


def flops(run, *args) -> int:
    """FLOPs of `run(*args)`, counted by torch's dispatcher (no time measured)."""
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        run(*args)
    return counter.get_total_flops()


def count(
    model: str = "vit_tiny_patch16_224", window: tuple[int, int] = (14, 2), splits=(6, 9, 11, 12), patch: int = 32, pixel_masks: int = 6
) -> dict:
    """The FLOP counts of certifying one 224 px image with every view, PatchCURE at each split against pixel PatchCleanser.

    Returns:
        The JSON document `main` prints: `forward_gflops`, `patchcleanser` (masks, views,
        `certify_gflops`) and per split `patchcure` rows (grid, masks, views, SRF and per-view
        LRF GFLOPs, `certify_gflops` and `patchcleanser_over_patchcure`).
    """
    torch.manual_seed(0)
    fused = timm.layers.use_fused_attn()
    timm.layers.set_fused_attn(False)  # the counter sees explicit attention only; restored for whoever times the model
    try:
        vit = timm.create_model(model, num_classes=1000).eval()
    finally:
        timm.layers.set_fused_attn(fused)
    x = torch.randn(1, 3, 224, 224)
    full = flops(vit, x)
    num_masks = len(MaskSet.square(224, patch, num_masks=pixel_masks))
    patchcleanser = full * num_masks * (num_masks + 1) // 2
    rows = []
    for split in splits:
        srf, lrf = split_vit(vit, tuple(window), split)
        with torch.no_grad():
            features = srf(x)
        grid = tuple(features.shape[-2:])
        cells = feature_window(224, patch, srf.receptive_field, srf.feature_stride, srf.feature_offset, grid)
        masks = len(MaskSet.rect(grid, cells, stride=1))
        views = masks * (masks + 1) // 2
        srf_flops = flops(srf, x)
        lrf_flops = 0 if lrf is None else flops(lrf, features, torch.ones(1, *grid, dtype=torch.bool))
        certify = srf_flops + views * lrf_flops
        rows.append(
            {
                "split": split,
                "feature_grid": list(grid),
                "feature_window": list(cells),
                "masks": masks,
                "views": views,
                "srf_gflops": srf_flops / 1e9,
                "lrf_gflops_per_view": lrf_flops / 1e9,
                "certify_gflops": certify / 1e9,
                "patchcleanser_over_patchcure": patchcleanser / certify,
            }
        )
    return {
        "model": model,
        "image": 224,
        "patch": patch,
        "window": list(window),
        "forward_gflops": full / 1e9,
        "patchcleanser": {"masks": num_masks, "views": num_masks * (num_masks + 1) // 2, "certify_gflops": patchcleanser / 1e9},
        "patchcure": rows,
    }


def geometry_arguments(parser: argparse.ArgumentParser) -> None:
    """The model, window, splits, patch and pixel masks compared (shared with patchcure_speed.py)."""
    parser.add_argument("--model", default="vit_tiny_patch16_224", help="timm ViT at 224 px (default ViT-Ti/16)")
    parser.add_argument("--window", type=int, nargs=2, default=(14, 2), metavar=("WH", "WW"), help="tokens per window (default 14 2)")
    parser.add_argument("--splits", type=int, nargs="+", default=[6, 9, 11, 12], help="windowed blocks k (default 6 9 11 12)")
    parser.add_argument("--patch", type=int, default=32, help="patch side in pixels (default 32: 2%% of 224x224)")
    parser.add_argument("--pixel-masks", type=int, default=6, help="pixel PatchCleanser's masks per axis (default 6: 36 masks)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    geometry_arguments(parser)
    args = parser.parse_args()
    print(json.dumps(count(args.model, tuple(args.window), args.splits, args.patch, args.pixel_masks), indent=2))


if __name__ == "__main__":
    main()
