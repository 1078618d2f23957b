"""The defenses side by side on the same real digits and the same threat model.

Certifies the 1,000 real MNIST digits shipped with the package (`mnist-heldout`, never seen in
training by any zoo model) with every shipped zoo model (PatchCleanser, (De)Randomized
Smoothing, PatchGuard, PatchCURE; 5x5 px patch on 32x32, 2.44% of the image), then attacks the
correctly predicted but uncertified digits of a subset with `robustwrap.attack` (the adaptive
patch attack on the defended prediction; a defense the attack does not support yet gets no
empirical figure, "pending" in the table). Prints one JSON document and a markdown table: vanilla (undefended
base model), clean (defended) and certified accuracy, empirical robust accuracy, views per image
(mean, with each defense's exact early exit), images per second (per CPU-second of this
process, and wall clock) and the training recipe.

Empirical robust accuracy on the attack subset = (certified digits) + (correct, uncertified
digits the attack did not flip), over the subset: an upper bound on the accuracy under any
patch, as certified accuracy is a lower bound. Certified digits are not attacked here (the
certificate covers every patch; `robustwrap.audit` and the test suite check that it holds).

    python benchmarks/defenses.py                                   # all 1,000 digits, attack on 100
    python benchmarks/defenses.py --limit 200 --attack-limit 50     # quicker
    python benchmarks/defenses.py --models mnist_test_resnet_drs --json out.json
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch
from timm.data import create_transform, resolve_data_config
from torch.utils.data import TensorDataset

import robustwrap
from robustwrap import zoo
from robustwrap.attack import OBJECTIVES

DEFENSE_NAMES = {
    "patchcleanser": "PatchCleanser",
    "smoothing": "(De)Randomized Smoothing",
    "patchguard": "PatchGuard",
    "patchcure": "PatchCURE",
}


def recipe(entry: dict) -> str:
    """The training recipe in a few words, from the manifest entry."""
    epochs = entry.get("epochs") or {}
    if not epochs and entry.get("init_from"):
        return f"none: `{entry['init_from']}`'s weights, wrapped"
    if "base" in epochs:
        text = f"{epochs['base']} clean + {epochs.get('fine_tune')} `{entry.get('strategy')}` epochs"
    elif entry.get("init_from"):
        text = f"{epochs.get('fine_tune')} `{entry.get('strategy')}` epochs from `{entry['init_from']}`'s base weights"
    else:
        text = f"{epochs.get('fine_tune', epochs.get('train'))} `{entry.get('strategy')}` epochs from scratch"
    if entry.get("band_sweep"):
        text += f" (band {entry['size']} px chosen by a sweep over {', '.join(entry['band_sweep']['widths'])} px)"
    return text


def defense_details(model) -> str:
    """The defense's own setting that decides its views, in a few words."""
    s = model.settings()
    if s["defense"] == "patchcleanser":
        return f"{len(model.mask_set)} masks of {s['mask_set']['mask_size'][0]} px"
    if s["defense"] == "smoothing":
        return f"{s['ablation']} bands of {s['size']} px, stride {s['stride']} ({model.full_views} views, Δ={model.delta})"
    if s["defense"] == "patchcure":
        (fh, fw), masks = model.feature_window, len(model.feature_mask_set)
        cells = "local logits (SRF only)" if model.lrf is None else f"split {s['split']}"
        split = f"windows of {s['window'][0]}x{s['window'][1]} tokens, " if s["window"] is not None else ""
        return f"{split}{cells}, {masks} masks of {fh}x{fw} cells ({model.full_views} views)"
    return f"receptive field {s['receptive_field'][0]} px, stride {s['feature_stride'][0]}, window {model.window[0]}x{model.window[1]}"


def measure(name: str, args) -> dict:
    entry = zoo.zoo_entry(name)
    model = zoo.create_model(name, batch_size=args.batch_size)
    transform = create_transform(**resolve_data_config(model=model.model))
    data = zoo.builtin_dataset(entry["dataset"], transform=transform)
    n = min(args.limit or len(data), len(data))
    images = torch.stack([data[i][0] for i in range(n)])  # the transform once, outside the timing
    labels = torch.tensor([data[i][1] for i in range(n)])

    cpu, wall = time.process_time(), time.perf_counter()
    report = robustwrap.certify_dataset(model, TensorDataset(images, labels), batch_size=100, progress=False)
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    correct = torch.tensor([r.correct for r in report.records])
    certified = torch.tensor([r.certified for r in report.records]) & correct

    # empirical robust accuracy on the first `attack_limit` digits
    m = min(args.attack_limit, n)
    targets = (correct[:m] & ~certified[:m]).nonzero()[:, 0]
    flipped, passes, attack_seconds = 0, 0, 0.0  # passes: images through the base model
    attacked = model.defense in OBJECTIVES
    if attacked and targets.numel():
        start = time.perf_counter()
        result = robustwrap.attack(
            model,
            images[targets],
            labels[targets],
            steps=args.steps,
            restarts=args.restarts,
            locations=("guided", args.locations),
            generator=torch.Generator().manual_seed(args.seed),
            progress=False,
        )
        attack_seconds = time.perf_counter() - start
        flipped = int(result.success.sum())
        passes = result.num_views
    empirical = (int(certified[:m].sum()) + int(targets.numel()) - flipped) / m
    return {
        "model": name,
        "defense": model.defense,
        "architecture": entry.get("architecture"),
        "details": defense_details(model),
        "threat_model": entry.get("threat_model"),
        "num_images": report.num_images,
        "vanilla_accuracy": report.vanilla_accuracy,
        "clean_accuracy": report.clean_accuracy,
        "certified_accuracy": report.certified_accuracy,
        "views_per_image": report.views_per_image,
        "images_per_second": report.num_images / wall,
        "images_per_cpu_second": report.num_images / cpu,
        "attack": {
            "num_images": m,
            "certified_accuracy": int(certified[:m].sum()) / m,
            "empirical_robust_accuracy": empirical if attacked else None,
            "attacked": int(targets.numel()) if attacked else 0,
            "flipped": flipped,
            "views": passes,
            "seconds": round(attack_seconds, 1),
        },
        "recipe": recipe(entry),
        "recipe_command": entry.get("measured_with"),
        "manifest_metrics": entry.get("metrics"),
    }


