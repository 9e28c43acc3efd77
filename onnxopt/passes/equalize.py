"""Cross-layer equalization of consecutive convolutions, before calibration."""

from __future__ import annotations

from typing import Annotated

import onnx_ir as ir

from onnxopt.options import Range
from onnxopt.passes.base import OnnxoptPass, PassResult
from onnxopt.quantization.equalization import equalize_model


class EqualizePass(OnnxoptPass):
    """Rescale Conv -> [Relu] -> Conv channel pairs so both sides have the same weight range.

    The float function stays the same (up to float rounding), while channels whose weights were
    tiny next to their neighbours' stop losing their precision to a shared scale. Put it after
    fold-batchnorm (a BatchNorm between the convolutions hides the pair) and before calibration
    (it changes the activations calibration measures). Chains through Relu6 are left alone:
    Clip(0, 6) is not positive-homogeneous, so rescaling through it would change the model.

    Args:
        iterations: sweeps over the chain; more balance long chains of convolutions further.
    """

    name = "equalize"
    quantizes = True

    def __init__(self, iterations: Annotated[int, Range(low=1)] = 2):
        super().__init__()
        self.iterations = iterations

    def call(self, model: ir.Model) -> PassResult:
        report = equalize_model(model, self.iterations)
        details = {"pairs": len(report.pairs)}
        if report.refused:
            details["refused"] = report.refused
        return PassResult(
            model, modified=bool(report.pairs), changes=len(report.pairs), details=details
        )
