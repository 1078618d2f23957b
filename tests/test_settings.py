"""The state layer of every defense: a setting assigned after `wrap` (the base model included)
takes effect everywhere, exactly as a fresh `wrap` with that setting, or is refused with the way
to change it; and `wrap` leaves each submodule's train/eval mode as the user set it."""

from __future__ import annotations

import copy
import json

import pytest
import timm
import torch
from torch import nn

import robustwrap
from robustwrap import MaskSet
from robustwrap.dataset import model_fingerprint
from robustwrap.defenses import DEFENSES, _options
from robustwrap.geometry import AblationSet
from robustwrap.models import check_receptive_field


class LocalPeak(nn.Module):
    """A global classifier (spatial max of a 3x3 conv), for PatchCleanser and smoothing."""

    def __init__(self, in_chans: int = 2, num_classes: int = 4, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.conv = nn.Conv2d(in_chans, num_classes, 3, padding=1)

    def forward(self, x):
        return self.conv(x).amax(dim=(2, 3))


def _images(channels: int, n: int = 4, size: int = 16, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, channels, size, size, generator=torch.Generator().manual_seed(seed))


def _input_channels(m) -> int:
    return m.in_chans // 2 if getattr(m, "encoding", "fill") == "levine2020" else m.in_chans


def assert_same_function(m, fresh, x: torch.Tensor) -> None:
    """`m` and a freshly wrapped `fresh` are the same defended model: settings, fingerprint, results."""
    assert m.settings() == fresh.settings()
    assert model_fingerprint(m) == model_fingerprint(fresh)
    assert m.num_classes == fresh.num_classes and m.in_chans == fresh.in_chans
    assert torch.equal(m.predict(x), fresh.predict(x))
    y = fresh.predict(x)
    got, want = m.certify(x, y), fresh.certify(x, y)
    for field in ("prediction", "certified", "num_views"):
        assert torch.equal(getattr(got, field), getattr(want, field)), field
    if hasattr(want, "margin"):
        assert torch.equal(got.margin, want.margin)
    if m._no_detection is None:  # certified detection, at the model's tau
        got, want = m.certify_detection(x, y), fresh.certify_detection(x, y)
        for field in ("prediction", "alert", "certified", "num_views"):
            assert torch.equal(getattr(got, field), getattr(want, field)), field


# -------------------------------------------------------- every wrap keyword (issue 18, item 8)
def _base_options(defense: str) -> tuple[nn.Module, dict]:
    if defense == "patchcleanser":
        return LocalPeak(), {"patch": 3, "num_masks": 4, "image_size": 16, "margin": 0.0}
    if defense == "smoothing":
        return LocalPeak(), {"patch": 3, "size": 4, "image_size": 16, "margin": 0.0}
    if defense == "patchcure":  # a local-logit model that declares its geometry (SRF-only: no LRF)
        torch.manual_seed(0)
        return timm.create_model("bagnet_tiny", num_classes=3, in_chans=2), {"patch": 3, "image_size": 16, "margin": 0.0}
    # An undeclared local-logit model whose geometry is given to wrap. It sees r=3, s=2, o=0; the
    # declaration is looser (r=9, o=6: windows [2a - 6, 2a + 3) hold [2a, 2a + 3)) so that each
    # geometry keyword has another value the model keeps to (declarations are probed on the model).
    return nn.Conv2d(2, 3, 3, stride=2), {"patch": 3, "image_size": 16, "receptive_field": 9, "feature_stride": 2, "feature_offset": 6, "margin": 0.0}


_MASK_SET = "m.mask_set = robustwrap.MaskSet.square"
_NEW_WRAP = r"robustwrap.wrap\(m.model, image_size=...\)"
_FROM_MODEL = "read from the base model; assign m.model"
_COMMON = {
    "image_size": ("refused", _NEW_WRAP),
    "input_size": ("refused", r"robustwrap.wrap\(m.model, input_size=...\)"),
    "resize": ("refused", r"robustwrap.wrap\(m.model, input_size=..., resize=...\)"),
    "fill": ("assignable", 0.5),
    "batch_size": ("assignable", 5),
    "precision": ("assignable", "bfloat16"),
    "margin": ("assignable", 0.25),
    "num_classes": ("refused", _FROM_MODEL),
}
# The decision for each keyword (docs/concepts.md#settings has the same table): a new wrap
# keyword without an entry here fails `test_every_wrap_keyword_has_a_decision`.
DECISIONS = {
    "patchcleanser": {
        "patch": ("refused", _MASK_SET),
        "num_masks": ("refused", _MASK_SET),
        "stride": ("refused", _MASK_SET),
        "mask_set": ("assignable", MaskSet.square(16, 5, num_masks=3)),
        "tau": ("assignable", 0.5),  # certified detection's threshold
        "drop_tokens": ("assignable", True),  # on a ViT (the test builds one): its views drop the tokens they hide
        **_COMMON,
    },
    "smoothing": {
        "patch": ("assignable", 2),
        "ablation": ("assignable", "block"),
        "size": ("assignable", 5),
        "stride": ("assignable", 2),
        "threshold": ("assignable", 0.3),
        "encoding": ("assignable", "levine2020"),
        "drop_tokens": ("assignable", False),  # on a ViT (the test builds one), where the default drops tokens
        **_COMMON,
    },
    "patchguard": {
        "patch": ("assignable", 2),
        "receptive_field": ("assignable", 10),
        "feature_stride": ("assignable", (2, 3)),
        "feature_offset": ("assignable", 5),
        "threshold": ("assignable", 0.2),
        "clip": ("assignable", 0.5),
        "tau": ("assignable", 0.5),
        **_COMMON,
    },
    "patchcure": {
        "patch": ("assignable", 2),
        "mask_stride": ("assignable", 2),
        "lrf": ("refused", "lrf is part of the base model"),
        # window and split are assignable on a ViT split (tests/test_patchcure.py); this base has none
        "window": ("refused", "window is a setting of a ViT split"),
        "split": ("refused", "split is a setting of a ViT split"),
        "tau": ("assignable", 0.5),
        "authors": ("refused", "authors chooses the function the weights compute"),
        **_COMMON,
    },
}


@pytest.mark.parametrize("defense", sorted(DEFENSES))
def test_every_wrap_keyword_has_a_decision(defense):
    assert set(DECISIONS[defense]) == _options(DEFENSES[defense]) | {"patch"}


CASES = [(d, k) for d in sorted(DECISIONS) for k in sorted(DECISIONS[d])]


@pytest.mark.parametrize("defense,keyword", CASES)
def test_a_wrap_keyword_assigned_after_wrap_acts_as_at_wrap_or_says_how(defense, keyword):
    net, options = _base_options(defense)
    if keyword == "drop_tokens":  # a ViT: smoothing's default (None) drops tokens, PatchCleanser's (False) does not
        torch.manual_seed(0)
        net = timm.create_model("vit_tiny_patch16_224", img_size=16, patch_size=4, depth=1, num_classes=4).eval()
    m = robustwrap.wrap(net, defense=defense, **options).eval()
    before = m.settings()
    kind, value = DECISIONS[defense][keyword]
    if kind == "refused":
        with pytest.raises(AttributeError, match=value):
            setattr(m, keyword, value)
        assert m.settings() == before and keyword not in vars(m)
        return
    if keyword == "encoding":  # levine2020 needs a base model taking 2C channels: this one takes 2 (C = 1)
        assert m.in_chans == 2
    setattr(m, keyword, value)
    fresh_options = {**options, keyword: value}
    if keyword == "mask_set":
        del fresh_options["patch"], fresh_options["num_masks"]
    fresh = robustwrap.wrap(net, defense=defense, **fresh_options).eval()
    if keyword == "batch_size":
        assert m.batch_size == fresh.batch_size == 5  # speed only: not a setting of the function
    else:
        assert m.settings() != before  # the assignment changed the defended function
    assert_same_function(m, fresh, _images(_input_channels(fresh)))


def test_refused_assignments_say_how_and_keep_nothing():
    pc = robustwrap.wrap(LocalPeak(), patch=3, num_masks=4, image_size=16)
    with pytest.raises(AttributeError, match=r"num_masks is a setting of the mask set.*m.mask_set = robustwrap.MaskSet.square\(m.input_size"):
        pc.num_masks = 3  # used to be accepted silently, with still 16 masks
    assert len(pc.mask_set) == 16
    with pytest.raises(AttributeError, match="patch is a setting of the mask set"):
        pc.patch = 0.05  # used to be Python's bare "property has no setter"


def test_smoothing_view_settings_rebuild_the_ablation_set_or_refuse_whole():
    sm = robustwrap.wrap(LocalPeak(), patch=3, defense="smoothing", size=4, image_size=16)
    sm.size = 5
    sm.ablation = "row"
    assert sm.ablation_set == AblationSet((16, 16), "row", 5, 1) and sm.settings()["size"] == 5
    before = sm.settings()
    with pytest.raises(ValueError, match="no image can be certified"):
        sm.stride = 8  # 2 views: a 3 px patch meets both
    with pytest.raises(ValueError, match="size .* must be at most"):
        sm.size = 17
    with pytest.raises(ValueError, match="ablation must be one of"):
        sm.ablation = "diagonal"
    assert sm.settings() == before


# ---------------------------------------------------- the base model, assigned (issue 18, items 1-2)
def _round_trip(m, fresh, tmp_path, x):
    m.save_pretrained(tmp_path / "assigned")
    fresh.save_pretrained(tmp_path / "fresh")
    assigned_config = json.loads((tmp_path / "assigned" / "config.json").read_text())
    assert assigned_config == json.loads((tmp_path / "fresh" / "config.json").read_text())
    loaded = robustwrap.from_pretrained(str(tmp_path / "assigned"))
    assert loaded.settings() == fresh.settings()
    assert torch.equal(loaded.predict(x), fresh.predict(x))


def _timm(name: str, seed: int, **kwargs) -> nn.Module:
    torch.manual_seed(seed)
    return timm.create_model(name, **kwargs).eval()


def test_patchcleanser_with_another_model_is_a_fresh_wrap_of_it(tmp_path):
    pc = robustwrap.wrap(_timm("test_resnet", 0, num_classes=3, in_chans=1), patch=3, num_masks=3, image_size=16).eval()
    other = _timm("test_resnet", 1, num_classes=5, in_chans=3)
    pc.model = other
    fresh = robustwrap.wrap(other, patch=3, num_masks=3, image_size=16).eval()
    x = _images(3, n=3)
    assert (pc.num_classes, pc.in_chans) == (5, 3)
    assert_same_function(pc, fresh, x)
    _round_trip(pc, fresh, tmp_path, x)


def test_smoothing_with_another_model_is_a_fresh_wrap_of_it(tmp_path):
    options = {"patch": 3, "defense": "smoothing", "size": 4, "image_size": 16, "encoding": "levine2020"}
    sm = robustwrap.wrap(_timm("test_resnet", 0, num_classes=3, in_chans=2), **options).eval()
    other = _timm("test_resnet", 1, num_classes=5, in_chans=6)  # levine2020: images with 3 channels now
    sm.model = other
    fresh = robustwrap.wrap(other, **options).eval()
    x = _images(3, n=3)
    assert (sm.num_classes, sm.in_chans) == (5, 6)
    assert_same_function(sm, fresh, x)
    _round_trip(sm, fresh, tmp_path, x)
    with pytest.raises(ValueError, match="2C channels"):
        sm.model = _timm("test_resnet", 2, num_classes=5, in_chans=3)  # refused as wrap refuses it
    assert sm.model is other


def test_patchguard_with_another_model_takes_its_geometry(tmp_path):
    pg = robustwrap.wrap(_timm("bagnet_tiny", 0, num_classes=3, in_chans=1), patch=3, defense="patchguard", image_size=32).eval()
    assert (pg.receptive_field, pg.window) == ((5, 5), (4, 4))
    other = _timm("bagnet9_small", 1, num_classes=4, in_chans=1)  # r = 9, s = 2: a 6x6 window
    pg.model = other
    fresh = robustwrap.wrap(other, patch=3, defense="patchguard", image_size=32).eval()
    assert (pg.receptive_field, pg.feature_stride, pg.window) == ((9, 9), (2, 2), (6, 6)) == (fresh.receptive_field, fresh.feature_stride, fresh.window)
    x = _images(1, n=3, size=32)
    assert_same_function(pg, fresh, x)
    _round_trip(pg, fresh, tmp_path, x)


class Blurred(nn.Module):
    """A BagNet behind a 3x3 box blur (padding 1): each local logit sees 2 more pixels each way."""

    def __init__(self, bagnet: nn.Module):
        super().__init__()
        self.blur = nn.Conv2d(1, 1, 3, padding=1, bias=False)
        nn.init.constant_(self.blur.weight, 1 / 9)
        self.bagnet = bagnet
        self.num_classes = bagnet.num_classes
        self.receptive_field, self.feature_stride, self.feature_offset = bagnet.receptive_field + 2, bagnet.feature_stride, 1

    def forward(self, x):
        return self.bagnet(self.blur(x))


def test_issue_reproduction_a_blurred_bagnet_assigned_is_certified_with_its_own_window():
    bagnet = _timm("bagnet_tiny", 0, num_classes=3, in_chans=1)
    blurred = Blurred(bagnet).eval()
    assert check_receptive_field(blurred, 16, trials=1).ok  # its declaration r=7, s=2, o=1 holds
    pg = robustwrap.wrap(bagnet, patch=3, defense="patchguard", image_size=32).eval()
    pg.model = blurred
    fresh = robustwrap.wrap(blurred, patch=3, defense="patchguard", image_size=32).eval()
    assert (pg.receptive_field, pg.feature_offset, pg.window) == ((7, 7), (1, 1), (5, 5)) == (fresh.receptive_field, fresh.feature_offset, fresh.window)
    assert pg.settings()["receptive_field"] == [7, 7]
    assert_same_function(pg, fresh, _images(1, n=4, size=32))
    # In-place changes of the model's declaration are read at the next use too.
    blurred.receptive_field = 9
    assert pg.settings()["receptive_field"] == [9, 9] and pg.window == (6, 6)


def test_patchguard_geometry_assigned_against_the_model_is_refused_as_at_wrap():
    model = _timm("bagnet_tiny", 0, num_classes=3, in_chans=1)
    with pytest.raises(ValueError) as at_wrap:
        robustwrap.wrap(model, patch=3, defense="patchguard", receptive_field=1)
    pg = robustwrap.wrap(model, patch=3, defense="patchguard")
    before = pg.settings()
    with pytest.raises(ValueError) as assigned:
        pg.receptive_field = 1  # used to be accepted: a 3x3 window and unsound certificates
    assert str(assigned.value) == str(at_wrap.value)
    assert "contradicts the model's own receptive_field=5" in str(at_wrap.value)
    pg.receptive_field = (5, 5)  # what the model says: accepted, nothing changes
    assert pg.settings() == before


def test_patchguard_asks_for_all_missing_geometry_at_once():
    with pytest.raises(ValueError, match="needs the base model's receptive_field, feature_stride, feature_offset.*pass receptive_field=, feature_stride=, feature_offset="):
        robustwrap.wrap(nn.Conv2d(1, 3, 3), patch=3, defense="patchguard", image_size=16)
    with pytest.raises(ValueError, match="needs the base model's feature_stride, feature_offset: .*pass feature_stride=, feature_offset="):
        robustwrap.wrap(nn.Conv2d(1, 3, 3), patch=3, defense="patchguard", image_size=16, receptive_field=3)
    # A new model that does not declare what the previous one did is refused, naming all of it.
    pg = robustwrap.wrap(_timm("bagnet_tiny", 0, num_classes=3, in_chans=1), patch=3, defense="patchguard")
    old = pg.model
    with pytest.raises(ValueError, match=r"receptive_field, feature_stride, feature_offset.*m.set_model\(model, receptive_field=\.\.\., feature_stride=\.\.\., feature_offset=\.\.\.\)"):
        pg.model = nn.Conv2d(1, 3, 3)
    assert pg.model is old and pg.window == (4, 4)


# --------------------------------------- a declared geometry belongs to its model (issue 23, item 1)
class LocalCNN(nn.Module):
    """A small local-logit CNN that declares nothing: two 3x3 convolutions, the second with stride 2 (r=5, s=2, o=0)."""

    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.body = nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3, stride=2))

    def forward(self, x):
        return self.body(x)


