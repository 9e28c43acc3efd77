"""The INT8 quantization pass: QDQ pairs that onnxruntime turns into integer kernels."""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import onnx_ir as ir

from onnxopt.context import Context
from onnxopt.errors import InputError, ProcessingError
from onnxopt.passes.base import OnnxoptPass
from onnxopt.quantization.fusion import fusion_report
from onnxopt.quantization.qdq import (
    AlreadyQuantizedError,
    QuantizationOptions,
    QuantizationReport,
    quantize_model,
)

logger = logging.getLogger(__name__)

TENSOR_OVERRIDE_KEYS = {"low", "high", "type"}


@dataclasses.dataclass
class QuantizationInputs:
    """What the quantize pass started from, kept for the repairs after it.

    correct-bias reads the float weights, and fallback quantizes the float model again with some
    layers kept float; both need the model as it was just before quantization, which neither the
    quantized model nor the original (before cleanup and equalization) can give them.

    Attributes:
        float_model: a copy of the model just before quantization (it shares the tensors).
        ranges: the calibrated (low, high) of each tensor.
        problems: tensors that had to stay float, with the reason.
        options: the options the model was quantized with.
    """

    float_model: ir.Model
    ranges: dict[str, tuple[float, float]]
    problems: dict[str, str]
    options: QuantizationOptions


def quantization_inputs(context: Context, pass_name: str) -> QuantizationInputs:
    """What this run's quantize pass started from; a ProcessingError naming ``pass_name`` if none."""
    inputs = getattr(context, "quantization_inputs", None)
    if inputs is None:
        raise ProcessingError(
            f"pass '{pass_name}' repairs what the quantize pass did, but no quantize pass ran before it",
            fix=f"put 'quantize' before '{pass_name}' in the recipe",
        )
    return inputs


def quantization_record(report: QuantizationReport) -> dict[str, Any]:
    """The quantizer's report as the entries of ``context.quantization``."""
    return {
        "quantized_nodes": report.quantized,
        "kept_float": report.kept_float,
        "absorbed": report.absorbed,
        "tensors": report.tensors,
        "widened_weight_scales": report.widened_weight_scales,
        "dynamic": report.dynamic,
    }


class QuantizePass(OnnxoptPass):
    """Quantize to uint8 activations and int8 per-channel weights in QDQ format.

    Uses the activation ranges the calibrate pass found. Ops onnxruntime cannot run as integer
    kernels, and tensors whose range is not finite or too wide (attention masks of float32
    minimum values), stay float; the report lists them with the reason.
    """

    name = "quantize"
    needs_statistics = True
    min_opset = 13

    def __init__(
        self,
        per_channel: bool = True,
        reduce_range: bool | None = None,
        max_abs_range: float = 1e4,
        exclude_nodes: list[str] | None = None,
        exclude_op_types: list[str] | None = None,
        tensor_overrides: dict[str, Any] | None = None,
        dynamic_matmul: bool = True,
    ):
        super().__init__()
        overrides = dict(tensor_overrides or {})
        _check_overrides(overrides)
        self.options = QuantizationOptions(
            per_channel=per_channel,
            reduce_range=reduce_range,
            max_abs_range=max_abs_range,
            exclude_nodes=list(exclude_nodes or []),
            exclude_op_types=list(exclude_op_types or []),
            tensor_overrides=overrides,
            dynamic_matmul=dynamic_matmul,
        )

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        ranges, problems = {}, {}
        for name, calibrated in self.context.statistics.items():
            if calibrated.reason:
                problems[name] = calibrated.reason
            else:
                ranges[name] = (calibrated.low, calibrated.high)
        float_model = model.clone()
        try:
            report = quantize_model(model, ranges, problems, self.options)
        except AlreadyQuantizedError as error:
            raise InputError(
                f"the model is already quantized: it contains {error}",
                fix="quantize the float model it came from, or run the cleanup recipe on this one",
            ) from error
        self.changes = len(report.quantized)
        self.details = {
            "quantized": report.quantized_by_op(),
            "kept float": len(report.kept_float),
            "relu/clip absorbed": len(report.absorbed),
        }
        if report.dynamic:
            self.details["dynamic"] = len(report.dynamic)
        fusion = fusion_report(model)
        self.details["integer kernels"] = (
            f"{fusion.integer_kernels}/{fusion.integer_kernels + fusion.unfused}"
        )
        self.context.quantization.update(quantization_record(report))
        self.context.quantization["fusion"] = dataclasses.asdict(fusion) | {"rate": fusion.rate}
        self.context.quantization_inputs = QuantizationInputs(
            float_model, ranges, problems, self.options
        )
        logger.info("quantized %d nodes; %d kept float", self.changes, len(report.kept_float))
        return ir.passes.PassResult(model, modified=bool(self.changes))


def _check_overrides(overrides: dict[str, Any]) -> None:
    for tensor, override in overrides.items():
        if not isinstance(override, dict) or not set(override) <= TENSOR_OVERRIDE_KEYS:
            raise InputError(
                f"tensor override for '{tensor}' must be a table with keys among {sorted(TENSOR_OVERRIDE_KEYS)}",
                fix='e.g. tensor_overrides = { "conv1_out" = { low = 0.0, high = 6.0 } }',
            )
        if override.get("type", "uint8") not in ("uint8", "float"):
            raise InputError(
                f"tensor override for '{tensor}' has type {override['type']!r}",
                details=["types: uint8 (the CPU default), float (keep the tensor float)"],
            )
