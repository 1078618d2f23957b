"""`robustwrap train`: fine-tune a defended model, certify a validation split, save or push it."""

from __future__ import annotations

import argparse
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ._format import _accuracy, _one_line
from ._loading import _describe, _device, _folder_label_names, _load_data, _load_model, _preprocessing, _record_label_names, _with_settings
from ._options import _count, _crop_pct, _model_options, _positive, _positive_float

if TYPE_CHECKING:  # imported lazily at run time: `robustwrap --help` must not pay for torch
    from ..defenses import RobustPatchClassifier
    from ..report import CertificationReport


# The strategies each defense class declares (`training_strategies`, its `default_strategy` first), written
# out so that `robustwrap --help` does not import torch; tests/test_patchcure_training.py holds them equal.
_STRATEGIES = {
    "patchcleanser": ("multisize_greedy", "greedy", "grid", "random_mask", "random_cutout", "none"),
    "smoothing": ("random_ablation", "none"),
    "patchguard": ("provable_adversarial", "none"),
    "patchcure": ("random_mask", "greedy", "none"),
}
_STRATEGY_HELP = "; ".join(f"{defense}: {', '.join(names)}" for defense, names in _STRATEGIES.items()) + " (none: clean fine-tuning)"


def register(commands, common: argparse.ArgumentParser) -> None:
    """`robustwrap train`: certify's model, threat-model and defense options, plus data, training and output."""
    train = commands.add_parser(
        "train",
        parents=[common],
        help="fine-tune a defended model, certify a validation split, save or push it",
        description=(
            "Fine-tune a model for certification (robustwrap.fit_masking, the defense's own strategy by default: Multi-size "
            "Greedy Cutout for PatchCleanser), certify --val-data with the trained model (robustwrap.certify_dataset), "
            "record the measured accuracies in its config and model card and the class names (the --data folders) in its config, "
            "and write a Hub-format folder (--out), push it (--push), or both. The model, threat-model and defense options are certify's."
        ),
        epilog=(
            "Many processes: 'torchrun --nproc_per_node N -m robustwrap train ...' trains one model on N processes (NCCL, "
            "one GPU each; gloo on CPUs), --batch-size images per process and step; validation is split between them; "
            "only rank 0 prints, saves and pushes. See the 'At scale' guide of the documentation."
        ),
    )
    _model_options(train, sweep=False)
    data = train.add_argument_group("data")
    data.add_argument("--data", required=True, help="training images: an image folder laid out like torchvision's ImageFolder, or a built-in data set name")
    data.add_argument("--val-data", help="validation images, certified after training; the accuracies go into the model card (default: none, nothing is certified)")
    data.add_argument("--class-map", metavar="MAP", help="class ids of the class folders of --data and --val-data, as for certify")
    data.add_argument("--dataset-name", metavar="NAME", help="the data set's name in the model card, with or without --val-data (default: the --val-data folder's name)")
    data.add_argument(
        "--augment",
        action="store_true",
        help="train on timm's training augmentation at the model's data config (random resized crop, horizontal flip) "
        "instead of its evaluation preprocessing (resize, center crop)",
    )
    data.add_argument(
        "--crop-pct",
        type=_crop_pct,
        metavar="F",
        help="the share of the resized image its center crop keeps (timm's crop_pct, in (0, 1]; 1 resizes without cropping, "
        "as the papers do for CIFAR-10); saved in the model's pretrained_cfg, so certify preprocesses the same way "
        "(default: the model's own)",
    )
    data.add_argument(
        "--workers",
        type=_count,
        default=_default_workers(),
        metavar="N",
        help="data-loading worker processes per training process (default: 4, or fewer where this process may use fewer CPU cores; "
        "0 loads in the main process)",
    )
    fit = train.add_argument_group("training")
    fit.add_argument("--epochs", type=_positive, default=10, metavar="N", help="epochs (default 10, the papers'; the learning rate drops x0.1 after half)")
    fit.add_argument("--batch-size", type=_positive, default=64, metavar="N", help="training images per step and process (default 64; under torchrun a step trains N x the number of processes)")
    fit.add_argument("--lr", type=_positive_float, metavar="LR", help="learning rate of SGD with momentum 0.9 (default 0.01 for a convolutional network, 0.001 for a transformer or PatchGuard's provable adversarial training)")
    fit.add_argument(
        "--strategy",
        metavar="NAME",
        help=f"training strategy of the chosen defense (default: its own, listed first): {_STRATEGY_HELP}",
    )
    fit.add_argument("--seed", type=int, default=0, help="seed of the shuffling, the strategies' randomness (seed + rank under torchrun) and a random initialisation (default 0)")
    fit.add_argument("--checkpoint-dir", type=Path, metavar="DIR", help="write a resumable checkpoint here after every epoch")
    fit.add_argument("--resume", action="store_true", help="continue the run in --checkpoint-dir from its last epoch (same weights as an uninterrupted run)")
    fit.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    output = train.add_argument_group("output (one of them, or both)")
    output.add_argument("--out", type=Path, metavar="DIR", help="write the trained model to a new folder in the Hub format (robustwrap.from_pretrained(DIR) loads it)")
    output.add_argument(
        "--push",
        metavar="ORG/NAME",
        help="push the trained model to this Hugging Face Hub repo; the repo id, the network and your login's write access are checked "
        "before training, and the model is written to --out (or a new folder, kept and named if the push fails) before the push",
    )
    train.set_defaults(run=_train)


