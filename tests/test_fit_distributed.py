"""fit_masking and the augmentations under torch.distributed: two gloo processes on the CPU.

One spawn of two processes runs every scenario (starting processes is the slow part) and saves
what each rank saw; the tests compare that with single-process runs made here.
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import io
import shutil
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
from safetensors.torch import load_file
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import robustwrap
import robustwrap.fit
from robustwrap import GreedyCutout, MaskSet
from robustwrap.fit import fit_masking

SET9 = MaskSet.square(12, 3, num_masks=3)
B = 4  # images per process and step
LR = 0.1  # large enough for two processes training their own copies to drift far apart
EXACT = {"mask_set": SET9, "strategy": "greedy", "epochs": 2, "lr": LR, "certify_every": 1, "progress": False}


class TinyNet(nn.Module):
    """No BatchNorm: a process's logits depend on its own images only."""

    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.head = nn.Linear(6, 4)

    def forward(self, x):
        return self.head(F.relu(self.conv(x)).mean((2, 3)))


class BNNet(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.features = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU())
        self.head = nn.Linear(6, 4)

    def forward(self, x):
        return self.head(self.features(x).mean((2, 3)))


def data(n: int, seed: int) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 3, 12, 12, generator=g), torch.randint(0, 4, (n,), generator=g))


TRAIN, VAL = data(4 * B, 0), data(7, 1)  # 2 steps of 2B images; 7 validation images do not split evenly
# `robustwrap train` on a tiny ViT and a folder of 3 classes x 4 random images: 3 steps of 2 images per process.
CLI = ["--model", "timm:test_vit", "--image-size", "32", "--num-classes", "3", "--num-masks", "3", "--strategy", "random_mask",
       "--batch-size", "2", "--workers", "0", "--no-progress"]  # fmt: skip


class Interrupted(Exception):
    pass


class InterruptingLoader(DataLoader):
    """A DataLoader whose second epoch dies after one batch, as a killed job would."""

    def __iter__(self):
        self.epochs = getattr(self, "epochs", 0) + 1
        for i, item in enumerate(super().__iter__()):
            if self.epochs == 2 and i == 1:
                raise Interrupted
            yield item


def weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def strip(history) -> list[dict]:
    return [{**vars(e), "seconds": 0.0} for e in history.epochs]


