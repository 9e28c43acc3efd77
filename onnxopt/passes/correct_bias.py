"""Bias correction after quantization: cancel the mean error of int8 weights."""

from __future__ import annotations

import onnx_ir as ir

from onnxopt.passes.base import OnnxoptPass, PassResult
from onnxopt.quantization.bias_correction import correct_biases
from onnxopt.quantization.channel_means import channel_means
from onnxopt.quantization.state import BiasCorrection


class CorrectBiasPass(OnnxoptPass):
    """Shift each quantized Conv, Gemm and MatMul bias by the mean error of its int8 weights.

    The error of a layer's output is (W - Wq) x; its mean, (W - Wq) E[x], is computed from the
    per-channel means of the layer's input that calibration collected, and added to the int32
    bias with the scale it had, so onnxruntime still fuses the same integer kernel. Put it right
    after 'quantize'; 'fallback' after it applies the correction again whenever it re-quantizes.
    """

    name = "correct-bias"
    quantizes = True
    needs_calibration = True

    def __init__(self, create_bias: bool = True):
        super().__init__()
        self.create_bias = create_bias

    def call(self, model: ir.Model) -> PassResult:
        state = self.context.quantization_for(self.name)
        statistics = self.context.calibration_for(self.name).statistics
        means = channel_means(model, state.float_model, statistics, self.context.data)
        report = correct_biases(model, state.float_model, means, self.create_bias)
        state.bias_correction = BiasCorrection(self.create_bias, report)
        details = {"corrected": len(report.corrected)}
        if report.created:
            details["biases created"] = len(report.created)
        if report.skipped:
            details["skipped"] = len(report.skipped)
        return PassResult(
            model, modified=bool(report.corrected), changes=len(report.corrected), details=details
        )
