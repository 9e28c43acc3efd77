"""The table of ONNX ops the bridge runs: one small torch function per op, and what it refuses.

An op's function gets the node's ``Call`` (attributes as Python values, the opset, the node's
name, how many outputs are wanted) and its inputs as torch tensors (None for an optional input
left out), and returns a tensor or a tuple of them. An op may also have a check that reads the
node before anything runs and names an attribute or form it does not support.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

OpFunction = Callable[..., Any]
OpCheck = Callable[["Call"], "str | None"]


@dataclasses.dataclass
class Call:
    """One node as an op function sees it.

    Attributes:
        op_type: the node's op.
        name: the node's name, for messages.
        opset: the default-domain opset of the graph the node is in.
        attributes: attribute values as Python values (ints, floats, strings, lists, numpy
            arrays for tensors; subgraphs as the interpreter's ``Graph``).
        outputs: how many outputs the graph reads (trailing optional outputs left out).
    """

    op_type: str
    name: str
    opset: int
    attributes: dict[str, Any]
    outputs: int

    def get(self, name: str, default: Any = None) -> Any:
        return self.attributes.get(name, default)


@dataclasses.dataclass(frozen=True)
class OpSpec:
    """How the bridge runs one op type.

    Attributes:
        function: computes the outputs from the ``Call`` and the inputs.
        check: names what the bridge does not support about a node, or returns None.
    """

    function: OpFunction
    check: OpCheck | None = None


OPS: dict[str, OpSpec] = {}


def op(*op_types: str, check: OpCheck | None = None) -> Callable[[OpFunction], OpFunction]:
    """Register ``function`` as the torch implementation of ``op_types``."""

    def register(function: OpFunction) -> OpFunction:
        for op_type in op_types:
            OPS[op_type] = OpSpec(function, check)
        return function

    return register
