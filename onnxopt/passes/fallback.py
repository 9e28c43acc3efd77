"""Sensitivity-guided fallback: keep the layers that cost the most accuracy in float."""

from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Callable, Sequence

import numpy as np
import onnx_ir as ir

from onnxopt import runtime
from onnxopt.errors import InputError, ProcessingError
from onnxopt.metrics import compare_outputs
from onnxopt.passes.base import OnnxoptPass
from onnxopt.passes.correct_bias import bias_correction_record, channel_means
from onnxopt.passes.quantize import QuantizationInputs, quantization_inputs, quantization_record
from onnxopt.progress import QUIET
from onnxopt.quantization.bias_correction import BiasCorrectionReport, correct_biases
from onnxopt.quantization.qdq import QuantizationReport, quantize_model
from onnxopt.quantization.sensitivity import (
    TensorNoise,
    compare_tensors,
    is_quantized_constant,
    layers_from,
    node_added_noise,
)

logger = logging.getLogger(__name__)

# A float layer must buy at least this much output SQNR (2.3% less noise power) to be kept.
MIN_GAIN_DB = 0.1
# Candidates tried per float layer allowed, so a budget out of reach ends the search in bounded time.
ATTEMPTS_PER_LAYER = 3
# Rounds of pulling in the layers that still quantize a float layer's input.
CLOSURE_ROUNDS = 4

Feed = dict[str, np.ndarray]


@dataclasses.dataclass
class _Fidelity:
    """The worst output's cosine and SQNR against the float model."""

    cosine: float
    sqnr_db: float


@dataclasses.dataclass
class _State:
    """A quantized model, the layers it keeps float, and how close it is to the float model."""

    model: ir.Model
    excluded: list[str]
    fidelity: _Fidelity
    quantized: list[str]
    report: QuantizationReport | None = None
    bias_report: BiasCorrectionReport | None = None
    noise: dict[str, TensorNoise] | None = None


class FallbackPass(OnnxoptPass):
    """Keep the quantized layers that hurt the outputs most in float, until they meet the budget.

    Each step ranks the quantized nodes by the noise each adds to what reaches it (the per-tensor
    SQNR of the quantized model against the float model, as noise-to-signal ratios, on a few
    calibration samples), quantizes the float model again with the worst one excluded, and keeps
    that only if the final outputs improve. Ranking this way costs one run of each model per
    step, where measuring every layer's effect on the outputs alone costs a quantization and a
    run per layer; since every step is checked on the final outputs, a wrong guess costs a step,
    never accuracy. A layer is only float when its input is, so the layers that would still
    quantize its input (its producer, or the other users of that tensor) go float with it.

    Put it after 'quantize' (and 'correct-bias', which it applies again to every model it makes)
    and before 'validate'. With no budget it only measures. Either way it fills
    ``context.quantization["layers"]``: the SQNR of every quantized tensor, worst first.
    """

    name = "fallback"
    needs_data = True
    needs_statistics = True

    def __init__(
        self,
        min_cosine: float | None = 0.99,
        min_sqnr_db: float | None = None,
        max_float_layers: int = 8,
        samples: int = 16,
    ):
        super().__init__()
        if max_float_layers < 0 or samples < 1:
            raise InputError(
                f"fallback needs max_float_layers >= 0 and samples >= 1, got {max_float_layers} and {samples}",
                fix="e.g. --set fallback.max_float_layers=8 --set fallback.samples=16",
            )
        self.min_cosine = min_cosine
        self.min_sqnr_db = min_sqnr_db
        self.max_float_layers = max_float_layers
        self.samples = samples

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        inputs = quantization_inputs(self.context, self.name)
        feeds = self.context.data.take(self.samples) if self.context.data is not None else []
        if not feeds:
            raise ProcessingError(
                "pass 'fallback' needs calibration samples to measure the layers, and got none",
                fix="give more samples with --calib, or leave 'fallback' out of the recipe",
            )
        progress = self.context.progress or QUIET
        attempts = ATTEMPTS_PER_LAYER * self.max_float_layers
        with progress.task("trying sensitive layers in float", attempts) as advance:
            search = _Search(self, inputs, feeds, model, advance)
            final, stopped = search.run()
        if final.report is not None:
            model.graph = final.model.graph
            self.context.quantization.update(quantization_record(final.report))
            if final.bias_report is not None:
                self.context.quantization["bias_correction"] = bias_correction_record(
                    final.bias_report, search.create_bias
                )
        layers = layers_from(model, search.noise_of(final))
        self.context.quantization["layers"] = [layer.as_dict() for layer in layers]
        self.changes = len(final.excluded)
        self.details = {
            "kept float": final.excluded,
            "cosine": round(final.fidelity.cosine, 6),
            "sqnr_db": round(final.fidelity.sqnr_db, 2),
            "budget met": self.meets(final.fidelity),
        }
        if not self.meets(final.fidelity):
            self.details["stopped"] = stopped
        logger.info("kept %d layers float: %s", len(final.excluded), stopped)
        return ir.passes.PassResult(model, modified=bool(self.changes))

    def meets(self, fidelity: _Fidelity) -> bool:
        """Whether the outputs meet every threshold the recipe set."""
        return (self.min_cosine is None or fidelity.cosine >= self.min_cosine) and (
            self.min_sqnr_db is None or fidelity.sqnr_db >= self.min_sqnr_db
        )


