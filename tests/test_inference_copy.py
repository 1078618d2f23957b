"""The inference copy: the base model as views run through it on the CPU (BatchNorm folded, channels_last)."""

from __future__ import annotations

import copy
import functools
import pickle
import sys

import pytest
import timm
import torch
from conftest import PeakNet, ViewCounter, brute_force_certified, brute_force_grid
from robustwrap.zoo import zoo_entry
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
        assert cache.module(net, x) is net  # built in train mode: the copy would evaluate it in eval mode
        net.global_pool.eval()
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


# ----------------------------------------------------- the copy is used only while provably the same
# Each test changes, after a first certify, state that the model's forward reads, then compares
# the same wrapper with a fresh `wrap` of the model as it is now (which cannot have a stale copy).

GAIN = 1.0  # a global read by `GlobalGain.forward`


def body(bias: float = 0.0, seed: int = 0) -> nn.Sequential:
    """A small BatchNorm CNN of torch.nn layers only (so it gets the copy); its labels are the
    classes' spatial maxima, which vary from image to image. Larger head biases (`bias`) make
    the scale of the features decide labels."""
    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AvgPool2d(3, stride=1, padding=1),
        nn.Conv2d(8, 4, 1),
        nn.AdaptiveMaxPool2d(1),
        nn.Flatten(),
    )
    with torch.no_grad():
        for m in net:
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.3, 0.3)
                m.running_var.uniform_(0.5, 2.0)
        net[7].bias.copy_(torch.linspace(-bias, bias, 4))
    return net.eval()


class Normalised(nn.Module):
    """Normalises in its forward with plain attributes (floats or unregistered tensors)."""

    def __init__(self, mean=0.0, std=1.0):
        super().__init__()
        self.mean, self.std = mean, std
        self.body = body()

    def forward(self, x):
        return self.body((x - self.mean) / self.std)


class TwoHeads(nn.Module):
    """A custom forward that picks its head by a plain attribute."""

    def __init__(self):
        super().__init__()
        self.head = "a"
        self.a, self.b = body(seed=0), body(seed=1)

    def forward(self, x):
        return self.a(x) if self.head == "a" else self.b(x)


class GlobalGain(nn.Module):
    """A custom forward that reads a module-level global."""

    def __init__(self):
        super().__init__()
        self.body = body()

    def forward(self, x):
        return self.body(x * GAIN)


class Shift(nn.Module):
    def __init__(self):
        super().__init__()
        self.offset = 0.0

    def forward(self, x):
        return x + self.offset


OPTIONS = {"patch": 3, "image_size": 16, "num_masks": 3, "batch_size": 16}


def defended_and_labels(net: nn.Module, n: int = 6):
    defended = robustwrap.wrap(net, **OPTIONS).eval()
    x = images(n, size=16, seed=1)
    with torch.no_grad():
        y = net(x).argmax(1)
    return defended, x, y, defended.certify(x, y)


def assert_same_as_fresh(defended, net: nn.Module, x: torch.Tensor, y: torch.Tensor, before) -> None:
    fresh = robustwrap.wrap(net, **OPTIONS).eval()
    want, got = fresh.certify(x, y), defended.certify(x, y)
    # The change matters: the model computes another function than at the first certify.
    assert not torch.equal(want.grid, before.grid)
    assert torch.equal(got.prediction, want.prediction) and torch.equal(got.certified, want.certified)
    assert torch.equal(got.grid, want.grid)
    assert torch.equal(defended.predict(x), fresh.predict(x))
    with torch.no_grad():
        assert torch.equal(defended.predict(x), want.prediction)


def test_a_float_attribute_read_in_forward():
    net = Normalised()
    defended, x, y, before = defended_and_labels(net)
    net.mean, net.std = 2.0, 0.25
    assert_same_as_fresh(defended, net, x, y, before)


@pytest.mark.parametrize("change", ["in_place", "assigned"])
def test_an_unregistered_tensor_attribute_read_in_forward(change):
    net = Normalised(mean=torch.zeros(3, 1, 1), std=torch.ones(3, 1, 1))
    defended, x, y, before = defended_and_labels(net)
    if change == "in_place":
        net.mean.fill_(2.0)
        net.std.fill_(0.25)
    else:
        net.mean, net.std = torch.full((3, 1, 1), 2.0), torch.full((3, 1, 1), 0.25)
    assert_same_as_fresh(defended, net, x, y, before)


def test_an_attribute_that_chooses_the_path_of_a_custom_forward():
    net = TwoHeads()
    defended, x, y, before = defended_and_labels(net)
    net.head = "b"
    assert_same_as_fresh(defended, net, x, y, before)