def _default_workers() -> int:
    """4 data-loading workers, or as many as the CPU cores this process may run on, as torch's DataLoader
    counts them (more makes it warn on every run)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return min(4, cores or 1)


def _train(args: argparse.Namespace) -> None:
    """`robustwrap train`: fit_masking on --data, certify_dataset on --val-data, then save or push (rank 0 only)."""
    import torch
    from torch.utils.data import DataLoader, DistributedSampler

    from ..dataset import certify_dataset
    from ..fit import _latest_checkpoint, fit_masking
    from ..hub import check_save_folder

    if args.strategy is not None and not any(args.strategy in names for names in _STRATEGIES.values()):
        raise ValueError(f"--strategy must be one of {_STRATEGY_HELP}; got {args.strategy!r}")
    if args.resume and args.checkpoint_dir is None:
        raise ValueError("--resume continues the run in --checkpoint-dir; pass --checkpoint-dir DIR too")
    if args.resume and not args.checkpoint_dir.is_dir():
        # A mistyped folder would otherwise start a new run from scratch without a word.
        raise FileNotFoundError(f"--resume: --checkpoint-dir {args.checkpoint_dir} does not exist; leave out --resume to start a new run there")
    # Everything that could keep the trained model from being written is checked before hours of training.
    if args.out is None and args.push is None:
        raise ValueError("pass --out DIR (a new folder), --push ORG/NAME (a Hub repo) or both: where should the trained model go?")
    if args.out is not None:
        check_save_folder(args.out, argument="--out")
    if args.push is not None:
        _check_push(args.push)
    rank, world, started = _start_distributed(args)
    try:
        torch.manual_seed(args.seed)  # the same random initialisation in every process
        model, model_name = _load_model(args)
        if args.crop_pct is not None:
            from ..defenses import RobustPatchClassifier

            _set_crop_pct(model.model if isinstance(model, RobustPatchClassifier) else model, args.crop_pct)
        defended = _with_settings(model, (args.patch or [None])[0], args)
        strategies = _STRATEGIES.get(defended.defense, ("none",))
        if args.strategy is not None and args.strategy not in strategies:
            raise ValueError(f"--strategy {args.strategy} does not train defense {defended.defense!r}; its strategies: {', '.join(strategies)}")
        train_set, _ = _load_data(args.data, args.class_map, model_name, defended)
        names = _folder_label_names(train_set, defended.num_classes)
        if names is not None:
            # Saved with the model, so that --val-data now and certify later map their folders by name.
            _record_label_names(defended, names)
        if args.augment:
            train_set.transform = _preprocessing(defended, training=True)[0]
        val_set, val_name = _load_data(args.val_data, args.class_map, model_name, defended) if args.val_data is not None else (None, None)
        # Under torchrun each process trains on its own shard; DistributedSampler shuffles with the
        # same seed on every rank, so the shards never overlap.
        sampler = DistributedSampler(train_set, shuffle=True, seed=args.seed) if world > 1 else None
        loader = DataLoader(train_set, batch_size=args.batch_size, shuffle=sampler is None, sampler=sampler, num_workers=args.workers)
        # The strategies' random masks (and views) come from torch's global generator: each process
        # draws its own, as its images are its own, rather than every process the same sequence.
        torch.manual_seed(args.seed + rank)
        if args.resume and rank == 0 and _latest_checkpoint(args.checkpoint_dir) is None:
            print(f"--resume: {args.checkpoint_dir} holds no checkpoint yet; training starts at epoch 1")
        history = fit_masking(
            defended,
            loader,
            strategy=args.strategy,
            epochs=args.epochs,
            lr=args.lr,
            checkpoint_dir=args.checkpoint_dir,
            resume=args.resume,
            progress=args.progress and rank == 0,
        )
        defended.eval()
        report = certify_dataset(defended, val_set, progress=args.progress and rank == 0) if val_set is not None else None
        previous = (defended.pretrained_info.get("training") or {}).get("previous")  # fit_masking's record of the model's own
        defended.pretrained_info = _trained_info(args, history, report, val_name, world)
        if previous:
            defended.pretrained_info["training"]["previous"] = previous
        if rank == 0:
            _write_trained(args, defended, history, report, world)
    finally:
        if started:
            torch.distributed.destroy_process_group()


def _set_crop_pct(base, crop_pct: float) -> None:
    """Preprocessing is a data setting of the model (timm's `pretrained_cfg`): the saved model carries it."""
    if not isinstance(getattr(base, "pretrained_cfg", None), dict):
        raise ValueError(f"--crop-pct sets a timm model's pretrained_cfg, and this {type(base).__name__} has none: preprocess its data yourself")
    base.pretrained_cfg = {**base.pretrained_cfg, "crop_pct": crop_pct}


def _start_distributed(args: argparse.Namespace) -> tuple[int, int, bool]:
    """`(rank, world size, started)`: under torchrun (WORLD_SIZE set), join its process group if
    nobody has: NCCL with one GPU per process (cuda:LOCAL_RANK), gloo on CPUs."""
    import torch

    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), False
    if "WORLD_SIZE" not in os.environ:
        return 0, 1, False
    device = _device(args.device)
    if device.type == "cuda":
        if device.index is not None and int(os.environ["WORLD_SIZE"]) > 1:
            raise ValueError(f"--device {args.device}: under torchrun each process takes the GPU of its LOCAL_RANK; pass --device cuda or leave it out")
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size(), True


