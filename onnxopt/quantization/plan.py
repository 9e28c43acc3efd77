"""Decide what to quantize, op by op, without touching the graph: a plan you can print.

The planner walks the graph in topological order and decides with the rules table: heavy ops
with constant weights (Conv, Gemm, MatMul) are always quantized; cheap ops (Add, pools, data
movement) only when their inputs already arrive quantized, so that int8 never adds conversions
around a float op. A Relu or Clip right after a quantized producer is absorbed: the producer's
quantized range saturates the same way. ``qdq.emit_plan`` then rewrites the graph in one go.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping, Sequence

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import TopologicalSortPass

from onnxopt.graph import clip_bound, constant_array
from onnxopt.quantization import numerics
from onnxopt.quantization.rules import QUANTIZED_OPS, Kind, OpRule, Output, rule_for, weight_axis
from onnxopt.quantization.targets import DEFAULT_TARGET, Target

TENSOR_OVERRIDE_KEYS = frozenset({"low", "high", "type"})

# Ops inside a subgraph (If, Loop, Scan branches) that the report says stay float, and why.
HEAVY_SUBGRAPH_OPS = frozenset({"Conv", "Gemm", "MatMul", "LSTM", "GRU", "ConvTranspose"})
SUBGRAPH_REASON = "the ops in its subgraphs stay float: onnxopt quantizes the main graph only"

# Ops whose small constant operands are quantized along with their activations, and how small.
CONSTANT_OPERAND_OPS = frozenset({"Add", "Mul"})
MAX_CONSTANT_OPERAND_ELEMENTS = 4096
TENSOR_OVERRIDE_TYPES = ("uint8", "float")


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
        gather_tables: a Gather from a constant table of at least ``min_table_elements`` (an
            embedding) gathers int8 rows and scales them back (weight-only int8, one scale per
            row): a quarter of the size, and faster in onnxruntime than gathering float rows.
        min_table_elements: smaller tables stay float.
        target: the runtime the model is for (``quantization.targets``): activation format,
            and whether constants of Add and Mul are quantized. ``for_target`` also takes its
            ``dynamic_matmul`` and ``gather_tables``.
    """

    per_channel: bool = True
    reduce_range: bool | None = None
    max_abs_range: float = 1e4
    exclude_nodes: Sequence[str] = ()
    exclude_op_types: Sequence[str] = ()
    tensor_overrides: Mapping[str, Mapping[str, object]] = dataclasses.field(default_factory=dict)
    dynamic_matmul: bool = True
    gather_tables: bool = True
    min_table_elements: int = 65536
    target: Target = DEFAULT_TARGET

    @classmethod
    def for_target(cls, target: Target, **options: object) -> QuantizationOptions:
        """Options with the target's defaults for what ``options`` leaves unset (or None)."""
        given = {name: value for name, value in options.items() if value is not None}
        given.setdefault("dynamic_matmul", target.dynamic_matmul)
        given.setdefault("gather_tables", target.gather_tables)
        return cls(target=target, **given)


def tensor_overrides_problem(overrides: Mapping[str, object]) -> str | None:
    """What is wrong with a ``tensor_overrides`` table, worded to follow "option ... ", or None."""
    for tensor, override in overrides.items():
        if not isinstance(override, Mapping) or not set(override) <= TENSOR_OVERRIDE_KEYS:
            return (
                f"has entry '{tensor}' that is not a table with keys among "
                f"{', '.join(sorted(TENSOR_OVERRIDE_KEYS))}; "
                'e.g. tensor_overrides = { "conv1_out" = { low = 0.0, high = 6.0 } }'
            )
        if override.get("type", "uint8") not in TENSOR_OVERRIDE_TYPES:
            return (
                f"has entry '{tensor}' of type {override['type']!r}; types: uint8 (the CPU "
                "default), float (keep the tensor float)"
            )
    return None


class AlreadyQuantizedError(ValueError):
    """The model holds quantization ops already."""


