"""Token dropping embeds each image once (issue 26): a view re-embeds only the tokens it keeps partly.

The reference is the function of last wave, written out here: build the ablated view, run
timm's `patch_embed` and `_pos_embed` on its whole grid, keep the tokens that meet the kept
pixels, then the blocks and head.
"""

from __future__ import annotations

import pytest
import timm
import torch

import robustwrap
from robustwrap.defenses import smoothing
from robustwrap.defenses.smoothing import ViewTokens, ablate, encode_full
from robustwrap.tokens import forward_ablated, token_grid

SIZE = 32


def _vit(seed: int = 0, **kwargs):
    torch.manual_seed(seed)
    options = {"img_size": SIZE, "patch_size": 8, "depth": 2, "num_classes": 5, **kwargs}
    model = timm.create_model("vit_tiny_patch16_224", **options).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(4.0)
    return model


def _full_grid_logits(model, views: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    prefix = model.num_prefix_tokens
    tokens = model._pos_embed(model.patch_embed(views))
    chosen = torch.cat([torch.ones(views.shape[0], prefix, dtype=torch.bool), keep.reshape(views.shape[0], -1)], 1)
    out = []
    for n in range(views.shape[0]):
        t = tokens[n : n + 1, chosen[n]]
        out.append(model.forward_head(model.norm(model.blocks(model.norm_pre(model.patch_drop(t))))))
    return torch.cat(out)


def _views(model, ablation: str, size: int, stride: int, encoding: str = "fill", n: int = 2):
    defended = robustwrap.wrap(model, patch=3, defense="smoothing", ablation=ablation, size=size, stride=stride, encoding=encoding)
    x = torch.rand(n, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    tokens = ViewTokens.of(defended._token_grid(), defended.ablation_set, x.device)
    v = len(defended.ablation_set)
    image, view = torch.arange(n).repeat_interleave(v), torch.arange(v).repeat(n)
    return defended, x, tokens, image, view


@pytest.mark.parametrize(
    ("kwargs", "ablation", "size", "stride", "encoding"),
    [
        ({}, "block", 12, 5, "fill"),
        ({}, "column", 5, 3, "levine2020"),
        ({"dynamic_img_size": True}, "block", 11, 3, "fill"),
        ({"class_token": False, "global_pool": "avg"}, "column", 6, 1, "fill"),
        ({"reg_tokens": 2, "no_embed_class": True}, "row", 9, 2, "fill"),
    ],
)
def test_embedding_once_computes_the_full_grid_function(kwargs, ablation, size, stride, encoding):
    model = _vit(in_chans=6 if encoding == "levine2020" else 3, **kwargs)
    defended, x, tokens, image, view = _views(model, ablation, size, stride, encoding)
    encoded = encode_full(x, encoding)
    with torch.no_grad():
        views = ablate(x, image, view, defended.ablation_set.axis_keep(x.device), encoding, 0.0)
        expected = _full_grid_logits(model, views, tokens.keep(view))
        got = tokens.logits(model, encoded, image, view, smoothing.token_fill(0.0, encoding, encoded))
    rows, cols = tokens.pixel_keep
    partly = [keep.reshape(keep.shape[0], -1, 8).any(2) & ~keep.reshape(keep.shape[0], -1, 8).all(2) for keep in (rows, cols)]
    assert any(bool(p.any()) for p in partly)  # some view keeps a token partly: its re-embedding is tested
    # float rounding (a matrix product for the partly kept tokens, the convolution in the reference) grows through the
    # x4 weights to ~2e-4 on logits near 10 with some timm versions' initialisation; a wrong token moves them by ~1
    assert torch.allclose(got, expected, atol=1e-3, rtol=1e-4), (got - expected).abs().max()
    assert torch.equal(got.argmax(1), expected.argmax(1))


def test_position_dropout_in_train_mode_runs_on_the_whole_grid():
    """With position dropout running, `_pos_embed` is not a sum any more: the whole grid goes through it."""
    model = _vit(pos_drop_rate=0.5).train()
    defended, x, tokens, image, view = _views(model, "block", 12, 5)
    with torch.no_grad():
        views = ablate(x, image, view, defended.ablation_set.axis_keep(x.device), "fill", 0.0)
        torch.manual_seed(3)
        expected = _full_grid_logits_batched(model, views, tokens.keep(view))
        torch.manual_seed(3)
        got = tokens.logits(model, x, image, view, torch.tensor(0.0))
        model.eval()
        quiet = tokens.logits(model, x, image, view, torch.tensor(0.0))
    assert torch.allclose(got, expected, atol=1e-4)  # the same dropout mask over the same whole grid
    assert not torch.allclose(got, quiet, atol=1e-3)  # and the dropout did run


def _full_grid_logits_batched(model, views: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """`_full_grid_logits` with one `_pos_embed` call for all views (as many random draws as the defense makes)."""
    tokens = model._pos_embed(model.patch_embed(views))
    prefix = model.num_prefix_tokens
    chosen = torch.cat([torch.ones(views.shape[0], prefix, dtype=torch.bool), keep.reshape(views.shape[0], -1)], 1)
    counts = chosen.sum(1)
    out = torch.empty(views.shape[0], model.num_classes)
    for count in counts.unique().tolist():
        members = (counts == count).nonzero()[:, 0]
        t = torch.stack([tokens[n, chosen[n]] for n in members.tolist()])
        out[members] = model.forward_head(model.norm(model.blocks(model.norm_pre(model.patch_drop(t)))))
    return out


def test_certify_builds_no_view_when_tokens_are_dropped(monkeypatch):
    model = _vit()
    defended = robustwrap.wrap(model, patch=3, defense="smoothing", ablation="block", size=12, stride=5).eval()
    x, y = torch.rand(2, 3, SIZE, SIZE), torch.tensor([0, 1])
    expected = defended.certify(x, y, early_exit=False)

    def no_views(*args, **kwargs):
        raise AssertionError("a full-size view was built")

    monkeypatch.setattr(smoothing, "ablate", no_views)
    got = defended.certify(x, y, early_exit=False)
    assert torch.equal(got.counts, expected.counts) and got.counts.sum() == 2 * len(defended.ablation_set)
    with pytest.raises(AssertionError, match="full-size view"):
        robustwrap.wrap(model, patch=3, defense="smoothing", size=6, drop_tokens=False).certify(x, y)


def test_partial_tokens_are_re_embedded_from_their_own_filled_pixels():
    """A 5 px column meets an 8 px token partly: that token is embedded from its filled pixels, not the image's."""
    model = _vit()
    grid = token_grid(model, (SIZE, SIZE))
    x = torch.rand(1, 3, SIZE, SIZE)
    rows = torch.ones(1, SIZE, dtype=torch.bool)
    cols = torch.zeros(1, SIZE, dtype=torch.bool)
    cols[0, 3:8] = True  # token column 0, partly
    with torch.no_grad():
        view = torch.where(rows[0][:, None] & cols[0][None, :], x[0], torch.tensor(0.5))[None]
        expected = _full_grid_logits(model, view, torch.tensor([[True, False, False, False]]).expand(4, 4).reshape(1, 4, 4))
        got = forward_ablated(model, x, torch.tensor([0]), rows, cols, grid, torch.tensor(0.5))
        stale = forward_ablated(model, x, torch.tensor([0]), rows, cols, grid, None)  # the image's own embedding
    assert torch.allclose(got, expected, atol=1e-5)
    assert not torch.allclose(stale, expected, atol=1e-3)


@pytest.mark.parametrize(
    ("name", "kwargs", "fused", "reads_prefix"),
    [
        ("vit_tiny_patch16_224", {}, True, True),
        ("vit_tiny_patch16_224", {"reg_tokens": 2, "qk_norm": True}, False, True),
        ("deit_tiny_distilled_patch16_224", {}, True, True),
        ("vit_tiny_patch16_224", {"class_token": False, "global_pool": "avg"}, True, False),
        ("vit_tiny_patch16_224", {"global_pool": "map"}, True, False),
    ],
)
def test_the_last_block_runs_only_the_tokens_the_head_reads(name, kwargs, fused, reads_prefix):
    """A class-token head reads the prefix tokens only: the last block gives the patch tokens keys and values, nothing more."""
    torch.manual_seed(0)
    model = timm.create_model(name, img_size=SIZE, patch_size=8, depth=2, num_classes=5, **kwargs).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(4.0)
    for block in model.blocks:
        block.attn.fused_attn = fused
    defended, x, tokens, image, view = _views(model, "block", 12, 5)
    seen = []
    hook = model.blocks[-1].mlp.register_forward_hook(lambda module, args, out: seen.append(args[0].shape[1]))
    with torch.no_grad():
        views = ablate(x, image, view, defended.ablation_set.axis_keep(x.device), "fill", 0.0)
        expected = _full_grid_logits_batched(model, views, tokens.keep(view))
        seen.clear()
        got = tokens.logits(model, x, image, view, torch.tensor(0.0))
        model.train()  # train mode runs the blocks whole, as the model's own forward does
        whole = []
        hook.remove()
        hook = model.blocks[-1].mlp.register_forward_hook(lambda module, args, out: whole.append(args[0].shape[1]))
        tokens.logits(model, x, image, view, torch.tensor(0.0))
    hook.remove()
    prefix = model.num_prefix_tokens
    assert torch.allclose(got, expected, atol=1e-4, rtol=1e-4), (got - expected).abs().max()
    assert torch.equal(got.argmax(1), expected.argmax(1))
    if reads_prefix:
        assert set(seen) == {prefix}
    else:
        assert min(seen) > prefix
    assert min(whole) > prefix


@pytest.mark.parametrize("defense", ["smoothing", "patchcleanser"])
def test_progress_observers_see_every_token_view(defense):
    """Token views run the ViT's parts, not its forward: they still tell `observe_forward`, as the progress bar needs."""
    from robustwrap.views import observe_forward

    model = _vit()
    options = {"ablation": "block", "size": 12, "stride": 5} if defense == "smoothing" else {"drop_tokens": True, "num_masks": 3}
    defended = robustwrap.wrap(model, patch=3, defense=defense, batch_size=4, **options).eval()
    x = torch.rand(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    seen = []
    with observe_forward(seen.append):
        result = defended.certify(x, torch.tensor([0, 1]), early_exit=False)
    assert seen and sum(seen) == int(result.num_views.sum())
