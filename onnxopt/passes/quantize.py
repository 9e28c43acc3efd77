"""The INT8 quantization pass: QDQ pairs that onnxruntime turns into integer kernels."""

from __future__ import annotations

import logging
from typing import Annotated, Any, Literal

import onnx_ir as ir

from onnxopt.calibration.moments import LayerBatches
from onnxopt.errors import InputError
from onnxopt.openvino_runtime import require_openvino
from onnxopt.options import REGULAR_EXPRESSIONS, Range, Rule
from onnxopt.passes.base import OnnxoptPass, PassResult
from onnxopt.quantization.fusion import fusion_report
from onnxopt.quantization.gptq import GptqRounding
from onnxopt.quantization.plan import (
    AlreadyQuantizedError,
    QuantizationOptions,
    tensor_overrides_problem,
)
from onnxopt.quantization.qdq import quantize_model
from onnxopt.quantization.state import QuantizationState
from onnxopt.quantization.targets import TARGETS, TargetName

logger = logging.getLogger(__name__)


def already_quantized(error: AlreadyQuantizedError) -> InputError:
    """The user's error for a model that holds quantized ops already."""
    return InputError(
        f"the model is already quantized: it contains {error}",
        fix="quantize the float model it came from, or run the cleanup recipe on this one",
    )


class QuantizePass(OnnxoptPass):
    """Quantize to uint8 activations and int8 per-channel weights in QDQ format.

    Uses the activation ranges the calibrate pass found. Ops onnxruntime cannot run as integer
    kernels, and tensors whose range is not finite or too wide (attention masks of float32
    minimum values), stay float; the report lists them with the reason. Keeps the float model
    and the settings in ``context.quantization`` for the repairs after it.

    Args:
        target: the runtime the model is for (``quantization.targets``): ``onnxruntime-cpu``,
            ``openvino`` or ``generic``. It sets the activation format and which patterns
            are used, and where check-speed, fallback and validate measure.
        dynamic_matmul: quantize a float-fed MatMul's input at run time; None takes the
            target's choice (on for onnxruntime-cpu only).
        rounding: ``gptq`` rounds the weights of Conv, Gemm and MatMul layers so that their
            outputs on calibration samples move least (``quantization.gptq``); ``nearest``
            rounds each weight on its own. Without data, weights round to nearest.
        gptq_samples: calibration samples GPTQ measures the layer inputs on.
    """

    name = "quantize"
    quantizes = True
    needs_calibration = True
    min_opset = 13

    def __init__(
        self,
        per_channel: bool = True,
        reduce_range: bool | None = None,
        max_abs_range: Annotated[float, Range(low=0.0, low_open=True)] = 1e4,
        exclude_nodes: Annotated[list[str] | None, REGULAR_EXPRESSIONS] = None,
        exclude_op_types: list[str] | None = None,
        tensor_overrides: Annotated[dict[str, Any] | None, Rule(tensor_overrides_problem)] = None,
        dynamic_matmul: bool | None = None,
        rounding: Literal["gptq", "nearest"] = "gptq",
        target: TargetName = "onnxruntime-cpu",
        gptq_samples: Annotated[int, Range(low=1)] = 16,
    ):
        super().__init__()
        if TARGETS[target].runtime == "openvino":
            require_openvino()
        self.options = QuantizationOptions.for_target(
            TARGETS[target],
            per_channel=per_channel,
            reduce_range=reduce_range,
            max_abs_range=max_abs_range,
            exclude_nodes=list(exclude_nodes or []),
            exclude_op_types=list(exclude_op_types or []),
            tensor_overrides=dict(tensor_overrides or {}),
            dynamic_matmul=dynamic_matmul,
        )
        self.rounding = rounding
        self.gptq_samples = gptq_samples

    def call(self, model: ir.Model) -> PassResult:
        calibration = self.context.calibration_for(self.name)
        ranges, problems = calibration.ranges, calibration.problems
        float_model = model.clone()
        rounding = self._gptq(float_model) if self.rounding == "gptq" else None
        try:
            report = quantize_model(model, ranges, problems, self.options, rounding)
        except AlreadyQuantizedError as error:
            raise already_quantized(error) from error
        finally:
            if rounding is not None:
                rounding.release()
        state = QuantizationState(
            float_model, ranges, problems, self.options, report, fusion_report(model), rounding
        )
        self.context.quantization = state
        details: dict[str, Any] = {
            "quantized": report.quantized_by_op(),
            "kept float": len(report.kept_float),
            "relu/clip absorbed": len(report.absorbed),
        }
        if report.dynamic:
            details["dynamic"] = len(report.dynamic)
        if rounding is not None:
            details["gptq rounded"] = len(rounding.rounded)
        if self.options.target.integer_kernels:
            fusion = state.fusion
            details["integer kernels"] = (
                f"{fusion.integer_kernels}/{fusion.integer_kernels + fusion.unfused}"
            )
        else:
            details["target"] = self.options.target.name
        logger.info(
            "quantized %d nodes; %d kept float", len(report.quantized), len(report.kept_float)
        )
        return PassResult(
            model, modified=bool(report.quantized), changes=len(report.quantized), details=details
        )

    def _gptq(self, float_model: ir.Model) -> GptqRounding | None:
        """GPTQ with H measured on the float model, a batch of layers at a time as the
        quantizer asks for them, or None without data."""
        if self.context.data is None:
            logger.info("no data: weights are rounded to nearest")
            return None
        feeds = self.context.data.take(self.gptq_samples)
        batches = LayerBatches(float_model, feeds, progress=self.context.progress)
        return GptqRounding({}, batches)
