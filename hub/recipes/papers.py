"""Recipes: the papers' settings as presets of `robustwrap train`. NOT YET TRAINED BY US.

PatchCleanser (Xiang et al., USENIX Security 2022) certifies timm's ImageNet models (ViT-B/16,
ResNetV2-50x1 BiT, ResMLP-24) against a 2% patch (32 px on 224) with 6x6 masks; Greedy Cutout
(Saha et al., TMLR 2023) fine-tunes them on masked images first. Each preset below is the exact
`robustwrap train` command line of one setting: the model with timm's pretrained weights from the
Hugging Face Hub, the threat model, the strategy and the schedule. You add the data and where the
model goes; any later option overrides the preset's (e.g. `--batch-size`, `--epochs`):

    python hub/recipes/papers.py vit_b16_imagenette --data imagenette2/train --val-data imagenette2/val --out vit_b16_imagenette
    torchrun --nproc_per_node 8 hub/recipes/papers.py vit_b16_imagenet --data imagenet/train \\
        --val-data imagenet/val --push ORG/NAME --batch-size 8      # 8 processes x 8 = the preset's 64 per step
    python hub/recipes/papers.py --list                            # every preset's command line

It needs the data set on disk, the pretrained weights (network or HF cache) and GPUs: none of that
exists on the machines that build robustwrap, so no entry of the zoo comes from it yet;
tests/test_train_cli.py runs every preset's first step on timm's tiny test networks. CIFAR-10's
presets resize its images to 224 without cropping (`--crop-pct 1`, saved with the model so that
`robustwrap certify` preprocesses the same way) and defend against the papers' 35 px patch.
"""

from __future__ import annotations

import argparse
import shlex
import sys

# Greedy Cutout's recipe, shared by every preset: Multi-size Greedy Cutout; 10 epochs of SGD, the
# learning rate by fit_masking's rule (0.01 for a convolutional network, 0.001 for a transformer or
# MLP-mixer), x0.1 after epoch 5.
_RECIPE = ["--num-masks", "6", "--strategy", "multisize_greedy", "--epochs", "10", "--batch-size", "64"]

# PatchCleanser's three ImageNet models, as tagged in today's timm (their `_distilled` names and
# timm 0.4.12's default ViT-B/16 weights, the AugReg in21k fine-tuned on in1k).
ARCHS = {
    "vit_b16": "vit_base_patch16_224.augreg_in21k_ft_in1k",
    "resnetv2_50x1": "resnetv2_50x1_bit.goog_distilled_in1k",
    "resmlp_24": "resmlp_24_224.fb_distilled_in1k",
}
# Each data set's head, threat model and preprocessing. ImageNet and ImageNette: the 2% patch (32 px
# on 224) at timm's data config with timm's training augmentation. CIFAR-10: the papers resize its
# 32 px images to 224 without cropping (--crop-pct 1, saved with the model) and use a 35 px patch.
DATASETS = {
    "imagenette": ["--num-classes", "10", "--patch", "2%", "--augment"],
    "imagenet": ["--patch", "2%", "--augment"],  # timm's 1000-class head
    "cifar10": ["--num-classes", "10", "--patch", "35", "--crop-pct", "1"],
}

PRESETS: dict[str, list[str]] = {
    f"{short}_{data}": ["--model", f"timm:{arch}", "--pretrained", *head, *_RECIPE]
    for short, arch in ARCHS.items()
    for data, head in DATASETS.items()
}
"""Preset name -> the options of `robustwrap train` it stands for (no data, no output)."""


def command(preset: str, *more: str) -> list[str]:
    """The argv of `robustwrap train` (for `robustwrap.cli.main`) for `preset`, followed by `more`.

    Raises:
        ValueError: for a name that is not a preset, listing those that are.
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; presets: {', '.join(PRESETS)}")
    return ["train", *PRESETS[preset], *more]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        usage="papers.py PRESET --data TRAIN [--val-data VAL] (--out DIR | --push ORG/NAME) [robustwrap train options]",
    )
    parser.add_argument("preset", nargs="?", choices=sorted(PRESETS))
    parser.add_argument("--list", action="store_true", help="print every preset's command line")
    args, more = parser.parse_known_args(argv)
    if args.list:
        for name in PRESETS:
            print(f"{name}: robustwrap {shlex.join(command(name))}")
        return 0
    if args.preset is None:
        parser.error("name a preset (or --list)")
    from robustwrap.cli import main as robustwrap

    return robustwrap(command(args.preset, *more))


if __name__ == "__main__":
    sys.exit(main())
