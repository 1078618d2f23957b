"""Import the checkpoints the defenses' authors published into robustwrap's Hub format.

```python
model = robustwrap.convert.import_checkpoint("vit_base_patch16_224_cutout2_128_imagenette.pth", "patchcleanser")
model.save_pretrained("pc-vit-imagenette")          # or: robustwrap import FILE --format patchcleanser --out DIR
```

Each project saves its weights its own way; this module knows five of them (read from the
authors' public code):

| format | files | what they hold |
| --- | --- | --- |
| `patchcleanser` | `{model}_{dataset}.pth`, `{model}_cutout2_128_{dataset}.pth`; MAE's `mae_finetuned_vit_base[_imagenet].pth` | `{"state_dict": ...}` (train_model.py, saved through `DataParallel`: `module.` keys); MAE's `{"model": ...}` for a ViT-B with `global_pool="avg"` |
| `patchguard` | `bagnet17_nette.pth`, `bagnet17_192_cifar.pth`, `bagnet17_net.pth` | `{"model_state_dict": ...}` or `{"net": ...}`, `module.` keys, the head a linear layer |
| `drs` | `imagenet_one_band_lr_{lr}_regularization_{wd}[_model_{model}_]_band_{b}_epoch_{N}[_resume_{file}].pth` | `{"net": ..., "acc", "epoch"}`, `module.` keys, a ResNet taking `2C` channels (`levine2020` encoding) |
| `smoothed-vit` | `{model}_k19.pt`, `{model}_block_k75[.pt]` (their README's), `checkpoint.pt.best` (MadryLab robustness library) | `{"model": ...}` with `module.model.model.` keys (`module.model.` for a CNN), the input normaliser's mean and std as buffers |
| `patchcure` | `vitsrf14x2_masked.pth.tar`, `vitsrf14x2_split9_masked.pth.tar` | `{"state_dict": ...}`: a timm ViT's keys (SRF-only), or their `nn.Sequential(pre, post)` split model's (`0.pre_layers.N.`, `1.post_layers.N.`); runs their forward (`authors=True`) |

Smoothed ViT's models drop tokens (their code does with `--drop-tokens`, which their README's
training and certification commands pass; a checkpoint does not record it), and so does the
imported one (`drop_tokens=True`; `drop_tokens=False` for a model trained without): each view
runs on the class token and the patch tokens that meet its kept band. That is the
authors' own rule (smoothed-vit's `MaskProcessor` and `VisionTransformer.forward_features`): the
ablation mask travels with the image as a fourth channel through the same upsampling, is averaged
over each token's pixels, and a token is kept when its average is above 0, that is when one of its
pixels is kept; position embeddings are added before the selection, tokens stay in grid order. On
CIFAR-10 a 28 px band of 224 (their 4 px of 32, upsampled x7) meets 2 or 3 of the 14 token columns
of 16 px, in their code and here alike. One difference, in training only: their ViT applies the
first image's kept tokens to its whole batch, and their training draws one band position per
batch, where robustwrap's `RandomAblation` draws one per image; certification is the same, since
their certification runs every image of a batch on the same view.

The file name carries the settings where the authors' scripts put them there (model, data set and
so classes, input size and preprocessing, cutout training, band or block size); the weights say the
rest (a ViT's size, the head's classes, the normaliser's data set); every one can be overridden.
Preprocessing is the authors' certification's, recorded as timm's data config: patchSmoothing's
`Resize((299, 299))` is `crop_mode="squash"`, the robustness library's `Resize(256)` and
`CenterCrop(224)` are `crop_pct=0.875` with bilinear resizing.
Files are read with `torch.load(weights_only=True)` only: a file that needs pickle code (any class
beyond tensors and plain containers) is refused, since unpickling can run arbitrary code.
"""

from __future__ import annotations

import contextlib
import dataclasses
import pickle
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from .defenses.base import RobustPatchClassifier

__all__ = ["FORMATS", "import_checkpoint", "read_checkpoint"]

FORMATS = ("patchcleanser", "patchguard", "smoothed-vit", "drs")

_IMAGENET_MEAN, _IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
_CIFAR_MEAN, _CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)


