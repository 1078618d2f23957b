"""The inference copy: the base model as views run through it on the CPU (BatchNorm folded, channels_last)."""

from __future__ import annotations

import copy
import pickle

import pytest
import timm
import torch
from conftest import PeakNet, ViewCounter, brute_force_certified, brute_force_grid
from torch import nn

import robustwrap
from robustwrap import MaskSet
from robustwrap.views import InferenceCopy, build_inference_copy, observe_forward


def resnet(num_classes: int = 5, in_chans: int = 3, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    net = timm.create_model("test_resnet", num_classes=num_classes, in_chans=in_chans).eval()
    # Non-trivial BatchNorm statistics, so folding them is not an identity.
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    return net


def images(n: int = 4, size: int = 32, seed: int = 0, chans: int = 3) -> torch.Tensor:
    return torch.randn(n, chans, size, size, generator=torch.Generator().manual_seed(seed))


def test_the_copy_folds_batchnorm_and_computes_the_models_function():
    net = resnet()
    x = images()
    fast = build_inference_copy(net)
    assert fast is not None and fast is not net
    assert not any(type(m) is nn.BatchNorm2d for m in fast.modules())
    assert any(type(m) is nn.BatchNorm2d for m in net.modules())  # the user's model is untouched
    assert all(p.is_contiguous() for p in net.parameters())
    assert all(p.is_contiguous(memory_format=torch.channels_last) for p in fast.parameters() if p.ndim == 4)
    with torch.no_grad():
        assert torch.allclose(fast(x), net(x), atol=1e-4, rtol=1e-4)
    assert build_inference_copy(PeakNet()) is None  # a single convolution: nothing to gain


def test_the_copy_is_kept_and_rebuilt_whenever_the_model_changes():
    net = resnet()
    x = images()
    cache = InferenceCopy()
    with torch.no_grad():
        first = cache.module(net, x)
        assert first is not net and cache.module(net, x) is first  # kept between calls

        # A change through .data bumps no version counter: the values themselves are compared.
        net.fc.weight.data.mul_(2)
        second = cache.module(net, x)
        assert second is not first
        assert torch.allclose(second(x), net(x), atol=1e-4, rtol=1e-4)

        net.load_state_dict(resnet(seed=1).state_dict())
        third = cache.module(net, x)
        assert third is not second and torch.allclose(third(x), net(x), atol=1e-4, rtol=1e-4)

        net.global_pool = timm.layers.SelectAdaptivePool2d(pool_type="max", flatten=True)  # a new module
        fourth = cache.module(net, x)
        assert fourth is not third and torch.allclose(fourth(x), net(x), atol=1e-4, rtol=1e-4)

        net.conv1[0].stride = (1, 1)  # a hyperparameter (in the repr)
        fifth = cache.module(net, x)
        assert fifth is not fourth and torch.allclose(fifth(x), net(x), atol=1e-4, rtol=1e-4)

        other = resnet(seed=2)  # another model of the same structure and no change of values
        assert cache.module(other, x) is not fifth


def test_hooks_gradients_and_train_mode_run_the_model_itself():
    net = resnet()
    x = images()
    cache = InferenceCopy()
    with torch.no_grad():
        counter = ViewCounter(net.layer1)
        assert cache.module(net, x) is net  # a hooked model must see every view
        counter.remove()
        assert cache.module(net, x) is not net
        net.train()
        assert cache.module(net, x) is net
        net.eval()
    assert cache.module(net, x) is net  # gradients enabled: the model itself, for autograd


def test_a_copy_that_disagrees_with_the_model_is_discarded(monkeypatch):
    from robustwrap import views

    net = resnet()
    x = images()

    def broken(model):  # a copy that computes something else
        fast = copy.deepcopy(model)
        with torch.no_grad():
            fast.fc.bias.add_(1.0)
        return fast

    monkeypatch.setattr(views, "build_inference_copy", broken)
    with torch.no_grad():
        assert InferenceCopy().module(net, x) is net


def test_certify_through_the_copy_matches_brute_force_on_the_model():
    net = resnet(num_classes=4)
    ms = MaskSet.square(32, 5, num_masks=3)
    x = images(6)
    defended = robustwrap.wrap(net, mask_set=ms, batch_size=16).eval()
    with torch.no_grad():
        y = net(x).argmax(1)
    y[::3] = (y[::3] + 1) % 4  # some wrong labels, so uncertified images occur too
    result = defended.certify(x, y, early_exit=False)
    assert type(defended.__dict__["_inference_copy"]._state.module).__name__ == "GraphModule"  # it ran the copy
    grid = brute_force_grid(net, x, ms.boxes)
    for b in range(x.shape[0]):
        upper = torch.triu(torch.ones(len(ms), len(ms), dtype=torch.bool))
        assert torch.equal(result.grid[b][upper], grid[b][upper])
        assert bool(result.certified[b]) == brute_force_certified(grid[b].tolist(), int(y[b]))
    assert 0 < int(result.certified.sum()) < x.shape[0]


@pytest.mark.parametrize("defense", ["patchcleanser", "smoothing"])
def test_results_and_view_counts_are_those_of_the_model_itself(defense):
    net = resnet(num_classes=4)
    options = {"patch": 5, "image_size": 32, "num_masks": 3} if defense == "patchcleanser" else {"patch": 5, "image_size": 32, "size": 8}
    defended = robustwrap.wrap(net, defense=defense, batch_size=16, **options).eval()
    x = images(5)
    with torch.no_grad():
        y = net(x).argmax(1)
    fast = defended.certify(x, y)
    fast_pred = defended.predict(x)
    counter = ViewCounter(net)  # a hook: the model runs itself
    plain = defended.certify(x, y)
    assert counter.images > 0
    assert torch.equal(fast.prediction, plain.prediction) and torch.equal(fast.certified, plain.certified)
    assert torch.equal(fast.num_views, plain.num_views)
    assert torch.equal(fast_pred, defended.predict(x))


def test_observers_see_every_view_of_the_copy():
    net = resnet(num_classes=4)
    defended = robustwrap.wrap(net, patch=5, image_size=32, num_masks=3, batch_size=16).eval()
    x = images(3)
    seen = []
    with observe_forward(seen.append):
        result = defended.certify(x, net(x).argmax(1).detach())
    assert sum(seen) == int(result.num_views.sum()) and max(seen) <= 16
    assert defended.__dict__["_inference_copy"]._state.module is not None


def test_the_copy_is_neither_saved_nor_pickled_nor_shared_by_deep_copies():
    net = resnet(num_classes=4)
    defended = robustwrap.wrap(net, patch=5, image_size=32, num_masks=3).eval()
    x = images(2)
    defended.predict(x)
    assert defended.__dict__["_inference_copy"]._state is not None
    assert not any("inference" in key for key in defended.state_dict())
    clone = copy.deepcopy(defended)
    assert clone.__dict__["_inference_copy"]._state is None
    restored = pickle.loads(pickle.dumps(defended))
    assert restored.__dict__["_inference_copy"]._state is None
    assert torch.equal(restored.predict(x), defended.predict(x))
