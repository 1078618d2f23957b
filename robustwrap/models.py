"""Small-receptive-field classifiers for PatchGuard: BagNet and a check of the declared geometry.

A BagNet (Brendel & Bethge, ICLR 2019) is the ResNet-50 bottleneck layout with most 3x3
convolutions replaced by 1x1 and no padding, so that every output feature sees only an
`r x r` window of pixels. Its head is a 1x1 convolution, so the model returns **local logits**
`(B, num_classes, h, w)`: one class-evidence vector per window, which PatchGuard's robust
masking aggregates (see the Concepts page, `docs/concepts.md`).

Every model here carries the geometry PatchGuard reads: `receptive_field` `r`, `feature_stride`
`s` and `feature_offset` `o`, meaning feature `(a, b)` sees input rows `[s*a - o, s*a - o + r)`
and columns likewise. `check_receptive_field` verifies such a declaration on any model.

The builders are registered with timm when this module is imported (`import robustwrap.models`;
the PatchGuard defense, `robustwrap.wrap`, the Hub loaders and the zoo import it), so that `timm.create_model("bagnet17", num_classes=10)`
works and the Hub format can rebuild them:

| name | receptive field | stride | meant for |
| --- | --- | --- | --- |
| `bagnet9`, `bagnet17`, `bagnet33` | 9, 17, 33 | 8 | 224 px (ImageNet layout, ResNet-50 width) |
| `bagnet9_small` | 9 | 2 | 32-64 px, few channels |
| `bagnet_tiny` | 5 | 2 | 28-32 px (MNIST-sized), very few channels |
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from torch import nn

from ._args import as_image_size, as_pair, positive_int

__all__ = ["BagNet", "ReceptiveFieldReport", "check_receptive_field", "checkpoint_filter_fn"]


class _Bottleneck(nn.Module):
    """The ResNet bottleneck of BagNet: 1x1, `k x k` (stride, no padding), 1x1, plus the shortcut.

    The unpadded `k x k` conv shrinks the map, so the shortcut is cropped at the bottom and right:
    output position `i` of the conv path sees rows `[s*i, s*i + k)` of the block's input and the
    shortcut sees row `s*i`, inside that window. Module names match the original BagNet so that
    its checkpoints load.
    """

    def __init__(self, in_chans: int, width: int, out_chans: int, kernel_size: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_chans, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, kernel_size, stride=stride, padding=0, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out_chans, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_chans)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or in_chans != out_chans:
            self.downsample = nn.Sequential(nn.Conv2d(in_chans, out_chans, 1, stride=stride, bias=False), nn.BatchNorm2d(out_chans))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        out = out + shortcut[:, :, : out.shape[2], : out.shape[3]]
        return self.relu(out)


class BagNet(nn.Module):
    """A bag-of-local-features network: ResNet bottlenecks, mostly 1x1, no padding, 1x1 head.

    Stage `i` has `layers[i]` bottlenecks of width `widths[i]` (output `widths[i] * expansion`
    channels); its first `kernel3[i]` blocks use a 3x3 conv, the others 1x1, and its first block
    has stride `strides[i]`. The stem is a 1x1 then an unpadded 3x3 conv. The receptive field
    follows from the layout: `r = 3 + sum of 2 * (stride so far)` over the 3x3 convs, and the
    feature stride is the product of the strides (BagNet-17: r = 17, s = 8).

    Args:
        layers: bottlenecks per stage (ResNet-50: `(3, 4, 6, 3)`).
        kernel3: per stage, how many of its first blocks use a 3x3 conv.
        strides: per stage, the stride of its first block.
        widths: per stage, the bottleneck width.
        expansion: output channels of a block = width * expansion (ResNet-50: 4).
        stem_width: channels of the stem convs.
        num_classes: classes of the local logits; 0 makes `forward` return the features.
        in_chans: input channels.
        drop_rate: dropout on the features before the head (elementwise, so local).

    Attributes:
        receptive_field: `r`, the side of the pixel window each feature sees.
        feature_stride: `s`, pixels between neighbouring features.
        feature_offset: `o` (0: feature `(a, b)` sees rows `[s*a, s*a + r)`, no padding).
    """

    def __init__(
        self,
        layers: Sequence[int] = (3, 4, 6, 3),
        kernel3: Sequence[int] = (1, 1, 1, 0),
        strides: Sequence[int] = (2, 2, 2, 1),
        widths: Sequence[int] = (64, 128, 256, 512),
        expansion: int = 4,
        stem_width: int = 64,
        num_classes: int = 1000,
        in_chans: int = 3,
        drop_rate: float = 0.0,
    ):
        super().__init__()
        if not len(layers) == len(kernel3) == len(strides) == len(widths) or not layers:
            raise ValueError(
                f"layers, kernel3, strides and widths need one entry per stage, got {len(layers)}, {len(kernel3)}, "
                f"{len(strides)}, {len(widths)}"
            )
        self.num_classes = int(num_classes)
        self.in_chans = positive_int(in_chans, "in_chans")
        self.drop_rate = float(drop_rate)
        self.conv1 = nn.Conv2d(in_chans, stem_width, 1, bias=False)
        self.conv2 = nn.Conv2d(stem_width, stem_width, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(stem_width)
        self.relu = nn.ReLU(inplace=True)
        receptive_field, jump, chans = 3, 1, stem_width
        for i, (blocks, k3, stride, width) in enumerate(zip(layers, kernel3, strides, widths), start=1):
            stage = []
            for j in range(positive_int(blocks, "layers")):
                kernel = 3 if j < k3 else 1
                block_stride = positive_int(stride, "strides") if j == 0 else 1
                stage.append(_Bottleneck(chans, width, width * expansion, kernel, block_stride))
                receptive_field += (kernel - 1) * jump
                jump *= block_stride
                chans = width * expansion
            self.add_module(f"layer{i}", nn.Sequential(*stage))
        self.num_stages = len(layers)
        self.num_features = chans
        self.receptive_field = receptive_field
        self.feature_stride = jump
        self.feature_offset = 0
        self.drop = nn.Dropout(self.drop_rate)
        self.fc = nn.Conv2d(chans, self.num_classes, 1) if self.num_classes > 0 else nn.Identity()
        for module in self.modules():
            if isinstance(module, nn.Conv2d) and module is not self.fc:
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    # timm's model interface, so that timm's loaders, `reset_classifier` and `features` work.
    def get_classifier(self) -> nn.Module:
        """The 1x1 conv head."""
        return self.fc

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """A new 1x1 conv head for `num_classes` (0: no head). `global_pool` must stay None: the
        local logits are the point of a BagNet, PatchGuard aggregates them."""
        if global_pool is not None:
            raise ValueError(f"a BagNet returns local logits and has no global pool; got global_pool={global_pool!r}")
        self.num_classes = int(num_classes)
        self.fc = nn.Conv2d(self.num_features, num_classes, 1) if num_classes > 0 else nn.Identity()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The local feature map `(B, num_features, h, w)`."""
        x = self.relu(self.bn1(self.conv2(self.conv1(x))))
        for i in range(1, self.num_stages + 1):
            x = getattr(self, f"layer{i}")(x)
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Local logits `(B, num_classes, h, w)` from the features (or the features, `pre_logits`)."""
        x = self.drop(x)
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Local logits `(B, num_classes, h, w)`, with `h = (H - r) // s + 1` for the standard layouts."""
        return self.forward_head(self.forward_features(x))