def test_a_global_read_in_forward(monkeypatch):
    net = GlobalGain()
    defended, x, y, before = defended_and_labels(net)
    monkeypatch.setattr(sys.modules[__name__], "GAIN", -1.0)
    assert_same_as_fresh(defended, net, x, y, before)


def test_a_torch_layer_setting_outside_the_repr():
    # AvgPool2d's repr omits divisor_override: the feature scale changes, and with it the labels.
    net = body(bias=1.0)
    defended, x, y, before = defended_and_labels(net)
    assert type(defended.__dict__["_inference_copy"]._state.module).__name__ == "GraphModule"  # a torch.nn model gets the copy
    net[6].divisor_override = 1
    assert_same_as_fresh(defended, net, x, y, before)


def test_a_forward_hook_added_later():
    net = body()
    defended, x, y, before = defended_and_labels(net)
    handle = net[-1].register_forward_hook(lambda module, inputs, output: -output)
    try:
        assert_same_as_fresh(defended, net, x, y, before)
    finally:
        handle.remove()


def test_a_global_forward_hook_added_later():
    # A global hook that acts on the user's modules only: the copy's modules are others.
    net = body()
    defended, x, y, before = defended_and_labels(net)
    handle = torch.nn.modules.module.register_module_forward_hook(lambda module, inputs, output: -output if module is net[-1] else None)
    try:
        assert_same_as_fresh(defended, net, x, y, before)
    finally:
        handle.remove()


def test_a_module_swapped_in_then_changed():
    net = body()
    defended, x, y, before = defended_and_labels(net)
    net[2] = nn.Sequential(Shift(), nn.ReLU())  # a user class inside a torch.nn model
    defended.certify(x, y)
    net[2][0].offset = -3.0
    assert_same_as_fresh(defended, net, x, y, before)


def test_an_instance_forward():
    net = body()
    defended, x, y, before = defended_and_labels(net)
    net.forward = lambda v: nn.Sequential.forward(net, -v)
    assert_same_as_fresh(defended, net, x, y, before)


def test_what_runs_the_model_itself():
    """The definition, piece by piece: each of these is outside it, so the model runs itself."""
    x = images(2, size=16)
    cases = {
        "user class": Normalised(),
        "submodule in train mode": body(),
        "bound method attribute": body(),
        "closure attribute": body(),
        "user object attribute": body(),
    }
    cases["submodule in train mode"][1].train()
    cases["bound method attribute"][6].pick = cases["bound method attribute"].forward
    scale = 2.0
    cases["closure attribute"][6].pick = lambda v: v * scale
    cases["user object attribute"][6].pick = Shift  # a class from user code
    with torch.no_grad():
        baseline = body()
        assert InferenceCopy().module(baseline, x) is not baseline  # the same model without the change gets a copy
        for name, net in cases.items():
            assert InferenceCopy().module(net, x) is net, name
        plain = body()
        plain[6].note = {"mean": (0.5, torch.zeros(2)), "act": torch.relu, "norm": functools.partial(nn.LayerNorm, eps=1e-6)}
        assert InferenceCopy().module(plain, x) is not plain  # plain data and library code are inside it


@pytest.mark.parametrize("name", ["timm:resnet18", "torchvision:resnet18"])
def test_timm_and_torchvision_models_get_the_copy(name):
    library, arch = name.split(":")
    torch.manual_seed(0)
    if library == "timm":
        net = timm.create_model(arch, num_classes=4).eval()
    else:
        import torchvision  # a dependency of robustwrap: a missing one fails here, it is not skipped

        net = getattr(torchvision.models, arch)(num_classes=4).eval()
    x = images(2, size=32)
    with torch.no_grad():
        fast = InferenceCopy().module(net, x)
        assert type(fast).__name__ == "GraphModule"
        assert torch.allclose(fast(x), net(x), atol=1e-4, rtol=1e-4)


# Hub-backed entries need the network; a PatchCURE ViT split runs the ViT's own blocks, window by
# window, as token dropping does: no inference copy stands in for its parts.
@pytest.mark.parametrize("name", [n for n in robustwrap.list_models() if zoo_entry(n).get("embedded") and zoo_entry(n).get("split") is None])
def test_zoo_models_certify_through_the_copy(name):
    defended = robustwrap.create_model(name).eval()
    x = torch.rand(2, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    defended.certify(x, defended.predict(x))
    assert defended.__dict__["_inference_copy"]._state.module is not None