@dataclasses.dataclass
class _Plan:
    """What a checkpoint is: the timm model to build, the data it was trained for, the defense's settings."""

    arch: str
    num_classes: int
    defense: str
    patch: int | float
    options: dict[str, Any]
    dataset: str | None = None
    data_config: dict[str, Any] = dataclasses.field(default_factory=dict)  # pretrained_cfg fields: input_size, crop_pct, mean, ...
    model_args: dict[str, Any] = dataclasses.field(default_factory=dict)
    strategy: str | None = None


# ----------------------------------------------------------------------------------- reading
def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """The contents of a PyTorch checkpoint, read with `torch.load(weights_only=True)` only.

    Args:
        path: a `.pth` / `.pt` file.

    Returns:
        What the file holds (a dict for every format here).

    Raises:
        FileNotFoundError: no such file.
        ValueError: a file that needs pickle code to load (unpickling can run arbitrary code,
            so it is refused), or that is not a PyTorch checkpoint at all.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    with path.open("rb") as file:
        head = file.read(16)
    # torch.save writes a zip archive (PyTorch >= 1.6) or, with the legacy format, a pickle (first byte
    # 0x80, its protocol marker); torch's reader fails on anything else with internal errors (KeyError, ...).
    if not head.startswith((b"PK\x03\x04", b"\x80")):
        found = "an empty file" if not head else f"a file starting with {head[:8]!r}"
        raise ValueError(
            f"{path} is not a PyTorch checkpoint: expected a file written by torch.save (a zip archive or a pickle), got {found}"
        )
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        what = re.search(r"GLOBAL (\S+)", str(e))
        if what is None:  # torch's weights-only reader met bytes that are no pickle it knows
            raise ValueError(f"{path} is not a readable PyTorch checkpoint (torch.load(weights_only=True) cannot parse it)") from None
        name = f" ({what.group(1)})"
        raise ValueError(
            f"{path} needs pickle code to load{name}: robustwrap reads checkpoints with torch.load(weights_only=True) only, "
            "since unpickling can run arbitrary code; nothing was written"
        ) from None
    except (RuntimeError, EOFError, OSError, KeyError, IndexError, ValueError, TypeError, AttributeError) as e:
        # a damaged archive or pickle: torch's reader fails with whatever it met first
        text = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ValueError(f"{path} is not a readable PyTorch checkpoint ({type(e).__name__}: {text})") from None


def _state_dict(checkpoint: Any, keys: tuple[str, ...], path: Path) -> dict[str, torch.Tensor]:
    """The state dict under the first of `keys` present (or the checkpoint itself), `module.` stripped."""
    state = checkpoint
    if isinstance(checkpoint, dict):
        for key in keys:
            if isinstance(checkpoint.get(key), dict):
                state = checkpoint[key]
                break
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        top = sorted(checkpoint)[:8] if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise ValueError(f"{path} holds no state dict under {' or '.join(repr(k) for k in keys)} (it holds {top})")
    return {k.removeprefix("module."): v for k, v in state.items()}


# ------------------------------------------------------------------------------------ formats
# PatchCleanser's model names (timm 0.4.12) and today's timm tags with the same weights.
_PC_MODELS = {
    "resnetv2_50x1_bit_distilled": "resnetv2_50x1_bit.goog_distilled_in1k",
    "vit_base_patch16_224": "vit_base_patch16_224.augreg_in21k_ft_in1k",
    "resmlp_24_distilled_224": "resmlp_24_224.fb_distilled_in1k",
}
_PC_DATASETS = {"imagenet": 1000, "imagenette": 10, "flower102": 102, "cifar": 10, "cifar100": 100, "svhn": 10}
_PC_NAME = re.compile(rf"({'|'.join(_PC_MODELS)})(?:_cutout(\d+)_(\d+))?_({'|'.join(_PC_DATASETS)})\.pth?")
# MAE's fine-tuned ViT-B (facebookresearch/mae), which PatchCleanser's README has renamed with `_imagenet.pth`.
_PC_MAE_NAME = re.compile(r"mae_finetuned_vit_base(?:_imagenet)?\.pth?")


def _patchcleanser(path: Path, checkpoint: Any) -> tuple[_Plan, dict[str, torch.Tensor]]:
    """PatchCleanser's `train_model.py`: `{model}[_cutout{holes}_{size}]_{dataset}.pth`; MAE's ViT-B."""
    plan = _Plan(arch="", num_classes=0, defense="patchcleanser", patch=0.02, options={"num_masks": 6})
    if _PC_MAE_NAME.fullmatch(path.name):
        # utils/setup.py: timm's ViT-B with global_pool="avg" (MAE's fc_norm), ImageNet's mean and std
        # (it deletes the ViT's own), crop 224/256, and MAE's own `{"model": ...}` checkpoint.
        plan.arch, plan.num_classes, plan.dataset, plan.patch = "vit_base_patch16_224", 1000, "imagenet", 32
        plan.model_args = {"global_pool": "avg"}
        plan.data_config = {"crop_pct": 224 / 256, "mean": _IMAGENET_MEAN, "std": _IMAGENET_STD}
        plan.strategy = "MAE pre-training and fine-tuning (facebookresearch/mae)"
        return plan, _state_dict(checkpoint, ("model",), path)
    found = _PC_NAME.fullmatch(path.name)
    if found:
        model, holes, size, dataset = found.groups()
        plan.arch, plan.num_classes, plan.dataset = _PC_MODELS[model], _PC_DATASETS[dataset], dataset
        plan.strategy = (
            f"Cutout, {holes} holes of {size} px (the authors' training)" if holes else "plain fine-tuning (the authors' training)"
        )
        if dataset in ("cifar", "cifar100", "svhn"):
            # utils/setup.py: low-resolution images resized to 224x224 without cropping; the paper's 2.4% patch
            plan.data_config, plan.patch = {"crop_pct": 1.0}, 35
        else:
            plan.patch = 32
    # train_model.py saves {"state_dict": ...}; "model" is MAE's key, for its checkpoints under other names
    return plan, _state_dict(checkpoint, ("state_dict", "model_state_dict", "model"), path)


_PG_NAME = re.compile(r"(bagnet9|bagnet17|bagnet33)(?:_(\d+))?_(nette|cifar|net)\.pth?")


def _patchguard(path: Path, checkpoint: Any) -> tuple[_Plan, dict[str, torch.Tensor]]:
    """PatchGuard's BagNets: `bagnet17_nette.pth` (ImageNette), `bagnet17_192_cifar.pth`, `bagnet17_net.pth`."""
    from .models import checkpoint_filter_fn

    found = _PG_NAME.fullmatch(path.name)
    plan = _Plan(arch="", num_classes=0, defense="patchguard", patch=0.02, options={})
    if found:
        arch, size, dataset = found.groups()
        plan.arch, plan.dataset = arch, {"nette": "imagenette", "cifar": "cifar", "net": "imagenet"}[dataset]
        plan.num_classes = 1000 if dataset == "net" else 10
        if dataset == "cifar":
            # mask_bn_cifar.py: Resize(192, bicubic), no crop, CIFAR's mean and std; a 30 px patch
            side = int(size or 192)
            plan.data_config = {
                "input_size": (3, side, side),
                "crop_pct": 1.0,
                "interpolation": "bicubic",
                "mean": _CIFAR_MEAN,
                "std": _CIFAR_STD,
            }
            plan.patch = 30
        else:
            # mask_bn_imagenet.py: Resize(256), CenterCrop(224), ImageNet's mean and std; a 32 px (2%) patch
            plan.data_config = {
                "input_size": (3, 224, 224),
                "crop_pct": 0.875,
                "interpolation": "bilinear",
                "mean": _IMAGENET_MEAN,
                "std": _IMAGENET_STD,
            }
            plan.patch = 32
    state = _state_dict(checkpoint, ("model_state_dict", "net", "state_dict"), path)
    return plan, checkpoint_filter_fn(state, None)  # the linear head becomes robustwrap's 1x1 conv head


