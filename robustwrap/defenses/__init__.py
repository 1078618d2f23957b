"""The certified defenses: each module holds one defense's rule, view scheduling and class."""

from .patchcleanser import CertifyResult, RobustPatchClassifier, wrap

__all__ = ["RobustPatchClassifier", "CertifyResult", "wrap"]
