"""fit_masking: the papers' defaults, strategies, validation, checkpoints, bit-equal resume, errors."""

from __future__ import annotations

import copy
import itertools
import os

import pytest
import safetensors.torch
import timm
import timm.scheduler
import torch
import torch.nn.functional as F
from conftest import PeakNet, ViewCounter
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import robustwrap
from robustwrap import MaskSet
from robustwrap.fit import STRATEGIES, FitHistory, fit_masking

SET9 = MaskSet.square(12, 3, num_masks=3)
SET36 = MaskSet.square(14, 3, num_masks=6)


def data(n: int = 32, size: int = 12, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 3, size, size, generator=g), torch.randint(0, 4, (n,), generator=g))


def loader(dataset: TensorDataset, shuffle: bool = True, batch_size: int = 8) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=torch.Generator().manual_seed(1) if shuffle else None)


class BNNet(nn.Module):
    """A small convnet with BatchNorm and Dropout, so that modes, buffers and RNG all matter."""

    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Dropout(0.2), nn.Conv2d(8, 4, 3, padding=1)
        )

    def forward(self, x):
        return self.features(x).amax(dim=(2, 3))


def same_weights(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# ------------------------------------------------------------------------------------ defaults
def test_defaults_are_the_papers_recipe():
    """Clean fine-tuning with the defaults equals a hand-written SGD(0.01, momentum 0.9) loop, lr x0.1 at half."""
    train = data()
    net, ref = PeakNet(seed=3), PeakNet(seed=3)
    history = fit_masking(net, loader(train, shuffle=False), mask_set=SET9, strategy="none", epochs=4, progress=False)
    assert isinstance(history, FitHistory) and history.strategy == "none" and history.lr == 0.01
    assert [e.lr for e in history.epochs] == [0.01, 0.01, 0.001, 0.001]
    assert [e.epoch for e in history.epochs] == [1, 2, 3, 4] and all(e.steps == 4 for e in history.epochs)

    optimizer = torch.optim.SGD(ref.parameters(), lr=0.01, momentum=0.9, weight_decay=0.0)
    for epoch in range(4):
        for group in optimizer.param_groups:
            group["lr"] = 0.01 if epoch < 2 else 0.01 * 0.1
        for x, y in loader(train, shuffle=False):
            optimizer.zero_grad()
            F.cross_entropy(ref(x), y).backward()
            optimizer.step()
    assert same_weights(net, ref)

    # all defaults: Multi-size Greedy Cutout for 10 epochs, lr x0.1 after epoch 5
    history = fit_masking(PeakNet(), loader(data(8)), mask_set=SET9, progress=False)
    assert history.strategy == "multisize_greedy"
    assert [e.lr for e in history.epochs] == [0.01] * 5 + [0.001] * 5


class MHAHead(nn.Module):
    """Self-attention over pixel tokens: a transformer by the lr rule, without timm."""

    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(3, 1, batch_first=True)

    def forward(self, tokens):
        tokens = tokens.transpose(1, 2)
        return self.attn(tokens, tokens, tokens)[0].mean(1).repeat(1, 2)[:, :4]


def test_default_lr_tells_transformers_from_convnets():
    vit = timm.create_model("vit_tiny_patch16_224", img_size=12, patch_size=4, depth=1, embed_dim=16, num_heads=2, num_classes=4)
    mha = nn.Sequential(nn.Flatten(2), MHAHead())
    resnet = timm.create_model("test_resnet", num_classes=4)
    for model, lr in ((vit, 0.001), (mha, 0.001), (resnet, 0.01), (PeakNet(), 0.01)):
        history = fit_masking(model, loader(data(8)), mask_set=SET9, strategy="random_mask", epochs=1, progress=False)
        assert history.lr == lr, type(model).__name__
    assert fit_masking(PeakNet(), loader(data(8)), mask_set=SET9, epochs=1, lr=0.05, progress=False).lr == 0.05


def test_own_optimizer_and_schedulers():
    net = PeakNet()
    optimizer = torch.optim.Adam(net.parameters(), lr=0.004)
    step = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    history = fit_masking(
        net, loader(data()), mask_set=SET9, strategy="random_mask", epochs=3, optimizer=optimizer, scheduler=step, progress=False
    )
    assert [e.lr for e in history.epochs] == [0.004, 0.002, 0.001]
    # your optimizer without a scheduler: a constant rate
    optimizer = torch.optim.SGD(net.parameters(), lr=0.03)
    history = fit_masking(net, loader(data()), mask_set=SET9, epochs=2, optimizer=optimizer, progress=False)
    assert [e.lr for e in history.epochs] == [0.03, 0.03]
    # a timm scheduler also steps after every update, as timm's train script does
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    cosine = timm.scheduler.CosineLRScheduler(optimizer, t_initial=8, t_in_epochs=False)
    seen = []

    def spy(x, y):
        seen.append(optimizer.param_groups[0]["lr"])
        return x

    fit_masking(net, loader(data()), mask_set=SET9, strategy=spy, epochs=2, optimizer=optimizer, scheduler=cosine, progress=False)
    assert len(seen) == 8 and all(a > b for a, b in itertools.pairwise(seen))


# ---------------------------------------------------------------------------------- strategies
@pytest.mark.parametrize(
    "strategy, views", [("none", 0), ("random_cutout", 0), ("random_mask", 0), ("greedy", 71), ("multisize_greedy", 26), ("grid", 666)]
)
def test_every_strategy_trains_and_costs_its_views(strategy, views):
    net = PeakNet()
    robust = robustwrap.wrap(net, mask_set=SET36, num_classes=4)  # num_classes known: no probe pass
    counter = ViewCounter(net)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    history = fit_masking(robust, loader(data(size=14)), strategy=strategy, epochs=1, progress=False)
    assert history.strategy == strategy and strategy in STRATEGIES
    assert counter.images == 32 * (views + 1)  # the search's views, plus the training forward
    assert not all(torch.equal(before[k], v) for k, v in net.state_dict().items())


def test_training_images_are_masked_with_the_classifiers_fill():
    net = PeakNet()
    robust = robustwrap.wrap(net, mask_set=SET9, fill=0.75, num_classes=4)
    seen = []
    net.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach().clone()) if module.training else None)
    fit_masking(robust, loader(data()), strategy="greedy", epochs=1, progress=False)
    assert len(seen) == 4
    # every training image has at least one whole mask (6x6 = 36 px per channel) set to the fill
    assert all(((x == 0.75).sum(dim=(1, 2, 3)) >= 3 * 36).all() for x in seen)


