"""Base models inside the wrappers users put around them: `torch.compile`, DataParallel, DistributedDataParallel.

Whatever a defense reads from its base model (classes, channels, timm's data config, a ViT's
token grid, the saved weights) is read from the model inside every wrapper (`robustwrap._unwrap`),
while forward passes go through the wrapper: a compiled model runs compiled. The compiled models
here use a backend that counts the calls of the compiled code, which proves they ran it, and runs
the captured graph eagerly, so results equal the uncompiled model's exactly and compiling takes
well under a second.
"""

from __future__ import annotations

import pytest
import timm
import torch
from torch import nn
from torch.nn.parallel import DataParallel, DistributedDataParallel
from torch.utils.data import DataLoader, TensorDataset

import robustwrap
import robustwrap.models  # registers the BagNets with timm
from robustwrap._unwrap import local_module, unwrap
from robustwrap.defenses.smoothing import RandomAblation
from robustwrap.fit import fit_masking


class Compiled:
    """`torch.compile` with a backend that counts the calls of the code it compiled (and those without gradients)."""

    def __init__(self) -> None:
        self.calls = self.no_grad_calls = 0

    def backend(self, graph: torch.fx.GraphModule, example_inputs) -> object:
        def run(*args):
            self.calls += 1
            self.no_grad_calls += not torch.is_grad_enabled()
            return graph.forward(*args)

        return run

    def __call__(self, model: nn.Module) -> nn.Module:
        torch._dynamo.reset()  # no graph compiled by another test (same code, same guards) is reused
        return torch.compile(model, backend=self.backend, dynamic=True)


def cnn() -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model("test_resnet", num_classes=3, in_chans=1).eval()


def vit() -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model("test_vit", num_classes=3, img_size=32, patch_size=8).eval()


MODELS = {"cnn": (cnn, 1), "vit": (vit, 3)}


def batch(channels: int, n: int = 3, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, channels, 32, 32, generator=g), torch.arange(n) % 3


def test_unwrap_reads_through_nested_wrappers_and_local_module_leaves_out_only_ddp(group):
    net = cnn()
    compiled = torch.compile(net, backend="eager")
    assert unwrap(net) is net and local_module(net) is net
    for wrapper in (compiled, DataParallel(net), DataParallel(compiled), torch.compile(DataParallel(net), backend="eager")):
        assert unwrap(wrapper) is net and local_module(wrapper) is wrapper  # runs compiled / on its devices
    ddp = DistributedDataParallel(net)
    assert unwrap(ddp) is net and local_module(ddp) is net
    outer = DistributedDataParallel(compiled)
    assert unwrap(outer) is net and local_module(outer) is compiled  # the compiled module is this process's own
    inner = torch.compile(DistributedDataParallel(net), backend="eager")
    assert unwrap(inner) is net and local_module(inner) is net  # compiled around DDP: only the bare model is local


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_a_compiled_timm_model_certifies_and_trains_through_its_compiled_code(kind, tmp_path):
    """timm's data config used to fail on a compiled model (`ResNet does not support len()`).

    One test per model: each mode (inference, training) compiles once, which takes seconds.
    """
    build, channels = MODELS[kind]
    x, y = batch(channels)
    loader = DataLoader(TensorDataset(*batch(channels, n=4, seed=2)), batch_size=2)
    net, compiled = build(), Compiled()
    plain = robustwrap.wrap(build(), patch=5, image_size=32).eval()
    defended = robustwrap.wrap(compiled(net), patch=5, image_size=32).eval()
    assert (defended.num_classes, defended.in_chans) == (3, channels) and defended.settings() == plain.settings()

    def certify_both() -> torch.Tensor:
        before = compiled.calls
        got, want = defended.certify(x, y, early_exit=False), plain.certify(x, y, early_exit=False)
        assert compiled.calls > before  # the views ran through the compiled code
        assert torch.equal(got.one_mask, want.one_mask) and torch.equal(got.certified, want.certified)
        assert torch.equal(got.prediction, want.prediction) and torch.equal(defended.predict(x), plain.predict(x))
        return got.one_mask

    first = certify_both()
    with torch.no_grad():  # never replaced by an inference copy, which would run the views eagerly
        assert defended._inference_model(x) is defended.model
        assert (plain._inference_model(x) is not plain.model) == (kind == "cnn")  # a bare CNN's views run through its copy
        for model in (net, plain.model):  # weights changed in place after compiling show at once
            model.get_classifier().weight.mul_(-1)
    assert not torch.equal(certify_both(), first)

    # fit_masking: the searches and the training steps run the compiled code, as the uncompiled model trains
    for model, folder in ((plain, None), (defended, tmp_path)):
        torch.manual_seed(3)  # the share of clean images is drawn at random
        before = compiled.calls, compiled.no_grad_calls
        fit_masking(model, loader, epochs=1, lr=0.05, progress=False, checkpoint_dir=folder)
    assert compiled.no_grad_calls > before[1] and compiled.calls - compiled.no_grad_calls > before[0] - before[1]
    for (name, a), b in zip(plain.model.state_dict().items(), net.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6), name
    defended.eval(), plain.eval()
    certify_both()
    # the checkpoint holds the model's own keys: it resumes into the bare model
    resumed = build()
    fit_masking(robustwrap.wrap(resumed, patch=5, image_size=32), loader, epochs=1, progress=False, checkpoint_dir=tmp_path, resume=True)
    assert all(torch.equal(a, b) for a, b in zip(resumed.state_dict().values(), net.state_dict().values()))


