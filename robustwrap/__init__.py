"""robustwrap: certifiably patch-robust image classifiers (PatchCleanser double masking).

```python
import timm, robustwrap
model = robustwrap.wrap(timm.create_model("resnet18"), patch=0.02).eval()
logits = model(images)                 # robust prediction
result = model.certify(images, labels) # which predictions no patch can change
```
"""

from .augment import GreedyCutout, GridCutout, MultiSizeGreedyCutout, RandomCutout, RandomMaskCutout
from .defenses.patchcleanser import CertifyResult, RobustPatchClassifier, wrap
from .dataset import certify_dataset
from .fit import FitHistory, fit_masking
from .hub import create_model, from_pretrained, list_models
from .geometry import MaskSet
from .report import CertificationReport

__version__ = "0.1.0"

__all__ = [
    "wrap",
    "RobustPatchClassifier",
    "CertifyResult",
    "MaskSet",
    "certify_dataset",
    "CertificationReport",
    "fit_masking",
    "FitHistory",
    "RandomCutout",
    "RandomMaskCutout",
    "GreedyCutout",
    "MultiSizeGreedyCutout",
    "GridCutout",
    "from_pretrained",
    "create_model",
    "list_models",
    "__version__",
]
