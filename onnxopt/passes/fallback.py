"""Sensitivity-guided fallback: keep the layers that cost the most accuracy in float."""

from __future__ import annotations

from typing import Annotated

import onnx_ir as ir

from onnxopt.errors import ProcessingError
from onnxopt.options import Range
from onnxopt.passes.base import OnnxoptPass, PassResult
from onnxopt.quantization.channel_means import channel_means
from onnxopt.quantization.fallback import FidelityBudget, QuantizedFrom, keep_sensitive_layers_float
from onnxopt.quantization.state import BiasCorrection


class FallbackPass(OnnxoptPass):
    """Keep the quantized layers that hurt the outputs most in float, until they meet the budget.

    The search (``quantization.fallback``) quantizes the float model again with the worst layers
    float, one at a time, and keeps a step only if the final outputs improve. Put it after
    'quantize' (and 'correct-bias', which it applies again to every model it makes) and before
    'validate'. With no budget it only measures. Either way the SQNR of every quantized tensor,
    worst first, goes to the report.
    """

    name = "fallback"
    needs_data = True
    needs_calibration = True

    def __init__(
        self,
        min_cosine: Annotated[float | None, Range(-1.0, 1.0)] = 0.99,
        min_sqnr_db: float | None = None,
        max_float_layers: Annotated[int, Range(low=0)] = 8,
        samples: Annotated[int, Range(low=1)] = 16,
    ):
        super().__init__()
        self.budget = FidelityBudget(min_cosine, min_sqnr_db)
        self.max_float_layers = max_float_layers
        self.samples = samples

    def call(self, model: ir.Model) -> PassResult:
        state = self.context.quantization_for(self.name)
        data = self.context.data
        feeds = data.take(self.samples) if data is not None else []
        if not feeds:
            raise ProcessingError(
                "pass 'fallback' needs calibration samples to measure the layers, and got none",
                fix="give more samples with --calib, or leave 'fallback' out of the recipe",
            )
        source = QuantizedFrom(state.float_model, state.ranges, state.problems, state.options)
        if state.bias_correction is not None:
            statistics = self.context.calibration_for(self.name).statistics
            source.create_bias = state.bias_correction.create_bias
            source.means = channel_means(model, state.float_model, statistics, data)
        result = keep_sensitive_layers_float(
            model,
            list(state.report.quantized),
            source,
            feeds,
            self.budget,
            self.max_float_layers,
            self.context.progress,
        )
        if result.report is not None:
            model.graph = result.model.graph
            state.record(model, result.report)
            if result.bias_correction is not None and source.create_bias is not None:
                state.bias_correction = BiasCorrection(source.create_bias, result.bias_correction)
        state.layers = result.layers
        state.fallback = result.outcome
        outcome = result.outcome
        details = {
            "kept float": outcome.kept_float,
            "cosine": round(outcome.fidelity.cosine, 6),
            "sqnr_db": round(outcome.fidelity.sqnr_db, 2),
            "budget met": outcome.budget_met,
        }
        if not outcome.budget_met:
            details["stopped"] = outcome.stopped
        return PassResult(
            model,
            modified=bool(outcome.kept_float),
            changes=len(outcome.kept_float),
            details=details,
        )
