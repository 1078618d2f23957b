"""Tiny models and independent brute-force references shared by the tests."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.distributed as dist
from torch import nn

# Tiny models gain nothing from intra-op threads, and on a loaded 2-core machine two threads per
# test process made small forward passes up to 50x slower.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def idle_machine(monkeypatch):
    """The CLI picks one thread and says so on a busy machine; tests must not depend on the load of
    the machine running them (a loaded CI box added that notice to one-line errors, in every file
    that runs the CLI). Tests of the busy-machine rule patch `_busy_cores` themselves."""
    from robustwrap import cli

    monkeypatch.setattr(cli, "_busy_cores", lambda: None)


class PeakNet(nn.Module):
    """logits = spatial max of a 3x3 conv: masking any region can change the label, so the
    three double-masking cases, certified and uncertified images all occur on random inputs."""

    def __init__(self, num_classes: int = 4, in_chans: int = 3, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.conv = nn.Conv2d(in_chans, num_classes, 3, padding=1)

    def forward(self, x):
        return self.conv(x).amax(dim=(2, 3))


class ViewCounter:
    """Counts the images that go through a module's forward (a forward hook)."""

    def __init__(self, module: nn.Module):
        self.images = 0
        self.calls = 0
        self.handle = module.register_forward_hook(self._hook)

    def _hook(self, module, inputs, output):
        self.images += inputs[0].shape[0]
        self.calls += 1

    def remove(self):
        self.handle.remove()


def masked_copy(image: torch.Tensor, boxes, fill) -> torch.Tensor:
    """`image` (C, H, W) with each (top, left, h, w) box set to `fill`, by plain slicing."""
    out = image.clone()
    fill = torch.as_tensor(fill, dtype=out.dtype).reshape(-1, 1, 1)
    for top, left, h, w in boxes:
        out[:, top : top + h, left : left + w] = fill
    return out


@torch.no_grad()
def brute_force_grid(model: nn.Module, x: torch.Tensor, boxes, fill=0.0) -> torch.Tensor:
    """Every P_ij (i, j over all masks) by building each view with slicing: `(B, K, K)` labels."""
    model.eval()
    k = len(boxes)
    views = torch.stack([masked_copy(x[b], [boxes[i], boxes[j]], fill) for b in range(x.shape[0]) for i in range(k) for j in range(k)])
    labels = torch.cat([model(views[s : s + 512]).argmax(1) for s in range(0, views.shape[0], 512)])
    return labels.reshape(x.shape[0], k, k)


def brute_force_decide(one: list[int], grid: list[list[int]]) -> tuple[int, int]:
    """DESIGN.md section 2 read literally: returns (label, case)."""
    if len(set(one)) == 1:
        return one[0], 1
    counts = {c: one.count(c) for c in one}
    best = max(counts.values())
    y_maj = min(c for c, n in counts.items() if n == best)
    for i, p_i in enumerate(one):
        if p_i != y_maj and all(grid[i][j] == p_i for j in range(len(one))):
            return p_i, 2
    return y_maj, 3


def brute_force_certified(grid: list[list[int]], y: int) -> bool:
    """DESIGN.md section 3 read literally."""
    k = len(grid)
    return all(grid[i][j] == y for i in range(k) for j in range(i, k))


@pytest.fixture
def peaknet():
    return PeakNet()


class LocalMeans(nn.Module):
    """Local logits of 3 classes: class c is the mean of channel c over a 3x3 window, stride 2 (r = 3, s = 2, o = 0)."""

    num_classes = 3

    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.conv = nn.Conv2d(3, 3, 3, stride=2)
        with torch.no_grad():
            self.conv.weight.copy_(0.05 * torch.randn(3, 3, 3, 3))
            for c in range(3):
                self.conv.weight[c, c] += 1 / 9
            self.conv.bias.zero_()

    def forward(self, x):
        return 10 * self.conv(x)  # a few units per feature: confident windows


# ------------------------------------------------------------------- certified detection's fixtures
def sharp_peaknet(seed: int = 0, num_classes: int = 4) -> PeakNet:
    """A `PeakNet` with logits a few units apart, so that views reach high softmax confidences."""
    net = PeakNet(num_classes=num_classes, seed=seed).eval()
    with torch.no_grad():
        net.conv.weight.mul_(20)
    return net


def sharp_cleanser(tau: float = 0.0, seed: int = 0, **options):
    """PatchCleanser around `sharp_peaknet` on 12x12 images (3x3 patch, 3x3 masks) with detection threshold `tau`."""
    import robustwrap

    model = robustwrap.wrap(sharp_peaknet(seed), patch=3, image_size=12, num_masks=3, **options).eval()
    model.tau = tau
    return model


def noise_images(n: int = 10, seed: int = 0, side: int = 12) -> torch.Tensor:
    return torch.randn(n, 3, side, side, generator=torch.Generator().manual_seed(seed))


def local_means_guard(tau: float = 0.0, margin: float = 0.0):
    """PatchGuard++ around `LocalMeans` on 15x15 images (3x3 patch), detection threshold `tau`."""
    import robustwrap

    guard = robustwrap.PatchGuard(
        LocalMeans(), 3, image_size=15, receptive_field=3, feature_stride=2, feature_offset=0, margin=margin
    ).eval()
    guard.tau = tau
    return guard


def evidence_images(n: int = 12, side: int = 15) -> tuple[torch.Tensor, torch.Tensor]:
    """Images whose class channel grows with the index: `LocalMeans`'s evidence from faint to clear, labels `i % 3`."""
    gen = torch.Generator().manual_seed(5)
    labels = torch.arange(n) % 3
    x = torch.rand(n, 3, side, side, generator=gen) * 0.4 - 0.2
    for i, y in enumerate(labels.tolist()):
        x[i, y] += 0.01 * i * (0.6 + 0.8 * torch.rand(side, side, generator=gen))
    return x, labels


def silent_wrong_labels(model, x: torch.Tensor, labels: torch.Tensor, certified: torch.Tensor, p: int, contents) -> tuple[int, int]:
    """`(certified images attacked into a wrong label without an alert, attacks that raised an alert)`.

    Every `p x p` patch position of each certified image, with each of `contents` (`(C, p, p)`
    tensors), judged by the model's `detect`.
    """
    _, _, h, w = x.shape
    silent = alerts = 0
    for i in certified.nonzero()[:, 0].tolist():
        attacked = []
        for top, left, content in itertools.product(range(h - p + 1), range(w - p + 1), contents):
            view = x[i].clone()
            view[:, top : top + p, left : left + p] = content
            attacked.append(view)
        found = model.detect(torch.stack(attacked))
        silent += int(((found.prediction != labels[i]) & ~found.alert).any())
        alerts += int(found.alert.sum())
    return silent, alerts


@pytest.fixture
def group(tmp_path):
    """A gloo process group of one process, destroyed at the end."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/init", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def reference_detection_rule(unmasked: list[float], views: list[list[float]], y: int, tau: float) -> tuple[int, bool, bool]:
    """`(prediction, alert, certified)` by the published detection rule, view by view, in plain Python
    (ties to the smallest class id, `softmax > tau` strict in the alert and the certificate; margin 0)."""

    def label_and_confidence(row: list[float]) -> tuple[int, float]:
        top = max(row)
        return row.index(top), 1.0 / sum(math.exp(v - top) for v in row)

    p = unmasked.index(max(unmasked))
    alert, certified = False, p == y
    for view in views:
        label, confidence = label_and_confidence(view)
        alert |= label != p and confidence > tau
        certified &= label == y and confidence > tau
    return p, alert, certified
