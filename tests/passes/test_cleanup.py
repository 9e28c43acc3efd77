"""The cleanup passes one after another, on control flow and functions."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir

from onnxopt.passes import PASSES
from tests.helpers import (
    CLEANUP,
    assert_outputs_close,
    count_ops,
    model_from_text,
    output_names,
    run_model,
)

CONTROL_FLOW_AND_FUNCTIONS = """
<ir_version: 8, opset_import: ["" : 17, "local" : 1]>
g (float[2,3] x, bool condition) => (float[2,3] looped, float[2,3] scaled)
  <float[3] a = {1.0, 2.0, 3.0}, int64 trips = {3}, float[3] unused = {0.0, 0.0, 0.0}> {
    keep_going = Constant<value = bool {1}>()
    looped = Loop(trips, keep_going, x) <body = loop_body (int64 iteration, bool condition_in, float[2,3] carried)
      => (bool condition_out, float[2,3] carried_out) {
        condition_out = Identity(condition_in)
        negative = Neg(a)
        doubled = Add(negative, negative)
        copy = Identity(carried)
        carried_out = Add(copy, doubled)
    }>
    start = Constant<value_ints = [0]>()
    end = Constant<value_ints = [3]>()
    branch = If(condition) <
        then_branch = then_graph () => (float[2,3] then_y) {
            offset = Constant<value_floats = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0, 11.0, 12.0, 13.0, 14.0, 15.0, 16.0]>()
            head = Slice(offset, start, end)
            then_y = Add(x, head)
        },
        else_branch = else_graph () => (float[2,3] else_y) { dead = Neg(x)  else_y = Relu(x) }
    >
    scaled = local.scale(branch)
}
<domain: "local", opset_import: ["" : 17]>
scale (input) => (output) {
    two = Constant<value_float = 2.0>()
    copy = Identity(input)
    output = Mul(copy, two)
}
"""


def test_cleanup_simplifies_loops_branches_and_functions_and_keeps_outputs():
    model = model_from_text(CONTROL_FLOW_AND_FUNCTIONS)
    feeds = [
        {"x": np.arange(6, dtype=np.float32).reshape(2, 3), "condition": np.array(value)}
        for value in (True, False)
    ]
    before = [run_model(model, feed) for feed in feeds]
    for name in CLEANUP:
        PASSES[name]()(model)
    onnx.checker.check_model(ir.to_proto(model), full_check=True)
    assert output_names(model) == ["looped", "scaled"]
    # Left: the loop's condition passed through (an input that is an output), the constants
    # too small to lift or inside the function, and the ops that compute from inputs.
    assert count_ops(model) == {
        "Constant": 2,
        "Loop": 1,
        "Identity": 1,
        "Add": 2,
        "If": 1,
        "Relu": 1,
        "scale": 1,
        "Mul": 1,
    }
    assert list(model.graph.initializers) == ["trips"]
    for feed, expected in zip(feeds, before, strict=True):
        assert_outputs_close(run_model(model, feed), expected)
