"""PatchCleanser: the rule against a literal reading of the Concepts page, and the defended
classifier against brute force (exactness, view counts, soundness, inputs)."""

from __future__ import annotations

import pytest
import timm
import torch
import torchvision
from conftest import PeakNet, ViewCounter, brute_force_certified, brute_force_decide, brute_force_grid, masked_copy
from torch import nn

import robustwrap
from robustwrap import MaskSet, PatchCleanser
from robustwrap.defenses import patchcleanser as rule


def make(seed=0, batch_size=13, **kwargs):
    net = PeakNet(seed=seed)
    kwargs.setdefault("patch", 3)
    kwargs.setdefault("num_masks", 4)
    return robustwrap.wrap(net, image_size=16, batch_size=batch_size, **kwargs).eval(), net


def images(n=24, seed=0, size=16):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_predict_equals_rule_on_brute_force_grid(seed):
    model, net = make(seed)
    x = images(seed=seed)
    grid = brute_force_grid(net, x, model.mask_set.boxes)
    one = grid.diagonal(dim1=1, dim2=2)
    expected = [brute_force_decide(one[b].tolist(), grid[b].tolist()) for b in range(x.shape[0])]
    assert model.predict(x).tolist() == [label for label, _ in expected]
    assert model(x).argmax(1).tolist() == [label for label, _ in expected]
    assert {case for _, case in expected} == {1, 2, 3}  # the test exercises every case


def test_forward_logits_are_the_mean_of_the_voting_views():
    model, net = make(1)
    x = images(seed=1)
    boxes = model.mask_set.boxes
    k = len(boxes)
    grid = brute_force_grid(net, x, boxes)
    logits = model(x)
    result = model.certify(x, model.predict(x))
    with torch.no_grad():
        for b in range(x.shape[0]):
            one = grid[b].diagonal().tolist()
            label, case = brute_force_decide(one, grid[b].tolist())
            if case == 2:
                i = next(i for i in range(k) if one[i] == label and all(grid[b, i, j] == label for j in range(k)))
                views = [masked_copy(x[b], [boxes[i], boxes[j]], 0.0) for j in range(k)]
            else:
                views = [masked_copy(x[b], [boxes[i]], 0.0) for i in range(k) if one[i] == label]
            expected = net(torch.stack(views)).mean(0)
            assert torch.allclose(logits[b], expected, atol=1e-5), (b, case)
            assert result.case[b] == case


