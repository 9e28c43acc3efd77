"""How each op type is quantized, as a table: which inputs carry activations or weights, and what
happens to the output. Kept in line with the QDQ patterns onnxruntime's CPU provider fuses into
integer kernels, since a quantized op that stays float costs time instead of saving it."""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Mapping

import onnx_ir as ir


class Kind(enum.Enum):
    WEIGHTED = "weighted"  # constant weights: Conv, Gemm, MatMul with a constant right side
    BINARY = "binary"  # every activation input and the output quantized: Add, Mul, Concat, MatMul
    UNARY = "unary"  # input and output quantized with their own ranges: pools, Sigmoid, Softmax
    SHARED = "shared"  # moves data without changing values: the output reuses the input's scale
    ABSORBED = "absorbed"  # Relu and Clip: the producer's quantized range saturates the same way
    FLOAT = "float"  # stays float by policy: onnxruntime has no integer kernel for it


class Output(enum.Enum):
    REQUIRED = "required"  # the integer kernel emits quantized values only
    OPTIONAL = "optional"  # the kernel can emit float; quantized only when a consumer wants it
    SHARED = "shared"


@dataclasses.dataclass(frozen=True)
class OpRule:
    """The quantization of one op type.

    Attributes:
        kind: what sort of quantization applies.
        activation_inputs: indices of inputs quantized as uint8 activations; None means all.
        output: what happens to the output.
        fixed_output_range: a range the output always has (Softmax), used instead of calibration.
        reason: why an op of ``Kind.FLOAT`` stays float, for the report.
    """

    kind: Kind
    activation_inputs: tuple[int, ...] | None = (0,)
    output: Output = Output.REQUIRED
    fixed_output_range: tuple[float, float] | None = None
    reason: str = ""


NO_INTEGER_KERNEL = (
    "onnxruntime has no integer kernel for it on CPU, so int8 would only add conversions"
)

RULES: dict[str, OpRule] = {
    "Conv": OpRule(Kind.WEIGHTED),
    "Gemm": OpRule(Kind.WEIGHTED, output=Output.OPTIONAL),
    "MatMul": OpRule(Kind.WEIGHTED, output=Output.OPTIONAL),
    "Add": OpRule(Kind.BINARY, (0, 1)),
    "Mul": OpRule(Kind.BINARY, (0, 1)),
    "Concat": OpRule(Kind.BINARY, None),
    "AveragePool": OpRule(Kind.UNARY),
    "GlobalAveragePool": OpRule(Kind.UNARY),
    "Sigmoid": OpRule(Kind.UNARY),
    "LeakyRelu": OpRule(Kind.UNARY),
    "Softmax": OpRule(Kind.UNARY, fixed_output_range=(0.0, 1.0)),
    "MaxPool": OpRule(Kind.SHARED, output=Output.SHARED),
    "Resize": OpRule(Kind.SHARED, output=Output.SHARED),
    "Reshape": OpRule(Kind.SHARED, output=Output.SHARED),
    "Transpose": OpRule(Kind.SHARED, output=Output.SHARED),
    "Flatten": OpRule(Kind.SHARED, output=Output.SHARED),
    "Squeeze": OpRule(Kind.SHARED, output=Output.SHARED),
    "Unsqueeze": OpRule(Kind.SHARED, output=Output.SHARED),
    "Slice": OpRule(Kind.SHARED, output=Output.SHARED),
    "Split": OpRule(Kind.SHARED, output=Output.SHARED),
    "Gather": OpRule(Kind.SHARED, output=Output.SHARED),
    "Expand": OpRule(Kind.SHARED, output=Output.SHARED),
    "Tile": OpRule(Kind.SHARED, output=Output.SHARED),
    "Pad": OpRule(Kind.SHARED, output=Output.SHARED),
    "Relu": OpRule(Kind.ABSORBED),
    "Clip": OpRule(Kind.ABSORBED),
    "ConvTranspose": OpRule(Kind.FLOAT, reason=NO_INTEGER_KERNEL),
    "HardSigmoid": OpRule(Kind.FLOAT, reason=NO_INTEGER_KERNEL),
    "HardSwish": OpRule(Kind.FLOAT, reason=NO_INTEGER_KERNEL),
}

# Ops that betray a model quantized already; quantizing it again would stack errors.
QUANTIZED_OPS = frozenset(
    {
        "QuantizeLinear",
        "DequantizeLinear",
        "DynamicQuantizeLinear",
        "QLinearConv",
        "QLinearMatMul",
        "QLinearAdd",
        "QLinearMul",
        "QGemm",
        "MatMulInteger",
        "ConvInteger",
        "MatMulIntegerToFloat",
        "DynamicQuantizeMatMul",
    }
)


def rule_for(node: ir.Node, rules: Mapping[str, OpRule] = RULES) -> OpRule | None:
    if node.domain not in ("", "ai.onnx"):
        return None
    return rules.get(node.op_type)


def weight_axis(node: ir.Node, weight: ir.Value) -> int | None:
    """The output-channel axis of a constant weight, or None to quantize it per tensor."""
    rank = len(weight.const_value.shape)
    if node.op_type == "Conv":
        return 0
    if node.op_type == "Gemm":
        transposed = node.attributes.get_int("transB", 0)
        return 0 if transposed else 1
    if node.op_type == "MatMul" and rank == 2:
        return 1
    return None