# train_imagenet_band.py names a new run `..._model_{model}__band_{b}_epoch_{N}.pth` and a resumed one
# `..._band_{b}_epoch_{N}_resume_{previous file}.pth` (no model: theirs are published under such names).
_DRS_NAME = re.compile(
    r"(cifar|imagenet|mnist)_one_band_lr_[^_]+_regularization_[^_]+_(?:model_(\w+?)_+)?band_(\d+)_epoch_\d+(?:_resume_.+)?\.pth?"
)


def _drs(path: Path, checkpoint: Any) -> tuple[_Plan, dict[str, torch.Tensor]]:
    """Levine & Feizi's patchSmoothing: `imagenet_one_band_lr_..._band_25_epoch_N[_resume_...].pth`.

    Only their ImageNet ResNets can be imported, so every file is read with their ImageNet
    certification's settings (certify_imagenet_band.py): images squashed to 299x299 without
    cropping (`Resize((299, 299))`, bilinear), ImageNet's mean and std, a 42 px patch (2% of
    299x299) and softmax threshold 0.2. The band size comes from the file name.
    """
    state = _state_dict(checkpoint, ("net", "state_dict", "model_state_dict"), path)
    found = _DRS_NAME.fullmatch(path.name)
    plan = _Plan(
        arch="", num_classes=0, defense="smoothing", patch=42, options={"encoding": "levine2020", "ablation": "column", "threshold": 0.2}
    )
    plan.dataset, plan.model_args = "imagenet", {"in_chans": 6}
    plan.data_config = {
        "input_size": (3, 299, 299),
        "crop_pct": 1.0,
        "crop_mode": "squash",
        "interpolation": "bilinear",
        "mean": _IMAGENET_MEAN,
        "std": _IMAGENET_STD,
    }
    if found:
        dataset, arch, band = found.groups()
        if dataset != "imagenet":
            raise ValueError(
                f"{path.name}: the authors' {dataset} networks (pytorch_cifar's ResNet: a 3x3 stem without pooling) are built "
                "neither by timm nor by torchvision, so a robustwrap folder could not rebuild them; only their ImageNet "
                "ResNets (resnet_imgnt.py, torchvision's layout) can be imported"
            )
        plan.options["size"] = int(band)
        plan.arch = arch or ""
    if not plan.arch and "conv1.weight" in state:
        # their script builds a resnet18 or (its default) a resnet50: the bottleneck's third conv tells them apart
        plan.arch = "resnet50" if "layer1.0.conv3.weight" in state else "resnet18"
    return plan, state


