"""PatchCURE's ViT split (`robustwrap.windows.split_vit`) against independent references.

The timm reference runs one window at a time: the tokens of window `(a, b)` picked by explicit
index lists from timm's own embedding (`patch_embed`, `_pos_embed`, `norm_pre`), the prefix
tokens copied in front, timm's public blocks; the global part rebuilds the token sequence by
hand (kept cells' patch tokens at their grid places, masked ones zeros, prefix = mean over kept
cells) and runs timm's blocks, `norm` and `forward_head`. The authors' reference transcribes
the forward of their code (inspire-group/PatchCURE, `utils/split.py` and `utils/vit_srf.py`):
`ViTSRFPreModelWrapper`, `ViTPostModelWrapper` and `VisionTransformer_SRF.forward`, in eval mode,
built from the model's children as their `split_vit_like` does. `authors=True` equals it bit
for bit (as it equals their unmodified code, run once by hand on these shapes with timm 1.0).
"""

from __future__ import annotations

import pytest
import timm
import torch
from torch import nn

from robustwrap.models import check_receptive_field
from robustwrap.windows import ViTLRF, ViTSRF, split_vit


def _vit(seed: int = 0, **kwargs) -> nn.Module:
    torch.manual_seed(seed)
    options = {"img_size": 32, "patch_size": 8, "depth": 4, "embed_dim": 48, "num_heads": 2, "num_classes": 5, **kwargs}
    model = timm.create_model(options.pop("name", "vit_tiny_patch16_224"), **options).eval()
    with torch.no_grad():  # larger weights: tokens and windows matter, so a wrong one shows
        for p in model.parameters():
            p.mul_(3.0)
    return model


MODELS = {
    "token": {},
    "avg": {"global_pool": "avg"},
    "no_class_token": {"class_token": False, "global_pool": "avg"},
    "registers": {"reg_tokens": 2, "no_embed_class": True},
    "pre_norm": {"pre_norm": True, "global_pool": "avg"},
    "deit_distilled": {"name": "deit_tiny_distilled_patch16_224", "depth": 3},
    "rectangular": {"img_size": (16, 32), "depth": 3},
}


def _images(vit: nn.Module, n: int = 2, seed: int = 0) -> torch.Tensor:
    h, w = vit.patch_embed.img_size
    return torch.randn(n, 3, h, w, generator=torch.Generator().manual_seed(seed))


