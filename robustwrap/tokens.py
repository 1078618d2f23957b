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
Where the head reads the class token only, the last block runs through the pieces of timm's
`Block` and `Attention` so that the patch tokens there give only their keys and values
(`_run_blocks`); any other block runs as the module it is.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from timm.layers import PatchEmbed
from timm.models import VisionTransformer
from timm.models.deit import VisionTransformerDistilled
from timm.models.vision_transformer import Attention, Block
from torch import nn

__all__ = [
    "SUPPORTED",
    "TokenGrid",
    "axis_token_keep",
    "embed_patches",
    "forward_ablated",
    "forward_kept",
    "merge_distilled",
    "supports_token_dropping",
    "token_grid",
    "token_keep",
    "views_per_pass",
]

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


def token_keep(keep: torch.Tensor, grid: TokenGrid) -> torch.Tensor:
    """`(N, gh, gw)` bool: the patch tokens that meet a kept pixel of `(N, H, W)` pixel keep masks.

    A token is dropped only when every one of its pixels is masked, so a mask aligned to the
    token grid drops whole tokens and a partly masked token keeps its pixels that are not.
    """
    (ph, pw), (gh, gw) = grid.patch_size, grid.grid
    return keep.reshape(keep.shape[0], gh, ph, gw, pw).any(4).any(2)


