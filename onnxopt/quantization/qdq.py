"""Carry out a quantization plan: QuantizeLinear/DequantizeLinear pairs where onnxruntime fuses
them into integer kernels, int8 weights, int32 biases.

``plan.plan_quantization`` decides; ``emit_plan`` rewrites the graph; ``quantize_model`` does both.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Iterable, Mapping
from typing import Protocol

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass, TopologicalSortPass

from onnxopt.graph import constant_array, take_over_output
from onnxopt.mapped import float32_weight
from onnxopt.quantization import numerics, stems
from onnxopt.quantization.nodes import QdqBuilder
from onnxopt.quantization.plan import (
    PlannedNode,
    QuantizationOptions,
    QuantizationPlan,
    plan_quantization,
)
from onnxopt.quantization.prepare import prepare_for_int8
from onnxopt.quantization.rules import Kind, weight_axis

logger = logging.getLogger(__name__)

# A Softmax's uint8 output: scale 1/256 as onnxruntime's QLinearSoftmax expects.
SOFTMAX_OUTPUT = (np.float32(1.0 / 256.0), np.uint8(0))


class WeightRounding(Protocol):
    """Chooses a weight's integers on a given grid, instead of rounding each to nearest."""

    def integers(
        self, node: ir.Node, weight: np.ndarray, scales: np.ndarray, axis: int | None, limit: int
    ) -> np.ndarray | None:
        """int8 values of ``node``'s ``weight`` for ``scales`` along ``axis`` (one scale when
        None) in [-limit, limit], or None to round to nearest."""
        ...


