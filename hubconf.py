"""torch.hub entry points: one per zoo model, plus `robust_model` for any Hub repo or folder.

    model = torch.hub.load("<this repo>", "<zoo name>", source="local")   # or "github"
    model = torch.hub.load("<this repo>", "robust_model", "hf-hub:<org>/<name>")

The papers' Hub-backed models are entry points too, under their timm `arch.tag` names
(`torch.hub.load(".", "vit_base_patch16_224.augreg_in21k_ft_in1k", source="local")`): their base
weights come from timm's Hub repo, so the first load needs the network.

Helpers are imported under `_` names so that `torch.hub.list` shows only models. A manifest entry
that lacks a field (metrics not measured yet, say) still gets its entry point: its docstring says
what is not recorded instead of failing, so one entry can never break `torch.hub.load` for all.
"""

dependencies = ["torch", "torchvision", "timm", "huggingface_hub", "safetensors"]

from robustwrap.zoo import create_model as _create_model  # noqa: E402
from robustwrap.zoo import describe_entry as _describe_entry  # noqa: E402
from robustwrap.zoo import from_pretrained as _from_pretrained  # noqa: E402
from robustwrap.zoo import list_models as _list_models  # noqa: E402
from robustwrap.zoo import zoo_entry as _zoo_entry  # noqa: E402


def robust_model(name_or_path, **kwargs):
    """A defended model from `hf-hub:<org>/<name>[@rev]`, a local folder or a zoo name.

    Args:
        name_or_path: where the model is; see `robustwrap.from_pretrained`.
        **kwargs: passed to `robustwrap.from_pretrained` (`revision`, `cache_dir`, `device`, ...).
    """
    return _from_pretrained(name_or_path, **kwargs)


def _entry(name):
    def entry(pretrained=True, **kwargs):
        return _create_model(name, pretrained=pretrained, **kwargs)

    entry.__name__ = entry.__qualname__ = name
    record = _zoo_entry(name)
    weights = f"timm's weights from {record['weights']} (the network is needed once)" if "base" in record else "the measured weights (sha256-checked)"
    entry.__doc__ = f"{_describe_entry(record)}\n\nArgs:\n    pretrained: load {weights}.\n"
    return entry


for _name in _list_models():
    globals()[_name] = _entry(_name)