# (embedding width) -> the timm DeiT that the authors' custom ViT copies; their CIFAR-native
# `deit_*_patch4_32` are the same networks with 4 px tokens on 32 px images.
_DEIT = {192: "deit_tiny_patch16_224", 384: "deit_small_patch16_224", 768: "deit_base_patch16_224"}
# The README's files: `{model}_k19.pt` (column bands) and `{model}_block_k75[.pt]` (blocks); the ViTs
# are named `deit_tiny`, ..., the CNNs by their torchvision (and timm) names.
_SVIT_NAME = re.compile(r"(\w+?)_(?:(block)_)?k(\d+)(?:\.pt)?")
# The normaliser's mean tells the data set: the robustness library's ImageNet and CIFAR-10, and
# smoothed-vit's transfer_utils.py for CIFAR-100.
_SVIT_DATASETS = {(0.485, 0.456, 0.406): "imagenet", _CIFAR_MEAN: "cifar10", (0.5071, 0.4867, 0.4408): "cifar100"}


def _smoothed_vit(path: Path, checkpoint: Any) -> tuple[_Plan, dict[str, torch.Tensor]]:
    """Salman et al.'s smoothed-vit (MadryLab robustness library): `{"model": AttackerModel state}`.

    ImageNet (recognised by the normaliser's mean, as CIFAR-10 and CIFAR-100 are): the robustness
    library's Resize(256) and CenterCrop(224), column bands of 19 px (or what the README's file
    names say: `deit_small_block_k75.pt` is 75 px blocks) against a 32 px patch (the paper's 2%).
    CIFAR: a 224 px DeiT takes the 32 px images and upsamples them x7 itself, as their
    `--cifar-preprocess-type simple224` does (`input_size=32`, `resize="nearest"`), a
    `deit_*_patch4_32` or a CNN sees them as they are; either way 4 px bands of 32 against a 5 px
    patch in 32 px input pixels (Δ = 8 at stride 1, as theirs). A ViT's views drop the tokens that meet no kept pixel (`drop_tokens=True`), the
    authors' `MaskProcessor` rule; their CNNs run on whole ablated images.

    The robustness library keeps the network under `model.` (`model.model.` when wrapped for a
    custom forward), a copy under `attacker.`, and the input normaliser's mean and std as buffers.
    """
    state = _state_dict(checkpoint, ("model", "state_dict"), path)
    prefix = "model.model." if any(k.startswith("model.model.") for k in state) else "model."
    weights = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    if not weights:
        raise ValueError(f"{path}: no network weights under '{prefix}' (expected the robustness library's AttackerModel keys)")
    norm = {
        k.rsplit(".", 1)[-1]: v
        for k, v in state.items()
        if not k.startswith(("model.", "attacker.")) and k.endswith(("new_mean", "new_std"))
    }
    plan = _Plan(arch="", num_classes=0, defense="smoothing", patch=32, options={})
    found = _SVIT_NAME.fullmatch(path.name)
    ablation, size = ("block" if found[2] else "column", int(found[3])) if found else ("column", None)
    if found and not found[1].startswith("deit"):
        plan.arch = found[1]  # a CNN; a ViT's exact architecture is read from its weights below
    proj = weights.get("patch_embed.proj.weight")
    token = None
    if proj is not None:
        token, plan.arch = proj.shape[-1], _DEIT.get(proj.shape[0], "")
        plan.options["drop_tokens"] = True
        if token != 16:
            plan.model_args = {"patch_size": token, "img_size": 32}
    if "new_mean" in norm and "new_std" in norm:
        mean, std = (tuple(float(v) for v in norm[k].flatten()) for k in ("new_mean", "new_std"))
        # The authors ablate pixels to 0 (black) before normalising: in the model's input space that is -mean/std.
        plan.data_config = {"mean": mean, "std": std}
        plan.options["fill"] = tuple(-m / s for m, s in zip(mean, std))
        plan.dataset = next((name for known, name in _SVIT_DATASETS.items() if all(abs(a - b) < 1e-4 for a, b in zip(mean, known))), None)
    if plan.dataset in ("cifar10", "cifar100"):
        size, plan.patch = size or 4, 5
        if token == 16:
            # `--cifar-preprocess-type simple224`: 32 px images ablated (`--certify-ablation-size 4`,
            # `--certify-stride 1`), then upsampled x7 (nearest) to the ViT's 224; a 5 px patch of the 32 px
            # image (`--certify-patch-size 5`): Δ = 8, as theirs. The defended model takes the 32 px images.
            plan.data_config.update(input_size=(3, 224, 224), crop_pct=1.0, interpolation="nearest")
            plan.options.update(input_size=32, resize="nearest", stride=1)
        else:
            # a `deit_*_patch4_32` or a CNN (`--cifar-preprocess-type none`): the 32 px images themselves
            plan.data_config.update(input_size=(3, 32, 32), crop_pct=1.0, interpolation="bilinear")
    elif plan.dataset == "imagenet":
        # robustness' ImageNet test transform: Resize(256) (bilinear), CenterCrop(224)
        plan.data_config.update(input_size=(3, 224, 224), crop_pct=0.875, crop_mode="center", interpolation="bilinear")
    plan.options.update(ablation=ablation, size=size or 19)
    return plan, weights