def _trained_info(args: argparse.Namespace, history, report: CertificationReport | None, val_name: str | None, world: int) -> dict[str, Any]:
    """The model's `pretrained_info`: how it was trained and, with --val-data, what was measured and how to measure it again."""
    import shlex

    final = history.final
    info: dict[str, Any] = {
        "strategy": history.strategy,
        "training": {
            "data": args.data,
            "epochs": len(history),
            "batch_size": args.batch_size * world,
            "processes": world,
            "lr": history.lr,
            "seed": args.seed,
            "augment": args.augment,
            "final_loss": round(final.loss, 4),
            "final_masked_accuracy": round(final.accuracy, 4),
        },
    }
    if args.dataset_name is not None:  # named in the card whether or not anything is certified on it
        info["dataset"] = args.dataset_name
    if report is None:
        return info
    model = f"hf-hub:{args.push}" if args.push is not None else str(args.out)
    command = ["robustwrap", "certify", "--model", model, "--data", args.val_data]
    if args.class_map is not None:
        command += ["--class-map", args.class_map]
    info["dataset"] = args.dataset_name or Path(val_name).name
    info["metrics"] = report.metrics(split="val", command=shlex.join(command))
    return info


def _write_trained(args: argparse.Namespace, model: RobustPatchClassifier, history, report: CertificationReport | None, world: int) -> None:
    """Print the epochs and the report, then save to --out or push to --push (rank 0 only)."""
    for stats in history.epochs:
        print(f"epoch {stats.epoch}/{len(history)}: loss {stats.loss:.4f}, accuracy on masked images {_accuracy(stats.accuracy)}, lr {stats.lr:g}, {stats.seconds:.1f} s")
        if stats.collapse_warning() is not None:
            print(f"  warning: {stats.collapse_warning()}")
    print(f"{world} process(es) x {args.batch_size} images per step; {_describe(model)}")
    if report is not None:
        print(report.summary())
    else:
        print("no --val-data: nothing was certified, the model card records no accuracy")
    # Written to disk before the push, so that a failed push (network, permissions) loses no training.
    folder = args.out if args.out is not None else _new_folder(Path(args.push.split("/")[-1]))
    model.save_pretrained(folder)
    if args.push is None:
        print(f"saved to {folder}/; robustwrap.from_pretrained('{folder}') loads it")
        return
    try:
        url = model.push_to_hub(args.push)
    except Exception as error:  # whatever failed, the model is safe on disk: say where, in one line
        raise OSError(
            f"--push {args.push} failed ({_one_line(error)}); the trained model is saved in {folder}/: "
            f"push it with robustwrap.from_pretrained('{folder}').push_to_hub('{args.push}')"
        ) from error
    if args.out is None:
        shutil.rmtree(folder)  # only kept to survive a failed push
    else:
        print(f"saved to {folder}/; robustwrap.from_pretrained('{folder}') loads it")
    print(f"pushed to {url}; robustwrap.from_pretrained('hf-hub:{args.push}') loads it")


