"""SmoothQuant before calibration, for dense layers whose inputs get calibrated int8 ranges."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Any, Literal

import onnx_ir as ir

from onnxopt.options import Range, Rule
from onnxopt.passes.base import OnnxoptPass, PassResult
from onnxopt.passes.quantize import QuantizePass
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
        self.static_inputs = False
        self.symmetric_activations = False

    def configure(self, passes: Sequence[OnnxoptPass]) -> None:
        """Smooth only for a later quantize pass that quantizes MatMul inputs statically."""
        if self not in passes:
            return
        later = passes[passes.index(self) + 1 :]
        quantize = next((pass_ for pass_ in later if isinstance(pass_, QuantizePass)), None)
        self.static_inputs = quantize is not None and not quantize.options.dynamic_matmul
        if quantize is not None:
            self.symmetric_activations = quantize.options.target.activations.symmetric

    def call(self, model: ir.Model) -> PassResult:
        if not self.static_inputs:
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
            self.symmetric_activations,
            self.context.progress,
        )
        layers = sum(len(layers) for layers in report.inputs.values())
        details = {"inputs": len(report.inputs), "layers": layers}
        if report.skipped:
            details["skipped"] = len(report.skipped)
        return PassResult(model, modified=bool(layers), changes=layers, details=details)
