"""What quantization did to the model of a run: typed state for the repairs after it and the report."""

from __future__ import annotations

import dataclasses

import onnx_ir as ir

from onnxopt.quantization.bias_correction import BiasCorrectionReport
from onnxopt.quantization.fallback import FallbackOutcome
from onnxopt.quantization.fusion import FusionReport, fusion_report
from onnxopt.quantization.gptq import GptqRounding
from onnxopt.quantization.plan import QuantizationOptions
from onnxopt.quantization.qdq import QuantizationReport
from onnxopt.quantization.sensitivity import LayerSqnr


@dataclasses.dataclass
class BiasCorrection:
    """Bias correction as it was applied: the setting to apply it again, and what it changed."""

    create_bias: bool
    report: BiasCorrectionReport


@dataclasses.dataclass
class QuantizationState:
    """The float model a run quantized, what it was quantized with, and what the result is.

    Repairs after the quantizer need the model as it was just before quantization, which neither
    the quantized model nor the original (before cleanup and equalization) can give them:
    correct-bias reads its float weights, fallback quantizes it again with some layers float.

    Attributes:
        float_model: a copy of the model just before quantization (it shares the tensors).
        ranges: the calibrated (low, high) of each tensor.
        problems: tensors that had to stay float, with the reason.
        options: the options the model was quantized with.
        report: what the quantizer did to the current model.
        fusion: the integer kernels onnxruntime makes of the current model.
        rounding: how weights were rounded, when not to nearest; quantizing again reuses it.
        bias_correction: set once biases were corrected; fallback corrects each model it makes.
        layers: the SQNR of every quantized tensor, worst first, once fallback measured them.
        fallback: how the fallback search went, once it ran.
    """

    float_model: ir.Model
    ranges: dict[str, tuple[float, float]]
    problems: dict[str, str]
    options: QuantizationOptions
    report: QuantizationReport
    fusion: FusionReport
    rounding: GptqRounding | None = None
    bias_correction: BiasCorrection | None = None
    layers: list[LayerSqnr] = dataclasses.field(default_factory=list)
    fallback: FallbackOutcome | None = None

    def record(self, model: ir.Model, report: QuantizationReport) -> None:
        """Make ``model``, quantized as ``report`` says, the current one: its report and fusion."""
        self.report = report
        self.fusion = fusion_report(model)
