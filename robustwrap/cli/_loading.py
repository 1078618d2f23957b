"""Models and data for the commands that run a model: `--model` and its timm options, the defense
settings (`_with_settings`), `--data` and the model's preprocessing.

Nothing heavy is imported at module level: torch, timm and torchvision are imported by the
functions that use them, which only the handlers call.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ._format import _one_line
from ._options import _check_defense_options, _in_option_words, parse_class_map

if TYPE_CHECKING:  # imported lazily at run time: `robustwrap --help` must not pay for torch
    import torch
    from torch import nn

    from ..defenses import RobustPatchClassifier


def _device(name: str | None) -> torch.device:
    import torch

    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device must be cpu, cuda, cuda:N, ..., got {name!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine")
    return device


def _load_model(args: argparse.Namespace) -> tuple[RobustPatchClassifier | nn.Module, str]:
    """The model named by `--model` (and its timm options), on `--device`, in eval mode.

    A zoo, folder or Hub model comes defended; a timm model comes as its plain base model, which
    `_with_settings` wraps with the chosen defense.
    """
    device = _device(args.device)
    spec: str | None = args.model
    timm_only = [f"--{n.replace('_', '-')}" for n in ("num_classes", "in_chans", "image_size") if getattr(args, n) is not None]
    arch = _timm_arch(spec)
    if arch is not None:
        model = _load_timm(arch, args)
    else:
        weights = [o for o, given in (("--checkpoint", args.checkpoint is not None), ("--pretrained", args.pretrained)) if given]
        if weights:
            raise ValueError(f"{' and '.join(weights)} go with --model timm:<arch>; other models carry their own weights")
        folder = _folder_of(spec) if spec is not None else None
        if folder is not None and _is_plain_timm_folder(folder):
            model = _load_timm_folder(folder, args)
        else:
            if timm_only:
                raise ValueError(
                    f"{', '.join(timm_only)} apply to timm models (timm:<arch> or a folder saved by timm); "
                    f"{spec or 'the default model'} is a robustwrap model with its own input size, classes and channels"
                )
            zoo = _zoo()
            spec = spec if spec is not None else zoo.DEFAULT_MODEL
            model = _from_pretrained(spec)
    return model.to(device).eval(), spec


def _timm_arch(spec: str | None) -> str | None:
    """The architecture of `--model timm:<arch>`; None for a model named otherwise (zoo name, folder, Hub repo)."""
    if spec is None or not spec.startswith("timm:"):
        return None
    arch = spec.removeprefix("timm:")
    if not arch:
        raise ValueError("--model timm:<arch> needs an architecture name, e.g. timm:resnet18")
    return arch


def _from_pretrained(spec: str) -> RobustPatchClassifier:
    """A zoo name, a robustwrap folder or a Hub repo (`robustwrap.zoo.from_pretrained`)."""
    return _zoo().from_pretrained(spec)


def _folder_of(spec: str) -> Path | None:
    """The folder `--model` names (`local-dir:FOLDER` or an existing folder), else None."""
    if spec.startswith("local-dir:"):
        folder = Path(spec.removeprefix("local-dir:"))
        if not folder.is_dir():
            raise FileNotFoundError(f"--model {spec}: no such folder")
        return folder
    return Path(spec) if os.path.isdir(spec) else None


def _read_config(folder: Path) -> dict[str, Any]:
    path = folder / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"--model {folder}: no config.json in the folder (expected a model saved by robustwrap or by timm)")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is not valid JSON ({error})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path} holds a JSON {type(config).__name__}, expected an object")  # noqa: TRY004 - a bad file, not a bad argument
    return config


def _is_plain_timm_folder(folder: Path) -> bool:
    """A folder saved by timm (`save_pretrained`/`push_to_hub`): config.json without a robustwrap section."""
    return "robustwrap" not in _read_config(folder)


def _load_timm_folder(folder: Path, args: argparse.Namespace) -> nn.Module:
    """The timm model of a folder saved by timm, with its safetensors weights loaded strictly."""
    import timm

    from .. import models  # noqa: F401 - registers the BagNets with timm: timm:bagnet17 is a timm model
    from ..hub import load_state_strictly, read_safetensors

    config = _read_config(folder)
    if not isinstance(config.get("architecture"), str) or not timm.is_model(config["architecture"]):
        raise ValueError(f"{folder / 'config.json'} names architecture {config.get('architecture')!r}, which is not a timm model (timm {timm.__version__})")
    weights = folder / "model.safetensors"
    if not weights.is_file():
        pickles = sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt", ".pkl"))
        found = f" (found {', '.join(pickles)}: pickle checkpoints can run code and are refused)" if pickles else ""
        raise FileNotFoundError(f"--model {folder}: no model.safetensors{found}")
    state = read_safetensors(weights, str(weights))
    model = _create_timm(f"local-dir:{folder}", args, _sizes_from_state(config["architecture"], state))
    load_state_strictly(model, state, str(weights), f"the timm {config['architecture']} in {folder / 'config.json'}")
    return model


def _load_timm(arch: str, args: argparse.Namespace) -> nn.Module:
    """A timm `arch` with the weights of `--checkpoint` (loaded strictly) or timm's `--pretrained` ones."""
    import timm

    from .. import models  # noqa: F401 - registers the BagNets with timm: timm:bagnet17 is a timm model
    from ..hub import load_state_strictly, read_safetensors

    checkpoint: Path | None = args.checkpoint
    if checkpoint is None and not args.pretrained and args.command != "train":
        raise ValueError(f"--model timm:{arch} needs --pretrained (timm's weights) or --checkpoint FILE.safetensors (your trained weights)")
    if checkpoint is not None and args.pretrained:
        raise ValueError("pass --pretrained or --checkpoint, not both")
    if not timm.is_model(arch):
        raise ValueError(f"--model timm:{arch}: unknown timm architecture (see timm.list_models())")
    if checkpoint is None and not args.pretrained:
        return _create_timm(arch, args, {})  # `robustwrap train` from random initialisation
    if checkpoint is None:
        return _timm_pretrained(arch, args)
    if checkpoint.suffix != ".safetensors":
        raise ValueError(f"--checkpoint must be a .safetensors file (pickle checkpoints can run code and are refused), got {checkpoint}")
    if not checkpoint.is_file():
        raise FileNotFoundError(f"--checkpoint {checkpoint}: no such file")
    state = read_safetensors(checkpoint, f"--checkpoint {checkpoint}")
    model = _create_timm(arch, args, _sizes_from_state(arch, state))
    load_state_strictly(model, state, f"--checkpoint {checkpoint}", f"timm:{arch}")
    return model


