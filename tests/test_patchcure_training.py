"""PatchCURE training: `fit_masking` on masked feature grids (issue 24, item 2).

The training views are checked against an independent reference built here (the features of
each image with the cells of two masks cut out by slicing, through the LRF, or float64 sums of
the local logits) and against the defense's own view function; then the path a user takes:
`fit_masking` (losses, greedy search cost, resume, two gloo processes) and `robustwrap train`.
"""

from __future__ import annotations

import copy
import datetime
import socket
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import robustwrap
from robustwrap import cli
from robustwrap.cli import main
from robustwrap.defenses import DEFENSES
from robustwrap.fit import fit_masking


class CellSRF(nn.Module):
    """Features of non-overlapping 4x4 pixel blocks (r = s = 4, o = 0)."""

    receptive_field, feature_stride, feature_offset = 4, 4, 0

    def __init__(self, dim: int = 6, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Conv2d(1, dim, 4, stride=4)

    def forward(self, x):
        return torch.tanh(self.embed(x))


class MixLRF(nn.Module):
    """Sees the whole grid (3x3 convolution, spatial mean) and reads `kept`."""

    def __init__(self, dim: int = 6, num_classes: int = 3, seed: int = 1):
        super().__init__()
        torch.manual_seed(seed)
        self.conv = nn.Conv2d(dim, num_classes, 3, padding=1)
        self.kept_weight = nn.Parameter(torch.randn(num_classes))
        self.num_classes = num_classes

    def forward(self, features, kept):
        return self.conv(features).mean((2, 3)) + kept.float().mean((1, 2))[:, None] * self.kept_weight


class LocalLogits(nn.Module):
    """Local logits of 4x4 pixel blocks (a BagNet in miniature)."""

    receptive_field, feature_stride, feature_offset = 4, 4, 0

    def __init__(self, num_classes: int = 3, seed: int = 2):
        super().__init__()
        torch.manual_seed(seed)
        self.conv = nn.Conv2d(1, num_classes, 4, stride=4)
        self.num_classes = num_classes

    def forward(self, x):
        return self.conv(x)


def _vit(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=4, depth=3, embed_dim=12, num_heads=2, num_classes=3)


def _model(kind: str) -> robustwrap.PatchCURE:
    """A PatchCURE model in train mode: a pair, a ViT split below or at its depth, or local logits."""
    if kind == "pair":
        return robustwrap.PatchCURE(CellSRF(), MixLRF(), patch=3, image_size=16)
    if kind == "local":
        return robustwrap.PatchCURE(LocalLogits(), patch=3, image_size=16)
    split = {"vit_split": 1, "vit_depth": 3}[kind]
    return robustwrap.wrap(_vit(), patch=5, defense="patchcure", window=(2, 2), split=split)


def _images(kind: str, n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shape = (n, 3, 32, 32) if kind.startswith("vit") else (n, 1, 16, 16)
    return torch.randn(shape, generator=g), torch.randint(0, 3, (n,), generator=g)


def _reference_logits(model: robustwrap.PatchCURE, x: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Each image's view on its own: its features with the cells of its two masks (none for -1) cut out by slicing."""
    srf, lrf = model.srf, model.lrf
    boxes = model.feature_mask_set.boxes
    out = []
    for b in range(x.shape[0]):
        features = srf(x[b : b + 1])
        kept = torch.ones(features.shape[2:], dtype=torch.bool)
        for m in masks[b].tolist():
            if m >= 0:
                top, left, h, w = boxes[m]
                kept[top : top + h, left : left + w] = False
        if lrf is None:  # float64 sums over the kept cells, at the scale of one cell
            out.append((features[0].double() * kept).sum((1, 2))[None] / kept.numel())
        else:
            out.append(lrf(features * kept, kept[None]))
    return torch.cat(out)


def _masking(model: robustwrap.PatchCURE, strategy: str):
    return model._training_recipe(strategy, model.fill, 64).augment


# ------------------------------------------------------------------------------- the views
@pytest.mark.parametrize("kind", ["pair", "vit_split", "vit_depth", "local"])
def test_training_views_are_the_masked_feature_grids_the_certificate_evaluates(kind):
    model = _model(kind)
    x, y = _images(kind, 5)
    k = len(model.feature_mask_set)
    masking = _masking(model, "random_mask")
    same, masks = masking(x, y, return_indices=True)
    assert same is x and masks.shape == (5, 2) and 0 <= int(masks.min()) and int(masks.max()) < k
    masks[0] = -1  # an image left clean: every cell kept
    logits = masking.logits(model.model, x, masks)
    torch.testing.assert_close(logits, _reference_logits(model, x, masks).to(logits.dtype))
    # the same numbers as the certificate's own views (its view runner, in eval mode without gradients)
    srf, lrf = model._parts()
    with model._inference(srf, lrf):
        runner, features = model._views(srf, lrf, x)
        views = runner.run(features, torch.arange(1, 5), masks[1:, 0], masks[1:, 1])
    cells = features.shape[2] * features.shape[3] if lrf is None else 1  # SRF-only views train at one cell's scale
    torch.testing.assert_close(logits[1:].detach() * cells, views.to(logits.dtype))
    # SRF and LRF train together: every parameter of the base model gets a gradient
    F.cross_entropy(logits, y).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.model.parameters() if p.requires_grad)


def test_fit_masking_trains_on_those_views():
    """The loss fit_masking reports for one step is the cross entropy of the reference views of the masks it drew."""
    model = _model("pair")
    x, y = _images("pair", 8)
    before = copy.deepcopy(model)
    torch.manual_seed(7)
    history = fit_masking(model, [(x, y)], epochs=1, lr=0.1, progress=False)
    torch.manual_seed(7)
    masks = torch.randint(len(before.feature_mask_set), (8, 2))  # the default: two random feature masks per image
    expected = F.cross_entropy(_reference_logits(before, x, masks), y)
    assert history.strategy == "random_mask" and history.lr == 0.1
    assert history.final.loss == pytest.approx(expected.item(), rel=1e-5)
    assert any(not torch.equal(a, b) for a, b in zip(model.model.state_dict().values(), before.model.state_dict().values(), strict=True))


@pytest.mark.parametrize("kind", ["pair", "local"])
def test_greedy_search_costs_one_srf_pass_per_image_and_lrf_views(kind):
    model = _model(kind)
    x, y = _images(kind, 4, seed=3)
    k = len(model.feature_mask_set)
    passes = {"srf": 0, "lrf": 0}
    srf, lrf = model.srf, model.lrf
    hooks = [srf.register_forward_hook(lambda m, i, o: passes.__setitem__("srf", passes["srf"] + i[0].shape[0]))]
    if lrf is not None:
        hooks.append(lrf.register_forward_hook(lambda m, i, o: passes.__setitem__("lrf", passes["lrf"] + i[0].shape[0])))
    _, masks = _masking(model, "greedy")(x, y, return_indices=True)
    for hook in hooks:
        hook.remove()
    assert passes == {"srf": 4, "lrf": 0 if lrf is None else 4 * (2 * k - 1)}
    assert model.model.training  # searched in eval mode, given back in train mode
    with torch.no_grad():  # the worst mask, then the worst second mask with it, by the reference's loss
        for b in range(4):

            def loss(pair, b=b):
                return F.cross_entropy(_reference_logits(model, x[b : b + 1], torch.tensor([pair])).float(), y[b : b + 1])

            m1 = max(range(k), key=lambda i: loss([i, i]))
            m2 = max((j for j in range(k) if j != m1), key=lambda j: loss([m1, j]))
            assert masks[b].tolist() == [m1, m2]


def test_strategies_and_what_is_refused():
    model = _model("pair")
    assert (type(model).training_strategies, type(model).default_strategy) == (("random_mask", "greedy", "none"), "random_mask")
    x, y = _images("pair", 4)
    with pytest.raises(
        ValueError, match=r"strategy must be one of 'random_mask', 'greedy', 'none' or a callable for a 'patchcure' model; got 'grid'"
    ):
        fit_masking(model, [(x, y)], strategy="grid", progress=False)
    with pytest.raises(ValueError, match="makes its training views inside the model's forward"):
        fit_masking(model, [(x, y)], strategy=lambda images, labels: images, progress=False)
    with torch.no_grad():  # "none": every cell kept, the undefended split model
        expected = F.cross_entropy(model.lrf(model.srf(x), torch.ones(4, 4, 4, dtype=torch.bool)), y).item()
    assert fit_masking(model, [(x, y)], strategy="none", epochs=1, progress=False).final.loss == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("kind", ["vit_split", "vit_depth"])
def test_clean_images_and_validation_run_the_split_model_not_the_vits_own_forward(kind):
    """An image left clean (clean_ratio) trains on every cell kept, and val_accuracy is the split model's (predict_vanilla)."""
    model = _model(kind)
    x, y = _images(kind, 6, seed=4)
    with torch.no_grad():
        split = _masking(model, "none").logits(model.model, x, None)
        own = model.model(x)
    assert not torch.allclose(split.float(), own, atol=1e-3)  # the windowed blocks make another function
    expected = F.cross_entropy(split, y).item()
    history = fit_masking(model, [(x, y)], clean_ratio=1.0, epochs=1, lr=1e-9, val_loader=[(x, y)], progress=False)
    assert history.final.loss == pytest.approx(expected, rel=1e-5)
    model.eval()
    assert history.final.val_accuracy == (model.predict_vanilla(x) == y).sum().item() / 6


def test_a_vit_inside_distributed_data_parallel_is_refused_in_train_mode():
    """The split runs the ViT's parts: through a DistributedDataParallel around the ViT its gradients would not sync."""
    model = _model("vit_split")
    wrapper = DistributedDataParallel.__new__(DistributedDataParallel)  # a wrapper without a process group: never run
    nn.Module.__init__(wrapper)
    wrapper.module = model.model
    model.model = wrapper
    with pytest.raises(TypeError, match="would not synchronise their gradients: wrap the PatchCURE model itself"):
        model(torch.randn(1, 3, 32, 32))
    x, y = _images("vit_split", 2)
    with pytest.raises(ValueError, match="through your own DistributedDataParallel wrapper"):
        fit_masking(model, [(x, y)], epochs=1, progress=False)


# ------------------------------------------------------------------------------- the path a user takes
def _toy_task(n: int, seed: int) -> TensorDataset:
    """Two classes of 16x16 images: bright or dark (every 4x4 cell tells, so masking two masks leaves enough)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n,), generator=g)
    x = torch.randn(n, 1, 16, 16, generator=g) + (1.0 - 2.0 * y.float())[:, None, None, None] * 0.5
    return TensorDataset(x, y)


def test_a_short_run_lowers_the_loss_and_raises_certified_accuracy():
    model = robustwrap.PatchCURE(CellSRF(seed=4), MixLRF(num_classes=2, seed=5), patch=3, image_size=16, margin=0.0)
    train, val = _toy_task(64, 0), _toy_task(32, 1)
    vx, vy = val.tensors
    before = model.eval().certify(vx, vy).certified.float().mean().item()
    model.train()
    torch.manual_seed(0)
    history = fit_masking(
        model,
        DataLoader(train, batch_size=16, shuffle=True),
        val_loader=DataLoader(val, batch_size=16),
        certify_every=4,
        epochs=4,
        lr=0.1,
        progress=False,
    )
    losses = [e.loss for e in history.epochs]
    assert losses[-1] < losses[0]
    assert history.final.certified_accuracy > before and history.final.certified_accuracy >= 0.8, (before, history.final)
    model.eval()
    assert model.certify(vx, vy).certified.float().mean().item() == history.final.certified_accuracy


def _interrupted_and_resumed(tmp_path: Path, kind: str):
    x, y = _images(kind, 12)
    data = TensorDataset(x, y)

    def loader():
        return DataLoader(data, batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(0))

    torch.manual_seed(0)
    straight = _model(kind)
    fit_masking(straight, loader(), epochs=2, checkpoint_dir=tmp_path / "straight", progress=False)
    torch.manual_seed(0)
    first = _model(kind)
    fit_masking(first, loader(), epochs=1, checkpoint_dir=tmp_path / "resumed", progress=False)
    torch.manual_seed(123)  # a new process: its own random state, until the checkpoint gives the saved one back
    resumed = _model(kind)
    history = fit_masking(resumed, loader(), epochs=2, checkpoint_dir=tmp_path / "resumed", resume=True, progress=False)
    return straight, resumed, history


@pytest.mark.parametrize("kind", ["pair", "vit_split"])
def test_resume_gives_the_weights_of_an_uninterrupted_run(tmp_path, kind):
    straight, resumed, history = _interrupted_and_resumed(tmp_path, kind)
    assert len(history) == 2
    for (name, a), b in zip(straight.model.state_dict().items(), resumed.model.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    other = robustwrap.wrap(_vit(), patch=5, defense="patchcure", window=(2, 2), split=2)
    if kind == "vit_split":  # another split trains other views: its checkpoint is refused
        x, y = _images(kind, 4)
        with pytest.raises(ValueError, match="was trained with cure="):
            fit_masking(other, [(x, y)], epochs=3, checkpoint_dir=tmp_path / "resumed", resume=True, progress=False)


# ------------------------------------------------------------------------------- two processes
B = 4
TRAIN = TensorDataset(*_images("vit_split", 4 * B, seed=5))


def _worker(rank: int, world: int, port: int, folder: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60)
    )
    try:
        model = _model("vit_split")
        loader = DataLoader(TRAIN, batch_size=B, sampler=DistributedSampler(TRAIN, shuffle=False))
        history = fit_masking(model, loader, strategy="greedy", epochs=1, lr=0.1, progress=False)
        torch.save({"weights": model.model.state_dict(), "loss": history.final.loss}, Path(folder) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_processes_train_one_model_as_one_process_with_twice_the_batch(tmp_path):
    """The split's forward runs inside fit_masking's DistributedDataParallel: gradients are averaged, so
    2 processes with batches of B end where 1 process with batches of 2B does (greedy masks are deterministic)."""
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    one = _model("vit_split")
    history = fit_masking(one, DataLoader(TRAIN, batch_size=2 * B), strategy="greedy", epochs=1, lr=0.1, progress=False)
    before = _model("vit_split").model.state_dict()
    assert ranks[0]["loss"] == ranks[1]["loss"] == pytest.approx(history.final.loss, rel=1e-5)
    for name, value in one.model.state_dict().items():
        assert torch.equal(ranks[0]["weights"][name], ranks[1]["weights"][name]), name  # one model
        torch.testing.assert_close(ranks[0]["weights"][name], value, rtol=1e-5, atol=1e-6)
    assert any(not torch.equal(before[k], v) for k, v in one.model.state_dict().items())  # it trained


# ------------------------------------------------------------------------------- the command line
def test_cli_lists_the_strategies_each_defense_class_declares(capsys):
    for name, cls in DEFENSES.items():
        listed = cli.train._STRATEGIES[name]
        assert (sorted(listed), listed[0]) == (sorted(cls.training_strategies), cls.default_strategy), name
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    assert "patchcure: random_mask, greedy, none" in " ".join(capsys.readouterr().out.split())


def test_robustwrap_train_defense_patchcure(tmp_path, capsys):
    rng = np.random.default_rng(0)
    for c in "012":
        (tmp_path / "data" / c).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(tmp_path / "data" / c / f"{i}.png")
    args = ["train", "--model", "timm:bagnet_tiny", "--image-size", "32", "--in-chans", "3", "--num-classes", "3", "--workers", "0",
            "--no-progress", "--defense", "patchcure", "--patch", "3", "--epochs", "1", "--data", str(tmp_path / "data")]  # fmt: skip
    assert main([*args, "--strategy", "grid", "--out", str(tmp_path / "bad")]) == cli.EXIT_ERROR
    assert "--strategy grid does not train defense 'patchcure'; its strategies: random_mask, greedy, none" in capsys.readouterr().err
    assert main([*args, "--strategy", "greedy", "--out", str(tmp_path / "m")]) == 0, capsys.readouterr().err
    loaded = robustwrap.from_pretrained(tmp_path / "m")
    assert isinstance(loaded, robustwrap.PatchCURE) and loaded.lrf is None
