"""Sensitivity-guided fallback: keep the quantized layers that hurt the outputs most in float.

Each step ranks the quantized nodes by the noise each adds to what reaches it (the per-tensor
SQNR of the quantized model against the float model, as noise-to-signal ratios, on a few
samples), quantizes the float model again with the worst one excluded, and keeps that only if
the final outputs improve. Ranking this way costs one run of each model per step, where
measuring every layer's effect on the outputs alone costs a quantization and a run per layer;
since every step is checked on the final outputs, a wrong guess costs a step, never accuracy.
A layer is only float when its input is, so the layers that would still quantize its input
(its producer, or the other users of that tensor) go float with it.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Callable, Mapping, Sequence

import onnx_ir as ir

from onnxopt import runtime
from onnxopt.metrics import compare_outputs
from onnxopt.progress import QUIET, Progress
from onnxopt.quantization.bias_correction import BiasCorrectionReport, ChannelMeans, correct_biases
from onnxopt.quantization.plan import QuantizationOptions
from onnxopt.quantization.qdq import QuantizationReport, quantize_model
from onnxopt.quantization.sensitivity import (
    LayerSqnr,
    TensorNoise,
    compare_tensors,
    is_quantized_constant,
    layers_from,
    node_added_noise,
)
from onnxopt.runtime import Feed

logger = logging.getLogger(__name__)

# A float layer must buy at least this much output SQNR (2.3% less noise power) to be kept.
MIN_GAIN_DB = 0.1
# Candidates tried per float layer allowed, so a budget out of reach ends the search in bounded time.
ATTEMPTS_PER_LAYER = 3
# Rounds of pulling in the layers that still quantize a float layer's input.
CLOSURE_ROUNDS = 4


@dataclasses.dataclass(frozen=True)
class Fidelity:
    """The worst output's cosine and SQNR against the float model."""

    cosine: float
    sqnr_db: float


@dataclasses.dataclass(frozen=True)
class FidelityBudget:
    """Thresholds the outputs must meet; None turns one off."""

    min_cosine: float | None = 0.99
    min_sqnr_db: float | None = None

    def met_by(self, fidelity: Fidelity) -> bool:
        return (self.min_cosine is None or fidelity.cosine >= self.min_cosine) and (
            self.min_sqnr_db is None or fidelity.sqnr_db >= self.min_sqnr_db
        )


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
    """How the search ended: the layers kept float, the fidelity reached, and why it stopped."""

    kept_float: list[str]
    fidelity: Fidelity
    budget_met: bool
    stopped: str


@dataclasses.dataclass
class FallbackResult:
    """The best model the search found.

    Attributes:
        model: that model: the quantized model given, or a new one quantized again.
        outcome: how the search ended.
        report: the quantizer's report of a new model; None when the given one was best.
        bias_correction: bias correction's report of a new model, when biases are corrected.
        layers: the SQNR of every quantized tensor of ``model``, worst first.
    """

    model: ir.Model
    outcome: FallbackOutcome
    report: QuantizationReport | None
    bias_correction: BiasCorrectionReport | None
    layers: list[LayerSqnr]


@dataclasses.dataclass
class _State:
    """A quantized model, the layers it keeps float, and how close it is to the float model."""

    model: ir.Model
    excluded: list[str]
    fidelity: Fidelity
    quantized: list[str]
    report: QuantizationReport | None = None
    bias_report: BiasCorrectionReport | None = None
    noise: dict[str, TensorNoise] | None = None


def keep_sensitive_layers_float(
    quantized: ir.Model,
    quantized_nodes: Sequence[str],
    source: QuantizedFrom,
    feeds: Sequence[Feed],
    budget: FidelityBudget,
    max_float_layers: int,
    progress: Progress = QUIET,
) -> FallbackResult:
    """Keep the fewest layers float that bring the outputs within ``budget``, greedily.

    With no threshold set, only measures. The search stops when the budget is met, when
    ``max_float_layers`` are float, or after ATTEMPTS_PER_LAYER candidates per layer allowed.

    Args:
        quantized: the quantized model; not changed.
        quantized_nodes: its quantized nodes.
        source: how it was made, to quantize again with layers float.
        feeds: the samples the outputs and tensors are compared on.
        budget: what the outputs must reach.
        max_float_layers: the most layers the search may keep float.
        progress: shows the candidates tried.
    """
    attempts = ATTEMPTS_PER_LAYER * max_float_layers
    with progress.task("trying sensitive layers in float", attempts) as advance:
        search = _Search(source, feeds, budget, max_float_layers, advance)
        final, stopped = search.run(quantized, list(quantized_nodes))
    outcome = FallbackOutcome(
        final.excluded, final.fidelity, budget.met_by(final.fidelity), stopped
    )
    logger.info("kept %d layers float: %s", len(final.excluded), stopped)
    return FallbackResult(
        final.model,
        outcome,
        final.report,
        final.bias_report,
        layers_from(final.model, search.noise_of(final)),
    )


