"""Robust models on the Hugging Face Hub, in local folders and in the zoo (DESIGN.md section 5).

A robust model's files are a **timm** repo plus one section: timm's `config.json` with a
top-level `"robustwrap"` object (the defense), `model.safetensors` with the base model's own
keys, and a model card whose `model-index` carries the accuracies we measured. So
`timm.create_model("hf-hub:<repo>", pretrained=True)` loads the base model and
`robustwrap.from_pretrained("hf-hub:<repo>")` the defended one.

Saving, pushing and the model card come from `huggingface_hub.PyTorchModelHubMixin`;
`RobustPatchClassifier._save_pretrained` / `_from_pretrained` call `save_folder` / `load_folder`.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any

import safetensors
import safetensors.torch
import timm
import torch
import torchvision
from huggingface_hub import EvalResult, ModelCard, ModelCardData, hf_hub_download
from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError
from torch import nn

from .defenses.patchcleanser import RobustPatchClassifier
from .geometry import MaskSet

__all__ = [
    "FORMAT_VERSION",
    "CONFIG_NAME",
    "WEIGHTS_NAME",
    "DEFAULT_MODEL",
    "BUILTIN_DATASETS",
    "from_pretrained",
    "create_model",
    "list_models",
    "zoo_entry",
    "builtin_dataset",
    "save_folder",
    "load_folder",
    "sha256_of",
]

FORMAT_VERSION = 1
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
# Files that would be unpickled by torch.load: they can run arbitrary code, so we never open them.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")

_ZOO = resources.files("robustwrap") / "zoo"


# ---------------------------------------------------------------------------------- base models
def _base_spec(base: nn.Module, num_classes: int) -> dict[str, Any]:
    """How to rebuild the base model: `{"library": "timm" | "torchvision", "architecture": ...}`.

    Raises:
        TypeError: for a model that neither timm nor torchvision can rebuild, because a repo we
            cannot rebuild would load as random weights or not at all.
    """
    cfg = getattr(base, "pretrained_cfg", None)
    if isinstance(cfg, dict) and cfg.get("architecture") in timm.list_models():
        return {"library": "timm", "architecture": cfg["architecture"]}
    name = _torchvision_name(base, num_classes)
    if name is not None:
        return {"library": "torchvision", "architecture": name, "kwargs": {"num_classes": num_classes}}
    raise TypeError(
        f"cannot save a {type(base).__name__} base model: only timm models (created with timm.create_model) "
        "and torchvision models (torchvision.models.get_model) can be rebuilt from a Hub repo"
    )


def _torchvision_name(base: nn.Module, num_classes: int) -> str | None:
    """The torchvision builder whose model has exactly `base`'s class, keys and shapes (built on meta)."""
    if not type(base).__module__.startswith("torchvision.models"):
        return None
    want = {k: tuple(v.shape) for k, v in base.state_dict().items()}
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
        if {k: tuple(v.shape) for k, v in candidate.state_dict().items()} == want:
            return name
    return None


def _build_base(config: dict[str, Any], folder: Path) -> nn.Module:
    spec = config["robustwrap"]["base"]
    if spec["library"] == "timm":
        if spec["architecture"] not in timm.list_models():
            raise ValueError(f"architecture {spec['architecture']!r} in {folder / CONFIG_NAME} is not a timm model (timm {timm.__version__})")
        return timm.create_model(f"local-dir:{folder}", pretrained=False)
    if spec["library"] == "torchvision":
        if spec["architecture"] not in torchvision.models.list_models():
            raise ValueError(f"architecture {spec['architecture']!r} in {folder / CONFIG_NAME} is not a torchvision model")
        return torchvision.models.get_model(spec["architecture"], weights=None, **spec.get("kwargs", {}))
    raise ValueError(f"base library {spec['library']!r} in {folder / CONFIG_NAME}: expected 'timm' or 'torchvision'")


# ------------------------------------------------------------------------------------- defense
def _defense_config(model: RobustPatchClassifier) -> dict[str, Any]:
    ms = model.mask_set
    return {
        "format_version": FORMAT_VERSION,
        "image_size": list(ms.image_size),
        "in_chans": model.in_chans,
        "num_classes": model.num_classes,
        "fill": model.fill if isinstance(model.fill, float) else list(model.fill),
        "batch_size": model.batch_size,
        "mask_set": {**ms.to_dict(), "description": ms.describe()},
        "base": _base_spec(model.model, model.num_classes),
        **model.pretrained_info,
    }


