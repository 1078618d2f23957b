"""BagNet builders: declared receptive field (exhaustively), timm registry, geometry at 224."""

from __future__ import annotations

import pytest
import timm
import torch
from torch import nn

import robustwrap  # noqa: F401  (registers the builders with timm)
from robustwrap import models
from robustwrap.models import BagNet, check_receptive_field

SMALL = ["bagnet_tiny", "bagnet9_small"]
NARROW = {"widths": (8, 8, 8, 8), "stem_width": 8, "expansion": 1}  # the ImageNet layout, few channels


@pytest.mark.parametrize("name, image, expect", [("bagnet_tiny", 15, 5), ("bagnet9_small", 17, 9)])
def test_small_models_see_exactly_their_declared_window(name, image, expect):
    torch.manual_seed(0)  # random weights; a dead network would see nothing
    model = timm.create_model(name, num_classes=3, in_chans=2)
    assert (model.receptive_field, model.feature_stride, model.feature_offset) == (expect, 2, 0)
    report = check_receptive_field(model, image, trials=2)
    assert report.ok and report.violations == 0
    # Every pixel inside every feature's window changed that feature for some probe: r is not
    # declared larger than what the model sees either.
    assert report.tight
    assert report.observed_receptive_field == (expect, expect)
    assert report.feature_size == ((image - expect) // 2 + 1,) * 2


@pytest.mark.parametrize("name, r, image", [("bagnet9", 9, 25), ("bagnet17", 17, 33), ("bagnet33", 33, 41)])
def test_imagenet_layouts_see_only_their_declared_window(name, r, image):
    # The geometry depends on the layout only, so the ResNet-50 layout with 4 channels per conv
    # is checked exhaustively on every pixel of a small input.
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=2, **NARROW)
    assert (model.receptive_field, model.feature_stride, model.feature_offset) == (r, 8, 0)
    report = check_receptive_field(model, image, trials=2)
    assert report.ok
    assert report.observed_receptive_field == (r, r)
    assert report.feature_size == ((image - r) // 8 + 1,) * 2


@pytest.mark.parametrize("name, r, side", [("bagnet9", 9, 27), ("bagnet17", 17, 26), ("bagnet33", 33, 24)])
def test_full_size_geometry_at_224(name, r, side):
    with torch.device("meta"):
        model = timm.create_model(name, num_classes=1000)
        out = model(torch.empty(2, 3, 224, 224))
    assert tuple(out.shape) == (2, 1000, side, side)
    assert (model.receptive_field, model.feature_stride, model.feature_offset) == (r, 8, 0)
    assert side == (224 - r) // 8 + 1
    assert model.num_features == 2048


def test_full_size_layout_counts_3x3_convs():
    # BagNet-r: the stem's 3x3 plus one 3x3 conv in the first block of each of the first 1, 2, 3
    # or 4 stages (r = 3 + 2 + 4 + 8 (+ 16)); all others are 1x1.
    for name, n3 in (("bagnet9", 3), ("bagnet17", 4), ("bagnet33", 5)):
        with torch.device("meta"):
            model = timm.create_model(name)
        convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
        assert sum(m.kernel_size == (3, 3) for m in convs) == n3
        assert all(m.padding == (0, 0) for m in convs)
        assert [len(getattr(model, f"layer{i}")) for i in range(1, 5)] == [3, 4, 6, 3]


def test_registered_with_timm_and_carries_a_config():
    for name in ("bagnet9", "bagnet17", "bagnet33", "bagnet9_small", "bagnet_tiny"):
        assert name in timm.list_models("bagnet*")
    model = timm.create_model("bagnet17", num_classes=10, **NARROW)
    assert isinstance(model, BagNet) and model.num_classes == 10
    assert model.pretrained_cfg["architecture"] == "bagnet17"
    assert model.default_cfg is model.pretrained_cfg
    assert tuple(model.pretrained_cfg["input_size"]) == (3, 224, 224)
    tiny = models.bagnet_tiny()
    assert (tiny.in_chans, tiny.num_classes) == (1, 10)
    assert tuple(tiny(torch.zeros(2, 1, 32, 32)).shape) == (2, 10, 14, 14)


def test_reset_classifier_keeps_local_logits():
    model = timm.create_model("bagnet_tiny", num_classes=10).eval()
    model.reset_classifier(4)
    assert tuple(model(torch.zeros(1, 1, 16, 16)).shape) == (1, 4, 6, 6)
    with pytest.raises(ValueError, match="global_pool"):
        model.reset_classifier(4, global_pool="avg")


def test_checkpoint_filter_reads_original_bagnet_checkpoints():
    model = timm.create_model("bagnet17", num_classes=5, **NARROW)
    original = {"module." + k: v for k, v in model.state_dict().items()}
    original["module.fc.weight"] = original["module.fc.weight"][:, :, 0, 0]  # a Linear head
    state = models.checkpoint_filter_fn({"state_dict": original}, model)
    model.load_state_dict(state)  # strict


class _SeesTooMuch(nn.Module):
    """Declares r = 3 but its 3x3 conv has padding and a second 3x3 conv: it sees 5 px."""

    receptive_field, feature_stride, feature_offset = 3, 1, 1

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.Conv2d(2, 2, 3, padding=1))

    def forward(self, x):
        return self.body(x)