def _timm_pretrained(arch: str, args: argparse.Namespace) -> nn.Module:
    """timm's pretrained `arch`: from the Hugging Face cache, or downloaded when the Hub can be reached."""
    import timm

    cfg = timm.get_pretrained_cfg(arch)
    hf_id = getattr(cfg, "hf_hub_id", None)
    source = f"hf-hub:{hf_id}" if hf_id else "timm's download URL"
    advice = "run once with network access to cache them, or pass --checkpoint FILE.safetensors"
    if hf_id and not _hf_cached(hf_id, getattr(cfg, "hf_hub_filename", None)):
        from huggingface_hub import constants

        from ..hub import _unreachable

        # Without a network, huggingface_hub retries for about 45 s before failing: say why at once.
        reason = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else _unreachable()
        if reason is not None:
            raise OSError(f"timm:{arch} --pretrained: the weights ({source}) are not in the Hugging Face cache and {reason}: {advice}")
    try:
        return _create_timm(arch, args, {}, pretrained=True)
    except OSError as error:  # huggingface_hub's LocalEntryNotFoundError and network errors are OSErrors
        raise OSError(
            f"timm:{arch} --pretrained: the weights ({source}) are not in the Hugging Face cache and could not be downloaded "
            f"({type(error).__name__}); {advice} (HF_HUB_OFFLINE=1 fails at once instead of retrying)"
        ) from error


def _hf_cached(repo_id: str, filename: str | None) -> bool:
    """Whether the Hugging Face cache holds weights of `repo_id` (timm reads safetensors first, else a .bin)."""
    from huggingface_hub import constants, try_to_load_from_cache

    names = [filename] if filename else ["model.safetensors", "open_clip_model.safetensors", "pytorch_model.bin"]
    return any(isinstance(try_to_load_from_cache(repo_id, name, cache_dir=constants.HF_HUB_CACHE), str) for name in names)