_READERS = {"patchcleanser": _patchcleanser, "patchguard": _patchguard, "drs": _drs, "smoothed-vit": _smoothed_vit}


# ---------------------------------------------------------------- PatchCURE (inspire-group/PatchCURE)
# Their ViTs (utils/vit_srf.py, utils/split.py): timm ViTs with global_pool="avg" and a class token.
_CURE_VITS = {(768, 12): "vit_base_patch16_224", (1024, 24): "vit_large_patch16_224"}
# checkpoints/README.md: {model}_{split}_{dataset}_{training}.pth.tar, split and (for ImageNet) dataset left out.
_CURE_NAME = re.compile(r"vit(l?)srf(\d+)x(\d+)(?:_split(\d+))?(?:_(cifar))?_(masked|vanilla)\.pth(?:\.tar)?")
_CURE_BLOCK = re.compile(r"0\.pre_layers\.(\d+)\.|1\.post_layers\.(\d+)\.")


def _patchcure(path: Path, checkpoint: Any) -> tuple[_Plan, dict[str, torch.Tensor]]:
    """The PatchCURE authors' ViT-SRF checkpoints: `vitsrf14x2_masked.pth.tar` (SRF-only), `vitsrf14x2_split9_masked.pth.tar`.

    timm's training script saved them (`{"state_dict": ...}`). An SRF-only file is a timm ViT's own
    state dict. A split file is their `nn.Sequential(pre, post)` of `utils/split.py`: the pre part
    holds `pos_embed`, `cls_token` and `pre_layers` (the ViT's children before its blocks, then
    blocks `[0, k)`), the post part `post_layers` (blocks `[k, depth)`, then the ViT's children
    after its blocks: norm, fc_norm, head dropout, head). Their loader matches the keys by order
    (`load_checkpoint(remap=True)`); here each goes back to its timm name. The window and split
    come from the name; the model runs their forward (`authors=True`).
    """
    state = _state_dict(checkpoint, ("state_dict", "model", "state_dict_ema"), path)
    found = _CURE_NAME.fullmatch(path.name)
    plan = _Plan(arch="", num_classes=0, defense="patchcure", patch=32, options={"mask_stride": 1, "authors": True})
    plan.model_args = {"global_pool": "avg"}
    # builder.py: 224 px, bicubic; ImageNet's crop 224/256, CIFAR-10 resized whole; ImageNet's mean and std for both
    plan.data_config = {
        "input_size": (3, 224, 224),
        "interpolation": "bicubic",
        "crop_pct": 0.875,
        "mean": _IMAGENET_MEAN,
        "std": _IMAGENET_STD,
    }
    split = None
    if any(k.startswith(("0.", "1.")) for k in state):
        state, split = _cure_split_state(state, path)
    if "patch_embed.proj.weight" in state:
        depth = len({k.split(".")[1] for k in state if k.startswith("blocks.")})
        plan.arch = _CURE_VITS.get((state["patch_embed.proj.weight"].shape[0], depth), "")
        plan.options["split"] = depth if split is None else split  # SRF-only: every block windowed
    if "head.weight" in state:
        plan.num_classes = state["head.weight"].shape[0]
        plan.dataset = "imagenet" if plan.num_classes == 1000 else None
    if found:
        _, wh, ww, named_split, cifar, training = found.groups()
        plan.options["window"] = (int(wh), int(ww))
        if named_split is not None and int(named_split) != plan.options.get("split"):
            raise ValueError(f"{path.name} names split {named_split}, but its weights hold {plan.options.get('split')} windowed blocks")
        if cifar:
            plan.dataset = "cifar10"
            plan.data_config["crop_pct"] = 1.0
        plan.strategy = "random feature masks (the authors' training)" if training == "masked" else "plain training (the authors')"
    return plan, state


