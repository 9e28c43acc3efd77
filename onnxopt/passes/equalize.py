"""Cross-layer equalization of consecutive convolutions, before calibration."""

from __future__ import annotations

import logging

import onnx_ir as ir

from onnxopt.errors import InputError
from onnxopt.passes.base import OnnxoptPass
from onnxopt.quantization.equalization import equalize_model

logger = logging.getLogger(__name__)


class EqualizePass(OnnxoptPass):
    """Rescale Conv -> [Relu] -> Conv channel pairs so both sides have the same weight range.

    The float function stays the same (up to float rounding), while channels whose weights were
    tiny next to their neighbours' stop losing their precision to a shared scale. Put it after
    fold-batchnorm (a BatchNorm between the convolutions hides the pair) and before calibration
    (it changes the activations calibration measures). Chains through Relu6 are left alone:
    Clip(0, 6) is not positive-homogeneous, so rescaling through it would change the model.
    """

    name = "equalize"

    def __init__(self, iterations: int = 2):
        super().__init__()
        if iterations < 1:
            raise InputError(
                f"equalize.iterations must be 1 or more, got {iterations}",
                fix="use 2 (the default); more sweeps balance long chains of convolutions further",
            )
        self.iterations = iterations

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        report = equalize_model(model, self.iterations)
        self.changes = len(report.pairs)
        self.details = {"pairs": len(report.pairs)}
        if report.refused:
            self.details["refused"] = report.refused
        return ir.passes.PassResult(model, modified=bool(self.changes))