def find_quantized_ops(model: ir.Model) -> list[str]:
    return sorted(
        {node.op_type for node in model.graph.all_nodes() if node.op_type in QUANTIZED_OPS}
    )


@dataclasses.dataclass
class PlannedNode:
    """A node the plan quantizes.

    Attributes:
        node: the node.
        rule: its op's rule.
        activation_inputs: the inputs quantized as uint8 activations (after absorptions).
        weight: its constant weight, quantized to int8, for weighted ops.
        bias: its constant bias, quantized to int32, if any.
        quantize_output: its output is quantized too (the kernel emits int8).
        dynamic: its input is quantized at run time (DynamicQuantizeLinear + MatMulInteger).
        table: a Gather whose constant table is stored as int8 rows with a scale per row.
    """

    node: ir.Node
    rule: OpRule
    activation_inputs: list[ir.Value]
    weight: ir.Value | None = None
    bias: ir.Value | None = None
    quantize_output: bool = True
    dynamic: bool = False
    table: bool = False


@dataclasses.dataclass
class Absorption:
    """A Relu or Clip that disappears into its producer's quantized range.

    Attributes:
        node: the Relu or Clip.
        source: its input, the producer's output, which its readers read instead.
    """

    node: ir.Node
    source: ir.Value


@dataclasses.dataclass
class NodeDecision:
    """One line of a printed plan."""

    node: str
    op_type: str
    decision: str


@dataclasses.dataclass
class QuantizationPlan:
    """What quantization will do to one model; ``qdq.emit_plan`` carries it out.

    Attributes:
        model: the model planned for; the plan refers to its nodes and values.
        options: the options it was planned with.
        planned: the nodes to quantize, in graph order.
        absorbed: Relu and Clip nodes to remove.
        kept_float: nodes a rule could quantize that stay float, with the reason.
        ranges: the range of every tensor to quantize, with overrides and absorptions applied.
        reduce_range: whether weights use 7 bits.
    """

    model: ir.Model
    options: QuantizationOptions
    planned: dict[ir.Node, PlannedNode]
    absorbed: list[Absorption]
    kept_float: list[dict[str, str]]
    ranges: dict[str, tuple[float, float]]
    reduce_range: bool

    def decisions(self) -> list[NodeDecision]:
        """Every node a rule covers, in graph order, with what the plan does to it."""
        absorbed = {absorption.node: absorption for absorption in self.absorbed}
        kept = {entry["node"]: entry["reason"] for entry in self.kept_float}
        rows = []
        for node in self.model.graph:
            name = node.name or ""
            planned = self.planned.get(node)
            if planned is not None:
                if planned.table:
                    decision = "int8 table (weight only), output float"
                else:
                    kind = "dynamic int8" if planned.dynamic else "int8"
                    output = "int8" if planned.quantize_output else "float"
                    decision = f"{kind}, output {output}"
            elif node in absorbed:
                producer = absorbed[node].source.producer()
                decision = f"absorbed into {producer.name if producer else 'its producer'}"
            elif name in kept:
                decision = f"float: {kept[name]}"
            else:
                continue
            rows.append(NodeDecision(name, node.op_type, decision))
        return rows

    def describe(self) -> str:
        """The plan as text, one node a line."""
        rows = self.decisions()
        width = max((len(row.node) for row in rows), default=0)
        op_width = max((len(row.op_type) for row in rows), default=0)
        return "\n".join(
            f"{row.node:<{width}}  {row.op_type:<{op_width}}  {row.decision}" for row in rows
        )