def test_clean_ratio_leaves_that_share_of_images_unmasked():
    counts = {}
    for ratio in (0.0, 0.5, 1.0):
        net = PeakNet()
        counter = ViewCounter(net)
        torch.manual_seed(0)
        fit_masking(
            robustwrap.wrap(net, mask_set=SET9, num_classes=4),
            loader(data(64)),
            strategy="greedy",
            clean_ratio=ratio,
            epochs=1,
            progress=False,
        )
        counts[ratio] = counter.images - 64
    assert counts[0.0] == 64 * 17 and counts[1.0] == 0
    assert 16 * 17 < counts[0.5] < 48 * 17 and counts[0.5] % 17 == 0


def test_callable_strategy_and_its_errors():
    calls = []

    def halves(x, y):
        calls.append(x.shape[0])
        return x * 0.5

    fit_masking(PeakNet(), loader(data()), mask_set=SET9, strategy=halves, epochs=1, progress=False)
    assert calls == [8, 8, 8, 8]
    with pytest.raises(ValueError, match=r"shape of its input \(8, 3, 12, 12\)"):
        fit_masking(PeakNet(), loader(data()), mask_set=SET9, strategy=lambda x, y: x[:1], epochs=1, progress=False)


# ---------------------------------------------------------------------------------- validation
def test_validation_reports_clean_and_certified_accuracy():
    net = PeakNet()
    robust = robustwrap.wrap(net, mask_set=SET9, batch_size=128)
    val = data(24, seed=5)
    history = fit_masking(robust, loader(data()), val_loader=loader(val, shuffle=False), certify_every=2, epochs=3, progress=False)
    assert [e.certified_accuracy is None for e in history.epochs] == [True, False, False]  # epoch 2, and the last
    assert all(e.val_accuracy is not None for e in history.epochs)
    x, y = val.tensors
    with torch.no_grad():
        assert history.final.val_accuracy == (net.eval()(x).argmax(1) == y).float().mean().item()
    result = robust.certify(x, y)
    assert history.final.certified_accuracy == result.certified.float().mean().item()
    assert history.final.robust_accuracy == (result.prediction == y).float().mean().item()


