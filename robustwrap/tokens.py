"""Token dropping: a timm vision transformer run on the patch tokens an ablated view keeps.

(De)Randomized Smoothing on a ViT (Salman et al., CVPR 2022, "Smoothed ViT") runs each view on
the tokens that meet its retained band or block only, plus the prefix tokens (class,
distillation, registers), each with its own position embedding. A token is dropped only when
every one of its pixels is ablated. This changes the model's function (a dropped token is
absent, not filled), so it is a setting of the defended model (`DerandomizedSmoothing`'s
`drop_tokens`), used alike by prediction, certification, training and the attack
(docs/concepts.md#token-dropping).

The forward pass is written with timm's public `VisionTransformer` attributes only:
`patch_embed`, `_pos_embed` (position embeddings and prefix tokens), `patch_drop`, `norm_pre`,
`blocks`, `norm` and `forward_head`; the token grid is read from `patch_embed` at every call.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from timm.layers import PatchEmbed
from timm.models import VisionTransformer
from torch import nn

__all__ = ["SUPPORTED", "TokenGrid", "axis_token_keep", "forward_kept", "merge_distilled", "supports_token_dropping", "token_grid", "views_per_pass"]

SUPPORTED = "timm's VisionTransformer family with a plain patch embedding (ViT, DeiT, DeiT distilled, ViT with registers, any img_size)"
"""The models whose token grid `token_grid` can read, as error messages name them."""


@dataclass(frozen=True)
class TokenGrid:
    """Where a ViT's patch tokens lie on its input.

    Attributes:
        patch_size: `(ph, pw)`: pixels of one token.
        grid: `(gh, gw)`: tokens per column and per row of the image.
        num_prefix_tokens: class, distillation and register tokens before the patch tokens.
    """

    patch_size: tuple[int, int]
    grid: tuple[int, int]
    num_prefix_tokens: int

    @property
    def num_tokens(self) -> int:
        """Tokens of an image with nothing dropped (prefix tokens included)."""
        return self.num_prefix_tokens + self.grid[0] * self.grid[1]


def merge_distilled(output: torch.Tensor | tuple[torch.Tensor, ...]) -> torch.Tensor:
    """The logits of a model's output: for a timm distilled ViT in distilled-training mode, whose
    train-mode forward returns `(class head, distillation head)`, their mean, which is what it
    returns in eval mode (training fits the function that is certified); else `output` unchanged."""
    if isinstance(output, tuple) and len(output) == 2 and all(isinstance(o, torch.Tensor) for o in output):
        return (output[0] + output[1]) / 2
    return output


def _pair(value) -> tuple[int, int] | None:
    if isinstance(value, int) and not isinstance(value, bool):
        return value, value
    if isinstance(value, (tuple, list)) and len(value) == 2 and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        return int(value[0]), int(value[1])
    return None


def token_grid(model: nn.Module, image_size: tuple[int, int]) -> TokenGrid | None:
    """The token grid of `model` on `image_size` inputs, or `None` when it cannot be read.

    Readable for a timm `VisionTransformer` (and the models built on it) whose `patch_embed` is
    timm's `PatchEmbed` with a convolution whose kernel and stride are the patch size and no
    padding: then each token sees exactly its own `ph x pw` pixels, so "a token meets the
    retained region" is a statement about pixels. A hybrid (CNN-stem) embedding is not.

    Raises:
        ValueError: `image_size` is not a multiple of the token size, or differs from the
            size the model was built for (without `dynamic_img_size`): the model could not
            take these images whole, so no token can be dropped from them exactly.
    """
    if not isinstance(model, VisionTransformer) or not isinstance(getattr(model, "patch_embed", None), PatchEmbed):
        return None
    embed = model.patch_embed
    proj, patch = getattr(embed, "proj", None), _pair(getattr(embed, "patch_size", None))
    prefix = getattr(model, "num_prefix_tokens", None)
    if patch is None or not isinstance(proj, nn.Conv2d) or not isinstance(prefix, int) or getattr(embed, "dynamic_img_pad", False):
        return None
    if tuple(proj.kernel_size) != patch or tuple(proj.stride) != patch or tuple(proj.padding) != (0, 0) or tuple(proj.dilation) != (1, 1):
        return None
    (h, w), (ph, pw) = image_size, patch
    if h % ph or w % pw:
        raise ValueError(
            f"drop_tokens needs an image size that is a multiple of the model's {ph}x{pw} tokens; got {h}x{w} "
            f"(use drop_tokens=False, or images of {h // ph * ph or ph}x{w // pw * pw or pw})"
        )
    grid = (h // ph, w // pw)
    built = _pair(getattr(embed, "grid_size", None))
    if not getattr(model, "dynamic_img_size", False) and built is not None and built != grid:
        raise ValueError(
            f"the model takes {built[0] * ph}x{built[1] * pw} images ({built[0]}x{built[1]} tokens of {ph}x{pw}), "
            f"the defense certifies {h}x{w}; build the model with img_size={h if h == w else (h, w)}"
        )
    return TokenGrid(patch, grid, int(prefix))


def supports_token_dropping(model: nn.Module, image_size: tuple[int, int]) -> bool:
    """Whether `token_grid` can read `model`'s grid on `image_size` inputs (never raises)."""
    try:
        return token_grid(model, image_size) is not None
    except ValueError:
        return False