def checkpoint_filter_fn(state_dict: dict, model: BagNet) -> dict:
    """Adapt an original BagNet checkpoint (Brendel & Bethge's `pytorchnet`) to `BagNet`.

    Those checkpoints nest the weights under `"state_dict"`, prefix keys with `module.` and
    store the head as a linear layer `(num_classes, C)`; here the head is the equivalent 1x1 conv.
    timm calls this when loading pretrained weights; call it yourself before `load_state_dict`.
    """
    state_dict = state_dict.get("state_dict", state_dict)
    out = {}
    for key, value in state_dict.items():
        key = key.removeprefix("module.")
        if key == "fc.weight" and value.ndim == 2:
            value = value[:, :, None, None]
        out[key] = value
    return out


def _cfg(**kwargs) -> dict:
    # No weights are shipped: `url` stays empty, so `pretrained=True` is refused by timm rather
    # than silently giving random weights. Users load their own with `pretrained_cfg_overlay`.
    return {
        "url": "",
        "num_classes": 1000,
        "input_size": (3, 224, 224),
        "pool_size": None,
        "crop_pct": 0.875,
        "interpolation": "bilinear",
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
        "first_conv": "conv1",
        "classifier": "fc",
        "license": "apache-2.0",
        **kwargs,
    }


default_cfgs = generate_default_cfgs(
    {
        "bagnet9": _cfg(),
        "bagnet17": _cfg(),
        "bagnet33": _cfg(),
        "bagnet9_small": _cfg(input_size=(3, 32, 32), mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), crop_pct=1.0),
        "bagnet_tiny": _cfg(input_size=(1, 32, 32), mean=(0.1307,), std=(0.3081,), crop_pct=1.0, num_classes=10),
    }
)


