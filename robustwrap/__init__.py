"""robustwrap: certifiably patch-robust image classifiers, one defense contract for several defenses.

```python
import timm, robustwrap
model = robustwrap.wrap(timm.create_model("resnet18"), patch=0.02).eval()  # .eval(): train mode is the undefended base model
logits = model(images)                 # robust prediction
result = model.certify(images, labels) # which predictions no patch can change
```

The defended models and the mask geometry are imported with the package; data-set
certification, training, reports and the Hub loaders on first use (they pull in torchvision,
huggingface_hub's model cards and tqdm). timm is imported with the package, since
`robustwrap.models` registers its BagNets with timm's registry.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from . import models  # registers the BagNet builders with timm: timm.create_model("bagnet17") after import robustwrap
from .defenses import DEFENSES, CertifyResult, DerandomizedSmoothing, PatchCleanser, PatchCleanserResult, PatchGuard, PatchGuardResult, RobustPatchClassifier, wrap
from .geometry import MaskSet
from .attack import AttackResult, AuditReport, attack, audit  # eager, so the function `robustwrap.attack` is never shadowed by its module

if TYPE_CHECKING:
    from .augment import GreedyCutout, GridCutout, MultiSizeGreedyCutout, RandomCutout, RandomMaskCutout
    from .dataset import certify_dataset
    from .fit import FitHistory, fit_masking
    from .zoo import create_model, from_pretrained, list_models
    from .report import CertificationReport

__version__ = "0.1.0"

# name -> submodule, imported on first access (PEP 562)
_LAZY = {
    "certify_dataset": "dataset",
    "CertificationReport": "report",
    "fit_masking": "fit",
    "FitHistory": "fit",
    "RandomCutout": "augment",
    "RandomMaskCutout": "augment",
    "GreedyCutout": "augment",
    "MultiSizeGreedyCutout": "augment",
    "GridCutout": "augment",
    "from_pretrained": "zoo",
    "create_model": "zoo",
    "list_models": "zoo",
}

__all__ = [
    "wrap",
    "DEFENSES",
    "RobustPatchClassifier",
    "PatchCleanser",
    "DerandomizedSmoothing",
    "PatchGuard",
    "CertifyResult",
    "PatchCleanserResult",
    "PatchGuardResult",
    "models",
    "MaskSet",
    "attack",
    "AttackResult",
    "audit",
    "AuditReport",
    *_LAZY,
    "__version__",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'robustwrap' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