_INFO_KEYS = ("strategy", "dataset", "metrics")


# ----------------------------------------------------------------------------------- model card
def _model_card(model: RobustPatchClassifier, config: dict[str, Any], repo_id: str | None) -> ModelCard:
    section = config["robustwrap"]
    info = model.pretrained_info
    (ph, pw), (h, w) = model.mask_set.patch_sizes[0], model.mask_set.image_size
    threat = f"{ph}x{pw} px patch ({100 * ph * pw / (h * w):.2f}% of {h}x{w}), {len(model.mask_set)} masks"
    metrics = info.get("metrics", {})
    dataset = info.get("dataset")
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
        if dataset and key in metrics
    ]
    data = ModelCardData(
        library_name="timm" if section["base"]["library"] == "timm" else "robustwrap",
        license="apache-2.0",
        tags=["image-classification", "robustwrap", "certified-robustness", "adversarial-patch", "patchcleanser"],
        datasets=[dataset] if dataset else None,
        model_name=repo_id or section["base"]["architecture"],
        eval_results=results or None,
        robustwrap={"patch": threat, "strategy": info.get("strategy"), "format_version": FORMAT_VERSION},
    )
    rows = "\n".join(f"| {r.metric_name} | {100 * r.metric_value:.2f}% |" for r in results) or "| (not measured) | |"
    load_base = (
        f'timm.create_model("hf-hub:{repo_id or "<org>/<name>"}", pretrained=True)'
        if section["base"]["library"] == "timm"
        else "# torchvision base: not loadable with timm; use robustwrap.from_pretrained"
    )
    body = f"""
# {repo_id or section["base"]["architecture"]}: certifiably patch-robust {section["base"]["architecture"]}

A **{section["base"]["library"]}** `{section["base"]["architecture"]}` defended with PatchCleanser double
masking by [robustwrap](https://github.com/robustwrap/robustwrap). No adversarial patch of the threat model
below can change a certified prediction.

- Threat model: {section["mask_set"]["description"]}
- Fill: `{section["fill"]}` in the model's input space (after normalisation)
- Fine-tuning: {info.get("strategy") or "not recorded"}
- Measured: {metrics.get("command", "not recorded")}

| metric | value |
|---|---|
{rows}

```python
import robustwrap, timm
model = robustwrap.from_pretrained("hf-hub:{repo_id or "<org>/<name>"}").eval()   # the defended model
base = {load_base}   # the base model alone
```
"""
    return ModelCard(f"---\n{data.to_yaml()}\n---\n{body}")


