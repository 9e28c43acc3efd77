from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from onnxopt.passes.fold_constants import FoldConstantsPass
from tests.helpers import assert_outputs_close, count_ops, model_from_text, run_model

X = {"x": np.array([[0.5, -1.0, 2.0], [3.0, 0.0, -4.0]], dtype=np.float32)}

CONSTANT_EXPRESSION = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[2,3] x) => (float[2,3] y) <float[3] a = {1.0, 2.0, 3.0}, float[3] b = {4.0, 5.0, 6.0}> {
    sum = Add(a, b)
    scaled = Mul(sum, a)
    y = Add(x, scaled)
}
"""


def test_fold_constants_folds_constant_expression_and_keeps_outputs():
    model = model_from_text(CONSTANT_EXPRESSION)
    before = run_model(model, X)
    result = FoldConstantsPass()(model)
    assert result.modified
    assert count_ops(model) == {"Add": 1}
    assert result.details["folded"] == 2
    assert list(model.graph.initializers) == ["scaled"]
    assert_outputs_close(run_model(model, X), before)


@pytest.mark.parametrize(
    "quantization",
    [
        "q = QuantizeLinear(w, scale, zero)\n    dq = DequantizeLinear(q, scale, zero)",
        "q, q_scale, q_zero = DynamicQuantizeLinear(w)\n    dq = DequantizeLinear(q, q_scale, q_zero)",
    ],
)
def test_fold_constants_never_folds_quantize_or_dequantize(quantization):
    model = model_from_text(f"""
<ir_version: 8, opset_import: ["" : 17]>
g (float[2,3] x) => (float[2,3] y) <float[3] w = {{0.5, -1.0, 2.5}}, float scale = {{0.5}}, uint8 zero = {{128}}> {{
    {quantization}
    y = Add(x, dq)
}}
""")
    ops = count_ops(model)
    before = run_model(model, X)
    result = FoldConstantsPass()(model)
    assert count_ops(model) == ops
    assert result.details["folded"] == 0
    assert_outputs_close(run_model(model, X), before)


def test_fold_constants_folds_inside_if_branches():
    model = model_from_text("""
<ir_version: 8, opset_import: ["" : 17]>
g (float[2,3] x, bool condition) => (float[2,3] y) <float[3] a = {1.0, 2.0, 3.0}> {
    y = If(condition) <
        then_branch = then_graph () => (float[2,3] then_y) { negative = Neg(a)  then_y = Add(x, negative) },
        else_branch = else_graph () => (float[2,3] else_y) { else_y = Sub(x, a) }
    >
}
""")
    feeds = [{**X, "condition": np.array(value)} for value in (True, False)]
    before = [run_model(model, feed) for feed in feeds]
    FoldConstantsPass()(model)
    assert "Neg" not in count_ops(model)
    for feed, expected in zip(feeds, before, strict=True):
        assert_outputs_close(run_model(model, feed), expected)


def test_fold_constants_folds_inside_functions_into_constant_nodes():
    model = model_from_text("""
<ir_version: 8, opset_import: ["" : 17, "local" : 1]>
g (float[2,3] x) => (float[2,3] y) {
    y = local.shift(x)
}
<domain: "local", opset_import: ["" : 17]>
shift (input) => (output) {
    offset = Constant<value_floats = [1.0, 2.0, 3.0]>()
    negative = Neg(offset)
    output = Add(input, negative)
}
""")
    before = run_model(model, X)
    FoldConstantsPass()(model)
    assert count_ops(model) == {"shift": 1, "Constant": 1, "Add": 1}
    assert_outputs_close(run_model(model, X), before)


TILED = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[8] x) => (float[8] y) <float[2] a = {1.0, 2.0}, int64[1] repeats = {4}> {
    tiled = Tile(a, repeats)
    y = Add(x, tiled)
}
"""


@pytest.mark.parametrize(
    ("output_size_limit", "folded_ops"), [(4, {"Tile": 1, "Add": 1}), (8, {"Add": 1})]
)
def test_fold_constants_respects_output_size_limit(output_size_limit, folded_ops):
    model = model_from_text(TILED)
    feeds = {"x": np.arange(8, dtype=np.float32)}
    before = run_model(model, feeds)
    FoldConstantsPass(output_size_limit=output_size_limit)(model)
    assert count_ops(model) == folded_ops
    assert_outputs_close(run_model(model, feeds), before)


def test_fold_constants_keeps_initializers_that_are_graph_inputs():
    model = model_from_text("""
<ir_version: 8, opset_import: ["" : 17]>
g (float[2,3] x, float[3] a) => (float[2,3] y) <float[3] a = {1.0, 2.0, 3.0}> {
    negative = Neg(a)
    y = Add(x, negative)
}
""")
    FoldConstantsPass()(model)
    assert count_ops(model) == {"Neg": 1, "Add": 1}
    overridden = {**X, "a": np.zeros(3, dtype=np.float32)}
    assert_outputs_close(run_model(model, overridden), [X["x"]])


SHAPE_TO_RESHAPE = """
<ir_version: 7, opset_import: ["" : {opset}]>
g (float[2,3] x, float[6] z) => (float[2,3] y) {{
    shape = Shape(x)
    y = Reshape(z, shape)
}}
"""
SEQUENCE_CONCAT = """
<ir_version: 7, opset_import: ["" : {opset}]>
g (float[2,3] x, float[6] z) => (float[2,3,2] y) {{
    sequence = SequenceConstruct(x, x)
    y = ConcatFromSequence<axis = -1, new_axis = 1>(sequence)
}}
"""


@pytest.mark.parametrize(
    ("text", "op_type", "old_opset"),
    [(SHAPE_TO_RESHAPE, "Shape", 11), (SEQUENCE_CONCAT, "ConcatFromSequence", 12)],
)
def test_fold_constants_rewrites_only_into_ops_of_the_model_opset(text, op_type, old_opset):
    feeds = {**X, "z": np.arange(6, dtype=np.float32)}
    for opset, rewritten in ((old_opset, False), (17, True)):
        model = model_from_text(text.format(opset=opset))
        before = run_model(model, feeds)
        FoldConstantsPass()(model)
        onnx.checker.check_model(ir.to_proto(model), full_check=True)
        assert (op_type not in count_ops(model)) == rewritten
        assert_outputs_close(run_model(model, feeds), before)


def test_small_constant_of_shape_folds_so_padding_becomes_constant():
    model = model_from_text(
        """
        <ir_version: 8, opset_import: ["" : 17]>
        padded (float[1, 1, 2, 2] x) => (float[1, 1, 4, 4] y) {
            shape = Constant <value = int64[1] {4}> ()
            zeros = ConstantOfShape <value = int64[1] {0}> (shape)
            ones = Constant <value = int64[4] {0, 0, 1, 1}> ()
            pads = Concat <axis = 0> (zeros, ones)
            y = Pad(x, pads)
        }
        """
    )
    FoldConstantsPass()(model)
    pad = next(node for node in model.graph if node.op_type == "Pad")
    assert pad.inputs[1].const_value.numpy().tolist() == [0, 0, 0, 0, 0, 0, 1, 1]