def _geometry(vit: nn.Module, x: torch.Tensor, window: tuple[int, int]):
    ph, pw = vit.patch_embed.patch_size
    gh, gw = x.shape[-2] // ph, x.shape[-1] // pw
    return (gh, gw), (gh // window[0], gw // window[1])


def _window_ids(a: int, b: int, window: tuple[int, int], gw: int) -> list[int]:
    wh, ww = window
    return [r * gw + c for r in range(a * wh, (a + 1) * wh) for c in range(b * ww, (b + 1) * ww)]


def _reference_windows(vit, x, window, split) -> dict:
    """Window `(a, b)` -> its `(B, T, D)` tokens after blocks `[0, split)`, run alone."""
    tokens = vit.norm_pre(vit._pos_embed(vit.patch_embed(x)))
    p = vit.num_prefix_tokens
    (_, gw), (h, w) = _geometry(vit, x, window)
    out = {}
    for a in range(h):
        for b in range(w):
            ids = [p + i for i in _window_ids(a, b, window, gw)]
            t = torch.cat([tokens[:, :p], tokens[:, ids]], 1)
            for block in vit.blocks[:split]:
                t = block(t)
            out[a, b] = t
    return out


def _reference_features(vit, x, window, split) -> torch.Tensor:
    windows = _reference_windows(vit, x, window, split)
    _, (h, w) = _geometry(vit, x, window)
    return torch.stack([torch.stack([windows[a, b].flatten(1) for b in range(w)], -1) for a in range(h)], -2)


def _reference_lrf(vit, x, window, split, kept) -> torch.Tensor:
    """Logits of each image with the cells `kept[i]` keeps (the others masked)."""
    windows = _reference_windows(vit, x, window, split)
    p, d = vit.num_prefix_tokens, vit.embed_dim
    (gh, gw), (h, w) = _geometry(vit, x, window)
    logits = []
    for i in range(x.shape[0]):
        cells = [(a, b) for a in range(h) for b in range(w) if kept[i, a, b]]
        prefix = sum((windows[c][i, :p] for c in cells), torch.zeros(p, d)) / max(len(cells), 1)
        patches = torch.zeros(gh * gw, d)
        for a, b in cells:
            patches[_window_ids(a, b, window, gw)] = windows[a, b][i, p:]
        t = torch.cat([prefix, patches])[None]
        for block in vit.blocks[split:]:
            t = block(t)
        logits.append(vit.forward_head(vit.norm(t))[0])
    return torch.stack(logits)


def _reference_local_logits(vit, x, window) -> torch.Tensor:
    windows = _reference_windows(vit, x, window, len(vit.blocks))
    _, (h, w) = _geometry(vit, x, window)
    return torch.stack([torch.stack([vit.forward_head(vit.norm(windows[a, b])) for b in range(w)], -1) for a in range(h)], -2)


def _all_kept(features: torch.Tensor) -> torch.Tensor:
    return torch.ones(features.shape[0], *features.shape[-2:], dtype=torch.bool)


def _random_kept(n: int, h: int, w: int, seed: int) -> torch.Tensor:
    kept = torch.rand(n, h, w, generator=torch.Generator().manual_seed(seed)) > 0.4
    kept[0] = False  # no cell kept: the prefix tokens are zeros
    kept[-1, 0, 0] = True
    return kept


# ------------------------------------------------------------------ (a) the timm reference

CASES = [
    ("token", (1, 2)),
    ("token", (2, 2)),
    ("avg", (4, 1)),
    ("no_class_token", (2, 2)),
    ("registers", (2, 4)),
    ("pre_norm", (1, 4)),
    ("deit_distilled", (2, 1)),
    ("rectangular", (2, 2)),
]


@pytest.mark.parametrize("name, window", CASES)
def test_every_split_matches_the_reference_windowed_forward(name, window):
    vit = _vit(list(MODELS).index(name), **MODELS[name])
    x = _images(vit)
    _, (h, w) = _geometry(vit, x, window)
    kept = _random_kept(x.shape[0], h, w, seed=1)
    with torch.no_grad():
        for split in range(len(vit.blocks) + 1):
            srf, lrf = split_vit(vit, window, split)
            out = srf(x)
            if split == len(vit.blocks):
                assert lrf is None
                assert out.shape == (x.shape[0], 5, h, w)
                torch.testing.assert_close(out, _reference_local_logits(vit, x, window), rtol=1e-5, atol=1e-5)
                continue
            reference = _reference_features(vit, x, window, split)
            torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-5)
            masked = out * kept[:, None]
            torch.testing.assert_close(lrf(masked, kept), _reference_lrf(vit, x, window, split, kept), rtol=1e-5, atol=1e-5)


def test_dynamic_image_size_reads_the_grid_from_the_input():
    vit = _vit(7, dynamic_img_size=True, depth=2)
    x = torch.randn(2, 3, 16, 48)  # the model was built for 32x32
    with torch.no_grad():
        srf, lrf = split_vit(vit, (2, 2), 1)
        features = srf(x)
        assert features.shape[-2:] == srf.feature_size((16, 48)) == (1, 3)
        kept = torch.tensor([[[True, False, True]], [[False, True, True]]])
        torch.testing.assert_close(lrf(features * kept[:, None], kept), _reference_lrf(vit, x, (2, 2), 1, kept), rtol=1e-5, atol=1e-5)


def test_a_model_changed_after_the_split_is_read_as_it_is_then():
    vit = _vit(20, depth=2)
    srf, lrf = split_vit(vit, (2, 2), 1)
    vit.set_input_size(img_size=(16, 32))
    x = torch.randn(2, 3, 16, 32)
    with torch.no_grad():
        features = srf(x)
        assert features.shape[-2:] == srf.feature_size((16, 32)) == lrf.feature_size((16, 32)) == (1, 2)
        torch.testing.assert_close(features, _reference_features(vit, x, (2, 2), 1), rtol=1e-5, atol=1e-5)
        kept = torch.tensor([[[True, False]], [[True, True]]])
        torch.testing.assert_close(lrf(features * kept[:, None], kept), _reference_lrf(vit, x, (2, 2), 1, kept), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="takes 16x32 images.*got 32x32"):
        srf(torch.randn(1, 3, 32, 32))