class Blur5(nn.Module):
    """`model` behind a 5x5 box blur (padding 2), declaring nothing: with LocalCNN it sees r=9, s=2, o=2."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.blur = nn.Conv2d(1, 1, 5, padding=2, bias=False)
        nn.init.constant_(self.blur.weight, 1 / 25)
        self.model = model

    def forward(self, x):
        return self.model(self.blur(x))


_CNN = {"receptive_field": 5, "feature_stride": 2, "feature_offset": 0}
_BLURRED = {"receptive_field": 9, "feature_stride": 2, "feature_offset": 2}


def test_issue_reproduction_a_declared_geometry_does_not_follow_the_model_it_was_declared_for():
    cnn = LocalCNN().eval()
    blurred = Blur5(cnn).eval()
    assert check_receptive_field(blurred, 16, **_BLURRED).tight  # what the blurred model really sees
    pg = robustwrap.wrap(cnn, patch=3, defense="patchguard", image_size=28, margin=0.0, **_CNN).eval()
    before = (pg.settings(), pg.window)
    # Used to be accepted, keeping the window (4, 4) of r=5 for a model that sees 9 pixels.
    with pytest.raises(ValueError, match=r"does not carry over to another one\): m.set_model\(model, receptive_field=\.\.\."):
        pg.model = blurred
    assert pg.model is cnn and (pg.settings(), pg.window) == before
    # Declared with the model: the old numbers are probed on it and refused, the true ones taken.
    with pytest.raises(ValueError, match=r"declared for this model \(receptive_field=\(5, 5\), .*does not hold.*unsound"):
        pg.set_model(blurred, **_CNN)
    assert pg.model is cnn and (pg.settings(), pg.window) == before
    pg.set_model(blurred, **_BLURRED)
    fresh = robustwrap.wrap(blurred, patch=3, defense="patchguard", image_size=28, margin=0.0, **_BLURRED).eval()
    assert pg.window == fresh.window == (6, 6) != before[1]
    x = _images(1, n=4, size=28)
    assert_same_function(pg, fresh, x)
    # What a saved config rebuilds (a custom model cannot be saved to the Hub format itself).
    assert_same_function(robustwrap.RobustPatchClassifier.from_settings(blurred, pg.settings()).eval(), fresh, x)


def test_a_declaration_is_not_kept_for_another_model_even_of_the_same_geometry():
    cnn = LocalCNN(seed=0).eval()
    pg = robustwrap.wrap(cnn, patch=3, defense="patchguard", image_size=28, **_CNN)
    twin = LocalCNN(seed=1).eval()  # the same geometry: only the rule, not the probe, can refuse it
    with pytest.raises(ValueError, match="does not carry over"):
        pg.model = twin
    assert pg.model is cnn
    pg.model = cnn  # the same model keeps what was declared for it
    assert pg.receptive_field == (5, 5)
    pg.set_model(twin, **_CNN)
    assert pg.model is twin and pg.receptive_field == (5, 5)
    # A model with the attributes brings its own geometry; the declaration for `twin` is dropped.
    bagnet = _timm("bagnet_tiny", 0, num_classes=3, in_chans=1)
    pg.model = bagnet
    assert (pg.receptive_field, pg.feature_stride, pg.feature_offset) == ((5, 5), (2, 2), (0, 0))
    with pytest.raises(ValueError, match="does not carry over"):
        pg.model = twin
    # set_model refuses what wrap refuses, and changes nothing then.
    with pytest.raises(ValueError, match=r"needs the base model's feature_offset.*pass feature_offset="):
        pg.set_model(twin, receptive_field=5, feature_stride=2)
    with pytest.raises(ValueError, match="contradicts the model's own receptive_field=5"):
        pg.set_model(_timm("bagnet_tiny", 1, num_classes=3, in_chans=1), receptive_field=7)
    with pytest.raises(TypeError, match="must be a torch.nn.Module"):
        pg.set_model("resnet")
    with pytest.raises(TypeError, match="already a RobustPatchClassifier"):
        pg.set_model(pg, receptive_field=5)
    assert pg.model is bagnet
    # A deep copy's declaration belongs to its own copy of the model.
    pg.set_model(twin, **_CNN)
    twin_copy = copy.deepcopy(pg)
    assert twin_copy.model is not twin and twin_copy.receptive_field == (5, 5)
    twin_copy.model = twin_copy.model
    assert twin_copy.settings() == pg.settings()


def test_a_declared_geometry_the_model_violates_is_refused_at_wrap_and_when_assigned():
    blurred = Blur5(LocalCNN()).eval()
    with pytest.raises(ValueError, match=r"declared for this model .*does not hold.*reach \(9, 9\) pixels"):
        robustwrap.wrap(blurred, patch=3, defense="patchguard", image_size=28, **_CNN)
    pg = robustwrap.wrap(blurred, patch=3, defense="patchguard", image_size=28, **_BLURRED)
    before = pg.settings()
    with pytest.raises(ValueError, match="does not hold"):
        pg.receptive_field = 7
    with pytest.raises(ValueError, match="does not hold"):
        pg.feature_offset = 1
    assert pg.settings() == before
    pg.receptive_field = 11  # a looser declaration is sound (and certifies less)
    assert pg.settings()["receptive_field"] == [11, 11]
    clone = copy.copy(pg)
    clone.receptive_field = 13  # a shallow copy's declaration is its own
    assert clone.receptive_field == (13, 13) and pg.receptive_field == (11, 11)
    # A saved declaration is probed again when it is loaded onto a model.
    settings = {**pg.settings(), "receptive_field": [5, 5], "feature_offset": [0, 0]}
    with pytest.raises(ValueError, match="does not hold"):
        robustwrap.RobustPatchClassifier.from_settings(blurred, settings)


def test_a_declaration_too_costly_to_probe_at_the_image_size_is_probed_small_else_not_with_a_warning(monkeypatch):
    from robustwrap import models
    from robustwrap.defenses import patchguard

    sizes = []
    check = models.check_receptive_field
    monkeypatch.setattr(models, "check_receptive_field", lambda model, size, **kw: sizes.append(size) or check(model, size, **kw))
    blurred = Blur5(LocalCNN()).eval()
    # The small probe has a few features per axis: r + 2s + 2|o| pixels (9 for _CNN, 17 for _BLURRED).
    cost = {n: patchguard._probe_flops(blurred, 1, (n, n)) * n * n for n in (28, 17, 9)}
    assert cost[28] > cost[17] > cost[9]
    monkeypatch.setattr(patchguard, "_CHECK_FLOPS", cost[17])
    with pytest.raises(ValueError, match="does not hold: on 9x9 probe images"):
        robustwrap.wrap(blurred, patch=3, defense="patchguard", image_size=28, **_CNN)
    robustwrap.wrap(blurred, patch=3, defense="patchguard", image_size=28, **_BLURRED)
    assert sizes == [(9, 9), (17, 17)]
    monkeypatch.setattr(patchguard, "_CHECK_FLOPS", cost[9] - 1)
    with pytest.warns(UserWarning, match=r"declared for this model \(receptive_field=\(5, 5\).*not verified.*check_receptive_field"):
        unchecked = robustwrap.wrap(blurred, patch=3, defense="patchguard", image_size=28, **_CNN)
    assert len(sizes) == 2 and unchecked.receptive_field == (5, 5)


# ------------------------------------------------------------------------- modes (issue 18, item 5)
class FrozenNormNet(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.norm = nn.BatchNorm2d(4)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head(self.norm(self.conv(x)).amax((2, 3)))


@pytest.mark.parametrize("entry", ["wrap", "from_settings"])
def test_wrap_and_fit_masking_leave_a_frozen_batchnorm_frozen(entry):
    net = FrozenNormNet().train()
    net.norm.eval()  # the usual way to freeze its statistics
    if entry == "wrap":
        defended = robustwrap.wrap(net, patch=3, num_masks=2, image_size=8)
    else:
        defended = robustwrap.RobustPatchClassifier.from_settings(net, robustwrap.wrap(FrozenNormNet(), patch=3, num_masks=2, image_size=8).settings())
    assert defended.training and net.training and net.conv.training
    assert not net.norm.training  # used to come out of wrap in train mode
    stats = (net.norm.running_mean.clone(), net.norm.running_var.clone())
    data = [(torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(i)) * 3 + 1, torch.tensor([0, 1, 2, 0])) for i in range(2)]
    robustwrap.fit_masking(defended, data, epochs=1, progress=False)
    assert torch.equal(net.norm.running_mean, stats[0]) and torch.equal(net.norm.running_var, stats[1])
    assert not net.norm.training and net.conv.training
    defended.eval()
    assert not any(module.training for module in defended.modules())
