"""Fallback: the fastest quantization whose outputs meet a fidelity budget."""

from __future__ import annotations

import dataclasses
from typing import Annotated, Literal

import onnx_ir as ir

from onnxopt.fidelity import ReferenceComparison, reference_comparison
from onnxopt.options import Range
from onnxopt.passes.base import OnnxoptPass, PassResult
from onnxopt.quantization.channel_means import channel_means
from onnxopt.quantization.fallback import QuantizedFrom, keep_sensitive_layers_float
from onnxopt.quantization.speed_check import EVERY_LAYER_QUANTIZED
from onnxopt.quantization.state import BiasCorrection
from onnxopt.validation import Thresholds


class FallbackPass(OnnxoptPass):
    """Keep as few quantized layers float as it takes for the outputs to meet the budget, fast.

    Bisects how many of the first layers, the last layers, or the most sensitive ones to keep
    float (``quantization.fallback``), measuring each candidate exactly as the validate pass
    measures: through the run's one comparison with the original model (held-back samples
    first, then calibration samples, up to ``validate.samples``), with the same metrics. Of the
    candidates that meet the budget it keeps the fastest. The search always ends with a model
    that meets the budget; when only the float model does, or int8 would be slower than
    ``min_speedup`` allows, that is the model, and the report says why. Put it after 'quantize'
    (and 'correct-bias', which it applies again to every model it makes) and before 'validate'.
    The SQNR of every quantized tensor of the chosen model, worst first, goes to the report.

    Args:
        min_cosine: every output's cosine similarity with the original, at least.
        min_sqnr_db: every output's SQNR against the original, at least.
        min_top1_agreement: outputs that hold class scores are expected to agree on the top
            class this often (from the margins and the measured noise; see ``metrics``).
        min_speedup: the result must run at least this much faster than the float model (one
            thread, timed briefly); else it keeps every layer float and says why. none skips
            timing and keeps the candidate with the fewest layers float.
        max_seconds: stop the search after this long, with the best model known to meet the
            budget (at worst the float model).
        against: what the budget is measured against: ``original``, the run's input model,
            or ``float``, the float model the quantize pass started from. After pruning they
            differ: the pruned model's own loss is pruning's, judged by validation, and
            ``float`` holds quantization to the budget it has without pruning (prune-int8).
    """

    name = "fallback"
    quantizes = True
    needs_data = True
    needs_calibration = True

    def __init__(
        self,
        min_cosine: Annotated[float | None, Range(-1.0, 1.0)] = 0.99,
        min_sqnr_db: float | None = None,
        min_top1_agreement: Annotated[float | None, Range(0.0, 1.0)] = None,
        min_speedup: Annotated[float | None, Range(low=0.0)] = None,
        max_seconds: Annotated[float | None, Range(low=0.0, low_open=True)] = None,
        against: Literal["original", "float"] = "original",
    ):
        super().__init__()
        self.budget = Thresholds(
            min_cosine=min_cosine, min_sqnr_db=min_sqnr_db, min_top1_agreement=min_top1_agreement
        )
        self.min_speedup = min_speedup
        self.max_seconds = max_seconds
        self.against = against

    def call(self, model: ir.Model) -> PassResult:
        state = self.context.quantization_for(self.name)
        comparison = self.context.reference_comparison()
        if self.against == "float":
            comparison = _against_float(comparison, state.float_model)
        source = QuantizedFrom(
            state.float_model, state.ranges, state.problems, state.options, rounding=state.rounding
        )
        if state.bias_correction is not None:
            statistics = self.context.calibration_for(self.name).statistics
            source.create_bias = state.bias_correction.create_bias
            source.means = channel_means(model, state.float_model, statistics, self.context.data)
        check = self.context.speed_check
        known = None
        if check is not None and check.quantized_nodes == frozenset(state.report.quantized):
            known = check.speedups[EVERY_LAYER_QUANTIZED]
        result = keep_sensitive_layers_float(
            model,
            list(state.report.quantized),
            source,
            comparison,
            self.budget,
            min_speedup=self.min_speedup,
            max_seconds=self.max_seconds,
            quantized_speedup=known,
            progress=self.context.progress,
        )
        if result.report is not None:
            model.graph = result.model.graph
            state.record(model, result.report)
            if result.bias_correction is not None and source.create_bias is not None:
                state.bias_correction = BiasCorrection(source.create_bias, result.bias_correction)
        state.layers = result.layers
        outcome = dataclasses.replace(result.outcome, against=self.against)
        state.fallback = outcome
        details = {
            "kept float": len(outcome.kept_float),
            "still quantized": outcome.quantized_layers,
            "trials": outcome.trials,
            "budget met": outcome.budget_met,
            "stopped": outcome.stopped,
        }
        if outcome.speedup is not None:
            details["speedup"] = round(outcome.speedup, 2)
        if self.against == "float":
            details["against"] = "the float model quantized"
        return PassResult(
            model,
            modified=bool(outcome.kept_float),
            changes=len(outcome.kept_float),
            details=details,
        )


def _against_float(run: ReferenceComparison, float_model: ir.Model) -> ReferenceComparison:
    """The run's comparison samples, with the outputs of the float model quantized."""
    if not run.feeds:
        return run
    return reference_comparison(
        float_model,
        run.feeds,
        f"{run.description}; against the float model quantized",
        count=len(run.feeds),
    )
