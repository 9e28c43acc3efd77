"""Insert QuantizeLinear/DequantizeLinear pairs where onnxruntime fuses them into integer kernels.

The planner walks the graph in topological order and decides, op by op, with the rules table:
heavy ops with constant weights (Conv, Gemm, MatMul) are always quantized; cheap ops (Add,
pools, data movement) only when their inputs already arrive quantized, so that int8 never adds
conversions around a float op. Relu and Clip disappear into the producer's quantized range.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
from collections.abc import Mapping, Sequence

import numpy as np
import onnx_ir as ir

from onnxopt.quantization import numerics
from onnxopt.quantization.rules import QUANTIZED_OPS, Kind, OpRule, Output, rule_for, weight_axis

logger = logging.getLogger(__name__)

SOFTMAX_OUTPUT = (np.float32(1.0 / 256.0), np.uint8(0))


@dataclasses.dataclass
class QuantizationOptions:
    """What to quantize and how.

    Attributes:
        per_channel: one weight scale per output channel (else one per tensor).
        reduce_range: 7-bit weights; None decides by the CPU (only without VNNI).
        max_abs_range: activations whose calibrated range reaches beyond this stay float.
        exclude_nodes: node names, or regular expressions matched against the whole name.
        exclude_op_types: op types kept float.
        tensor_overrides: per tensor, {"low": x, "high": y} to set its range, or {"type": "float"}.
        dynamic_matmul: a MatMul with constant weights whose input arrives in float (as in
            transformers, after LayerNorm or GELU) quantizes that input at run time from its
            actual range (DynamicQuantizeLinear + MatMulInteger), instead of with a calibrated
            range that outlier channels stretch; MatMuls of two activations then stay float
            unless both arrive quantized.
    """

    per_channel: bool = True
    reduce_range: bool | None = None
    max_abs_range: float = 1e4
    exclude_nodes: Sequence[str] = ()
    exclude_op_types: Sequence[str] = ()
    tensor_overrides: Mapping[str, Mapping[str, object]] = dataclasses.field(default_factory=dict)
    dynamic_matmul: bool = True


@dataclasses.dataclass
class QuantizationReport:
    """What was quantized, and what stayed float and why."""

    quantized: dict[str, str] = dataclasses.field(default_factory=dict)
    kept_float: list[dict[str, str]] = dataclasses.field(default_factory=list)
    absorbed: list[str] = dataclasses.field(default_factory=list)
    tensors: dict[str, dict[str, float | int]] = dataclasses.field(default_factory=dict)
    widened_weight_scales: list[str] = dataclasses.field(default_factory=list)
    dynamic: list[str] = dataclasses.field(default_factory=list)

    def quantized_by_op(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for op_type in self.quantized.values():
            counts[op_type] = counts.get(op_type, 0) + 1
        return dict(sorted(counts.items()))


class AlreadyQuantizedError(ValueError):
    """The model holds quantization ops already."""


def find_quantized_ops(model: ir.Model) -> list[str]:
    return sorted(
        {node.op_type for node in model.graph.all_nodes() if node.op_type in QUANTIZED_OPS}
    )


@dataclasses.dataclass
class _Planned:
    node: ir.Node
    rule: OpRule
    activation_inputs: list[ir.Value]
    weight: ir.Value | None = None
    bias: ir.Value | None = None
    quantize_output: bool = True
    dynamic: bool = False


class _Planner:
    """Decides node by node, then rewrites the graph in one go."""

    def __init__(
        self,
        model: ir.Model,
        ranges: Mapping[str, tuple[float, float]],
        problems: Mapping[str, str],
        options: QuantizationOptions,
    ):
        self.model = model
        self.graph = model.graph
        self.options = options
        self.ranges = dict(ranges)
        self.problems = dict(problems)
        self.report = QuantizationReport()
        self.planned: dict[ir.Node, _Planned] = {}
        self.integer_values: set[ir.Value] = set()
        self._absorbed_sources: set[ir.Value] = set()
        self.reduce_range = (
            options.reduce_range
            if options.reduce_range is not None
            else not numerics.cpu_has_vnni()
        )
        self._names = set(self.graph.initializers) | {
            value.name for node in self.graph for value in node.outputs if value.name
        }
        self._exclusions = [re.compile(pattern) for pattern in options.exclude_nodes]
        for name, override in options.tensor_overrides.items():
            if "low" in override or "high" in override:
                low, high = ranges.get(name, (0.0, 0.0))
                self.ranges[name] = (
                    float(override.get("low", low)),
                    float(override.get("high", high)),
                )
                self.problems.pop(name, None)

    def plan(self) -> None:
        for node in list(self.graph):
            rule = rule_for(node)
            if rule is None:
                continue
            reason = self._excluded(node) or self._consider(node, rule)
            if reason:
                self.report.kept_float.append(
                    {"node": node.name or "", "op_type": node.op_type, "reason": reason}
                )

    def _excluded(self, node: ir.Node) -> str | None:
        if node.op_type in self.options.exclude_op_types:
            return "excluded by op type"
        name = node.name or ""
        if (
            any(pattern.fullmatch(name) for pattern in self._exclusions)
            or name in self.options.exclude_nodes
        ):
            return "excluded by name"
        return None

    def _consider(self, node: ir.Node, rule: OpRule) -> str | None:
        if rule.kind is Kind.FLOAT:
            return rule.reason
        if rule.kind is Kind.ABSORBED:
            return self._absorb(node)
        if rule.kind is Kind.WEIGHTED:
            if node.op_type == "MatMul" and _constant(node.inputs[1]) is None:
                return self._plan_activation_node(
                    node,
                    OpRule(Kind.BINARY, (0, 1), Output.OPTIONAL),
                    require_integer_inputs=self.options.dynamic_matmul,
                )
            return self._plan_weighted(node, rule)
        return self._plan_activation_node(node, rule, require_integer_inputs=True)

    def _plan_weighted(self, node: ir.Node, rule: OpRule) -> str | None:
        weight = node.inputs[1]
        if _constant(weight) is None:
            return "its weight is not a constant"
        if weight.dtype != ir.DataType.FLOAT:
            return f"its weight is {weight.dtype}, not float32"
        bias = node.inputs[2] if len(node.inputs) > 2 else None
        if node.op_type == "Gemm":
            if (
                node.attributes.get_int("transA", 0)
                or node.attributes.get_float("alpha", 1.0) != 1.0
            ):
                return "Gemm with transA or alpha != 1 has no integer kernel"
            if bias is not None and node.attributes.get_float("beta", 1.0) != 1.0:
                return "Gemm with beta != 1 cannot take an int32 bias"
        if bias is not None:
            bias_array = _constant(bias)
            axis = weight_axis(node, weight)
            channels = weight.const_value.shape[axis] if axis is not None else None
            if (
                bias_array is None
                or bias_array.ndim != 1
                or (channels is not None and bias_array.shape[0] != channels)
            ):
                return "its bias is not a constant vector of one value per output channel"
        if (
            node.op_type == "MatMul"
            and self.options.dynamic_matmul
            and node.inputs[0] not in self.integer_values
            and node.inputs[0].dtype == ir.DataType.FLOAT
        ):
            self.planned[node] = _Planned(
                node, rule, [], weight, quantize_output=False, dynamic=True
            )
            return None
        problem = self._value_problem(node.inputs[0])
        if problem:
            return f"input: {problem}"
        output = node.outputs[0]
        output_problem = self._output_problem(output)
        if rule.output is Output.REQUIRED and output_problem:
            return f"output: {output_problem}"
        self.planned[node] = _Planned(
            node, rule, [node.inputs[0]], weight, bias, quantize_output=not output_problem
        )
        if not output_problem:
            self.integer_values.add(output)
        return None

    def _plan_activation_node(
        self, node: ir.Node, rule: OpRule, require_integer_inputs: bool
    ) -> str | None:
        indices = (
            rule.activation_inputs
            if rule.activation_inputs is not None
            else range(len(node.inputs))
        )
        inputs = [node.inputs[index] for index in indices if index < len(node.inputs)]
        if not inputs or any(value is None for value in inputs):
            return "an input is missing"
        for value in inputs:
            if require_integer_inputs and value not in self.integer_values:
                return "its inputs are not quantized, so int8 would add conversions"
            problem = self._value_problem(value)
            if problem:
                return f"input {value.name}: {problem}"
        outputs = list(node.outputs)
        if rule.kind is Kind.SHARED:
            outputs_problem = next(
                (
                    self._graph_output_problem(value)
                    for value in outputs
                    if self._graph_output_problem(value)
                ),
                None,
            )
        elif rule.fixed_output_range is not None:
            outputs_problem = self._graph_output_problem(outputs[0])
        else:
            outputs_problem = self._output_problem(outputs[0])
        if outputs_problem and rule.output is not Output.OPTIONAL:
            return f"output: {outputs_problem}"
        self.planned[node] = _Planned(node, rule, inputs, quantize_output=not outputs_problem)
        if not outputs_problem:
            self.integer_values.update(outputs)
        return None

    def _absorb(self, node: ir.Node) -> str | None:
        """Drop a Relu or Clip whose producer's quantized output saturates at the same bounds."""
        source, result = node.inputs[0], node.outputs[0]
        producer = source.producer() if source is not None else None
        planned = self.planned.get(producer)
        if (
            planned is None
            or planned.rule.kind is Kind.SHARED
            or planned.rule.fixed_output_range is not None
        ):
            return "its producer is not quantized with a range of its own"
        if len(source.uses()) != 1 or source.is_graph_output() or result.is_graph_output():
            return "its input or output is used elsewhere"
        if node.op_type == "Clip":
            minimum = _clip_bound(node, 1, "min")
            if minimum is None or minimum > 0:
                return "Clip without a constant lower bound <= 0"
        problem = self._value_problem(result)
        if problem:
            return f"output: {problem}"
        low, high = self.ranges[result.name]
        if node.op_type == "Relu":
            low = max(low, 0.0)
        self.ranges[source.name] = (low, high)
        self.problems.pop(source.name, None)
        for usage in list(result.uses()):
            usage.node.replace_input_with(usage.idx, source)
        self.graph.remove(node, safe=True)
        planned.quantize_output = True
        self._absorbed_sources.add(source)
        self.integer_values.add(source)
        self.report.absorbed.append(node.name or node.op_type)
        return None

    def _value_problem(self, value: ir.Value) -> str | None:
        override = self.options.tensor_overrides.get(value.name, {})
        if override.get("type") == "float":
            return "kept float by a tensor override"
        if value.dtype != ir.DataType.FLOAT:
            return f"its type is {value.dtype}, not float32"
        if value.name in self.problems:
            return self.problems[value.name]
        if value.name not in self.ranges:
            return "no calibration statistics"
        low, high = self.ranges[value.name]
        if not (math.isfinite(low) and math.isfinite(high)):
            return "its calibrated range is not finite"
        if max(abs(low), abs(high)) > self.options.max_abs_range:
            return f"its range [{low:.3g}, {high:.3g}] is too wide for 8 bits (limit {self.options.max_abs_range:g})"
        return None

    def _output_problem(self, value: ir.Value) -> str | None:
        return self._graph_output_problem(value) or self._value_problem(value)

    @staticmethod
    def _graph_output_problem(value: ir.Value) -> str | None:
        return (
            "it is a graph output, kept float for full output precision"
            if value.is_graph_output()
            else None
        )

    def apply(self) -> QuantizationReport:
        self._drop_unneeded_optional_outputs()
        parameters = self._tensor_parameters()
        for value, (scale, zero_point) in parameters.items():
            self._insert_pair(value, scale, zero_point)
            self.report.tensors[value.name] = {"scale": float(scale), "zero_point": int(zero_point)}
        for planned in self.planned.values():
            name = planned.node.name or planned.node.op_type
            self.report.quantized[name] = planned.node.op_type
            if planned.dynamic:
                self._quantize_dynamic(planned)
                self.report.dynamic.append(name)
            elif planned.weight is not None:
                self._quantize_weight(planned, parameters[planned.activation_inputs[0]][0])
        ir.passes.common.RemoveUnusedNodesPass()(self.model)
        ir.passes.common.TopologicalSortPass()(self.model)
        return self.report

    def _drop_unneeded_optional_outputs(self) -> None:
        """Gemm and MatMul emit float unless a quantized consumer or an absorbed Relu needs int8."""
        wanted = {value for planned in self.planned.values() for value in planned.activation_inputs}
        for planned in self.planned.values():
            output = planned.node.outputs[0]
            optional = planned.rule.output is Output.OPTIONAL and planned.quantize_output
            if (
                optional
                and output not in wanted
                and output not in self._absorbed_sources
                and not _feeds_an_add(planned.node)
            ):
                planned.quantize_output = False
                self.integer_values.discard(output)

    def _tensor_parameters(self) -> dict[ir.Value, tuple[np.float32, np.uint8]]:
        parameters: dict[ir.Value, tuple[np.float32, np.uint8]] = {}
        for node in self.graph:
            planned = self.planned.get(node)
            if planned is None:
                continue
            for value in planned.activation_inputs:
                if value not in parameters:
                    parameters[value] = numerics.activation_parameters(*self.ranges[value.name])
            if not planned.quantize_output:
                continue
            for output in node.outputs:
                if planned.rule.kind is Kind.SHARED:
                    parameters[output] = parameters[planned.activation_inputs[0]]
                elif planned.rule.fixed_output_range is not None:
                    parameters[output] = SOFTMAX_OUTPUT
                else:
                    parameters[output] = numerics.activation_parameters(*self.ranges[output.name])
        return parameters

    def _unique(self, name: str) -> str:
        candidate, suffix = name, 1
        while candidate in self._names:
            suffix += 1
            candidate = f"{name}_{suffix}"
        self._names.add(candidate)
        return candidate

    def _constant(self, name: str, array: np.ndarray) -> ir.Value:
        value = ir.Value(
            name=self._unique(name),
            type=ir.TensorType(ir.DataType.from_numpy(array.dtype)),
            shape=ir.Shape(array.shape),
            const_value=ir.tensor(array),
        )
        value.const_value.name = value.name
        self.graph.register_initializer(value)
        return value

    def _insert_pair(self, value: ir.Value, scale: np.float32, zero_point: np.uint8) -> None:
        """Quantize and dequantize ``value`` for the quantized nodes that read it.

        Float readers keep the float tensor, unless its producer is an integer kernel that emits
        int8 only (then every reader takes the dequantized values, or the kernel would not fuse).
        """
        base = value.name
        scale_value = self._constant(f"{base}_scale", np.array(scale, dtype=np.float32))
        zero_value = self._constant(f"{base}_zero_point", np.array(zero_point, dtype=np.uint8))
        uses = list(value.uses())
        quantize = ir.node(
            "QuantizeLinear",
            [value, scale_value, zero_value],
            name=self._unique(f"{base}_QuantizeLinear"),
        )
        quantize.outputs[0].name = self._unique(f"{base}_quantized")
        dequantize = ir.node(
            "DequantizeLinear",
            [quantize.outputs[0], scale_value, zero_value],
            name=self._unique(f"{base}_DequantizeLinear"),
        )
        dequantized = dequantize.outputs[0]
        dequantized.name = self._unique(f"{base}_dequantized")
        dequantized.dtype = ir.DataType.FLOAT
        dequantized.shape = value.shape
        quantize.outputs[0].dtype = ir.DataType.UINT8
        quantize.outputs[0].shape = value.shape
        self.graph.extend([quantize, dequantize])
        producer = self.planned.get(value.producer())
        emits_int8 = producer is not None and producer.quantize_output
        for usage in uses:
            consumer = self.planned.get(usage.node)
            if emits_int8 or (consumer is not None and value in consumer.activation_inputs):
                usage.node.replace_input_with(usage.idx, dequantized)

    def _quantize_weight(self, planned: _Planned, input_scale: np.float32) -> None:
        node, weight = planned.node, planned.weight
        array = weight.const_value.numpy().astype(np.float32)
        axis = weight_axis(node, weight) if self.options.per_channel else None
        scales = numerics.weight_scales(array, axis, self.reduce_range)
        bias_array = _constant(planned.bias) if planned.bias is not None else None
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
        quantized = numerics.quantize_weight(array, scales, axis)
        attributes = {"axis": axis} if axis is not None else {}
        weight_name = weight.name or f"{node.name}_weight"
        dequantized = self._dequantized_constant(
            weight_name, quantized, scales, np.zeros_like(scales, dtype=np.int8), attributes
        )
        node.replace_input_with(1, dequantized)
        if bias_array is not None:
            bias_values, bias_scales = numerics.quantize_bias(
                bias_array, input_scale, np.broadcast_to(scales, bias_array.shape)
            )
            bias_attributes = {"axis": 0} if bias_scales.ndim == 1 and bias_scales.size > 1 else {}
            if not bias_attributes:
                bias_scales = bias_scales.reshape(-1)[:1].reshape(())
            dequantized_bias = self._dequantized_constant(
                planned.bias.name or f"{node.name}_bias",
                bias_values,
                bias_scales,
                np.zeros_like(bias_scales, dtype=np.int32),
                bias_attributes,
            )
            node.replace_input_with(2, dequantized_bias)

    def _quantize_dynamic(self, planned: _Planned) -> None:
        """x -> DynamicQuantizeLinear -> MatMulInteger with int8 weights -> Cast -> Mul by the scales.

        onnxruntime fuses this chain into one integer kernel (DynamicQuantizeMatMul).
        """
        node, weight = planned.node, planned.weight
        array = weight.const_value.numpy().astype(np.float32)
        axis = weight_axis(node, weight) if self.options.per_channel else None
        scales = numerics.weight_scales(array, axis, self.reduce_range)
        base = weight.name or f"{node.name}_weight"
        quantized = self._constant(
            f"{base}_quantized", numerics.quantize_weight(array, scales, axis)
        )
        weight_scale = self._constant(f"{base}_scale", scales)
        weight_zero = self._constant(f"{base}_zero_point", np.zeros_like(scales, dtype=np.int8))
        prefix = node.name or base
        quantize = ir.node(
            "DynamicQuantizeLinear",
            [node.inputs[0]],
            num_outputs=3,
            name=self._unique(f"{prefix}_DynamicQuantizeLinear"),
        )
        activation, activation_scale, activation_zero = quantize.outputs
        multiply = ir.node(
            "MatMulInteger",
            [activation, quantized, activation_zero, weight_zero],
            name=self._unique(f"{prefix}_MatMulInteger"),
        )
        cast = ir.node(
            "Cast",
            [multiply.outputs[0]],
            attributes={"to": ir.DataType.FLOAT},
            name=self._unique(f"{prefix}_Cast"),
        )
        combined = ir.node(
            "Mul", [activation_scale, weight_scale], name=self._unique(f"{prefix}_scales")
        )
        rescale = ir.node(
            "Mul", [cast.outputs[0], combined.outputs[0]], name=self._unique(f"{prefix}_rescale")
        )
        for value, suffix, dtype in (
            (activation, "quantized", ir.DataType.UINT8),
            (activation_scale, "scale", ir.DataType.FLOAT),
            (activation_zero, "zero_point", ir.DataType.UINT8),
            (multiply.outputs[0], "int32", ir.DataType.INT32),
            (cast.outputs[0], "float", ir.DataType.FLOAT),
            (combined.outputs[0], "combined_scale", ir.DataType.FLOAT),
        ):
            value.name = self._unique(f"{prefix}_{suffix}")
            value.dtype = dtype
        output = node.outputs[0]
        result = rescale.outputs[0]
        result.dtype, result.shape = output.dtype, output.shape
        self.graph.extend([quantize, multiply, cast, combined, rescale])
        output.replace_all_uses_with(result, replace_graph_outputs=True)
        self.graph.remove(node, safe=True)
        result.name = output.name

    def _dequantized_constant(
        self,
        base: str,
        values: np.ndarray,
        scales: np.ndarray,
        zero_points: np.ndarray,
        attributes: dict,
    ) -> ir.Value:
        quantized = self._constant(f"{base}_quantized", values)
        scale = self._constant(f"{base}_scale", scales.astype(np.float32))
        zero_point = self._constant(f"{base}_zero_point", zero_points)
        node = ir.node(
            "DequantizeLinear",
            [quantized, scale, zero_point],
            attributes=attributes,
            name=self._unique(f"{base}_DequantizeLinear"),
        )
        output = node.outputs[0]
        output.name = self._unique(f"{base}_dequantized")
        output.dtype = ir.DataType.FLOAT
        output.shape = ir.Shape(values.shape)
        self.graph.append(node)
        return output