def _sizes_from_state(arch: str, state: dict) -> dict[str, int]:
    """The head and stem sizes of a checkpoint, as timm's own pretrained loading adapts them."""
    import timm

    cfg = timm.get_pretrained_cfg(arch)
    cfg = cfg.to_dict() if cfg is not None else {}
    sizes = {}
    head = state.get(f"{cfg.get('classifier')}.weight") if isinstance(cfg.get("classifier"), str) else None
    stem = state.get(f"{cfg.get('first_conv')}.weight") if isinstance(cfg.get("first_conv"), str) else None
    if head is not None and head.ndim >= 2:
        sizes["num_classes"] = head.shape[0]
    if stem is not None and stem.ndim == 4:
        sizes["in_chans"] = stem.shape[1]
    return sizes


def _create_timm(name: str, args: argparse.Namespace, sizes: dict[str, int], pretrained: bool = False) -> nn.Module:
    """`timm.create_model(name)` with `--num-classes`, `--in-chans` (else `sizes`) and `--image-size` where the model takes it."""
    import timm

    kwargs = dict(sizes)
    for key in ("num_classes", "in_chans"):
        if getattr(args, key) is not None:
            kwargs[key] = getattr(args, key)
    if args.image_size is not None:
        # Models with a fixed input size (ViTs) take img_size; convolutional ones take any size.
        try:
            return timm.create_model(name, pretrained=pretrained, img_size=args.image_size, **kwargs)
        except TypeError as error:
            if "img_size" not in str(error):
                raise
    return timm.create_model(name, pretrained=pretrained, **kwargs)


def _own_options(model: RobustPatchClassifier, given: dict[str, Any], patch: Any = None) -> tuple[Any, dict[str, Any]]:
    """`(patch, options)` that rebuild `model`'s own defense as it is, for `wrap`, under the `given` options and `patch`.

    PatchCleanser keeps its own mask set (token masks included) unless the command line asks for
    another (`--patch`, `--num-masks`, `--stride`), and its own `drop_tokens`.
    """
    if model.defense == "patchcleanser":
        tokens = {"drop_tokens": model.drop_tokens}
        if patch is None and "num_masks" not in given and "stride" not in given:
            return None, {"mask_set": model.mask_set, **tokens}
        if len(model.mask_set.patch_sizes) != 1:
            raise ValueError("this model's mask set covers several patch shapes; pass --patch to choose one")
        ph, pw = model.mask_set.patch_sizes[0]
        own = {}
        if "num_masks" not in given and "stride" not in given and model.mask_set.grid is not None and model.mask_set.mask_size is not None:
            own = {"num_masks": model.mask_set.grid}
        return (ph if ph == pw else (ph, pw)), {**own, **tokens}
    names = {
        "smoothing": ("ablation", "size", "stride", "threshold", "encoding", "drop_tokens"),
        "patchguard": ("receptive_field", "feature_stride", "feature_offset", "threshold", "clip"),
        # a ViT split keeps its window, split and forward; another PatchCURE model has only a mask stride
        "patchcure": ("window", "split", "mask_stride", "authors") if getattr(model, "split", None) is not None else ("mask_stride",),
    }
    ph, pw = model.patch
    return (ph if ph == pw else (ph, pw)), {name: getattr(model, name) for name in names.get(model.defense, ())}


