from __future__ import annotations

import math

import numpy as np
import onnx_ir as ir

from onnxopt import shapes
from onnxopt.passes.infer_shapes import InferShapesPass
from tests.helpers import assert_outputs_close, model_from_text, run_model

COMPUTED_RESHAPE = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[2,3,4] x) => (float[rows,columns] y) {
    first = Shape<end = 1>(x)
    rest = Constant<value_ints = [-1]>()
    shape = Concat<axis = 0>(first, rest)
    y = Reshape(x, shape)
}
"""


def test_infer_shapes_fills_in_intermediate_values_with_data_propagation():
    model = model_from_text(COMPUTED_RESHAPE)
    feeds = {"x": np.arange(24, dtype=np.float32).reshape(2, 3, 4)}
    before = run_model(model, feeds)
    result = InferShapesPass()(model)
    assert result.changes == 4
    assert model.graph.outputs[0].shape == ir.Shape([2, 12])
    assert all(node.outputs[0].dtype is not None for node in model.graph)
    assert_outputs_close(run_model(model, feeds), before)


def test_infer_shapes_reaches_into_subgraphs():
    model = model_from_text("""
<ir_version: 8, opset_import: ["" : 17]>
g (float[2,3] x, bool condition) => (float[2,3] y) {
    y = If(condition) <
        then_branch = then_graph () => (float[2,3] then_y) { negative = Neg(x)  then_y = Relu(negative) },
        else_branch = else_graph () => (float[2,3] else_y) { else_y = Abs(x) }
    >
}
""")
    InferShapesPass()(model)
    then_branch = model.graph.node(0).attributes["then_branch"].as_graph()
    assert then_branch.node(0).outputs[0].shape == ir.Shape([2, 3])


def test_infer_shapes_works_on_models_over_two_gigabytes(tmp_path):
    # A sparse file stands for the weights: nothing is read or allocated, as shape inference
    # leaves large initializers out of the protobuf it builds.
    shape = ir.Shape([2**15, 2**14 + 1])
    size = math.prod(shape.dims) * 4
    with (tmp_path / "weights.bin").open("wb") as weights:
        weights.truncate(size)
    tensor = ir.ExternalTensor(
        "weights.bin", 0, size, ir.DataType.FLOAT, shape=shape, name="weight", base_dir=tmp_path
    )
    weight = ir.Value(
        name="weight", shape=shape, type=ir.TensorType(ir.DataType.FLOAT), const_value=tensor
    )
    x = ir.Value(name="x", shape=ir.Shape([2, 2**15]), type=ir.TensorType(ir.DataType.FLOAT))
    matmul = ir.node("MatMul", [x, weight])
    relu = ir.node("Relu", matmul.outputs, outputs=[ir.Value(name="y")])
    graph = ir.Graph(
        [x], relu.outputs, nodes=[matmul, relu], initializers=[weight], opset_imports={"": 17}
    )
    model = ir.Model(graph, ir_version=8)
    result = InferShapesPass()(model)
    assert result.changes == 2
    assert model.graph.outputs[0].shape == ir.Shape([2, 2**14 + 1])


def test_infer_shapes_skips_data_propagation_next_to_long_vectors(monkeypatch):
    monkeypatch.setattr(shapes, "LONGEST_PROPAGATED_VECTOR", 5)
    model = model_from_text(
        COMPUTED_RESHAPE.replace("float[2,3,4] x", "float[2,3,4] x, float[5] long")
    )
    InferShapesPass()(model)
    assert model.graph.outputs[0].shape == ir.Shape([2, 12])
    model = model_from_text(
        COMPUTED_RESHAPE.replace("float[2,3,4] x", "float[2,3,4] x, float[6] long")
    )
    InferShapesPass()(model)
    assert model.graph.outputs[0].shape != ir.Shape([2, 12])


def test_infer_shapes_keeps_sequences_sequences():
    model = model_from_text("""
<ir_version: 7, opset_import: ["" : 12]>
g (float[2,3,4] x) => (int64 count) {
    pieces = SplitToSequence<axis = -1>(x)
    count = SequenceLength(pieces)
}
""")
    feeds = {"x": np.zeros((2, 3, 4), dtype=np.float32)}
    before = run_model(model, feeds)
    InferShapesPass()(model)
    assert model.graph.node(0).outputs[0].type == ir.SequenceType(ir.TensorType(ir.DataType.FLOAT))
    assert_outputs_close(run_model(model, feeds), before)
