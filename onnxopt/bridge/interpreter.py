"""An ONNX graph compiled once into steps that torch ops run: what ``OnnxModule`` executes.

Compiling reads every node (and every node of every subgraph) before anything runs, so an op,
attribute or type the bridge does not support is one error that names each such node, its op
and its opset. Running walks the steps in graph order over a dict of values by name; ``If``
runs the branch its condition takes (both were compiled), ``Loop`` runs its body as many times
as its trip count and condition say.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import onnx_ir as ir
import torch

from onnxopt.bridge import (  # noqa: F401  (they fill the registry)
    ops_math,
    ops_nn,
    ops_recurrent,
    ops_resize,
    ops_sequence,
    ops_tensor,
)
from onnxopt.bridge.registry import OPS, Call, OpSpec
from onnxopt.bridge.types import supported_type
from onnxopt.errors import InputError

# The default-domain opsets the op implementations follow.
MIN_OPSET, MAX_OPSET = 6, 23

CONTROL_FLOW = frozenset({"If", "Loop"})

# Problems named in an error before the rest are counted.
SHOWN_PROBLEMS = 12


class UnsupportedModelError(InputError):
    """The graph holds ops, attributes or types the bridge cannot run."""


class NodeFailedError(InputError):
    """A node could not compute on the values it got: usually inputs of other shapes than the
    graph was exported for (a Reshape that hard-codes a size)."""


@dataclasses.dataclass
class Step:
    """One node, ready to run: its op, its ``Call`` and the names it reads and writes."""

    spec: OpSpec | None
    call: Call
    inputs: list[str | None]
    outputs: list[str]


@dataclasses.dataclass
class Graph:
    """A compiled graph: its inputs (initializers excluded), outputs, constants and steps.

    Attributes:
        inputs: names of the values a caller feeds, in order.
        outputs: names of the values it returns, in order.
        initializers: the initializers of this graph (subgraphs keep their own).
        steps: the nodes in order.
        declared: each input's declared element type and shape (None where unknown; a
            dimension None where it is symbolic).
    """

    inputs: list[str]
    outputs: list[str]
    initializers: dict[str, ir.Value]
    steps: list[Step]
    declared: dict[str, tuple[ir.DataType | None, tuple[int | None, ...] | None]] = (
        dataclasses.field(default_factory=dict)
    )

    def walk(self) -> Iterator[Graph]:
        """This graph and every subgraph in it."""
        yield self
        for step in self.steps:
            for value in step.call.attributes.values():
                if isinstance(value, Graph):
                    yield from value.walk()


def compile_model(model: ir.Model) -> Graph:
    """``model``'s main graph compiled; UnsupportedModelError listing every node it cannot run."""
    opset = model.opset_imports.get("", model.opset_imports.get("ai.onnx"))
    if opset is None or not MIN_OPSET <= opset <= MAX_OPSET:
        raise UnsupportedModelError(
            f"the model uses default-domain opset {opset}; the torch bridge runs opsets "
            f"{MIN_OPSET} to {MAX_OPSET}",
            fix="convert it with onnxopt's upgrade-opset pass (or onnx.version_converter) first",
        )
    problems: list[str] = []
    graph = _compile(model.graph, opset, problems)
    if problems:
        shown = problems[:SHOWN_PROBLEMS]
        if len(problems) > len(shown):
            shown.append(f"... and {len(problems) - len(shown)} more")
        raise UnsupportedModelError(
            f"the torch bridge cannot run {len(problems)} node(s) of this model",
            details=shown,
            fix="rewrite those nodes with supported ops, or leave this model out of gradient-based passes",
        )
    return graph


def _compile(graph: ir.Graph, opset: int, problems: list[str]) -> Graph:
    initializers = dict(graph.initializers)
    steps = []
    for node in graph:
        name = node.name or f"<{node.op_type} #{len(steps)}>"
        where = f"node '{name}' ({node.op_type}, opset {opset})"
        attributes = {}
        for key, attribute in node.attributes.items():
            attributes[key] = _attribute_value(attribute, opset, problems)
        outputs = [value.name for value in node.outputs]
        while outputs and not outputs[-1]:
            outputs.pop()
        call = Call(node.op_type, name, opset, attributes, len(outputs))
        spec = OPS.get(node.op_type)
        problem = None
        if node.domain not in ("", "ai.onnx"):
            problem = f"domain '{node.domain}' is not supported"
        elif node.op_type in CONTROL_FLOW:
            spec = None
        elif spec is None:
            problem = "the op is not supported"
        elif spec.check is not None and (reason := spec.check(call)):
            problem = f"unsupported: {reason}"
        for value in [*node.inputs, *node.outputs]:
            if value is not None and not supported_type(value.dtype):
                problem = problem or f"tensors of type {value.dtype.name} are not supported"
        if problem:
            problems.append(f"{where}: {problem}")
        inputs = [value.name if value is not None else None for value in node.inputs]
        steps.append(Step(spec, call, inputs, outputs))
    inputs = [value for value in graph.inputs if value.name not in initializers]
    declared = {value.name: (value.dtype, _declared_shape(value)) for value in inputs}
    return Graph(
        [value.name for value in inputs],
        [value.name for value in graph.outputs],
        initializers,
        steps,
        declared,
    )


