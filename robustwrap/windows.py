"""PatchCURE's split of a timm vision transformer: windowed first blocks, global last blocks.

PatchCURE (Xiang et al., USENIX Security 2024) runs the first `split` blocks of a ViT on windows
of `wh x ww` tokens, each window alone with its own copy of the prefix tokens (class,
distillation, registers): every cell of the resulting feature grid sees only its window's
pixels, so a patch can reach only the few cells it overlaps. The remaining blocks run once per
masked view on all tokens, with a single set of prefix tokens, as the model's own global blocks
(the Concepts page, docs/concepts.md).

`split_vit` builds both parts from timm's public `VisionTransformer` attributes (`patch_embed`,
`_pos_embed`, `norm_pre`, `blocks`, `norm`, `forward_head`, ...) around the model itself: no
copies and no new parameters, so any timm ViT state dict loads into the model as it is, and
training either part trains the model. The token grid is read from the input at every call.
Patch dropout (`patch_drop_rate`, a training-time removal of random tokens) is not applied:
a window needs all of its tokens.
"""

from __future__ import annotations

import torch
from timm.models import VisionTransformer, checkpoint_seq
from torch import nn

from ._args import as_pair, positive_int
from .tokens import SUPPORTED, TokenGrid, token_grid

__all__ = ["ViTLRF", "ViTSRF", "split_vit"]


def _blocks(vit: VisionTransformer, blocks: nn.Sequential, tokens: torch.Tensor) -> torch.Tensor:
    """`blocks` on `tokens`, with the model's gradient checkpointing when it is switched on."""
    if vit.grad_checkpointing and torch.is_grad_enabled() and not torch.jit.is_scripting():
        return checkpoint_seq(blocks, tokens)
    return blocks(tokens)


def _timm_layout(tokens: torch.Tensor, prefix: int) -> torch.Tensor:
    """`tokens` `(B, N, D)` laid out in memory as timm's `forward_features` would hold them.

    Without prefix tokens timm keeps the patch embedding's channel-major layout (nothing is
    concatenated), the blocks preserve it, and the average pool then adds the tokens in another
    order than on a contiguous tensor: the same layout here keeps the logits bitwise equal.
    """
    return tokens.transpose(1, 2).contiguous().transpose(1, 2) if prefix == 0 else tokens


def _windowed(tokens: torch.Tensor, cells: tuple[int, int], window: tuple[int, int]) -> torch.Tensor:
    """Patch tokens `(B, gh*gw, D)` in grid order -> `(B, nh, nw, wh*ww, D)`, each window's in grid order."""
    (nh, nw), (wh, ww) = cells, window
    b, _, d = tokens.shape
    return tokens.reshape(b, nh, wh, nw, ww, d).transpose(2, 3).reshape(b, nh, nw, wh * ww, d)


def _unwindowed(tokens: torch.Tensor, window: tuple[int, int]) -> torch.Tensor:
    """The inverse of `_windowed`: `(B, nh, nw, wh*ww, D)` -> `(B, gh*gw, D)` in grid order."""
    b, nh, nw, _, d = tokens.shape
    (wh, ww) = window
    return tokens.reshape(b, nh, nw, wh, ww, d).transpose(2, 3).reshape(b, nh * wh * nw * ww, d)


def _built_grid(vit: nn.Module) -> TokenGrid:
    """The token grid of the size `vit` was built for, read from the model as it is now.

    Raises:
        TypeError: `vit` is not a timm vision transformer with a plain patch embedding (each
            token exactly its own pixels), so no cell could be proven to see only its window.
    """
    grid = None
    if isinstance(vit, VisionTransformer):
        size = getattr(vit.patch_embed, "grid_size", None), getattr(vit.patch_embed, "patch_size", None)
        if all(isinstance(v, tuple) and len(v) == 2 for v in size):
            # the size the model was built for is a whole number of tokens: token_grid cannot raise here
            grid = token_grid(vit, (size[0][0] * size[1][0], size[0][1] * size[1][1]))
    if grid is None:
        raise TypeError(f"split_vit needs {SUPPORTED}; got {type(vit).__name__}")
    return grid


