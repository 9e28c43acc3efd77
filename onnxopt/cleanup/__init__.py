"""Graph cleanup over public onnx_ir and onnxscript APIs: plain functions with typed results.

``fold_constants`` (``constants.py``) evaluates what is constant and removes what that leaves
unused with ``remove_dead_code`` (``dead_code.py``); ``fold_batchnorms`` (``batchnorm.py``) folds
BatchNormalization into the Conv, ConvTranspose or Gemm before it; ``eliminate_identities``
(``identity.py``) removes Identity nodes; ``fuse_pads`` (``pad.py``) folds zero Pads into
convolutions. The cleanup passes are thin adapters over these.
"""

from __future__ import annotations

from onnxopt.cleanup.batchnorm import BatchNormFoldResult, fold_batchnorms
from onnxopt.cleanup.constants import ConstantFoldResult, fold_constants
from onnxopt.cleanup.dead_code import DeadCodeResult, remove_dead_code
from onnxopt.cleanup.identity import IdentityResult, eliminate_identities
from onnxopt.cleanup.pad import PadFusionResult, fuse_pads

__all__ = [
    "BatchNormFoldResult",
    "ConstantFoldResult",
    "DeadCodeResult",
    "IdentityResult",
    "PadFusionResult",
    "eliminate_identities",
    "fold_batchnorms",
    "fold_constants",
    "fuse_pads",
    "remove_dead_code",
]
