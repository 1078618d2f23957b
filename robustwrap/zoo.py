"""The model zoo and the data shipped with the package: manifest, lookup by name, built-in data sets.

The zoo's manifest (`robustwrap/zoo/manifest.json`) lists two kinds of models:

- **embedded** ones, shipped in the package in the Hub format of `robustwrap.hub` (the Concepts page,
  docs/concepts.md#hub-format), with the accuracy we measured and the command that measured it;
  they load offline;
- **Hub-backed** papers' models, named in timm's `arch.tag` grammar
  (`vit_base_patch16_224.augreg_in21k_ft_in1k`): the base weights are timm's own Hub repo of that
  tag (the weights the paper used), wrapped with the paper's settings (`"settings"` in the entry).
  Their cards (`robustwrap/zoo/cards/`) state the paper's figures as the paper's claim, with the
  command that measures them on your copy of the data. They need the network once, to fill the
  Hugging Face cache; after that `HF_HUB_OFFLINE=1` loads them from the cache.
"""

from __future__ import annotations

import fnmatch
import json
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from . import hub

if TYPE_CHECKING:
    from .defenses.base import RobustPatchClassifier

__all__ = [
    "BUILTIN_DATASETS",
    "DEFAULT_MODEL",
    "builtin_dataset",
    "create_model",
    "describe_entry",
    "from_pretrained",
    "list_models",
    "model_card",
    "zoo_entry",
]

_ZOO = resources.files("robustwrap") / "zoo"
HUB_KWARGS = ("cache_dir", "local_files_only", "token", "force_download")


def _manifest() -> dict[str, Any]:
    return json.loads((_ZOO / "manifest.json").read_text())


def list_models(pattern: str = "*") -> list[str]:
    """Names of the pretrained robust models in the zoo, like `timm.list_models`.

    Args:
        pattern: a shell-style pattern (`fnmatch`), e.g. `"mnist_*"`.

    Returns:
        The sorted names that match.
    """
    return sorted(m["name"] for m in _manifest()["models"] if fnmatch.fnmatch(m["name"], pattern))


def zoo_entry(name: str) -> dict[str, Any]:
    """The manifest record of a zoo model: repo, architecture, dataset, strategy, measured accuracy.

    Args:
        name: a name from `list_models()`.

    Returns:
        The record as stored in the manifest (a fresh copy).

    Raises:
        ValueError: for a name not in the zoo, listing the names that are.
    """
    for entry in _manifest()["models"]:
        if entry["name"] == name:
            return entry
    raise ValueError(f"unknown robustwrap model {name!r}; the zoo has: {', '.join(list_models()) or '(none)'}")


def describe_entry(entry: dict[str, Any]) -> str:
    """One line about a zoo model for listings and `torch.hub.help`, whatever fields it lacks.

    Args:
        entry: a manifest record (`zoo_entry(name)`).

    Returns:
        e.g. `"test_resnet on mnist-heldout, multisize_greedy fine-tuning; certified accuracy 66.0%
        against patch 5x5 px ..."`; fields the record lacks are said to be not recorded, and a
        model without measured metrics says so instead of failing.
    """
    metrics = entry.get("metrics") if isinstance(entry.get("metrics"), dict) else {}
    certified = metrics.get("certified_accuracy")
    measured = f"certified accuracy {100 * certified:.1f}%" if isinstance(certified, (int, float)) else "certified accuracy not measured"
    base = entry.get("base") if isinstance(entry.get("base"), dict) else None
    if base is not None:
        measured += f" here; weights from hf-hub:{base.get('hf_hub_id')} (needs the network once)"
    return (
        f"{entry.get('architecture', 'unknown architecture')} on {entry.get('dataset', 'an unrecorded dataset')}, "
        f"{entry.get('strategy', 'unrecorded')} fine-tuning; {measured} against {entry.get('threat_model', 'an unrecorded threat model')}."
    )


DEFAULT_MODEL: str = _manifest()["default"]