def test_progress_bar_shows_loss_and_accuracy(capsys):
    fit_masking(PeakNet(), loader(data()), mask_set=SET9, strategy="random_mask", epochs=1, progress=False)
    assert capsys.readouterr().err == ""
    fit_masking(PeakNet(), loader(data()), mask_set=SET9, strategy="random_mask", epochs=1, val_loader=loader(data(8)), progress=True)
    err = capsys.readouterr().err
    assert "epoch 1/1" in err and "loss=" in err and "acc=" in err and "val_acc=" in err


# ----------------------------------------------------------------------------- modes, precision
def test_frozen_modules_stay_frozen_while_training():
    """A BatchNorm the user put in eval mode is not unfrozen: its running statistics never move (issue 9, item 5)."""
    net = BNNet()
    net.train()
    bn, dropout = net.features[1], net.features[3]
    bn.eval()  # the usual way to freeze BatchNorm statistics while fine-tuning
    frozen = {k: v.clone() for k, v in bn.named_buffers()}  # running statistics (weight and bias still train)
    seen = []
    net.features[0].register_forward_pre_hook(lambda module, args: seen.append((net.training, bn.training, dropout.training)))
    fit_masking(net, loader(data()), mask_set=SET9, strategy="random_mask", epochs=2, progress=False)
    assert (True, False, True) in seen  # the training forwards: dropout trained, the frozen BatchNorm did not
    assert all(not bn_training for _, bn_training, _ in seen)
    assert all(torch.equal(frozen[k], v) for k, v in bn.named_buffers())
    assert net.training and not bn.training and dropout.training  # the caller's modes, per module


def test_a_model_entirely_in_eval_mode_trains_in_train_mode_and_gets_its_modes_back():
    net = BNNet()
    net.eval()  # e.g. straight from from_pretrained: loaded for inference, not frozen module by module
    bn = net.features[1]
    before = bn.running_mean.clone()
    seen = []
    net.features[0].register_forward_pre_hook(lambda module, args: seen.append(bn.training))
    history = fit_masking(net, loader(data()), mask_set=SET9, strategy="multisize_greedy", epochs=1, progress=False)
    assert True in seen and not torch.equal(bn.running_mean, before) and torch.isfinite(torch.tensor(history.final.loss))
    assert not any(m.training for m in net.modules())


@pytest.mark.parametrize("precision, dtype", [("float32", torch.float32), ("bfloat16", torch.bfloat16), ("float16", torch.float16)])
def test_trains_at_the_defended_models_precision(precision, dtype):
    """Training, the strategy's search and validation run under the model's own autocast, as prediction does."""
    net = BNNet()
    robust = robustwrap.wrap(net, mask_set=SET9, num_classes=4, precision=precision)
    dtypes = []
    net.features[0].register_forward_hook(lambda module, args, out: dtypes.append(out.dtype))
    history = fit_masking(robust, loader(data()), strategy="greedy", val_loader=loader(data(8), shuffle=False), epochs=1, progress=False)
    assert set(dtypes) == {dtype} and torch.isfinite(torch.tensor(history.final.loss))
    assert robust.precision == precision  # a setting of the model, untouched by training


