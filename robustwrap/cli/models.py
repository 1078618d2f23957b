"""`robustwrap models`: the model zoo, read from its manifest without importing torch."""

from __future__ import annotations

import argparse
import json
from typing import Any

from ._format import _accuracy, _columns, _value


def register(commands, common: argparse.ArgumentParser) -> None:
    """`robustwrap models`: its subparser."""
    models = commands.add_parser("models", parents=[common], help="the model zoo")
    models.set_defaults(run=_models)


def _patch(entry: dict) -> str:
    """A manifest entry's patch as `5x5 px (2.44%)`."""
    patch = entry.get("patch")
    if not isinstance(patch, list):
        return _value(patch)
    return f"{patch[0]}x{patch[1]} px ({entry['patch_percent']:.2f}%)" if "patch_percent" in entry else f"{patch[0]}x{patch[1]} px"


def _weights(entry: dict) -> str:
    """Where a manifest entry's weights are: in the package, or on the Hub (the network is needed once)."""
    if entry.get("embedded"):
        return "embedded"
    source = entry.get("weights") or (f"hf-hub:{entry['repo_id']}" if entry.get("repo_id") else None)
    return f"{source} (network once)" if source else "-"


def _manifest() -> dict[str, Any]:
    """The zoo's manifest (`robustwrap/zoo/manifest.json`, what `robustwrap.zoo` reads), as JSON.

    `robustwrap models` lists it from here: importing `robustwrap.zoo` would import torch.
    """
    from importlib import resources

    return json.loads((resources.files("robustwrap") / "zoo" / "manifest.json").read_text())


def _models(args: argparse.Namespace) -> None:
    manifest = _manifest()
    rows = [("name", "architecture", "data", "patch", "masks", "clean", "certified", "weights")]
    for entry in sorted(manifest["models"], key=lambda entry: entry["name"]):
        name = entry["name"]
        marker = " *" if name == manifest["default"] else ""
        metrics = entry.get("metrics") or {}
        rows.append(
            (
                name + marker,
                str(entry.get("architecture", "-")),
                str(entry.get("dataset", "-")),
                _patch(entry),
                _value(entry.get("num_masks")),
                _accuracy(metrics.get("clean_accuracy")),
                _accuracy(metrics.get("certified_accuracy")),
                _weights(entry),
            )
        )
    print(_columns(rows, align_left=True))
    print("\n* the default model (robustwrap certify with no --model)")
    print("embedded: shipped in the package, loads offline; hf-hub:...: downloaded once into the Hugging Face cache, then HF_HUB_OFFLINE=1 works")
