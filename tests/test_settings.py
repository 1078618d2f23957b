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


# -------------------------------------------------------- every wrap keyword (issue 18, item 8)
def _base_options(defense: str) -> tuple[nn.Module, dict]:
    if defense == "patchcleanser":
        return LocalPeak(), {"patch": 3, "num_masks": 4, "image_size": 16, "margin": 0.0}
    if defense == "smoothing":
        return LocalPeak(), {"patch": 3, "size": 4, "image_size": 16, "margin": 0.0}
    # an undeclared local-logit model: its geometry is given to wrap (r=3, s=2, o=0 is what it sees)
    return nn.Conv2d(2, 3, 3, stride=2), {"patch": 3, "image_size": 16, "receptive_field": 3, "feature_stride": 2, "feature_offset": 0, "margin": 0.0}


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
        "patch": ("assignable", 5),
        "receptive_field": ("assignable", 5),
        "feature_stride": ("assignable", (2, 1)),
        "feature_offset": ("assignable", 1),
        "threshold": ("assignable", 0.2),
        "clip": ("assignable", 0.5),
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
    if keyword == "drop_tokens":  # a ViT, whose default (None) drops tokens: assigning False changes the function
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
    with pytest.raises(ValueError, match=r"receptive_field, feature_stride, feature_offset.*robustwrap.wrap\(model, defense='patchguard'"):
        pg.model = nn.Conv2d(1, 3, 3)
    assert pg.model is old and pg.window == (4, 4)


def test_patchguard_declarations_of_an_undeclared_model_stay_until_a_model_says_otherwise():
    pg = robustwrap.wrap(nn.Conv2d(1, 3, 3), patch=3, defense="patchguard", image_size=16, receptive_field=3, feature_stride=1, feature_offset=0)
    other = nn.Conv2d(1, 3, 3)
    pg.model = other  # undeclared too: the declarations given to wrap still apply
    assert pg.receptive_field == (3, 3) and pg.model is other
    with pytest.raises(ValueError, match="local logits"):
        pg.model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.Flatten(2), nn.Linear(196, 1), nn.Flatten(1))  # (B, 3) logits
    assert pg.model is other
    with pytest.raises(ValueError, match="whole"):
        pg.patch = 16
    assert pg.patch == (3, 3)
    clone = copy.copy(pg)
    clone.receptive_field = 5  # a shallow copy's declaration is its own
    assert clone.receptive_field == (5, 5) and pg.receptive_field == (3, 3)


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