class _Split(nn.Module):
    """What both parts share: the model, the window, the split and the token grid's checks.

    Nothing derived from the model is kept: its token grid is read at every call, so a model
    changed after the split (another input size, say) is checked as it is then.
    """

    def __init__(self, vit: VisionTransformer, window: tuple[int, int], split: int, authors: bool) -> None:
        super().__init__()
        self.vit = vit
        self.window = window
        self.split = split
        self.authors = authors

    @property
    def prefix(self) -> int:
        """Prefix tokens (class, distillation, registers) of each window."""
        return int(self.vit.num_prefix_tokens)

    def feature_size(self, image_size: tuple[int, int]) -> tuple[int, int]:
        """The feature grid `(h, w)` (windows per column and per row) of `(H, W)` images.

        Raises:
            ValueError: the image is not a whole number of tokens, differs from the size the
                model was built for (without `dynamic_img_size`), or its token grid is not a
                whole number of windows: a cell must be exactly one window.
        """
        built = _built_grid(self.vit)
        (h, w), (ph, pw), (wh, ww) = image_size, built.patch_size, self.window
        if h % ph or w % pw:
            raise ValueError(f"the ViT split needs images that are a whole number of its {ph}x{pw} tokens; got {h}x{w}")
        grid = (h // ph, w // pw)
        if not self.vit.dynamic_img_size and grid != built.grid:
            gh, gw = built.grid
            raise ValueError(
                f"the model takes {gh * ph}x{gw * pw} images ({gh}x{gw} tokens); got {h}x{w} (build it with dynamic_img_size=True)"
            )
        if grid[0] % wh or grid[1] % ww:
            raise ValueError(f"window must divide the token grid: window {wh}x{ww} tokens, grid {grid[0]}x{grid[1]} tokens ({h}x{w} px)")
        return grid[0] // wh, grid[1] // ww

    def extra_repr(self) -> str:
        return f"window={self.window}, split={self.split}, authors={self.authors}"


class ViTSRF(_Split):
    """The windowed first blocks of a ViT: images to a feature grid, or to local logits.

    Built by `split_vit`. Cell `(a, b)` of the output is window `(a, b)` of `wh x ww` tokens.
    Below the model's depth it holds the window's `T = prefix + wh*ww` tokens after blocks
    `[0, split)`, flattened token by token into `C' = T * D` channels; at the depth it holds the
    window's own classification (local logits), as the model's head classifies a whole image.
    `feature_size((H, W))` is the grid `(h, w)` of `H x W` images, without running the model.

    Attributes:
        vit: the model, shared (not copied) with the `ViTLRF` of the same split.
        window: `(wh, ww)` tokens per window.
        split: windowed blocks; `split == depth` means local logits.
        authors: reproduce the PatchCURE authors' forward instead of timm's (see `split_vit`).
    """

    @property
    def receptive_field(self) -> tuple[int, int]:
        """Pixels `(rows, columns)` one cell sees: its window, `(wh * ph, ww * pw)`."""
        (ph, pw), (wh, ww) = _built_grid(self.vit).patch_size, self.window
        return wh * ph, ww * pw

    @property
    def feature_stride(self) -> tuple[int, int]:
        """Pixels between neighbouring cells: windows tile the image, so the receptive field."""
        return self.receptive_field

    @property
    def feature_offset(self) -> tuple[int, int]:
        """Cell `(0, 0)` starts at pixel `(0, 0)`: no padding."""
        return 0, 0

    @property
    def local_logits(self) -> bool:
        """Whether the output is local logits (every block windowed) rather than features."""
        return self.split == len(self.vit.blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Features `(B, T*D, h, w)`, or local logits `(B, num_classes, h, w)` at `split == depth`.

        Args:
            x: `(B, C, H, W)` images; `(H, W)` a whole number of windows.
        """
        if x.ndim != 4:
            raise ValueError(f"the ViT split takes images (B, C, H, W), got a tensor of shape {tuple(x.shape)}")
        vit = self.vit
        b, p, cells = x.shape[0], self.prefix, self.feature_size(tuple(x.shape[-2:]))
        tokens = vit._pos_embed(vit.patch_embed(x))
        if not self.authors or self.local_logits:
            tokens = vit.norm_pre(tokens)
        # each window gets its own copy of the prefix tokens, as timm's embedding makes them;
        # the authors give each window the raw class token, without its position embedding
        prefix = vit.cls_token if self.authors else tokens[:, :p]
        patches = _windowed(tokens[:, p:], cells, self.window)
        tokens = torch.cat([prefix.expand(b, -1, -1)[:, None, None].expand(-1, *cells, -1, -1), patches], 3)
        tokens = _timm_layout(tokens.reshape(-1, *tokens.shape[-2:]), p)
        if self.authors and not self.local_logits:
            # the authors' split model normalises after windowing (their SRF-only model before)
            tokens = vit.norm_pre(tokens)
        tokens = _blocks(vit, vit.blocks[: self.split], tokens)
        if not self.local_logits:
            return tokens.reshape(b, *cells, -1).permute(0, 3, 1, 2)
        tokens = vit.norm(tokens)
        if self.authors:
            # the authors classify every patch token, then average the logits over the window
            logits = vit.head(vit.fc_norm(tokens[:, p:])).mean(1)
        else:
            logits = vit.forward_head(tokens)
        return logits.reshape(b, *cells, -1).permute(0, 3, 1, 2)


class ViTLRF(_Split):
    """The global last blocks of a ViT: a (masked) feature grid to logits.

    Built by `split_vit`. The windows' patch tokens go back to their places on the token grid (a
    masked cell's tokens are zeros, as the defense set them) and each prefix token becomes one:
    the mean of its copies over the cells that are kept. Then blocks `[split, depth)`, the
    final norm and the model's head run as in timm (or as the PatchCURE authors' code does, with
    `authors`).

    Attributes:
        vit: the model, shared (not copied) with the `ViTSRF` of the same split.
        window: `(wh, ww)` tokens per window.
        split: the first global block.
        authors: reproduce the PatchCURE authors' forward instead of timm's (see `split_vit`).
    """

    def forward(self, features: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
        """Logits `(N, num_classes)` of feature grids.

        Args:
            features: `(N, T*D, h, w)` from `ViTSRF`, masked cells set to 0.
            kept: `(N, h, w)` bool, the cells that are not masked. A cell that is not kept
                contributes nothing to the prefix tokens; with no cell kept they are zeros.

        Raises:
            ValueError: the features do not have `T*D` channels of this model and window, or
                `kept` does not match their grid.
            TypeError: `kept` is not a bool tensor.
        """
        vit, p, (wh, ww) = self.vit, self.prefix, self.window
        tokens, dim = p + wh * ww, vit.embed_dim
        if features.ndim != 4 or features.shape[1] != tokens * dim:
            raise ValueError(
                f"features must be (N, {tokens * dim}, h, w): {tokens} tokens of {dim} channels per {wh}x{ww} window; got {tuple(features.shape)}"
            )
        n, _, h, w = features.shape
        if not isinstance(kept, torch.Tensor) or kept.dtype != torch.bool:
            raise TypeError(f"kept must be a bool tensor of the cells not masked, got {getattr(kept, 'dtype', type(kept).__name__)}")
        if tuple(kept.shape) != (n, h, w):
            raise ValueError(f"kept must have the shape (N, h, w) = {(n, h, w)} of the features' grid, got {tuple(kept.shape)}")
        cells = features.permute(0, 2, 3, 1).reshape(n, h, w, tokens, dim)
        if self.authors:
            # their code tells a masked cell by its class token summing to exactly 0
            kept = kept & (cells[..., 0, :].sum(-1) != 0)
        weight = kept.to(features.dtype)[..., None, None]
        count = weight.sum((1, 2)).clamp(min=1)
        prefix = (cells[..., :p, :] * weight).sum((1, 2)) / count
        x = _timm_layout(torch.cat([prefix, _unwindowed(cells[..., p:, :], self.window)], 1), p)
        x = vit.norm(_blocks(vit, vit.blocks[self.split :], x))
        if not self.authors:
            return vit.forward_head(x)
        # the authors normalise every token before pooling, where timm normalises the pool
        x = vit.fc_norm(x)
        pooled = x[:, p:].mean(1) if vit.global_pool == "avg" else x[:, 0]
        return vit.head(vit.head_drop(pooled))


def split_vit(vit: VisionTransformer, window: tuple[int, int], split: int, *, authors: bool = False) -> tuple[ViTSRF, ViTLRF | None]:
    """Split a timm vision transformer into PatchCURE's windowed and global parts.

    `srf(x)` runs blocks `[0, split)` on each window of `wh x ww` tokens alone, with its own
    copy of the prefix tokens (class, distillation, registers, position embedding included, as
    timm embeds them), and returns the feature grid `(B, T*D, h, w)`: cell `(a, b)` is window
    `(a, b)`'s `T = prefix + wh*ww` tokens, token by token. It declares PatchGuard's geometry,
    `receptive_field = feature_stride = (wh*ph, ww*pw)` and `feature_offset = (0, 0)`.
    `lrf(features, kept)` puts the patch tokens back on the grid, makes each prefix token the
    mean of its copies over the kept cells, and runs blocks `[split, depth)`, the final norm and
    the head: with one window covering the whole grid, `lrf(srf(x), all kept)` is the model's
    own `forward(x)`. At `split == depth` there is no global part: `srf(x)` returns local logits
    `(B, num_classes, h, w)`, each window classified by the model's own pooling and head.

    With `authors=True` the forward is that of the PatchCURE authors' code, to run their
    checkpoints: each window's class token is the raw `cls_token` (no position embedding) and is
    normalised by `norm_pre` with the window (before the windows at `split == depth`); the global
    part applies `fc_norm` to every token before pooling, and tells masked cells also by their
    class token summing to exactly 0; at `split == depth` `fc_norm` and the head classify every
    patch token and the window's logits are their mean. Where their code would average no class
    token (every cell masked) it returns NaN; this one uses zeros.

    Args:
        vit: a timm `VisionTransformer` (ViT, DeiT, DeiT distilled, registers, with or without a
            class token, any pooling) with a plain patch embedding; shared, not copied.
        window: `(wh, ww)` tokens per window (or one int for a square window).
        split: windowed blocks, `0 <= split <= depth`.
        authors: reproduce the authors' forward (a class token and no other prefix token;
            `global_pool` `"avg"`, or `"token"` below the depth).

    Returns:
        `(srf, lrf)`, both holding `vit` itself; `lrf` is `None` at `split == depth`.

    Raises:
        TypeError: `vit` is not such a vision transformer.
        ValueError: `window` is not one or two positive ints, or does not divide the model's
            token grid (a cell must be one whole window); `split` is outside `[0, depth]`; the
            model has no pooled head (`global_pool=""`: no logits per image or window); or
            `authors` is set for a model their code cannot run.
    """
    grid = _built_grid(vit)
    window = tuple(positive_int(v, "window") for v in as_pair(window, "window"))
    depth = len(vit.blocks)
    if isinstance(split, bool) or not isinstance(split, int) or not 0 <= split <= depth:
        raise ValueError(f"split must be an int in [0, {depth}] (the model's depth), got {split!r}")
    if grid.grid[0] % window[0] or grid.grid[1] % window[1]:
        raise ValueError(
            f"window must divide the token grid: window {window[0]}x{window[1]} tokens, grid {grid.grid[0]}x{grid.grid[1]} tokens"
        )
    if not vit.global_pool:
        raise ValueError("split_vit needs a model with a pooled head (global_pool 'token', 'avg', ...), got global_pool=''")
    if authors:
        pools = ("avg",) if split == depth else ("avg", "token")
        if vit.cls_token is None or vit.num_prefix_tokens != 1 or vit.global_pool not in pools:
            raise ValueError(
                f"authors=True needs a class token and no other prefix token, and global_pool in {pools} as the authors' models have; "
                f"got {vit.num_prefix_tokens} prefix tokens, class token {vit.cls_token is not None}, global_pool={vit.global_pool!r}"
            )
    srf = ViTSRF(vit, window, split, bool(authors))
    return srf, None if split == depth else ViTLRF(vit, window, split, bool(authors))