def _percent(value) -> str:
    return f"{value:.1%}" if isinstance(value, (int, float)) else "-"


def markdown(rows: list[dict], args) -> str:
    lines = [
        "| defense | model | vanilla | clean | certified | empirical robust (attack subset) | views / image | images / CPU-s | certified, all 1,000 (manifest) | training recipe |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        a = r["attack"]
        empirical = (
            f"{a['empirical_robust_accuracy']:.1%} (certified {a['certified_accuracy']:.1%}; {a['flipped']}/{a['attacked']} attacked flipped)"
            if a["empirical_robust_accuracy"] is not None
            else f"pending: `robustwrap.attack` has no {DEFENSE_NAMES.get(r['defense'], r['defense'])} objective yet (certified {a['certified_accuracy']:.1%})"
        )
        lines.append(
            f"| {DEFENSE_NAMES.get(r['defense'], r['defense'])}: {r['details']} | `{r['model']}` ({r['architecture']}) "
            f"| {r['vanilla_accuracy']:.1%} | {r['clean_accuracy']:.1%} | {r['certified_accuracy']:.1%} "
            f"| {empirical} "
            f"| {r['views_per_image']:.1f} | {r['images_per_cpu_second']:.1f} | {_percent((r['manifest_metrics'] or {}).get('certified_accuracy'))} | {r['recipe']} |"
        )
    n = rows[0]["num_images"] if rows else 0
    m = rows[0]["attack"]["num_images"] if rows else 0
    lines.append("")
    lines.append(
        f"{n} held-out real MNIST digits (`mnist-heldout`), patch 5x5 px on 32x32 (2.44%). Empirical robust accuracy: "
        f"the first {m} digits; correct but uncertified digits attacked with `robustwrap.attack` "
        f"({args.steps} sign-gradient steps of 0.05 of the input range, {args.restarts} random start(s) at each of "
        f"{args.locations} guided locations), certified digits counted as robust. "
        f"images / CPU-s: certification only (transform excluded), process CPU time, so other jobs on a shared machine "
        f"do not count (the JSON also has wall-clock images/s); batches of 100 images, `batch_size={args.batch_size}` views "
        f"per forward pass, {torch.get_num_threads()} CPU thread(s), {platform.processor() or platform.machine()}. "
        f"The last columns are the manifest's figures on all 1,000 digits, measured by the training recipe."
    )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="*", default=None, help="zoo names (default: every model in the zoo)")
    parser.add_argument("--limit", type=int, default=None, help="certify only the first N held-out digits (default: all 1,000)")
    parser.add_argument("--attack-limit", type=int, default=100, help="attack subset: the first N digits (default 100)")
    parser.add_argument("--steps", type=int, default=50, help="attack steps per run (default 50)")
    parser.add_argument("--restarts", type=int, default=1, help="random starts per location (default 1)")
    parser.add_argument("--locations", type=int, default=10, help="guided locations per image (default 10)")
    parser.add_argument("--batch-size", type=int, default=256, help="views per forward pass (default 256)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="also write the JSON document here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    names = args.models or [n for n in zoo.list_models() if zoo.zoo_entry(n).get("embedded")]  # the MNIST models; the papers' need ImageNet
    order = {"patchcleanser": 0, "smoothing": 1, "patchguard": 2, "patchcure": 3}
    rows = sorted((measure(name, args) for name in names), key=lambda r: (order.get(r["defense"], 9), r["model"]))
    document = {
        "benchmark": "defenses",
        "settings": {k: v for k, v in vars(args).items() if k != "json"},
        "torch_threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
        "rows": rows,
    }
    text = json.dumps(document, indent=2)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text + "\n")
    print(text)
    print()
    print(markdown(rows, args))


if __name__ == "__main__":
    main()
