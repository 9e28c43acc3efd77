from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir

from onnxopt.cleanup.identity import eliminate_identities
from tests.helpers import assert_outputs_close, count_ops, model_from_text, output_names, run_model

X = {"x": np.array([0.5, -1.0, 2.0], dtype=np.float32)}


def test_in_a_function_an_output_identity_goes_only_when_its_input_is_computed_there():
    model = model_from_text("""
<ir_version: 8, opset_import: ["" : 17, "local" : 1]>
g (float[3] x) => (float[3] y, float[3] z) {
    y, z = local.pair(x)
}
<domain: "local", opset_import: ["" : 17]>
pair (input) => (negated, same) {
    negative = Neg(input)
    negated = Identity(negative)
    same = Identity(input)
}
""")
    before = run_model(model, X)
    result = eliminate_identities(model)
    assert (result.removed, result.kept) == (1, 1)
    function = next(iter(model.functions.values()))
    assert [value.name for value in function.outputs] == ["negated", "same"]
    assert function.outputs[0].producer().op_type == "Neg"
    onnx.checker.check_model(ir.to_proto(model), full_check=True)
    assert_outputs_close(run_model(model, X), before)


def test_chains_of_identities_collapse_onto_the_output_name():
    model = model_from_text("""
<ir_version: 8, opset_import: ["" : 17]>
g (float[3] x) => (float[3] y) {
    relu = Relu(x)
    first = Identity(relu)
    second = Identity(first)
    y = Identity(second)
}
""")
    before = run_model(model, X)
    assert eliminate_identities(model).removed == 3
    assert count_ops(model) == {"Relu": 1}
    assert output_names(model) == ["y"]
    assert_outputs_close(run_model(model, X), before)


def test_the_input_takes_the_shape_the_identity_knew():
    model = model_from_text("""
<ir_version: 8, opset_import: ["" : 17]>
g (float[3] x) => (float[3] y) {
    relu = Relu(x)
    copy = Identity(relu)
    y = Neg(copy)
}
""")
    relu, copy = model.graph.node(0).outputs[0], model.graph.node(1).outputs[0]
    relu.shape = ir.Shape(["n"])
    copy.shape = ir.Shape([3])
    eliminate_identities(model)
    assert relu.shape == ir.Shape([3])
    assert model.graph.node(1).inputs[0] is relu


def test_an_initializer_passed_to_an_output_keeps_its_identity():
    model = model_from_text("""
<ir_version: 8, opset_import: ["" : 17]>
g (float[3] x) => (float[3] y, float[3] w_out) <float[3] w = {1.0, 2.0, 3.0}> {
    y = Add(x, w)
    w_out = Identity(w)
}
""")
    result = eliminate_identities(model)
    assert (result.removed, result.kept) == (0, 1)
    assert count_ops(model) == {"Add": 1, "Identity": 1}