@pytest.mark.parametrize("seed", [0, 3])
def test_certify_early_exit_equals_full_grid_with_fewer_views(seed):
    model, net = make(seed)
    x = images(seed=seed)
    y = torch.where(torch.arange(24) % 3 == 0, torch.randint(0, 4, (24,), generator=torch.Generator().manual_seed(seed)), model.predict(x))
    counter = ViewCounter(net)
    fast = model.certify(x, y)
    fast_images = counter.images
    counter.images = 0
    full = model.certify(x, y, early_exit=False)
    k = len(model.mask_set)
    for field in ("prediction", "certified", "case", "one_mask"):
        assert torch.equal(getattr(fast, field), getattr(full, field)), field
    assert fast.total_views == fast_images and full.total_views == counter.images
    assert full.num_views.tolist() == [k * (k + 1) // 2] * 24
    assert fast.total_views < full.total_views
    assert torch.equal(fast.num_views[fast.certified], full.num_views[fast.certified])
    assert fast.certified.any() and not fast.certified.all()


def test_certify_matches_brute_force():
    model, net = make(2)
    x = images(seed=2)
    y = model.predict(x)
    grid = brute_force_grid(net, x, model.mask_set.boxes)
    expected = [brute_force_certified(grid[b].tolist(), int(y[b])) for b in range(24)]
    assert model.certify(x, y).certified.tolist() == expected
    assert torch.equal(model.certify(x, y, early_exit=False).grid, grid)
    sparse = model.certify(x, y).grid
    assert torch.equal(sparse[sparse >= 0], grid[sparse >= 0]) and (sparse < 0).any()
    assert any(expected) and not all(expected)


def test_predict_views_stay_below_full_grid_and_batches_are_full():
    model, net = make(0, batch_size=16)
    x = images()
    counter = ViewCounter(net)
    model.predict(x)
    k = len(model.mask_set)
    assert counter.images < x.shape[0] * k * (k + 1) // 2
    # views of several images share forward passes: all but at most two passes are full
    assert counter.calls <= -(-counter.images // 16) + 1


def paste(x, top, left, content):
    out = x.clone()
    out[:, :, top : top + content.shape[-2], left : left + content.shape[-1]] = content
    return out


@pytest.mark.parametrize("seed", [0, 1])
def test_soundness_no_patch_changes_a_certified_prediction(seed):
    model, net = make(seed, batch_size=256)
    x = images(seed=seed)
    y = model.predict(x)
    cert = model.certify(x, y).certified
    assert cert.sum() >= 2
    xs, ys = x[cert][:3], y[cert][:3]
    p = model.mask_set.patch_size[0]
    g = torch.Generator().manual_seed(seed)
    contents = [torch.full((3, p, p), 10.0), torch.full((3, p, p), -10.0), torch.randn(3, p, p, generator=g) * 5]
    attacked, expected = [], []
    for b in range(xs.shape[0]):
        for content in contents:
            for top in range(16 - p + 1):
                for left in range(16 - p + 1):
                    attacked.append(paste(xs[b : b + 1], top, left, content)[0])
                    expected.append(int(ys[b]))
    attacked = torch.stack(attacked)
    assert model.predict(attacked).tolist() == expected
    # the patches are strong: they do flip the undefended base model on some positions
    with torch.no_grad():
        assert (net(attacked).argmax(1) != torch.tensor(expected)).any()


def test_soundness_check_has_teeth_without_covering():
    """With one mask missing (an unsound set), the same patch search finds a certified image flipped."""
    model, net = make(0, batch_size=256)
    full = model.mask_set
    x = images(n=64, seed=5)
    flipped = False
    for drop in range(len(full)):
        boxes = full.boxes[:drop] + full.boxes[drop + 1 :]
        holey = object.__new__(MaskSet)  # bypass the covering check on purpose
        object.__setattr__(holey, "__dict__", {**full.__dict__, "boxes": boxes, "grid": None})
        weak = PatchCleanser(net, holey, batch_size=256).eval()
        y = weak.predict(x)
        cert = weak.certify(x, y).certified
        p = full.patch_size[0]
        for b in cert.nonzero()[:, 0].tolist()[:4]:
            attacked = torch.stack([paste(x[b : b + 1], t, l, torch.full((3, p, p), s))[0] for t in range(14) for l in range(14) for s in (10.0, -10.0)])
            if (weak.predict(attacked) != y[b]).any():
                flipped = True
                break
        if flipped:
            break
    assert flipped


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", ["timm", "torchvision", "sequential"])
def test_real_architectures(kind, dtype):
    torch.manual_seed(0)
    if kind == "timm":
        net = timm.create_model("test_resnet", num_classes=5)
    elif kind == "torchvision":
        net = torchvision.models.get_model("resnet18", weights=None, num_classes=5)
    else:
        net = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2), nn.ReLU(), nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Linear(8, 5))
    net = net.to(dtype).eval()
    model = robustwrap.wrap(net, patch=0.03, num_masks=3, image_size=48, batch_size=16).eval()
    x = torch.randn(4, 3, 48, 48)
    y = model.predict(x)
    assert y.shape == (4,) and model(x).argmax(1).tolist() == y.tolist()
    grid = brute_force_grid(net, x.to(dtype), model.mask_set.boxes)
    one = grid.diagonal(dim1=1, dim2=2)
    assert y.tolist() == [brute_force_decide(one[b].tolist(), grid[b].tolist())[0] for b in range(4)]
    fast, full = model.certify(x, y), model.certify(x, y, early_exit=False)
    assert torch.equal(fast.certified, full.certified) and torch.equal(fast.prediction, y)
    assert fast.certified.tolist() == [brute_force_certified(grid[b].tolist(), int(y[b])) for b in range(4)]


def test_timm_image_size_defaults_to_pretrained_cfg():
    net = timm.create_model("test_resnet", num_classes=3)
    model = robustwrap.wrap(net)
    assert model.image_size == tuple(net.pretrained_cfg["input_size"][1:]) == (160, 160)
    assert model.mask_set.patch_size == (23, 23)  # 2% of 160x160
    assert model.in_chans == 3 and model.num_classes == 3
    assert model.model is net and not hasattr(model, "module")