def _with_settings(model: RobustPatchClassifier | nn.Module, patch, args: argparse.Namespace) -> RobustPatchClassifier:
    """The defended model the command line asks for, in eval mode.

    A plain (timm) base model is wrapped with `--defense` (default PatchCleanser) and its group's
    options. A defended model keeps its defense and settings, unless `--defense`, `--patch` or an
    option of a defense group asks to re-wrap: then its base model (`.model`) is wrapped again, with
    the model's own settings for whatever the command line leaves out when the defense stays, and
    the defense's defaults when it changes (the detection threshold `tau` included). `--precision`, `--margin` and `--views-per-pass` are
    set on the result.
    """
    from ..defenses import RobustPatchClassifier, wrap

    own = model.defense if isinstance(model, RobustPatchClassifier) else None
    defense = args.defense or own or "patchcleanser"
    options = _check_defense_options(args, defense, own)
    resize = {k: v for k, v in (("input_size", args.input_size), ("resize", args.resize)) if v is not None}
    if own is None:
        with _in_option_words(defense):
            model = wrap(model, patch, defense=defense, image_size=args.image_size, **resize, **options).eval()
    elif patch is not None or options or resize or defense != own:
        common: dict[str, Any] = {"image_size": model.image_size, "fill": model.fill, "precision": model.precision, "margin": model.margin}
        if model.resize is not None or resize:  # the model's own input size and resize, unless the command line changes them
            common.update({"input_size": model.input_size, "resize": model.resize or args.resize, **resize})
        if defense == own:
            own_patch, own_options = _own_options(model, options, patch)
            patch = own_patch if patch is None else patch
            options = {**own_options, **options}
            common.update(batch_size=model.batch_size, num_classes=model.num_classes)
        # `tau` is a setting of the defended model, not a wrap option: carried over by hand, or a
        # `--patch` would silently reset a saved model's detection threshold to the default.
        tau = model.tau if defense == own and model._no_detection is None else None
        with _in_option_words(defense):
            model = wrap(model.model, patch, defense=defense, **common, **options).eval()
        if tau is not None:
            model.tau = tau
    if args.precision is not None:
        model.precision = args.precision
    if args.margin is not None:
        model.margin = args.margin
    if args.views_per_pass is not None:
        model.batch_size = args.views_per_pass
    return model


def _describe(model: RobustPatchClassifier) -> str:
    """One line: the threat model and the defense's own settings."""
    mask_set = getattr(model, "mask_set", None)
    (h, w), (mh, mw) = model.input_size, model.image_size
    resized = "" if model.resize is None else f", {h}x{w} inputs resized ({model.resize}) to {mh}x{mw}"
    if model.defense == "patchcleanser" and mask_set is not None:
        return mask_set.describe() + resized
    ph, pw = model.patch
    patch = f"patch {ph}x{pw} px ({100 * ph * pw / (h * w):.2f}% of {h}x{w}){resized}"
    if model.defense == "smoothing":
        votes = "argmax votes" if model.threshold is None else f"votes softmax >= {model.threshold}"
        return f"{patch}; smoothing: {model.ablation_set.describe()}, Δ={model.delta}, {votes}, encoding {model.encoding}"
    if model.defense == "patchguard":
        (wh, ww), (r, s, o) = model.window, (model.receptive_field, model.feature_stride, model.feature_offset)
        geometry = f"receptive field {r[0]}x{r[1]} px, stride {s[0]}x{s[1]}, offset {o[0]}x{o[1]}"
        return f"{patch}; patchguard: {geometry}, window {wh}x{ww}, detection threshold {model.threshold}, clip {model.clip}"
    if model.defense == "patchcure":
        split = f"window {model.window[0]}x{model.window[1]} tokens, split {model.split}; " if model.split is not None else ""
        return f"patchcure: {split}{model.describe()}"
    return f"{patch}; {model.defense}"


def _label_names(model: RobustPatchClassifier) -> list[str] | None:
    """The model's class names (timm's `pretrained_cfg["label_names"]`), if it has one per class."""
    names = getattr(model, "label_names", None)
    if not names:
        cfg = getattr(model.model, "pretrained_cfg", None)
        names = cfg.get("label_names") if isinstance(cfg, dict) else None
    if not names or len(names) != model.num_classes:
        return None
    return [str(n) for n in names]


