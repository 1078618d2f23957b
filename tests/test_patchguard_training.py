"""PatchGuard's provable adversarial training keeps a gradient, and fit_masking says when a run is dead."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import robustwrap
from robustwrap import MaskSet, fit_masking
from robustwrap.defenses import patchguard
from robustwrap.defenses.patchguard import clip_evidence, provable_adversarial_loss, window_sums

NUM_CLASSES, SIZE = 4, 24
EPOCHS, LR = 8, 0.05  # the default SGD recipe (momentum 0.9, x0.1 after half), at a rate this tiny task learns with


def paper_loss(local_logits, labels, window, clip=None):
    """The paper's loss as the authors' code computes it (`aggregation='adv'`): every class clipped."""
    evidence = clip_evidence(local_logits, clip)
    b, c, h, w = evidence.shape
    top = window_sums(evidence[torch.arange(b), labels], window).amax((-2, -1))
    scores = evidence.sum((-2, -1)) - F.one_hot(labels, c).to(evidence.dtype) * top[:, None]
    return F.cross_entropy(scores / (h * w), labels)


def local_cnn(dead: bool = False, seed: int = 0) -> nn.Sequential:
    """Three 3x3 convolutions without padding: local logits, receptive field 7, stride 1."""
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU(), nn.Conv2d(8, NUM_CLASSES, 3))
    net.receptive_field, net.feature_stride, net.feature_offset = 7, 1, 0
    if dead:  # what one epoch at too high a learning rate left behind: every local logit below -1
        with torch.no_grad():
            net[-1].bias -= net(textures(256, seed=99)[0]).amax((0, 2, 3)) + 1.0
    return net


def textures(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Digits of a kind a local model can read anywhere: horizontal stripes, vertical stripes, a
    checkerboard or flat noise, with a random phase."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % NUM_CLASSES
    rows, cols = torch.arange(SIZE)[:, None], torch.arange(SIZE)[None, :]
    x = torch.empty(n, 1, SIZE, SIZE)
    for i, label in enumerate(y.tolist()):
        phase = int(torch.randint(2, (), generator=g))
        pattern = [(rows + phase) % 2, (cols + phase) % 2, (rows + cols + phase) % 2, torch.full((SIZE, SIZE), 0.5)][label]
        x[i, 0] = pattern.float() * 2 - 1 + 0.2 * torch.randn(SIZE, SIZE, generator=g)
    return x, y


def guard(net: nn.Module) -> robustwrap.PatchGuard:
    return robustwrap.wrap(net, patch=2, defense="patchguard", image_size=SIZE)


def train_loader(seed: int = 0) -> DataLoader:
    return DataLoader(TensorDataset(*textures(128, seed)), batch_size=16, shuffle=True, generator=torch.Generator().manual_seed(seed))


def fit(pg: robustwrap.PatchGuard, epochs: int) -> tuple[list, list[str]]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        history = fit_masking(pg, train_loader(), epochs=epochs, lr=LR, progress=False)
    return history, [str(w.message) for w in caught if "fit_masking:" in str(w.message)]


# ---------------------------------------------------------------------------------------- loss
def test_the_papers_loss_has_no_gradient_on_a_dead_model_and_this_one_has():
    net = local_cnn(dead=True)
    pg = guard(net)
    x, y = textures(8, seed=1)
    local = net(x)
    assert (local < 0).all()
    window = pg._window_for(local.shape[2:])

    old = paper_loss(local.float(), y, window)
    assert old.item() == pytest.approx(math.log(NUM_CLASSES), rel=1e-6)  # the trap: ln C ...
    grads = torch.autograd.grad(old, list(net.parameters()))
    assert all(not g.any() for g in grads)  # ... and no gradient, on any parameter

    new = pg.training_loss(net(x), y)
    assert new.item() > math.log(NUM_CLASSES)
    new.backward()
    assert net[-1].bias.grad[y].lt(0).all()  # descent raises the true classes' logits
    assert all(p.grad is not None and p.grad.any() for p in net[-1].parameters())


@pytest.mark.parametrize("clip", [None, 2.0])
def test_the_loss_is_the_papers_when_the_true_class_has_no_negative_logit_and_above_it_otherwise(clip):
    g = torch.Generator().manual_seed(0)
    local = torch.randn(6, 5, 7, 7, generator=g, dtype=torch.float64) * 2
    labels = torch.tensor([0, 1, 2, 3, 4, 0])
    mixed = provable_adversarial_loss(local, labels, (3, 3), clip)
    assert mixed > paper_loss(local, labels, (3, 3), clip)  # the true classes have negative logits here
    per_image = [provable_adversarial_loss(local[i : i + 1], labels[i : i + 1], (3, 3), clip) for i in range(6)]
    assert all(p >= paper_loss(local[i : i + 1], labels[i : i + 1], (3, 3), clip) for i, p in enumerate(per_image))
    rows = torch.arange(6)
    local[rows, labels] = local[rows, labels].abs()  # no negative true-class logit: the paper's loss exactly
    assert torch.equal(provable_adversarial_loss(local, labels, (3, 3), clip), paper_loss(local, labels, (3, 3), clip))


# ------------------------------------------------------------------------------------ training
def test_a_dead_model_recovers_with_the_default_recipe_and_stays_dead_with_the_papers_loss(monkeypatch):
    x, y = textures(64, seed=2)

    pg = guard(local_cnn(dead=True))
    with torch.no_grad():
        assert (pg.model(x) < 0).all() and (pg.predict(x) == 0).all()
    history, warned = fit(pg, epochs=EPOCHS)
    assert history.strategy == "provable_adversarial"
    assert warned == []  # evidence came back within the first epoch
    with torch.no_grad():
        result = pg.eval().certify(x, y)
    assert (result.prediction == y).float().mean() >= 0.9
    assert result.certified.float().mean() >= 0.5

    monkeypatch.setattr(patchguard, "provable_adversarial_loss", paper_loss)
    stuck = guard(local_cnn(dead=True))
    history, warned = fit(stuck, epochs=2)
    assert [e.loss for e in history.epochs] == pytest.approx([math.log(NUM_CLASSES)] * 2, rel=1e-6)
    assert (stuck.eval().predict(x) == 0).all()  # all evidence 0: class 0 everywhere
    assert sum("exactly ln(4) = 1.3863" in w for w in warned) == 2
    assert sum("no local logit was positive" in w for w in warned) == 2


def test_a_healthy_run_does_not_warn():
    history, warned = fit(guard(local_cnn()), epochs=1)
    assert warned == [] and history.final.loss > 0


def test_a_bare_model_stuck_at_ln_c_warns():
    # Dead ReLUs and a head without bias: the output is 0 for every image, the loss ln 4, no gradient.
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, NUM_CLASSES, bias=False))
    with torch.no_grad():
        net[0].bias.fill_(-100.0)
    mask_set = MaskSet.square(SIZE, 2, num_masks=3)
    with pytest.warns(UserWarning, match=r"the loss of every batch of epoch 1 was exactly ln\(4\)") as record:
        fit_masking(net, train_loader(), mask_set=mask_set, strategy="none", epochs=1, progress=False)
    assert record[0].filename == __file__  # points at the caller
    assert not any("local logit" in str(w.message) for w in record)  # not a PatchGuard model


# ---------------------------------------------------------------------------------- collapse
def collapsed(local: bool) -> nn.Module:
    """A model whose output depends on its input but whose class 1 wins on every image by far:
    the loss is not ln C (the old watch saw nothing), yet every prediction is one class."""
    net = local_cnn(seed=3)
    with torch.no_grad():
        net[-1].bias.copy_(torch.tensor([0.0, 30.0, 0.0, 0.0]))
    if local:
        return net
    return nn.Sequential(net, nn.AdaptiveAvgPool2d(1), nn.Flatten())


@pytest.mark.parametrize("defense", ["bare", "patchcleanser", "smoothing", "patchguard"])
def test_an_epoch_whose_predictions_are_one_class_warns_for_every_defense(defense):
    net = collapsed(local=defense == "patchguard")
    model = {
        "bare": net,
        "patchcleanser": lambda: robustwrap.wrap(net, patch=2, image_size=SIZE, num_classes=NUM_CLASSES),
        "smoothing": lambda: robustwrap.wrap(net, patch=2, defense="smoothing", size=4, image_size=SIZE, num_classes=NUM_CLASSES),
        "patchguard": lambda: guard(net),
    }[defense]
    model = model if defense == "bare" else model()
    options = {"mask_set": MaskSet.square(SIZE, 2, num_masks=3)} if defense == "bare" else {}
    with pytest.warns(UserWarning, match=r"in epoch 1 the model predicts one class for every training image \(accuracy 0\.2500") as record:
        history = fit_masking(model, train_loader(), epochs=1, lr=1e-6, progress=False, **options)
    assert record[0].filename == __file__
    assert not any("exactly ln" in str(w.message) for w in record)  # a collapse, not a constant output
    assert history.final.predicted_classes == 1 and history.final.accuracy == 0.25
    assert "certified accuracy is at most the class share" in history.final.collapse_warning()


def test_a_learning_run_counts_its_predicted_classes_and_does_not_warn_of_collapse():
    history, warned = fit(guard(local_cnn()), epochs=1)
    assert history.final.predicted_classes > 1 and history.final.collapse_warning() is None
    assert warned == []


def test_the_default_recipe_keeps_learning_on_a_weak_plain_trained_digit_model():
    """The reproduction of a dead run (benchmarks/patchguard_collapse.py --seed 1): a plain-trained
    3-layer local-logit CNN (receptive field 7) on 360 real digits. At lr 0.01 the default recipe
    ended predicting one class after 3 epochs; at its default rate it keeps learning."""
    from robustwrap.zoo import builtin_dataset

    digits = builtin_dataset("mnist-heldout")
    x = digits.images[:360].float().unsqueeze(1) / 255.0
    train = TensorDataset((x - x.mean()) / x.std(), digits.labels[:360])
    loader = lambda seed: DataLoader(train, batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(seed))
    torch.manual_seed(1)
    net = nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU(), nn.Conv2d(8, 10, 3))
    net.receptive_field, net.feature_stride, net.feature_offset = 7, 1, 0
    model = robustwrap.wrap(net, patch=2, defense="patchguard", image_size=28)
    fit_masking(model, loader(1), strategy="none", epochs=10, lr=0.1, progress=False)  # plain training
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        history = fit_masking(model, loader(2), epochs=3, progress=False)
    losses = [e.loss for e in history.epochs]
    assert losses == sorted(losses, reverse=True) and len(set(losses)) == 3  # the loss falls every epoch
    assert all(e.predicted_classes >= 3 for e in history.epochs)
    assert not any("predicts one class" in str(w.message) for w in caught)
    with torch.no_grad():
        assert len(model.eval().predict(train.tensors[0]).unique()) >= 3
    assert history.strategy == "provable_adversarial" and history.lr == 0.001