def test_train_mode_is_the_base_model_and_certify_restores_mode():
    model, net = make()
    model.train()
    x = images(4)
    assert torch.equal(model(x), net(x))
    bn = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.AdaptiveMaxPool2d(1), nn.Flatten())
    wrapped = robustwrap.wrap(bn, patch=3, num_masks=2, image_size=16).train()
    before = bn[1].running_mean.clone()
    wrapped.certify(x, torch.zeros(4, dtype=torch.long))
    assert torch.equal(bn[1].running_mean, before) and wrapped.training and bn.training


def test_state_dict_round_trip():
    model, net = make(0)
    other, _ = make(7)
    assert set(model.state_dict()) == {f"model.{k}" for k in net.state_dict()}
    other.load_state_dict(model.state_dict())
    x = images(8)
    assert torch.equal(other(x), model(x))


def test_per_channel_fill_is_used():
    model, net = make(fill=[1.0, -2.0, 0.5])
    x = images(3)
    grid = brute_force_grid(net, x, model.mask_set.boxes, fill=[1.0, -2.0, 0.5])
    one = grid.diagonal(dim1=1, dim2=2)
    assert model.predict(x).tolist() == [brute_force_decide(one[b].tolist(), grid[b].tolist())[0] for b in range(3)]


def test_wrap_argument_errors():
    net = PeakNet()
    with pytest.raises(ValueError, match="image_size is required"):
        robustwrap.wrap(net)
    with pytest.raises(ValueError, match="not both"):
        robustwrap.wrap(net, patch=3, mask_set=MaskSet.square(16, 3), image_size=16)
    with pytest.raises(ValueError, match="does not match"):
        robustwrap.wrap(net, mask_set=MaskSet.square(16, 3), image_size=20)
    with pytest.raises(ValueError, match="fill has 2 values but the model takes 3 channels"):
        robustwrap.wrap(net, image_size=16, fill=[0.0, 1.0])
    with pytest.raises(ValueError, match="larger than the 16x16 image"):
        robustwrap.wrap(net, image_size=16, patch=17)
    with pytest.raises(ValueError, match="patch must be a positive int, got 0"):
        robustwrap.wrap(net, image_size=16, patch=0)
    with pytest.raises(ValueError, match="num_masks must be a positive int, got 0"):
        robustwrap.wrap(net, image_size=16, num_masks=0)
    with pytest.raises(ValueError, match="not both"):
        robustwrap.wrap(net, image_size=16, num_masks=3, stride=4)
    # "not given" is None: num_masks=None is the default 6 per axis, not an error
    assert robustwrap.wrap(net, image_size=16, patch=3, num_masks=None).mask_set == MaskSet.square(16, 3, num_masks=6)
    with pytest.raises(TypeError, match="already a RobustPatchClassifier"):
        robustwrap.wrap(robustwrap.wrap(net, image_size=16), image_size=16)
    assert len(robustwrap.wrap(net, image_size=16, patch=3, stride=4).mask_set) == 16
    assert robustwrap.wrap(net, mask_set=MaskSet.square(16, 3)).mask_set.image_size == (16, 16)