def views_per_pass(batch_size: int, grid: TokenGrid, most_kept: int) -> int:
    """Views per forward pass when no view keeps more than `most_kept` patch tokens.

    `batch_size` counts full images; a pass of views that keep fewer tokens costs less (and
    takes less memory), so as many views run as hold about the tokens of `batch_size` images.
    """
    kept = grid.num_prefix_tokens + max(1, most_kept)
    return max(1, batch_size * grid.num_tokens // kept)


def embed_patches(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """`(B, gh * gw, D)`: the patch embedding of every token of `images`, before position embeddings.

    A token's embedding depends on its own `ph x pw` pixels only (`token_grid` admits no other
    embedding), so a view's fully kept tokens can reuse the embeddings of its unablated image.
    """
    tokens = model.patch_embed(images)
    return tokens.reshape(tokens.shape[0], -1, tokens.shape[-1])


def _embed_pixels(model: nn.Module, patches: torch.Tensor) -> torch.Tensor:
    """`(M, D)`: `patch_embed` of `(M, C, ph, pw)` single-token images (its projection, then its norm).

    The projection's kernel is the token (`token_grid` checks it), so on one token a plain
    convolution is a matrix product: the same function, several times faster than a convolution
    kernel on tiny images.
    """
    embed = model.patch_embed
    proj = embed.proj
    if type(proj) is nn.Conv2d and proj.groups == 1:
        projected = nn.functional.linear(patches.flatten(1), proj.weight.flatten(1), proj.bias)
    else:
        projected = proj(patches).flatten(1)
    return embed.norm(projected)


def _position_table(model: nn.Module, like: torch.Tensor, grid: TokenGrid) -> torch.Tensor | None:
    """`_pos_embed`'s additive part `(prefix + gh * gw, D)`: prefix tokens, then each patch token's position embedding.

    `_pos_embed(e)` adds the position embeddings to `e` and puts the prefix tokens first, so
    `_pos_embed(e) == _pos_embed(0) + [0, e]` and the kept tokens can take their positions after
    the selection. Not when the position dropout runs (train mode, p > 0): `None`, and the caller
    runs `_pos_embed` on the whole grid as the model does.
    """
    dropping = any(
        m.training and not isinstance(m, (nn.Identity, nn.Sequential)) and getattr(m, "p", None) != 0 for m in model.pos_drop.modules()
    )
    if dropping:
        return None
    gh, gw = grid.grid
    shape = (1, gh, gw, like.shape[-1]) if getattr(model, "dynamic_img_size", False) else (1, gh * gw, like.shape[-1])
    return model._pos_embed(like.new_zeros(shape))[0]


def _head_reads_prefix(model: nn.Module, prefix: int) -> bool:
    """Whether `model.forward_head` reads the prefix tokens only (a class token, and a distillation token).

    True for timm's own heads that pool by the class token (`global_pool="token"`, no attention
    pooling) and for DeiT's distilled head (class and distillation tokens); a subclass with a head
    of its own is not assumed to be one.
    """
    head = type(model).forward_head
    if head is VisionTransformerDistilled.forward_head:
        return prefix >= 2
    return (
        head is VisionTransformer.forward_head
        and prefix >= 1
        and getattr(model, "global_pool", None) == "token"
        and getattr(model, "attn_pool", None) is None
    )


def _attend_prefix(attn: nn.Module, x: torch.Tensor, prefix: int) -> torch.Tensor:
    """`attn(x)[:, :prefix]`, computing the queries and the outputs of the first `prefix` tokens only.

    Written for timm's `Attention` (what `_run_blocks` checks): every token's keys and values,
    the prefix tokens' queries, then the module's own norms, gate, projection and dropout in its
    order; eval mode only (`_run_blocks`), so no attention dropout. Any other attention module
    runs whole and is sliced.
    """
    heads, width = getattr(attn, "num_heads", None), getattr(attn, "head_dim", None)
    qkv = getattr(attn, "qkv", None)
    known = (
        type(attn) is Attention
        and isinstance(heads, int)
        and isinstance(width, int)
        and isinstance(qkv, nn.Linear)
        and qkv.out_features == 3 * heads * width
        and all(hasattr(attn, name) for name in ("q_norm", "k_norm", "norm", "proj", "proj_drop", "fused_attn", "scale"))
    )
    if not known:
        return attn(x)[:, :prefix]
    n, length, _ = x.shape
    inner = heads * width
    weight, bias = qkv.weight, qkv.bias
    first = x[:, :prefix]
    q = nn.functional.linear(first, weight[:inner], None if bias is None else bias[:inner])
    q = q.reshape(n, prefix, heads, width).transpose(1, 2)
    kv = nn.functional.linear(x, weight[inner:], None if bias is None else bias[inner:])
    k, v = kv.reshape(n, length, 2, heads, width).permute(2, 0, 3, 1, 4).unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    if attn.fused_attn:
        out = nn.functional.scaled_dot_product_attention(q, k, v)  # eval mode only (`_run_blocks`): no dropout
    else:
        out = (q * attn.scale @ k.transpose(-2, -1)).softmax(dim=-1) @ v
    out = attn.norm(out.transpose(1, 2).reshape(n, prefix, inner))
    gate = getattr(attn, "gate", None)
    if gate is not None:
        out = out * gate(first).sigmoid()
    return attn.proj_drop(attn.proj(out))


def _run_blocks(model: nn.Module, tokens: torch.Tensor, prefix: int) -> torch.Tensor:
    """`model.blocks(tokens)`, or only its first `prefix` tokens where the head reads nothing else.

    The last block's patch tokens feed nothing but the head's pooling; when the head reads the
    class (and distillation) token only (`_head_reads_prefix`) and the last block is timm's
    `Block`, the patch tokens take only their keys and values there, and the prefix tokens the
    rest: the same logits (each token's MLP and norms are row-wise), for about 1/12 less work on
    a 12-block ViT. In train mode the blocks run whole, as the model's own forward runs them.
    """
    blocks = model.blocks
    if (
        model.training
        or not isinstance(blocks, nn.Sequential)
        or len(blocks) == 0
        or type(blocks[-1]) is not Block
        or not _head_reads_prefix(model, prefix)
    ):
        return blocks(tokens)
    last = blocks[-1]
    tokens = blocks[:-1](tokens)
    kept = tokens[:, :prefix] + last.drop_path1(last.ls1(_attend_prefix(last.attn, last.norm1(tokens), prefix)))
    return kept + last.drop_path2(last.ls2(last.mlp(last.norm2(kept))))


def _forward_tokens(model: nn.Module, flat: torch.Tensor, keep: torch.Tensor, grid: TokenGrid) -> torch.Tensor:
    """The ViT's logits on views given by their kept patch tokens' embeddings.

    Args:
        flat: `(T, D)` patch embeddings of the kept tokens, view after view, each view's in
            grid order (`keep.nonzero()`'s order).
        keep: `(N, gh * gw)` bool: the patch tokens each view keeps (`T` in all).
    """
    n, length = keep.shape
    prefix = grid.num_prefix_tokens
    counts = keep.sum(1)
    table = _position_table(model, flat, grid)
    if table is not None:
        flat = flat + table[prefix + keep.nonzero()[:, 1]]
    else:
        full = flat.new_zeros(n, length, flat.shape[-1]).index_put((keep,), flat)
        if getattr(model, "dynamic_img_size", False):
            full = full.reshape(n, *grid.grid, flat.shape[-1])
        embedded = model._pos_embed(full)
        flat = embedded[:, prefix:][keep]
    starts = counts.cumsum(0) - counts
    out: torch.Tensor | None = None
    for count in counts.unique().tolist():
        members = (counts == count).nonzero()[:, 0]
        first = table[:prefix].expand(members.numel(), -1, -1) if table is not None else embedded[members, :prefix]
        tokens = torch.cat([first, flat[starts[members, None] + torch.arange(count, device=flat.device)]], 1)
        tokens = model.norm(_run_blocks(model, model.norm_pre(model.patch_drop(tokens)), prefix))
        logits = merge_distilled(model.forward_head(tokens))
        if out is None:
            out = logits.new_empty((n, *logits.shape[1:]))
        out[members] = logits
    if out is None:
        raise ValueError("token dropping needs at least one view, got none")
    return out


def forward_kept(model: nn.Module, x: torch.Tensor, keep: torch.Tensor, grid: TokenGrid) -> torch.Tensor:
    """The ViT's logits on views `x`, each run on its prefix tokens and the patch tokens `keep` marks.

    Views that keep the same number of tokens share one forward pass (attention needs one
    length per batch); the logits come back in the order of `x`. Every kept token carries its
    own position embedding, and the blocks, final norm and head run on the kept tokens alone.
    In train mode the model's own `patch_drop` (if any) still applies, as in its ordinary forward.

    Args:
        model: a timm `VisionTransformer` (`token_grid(model, ...)` is not `None`).
        x: `(N, C, H, W)` views, already ablated (or encoded) as the model takes them.
        keep: `(N, gh, gw)` bool: the patch tokens each view keeps.
        grid: `token_grid(model, (H, W))`.

    Returns:
        `(N, num_classes)` logits.
    """
    keep = keep.reshape(keep.shape[0], -1)
    return _forward_tokens(model, embed_patches(model, x)[keep], keep, grid)


def forward_ablated(
    model: nn.Module,
    images: torch.Tensor,
    image: torch.Tensor,
    rows: torch.Tensor,
    cols: torch.Tensor,
    grid: TokenGrid,
    fill: torch.Tensor | None = None,
    embedded: torch.Tensor | None = None,
) -> torch.Tensor:
    """The ViT's logits on ablated views of `images`, embedding each image once: no view is built.

    View `n` keeps the pixels `rows[n] x cols[n]` of `images[image[n]]` (every other pixel is
    `fill`) and the patch tokens that meet them. A token whose pixels are all kept has the
    embedding it has in the unablated image (`embedded`); only the tokens a view keeps partly are
    embedded again, from their own pixels with the ablated ones filled. The result is
    `forward_kept` of the ablated views.

    Args:
        model: a timm `VisionTransformer` (`token_grid(model, ...)` is not `None`).
        images: `(B, C, H, W)` unablated images, encoded as the model takes them.
        image: `(N,)` long: the image of each view.
        rows: `(N, H)` bool: the pixel rows each view keeps.
        cols: `(N, W)` bool: the pixel columns each view keeps.
        grid: `token_grid(model, (H, W))`.
        fill: the ablated pixels' value (a scalar or `(C, 1, 1)` tensor), or `None` when `images`
            are the views themselves, already ablated.
        embedded: `embed_patches(model, images)`, to share it between calls on the same images.

    Returns:
        `(N, num_classes)` logits.
    """
    (ph, pw), (gh, gw) = grid.patch_size, grid.grid
    n = image.shape[0]
    row_tokens, col_tokens = rows.reshape(n, gh, ph), cols.reshape(n, gw, pw)
    keep = row_tokens.any(2)[:, :, None] & col_tokens.any(2)[:, None, :]
    partial = keep & ~(row_tokens.all(2)[:, :, None] & col_tokens.all(2)[:, None, :])
    if embedded is None:
        embedded = embed_patches(model, images)
    length = gh * gw
    keep, partial = keep.reshape(n, length), partial.reshape(n, length)
    at = keep.nonzero()
    flat = embedded.reshape(-1, embedded.shape[-1])[image[at[:, 0]] * length + at[:, 1]]
    if fill is not None and partial.any():  # (already ablated views embed as they are)
        view, i, j = partial.reshape(n, gh, gw).nonzero().unbind(1)
        pixels = images.reshape(*images.shape[:2], gh, ph, gw, pw)[image[view], :, i, :, j, :]
        kept = row_tokens[view, i][:, :, None] & col_tokens[view, j][:, None, :]
        pixels = torch.where(kept[:, None], pixels, fill)
        flat = flat.index_put((partial[keep].nonzero()[:, 0],), _embed_pixels(model, pixels).to(flat.dtype))
    return _forward_tokens(model, flat, keep, grid)
