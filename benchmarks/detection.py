"""Certified detection and top-k against the prediction certificate, on the zoo's MNIST models.

The same models, the same held-out digits and the same patch as `benchmarks/defenses.py`: for
each embedded zoo model, the prediction certificate, certified detection at three values of
`tau` (clean accuracy without alert, false alerts, certified detection accuracy) where the
defense has detection, and top-5 where it has a top-k certificate.

For detection, the empirical robust accuracy under `robustwrap.attack(..., guarantee="detection")`
on the first `--attack-limit` digits: the digits output correctly without an alert and not
certified are attacked (a success is a wrong label *without* an alert); certified digits count as
robust (the audit of the test suite checks they never fall). `--json` writes the rows, counts
included, that `benchmarks/reproduce_zoo.py --detection` re-measures with the CLI.

```bash
python benchmarks/detection.py --limit 1000 --attack-limit 50 --threads 1 --json benchmarks/detection.json
```
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from timm.data import create_transform, resolve_data_config
from torch.utils.data import TensorDataset

import robustwrap
from robustwrap import zoo

TAUS = (0.0, 0.5, 0.9)
# The detection attack's budget: as benchmarks/defenses.py's attack column (10 guided locations, 50 steps).
ATTACK_STEPS = 50
ATTACK_LOCATIONS = 10


def empirical_detection(model, images: torch.Tensor, labels: torch.Tensor) -> dict:
    """The detection attack on `images`: certified, attacked and flipped counts, and the empirical robust accuracy."""
    cert = model.certify_detection(images, labels)
    correct = (cert.prediction == labels) & ~cert.alert
    attacked = (correct & ~cert.certified).nonzero()[:, 0]
    flipped = 0
    if attacked.numel():
        result = robustwrap.attack(
            model,
            images[attacked],
            labels[attacked],
            steps=ATTACK_STEPS,
            locations=("guided", ATTACK_LOCATIONS),
            generator=torch.Generator().manual_seed(0),
            progress=False,
            guarantee="detection",
        )
        flipped = int(result.success.sum())
    n = labels.numel()
    return {
        "attack_images": n,
        "attack_certified": int(cert.certified.sum()),
        "attacked": int(attacked.numel()),
        "flipped": flipped,
        "empirical": (int(correct.sum()) - flipped) / n,
    }


def measure(name: str, limit: int | None, attack_limit: int = 0) -> list[dict]:
    entry = zoo.zoo_entry(name)
    model = zoo.create_model(name)
    transform = create_transform(**resolve_data_config(model=model.model))
    data = zoo.builtin_dataset(entry["dataset"], transform=transform)
    n = min(limit or len(data), len(data))
    images = torch.stack([data[i][0] for i in range(n)])
    dataset = TensorDataset(images, torch.tensor([data[i][1] for i in range(n)]))
    runs = [("prediction", None)]
    if model._no_detection is None:
        runs += [("detection", tau) for tau in TAUS]
    if model._no_top_k is None:
        runs.append(("top5", None))
    rows = []
    for guarantee, tau in runs:
        if tau is not None:
            model.tau = tau
        cpu = time.process_time()
        report = robustwrap.certify_dataset(model, dataset, batch_size=100, progress=False, guarantee=guarantee)
        row = {
            "model": name,
            "defense": model.defense,
            "guarantee": guarantee,
            "tau": tau,
            "clean": report.clean_accuracy,
            "certified": report.certified_accuracy,
            "views_per_image": report.views_per_image,
            "cpu_seconds": time.process_time() - cpu,
        }
        row.update(num_images=report.num_images, certified_count=report.certified)
        if guarantee == "detection":
            row.update(
                clean_without_alert=report.clean_accuracy_without_alert,
                false_alerts=report.false_alert_rate,
                clean_without_alert_count=report.clean_correct_without_alert,
            )
            if attack_limit:
                row.update(empirical_detection(model, images[:attack_limit], dataset.tensors[1][:attack_limit]))
        rows.append(row)
    return rows


def markdown(rows: list[dict]) -> str:
    lines = [
        "| model | guarantee | clean (without alert) | false alerts | certified | empirical robust (attack subset) | views / image | CPU s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        guarantee = f"detection, tau {r['tau']:g}" if r["guarantee"] == "detection" else r["guarantee"]
        clean = f"{100 * r.get('clean_without_alert', r['clean']):.1f}%"
        alerts = f"{100 * r['false_alerts']:.1f}%" if "false_alerts" in r else "-"
        empirical = (
            f"{100 * r['empirical']:.1f}% (certified {100 * r['attack_certified'] / r['attack_images']:.1f}%; "
            f"{r['flipped']}/{r['attacked']} attacked flipped)"
            if "empirical" in r
            else "-"
        )
        lines.append(
            f"| `{r['model']}` | {guarantee} | {clean} | {alerts} | {100 * r['certified']:.1f}% | {empirical} | {r['views_per_image']:.1f} "
            f"| {r['cpu_seconds']:.1f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=None, help="zoo names (default: every embedded zoo model)")
    parser.add_argument("--limit", type=int, default=None, help="certify the first N digits (default: all 1,000)")
    parser.add_argument("--attack-limit", type=int, default=0, help="attack detection on the first N digits (default 0: no attack)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path, help="also write the rows as JSON (what reproduce_zoo.py --detection compares with)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    names = args.models or [n for n in zoo.list_models() if zoo.zoo_entry(n).get("embedded")]
    rows = [row for name in names for row in measure(name, args.limit, args.attack_limit)]
    print(markdown(rows))
    if args.json is not None:
        args.json.write_text(json.dumps({"benchmark": "detection", "threads": args.threads, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
