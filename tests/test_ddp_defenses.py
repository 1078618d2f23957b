"""Defenses whose base model the user wrapped in DistributedDataParallel (`m.model` is the wrapper).

Everything a defense derives from its model (PatchGuard's geometry, a ViT's token grid,
`num_classes`, `in_chans`, timm's data config) is read from the module inside the wrapper, which
alone has those attributes; training still goes through the wrapper. One process of a gloo
group, in this process: the wrapper's behaviour, not the communication, is what is tested here
(tests/test_fit_distributed.py runs two processes).
"""

from __future__ import annotations

import pytest
import timm
import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, TensorDataset

import robustwrap
import robustwrap.models
from robustwrap.fit import fit_masking


def bagnet() -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model("bagnet_tiny", num_classes=3, in_chans=1).eval()  # declares receptive_field 5, stride 2


def vit() -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model("test_vit", num_classes=3, img_size=32, patch_size=8).eval()


CASES = {
    "patchguard": (bagnet, (1, 32, 32), {"defense": "patchguard", "patch": 5}),
    "smoothing": (vit, (3, 32, 32), {"defense": "smoothing", "patch": 5, "ablation": "column", "size": 6, "drop_tokens": True}),
}


def same(a: robustwrap.RobustPatchClassifier, b: robustwrap.RobustPatchClassifier, x: torch.Tensor, y: torch.Tensor) -> None:
    assert a.settings() == b.settings()
    assert (a.num_classes, a.in_chans) == (b.num_classes, b.in_chans)
    assert torch.equal(a.predict(x), b.predict(x))
    with torch.no_grad():
        assert torch.equal(a(x), b(x))
    ra, rb = a.certify(x, y), b.certify(x, y)
    assert torch.equal(ra.certified, rb.certified) and torch.equal(ra.prediction, rb.prediction)


@pytest.mark.parametrize("defense", sorted(CASES))
def test_a_base_model_in_ddp_gives_the_same_defended_model(group, defense):
    build, shape, options = CASES[defense]
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(4, *shape, generator=g), torch.tensor([0, 1, 2, 0])
    plain = robustwrap.wrap(build(), **options).eval()
    wrapped = robustwrap.wrap(DistributedDataParallel(build()), **options)
    assert isinstance(wrapped.model, DistributedDataParallel) and not wrapped.training  # the mode of the model inside
    same(wrapped, plain, x, y)
    assigned = robustwrap.wrap(build(), **options).eval()
    assigned.model = DistributedDataParallel(assigned.model)  # checked and re-derived on assignment as at wrap
    same(assigned, plain, x, y)
    if defense == "patchguard":  # the geometry is the BagNet's own declaration, read through the wrapper
        assert wrapped.receptive_field == (5, 5) and wrapped.feature_stride == (2, 2)
    else:  # the ViT's token grid: 4x4 tokens of 8 px, views keep 2 token columns of 6 px bands
        assert wrapped.drop_tokens is True and wrapped._token_grid() == plain._token_grid() is not None


@pytest.mark.parametrize("defense", sorted(CASES))
def test_fit_masking_trains_a_defended_model_whose_base_is_in_ddp(group, defense):
    build, shape, options = CASES[defense]
    if defense == "smoothing":
        options = {**options, "drop_tokens": False}  # a user's own DDP forward keeps every token (fit_masking says so otherwise)
    g = torch.Generator().manual_seed(2)
    data = TensorDataset(torch.randn(4, *shape, generator=g), torch.tensor([0, 1, 2, 0]))
    net = build()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    defended = robustwrap.wrap(DistributedDataParallel(net), **options)
    calls = []
    defended.model.register_forward_pre_hook(lambda module, args: calls.append(args[0].shape[0]))
    loader = DataLoader(data, batch_size=4, sampler=torch.utils.data.DistributedSampler(data, shuffle=False))
    history = fit_masking(defended, loader, epochs=1, lr=0.1, progress=False)
    assert history.epochs[0].steps == 1 and calls == [4]  # one step, through the wrapper
    assert any(not torch.equal(before[k], v) for k, v in net.state_dict().items())


def test_token_dropping_training_through_a_users_ddp_is_refused(group):
    build, shape, options = CASES["smoothing"]
    data = TensorDataset(torch.randn(2, *shape), torch.tensor([0, 1]))
    defended = robustwrap.wrap(DistributedDataParallel(build()), **options)
    loader = DataLoader(data, batch_size=2, sampler=torch.utils.data.DistributedSampler(data, shuffle=False))
    with pytest.raises(ValueError, match=r"cannot train the views of strategy .random_ablation. \(token-dropping views"):
        fit_masking(defended, loader, epochs=1, lr=0.1, progress=False)


def test_token_dropping_views_refuse_a_ddp_they_would_bypass(group):
    from robustwrap.defenses.smoothing import RandomAblation

    build, shape, options = CASES["smoothing"]
    defended = robustwrap.wrap(build(), **options)
    augment = RandomAblation.from_model(defended)
    views, view = augment(torch.randn(2, *shape), return_indices=True)
    assert augment.logits(defended.model, views, view).shape == (2, 3)
    with pytest.raises(TypeError, match="would not synchronise their gradients"):
        augment.logits(DistributedDataParallel(defended.model), views, view)


@pytest.mark.parametrize("defense", sorted(CASES))
def test_results_fingerprint_and_saved_folder_are_the_models_not_the_wrappers(group, defense, tmp_path):
    """A defended model whose base is in DistributedDataParallel certifies, fingerprints and saves
    as the model inside: the same results fingerprint and a folder with the model's own keys (no
    `module.` prefix) that loads back to the same defended model."""
    from safetensors.torch import load_file

    from robustwrap.dataset import model_fingerprint

    build, shape, options = CASES[defense]
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(4, *shape, generator=g), torch.tensor([0, 1, 2, 0])
    plain = robustwrap.wrap(build(), **options).eval()
    wrapped = robustwrap.wrap(DistributedDataParallel(build()), **options).eval()
    assert model_fingerprint(wrapped) == model_fingerprint(plain)
    wrapped.save_pretrained(tmp_path / "wrapped")
    plain.save_pretrained(tmp_path / "plain")
    keys = set(load_file(tmp_path / "wrapped" / "model.safetensors"))
    assert keys == set(load_file(tmp_path / "plain" / "model.safetensors")) and not any(k.startswith("module.") for k in keys)
    same(robustwrap.from_pretrained(str(tmp_path / "wrapped")), plain, x, y)
