"""The view runner: view construction, pair scheduling and view counts."""

from __future__ import annotations

import pytest
import torch
from conftest import PeakNet, ViewCounter, masked_copy

from robustwrap import MaskSet
from robustwrap.views import ViewRunner, mask_images, row_pairs, triangle_pairs


def test_mask_images_matches_slicing():
    ms = MaskSet.square(12, 3, num_masks=3)
    keep = ms.keep_masks()
    x = torch.randn(2, 3, 12, 12)
    fill = torch.tensor([0.5, -1.0, 2.0]).reshape(3, 1, 1)
    got = mask_images(x[[0, 1, 1]], keep[[0, 4, 2]] & keep[[8, 4, 3]], fill)
    expected = [masked_copy(x[b], [ms.boxes[i], ms.boxes[j]], [0.5, -1.0, 2.0]) for b, i, j in [(0, 0, 8), (1, 4, 4), (1, 2, 3)]]
    assert torch.equal(got, torch.stack(expected))


def test_triangle_pairs():
    pairs, owners = triangle_pairs(torch.tensor([3, 5]), 4)
    assert pairs.shape == (12, 3)
    assert pairs[:6, 0].tolist() == [3] * 6 and pairs[6:, 0].tolist() == [5] * 6
    assert all(i < j for _, i, j in pairs.tolist())
    assert owners[:, 0].tolist() == [0] * 6 + [1] * 6 and (owners[:, 1] == -1).all()
    assert triangle_pairs(torch.tensor([0]), 4, diagonal=True)[0].shape == (10, 3)


def test_row_pairs_evaluates_each_unordered_view_once():
    row_image, row_mask = torch.tensor([0, 0, 0, 2]), torch.tensor([1, 3, 4, 1])
    pairs, owners = row_pairs(row_image, row_mask, 5)
    keys = [tuple(p) for p in pairs.tolist()]
    assert len(keys) == len(set(keys))
    expected = {}
    for g, (b, r) in enumerate(zip(row_image.tolist(), row_mask.tolist())):
        for j in range(5):
            if j != r:
                expected.setdefault((b, min(r, j), max(r, j)), []).append(g)
    assert set(keys) == set(expected)
    for (b, i, j), (o1, o2) in zip(keys, owners.tolist()):
        assert sorted([o for o in (o1, o2) if o >= 0]) == sorted(expected[(b, i, j)])
    # rows 1, 3, 4 of image 0 share the views (1,3), (1,4), (3,4): 3 rows x 4 views - 3 shared
    assert int((pairs[:, 0] == 0).sum()) == 12 - 3


def test_evaluate_pairs_counts_what_it_runs():
    net = PeakNet()
    ms = MaskSet.square(16, 3, num_masks=4)
    engine = ViewRunner(net, ms.keep_masks(), 0.0, batch_size=10)
    x = torch.randn(5, 3, 16, 16)
    pairs, owners = triangle_pairs(torch.arange(5), len(ms))
    counter = ViewCounter(net)
    impossible = torch.full((5,), 3)
    with torch.inference_mode():
        full = engine.evaluate_pairs(x, pairs, owners, impossible, early_exit=False)
        assert full.num_views == counter.images == pairs.shape[0]
        assert counter.calls == -(-pairs.shape[0] // 10)
        counter.images = 0
        lazy = engine.evaluate_pairs(x, pairs, owners, impossible, early_exit=True)
    assert lazy.num_views == counter.images == int((lazy.labels >= 0).sum())
    assert lazy.num_views < full.num_views
    evaluated = lazy.labels >= 0
    assert torch.equal(lazy.labels[evaluated], full.labels[evaluated])
    assert torch.equal(lazy.failed, full.failed)


def test_model_with_wrong_output_shape():
    class Bad(torch.nn.Module):
        def forward(self, x):
            return x.mean((1, 2, 3))

    engine = ViewRunner(Bad(), MaskSet.square(8, 2, num_masks=2), 0.0, 4)
    with pytest.raises(ValueError, match=r"must map \(N, C, H, W\) images to \(N, num_classes\) logits; for 4 images it returned \(4,\)"):
        engine.one_mask(torch.zeros(1, 3, 8, 8))