def _cure_split_state(state: dict[str, torch.Tensor], path: Path) -> tuple[dict[str, torch.Tensor], int]:
    """Their `nn.Sequential(pre, post)` keys -> a timm ViT's (`global_pool="avg"`: no final norm's parameters), and the split."""
    pre = sorted({int(m[1]) for m in map(_CURE_BLOCK.match, state) if m and m[1] is not None})
    post = sorted({int(m[2]) for m in map(_CURE_BLOCK.match, state) if m and m[2] is not None})

    def is_block(part: str, index: int) -> bool:
        return any(k.startswith(f"{part}.{index}.attn.") for k in state)

    pre_blocks = [i for i in pre if is_block("0.pre_layers", i)]
    post_blocks = [i for i in post if is_block("1.post_layers", i)]
    tail = [i for i in post if i not in post_blocks]  # fc_norm, then the head (norm and dropouts hold nothing)
    if not pre or pre[0] != 0 or not pre_blocks or len(tail) != 2 or post_blocks != list(range(len(post_blocks))):
        raise ValueError(
            f"{path}: not the PatchCURE authors' split layout (0.pre_layers.0 = patch_embed, 0.pre_layers.N = the first blocks, "
            f"1.post_layers.N = the last blocks, then fc_norm and the head); found pre_layers {pre} and post_layers {post}"
        )
    names = {"0.pos_embed": "pos_embed", "0.cls_token": "cls_token", "0.pre_layers.0.": "patch_embed."}
    names.update({f"0.pre_layers.{n}.": f"blocks.{i}." for i, n in enumerate(pre_blocks)})
    names.update({f"1.post_layers.{n}.": f"blocks.{len(pre_blocks) + n}." for n in post_blocks})
    names.update({f"1.post_layers.{tail[0]}.": "fc_norm.", f"1.post_layers.{tail[1]}.": "head."})
    out = {}
    for key, value in state.items():
        prefix = next((p for p in names if key == p or (p.endswith(".") and key.startswith(p))), None)
        if prefix is None:
            raise ValueError(f"{path}: key {key!r} is none of the PatchCURE authors' split model's")
        out[names[prefix] + key[len(prefix) :]] = value
    return out, len(pre_blocks)