@dataclasses.dataclass
class QuantizationReport:
    """What was quantized, and what stayed float and why.

    Attributes:
        quantized: node name to op type, for every quantized node.
        kept_float: nodes a rule covers that stayed float: node, op_type and reason.
        absorbed: Relu and Clip nodes that disappeared into their producer's range.
        tensors: scale and zero point of every quantized activation.
        widened_weight_scales: nodes whose weight scales widened so the int32 bias fits.
        dynamic: MatMuls whose input is quantized at run time.
        tables: Gathers whose table is stored as int8 rows (weight only).
    """

    quantized: dict[str, str] = dataclasses.field(default_factory=dict)
    kept_float: list[dict[str, str]] = dataclasses.field(default_factory=list)
    absorbed: list[str] = dataclasses.field(default_factory=list)
    tensors: dict[str, dict[str, float | int]] = dataclasses.field(default_factory=dict)
    widened_weight_scales: list[str] = dataclasses.field(default_factory=list)
    dynamic: list[str] = dataclasses.field(default_factory=list)
    tables: list[str] = dataclasses.field(default_factory=list)

    def quantized_by_op(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for op_type in self.quantized.values():
            counts[op_type] = counts.get(op_type, 0) + 1
        return dict(sorted(counts.items()))


def quantize_model(
    model: ir.Model,
    ranges: Mapping[str, tuple[float, float]],
    problems: Mapping[str, str],
    options: QuantizationOptions,
    rounding: WeightRounding | None = None,
) -> QuantizationReport:
    """Quantize the model in place: ``prepare.prepare_for_int8`` spells out the float islands
    int8 can run through, ``plan.plan_quantization`` (whose arguments these are) decides, and
    ``emit_plan`` rewrites, with weights rounded by ``rounding`` (else to nearest).

    Raises:
        AlreadyQuantizedError: the model holds quantization ops already.
    """
    ranges = prepare_for_int8(model, ranges, problems, options)
    return emit_plan(plan_quantization(model, ranges, problems, options), rounding)


def quantized_copy(
    model: ir.Model,
    ranges: Mapping[str, tuple[float, float]],
    problems: Mapping[str, str],
    options: QuantizationOptions,
    float_layers: Iterable[str] = (),
    rounding: WeightRounding | None = None,
) -> tuple[ir.Model, QuantizationReport]:
    """A copy of ``model`` quantized with ``float_layers`` (node names) kept float as well as
    what ``options`` excludes; ``model`` is not changed."""
    copy = model.clone()
    options = dataclasses.replace(
        options,
        exclude_nodes=[*options.exclude_nodes, *(re.escape(name) for name in float_layers)],
    )
    return copy, quantize_model(copy, ranges, problems, options, rounding)


def emit_plan(plan: QuantizationPlan, rounding: WeightRounding | None = None) -> QuantizationReport:
    """Rewrite the plan's model as the plan says; the report of what was done."""
    return _Emitter(plan, rounding).emit()


def _float_weight_layout(node: ir.Node, index: int) -> tuple[int, int] | None:
    """The channel axis and size of input ``index`` of ``node``, when ``node`` is a Conv,
    ConvTranspose or Gemm with constant float weights and that input is its activation;
    else None."""
    if index != 0 or node.op_type not in ("Conv", "ConvTranspose", "Gemm") or node.domain:
        return None
    weight = node.inputs[1] if len(node.inputs) > 1 else None
    if weight is None or weight.const_value is None or weight.dtype != ir.DataType.FLOAT:
        return None
    shape = weight.const_value.shape
    if node.op_type == "Conv":
        return 1, shape[1] * node.attributes.get_int("group", 1)
    if node.op_type == "ConvTranspose":
        return 1, shape[0]
    transposed_input = node.attributes.get_int("transA", 0)
    depth = shape[1] if node.attributes.get_int("transB", 0) else shape[0]
    return (0 if transposed_input else 1), depth


class _Emitter:
    def __init__(self, plan: QuantizationPlan, rounding: WeightRounding | None):
        self.plan = plan
        self.rounding = rounding
        self.graph = plan.model.graph
        self.builder = QdqBuilder(self.graph)
        self.stems = stems.StemLayouts(self.graph, self.builder)
        self.report = QuantizationReport(kept_float=list(plan.kept_float))
        # Weights several layers read (an unrolled RNN's steps, a siamese network's branches):
        # their integers are stored once, by weight, axis and scales.
        self.shared = {
            id(value) for value in self.graph.initializers.values() if len(value.uses()) > 1
        }
        self.stored: dict[tuple[int, int | None, bytes], ir.Value] = {}

    def emit(self) -> QuantizationReport:
        for absorption in self.plan.absorbed:
            node = absorption.node
            node.outputs[0].replace_all_uses_with(absorption.source)
            self.graph.remove(node, safe=True)
            self.report.absorbed.append(node.name or node.op_type)
        parameters = self._tensor_parameters()
        for value, (scale, zero_point) in parameters.items():
            self._insert_pair(value, scale, zero_point)
            self.report.tensors[value.name] = {"scale": float(scale), "zero_point": int(zero_point)}
        for planned in self.plan.planned.values():
            name = planned.node.name or planned.node.op_type
            self.report.quantized[name] = planned.node.op_type
            if planned.table:
                self._quantize_table(planned)
                self.report.tables.append(name)
            elif planned.dynamic:
                self._quantize_dynamic(planned)
                self.report.dynamic.append(name)
            elif planned.weight is not None:
                self._quantize_weight(planned, parameters[planned.activation_inputs[0]][0])
        if self.plan.options.target.integer_pads:
            for planned in self.plan.planned.values():
                if planned.node.op_type == "Pad" and planned.quantize_output:
                    self._pad_integers(planned.node)
        self._compact_normalization_parameters()
        RemoveUnusedNodesPass()(self.plan.model)
        TopologicalSortPass()(self.plan.model)
        return self.report

    def _tensor_parameters(self) -> dict[ir.Value, tuple[np.float32, np.integer]]:
        ranges = self.plan.ranges
        activations = self.plan.options.target.activations
        parameters: dict[ir.Value, tuple[np.float32, np.integer]] = {}
        for node in self.graph:
            planned = self.plan.planned.get(node)
            if planned is None:
                continue
            for value in planned.activation_inputs:
                if value not in parameters:
                    parameters[value] = numerics.activation_parameters(
                        *ranges[value.name], activations
                    )
            if not planned.quantize_output:
                continue
            for output in node.outputs:
                if planned.rule.kind is Kind.SHARED:
                    parameters[output] = parameters[planned.activation_inputs[0]]
                elif planned.rule.fixed_output_range is not None:
                    parameters[output] = (
                        SOFTMAX_OUTPUT
                        if activations == numerics.UINT8_ASYMMETRIC
                        else numerics.activation_parameters(
                            *planned.rule.fixed_output_range, activations
                        )
                    )
                else:
                    parameters[output] = numerics.activation_parameters(
                        *ranges[output.name], activations
                    )
        return parameters

    def _insert_pair(self, value: ir.Value, scale: np.float32, zero_point: np.integer) -> None:
        """Quantize and dequantize ``value`` for the quantized nodes that read it.

        Float readers keep the float tensor, unless its producer is an integer kernel that emits
        int8 only (then every reader takes the dequantized values, or the kernel would not fuse).
        """
        uses = list(value.uses())
        dequantized = self.builder.quantize_dequantize(value, scale, zero_point)
        producer = self.plan.planned.get(value.producer())
        emits_int8 = producer is not None and producer.quantize_output
        per_channel: dict[tuple[int, int], ir.Value] = {}
        for usage in uses:
            consumer = self.plan.planned.get(usage.node)
            if consumer is not None and value in consumer.activation_inputs:
                usage.node.replace_input_with(usage.idx, dequantized)
            elif emits_int8:
                usage.node.replace_input_with(
                    usage.idx,
                    self._float_layer_input(usage.node, usage.idx, dequantized, per_channel),
                )

    def _pad_integers(self, node: ir.Node) -> None:
        """Let a Pad between a DequantizeLinear and a QuantizeLinear of one scale pad the
        integers themselves, filling with the zero point (what zero quantizes to).

        onnxruntime fuses no DequantizeLinear-Pad-QuantizeLinear pattern: it pads in float
        between the two conversions. On dlib's face ResNet, whose shortcuts are padded with
        zero channels, each float Pad also left the residual Add after it in float.
        """
        dequantized, output = node.inputs[0], node.outputs[0]
        dequantize = dequantized.producer()
        readers = [usage.node for usage in output.uses()]
        if (
            dequantize is None
            or dequantize.op_type != "DequantizeLinear"
            or len(readers) != 1
            or readers[0].op_type != "QuantizeLinear"
            or output.is_graph_output()
        ):
            return
        quantized, _, zero_point = dequantize.inputs
        # The fill is an input of the data's type, read in constant mode only.
        inputs = list(node.inputs) + [None] * (3 - len(node.inputs))
        inputs[0], inputs[2] = quantized, zero_point
        padded = ir.node(
            "Pad",
            inputs,
            attributes=dict(node.attributes),
            name=self.builder.unique(f"{node.name or 'Pad'}_integers"),
        )
        result = padded.outputs[0]
        result.name = self.builder.unique(f"{output.name}_quantized")
        result.dtype = quantized.dtype
        result.shape = output.shape
        self.graph.insert_before(node, padded)
        readers[0].outputs[0].replace_all_uses_with(result)
        self.graph.remove([readers[0], node], safe=True)
        if not dequantized.uses():
            self.graph.remove(dequantize, safe=True)

    def _float_layer_input(
        self,
        node: ir.Node,
        index: int,
        dequantized: ir.Value,
        per_channel: dict[tuple[int, int], ir.Value],
    ) -> ir.Value:
        """What a float reader of an int8-only tensor reads: ``dequantized``, or for a layer
        with float weights, the same values from a DequantizeLinear with per-channel scales,
        one per channel layout (``per_channel`` holds those made for this tensor so far).

        onnxruntime quantizes (per tensor, symmetric: its WeightBiasQuantization optimization,
        at every optimization level) the float weights of a Conv, ConvTranspose or Gemm
        between a DequantizeLinear with one scale and a QuantizeLinear. A layer kept float
        would then run in int8 with coarser weights than the quantized layers have: on
        EfficientNet-Lite0 keeping its first depthwise convolution float took the logits'
        cosine from 0.998 to 0.92. Per-channel scales keep it float.
        """
        layout = _float_weight_layout(node, index)
        if layout is None:
            return dequantized
        if layout not in per_channel:
            axis, channels = layout
            per_channel[layout] = self.builder.dequantize_per_channel(
                dequantized, axis, channels, before=node
            )
        return per_channel[layout]

    def _quantize_weight(self, planned: PlannedNode, input_scale: np.float32) -> None:
        node, weight = planned.node, planned.weight
        array = float32_weight(weight)
        axis = weight_axis(node, weight) if self.plan.options.per_channel else None
        scales = numerics.weight_scales(array, axis, self.plan.reduce_range)
        bias_array = constant_array(planned.bias)
        if bias_array is not None:
            if axis is None:
                scales = numerics.widen_for_bias(
                    np.array([np.abs(bias_array).max(initial=0.0)]), input_scale, scales.reshape(1)
                ).reshape(())
            else:
                widened = numerics.widen_for_bias(bias_array, input_scale, scales)
                if np.any(widened != scales):
                    self.report.widened_weight_scales.append(node.name or node.op_type)
                scales = widened
        base = weight.name or f"{node.name}_weight"
        quantized = self._stored_integers(node, weight, array, scales, axis)
        dequantized = self.builder.dequantize(
            base,
            quantized,
            self.builder.constant(f"{base}_scale", scales.astype(np.float32)),
            self.builder.constant(f"{base}_zero_point", np.zeros_like(scales, dtype=np.int8)),
            axis,
            shape=quantized.shape,
        )
        node.replace_input_with(1, dequantized)
        self._lay_out_stem(node, tuple(quantized.shape))
        if bias_array is not None:
            bias_values, bias_scales = numerics.quantize_bias(
                bias_array, input_scale, np.broadcast_to(scales, bias_array.shape)
            )
            bias_axis = 0 if bias_scales.ndim == 1 and bias_scales.size > 1 else None
            if bias_axis is None:
                bias_scales = bias_scales.reshape(-1)[:1].reshape(())
            dequantized_bias = self.builder.dequantized_constant(
                planned.bias.name or f"{node.name}_bias",
                bias_values,
                bias_scales,
                np.zeros_like(bias_scales, dtype=np.int32),
                bias_axis,
            )
            node.replace_input_with(2, dequantized_bias)

    def _lay_out_stem(self, node: ir.Node, weight_shape: tuple[int, ...]) -> None:
        """Lay out a quantized stem's int8 input and weight as the target runs fastest."""
        target = self.plan.options.target
        layout = (
            stems.space_to_depth_layout(node, weight_shape) if target.stem_space_to_depth else None
        )
        if layout is not None:
            self.stems.space_to_depth(node, layout)
        elif stems.reads_padded_channels(node, weight_shape, target.stem_channels):
            self.stems.pad_channels(node, weight_shape[1], target.stem_channels)

    def _stored_integers(
        self,
        node: ir.Node,
        weight: ir.Value,
        array: np.ndarray,
        scales: np.ndarray,
        axis: int | None,
    ) -> ir.Value:
        """The int8 constant of ``weight`` on ``scales``: one for every layer that reads a
        shared weight on the same grid (captcha-whisperer's CRNN stored its LSTM's weights 40
        times, 70 MB against 19 MB of float)."""
        key = (id(weight), axis, np.asarray(scales, dtype=np.float32).tobytes())
        if key in self.stored:
            return self.stored[key]
        base = weight.name or f"{node.name}_weight"
        quantized = self.builder.constant(
            f"{base}_quantized", self._integers(node, array, scales, axis)
        )
        if id(weight) in self.shared:
            self.stored[key] = quantized
        return quantized

    def _integers(
        self, node: ir.Node, array: np.ndarray, scales: np.ndarray, axis: int | None
    ) -> np.ndarray:
        # GPTQ fits a layer's integers to its own inputs; a shared weight rounds to nearest,
        # the same integers for every reader.
        if self.rounding is not None and id(node.inputs[1]) not in self.shared:
            limit = numerics.weight_limit(self.plan.reduce_range)
            integers = self.rounding.integers(node, array, scales, axis, limit)
            if integers is not None:
                return integers
        return numerics.quantize_weight(array, scales, axis)

    def _quantize_table(self, planned: PlannedNode) -> None:
        """Gather(table, ids) -> Gather(int8 rows, ids) -> Cast -> Mul by Gather(row scales, ids).

        One symmetric scale per row keeps rare tokens with small embeddings precise. onnxruntime
        runs the two small gathers and the scaling faster than gathering float rows, where a
        DequantizeLinear of the whole table would run on every call.
        """
        node, table = planned.node, planned.weight
        unique = self.builder.unique
        array = float32_weight(table)
        rows = array.reshape(array.shape[0], -1)
        scales = np.abs(rows).max(axis=1) / numerics.INT8_SYMMETRIC_RANGE[1]
        scales = numerics.rounded_to_half(np.where(scales > 0, scales, 1.0).astype(np.float32))
        shape = (array.shape[0], *([1] * (array.ndim - 1)))
        quantized = numerics.quantize_values(
            array, scales.reshape(shape), np.zeros(shape, np.int8), np.int8
        )
        base = table.name or f"{node.name}_table"
        prefix = node.name or base
        ids = node.inputs[1]
        gather = ir.node(
            "Gather",
            [self.builder.constant(f"{base}_quantized", quantized), ids],
            name=unique(f"{prefix}_int8"),
        )
        gather_scales = ir.node(
            "Gather",
            [self.builder.compact_constant(f"{base}_scale", scales.reshape(shape)), ids],
            name=unique(f"{prefix}_scales"),
        )
        cast = ir.node(
            "Cast",
            gather.outputs,
            attributes={"to": ir.DataType.FLOAT},
            name=unique(f"{prefix}_Cast"),
        )
        rescale = ir.node(
            "Mul", [cast.outputs[0], gather_scales.outputs[0]], name=unique(f"{prefix}_rescale")
        )
        for value, suffix, dtype in (
            (gather.outputs[0], "int8", ir.DataType.INT8),
            (gather_scales.outputs[0], "row_scale", ir.DataType.FLOAT),
            (cast.outputs[0], "float", ir.DataType.FLOAT),
        ):
            value.name = unique(f"{prefix}_{suffix}")
            value.dtype = dtype
        self._replace(node, [gather, gather_scales, cast, rescale])

    def _replace(self, node: ir.Node, chain: list[ir.Node]) -> None:
        """Put ``chain`` in place of ``node``: its last node's output takes over node's output."""
        self.graph.extend(chain)
        take_over_output(node, chain[-1].outputs[0])

    def _quantize_dynamic(self, planned: PlannedNode) -> None:
        """x -> DynamicQuantizeLinear -> MatMulInteger with int8 weights -> Cast -> Mul by the scales.

        onnxruntime fuses this chain into one integer kernel (DynamicQuantizeMatMul).
        """
        node, weight = planned.node, planned.weight
        unique = self.builder.unique
        array = float32_weight(weight)
        axis = weight_axis(node, weight) if self.plan.options.per_channel else None
        scales = numerics.rounded_to_half(
            numerics.weight_scales(array, axis, self.plan.reduce_range)
        )
        base = weight.name or f"{node.name}_weight"
        quantized = self._stored_integers(node, weight, array, scales, axis)
        weight_scale = self.builder.compact_constant(f"{base}_scale", scales)
        weight_zero = self.builder.constant(
            f"{base}_zero_point", np.zeros_like(scales, dtype=np.int8)
        )
        prefix = node.name or base
        quantize = ir.node(
            "DynamicQuantizeLinear",
            [node.inputs[0]],
            num_outputs=3,
            name=unique(f"{prefix}_DynamicQuantizeLinear"),
        )
        activation, activation_scale, activation_zero = quantize.outputs
        multiply = ir.node(
            "MatMulInteger",
            [activation, quantized, activation_zero, weight_zero],
            name=unique(f"{prefix}_MatMulInteger"),
        )
        cast = ir.node(
            "Cast",
            [multiply.outputs[0]],
            attributes={"to": ir.DataType.FLOAT},
            name=unique(f"{prefix}_Cast"),
        )
        combined = ir.node("Mul", [activation_scale, weight_scale], name=unique(f"{prefix}_scales"))
        rescale = ir.node(
            "Mul", [cast.outputs[0], combined.outputs[0]], name=unique(f"{prefix}_rescale")
        )
        for value, suffix, dtype in (
            (activation, "quantized", ir.DataType.UINT8),
            (activation_scale, "scale", ir.DataType.FLOAT),
            (activation_zero, "zero_point", ir.DataType.UINT8),
            (multiply.outputs[0], "int32", ir.DataType.INT32),
            (cast.outputs[0], "float", ir.DataType.FLOAT),
            (combined.outputs[0], "combined_scale", ir.DataType.FLOAT),
        ):
            value.name = unique(f"{prefix}_{suffix}")
            value.dtype = dtype
        self._replace(node, [quantize, multiply, cast, combined, rescale])
        self._compact_bias(rescale.outputs[0])

    def _compact_bias(self, value: ir.Value) -> None:
        """Store the bias an Add puts on ``value`` (a dynamically quantized MatMul's output)
        compactly: on a transformer these biases weigh as much as the rest of its float data."""
        for usage in list(value.uses()):
            if usage.node.op_type == "Add" and len(usage.node.inputs) == 2:
                self._compact_vector(usage.node, 1 - usage.idx)

    def _compact_normalization_parameters(self) -> None:
        """Store LayerNormalization's scale and bias vectors compactly: in a quantized
        transformer they are most of the float data left."""
        for node in list(self.graph):
            if node.op_type == "LayerNormalization" and node.domain in ("", "ai.onnx"):
                for index in (1, 2):
                    if index < len(node.inputs):
                        self._compact_vector(node, index)

    def _compact_vector(self, node: ir.Node, index: int) -> None:
        """Input ``index`` of ``node``, a constant float32 vector only it reads, as float16 and
        a Cast where float16 is within its rounding of it (see ``numerics.rounded_to_half``):
        half the bytes, and an error float16's rounding bounds, far below int8's."""
        value = node.inputs[index]
        array = constant_array(value)
        if (
            value is None
            or value.const_value is None
            or array is None
            or array.dtype != np.float32
            or array.ndim != 1
            or len(value.uses()) != 1
        ):
            return
        compact = self.builder.compact_constant(
            value.name or f"{node.name}_input{index}", numerics.rounded_to_half(array)
        )
        node.replace_input_with(index, compact)
