"""The Hub format: defended models in Hugging Face Hub repos and local folders (save, load, push).

A robust model's files are a **timm** repo plus one section (the Concepts page,
docs/concepts.md#hub-format): timm's `config.json` (`architecture`, `num_classes`, `num_features`,
`model_args`, `pretrained_cfg`) with a top-level `"robustwrap"` object, `model.safetensors` with the
base model's own keys, and a model card whose metadata carries the measured accuracies. So
`timm.create_model("hf-hub:<repo>", pretrained=True)` loads the base model and
`robustwrap.from_pretrained("hf-hub:<repo>")` the defended one.

The `"robustwrap"` section, format version 2::

    {"format_version": 2, **model.settings(), "base": {"library": "timm", ...}, "info": {...}}

that is the defense name (`"defense"`), every setting exactly as `model.settings()` returns it
(precision and margin included), how to rebuild the base model, and the free-form
`model.pretrained_info` nested under `"info"` so that it can never shadow a setting. Version 1 files
(no `defense`; `mask_set`, `fill`, `batch_size` and info at the top of the section) load as
PatchCleanser.

The defended model's `save_pretrained`, `push_to_hub`, `from_pretrained` and `generate_model_card`
delegate to `save_pretrained`, `push_to_hub`, `load` and `model_card` here. The model zoo and the
shipped data are in `robustwrap.zoo`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import socket
import tempfile
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

import safetensors
import safetensors.torch
import torch
from huggingface_hub import EvalResult, ModelCard, ModelCardData, hf_hub_download
from huggingface_hub import constants as hf_constants
from huggingface_hub.utils import EntryNotFoundError, LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError
from torch import nn

from . import models  # noqa: F401 - registers the BagNets with timm, which rebuilds a saved base model by its architecture name

if TYPE_CHECKING:
    from .defenses.base import RobustPatchClassifier

__all__ = [
    "CONFIG_NAME",
    "FORMAT_VERSION",
    "WEIGHTS_NAME",
    "check_save_folder",
    "download",
    "hub_config",
    "load",
    "load_folder",
    "load_state_strictly",
    "model_card",
    "push_to_hub",
    "read_safetensors",
    "save_folder",
    "save_pretrained",
    "sha256_of",
]

FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
# Files that would be unpickled by torch.load: they can run arbitrary code, so we never open them.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
# Keys of the "robustwrap" section that are not settings of the defended model.
SECTION_KEYS = ("format_version", "base", "info")
# Version 1 kept this free-form information at the top of the section.
V1_INFO_KEYS = ("strategy", "dataset", "metrics")
# pretrained_cfg fields that say where the *source* weights came from, not what this repo holds.
_SOURCE_KEYS = ("url", "file", "hf_hub_id", "hf_hub_filename", "source", "state_dict", "label_offset")
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


# ------------------------------------------------------------------------------- defenses
def _defense_classes() -> dict[str, type]:
    """`defense name -> class` for every defense this robustwrap knows."""
    from . import defenses

    table = getattr(defenses, "DEFENSES", None)
    if isinstance(table, dict) and table:
        return dict(table)
    from .defenses.patchcleanser import RobustPatchClassifier

    found: dict[str, type] = {}
    todo = [RobustPatchClassifier]
    while todo:
        cls = todo.pop()
        name = cls.__dict__.get("defense")
        if isinstance(name, str):
            found.setdefault(name, cls)
        todo.extend(cls.__subclasses__())
    return found


# ---------------------------------------------------------------------------------- base models
def _timm_architecture(base: nn.Module) -> str | None:
    cfg = getattr(base, "pretrained_cfg", None)
    if not isinstance(cfg, dict) or not isinstance(cfg.get("architecture"), str):
        return None
    import timm

    return cfg["architecture"] if timm.is_model(cfg["architecture"]) else None


def _jsonable(value: Any) -> Any:
    """tuples -> lists, recursively (json writes both as lists; this makes comparisons exact)."""
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    return value


def _stem_channels(base: nn.Module) -> int | None:
    """Input channels of the stem that timm's `pretrained_cfg["first_conv"]` names (timm < 1.0.31
    keeps the pretrained source's 3 channels in `input_size` for a model built with `in_chans=1`)."""
    name = base.pretrained_cfg.get("first_conv")
    if not isinstance(name, str):
        return None
    try:
        stem = base.get_submodule(name)
    except AttributeError:
        return None
    channels = getattr(stem, "in_channels", None)
    return channels if isinstance(channels, int) else None


def _is_timm_vit(base: nn.Module) -> bool:
    """timm's `VisionTransformer` with a plain patch embedding (its constructor takes `patch_size`)."""
    from timm.layers import PatchEmbed
    from timm.models.vision_transformer import VisionTransformer

    patch = getattr(getattr(base, "patch_embed", None), "patch_size", None)
    return isinstance(base, VisionTransformer) and type(base.patch_embed) is PatchEmbed and isinstance(patch, (tuple, list)) and len(patch) == 2


def _vit_args(vit: nn.Module) -> dict[str, Any]:
    """Constructor arguments of a timm ViT that shape its weights or its function, read back from the model.

    `num_heads` changes no weight's shape, only the function: a rebuild that got it wrong would
    load the weights and compute something else, so it is compared like the others.
    """
    args: dict[str, Any] = {
        "embed_dim": int(vit.embed_dim),
        "depth": len(vit.blocks),
        "class_token": vit.cls_token is not None,
        "reg_tokens": int(getattr(vit, "num_reg_tokens", 0)),
    }
    block = vit.blocks[0] if len(vit.blocks) else None
    attn = getattr(block, "attn", None)
    if isinstance(getattr(attn, "num_heads", None), int):
        args["num_heads"] = attn.num_heads
    if isinstance(getattr(attn, "qkv", None), nn.Linear):
        args["qkv_bias"] = attn.qkv.bias is not None
    fc1 = getattr(getattr(block, "mlp", None), "fc1", None)
    if isinstance(fc1, nn.Linear):
        args["mlp_ratio"] = fc1.out_features / args["embed_dim"]
    return args