def _load_data(spec: str | None, class_map: str | None, model_name: str, model: RobustPatchClassifier):
    """`(dataset, name)` for `--data`: a built-in data set name or an ImageFolder directory."""
    zoo = _zoo()
    builtin = zoo.BUILTIN_DATASETS
    if spec is None:
        if model_name not in zoo.list_models():
            raise ValueError(f"--data is required for --model {model_name} (only zoo models name their own data set)")
        if class_map is not None:
            raise ValueError("--class-map goes with an image folder given by --data")
        spec = zoo.zoo_entry(model_name)["dataset"]
        if spec not in builtin:
            raise ValueError(f"--data is required for --model {model_name}: its data set ({spec}) is not shipped with robustwrap; pass --data FOLDER (your copy, in class folders)")
        return _builtin_dataset(spec, model), spec
    path = Path(spec)
    if spec in builtin:
        if path.exists():
            raise ValueError(f"--data {spec!r} is both a built-in data set and a folder here; write ./{spec} for the folder")
        if class_map is not None:
            raise ValueError("--class-map goes with an image folder, not a built-in data set")
        return _builtin_dataset(spec, model), spec
    if not path.exists():
        known = f" (built-in: {', '.join(builtin)})" if builtin else ""
        raise FileNotFoundError(f"--data {spec}: no such folder, and not a built-in data set{known}")
    if not path.is_dir():
        raise ValueError(f"--data {spec} is a file; expected a folder of class folders of images (torchvision ImageFolder)")
    folders = sorted(entry.name for entry in os.scandir(path) if entry.is_dir())
    if not folders:
        raise FileNotFoundError(f"--data {spec}: no class folders in it (expected class folders of images, as torchvision's ImageFolder)")
    class_to_idx = _class_ids(folders, model, parse_class_map(class_map) if class_map is not None else None, spec)
    transform, mode = _preprocessing(model)
    try:
        dataset = _image_folder(path, class_to_idx, transform, mode)
    except FileNotFoundError as error:
        raise FileNotFoundError(f"--data {spec}: {error} (expected class folders of images, as torchvision's ImageFolder)") from None
    return dataset, spec


def _builtin_dataset(name: str, model: RobustPatchClassifier):
    """A built-in data set in the model's preprocessing, its images converted to the model's channels
    first (grey digits for a 3-channel model), as `_read_image` converts an image folder's files."""
    import functools

    transform, mode = _preprocessing(model)
    return _zoo().builtin_dataset(name, transform=functools.partial(_converted, transform=transform, mode=mode))


def _converted(image, transform, mode: str):
    return transform(image.convert(mode))


def _class_ids(folders: list[str], model: RobustPatchClassifier, class_map: dict[str, int] | list[str] | None, spec: str) -> dict[str, int]:
    """The model's class id of each class folder of `--data` (see `--class-map`).

    In this order: the class map; the model's label names (timm's `pretrained_cfg["label_names"]`,
    which `robustwrap train` records), matched by name; else torchvision's `ImageFolder` numbering,
    the folder names sorted as strings, when there is one folder per class.

    Raises:
        ValueError: for folders that the class map or the model's label names do not name, ids
            out of range, more folders than classes, and a subset of the classes whose ids
            nothing determines.
    """
    n = model.num_classes
    shown = ", ".join(folders[:5]) + (", ..." if len(folders) > 5 else "")
    if isinstance(class_map, list):
        if len(class_map) != n:
            raise ValueError(f"--class-map lists {len(class_map)} class names but the model has {n} classes")
        class_map = {name: i for i, name in enumerate(class_map)}
    if class_map is not None:
        missing = [f for f in folders if f not in class_map]
        if missing:
            raise ValueError(f"--class-map does not name the class folders {', '.join(missing[:5])} of --data {spec}")
        bad = {f: class_map[f] for f in folders if not 0 <= class_map[f] < n}
        if bad:
            raise ValueError(f"--class-map gives class ids {bad} outside the model's 0..{n - 1}")
        return {f: class_map[f] for f in folders}
    if len(folders) > n:
        raise ValueError(f"--data {spec} has {len(folders)} class folders but the model has {n} classes")
    names = _label_names(model)
    if names is not None and len(set(names)) == len(names):  # duplicated names cannot identify a class
        known = [f for f in folders if f in names]
        if len(known) == len(folders):
            return {f: names.index(f) for f in folders}
        # The model records which class each id is: folders it does not name are refused rather than
        # numbered in sorted order, which would certify a model against another labelling.
        unknown = [f for f in folders if f not in names]
        if known:
            which = f"the class folders {', '.join(known[:3])} are label names of the model but {', '.join(unknown[:3])} are not"
        else:
            which = f"none of its class folders ({shown}) is a label name of the model ({', '.join(names[:5])}{', ...' if n > 5 else ''})"
        raise ValueError(f"--data {spec}: {which}; pass --class-map name=id,... to say which class each folder is")
    if len(folders) == n:
        # torchvision's ImageFolder numbering, as in the Python guides: names sorted as strings
        # (folders 0..11 give "10" class 2), never read as numbers.
        return {f: i for i, f in enumerate(folders)}
    raise ValueError(
        f"--data {spec} has {len(folders)} class folders ({shown}) for a model of {n} classes, and the model has no label "
        "names to match them: which classes they are is ambiguous; pass --class-map name=id,... (or a JSON file)"
    )