class _Search:
    """The greedy search: one layer at a time, each checked on the final outputs."""

    def __init__(
        self,
        fallback: FallbackPass,
        inputs: QuantizationInputs,
        feeds: Sequence[Feed],
        model: ir.Model,
        advance: Callable[[int], None],
    ):
        self.fallback = fallback
        self.advance = advance
        self.inputs = inputs
        self.feeds = list(feeds)
        self.model = model
        self.output_names = [value.name for value in inputs.float_model.graph.outputs]
        self.reference = runtime.run(runtime.create_session(inputs.float_model), self.feeds)
        bias = fallback.context.quantization.get("bias_correction")
        self.create_bias = bool(bias and bias["create_bias"])
        self.means = (
            channel_means(fallback.context, model, inputs.float_model) if bias is not None else None
        )

    def run(self) -> tuple[_State, str]:
        """The best state found, and why the search stopped."""
        limit = self.fallback.max_float_layers
        current = _State(
            self.model,
            [],
            self.fidelity(self.model),
            list(self.fallback.context.quantization.get("quantized_nodes", {})),
        )
        tried: set[str] = set()
        while True:
            if self.fallback.meets(current.fidelity):
                return current, "budget met"
            if len(current.excluded) >= limit:
                return current, f"reached max_float_layers ({limit}) before the budget"
            if len(tried) >= ATTEMPTS_PER_LAYER * limit:
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
            if len(excluded) > self.fallback.max_float_layers:
                return None
            model, report = self.quantize(excluded)
            still_quantizing = quantizers_of_inputs(model, candidate, report) - set(excluded)
            if not still_quantizing:
                break
            excluded += sorted(still_quantizing)
        else:
            return None
        bias_report = None
        if self.means is not None:
            bias_report = correct_biases(
                model, self.inputs.float_model, self.means, self.create_bias
            )
        return _State(
            model, excluded, self.fidelity(model), list(report.quantized), report, bias_report
        )

    def quantize(self, excluded: list[str]) -> tuple[ir.Model, QuantizationReport]:
        """The float model quantized as the quantize pass did, with the named nodes float."""
        model = self.inputs.float_model.clone()
        options = dataclasses.replace(
            self.inputs.options,
            exclude_nodes=[
                *self.inputs.options.exclude_nodes,
                *(re.escape(name) for name in excluded),
            ],
        )
        report = quantize_model(model, self.inputs.ranges, self.inputs.problems, options)
        return model, report

    def fidelity(self, model: ir.Model) -> _Fidelity:
        outputs = runtime.run(runtime.create_session(model), self.feeds)
        results = compare_outputs(self.output_names, self.reference, outputs)
        return _Fidelity(
            min(result.cosine for result in results), min(result.sqnr_db for result in results)
        )

    def noise_of(self, state: _State) -> dict[str, TensorNoise]:
        """Per-tensor noise of a state's model, measured once."""
        if state.noise is None:
            state.noise = compare_tensors(self.inputs.float_model, state.model, self.feeds)
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
