"""Masking augmentations: masking against slicing, the searches against brute force, view counts, modes."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import PeakNet, ViewCounter, masked_copy
from torch import nn

import robustwrap
from robustwrap import MaskSet
from robustwrap.augment import (
    GreedyCutout,
    GridCutout,
    MultiSizeGreedyCutout,
    RandomCutout,
    RandomMaskCutout,
    apply_boxes,
    apply_masks,
    create_augmentation,
)

SET9 = MaskSet.square(12, 3, num_masks=3)  # 3x3 masks of 6 px on 12x12 images
SET36 = MaskSet.square(14, 3, num_masks=6)  # 6x6 masks of 4 px on 14x14 images
SET25 = MaskSet.square(12, 3, num_masks=5)  # 5x5 masks of 4 px: an odd grid to coarsen


def batch(n: int, size: int, seed: int = 0, dtype=torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=g, dtype=dtype), torch.randint(0, 4, (n,), generator=g)


def net64(seed: int = 0) -> PeakNet:
    # float64 so that batched and one-by-one losses agree to far below any gap between candidates
    return PeakNet(seed=seed).double()


@torch.no_grad()
def losses(net: nn.Module, image: torch.Tensor, label: torch.Tensor, views: list[list[tuple]], fill=0.0) -> list[float]:
    """Cross entropy of `image` with each list of boxes hidden, every view built by slicing."""
    net.eval()
    x = torch.stack([masked_copy(image, boxes, fill) for boxes in views])
    return F.cross_entropy(net(x), label.expand(len(views)), reduction="none").tolist()


def first_argmax(values: list[float]) -> int:
    return max(range(len(values)), key=values.__getitem__)


# ------------------------------------------------------------------------------------ functional
def test_apply_masks_matches_slicing():
    x, _ = batch(3, 12, dtype=torch.float32)
    fill = (0.5, -1.0, 2.0)
    boxes = SET9.boxes
    got = apply_masks(x, SET9, torch.tensor([[0, 8], [4, 4], [2, 3]]), fill)
    expected = [
        masked_copy(x[0], [boxes[0], boxes[8]], fill),
        masked_copy(x[1], [boxes[4]], fill),
        masked_copy(x[2], [boxes[2], boxes[3]], fill),
    ]
    assert torch.equal(got, torch.stack(expected))
    assert torch.equal(
        apply_masks(x, SET9, torch.tensor([1, 5, 7])), torch.stack([masked_copy(x[b], [boxes[i]], 0.0) for b, i in enumerate([1, 5, 7])])
    )


def test_apply_boxes_clips_at_the_border():
    x, _ = batch(2, 12, dtype=torch.float32)
    got = apply_boxes(x, torch.tensor([[[-3, 10, 6, 6]], [[4, 4, 2, 3]]]), 1.5)
    assert torch.equal(got[0], masked_copy(x[0], [(0, 10, 3, 2)], 1.5))
    assert torch.equal(got[1], masked_copy(x[1], [(4, 4, 2, 3)], 1.5))


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda x: apply_masks(x, SET9, torch.tensor([0, 9])), ValueError, r"\[0, 9\)"),
        (lambda x: apply_masks(x, SET9, torch.tensor([0, 1, 2])), ValueError, r"shape \(2,\)"),
        (lambda x: apply_masks(x, SET9, torch.tensor([0.0, 1.0])), TypeError, "integer"),
        (lambda x: apply_masks(x[..., :10], SET9, torch.tensor([0, 1])), ValueError, "12x12"),
        (lambda x: apply_masks(x, SET9, torch.tensor([0, 1]), fill=(0.0, 1.0)), ValueError, "3 channels"),
        (lambda x: apply_boxes(x, torch.tensor([[0, 0, 2, 2]] * 2)), ValueError, r"\(2, n, 4\)"),
    ],
)
def test_functional_input_errors(call, error, match):
    x, _ = batch(2, 12, dtype=torch.float32)
    with pytest.raises(error, match=match):
        call(x)


# ------------------------------------------------------------------------------------- random
def test_random_cutout_is_the_scaled_patchcleanser_recipe():
    assert RandomCutout().hole_size((224, 224)) == (128, 128)
    assert RandomCutout().hole_size((28, 28)) == (16, 16)
    assert RandomCutout(size=(3, 5)).hole_size((28, 28)) == (3, 5)
    x = torch.randn(400, 1, 28, 28)
    aug = RandomCutout(fill=0.25, generator=torch.Generator().manual_seed(0))
    out, boxes = aug(x, return_indices=True)
    assert boxes.shape == (400, 2, 4)
    top, left, h, w = boxes.unbind(-1)
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= 28).all() and (left + w <= 28).all()
    assert (h >= 1).all() and (h <= 16).all() and (w <= 16).all()
    # centres are uniform over the 28 pixels of each axis: a 16 px hole is clipped at the top or
    # left when its centre is one of the first 8 pixels, at the bottom or right when one of the last 7
    for start, size in ((top, h), (left, w)):
        clipped_first = ((start == 0) & (size < 16)).float().mean()
        clipped_last = ((start + size == 28) & (size < 16)).float().mean()
        assert abs(clipped_first - 8 / 28) < 0.05 and abs(clipped_last - 7 / 28) < 0.05  # 800 holes: 3 standard deviations
    assert ((h == 16) & (w == 16)).float().mean() > 0.2
    assert torch.equal(out, torch.stack([masked_copy(x[b], boxes[b].tolist(), 0.25) for b in range(400)]))
    again = RandomCutout(fill=0.25, generator=torch.Generator().manual_seed(0))(x, return_indices=True)[1]
    assert torch.equal(again, boxes)


def test_random_mask_cutout_draws_two_masks_of_the_set():
    x, _ = batch(500, 12, dtype=torch.float32)
    aug = RandomMaskCutout(SET9, fill=(1.0, 2.0, 3.0), generator=torch.Generator().manual_seed(0))
    out, idx = aug(x, return_indices=True)
    assert idx.shape == (500, 2) and idx.min() == 0 and idx.max() == 8
    assert torch.equal(out, apply_masks(x, SET9, idx, (1.0, 2.0, 3.0)))
    # independent uniform draws: every ordered pair shows up, the same mask twice included
    assert len(set(map(tuple, idx.tolist()))) > 70 and (idx[:, 0] == idx[:, 1]).any()


# ------------------------------------------------------------------------------------- searches
@pytest.mark.parametrize("mask_set", [SET9, SET36], ids=["9", "36"])
def test_greedy_cutout_equals_brute_force_and_evaluates_2k_minus_1_views(mask_set):
    net, k, size = net64(1), len(mask_set), mask_set.image_size[0]
    x, y = batch(6, size, seed=1)
    boxes = mask_set.boxes
    counter = ViewCounter(net)
    aug = GreedyCutout(mask_set, net, batch_size=16)
    out, idx = aug(x, y, return_indices=True)
    assert aug.views_per_image == 2 * k - 1 == {9: 17, 36: 71}[k]
    assert counter.images == 6 * (2 * k - 1)
    assert counter.calls == math.ceil(6 * k / 16) + math.ceil(6 * (k - 1) / 16)  # images share passes
    expected = []
    for b in range(6):
        m1 = first_argmax(losses(net, x[b], y[b], [[boxes[i]] for i in range(k)]))
        others = [j for j in range(k) if j != m1]
        m2 = others[first_argmax(losses(net, x[b], y[b], [[boxes[m1], boxes[j]] for j in others]))]
        expected.append([m1, m2])
    assert idx.tolist() == expected
    assert len({m1 for m1, _ in expected}) > 1  # the choice depends on the image
    assert torch.equal(out, torch.stack([masked_copy(x[b], [boxes[i] for i in expected[b]], 0.0) for b in range(6)]))


@pytest.mark.parametrize("mask_set", [SET36, SET25], ids=["6x6", "5x5"])
def test_multisize_greedy_cutout_equals_brute_force(mask_set):
    net, size = net64(2), mask_set.image_size[0]
    x, y = batch(6, size, seed=2)
    fine, coarse = mask_set.boxes, mask_set.coarsen(2)
    counter = ViewCounter(net)
    aug = MultiSizeGreedyCutout(mask_set, net, fill=0.5, batch_size=64)
    idx = aug(x, y, return_indices=True)[1]
    counter.remove()
    expected, views = [], 0
    for b in range(6):
        c1 = first_argmax(losses(net, x[b], y[b], [[box] for box in coarse.boxes], 0.5))
        kids = coarse.children[c1]
        f1 = kids[first_argmax(losses(net, x[b], y[b], [[fine[f]] for f in kids], 0.5))]
        c2 = first_argmax(losses(net, x[b], y[b], [[fine[f1], box] for box in coarse.boxes], 0.5))
        kids2 = coarse.children[c2]
        f2 = kids2[first_argmax(losses(net, x[b], y[b], [[fine[f1], fine[f]] for f in kids2], 0.5))]
        expected.append([f1, f2])
        views += 2 * len(coarse) + len(kids) + len(kids2)
    assert idx.tolist() == expected
    assert counter.images == views
    if mask_set is SET36:
        assert aug.views_per_image == 26 and views == 6 * 26 and counter.calls == 4  # 54, 24, 54, 24 views
    else:
        assert views < 6 * aug.views_per_image  # edge coarse masks merge fewer fine masks


def test_grid_cutout_is_the_worst_of_all_certification_views():
    net = net64(3)
    x, y = batch(5, 12, seed=3)
    boxes = SET9.boxes
    counter = ViewCounter(net)
    aug = GridCutout(SET9, net, batch_size=100)
    idx = aug(x, y, return_indices=True)[1]
    assert aug.views_per_image == 45 and counter.images == 5 * 45 and counter.calls == 3
    pairs = [(i, j) for i in range(9) for j in range(i, 9)]
    expected = [list(pairs[first_argmax(losses(net, x[b], y[b], [[boxes[i], boxes[j]] for i, j in pairs]))]) for b in range(5)]
    assert idx.tolist() == expected
    assert GridCutout(SET36, net).views_per_image == 666


def test_grid_cutout_loss_bounds_the_greedy_ones():
    net = net64(4)
    x, y = batch(8, 14, seed=4)

    def chosen_loss(aug):
        with torch.no_grad():
            return F.cross_entropy(net(aug(x, y)), y, reduction="none")

    grid = chosen_loss(GridCutout(SET36, net))
    for aug in (GreedyCutout(SET36, net), MultiSizeGreedyCutout(SET36, net), RandomMaskCutout(SET36)):
        assert (grid >= chosen_loss(aug) - 1e-12).all()


def test_search_runs_in_eval_mode_without_grad_and_restores_every_mode():
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.Dropout(0.5),
        nn.Conv2d(4, 4, 1),
        nn.BatchNorm2d(4),
        nn.AdaptiveMaxPool2d(1),
        nn.Flatten(),
    )
    net.train()
    net[4].eval()  # a frozen BatchNorm must stay frozen
    stats = net[1].running_mean.clone()
    x, y = batch(4, 12, dtype=torch.float32)
    aug = GreedyCutout(SET9, net)
    first = aug(x, y, return_indices=True)
    assert net.training and net[1].training and net[2].training and not net[4].training
    assert torch.equal(net[1].running_mean, stats)  # eval mode: BatchNorm statistics untouched
    assert all(p.grad is None for p in net.parameters()) and not first[0].requires_grad
    again = aug(x, y, return_indices=True)  # eval mode: no dropout noise in the search
    assert torch.equal(first[1], again[1])
    net.eval()
    assert torch.equal(aug(x, y, return_indices=True)[1], first[1])
    assert not net.training  # and an eval model stays in eval mode


def test_search_with_a_wrapped_model_uses_its_base_model():
    net = PeakNet()
    robust = robustwrap.wrap(net, mask_set=SET9).eval()
    x, y = batch(3, 12, dtype=torch.float32)
    counter = ViewCounter(net)
    idx = GreedyCutout(SET9, robust)(x, y, return_indices=True)[1]
    assert counter.images == 3 * 17  # not the robust forward's double masking
    assert torch.equal(idx, GreedyCutout(SET9, net)(x, y, return_indices=True)[1])
    assert not robust.training


def test_search_input_errors():
    net = PeakNet()
    x, y = batch(2, 12, dtype=torch.float32)
    aug = GreedyCutout(SET9, net)
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        aug(x, torch.tensor([0, 4]))
    with pytest.raises(TypeError, match="integer"):
        aug(x, y.float())
    with pytest.raises(ValueError, match=r"shape \(2,\)"):
        aug(x, y[:1])
    with pytest.raises(ValueError, match="12x12"):
        aug(x[..., :11, :11], y)
    with pytest.raises(ValueError, match="num_classes"):
        GreedyCutout(SET9, nn.Conv2d(3, 4, 3))(x, y)
    with pytest.raises(ValueError, match="not a union"):
        MultiSizeGreedyCutout(SET9 | MaskSet.square(12, 2, num_masks=3), net)
    with pytest.raises(TypeError, match="nn.Module"):
        GreedyCutout(SET9, lambda v: v)


def test_create_augmentation_by_name():
    net = PeakNet()
    kinds = {
        "random_cutout": RandomCutout,
        "random_mask": RandomMaskCutout,
        "greedy": GreedyCutout,
        "multisize_greedy": MultiSizeGreedyCutout,
        "grid": GridCutout,
    }
    for name, cls in kinds.items():
        aug = create_augmentation(name, SET9, net, fill=0.5, batch_size=7)
        assert type(aug) is cls and aug.fill == 0.5
    assert create_augmentation("greedy", SET9, net, batch_size=7).batch_size == 7
    with pytest.raises(ValueError, match="'greedy', 'multisize_greedy', 'grid'"):
        create_augmentation("greedy_cutout", SET9, net)
    with pytest.raises(ValueError, match="model="):
        create_augmentation("grid", SET9)