def test_amp_is_refused_with_where_precision_lives():
    net = PeakNet()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    stale = r"amp=True.*precision is a setting of the defended model.*wrap\(model, patch=\.\.\., precision='bfloat16'\)"
    with pytest.raises(TypeError, match=stale):
        fit_masking(net, loader(data()), mask_set=SET9, epochs=1, amp=True, progress=False)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())


def test_default_strategy_is_the_defenses_own():
    history = fit_masking(robustwrap.wrap(PeakNet(), mask_set=SET9, num_classes=4), loader(data(8)), epochs=1, progress=False)
    assert history.strategy == "multisize_greedy"


def smoothing_model(net: nn.Module, encoding: str = "fill") -> robustwrap.RobustPatchClassifier:
    """Column bands of 3 px on 12x12 images against a 2 px patch: Δ = 4, 2Δ < V = 12."""
    return robustwrap.wrap(net, patch=2, defense="smoothing", size=3, encoding=encoding, image_size=12, num_classes=4)


@pytest.mark.parametrize("encoding, channels", [("fill", 3), ("levine2020", 6)])
def test_a_smoothing_model_trains_on_one_random_ablated_view_per_image(encoding, channels):
    net = PeakNet(in_chans=channels)
    seen = []
    net.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach().clone()) if module.training else None)
    val = data(8, seed=5)
    history = fit_masking(smoothing_model(net, encoding), loader(data()), val_loader=loader(val, shuffle=False), epochs=1, progress=False)
    assert history.strategy == "random_ablation" and len(seen) == 4
    for x in seen:
        assert x.shape[1:] == (channels, 12, 12)
        kept = (x != 0).any(dim=(1, 2))  # (B, W): the columns that kept anything (ablated pixels are exactly 0)
        for row in kept:  # one band of 3 neighbouring columns per image, wrapping around the edge
            columns = set(row.nonzero().flatten().tolist())
            assert any(columns == {(q + t) % 12 for t in range(3)} for q in range(12)), columns
    x, y = val.tensors
    encoded = torch.cat([x, 1 - x], 1) if encoding == "levine2020" else x
    with torch.no_grad():
        assert history.final.val_accuracy == (net.eval()(encoded).argmax(1) == y).float().mean().item()


def test_a_smoothing_model_takes_its_own_strategies():
    net = PeakNet(in_chans=6)
    seen = []
    net.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach().clone()) if module.training else None)
    fit_masking(smoothing_model(net, "levine2020"), loader(data()), strategy="none", epochs=1, progress=False)
    assert all(x.shape[1] == 6 and (x != 0).any(dim=(1, 2)).all() for x in seen)  # clean: (x, 1 - x), every column
    with pytest.raises(ValueError, match=r"'none', 'random_ablation' or a callable for a 'smoothing' model; got 'greedy'"):
        fit_masking(smoothing_model(PeakNet()), loader(data()), strategy="greedy", epochs=1, progress=False)