# ------------------------------------------------------------------------------ the processes
def _worker(rank: int, world: int, port: int, folder: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60)
    )
    try:
        out = {}
        sharded = lambda dataset, **kw: DistributedSampler(dataset, shuffle=False, **kw)

        # The exactness run: B images per process, validation certified on the batches of each rank.
        net = TinyNet()
        history = fit_masking(
            net, DataLoader(TRAIN, batch_size=B, sampler=sharded(TRAIN)), val_loader=DataLoader(VAL, batch_size=2), **EXACT
        )
        out["exact"] = (weights(net), strip(history))

        # The user wrapped the model in DDP: bare, and inside a defended model whose validation
        # loader has its own DistributedSampler (which pads rank 1 with a duplicate of image 0).
        net = TinyNet()
        fit_masking(
            DistributedDataParallel(net), DataLoader(TRAIN, batch_size=B, sampler=sharded(TRAIN)), **{**EXACT, "certify_every": None}
        )
        out["user_ddp"] = weights(net)
        net = TinyNet()
        defended = robustwrap.wrap(DistributedDataParallel(net), mask_set=SET9, num_classes=4)
        val = DataLoader(VAL, batch_size=2, sampler=sharded(VAL))
        train = DataLoader(TRAIN, batch_size=B, sampler=sharded(TRAIN))
        history = fit_masking(defended, train, val_loader=val, **{k: v for k, v in EXACT.items() if k != "mask_set"})
        out["user_ddp_defended"] = (weights(net), strip(history))

        # Resume: shuffled sampler, a random strategy and a different random state per rank, so
        # that each rank must get its own random state and its sampler's epoch back.
        options = {"mask_set": SET9, "strategy": "random_mask", "epochs": 3, "lr": LR, "progress": False}
        shuffled = lambda cls=DataLoader: cls(TRAIN, batch_size=B, sampler=DistributedSampler(TRAIN, seed=5))
        straight = TinyNet()
        torch.manual_seed(100 + rank)  # after TinyNet, which seeds the global generator
        expected = fit_masking(straight, shuffled(), **options)
        out["straight"] = (weights(straight), strip(expected))

        checkpoints = Path(folder) / "checkpoints"
        writes = []
        save = robustwrap.fit._save_checkpoint
        robustwrap.fit._save_checkpoint = lambda *args, **kwargs: (writes.append(rank), save(*args, **kwargs))[1]
        first = TinyNet()
        torch.manual_seed(100 + rank)
        bar = io.StringIO()
        with contextlib.redirect_stderr(bar), contextlib.suppress(Interrupted):
            fit_masking(first, shuffled(InterruptingLoader), checkpoint_dir=checkpoints, **{**options, "progress": True})
        out["interrupted"] = {"writes": list(writes), "bar": bar.getvalue(), "files": sorted(p.name for p in checkpoints.iterdir())}
        dist.barrier()  # rank 1 lists the directory before rank 0's resumed run writes epoch 2
        resumed = TinyNet(seed=7)  # a new job: other initial weights, other random state
        torch.manual_seed(999 + rank)
        history = fit_masking(resumed, shuffled(), checkpoint_dir=checkpoints, resume=True, **options)
        robustwrap.fit._save_checkpoint = save
        out["resumed"] = (weights(resumed), strip(history), list(writes))

        # The images each epoch trains on, in order, and the mode of a model loaded in eval mode.
        orders, modes = [], []
        net = TinyNet().eval()
        record = lambda x, y: orders.append(x[:, 0, 0, 0].clone()) or modes.append(net.training) or x
        fit_masking(net, shuffled(), mask_set=SET9, strategy=record, epochs=2, lr=LR, progress=False)
        out["orders"], out["modes"] = orders, (modes, net.training)

        # A loader that is the same on every rank.
        out["no_sampler"] = _refusal(ValueError, TinyNet(), DataLoader(TRAIN, batch_size=B, shuffle=True), **options)

        # A shuffled validation loader (the same loader object, another order on each rank).
        val = DataLoader(VAL, batch_size=2, shuffle=True)
        out["shuffled_val"] = _refusal(
            ValueError, TinyNet(), DataLoader(TRAIN, batch_size=B, sampler=sharded(TRAIN)), val_loader=val, **options
        )

        out["batchnorm"] = _batchnorm_resume(rank, Path(folder) / "bn_checkpoints")
        out["cli"] = _cli_masks_and_resume(rank, Path(folder))
        out["augment"] = _augment_in_a_users_ddp_loop(rank)
        out["tokens"] = _token_dropping_training(rank)

        # nan pixels in rank 1's images only: both processes stop, with the same counts and words.
        images, labels = TRAIN.tensors
        poisoned = images.clone()
        poisoned[1::2] = float("nan")  # DistributedSampler(shuffle=False) gives rank 1 the odd images
        bad = TensorDataset(poisoned, labels)
        out["diverged"] = _refusal(FloatingPointError, TinyNet(), DataLoader(bad, batch_size=B, sampler=sharded(bad)), **options)
        torch.save(out, Path(folder) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _refusal(error_type: type[Exception], *args, **kwargs) -> str:
    """The message of the `error_type` that `fit_masking(*args, **kwargs)` raises, or "no error"."""
    try:
        fit_masking(*args, **kwargs)
    except error_type as error:
        return str(error)
    return "no error"


def _batchnorm_resume(rank: int, checkpoints: Path) -> dict:
    """A BatchNorm model with a searching strategy: straight, and interrupted in epoch 2 then resumed.

    Each rank updates its running statistics on its own images; the search of the next epoch runs
    in eval mode with them, and rank 0's checkpoint is what every rank resumes from.
    """
    options = {"mask_set": SET9, "strategy": "greedy", "epochs": 3, "lr": LR, "progress": False}
    loader = lambda cls=DataLoader: cls(TRAIN, batch_size=B, sampler=DistributedSampler(TRAIN, seed=5))
    straight = BNNet()
    expected = fit_masking(straight, loader(), **options)
    first = BNNet()
    with contextlib.suppress(Interrupted):
        fit_masking(first, loader(InterruptingLoader), checkpoint_dir=checkpoints, **options)
    dist.barrier()
    resumed = BNNet()
    history = fit_masking(resumed, loader(), checkpoint_dir=checkpoints, resume=True, **options)
    return {"straight": (weights(straight), strip(expected)), "resumed": (weights(resumed), strip(history))}


def _cli_masks_and_resume(rank: int, folder: Path) -> dict:
    """`robustwrap train` in the two processes with a random strategy: the masks each rank drew, and resume."""
    from robustwrap.augment import RandomMaskCutout
    from robustwrap.cli import main

    drawn = []
    draw = RandomMaskCutout.__call__

    def recording(self, x, y=None, *, return_indices=False):
        masked, indices = draw(self, x, y, return_indices=True)
        drawn.append(indices.clone())
        return (masked, indices) if return_indices else masked

    RandomMaskCutout.__call__ = recording
    common = ["train", *CLI, "--data", str(folder / "images"), "--checkpoint-dir"]
    try:
        codes = [main([*common, str(folder / "cli_straight"), "--epochs", "2", "--out", str(folder / "cli_straight_model")])]
        masks = list(drawn)
        codes.append(main([*common, str(folder / "cli_resumed"), "--epochs", "1", "--out", str(folder / "cli_first_model")]))
        dist.barrier()
        codes.append(main([*common, str(folder / "cli_resumed"), "--epochs", "2", "--resume", "--out", str(folder / "cli_resumed_model")]))
    finally:
        RandomMaskCutout.__call__ = draw
    return {"codes": codes, "masks": masks}


def _augment_in_a_users_ddp_loop(rank: int) -> dict:
    """One step of a user's own DDP loop with a BatchNorm model: what the search touched, what the step did."""
    net = BNNet()
    ddp = DistributedDataParallel(net)
    calls, reductions = [], []
    ddp.register_forward_pre_hook(lambda module, args: calls.append(args[0].shape[0]))

    def counting_allreduce(state, bucket):
        reductions.append(bucket.index())
        return allreduce_hook(state, bucket)

    ddp.register_comm_hook(None, counting_allreduce)
    aug = GreedyCutout(SET9, ddp, batch_size=8)
    x, y = data(2, seed=10 + rank).tensors  # other images on each rank
    before = weights(net)
    masked, chosen = aug(x, y, return_indices=True)
    seen = {
        "calls": list(calls),
        "reductions": list(reductions),
        "sync": ddp.require_backward_grad_sync,
        "modes": [m.training for m in ddp.modules()],
        "buffers_kept": all(torch.equal(before[k], v) for k, v in net.state_dict().items()),
        "chosen": chosen,
        "expected": GreedyCutout(SET9, copy.deepcopy(net), batch_size=8)(x, y, return_indices=True)[1],  # no DDP around it
    }
    F.cross_entropy(ddp(masked), y).backward()
    seen["step_calls"], seen["step_reductions"] = list(calls), list(reductions)
    seen["grad"] = net.head.weight.grad.clone()
    return seen


def _token_dropping_training(rank: int) -> dict:
    """One epoch (two steps) of smoothing with drop_tokens on a tiny ViT, each rank on its own images and views."""
    torch.manual_seed(0)
    vit = timm.create_model("test_vit", num_classes=4, img_size=12, patch_size=4)  # 3x3 tokens of 4 px
    before = weights(vit)
    defended = robustwrap.wrap(vit, 1, defense="smoothing", ablation="column", size=4, drop_tokens=True)
    torch.manual_seed(100 + rank)  # other random views on each rank
    loader = DataLoader(TRAIN, batch_size=B, sampler=DistributedSampler(TRAIN, shuffle=False))
    history = fit_masking(defended, loader, epochs=1, lr=LR, clean_ratio=0.0, progress=False)
    return {"before": before, "after": weights(vit), "steps": history.epochs[0].steps, "drop_tokens": defended.drop_tokens}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> tuple[Path, list[dict]]:
    folder = tmp_path_factory.mktemp("distributed")
    rng = np.random.default_rng(0)
    for c in "012":
        (folder / "images" / c).mkdir(parents=True)
        for i in range(4):
            Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(folder / "images" / c / f"{i}.png")
    mp.spawn(_worker, args=(2, _free_port(), str(folder)), nprocs=2, join=True)
    return folder, [torch.load(folder / f"rank{r}.pt", weights_only=False) for r in (0, 1)]


def one_process(batch_size: int, dataset: TensorDataset = TRAIN) -> tuple[dict, list[dict]]:
    net = TinyNet()
    history = fit_masking(net, DataLoader(dataset, batch_size=batch_size), val_loader=DataLoader(VAL, batch_size=2), **EXACT)
    return weights(net), strip(history)


# ------------------------------------------------------------------------------------ the tests
def test_two_processes_with_batch_b_equal_one_process_with_batch_2b(ranks):
    _, seen = ranks
    expected, history = one_process(2 * B)
    for rank in (0, 1):
        got, got_history = seen[rank]["exact"]
        torch.testing.assert_close(got, expected)
        assert [e["steps"] for e in got_history] == [2, 2]
        for mine, theirs in zip(got_history, history):  # every rank reports the numbers of all images
            assert mine["loss"] == pytest.approx(theirs["loss"], rel=1e-5)
            assert {**mine, "loss": 0} == {**theirs, "loss": 0}
    # The tolerance tells the runs apart: one process on rank 0's images alone ends elsewhere.
    alone, _ = one_process(B, torch.utils.data.Subset(TRAIN, range(0, len(TRAIN), 2)))
    with pytest.raises(AssertionError):
        torch.testing.assert_close(alone, expected)


def test_a_model_the_user_wrapped_in_ddp_trains_the_same(ranks):
    _, seen = ranks
    expected, history = one_process(2 * B)
    for rank in (0, 1):
        torch.testing.assert_close(seen[rank]["user_ddp"], expected)
        got, got_history = seen[rank]["user_ddp_defended"]
        torch.testing.assert_close(got, expected)
        # Validation through the ranks' own DistributedSampler: the padded duplicate is not counted.
        assert [(e["val_accuracy"], e["certified_accuracy"]) for e in got_history] == [
            (e["val_accuracy"], e["certified_accuracy"]) for e in history
        ]


def test_rank_0_alone_writes_checkpoints_and_shows_progress(ranks):
    _, seen = ranks
    first, second = seen[0]["interrupted"], seen[1]["interrupted"]
    assert first["writes"] == [0] and second["writes"] == []
    assert first["files"] == ["epoch_0001"]
    assert "epoch 1/3" in first["bar"] and second["bar"] == ""
    assert seen[0]["resumed"][2] == [0, 0, 0] and seen[1]["resumed"][2] == []


def test_resume_under_two_processes_continues_to_the_same_weights(ranks):
    _, seen = ranks
    for rank in (0, 1):
        straight, expected = seen[rank]["straight"]
        resumed, history, _ = seen[rank]["resumed"]
        assert all(torch.equal(resumed[k], straight[k]) for k in straight)
        assert history == expected
    assert all(torch.equal(seen[0]["straight"][0][k], seen[1]["straight"][0][k]) for k in seen[0]["straight"][0])


def test_the_samplers_epoch_is_set_before_every_epoch_and_modes_come_back(ranks):
    _, seen = ranks
    for rank in (0, 1):
        sampler = DistributedSampler(TRAIN, num_replicas=2, rank=rank, seed=5)
        expected = []
        for epoch in (0, 1):
            sampler.set_epoch(epoch)
            expected.append(TRAIN.tensors[0][list(sampler), 0, 0, 0])
        assert not torch.equal(*expected)  # the two epochs' orders differ, so the check below can fail
        assert torch.equal(torch.cat(seen[rank]["orders"]), torch.cat(expected))
        # A model entirely in eval mode trained in train mode (through the DDP wrapper) and is given it back.
        assert seen[rank]["modes"] == ([True] * 4, False)


def test_a_checkpoint_of_two_processes_resumes_only_with_two(ranks, tmp_path):
    folder, _ = ranks
    shutil.copytree(folder / "checkpoints", tmp_path / "checkpoints")
    with pytest.raises(ValueError, match=r"written by 2 process\(es\) and this run has 1; resume with the same number"):
        fit_masking(TinyNet(), DataLoader(TRAIN, batch_size=B), mask_set=SET9, strategy="random_mask", epochs=3, lr=LR,
                    checkpoint_dir=tmp_path / "checkpoints", resume=True, progress=False)  # fmt: skip


def test_a_loader_without_distributed_sampler_is_refused(ranks):
    _, seen = ranks
    for rank in (0, 1):
        message = seen[rank]["no_sampler"]
        assert message.startswith("train_loader must give each of the 2 processes of torch.distributed its own share")
        assert "a DataLoader with a RandomSampler" in message and "sampler=torch.utils.data.DistributedSampler(dataset)" in message


def test_augmentation_inside_a_users_ddp_loop_searches_alone(ranks):
    _, seen = ranks
    for rank in (0, 1):
        aug = seen[rank]["augment"]
        # The search never went through the DDP wrapper: no forward, no reduction, no sync flag touched.
        assert aug["calls"] == [] and aug["reductions"] == [] and aug["sync"] is True
        assert aug["buffers_kept"] and all(aug["modes"])  # BatchNorm statistics unchanged, train mode back
        assert torch.equal(aug["chosen"], aug["expected"])  # the search of the model in eval mode
        # The user's step then goes through DDP: one forward, gradients reduced and equal on both ranks.
        assert aug["step_calls"] == [2] and aug["step_reductions"]
    torch.testing.assert_close(seen[0]["augment"]["grad"], seen[1]["augment"]["grad"])


def test_token_dropping_views_train_one_model_across_processes(ranks):
    """Token-dropping views run the ViT's parts (robustwrap.fit._ViewForward); through DDP their
    gradients are averaged, so both ranks, on their own images and views, end with the same weights."""
    _, seen = ranks
    first, second = seen[0]["tokens"], seen[1]["tokens"]
    assert first["drop_tokens"] is second["drop_tokens"] is True and first["steps"] == second["steps"] == 2
    assert any(not torch.equal(first["before"][k], v) for k, v in first["after"].items())  # it trained
    for k, v in first["after"].items():
        assert torch.equal(v, second["after"][k]), k


def test_a_loss_that_is_nan_on_one_process_stops_every_process_alike(ranks):
    """Rank 1's images are nan: the counts are summed across the processes, so both raise (no rank waits for the other)."""
    _, seen = ranks
    assert seen[0]["diverged"] == seen[1]["diverged"]
    # 2 steps on 2 processes: rank 1's two batches, and rank 0's second (its first step averaged rank 1's nan gradients)
    assert seen[0]["diverged"].startswith("fit_masking: the loss was not finite (nan or inf) in 3 of 4 batches of epoch 1")


def test_a_shuffled_validation_loader_is_refused(ranks):
    """Each rank would shuffle the same loader its own way and evaluate other images than its share."""
    _, seen = ranks
    for rank in (0, 1):
        message = seen[rank]["shuffled_val"]
        assert message.startswith("val_loader must yield the same batches in each of the 2 processes of torch.distributed")
        assert "a DataLoader with a RandomSampler (shuffle=True)" in message and "DistributedSampler(dataset, shuffle=False)" in message


def test_resume_with_batchnorm_continues_to_the_same_weights_and_statistics(ranks):
    """The running statistics are averaged over the ranks after every epoch: the searches of the next
    epoch, validation and rank 0's checkpoint all see the one model that every rank resumes."""
    _, seen = ranks
    for rank in (0, 1):
        straight, expected = seen[rank]["batchnorm"]["straight"]
        resumed, history = seen[rank]["batchnorm"]["resumed"]
        assert history == expected
        for name, value in straight.items():
            assert torch.equal(resumed[name], value), name
    first, second = seen[0]["batchnorm"]["straight"][0], seen[1]["batchnorm"]["straight"][0]
    assert not torch.equal(first["features.1.running_mean"], BNNet().state_dict()["features.1.running_mean"])  # it trained them
    for name, value in first.items():  # one model on both ranks, running statistics included
        assert torch.equal(second[name], value), name


def test_robustwrap_train_draws_other_masks_on_each_rank_and_resumes_exactly(ranks):
    folder, seen = ranks
    for rank in (0, 1):
        assert seen[rank]["cli"]["codes"] == [0, 0, 0]
    first, second = seen[0]["cli"]["masks"], seen[1]["cli"]["masks"]
    assert len(first) == len(second) == 6  # 2 epochs of 3 steps
    assert not torch.equal(torch.cat(first), torch.cat(second))  # each rank its own random masks (seed + rank)
    straight = load_file(folder / "cli_straight_model" / "model.safetensors")
    resumed = load_file(folder / "cli_resumed_model" / "model.safetensors")
    assert straight.keys() == resumed.keys()
    for name, value in straight.items():
        assert torch.equal(resumed[name], value), name
