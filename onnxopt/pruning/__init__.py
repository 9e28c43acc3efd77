"""Pruning: which weights matter (importance), zeros in place (unstructured and N:M sparsity,
with SparseGPT-style reconstruction of the weights that remain).

``sparsify_model`` is the whole job for sparsity: for every Conv, Gemm and MatMul with a
constant weight it chooses the weights to zero by one of ``IMPORTANCES`` and, by default,
updates the weights that remain so that each layer's output on calibration samples moves
least (``sparsegpt``). The ``sparsify`` pass is a thin adapter over it.
"""

from __future__ import annotations

from onnxopt.pruning.importance import IMPORTANCES, Importance
from onnxopt.pruning.patterns import SparsityPattern, parse_pattern
from onnxopt.pruning.sparsify import LayerSparsity, SparsityReport, SparsitySettings, sparsify_model

__all__ = [
    "IMPORTANCES",
    "Importance",
    "LayerSparsity",
    "SparsityPattern",
    "SparsityReport",
    "SparsitySettings",
    "parse_pattern",
    "sparsify_model",
]
