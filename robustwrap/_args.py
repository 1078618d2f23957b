"""Argument checks shared by the public constructors: each raises an error naming the argument.

torch is imported by the checks that build tensors, not with the module: the `robustwrap` command
reads its `--patch` spellings here before it imports torch.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

__all__ = [
    "as_pair",
    "as_image_size",
    "positive_int",
    "as_fill",
    "as_labels",
    "check_label_range",
    "as_precision",
    "as_margin",
    "PRECISIONS",
    "refuses_amp",
    "read_patch",
    "PATCH_SPELLINGS",
]

# The ways to write one patch as text, in `wrap(patch=...)` and on the command line alike.
PATCH_SPELLINGS = "pixels ('32' or '32px'), a percentage of the image area ('2%') or a fraction of it ('0.02')"


def read_patch(patch):
    """A patch written as text (`"32"`, `"32px"`, `"2%"`, `"0.02"`) as the number it means; anything else as it is.

    A bare number is pixels, as `patch=32` is; a percentage becomes an area fraction (`"2%"` ->
    `0.02`). The `robustwrap` command reads each `--patch` item with this function, so both
    accept the same spellings.

    Args:
        patch: the `patch` argument.

    Returns:
        An int (pixels) or a float in (0, 1) (area fraction) for a string; `patch` itself otherwise.

    Raises:
        ValueError: for a string that is none of the spellings, or zero, a percentage of 100 or
            more, a fraction of 1 or more (not a patch inside the image).
    """
    if not isinstance(patch, str):
        return patch
    text = patch.strip().lower()
    value: int | float | None = None
    if re.fullmatch(r"\d+(px)?", text):
        value = int(text.removesuffix("px")) or None
    elif re.fullmatch(r"\d*\.?\d+%", text):
        percent = float(text[:-1])
        value = percent / 100 if 0 < percent < 100 else None
    elif re.fullmatch(r"\d*\.\d+", text):
        fraction = float(text)
        value = fraction if 0 < fraction < 1 else None
    if value is None:
        raise ValueError(f"patch must be {PATCH_SPELLINGS}, or a number or (ph, pw) pair; got {patch!r}")
    return value


def as_pair(value, name: str) -> tuple:
    """`v -> (v, v)`; a list or tuple must have exactly two items."""
    if isinstance(value, (list, tuple)):
        if len(value) != 2:
            raise ValueError(f"{name} must be one value or a pair (height, width), got {value!r}")
        return tuple(value)
    return (value, value)


def positive_int(value, name: str) -> int:
    """`value` as an int, or a ValueError naming `name` if it is not a positive integer."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


def as_image_size(image_size) -> tuple[int, int]:
    """`H` or `(H, W)` as `(H, W)`, or a ValueError naming `image_size`."""
    size = as_pair(image_size, "image_size")
    if not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v > 0 for v in size):
        raise ValueError(f"image_size must be a positive int or a pair (H, W) of positive ints, got {image_size!r}")
    return int(size[0]), int(size[1])


def as_fill(fill) -> float | tuple[float, ...]:
    """A masked-pixel value: one float, or a tuple of one float per channel; finite."""
    import torch

    if isinstance(fill, torch.Tensor):
        fill = fill.tolist()
    if isinstance(fill, (int, float)) and not isinstance(fill, bool):
        value = float(fill)
        if not math.isfinite(value):
            raise ValueError(f"fill must be finite, got {fill!r}")
        return value
    if isinstance(fill, Sequence) and len(fill) > 0 and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in fill):
        if not all(math.isfinite(v) for v in fill):
            raise ValueError(f"fill must be finite, got {fill!r}")
        return tuple(float(v) for v in fill)
    raise TypeError(f"fill must be a number or a sequence of one number per channel, got {fill!r}")


def as_labels(y, batch: int, name: str = "labels") -> torch.Tensor:
    """`y` as a `(batch,)` long tensor of class ids, or a TypeError/ValueError naming `name`.

    Labels are what torch takes as class targets: a tensor, a numpy array or a list of ints, and
    for one image also a single int (or a 0-d tensor or array).

    Args:
        y: the labels.
        batch: the number of images they label.
        name: the argument's name in errors.

    Returns:
        The labels as a long tensor of shape `(batch,)`, on `y`'s device when `y` is a tensor.

    Raises:
        TypeError: for labels that are not integers (floats, booleans, strings, None), since a
            float label is usually a probability or a score passed by mistake.
        ValueError: for a number of labels other than `batch`.
    """
    import torch

    expected = f"a ({batch},) tensor, numpy array or list of int class ids" + (", or one int" if batch == 1 else "")
    if not isinstance(y, torch.Tensor):
        if isinstance(y, (bool, np.bool_, str, bytes)) or y is None:
            raise TypeError(f"{name} must be {expected}, got {y!r}")
        try:
            y = torch.as_tensor(np.asarray(y) if isinstance(y, (list, tuple)) else y)
        except (TypeError, ValueError, RuntimeError):
            raise TypeError(f"{name} must be {expected}, got {type(y).__name__} {y!r}") from None
    if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise TypeError(f"{name} must be integer class ids ({expected}), got dtype {y.dtype}")
    if y.ndim == 0:
        if batch != 1:
            raise ValueError(f"{name}: one label ({y.item()}) for {batch} images; pass {batch} labels")
        y = y.reshape(1)
    if tuple(y.shape) != (batch,):
        raise ValueError(f"{name} must have shape ({batch},) to match the images, got {tuple(y.shape)}")
    return y.long()


def check_label_range(y: torch.Tensor, num_classes: int, name: str = "labels") -> None:
    """A ValueError naming `name` unless every label is a class id in `[0, num_classes)`."""
    if bool(((y < 0) | (y >= num_classes)).any()):
        raise ValueError(f"{name} must be in [0, {num_classes}), got values from {int(y.min())} to {int(y.max())}")


PRECISIONS = ("float32", "bfloat16", "float16")


def as_precision(precision) -> str:
    """One of `PRECISIONS`, or a ValueError naming `precision`."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(repr(p) for p in PRECISIONS)}, got {precision!r}")
    return str(precision)


def as_margin(margin) -> float:
    """A finite float >= 0, or a TypeError/ValueError naming `margin`."""
    if isinstance(margin, bool) or not isinstance(margin, (int, float, np.integer, np.floating)):
        raise TypeError(f"margin must be a float >= 0, got {margin!r}")
    value = float(margin)
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"margin must be a finite float >= 0, got {margin!r}")
    return value


def refuses_amp(explanation: str) -> Callable[[Callable], Callable]:
    """Decorator: a stale `amp=` keyword raises a TypeError saying where precision lives now
    (`"<name>() no longer takes amp=<value>: <explanation>"`), instead of Python's bare
    "unexpected keyword"."""

    def decorate(function: Callable) -> Callable:
        @functools.wraps(function)
        def call(*args, **kwargs):
            if "amp" in kwargs:
                raise TypeError(f"{function.__name__}() no longer takes amp={kwargs['amp']!r}: {explanation}")
            return function(*args, **kwargs)

        return call

    return decorate