def _timm_config(model: RobustPatchClassifier, architecture: str) -> dict[str, Any]:
    """timm's `config.json` for the base model, from public attributes only (any timm >= 1.0.20).

    `model_args` records what changes the architecture (`num_classes`, `in_chans`, the pooling,
    `img_size` for models with a fixed input size, a ViT's `patch_size`, and its `embed_dim`,
    `depth`, `num_heads`, `mlp_ratio`, `qkv_bias`, `class_token`, `reg_tokens` where they differ
    from what the architecture's name builds); `save_folder` then proves that timm rebuilds exactly
    these keys and shapes (and a ViT's arguments) from the file before writing anything.
    """
    base = model._inner_model  # through a DistributedDataParallel, the model it wraps
    num_classes = int(model.num_classes)
    in_chans = _stem_channels(base) or model.in_chans or int(base.pretrained_cfg.get("input_size", (3,))[0])
    h, w = model.image_size
    cfg = {k: v for k, v in base.pretrained_cfg.items() if k not in _SOURCE_KEYS and v is not None}
    cfg.pop("architecture", None)
    if cfg.get("num_classes") != num_classes:  # the labels of another head do not describe this one
        cfg.pop("label_names", None)
        cfg.pop("label_descriptions", None)
    if tuple(cfg.get("input_size", ())[1:]) != (h, w):
        cfg.pop("pool_size", None)
        cfg.pop("test_input_size", None)
        cfg.pop("test_pool_size", None)
    cfg.update(input_size=[in_chans, h, w], num_classes=num_classes, custom_load=False)
    model_args: dict[str, Any] = {"num_classes": num_classes, "in_chans": in_chans}
    pool = getattr(base, "global_pool", None)
    pool = pool if isinstance(pool, str) else getattr(pool, "pool_type", None)
    if isinstance(pool, str):
        model_args["global_pool"] = pool
    built = getattr(getattr(base, "patch_embed", None), "img_size", None)  # what a ViT-like model was built for
    if cfg.get("fixed_input_size") or isinstance(built, (tuple, list)):
        model_args["img_size"] = [int(v) for v in built] if isinstance(built, (tuple, list)) and len(built) == 2 else [h, w]
    if _is_timm_vit(base):  # a ViT built with another patch size (small images) has other patch_embed and pos_embed shapes
        model_args["patch_size"] = [int(v) for v in base.patch_embed.patch_size]
        # ... and one built with another width, depth, heads or MLP (timm.create_model(arch, embed_dim=96, depth=2)):
        # record what differs from what the architecture's name builds.
        import timm

        try:
            with torch.device("meta"):
                default = _vit_args(timm.create_model(architecture, **model_args))
        except (RuntimeError, NotImplementedError, TypeError, ValueError):  # a builder that computes on tensors: record them all
            default = {}
        model_args.update({k: v for k, v in _vit_args(base).items() if default.get(k) != v})
    config: dict[str, Any] = {"architecture": architecture, "num_classes": num_classes}
    if isinstance(getattr(base, "num_features", None), int):
        config["num_features"] = base.num_features
    if "global_pool" in model_args:
        config["global_pool"] = model_args["global_pool"]
    config["model_args"] = model_args
    config["pretrained_cfg"] = _jsonable(cfg)
    return config


def _shapes(state: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in state.items()}


def _difference(theirs: dict[str, tuple[int, ...]], ours: dict[str, tuple[int, ...]]) -> str:
    """How the base model's state dict (`ours`) differs from what timm rebuilds (`theirs`)."""
    missing, extra = sorted(set(theirs) - set(ours)), sorted(set(ours) - set(theirs))
    shapes = sorted(k for k in set(theirs) & set(ours) if theirs[k] != ours[k])
    parts = [
        f"it lacks {len(missing)} keys timm builds {missing[:4]}" if missing else "",
        f"it has {len(extra)} keys timm does not build {extra[:4]}" if extra else "",
        f"{len(shapes)} keys differ in shape (key, timm's, its) {[(k, theirs[k], ours[k]) for k in shapes[:3]]}" if shapes else "",
    ]
    return "; ".join(p for p in parts if p)


def _rebuild_timm(folder: Path, device: str) -> nn.Module:
    import timm

    with torch.device(device):
        return timm.create_model(f"local-dir:{folder}", pretrained=False)


def _check_timm_rebuild(config: dict[str, Any], base: nn.Module) -> None:
    """Refuse to save a timm base that `timm.create_model` cannot rebuild from `config`.

    Loads exactly as a user would (`timm.create_model("local-dir:...")` on the written config), on
    the meta device (no memory, no time), and compares keys and shapes with the base model's.
    """
    call = f"timm.create_model({config['architecture']!r}, {', '.join(f'{k}={v!r}' for k, v in config['model_args'].items())})"
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / CONFIG_NAME).write_text(json.dumps(config))
        try:
            rebuilt = _rebuild_timm(Path(tmp), "meta")
        except (RuntimeError, NotImplementedError, TypeError, ValueError):  # a builder that computes on tensors (.item()): build for real
            try:
                rebuilt = _rebuild_timm(Path(tmp), "cpu")
            except Exception as e:  # noqa: BLE001 - any failure means the saved repo could not be loaded
                raise ValueError(f"cannot save this {config['architecture']} base model: {call} fails ({type(e).__name__}: {e})") from e
    theirs, ours = _shapes(rebuilt.state_dict()), _shapes(base.state_dict())
    if theirs == ours and _is_timm_vit(base) and _vit_args(rebuilt) != _vit_args(base):
        raise ValueError(
            f"cannot save this {config['architecture']} base model: {call} builds a ViT of other arguments "
            f"({_vit_args(rebuilt)}, the model has {_vit_args(base)}), so the saved repo would compute something else"
        )
    if theirs != ours:
        raise ValueError(
            f"cannot save this {config['architecture']} base model: {call} builds other weights than it has "
            f"({_difference(theirs, ours)}), so the saved repo could not be loaded back. Change a timm model's head "
            "with model.reset_classifier(num_classes), or save the base model with your own code"
        )


