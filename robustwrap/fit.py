"""`fit_masking`: fine-tune a classifier to tolerate masked pixels (Greedy Cutout recipe).

Certified accuracy depends on how well the base model classifies images with two masks hidden.
`fit_masking` fine-tunes it on masked training images chosen by one of the strategies of
`robustwrap.augment`, with the recipe of Saha et al. (TMLR 2023) as its defaults, at the defended
model's own precision and fill, and writes a resumable checkpoint after every epoch. The rules it
follows (precision, fill, frozen modules, exact resume) are on the Concepts page,
docs/concepts.md#training.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import random
import re
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import safetensors.torch
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, IterableDataset, RandomSampler
from tqdm.auto import tqdm

from ._args import as_fill, as_labels, check_label_range, positive_int, refuses_amp
from ._dist import average_running_statistics, barrier, gather_objects, rank_and_world, sum_across
from ._unwrap import joins_processes, local_module, unwrap
from .defenses import PatchCleanser, RobustPatchClassifier, wrap
from .defenses.base import TrainingRecipe
from .defenses.patchcleanser import _masking_geometry, _masking_recipe
from .geometry import MaskSet
from .tokens import merge_distilled
from .views import eval_mode, model_device_dtype

__all__ = ["fit_masking", "FitHistory", "EpochStats", "STRATEGIES"]

STRATEGIES = PatchCleanser.training_strategies
"""Strategy names of `fit_masking` for PatchCleanser and a bare model: `"none"` (clean fine-tuning) and
those of `create_augmentation`. Each defense class lists its own in `training_strategies`."""

_CONVNET_LR, _TRANSFORMER_LR = 0.01, 0.001
_WEIGHTS, _STATE = "model.safetensors", "training_state.pt"
_EPOCH_DIR = re.compile(r"epoch_(\d+)")

Strategy = str | Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class EpochStats:
    """What one epoch of `fit_masking` measured.

    Attributes:
        epoch: 1-based epoch number.
        lr: learning rate of the first parameter group during the epoch.
        loss: mean training loss, on the images as trained (masked).
        accuracy: training accuracy, on the images as trained (masked).
        seconds: wall-clock time of the epoch's training (validation excluded).
        steps: optimizer updates (batches) in the epoch.
        val_accuracy: clean accuracy of the base model on `val_loader`, if given.
        robust_accuracy: accuracy of the defended (double-masking) prediction on `val_loader`,
            in the epochs that certify.
        certified_accuracy: certified accuracy on `val_loader`, in the epochs that certify.
        predicted_classes: how many classes the model predicted on the epoch's training images (as
            trained); 1 means it collapsed to one class (see `fit_masking`'s warning).
    """

    epoch: int
    lr: float
    loss: float
    accuracy: float
    seconds: float
    steps: int
    val_accuracy: float | None = None
    robust_accuracy: float | None = None
    certified_accuracy: float | None = None
    predicted_classes: int | None = None

    def collapse_warning(self) -> str | None:
        """What it means when the epoch's training predictions were all one class (`None` if they were not).

        `fit_masking` warns with it, and `robustwrap train` prints it under the epoch.
        """
        if self.predicted_classes != 1:
            return None
        return (
            f"in epoch {self.epoch} the model predicts one class for every training image (accuracy {self.accuracy:.4f}, that "
            "class's share): it has collapsed, and certified so its certified accuracy is at most the class share"
        )


@dataclass
class FitHistory:
    """The record of a `fit_masking` run, one `EpochStats` per epoch (a resumed run included).

    Attributes:
        strategy: the strategy's name (a callable's class or function name).
        lr: the initial learning rate of the first parameter group.
        epochs: the per-epoch statistics, in order.
    """

    strategy: str
    lr: float
    epochs: list[EpochStats] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.epochs)

    @property
    def final(self) -> EpochStats:
        """The last epoch's statistics.

        Raises:
            IndexError: if no epoch has run.
        """
        return self.epochs[-1]


@refuses_amp(
    "precision is a setting of the defended model, used alike for training, prediction and certification. "
    "Wrap with it, e.g. robustwrap.wrap(model, patch=..., precision='bfloat16'), and pass the wrapped model"
)
def fit_masking(
    model: nn.Module,
    train_loader: Iterable,
    *,
    strategy: Strategy | None = None,
    mask_set: MaskSet | None = None,
    fill: float | Sequence[float] | None = None,
    epochs: int = 10,
    lr: float | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: object | None = None,
    clean_ratio: float = 0.0,
    val_loader: Iterable | None = None,
    certify_every: int | None = None,
    device: str | torch.device | None = None,
    search_batch_size: int | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
    resume: bool = False,
    progress: bool = True,
) -> FitHistory:
    """Fine-tune a classifier on masked images so that double masking certifies more of them.

    ```python
    model = robustwrap.wrap(timm.create_model("resnet50", pretrained=True), patch=0.02)
    history = robustwrap.fit_masking(model, train_loader, val_loader=val_loader, certify_every=5)
    model.eval()   # in train mode forward is the base model's; call .eval() for robust predictions
    ```

    Each training image is masked by `strategy` (all of them with the default `clean_ratio=0`)
    and the model is trained on it with cross entropy. The defaults are the papers' recipe: SGD
    with momentum 0.9 and no weight decay, 10 epochs, the learning rate divided by 10 after half
    of the epochs (after epoch 5 of 10), and a learning rate of 0.01 for a convolutional network
    or 0.001 for a transformer. A model counts as a transformer when a submodule is an
    `nn.MultiheadAttention` or has `Attention` or `PatchEmbed` in its class name (timm's ViT,
    DeiT, BEiT, EVA, CaiT and Swin; torchvision's ViT and Swin; Hugging Face's ViT); pass `lr`
    where that rule is wrong for your model. A strategy can bring its own: PatchGuard's provable
    adversarial training starts at 0.001 for any model, the authors' rate on ImageNet (at 0.01 a
    model that cannot yet certify its training images drifts to a constant output).

    The base model is trained in place, at the defended model's `precision` (the autocast that
    prediction and certification use too; float16 adds loss scaling), with its `fill`.
    Training modes: submodules keep the modes they have when `fit_masking` starts, so a BatchNorm
    you put in eval mode stays frozen (its running statistics are not updated); only a model
    entirely in eval mode, as loaded for inference, is switched to train mode as a whole. The
    strategies search in eval mode, and every submodule gets its own mode back at the end.
    See the Concepts page, docs/concepts.md#training.

    Under `torch.distributed` (a script started by `torchrun` that called
    `torch.distributed.init_process_group`), the processes train one model: it is wrapped in
    `DistributedDataParallel` (unless you wrapped it yourself), each process searches the masks of
    its own images on its own copy of the model, the gradients of all processes are averaged in
    every update, rank 0 alone writes checkpoints and shows progress, and validation is shared out
    between the processes. With a deterministic strategy (`"greedy"`, `"multisize_greedy"`,
    `"grid"`) and a model without BatchNorm, `N` processes with batches of `B` images end with
    the weights of one process with batches of `N * B` (to float rounding) when the number of
    images is divisible by `N`. BatchNorm running statistics are averaged over the processes after
    every epoch, so that searches, validation and checkpoints use one model. See the guide,
    docs/guides/fine-tune.md#training-on-several-gpus.

    Args:
        model: a defended model (its mask set or views, fill and precision are used), or a bare
            classifier `(B, C, H, W) -> (B, num_classes)` together with `mask_set` (trained in
            float32; wrap it with `robustwrap.wrap(..., precision=...)` for another precision).
            A base model you wrapped in `DistributedDataParallel` is trained through your wrapper;
            searches, validation and checkpoints use its inner module.
        train_loader: an iterable of `(images, labels)` batches (extra items are ignored), such
            as a `DataLoader`; images normalised as the model expects, labels integer class ids.
            For `resume` to give the same result as an uninterrupted run, its order must come
            from a seeded torch generator or torch's global one (the default of a `DataLoader`).
            Under `torch.distributed` it must give each process its own images through a
            `DistributedSampler` (whose `set_epoch` is called before every epoch), or be a
            `DataLoader` over an `IterableDataset` that shards itself; all processes must yield
            the same number of batches.
        strategy: `None` (default) for the defense's own strategy (its class's
            `default_strategy`), or one of its `training_strategies`: for PatchCleanser and a
            bare model Multi-size Greedy Cutout (`"multisize_greedy"`), `"greedy"`, `"grid"`,
            `"random_mask"`, `"random_cutout"` (see `robustwrap.augment`); for (De)Randomized
            Smoothing `"random_ablation"` (one random ablated view per image, `RandomAblation`);
            for PatchGuard `"provable_adversarial"` (no masking: the loss removes the true class's
            largest window of evidence, `PatchGuard.training_loss`); for PatchCURE `"random_mask"`
            (two random masks of the feature mask set per image, applied to the features in the
            forward) and `"greedy"` (Greedy Cutout on the feature grid). Every defense takes `"none"`
            (clean fine-tuning; for PatchGuard, cross-entropy of the mean local logits) and,
            except PatchCURE (whose views are masked features), a callable
            `strategy(images, labels) -> masked images` (the images as the base model takes them).
        mask_set: the mask set the model will be certified with; required for a bare model,
            taken from a `RobustPatchClassifier`.
        fill: value of masked pixels in the model's input space; default the classifier's fill,
            or 0.0 for a bare model.
        epochs: total number of epochs, a resumed run's finished ones included.
        lr: learning rate of the default SGD optimizer (default: 0.01 or 0.001 by the rules above).
        optimizer: your own optimizer over the model's parameters, instead of the default SGD.
        scheduler: your own learning-rate scheduler, stepped once per epoch; a timm scheduler is
            also stepped after every update (`step_update`), as timm's train script does. Default:
            the papers' step decay with the default optimizer, a constant rate with your own.
        clean_ratio: probability that a training image is left unmasked (0.0: every image masked).
        val_loader: `(images, labels)` batches to measure clean accuracy on after every epoch.
            Under `torch.distributed` the processes share the work and report the same numbers:
            a loader with a `DistributedSampler` is each process's share (the duplicates the
            sampler pads with are not counted); any other loader must be the same in every
            process, which evaluates every `world_size`-th batch of it (a shuffling one is refused).
        certify_every: with `val_loader`, also certify it every this many epochs and after the
            last one (certification runs up to `K(K + 1) / 2` views per image).
        device: move the model to this device and train there (default: where the model is).
        search_batch_size: views per forward pass of a searching strategy and of certification
            (default: the classifier's `batch_size`, or 64).
        checkpoint_dir: write a checkpoint here after every epoch: `epoch_NNNN/model.safetensors`
            (the base model's weights) and `epoch_NNNN/training_state.pt` (optimizer, scheduler,
            loss scaler, epoch, history and random-number-generator states). Each is written to a
            temporary directory that is renamed into place, so a crash never leaves a partial
            checkpoint; the previous epoch's directory is removed after. Under `torch.distributed`
            rank 0 writes it (with every process's random state) and the others wait; all
            processes must read the same directory (on several machines, a shared file system).
        resume: continue from the latest checkpoint in `checkpoint_dir`, giving the same weights
            as an uninterrupted run; with no checkpoint there yet, start from scratch (so one
            command line both starts and restarts a job). The optimizer and scheduler continue
            from their saved state, so a larger `epochs` extends a finished run on its schedule.
            Under `torch.distributed` every process loads the checkpoint and continues with its
            own random state, so the number of processes must be the one that wrote it.
        progress: show a tqdm progress bar with the running loss and accuracy (on rank 0 only).

    Returns:
        The `FitHistory` of every epoch.

    Raises:
        TypeError: for a model that is not an `nn.Module`, a strategy that is neither a name
            nor a callable, or the removed `amp=` argument (precision is a setting of the
            defended model, so that training, prediction and certification cannot disagree).
        ValueError: for settings that cannot work, all checked before the first update: an unknown
            strategy name, a bare model without `mask_set`, both a classifier and `mask_set`, `lr`
            with your own optimizer, `certify_every` without `val_loader`, `resume` without
            `checkpoint_dir`, a `checkpoint_dir` that already holds a run but `resume=False` (so
            a run is never overwritten by mistake), a checkpoint made with other settings (strategy,
            clean ratio, mask set, fill or precision), an empty loader, or batches without labels
            or with labels outside `[0, num_classes)`. Under `torch.distributed`: a `train_loader`
            without a `DistributedSampler` (every process would train on all images), a `val_loader`
            that shuffles without one (each process would evaluate other images), a checkpoint
            written by another number of processes, processes that see different checkpoints, or
            `device` for a model already wrapped in `DistributedDataParallel` elsewhere.
    """
    target = _resolve_defense(model, mask_set, fill)
    classifier, base, mask_set, fill, precision = target.classifier, target.base, target.mask_set, target.fill, target.precision
    rank, world = rank_and_world()
    epochs = positive_int(epochs, "epochs")
    if isinstance(clean_ratio, bool) or not isinstance(clean_ratio, (int, float)) or not 0.0 <= clean_ratio <= 1.0:
        raise ValueError(f"clean_ratio must be a number in [0, 1], got {clean_ratio!r}")
    if certify_every is not None:
        certify_every = positive_int(certify_every, "certify_every")
        if val_loader is None:
            raise ValueError("certify_every certifies val_loader; pass val_loader too")
    if resume and checkpoint_dir is None:
        raise ValueError("resume=True continues from checkpoint_dir; pass checkpoint_dir too")
    if search_batch_size is None:
        search_batch_size = classifier.batch_size if classifier is not None else 64
    search_batch_size = positive_int(search_batch_size, "search_batch_size")
    _check_not_empty(train_loader, "train_loader")
    if world > 1:
        _check_distributed_sampler(train_loader, world)
    if val_loader is not None:
        _check_not_empty(val_loader, "val_loader")
        if world > 1:
            _check_same_on_every_rank(val_loader, world)

    if lr is not None and (isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0):
        raise ValueError(f"lr must be a positive number, got {lr!r}")
    if lr is not None and optimizer is not None:
        raise ValueError("lr sets the learning rate of the default SGD; with your own optimizer, set it there")
    recipe, strategy_name = _make_strategy(strategy, target, search_batch_size)
    loss_fn = _DeadRunWatch(recipe.loss, recipe.scores, local_logits=recipe.local_logits)

    if device is not None:
        if target.ddp is not None and torch.device(device) != model_device_dtype(base)[0]:
            raise ValueError(
                f"device={str(device)!r}, but the model is already wrapped in DistributedDataParallel on "
                f"{model_device_dtype(base)[0]}; move it before wrapping it, and leave device=None"
            )
        base.to(device)
    device, dtype = model_device_dtype(base)
    if optimizer is None:
        lr = (recipe.lr or _default_lr(base)) if lr is None else float(lr)
        optimizer = torch.optim.SGD(base.parameters(), lr=lr, momentum=0.9, weight_decay=0.0)
        if scheduler is None:
            scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=[(epochs + 1) // 2], gamma=0.1)
    loop = _Loop(
        base=base,
        augment=recipe.augment,
        encode=recipe.encode,
        resize=target.resize,
        loss=loss_fn,
        scores=recipe.scores,
        clean_ratio=float(clean_ratio),
        optimizer=optimizer,
        scheduler=scheduler,
        # float16 underflows small gradients; bfloat16 has float32's range and needs no scaling
        scaler=torch.amp.GradScaler(device.type, enabled=precision == "float16"),
        device=device,
        dtype=dtype,
        autocast=classifier.autocast if classifier is not None else contextlib.nullcontext,
        num_classes=_known_num_classes(classifier, base),
        progress=progress and rank == 0,
        rank=rank,
        world=world,
    )

    history = FitHistory(strategy=strategy_name, lr=float(optimizer.param_groups[0]["lr"]))
    config = {"strategy": strategy_name, "clean_ratio": float(clean_ratio), **target.geometry, "fill": fill, "precision": precision}
    generators = _loader_generators(train_loader)
    if checkpoint_dir is not None:
        checkpoint_dir = Path(checkpoint_dir)
        latest = _latest_checkpoint(checkpoint_dir)
        _check_same_checkpoint(latest, checkpoint_dir, world, device)
        if latest is not None and not resume:
            raise ValueError(
                f"checkpoint_dir {str(checkpoint_dir)!r} already holds a run (up to {latest.name}); "
                "pass resume=True to continue it, or choose another directory"
            )
        if latest is not None:
            history = _load_checkpoint(latest, loop, generators, config)

    certifier = None
    if certify_every is not None:
        certifier = classifier or wrap(base, mask_set=mask_set, fill=fill, batch_size=search_batch_size, num_classes=loop.num_classes)
    loop.forward, loop.trained = _trained_modules(base, recipe.augment, target.ddp, world, device, strategy_name, classifier)
    modes = [(module, module.training) for module in loop.trained.modules()]
    if not any(module.training for module in base.modules()):
        loop.trained.train()  # a model entirely in eval mode was loaded for inference, not frozen module by module
    loop.modes = [(module, module.training) for module in loop.trained.modules()]
    sampler = _distributed_sampler(train_loader)
    try:
        for epoch in range(len(history), epochs):
            if sampler is not None:
                sampler.set_epoch(epoch)  # DistributedSampler shuffles by seed + epoch: a new order each epoch, the same on resume
            with tqdm(
                total=_length(train_loader), desc=f"epoch {epoch + 1}/{epochs}", disable=not loop.progress, dynamic_ncols=True
            ) as bar:
                stats = _train_epoch(loop, train_loader, epoch, sum(e.steps for e in history.epochs), bar)
                # One model again before anything runs it in eval mode or saves it: the searches of the
                # next epoch, validation and rank 0's checkpoint (from which every process resumes).
                average_running_statistics(loop.base, world)
                if val_loader is not None:
                    certify = certify_every is not None and ((epoch + 1) % certify_every == 0 or epoch + 1 == epochs)
                    _validate(stats, loop, val_loader, certifier if certify else None)
                bar.set_postfix(_postfix(stats))
            loss_fn.end_epoch(stats, world, warn=rank == 0)  # one warning per run, not one per process
            history.epochs.append(stats)
            if checkpoint_dir is not None:
                rngs = gather_objects(_rng_state(generators), world, device)  # every rank's own random state
                if rank == 0:
                    _save_checkpoint(checkpoint_dir, loop, rngs, history, config)
                barrier(world)  # no rank goes on (or returns) before the checkpoint is in place
    finally:
        for module, training in modes:
            module.training = training
    if classifier is not None and history.epochs:
        classifier.pretrained_info = _trained_record(classifier.pretrained_info, history, world)
    return history


def _trained_record(info: dict | None, history: FitHistory, world: int) -> dict:
    """A defended model's `pretrained_info` after `fit_masking` trained it: the record of this run.

    `strategy` and `training` describe how the weights now in the model were made; the record the
    model came with (its final loss and accuracy are figures of the weights it started from) is
    kept as `training["previous"]`, never as this model's own. Measured `metrics` are left as
    they are: their fingerprint keeps them out of a save of the new weights (`robustwrap.hub`).
    """
    info = dict(info or {})
    before = {key: info.pop(key) for key in ("strategy", "training") if key in info}
    final = history.final
    info["strategy"] = history.strategy
    info["training"] = {
        "epochs": len(history),
        "lr": history.lr,
        "processes": world,
        "final_loss": round(final.loss, 4),
        "final_masked_accuracy": round(final.accuracy, 4),
        **({"previous": before} if before else {}),
    }
    return info


@dataclass
class _Loop:
    """What every epoch of `fit_masking` trains with, resolved once."""

    base: nn.Module
    augment: Callable | None
    encode: Callable[[torch.Tensor], torch.Tensor]  # an unmasked image as the base model takes it (before `resize`)
    resize: Callable[[torch.Tensor], torch.Tensor]  # input-size images to the base model's size
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (base model output, labels) -> loss
    scores: Callable[[torch.Tensor], torch.Tensor]  # base model output -> (B, num_classes), for accuracy
    clean_ratio: float
    optimizer: torch.optim.Optimizer
    scheduler: object
    scaler: torch.amp.GradScaler
    device: torch.device
    dtype: torch.dtype
    autocast: Callable[[], contextlib.AbstractContextManager]  # the defended model's precision
    num_classes: int | None  # found from the first batch when the model does not say
    progress: bool  # on rank 0 only
    rank: int
    world: int  # processes of torch.distributed (1 without)
    forward: nn.Module | None = None  # the function trained: `base`, or its views made in the forward (`_ViewForward`)
    trained: nn.Module | None = None  # what training calls: `forward`, or its DistributedDataParallel
    modes: list[tuple[nn.Module, bool]] = field(default_factory=list)  # each submodule's mode for training

    def train_mode(self) -> None:
        """Every submodule in its training mode: frozen ones (e.g. a BatchNorm in eval mode) stay frozen."""
        for module, training in self.modes:
            module.training = training

    def batch(self, batch, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """`(images, labels)` of a loader's batch on the model's device, labels checked against the model."""
        x, y = _unpack(batch, name)
        x, y = x.to(device=self.device, dtype=self.dtype, non_blocking=True), y.to(self.device, non_blocking=True)
        if self.num_classes is None:
            self.num_classes = _probe_num_classes(self.base, self.resize(self.encode(x)))
        check_label_range(y, self.num_classes, f"{name} labels")
        return x, y


def _check_finite(loop: _Loop, epoch: int, lr: float, bad: int, batches: int) -> None:
    """Stop a run whose loss was nan or inf, or whose weights are (every process raises alike: the
    counts are summed across them, and the weights are the same on every process).

    Without a gradient scaler the optimizer stepped on those batches' gradients, so the weights are
    no longer what training made them: the run stops after the epoch with the reason, before the
    epoch's checkpoint, instead of training on and reporting a loss of nan. A last step can make
    the weights non-finite after a finite loss: they are checked too. With float16's `GradScaler`
    a non-finite batch is skipped by the scaler (no step) and lowers its scale: only an epoch of
    nothing else stops.
    """
    finite = [torch.isfinite(p).all().to(loop.device) for p in loop.base.parameters()]
    weights = not finite or bool(torch.stack(finite).all())  # one host synchronisation per epoch
    if weights and (bad == 0 or (loop.scaler.is_enabled() and bad < batches)):
        return
    if bad:
        state = "the weights are still finite" if weights else "the weights are no longer finite (nan or inf)"
        what = f"the loss was not finite (nan or inf) in {bad} of {batches} batches of epoch {epoch + 1} at lr {lr:.3g}: {state}"
    else:
        what = f"the weights are not finite (nan or inf) after epoch {epoch + 1} at lr {lr:.3g}, though its loss was"
    raise FloatingPointError(
        f"fit_masking: {what}. Training diverged and stopped before the epoch's validation and checkpoint. Restart "
        "from the weights before this run (or the last checkpoint) with a lower lr"
        + ("" if loop.scaler.is_enabled() else ", or check the data for nan/inf pixels")
    )


def _train_epoch(loop: _Loop, loader: Iterable, epoch: int, updates: int, bar: tqdm) -> EpochStats:
    """One epoch over `loader`; `updates` is the number of optimizer steps before it."""
    optimizer, scheduler, scaler = loop.optimizer, loop.scheduler, loop.scaler
    loop.train_mode()
    lr = float(optimizer.param_groups[0]["lr"])
    total_loss = torch.zeros((), dtype=torch.float64, device=loop.device)
    correct = torch.zeros((), dtype=torch.long, device=loop.device)
    # batches whose loss was nan or inf (counted on the device: no sync per step) and the images of the others
    bad = torch.zeros((), dtype=torch.float64, device=loop.device)
    finite_seen = torch.zeros((), dtype=torch.float64, device=loop.device)
    seen = steps = 0
    start = time.perf_counter()
    for batch in loader:
        with loop.autocast():
            x, y = loop.batch(batch, "train_loader")
            x, view = _mask_batch(loop.augment, loop.encode, x, y, loop.clean_ratio)
            logits = merge_distilled(loop.trained(x) if view is None else loop.trained(x, view))
            loss = loop.loss(logits, y)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        steps += 1
        if hasattr(scheduler, "step_update"):  # a timm scheduler: per-update schedule
            scheduler.step_update(num_updates=updates + steps)
        finite = torch.isfinite(loss.detach())
        bad += (~finite).double()
        finite_seen += finite.double() * y.shape[0]
        total_loss += torch.where(finite, loss.detach().double(), 0.0) * y.shape[0]
        correct += (loop.scores(logits.detach()).argmax(1) == y).sum()
        seen += y.shape[0]
        bar.update(1)
        if loop.progress and steps % 10 == 1:
            shown = total_loss.item() / finite_seen.item() if finite_seen.item() else math.nan
            bar.set_postfix(loss=f"{shown:.4f}", acc=f"{correct.item() / seen:.4f}", lr=f"{lr:.3g}")
    seconds = time.perf_counter() - start
    if steps == 0:
        raise ValueError("train_loader yielded no batches; there is nothing to train on")
    # Every rank reports the whole epoch: its loss and accuracy over all processes' images.
    totals = sum_across(
        torch.stack(
            [
                total_loss,
                correct.double(),
                torch.tensor(float(seen), dtype=torch.float64, device=loop.device),
                bad,
                finite_seen,
                torch.tensor(float(steps), dtype=torch.float64, device=loop.device),
            ]
        ),
        loop.world,
    )
    total_loss, correct, seen = totals[0], int(totals[1]), int(totals[2])
    _check_finite(loop, epoch, lr, bad=int(totals[3]), batches=int(totals[5]))
    total_loss = total_loss / totals[4] * seen  # the mean over the batches whose loss was finite
    if hasattr(scheduler, "step_update"):
        scheduler.step(epoch + 1)  # timm's schedulers take the number of the next epoch
    elif scheduler is not None:
        scheduler.step()
    return EpochStats(epoch + 1, lr, total_loss.item() / seen, correct / seen, seconds, steps)


def _validate(stats: EpochStats, loop: _Loop, loader: Iterable, certifier: RobustPatchClassifier | None) -> None:
    """Fill `stats` with the clean (and, with a certifier, robust and certified) accuracy on `loader`.

    Under torch.distributed each rank evaluates its shard on the inner module (no collectives
    per batch, so shards may differ in size) and the counts are added up, so every rank reports
    the numbers of one process evaluating all of `loader`.
    """
    seen = clean = robust = certified = 0
    with torch.no_grad(), eval_mode(loop.base), loop.autocast():
        for batch in _shard(loader, loop.rank, loop.world):
            x, y = loop.batch(batch, "val_loader")
            clean += int((loop.scores(loop.forward(loop.encode(x))).argmax(1) == y).sum())
            seen += y.shape[0]
            if certifier is not None:
                result = certifier.certify(x, y)
                robust += int((result.prediction == y).sum())
                certified += int(result.certified.sum())
    counts = sum_across(torch.tensor([seen, clean, robust, certified], dtype=torch.long, device=loop.device), loop.world)
    seen, clean, robust, certified = counts.tolist()
    if seen == 0:
        raise ValueError("val_loader yielded no batches; there is nothing to evaluate on")
    stats.val_accuracy = clean / seen
    if certifier is not None:
        stats.robust_accuracy, stats.certified_accuracy = robust / seen, certified / seen


def _postfix(stats: EpochStats) -> dict[str, str]:
    values = {"loss": stats.loss, "acc": stats.accuracy, "val_acc": stats.val_accuracy, "cert_acc": stats.certified_accuracy}
    return {name: f"{value:.4f}" for name, value in values.items() if value is not None}


class _DeadRunWatch:
    """The training loss, watched for a run that cannot learn (docs/guides/fine-tune.md#dead-runs).

    It notes, on the device (no synchronisation per batch), whether some batch's loss differed
    from `ln(num_classes)` (equal scores for every class: with a constant output no gradient
    reaches the model), which classes the model predicted (one class for every image: it
    collapsed, whatever the loss) and, for PatchGuard's local logits, whether any local logit was
    positive (else all clipped evidence is 0). `warn` says so after an epoch where that happened.
    """

    def __init__(
        self,
        loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        scores: Callable[[torch.Tensor], torch.Tensor],
        local_logits: bool,
    ) -> None:
        self.loss, self.scores, self.local_logits = loss, scores, local_logits
        self.num_classes, self.moved, self.evidence, self.predicted = 0, None, None, None

    def __call__(self, output: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        loss = self.loss(output, labels)
        with torch.no_grad():
            self.num_classes = output.shape[1]
            level = math.log(self.num_classes)
            # a nan or inf loss is not "every class the same score" (`_check_finite` stops such a run)
            moved = ((loss.detach().double() - level).abs() > 1e-6 * level) | ~torch.isfinite(loss.detach())
            self.moved = moved if self.moved is None else self.moved | moved
            # one_hot, not bincount: bincount has no deterministic CUDA kernel (torch.use_deterministic_algorithms)
            predicted = F.one_hot(self.scores(output.detach()).argmax(1), self.num_classes).sum(0)
            self.predicted = predicted if self.predicted is None else self.predicted + predicted
            if self.local_logits:
                positive = (output.detach() > 0).any()
                self.evidence = positive if self.evidence is None else self.evidence | positive
        return loss

    def end_epoch(self, stats: EpochStats, world: int, warn: bool) -> None:
        """Set `stats.predicted_classes` (over every process's images: every rank calls this), warn (if `warn`)
        about an epoch that was dead or collapsed, then start watching the next one."""
        if self.predicted is not None:
            stats.predicted_classes = int((sum_across(self.predicted, world) > 0).sum())
        if warn:
            self._warn(stats)
        self.moved = self.evidence = self.predicted = None

    def _warn(self, stats: EpochStats) -> None:
        epoch = stats.epoch
        if self.moved is not None and self.num_classes > 1 and not bool(self.moved):
            warnings.warn(
                f"fit_masking: the loss of every batch of epoch {epoch} was exactly ln({self.num_classes}) = "
                f"{math.log(self.num_classes):.4f}: the model gave every class the same score on every image, so "
                "training did not move it (no gradient reaches a constant output) and further epochs will not either. "
                "Restart from the weights before this run with a lower lr, and check that the model's output depends "
                "on its input",
                UserWarning,
                stacklevel=5,  # the caller of fit_masking (through end_epoch and refuses_amp's wrapper)
            )
        elif stats.collapse_warning() is not None:
            warnings.warn(
                f"fit_masking: {stats.collapse_warning()}. Restart from the weights before this run with a lower lr, "
                "or check the labels and the model's output",
                UserWarning,
                stacklevel=5,
            )
        if self.evidence is not None and not bool(self.evidence):
            warnings.warn(
                f"fit_masking: no local logit was positive in epoch {epoch}: all of PatchGuard's clipped evidence is 0, "
                "so the defended model predicts class 0 for every image. The provable_adversarial "
                "loss still raises the true class's local logits, so later epochs can recover; if they do not, restart "
                "from the weights before this run with a lower lr, or train with strategy='none' first",
                UserWarning,
                stacklevel=5,  # the caller of fit_masking (through end_epoch and refuses_amp's wrapper)
            )


# --------------------------------------------------------------------------------- resolution
@dataclass
class _Target:
    """What `fit_masking` trains, and how its defense trains it (`RobustPatchClassifier._training_recipe`)."""

    classifier: RobustPatchClassifier | None
    base: nn.Module
    fill: float | tuple[float, ...]
    precision: str
    strategies: tuple[str, ...]  # the strategy names of the defense
    default: str  # its own strategy (`strategy=None`)
    geometry: dict  # what decides the training views, recorded in checkpoints
    recipe: Callable[[str, int], TrainingRecipe]  # (strategy, search batch size) -> how to train with it
    mask_set: MaskSet | None = None  # a bare model's (certification builds its PatchCleanser)
    ddp: nn.Module | None = None  # the user's own DistributedDataParallel (or a wrapper of one) around `base`, trained through
    # Images at the defended model's input size to the base model's (its `resize_input`): training
    # masks in input pixels and resizes the views, as certification does.
    resize: Callable[[torch.Tensor], torch.Tensor] = field(default=lambda x: x)

    def __post_init__(self) -> None:
        if joins_processes(self.base):
            self.ddp, self.base = self.base, local_module(self.base)


def _resolve_defense(model, mask_set, fill) -> _Target:
    """The base model, fill, precision and training of the defense (docs/concepts.md#training).

    A bare model with `mask_set` trains as PatchCleanser's base model, the defense it will be certified with.
    """
    if isinstance(model, RobustPatchClassifier):
        if mask_set is not None:
            raise ValueError(f"the {type(model).__name__} brings its own mask set and fill; pass mask_set with a bare model only, not both")
        fill = model.fill if fill is None else as_fill(fill)
        return _Target(
            classifier=model,
            base=model.model,
            fill=fill,
            precision=model.precision,
            resize=model.resize_input,
            strategies=model.training_strategies,
            default=model.default_strategy,
            geometry=model._training_geometry(),
            recipe=lambda strategy, batch_size: model._training_recipe(strategy, fill, batch_size),
        )
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module or a RobustPatchClassifier, got {type(model).__name__}")
    if mask_set is None:
        raise ValueError("mask_set is required for a bare model (the masks it will be certified with); or pass robustwrap.wrap(model, ...)")
    if not isinstance(mask_set, MaskSet):
        raise TypeError(f"mask_set must be a robustwrap.MaskSet, got {type(mask_set).__name__}")
    fill = 0.0 if fill is None else as_fill(fill)
    return _Target(
        classifier=None,
        base=model,
        fill=fill,
        precision="float32",
        strategies=PatchCleanser.training_strategies,
        default=PatchCleanser.default_strategy,
        geometry=_masking_geometry(mask_set),
        recipe=lambda strategy, batch_size: _masking_recipe(strategy, mask_set, model, fill, batch_size),
        mask_set=mask_set,
    )


def _make_strategy(strategy, target: _Target, batch_size: int) -> tuple[TrainingRecipe, str]:
    """How to train with `strategy` (`None`: the defense's default), and the strategy's name."""
    defense = f"a {target.classifier.defense!r} model" if target.classifier is not None else "this model"
    if strategy is None:
        strategy = target.default
    if isinstance(strategy, str):
        if strategy not in target.strategies:
            raise ValueError(
                f"strategy must be one of {', '.join(map(repr, target.strategies))} or a callable for {defense}; got {strategy!r}"
            )
        return target.recipe(strategy, batch_size), strategy
    if callable(strategy):
        clean = target.recipe("none", batch_size)
        if clean.augment is not None:
            raise ValueError(
                f"a callable strategy masks the images, but {defense} makes its training views inside the model's forward; "
                f"pass one of its strategies: {', '.join(map(repr, target.strategies))}"
            )
        return dataclasses.replace(clean, augment=strategy), getattr(strategy, "__name__", type(strategy).__name__)
    raise TypeError(f"strategy must be a name or a callable (images, labels) -> masked images, got {type(strategy).__name__}")


def _default_lr(model: nn.Module) -> float:
    """0.001 for a transformer (see `fit_masking`), 0.01 for a convolutional network."""
    for module in model.modules():
        name = type(module).__name__
        if isinstance(module, nn.MultiheadAttention) or "Attention" in name or "PatchEmbed" in name:
            return _TRANSFORMER_LR
    return _CONVNET_LR


def _known_num_classes(classifier, base) -> int | None:
    if classifier is not None:
        return classifier.num_classes
    value = getattr(unwrap(base), "num_classes", None)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _probe_num_classes(base: nn.Module, x: torch.Tensor) -> int:
    """Classes of a model that does not say, from one eval-mode image of the first batch."""
    with torch.no_grad(), eval_mode(base):
        logits = base(x[:1])
    if not isinstance(logits, torch.Tensor) or logits.ndim != 2:
        got = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ValueError(f"the model must map (B, C, H, W) images to (B, num_classes) logits; it returned {got}")
    return logits.shape[1]


# -------------------------------------------------------------------------------------- batches
def _length(loader) -> int | None:
    try:
        return len(loader)
    except TypeError:
        return None


def _check_not_empty(loader, name: str) -> None:
    if not isinstance(loader, Iterable):
        raise TypeError(f"{name} must be an iterable of (images, labels) batches such as a DataLoader, got {type(loader).__name__}")
    if _length(loader) == 0:
        raise ValueError(f"{name} is empty (len() == 0); there is nothing to train or evaluate on")


def _unpack(batch, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(batch, torch.Tensor) or not isinstance(batch, Sequence) or len(batch) < 2:
        got = f"a tensor of shape {tuple(batch.shape)}" if isinstance(batch, torch.Tensor) else f"{type(batch).__name__}"
        if isinstance(batch, Sequence) and not isinstance(batch, torch.Tensor):
            got += f" of {len(batch)} item(s)"
        raise ValueError(f"{name} must yield (images, labels) batches so the model can learn the labels; got {got}")
    x, y = batch[0], batch[1]
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.ndim != 4:
        got = f"shape {tuple(x.shape)}, dtype {x.dtype}" if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{name} images must be a floating tensor of shape (B, C, H, W), got {got}")
    return x, as_labels(y, x.shape[0], f"{name} labels")


def _views_in_forward(augment) -> bool:
    """Whether `augment` makes its views in the model's forward (`augment.logits`), see `TrainingRecipe`."""
    return bool(getattr(augment, "views_in_forward", False))


class _ViewForward(nn.Module):
    """The base model on training views as certification runs them (`augment.logits`: smoothing's token
    dropping, PatchCURE's masked features).

    `forward(x, view)` runs each image's view (`view=None`: every image clean). One module, so
    that `DistributedDataParallel` can wrap it.
    """

    def __init__(self, base: nn.Module, augment) -> None:
        super().__init__()
        self.base = base
        self.augment = augment  # not a module: its state is the view geometry (and a resize, `RandomAblation.resize`)

    def forward(self, x: torch.Tensor, view: torch.Tensor | None = None) -> torch.Tensor:
        return self.augment.logits(self.base, x, view)


def _mask_batch(augment, encode, x: torch.Tensor, y: torch.Tensor, clean_ratio: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`x` with every image masked by `augment`, except a `clean_ratio` share left clean (`encode`d) at random.

    With an augmentation whose views the model runs on in its own way (smoothing's token
    dropping, `RandomAblation.logits`; PatchCURE's masked features) also each image's view
    (`-1`: clean), else `None`.
    """
    indexed = _views_in_forward(augment)
    if augment is None or clean_ratio == 1.0:
        return encode(x), None
    clean = encode(x)
    if clean_ratio == 0.0:
        return _run_strategy(augment, x, y, clean.shape, indexed)
    masked = (torch.rand(x.shape[0]) >= clean_ratio).to(x.device)
    out = clean.clone()
    out[masked], view = _run_strategy(augment, x[masked], y[masked], clean[masked].shape, indexed)
    if view is None:
        return out, None
    views = torch.full((x.shape[0], *view.shape[1:]), -1, dtype=torch.long, device=x.device)
    views[masked] = view
    return out, views


def _run_strategy(
    augment, x: torch.Tensor, y: torch.Tensor, shape: torch.Size, indexed: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    out, view = augment(x, y, return_indices=True) if indexed else (augment(x, y), None)
    if not isinstance(out, torch.Tensor) or out.shape != shape:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"strategy must return the masked images with the shape of its input {tuple(shape)}, got {got}")
    return out, view


# ---------------------------------------------------------------------------------- processes
def _trained_modules(
    base: nn.Module, augment, ddp: nn.Module | None, world: int, device: torch.device, strategy: str, classifier=None
) -> tuple[nn.Module, nn.Module]:
    """`(forward, trained)`: the function trained, and what training calls (it, or a DistributedDataParallel of it).

    Views made in the forward (a ViT's dropped tokens, PatchCURE's masked features) run the
    model's parts, not its forward: `_ViewForward` makes them one module's forward, so that
    DistributedDataParallel sees (and synchronises) them. Under torch.distributed it is wrapped
    here, unless the user wrapped the base model: DistributedDataParallel averages the gradients
    of every process's batch (and starts every process from rank 0's weights).
    """
    forward = _ViewForward(base, augment) if _views_in_forward(augment) else base
    if forward is base and classifier is not None:
        forward = classifier._behind_resize(base)  # masked at input size, then resized (`input_size`)
    if ddp is not None and forward is not base:
        raise ValueError(
            f"fit_masking cannot train the views of strategy {strategy!r} (token-dropping views, drop_tokens, masked "
            "features, or inputs resized to the model's size, input_size) through your own DistributedDataParallel wrapper, "
            "whose forward is the model's own; pass the bare model (fit_masking wraps it in DistributedDataParallel itself "
            "under torchrun)"
        )
    if ddp is not None:
        return forward, ddp
    if world > 1:
        return forward, DistributedDataParallel(forward, device_ids=[device] if device.type == "cuda" else None)
    return forward, forward


def _distributed_sampler(loader) -> DistributedSampler | None:
    """The `DistributedSampler` that picks this rank's images of a DataLoader, if any."""
    for owner in (loader, getattr(loader, "batch_sampler", None)):
        sampler = getattr(owner, "sampler", None)
        if isinstance(sampler, DistributedSampler):
            return sampler
    return None


def _check_distributed_sampler(loader, world: int) -> None:
    """Under torch.distributed each process must train on its own images (an IterableDataset shards itself)."""
    if _distributed_sampler(loader) is not None:
        return
    if isinstance(loader, DataLoader) and isinstance(loader.dataset, IterableDataset):
        return
    got = f"a DataLoader with a {type(loader.sampler).__name__}" if isinstance(loader, DataLoader) else f"a {type(loader).__name__}"
    raise ValueError(
        f"train_loader must give each of the {world} processes of torch.distributed its own share of the images, "
        f"but it is {got}, so every process would train on all of them; build it as "
        "DataLoader(dataset, batch_size=<per process>, sampler=torch.utils.data.DistributedSampler(dataset)) "
        "(without shuffle=True: the sampler shuffles, and fit_masking calls its set_epoch every epoch)"
    )


def _check_same_on_every_rank(loader, world: int) -> None:
    """A validation loader without a DistributedSampler is split by batches, so every rank must yield the same batches.

    A shuffling sampler draws its order from each process's own random state: the ranks would
    evaluate other images than their share (some twice, some never) and report a wrong accuracy.
    """
    if _distributed_sampler(loader) is not None or not isinstance(loader, DataLoader):
        return
    if not isinstance(getattr(loader.batch_sampler, "sampler", loader.sampler), RandomSampler):
        return
    raise ValueError(
        f"val_loader must yield the same batches in each of the {world} processes of torch.distributed (which then share "
        f"them out), or give each process its own share, but it is a DataLoader with a RandomSampler (shuffle=True), whose "
        "order differs between processes, so some images would be counted twice and others never; build it without "
        "shuffle=True, or as DataLoader(dataset, batch_size=..., sampler=torch.utils.data.DistributedSampler(dataset, shuffle=False))"
    )


def _shard(loader, rank: int, world: int) -> Iterable:
    """This rank's validation batches, so that the ranks together see every image exactly once.

    A loader with a `DistributedSampler` already yields this rank's images; the duplicates the
    sampler pads the last ranks with are cut off. Any other loader is the same on every rank,
    which takes the batches `rank, rank + world, ...`, as `certify_dataset` shards its steps.
    """
    if world == 1:
        yield from loader
        return
    sampler = _distributed_sampler(loader)
    if sampler is None:
        for i, batch in enumerate(loader):
            if i % world == rank:
                yield batch
        return
    left = min(sampler.num_samples, len(range(sampler.rank, len(sampler.dataset), sampler.num_replicas)))
    for batch in loader:
        if left <= 0:
            return
        x, y = _unpack(batch, "val_loader")
        yield (x[:left], y[:left])
        left -= y.shape[0]


def _check_same_checkpoint(latest: Path | None, directory: Path, world: int, device: torch.device) -> None:
    """Every rank must resume from the same checkpoint, so checkpoint_dir must be shared by all of them."""
    seen = gather_objects(None if latest is None else latest.name, world, device)
    if len(set(seen)) > 1:
        found = ", ".join(f"rank {r}: {name or 'none'}" for r, name in enumerate(seen))
        raise ValueError(
            f"the processes see different checkpoints in checkpoint_dir {str(directory)!r} ({found}); "
            "on several machines, put checkpoint_dir on a file system that every process reads"
        )


# ---------------------------------------------------------------------------------- checkpoints
def _loader_generators(loader) -> list[torch.Generator]:
    """The torch generators that decide a DataLoader's order and worker seeds (each once)."""
    found: list[torch.Generator] = []
    for owner in (loader, getattr(loader, "sampler", None), getattr(getattr(loader, "batch_sampler", None), "sampler", None)):
        generator = getattr(owner, "generator", None)
        if isinstance(generator, torch.Generator) and all(generator is not g for g in found):
            found.append(generator)
    return found


def _rng_state(generators: list[torch.Generator]) -> dict:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": (kind, keys.tolist(), pos, has_gauss, cached),
        "loader": [g.get_state() for g in generators],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict, generators: list[torch.Generator]) -> None:
    if len(state["loader"]) != len(generators):
        raise ValueError(
            f"the checkpoint saved the state of {len(state['loader'])} train_loader generator(s) but this train_loader has "
            f"{len(generators)}; resume with a loader built the same way so the data order continues"
        )
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    for generator, saved in zip(generators, state["loader"]):
        generator.set_state(saved)
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _latest_checkpoint(directory: Path) -> Path | None:
    """The complete checkpoint of the highest epoch in `directory` (temporary ones are never complete)."""
    if not directory.is_dir():
        return None
    done = [p for p in directory.iterdir() if p.is_dir() and _EPOCH_DIR.fullmatch(p.name)]
    return max(done, key=lambda p: int(p.name.split("_")[1]), default=None)


def _save_checkpoint(directory: Path, loop: _Loop, rngs: list[dict], history: FitHistory, config: dict) -> None:
    """Write `epoch_NNNN/` atomically: fill a temporary directory, then rename it into place.

    `rngs`: the random-number-generator states of every process, in rank order.
    """
    directory.mkdir(parents=True, exist_ok=True)
    epoch = len(history)
    final = directory / f"epoch_{epoch:04d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=directory))
    try:
        safetensors.torch.save_model(unwrap(loop.base), str(tmp / _WEIGHTS), metadata={"format": "pt", "epoch": str(epoch)})
        state = {
            "epoch": epoch,
            "optimizer": loop.optimizer.state_dict(),
            "scheduler": loop.scheduler.state_dict() if loop.scheduler is not None else None,
            "scaler": loop.scaler.state_dict(),
            "rng": rngs,
            "history": {"strategy": history.strategy, "lr": history.lr, "epochs": [asdict(e) for e in history.epochs]},
            "config": config,
        }
        torch.save(state, tmp / _STATE)
        for name in (_WEIGHTS, _STATE):
            _fsync(tmp / name)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in directory.iterdir():
        if old != final and old.is_dir() and (_EPOCH_DIR.fullmatch(old.name) or old.name.startswith(".epoch_")):
            shutil.rmtree(old, ignore_errors=True)


def _load_checkpoint(path: Path, loop: _Loop, generators: list[torch.Generator], config: dict) -> FitHistory:
    """Restore everything `_save_checkpoint` wrote (this rank's random state); returns the history so far."""
    # weights_only: the training state holds tensors and plain containers; nothing is unpickled as code.
    state = torch.load(path / _STATE, map_location="cpu", weights_only=True)
    for key, value in config.items():
        if key not in state["config"]:
            continue  # a checkpoint written before the setting was recorded
        saved = state["config"][key]
        if saved != value:
            settings = (
                (f"another mask set ({len(saved)} masks)", f"this one ({len(value)} masks)")
                if key == "mask_set"
                else (f"{key}={saved!r}", repr(value))
            )
            raise ValueError(
                f"the checkpoint in {str(path)!r} was trained with {settings[0]}, not {settings[1]}; "
                "resume with the same settings or use a new checkpoint_dir"
            )
    if (state["scheduler"] is None) != (loop.scheduler is None):
        how = "without" if state["scheduler"] is None else "with"
        raise ValueError(f"the checkpoint in {str(path)!r} was trained {how} a scheduler; resume the same way")
    safetensors.torch.load_model(unwrap(loop.base), str(path / _WEIGHTS), strict=True, device=str(loop.device))
    loop.optimizer.load_state_dict(state["optimizer"])
    if loop.scheduler is not None:
        loop.scheduler.load_state_dict(state["scheduler"])
    loop.scaler.load_state_dict(state["scaler"])
    rngs = state["rng"] if isinstance(state["rng"], list) else [state["rng"]]  # one process's dict, before torchrun
    if len(rngs) != loop.world:
        raise ValueError(
            f"the checkpoint in {str(path)!r} was written by {len(rngs)} process(es) and this run has {loop.world}; "
            "resume with the same number (torchrun --nproc_per_node and --nnodes) so that every process continues its own data order"
        )
    _set_rng_state(rngs[loop.rank], generators)
    saved = state["history"]
    return FitHistory(saved["strategy"], saved["lr"], [EpochStats(**e) for e in saved["epochs"]])


def _fsync(path: Path) -> None:
    """Flush a file to disk, so that the rename never publishes a checkpoint still in the page cache."""
    with open(path, "rb") as f:
        os.fsync(f.fileno())
