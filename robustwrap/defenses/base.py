"""The defense contract: what every certified patch defense in robustwrap shares.

`RobustPatchClassifier` holds the base model and the settings every defense has (image size,
fill, views per forward pass, numeric precision, certificate margin), checks inputs, runs the
base model in the defense's precision, and plugs the Hub format in. A defense subclasses it
with its own typed signature and implements `_robust_forward`, `predict`, `certify`,
`_defense_settings` / `_options_from_settings` and `from_patch` (see `PatchCleanser`).

Every setting is read where it is used: assigning `m.fill`, `m.batch_size`, `m.precision`,
`m.margin` or `m.model` takes effect in the next call and in `m.settings()` alike (a new base
model is checked as `wrap` checks it, and what is read from it follows it), and assigning what
cannot change (`image_size`, `in_chans`, `num_classes`, `defense`, a defense's `_not_assignable` keywords)
raises an error that says how to change it (the Concepts page, `docs/concepts.md#settings`, has
the table of every `wrap` keyword). Precision and margin are
explained at `docs/concepts.md#precision` and `docs/concepts.md#margin`, the fill at
`docs/concepts.md#fill`.
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn.functional as F
from huggingface_hub import PyTorchModelHubMixin
from torch import nn

from .._args import as_fill, as_image_size, as_labels, as_margin, as_precision, check_label_range, positive_int
from .._unwrap import local_module, unwrap
from ..views import InferenceCopy, auto_batch_size, call_model, eval_mode, model_device_dtype

if TYPE_CHECKING:
    from .detection import DetectionCertificate, DetectResult

__all__ = [
    "RobustPatchClassifier",
    "CertifyResult",
    "TrainingRecipe",
    "DEFAULT_BATCH_SIZE",
    "DEFAULT_PATCH",
    "DEFAULT_MARGIN",
    "RESIZE_MODES",
    "resolve_input_size",
    "resize_images",
]

DEFAULT_BATCH_SIZE = 64  # views per forward pass
DEFAULT_PATCH = 0.02  # of the image area, when `wrap` is not told the patch
# The certificate margin of a view's logits (PatchCleanser, smoothing): the largest change of a
# logit difference measured between layouts, views per pass and the inference copy on the zoo
# models in float32 is 3.4e-5 (benchmarks/speed.md), so 1e-3 leaves a factor of about 30 and costs
# no certificate there (median top-2 gap of a view: 6.7). PatchGuard's evidence sums many local
# logits and has its own default (robustwrap.defenses.patchguard.DEFAULT_EVIDENCE_MARGIN).
DEFAULT_MARGIN = 1e-3

# The settings every defense has; `settings()` adds the defense's own.
_COMMON_KEYS = ("defense", "image_size", "fill", "precision", "margin")
# Present only for a defended model that resizes its inputs (docs/concepts.md#input-pixels), so
# a model without a resize keeps the settings (and results fingerprints) it always had.
_RESIZE_KEYS = ("input_size", "resize")
RESIZE_MODES = ("nearest", "bilinear", "bicubic")
"""The interpolations a defended model may resize its inputs with (`torch.nn.functional.interpolate` modes)."""


@dataclass(frozen=True)
class CertifyResult:
    """Per-image outcome of `certify`, the fields every defense reports.

    Attributes:
        prediction: `(B,)` the robust prediction.
        certified: `(B,)` bool: no patch of the threat model can change the prediction, and it
            equals the label.
        num_views: `(B,)` views run through the base model for each image.
    """

    prediction: torch.Tensor
    certified: torch.Tensor
    num_views: torch.Tensor

    @property
    def total_views(self) -> int:
        """Views run through the base model for the whole batch."""
        return int(self.num_views.sum())


def _first_conv_channels(model: nn.Module) -> int | None:
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            return module.in_channels
    return None


def timm_input(model: nn.Module) -> tuple[int, tuple[int, int], bool] | None:
    """`(channels, (H, W), fixed)` a timm model was built for, or `None` for a non-timm model.

    Asks timm's public API: `timm.models.get_model_input_config` (timm >= 1.0.31) knows the size
    a model was built at (`create_model(..., img_size=64)`, which `pretrained_cfg` and
    `timm.data.resolve_model_data_config` do not reflect: they describe the pretrained source)
    and whether that size is fixed (a ViT's position embeddings). On older timm the patch
    embedding's `img_size` and the model's `in_chans` correct `resolve_model_data_config`.
    A DistributedDataParallel, DataParallel or compiled model is read through to the model it wraps (`unwrap`).
    """
    model = unwrap(model)
    if not isinstance(getattr(model, "pretrained_cfg", None), dict):
        return None
    import timm.data
    import timm.models

    get_input_config = getattr(timm.models, "get_model_input_config", None)
    if get_input_config is not None:
        config = get_input_config(model)
        c, h, w = config["input_size"]
        return int(c), (int(h), int(w)), bool(config.get("fixed_input_size"))
    c, h, w = timm.data.resolve_model_data_config(model)["input_size"]
    embed = getattr(model, "patch_embed", None)
    built = getattr(embed, "img_size", None)
    fixed = bool(getattr(embed, "strict_img_size", model.pretrained_cfg.get("fixed_input_size", False))) and not getattr(model, "dynamic_img_size", False)
    if isinstance(built, (tuple, list)) and len(built) == 2:
        h, w = built
    if isinstance(getattr(model, "in_chans", None), int):
        c = model.in_chans
    return int(c), (int(h), int(w)), fixed


def timm_mean_std(model: nn.Module) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    """The normalisation mean and std a timm model expects (timm's public data config), else `None`."""
    model = unwrap(model)
    if not isinstance(getattr(model, "pretrained_cfg", None), dict):
        return None
    import timm.data

    config = timm.data.resolve_model_data_config(model)
    return tuple(float(v) for v in config["mean"]), tuple(float(v) for v in config["std"])


def resolve_image_size(model: nn.Module, image_size: int | Sequence[int] | None) -> tuple[int, int]:
    """The `(H, W)` a defense of `model` certifies at: `image_size`, else what the timm model was built for.

    Raises:
        ValueError: no `image_size` for a model that does not carry one, or an `image_size` that
            a timm model with a fixed input size (a ViT built with `img_size=...`) cannot take;
            the message says which argument to pass.
    """
    timm_cfg = timm_input(model)
    if image_size is None:
        if timm_cfg is None:
            raise ValueError(
                "image_size is required: the model has no timm pretrained_cfg to read it from "
                "(pass e.g. image_size=224 or image_size=(H, W))"
            )
        return timm_cfg[1]
    size = as_image_size(image_size)
    if timm_cfg is not None and timm_cfg[2] and size != timm_cfg[1]:
        h, w = timm_cfg[1]
        raise ValueError(
            f"image_size={image_size!r} does not match the {h}x{w} input this timm model was built for (its input size is fixed); "
            f"pass image_size={h if h == w else (h, w)!r}, or create the model with timm.create_model(..., img_size={size[0] if size[0] == size[1] else size})"
        )
    return size


def resolve_input_size(
    image_size: tuple[int, int], input_size: int | Sequence[int] | None, resize: str | None
) -> tuple[tuple[int, int] | None, str | None]:
    """`(input_size, resize)` checked against the base model's `image_size`: `(None, None)` when the inputs are not resized.

    A defended model with an input size of its own takes `input_size` images and resizes them
    to the base model's `image_size` inside its forward, with the interpolation `resize`
    (default `"nearest"`, the upsampling of Smoothed ViT's CIFAR-10 models); its threat model
    is in input pixels (docs/concepts.md#input-pixels).

    Raises:
        ValueError: an `input_size` larger than `image_size` on an axis (a resize that shrinks
            the image mixes pixels: the papers only upsample), an unknown `resize`, or a
            `resize` without a smaller `input_size`.
    """
    if input_size is None or as_image_size(input_size) == image_size:
        if resize is not None and input_size is None:
            raise ValueError(f"resize={resize!r} needs an input_size smaller than the model's image_size {image_size}: the inputs are not resized")
        return None, None
    size = as_image_size(input_size)
    if size[0] > image_size[0] or size[1] > image_size[1]:
        raise ValueError(
            f"input_size={input_size!r} is larger than the {image_size[0]}x{image_size[1]} images the base model takes: "
            "the defended model only upsamples its inputs (pass a smaller input_size, or resize the images before the model)"
        )
    resize = "nearest" if resize is None else resize
    if resize not in RESIZE_MODES:
        raise ValueError(f"resize must be one of {', '.join(map(repr, RESIZE_MODES))}, got {resize!r}")
    return size, resize


def resize_images(x: torch.Tensor, size: tuple[int, int], mode: str) -> torch.Tensor:
    """`x` `(B, C, h, w)` resized to `size` with `mode`: the one resize of a defended model with an input size of its own.

    `"bilinear"` and `"bicubic"` use `align_corners=False` (torchvision's and timm's resize).
    """
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    corners = None if mode == "nearest" else False
    return nn.functional.interpolate(x, size=tuple(size), mode=mode, align_corners=corners)


class _Resized(nn.Module):
    """The base model behind the defended model's resize: what inference runs views through."""

    def __init__(self, model: nn.Module, size: tuple[int, int], mode: str):
        super().__init__()
        self.model, self.size, self.mode = model, size, mode

    def forward(self, x: torch.Tensor):
        return self.model(resize_images(x, self.size, self.mode))


def _infer_in_chans(model: nn.Module) -> int | None:
    """Input channels: the model's `in_chans`, else timm's resolved input config, else the first conv.

    timm keeps `pretrained_cfg["input_size"]` of the pretrained source (3 channels) when a model
    is created with `in_chans=1`, so the model's own `in_chans` is asked first; the first
    registered `Conv2d` is only a fallback, since it need not be the stem.
    """
    model = unwrap(model)
    if isinstance(getattr(model, "in_chans", None), int) and not isinstance(model.in_chans, bool):
        return model.in_chans
    stem = getattr(model, "pretrained_cfg", {}).get("first_conv") if isinstance(getattr(model, "pretrained_cfg", None), dict) else None
    if isinstance(stem, str):  # the stem timm names: right on every timm version (<1.0.31 keeps the source's 3 channels)
        try:
            channels = model.get_submodule(stem).in_channels
        except AttributeError:
            channels = None
        if isinstance(channels, int):
            return channels
    timm_cfg = timm_input(model)
    if timm_cfg is not None:
        return timm_cfg[0]
    return _first_conv_channels(model)


def _require_two_classes(count: int) -> None:
    """Refuse fewer than two classes: the prediction is an argmax, which for one logit is always
    class 0, so every image labelled 0 would be "certified" whatever the model computes."""
    if count < 2:
        raise ValueError(
            f"num_classes must be at least 2, got {count}: the prediction is the argmax of the logits, which for a single logit "
            "is always class 0, so every image of class 0 would be certified whatever the model says. Give a binary "
            "classifier two logits, e.g. timm.create_model(..., num_classes=2), or for a one-logit model z return "
            "torch.cat([torch.zeros_like(z), z], dim=1) (class 1 where z > 0, as with a sigmoid)"
        )


def _check_base_model(value: Any) -> None:
    """A TypeError unless `value` is an `nn.Module` that is not already defended."""
    if isinstance(value, RobustPatchClassifier):
        raise TypeError(f"model is already a RobustPatchClassifier ({type(value).__name__}); use its .model as the base model")
    if not isinstance(value, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(value).__name__}")


def _same(x: torch.Tensor) -> torch.Tensor:
    return x


@dataclass(frozen=True)
class TrainingRecipe:
    """How `fit_masking` trains a defense's base model with one strategy (`RobustPatchClassifier._training_recipe`).

    Attributes:
        augment: `augment(images, labels)` -> the images as trained, or `None` to train on them
            unmasked. An augment whose `views_in_forward` is true makes its views inside the
            forward instead (a ViT's dropped tokens, PatchCURE's masked features):
            `augment(images, labels, return_indices=True)` gives `(inputs, view)`, `view` one row
            per image (`-1`: left clean), and the model trained is `augment.logits(base, inputs, view)`,
            run as one module so that `DistributedDataParallel` synchronises its gradients.
        loss: `(output, labels) -> loss`, on what the base model (or `augment.logits`) returns.
        scores: `output -> (B, num_classes)` scores, for the training accuracy.
        lr: the strategy's own default learning rate; `None`: 0.01 for a convolutional network,
            0.001 for a transformer.
        encode: an image left clean (`clean_ratio`) as the base model takes it.
        local_logits: the output is a map of local logits whose clipped evidence must be
            positive (watched for a dead run).
    """

    augment: Callable | None = None
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy
    scores: Callable[[torch.Tensor], torch.Tensor] = _same
    lr: float | None = None
    encode: Callable[[torch.Tensor], torch.Tensor] = _same
    local_logits: bool = False


class RobustPatchClassifier(
    nn.Module,
    PyTorchModelHubMixin,
    library_name="robustwrap",
    tags=["robustwrap", "certified-robustness", "adversarial-patch"],
):
    """The base of every certified patch defense: a base classifier plus the defense's settings.

    In eval mode `forward` returns the defense's robust logits; in train mode it is the base
    model's forward (in the model's precision), so a defended model trains like the original.
    A train-mode forward under `torch.no_grad()` warns once: that is inference without the
    defense, almost always a forgotten `.eval()`. Build one with `robustwrap.wrap` or a
    defense's own class (`robustwrap.PatchCleanser`).

    `save_pretrained(folder)`, `push_to_hub(repo_id)` and `from_pretrained(repo_or_folder)` come
    from `huggingface_hub.PyTorchModelHubMixin` and write timm's Hub format plus a `"robustwrap"`
    section holding `settings()` (see `robustwrap.hub`).

    Subclasses set `defense` and implement `_robust_forward`, `predict`, `certify`,
    `_defense_settings`, `_options_from_settings` and the `from_patch` builder that
    `robustwrap.wrap` calls. A defense also brings its training (`robustwrap.fit_masking` asks
    it, never which defense it is): `training_strategies` and `default_strategy`, `_training_recipe`
    (the views, loss and learning rate of a strategy), `_training_geometry` (what a checkpoint
    records, so a resume with other views is refused) and `_train_forward`.

    Args:
        model: the base classifier, `(B, C, H, W) -> (B, num_classes)` logits.
        image_size: `(H, W)` of the base model's inputs.
        input_size: `(h, w)` of the defended model's inputs when it has an input size of its own
            (no larger than `image_size`): it resizes them to `image_size` inside its forward,
            and its threat model (patch, masks, ablations, fill) is in these input pixels
            (docs/concepts.md#input-pixels). `None`: the inputs are `image_size`, not resized.
        resize: the interpolation of that resize, one of `RESIZE_MODES` (default `"nearest"`).
        fill: value of masked / ablated pixels in the model's input space (after normalisation):
            a scalar or one value per channel. Train and certify with the same fill.
        batch_size: views per forward pass (speed and memory only; results do not depend on it);
            `None` picks one for the model, image size and device.
        precision: `"float32"`, `"bfloat16"` or `"float16"`: the autocast precision of every
            forward pass of the base model (prediction and certification alike).
        margin: certificate margin, a float >= 0 (0 is the papers' rule; the default absorbs the
            rounding changes of other layouts and kernels, docs/concepts.md#margin); stored with the model.
        num_classes: classes of the base model; read from `model.num_classes` when it has one,
            else found with one forward pass of a blank image the first time it is needed.

    Raises:
        TypeError: if `model` is not an `nn.Module` or is already a `RobustPatchClassifier`.
        ValueError: for a bad `fill`, `batch_size`, `precision`, `margin` or `num_classes`, and for
            a model with fewer than two classes (given, its attribute or its logits): the argmax of
            one logit is always class 0, a certificate of nothing.
    """

    defense: ClassVar[str] = ""
    _geometry_name: ClassVar[str] = "defense"  # "images must be HxW for this <...>"
    # The strategy names `fit_masking` takes for this defense ("none": clean fine-tuning), and its own.
    training_strategies: ClassVar[tuple[str, ...]] = ("none",)
    default_strategy: ClassVar[str] = "none"

    def __init__(
        self,
        model: nn.Module,
        *,
        image_size: int | Sequence[int],
        input_size: int | Sequence[int] | None = None,
        resize: str | None = None,
        fill: float | Sequence[float] = 0.0,
        batch_size: int = DEFAULT_BATCH_SIZE,
        precision: str = "float32",
        margin: float = DEFAULT_MARGIN,
        num_classes: int | None = None,
    ):
        super().__init__()
        self._image_size = as_image_size(image_size)
        self._input_size, self._resize = resolve_input_size(self._image_size, input_size, resize)
        self._num_classes: int | None = None
        self._warned_train_mode = False
        self.model = model  # checked and resolved in __setattr__
        if num_classes is not None:
            num_classes = positive_int(num_classes, "num_classes")
            attr = getattr(self._inner_model, "num_classes", None)
            if isinstance(attr, int) and attr != num_classes:
                raise ValueError(f"num_classes={num_classes} but the model says model.num_classes={attr}")
            self._num_classes = num_classes
        self.fill = fill
        self.batch_size = batch_size
        self.precision = precision
        self.margin = margin
        self.pretrained_info: dict = {}
        # Only the wrapper's own flag: `.train(mode)` would recurse and unfreeze a BatchNorm the
        # user put in eval mode inside a training model.
        self.training = self._inner_model.training  # a DistributedDataParallel has its own flag, not its module's

    # ------------------------------------------------------------------------------ settings
    # `wrap` keywords that cannot be assigned after `wrap`, with how to change them instead
    # (a subclass adds its own; docs/concepts.md#settings lists every keyword).
    _not_assignable: ClassVar[dict[str, str]] = {}

    def __setattr__(self, name: str, value: Any) -> None:
        if name in self._not_assignable:
            raise AttributeError(self._not_assignable[name])
        if name == "defense":
            # The class is the defense: an instance attribute would only rename it, and the saved
            # folder would name a defense whose settings it does not hold (it could not be loaded).
            raise AttributeError(
                f"defense is the class of this defended model ({type(self).__name__}, {self.defense!r}) and cannot be assigned; "
                "for another defense of the same base model call robustwrap.wrap(m.model, defense=..., ...)"
            )
        if name == "model" and "_modules" in self.__dict__:
            self._set_model(value)
            return
        if name == "_num_classes" and value is not None:  # given, or learnt from the model's logits wherever a defense first sees them
            _require_two_classes(value)
        super().__setattr__(name, value)

    def _set_model(self, value: nn.Module) -> None:
        """Assign the base model: check it as `wrap` does, re-derive what is read from it, and
        let the defense re-validate its own derived settings (`_model_changed`); on any error the
        previous model stays."""
        _check_base_model(value)
        fill = self.__dict__.get("_fill")
        in_chans = _infer_in_chans(value)
        if isinstance(fill, tuple) and in_chans is not None and len(fill) != in_chans:
            raise ValueError(f"the new model takes {in_chans} channels but fill has {len(fill)} values; set fill first")
        resolve_image_size(value, self._image_size)  # a timm model with a fixed input size must take this one
        said = getattr(unwrap(value), "num_classes", None)
        if isinstance(said, int) and not isinstance(said, bool):
            _require_two_classes(said)  # a model that says it has one class: refused before any forward pass
        previous = self._modules.get("model")
        saved = (self.__dict__.get("_model_in_chans"), self._num_classes)
        nn.Module.__setattr__(self, "model", value)
        self._model_in_chans = in_chans
        self._num_classes = None  # a new base model: ask it again
        if previous is None:
            return
        try:
            self._model_changed()
            self._check_num_classes()
        except BaseException:
            nn.Module.__setattr__(self, "model", previous)
            self._model_in_chans, self._num_classes = saved
            raise

    def _model_changed(self) -> None:
        """Re-validate what the defense derives from a newly assigned base model (raise to refuse it)."""

    def _check_num_classes(self) -> None:
        """Refuse a base model with fewer than two classes, now: one blank forward pass if it does not
        say how many (`wrap`, `from_settings` and `m.model = ...` call it once the defense has checked
        its settings; elsewhere the count is checked when it is first learnt)."""
        _require_two_classes(self.num_classes)

    @property
    def _inner_model(self) -> nn.Module:
        """The base model itself: `model` inside any DistributedDataParallel, DataParallel or compiled wrapper.

        Everything the defense derives from its model (`num_classes`, `in_chans`, timm's data
        config, PatchGuard's geometry, a ViT's token grid) is read here, at every use: a wrapper
        has none of the model's attributes. Token dropping runs its parts (robustwrap.tokens).
        """
        return unwrap(self.model)

    @property
    def _local_model(self) -> nn.Module:
        """What inference (eval mode, no gradient) runs: `model`, or the module inside its DistributedDataParallel.

        A compiled model runs compiled and a DataParallel one on its devices; a
        DistributedDataParallel is left out since calling it joins the other processes, and
        inference runs in this process alone. Training (`forward` in train mode) goes through
        `model`, whose wrapper averages the gradients.
        """
        return local_module(self.model)

    @property
    def image_size(self) -> tuple[int, int]:
        """`(H, W)` of the base model's inputs (fixed by the defense's geometry); `input_size` when nothing is resized."""
        return self._image_size

    @property
    def input_size(self) -> tuple[int, int]:
        """`(h, w)` of the defended model's inputs: the pixels its threat model is in (docs/concepts.md#input-pixels).

        `image_size` unless the model has an input size of its own, which its forward resizes to
        `image_size` with `resize`.
        """
        return self._input_size or self._image_size

    @input_size.setter
    def input_size(self, value) -> None:
        raise AttributeError(f"input_size is fixed by the {type(self).__name__}'s geometry; build a new one with robustwrap.wrap(m.model, input_size=...)")

    @property
    def resize(self) -> str | None:
        """The interpolation from `input_size` to `image_size` (`RESIZE_MODES`), or `None` when the inputs are not resized."""
        return self._resize

    @resize.setter
    def resize(self, value) -> None:
        raise AttributeError("resize is fixed with input_size; build a new one with robustwrap.wrap(m.model, input_size=..., resize=...)")

    def resize_input(self, x: torch.Tensor) -> torch.Tensor:
        """`x` at `input_size` resized to the base model's `image_size` (unchanged when nothing is resized)."""
        return x if self._resize is None else resize_images(x, self._image_size, self._resize)

    @image_size.setter
    def image_size(self, value) -> None:
        raise AttributeError(f"image_size is fixed by the {type(self).__name__}'s geometry; build a new one with robustwrap.wrap(m.model, image_size=...)")

    @property
    def fill(self) -> float | tuple[float, ...]:
        """Masked pixel value in the model's input space: a float, or one float per channel."""
        return self._fill

    @fill.setter
    def fill(self, value: float | Sequence[float]) -> None:
        value = as_fill(value)
        in_chans = self._model_in_chans
        if isinstance(value, tuple) and in_chans is not None and len(value) != in_chans:
            raise ValueError(f"fill has {len(value)} values but the model takes {in_chans} channels")
        self._fill = value

    @property
    def batch_size(self) -> int:
        """Views per forward pass (speed and memory only; not part of `settings()`).

        The value given, else (`None`, the default) the one chosen for the model, image size
        and device at every read (`robustwrap.views.auto_batch_size`). Assign `None` for auto.
        """
        if self._batch_size is None:
            return auto_batch_size(self._inner_model, self._image_size)
        return self._batch_size

    @batch_size.setter
    def batch_size(self, value: int | None) -> None:
        self._batch_size = None if value is None else positive_int(value, "batch_size")

    @property
    def precision(self) -> str:
        """Autocast precision of the base model's forward passes: `"float32"`, `"bfloat16"` or `"float16"`."""
        return self._precision

    @precision.setter
    def precision(self, value: str) -> None:
        self._precision = as_precision(value)

    @property
    def margin(self) -> float:
        """Certificate margin (float >= 0; 0 is the papers' rule)."""
        return self._margin

    @margin.setter
    def margin(self, value: float) -> None:
        self._margin = as_margin(value)

    @property
    def in_chans(self) -> int | None:
        """Input channels of the base model (its `in_chans`, timm's config, or the first conv), if known.

        For a model that does not say, a per-channel `fill` gives the count.
        """
        if self._model_in_chans is None and isinstance(self.fill, tuple):
            return len(self.fill)
        return self._model_in_chans

    @in_chans.setter
    def in_chans(self, value) -> None:
        raise AttributeError("in_chans is read from the base model; assign m.model to change it")

    @property
    def num_classes(self) -> int:
        """Number of classes of the base model (one blank forward pass the first time, if it does not say)."""
        attr = getattr(self._inner_model, "num_classes", None)
        if isinstance(attr, int) and not isinstance(attr, bool):
            return attr
        if self._num_classes is None:
            blank = torch.zeros(1, self.in_chans or 3, *self.image_size)
            with eval_mode(self._inner_model), torch.no_grad(), self.autocast():
                logits = self._local_model(self._prepare(blank))
            if not isinstance(logits, torch.Tensor) or logits.ndim != 2 or logits.shape[0] != 1:
                shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
                raise ValueError(f"the base model must map (N, C, H, W) images to (N, num_classes) logits; for 1 image it returned {shape}")
            self._num_classes = int(logits.shape[1])
        return self._num_classes

    @num_classes.setter
    def num_classes(self, value) -> None:
        raise AttributeError("num_classes is read from the base model; assign m.model to change it")

    def settings(self) -> dict[str, Any]:
        """Every setting that defines the defended function, JSON-ready.

        `{"defense", "image_size", "fill", "precision", "margin"}` (plus `"input_size"` and
        `"resize"` for a model that resizes its inputs) and the defense's own (e.g.
        PatchCleanser's `"mask_set"` and `"patch"`) and, for a defense with certified detection,
        its threshold `"tau"`. The Hub config, the results fingerprint and
        the report all serialise exactly this; `batch_size` is not part of it (speed only).
        `type(m).from_settings(m.model, m.settings())` rebuilds an equal defended model.
        """
        resize = {} if self._resize is None else {"input_size": list(self.input_size), "resize": self._resize}
        return {
            "defense": self.defense,
            "image_size": list(self.image_size),
            **resize,
            "fill": list(self.fill) if isinstance(self.fill, tuple) else self.fill,
            "precision": self.precision,
            "margin": self.margin,
            **self._defense_settings(),
            **({"tau": self.tau} if self._no_detection is None else {}),
        }

    @classmethod
    def from_settings(cls, model: nn.Module, settings: dict[str, Any], **runtime: Any) -> RobustPatchClassifier:
        """Rebuild a defended model from `settings()` (e.g. read from a Hub config).

        On `RobustPatchClassifier` itself it dispatches on `settings["defense"]`; on a defense
        class the settings must be that defense's. The dict may come from an untrusted file:
        every key is checked for type and range.

        Args:
            model: the base classifier.
            settings: a dict as `settings()` returns it.
            **runtime: settings that do not change the defended function: `batch_size`,
                `num_classes`.

        Returns:
            The defended model (in the base model's train/eval mode).

        Raises:
            TypeError: `settings` is not a dict, or an unknown runtime argument.
            ValueError: an unknown defense, a missing or unknown key, or a value of the wrong
                type or range (the message names the key).
        """
        if not isinstance(settings, dict):
            raise TypeError(f"settings must be a dict (from settings()), got {type(settings).__name__}")
        if cls is RobustPatchClassifier:
            from . import DEFENSES

            defense = settings.get("defense")
            if defense not in DEFENSES:
                raise ValueError(f"settings name defense {defense!r}; known defenses: {', '.join(sorted(DEFENSES))}")
            return DEFENSES[defense].from_settings(model, settings, **runtime)
        if settings.get("defense") != cls.defense:
            raise ValueError(f"settings are for defense {settings.get('defense')!r}, not {cls.defense!r} ({cls.__name__})")
        unknown = sorted(set(runtime) - {"batch_size", "num_classes"})
        if unknown:
            raise TypeError(f"unexpected arguments {unknown}: only batch_size and num_classes can be given besides the settings")
        missing = [key for key in _COMMON_KEYS if key not in settings]
        if missing:
            raise ValueError(f"settings lack {', '.join(missing)} (keys: {sorted(settings)})")
        options, used = cls._options_from_settings(settings)
        detection = () if cls._no_detection is not None else ("tau",)  # optional: configs written before detection have none
        extra = sorted(set(settings) - set(_COMMON_KEYS) - set(_RESIZE_KEYS) - set(used) - set(detection))
        if extra:
            raise ValueError(f"unknown {cls.defense} settings {extra}")
        try:
            common = {"fill": as_fill(settings["fill"]), "precision": as_precision(settings["precision"]), "margin": as_margin(settings["margin"])}
        except TypeError as error:
            raise ValueError(str(error)) from None
        image_size = settings["image_size"]
        if not isinstance(image_size, (list, tuple)):
            raise ValueError(f"settings image_size must be [H, W], got {image_size!r}")
        image_size = as_image_size(image_size)
        if "input_size" in settings:
            input_size, resize = settings["input_size"], settings.get("resize")
            if not isinstance(input_size, (list, tuple)) or not isinstance(resize, str):
                raise ValueError(f"settings input_size must be [h, w] with a resize mode, got input_size={input_size!r}, resize={resize!r}")
            common.update(input_size=as_image_size(input_size), resize=resize)
        elif "resize" in settings:
            raise ValueError("settings give resize without input_size")
        defended = cls(model, **options, **common, **runtime)
        if defended.image_size != image_size:
            raise ValueError(f"settings image_size {list(image_size)} disagrees with the {cls.defense} geometry's {list(defended.image_size)}")
        if "tau" in settings and detection:
            try:
                defended.tau = settings["tau"]
            except TypeError as error:
                raise ValueError(f"settings {error}") from None
        defended._check_num_classes()
        return defended

    def _defense_settings(self) -> dict[str, Any]:
        """The defense's own settings, JSON-ready (merged into `settings()`)."""
        raise NotImplementedError

    @classmethod
    def _options_from_settings(cls, settings: dict[str, Any]) -> tuple[dict[str, Any], Sequence[str]]:
        """`(constructor keyword arguments, settings keys read)` from the defense's own settings, checked."""
        raise NotImplementedError

    @classmethod
    def from_patch(cls, model: nn.Module, patch: Any = None, **options: Any) -> RobustPatchClassifier:
        """Build this defense for a threat model: what `robustwrap.wrap(model, patch, defense=cls.defense, **options)` calls."""
        raise NotImplementedError

    def extra_repr(self) -> str:
        resized = "" if self._resize is None else f", input_size={self.input_size}, resize={self._resize}"
        return f"defense={self.defense}, image_size={self.image_size}{resized}, fill={self.fill}, batch_size={self.batch_size}, precision={self.precision}, margin={self.margin}"

    def __copy__(self) -> RobustPatchClassifier:
        """A shallow copy with its own settings: changing the copy's settings leaves this one alone.

        The base model and its parameters are shared (as in any shallow copy); the module and
        buffer tables are not, so `copy.model = other` or `copy.mask_set = ...` does not reach
        back into the original.
        """
        clone = type(self).__new__(type(self))
        clone.__dict__ = self.__dict__.copy()
        for name in ("_parameters", "_buffers", "_modules", "_non_persistent_buffers_set", "pretrained_info"):
            if name in clone.__dict__:
                clone.__dict__[name] = copy.copy(clone.__dict__[name])
        return clone

    def _inference_model(self, example: torch.Tensor) -> nn.Module:
        """The module inference runs the base model through now (call in eval mode, without gradients).

        In float32 on the CPU, the base model's inference copy (`robustwrap.views.InferenceCopy`:
        BatchNorm folded into the convolutions, `channels_last` weights), used only while it
        provably computes the model's current function (every state the forward may read is
        compared at each call; docs/concepts.md#inference-copy), else the model itself
        (`_local_model`: a compiled or DataParallel model is never copied, it runs itself). At a
        lower precision the model runs itself: its folded weights round differently, moving
        logits by far more than the margin absorbs (0.34 on the embedded default in bfloat16;
        benchmarks/precision_margin.py).
        With an input size of its own (`input_size`), the module takes views at `input_size` and
        resizes them first: every view reaches the base model through this resize.
        `example`: the call's images (at `input_size`), to check a new copy on.
        """
        if self.precision != "float32":
            module = self._local_model
        else:
            cache = self.__dict__.get("_inference_copy")
            if cache is None:
                cache = self.__dict__["_inference_copy"] = InferenceCopy()
            module = cache.module(self._local_model, self.resize_input(example))
        return self._behind_resize(module)

    def _behind_resize(self, module: nn.Module) -> nn.Module:
        """`module` (the base model or its inference copy) taking `input_size` views: resized first, when the model resizes."""
        return module if self._resize is None else _Resized(module, self._image_size, self._resize)

    # ------------------------------------------------------------------------------ precision
    def autocast(self) -> contextlib.AbstractContextManager:
        """A context manager running the base model in `precision` on its device (no-op for float32)."""
        if self.precision == "float32":
            return contextlib.nullcontext()
        device, _ = model_device_dtype(self._inner_model)
        return torch.autocast(device.type, dtype=getattr(torch, self.precision))

    # ---------------------------------------------------------------------------------- hub
    # PyTorchModelHubMixin's entry points and hooks; the Hub format itself is robustwrap.hub's.
    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | Path,
        *,
        force_download: bool = False,
        token: str | bool | None = None,
        cache_dir: str | Path | None = None,
        local_files_only: bool = False,
        revision: str | None = None,
        **kwargs: Any,
    ) -> RobustPatchClassifier:
        """Load a defended model saved with `save_pretrained` / `push_to_hub` (`robustwrap.hub.load`).

        Args:
            pretrained_model_name_or_path: `hf-hub:<org>/<name>[@revision]`, `<org>/<name>`,
                `local-dir:<folder>` or an existing folder.
            force_download: download again even if cached.
            token: a Hugging Face token for private repos.
            cache_dir: the Hugging Face cache folder (None: `HF_HUB_CACHE`).
            local_files_only: never use the network, only the cache.
            revision: Hub branch, tag or commit (or `@revision` in the name, not both).
            **kwargs: `device`, `batch_size`.

        Returns:
            The defended model (the class its config names; it must be a `cls`), in eval mode.
        """
        from ..hub import load

        return load(
            pretrained_model_name_or_path,
            revision=revision,
            cache_dir=cache_dir,
            force_download=force_download,
            local_files_only=local_files_only,
            token=token,
            expect=cls,
            **kwargs,
        )

    @classmethod
    def _from_pretrained(cls, *, model_id: str, revision, cache_dir, force_download, local_files_only, token, **kwargs):
        for injected in ("num_classes", "config"):  # what the mixin copies from config.json's top level
            kwargs.pop(injected, None)
        return cls.from_pretrained(
            model_id, revision=revision, cache_dir=cache_dir, force_download=force_download, local_files_only=local_files_only, token=token, **kwargs
        )

    def save_pretrained(self, save_directory: str | Path, *, config: Any = None, repo_id: str | None = None, push_to_hub: bool = False, model_card_kwargs: dict[str, Any] | None = None, **push_to_hub_kwargs: Any) -> str | None:
        """Write `config.json` (timm's layout plus `settings()`), `model.safetensors` and a model card.

        `config=` raises (the config is `settings()`; free-form information goes into
        `pretrained_info`); a model that loading could not rebuild is refused before anything is
        written. See `robustwrap.hub.save_pretrained`.
        """
        from ..hub import save_pretrained

        return save_pretrained(self, save_directory, config=config, repo_id=repo_id, push_to_hub=push_to_hub, model_card_kwargs=model_card_kwargs, **push_to_hub_kwargs)

    def _save_pretrained(self, save_directory) -> None:
        from ..hub import save_folder

        save_folder(self, save_directory)

    def push_to_hub(self, repo_id: str, **kwargs: Any) -> str:
        """Upload the model's files to a Hub repo in one commit; the card names the real repo id (`robustwrap.hub.push_to_hub`)."""
        from ..hub import push_to_hub

        return push_to_hub(self, repo_id, **kwargs)

    def generate_model_card(self, *args: Any, **kwargs: Any) -> Any:
        """The model card: defense, threat model and the measured accuracies of `pretrained_info` (`robustwrap.hub.model_card`)."""
        from ..hub import model_card

        return model_card(self, **kwargs)

    # ------------------------------------------------------------------------------- inputs
    def _prepare(self, x: torch.Tensor) -> torch.Tensor:
        """`x` on the base model's device and in its dtype."""
        device, dtype = model_device_dtype(self._inner_model)
        return x.to(device=device, dtype=dtype)

    def _check_images(self, x) -> torch.Tensor:
        """`x` checked (type, shape, size, channels, finite) and moved to the model's device and dtype.

        Raises:
            TypeError, ValueError: naming what was expected and what came, before any forward pass.

        Warns:
            UserWarning: for values far outside what normalised images can hold (e.g. 0-255
                pixels), which would otherwise be certified silently at about 0%.
        """
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"images must be a torch.Tensor of shape (B, C, H, W), got {type(x).__name__}")
        if x.ndim != 4:
            raise ValueError(f"images must have shape (B, C, H, W), got shape {tuple(x.shape)}")
        if x.shape[0] == 0:
            raise ValueError("images is an empty batch (B = 0)")
        if not x.is_floating_point():
            raise TypeError(f"images must be a floating tensor, normalised as the model expects; got dtype {x.dtype}")
        h, w = self.input_size
        if tuple(x.shape[2:]) != (h, w):
            raise ValueError(f"images must be {h}x{w} for this {self._geometry_name}, got {x.shape[2]}x{x.shape[3]} (shape {tuple(x.shape)})")
        if self.in_chans is not None and x.shape[1] != self.in_chans:
            raise ValueError(f"images must have {self.in_chans} channels for this model, got {x.shape[1]} (shape {tuple(x.shape)})")
        if not torch.isfinite(x).all():
            raise ValueError("images contain NaN or Inf values")
        self._warn_if_unnormalised(x)
        return self._prepare(x)

    def _warn_if_unnormalised(self, x: torch.Tensor) -> None:
        # Normalised pixels of a [0, 1] image lie between -mean / std and (1 - mean) / std. Be
        # conservative (random test inputs and strong patches exceed that range): flag only values
        # 4x beyond it and above 20 with a known mean/std, above 50 without one; 0-255 pixels are.
        stats = timm_mean_std(self._inner_model)
        if stats is not None:
            mean, std = stats
            normal = max(max(abs(-m / s), abs((1 - m) / s)) for m, s in zip(mean, std))
            limit, source = max(4 * normal, 20.0), f"its mean {mean} and std {std} (|x| <= {normal:.3g})"
        else:
            limit, source = 50.0, "any usual mean and std"
        peak = float(x.detach().abs().max())
        if peak > limit:
            warnings.warn(
                f"images reach |x| = {peak:.4g}, far outside the range of images normalised with {source}; are they 0-255 pixels? Normalise them as the model expects "
                "(e.g. timm.data.create_transform(**timm.data.resolve_model_data_config(model))) or every certificate is about the wrong input",
                UserWarning,
                stacklevel=3,
            )

    def _check_labels(self, y, batch: int) -> torch.Tensor:
        """`y` as `(batch,)` long class ids in `[0, num_classes)`, or a TypeError/ValueError."""
        y = as_labels(y, batch)
        check_label_range(y, self.num_classes)
        return y

    # ----------------------------------------------------------------------------- inference
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Robust logits `(B, num_classes)` in eval mode; the base model's forward in train mode.

        In eval mode `forward(x).argmax(1) == predict(x)`, and the logits are an ordinary
        float32 (or wider) tensor. In train mode the base model runs in `precision`; doing that
        with gradients disabled warns once, since it is an undefended prediction.
        """
        if self.training:
            if not torch.is_grad_enabled() and not self._warned_train_mode:
                self._warned_train_mode = True
                warnings.warn(
                    f"{type(self).__name__} is in train mode, so forward() returns the undefended base model's logits; "
                    "call .eval() for robust predictions (train mode trains like the base model)",
                    UserWarning,
                    stacklevel=2,
                )
            with self.autocast():
                return self._train_forward(self.resize_input(x))
        return self._robust_forward(x)

    def _train_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The train-mode forward: the base model's (a defense that certifies another function of it, a ViT split, overrides it)."""
        return self.model(x)

    def _training_recipe(self, strategy: str, fill: float | tuple[float, ...], batch_size: int) -> TrainingRecipe:
        """How `fit_masking` trains the base model with `strategy`, one of `training_strategies`.

        Args:
            strategy: the strategy's name.
            fill: the value of masked pixels to train with (`fit_masking`'s `fill`, default this model's).
            batch_size: views per forward pass of a strategy that searches.
        """
        return TrainingRecipe()

    def _training_geometry(self) -> dict[str, Any]:
        """What decides the training views, JSON-ready: a checkpoint records it and refuses to resume with another."""
        return {"defense": self.defense}

    def _robust_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The defense's robust logits for `x` (eval mode)."""
        raise NotImplementedError

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Robust labels `(B,)` (in either mode; the base model runs in eval mode)."""
        raise NotImplementedError

    def certify(self, x: torch.Tensor, y: torch.Tensor, early_exit: bool = True, k: int = 1) -> CertifyResult:
        """Certify a batch against every patch of the threat model: a `CertifyResult` (or a subclass).

        `k > 1` certifies that `y` stays among the `k` best classes, where the defense has a top-k
        certificate (`_check_top_k` refuses it elsewhere, saying why).
        """
        raise NotImplementedError

    def predict_vanilla(self, x: torch.Tensor) -> torch.Tensor:
        """The undefended base model's labels `(B,)` for `x`, with the same checks, device and precision.

        Raises:
            TypeError, ValueError: for images the defended model cannot take.
        """
        x = self._check_images(x)
        with eval_mode(self._inner_model), torch.no_grad(), self.autocast():
            return call_model(self._inference_model(x), x).argmax(1)


    # ------------------------------------------------------------------------------ detection
    # Why a defense has no certified detection rule or no top-k certificate (None: it has one).
    # A defense with detection implements `_detection_logits`; one with top-k handles `k` in `certify`.
    _no_detection: ClassVar[str | None] = "it has no certified detection rule"
    _no_top_k: ClassVar[str | None] = "its certificate gives no bound on the other classes' ranks, so it has no top-k certificate"

    @property
    def tau(self) -> float:
        """Confidence threshold of certified detection, in `[0, 1)`: a view alerts when its softmax confidence is `> tau`.

        A setting of the defended model (in `settings()`, the Hub config and results
        fingerprints), for the defenses with a detection rule (docs/concepts.md#certified-detection).
        """
        from .detection import DEFAULT_TAU

        return self.__dict__.get("_tau", DEFAULT_TAU)

    @tau.setter
    def tau(self, value: float) -> None:
        from .detection import as_tau

        if self._no_detection is not None:
            raise AttributeError(f"tau is the detection threshold, and {type(self).__name__} has no detection: {self._no_detection}")
        self.__dict__["_tau"] = as_tau(value)

    def _detection_logits(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`(logits (B, C), views (B, K, C), num_views (B,))` for prepared images: the unmasked
        logits and those of the one-mask views of a set covering every patch (eval mode, no gradient)."""
        raise NotImplementedError(f"{type(self).__name__} cannot detect: {self._no_detection}")

    def _check_top_k(self, k: int) -> int:
        """`k` checked for `certify`: an int in `[1, num_classes]`, and `1` where the defense has no top-k certificate."""
        from .detection import as_top_k

        plain_int = isinstance(k, int) and not isinstance(k, bool)
        if plain_int and k == 1:
            return 1  # today's certificate, without asking the model its class count
        if self._no_top_k is not None and plain_int and k > 1:
            raise ValueError(f"k={k}: {type(self).__name__} can only certify k=1, since {self._no_top_k}")
        return as_top_k(k, self.num_classes)

    def detect(self, x: torch.Tensor) -> DetectResult:
        """Certified detection's output for `x`: a `DetectResult` (`prediction`, `alert` per image).

        The prediction is the base model's on the unmasked image; `alert` is raised when a one-mask
        view's label differs from it with softmax confidence `> tau`
        (docs/concepts.md#certified-detection). Deploy it as "the label, unless alert".

        Raises:
            TypeError, ValueError: for images the defended model cannot take.
            NotImplementedError: the defense has no detection rule (the message says why).
        """
        from .detection import detect_views

        if self._no_detection is not None:
            raise NotImplementedError(f"{type(self).__name__} cannot detect: {self._no_detection}")
        x = self._check_images(x)
        logits, views, _ = self._detection_logits(x)
        return detect_views(logits, views, self.tau)

    def certify_detection(self, x: torch.Tensor, y: torch.Tensor) -> DetectionCertificate:
        """Certify detection: under any patch of the threat model the output is `y` or an alert.

        Certified iff the unmasked label is `y` and every one-mask view's label is `y` with
        softmax confidence `> tau` (the alert's comparison), each by more than `margin`
        (docs/concepts.md#certified-detection). All views run: the alert needs each of them.

        Args:
            x: `(B, C, H, W)` images, floating, as the model expects them.
            y: `(B,)` integer labels in `[0, num_classes)`.

        Returns:
            A `DetectionCertificate` (`prediction`, `alert`, `certified`, `num_views`).

        Raises:
            TypeError, ValueError: for bad images or labels, before any forward pass.
            NotImplementedError: the defense has no detection rule (the message says why).
        """
        from .detection import DetectionCertificate, certify_detection_views, detect_views

        if self._no_detection is not None:
            raise NotImplementedError(f"{type(self).__name__} cannot certify detection: {self._no_detection}")
        x = self._check_images(x)
        y = self._check_labels(y, x.shape[0]).to(x.device)
        logits, views, num_views = self._detection_logits(x)
        found = detect_views(logits, views, self.tau)
        certified = certify_detection_views(logits, views, y, self.tau, self.margin)
        return DetectionCertificate(prediction=found.prediction, certified=certified, num_views=num_views, alert=found.alert)