# ------------------------------------------------------------------ (b) locality of every cell


@pytest.mark.parametrize(
    "options, window, split",
    [
        ({}, (2, 2), 1),
        ({}, (1, 2), 2),
        ({"global_pool": "avg"}, (4, 1), 2),
        ({"reg_tokens": 1}, (2, 1), 0),
        ({"class_token": False, "global_pool": "avg"}, (2, 2), 2),
    ],
)
def test_every_cell_sees_exactly_its_window(options, window, split):
    vit = _vit(8, img_size=16, patch_size=4, depth=2, **options)
    srf, _ = split_vit(vit, window, split)
    assert srf.receptive_field == srf.feature_stride == (window[0] * 4, window[1] * 4)
    assert srf.feature_offset == (0, 0)
    report = check_receptive_field(srf, 16)
    assert report.ok and report.violations == 0
    assert report.tight and report.observed_receptive_field == srf.receptive_field
    assert report.feature_size == (4 // window[0], 4 // window[1])


def test_the_authors_windows_are_local_too():
    vit = _vit(9, img_size=16, patch_size=4, depth=2, global_pool="avg")
    for split in (1, 2):
        srf, _ = split_vit(vit, (2, 1), split, authors=True)
        assert check_receptive_field(srf, 16).tight


def test_the_check_refuses_a_declared_window_smaller_than_a_cell_sees():
    # a cell sees its whole 8x8 window: declared 4x8 cells (half the rows) is caught
    srf, _ = split_vit(_vit(10, img_size=16, patch_size=4, depth=2), (2, 2), 1)
    with pytest.raises(ValueError, match="outside its declared receptive field"):
        check_receptive_field(srf, 16, receptive_field=(4, 8), feature_stride=(8, 8))


# ------------------------------------------------------------------ (c) the model's own parameters


@pytest.mark.parametrize("name", ["token", "no_class_token", "registers", "deit_distilled"])
def test_a_timm_state_dict_loads_and_the_parts_share_its_parameters(name):
    state = _vit(0, **MODELS[name]).state_dict()
    vit = _vit(11, **MODELS[name])  # other weights: what the split computes below comes from `state`
    loaded = vit.load_state_dict(state, strict=True)
    assert not loaded.missing_keys and not loaded.unexpected_keys
    before = {k: v.clone() for k, v in vit.state_dict().items()}
    srf, lrf = split_vit(vit, (2, 2), 2)
    assert srf.vit is vit and lrf.vit is vit
    own = {id(p) for p in vit.parameters()}
    assert {id(p) for p in srf.parameters()} == own == {id(p) for p in lrf.parameters()}
    assert srf.state_dict().keys() == {f"vit.{k}" for k in before}
    assert all(torch.equal(v, before[k]) for k, v in vit.state_dict().items())
    # the same objects: changing the model changes both parts
    x = _images(vit)
    with torch.no_grad():
        features = srf(x)
        logits = lrf(features, _all_kept(features))
        vit.blocks[0].mlp.fc2.bias.add_(1.0)
        vit.blocks[-1].mlp.fc2.bias.add_(1.0)
        assert not torch.equal(srf(x), features)
        assert not torch.equal(lrf(features, _all_kept(features)), logits)


def test_training_either_part_trains_the_model_with_or_without_checkpointing():
    vit = _vit(12, depth=2).train()
    x = _images(vit)
    grads = []
    for checkpointing in (False, True):
        vit.set_grad_checkpointing(checkpointing)
        vit.zero_grad()
        srf, lrf = split_vit(vit, (2, 2), 1)
        features = srf(x)
        lrf(features, _all_kept(features)).sum().backward()
        grads.append({n: p.grad.clone() for n, p in vit.named_parameters()})
        assert grads[-1]["blocks.0.attn.qkv.weight"].abs().sum() > 0 and grads[-1]["head.weight"].abs().sum() > 0
    for n, g in grads[0].items():
        torch.testing.assert_close(grads[1][n], g, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------ (d) one window: timm's model


@pytest.mark.parametrize("name", list(MODELS))
def test_one_window_over_the_whole_grid_is_timms_model_exactly(name):
    vit = _vit(list(MODELS).index(name), **MODELS[name])
    x = _images(vit, n=3)
    grid = _geometry(vit, x, (1, 1))[0]
    with torch.no_grad():
        expected = vit(x)
        for split in range(len(vit.blocks) + 1):
            srf, lrf = split_vit(vit, grid, split)
            out = srf(x)
            logits = out[:, :, 0, 0] if lrf is None else lrf(out, _all_kept(out))
            assert torch.equal(logits, expected), (name, split)


# ------------------------------------------------------------------ (e) masked cells


@pytest.mark.parametrize("authors", [False, True])
def test_masked_cells_pixels_do_not_reach_the_logits(authors):
    vit = _vit(13, global_pool="avg")
    x = _images(vit, n=2)
    kept = torch.tensor([[[True, False], [True, True]], [[False, False], [True, False]]])
    inside = x.clone()
    inside[0, :, 0:16, 16:32] = torch.randn(3, 16, 16)  # image 0's masked cell (0, 1)
    inside[1, :, 0:16, :] = 5.0  # image 1's masked cells (0, 0), (0, 1)
    inside[1, :, 16:32, 16:32] = -3.0  # and (1, 1)
    outside = x.clone()
    outside[0, :, 16:20, 0:4] += 1.0  # a kept cell
    with torch.no_grad():
        for split in range(len(vit.blocks)):
            srf, lrf = split_vit(vit, (2, 2), split, authors=authors)
            logits = lrf(srf(x) * kept[:, None], kept)
            assert torch.equal(lrf(srf(inside) * kept[:, None], kept), logits)
            changed = lrf(srf(outside) * kept[:, None], kept)
            assert not torch.equal(changed[0], logits[0]) and torch.equal(changed[1], logits[1])


def test_local_logits_of_a_cell_depend_on_its_window_only():
    vit = _vit(14)
    x = _images(vit)
    y = x.clone()
    y[:, :, 8:16, 0:16] = 7.0  # rows of window (0, 0) of a 2x2-token window
    srf, _ = split_vit(vit, (2, 2), len(vit.blocks))
    with torch.no_grad():
        a, b = srf(x), srf(y)
    assert not torch.equal(a[:, :, 0, 0], b[:, :, 0, 0])
    unchanged = torch.ones(2, 2, dtype=torch.bool)
    unchanged[0, 0] = False
    assert torch.equal(a[:, :, unchanged], b[:, :, unchanged])


# ------------------------------------------------------------------ (f) the authors' forward


def _authors_srf(model, x, window, block_i):
    """`ViTSRFPreModelWrapper(model, pre_layers).forward` (eval) of their `split_vit_like(model, block_i, True)`."""
    children = list(model.children())
    i = next(i for i, m in enumerate(children) if isinstance(m, nn.Sequential))
    pre_layers = children[:i] + list(children[i].children())[:block_i]
    num_patch = model.patch_embed.grid_size
    num_window = (num_patch[0] // window[0], num_patch[1] // window[1])
    x = pre_layers[0](x)
    if model.no_embed_class:  # their `_pos_embed`
        x = x + model.pos_embed
        x = torch.cat((model.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
    else:
        x = torch.cat((model.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        x = x + model.pos_embed
    x = model.pos_drop(x)
    x = pre_layers[1](x)
    B, N, C = x.shape
    assert N == num_patch[0] * num_patch[1] + 1
    x = x[:, 1:]
    x = x.view(B, num_window[0], window[0], num_window[1], window[1], C)
    x = x.permute(0, 1, 3, 2, 4, 5).contiguous()
    x = x.view(-1, window[0] * window[1], C)
    cls_token = model.cls_token.expand(x.shape[0], -1, -1)
    x = torch.cat([cls_token, x], dim=1)
    for layer in pre_layers[2:]:
        x = layer(x)
    x = x.view(B, num_window[0], num_window[1], (1 + window[0] * window[1]) * C)
    return x.permute(0, 3, 1, 2)


def _authors_lrf(model, x, window, block_i):
    """`ViTPostModelWrapper(model, post_layers).forward` (eval) of their `split_vit_like(model, block_i)`."""
    children = list(model.children())
    i = next(i for i, m in enumerate(children) if isinstance(m, nn.Sequential))
    post_layers = list(children[i].children())[block_i:] + children[i + 1 :]
    num_patch = model.patch_embed.grid_size
    num_window = (num_patch[0] // window[0], num_patch[1] // window[1])
    x = x.clone()  # their forward writes NaN into its input's masked class tokens
    x = x.permute(0, 2, 3, 1)
    B = x.shape[0]
    x = x.view(B, num_window[0], num_window[1], 1 + window[0] * window[1], -1)
    C = x.shape[-1]
    cls_token = x[:, :, :, 0]
    tmp = torch.sum(cls_token, dim=-1) == 0
    cls_token[tmp] = torch.nan
    cls_token = torch.nanmean(cls_token, dim=(1, 2)).view(B, 1, C)
    x = x[:, :, :, 1:].view(B, num_window[0], num_window[1], window[0], window[1], -1)
    x = x.permute(0, 1, 3, 2, 4, 5).contiguous().view(B, num_patch[0] * num_patch[1], C)
    x = torch.cat((cls_token, x), dim=1)
    for layer in post_layers[:-2]:
        x = layer(x)
    x = x[:, model.num_prefix_tokens :].mean(dim=1) if model.global_pool == "avg" else x[:, 0]
    x = post_layers[-2](x)
    return post_layers[-1](x)


def _authors_srf_only(model, x, window):
    """`VisionTransformer_SRF.forward` (eval, `return_features=True`): local logits."""
    num_patch = model.patch_embed.grid_size
    num_window = (num_patch[0] // window[0], num_patch[1] // window[1])
    x = model.patch_embed(x)
    x = model._pos_embed(x)
    x = model.norm_pre(x)
    B, N, C = x.shape
    assert N == num_patch[0] * num_patch[1] + 1
    x = x[:, 1:]
    x = x.view(B, num_window[0], window[0], num_window[1], window[1], C)
    x = x.permute(0, 1, 3, 2, 4, 5).contiguous()
    x = x.view(-1, window[0] * window[1], C)
    cls_token = model.cls_token.expand(x.shape[0], -1, -1)
    x = torch.cat([cls_token, x], dim=1)
    x = model.blocks(x)
    x = model.norm(x)
    x = x[:, model.num_prefix_tokens :]
    x = model.fc_norm(x)
    x = x.view(B, num_window[0], num_window[1], window[0], window[1], C)
    x = model.head(x)
    return x.mean(dim=(3, 4)).permute(0, 3, 1, 2)


AUTHORS = {
    "mae": lambda: _vit(15, global_pool="avg"),  # their setup: class token, average pooling, fc_norm
    "pre_norm": lambda: _vit(16, global_pool="avg", pre_norm=True),  # where norm_pre meets the raw class token
    "token": lambda: _vit(17),  # their global part pools the class token too
    "no_embed_class": lambda: _vit(18, global_pool="avg", no_embed_class=True),
}


@pytest.mark.parametrize(
    "name, window", [("mae", (2, 2)), ("mae", (4, 1)), ("pre_norm", (1, 2)), ("token", (2, 2)), ("no_embed_class", (2, 1))]
)
def test_authors_forward_matches_their_code(name, window):
    vit = AUTHORS[name]()
    x = _images(vit, n=3)
    _, (h, w) = _geometry(vit, x, window)
    kept = torch.ones(3, h, w, dtype=torch.bool)
    kept[1, 0, 0] = kept[2, h - 1, w - 1] = kept[2, 0, 0] = False
    depth = len(vit.blocks)
    with torch.no_grad():
        for split in range(depth if name == "token" else depth + 1):
            srf, lrf = split_vit(vit, window, split, authors=True)
            timm_srf, timm_lrf = split_vit(vit, window, split)
            if split == depth:
                local = srf(x)
                assert torch.equal(local, _authors_srf_only(vit, x, window))
                assert not torch.allclose(local, timm_srf(x), rtol=1e-3, atol=1e-3)
                continue
            features = srf(x)
            assert torch.equal(features, _authors_srf(vit, x, window, split))
            masked = features * kept[:, None]
            logits = lrf(masked, kept)
            assert torch.equal(logits, _authors_lrf(vit, masked, window, split))
            timm_features = timm_srf(x)
            assert not torch.allclose(logits, timm_lrf(timm_features * kept[:, None], kept), rtol=1e-3, atol=1e-3)


def test_authors_a_kept_class_token_summing_to_zero_counts_as_masked_as_in_their_code():
    vit = AUTHORS["mae"]()
    srf, lrf = split_vit(vit, (2, 2), 1, authors=True)
    x = _images(vit, n=2)
    kept = torch.ones(2, 2, 2, dtype=torch.bool)
    with torch.no_grad():
        features = srf(x)
        features[0, : vit.embed_dim, 1, 0] = 0  # kept, but its class token is all zeros
        logits = lrf(features, kept)
        assert torch.equal(logits, _authors_lrf(vit, features, (2, 2), 1))


def test_authors_every_cell_masked_gives_zero_class_token_where_their_code_gives_nan():
    vit = AUTHORS["mae"]()
    srf, lrf = split_vit(vit, (2, 2), 2, authors=True)
    x = _images(vit, n=1)
    none = torch.zeros(1, 2, 2, dtype=torch.bool)
    with torch.no_grad():
        features = srf(x) * 0
        assert _authors_lrf(vit, features, (2, 2), 2).isnan().all()
        logits = lrf(features, none)
        assert logits.isfinite().all()
        # zeros for the class token: the same as a timm model whose cls_token is zero, on zero tokens
        assert torch.equal(logits, split_vit(vit, (2, 2), 2)[1](features, none))


# ------------------------------------------------------------------ bad input


def test_bad_arguments_are_refused_with_what_came():
    vit = _vit(18, depth=2)
    with pytest.raises(TypeError, match="VisionTransformer.*got Conv2d"):
        split_vit(nn.Conv2d(3, 3, 1), (2, 2), 1)
    with pytest.raises(ValueError, match=r"window must divide the token grid: window 3x2 tokens, grid 4x4"):
        split_vit(vit, (3, 2), 1)
    with pytest.raises(ValueError, match=r"window must be a positive int, got 0"):
        split_vit(vit, (0, 2), 1)
    with pytest.raises(ValueError, match=r"split must be an int in \[0, 2\].*got 3"):
        split_vit(vit, (2, 2), 3)
    with pytest.raises(ValueError, match=r"split must be an int in \[0, 2\].*got -1"):
        split_vit(vit, (2, 2), -1)
    with pytest.raises(ValueError, match="pooled head"):
        split_vit(_vit(18, depth=2, global_pool=""), (2, 2), 1)
    with pytest.raises(ValueError, match="authors=True needs a class token"):
        split_vit(_vit(18, depth=2, class_token=False, global_pool="avg"), (2, 2), 1, authors=True)
    with pytest.raises(ValueError, match="authors=True needs a class token"):
        split_vit(_vit(18, depth=2, reg_tokens=1), (2, 2), 1, authors=True)
    with pytest.raises(ValueError, match="authors=True.*global_pool in \\('avg',\\).*'token'"):
        split_vit(vit, (2, 2), 2, authors=True)
    srf, lrf = split_vit(vit, 2, 1)
    assert srf.window == (2, 2) and isinstance(srf, ViTSRF) and isinstance(lrf, ViTLRF)
    with pytest.raises(ValueError, match="takes 32x32 images.*got 32x48"):
        srf(torch.randn(1, 3, 32, 48))
    with pytest.raises(ValueError, match=r"takes images \(B, C, H, W\), got a tensor of shape \(3, 32, 32\)"):
        srf(torch.randn(3, 32, 32))
    with pytest.raises(ValueError, match="whole number of its 8x8 tokens; got 30x32"):
        srf(torch.randn(1, 3, 30, 32))
    features = srf(_images(vit))
    with pytest.raises(TypeError, match="kept must be a bool tensor.*torch.float32"):
        lrf(features, torch.ones(2, 2, 2))
    with pytest.raises(ValueError, match=r"kept must have the shape \(N, h, w\) = \(2, 2, 2\).*\(2, 4\)"):
        lrf(features, torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"features must be \(N, 240, h, w\).*got \(2, 239, 2, 2\)"):
        lrf(features[:, 1:], torch.ones(2, 2, 2, dtype=torch.bool))


def test_a_dynamic_grid_that_the_window_does_not_divide_is_refused_at_the_call():
    srf, _ = split_vit(_vit(19, depth=1, dynamic_img_size=True), (2, 2), 1)
    with pytest.raises(ValueError, match="window must divide the token grid: window 2x2 tokens, grid 3x4 tokens \\(24x32 px\\)"):
        srf(torch.randn(1, 3, 24, 32))