def plan_quantization(
    model: ir.Model,
    ranges: Mapping[str, tuple[float, float]],
    problems: Mapping[str, str],
    options: QuantizationOptions,
) -> QuantizationPlan:
    """Decide what to quantize with calibrated activation ranges; the graph is not rewritten.

    The nodes are put in topological order first (which changes no result).

    Args:
        model: the float model; must not contain quantization ops.
        ranges: calibrated (low, high) per activation tensor name.
        problems: tensors that must stay float, with the reason (e.g. a non-finite range).
        options: what to quantize and how.

    Raises:
        AlreadyQuantizedError: the model holds quantization ops already.
    """
    existing = find_quantized_ops(model)
    if existing:
        raise AlreadyQuantizedError(", ".join(existing))
    TopologicalSortPass()(model)
    planner = _Planner(model, ranges, problems, options)
    for node in list(model.graph):
        rule = rule_for(node, options.target.rules)
        if rule is None:
            if _heavy_ops_inside(node):
                planner.kept_float.append(
                    {"node": node.name or "", "op_type": node.op_type, "reason": SUBGRAPH_REASON}
                )
            continue
        reason = planner.excluded(node) or planner.consider(node, rule)
        if reason:
            planner.kept_float.append(
                {"node": node.name or "", "op_type": node.op_type, "reason": reason}
            )
    planner.drop_unneeded_optional_outputs()
    return QuantizationPlan(
        model,
        options,
        planner.planned,
        planner.absorbed,
        planner.kept_float,
        planner.ranges,
        planner.reduce_range,
    )


def exclusion(node: ir.Node, options: QuantizationOptions) -> str | None:
    """Why the options keep ``node`` float by its op type or name, or None."""
    if node.op_type in options.exclude_op_types:
        return "excluded by op type"
    name = node.name or ""
    if name in options.exclude_nodes or any(
        re.fullmatch(pattern, name) for pattern in options.exclude_nodes
    ):
        return "excluded by name"
    return None