def _torchvision_name(base: nn.Module, num_classes: int) -> str | None:
    """The torchvision builder whose model has exactly `base`'s class, keys and shapes (built on meta)."""
    if not type(base).__module__.startswith("torchvision.models"):
        return None
    import torchvision

    want = _shapes(base.state_dict())
    for name in torchvision.models.list_models():
        builder = torchvision.models.get_model_builder(name)
        annotation = builder.__annotations__.get("return")
        if annotation not in (type(base), type(base).__name__):
            continue
        with torch.device("meta"):
            try:
                candidate = builder(weights=None, num_classes=num_classes)
            except (TypeError, ValueError):
                continue
        if _shapes(candidate.state_dict()) == want:
            return name
    return None


def _base_config(model: RobustPatchClassifier) -> tuple[dict[str, Any], dict[str, Any]]:
    """`(top-level config, "base" spec)` of the base model, after proving that loading rebuilds it.

    Raises:
        TypeError: for a model that neither timm nor torchvision can rebuild.
        ValueError: for a timm model whose weights differ from what its config rebuilds (an
            edited head, say).
    """
    base = model._inner_model
    architecture = _timm_architecture(base)
    if architecture is not None:
        config = _timm_config(model, architecture)
        _check_timm_rebuild(config, base)
        return config, {"library": "timm", "architecture": architecture}
    num_classes = int(model.num_classes)
    name = _torchvision_name(base, num_classes)
    if name is not None:
        return {"num_classes": num_classes}, {"library": "torchvision", "architecture": name, "kwargs": {"num_classes": num_classes}}
    what = "torchvision" if type(base).__module__.startswith("torchvision.models") else "custom"
    raise TypeError(
        f"cannot save a {type(base).__name__} base model ({what}): only timm models (timm.create_model) and unedited "
        "torchvision models (torchvision.models.get_model) can be rebuilt from a Hub repo, and a repo that cannot be "
        "rebuilt would load as random weights or not at all"
    )


def _build_base(config: dict[str, Any], spec: dict[str, Any], folder: Path) -> nn.Module:
    where = folder / CONFIG_NAME
    library, architecture = spec.get("library"), spec.get("architecture")
    if not isinstance(architecture, str):
        raise ValueError(f"robustwrap.base.architecture in {where} must be a string, got {architecture!r}")
    if library == "timm":
        import timm

        if not timm.is_model(architecture):
            raise ValueError(f"architecture {architecture!r} in {where} is not a timm model (timm {timm.__version__})")
        if config.get("architecture") != architecture:
            raise ValueError(f"{where}: the timm architecture {config.get('architecture')!r} differs from robustwrap.base {architecture!r}")
        if not isinstance(config.get("model_args", {}), dict) or not all(isinstance(k, str) for k in config.get("model_args", {})):
            raise ValueError(f"model_args in {where} must be an object of keyword arguments, got {config.get('model_args')!r}")
        return timm.create_model(f"local-dir:{folder}", pretrained=False)
    if library == "torchvision":
        import torchvision

        if architecture not in torchvision.models.list_models():
            raise ValueError(f"architecture {architecture!r} in {where} is not a torchvision model")
        kwargs = spec.get("kwargs", {})
        if not isinstance(kwargs, dict) or set(kwargs) - {"num_classes"} or not _positive_int(kwargs.get("num_classes", 1)):
            raise ValueError(f"robustwrap.base.kwargs in {where} must be {{'num_classes': <positive int>}}, got {kwargs!r}")
        return torchvision.models.get_model(architecture, weights=None, **kwargs)
    raise ValueError(f"base library {library!r} in {where}: expected 'timm' or 'torchvision'")


# ------------------------------------------------------------------------------- config checks
def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _settings_from_v1(section: dict[str, Any], where: str) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """`(settings, runtime, info)` of a version-1 section: a PatchCleanser in float32 with margin 0.

    The values are checked by `PatchCleanser.from_settings` (and `MaskSet.from_dict`) like any
    version-2 settings.
    """
    mask_set = section.get("mask_set")
    if isinstance(mask_set, dict):
        mask_set = {k: v for k, v in mask_set.items() if k != "description"}
    settings = {
        "defense": "patchcleanser",
        "image_size": section.get("image_size", mask_set.get("image_size") if isinstance(mask_set, dict) else None),
        "fill": section.get("fill", 0.0),
        "precision": "float32",
        "margin": 0.0,
        "mask_set": mask_set,
    }
    runtime = {"batch_size": section["batch_size"]} if "batch_size" in section else {}
    if runtime and not _positive_int(runtime["batch_size"]):
        raise ValueError(f"{where}: batch_size must be a positive int, got {runtime['batch_size']!r}")
    return settings, runtime, {k: section[k] for k in V1_INFO_KEYS if k in section}


def _read_config(folder: Path) -> dict[str, Any]:
    path = folder / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no {CONFIG_NAME} in {folder}: not a robustwrap model folder")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(config).__name__}")
    return config