def _new_folder(name: Path) -> Path:
    """`name`, or `name-2`, `name-3`, ... : the first that does not exist yet."""
    folder, n = name, 1
    while folder.exists():
        n += 1
        folder = name.with_name(f"{name.name}-{n}")
    return folder


def _check_push(repo_id: str) -> None:
    """Refuse `--push repo_id` before training when the push could not succeed.

    Raises:
        ValueError: for a repo id the Hub would refuse (checked by huggingface_hub's `validate_repo_id`).
        OSError: when the Hub cannot be reached (`HF_HUB_OFFLINE`, no network), nobody is logged in,
            or the login cannot write to the repo's namespace: found after training, each would
            leave the trained model nowhere.
    """
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import LocalTokenNotFoundError
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    from ..hub import _unreachable

    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise ValueError(f"--push {repo_id!r} is not a Hub repo id (ORG/NAME or NAME): {_one_line(error)}") from None
    reason = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else _unreachable()
    if reason is not None:
        raise OSError(f"--push {repo_id}: the Hugging Face Hub cannot be reached ({reason}); train with --out DIR and push the folder later")
    try:
        me = HfApi().whoami()
    except LocalTokenNotFoundError:
        raise OSError(f"--push {repo_id}: not logged in to the Hugging Face Hub; run `hf auth login` or set HF_TOKEN") from None
    except OSError as error:  # a token the Hub refuses (HTTP 401), or the network failing now
        raise OSError(f"--push {repo_id}: the Hugging Face Hub did not confirm your login ({_one_line(error)}); check it with `hf auth whoami`") from None
    role = me.get("auth", {}).get("accessToken", {}).get("role")
    if role == "read":
        raise OSError(f"--push {repo_id}: the Hugging Face token of {me.get('name')} is read-only; log in with a write token (`hf auth login`)")
    namespace = repo_id.split("/")[0] if "/" in repo_id else me.get("name")
    writable = {me.get("name"), *(org.get("name") for org in me.get("orgs", []))}
    if namespace not in writable:
        raise OSError(f"--push {repo_id}: {me.get('name')} cannot write to {namespace!r} (writable: {', '.join(sorted(n for n in writable if n))})")
