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


def test_runner_views_use_the_per_channel_fill():
    net = PeakNet(seed=1).eval()
    ms = MaskSet.square(12, 3, num_masks=3)
    x = torch.randn(4, 3, 12, 12, generator=torch.Generator().manual_seed(3))
    fill = (0.5, -1.0, 2.0)
    with torch.no_grad():
        labels, logits = ViewRunner(net, ms.keep_masks(), fill, 8).one_mask(x)
        views = torch.stack([masked_copy(x[b], [box], fill) for b in range(4) for box in ms.boxes])
        expected = net(views).reshape(4, len(ms), -1)
        zero = torch.stack([masked_copy(x[b], [box], 0.0) for b in range(4) for box in ms.boxes])
        at_zero = net(zero).argmax(1).reshape(4, len(ms))
    assert torch.allclose(logits, expected, atol=1e-5) and torch.equal(labels, expected.argmax(-1))
    assert not torch.equal(labels, at_zero)  # on these inputs the fill decides some labels


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


# ----------------------------------------------------------------- fast defaults (issue 14)
def test_auto_batch_size_rules():
    from robustwrap.views import auto_batch_size

    net = PeakNet()
    assert auto_batch_size(net, (16, 16)) == 256  # CPU: 2**18 pixels per pass, at most 256 views
    assert auto_batch_size(net, (32, 32)) == 256
    assert auto_batch_size(net, (64, 64)) == 64
    assert auto_batch_size(net, (224, 224)) == 8  # clamped to at least 8
    assert auto_batch_size(net, (32, 32), torch.device("cuda")) == 256
    assert auto_batch_size(net, (224, 224), torch.device("cuda")) == 64


def test_auto_channels_last_rules():
    import timm

    from robustwrap.views import auto_channels_last

    assert not auto_channels_last(PeakNet())  # one convolution (a ViT's patch embedding, say)
    resnet = timm.create_model("test_resnet", num_classes=3)
    assert auto_channels_last(resnet)
    assert not auto_channels_last(resnet, torch.device("cuda"))  # unmeasured on GPUs: contiguous
    assert all(p.is_contiguous() for p in resnet.parameters())


def test_channels_last_views_give_the_same_labels_and_run_in_that_layout():
    import timm

    net = timm.create_model("test_resnet", num_classes=5).eval()
    ms = MaskSet.square(32, 5, num_masks=3)
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    layouts = []
    handle = net.register_forward_hook(lambda module, inputs, output: layouts.append(inputs[0].is_contiguous(memory_format=torch.channels_last)))
    with torch.no_grad():
        labels_cl, logits_cl = ViewRunner(net, ms, 0.0, 8, channels_last=True).one_mask(x)
        labels, logits = ViewRunner(net, ms, 0.0, 8, channels_last=False).one_mask(x)
    handle.remove()
    n = -(-4 * len(ms) // 8)
    assert layouts == [True] * n + [False] * n
    assert torch.equal(labels_cl, labels)
    assert torch.allclose(logits_cl, logits, atol=1e-4)


def test_runner_batch_size_none_is_auto_and_given_wins():
    from robustwrap.views import auto_batch_size

    net = PeakNet()
    ms = MaskSet.square(16, 3, num_masks=4)
    assert ViewRunner(net, ms, 0.0).batch_size == auto_batch_size(net, (16, 16))
    assert ViewRunner(net, ms, 0.0, 3).batch_size == 3
    import robustwrap

    model = robustwrap.wrap(net, image_size=16, patch=3, num_masks=4).eval()
    assert model.batch_size == auto_batch_size(net, (16, 16))
    model.batch_size = 5
    model.num_classes  # the one blank probe, outside the count
    counter = ViewCounter(net)
    model.certify(torch.randn(2, 3, 16, 16), torch.zeros(2, dtype=torch.long), early_exit=False)
    k = len(model.mask_set)
    assert counter.calls == -(-2 * k // 5) + -(-k * (k - 1) // 5)  # 2K one-mask views, then 2 x K(K-1)/2 pairs, 5 per pass
    model.batch_size = None
    assert model.batch_size == auto_batch_size(net, (16, 16))


@pytest.mark.parametrize("sync_every", [2, 3])
def test_syncing_every_few_passes_changes_no_result(sync_every):
    """On an accelerator the scheduler looks at its bookkeeping once per step of passes; the
    outcome is the same as deciding after every pass, only a few more views may run."""
    from robustwrap.defenses.patchcleanser import rows_to_cancel

    net = PeakNet(seed=1)
    ms = MaskSet.square(16, 3, num_masks=4)
    x = torch.randn(6, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    pairs, owners = triangle_pairs(torch.arange(6), len(ms))
    expect = torch.tensor([0, 1, 2, 3, 0, 1])
    outcomes, steps = [], []
    with torch.no_grad():
        for every in (1, sync_every):
            runner = ViewRunner(net, ms, 0.0, 4, sync_every=every)
            calls = []
            on_step = lambda done, failed, calls=calls: calls.append(1) or torch.zeros_like(done)
            outcomes.append(runner.evaluate_pairs(x, pairs, owners, expect, need_logits=True, on_step=on_step))
            steps.append(len(calls))
        full = ViewRunner(net, ms, 0.0, 4).evaluate_pairs(x, pairs, owners, expect, early_exit=False)
    each, stepped = outcomes
    assert steps[1] < steps[0]  # the setting is used: fewer host synchronisations (else the rest proves nothing)
    assert torch.equal(each.failed, stepped.failed) and torch.equal(each.failed, full.failed)
    assert torch.equal(each.done, stepped.done)
    assert each.num_views <= stepped.num_views <= full.num_views
    ran = stepped.labels >= 0
    assert torch.equal(stepped.labels[ran], full.labels[ran])
    row_image, row_mask = torch.tensor([0, 0, 1]), torch.tensor([1, 2, 0])
    assert torch.equal(rows_to_cancel(row_image, row_mask, torch.tensor([True, False, False]), torch.tensor([False, False, True]), 6),
                       rows_to_cancel(row_image, row_mask, torch.tensor([True, False, False]), torch.tensor([False, False, True])))


def test_margin_guard_in_evaluate_pairs():
    net = PeakNet(seed=2)
    ms = MaskSet.square(16, 3, num_masks=3)
    x = torch.randn(5, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    pairs, owners = triangle_pairs(torch.arange(5), len(ms))
    runner = ViewRunner(net, ms, 0.0, 6)
    with torch.no_grad():
        plain = runner.evaluate_pairs(x, pairs, owners, torch.zeros(5, dtype=torch.long), early_exit=False)
        views = torch.stack([masked_copy(x[b], [ms.boxes[i], ms.boxes[j]], 0.0) for b, i, j in pairs.tolist()])
        top2 = net(views).topk(2, dim=1).values
    gap = top2[:, 0] - top2[:, 1]
    margin = float(gap.median())
    expect = plain.labels.reshape(5, -1)[:, 0]  # each image expects its first view's label
    with torch.no_grad():
        guarded = runner.evaluate_pairs(x, pairs, owners, expect, early_exit=False, guard=torch.tensor([True, True, True, False, False]), margin=margin)
    assert torch.equal(guarded.sure, gap > margin)
    for g in range(5):
        mine = pairs[:, 0] == g
        wrong = (plain.labels[mine] != expect[g]).any()
        unsure = (gap[mine] <= margin).any()
        assert bool(guarded.failed[g]) == bool(wrong or (g < 3 and unsure)), g
    assert guarded.failed[:3].sum() > (plain.labels.reshape(5, -1)[:3] != expect[:3, None]).any(1).sum()
