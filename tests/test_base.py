"""The defense contract (robustwrap.defenses.base): one source of truth for settings, precision,
ordinary output tensors, input checks and warnings, wrap dispatch, settings round trips."""

from __future__ import annotations

import copy
import json
import math
import subprocess
import sys
import warnings

import pytest
import timm
import torch
from conftest import PeakNet, ViewCounter, brute_force_decide, brute_force_grid
from torch import nn

import robustwrap
from robustwrap import MaskSet, PatchCleanser, RobustPatchClassifier


def make(seed=0, **kwargs):
    net = PeakNet(seed=seed)
    kwargs.setdefault("patch", 3)
    kwargs.setdefault("num_masks", 4)
    kwargs.setdefault("image_size", 16)
    return robustwrap.wrap(net, **kwargs).eval(), net


def images(n=12, seed=0, size=16):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def brute_predict(net, x, boxes, fill=0.0):
    grid = brute_force_grid(net, x, boxes, fill=fill)
    one = grid.diagonal(dim1=1, dim2=2)
    return [brute_force_decide(one[b].tolist(), grid[b].tolist())[0] for b in range(x.shape[0])]


# ------------------------------------------------------------------ one source of truth (issue 9.1)
def test_assigning_mask_set_changes_certification_and_settings():
    model, net = make()
    x = images()
    new = MaskSet.square(16, 5, num_masks=3)
    model.mask_set = new
    k = len(new)
    counter = ViewCounter(net)
    full = model.certify(x, model.predict(x), early_exit=False)
    assert full.num_views.tolist() == [k * (k + 1) // 2] * x.shape[0]  # the 5 px set's 9 masks, not the 3 px set's 16
    assert torch.equal(full.grid, brute_force_grid(net, x, new.boxes))
    assert model.predict(x).tolist() == brute_predict(net, x, new.boxes)
    assert counter.images > 0
    assert model.settings()["mask_set"] == new.to_dict() and model.settings()["patch"] == [5, 5]
    assert model.patch == (5, 5) and model.image_size == (16, 16)
    assert torch.equal(model._keep, new.keep_masks())


def test_the_defended_model_keeps_no_view_runner():
    """The view runner is built per call: no second copy of model, masks, fill or batch size."""
    from robustwrap.views import ViewRunner

    model, _ = make()
    model.predict(images(2))
    assert not any(isinstance(value, ViewRunner) for value in vars(model).values())
    assert not hasattr(model, "engine")


def test_assigning_a_mask_set_for_another_image_size_moves_image_size_too():
    model, net = make()
    model.mask_set = MaskSet.square(20, 3, num_masks=4)
    assert model.image_size == (20, 20) and model.settings()["image_size"] == [20, 20]
    assert model.predict(images(3, size=20)).shape == (3,)
    with pytest.raises(ValueError, match="must be 20x20"):
        model.predict(images(3))


def test_assigning_batch_size_changes_views_per_pass():
    model, net = make()
    x = images(5)
    k = len(model.mask_set)
    model.batch_size = 7
    model.num_classes  # the one blank probe, before counting
    counter = ViewCounter(net)
    model.certify(x, torch.zeros(5, dtype=torch.long), early_exit=False)
    total = 5 * k * (k + 1) // 2
    assert counter.images == total
    assert counter.calls == math.ceil(5 * k / 7) + math.ceil((total - 5 * k) / 7)
    assert "batch_size" not in model.settings()


def test_assigning_model_runs_the_new_model():
    model, old = make(seed=0)
    new = PeakNet(seed=5)
    x = images()
    model.model = new
    old_counter, new_counter = ViewCounter(old), ViewCounter(new)
    assert model.predict(x).tolist() == brute_predict(new, x, model.mask_set.boxes)
    assert old_counter.images == 0 and new_counter.images > 0
    assert brute_predict(new, x, model.mask_set.boxes) != brute_predict(old, x, model.mask_set.boxes)
    assert set(model.state_dict()) == {f"model.{k}" for k in new.state_dict()}


def test_assigning_a_model_with_other_classes_is_seen():
    model, _ = make()
    assert model.num_classes == 4
    model.model = PeakNet(num_classes=7)
    assert model.num_classes == 7
    assert model(images(2)).shape == (2, 7)


def test_assigning_fill_and_precision_and_margin():
    model, net = make()
    x = images(4)
    model.fill = [1.0, -2.0, 0.5]
    assert model.fill == (1.0, -2.0, 0.5) and model.settings()["fill"] == [1.0, -2.0, 0.5]
    assert model.predict(x).tolist() == brute_predict(net, x, model.mask_set.boxes, fill=[1.0, -2.0, 0.5])
    model.precision = "bfloat16"
    assert model.settings()["precision"] == "bfloat16"
    model.margin = 0.25
    assert model.settings()["margin"] == 0.25


@pytest.mark.parametrize(
    "name,value,error,message",
    [
        ("mask_set", "3px", TypeError, "mask_set must be a robustwrap.MaskSet, got str"),
        ("batch_size", 0, ValueError, "batch_size must be a positive int, got 0"),
        ("fill", [0.0, 1.0], ValueError, "fill has 2 values but the model takes 3 channels"),
        ("fill", float("nan"), ValueError, "fill must be finite"),
        ("precision", "fp8", ValueError, "precision must be one of 'float32', 'bfloat16', 'float16', got 'fp8'"),
        ("margin", -1.0, ValueError, "margin must be a finite float >= 0, got -1.0"),
        ("model", "resnet", TypeError, "model must be a torch.nn.Module, got str"),
        ("image_size", (32, 32), AttributeError, "image_size is fixed by the PatchCleanser's geometry"),
        ("in_chans", 1, AttributeError, "in_chans is read from the base model"),
        ("num_classes", 10, AttributeError, "num_classes is read from the base model"),
    ],
)
def test_bad_or_fixed_assignments_raise_and_change_nothing(name, value, error, message):
    model, _ = make()
    before = model.settings()
    with pytest.raises(error, match=message):
        setattr(model, name, value)
    assert model.settings() == before and model.batch_size == 256  # auto: 2**18 pixels per pass, at most 256


def test_wrapping_a_defended_model_as_base_is_refused():
    model, _ = make()
    other, _ = make()
    with pytest.raises(TypeError, match="already a RobustPatchClassifier"):
        model.model = other


def test_shallow_copy_does_not_share_settings():
    model, net = make()
    x = images(6)
    expected = model.predict(x).tolist()
    before = model.settings()
    clone = copy.copy(model)
    clone.mask_set = MaskSet.square(16, 5, num_masks=3)
    clone.fill = 1.0
    clone.batch_size = 3
    clone.precision = "bfloat16"
    clone.model = PeakNet(seed=9)
    assert model.settings() == before and model.batch_size == 256 and model.model is net
    assert torch.equal(model._keep, model.mask_set.keep_masks()) and model._keep.shape[0] == 16
    assert model.predict(x).tolist() == expected
    assert clone.settings()["fill"] == 1.0 and clone._keep.shape[0] == 9


def test_keep_masks_are_a_non_persistent_buffer_that_replication_carries():
    model, net = make()
    assert "_keep" in dict(model.named_buffers())
    assert set(model.state_dict()) == {f"model.{k}" for k in net.state_dict()}
    replica = model._replicate_for_data_parallel()  # what nn.parallel.replicate builds each replica from
    assert torch.equal(replica._buffers["_keep"], model._keep)
    assert model.to(torch.float64)._keep.dtype == torch.bool  # .to(dtype) leaves the bool masks alone
    model.to("meta")  # a device move takes the masks along, and a new mask set is built where they are
    assert model._keep.device.type == "meta"
    model.mask_set = MaskSet.square(16, 5, num_masks=3)
    assert model._keep.device.type == "meta" and model._keep.shape == (9, 16, 16)


# ----------------------------------------------------------------------- precision (issue 9.2)
@pytest.mark.parametrize("precision,dtype", [("float32", torch.float32), ("bfloat16", torch.bfloat16)])
def test_precision_is_used_by_forward_predict_and_certify(precision, dtype):
    model, net = make(precision=precision)
    assert model.precision == precision and model.settings()["precision"] == precision
    seen = []
    net.conv.register_forward_hook(lambda module, inputs, output: seen.append(output.dtype))
    x = images(3)
    logits = model(x)
    model.predict(x)
    model.certify(x, torch.zeros(3, dtype=torch.long))
    model.predict_vanilla(x)
    assert set(seen) == {dtype}
    assert logits.dtype == torch.float32  # robust logits are float32 whatever the precision
    with pytest.raises(ValueError, match="precision must be one of"):
        make(precision="half")


def test_precision_changes_the_certified_function():
    """bf16 views and fp32 views are different computations: the grid follows the setting.

    These inputs hold near ties, so the two precisions' grids differ (checked first: on inputs
    where they agree the test could not tell the settings apart)."""
    model, net = make(seed=3, precision="bfloat16")
    x = images(8, seed=3) * 3
    y = torch.zeros(8, dtype=torch.long)
    fp32 = brute_force_grid(net, x, model.mask_set.boxes)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16 = brute_force_grid(net, x, model.mask_set.boxes)
    assert int((fp32 != bf16).sum()) > 10  # 101 of 2,048 views differ
    assert torch.equal(model.certify(x, y, early_exit=False).grid, bf16)
    model.precision = "float32"
    assert torch.equal(model.certify(x, y, early_exit=False).grid, fp32)


# --------------------------------------------------------------- ordinary tensors (issue 9.3)
def test_outputs_are_ordinary_tensors():
    model, _ = make()
    x = images(4)
    logits = model(x)
    logits /= 2  # raised "Inplace update to inference tensor outside InferenceMode" before
    labels = model.predict(x)
    labels += 1
    result = model.certify(x, torch.zeros(4, dtype=torch.long))
    for value in (logits, labels, result.prediction, result.certified, result.num_views, result.case, result.one_mask, result.grid):
        assert not value.is_inference()
    weight = torch.ones(4, requires_grad=True)
    (model(x) * weight).sum().backward()  # outputs can enter autograd
    assert weight.grad is not None


# ------------------------------------------------------------------------- in_chans (issue 9.7)
class StemLast(nn.Module):
    """A model whose first *registered* conv is not its stem: the conv probe would say 8 channels."""

    in_chans = 1

    def __init__(self):
        super().__init__()
        self.head = nn.Conv2d(8, 3, 1)
        self.stem = nn.Conv2d(1, 8, 3, padding=1)

    def forward(self, x):
        return self.head(self.stem(x)).amax(dim=(2, 3))


def test_in_chans_prefers_the_models_own_attribute_over_the_conv_probe():
    model = robustwrap.wrap(StemLast(), patch=3, num_masks=3, image_size=12).eval()
    assert model.in_chans == 1
    assert model.predict(torch.randn(2, 1, 12, 12)).shape == (2,)
    timm_model = robustwrap.wrap(timm.create_model("test_resnet", in_chans=1, num_classes=3), patch=8)
    assert timm_model.in_chans == 1 and timm_model.model.pretrained_cfg["input_size"][0] == 3


def test_in_chans_falls_back_to_the_first_conv():
    net = nn.Sequential(nn.Conv2d(2, 4, 3), nn.AdaptiveMaxPool2d(1), nn.Flatten())
    assert robustwrap.wrap(net, patch=3, image_size=12, num_masks=3).in_chans == 2


# ----------------------------------------------------------------- train mode warning (issue 10.1)
def test_train_mode_forward_without_grad_warns_once():
    model, net = make()
    model.train()
    x = images(2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        logits = model(x)  # training: gradients on, no warning
        with torch.no_grad():
            undefended = model(x)
            model(x)
    messages = [str(w.message) for w in caught if "train mode" in str(w.message)]
    assert len(messages) == 1 and "call .eval() for robust predictions" in messages[0]
    assert torch.equal(undefended, net(x).detach()) and logits.requires_grad
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with torch.no_grad():
            model(x)


# ---------------------------------------------------------------- timm image size (issue 10.2)
def test_timm_model_built_at_another_size_is_wrapped_at_that_size():
    net = timm.create_model("vit_tiny_patch16_224", img_size=64, num_classes=3)
    model = robustwrap.wrap(net, patch=8, num_masks=2).eval()
    assert model.image_size == (64, 64) and net.pretrained_cfg["input_size"] == (3, 224, 224)
    assert model.predict(torch.randn(1, 3, 64, 64)).shape == (1,)
    with pytest.raises(ValueError, match=r"64x64 input this timm model was built for.*pass image_size=64"):
        robustwrap.wrap(net, patch=8, image_size=224)


def test_timm_image_size_defaults_to_pretrained_cfg_for_an_unchanged_model():
    net = timm.create_model("test_resnet", num_classes=3)
    assert robustwrap.wrap(net).image_size == (160, 160)
    assert robustwrap.wrap(net, image_size=96).image_size == (96, 96)  # flexible models take any size


# ------------------------------------------------------------------------ small ones (issue 10.8)
def test_wrapping_a_wrapped_model_is_a_clear_error_without_image_size():
    model, _ = make()
    with pytest.raises(TypeError, match=r"already a RobustPatchClassifier \(PatchCleanser\); wrap its .model"):
        robustwrap.wrap(model)


def test_num_masks_that_cannot_be_honoured_warns_at_wrap():
    net = timm.create_model("test_resnet", num_classes=3)
    with pytest.warns(UserWarning, match="num_masks=6x6 cannot be honoured for a 136x136 px patch on a 160x160 image"):
        model = robustwrap.wrap(net, patch=136)  # 25 positions per axis: s = 5, 5 masks
    assert "the formula gives" in model.mask_set.describe()


def test_unnormalised_inputs_warn():
    net = timm.create_model("test_resnet", num_classes=3).eval()
    model = robustwrap.wrap(net, patch=8, image_size=32, num_masks=2).eval()
    pixels = torch.randint(0, 256, (2, 3, 32, 32)).float()
    with pytest.warns(UserWarning, match="0-255 pixels"):
        model.predict(pixels)
    peak, _ = make()
    with pytest.warns(UserWarning, match="0-255 pixels"):
        peak.predict(torch.rand(2, 3, 16, 16) * 255)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # normalised images (and a patch of strong content) are silent
        model.predict(torch.randn(2, 3, 32, 32))
        peak.predict(images(2) * 5)


def test_import_does_not_load_what_it_does_not_use():
    heavy = ["matplotlib", "pandas", "robustwrap.hub", "robustwrap.zoo", "robustwrap.dataset", "robustwrap.report", "robustwrap.plots", "robustwrap.fit", "robustwrap.augment"]
    code = f"import json, sys, robustwrap; print(json.dumps([m for m in {heavy!r} if m in sys.modules]))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert json.loads(out) == []
    # and what is loaded on first use is still there
    code = "import robustwrap; print(robustwrap.certify_dataset.__module__, robustwrap.fit_masking.__module__, 'certify_dataset' in dir(robustwrap))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["robustwrap.dataset", "robustwrap.fit", "True"]


# ------------------------------------------------------------------------- wrap and settings
def test_wrap_dispatches_through_defenses():
    assert robustwrap.DEFENSES["patchcleanser"] is PatchCleanser
    model, _ = make()
    assert type(model) is PatchCleanser and model.defense == "patchcleanser"
    assert isinstance(model, RobustPatchClassifier)
    with pytest.raises(ValueError, match=r"unknown defense 'cleanser'; choose one of 'patchcleanser'"):
        robustwrap.wrap(PeakNet(), image_size=16, defense="cleanser")
    with pytest.raises(TypeError, match="unexpected option bogus="):
        robustwrap.wrap(PeakNet(), image_size=16, bogus=1)


def test_options_of_another_defense_name_their_defense():
    options = {name: set(robustwrap.defenses._options(cls)) for name, cls in robustwrap.DEFENSES.items()}
    only_pc = sorted(options["patchcleanser"] - set().union(*(v for k, v in options.items() if k != "patchcleanser")))
    other = next(name for name in robustwrap.DEFENSES if name != "patchcleanser")
    with pytest.raises(ValueError, match=rf"{only_pc[0]}= is an option of defense 'patchcleanser', not of '{other}'"):
        robustwrap.wrap(PeakNet(), image_size=16, defense=other, **{only_pc[0]: 3})


def test_settings_round_trip_through_json():
    model, net = make(fill=[0.5, 0.0, -0.5], precision="bfloat16", margin=0.125, batch_size=5)
    settings = json.loads(json.dumps(model.settings()))
    assert settings == {
        "defense": "patchcleanser",
        "image_size": [16, 16],
        "fill": [0.5, 0.0, -0.5],
        "precision": "bfloat16",
        "margin": 0.125,
        "mask_set": model.mask_set.to_dict(),
        "patch": [3, 3],
        "tau": 0.0,
    }
    for cls in (PatchCleanser, RobustPatchClassifier):
        again = cls.from_settings(net, settings, batch_size=9)
        assert type(again) is PatchCleanser and again.settings() == model.settings() and again.batch_size == 9
    x = images(4)
    assert torch.equal(again.eval()(x), model(x))


@pytest.mark.parametrize(
    "change,error,message",
    [
        ({"defense": "nope"}, ValueError, "known defenses: .*patchcleanser"),
        ({"precision": "fp64"}, ValueError, "precision must be one of"),
        ({"margin": -0.5}, ValueError, "margin must be a finite float >= 0"),
        ({"margin": "0"}, ValueError, "margin must be a float >= 0"),
        ({"fill": "zero"}, ValueError, "fill must be a number"),
        ({"image_size": [32, 32]}, ValueError, "disagrees with the patchcleanser geometry"),
        ({"patch": [4, 4]}, ValueError, "settings patch .* disagrees"),
        ({"extra": 1}, ValueError, r"unknown patchcleanser settings \['extra'\]"),
        ({"mask_set": {"image_size": [16, 16], "boxes": [[0.5, 0, 8, 8]], "patch_sizes": [[3, 3]]}}, ValueError, r"boxes\[0\] must be a list of 4 ints"),
        ({"mask_set": None}, ValueError, "must be a dict"),
    ],
)
def test_from_settings_refuses_bad_settings(change, error, message):
    model, net = make()
    settings = {**model.settings(), **change}
    with pytest.raises(error, match=message):
        RobustPatchClassifier.from_settings(net, settings)


def test_from_settings_refuses_unknown_runtime_arguments():
    model, net = make()
    with pytest.raises(TypeError, match=r"unexpected arguments \['fill'\]"):
        PatchCleanser.from_settings(net, model.settings(), fill=1.0)


# ------------------------------------------------------------- what every defense refuses (issue 23, item 16)
class OneLogit(nn.Module):
    """A binary classifier written with one logit (class 1 where it is > 0), no num_classes attribute."""

    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.conv = nn.Conv2d(3, 1, 3, padding=1)

    def forward(self, x):
        return self.conv(x).amax((2, 3))


class TwoLogits(nn.Module):
    """The same classifier with two logits `[0, z]`: the form the error message asks for."""

    def __init__(self, one: nn.Module):
        super().__init__()
        self.one = one

    def forward(self, x):
        z = self.one(x)
        return torch.cat([torch.zeros_like(z), z], dim=1)


class OneLocalLogit(nn.Module):
    """Local logits of one class (r=3, s=1, o=0)."""

    def __init__(self, classes=1):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, classes, 3)

    def forward(self, x):
        return self.conv(x)


_OPTIONS = {
    "patchcleanser": {"patch": 3, "num_masks": 3, "image_size": 16},
    "smoothing": {"patch": 3, "defense": "smoothing", "size": 4, "image_size": 16},
    "patchguard": {"patch": 3, "defense": "patchguard", "image_size": 16, "receptive_field": 3, "feature_stride": 1, "feature_offset": 0},
}


def _one_and_two_class_models(defense):
    if defense == "patchguard":
        return OneLocalLogit(1), OneLocalLogit(2)
    one = OneLogit()
    return one, TwoLogits(one)


@pytest.mark.parametrize("defense", sorted(_OPTIONS))
def test_a_one_logit_model_is_refused_at_wrap_and_when_assigned(defense):
    options = _OPTIONS[defense]
    one, two = _one_and_two_class_models(defense)
    how = r"num_classes must be at least 2, got 1.*always class 0.*two logits.*torch.cat\(\[torch.zeros_like\(z\), z\], dim=1\)"
    with pytest.raises(ValueError, match=how):
        robustwrap.wrap(one, **options)  # used to certify every image labelled 0
    with pytest.raises(ValueError, match=how):
        robustwrap.wrap(two, num_classes=1, **options)
    timm_one = timm.create_model("bagnet_tiny" if defense == "patchguard" else "test_resnet", num_classes=1, in_chans=3)
    with pytest.raises(ValueError, match=how):
        robustwrap.wrap(timm_one, **{k: v for k, v in options.items() if not k.startswith("feature") and k != "receptive_field"})
    # The same classifier with two logits is certified like any other; a one-logit model assigned to it is refused.
    defended = robustwrap.wrap(two, **options).eval()
    x = images(4)
    result = defended.certify(x, defended.predict(x))
    assert defended.num_classes == 2 and result.certified.dtype == torch.bool
    with pytest.raises(ValueError, match=how):
        if defense == "patchguard":  # a model that does not carry its geometry is declared with it
            defended.set_model(one, receptive_field=3, feature_stride=1, feature_offset=0)
        else:
            defended.model = one
    assert defended.model is two and defended.num_classes == 2
    with pytest.raises(ValueError, match=how):
        defended.model = timm_one
    assert defended.model is two


_TIMM_OPTIONS = {
    "patchcleanser": ("test_resnet", {"patch": 3, "num_masks": 3, "image_size": 16}),
    "smoothing": ("test_resnet", {"patch": 3, "defense": "smoothing", "size": 4, "image_size": 16}),
    "patchguard": ("bagnet_tiny", {"patch": 3, "defense": "patchguard"}),
}


@pytest.mark.parametrize("defense", sorted(_TIMM_OPTIONS))
def test_the_defense_of_a_defended_model_cannot_be_assigned(defense, tmp_path):
    name, options = _TIMM_OPTIONS[defense]
    torch.manual_seed(0)
    m = robustwrap.wrap(timm.create_model(name, num_classes=3, in_chans=1 if name == "bagnet_tiny" else 3), **options).eval()
    other = "smoothing" if defense != "smoothing" else "patchguard"
    with pytest.raises(AttributeError, match=rf"defense is the class of this defended model .*{defense}.*robustwrap.wrap\(m.model, defense=\.\.\."):
        m.defense = other  # used to be accepted, and save_pretrained then wrote a folder that could not be loaded
    assert m.defense == defense and "defense" not in vars(m) and m.settings()["defense"] == defense
    m.save_pretrained(tmp_path / "saved")
    loaded = robustwrap.from_pretrained(str(tmp_path / "saved"))
    assert type(loaded) is type(m) and loaded.settings() == m.settings()