SMOOTHING = {"defense": "smoothing", "patch": 5, "ablation": "column", "size": 6}


def test_data_parallel_keeps_token_dropping_on():
    """`m.model = nn.DataParallel(vit)` used to turn token dropping off (drop_tokens=None: on for a ViT)."""
    x, y = batch(3, n=4)
    plain = robustwrap.wrap(vit(), **SMOOTHING).eval()
    want = plain.certify(x, y, early_exit=False)
    assigned = robustwrap.wrap(vit(), **SMOOTHING).eval()
    assigned.model = DataParallel(assigned.model)
    wrapped = robustwrap.wrap(DataParallel(vit()), **SMOOTHING).eval()
    for defended in (assigned, wrapped):
        assert defended.drop_tokens and defended.settings() == plain.settings()
        got = defended.certify(x, y, early_exit=False)
        assert torch.equal(got.counts, want.counts) and torch.equal(got.certified, want.certified)
        assert torch.equal(defended.predict(x), plain.predict(x))
    # training views drop the same tokens through the wrapper
    augment = RandomAblation.from_model(plain)
    views, view = augment(x, return_indices=True)
    with torch.no_grad():
        assert torch.equal(augment.logits(DataParallel(plain.model), views, view), augment.logits(plain.model, views, view))


def bagnet() -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model("bagnet_tiny", num_classes=3, in_chans=1).eval()  # declares receptive_field 5, stride 2


DEFENSES = {
    "patchcleanser": (cnn, 1, {"patch": 5, "image_size": 32}),
    "patchguard": (bagnet, 1, {"defense": "patchguard", "patch": 5}),
    "smoothing": (vit, 3, SMOOTHING),
}


@pytest.mark.parametrize("defense", sorted(DEFENSES))
def test_a_data_parallel_base_model_gives_the_same_defended_model(defense):
    """Classes, channels, PatchGuard's declared geometry, timm's config and the results fingerprint
    are read through the wrapper, which has none of them."""
    from robustwrap.dataset import model_fingerprint

    build, channels, options = DEFENSES[defense]
    x, y = batch(channels, n=4)
    plain = robustwrap.wrap(build(), **options).eval()
    wrapped = robustwrap.wrap(DataParallel(build()), **options).eval()
    assert wrapped.settings() == plain.settings() and (wrapped.num_classes, wrapped.in_chans) == (3, channels)
    assert model_fingerprint(wrapped) == model_fingerprint(plain)
    got, want = wrapped.certify(x, y), plain.certify(x, y)
    assert torch.equal(got.prediction, want.prediction) and torch.equal(got.certified, want.certified)
    assert torch.equal(wrapped.predict_vanilla(x), plain.predict_vanilla(x))


def test_a_compiled_vit_drops_tokens_and_saves_its_own_keys(tmp_path):
    from safetensors.torch import load_file

    x, y = batch(3, n=4)
    plain = robustwrap.wrap(vit(), **SMOOTHING).eval()
    defended = robustwrap.wrap(Compiled()(vit()), **SMOOTHING).eval()
    assert defended.drop_tokens
    got, want = defended.certify(x, y, early_exit=False), plain.certify(x, y, early_exit=False)
    assert torch.equal(got.counts, want.counts)
    defended.save_pretrained(tmp_path / "compiled")
    plain.save_pretrained(tmp_path / "plain")
    keys = set(load_file(tmp_path / "compiled" / "model.safetensors"))
    assert keys == set(load_file(tmp_path / "plain" / "model.safetensors")) and not any(k.startswith("_orig_mod.") for k in keys)
    loaded = robustwrap.from_pretrained(str(tmp_path / "compiled"))
    assert loaded.settings() == plain.settings()
    assert torch.equal(loaded.certify(x, y, early_exit=False).counts, want.counts)


def test_token_dropping_views_refuse_a_ddp_inside_a_compiled_model(group):
    plain = robustwrap.wrap(vit(), **SMOOTHING)
    augment = RandomAblation.from_model(plain)
    views, view = augment(torch.randn(2, 3, 32, 32), return_indices=True)
    with pytest.raises(TypeError, match="would not synchronise their gradients"):
        augment.logits(torch.compile(DistributedDataParallel(plain.model), backend="eager"), views, view)


def test_the_attack_reads_and_counts_through_a_data_parallel_model():
    """The valid input range comes from the ViT's timm config, and the token-dropping views are counted."""
    x, y = batch(3, n=2)
    results = []
    for model in (vit(), DataParallel(vit())):
        defended = robustwrap.wrap(model, **SMOOTHING).eval()
        options = {"steps": 2, "restarts": 1, "locations": ("guided", 2), "progress": False}
        results.append(robustwrap.attack(defended, x, y, generator=torch.Generator().manual_seed(0), **options))
    plain, wrapped = results
    assert torch.equal(wrapped.x_adv, plain.x_adv) and torch.equal(wrapped.prediction, plain.prediction)
    assert (wrapped.forward_passes, wrapped.num_views) == (plain.forward_passes, plain.num_views) and plain.num_views > 0
