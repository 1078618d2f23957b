"""Certified detection and top-k against the prediction certificate, on the zoo's MNIST models.

The same models, the same held-out digits and the same patch as `benchmarks/defenses.py`: for
each embedded zoo model, the prediction certificate, certified detection at three values of
`tau` (clean accuracy without alert, false alerts, certified detection accuracy) where the
defense has detection, and top-5 where it has a top-k certificate.

```bash
python benchmarks/detection.py --limit 1000 --threads 1
```
"""

from __future__ import annotations

import argparse
import time

import torch
from timm.data import create_transform, resolve_data_config
from torch.utils.data import TensorDataset

import robustwrap
from robustwrap import zoo

TAUS = (0.0, 0.5, 0.9)


def measure(name: str, limit: int | None) -> list[dict]:
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
        if guarantee == "detection":
            row.update(clean_without_alert=report.clean_accuracy_without_alert, false_alerts=report.false_alert_rate)
        rows.append(row)
    return rows


def markdown(rows: list[dict]) -> str:
    lines = [
        "| model | guarantee | clean (without alert) | false alerts | certified | views / image | CPU s |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        guarantee = f"detection, tau {r['tau']:g}" if r["guarantee"] == "detection" else r["guarantee"]
        clean = f"{100 * r.get('clean_without_alert', r['clean']):.1f}%"
        alerts = f"{100 * r['false_alerts']:.1f}%" if "false_alerts" in r else "-"
        lines.append(
            f"| `{r['model']}` | {guarantee} | {clean} | {alerts} | {100 * r['certified']:.1f}% | {r['views_per_image']:.1f} | {r['cpu_seconds']:.1f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=None, help="zoo names (default: every embedded zoo model)")
    parser.add_argument("--limit", type=int, default=None, help="certify the first N digits (default: all 1,000)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    names = args.models or [n for n in zoo.list_models() if zoo.zoo_entry(n).get("embedded")]
    rows = [row for name in names for row in measure(name, args.limit)]
    print(markdown(rows))


if __name__ == "__main__":
    main()
