"""Fallback: the fewest quantized layers kept float for the outputs to meet a fidelity budget.

The layers are ranked once by the noise each adds to what reaches it (the per-tensor SQNR of the
quantized model against the float model, as noise-to-signal ratios, from one run of each), then
a bisection finds how many of the worst to keep float: a few quantizations, each measured on the
final outputs with the run's ``ReferenceComparison``, the very measurement validation makes.
Keeping every layer float gives the float model, which meets any budget the original meets, so
the search always ends with a model that meets the budget: int8 where it can, float where it
must, and float altogether (with the reason) when nothing less will do.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
import time
from collections.abc import Callable, Mapping, Sequence

import onnx_ir as ir

from onnxopt.fidelity import ReferenceComparison
from onnxopt.metrics import OutputFidelity
from onnxopt.progress import QUIET, Progress
from onnxopt.quantization.bias_correction import BiasCorrectionReport, ChannelMeans, correct_biases
from onnxopt.quantization.plan import QuantizationOptions
from onnxopt.quantization.qdq import QuantizationReport, quantize_model
from onnxopt.quantization.sensitivity import (
    LayerSqnr,
    compare_tensors,
    layers_from,
    node_added_noise,
)
from onnxopt.validation import Thresholds, meets

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class QuantizedFrom:
    """How a quantized model was made from its float model, to make it again with other choices.

    Attributes:
        float_model: the model just before quantization.
        ranges: the calibrated (low, high) of each tensor.
        problems: tensors that had to stay float, with the reason.
        options: the quantizer's options.
        create_bias: bias correction's setting, or None when biases were not corrected.
        means: per-channel means for bias correction, when biases were corrected.
    """

    float_model: ir.Model
    ranges: Mapping[str, tuple[float, float]]
    problems: Mapping[str, str]
    options: QuantizationOptions
    create_bias: bool | None = None
    means: ChannelMeans | None = None


@dataclasses.dataclass
class FallbackOutcome:
    """How the search ended.

    Attributes:
        kept_float: the layers kept float, worst first.
        outputs: the fidelity of every output of the chosen model.
        budget_met: whether the chosen model meets the budget.
        quantized_layers: how many layers the chosen model still quantizes.
        trials: how many quantizations the search measured.
        stopped: why the search ended, in words.
        budget: the budget it searched for.
    """

    kept_float: list[str]
    outputs: list[OutputFidelity]
    budget_met: bool
    quantized_layers: int
    trials: int
    stopped: str
    budget: Thresholds


@dataclasses.dataclass
class FallbackResult:
    """The model the search chose.

    Attributes:
        model: that model: the quantized model given, or a new one quantized again.
        outcome: how the search ended.
        report: the quantizer's report of a new model; None when the given one was chosen.
        bias_correction: bias correction's report of a new model, when biases are corrected.
        layers: the SQNR of every quantized tensor of ``model``, worst first.
    """

    model: ir.Model
    outcome: FallbackOutcome
    report: QuantizationReport | None
    bias_correction: BiasCorrectionReport | None
    layers: list[LayerSqnr]


@dataclasses.dataclass
class _Trial:
    """A quantization with some layers float, and how its outputs compare."""

    float_layers: int
    model: ir.Model
    outputs: list[OutputFidelity]
    met: bool
    report: QuantizationReport | None = None
    bias_report: BiasCorrectionReport | None = None


def keep_sensitive_layers_float(
    quantized: ir.Model,
    quantized_nodes: Sequence[str],
    source: QuantizedFrom,
    comparison: ReferenceComparison,
    budget: Thresholds,
    max_seconds: float | None = None,
    progress: Progress = QUIET,
) -> FallbackResult:
    """The quantization that meets ``budget`` with the fewest layers float, by bisection.

    Args:
        quantized: the quantized model; not changed.
        quantized_nodes: its quantized nodes.
        source: how it was made, to quantize again with layers float.
        comparison: what the outputs are measured against (the run's validation samples).
        budget: what the outputs must reach.
        max_seconds: stop bisecting after this long, keeping the best model known to meet the
            budget (at worst the float model); None for no limit.
        progress: shows the quantizations tried.
    """
    start = time.perf_counter()
    first = _Trial(0, quantized, *_judge(comparison, quantized, budget))
    ranking: list[str] = []
    if not first.met:
        ranking = _ranking(source.float_model, quantized, quantized_nodes, comparison)
    search = _Bisection(source, comparison, budget, ranking, first)
    steps = math.ceil(math.log2(len(ranking) + 1)) + 1 if ranking else 0
    with progress.task("keeping sensitive layers float", steps) as advance:
        chosen, stopped = search.run(advance, start, max_seconds)
    noise = compare_tensors(source.float_model, chosen.model, comparison.feeds)
    still_quantized = chosen.report.quantized if chosen.report else quantized_nodes
    outcome = FallbackOutcome(
        ranking[: chosen.float_layers],
        chosen.outputs,
        chosen.met,
        len(still_quantized),
        search.trials,
        stopped,
        budget,
    )
    logger.info("fallback: %s", stopped)
    return FallbackResult(
        chosen.model, outcome, chosen.report, chosen.bias_report, layers_from(chosen.model, noise)
    )


def _judge(
    comparison: ReferenceComparison, model: ir.Model, budget: Thresholds
) -> tuple[list[OutputFidelity], bool]:
    outputs = comparison.measure(model, rtol=budget.rtol)
    return outputs, meets(outputs, budget)


def _ranking(
    float_model: ir.Model,
    quantized: ir.Model,
    quantized_nodes: Sequence[str],
    comparison: ReferenceComparison,
) -> list[str]:
    """Every quantized node, the ones that add the most noise first."""
    noise = compare_tensors(float_model, quantized, comparison.feeds)
    shares = node_added_noise(float_model, quantized, noise, quantized_nodes)
    unmeasured = [name for name in quantized_nodes if name not in shares]
    return [*shares, *unmeasured]


class _Bisection:
    """The smallest number of the worst-ranked layers to keep float for the budget to hold."""

    def __init__(
        self,
        source: QuantizedFrom,
        comparison: ReferenceComparison,
        budget: Thresholds,
        ranking: list[str],
        first: _Trial,
    ):
        self.source = source
        self.comparison = comparison
        self.budget = budget
        self.ranking = ranking
        self.first = first
        self.trials = 1

    def run(
        self, advance: Callable[[int], None], start: float, max_seconds: float | None
    ) -> tuple[_Trial, str]:
        """The chosen trial and why the search stopped."""
        if self.first.met:
            return self.first, "budget met with every layer quantized"
        passing = None
        low, high = 0, len(self.ranking)
        while high - low > 1:
            if max_seconds is not None and time.perf_counter() - start > max_seconds:
                break
            middle = (low + high) // 2
            trial = self.trial(middle)
            advance(1)
            if trial.met:
                high, passing = middle, trial
            else:
                low = middle
        if passing is None or passing.float_layers != high:
            passing = self.trial(high)
            advance(1)
        if high < len(self.ranking):
            return passing, f"budget met with {high} of {len(self.ranking)} layers kept float"
        if passing.met:
            return passing, "int8 cannot meet the budget: every quantized layer kept float"
        return passing, "even the float model misses the budget: every quantized layer kept float"

    def trial(self, float_layers: int) -> _Trial:
        """The float model quantized with the ``float_layers`` worst layers float, and judged."""
        self.trials += 1
        excluded = self.ranking[:float_layers]
        model = self.source.float_model.clone()
        options = dataclasses.replace(
            self.source.options,
            exclude_nodes=[
                *self.source.options.exclude_nodes,
                *(re.escape(name) for name in excluded),
            ],
        )
        report = quantize_model(model, self.source.ranges, self.source.problems, options)
        bias_report = None
        if self.source.create_bias is not None and self.source.means is not None:
            bias_report = correct_biases(
                model, self.source.float_model, self.source.means, self.source.create_bias
            )
        outputs, met = _judge(self.comparison, model, self.budget)
        logger.debug("%d layers float: budget %s", float_layers, "met" if met else "missed")
        return _Trial(float_layers, model, outputs, met, report, bias_report)