def test_a_patchguard_model_trains_with_provable_adversarial_training_by_default():
    """No masking: the loss is the model's own training loss on the local logits, as a hand-written loop computes it."""
    torch.manual_seed(0)
    base = timm.create_model("bagnet_tiny", num_classes=4, in_chans=3)
    ref = copy.deepcopy(base)
    guard = robustwrap.wrap(base, patch=3, defense="patchguard", image_size=16)
    train = data(16, size=16)
    history = fit_masking(guard, loader(train, shuffle=False), epochs=1, lr=0.01, progress=False)
    assert history.strategy == "provable_adversarial"

    reference = robustwrap.wrap(ref, patch=3, defense="patchguard", image_size=16)
    optimizer = torch.optim.SGD(ref.parameters(), lr=0.01, momentum=0.9, weight_decay=0.0)
    ref.train()
    for x, y in loader(train, shuffle=False):
        optimizer.zero_grad()
        reference.training_loss(ref(x), y).backward()
        optimizer.step()
    assert same_weights(base, ref)
    plain = fit_masking(guard, loader(train), strategy="none", epochs=1, progress=False)
    assert plain.strategy == "none" and 0.0 <= plain.final.accuracy <= 1.0
    with pytest.raises(ValueError, match=r"'provable_adversarial', 'none' or a callable for a 'patchguard' model; got 'greedy'"):
        fit_masking(guard, loader(train), strategy="greedy", epochs=1, progress=False)


# ---------------------------------------------------------------------------------- checkpoints
class Interrupted(Exception):
    pass


