from __future__ import annotations

import numpy as np

from onnxopt.passes.lift_constants import LiftConstantsPass
from tests.helpers import assert_outputs_close, count_ops, model_from_text, run_model

X = {"x": np.arange(16, dtype=np.float32).reshape(4, 4)}

WEIGHTS_AS_CONSTANTS = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[4,4] x) => (float[2,8] y) {
    weight = Constant<value = float[4,4] {1, 0, 0, 0, 0, 2, 0, 0, 0, 0, 3, 0, 0, 0, 0, 4}>()
    offset = Constant<value_floats = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0, 11.0, 12.0, 13.0, 14.0, 15.0, 16.0]>()
    shape = Constant<value_ints = [2, 8]>()
    product = MatMul(x, weight)
    reshaped = Reshape(product, shape)
    flat_offset = Reshape(offset, shape)
    y = Add(reshaped, flat_offset)
}
"""


def test_lift_constants_turns_weights_into_initializers():
    model = model_from_text(WEIGHTS_AS_CONSTANTS)
    before = run_model(model, X)
    result = LiftConstantsPass()(model)
    assert result.changes == 2
    assert set(model.graph.initializers) == {"weight", "offset"}
    assert count_ops(model)["Constant"] == 1
    assert_outputs_close(run_model(model, X), before)


def test_lift_constants_lifts_small_constants_below_a_lower_size_limit():
    model = model_from_text(WEIGHTS_AS_CONSTANTS)
    before = run_model(model, X)
    LiftConstantsPass(size_limit=0)(model)
    assert "Constant" not in count_ops(model)
    assert_outputs_close(run_model(model, X), before)


def test_lift_constants_lifts_only_tensor_values_unless_asked_for_all():
    model = model_from_text(WEIGHTS_AS_CONSTANTS)
    LiftConstantsPass(lift_all_constants=False)(model)
    assert set(model.graph.initializers) == {"weight"}


def test_lift_constants_keeps_a_constant_that_is_a_graph_output():
    model = model_from_text("""
<ir_version: 8, opset_import: ["" : 17]>
g (float[4,4] x) => (float[4,4] y, float[16] table) {
    table = Constant<value_floats = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0, 11.0, 12.0, 13.0, 14.0, 15.0, 16.0]>()
    y = Relu(x)
}
""")
    result = LiftConstantsPass()(model)
    assert result.changes == 0
    assert count_ops(model) == {"Constant": 1, "Relu": 1}


def test_lift_constants_lifts_into_the_subgraph_that_uses_the_constant():
    model = model_from_text("""
<ir_version: 8, opset_import: ["" : 17]>
g (float[4,4] x, bool condition) => (float[4,4] y) {
    y = If(condition) <
        then_branch = then_graph () => (float[4,4] then_y) {
            weight = Constant<value = float[4,4] {1, 0, 0, 0, 0, 2, 0, 0, 0, 0, 3, 0, 0, 0, 0, 4}>()
            then_y = MatMul(x, weight)
        },
        else_branch = else_graph () => (float[4,4] else_y) { else_y = Neg(x) }
    >
}
""")
    feeds = [{**X, "condition": np.array(value)} for value in (True, False)]
    before = [run_model(model, feed) for feed in feeds]
    result = LiftConstantsPass()(model)
    assert result.changes == 1
    then_branch = model.graph.node(0).attributes["then_branch"].as_graph()
    assert list(then_branch.initializers) == ["weight"]
    for feed, expected in zip(feeds, before, strict=True):
        assert_outputs_close(run_model(model, feed), expected)