@pytest.mark.parametrize(
    "x,y,error,message",
    [
        (torch.zeros(3, 16, 16), None, ValueError, r"must have shape \(B, C, H, W\), got shape \(3, 16, 16\)"),
        (torch.zeros(0, 3, 16, 16), None, ValueError, "empty batch"),
        (torch.zeros(2, 3, 16, 16, dtype=torch.uint8), None, TypeError, "floating tensor.*torch.uint8"),
        (torch.zeros(2, 1, 16, 16), None, ValueError, "must have 3 channels for this model, got 1"),
        (torch.zeros(2, 3, 16, 17), None, ValueError, "must be 16x16 for this mask set, got 16x17"),
        (torch.full((2, 3, 16, 16), float("nan")), None, ValueError, "NaN or Inf"),
        (torch.full((2, 3, 16, 16), float("inf")), None, ValueError, "NaN or Inf"),
        ([[0.0]], None, TypeError, "must be a torch.Tensor"),
        (torch.zeros(2, 3, 16, 16), torch.zeros(3, dtype=torch.long), ValueError, r"labels must have shape \(2,\).*got \(3,\)"),
        (torch.zeros(2, 3, 16, 16), torch.tensor([0, 4]), ValueError, r"labels must be in \[0, 4\), got values from 0 to 4"),
        (torch.zeros(2, 3, 16, 16), torch.tensor([-1, 0]), ValueError, r"labels must be in \[0, 4\)"),
        (torch.zeros(2, 3, 16, 16), torch.tensor([0.0, 1.0]), TypeError, "labels must be integer class ids.*got dtype torch.float32"),
        (torch.zeros(2, 3, 16, 16), [0.0, 1.0], TypeError, "labels must be integer class ids"),  # lists of ints are labels as torch takes them
    ],
)
def test_bad_input_fails_before_any_forward_pass(x, y, error, message):
    model, net = make()
    model.num_classes  # resolved once, as any first call would
    counter = ViewCounter(net)
    with pytest.raises(error, match=message):
        if y is None:
            model.predict(x)
        else:
            model.certify(x, y)
    assert counter.images == 0


def test_num_classes_is_probed_once_when_the_model_does_not_say():
    net = PeakNet()
    counter = ViewCounter(net)
    model = robustwrap.wrap(net, patch=3, num_masks=4, image_size=16)  # probed here: a model of one class is refused at wrap
    assert counter.images == 1
    assert model.num_classes == 4 and counter.images == 1
    wrapped = robustwrap.wrap(timm.create_model("test_resnet", num_classes=6), image_size=32, patch=4)
    counter = ViewCounter(wrapped.model)
    assert wrapped.num_classes == 6 and counter.images == 0


# ---------------------------------------------------------------------------------- the rule
def random_grids(seed: int, batch: int = 400, k: int = 5, classes: int = 3):
    """Symmetric label grids where some rows agree with their one-mask label, so that all three
    cases occur (uniform random grids almost never give Case II)."""
    g = torch.Generator().manual_seed(seed)
    one = torch.randint(0, classes, (batch, k), generator=g)
    # bias towards a majority so that Case I occurs too
    lucky = torch.rand(batch, generator=g) < 0.3
    one[lucky] = one[lucky, :1]
    grid = torch.randint(0, classes, (batch, k, k), generator=g)
    grid = torch.triu(grid) + torch.triu(grid, 1).transpose(1, 2)
    for b in range(batch):
        for i in range(k):
            if torch.rand(1, generator=g).item() < 0.5:
                grid[b, i, :] = one[b, i]
                grid[b, :, i] = one[b, i]
        grid[b].fill_diagonal_(0)
        grid[b] += torch.diag(one[b])
    return one, grid


def test_decide_matches_brute_force_in_all_cases():
    seen = set()
    for seed in range(3):
        one, grid = random_grids(seed)
        decision = rule.decide(one, grid)
        for b in range(one.shape[0]):
            label, case = brute_force_decide(one[b].tolist(), grid[b].tolist())
            assert (int(decision.label[b]), int(decision.case[b])) == (label, case)
            seen.add(case)
            if case == 2:
                i = int(decision.winner[b])
                assert one[b, i] == label and (grid[b, i] == label).all()
                assert all(not (grid[b, j] == one[b, j]).all() or one[b, j] == decision.majority[b] for j in range(i))
            else:
                assert decision.winner[b] == -1
    assert seen == {1, 2, 3}


def test_majority_ties_go_to_smallest_class():
    one = torch.tensor([[2, 2, 1, 1], [3, 0, 3, 0], [5, 4, 4, 5], [1, 2, 3, 0]])
    assert rule.majority(one).tolist() == [1, 0, 4, 0]


def test_case_two_first_agreeing_disagreer_wins():
    # majority 0; masks 1 and 3 disagree (labels 1 and 2) and both rows agree: mask 1 wins.
    one = torch.tensor([[0, 1, 0, 2, 0]])
    grid = torch.zeros(1, 5, 5, dtype=torch.long)
    grid[0, 1, :] = grid[0, :, 1] = 1
    grid[0, 3, :] = grid[0, :, 3] = 2
    grid[0, 1, 3] = grid[0, 3, 1] = 1  # the shared view agrees with row 1 only
    grid[0] += torch.diag(one[0] - grid[0].diagonal())
    d = rule.decide(one, grid)
    assert (d.label.item(), d.case.item(), d.winner.item()) == (1, 2, 1)


