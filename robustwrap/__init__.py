"""robustwrap: certifiably patch-robust image classifiers, one defense contract for several defenses.

```python
import timm, robustwrap
model = robustwrap.wrap(timm.create_model("resnet18"), patch=0.02).eval()  # .eval(): train mode is the undefended base model
logits = model(images)                 # robust prediction
result = model.certify(images, labels) # which predictions no patch can change
```

Every name is imported on first use (PEP 562), so `import robustwrap` costs nothing and the
`robustwrap` command answers `--help` without importing torch or timm. `import robustwrap.models`
(done by whatever needs it: the PatchGuard defense, the Hub loaders, the zoo) registers the BagNets
with timm, so that `timm.create_model("bagnet17")` works.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from . import models
    from .attack import AttackResult, AuditReport, attack, audit
    from .augment import GreedyCutout, GridCutout, MultiSizeGreedyCutout, RandomCutout, RandomMaskCutout
    from .dataset import certify_dataset
    from .defenses import (
        DEFENSES,
        CertifyResult,
        DerandomizedSmoothing,
        PatchCleanser,
        PatchCleanserResult,
        PatchCURE,
        PatchCUREResult,
        PatchGuard,
        PatchGuardResult,
        RobustPatchClassifier,
        wrap,
    )
    from .defenses.detection import DetectionCertificate, DetectResult
    from .fit import FitHistory, fit_masking
    from .geometry import MaskSet
    from .report import CertificationReport
    from .zoo import create_model, from_pretrained, list_models

__version__ = "0.1.0"

# public name -> the submodule that defines it, imported on first access
_LAZY = {
    "wrap": "defenses",
    "DEFENSES": "defenses",
    "RobustPatchClassifier": "defenses",
    "PatchCleanser": "defenses",
    "DerandomizedSmoothing": "defenses",
    "PatchGuard": "defenses",
    "PatchCURE": "defenses",
    "CertifyResult": "defenses",
    "PatchCleanserResult": "defenses",
    "PatchGuardResult": "defenses",
    "PatchCUREResult": "defenses",
    "DetectResult": "defenses.detection",
    "DetectionCertificate": "defenses.detection",
    "MaskSet": "geometry",
    "attack": "attack",
    "AttackResult": "attack",
    "audit": "attack",
    "AuditReport": "attack",
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

__all__ = ["models", *_LAZY, "__version__"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    if not name.startswith("_") and importlib.util.find_spec(f"{__name__}.{name}") is not None:
        # a submodule (`robustwrap.models`, `robustwrap.plots`, ...): its import binds it here
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'robustwrap' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


class _Package(types.ModuleType):
    """The package module, keeping `robustwrap.attack` the function.

    Importing a submodule binds it as an attribute of its package, after the submodule has run
    (`import robustwrap.attack`, or any `from .attack import ...` inside the package): the module
    `robustwrap.attack` would then hide the function `robustwrap.attack` for good. The binding
    goes through `setattr` on this module, so it is redirected to the module's function here.
    """

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "attack" and isinstance(value, types.ModuleType):
            value = value.attack
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
