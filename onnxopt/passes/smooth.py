"""SmoothQuant before calibration, for dense layers whose inputs get calibrated int8 ranges."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Any, Literal

import onnx_ir as ir

from onnxopt.options import Range, Rule
from onnxopt.passes.base import OnnxoptPass, PassResult
from onnxopt.passes.quantize import QuantizePass
from onnxopt.quantization.plan import QuantizationOptions
from onnxopt.quantization.smoothing import smooth_dense_inputs


def _alpha_problem(value: Any) -> str | None:
    if value == "auto" or (
        isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value <= 1
    ):
        return None
    return "must be 'auto' (chosen per input) or a number in [0, 1]"


class SmoothPass(OnnxoptPass):
    """Move the activation outliers of MatMul and Gemm inputs into their weights
    (``quantization.smoothing``), where the quantize pass after it gives those inputs
    calibrated ranges: its targets ``openvino`` and ``generic``, or ``dynamic_matmul = false``.
    Where MatMuls quantize their inputs at run time (onnxruntime-cpu's default), each run's own
    range already fits, and the pass does nothing. Put it before calibration.

    Args:
        alpha: the migration strength of SmoothQuant (0.5 by its authors; larger moves more
            of the outliers into the weights), or ``auto`` (the default): for each input, the
            alpha whose simulated int8 layer is closest to the float one on sampled inputs.
        samples: calibration samples the channels' largest magnitudes are measured on.
    """

    name = "smooth"
    quantizes = True

    def __init__(
        self,
        alpha: Annotated[float | Literal["auto"], Rule(_alpha_problem)] = "auto",
        samples: Annotated[int, Range(low=1)] = 64,
    ):
        super().__init__()
        self.alpha = alpha
        self.samples = samples
        self.quantize_options: QuantizationOptions | None = None

    def configure(self, passes: Sequence[OnnxoptPass]) -> None:
        """Smooth only for a later quantize pass that quantizes MatMul inputs statically."""
        quantize = self.next_pass(passes, QuantizePass)
        self.quantize_options = quantize.options if quantize is not None else None

    def call(self, model: ir.Model) -> PassResult:
        options = self.quantize_options
        if options is None or options.dynamic_matmul:
            return PassResult(
                model, modified=False, details={"skipped": "MatMul inputs quantize at run time"}
            )
        if self.context.data is None:
            return PassResult(model, modified=False, details={"skipped": "no data"})
        feeds = self.context.data.take(self.samples)
        report = smooth_dense_inputs(
            model,
            feeds,
            None if self.alpha == "auto" else self.alpha,
            options.target.activations.symmetric,
            self.context.progress,
        )
        layers = sum(len(layers) for layers in report.inputs.values())
        details = {"inputs": len(report.inputs), "layers": layers}
        if report.skipped:
            details["skipped"] = len(report.skipped)
        return PassResult(model, modified=bool(layers), changes=layers, details=details)
