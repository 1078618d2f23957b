"""Reproduce the zoo's figures: re-certify each zoo model's whole data set with the CLI and compare.

For each model (default: every model embedded in the package, which needs no network), runs
`robustwrap certify --model NAME --limit all --report REPORT` in a fresh process, exactly as a
user would, reads the report back, and compares its vanilla, clean and certified counts with
the ones the zoo manifest records (`metrics` of `robustwrap/zoo/manifest.json`). Prints one JSON
document; exits 1 when any figure differs. The views per image are printed next to the
manifest's but not compared: with early exit they depend on how the views of several images
share forward passes (the batch sizes), which the CLI chooses for itself.

    python benchmarks/reproduce_zoo.py [--model NAME ...] [--threads 1] [--detection]

With `--detection` it also re-certifies each model under the other guarantees (certified
detection at each `tau`, top-5) with `robustwrap certify --detect --tau T` / `--top-k 5`, and
compares the counts with `benchmarks/detection.json` (written by `benchmarks/detection.py`, the
figures of benchmarks/defenses.md's "Under each guarantee" section).

The default covers the embedded MNIST models (PatchCleanser, smoothing, PatchGuard and the three
PatchCURE models), each on the 1,000 held-out digits. For the default PatchCleanser model alone
README measures 81 s wall, 140 s of CPU on two threads of a quiet 2-core machine (`robustwrap
certify --limit all`); the others run fewer or cheaper views per image (smoothing about 30,
PatchGuard one, PatchCURE's sums of local logits or two global blocks of a small ViT). The unit suite runs the same
command on a few digits only (`tests/test_cli.py::test_certify_the_embedded_default_on_a_few_digits`).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from robustwrap import zoo
from robustwrap.report import CertificationReport

FIGURES = (("vanilla_accuracy", "vanilla_correct"), ("clean_accuracy", "clean_correct"), ("certified_accuracy", "certified"))


def reproduce(name: str, threads: int | None) -> dict:
    """Certify zoo model `name` on its whole data set in a fresh process; compare with the manifest."""
    metrics = zoo.zoo_entry(name).get("metrics") or {}
    with tempfile.TemporaryDirectory() as folder:
        report_path = Path(folder) / "report.json"
        command = [sys.executable, "-m", "robustwrap.cli", "certify", "--model", name, "--limit", "all", "--no-progress", "--report", str(report_path)]
        command += ["--threads", str(threads)] if threads is not None else []
        start = time.perf_counter()
        done = subprocess.run(command, check=False, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1")})
        seconds = time.perf_counter() - start
        if done.returncode != 0:
            return {"model": name, "ok": False, "command": " ".join(command[1:]), "error": done.stderr.strip().splitlines()[-1:], "seconds": round(seconds, 1)}
        report = CertificationReport.load(report_path)
    n = metrics.get("num_images")
    figures = {}
    ok = n == report.num_images
    for key, count in FIGURES:
        if key not in metrics:
            continue
        expected = round(metrics[key] * n) if n else None
        measured = getattr(report, count)
        figures[key] = {"manifest": expected, "measured": measured, "of": report.num_images}
        ok = ok and expected == measured
    if "views_per_image" in metrics:
        measured = round(report.views_per_image, 2)
        figures["views_per_image"] = {"manifest": metrics["views_per_image"], "measured": measured, "compared": False}
    return {
        "model": name,
        "ok": ok,
        "num_images": {"manifest": n, "measured": report.num_images},
        "figures": figures,
        "seconds": round(seconds, 1),
        "images_per_second": round(report.num_images / seconds, 2),
        "command": "robustwrap " + " ".join(command[3:]),
    }


# ------------------------------------------------------------------------- other guarantees
DETECTION_FIGURES = Path(__file__).with_name("detection.json")


def _certify_report(name: str, threads: int | None, limit: int, options: list[str]) -> tuple[CertificationReport | None, dict]:
    """`robustwrap certify --model NAME --limit LIMIT OPTIONS` in a fresh process: its report, and the run's facts."""
    with tempfile.TemporaryDirectory() as folder:
        report_path = Path(folder) / "report.json"
        shown = ["certify", "--model", name, "--limit", str(limit), "--no-progress", *options]
        command = [sys.executable, "-m", "robustwrap.cli", *shown, "--report", str(report_path)]
        command += ["--threads", str(threads)] if threads is not None else []
        start = time.perf_counter()
        done = subprocess.run(command, check=False, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1")})
        facts = {"command": "robustwrap " + " ".join(shown), "seconds": round(time.perf_counter() - start, 1)}
        if done.returncode != 0:
            return None, {**facts, "error": done.stderr.strip().splitlines()[-1:]}
        return CertificationReport.load(report_path), facts


def reproduce_guarantees(name: str, threads: int | None, rows: list[dict]) -> list[dict]:
    """Re-certify zoo model `name` under each guarantee of its `benchmarks/detection.json` rows; compare the counts.

    Each row is re-certified on as many digits as it records (`num_images`: all 1,000 for the
    benchmark's figures).
    """
    results = []
    for row in rows:
        if row["model"] != name or row["guarantee"] == "prediction":  # the prediction certificate is the manifest's check
            continue
        options = ["--detect", "--tau", str(row["tau"])] if row["guarantee"] == "detection" else ["--top-k", row["guarantee"].removeprefix("top")]
        report, facts = _certify_report(name, threads, row["num_images"], options)
        if report is None:
            results.append({"model": name, "guarantee": row["guarantee"], "tau": row["tau"], "ok": False, **facts})
            continue
        figures = {"certified": {"recorded": row["certified_count"], "measured": report.certified}}
        if row["guarantee"] == "detection":
            figures["clean_without_alert"] = {"recorded": row["clean_without_alert_count"], "measured": report.clean_correct_without_alert}
        ok = report.num_images == row["num_images"] and all(f["recorded"] == f["measured"] for f in figures.values())
        results.append({"model": name, "guarantee": row["guarantee"], "tau": row["tau"], "ok": ok, "of": report.num_images, "figures": figures, **facts})
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", action="append", help="a zoo model (repeatable; default: every embedded model)")
    parser.add_argument("--threads", type=int, help="torch threads of the certify process (default: OMP_NUM_THREADS, else torch's)")
    parser.add_argument("--detection", action="store_true", help="also re-certify detection and top-5 against benchmarks/detection.json")
    args = parser.parse_args()
    names = args.model or [name for name in zoo.list_models() if zoo.zoo_entry(name).get("embedded")]
    results = [reproduce(name, args.threads) for name in names]
    if args.detection:
        rows = json.loads(DETECTION_FIGURES.read_text())["rows"]
        results += [result for name in names for result in reproduce_guarantees(name, args.threads, rows)]
    print(
        json.dumps(
            {
                "benchmark": "reproduce_zoo",
                "ok": all(r["ok"] for r in results),
                "models": results,
                "threads": args.threads or os.environ.get("OMP_NUM_THREADS"),
                "cpu_count": os.cpu_count(),
                "python": platform.python_version(),
            },
            indent=1,
        )
    )
    return 0 if all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