def _create(variant: str, pretrained: bool, model_args: dict, kwargs: dict) -> BagNet:
    return build_model_with_cfg(BagNet, variant, pretrained, pretrained_filter_fn=checkpoint_filter_fn, **{**model_args, **kwargs})


_IMAGENET_LAYOUT = {"layers": (3, 4, 6, 3), "strides": (2, 2, 2, 1), "widths": (64, 128, 256, 512), "expansion": 4, "stem_width": 64}


@register_model
def bagnet9(pretrained: bool = False, **kwargs) -> BagNet:
    """BagNet-9: receptive field 9 px, stride 8 (3x3 convs in stages 1-2). 27x27 local logits at 224."""
    return _create("bagnet9", pretrained, {**_IMAGENET_LAYOUT, "kernel3": (1, 1, 0, 0)}, kwargs)


@register_model
def bagnet17(pretrained: bool = False, **kwargs) -> BagNet:
    """BagNet-17: receptive field 17 px, stride 8 (3x3 convs in stages 1-3), PatchGuard's model.
    26x26 local logits at 224."""
    return _create("bagnet17", pretrained, {**_IMAGENET_LAYOUT, "kernel3": (1, 1, 1, 0)}, kwargs)


@register_model
def bagnet33(pretrained: bool = False, **kwargs) -> BagNet:
    """BagNet-33: receptive field 33 px, stride 8 (3x3 convs in all four stages). 24x24 local logits at 224."""
    return _create("bagnet33", pretrained, {**_IMAGENET_LAYOUT, "kernel3": (1, 1, 1, 1)}, kwargs)


@register_model
def bagnet9_small(pretrained: bool = False, **kwargs) -> BagNet:
    """A narrow BagNet for 32-64 px inputs: receptive field 9 px, stride 2 (12x12 local logits at 32)."""
    args = {"layers": (1, 2, 2), "kernel3": (1, 1, 0), "strides": (2, 1, 1), "widths": (32, 64, 128), "expansion": 2, "stem_width": 32}
    return _create("bagnet9_small", pretrained, args, kwargs)


@register_model
def bagnet_tiny(pretrained: bool = False, **kwargs) -> BagNet:
    """A very narrow BagNet for MNIST-sized inputs (28-32 px, 1 channel by default): receptive
    field 5 px, stride 2 (14x14 local logits at 32)."""
    args = {"layers": (2, 2), "kernel3": (1, 0), "strides": (2, 1), "widths": (16, 32), "expansion": 2, "stem_width": 16}
    return _create("bagnet_tiny", pretrained, args, kwargs)