def _declared_shape(value: ir.Value) -> tuple[int | None, ...] | None:
    if value.shape is None:
        return None
    return tuple(dim if isinstance(dim, int) else None for dim in value.shape)


def _attribute_value(attribute: ir.Attr, opset: int, problems: list[str]) -> Any:
    kind = attribute.type
    if kind == ir.AttributeType.GRAPH:
        return _compile(attribute.value, opset, problems)
    if kind == ir.AttributeType.GRAPHS:
        return [_compile(graph, opset, problems) for graph in attribute.value]
    if kind == ir.AttributeType.TENSOR:
        return attribute.value.numpy()
    if kind == ir.AttributeType.TENSORS:
        return [tensor.numpy() for tensor in attribute.value]
    if kind in (ir.AttributeType.INTS, ir.AttributeType.FLOATS, ir.AttributeType.STRINGS):
        return list(attribute.value)
    return attribute.value


Constants = Callable[[str], "torch.Tensor | None"]


def run_graph(
    graph: Graph, feeds: Mapping[str, torch.Tensor], constant: Constants
) -> list[torch.Tensor]:
    """The outputs of ``graph`` on ``feeds`` (values by name, outer-scope values included);
    ``constant`` gives an initializer's tensor by name."""
    values: dict[str, Any] = dict(feeds)
    for name in graph.initializers:
        values[name] = constant(name)
    for step in graph.steps:
        arguments = [values[name] if name else None for name in step.inputs]
        while arguments and arguments[-1] is None:
            arguments.pop()
        if step.call.op_type == "If":
            results = tuple(_run_if(step, arguments, values, constant))
        elif step.call.op_type == "Loop":
            results = tuple(_run_loop(step, arguments, values, constant))
        else:
            try:
                results = step.spec.function(step.call, *arguments)
            except Exception as error:
                shapes = [
                    list(argument.shape) if isinstance(argument, torch.Tensor) else None
                    for argument in arguments
                ]
                raise NodeFailedError(
                    f"node '{step.call.name}' ({step.call.op_type}, opset {step.call.opset}) "
                    f"failed on inputs of shapes {shapes}: {error}",
                    fix="feed inputs of the shapes and types the model declares: a graph exported "
                    "for one batch size or resolution may hard-code it",
                ) from error
        if not isinstance(results, tuple):
            results = (results,)
        for name, result in zip(step.outputs, results, strict=False):
            if name:
                values[name] = result
    return [values[name] for name in graph.outputs]


def _run_if(step: Step, arguments, values, constant) -> list[torch.Tensor]:
    branch = "then_branch" if bool(arguments[0]) else "else_branch"
    return run_graph(step.call.attributes[branch], values, constant)


def _run_loop(step: Step, arguments, values, constant) -> list[torch.Tensor]:
    """ONNX Loop: (trip count, condition, carried values...) -> (carried..., scan outputs...)."""
    body: Graph = step.call.attributes["body"]
    arguments = arguments + [None] * (2 - len(arguments)) if len(arguments) < 2 else arguments
    trip_count, condition, *carried = arguments
    limit = int(trip_count) if trip_count is not None else None
    keep_going = bool(condition) if condition is not None else True
    scans: list[list[torch.Tensor]] = []
    iteration = 0
    while keep_going and (limit is None or iteration < limit):
        feeds = dict(values)
        body_inputs = [
            torch.tensor(iteration, dtype=torch.int64),
            torch.tensor(keep_going),
            *carried,
        ]
        feeds.update(zip(body.inputs, body_inputs, strict=False))
        outputs = run_graph(body, feeds, constant)
        keep_going = bool(outputs[0])
        carried = outputs[1 : 1 + len(carried)]
        step_scans = outputs[1 + len(carried) :]
        if not scans:
            scans = [[] for _ in step_scans]
        for collected, value in zip(scans, step_scans, strict=True):
            collected.append(value)
        iteration += 1
    stacked = [torch.stack(collected) for collected in scans]
    return [*carried, *stacked]
