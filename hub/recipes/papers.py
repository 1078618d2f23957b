"""Recipe: the papers' settings (ImageNet, ImageNette, CIFAR-10; 2% patch, 6x6 masks). NOT YET TRAINED BY US.

PatchCleanser (Xiang et al. 2022) and Greedy Cutout (Saha et al. 2023) fine-tune ImageNet-pretrained
timm models on masked images, then certify the validation set. This script does the same with
robustwrap: `fit_masking` (Multi-size Greedy Cutout by default), `certify_dataset`, a model card,
and `push_to_hub` (or `--dry-run` into a folder). It needs the data set on disk, the pretrained
timm weights (network or HF cache) and a GPU; none of that exists on the machines that build
robustwrap, so no entry of the zoo comes from it yet. hub/README.md lists the papers' figures as
the targets to beat.

    python hub/recipes/papers.py --arch vit_base_patch16_224.augreg2_in21k_ft_in1k \\
        --data /data/imagenette2 --dry-run out/vit_b16_imagenette
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

import timm
import torch
import torchvision
from timm.data import create_transform, resolve_data_config
from torch.utils.data import DataLoader

import robustwrap

ARCHS = {
    "vit_base_patch16_224.augreg2_in21k_ft_in1k": "ViT-B/16-224",
    "resnetv2_50x1_bit.goog_in21k_ft_in1k": "ResNetV2-50x1 (BiT)",
    "convnext_tiny.fb_in1k": "ConvNeXt-T",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", choices=sorted(ARCHS), required=True)
    parser.add_argument("--data", type=Path, required=True, help="ImageFolder root with train/ and val/")
    parser.add_argument("--dataset-name", default=None, help="name for the model card (default: the folder name)")
    parser.add_argument("--patch", type=float, default=0.02)
    parser.add_argument("--num-masks", type=int, default=6)
    parser.add_argument("--strategy", default="multisize_greedy")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--push", metavar="ORG/NAME")
    target.add_argument("--dry-run", type=Path, metavar="FOLDER")
    args = parser.parse_args()
    command = "python hub/recipes/papers.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])

    train_set = torchvision.datasets.ImageFolder(args.data / "train")
    base = timm.create_model(args.arch, pretrained=True, num_classes=len(train_set.classes))
    config = resolve_data_config(model=base)
    train_set.transform = create_transform(**config, is_training=True)
    val_set = torchvision.datasets.ImageFolder(args.data / "val", transform=create_transform(**config))
    model = robustwrap.wrap(base, patch=args.patch, num_masks=args.num_masks).to(args.device)

    loader = DataLoader(train_set, batch_size=args.batch_size, shuffle=True, num_workers=args.workers)
    robustwrap.fit_masking(model, loader, strategy=args.strategy, epochs=args.epochs, amp=args.device != "cpu")
    report = robustwrap.certify_dataset(model.eval(), DataLoader(val_set, batch_size=args.batch_size, num_workers=args.workers))
    print(report.summary())

    model.pretrained_info = {
        "strategy": args.strategy,
        "dataset": args.dataset_name or args.data.name,
        "metrics": {
            "vanilla_accuracy": round(report.vanilla_accuracy, 4),
            "clean_accuracy": round(report.clean_accuracy, 4),
            "certified_accuracy": round(report.certified_accuracy, 4),
            "num_images": report.num_images,
            "split": "val",
            "command": command,
        },
    }
    if args.push:
        model.push_to_hub(args.push)
    else:
        model.save_pretrained(args.dry_run)


if __name__ == "__main__":
    main()