def test_unevaluated_views_never_count_as_agreement():
    one = torch.tensor([[0, 1, 0]])
    grid = torch.full((1, 3, 3), -1)
    grid[0, 1, 1] = 1
    d = rule.decide(one, grid)
    assert (d.label.item(), d.case.item()) == (0, 3)
    full = torch.full((1, 3, 3), 2)
    assert rule.certified(full, torch.tensor([2])).item()
    full[0, 0, 2] = -1
    assert not rule.certified(full, torch.tensor([2])).item()


def test_certified_matches_brute_force():
    for seed in range(3):
        one, grid = random_grids(seed, k=4, classes=2)
        target = one[:, 0]
        got = rule.certified(grid, target)
        expected = [brute_force_certified(grid[b].tolist(), int(target[b])) for b in range(one.shape[0])]
        assert got.tolist() == expected
        assert any(expected) and not all(expected)


def test_certified_reads_upper_triangle_and_diagonal_only():
    grid = torch.full((1, 3, 3), 7)
    grid[0, 2, 0] = 1  # lower triangle: the same view as (0, 2) in a symmetric grid, never read
    assert rule.certified(grid, torch.tensor([7])).item()
    grid[0, 1, 1] = 1
    assert not rule.certified(grid, torch.tensor([7])).item()


def brute_force_cancel(row_image, row_mask, done, failed):
    cancel = []
    for g in range(len(row_image)):
        mine = [h for h in range(len(row_image)) if row_image[h] == row_image[g]]
        open_rows = sorted((row_mask[h], h) for h in mine if not failed[h])
        winner = open_rows[0][1] if open_rows and done[open_rows[0][1]] else None
        cancel.append(winner is not None and row_mask[g] > row_mask[winner])
    return cancel


def test_rows_to_cancel_matches_brute_force():
    gen = torch.Generator().manual_seed(0)
    for _ in range(50):
        n = int(torch.randint(1, 12, (1,), generator=gen))
        row_image = torch.randint(0, 3, (n,), generator=gen)
        row_mask = torch.randperm(n, generator=gen)
        state = torch.randint(0, 3, (n,), generator=gen)  # 0 pending, 1 done, 2 failed
        done, failed = state == 1, state == 2
        got = rule.rows_to_cancel(row_image, row_mask, done, failed).tolist()
        assert got == brute_force_cancel(row_image.tolist(), row_mask.tolist(), done.tolist(), failed.tolist())


# ------------------------------------------------------------------- margin guard, fail fast (issue 14)
def brute_force_gaps(net, x, boxes, fill=0.0):
    """Every view's `(label, top1 - top2)`, views built by slicing: two `(B, K, K)` tensors."""
    k = len(boxes)
    views = torch.stack([masked_copy(x[b], [boxes[i], boxes[j]], fill) for b in range(x.shape[0]) for i in range(k) for j in range(k)])
    with torch.no_grad():
        logits = net.eval()(views)
    top2 = logits.topk(2, dim=1).values
    return logits.argmax(1).reshape(x.shape[0], k, k), (top2[:, 0] - top2[:, 1]).reshape(x.shape[0], k, k)


@pytest.mark.parametrize("seed", [0, 2])
def test_margin_guard_matches_brute_force_and_keeps_predictions(seed):
    model, net = make(seed)
    x = images(seed=seed)
    y = model.predict(x)
    labels, gaps = brute_force_gaps(net, x, model.mask_set.boxes)
    k = len(model.mask_set)
    upper = torch.triu(torch.ones(k, k, dtype=torch.bool))
    plain = model.certify(x, y).certified
    # a margin that removes some certificates but not all: the median smallest gap of the certified images
    smallest = torch.where(upper, gaps, torch.inf).flatten(1).amin(1)
    margin = float(smallest[plain].median())
    model.margin = margin
    expected = [bool(((labels[b] == y[b]) & (gaps[b] > margin) | ~upper).all()) for b in range(x.shape[0])]
    for early_exit in (True, False):
        result = model.certify(x, y, early_exit=early_exit)
        assert result.certified.tolist() == expected, early_exit
        assert torch.equal(result.prediction, y)
    assert torch.equal(model.predict(x), y)
    assert 0 < sum(expected) < int(plain.sum())
    # margin 0 is the plain rule: label equality only
    model.margin = 0.0
    assert model.certify(x, y).certified.tolist() == [bool(((labels[b] == y[b]) | ~upper).all()) for b in range(x.shape[0])]