_READERS["patchcure"] = _patchcure
FORMATS = (*FORMATS, "patchcure")


# ------------------------------------------------------------------------------------ building
def _build(plan: _Plan, state: dict[str, torch.Tensor], image_size: tuple[int, int] | None, source: str) -> nn.Module:
    """The timm model of `plan` holding `state` (adapted by timm's own filter for older key layouts)."""
    import timm

    from . import models  # noqa: F401 - registers the BagNets with timm
    from .hub import load_state_strictly

    kwargs: dict[str, Any] = {"num_classes": plan.num_classes, **plan.model_args}
    try:  # models with a fixed input size (ViTs) take img_size; convolutional ones take any size
        base = timm.create_model(plan.arch, pretrained=False, **kwargs, **({"img_size": image_size} if image_size else {}))
    except TypeError as e:
        if "img_size" not in str(e):
            raise
        base = timm.create_model(plan.arch, pretrained=False, **kwargs)
    want = base.state_dict()
    if set(state) != set(want):
        # Weights saved by an older timm (PatchCleanser used 0.4.12): timm's own converter.
        filter_fn = getattr(sys.modules[type(base).__module__], "checkpoint_filter_fn", None)
        if filter_fn is not None:
            # A converter that does not apply leaves the keys as they were; the strict load below names them.
            with contextlib.suppress(KeyError, IndexError, AttributeError, TypeError, ValueError, RuntimeError):
                state = filter_fn(state, base)
    load_state_strictly(base, state, source, f"timm's {plan.arch} with {', '.join(f'{k}={v}' for k, v in kwargs.items())}")
    cfg = dict(base.pretrained_cfg)
    cfg.update(plan.data_config)
    if image_size is not None:
        cfg["input_size"] = (cfg.get("input_size", (3,))[0], *image_size)
    base.pretrained_cfg = cfg
    return base


def _head_classes(arch: str, state: dict[str, torch.Tensor]) -> int:
    """Classes of the head in `state`, under the name timm gives `arch`'s classifier (0 when not there)."""
    from timm.models import get_pretrained_cfg_value

    try:
        classifier = get_pretrained_cfg_value(arch, "classifier")
    except RuntimeError:  # an architecture registered without a pretrained config
        return 0
    classifier = classifier[0] if isinstance(classifier, (tuple, list)) else classifier
    head = state.get(f"{classifier}.weight") if isinstance(classifier, str) else None
    return int(head.shape[0]) if head is not None and head.ndim >= 2 else 0


# timm's data config values that `import_checkpoint` takes (`timm.data.create_transform`'s choices).
_CROP_MODES = ("center", "squash", "border")
_INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "box", "hamming", "lanczos")


def _preprocessing_overrides(crop_pct: float | None, crop_mode: str | None, interpolation: str | None) -> dict[str, Any]:
    """The data config fields given, checked (timm would only fail on them when a transform is made)."""
    if crop_pct is not None and (isinstance(crop_pct, bool) or not isinstance(crop_pct, (int, float)) or not 0 < crop_pct <= 1):
        raise ValueError(f"crop_pct must be a fraction in (0, 1] (1: resize without cropping), got {crop_pct!r}")
    if crop_mode is not None and crop_mode not in _CROP_MODES:
        raise ValueError(
            f"crop_mode must be one of {', '.join(_CROP_MODES)} (squash: resize to the input size, ignoring the aspect ratio), got {crop_mode!r}"
        )
    if interpolation is not None and interpolation not in _INTERPOLATIONS:
        raise ValueError(f"interpolation must be one of {', '.join(_INTERPOLATIONS)}, got {interpolation!r}")
    given = {"crop_pct": crop_pct, "crop_mode": crop_mode, "interpolation": interpolation}
    return {k: float(v) if k == "crop_pct" else v for k, v in given.items() if v is not None}


