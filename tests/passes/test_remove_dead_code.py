from __future__ import annotations

import numpy as np

from onnxopt.passes.remove_dead_code import RemoveDeadCodePass
from tests.helpers import assert_outputs_close, count_ops, model_from_text, output_names, run_model

X = {"x": np.array([0.5, -1.0, 2.0], dtype=np.float32)}


def test_remove_dead_code_removes_what_no_output_needs():
    model = model_from_text("""
<ir_version: 8, opset_import: ["" : 17, "local" : 1, "unused" : 1]>
g (float[3] x) => (float[3] y, float[3] kept) <float[3] used = {1.0, 2.0, 3.0}, float[3] unused = {4.0, 5.0, 6.0}> {
    kept = Relu(x)
    y = Add(kept, used)
    dead = Mul(x, unused)
    also_dead = local.double(dead)
}
<domain: "local", opset_import: ["" : 17]>
double (input) => (output) {
    output = Add(input, input)
}
""")
    before = run_model(model, X)
    result = RemoveDeadCodePass()(model)
    assert count_ops(model) == {"Relu": 1, "Add": 1}
    assert list(model.graph.initializers) == ["used"]
    assert not model.functions
    assert set(model.opset_imports) == {""}
    assert result.details == {"nodes": 2, "initializers": 1, "functions": 1}
    assert result.changes == 4
    assert output_names(model) == ["y", "kept"]
    assert_outputs_close(run_model(model, X), before)


def test_remove_dead_code_keeps_initializers_a_caller_may_override():
    model = model_from_text("""
<ir_version: 8, opset_import: ["" : 17]>
g (float[3] x, float[3] bias) => (float[3] y) <float[3] bias = {1.0, 2.0, 3.0}> {
    y = Relu(x)
}
""")
    result = RemoveDeadCodePass()(model)
    assert result.changes == 0
    assert list(model.graph.initializers) == ["bias"]


def test_remove_dead_code_cleans_subgraphs():
    model = model_from_text("""
<ir_version: 8, opset_import: ["" : 17]>
g (float[3] x, bool condition) => (float[3] y) {
    y = If(condition) <
        then_branch = then_graph () => (float[3] then_y) <float[3] unused = {4.0, 5.0, 6.0}> {
            dead = Neg(x)
            then_y = Relu(x)
        },
        else_branch = else_graph () => (float[3] else_y) { else_y = Abs(x) }
    >
}
""")
    feeds = [{**X, "condition": np.array(value)} for value in (True, False)]
    before = [run_model(model, feed) for feed in feeds]
    result = RemoveDeadCodePass()(model)
    assert result.details == {"nodes": 1, "initializers": 1, "functions": 0}
    assert count_ops(model) == {"If": 1, "Relu": 1, "Abs": 1}
    for feed, expected in zip(feeds, before, strict=True):
        assert_outputs_close(run_model(model, feed), expected)