def create_model(name: str, pretrained: bool = True, **kwargs: Any) -> RobustPatchClassifier:
    """A zoo model by name, like `timm.create_model`.

    Args:
        name: a name from `list_models()`.
        pretrained: load the weights (an embedded model's sha256 is checked against the
            manifest; a Hub-backed one's come from timm's Hub repo, or the Hugging Face cache);
            False builds the same architecture and defense with random weights, offline.
        **kwargs: `device`, `batch_size`; `cache_dir`, `local_files_only`, `token`,
            `force_download` for models published on the Hub.

    Returns:
        The defended model, in eval mode.

    Raises:
        ValueError: unknown name, or weights whose sha256 differs from the manifest.
        FileNotFoundError: a Hub-backed model whose weights are neither cached nor downloadable
            (one line saying how to get them).
    """
    entry = zoo_entry(name)
    if kwargs.get("revision") is not None:
        raise TypeError(f"revision={kwargs['revision']!r} does not apply to the zoo model {name!r}: its manifest entry pins the revision")
    kwargs.pop("revision", None)
    hub_kwargs = {k: kwargs.pop(k) for k in HUB_KWARGS if k in kwargs}
    if isinstance(entry.get("base"), dict):
        return _from_timm_hub(entry, pretrained, hub_kwargs, **kwargs)
    if entry.get("embedded"):
        folder = Path(str(_ZOO / entry["embedded"]))
    else:
        folder = hub.download(entry["repo_id"], entry.get("revision"), **hub_kwargs)
    return hub.load_folder(folder, weights=pretrained, expected_sha256=entry["sha256"] if pretrained else None, **kwargs)


def _from_timm_hub(entry: dict[str, Any], pretrained: bool, hub_kwargs: dict[str, Any], device: str | torch.device = "cpu", **runtime: Any) -> RobustPatchClassifier:
    """A Hub-backed entry: timm's model of the tag, its weights from timm's Hub repo, wrapped with the paper's settings."""
    import timm

    from .defenses import wrap

    spec = entry["base"]
    base = timm.create_model(spec["model"], pretrained=False)
    if pretrained:
        path = _timm_weights(entry, **hub_kwargs)
        if entry.get("sha256") and hub.sha256_of(path) != entry["sha256"]:
            raise ValueError(f"{path} has sha256 {hub.sha256_of(path)}, but the zoo manifest records {entry['sha256']}: refusing to load it")
        hub.load_state_strictly(base, hub.read_safetensors(path, str(path)), str(path), f"timm's {spec['model']}")
    settings = dict(entry["settings"])
    model = wrap(base, settings.pop("patch"), defense=entry["defense"], **settings, **runtime)
    model.pretrained_info = {"dataset": entry.get("dataset"), "strategy": entry.get("strategy"), "paper": entry.get("paper")}
    return model.to(device).eval()