def import_checkpoint(
    path: str | Path,
    format: str,
    *,
    model: str | None = None,
    num_classes: int | None = None,
    image_size: int | tuple[int, int] | None = None,
    patch: float | tuple[int, int] | None = None,
    dataset: str | None = None,
    crop_pct: float | None = None,
    crop_mode: str | None = None,
    interpolation: str | None = None,
    **options: Any,
) -> RobustPatchClassifier:
    """The defended model of a checkpoint the authors of a defense published.

    Settings come from the file name where the authors' scripts put them, and from the
    weights (architecture, classes, the normaliser's data set; see the module's table);
    every argument given here overrides them.

    Args:
        path: the checkpoint file.
        format: `"patchcleanser"`, `"patchguard"`, `"smoothed-vit"`, `"drs"` or `"patchcure"` (who saved it).
        model: the timm architecture (`"vit_base_patch16_224"`, `"bagnet17"`, ...); required
            when neither the file name nor the weights tell.
        num_classes: classes of the head (default: the head's, else the checkpoint's data set).
        image_size: `H` or `(H, W)` of the model's input (default: the authors').
        patch: the threat model's patch (default: the authors' for that data set).
        dataset: recorded with the model (default: from the file name).
        crop_pct: the share of the resized image that the center crop keeps, recorded with the
            model as timm's `crop_pct` (default: the authors' preprocessing).
        crop_mode: timm's `"center"`, `"squash"` (resize to the input size, ignoring the aspect
            ratio) or `"border"` (default: the authors' preprocessing).
        interpolation: resizing filter, `"bilinear"`, `"bicubic"`, `"nearest"`, ... (default:
            the authors' preprocessing).
        **options: the defense's own options, as `robustwrap.wrap` takes them (`num_masks`,
            `size`, `ablation`, `threshold`, `encoding`, `drop_tokens`, `receptive_field`, ...),
            plus `fill`, `precision`, `margin`. `smoothed-vit` sets `drop_tokens=True` for a ViT,
            as the authors' ViT does; `drop_tokens=False` runs every view on all its tokens instead.

    Returns:
        The defended model in eval mode, its base a timm model with the checkpoint's weights, its
        `pretrained_info` saying where they came from: `model.save_pretrained(folder)` writes the
        robustwrap folder.

    Raises:
        ValueError: an unknown format; a file that is not a PyTorch checkpoint, needs pickle code
            or holds no state dict; a checkpoint that says neither its model nor its classes and
            no `model` / `num_classes`; weights that do not fit the model; a bad preprocessing value.
        FileNotFoundError: no such file.
    """
    from ._args import as_image_size
    from .defenses import wrap
    from .hub import sha256_of

    if format not in _READERS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {format!r}")
    overrides = _preprocessing_overrides(crop_pct, crop_mode, interpolation)
    path = Path(path)
    checkpoint = read_checkpoint(path)
    plan, state = _READERS[format](path, checkpoint)
    if model is not None:
        plan.arch = model
    if not plan.arch:
        raise ValueError(
            f"{path.name} does not say its model the way the {format} code names its files: pass model=, e.g. a timm architecture"
        )
    import timm

    from . import models  # noqa: F401 - registers the BagNets with timm

    if not timm.is_model(plan.arch):
        raise ValueError(f"model {plan.arch!r} is not a timm architecture (timm {timm.__version__})")
    plan.num_classes = num_classes if num_classes is not None else _head_classes(plan.arch, state) or plan.num_classes
    if not plan.num_classes:
        raise ValueError(f"{path.name} does not say its number of classes: pass num_classes=")
    plan.data_config.update(overrides)
    size = as_image_size(image_size) if image_size is not None else None
    if patch is not None:
        plan.patch = patch
    plan.options.update(options)
    base = _build(plan, state, size, str(path)).eval()
    h, w = size or tuple(base.pretrained_cfg["input_size"][1:])
    defended = wrap(base, plan.patch, defense=plan.defense, image_size=(h, w), **plan.options).eval()
    defended.pretrained_info = {
        "dataset": dataset or plan.dataset,
        "strategy": plan.strategy,
        "source": {"format": format, "file": path.name, "sha256": sha256_of(path)},
    }
    return defended
