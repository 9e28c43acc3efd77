"""Rewrite the float islands int8 can run through, just before planning.

onnxruntime has no integer kernel for HardSigmoid, HardSwish or Div, so in an int8 model each
is a float island that dequantizes and quantizes again the (often large) tensor it reads. Where
its input arrives in int8, HardSigmoid becomes ``Clip(x * alpha + beta, 0, 1)``, HardSwish
``x * that``, and a division by a constant a multiplication, all of which run as integer
kernels. Elsewhere they stay as they are: spelled out in float they would only run slower.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping

import onnx_ir as ir

from onnxopt.cleanup.activations import decompose, hard_sigmoid_parameters, is_hard_activation
from onnxopt.cleanup.division import division_to_multiplication, is_division_by_constant
from onnxopt.graph import UniqueNames, constant_array
from onnxopt.quantization.plan import (
    Output,
    QuantizationOptions,
    QuantizationPlan,
    exclusion,
    find_quantized_ops,
    plan_quantization,
)
from onnxopt.shapes import infer_shapes

logger = logging.getLogger(__name__)


def prepare_for_int8(
    model: ir.Model,
    ranges: Mapping[str, tuple[float, float]],
    problems: Mapping[str, str],
    options: QuantizationOptions,
) -> dict[str, tuple[float, float]]:
    """Rewrite the islands whose input arrives in int8, in place; the ranges, with those of the
    tensors the rewrites add (derived from their input's range: they are affine in it)."""
    ranges = dict(ranges)
    plan = plan_quantization(model, ranges, problems, options)
    integer = _int8_values(plan)
    names = UniqueNames(model)
    rewritten = 0
    for node in list(model.graph):
        source = node.inputs[0] if node.inputs else None
        if source not in integer or exclusion(node, options):
            continue
        if is_division_by_constant(node):
            integer.add(division_to_multiplication(node, names).outputs[0])
            rewritten += 1
        elif is_hard_activation(node) and source.name in ranges:
            low, high = ranges[source.name]
            alpha, beta = hard_sigmoid_parameters(node)
            scaled, shifted, clipped, result = decompose(node, names)
            scaled_range = sorted((low * alpha, high * alpha))
            ranges[scaled.name] = (scaled_range[0], scaled_range[1])
            ranges[shifted.name] = (scaled_range[0] + beta, scaled_range[1] + beta)
            if clipped is not result:
                ranges[clipped.name] = (
                    max(0.0, scaled_range[0] + beta),
                    min(1.0, scaled_range[1] + beta),
                )
            integer.add(result)
            rewritten += 1
    logger.info("spelled out %d float islands for int8", rewritten)
    return ranges


def _int8_values(plan: QuantizationPlan) -> set[ir.Value]:
    """Values the plan has arrive in int8: quantized outputs, and what an absorbed Relu passes."""
    values = {
        value
        for planned in plan.planned.values()
        if planned.quantize_output
        for value in planned.node.outputs
    }
    values.update(
        absorption.node.outputs[0] for absorption in plan.absorbed if absorption.source in values
    )
    return values


def tensors_to_calibrate(
    model: ir.Model, options: QuantizationOptions | None = None
) -> list[str] | None:
    """The activations whose ranges quantizing ``model`` can use: what calibration must collect.

    Plans a copy of the model as if every float tensor had a range, with MatMuls quantized
    statically (so their inputs count whether or not they end up quantized at run time): the
    tensors that plan reads are a superset of what any calibration outcome lets the quantizer
    read. Tensors around ops that stay float (ConvTranspose, HardSwish, ...) are left out; tensors
    that ``prepare_for_int8`` adds get ranges from their inputs', so only the model's own count.
    Values without a type get one from shape inference on the copy, as calibration's own does.
    None, for every tensor, when the model is quantized already (the quantizer refuses it).
    """
    if find_quantized_ops(model):
        return None
    copy = model.clone()
    values = ir.convenience.create_value_mapping(copy.graph).values()
    if any(value.dtype is None for value in values):
        infer_shapes(copy, data_prop=False)
    ranges = {
        value.name: (0.0, 1.0)
        for value in values
        if value.dtype == ir.DataType.FLOAT and value.const_value is None
    }
    options = dataclasses.replace(options or QuantizationOptions(), dynamic_matmul=False)
    ranges = prepare_for_int8(copy, ranges, {}, options)
    plan = plan_quantization(copy, ranges, {}, options)
    names: dict[str, None] = {}
    for planned in plan.planned.values():
        names.update((value.name, None) for value in planned.activation_inputs)
        if planned.quantize_output or planned.rule.output is not Output.REQUIRED:
            names.update((value.name, None) for value in planned.node.outputs)
    for absorption in plan.absorbed:
        names.update((value.name, None) for value in absorption.node.outputs)
    activations = {
        name
        for name, value in ir.convenience.create_value_mapping(model.graph).items()
        if constant_array(value) is None
    }
    return [name for name in names if name in activations]