class _Planner:
    """The decisions so far, and the rules that make the next one."""

    def __init__(
        self,
        model: ir.Model,
        ranges: Mapping[str, tuple[float, float]],
        problems: Mapping[str, str],
        options: QuantizationOptions,
    ):
        self.options = options
        self.ranges = dict(ranges)
        self.problems = dict(problems)
        self.planned: dict[ir.Node, PlannedNode] = {}
        self.absorbed: list[Absorption] = []
        self.kept_float: list[dict[str, str]] = []
        self.integer_values: set[ir.Value] = set()
        # An absorbed Relu's output stands for its producer's output from then on.
        self.aliases: dict[ir.Value, ir.Value] = {}
        self.reduce_range = (
            options.reduce_range
            if options.reduce_range is not None
            else not numerics.cpu_has_vnni()
        )
        for name, override in options.tensor_overrides.items():
            if "low" in override or "high" in override:
                low, high = ranges.get(name, (0.0, 0.0))
                self.ranges[name] = (
                    float(override.get("low", low)),
                    float(override.get("high", high)),
                )
                self.problems.pop(name, None)

    def excluded(self, node: ir.Node) -> str | None:
        return exclusion(node, self.options)

    def consider(self, node: ir.Node, rule: OpRule) -> str | None:
        if rule.kind is Kind.FLOAT:
            return rule.reason
        if rule.kind is Kind.ABSORBED:
            return self._absorb(node)
        if node.op_type == "Gather" and constant_array(node.inputs[0]) is not None:
            if node.inputs[0].const_value is None:
                return (
                    "its table is a Constant node's output (lift-constants makes it an initializer)"
                )
            return self._plan_table(node, rule)
        if rule.kind is Kind.WEIGHTED:
            if node.op_type == "MatMul" and constant_array(node.inputs[1]) is None:
                if not self.options.target.activation_matmuls:
                    return (
                        f"a MatMul of two activations runs faster in float in "
                        f"{self.options.target.runtime}"
                    )
                return self._plan_activation_node(
                    node,
                    OpRule(Kind.BINARY, (0, 1), Output.OPTIONAL),
                    require_integer_inputs=self.options.dynamic_matmul,
                )
            return self._plan_weighted(node, rule)
        if node.op_type == "Pad" and (problem := _pad_fill_problem(node)):
            return problem
        return self._plan_activation_node(node, rule, require_integer_inputs=True)

    def drop_unneeded_optional_outputs(self) -> None:
        """Gemm and MatMul emit float unless a quantized consumer or an absorbed Relu needs int8."""
        wanted = {value for planned in self.planned.values() for value in planned.activation_inputs}
        absorbed_sources = {absorption.source for absorption in self.absorbed}
        for planned in self.planned.values():
            output = planned.node.outputs[0]
            optional = planned.rule.output is Output.OPTIONAL and planned.quantize_output
            if (
                optional
                and output not in wanted
                and output not in absorbed_sources
                and not (self.options.target.outputs_into_adds and _feeds_an_add(planned.node))
            ):
                planned.quantize_output = False
                self.integer_values.discard(output)

    def _input(self, node: ir.Node, index: int) -> ir.Value | None:
        value = node.inputs[index] if index < len(node.inputs) else None
        return self.aliases.get(value, value) if value is not None else None

    def _plan_weighted(self, node: ir.Node, rule: OpRule) -> str | None:
        weight = node.inputs[1]
        if constant_array(weight) is None:
            return "its weight is not a constant"
        if weight.const_value is None:
            return "its weight is a Constant node's output (lift-constants makes it an initializer)"
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
            bias_array = constant_array(bias)
            axis = weight_axis(node, weight)
            channels = weight.const_value.shape[axis] if axis is not None else None
            if (
                bias_array is None
                or bias_array.ndim != 1
                or (channels is not None and bias_array.shape[0] != channels)
            ):
                return "its bias is not a constant vector of one value per output channel"
        activation = self._input(node, 0)
        if (
            node.op_type == "MatMul"
            and self.options.dynamic_matmul
            and activation not in self.integer_values
            and activation.dtype == ir.DataType.FLOAT
        ):
            self.planned[node] = PlannedNode(
                node, rule, [], weight, quantize_output=False, dynamic=True
            )
            return None
        problem = self._value_problem(activation)
        if problem:
            return f"input: {problem}"
        output = node.outputs[0]
        output_problem = self._output_problem(output)
        if rule.output is Output.REQUIRED and output_problem:
            return f"output: {output_problem}"
        self.planned[node] = PlannedNode(
            node, rule, [activation], weight, bias, quantize_output=not output_problem
        )
        if not output_problem:
            self.integer_values.add(output)
        return None

    def _plan_table(self, node: ir.Node, rule: OpRule) -> str | None:
        """A Gather from a constant table: weight-only int8 rows, or float and why."""
        table = node.inputs[0]
        if not self.options.gather_tables:
            return "gather_tables is off"
        if table.dtype != ir.DataType.FLOAT:
            return f"its table is {table.dtype}, not float32"
        shape = table.const_value.shape
        if len(shape) < 2 or node.attributes.get_int("axis", 0) != 0:
            return "it does not gather whole rows of a table"
        if table.const_value.size < self.options.min_table_elements:
            return (
                f"its table is smaller than min_table_elements ({self.options.min_table_elements})"
            )
        self.planned[node] = PlannedNode(node, rule, [], table, quantize_output=False, table=True)
        return None

    def _plan_activation_node(
        self, node: ir.Node, rule: OpRule, require_integer_inputs: bool
    ) -> str | None:
        indices = (
            rule.activation_inputs
            if rule.activation_inputs is not None
            else range(len(node.inputs))
        )
        inputs = [self._input(node, index) for index in indices if index < len(node.inputs)]
        if not inputs or any(value is None for value in inputs):
            return "an input is missing"
        operands = [value for value in inputs if not self._constant_operand(node, value)]
        if not operands:
            return "its inputs are all constant"
        for value in inputs:
            if value in operands and require_integer_inputs and value not in self.integer_values:
                return "its inputs are not quantized, so int8 would add conversions"
            problem = self._value_problem(value)
            if problem:
                return f"input {value.name}: {problem}"
        outputs = list(node.outputs)
        if rule.kind is Kind.SHARED:
            outputs_problem = next(
                (_graph_output_problem(value) for value in outputs if _graph_output_problem(value)),
                None,
            )
        elif rule.fixed_output_range is not None:
            outputs_problem = _graph_output_problem(outputs[0])
        else:
            outputs_problem = self._output_problem(outputs[0])
        if outputs_problem and rule.output is not Output.OPTIONAL:
            return f"output: {outputs_problem}"
        self.planned[node] = PlannedNode(node, rule, inputs, quantize_output=not outputs_problem)
        if not outputs_problem:
            self.integer_values.update(outputs)
        return None

    def _constant_operand(self, node: ir.Node, value: ir.Value) -> bool:
        """A small float constant of an Add or Mul (a HardSwish's 3 or 1/6, a bias), which
        quantizes with the range of its own values: the op then runs as an integer kernel."""
        array = constant_array(value)
        if (
            not self.options.target.constant_operands
            or node.op_type not in CONSTANT_OPERAND_OPS
            or array is None
            or value.dtype != ir.DataType.FLOAT
            or array.size > MAX_CONSTANT_OPERAND_ELEMENTS
            or not np.all(np.isfinite(array))
        ):
            return False
        if value.name not in self.ranges:
            self.ranges[value.name] = (float(array.min()), float(array.max()))
        return True

    def _absorb(self, node: ir.Node) -> str | None:
        """Plan to drop a Relu or Clip whose producer's quantized output saturates the same way."""
        read, result = node.inputs[0], node.outputs[0]
        source = self._input(node, 0)
        producer = source.producer() if source is not None else None
        planned = self.planned.get(producer)
        if (
            planned is None
            or planned.rule.kind is Kind.SHARED
            or planned.rule.fixed_output_range is not None
        ):
            return "its producer is not quantized with a range of its own"
        if (
            len(read.uses()) != 1
            or (source is not read and len(source.uses()) != 1)
            or source.is_graph_output()
            or result.is_graph_output()
        ):
            return "its input or output is used elsewhere"
        if node.op_type == "Clip":
            minimum = clip_bound(node, 1, "min")
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
        self.aliases[result] = source
        planned.quantize_output = True
        self.integer_values.add(source)
        self.absorbed.append(Absorption(node, source))
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
        return _graph_output_problem(value) or self._value_problem(value)