def _folder_label_names(dataset, num_classes: int) -> list[str] | None:
    """The class folder name of each class id `0..num_classes - 1` of an image folder from `_load_data`
    (None for a built-in data set, or folders that are not one per class)."""
    class_to_idx = getattr(dataset, "class_to_idx", None)
    if not isinstance(class_to_idx, dict) or sorted(class_to_idx.values()) != list(range(num_classes)):
        return None
    return sorted(class_to_idx, key=class_to_idx.__getitem__)


def _record_label_names(model: RobustPatchClassifier, names: list[str]) -> None:
    """Record `names` as the model's class names in timm's `pretrained_cfg["label_names"]`, which the
    saved config carries, so that certifying a folder later maps its classes by name."""
    base = model.model
    if isinstance(getattr(base, "pretrained_cfg", None), dict):
        # timm keeps label names only with the num_classes they describe
        base.pretrained_cfg = {**base.pretrained_cfg, "num_classes": model.num_classes, "label_names": list(names)}


def _image_folder(path: Path, class_to_idx: dict[str, int], transform, mode: str):
    """torchvision's ImageFolder over `path` with the given class ids instead of `0..n-1`."""
    import functools

    from torchvision.datasets import ImageFolder

    class _Folder(ImageFolder):
        def find_classes(self, directory):
            return sorted(class_to_idx), dict(class_to_idx)

    return _Folder(str(path), transform=transform, loader=functools.partial(_read_image, mode=mode))


def _preprocessing(model: RobustPatchClassifier, training: bool = False):
    """`(transform, PIL mode)` from the model's own data config (timm's resolve_data_config); with
    `training`, timm's training augmentation (random resized crop, horizontal flip) at that config."""
    from timm.data import create_transform, resolve_data_config

    channels = model.in_chans or 3
    if getattr(model, "encoding", None) == "levine2020":  # the base model takes (x, 1 - x): images have half its channels
        channels //= 2
    h, w = model.input_size  # the defended model's own input; it resizes to its base model's size itself
    config = resolve_data_config({"input_size": (channels, h, w)}, model=model.model)
    for key in ("mean", "std"):
        if channels == 1 and len(config[key]) == 3:
            # an RGB model rebuilt for grey images (--in-chans 1), as timm sums its first conv's RGB weights
            config[key] = (sum(config[key]) / 3,)
        elif channels == 3 and len(config[key]) == 1:
            # a grey model rebuilt for colour images (e.g. bagnet_tiny with in_chans=3): the one value for every channel
            config[key] = tuple(config[key]) * 3
        if len(config[key]) != channels:
            raise ValueError(f"the model's data config has {len(config[key])} {key} values but the model takes {channels} channels")
    return create_transform(**config, is_training=training), "L" if channels == 1 else "RGB"


def _read_image(path: str | Path, mode: str):
    from PIL import Image

    try:
        with Image.open(path) as image:
            return image.convert(mode)
    except FileNotFoundError:
        raise FileNotFoundError(f"no such image: {path}") from None
    except (OSError, ValueError) as error:
        raise OSError(f"cannot read image {path}: {_one_line(error)}") from None


def _zoo():
    """`robustwrap.zoo`: the model zoo and its built-in data sets."""
    from .. import zoo

    return zoo


def _check_tau(args: argparse.Namespace) -> None:
    """`--tau` is the confidence threshold of `--detect`: refused without it, before anything loads."""
    if getattr(args, "tau", None) is not None and not args.detect:
        raise ValueError("--tau is the confidence threshold of --detect; pass --detect too")


def _set_tau(args: argparse.Namespace, models: list[RobustPatchClassifier]) -> None:
    """Set `--tau` on each defended model (a defense without certified detection refuses it, in one line)."""
    if getattr(args, "tau", None) is None:
        return
    for defended in models:
        try:
            defended.tau = args.tau
        except AttributeError as error:
            raise ValueError(f"--tau: {error}") from None