# -------------------------------------------------------------------------------- save and load
def save_folder(model: RobustPatchClassifier, folder: str | Path, repo_id: str | None = None) -> None:
    """Write `config.json`, `model.safetensors` and `README.md` for `model` into `folder`.

    Called by `RobustPatchClassifier.save_pretrained` / `push_to_hub` (through the mixin).

    Raises:
        TypeError: for a base model that neither timm nor torchvision can rebuild.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    section = _defense_config(model)
    config_path = folder / CONFIG_NAME
    if section["base"]["library"] == "timm":
        from timm.models._hub import save_config_for_hf  # timm's own writer keeps its format exact

        c = section["in_chans"] or model.model.pretrained_cfg["input_size"][0]
        save_config_for_hf(model.model, str(config_path), data_config={"input_size": (c, *model.mask_set.image_size)})
        config = json.loads(config_path.read_text())
    else:
        config = {"num_classes": model.num_classes}
    config["robustwrap"] = section
    config_path.write_text(json.dumps(config, indent=2) + "\n")
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.model.state_dict().items()}
    safetensors.torch.save_file(state, str(folder / WEIGHTS_NAME), metadata={"format": "pt"})
    os.chmod(folder / WEIGHTS_NAME, 0o644)  # safetensors writes 0600; a model folder is for sharing
    _model_card(model, config, repo_id).save(folder / "README.md")


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
    **overrides: Any,
) -> RobustPatchClassifier:
    """Build the defended model described by `folder/config.json`, with strictly loaded weights.

    Args:
        folder: a folder with `config.json` and `model.safetensors`.
        weights: load `model.safetensors` (False: random weights, like `pretrained=False`).
        expected_sha256: refuse the weights unless the file has this sha256 (the zoo's record).
        device: where to put the model.
        **overrides: `batch_size` or `fill` to use instead of the saved ones.

    Returns:
        The `RobustPatchClassifier`, in eval mode.

    Raises:
        FileNotFoundError: no `config.json`, or no `model.safetensors` (a pickle checkpoint is
            refused by name: unpickling runs arbitrary code).
        ValueError: a config without a `"robustwrap"` section or of an unknown format version, an
            unknown architecture, a sha256 that differs from the zoo's, a corrupted safetensors
            file, or a state dict with missing, extra or mis-shaped keys.
    """
    folder = Path(folder)
    config_path = folder / CONFIG_NAME
    if not config_path.is_file():
        raise FileNotFoundError(f"no {CONFIG_NAME} in {folder}: not a robustwrap model folder")
    config = json.loads(config_path.read_text())
    section = config.get("robustwrap")
    if not isinstance(section, dict):
        raise ValueError(f"{config_path} has no 'robustwrap' section: it describes a plain timm model; wrap it with robustwrap.wrap")
    if section.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{config_path} has robustwrap format_version {section.get('format_version')!r}; this robustwrap "
            f"reads version {FORMAT_VERSION} (upgrade robustwrap for newer files)"
        )
    base = _build_base(config, folder)
    if weights:
        _load_weights_strictly(base, folder, expected_sha256)
    model = RobustPatchClassifier(
        base,
        MaskSet.from_dict(section["mask_set"]),
        fill=overrides.pop("fill", section["fill"]),
        batch_size=overrides.pop("batch_size", section["batch_size"]),
        num_classes=section["num_classes"],
    )
    if overrides:
        raise TypeError(f"unexpected arguments {sorted(overrides)}: only batch_size and fill can be overridden")
    model.pretrained_info = {k: section[k] for k in _INFO_KEYS if k in section}
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


def _download(repo_id: str, revision: str | None, **kwargs: Any) -> Path:
    """The snapshot folder holding `config.json` and `model.safetensors` of a Hub repo."""
    try:
        config = hf_hub_download(repo_id, CONFIG_NAME, revision=revision, **kwargs)
    except (RepositoryNotFoundError, RevisionNotFoundError, LocalEntryNotFoundError, EntryNotFoundError) as e:
        raise FileNotFoundError(f"cannot get {CONFIG_NAME} of hf-hub:{repo_id}@{revision or 'main'}: {type(e).__name__}: {e}") from e
    try:
        hf_hub_download(repo_id, WEIGHTS_NAME, revision=revision, **kwargs)
    except (EntryNotFoundError, LocalEntryNotFoundError) as e:
        raise FileNotFoundError(
            f"hf-hub:{repo_id}@{revision or 'main'} has no {WEIGHTS_NAME}; robustwrap loads weights only from "
            "safetensors (pickle checkpoints are refused, since unpickling can run arbitrary code)"
        ) from e
    return Path(config).parent


def load_repo(model_id: str, *, revision: str | None = None, cache_dir=None, force_download=False, local_files_only=False, token=None, **kwargs):
    """`RobustPatchClassifier._from_pretrained`: a local folder, or a Hub repo id through the HF cache."""
    if os.path.isdir(model_id):
        return load_folder(model_id, **kwargs)
    folder = _download(model_id, revision, cache_dir=cache_dir, force_download=force_download, local_files_only=local_files_only, token=token)
    return load_folder(folder, **kwargs)


# ----------------------------------------------------------------------------------------- zoo
def _manifest() -> dict[str, Any]:
    return json.loads((_ZOO / "manifest.json").read_text())


def list_models(pattern: str = "*") -> list[str]:
    """Names of the pretrained robust models in the zoo, like `timm.list_models`."""
    return sorted(m["name"] for m in _manifest()["models"] if fnmatch.fnmatch(m["name"], pattern))


def zoo_entry(name: str) -> dict[str, Any]:
    """The manifest record of a zoo model: repo, architecture, dataset, strategy, measured accuracy.

    Raises:
        ValueError: for a name not in the zoo, listing the names that are.
    """
    for entry in _manifest()["models"]:
        if entry["name"] == name:
            return entry
    raise ValueError(f"unknown robustwrap model {name!r}; the zoo has: {', '.join(list_models()) or '(none)'}")


DEFAULT_MODEL: str = _manifest()["default"]


def create_model(name: str, pretrained: bool = True, **kwargs: Any) -> RobustPatchClassifier:
    """A zoo model by name, like `timm.create_model`.

    Args:
        name: a name from `list_models()`.
        pretrained: load the measured weights (their sha256 is checked against the manifest);
            False builds the same architecture and defense with random weights.
        **kwargs: `device`, `batch_size`, `fill`; `cache_dir`, `local_files_only`, `token` for
            models published on the Hub.

    Raises:
        ValueError: unknown name, or weights whose sha256 differs from the manifest.
    """
    entry = zoo_entry(name)
    hub_kwargs = {k: kwargs.pop(k) for k in ("cache_dir", "local_files_only", "token", "force_download") if k in kwargs}
    if entry.get("embedded"):
        folder = Path(str(_ZOO / entry["embedded"]))
    else:
        folder = _download(entry["repo_id"], entry["revision"], **hub_kwargs)
    return load_folder(folder, weights=pretrained, expected_sha256=entry["sha256"] if pretrained else None, **kwargs)


def from_pretrained(
    name_or_path: str | Path,
    *,
    revision: str | None = None,
    cache_dir: str | Path | None = None,
    local_files_only: bool = False,
    **kwargs: Any,
) -> RobustPatchClassifier:
    """Load a defended model from the zoo, a local folder or the Hugging Face Hub.

    Args:
        name_or_path: a zoo name (`list_models()`), `local-dir:<folder>` or an existing folder,
            or `hf-hub:<org>/<name>[@revision]`.
        revision: Hub branch, tag or commit (also written `hf-hub:org/name@rev`).
        cache_dir: Hugging Face cache folder.
        local_files_only: never touch the network; use the HF cache only.
        **kwargs: `device`, `batch_size`, `fill`, `token`.

    Raises:
        ValueError: for a name that is none of these; `org/name` without a prefix is ambiguous
            between the Hub and a relative folder, so it is refused with both spellings.
    """
    spec = str(name_or_path)
    source, sep, ident = spec.partition(":")
    if sep and source == "hf-hub":
        repo_id, _, rev = ident.partition("@")
        if revision is not None and rev and rev != revision:
            raise ValueError(f"two revisions given: {rev!r} in {spec!r} and revision={revision!r}")
        return load_repo(repo_id, revision=rev or revision, cache_dir=cache_dir, local_files_only=local_files_only, **kwargs)
    if sep and source == "local-dir":
        return load_folder(ident, **kwargs)
    if os.path.isdir(spec):
        return load_folder(spec, **kwargs)
    if spec in list_models():
        return create_model(spec, cache_dir=cache_dir, local_files_only=local_files_only, **kwargs)
    if "/" in spec or os.sep in spec:
        raise ValueError(f"{spec!r} is not a folder; write 'hf-hub:{spec}' for a Hugging Face Hub repo or 'local-dir:{spec}' for a local folder")
    raise ValueError(f"unknown model {spec!r}: not a zoo name ({', '.join(list_models())}), a folder, or hf-hub:<org>/<name>")


# ------------------------------------------------------------------------------------ datasets
BUILTIN_DATASETS: dict[str, str] = {
    name: meta["description"] for name, meta in json.loads((_ZOO / "data" / "datasets.json").read_text()).items()
}


class _TensorImages(torch.utils.data.Dataset):
    """uint8 images as PIL images (like torchvision's MNIST), optionally transformed."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform=None, name: str | None = None):
        self.images, self.labels, self.transform, self.name = images, labels, transform, name

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int):
        from PIL import Image

        image = Image.fromarray(self.images[index].numpy(), mode="L" if self.images.ndim == 3 else "RGB")
        return (self.transform(image) if self.transform else image), int(self.labels[index])


def builtin_dataset(name: str, transform: Callable[[Any], Any] | None = None) -> torch.utils.data.Dataset:
    """A small real dataset shipped inside the package, usable offline.

    Args:
        name: a key of `BUILTIN_DATASETS` (e.g. `"mnist-heldout"`: real MNIST digits that the zoo's
            MNIST model never saw in training).
        transform: applied to each PIL image, e.g. `timm.data.create_transform(**data_config)`.

    Returns:
        A dataset of `(image, label)`.
    """
    if name not in BUILTIN_DATASETS:
        raise ValueError(f"unknown built-in dataset {name!r}; built-in: {', '.join(BUILTIN_DATASETS)}")
    meta = json.loads((_ZOO / "data" / "datasets.json").read_text())[name]
    tensors = safetensors.torch.load_file(str(_ZOO / "data" / meta["file"]))
    return _TensorImages(tensors["images"], tensors["labels"], transform, name=f"{name} (built-in)")
