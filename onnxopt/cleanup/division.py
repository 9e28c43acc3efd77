"""A division by a constant as a multiplication by its reciprocal.

onnxruntime has integer kernels for Mul and none for Div, so a division by a constant (the
``/ 6`` of an exported HardSwish) would stay a float island between integer kernels. The
result differs from the division by at most one rounding of the reciprocal; divisors with a
zero stay divisions. The quantizer rewrites them where their input arrives in int8.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from onnxopt.graph import (
    UniqueNames,
    add_initializer,
    constant_array,
    is_default_domain,
    take_over_output,
)


def is_division_by_constant(node: ir.Node) -> bool:
    """A Div by a finite, nonzero float32 constant."""
    if node.op_type != "Div" or not is_default_domain(node) or len(node.inputs) != 2:
        return False
    array = constant_array(node.inputs[1])
    return (
        array is not None
        and array.dtype == np.float32
        and not np.any(array == 0)
        and bool(np.all(np.isfinite(array)))
    )


def division_to_multiplication(node: ir.Node, names: UniqueNames) -> ir.Node:
    """Replace one Div by a constant with a Mul by its reciprocal; the Mul keeps the output name."""
    graph, divisor = node.graph, node.inputs[1]
    array = constant_array(divisor)
    reciprocal = add_initializer(
        graph, names(f"{divisor.name or node.name}_reciprocal"), (1.0 / array).astype(array.dtype)
    )
    multiply = ir.node("Mul", [node.inputs[0], reciprocal], name=node.name)
    graph.insert_before(node, multiply)
    take_over_output(node, multiply.outputs[0])
    return multiply