def _pad_fill_problem(node: ir.Node) -> str | None:
    """Why a Pad cannot keep its input's scale: a constant fill other than zero. Zero is the
    zero point exactly; another fill would be rounded into the input's range, or clipped."""
    if node.attributes.get_string("mode", "constant") != "constant":
        return None
    fill = node.inputs[2] if len(node.inputs) > 2 else None
    if fill is not None and (constant_array(fill) is None or np.any(constant_array(fill) != 0)):
        return "its fill value is not a constant zero"
    return None


def _heavy_ops_inside(node: ir.Node) -> bool:
    """Whether the subgraphs of an If, Loop or Scan hold ops that int8 would speed up."""
    for attribute in node.attributes.values():
        graphs = []
        if attribute.type == ir.AttributeType.GRAPH:
            graphs = [attribute.as_graph()]
        elif attribute.type == ir.AttributeType.GRAPHS:
            graphs = list(attribute.as_graphs())
        for graph in graphs:
            if any(inner.op_type in HEAVY_SUBGRAPH_OPS for inner in graph.all_nodes()):
                return True
    return False


def _graph_output_problem(value: ir.Value) -> str | None:
    return (
        "it is a graph output, kept float for full output precision"
        if value.is_graph_output()
        else None
    )


def _feeds_an_add(node: ir.Node) -> bool:
    """A MatMul followed by Add must emit int8: else onnxruntime first merges the two into a float
    Gemm, and the quantized MatMul is never fused into an integer kernel."""
    return node.op_type == "MatMul" and any(
        usage.node.op_type == "Add" for usage in node.outputs[0].uses()
    )
