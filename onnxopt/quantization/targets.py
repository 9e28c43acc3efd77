"""Runtime targets: what a QDQ model must look like for the runtime that will run it.

Each runtime fuses different Q/DQ patterns into integer kernels, so a target is a table of
choices, read by the planner and the emitter, not branches through the quantizer:

- ``onnxruntime-cpu``: uint8 activations with a zero point, MatMuls whose input arrives in
  float quantized at run time (DynamicQuantizeLinear + MatMulInteger), the small constants of
  Add and Mul quantized, embedding tables gathered as int8 rows; measured in onnxruntime.
- ``openvino``: static Q/DQ on MatMuls as on convolutions (OpenVINO ran MiniLM's run-time
  quantized MatMuls at 0.66x float), Add and Mul float (OpenVINO runs them fused into the
  integer op before them, and 2026.4's low-precision transformations fail on a dequantized
  constant beside a dequantized activation), MatMuls of two activations float (MiniLM 1.18x
  faster so, and as accurate); measured in OpenVINO, which must be installed.
- ``generic``: symmetric int8 activations and int8 per-channel weights with explicit Q/DQ on
  every quantized op, the form TensorRT and other QDQ consumers read; no onnxruntime-only
  patterns (run-time quantization, int8 gather tables); measured in onnxruntime.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Literal

from onnxopt.quantization.numerics import INT8_SYMMETRIC, UINT8_ASYMMETRIC, ActivationFormat
from onnxopt.quantization.rules import RULES, Kind, OpRule, Output

TargetName = Literal["onnxruntime-cpu", "openvino", "generic"]
Runtime = Literal["onnxruntime", "openvino"]
RUNTIMES: tuple[Runtime, ...] = ("onnxruntime", "openvino")


@dataclasses.dataclass(frozen=True)
class Target:
    """The choices that make a QDQ model fast in one runtime.

    Attributes:
        name: the name users give (``--target``, ``quantize.target``).
        runtime: where speed and fidelity are measured: ``onnxruntime`` or ``openvino``.
        activations: how activations are stored.
        dynamic_matmul: MatMuls whose input arrives in float quantize it at run time (the
            quantize pass's ``dynamic_matmul`` option overrides this).
        constant_operands: the small float constants of Add and Mul are quantized too.
        gather_tables: embedding tables are gathered as int8 rows and scaled back.
        integer_kernels: the report counts the quantized ops onnxruntime fused into integer
            kernels (meaningful only where onnxruntime runs the model).
        summary: one line for docs and ``--help``.
        rules: how each op type is quantized (``rules.RULES``, with the target's changes).
        outputs_into_adds: a Gemm or MatMul whose output feeds an Add emits int8, for
            onnxruntime's integer Add (QLinearAdd) to take it.
        activation_matmuls: a MatMul of two activations (attention's scores and context) is
            quantized when both its inputs are.
        integer_pads: a quantized Pad pads the int8 tensor itself, with the zero point as its
            fill: onnxruntime keeps the DequantizeLinear and QuantizeLinear around a Pad and
            pads in float between them.
        stem_channels: a quantized convolution of fewer input channels than this (an image's
            1 to 3), with a kernel of at most 5x5 (unless ``stem_space_to_depth`` takes it),
            reads them and its weights padded with zero
            channels to this many; None: never. onnxruntime's integer kernels run 3x3 stems
            of 3 channels 1.2-1.4x faster with 4.
        stem_space_to_depth: a quantized convolution of 1 to 3 input channels with a 5x5 or
            7x7 kernel and stride 2 reads its int8 input rearranged into 2x2 blocks
            (SpaceToDepth), as a convolution of a 3x3 or 4x4 kernel on 4 times the channels:
            onnxruntime's integer kernels run such a stem 1.3-1.4x faster so.
    """

    name: TargetName
    runtime: Runtime
    activations: ActivationFormat
    dynamic_matmul: bool
    constant_operands: bool
    gather_tables: bool
    integer_kernels: bool
    summary: str
    rules: Mapping[str, OpRule] = dataclasses.field(default_factory=lambda: RULES)
    outputs_into_adds: bool = True
    activation_matmuls: bool = True
    integer_pads: bool = False
    stem_channels: int | None = None
    stem_space_to_depth: bool = False


# With symmetric activations a quantized Relu or Clip cannot be absorbed into its producer
# (the producer's range holds negative values); it commutes with the quantization instead, so
# its output keeps its input's scale.
SYMMETRIC_ACTIVATION_RULES = {
    "Relu": OpRule(Kind.SHARED, output=Output.SHARED),
    "Clip": OpRule(Kind.SHARED, output=Output.SHARED),
}

# OpenVINO runs an Add or Mul after an integer Conv or MatMul as part of it, in float: quantizing
# it only adds error (MiniLM with every MatMul int8: sentence-embedding cosine 0.917 with its
# Adds and Muls quantized, 0.992 without).
FLOAT_ELEMENTWISE_RULES = {
    op_type: OpRule(
        Kind.FLOAT, reason=f"OpenVINO fuses a float {op_type} into the integer op before it"
    )
    for op_type in ("Add", "Mul")
}

TARGETS: dict[str, Target] = {
    target.name: target
    for target in (
        Target(
            "onnxruntime-cpu",
            "onnxruntime",
            UINT8_ASYMMETRIC,
            dynamic_matmul=True,
            constant_operands=True,
            gather_tables=True,
            integer_kernels=True,
            summary="onnxruntime's CPU provider (the default)",
            integer_pads=True,
            stem_channels=4,
            stem_space_to_depth=True,
        ),
        Target(
            "openvino",
            "openvino",
            UINT8_ASYMMETRIC,
            dynamic_matmul=False,
            constant_operands=False,
            gather_tables=False,
            integer_kernels=False,
            summary="OpenVINO on Intel CPUs (measured in OpenVINO: pip install 'onnxopt[openvino]')",
            rules=RULES | FLOAT_ELEMENTWISE_RULES,
            outputs_into_adds=False,
            activation_matmuls=False,
        ),
        Target(
            "generic",
            "onnxruntime",
            INT8_SYMMETRIC,
            dynamic_matmul=False,
            constant_operands=False,
            gather_tables=False,
            integer_kernels=False,
            summary="TensorRT and other QDQ consumers: symmetric int8 activations, explicit Q/DQ",
            rules=RULES | SYMMETRIC_ACTIVATION_RULES,
            outputs_into_adds=False,
        ),
    )
}

DEFAULT_TARGET = TARGETS["onnxruntime-cpu"]