class _Search:
    """The greedy search: one layer at a time, each checked on the final outputs."""

    def __init__(
        self,
        source: QuantizedFrom,
        feeds: Sequence[Feed],
        budget: FidelityBudget,
        max_float_layers: int,
        advance: Callable[[int], None],
    ):
        self.source = source
        self.feeds = list(feeds)
        self.budget = budget
        self.limit = max_float_layers
        self.advance = advance
        self.output_names = [value.name for value in source.float_model.graph.outputs]
        self.reference = runtime.run(runtime.create_session(source.float_model), self.feeds)

    def run(self, model: ir.Model, quantized: list[str]) -> tuple[_State, str]:
        """The best state found, and why the search stopped."""
        current = _State(model, [], self.fidelity(model), quantized)
        tried: set[str] = set()
        while True:
            if self.budget.met_by(current.fidelity):
                return current, "budget met"
            if len(current.excluded) >= self.limit:
                return current, f"reached max_float_layers ({self.limit}) before the budget"
            if len(tried) >= ATTEMPTS_PER_LAYER * self.limit:
                return current, f"tried {len(tried)} layers without meeting the budget"
            ranking = node_added_noise(current.model, self.noise_of(current), current.quantized)
            candidate = next(
                (name for name, share in ranking.items() if share > 0 and name not in tried), None
            )
            if candidate is None:
                return current, "no quantized layer left whose fallback improves the outputs"
            tried.add(candidate)
            self.advance(1)
            trial = self.keep_float(candidate, current.excluded)
            if trial is None:
                continue
            gain = trial.fidelity.sqnr_db - current.fidelity.sqnr_db
            logger.debug("keeping %s float: %+.2f dB", trial.excluded, gain)
            if gain >= MIN_GAIN_DB:
                current = trial

    def keep_float(self, candidate: str, excluded: list[str]) -> _State | None:
        """The model quantized with ``candidate`` float and its input float too; None past the limit."""
        excluded = [*excluded, candidate]
        for _ in range(CLOSURE_ROUNDS):
            if len(excluded) > self.limit:
                return None
            model, report = self.quantize(excluded)
            still_quantizing = quantizers_of_inputs(model, candidate, report) - set(excluded)
            if not still_quantizing:
                break
            excluded += sorted(still_quantizing)
        else:
            return None
        bias_report = None
        if self.source.create_bias is not None and self.source.means is not None:
            bias_report = correct_biases(
                model, self.source.float_model, self.source.means, self.source.create_bias
            )
        return _State(
            model, excluded, self.fidelity(model), list(report.quantized), report, bias_report
        )

    def quantize(self, excluded: list[str]) -> tuple[ir.Model, QuantizationReport]:
        """The float model quantized as before, with the named nodes float."""
        model = self.source.float_model.clone()
        options = dataclasses.replace(
            self.source.options,
            exclude_nodes=[
                *self.source.options.exclude_nodes,
                *(re.escape(name) for name in excluded),
            ],
        )
        report = quantize_model(model, self.source.ranges, self.source.problems, options)
        return model, report

    def fidelity(self, model: ir.Model) -> Fidelity:
        outputs = runtime.run(runtime.create_session(model), self.feeds)
        results = compare_outputs(self.output_names, self.reference, outputs)
        return Fidelity(
            min(result.cosine for result in results), min(result.sqnr_db for result in results)
        )

    def noise_of(self, state: _State) -> dict[str, TensorNoise]:
        """Per-tensor noise of a state's model, measured once."""
        if state.noise is None:
            state.noise = compare_tensors(self.source.float_model, state.model, self.feeds)
        return state.noise


def quantizers_of_inputs(model: ir.Model, name: str, report: QuantizationReport) -> set[str]:
    """Quantized nodes that make node ``name`` read a dequantized activation.

    The producer of the quantized tensor when it is quantized (its integer kernel emits int8),
    else the quantized users of the tensor (each quantizes it for itself).
    """
    node = next((node for node in model.graph if node.name == name), None)
    if node is None:
        return set()
    quantized = set(report.quantized)
    culprits: set[str] = set()
    for value in node.inputs:
        if value is None or is_quantized_constant(value):
            continue
        dequantize = value.producer()
        if dequantize is None or dequantize.op_type != "DequantizeLinear":
            continue
        quantize = dequantize.inputs[0].producer()
        if quantize is None or quantize.op_type != "QuantizeLinear":
            continue
        source = quantize.inputs[0].producer()
        if source is not None and source.name in quantized:
            culprits.add(source.name)
        else:
            culprits.update(
                usage.node.name for usage in value.uses() if usage.node.name in quantized
            )
    culprits.discard(name)
    return culprits
