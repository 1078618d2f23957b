"""When compiling the base model pays: certification throughput eager vs `torch.compile`.

Certifies the same images with PatchCleanser around a small timm model (random weights, labels =
the model's own predictions) twice: the model as it is (eager; on the CPU its views run through
the inference copy, docs/concepts.md#inference-copy) and `torch.compile(model)` (inductor by
default; a compiled model always runs itself). Prints JSON with
  - `first_call_s`: the first `certify` call, compilation included (the compiled model compiles
    again for each new batch shape it meets, which the first call's full and partial passes cover),
  - `views_per_second`: the best of `--repeats` later calls, every view evaluated
    (`early_exit=False`),
  - `break_even_views`: how many views a run must certify before the compiled model has paid for
    its compilation (`null` if it is not faster).

    OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE python benchmarks/compile.py [--model test_resnet]
        [--image-size 32] [--in-chans 1] [--images 8] [--repeats 3] [--backend inductor] [--threads 1]
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


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="test_resnet")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--in-chans", type=int, default=1)
    parser.add_argument("--num-classes", type=int, default=10)
    parser.add_argument("--patch", type=int, default=5)
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3, help="best of this many interleaved calls")
    parser.add_argument("--backend", default="inductor")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    base = timm.create_model(args.model, num_classes=args.num_classes, in_chans=args.in_chans).eval()
    x = torch.randn(args.images, args.in_chans, args.image_size, args.image_size)
    eager = robustwrap.wrap(base, patch=args.patch, image_size=args.image_size).eval()
    compiled = robustwrap.wrap(torch.compile(base, backend=args.backend), patch=args.patch, image_size=args.image_size).eval()
    y = eager.predict(x)
    models = {"eager": eager, "compiled": compiled}
    results, first = {}, {}
    for name, model in models.items():
        start = time.perf_counter()
        results[name] = model.certify(x, y, early_exit=False)
        first[name] = time.perf_counter() - start
    views = int(results["eager"].num_views.sum())
    assert torch.equal(results["eager"].certified, results["compiled"].certified)
    best = {name: float("inf") for name in models}
    for _ in range(args.repeats):
        for name, model in models.items():
            best[name] = min(best[name], timed(lambda m=model: m.certify(x, y, early_exit=False)))
    rate = {name: views / seconds for name, seconds in best.items()}
    saved_per_view = 1 / rate["eager"] - 1 / rate["compiled"]
    compile_cost = first["compiled"] - best["compiled"] - (first["eager"] - best["eager"])
    print(
        json.dumps(
            {
                "device": "cpu",
                "threads": torch.get_num_threads(),
                "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
                "platform": platform.processor() or platform.machine(),
                "torch": torch.__version__,
                "model": args.model,
                "image_size": args.image_size,
                "backend": args.backend,
                "views_per_call": views,
                "first_call_s": {name: round(s, 2) for name, s in first.items()},
                "views_per_second": {name: round(r, 1) for name, r in rate.items()},
                "speedup": round(rate["compiled"] / rate["eager"], 3),
                "break_even_views": round(compile_cost / saved_per_view) if saved_per_view > 0 else None,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