def test_check_receptive_field_refuses_a_model_that_sees_more():
    with pytest.raises(ValueError, match="outside its declared receptive field"):
        check_receptive_field(_SeesTooMuch(), 8)
    report = check_receptive_field(_SeesTooMuch(), 8, strict=False)
    assert not report.ok and report.violations > 0
    assert report.observed_receptive_field == (5, 5)
    (a, b), (i, j) = report.examples[0]
    assert not (a - 1 <= i < a + 2 and b - 1 <= j < b + 2)
    # The truth passes: r = 5 with offset 2 (padding 1 twice).
    assert check_receptive_field(_SeesTooMuch(), 8, receptive_field=5, feature_offset=2).tight


def test_a_declared_window_larger_than_needed_is_sound_but_not_tight():
    """r = 7 around the true 5x5 windows: no violation (ok), but pixels the features never see (not tight)."""
    report = check_receptive_field(_SeesTooMuch(), 8, receptive_field=7, feature_offset=3)
    assert report.ok and report.violations == 0
    assert not report.tight and report.observed_receptive_field == (5, 5)


def test_check_receptive_field_bad_input():
    with pytest.raises(ValueError, match="receptive_field"):
        check_receptive_field(nn.Conv2d(1, 2, 3), 8, feature_stride=1, feature_offset=0)
    with pytest.raises(ValueError, match="feature_stride"):
        check_receptive_field(nn.Conv2d(1, 2, 3), 8, receptive_field=3, feature_stride=0, feature_offset=0)
    with pytest.raises(ValueError, match="local logits"):
        check_receptive_field(nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten()), 8, receptive_field=3, feature_stride=1, feature_offset=0)


def test_import_robustwrap_models_registers_the_builders():
    # Fresh interpreters: what a user's script sees. `import robustwrap` imports nothing (so the
    # command answers --help without torch); `import robustwrap.models` registers the BagNets, and
    # the Hub loaders import it themselves, so a saved BagNet loads after a bare `import robustwrap`.
    import subprocess
    import sys

    code = (
        "import robustwrap, timm; before = timm.is_model('bagnet17'); import robustwrap.models; "
        "m = timm.create_model('bagnet17', num_classes=10, widths=(4, 4, 4, 4), stem_width=4); print(before, type(m).__name__, m.num_classes, m.receptive_field)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "BagNet", "10", "17"]
    code = "import robustwrap; m = robustwrap.from_pretrained('mnist_bagnet_tiny_pg'); print(type(m.model).__name__, m.model.pretrained_cfg['architecture'])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["BagNet", "bagnet_tiny"]
