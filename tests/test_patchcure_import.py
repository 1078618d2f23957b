"""`robustwrap import --format patchcure`: the PatchCURE authors' ViT-SRF checkpoints.

The checkpoints are fabricated here as their code saves them (inspire-group/PatchCURE: timm's
training script, `{"state_dict": ...}`; a split model is `nn.Sequential(pre, post)` of their
`utils/split.py`), on a tiny timm ViT. Their forward is transcribed below from their
`utils/vit_srf.py` and `utils/split.py`, and every view of the imported model is compared with it.
"""

from __future__ import annotations

import itertools
import json

import pytest
import timm
import torch
from torch import nn

import robustwrap
from robustwrap.cli import main
from robustwrap.convert import import_checkpoint

SIZE, PATCH_PX = 96, 16  # test_vit at 96 px: a 6x6 token grid, 6 blocks of width 64
WINDOW = (2, 1)  # a 3x6 grid of cells; an 8 px patch: masks of 2x2 cells, no two of which mask every cell


def _vit(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    vit = timm.create_model("test_vit", img_size=SIZE, global_pool="avg", num_classes=5).eval()
    with torch.no_grad():  # random LayerNorm affines, so that a norm applied in the wrong place shows
        for module in vit.modules():
            if isinstance(module, nn.LayerNorm):
                module.weight.normal_(1.0, 0.3)
                module.bias.normal_(0.0, 0.3)
        vit.cls_token.normal_()
    return vit


# --------------------------------------------------------------------- their code, transcribed
def _their_srf_only(vit: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """utils/vit_srf.py `VisionTransformer_SRF.forward` with `return_features=True`: local logits (B, classes, nh, nw)."""
    (wh, ww), n = WINDOW, SIZE // PATCH_PX
    nw = (n // wh, n // ww)
    x = vit.norm_pre(vit._pos_embed(vit.patch_embed(x)))
    b, _, c = x.shape
    x = x[:, 1:].view(b, nw[0], wh, nw[1], ww, c).permute(0, 1, 3, 2, 4, 5).contiguous().view(-1, wh * ww, c)
    x = torch.cat([vit.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
    x = vit.norm(vit.blocks(x))[:, 1:]
    x = vit.head(vit.fc_norm(x).view(b, nw[0], nw[1], wh, ww, c))
    return x.mean(dim=(3, 4)).permute(0, 3, 1, 2)


class _Pre(nn.Module):
    """utils/split.py `ViTSRFPreModelWrapper` (the attributes in their order, so the state dict's keys are theirs)."""

    def __init__(self, vit: nn.Module, pre_layers: list[nn.Module]):
        super().__init__()
        self.pre_layers = nn.Sequential(*pre_layers)
        self.pos_embed = vit.pos_embed
        self.cls_token = vit.cls_token
        self.vit = [vit]  # not a submodule: their wrapper holds no reference to the model

    def forward(self, x):
        (wh, ww), n = WINDOW, SIZE // PATCH_PX
        nw = (n // wh, n // ww)
        x = self.pre_layers[0](x)
        x = x.flatten(1, 2) if x.ndim == 4 else x  # this timm's test_vit embeds to (B, h, w, C); theirs flattened
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1) + self.pos_embed
        x = self.pre_layers[1](x)
        b, _, c = x.shape
        x = x[:, 1:].view(b, nw[0], wh, nw[1], ww, c).permute(0, 1, 3, 2, 4, 5).contiguous().view(-1, wh * ww, c)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        for layer in self.pre_layers[2:]:
            x = layer(x)
        return x.view(b, nw[0], nw[1], (1 + wh * ww) * c).permute(0, 3, 1, 2)


class _Post(nn.Module):
    """utils/split.py `ViTPostModelWrapper` in eval mode."""

    def __init__(self, post_layers: list[nn.Module]):
        super().__init__()
        self.post_layers = nn.Sequential(*post_layers)

    def forward(self, x):
        (wh, ww), n = WINDOW, SIZE // PATCH_PX
        nw = (n // wh, n // ww)
        x = x.permute(0, 2, 3, 1)
        b = x.shape[0]
        x = x.reshape(b, nw[0], nw[1], 1 + wh * ww, -1)
        c = x.shape[-1]
        cls_token = x[:, :, :, 0].clone()
        cls_token[torch.sum(cls_token, dim=-1) == 0] = torch.nan  # a masked window's class token is all 0
        cls_token = torch.nanmean(cls_token, dim=(1, 2)).view(b, 1, c)
        x = x[:, :, :, 1:].reshape(b, nw[0], nw[1], wh, ww, -1).permute(0, 1, 3, 2, 4, 5).contiguous().view(b, n * n, c)
        x = torch.cat((cls_token, x), dim=1)
        for layer in self.post_layers[:-2]:
            x = layer(x)
        x = x[:, 1:].mean(dim=1)
        return self.post_layers[-1](self.post_layers[-2](x))


def _their_split(vit: nn.Module, k: int) -> nn.Sequential:
    """utils/split.py `split_vit_like`: children before the blocks + blocks [0, k); blocks [k, depth) + children after."""
    children = list(vit.children())
    i = next(i for i, m in enumerate(children) if isinstance(m, nn.Sequential))
    blocks = list(children[i].children())
    return nn.Sequential(_Pre(vit, children[:i] + blocks[:k]), _Post(blocks[k:] + children[i + 1 :])).eval()


def _cell_masks(model) -> list[torch.Tensor]:
    """`(h, w)` float, 0 inside each feature mask: their SecureLayer's masks, from the boxes of the imported model."""
    masks = []
    for top, left, bh, bw in model.feature_mask_set.boxes:
        mask = torch.ones(model.feature_mask_set.image_size)
        mask[top : top + bh, left : left + bw] = 0
        masks.append(mask)
    return masks


# ------------------------------------------------------------------------------------ tests
def test_their_split_checkpoint_imports_to_their_function_in_every_view(tmp_path):
    vit = _vit()
    theirs = _their_split(vit, 3)
    keys = list(theirs.state_dict())  # fc_norm at depth - k + 1, the head at depth - k + 3
    assert keys[:3] == ["0.pos_embed", "0.cls_token", "0.pre_layers.0.proj.weight"] and "0.pre_layers.4.norm1.weight" in keys
    assert {"1.post_layers.4.weight", "1.post_layers.6.weight"} <= set(keys) and "1.post_layers.5.weight" not in keys
    path = tmp_path / "vitsrf2x1_split3_masked.pth.tar"
    torch.save({"epoch": 9, "arch": "vitsrf2x1_split3", "state_dict": theirs.state_dict()}, path)
    model = import_checkpoint(path, "patchcure", model="test_vit", image_size=SIZE, patch=PATCH_PX // 2)
    assert (model.window, model.split, model.authors, model.mask_stride) == (WINDOW, 3, True, (1, 1))
    assert model.settings()["forward"] == "patchcure-authors" and model.pretrained_info["source"]["format"] == "patchcure"
    x = torch.randn(3, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    masks = _cell_masks(model)
    full = model.certify(x, torch.zeros(3, dtype=torch.long), early_exit=False).grid
    with torch.no_grad():
        features = theirs[0](x)
        for i, j in itertools.product(range(len(masks)), repeat=2):
            logits = theirs[1](features * (masks[i] * masks[j]))
            kept = (masks[i] * masks[j]).bool().expand(3, -1, -1)
            ours = model.lrf(model.srf(x) * kept[:, None], kept)
            torch.testing.assert_close(ours, logits, rtol=1e-5, atol=1e-5)
            assert torch.equal(full[:, i, j], logits.argmax(1))
    # timm's own forward is another function: the import is not a plain timm ViT
    assert not torch.allclose(model.lrf(model.srf(x), torch.ones(3, 3, 6, dtype=torch.bool)), vit(x), atol=1e-3)


def test_their_srf_only_checkpoint_imports_to_their_local_logits_and_round_trips(tmp_path, capsys):
    vit = _vit(seed=2)
    path = tmp_path / "vitsrf2x1_masked.pth.tar"
    torch.save({"epoch": 1, "state_dict": vit.state_dict()}, path)
    out = tmp_path / "cure"
    argv = ["import", path, "--format", "patchcure", "--model", "test_vit", "--image-size", SIZE, "--patch", "8", "--out", out]
    assert main([str(a) for a in argv]) == 0
    assert "patchcure: window 2x1 tokens, split 6" in capsys.readouterr().out
    model = robustwrap.from_pretrained(str(out))
    config = json.loads((out / "config.json").read_text())
    assert config["robustwrap"]["forward"] == "patchcure-authors" and config["robustwrap"]["info"]["source"]["format"] == "patchcure"
    assert (model.window, model.split, model.authors, model.lrf) == (WINDOW, 6, True, None)
    x = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(model.srf(x), _their_srf_only(vit, x), rtol=1e-5, atol=1e-5)
        local = _their_srf_only(vit, x).double()
    # their SecurePooling: one- and two-mask logits are sums of the kept local logits
    grid = model.certify(x, torch.zeros(2, dtype=torch.long), early_exit=False).grid
    masks = _cell_masks(model)
    for i, j in itertools.product(range(len(masks)), repeat=2):
        assert torch.equal(grid[:, i, j], (local * (masks[i] * masks[j]).double()).sum((2, 3)).argmax(1))


def test_a_saved_import_keeps_the_authors_forward_and_settings_without_it_stay_as_they_were(tmp_path):
    vit = _vit()
    path = tmp_path / "vitsrf2x1_split3_vanilla.pth.tar"
    torch.save({"state_dict": _their_split(vit, 3).state_dict()}, path)
    model = import_checkpoint(path, "patchcure", model="test_vit", image_size=SIZE, patch=8)
    model.save_pretrained(tmp_path / "saved")
    loaded = robustwrap.from_pretrained(str(tmp_path / "saved"))
    assert loaded.settings() == model.settings() and loaded.authors
    x = torch.randn(2, 3, SIZE, SIZE)
    assert torch.equal(loaded(x), model(x))
    plain = robustwrap.wrap(_vit(), patch=8, defense="patchcure", window=WINDOW, split=3)
    assert "forward" not in plain.settings() and not plain.authors
    with pytest.raises(AttributeError, match="authors chooses the function the weights compute"):
        plain.authors = True
    rewrapped = robustwrap.wrap(plain.model, patch=8, defense="patchcure", window=WINDOW, split=3, authors=True)
    assert rewrapped.settings() == model.settings() and torch.equal(rewrapped(x), model(x))


@pytest.mark.parametrize(
    ("name", "state", "message"),
    [
        ("vitsrf2x1_split4_masked.pth.tar", lambda: _their_split(_vit(), 3).state_dict(), "names split 4, but its weights hold 3"),
        (
            "vitsrf2x1_split3_masked.pth.tar",
            lambda: {"0.pos_embed": torch.zeros(1), "1.mystery.0.weight": torch.zeros(1)},
            "not the PatchCURE authors' split layout",
        ),
    ],
)
def test_a_checkpoint_that_is_not_theirs_is_refused(tmp_path, name, state, message):
    torch.save({"state_dict": state()}, tmp_path / name)
    with pytest.raises(ValueError, match=message):
        import_checkpoint(tmp_path / name, "patchcure", model="test_vit", image_size=SIZE, patch=8)