def _feeds_an_add(node: ir.Node) -> bool:
    """A MatMul followed by Add must emit int8: else onnxruntime first merges the two into a float
    Gemm, and the quantized MatMul is never fused into an integer kernel."""
    return node.op_type == "MatMul" and any(
        usage.node.op_type == "Add" for usage in node.outputs[0].uses()
    )


def _constant(value: ir.Value | None) -> np.ndarray | None:
    if value is None or value.const_value is None:
        return None
    return value.const_value.numpy()


def _clip_bound(node: ir.Node, index: int, attribute: str) -> float | None:
    if len(node.inputs) > index and node.inputs[index] is not None:
        bound = _constant(node.inputs[index])
        return None if bound is None else float(bound)
    if attribute in node.attributes:
        return node.attributes.get_float(attribute)
    return -math.inf if index == 1 else math.inf


def quantize_model(
    model: ir.Model,
    ranges: Mapping[str, tuple[float, float]],
    problems: Mapping[str, str],
    options: QuantizationOptions,
) -> QuantizationReport:
    """Quantize the model in place with calibrated activation ranges.

    Args:
        model: the float model; must not contain quantization ops.
        ranges: calibrated (low, high) per activation tensor name.
        problems: tensors that must stay float, with the reason (e.g. a non-finite range).
        options: what to quantize and how.
    """
    existing = find_quantized_ops(model)
    if existing:
        raise AlreadyQuantizedError(", ".join(existing))
    ir.passes.common.TopologicalSortPass()(model)
    planner = _Planner(model, ranges, problems, options)
    planner.plan()
    return planner.apply()