def _timm_weights(
    entry: dict[str, Any],
    cache_dir: str | Path | None = None,
    local_files_only: bool = False,
    token: str | bool | None = None,
    force_download: bool = False,
) -> Path:
    """`model.safetensors` of the entry's timm Hub repo: from the Hugging Face cache, else downloaded.

    Raises:
        FileNotFoundError: in one line, when the file is not cached and the Hub cannot be used
            (offline, `local_files_only`, or unreachable), saying how to fill the cache.
    """
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.utils import EntryNotFoundError, LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

    repo, revision = entry["base"]["hf_hub_id"], entry["base"].get("revision")
    cache = str(cache_dir) if cache_dir is not None else constants.HF_HUB_CACHE
    reason = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else "local_files_only=True" if local_files_only else hub._unreachable()
    try:
        return Path(
            hf_hub_download(
                repo, hub.WEIGHTS_NAME, revision=revision, cache_dir=cache, local_files_only=reason is not None, token=token, force_download=force_download and reason is None
            )
        )
    except LocalEntryNotFoundError:
        raise FileNotFoundError(
            f"zoo model {entry['name']!r} needs the network once: its weights are timm's Hub repo {repo} ({hub.WEIGHTS_NAME}), "
            f"which is not in the Hugging Face cache ({cache}) and {reason}; where the Hub can be reached run "
            f"`{hub._download_command(repo, hub.WEIGHTS_NAME)}` (then HF_HUB_OFFLINE=1 loads it from the cache), "
            f"or copy a Hugging Face cache that has it into {cache}"
        ) from None
    except (RepositoryNotFoundError, RevisionNotFoundError, EntryNotFoundError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise FileNotFoundError(f"zoo model {entry['name']!r}: cannot get {hub.WEIGHTS_NAME} of hf-hub:{repo}: {type(e).__name__}: {first}") from None


def model_card(name: str) -> str:
    """The card of a zoo model: what it is, the paper's figures as the paper's claim, the command that measures them.

    Args:
        name: a name from `list_models()`.

    Returns:
        The card as Markdown (an embedded model's `README.md`, a Hub-backed entry's card file).

    Raises:
        ValueError: for a name not in the zoo.
    """
    entry = zoo_entry(name)
    card = _ZOO / entry["card"] if entry.get("card") else _ZOO / entry["embedded"] / "README.md" if entry.get("embedded") else None
    return card.read_text() if card is not None else describe_entry(entry)


def from_pretrained(name_or_path: str | Path, **kwargs: Any) -> RobustPatchClassifier:
    """Load a defended model from the zoo, a local folder or the Hugging Face Hub.

    Args:
        name_or_path: a zoo name (`list_models()`); `hf-hub:<org>/<name>[@revision]` or
            `<org>/<name>` for a Hugging Face Hub repo; `local-dir:<folder>` or an existing
            folder. An existing folder wins over a Hub repo of the same spelling.
        **kwargs: `revision`, `cache_dir`, `local_files_only`, `force_download`, `token` (Hub);
            `device`, `batch_size` (the model).

    Returns:
        The defended model (the subclass its config names: `PatchCleanser`, ...), in eval mode.

    Raises:
        FileNotFoundError: a folder that does not exist, or a Hub model that is neither cached
            nor downloadable (one line saying how to get it).
        ValueError: a name that is none of these, or a config that is not a valid robustwrap
            config (see `robustwrap.hub.load_folder`).
    """
    spec = str(name_or_path)
    if ":" not in spec and not Path(spec).is_dir() and spec in list_models():
        return create_model(spec, **kwargs)
    return hub.load(spec, **kwargs)


# ------------------------------------------------------------------------------------ datasets
def _datasets() -> dict[str, Any]:
    return json.loads((_ZOO / "data" / "datasets.json").read_text())


BUILTIN_DATASETS: dict[str, str] = {name: meta["description"] for name, meta in _datasets().items()}


class _TensorImages(torch.utils.data.Dataset):
    """uint8 images as PIL images (like torchvision's MNIST), optionally transformed."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform=None, name: str | None = None):
        self.images, self.labels, self.transform, self.name = images, labels, transform, name

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int):
        from PIL import Image

        image = Image.fromarray(self.images[index].numpy())  # (H, W) uint8 -> "L", (H, W, 3) -> "RGB"
        return (self.transform(image) if self.transform else image), int(self.labels[index])


def builtin_dataset(name: str, transform: Callable[[Any], Any] | None = None) -> torch.utils.data.Dataset:
    """A small real dataset shipped inside the package, usable offline.

    Args:
        name: a key of `BUILTIN_DATASETS` (e.g. `"mnist-heldout"`: real MNIST digits that the zoo's
            MNIST model never saw in training).
        transform: applied to each PIL image, e.g. `timm.data.create_transform(**data_config)`.

    Returns:
        A dataset of `(image, label)`.

    Raises:
        ValueError: for a name that is not a built-in dataset, listing those that are.
    """
    if name not in BUILTIN_DATASETS:
        raise ValueError(f"unknown built-in dataset {name!r}; built-in: {', '.join(BUILTIN_DATASETS)}")
    import safetensors.torch

    meta = _datasets()[name]
    tensors = safetensors.torch.load_file(str(_ZOO / "data" / meta["file"]))
    return _TensorImages(tensors["images"], tensors["labels"], transform, name=f"{name} (built-in)")
