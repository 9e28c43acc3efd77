"""HardSigmoid as ``Clip(x * alpha + beta, 0, 1)``, HardSwish as ``x * that``.

onnxruntime has no integer kernel for either, so each (28 in a PP-LCNet, one per
squeeze-excitation block in a MobileNetV3) is a float island between integer kernels, where
the big tensor it multiplies is dequantized and quantized again. Spelled out, Mul and Add run
as integer kernels and the Clip disappears into the Add's range; results change by float
rounding only. The quantizer spells them out where their input arrives in int8.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from onnxopt.graph import UniqueNames, add_initializer, is_default_domain, take_over_output

# HardSwish(x) = x * HardSigmoid(x) with these, by the ONNX definition.
HARDSWISH_ALPHA = 1.0 / 6.0
HARDSWISH_BETA = 0.5


def is_hard_activation(node: ir.Node) -> bool:
    """A HardSigmoid or HardSwish of a float input, which ``decompose`` can spell out."""
    return (
        node.op_type in ("HardSigmoid", "HardSwish")
        and is_default_domain(node)
        and node.inputs[0] is not None
        and node.inputs[0].dtype == ir.DataType.FLOAT
    )


def hard_sigmoid_parameters(node: ir.Node) -> tuple[float, float]:
    """(alpha, beta) of a HardSigmoid, or of the HardSigmoid inside a HardSwish."""
    if node.op_type == "HardSwish":
        return HARDSWISH_ALPHA, HARDSWISH_BETA
    return node.attributes.get_float("alpha", 0.2), node.attributes.get_float("beta", 0.5)


def decompose(node: ir.Node, names: UniqueNames) -> tuple[ir.Value, ir.Value, ir.Value, ir.Value]:
    """Replace one HardSigmoid or HardSwish; the new (scaled, shifted, clipped, result) values.

    The result, which takes over the node's output and its name, is the Clip's output
    (HardSigmoid) or the final Mul's (HardSwish).
    """
    graph = node.graph
    x = node.inputs[0]
    base = node.name or node.outputs[0].name
    alpha, beta = hard_sigmoid_parameters(node)

    def constant(suffix: str, value: float) -> ir.Value:
        return add_initializer(graph, names(f"{base}_{suffix}"), np.array(value, np.float32))

    scaled = ir.node("Mul", [x, constant("alpha", alpha)], name=names(f"{base}_scale"))
    shifted = ir.node(
        "Add", [scaled.outputs[0], constant("beta", beta)], name=names(f"{base}_shift")
    )
    clipped = ir.node(
        "Clip",
        [shifted.outputs[0], constant("zero", 0.0), constant("one", 1.0)],
        name=names(f"{base}_clip"),
    )
    chain = [scaled, shifted, clipped]
    if node.op_type == "HardSwish":
        chain.append(ir.node("Mul", [x, clipped.outputs[0]], name=names(f"{base}_gate")))
    for step in chain[:-1]:
        step.outputs[0].name = names(f"{step.name}_output")
        step.outputs[0].dtype, step.outputs[0].shape = x.dtype, x.shape
    graph.insert_before(node, chain)
    result = chain[-1].outputs[0]
    take_over_output(node, result)
    return scaled.outputs[0], shifted.outputs[0], clipped.outputs[0], result