class InterruptingLoader(DataLoader):
    """A DataLoader whose second epoch dies after `after` batches, as a killed job would."""

    def __init__(self, *args, after: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.after, self.epochs = after, 0

    def __iter__(self):
        self.epochs += 1
        for i, item in enumerate(super().__iter__()):
            if self.epochs == 2 and i == self.after:
                raise Interrupted
            yield item


@pytest.mark.parametrize(
    "strategy, clean_ratio, defense",
    [("random_cutout", 0.5, None), ("greedy", 0.0, None), ("greedy", 0.0, "bfloat16"), ("random_ablation", 0.5, "smoothing")],
)
def test_resume_gives_the_same_weights_as_an_uninterrupted_run(tmp_path, strategy, clean_ratio, defense):
    train, val = data(), data(8, seed=9)

    def defend(net):  # a bare model, PatchCleanser in bfloat16, or a smoothing model
        if defense == "smoothing":
            return smoothing_model(net)
        return net if defense is None else robustwrap.wrap(net, mask_set=SET9, num_classes=4, precision=defense)

    kwargs = dict(
        mask_set=None if defense else SET9,
        strategy=strategy,
        clean_ratio=clean_ratio,
        epochs=3,
        val_loader=loader(val, shuffle=False),
        certify_every=1,
        progress=False,
    )

    torch.manual_seed(123)
    straight = BNNet()
    expected = fit_masking(defend(straight), loader(train), **kwargs)

    torch.manual_seed(123)
    first = BNNet()
    dying = InterruptingLoader(train, batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(1), after=2)
    with pytest.raises(Interrupted):
        fit_masking(defend(first), dying, checkpoint_dir=tmp_path, **kwargs)
    assert sorted(os.listdir(tmp_path)) == ["epoch_0001"]

    torch.manual_seed(999)  # a new process: other global RNG state, other initial weights
    resumed = BNNet(seed=7)
    history = fit_masking(defend(resumed), loader(train), checkpoint_dir=tmp_path, resume=True, **kwargs)
    assert same_weights(resumed, straight)
    strip = lambda h: [{**vars(e), "seconds": 0} for e in h.epochs]
    assert strip(history) == strip(expected) and len(history) == 3


def test_checkpoint_layout_is_safetensors_and_atomic(tmp_path, monkeypatch):
    net = BNNet()
    fit_masking(net, loader(data()), mask_set=SET9, strategy="random_mask", epochs=2, checkpoint_dir=tmp_path, progress=False)
    assert sorted(os.listdir(tmp_path)) == ["epoch_0002"]  # the previous epoch is removed, no temporary left
    weights = safetensors.torch.load_file(tmp_path / "epoch_0002" / "model.safetensors")
    assert weights.keys() == net.state_dict().keys() and all(torch.equal(weights[k], v) for k, v in net.state_dict().items())
    state = torch.load(tmp_path / "epoch_0002" / "training_state.pt", weights_only=True)
    assert state["epoch"] == 2 and {"optimizer", "scheduler", "rng", "history"} <= state.keys()

    # a crash while writing epoch 3 leaves epoch 2 whole and no partial directory behind
    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        fit_masking(
            net, loader(data()), mask_set=SET9, strategy="random_mask", epochs=3, checkpoint_dir=tmp_path, resume=True, progress=False
        )
    assert sorted(os.listdir(tmp_path)) == ["epoch_0002"]
    assert safetensors.torch.load_file(tmp_path / "epoch_0002" / "model.safetensors").keys() == weights.keys()


def test_checkpoint_dir_is_never_overwritten_or_resumed_with_other_settings(tmp_path):
    fit_masking(PeakNet(), loader(data()), mask_set=SET9, strategy="random_mask", epochs=1, checkpoint_dir=tmp_path, progress=False)
    with pytest.raises(ValueError, match="resume=True"):
        fit_masking(PeakNet(), loader(data()), mask_set=SET9, strategy="random_mask", epochs=2, checkpoint_dir=tmp_path, progress=False)
    with pytest.raises(ValueError, match="strategy='random_mask', not 'greedy'"):
        fit_masking(
            PeakNet(), loader(data()), mask_set=SET9, strategy="greedy", epochs=2, checkpoint_dir=tmp_path, resume=True, progress=False
        )
    done = fit_masking(
        PeakNet(), loader(data()), mask_set=SET9, strategy="random_mask", epochs=1, checkpoint_dir=tmp_path, resume=True, progress=False
    )
    assert len(done) == 1  # already finished: nothing to do
    bf16 = robustwrap.wrap(PeakNet(), mask_set=SET9, num_classes=4, precision="bfloat16")
    with pytest.raises(ValueError, match="precision='float32', not 'bfloat16'"):
        fit_masking(bf16, loader(data()), strategy="random_mask", epochs=2, checkpoint_dir=tmp_path, resume=True, progress=False)


# ---------------------------------------------------------------------------------------- errors
class NoLen:
    def __iter__(self):
        return iter(())


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(train_loader=DataLoader(TensorDataset(data().tensors[0]), batch_size=8)), ValueError, r"\(images, labels\)"),
        (dict(train_loader=loader(TensorDataset(data().tensors[0], data().tensors[1] + 2))), ValueError, r"\[0, 4\)"),
        (dict(train_loader=loader(TensorDataset(data().tensors[0], data().tensors[1].float()))), TypeError, "integer"),
        (dict(train_loader=DataLoader(TensorDataset(torch.zeros(0, 3, 12, 12), torch.zeros(0, dtype=torch.long)))), ValueError, "empty"),
        (dict(train_loader=NoLen()), ValueError, "no batches"),
        (dict(strategy="greedy_cutout"), ValueError, "'none', 'random_cutout', 'random_mask', 'greedy', 'multisize_greedy', 'grid'"),
        (dict(strategy=3), TypeError, "callable"),
        (dict(mask_set=None), ValueError, "mask_set is required"),
        (dict(lr=0.1, optimizer="mine"), ValueError, "own optimizer"),
        (dict(certify_every=1), ValueError, "val_loader"),
        (dict(resume=True), ValueError, "checkpoint_dir"),
        (dict(clean_ratio=1.5), ValueError, "clean_ratio"),
        (dict(epochs=0), ValueError, "epochs"),
    ],
)
def test_errors_come_before_any_update(kwargs, error, match):
    net = PeakNet()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    kwargs = {"train_loader": loader(data()), "mask_set": SET9, "epochs": 1, "progress": False, **kwargs}
    if kwargs.get("optimizer") == "mine":
        kwargs["optimizer"] = torch.optim.SGD(net.parameters(), lr=0.1)
    with pytest.raises(error, match=match):
        fit_masking(net, **kwargs)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())