def test_a_certified_image_stays_certified_in_another_layout_and_batch_size():
    """The margin guard's purpose: recompute every view of a certified image with another memory
    format and views per pass; each still shows the label (by more than the margin, even)."""
    from robustwrap.views import ViewRunner, triangle_pairs

    net = timm.create_model("test_resnet", num_classes=5)
    model = robustwrap.wrap(net, image_size=32, patch=5, num_masks=4, margin=1e-3, batch_size=7).eval()
    x = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    y = model.predict(x)
    result = model.certify(x, y)
    assert result.certified.any()
    k = len(model.mask_set)
    for channels_last, batch_size in ((True, 64), (False, 5)):
        runner = ViewRunner(net, model.mask_set, 0.0, batch_size, channels_last=channels_last)
        images = result.certified.nonzero()[:, 0]
        pairs, owners = triangle_pairs(torch.arange(images.numel()), k, diagonal=True)
        with torch.no_grad():
            outcome = runner.evaluate_pairs(x[images], pairs, owners, y[images], early_exit=False, guard=torch.ones(images.numel(), dtype=torch.bool), margin=1e-3)
        assert (outcome.labels == y[images][pairs[:, 0]]).all() and outcome.sure.all() and not outcome.failed.any()


def test_fail_fast_order_tries_the_least_sure_pairs_first():
    """With early exit, a certificate candidate's first two-mask view is the pair whose one-mask
    views show the label by the smallest sum of margins."""
    model, net = make(1, batch_size=1)
    x = images(seed=1)
    y = model.predict(x)
    one = model.certify(x, y, early_exit=False).one_mask
    b = int((one == y[:, None]).all(1).nonzero()[0, 0])  # a candidate: every one-mask label is y
    x, y = x[b : b + 1], y[b : b + 1]
    boxes = model.mask_set.boxes
    k = len(boxes)
    with torch.no_grad():
        logits = torch.stack([net(masked_copy(x[0], [box], 0.0)[None])[0] for box in boxes])
    margins = rule.label_margins(logits, y.expand(k))
    assert (margins >= 0).all()
    first = min(((i, j) for i in range(k) for j in range(i + 1, k)), key=lambda p: float(margins[p[0]] + margins[p[1]]))
    seen = []
    handle = net.register_forward_hook(lambda module, inputs, output: seen.append(inputs[0].clone()))
    model.certify(x, y)
    handle.remove()
    assert len(seen) > k  # one view per pass: K one-mask passes, then the pairs
    assert torch.equal(seen[k][0], masked_copy(x[0], [boxes[first[0]], boxes[first[1]]], 0.0))


def test_fail_fast_results_identical_to_row_major_order():
    """Priority only reorders: the same failed/done groups, and the same labels where both ran."""
    from robustwrap.views import ViewRunner, triangle_pairs

    model, net = make(0)
    x = images()
    y = model.predict(x)
    runner = ViewRunner(net, model.mask_set, 0.0, 5)
    pairs, owners = triangle_pairs(torch.arange(x.shape[0]), len(model.mask_set))
    priority = torch.rand(pairs.shape[0], generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        plain = runner.evaluate_pairs(x, pairs, owners, y)
        ordered = runner.evaluate_pairs(x, pairs, owners, y, priority=priority)
        full = runner.evaluate_pairs(x, pairs, owners, y, early_exit=False)
    assert torch.equal(plain.failed, ordered.failed) and torch.equal(plain.failed, full.failed)
    assert torch.equal(plain.done, ordered.done)
    both = (plain.labels >= 0) & (ordered.labels >= 0)
    assert torch.equal(plain.labels[both], ordered.labels[both])
    assert torch.equal(ordered.labels[ordered.labels >= 0], full.labels[ordered.labels >= 0])
