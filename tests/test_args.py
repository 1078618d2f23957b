"""robustwrap._args: labels as torch takes them, and one reading of patch spellings for the API and the CLI."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import robustwrap
from robustwrap._args import as_labels, read_patch
from robustwrap.cli import parse_patch
from robustwrap.models import bagnet_tiny


class Peak(torch.nn.Module):
    """logits = spatial max of a 3x3 conv, so masking can change the label."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(1, 4, 3, padding=1)

    def forward(self, x):
        return self.conv(x).amax(dim=(2, 3))


@pytest.mark.parametrize(
    ("labels", "batch"),
    [([1, 2], 2), ((1, 2), 2), (np.array([1, 2]), 2), (np.array([1, 2], dtype=np.int32), 2), (torch.tensor([1, 2], dtype=torch.int32), 2), (3, 1), (np.int64(3), 1), (torch.tensor(3), 1)],
)
def test_labels_as_torch_takes_them(labels, batch):
    y = as_labels(labels, batch)
    expected = torch.as_tensor(np.asarray(labels)).long().reshape(batch)
    assert y.dtype == torch.long and torch.equal(y, expected)


@pytest.mark.parametrize(
    ("labels", "batch", "error", "message"),
    [
        ([1.0, 2.0], 2, TypeError, "integer class ids"),
        (np.array([0.5]), 1, TypeError, "integer class ids"),
        ([True, False], 2, TypeError, "integer class ids"),
        (True, 1, TypeError, r"labels must be a \(1,\) tensor, numpy array or list of int class ids, or one int, got True"),
        ("1", 1, TypeError, "got '1'"),
        (None, 1, TypeError, "got None"),
        ([1, [2]], 2, TypeError, "list"),
        ([1, 2, 3], 2, ValueError, r"shape \(2,\) to match the images, got \(3,\)"),
        (3, 2, ValueError, "one label .3. for 2 images"),
    ],
)
def test_labels_that_are_not_class_ids_are_refused(labels, batch, error, message):
    with pytest.raises(error, match=message):
        as_labels(labels, batch)


def test_certify_and_attack_take_lists_ints_and_arrays():
    model = robustwrap.wrap(Peak(), patch=3, image_size=12, num_masks=2).eval()
    x = torch.randn(2, 1, 12, 12, generator=torch.Generator().manual_seed(1))
    expected = model.certify(x, torch.tensor([1, 2]))
    for labels in ([1, 2], np.array([1, 2]), (1, 2)):
        result = model.certify(x, labels)
        assert torch.equal(result.certified, expected.certified) and torch.equal(result.prediction, expected.prediction)
    one = model.certify(x[:1], 1)
    assert torch.equal(one.certified, expected.certified[:1])
    with pytest.raises(ValueError, match=r"labels must be in \[0, 4\)"):
        model.certify(x, [1, 7])
    options = {"steps": 2, "locations": [(0, 0)], "bounds": (-4.0, 4.0), "progress": False}
    one = robustwrap.attack(model, x[:1], 1, generator=torch.Generator().manual_seed(0), **options)
    tensor = robustwrap.attack(model, x[:1], torch.tensor([1]), generator=torch.Generator().manual_seed(0), **options)
    assert torch.equal(one.x_adv, tensor.x_adv) and torch.equal(one.prediction, tensor.prediction)


@pytest.mark.parametrize("text", ["32", "32px", "2%", "0.5%", "0.02", ".5", "7PX"])
def test_the_cli_and_the_api_read_a_patch_the_same_way(text):
    assert parse_patch(text) == [read_patch(text)]
    assert [type(v) for v in parse_patch(text)] == [type(read_patch(text))]


@pytest.mark.parametrize(("text", "number"), [("2%", 0.02), ("5px", 5), ("0.1", 0.1), ("4", 4)])
def test_wrap_takes_the_cli_patch_spellings_for_every_defense(text, number):
    pc = robustwrap.wrap(Peak(), patch=text, image_size=32)
    assert pc.mask_set == robustwrap.wrap(Peak(), patch=number, image_size=32).mask_set
    sm = robustwrap.wrap(Peak(), patch=text, image_size=32, defense="smoothing", size=4)
    assert sm.patch == robustwrap.wrap(Peak(), patch=number, image_size=32, defense="smoothing", size=4).patch
    pg = robustwrap.wrap(bagnet_tiny(num_classes=3, in_chans=1), patch=text, image_size=32, defense="patchguard")
    assert pg.patch == robustwrap.wrap(bagnet_tiny(num_classes=3, in_chans=1), patch=number, image_size=32, defense="patchguard").patch
    pg.patch = text
    assert pg.patch == sm.patch
    with pytest.raises(ValueError, match="patch must be pixels"):
        robustwrap.wrap(Peak(), patch="2 percent", image_size=32)