def axis_token_keep(axis_keep: tuple[torch.Tensor, torch.Tensor], grid: TokenGrid) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-axis keep masks of tokens from those of pixels (`AblationSet.axis_keep`).

    A view's pixels are kept on `rows[r] x cols[c]`, so a token meets the kept region iff one of
    its pixel rows and one of its pixel columns are kept: the token masks are separable too.

    Returns:
        `(rows (R, gh), cols (Q, gw))` bool: a token row (column) is kept when any of its pixel
        rows (columns) is.
    """
    rows, cols = axis_keep
    (ph, pw), (gh, gw) = grid.patch_size, grid.grid
    return rows.reshape(rows.shape[0], gh, ph).any(2), cols.reshape(cols.shape[0], gw, pw).any(2)


def views_per_pass(batch_size: int, grid: TokenGrid, most_kept: int) -> int:
    """Views per forward pass when no view keeps more than `most_kept` patch tokens.

    `batch_size` counts full images; a pass of views that keep fewer tokens costs less (and
    takes less memory), so as many views run as hold about the tokens of `batch_size` images.
    """
    kept = grid.num_prefix_tokens + max(1, most_kept)
    return max(1, batch_size * grid.num_tokens // kept)


def forward_kept(model: nn.Module, x: torch.Tensor, keep: torch.Tensor, grid: TokenGrid) -> torch.Tensor:
    """The ViT's logits on views `x`, each run on its prefix tokens and the patch tokens `keep` marks.

    Views that keep the same number of tokens share one forward pass (attention needs one
    length per batch); the logits come back in the order of `x`. Every kept token carries its
    own position embedding (`_pos_embed` of the whole grid, then the selection), and the blocks,
    final norm and head run on the kept tokens alone. In train mode the model's own
    `patch_drop` (if any) still applies, as in its ordinary forward.

    Args:
        model: a timm `VisionTransformer` (`token_grid(model, ...)` is not `None`).
        x: `(N, C, H, W)` views, already ablated (or encoded) as the model takes them.
        keep: `(N, gh, gw)` bool: the patch tokens each view keeps.
        grid: `token_grid(model, (H, W))`.

    Returns:
        `(N, num_classes)` logits.
    """
    n = x.shape[0]
    keep = keep.reshape(n, -1)
    counts = keep.sum(1)
    prefix = grid.num_prefix_tokens
    out: torch.Tensor | None = None
    for count in counts.unique().tolist():
        members = (counts == count).nonzero()[:, 0]
        # nonzero() is row-major: each view's kept token ids, in grid order, `count` per view
        ids = keep[members].nonzero()[:, 1].reshape(members.numel(), count)
        index = torch.cat([torch.arange(prefix, device=x.device).expand(members.numel(), -1), ids + prefix], 1)
        tokens = model._pos_embed(model.patch_embed(x[members]))
        tokens = tokens.gather(1, index[:, :, None].expand(-1, -1, tokens.shape[-1]))
        tokens = model.norm(model.blocks(model.norm_pre(model.patch_drop(tokens))))
        logits = merge_distilled(model.forward_head(tokens))
        if out is None:
            out = logits.new_empty((n, *logits.shape[1:]))
        out[members] = logits
    if out is None:
        raise ValueError("forward_kept needs at least one view, got none")
    return out