# ------------------------------------------------------------------------- geometry check
@dataclass(frozen=True)
class ReceptiveFieldReport:
    """What `check_receptive_field` measured.

    Attributes:
        image_size: `(H, W)` of the probe images.
        feature_size: `(h, w)` of the local-logit map.
        receptive_field: the declared `r`, per axis.
        feature_stride: the declared `s`, per axis.
        feature_offset: the declared `o`, per axis.
        violations: number of (feature, pixel) pairs where a pixel *outside* the feature's declared
            window changed the feature (must be 0).
        examples: up to 10 violations as `((a, b), (row, col))`.
        observed_receptive_field: per axis, the largest extent of pixels seen to change one feature.
        tight: every feature was seen to depend on every pixel of its declared window (inside the
            image), so the declaration is not larger than needed.
    """

    image_size: tuple[int, int]
    feature_size: tuple[int, int]
    receptive_field: tuple[int, int]
    feature_stride: tuple[int, int]
    feature_offset: tuple[int, int]
    violations: int
    examples: tuple[tuple[tuple[int, int], tuple[int, int]], ...]
    observed_receptive_field: tuple[int, int]
    tight: bool

    @property
    def ok(self) -> bool:
        """No pixel outside a feature's declared window changed it."""
        return self.violations == 0


def _declared(model: nn.Module, name: str, value, minimum: int) -> tuple[int, int]:
    if value is None:
        value = getattr(model, name, None)
    if value is None:
        raise ValueError(f"{name} is not an attribute of {type(model).__name__}; pass {name}= (an int or a pair)")
    pair = as_pair(value, name)
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= minimum for v in pair):
        raise ValueError(f"{name} must be an int >= {minimum} or a pair of them, got {value!r}")
    return pair


def _declared_masks(n: int, m: int, r: int, s: int, o: int) -> torch.Tensor:
    """`(m, n)` bool: feature `a` is declared to see pixel `i` iff `s*a - o <= i < s*a - o + r`."""
    start = torch.arange(m)[:, None] * s - o
    i = torch.arange(n)[None, :]
    return (i >= start) & (i < start + r)


