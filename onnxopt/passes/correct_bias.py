"""Bias correction after quantization: cancel the mean error of int8 weights."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import onnx_ir as ir

from onnxopt.calibration.collect import collect_statistics
from onnxopt.calibration.collectors import CHANNEL_AXES
from onnxopt.context import Context
from onnxopt.passes.base import OnnxoptPass
from onnxopt.passes.quantize import quantization_inputs
from onnxopt.quantization.bias_correction import (
    BiasCorrectionReport,
    ChannelMeans,
    correct_biases,
    mean_requests,
)

logger = logging.getLogger(__name__)

# The calibration statistics' name for each axis bias correction asks means along.
AXIS_KEYS = {axis: key for key, axis in CHANNEL_AXES.items()}


class CorrectBiasPass(OnnxoptPass):
    """Shift each quantized Conv, Gemm and MatMul bias by the mean error of its int8 weights.

    The error of a layer's output is (W - Wq) x; its mean, (W - Wq) E[x], is computed from the
    per-channel means of the layer's input that calibration collected, and added to the int32
    bias with the scale it had, so onnxruntime still fuses the same integer kernel. Put it right
    after 'quantize'; 'fallback' after it applies the correction again whenever it re-quantizes.
    """

    name = "correct-bias"
    needs_statistics = True

    def __init__(self, create_bias: bool = True):
        super().__init__()
        self.create_bias = create_bias

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        float_model = quantization_inputs(self.context, self.name).float_model
        report = apply_bias_correction(self.context, model, float_model, self.create_bias)
        self.changes = len(report.corrected)
        self.details = {"corrected": len(report.corrected)}
        if report.created:
            self.details["biases created"] = len(report.created)
        if report.skipped:
            self.details["skipped"] = len(report.skipped)
        return ir.passes.PassResult(model, modified=bool(self.changes))


def apply_bias_correction(
    context: Context, quantized: ir.Model, float_model: ir.Model, create_bias: bool
) -> BiasCorrectionReport:
    """Correct the biases of ``quantized`` and record it in ``context.quantization``.

    The record also tells 'fallback', which quantizes again, to correct the new model the same way.
    """
    means = channel_means(context, quantized, float_model)
    report = correct_biases(quantized, float_model, means, create_bias)
    context.quantization["bias_correction"] = bias_correction_record(report, create_bias)
    return report


def bias_correction_record(report: BiasCorrectionReport, create_bias: bool) -> dict[str, Any]:
    """The entry of ``context.quantization`` that says what was corrected, and how to do it again."""
    return {
        "create_bias": create_bias,
        "corrected": report.corrected,
        "created": report.created,
        "skipped": report.skipped,
    }


def channel_means(context: Context, quantized: ir.Model, float_model: ir.Model) -> ChannelMeans:
    """Per-channel means of the inputs correction reads, from calibration's statistics.

    Tensors whose statistics hold no means along the axis asked for (or none at all) are measured
    on the float model over the calibration data.
    """
    known: dict[tuple[str, int], np.ndarray] = {}
    missing = []
    for name, axis in mean_requests(quantized, float_model).items():
        statistics = getattr(context.statistics.get(name), "statistics", None)
        means = statistics.channel_means(AXIS_KEYS[axis]) if statistics is not None else None
        if means is None:
            missing.append(name)
        else:
            known[(name, axis)] = means
    if missing and context.data is not None:
        logger.info("measuring channel means of %d tensors for bias correction", len(missing))
        for name, statistics in collect_statistics(float_model, missing, context.data).items():
            for key, axis in CHANNEL_AXES.items():
                means = statistics.channel_means(key)
                if means is not None:
                    known[(name, axis)] = means

    def means_of(name: str, axis: int) -> np.ndarray | None:
        return known.get((name, axis))

    return means_of
