"""The certified defenses: each module holds one defense's rule, view scheduling and class.

`wrap(model, patch, defense=name, **options)` looks the class up in `DEFENSES` and calls its
`from_patch` builder. A new defense is a `RobustPatchClassifier` subclass with a `from_patch`
classmethod, added to `DEFENSES` here.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

from torch import nn

from .base import CertifyResult, RobustPatchClassifier
from .patchcleanser import PatchCleanser, PatchCleanserResult
from .patchcure import PatchCURE, PatchCUREResult
from .patchguard import PatchGuard, PatchGuardResult
from .smoothing import DerandomizedSmoothing, SmoothingResult

__all__ = ["RobustPatchClassifier", "CertifyResult", "PatchCleanser", "PatchCleanserResult", "DerandomizedSmoothing", "SmoothingResult", "PatchGuard", "PatchGuardResult", "PatchCURE", "PatchCUREResult", "DEFENSES", "wrap"]

DEFENSES: dict[str, type[RobustPatchClassifier]] = {
    "patchcleanser": PatchCleanser,
    "smoothing": DerandomizedSmoothing,
    "patchguard": PatchGuard,
    "patchcure": PatchCURE,
}


def _options(defense: type[RobustPatchClassifier]) -> set[str]:
    """The keyword options a defense's `from_patch` builder takes (besides the model and patch)."""
    parameters = inspect.signature(defense.from_patch).parameters
    return {name for name, p in parameters.items() if p.kind is inspect.Parameter.KEYWORD_ONLY}


def wrap(
    model: nn.Module,
    patch: int | float | str | Sequence[int] | None = None,
    defense: str = "patchcleanser",
    **options: Any,
) -> RobustPatchClassifier:
    """Wrap any image classifier into a certifiably patch-robust classifier.

    ```python
    model = robustwrap.wrap(timm.create_model("resnet18"), patch=0.02).eval()   # 2% of 224x224 = 32 px
    ```

    The wrapped model takes the base model's train/eval mode without changing any submodule's
    (a BatchNorm frozen in eval mode stays frozen), and in train mode its forward is the base
    model's (undefended) forward: call `.eval()` before predicting. Every option can be read
    back as an attribute; assigning one after `wrap` acts as if it had been given here, or
    raises an error saying how to change it (docs/concepts.md#settings).

    Args:
        model: a timm or torchvision model, or any `nn.Module` mapping `(B, C, H, W)` to
            `(B, num_classes)` logits.
        patch: the patch: side in pixels (int), fraction of the image area (float in (0, 1),
            default 0.02), `(ph, pw)` in pixels for a rectangle, or text as the CLI's `--patch` takes
            it: `"2%"` (of the image area), `"0.02"` (area fraction), `"32px"` or `"32"` (pixels).
        defense: which defense: a key of `DEFENSES` (default `"patchcleanser"`).
        **options: the defense's own options, as its `from_patch` documents them
            (`PatchCleanser.from_patch`: `num_masks`, `stride`, `mask_set`), and the options every
            defense takes: `image_size` (`H` or `(H, W)`; defaults to the size a timm model was
            built for), `input_size` and `resize` (the defended model takes `input_size` images
            and resizes them to `image_size` inside its forward with `resize`, default
            `"nearest"`; its patch, masks and ablations are in input pixels, docs/concepts.md#input-pixels),
            `fill` (masked pixel value in the model's input space, default 0.0),
            `batch_size` (views per forward pass; default `None`: chosen for the model, image size
            and device), `precision` (`"float32"`, `"bfloat16"` or `"float16"` autocast, default
            `"float32"`), `margin` (certificate margin, default 1e-3, 0.1 for PatchGuard's
            evidence; 0 is the papers' rule) and `num_classes`.

    Returns:
        The defended model (a `DEFENSES[defense]` instance), in the same train/eval mode as `model`.

    Raises:
        TypeError: `model` is not an `nn.Module`, or is already defended.
        ValueError: an unknown `defense`, an option of another defense (the message names the
            defense it belongs to), or an impossible threat model.
    """
    if isinstance(model, RobustPatchClassifier):
        raise TypeError(f"model is already a RobustPatchClassifier ({type(model).__name__}); wrap its .model to change the defense")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if defense not in DEFENSES:
        raise ValueError(f"unknown defense {defense!r}; choose one of {', '.join(repr(d) for d in DEFENSES)}")
    cls = DEFENSES[defense]
    accepted = _options(cls)
    for name in options:
        if name not in accepted:
            owners = [d for d, other in DEFENSES.items() if name in _options(other)]
            if owners:
                raise ValueError(f"{name}= is an option of defense {' / '.join(repr(o) for o in owners)}, not of {defense!r}")
            raise TypeError(f"wrap() got an unexpected option {name}= for defense {defense!r}; its options: {', '.join(sorted(accepted))}")
    defended = cls.from_patch(model, patch, **options)
    defended._check_num_classes()  # once every option is checked: a model of one class certifies nothing
    return defended