@torch.no_grad()
def check_receptive_field(
    model: nn.Module,
    image_size: int | Sequence[int],
    *,
    receptive_field: int | Sequence[int] | None = None,
    feature_stride: int | Sequence[int] | None = None,
    feature_offset: int | Sequence[int] | None = None,
    in_chans: int | None = None,
    trials: int = 2,
    seed: int = 0,
    batch_size: int = 256,
    strict: bool = True,
) -> ReceptiveFieldReport:
    """Verify exhaustively that each local logit depends only on its declared pixel window.

    For `trials` random images, every pixel in turn gets a large random change (all channels),
    and each feature of the output `(1, C, h, w)` is compared with the unchanged one. A pixel
    outside feature `(a, b)`'s declared window `[s*a - o, s*a - o + r)` (rows, and columns
    likewise) must never change it. A PatchGuard certificate built on a receptive field smaller
    than what the model really sees is unsound, so run this once for your own local-logit model.

    It runs a float64 copy of the model on the CPU in eval mode (BatchNorm uses its running
    statistics; no kernel mixes unrelated pixels there), `H * W` probes per trial: keep
    `image_size` small (a few features per axis are enough; the geometry of a convolutional
    model does not depend on the input size).

    Args:
        model: maps `(B, C, H, W)` to local logits `(B, num_classes, h, w)`.
        image_size: `H` or `(H, W)` of the probes.
        receptive_field: `r` to check (int or pair); default `model.receptive_field`.
        feature_stride: `s` to check; default `model.feature_stride`.
        feature_offset: `o` to check; default `model.feature_offset`.
        in_chans: input channels; default `model.in_chans`, else the first conv's.
        trials: random images probed (more trials make `tight` more reliable, never `ok`).
        seed: seed of the probes.
        batch_size: probe images per forward pass.
        strict: raise if the model sees outside the declared windows (default); else return the
            report with `ok == False`.

    Returns:
        A `ReceptiveFieldReport`.

    Raises:
        ValueError: if the geometry is missing or invalid, the output is not 4-D, or (with
            `strict`) a pixel outside a feature's declared window changed that feature.
    """
    h_img, w_img = as_image_size(image_size)
    r = _declared(model, "receptive_field", receptive_field, 1)
    s = _declared(model, "feature_stride", feature_stride, 1)
    o = _declared(model, "feature_offset", feature_offset, -(10**9))
    trials = positive_int(trials, "trials")
    batch_size = positive_int(batch_size, "batch_size")
    if in_chans is None:
        in_chans = getattr(model, "in_chans", None)
    if in_chans is None:
        in_chans = next((m.in_channels for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    if in_chans is None:
        raise ValueError("in_chans is needed: the model has no in_chans attribute and no Conv2d to read it from")
    probe = copy.deepcopy(model).to(device="cpu", dtype=torch.float64).eval()
    gen = torch.Generator().manual_seed(seed)
    seen = None
    for _ in range(trials):
        x = torch.randn(1, in_chans, h_img, w_img, generator=gen, dtype=torch.float64)
        base = probe(x)
        if base.ndim != 4:
            raise ValueError(f"the model must return local logits (B, num_classes, h, w), got shape {tuple(base.shape)}")
        scale = 1e-9 * (1.0 + float(base.abs().max()))
        if seen is None:
            seen = torch.zeros(base.shape[2], base.shape[3], h_img, w_img, dtype=torch.bool)
        pixels = torch.arange(h_img * w_img)
        for chunk in pixels.split(batch_size):
            xs = x.repeat(len(chunk), 1, 1, 1)
            delta = 3.0 + 3.0 * torch.rand(len(chunk), in_chans, generator=gen, dtype=torch.float64)
            sign = torch.where(torch.rand(len(chunk), in_chans, generator=gen) < 0.5, -1.0, 1.0).double()
            rows, cols = chunk // w_img, chunk % w_img
            xs[torch.arange(len(chunk)), :, rows, cols] += delta * sign
            changed = ((probe(xs) - base).abs() > scale).any(1)  # (n, h, w)
            seen[:, :, rows, cols] |= changed.permute(1, 2, 0)
    fh, fw = seen.shape[:2]
    rows_ok = _declared_masks(h_img, fh, r[0], s[0], o[0])  # (fh, H)
    cols_ok = _declared_masks(w_img, fw, r[1], s[1], o[1])  # (fw, W)
    allowed = rows_ok[:, None, :, None] & cols_ok[None, :, None, :]
    bad = (seen & ~allowed).nonzero().tolist()
    examples = tuple(((a, b), (i, j)) for a, b, i, j in bad[:10])
    seen_rows, seen_cols = seen.any(3), seen.any(2)  # (fh, fw, H), (fh, fw, W)

    def extent(mask: torch.Tensor) -> int:
        idx = torch.arange(mask.shape[-1])
        hi = torch.where(mask, idx, -1).amax(-1)
        lo = torch.where(mask, idx, mask.shape[-1]).amin(-1)
        return int((hi - lo + 1).clamp(min=0).max())

    report = ReceptiveFieldReport(
        image_size=(h_img, w_img),
        feature_size=(fh, fw),
        receptive_field=r,
        feature_stride=s,
        feature_offset=o,
        violations=len(bad),
        examples=examples,
        observed_receptive_field=(extent(seen_rows), extent(seen_cols)),
        tight=bool((seen == allowed).all()),
    )
    if strict and not report.ok:
        raise ValueError(
            f"the model sees pixels outside its declared receptive field (r={r}, stride={s}, offset={o}): "
            f"{report.violations} (feature, pixel) pairs on {h_img}x{w_img} inputs, e.g. feature (a, b), pixel "
            f"(row, col): {list(examples[:3])}; the observed extent is {report.observed_receptive_field}. "
            "A PatchGuard certificate with this geometry would be unsound: declare the true receptive field"
        )
    return report
