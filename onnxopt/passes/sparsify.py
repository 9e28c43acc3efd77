"""Sparsity: zeros in the weights of Conv, Gemm and MatMul layers, the rest reconstructed."""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

import onnx_ir as ir

from onnxopt.options import Range, Rule
from onnxopt.passes.base import OnnxoptPass, PassResult
from onnxopt.pruning import SparsitySettings, parse_pattern, sparsify_model


def _pattern_problem(value: Any) -> str | None:
    if value == "unstructured" or re.fullmatch(r"\d+:\d+", str(value)):
        left, _, right = str(value).partition(":")
        if value == "unstructured" or 0 < int(left) < int(right):
            return None
    return "must be 'unstructured' or N:M with 0 < N < M, such as '2:4'"


class SparsifyPass(OnnxoptPass):
    """Zero a share of every Conv, Gemm and MatMul weight (unstructured or N:M along the input
    columns) and, by default, update the remaining weights so each layer's output on the
    calibration samples moves least (SparseGPT). Zeros make the file compress and feed sparse
    runtimes; onnxruntime's dense kernels run no faster on them.

    Args:
        ratio: the share of each layer's weights zeroed, for unstructured patterns.
        pattern: ``unstructured`` or N:M (``2:4``): N of every M consecutive input columns
            kept; layers whose columns do not divide into groups of M stay dense.
        importance: ``sparsegpt`` (default), ``magnitude``, ``wanda``, ``gradient`` or
            ``taylor`` (``pruning.importance``; the last two need the torch extra).
        reconstruct: update the remaining weights (needs calibration data).
        refit_steps: conjugate-gradient steps of the least-squares refit after SparseGPT.
        allocation: how ``ratio`` is shared among layers (unstructured SparseGPT): ``auto``
            (whichever of uniform, global and halfway keeps the outputs closest on the
            calibration samples), ``uniform``, or ``global`` (by saliency model-wide).
        samples: calibration samples the layer inputs (and gradients) are measured on.
        exclude: regular expressions on node names; matching layers stay dense.
        protect_first_last: keep the first and last prunable layers dense.
    """

    name = "sparsify"

    def __init__(
        self,
        ratio: Annotated[float, Range(low=0.0, high=1.0, high_open=True)] = 0.5,
        pattern: Annotated[str, Rule(_pattern_problem)] = "unstructured",
        importance: Literal["sparsegpt", "magnitude", "wanda", "gradient", "taylor"] = "sparsegpt",
        reconstruct: bool = True,
        refit_steps: Annotated[int, Range(low=0)] = 30,
        allocation: Literal["auto", "uniform", "global"] = "auto",
        samples: Annotated[int, Range(low=1)] = 32,
        exclude: list[str] | None = None,
        protect_first_last: bool = True,
    ):
        super().__init__()
        self.settings = SparsitySettings(
            ratio=ratio,
            pattern=parse_pattern(pattern),
            importance=importance,
            reconstruct=reconstruct,
            refit_steps=refit_steps,
            allocation=allocation,
            exclude=tuple(exclude or []),
            protect_first_last=protect_first_last,
        )
        self.samples = samples

    def call(self, model: ir.Model) -> PassResult:
        data = self.context.data
        feeds = data.take(self.samples) if data is not None else []
        report = sparsify_model(model, feeds, self.settings, self.context.progress)
        self.context.sparsity = report
        details = {
            "sparsity": round(report.sparsity, 4),
            "pattern": str(self.settings.pattern),
            "layers pruned": len(report.layers),
        }
        if report.dense:
            details["layers dense"] = len(report.dense)
        if report.candidate_closeness:
            details["allocation"] = report.allocation
        return PassResult(
            model, modified=bool(report.layers), changes=len(report.layers), details=details
        )