def test_classifier_and_mask_set_are_exclusive():
    robust = robustwrap.wrap(PeakNet(), mask_set=SET9)
    with pytest.raises(ValueError, match="not both"):
        fit_masking(robust, loader(data()), mask_set=SET9, progress=False)


# ------------------------------------------------------------------------------------ collapse
def test_robustwrap_train_shows_a_collapsed_model(tmp_path, capsys):
    """A model that predicts class 1 for every image, trained and certified by `robustwrap train`:
    the epoch line and the certification report both say that it predicts one class."""
    import numpy as np
    from PIL import Image

    from robustwrap.cli import main

    rng = np.random.default_rng(0)
    for c in "012":
        (tmp_path / "data" / c).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(tmp_path / "data" / c / f"{i}.png")
    torch.manual_seed(0)
    vit = timm.create_model("test_vit", img_size=32, num_classes=3)
    with torch.no_grad():
        vit.head.bias.copy_(torch.tensor([0.0, 50.0, 0.0]))
    robustwrap.wrap(vit, mask_set=MaskSet.square(32, 5, num_masks=3)).save_pretrained(tmp_path / "start")
    data = str(tmp_path / "data")
    argv = ["train", "--model", str(tmp_path / "start"), "--data", data, "--val-data", data, "--epochs", "1", "--lr", "1e-6"]
    code = main([*argv, "--strategy", "random_mask", "--workers", "0", "--no-progress", "--out", str(tmp_path / "out")])
    printed = capsys.readouterr().out
    assert code == 0
    assert "  warning: in epoch 1 the model predicts one class for every training image (accuracy 0.3333" in printed
    assert "the model predicts one class (1) for every image: clean accuracy = class share (33.33%)" in printed


class _Doubling(robustwrap.RobustPatchClassifier):
    """A defense fit_masking has never heard of: everything it needs is declared on the class."""

    defense = "doubling"
    training_strategies = ("none", "double")
    default_strategy = "double"

    def _training_recipe(self, strategy, fill, batch_size):
        if strategy == "none":
            return robustwrap.defenses.base.TrainingRecipe()
        return robustwrap.defenses.base.TrainingRecipe(augment=lambda x, y: 2 * x, loss=lambda out, y: 3 * F.cross_entropy(out, y), lr=0.05)

    def _training_geometry(self):
        return {"doubling": [self.image_size[0]]}


def test_a_new_defense_trains_from_what_its_class_declares(tmp_path):
    """fit_masking never asks which defense it has: a new class's default strategy, views, loss, rate and checkpoint geometry are used."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 4))  # no BatchNorm, no dropout
    model = _Doubling(net, image_size=12)
    x, y = data(8)[:]
    expected = 3 * F.cross_entropy(copy.deepcopy(net)(2 * x), y).item()  # the first step's loss, before any update
    history = fit_masking(model, [(x, y)], epochs=1, checkpoint_dir=tmp_path, progress=False)
    assert (history.strategy, history.lr) == ("double", 0.05)
    assert history.final.loss == pytest.approx(expected, rel=1e-5)
    other = _Doubling(copy.deepcopy(net), image_size=14)
    with pytest.raises(ValueError, match=r"was trained with doubling=\[12\], not \[14\]"):
        fit_masking(other, [(torch.randn(8, 3, 14, 14), y)], epochs=2, checkpoint_dir=tmp_path, resume=True, progress=False)
    with pytest.raises(ValueError, match=r"strategy must be one of 'none', 'double' or a callable for a 'doubling' model; got 'greedy'"):
        fit_masking(model, [(x, y)], strategy="greedy", progress=False)


# ------------------------------------------------------------------------------ a diverged run
def test_a_run_whose_loss_is_not_finite_stops_with_the_reason_not_a_ln_c_warning(recwarn):
    """lr=1e30 drives the loss to nan: fit_masking stops after the epoch, says why, and does not call it a constant output."""
    net = BNNet()
    robust = robustwrap.wrap(net, mask_set=SET9, num_classes=4)
    with pytest.raises(FloatingPointError, match=r"not finite \(nan or inf\) in \d+ of 4 batches of epoch 1 at lr 1e\+30: the weights are no longer finite.*stopped before the epoch's validation.*lower lr"):
        fit_masking(robust, loader(data()), strategy="none", epochs=3, lr=1e30, progress=False)
    assert not any("exactly ln" in str(w.message) for w in recwarn)


def test_nan_pixels_stop_a_float32_run_and_a_float16_scaler_skips_them():
    """One batch of nan pixels: float32 steps on its gradients (every later batch is nan too) and stops; float16's GradScaler skips that step and goes on."""
    images, labels = data().tensors
    images = images.clone()
    images[:8] = float("nan")  # the first batch (no shuffle)
    poisoned = loader(TensorDataset(images, labels), shuffle=False)
    robust = robustwrap.wrap(BNNet(), mask_set=SET9, num_classes=4)
    with pytest.raises(FloatingPointError, match=r"in 4 of 4 batches of epoch 1.*check the data for nan/inf pixels"):
        fit_masking(robust, poisoned, strategy="none", epochs=1, progress=False)
    net = BNNet()
    robust = robustwrap.wrap(net, mask_set=SET9, num_classes=4, precision="float16")
    history = fit_masking(robust, poisoned, strategy="none", epochs=1, progress=False)
    assert history.final.steps == 4 and torch.isfinite(torch.tensor(history.final.loss))  # the mean of the 3 finite batches
    assert all(bool(torch.isfinite(p).all()) for p in net.parameters())


