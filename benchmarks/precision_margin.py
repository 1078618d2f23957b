"""Fail-fast view counts, logit changes between layouts / batch sizes, and accuracy per precision.

On the embedded default (`mnist_test_resnet_msgc`) and a subset of its shipped digits
(`mnist-heldout`, preprocessed with the model's timm data config). Prints JSON:
- `fail_fast`: mean views per uncertified image with early exit, row-major order vs the
  fail-fast order (least sure mask pairs first); certificates identical;
- `logit_change`: for each zoo model, the largest change of any logit difference
  `logit_y - logit_c` of the same views run by the model with contiguous / channels_last views,
  at 7, 64 and 256 views per pass, and by its inference copy (`robustwrap.views`), per
  precision (what the margin guard must absorb);
- `accuracy`: for each zoo model, clean and certified accuracy at float32 and bfloat16
  autocast, with seconds (`--skip-accuracy` skips it; bfloat16 is slow on CPUs without it).

    python benchmarks/precision_margin.py [--images 100] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from speed_vs_main import digits  # noqa: E402

import robustwrap  # noqa: E402
from robustwrap.defenses import patchcleanser  # noqa: E402
from robustwrap.views import build_inference_copy  # noqa: E402

ZOO = ("mnist_test_resnet_msgc", "mnist_test_resnet_drs", "mnist_bagnet_tiny_pg")


def masked_views(model, x: torch.Tensor) -> torch.Tensor:
    """Every one-mask view of `x` under `model`'s mask set, `(B * K, C, H, W)`."""
    keep = model._keep
    return torch.where(keep[None, :, None], x[:, None], torch.tensor(model.fill)).reshape(-1, *x.shape[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=100)
    parser.add_argument("--logit-images", type=int, default=20, help="images whose one-mask views are compared across layouts")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--skip-accuracy", action="store_true")
    args = parser.parse_args()
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    torch.set_num_threads(args.threads)
    path = Path("/tmp/robustwrap_digits.pt")
    if not path.exists():
        digits(path)
    data = torch.load(path)
    x, y = data["x"][: args.images], data["y"][: args.images]
    model = robustwrap.create_model("mnist_test_resnet_msgc").eval()
    out: dict = {"model": "mnist_test_resnet_msgc", "images": args.images, "threads": args.threads}

    # fail fast: row-major vs least-sure-first
    ordered = model.certify(x, y)
    original = patchcleanser.pair_priority
    patchcleanser.pair_priority = lambda margins, pairs: torch.zeros(pairs.shape[0])
    try:
        row_major = model.certify(x, y)
    finally:
        patchcleanser.pair_priority = original
    assert torch.equal(ordered.certified, row_major.certified) and torch.equal(ordered.prediction, row_major.prediction)
    unc = ~ordered.certified
    k = len(model.mask_set)
    out["fail_fast"] = {
        "uncertified_images": int(unc.sum()),
        "full_views_per_image": k * (k + 1) // 2,
        "mean_views_per_uncertified_row_major": round(float(row_major.num_views[unc].float().mean()), 1),
        "mean_views_per_uncertified_fail_fast": round(float(ordered.num_views[unc].float().mean()), 1),
        "total_views_row_major": int(row_major.num_views.sum()),
        "total_views_fail_fast": int(ordered.num_views.sum()),
    }

    # logit changes between layouts, batch sizes and the inference copy, per zoo model and precision
    changes = {}
    xs = x[: args.logit_images]
    for name in ZOO:
        defended = robustwrap.create_model(name).eval()
        base = defended.model
        fast = build_inference_copy(base)
        views = masked_views(model, xs)  # the embedded default's one-mask views: digits with a square hidden
        per_model = {}
        for precision in ("float32", "bfloat16"):
            defended.precision = precision
            outs = []
            with torch.no_grad(), defended.autocast():
                for module, channels_last, batch_size in ((base, False, 64), (base, True, 64), (base, False, 7), (base, True, 256), (fast, True, 256), (fast, True, 7)):
                    if module is None:
                        continue
                    v = views.contiguous(memory_format=torch.channels_last) if channels_last else views
                    logits = torch.cat([module(v[s : s + batch_size]) for s in range(0, v.shape[0], batch_size)]).float()
                    logits = logits.movedim(1, -1).reshape(-1, logits.shape[1])  # PatchGuard: one row per location
                    outs.append(logits[:, :, None] - logits[:, None, :])  # every logit difference
            per_model[precision] = max(float((d - outs[0]).abs().max()) for d in outs[1:])
            top2 = logits.topk(2, -1).values
            per_model[precision + "_median_top2_gap"] = round(float((top2[:, 0] - top2[:, 1]).median()), 3)
        per_model["inference_copy"] = type(fast).__name__ if fast is not None else None
        changes[name] = per_model
    out["logit_change"] = changes

    if not args.skip_accuracy:
        acc = {}
        for name in ZOO:
            defended = robustwrap.create_model(name).eval()
            acc[name] = {}
            for precision in ("float32", "bfloat16"):
                defended.precision = precision
                start = time.perf_counter()
                result = defended.certify(x, y)
                acc[name][precision] = {
                    "clean_accuracy": round(float((result.prediction == y).float().mean()), 4),
                    "certified_accuracy": round(float(result.certified.float().mean()), 4),
                    "seconds": round(time.perf_counter() - start, 1),
                    "views": int(result.num_views.sum()),
                }
        out["accuracy"] = acc
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
