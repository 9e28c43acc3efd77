"""Graph cleanup over public onnx_ir and onnxscript APIs: plain functions with typed results.

``fold_constants`` (``constants.py``) evaluates what is constant and removes what that leaves
unused with ``remove_dead_code`` (``dead_code.py``). The cleanup passes are thin adapters over
these.
"""

from __future__ import annotations

from onnxopt.cleanup.constants import ConstantFoldResult, fold_constants
from onnxopt.cleanup.dead_code import DeadCodeResult, remove_dead_code

__all__ = [
    "ConstantFoldResult",
    "DeadCodeResult",
    "fold_constants",
    "remove_dead_code",
]