def test_weights_made_non_finite_by_a_step_whose_loss_was_finite_stop_the_run(monkeypatch):
    """A step can take the weights to inf with a finite loss: the epoch-end check catches the weights themselves."""
    net = BNNet()
    robust = robustwrap.wrap(net, mask_set=SET9, num_classes=4)
    step = torch.optim.SGD.step

    def overflowing(self, *args, **kwargs):
        out = step(self, *args, **kwargs)
        with torch.no_grad():
            net.features[0].weight[0, 0, 0, 0] = float("inf")
        return out

    monkeypatch.setattr(torch.optim.SGD, "step", overflowing)
    with pytest.raises(FloatingPointError, match=r"the weights are not finite \(nan or inf\) after epoch 1 at lr 0.01, though its loss was"):
        fit_masking(robust, loader(data(8)), strategy="none", epochs=2, progress=False)


def test_training_replaces_the_record_the_model_came_with_and_keeps_it_as_previous(tmp_path):
    """A loaded model's `training` figures belong to the weights it started from: after fit_masking they are `previous`."""
    torch.manual_seed(0)
    robust = robustwrap.wrap(timm.create_model("test_resnet", num_classes=4), mask_set=SET9)
    came_with = {"strategy": "greedy", "training": {"epochs": 9, "final_loss": 0.0123, "final_masked_accuracy": 0.99}}
    robust.pretrained_info = {**came_with, "paper": "somewhere"}
    history = fit_masking(robust, loader(data()), strategy="none", epochs=1, lr=0.003, progress=False)
    info = robust.pretrained_info
    assert info["strategy"] == "none" and info["paper"] == "somewhere"
    assert info["training"] == {
        "epochs": 1,
        "lr": 0.003,
        "processes": 1,
        "final_loss": round(history.final.loss, 4),
        "final_masked_accuracy": round(history.final.accuracy, 4),
        "previous": came_with,
    }
    robust.save_pretrained(tmp_path / "m")
    assert robustwrap.from_pretrained(str(tmp_path / "m")).pretrained_info["training"] == info["training"]
    # a bare module has no record to keep
    net = BNNet()
    fit_masking(net, loader(data()), mask_set=SET9, strategy="none", epochs=1, progress=False)
    assert not hasattr(net, "pretrained_info")