# ----------------------------------------------------------------------------------- saving
def hub_config(model: RobustPatchClassifier) -> dict[str, Any]:
    """The `config.json` of `model`: timm's layout plus the `"robustwrap"` section (version 2).

    Args:
        model: a defended model.

    Returns:
        The config as a JSON-able dict.

    Raises:
        TypeError: for a base model that neither timm nor torchvision can rebuild, or a
            `pretrained_info` that is not a JSON object.
        ValueError: for a timm base model that its config would not rebuild (e.g. an edited
            head), or settings that collide with the section's own keys.
    """
    settings = model.settings()
    clash = sorted(set(settings) & set(SECTION_KEYS))
    if clash:
        raise ValueError(f"settings {clash} of {type(model).__name__} collide with the Hub section's own keys {list(SECTION_KEYS)}")
    info = getattr(model, "pretrained_info", None) or {}
    if not isinstance(info, dict):
        raise TypeError(f"pretrained_info must be a dict (saved under robustwrap.info), got {type(info).__name__}")
    try:
        json.dumps(info, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise TypeError(f"pretrained_info must be JSON-serialisable (saved under robustwrap.info): {e}") from None
    config, base = _base_config(model)
    info = _measured_info(model, warn=True)
    config["robustwrap"] = {"format_version": FORMAT_VERSION, **_jsonable(settings), "base": base, "info": _jsonable(info)}
    return config


def _measured_info(model: RobustPatchClassifier, warn: bool = False) -> dict[str, Any]:
    """`model.pretrained_info` without measured figures that belong to other weights or settings.

    A figure is a measurement of one defended function: `pretrained_info["metrics"]` travels to
    a config or a card only when its `fingerprint` (see `CertificationReport.metrics`) is the
    model's fingerprint now. After `fit_masking`, `model.model = other`, an edit of a weight or a
    changed setting it is left out, since a card must never claim what other weights scored;
    figures without a fingerprint cannot be checked and are left out too.
    """
    from .dataset import model_fingerprint  # the dataset layer sits above the defended model and hub's loading

    info = getattr(model, "pretrained_info", None) or {}
    if "metrics" not in info:
        return info
    metrics = info["metrics"]
    measured_on = metrics.get("fingerprint") if isinstance(metrics, dict) else None
    now = model_fingerprint(model)
    if measured_on == now:
        return info
    if warn:
        why = (
            f"were measured on other weights or settings (fingerprint {measured_on}, the model's is now {now})"
            if measured_on
            else "carry no fingerprint of the weights and settings they were measured on"
        )
        warnings.warn(
            f"pretrained_info['metrics'] {why}: they are left out of config.json and the model card. Certify this model "
            "(report = robustwrap.certify_dataset(model, data)) and set model.pretrained_info['metrics'] = report.metrics(split=...)",
            UserWarning,
            stacklevel=2,
        )
    return {k: v for k, v in info.items() if k != "metrics"}


def _threat(settings: dict[str, Any]) -> str:
    h, w = settings.get("input_size", settings["image_size"])  # the threat model is in the defended model's input pixels
    patch = settings.get("patch")
    text = settings["defense"]
    shapes = [patch] if isinstance(patch, list) and patch and isinstance(patch[0], int) else patch if isinstance(patch, list) else []
    for ph, pw in shapes:
        text += f", {ph}x{pw} px patch ({100 * ph * pw / (h * w):.2f}% of {h}x{w})"
    if "input_size" in settings:
        mh, mw = settings["image_size"]
        text += f", {h}x{w} inputs resized ({settings['resize']}) to {mh}x{mw}"
    if isinstance(settings.get("mask_set"), dict):
        text += f", {len(settings['mask_set']['boxes'])} masks"
    return text


def model_card(model: RobustPatchClassifier, repo_id: str | None = None, **kwargs: Any) -> ModelCard:
    """The model card of `model` (what `model.generate_model_card()` returns).

    Its metadata (`model-index`) carries the accuracies in `model.pretrained_info["metrics"]`
    (`vanilla_accuracy`, `clean_accuracy`, `certified_accuracy`, `split`) for
    `pretrained_info["dataset"]`, each named with the defense and the threat model, when they
    were measured on this model's weights and settings (their `fingerprint`, see
    `CertificationReport.metrics`); figures of other weights are left out.

    Args:
        model: a defended model.
        repo_id: the Hub repo the card is for (`push_to_hub` passes the real one); without it the
            card shows a placeholder in the loading code.
        **kwargs: ignored (the mixin's template arguments).

    Returns:
        A `huggingface_hub.ModelCard`.
    """
    settings = model.settings()
    info = _measured_info(model)
    metrics = info.get("metrics") if isinstance(info.get("metrics"), dict) else {}
    dataset = info.get("dataset")
    threat = _threat(settings)
    base_library = "timm" if _timm_architecture(model._inner_model) else "torchvision"
    architecture = getattr(model._inner_model, "pretrained_cfg", {}).get("architecture") if base_library == "timm" else type(model._inner_model).__name__
    results = [
        EvalResult(
            task_type="image-classification",
            dataset_type=dataset,
            dataset_name=dataset,
            dataset_split=metrics.get("split"),
            metric_type="accuracy",
            metric_name=f"{label} ({threat})" if key != "vanilla_accuracy" else label,
            metric_value=metrics[key],
        )
        for key, label in (
            ("vanilla_accuracy", "vanilla clean accuracy (undefended base model)"),
            ("clean_accuracy", "defended clean accuracy"),
            ("certified_accuracy", "certified accuracy"),
        )
        if dataset and isinstance(metrics.get(key), (int, float))
    ]
    views = getattr(model, "full_views", None)
    data = ModelCardData(
        library_name="timm" if base_library == "timm" else "robustwrap",
        license="apache-2.0",
        tags=["image-classification", "robustwrap", "certified-robustness", "adversarial-patch", settings["defense"]],
        datasets=[dataset] if dataset else None,
        model_name=repo_id or architecture,
        eval_results=results or None,
        robustwrap={"defense": settings["defense"], "threat_model": threat, "views_per_image": views, "format_version": FORMAT_VERSION},
    )
    name = repo_id or "<org>/<name>"
    rows = "\n".join(f"| {r.metric_name} | {100 * r.metric_value:.2f}% |" for r in results) or "| (not measured) | |"
    load_base = (
        f'timm.create_model("hf-hub:{name}", pretrained=True)   # the base model alone'
        if base_library == "timm"
        else "# a torchvision base model: load it with robustwrap.from_pretrained(...).model"
    )
    settings_json = json.dumps(_jsonable({k: v for k, v in settings.items() if k != "mask_set"}))
    measured_on = f" (on the weights and settings with fingerprint `{metrics['fingerprint']}`)" if metrics else ""
    body = f"""
# {repo_id or architecture}: certifiably patch-robust {architecture}

A **{base_library}** `{architecture}` defended with **{settings["defense"]}** by robustwrap. No adversarial
patch of the threat model below can change a certified prediction.

- Threat model: {threat}{f"; {views} views per image (full evaluation)" if views else ""}
- Settings: `{settings_json}`
- Fine-tuning: {info.get("strategy") or "not recorded"}
- Measured: {metrics.get("command", "not recorded")}{measured_on}

| metric | value |
|---|---|
{rows}

```python
import robustwrap, timm
model = robustwrap.from_pretrained("hf-hub:{name}").eval()   # the defended model
{load_base}
```
"""
    return ModelCard(f"---\n{data.to_yaml()}\n---\n{body}")


def _is_robustwrap_save(folder: Path) -> bool:
    """Whether `folder/config.json` is a robustwrap model's (a JSON object with a `"robustwrap"` section)."""
    try:
        config = json.loads((folder / CONFIG_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):  # missing, unreadable, not UTF-8 or not JSON: someone else's file
        return False
    return isinstance(config, dict) and isinstance(config.get("robustwrap"), dict)


def check_save_folder(folder: str | Path, *, overwrite: bool = False, argument: str = "save_directory") -> None:
    """Refuse a folder that a model must not be written into: the one rule of `save_pretrained` and the CLI's `--out`.

    A model may be written into a folder that does not exist, an empty folder, or an earlier
    robustwrap save (its `config.json` has a `"robustwrap"` section), whose `config.json`,
    `model.safetensors` and `README.md` are then replaced, as `huggingface_hub`'s
    `save_pretrained` replaces an earlier save.

    Args:
        folder: where the model would be written.
        overwrite: write into any other folder too (its `config.json`, `model.safetensors` and
            `README.md` are replaced, its other files kept).
        argument: how the caller names the folder in the error (`"--out"` for the CLI).

    Raises:
        FileExistsError: for a path that is a file, or (without `overwrite`) a non-empty folder
            that is not a robustwrap save: writing there would overwrite someone's
            `config.json` or `README.md` and leave a folder that mixes two things.
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise FileExistsError(f"{argument} {folder} is a file, not a folder")
    if overwrite or not folder.exists() or _is_robustwrap_save(folder):
        return
    entries = sorted(p.name for p in folder.iterdir())
    if entries:
        how = "" if argument.startswith("--") else ", or pass overwrite=True to write into it anyway"  # the CLI has no such switch
        raise FileExistsError(
            f"{argument} {folder} is neither empty nor an earlier robustwrap save (it holds {', '.join(entries[:3])}"
            f"{', ...' if len(entries) > 3 else ''}): writing a model there would overwrite or mix with those files; "
            f"choose a new or empty folder{how}"
        )


def save_folder(
    model: RobustPatchClassifier,
    folder: str | Path,
    repo_id: str | None = None,
    card_kwargs: dict[str, Any] | None = None,
    *,
    overwrite: bool = False,
) -> None:
    """Write `config.json`, `model.safetensors` and `README.md` for `model` into `folder`.

    Everything is built and checked before anything is written; if writing fails, a folder that
    this call created is removed again.

    Args:
        model: a defended model.
        folder: where to write: a new or empty folder, or an earlier robustwrap save (see
            `check_save_folder`).
        repo_id: the Hub repo the model card names.
        card_kwargs: more arguments for `model.generate_model_card`.
        overwrite: write into any other folder too (see `check_save_folder`).

    Raises:
        FileExistsError: for a folder that holds other files (see `check_save_folder`).
        TypeError, ValueError: see `hub_config`.
    """
    folder = Path(folder)
    check_save_folder(folder, overwrite=overwrite)
    config = hub_config(model)
    card_kwargs = {**(card_kwargs or {}), "repo_id": repo_id}
    card = model.generate_model_card(**card_kwargs) if hasattr(model, "generate_model_card") else model_card(model, **card_kwargs)
    state = {k: v.detach().to("cpu").contiguous() for k, v in model._inner_model.state_dict().items()}
    created = not folder.exists()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
        safetensors.torch.save_file(state, str(folder / WEIGHTS_NAME), metadata={"format": "pt"})
        os.chmod(folder / WEIGHTS_NAME, 0o644)  # safetensors writes 0600; a model folder is for sharing
        card.save(folder / "README.md")
    except BaseException:
        if created:
            shutil.rmtree(folder, ignore_errors=True)
        raise


def save_pretrained(
    model: RobustPatchClassifier,
    save_directory: str | Path,
    *,
    config: Any = None,
    repo_id: str | None = None,
    push_to_hub: bool = False,
    model_card_kwargs: dict[str, Any] | None = None,
    overwrite: bool = False,
    **push_to_hub_kwargs: Any,
) -> str | None:
    """`model.save_pretrained`: the model's files into a folder, optionally pushed to the Hub.

    Args:
        model: a defended model.
        save_directory: the folder: a new or empty one, or an earlier robustwrap save, whose
            files are replaced (the rule of `robustwrap train --out`, see `check_save_folder`).
        config: not supported: `config.json` is written from `model.settings()` so that it can
            never disagree with the model; free-form information goes into
            `model.pretrained_info` (saved under `robustwrap.info`).
        repo_id: the Hub repo (named in the model card; the push target with `push_to_hub`).
        push_to_hub: also push the files to `repo_id`.
        model_card_kwargs: passed to `model.generate_model_card`.
        overwrite: write into a folder that holds other files too (its `config.json`,
            `model.safetensors` and `README.md` are replaced, its other files kept).
        **push_to_hub_kwargs: passed to `push_to_hub`.

    Returns:
        The commit URL when pushing, else None.

    Raises:
        FileExistsError: for a folder that holds other files, without `overwrite`.
        TypeError: for `config=...`, or a model that cannot be saved (see `hub_config`); nothing
            is written then.
    """
    if config is not None:
        raise TypeError(
            "save_pretrained(config=...) is not supported: config.json is written from model.settings(), so it always "
            "describes the model; put free-form information into model.pretrained_info (saved under robustwrap.info)"
        )
    if push_to_hub:
        if repo_id is None:
            repo_id = Path(save_directory).name
        save_folder(model, save_directory, repo_id=repo_id, card_kwargs=model_card_kwargs, overwrite=overwrite)
        return model.push_to_hub(repo_id, model_card_kwargs=model_card_kwargs, **push_to_hub_kwargs)
    card_kwargs = dict(model_card_kwargs or {})
    save_folder(model, save_directory, repo_id=card_kwargs.pop("repo_id", repo_id), card_kwargs=card_kwargs, overwrite=overwrite)
    return None


def push_to_hub(
    model: RobustPatchClassifier,
    repo_id: str,
    *,
    config: Any = None,
    commit_message: str = "Upload robustwrap model",
    private: bool | None = None,
    token: str | None = None,
    branch: str | None = None,
    create_pr: bool | None = None,
    allow_patterns: list[str] | str | None = None,
    ignore_patterns: list[str] | str | None = None,
    delete_patterns: list[str] | str | None = None,
    model_card_kwargs: dict[str, Any] | None = None,
) -> str:
    """`model.push_to_hub`: create the repo if needed and upload the model's files in one commit.

    The model card names the repo id that the Hub returns (`"name"` becomes `"<user>/name"`).

    Args:
        model: a defended model.
        repo_id: `"<org>/<name>"` or `"<name>"` (your namespace).
        config: not supported (see `save_pretrained`).
        commit_message: the commit message.
        private: create the repo private (None: the Hub's default).
        token: a Hugging Face token (None: the saved login).
        branch: the branch to push to (None: main).
        create_pr: open a pull request instead of committing to the branch.
        allow_patterns: push only files matching these patterns.
        ignore_patterns: do not push files matching these patterns.
        delete_patterns: delete remote files matching these patterns in the same commit.
        model_card_kwargs: passed to `model.generate_model_card`.

    Returns:
        The URL of the commit.

    Raises:
        TypeError: for `config=...`, or a model that cannot be saved (checked before the repo is
            created).
    """
    from huggingface_hub import HfApi

    if config is not None:
        raise TypeError("push_to_hub(config=...) is not supported: config.json is written from model.settings()")
    hub_config(model)  # refuse an unsaveable model before creating a repo
    api = HfApi(token=token)
    kwargs = {} if private is None else {"private": private}
    real_id = api.create_repo(repo_id=repo_id, exist_ok=True, **kwargs).repo_id
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "repo"
        card_kwargs = {k: v for k, v in (model_card_kwargs or {}).items() if k != "repo_id"}
        save_folder(model, folder, repo_id=real_id, card_kwargs=card_kwargs)
        return api.upload_folder(
            repo_id=real_id,
            repo_type="model",
            folder_path=folder,
            commit_message=commit_message,
            revision=branch,
            create_pr=create_pr,
            allow_patterns=allow_patterns,
            ignore_patterns=ignore_patterns,
            delete_patterns=delete_patterns,
        )


# ----------------------------------------------------------------------------------- loading
def sha256_of(path: str | Path) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def load_folder(
    folder: str | Path,
    *,
    weights: bool = True,
    expected_sha256: str | None = None,
    device: str | torch.device = "cpu",
    expect: type | None = None,
    **runtime: Any,
) -> RobustPatchClassifier:
    """Build the defended model described by `folder/config.json`, with strictly loaded weights.

    Args:
        folder: a folder with `config.json` and `model.safetensors`.
        weights: load `model.safetensors` (False: random weights, like `pretrained=False`,
            without the saved figures, which measured the saved weights).
        expected_sha256: refuse the weights unless the file has this sha256 (the zoo's record).
        device: where to put the model.
        expect: a defense class the model must be an instance of (`PatchCleanser.from_pretrained`
            refuses a smoothing repo).
        **runtime: settings that do not change the defended function, e.g. `batch_size`.

    Returns:
        The defended model (the class its config's `defense` names), in eval mode.

    Raises:
        FileNotFoundError: the folder does not exist, or has no `config.json`, or no
            `model.safetensors` (a pickle checkpoint is refused by name: unpickling runs
            arbitrary code).
        ValueError: a config that is not valid JSON (naming the file), without a `"robustwrap"`
            section, of an unknown format version or defense, with settings of the wrong type or
            out of range, an unknown architecture, a sha256 that differs from the zoo's, a
            corrupted safetensors file, or a state dict with missing, extra or mis-shaped keys.
        TypeError: the model is not an instance of `expect`.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"folder {folder} does not exist" if not folder.exists() else f"{folder} is not a folder")
    config = _read_config(folder)
    where = str(folder / CONFIG_NAME)
    section = config.get("robustwrap")
    if not isinstance(section, dict):
        raise ValueError(f"{where} has no 'robustwrap' section: it describes a plain timm model; wrap it with robustwrap.wrap")
    version = section.get("format_version")
    if version not in READABLE_VERSIONS or isinstance(version, bool):
        raise ValueError(
            f"{where} has robustwrap format_version {version!r}; this robustwrap reads versions "
            f"{', '.join(map(str, READABLE_VERSIONS))} (upgrade robustwrap for newer files)"
        )
    if version == 1:
        settings, saved_runtime, info = _settings_from_v1(section, where)
    else:
        settings = {k: v for k, v in section.items() if k not in SECTION_KEYS}
        saved_runtime, info = {}, section.get("info", {})
    if not isinstance(info, dict):
        raise ValueError(f"{where}: robustwrap.info must be an object, got {type(info).__name__}")
    if not isinstance(settings.get("defense"), str):
        raise ValueError(f"{where}: 'defense' must be a string, got {settings.get('defense')!r}")
    classes = _defense_classes()
    cls = classes.get(settings["defense"])
    if cls is None:
        raise ValueError(f"{where}: unknown defense {settings['defense']!r}; this robustwrap knows {', '.join(sorted(classes))}")
    if expect is not None and not issubclass(cls, expect):
        raise TypeError(f"{where} holds a {cls.__name__} ({settings['defense']!r}), not a {expect.__name__}; load it with robustwrap.from_pretrained")
    spec = section.get("base")
    if not isinstance(spec, dict):
        raise ValueError(f"{where}: robustwrap.base must be an object with library and architecture, got {spec!r}")
    base = _build_base(config, spec, folder)
    if weights:
        _load_weights_strictly(base, folder, expected_sha256)
    if _positive_int(config.get("num_classes")) and not isinstance(getattr(base, "num_classes", None), int):
        saved_runtime["num_classes"] = config["num_classes"]  # saves a blank forward pass for a torchvision base
    try:
        model = cls.from_settings(base, settings, **{**saved_runtime, **runtime})
    except ValueError as e:  # untrusted values: say which file
        raise ValueError(f"{where}: {e}") from None
    # Random weights (weights=False) are not the weights the saved figures measured.
    model.pretrained_info = info if weights else {k: v for k, v in info.items() if k != "metrics"}
    return model.to(device).eval()


def _load_weights_strictly(base: nn.Module, folder: Path, expected_sha256: str | None) -> None:
    path = folder / WEIGHTS_NAME
    if not path.is_file():
        pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
        found = f" (found {', '.join(pickles)}: pickle checkpoints are refused, since unpickling can run arbitrary code)" if pickles else ""
        raise FileNotFoundError(f"no {WEIGHTS_NAME} in {folder}{found}; robustwrap loads weights only from safetensors")
    if expected_sha256 is not None:
        actual = sha256_of(path)
        if actual != expected_sha256:
            raise ValueError(f"{path} has sha256 {actual}, but the zoo manifest records {expected_sha256}: refusing to load it")
    load_state_strictly(base, read_safetensors(path, str(path)), str(path), f"the {type(base).__name__} in {CONFIG_NAME}")


def read_safetensors(path: str | Path, source: str) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file on the CPU.

    Raises:
        ValueError: for a file safetensors cannot read (truncated, corrupted, not safetensors),
            naming `source` so the user knows which file or option is wrong.
    """
    try:
        return safetensors.torch.load_file(str(path), device="cpu")
    except (safetensors.SafetensorError, OSError) as e:
        raise ValueError(f"{source} is not a readable safetensors file ({e})") from None


def load_state_strictly(base: nn.Module, state: dict[str, torch.Tensor], source: str, target: str) -> None:
    """Load `state` into `base` only if keys and shapes match exactly.

    Raises:
        ValueError: naming the missing, unexpected and mis-shaped keys, since loading anyway would
            leave random weights where the user expects trained ones.
    """
    want = base.state_dict()
    missing, extra = sorted(set(want) - set(state)), sorted(set(state) - set(want))
    shapes = sorted(k for k in set(want) & set(state) if want[k].shape != state[k].shape)
    if missing or extra or shapes:
        raise ValueError(
            f"{source} does not fit {target}: {len(missing)} missing keys {missing[:5]}, "
            f"{len(extra)} unexpected keys {extra[:5]}, {len(shapes)} mis-shaped keys {shapes[:5]}"
        )
    base.load_state_dict(state, strict=True)


# ------------------------------------------------------------------------- Hub repos and names
def _unreachable(timeout: float = 3.0) -> str | None:
    """Why the Hub endpoint cannot be reached now (DNS or TCP, `timeout` s), or None if it can.

    Behind a proxy (`HTTPS_PROXY`/`ALL_PROXY`) direct connections prove nothing: None.
    """
    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None
    url = urlparse(hf_constants.ENDPOINT)
    host, port = url.hostname, url.port or (443 if url.scheme == "https" else 80)
    if not host:
        return None
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as e:
        return f"{host}:{port} cannot be reached ({e.strerror or type(e).__name__})"
    return None


def _download_command(repo_id: str, filename: str | None = None) -> str:
    """The shell command that puts a Hub file (or repo) into the Hugging Face cache, for the installed huggingface_hub.

    huggingface_hub 0.34 added the `hf` command and 1.0 removed `huggingface-cli`, so a message
    that names only one of them is wrong for someone: this names the one installed here.

    Args:
        repo_id: `<org>/<name>`.
        filename: one file of the repo (None: all of it).

    Returns:
        e.g. `"hf download timm/vit_base_patch16_224.augreg_in21k_ft_in1k model.safetensors"`.
    """
    import huggingface_hub
    from packaging.version import Version

    program = "hf" if Version(huggingface_hub.__version__) >= Version("0.34") else "huggingface-cli"
    return " ".join([program, "download", repo_id, *([filename] if filename else [])])


def download(
    repo_id: str,
    revision: str | None = None,
    *,
    cache_dir: str | Path | None = None,
    force_download: bool = False,
    local_files_only: bool = False,
    token: str | bool | None = None,
) -> Path:
    """The snapshot folder holding `config.json` and `model.safetensors` of a Hub repo.

    Without network (or with `HF_HUB_OFFLINE=1` / `local_files_only`), the Hugging Face cache is
    used at once instead of retrying for half a minute.

    Args:
        repo_id: `<org>/<name>`.
        revision: branch, tag or commit (None: main).
        cache_dir: the Hugging Face cache folder (None: `HF_HUB_CACHE`).
        force_download: download again even if cached.
        local_files_only: never use the network, only the cache.
        token: a Hugging Face token for private repos.

    Returns:
        The folder.

    Raises:
        FileNotFoundError: in one line, for a repo, revision or file that does not exist, or a
            model that is not cached while the Hub cannot be reached (saying how to get it).
    """
    name = f"hf-hub:{repo_id}" + (f"@{revision}" if revision else "")
    cache = str(cache_dir) if cache_dir is not None else hf_constants.HF_HUB_CACHE
    offline = bool(local_files_only or hf_constants.HF_HUB_OFFLINE)
    reason = "HF_HUB_OFFLINE is set" if hf_constants.HF_HUB_OFFLINE else "local_files_only=True" if local_files_only else None
    if not offline:
        reason = _unreachable()
        offline = reason is not None
    kwargs = {"revision": revision, "cache_dir": cache, "force_download": force_download and not offline, "local_files_only": offline, "token": token}
    get = f"download it once where the Hub can be reached (robustwrap.from_pretrained({name!r}) or `{_download_command(repo_id)}`), or copy a Hugging Face cache that has it into {cache}"
    try:
        config = hf_hub_download(repo_id, CONFIG_NAME, **kwargs)
    except LocalEntryNotFoundError:
        fast = "" if hf_constants.HF_HUB_OFFLINE else "; set HF_HUB_OFFLINE=1 to skip the network and fail at once"
        raise FileNotFoundError(f"{name} is not in the Hugging Face cache ({cache}) and {reason}: {get}{fast}") from None
    except (RepositoryNotFoundError, RevisionNotFoundError, EntryNotFoundError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise FileNotFoundError(f"cannot get {CONFIG_NAME} of {name}: {type(e).__name__}: {first}") from None
    try:
        hf_hub_download(repo_id, WEIGHTS_NAME, **kwargs)
    except LocalEntryNotFoundError:
        raise FileNotFoundError(
            f"{name}: {WEIGHTS_NAME} is not in the Hugging Face cache ({cache}) and {reason}: {get}; robustwrap loads "
            "weights only from safetensors (pickle checkpoints are refused, since unpickling can run arbitrary code)"
        ) from None
    except EntryNotFoundError:
        raise FileNotFoundError(
            f"{name} has no {WEIGHTS_NAME}; robustwrap loads weights only from safetensors "
            "(pickle checkpoints are refused, since unpickling can run arbitrary code)"
        ) from None
    return Path(config).parent


def parse_name(name_or_path: str | Path) -> tuple[str, str, str | None]:
    """`(kind, ident, revision)` of a model name: kind `"folder"` or `"hf-hub"`.

    Accepted: `hf-hub:<org>/<name>[@revision]`, `<org>/<name>[@revision]` (a Hub repo unless a
    folder of that name exists), `local-dir:<folder>`, and any existing folder.

    Raises:
        ValueError: for a name that is none of these.
    """
    spec = str(name_or_path)
    if spec.startswith("hf-hub:"):
        repo_id, _, rev = spec[len("hf-hub:") :].partition("@")
        if not _REPO_ID.fullmatch(repo_id):
            raise ValueError(f"{spec!r}: a Hugging Face Hub repo is written hf-hub:<org>/<name>[@revision]")
        return "hf-hub", repo_id, rev or None
    if spec.startswith("local-dir:"):
        return "folder", spec[len("local-dir:") :], None
    if isinstance(name_or_path, Path) or os.path.isdir(spec):
        return "folder", spec, None
    repo_id, _, rev = spec.partition("@")
    if _REPO_ID.fullmatch(repo_id):
        return "hf-hub", repo_id, rev or None
    raise ValueError(f"{spec!r} is not an existing folder, local-dir:<folder>, hf-hub:<org>/<name>[@revision] or <org>/<name>")


def load(
    name_or_path: str | Path,
    *,
    revision: str | None = None,
    cache_dir: str | Path | None = None,
    force_download: bool = False,
    local_files_only: bool = False,
    token: str | bool | None = None,
    expect: type | None = None,
    **kwargs: Any,
) -> RobustPatchClassifier:
    """Load a defended model from a folder or a Hub repo (`RobustPatchClassifier.from_pretrained`).

    Args:
        name_or_path: `hf-hub:<org>/<name>[@revision]`, `<org>/<name>[@revision]`,
            `local-dir:<folder>` or an existing folder (see `parse_name`).
        revision: Hub branch, tag or commit (or `@revision` in the name, not both).
        cache_dir: the Hugging Face cache folder (None: `HF_HUB_CACHE`).
        force_download: download again even if cached.
        local_files_only: never use the network, only the cache.
        token: a Hugging Face token for private repos.
        expect: the model must be an instance of this class.
        **kwargs: `device`, `weights`, and runtime settings such as `batch_size`.

    Returns:
        The defended model, in eval mode.

    Raises:
        FileNotFoundError, ValueError, TypeError: see `parse_name`, `download` and `load_folder`.
    """
    kind, ident, rev = parse_name(name_or_path)
    if kind == "folder":
        if revision is not None:
            raise ValueError(f"revision={revision!r} does not apply to the local folder {ident}")
        return load_folder(ident, expect=expect, **kwargs)
    if revision is not None and rev is not None and rev != revision:
        raise ValueError(f"two revisions given: {rev!r} in {str(name_or_path)!r} and revision={revision!r}")
    folder = download(
        ident, rev or revision, cache_dir=cache_dir, force_download=force_download, local_files_only=local_files_only, token=token
    )
    return load_folder(folder, expect=expect, **kwargs)


def __getattr__(name: str) -> Any:
    """Zoo names that used to live here (`robustwrap.hub.list_models`, ...): now in `robustwrap.zoo`."""
    if name in ("DEFAULT_MODEL", "BUILTIN_DATASETS", "list_models", "zoo_entry", "create_model", "from_pretrained", "builtin_dataset", "_TensorImages", "_ZOO"):
        from . import zoo

        return getattr(zoo, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
