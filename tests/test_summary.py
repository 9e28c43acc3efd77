from __future__ import annotations

import json
import os

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from rich.console import Console

from onnxopt.summary import render_before_after, render_summary, summarize

MATMUL_TEXT = """
<ir_version: 8, opset_import: ["" : 17], producer_name: "tests", producer_version: "1.0">
matmul (float[N, 3] x) => (float[N, ?] y)
<float[3, 3] w = {1, 0, 0, 0, 1, 0, 0, 0, 0}, float[3] bias = {0, 0, 0}, int64[2, 2] index = {0, 0, 0, 1}>
{
    product = MatMul(x, w)
    shift = Constant<value = float[2] {1, 2}>()
    y = Add(product, bias)
}
"""

IF_TEXT = """
<ir_version: 8, opset_import: ["" : 17]>
branches (float[2] x, bool condition) => (float[2] y) {
    y = If(condition) <
        then_branch = positive () => (float[2] a) { a = Relu(x) },
        else_branch = negative () => (float[2] b) { b = Neg(x) }
    >
}
"""

FUNCTION_TEXT = """
<ir_version: 8, opset_import: ["" : 17, "local" : 1]>
calls (float[2] x) => (float[2] y) {
    squared = local.Square(x)
    y = local.Square(squared)
}
<domain: "local", opset_import: ["" : 17]>
Square (a) => (b) {
    b = Mul(a, a)
}
"""


def parse(text: str) -> ir.Model:
    return ir.from_proto(onnx.parser.parse_model(text))


def with_sparse_weight(zeros: int) -> ir.Model:
    """The MatMul model with a 16x16 weight, large enough to be saved as external data."""
    model = parse(MATMUL_TEXT)
    values = np.arange(1, 257, dtype=np.float32)
    values[:zeros] = 0.0
    weight = model.graph.initializers["w"]
    weight.const_value = ir.tensor(values.reshape(16, 16), name="w")
    weight.shape = ir.Shape([16, 16])
    return model


def test_counts_interface_ops_and_parameters():
    summary = summarize(parse(MATMUL_TEXT))

    assert summary.ir_version == 8
    assert summary.opset_imports == {"": 17}
    assert summary.default_opset == 17
    assert (summary.producer_name, summary.producer_version) == ("tests", "1.0")
    assert [(value.name, value.dtype, value.shape) for value in summary.inputs] == [
        ("x", "float", ["N", 3])
    ]
    assert [(value.name, value.dtype, value.shape) for value in summary.outputs] == [
        ("y", "float", ["N", None])
    ]
    assert summary.op_histogram == {"Add": 1, "Constant": 1, "MatMul": 1}
    assert summary.node_count == 3
    # w 9 + bias 3 + index 4 elements, plus the Constant's 2.
    assert summary.parameter_count == 18
    assert summary.tensor_bytes == 9 * 4 + 3 * 4 + 4 * 8 + 2 * 4
    assert summary.file_bytes is None
    assert not summary.uses_external_data


def test_sparsity_counts_float_weights_of_two_or_more_dims_only():
    sparsity = summarize(parse(MATMUL_TEXT)).sparsity

    # Only w qualifies: bias is 1-D and index is integer, though both hold zeros.
    assert sparsity.tensors == 1
    assert (sparsity.zero_elements, sparsity.elements) == (7, 9)
    assert sparsity.overall == pytest.approx(7 / 9)
    assert [(tensor.name, tensor.shape) for tensor in sparsity.top] == [("w", [3, 3])]


def test_sparsity_can_be_turned_off():
    assert summarize(parse(MATMUL_TEXT), sparsity=False).sparsity is None


def test_counts_ops_inside_subgraphs():
    summary = summarize(parse(IF_TEXT))

    assert summary.op_histogram == {"If": 1, "Neg": 1, "Relu": 1}
    assert summary.node_count == 3


def test_counts_ops_inside_functions_with_their_domain():
    summary = summarize(parse(FUNCTION_TEXT))

    assert summary.op_histogram == {"local::Square": 2, "Mul": 1}


def test_external_data_is_found_and_sized(tmp_path):
    path = os.path.join(tmp_path, "model.onnx")
    ir.save(with_sparse_weight(zeros=64), path, external_data="x.data")
    model = ir.load(path)

    summary = summarize(model, path)

    assert summary.uses_external_data
    assert summary.external_data_files == ["x.data"]
    assert summary.file_bytes == os.path.getsize(path) + os.path.getsize(
        os.path.join(tmp_path, "x.data")
    )
    assert summary.parameter_count == 256 + 3 + 4 + 2
    assert summary.sparsity.overall == pytest.approx(64 / 256)


def test_sparsity_leaves_external_weights_unmapped_and_usable(tmp_path):
    path = os.path.join(tmp_path, "model.onnx")
    ir.save(with_sparse_weight(zeros=10), path, external_data="x.data")
    model = ir.load(path)
    weight = model.graph.initializers["w"].const_value
    assert isinstance(weight, ir.ExternalTensor)

    summarize(model, path)

    assert weight.raw is None
    assert np.count_nonzero(weight.numpy() == 0) == 10


def test_as_dict_is_json():
    summary = summarize(parse(MATMUL_TEXT))

    data = json.loads(json.dumps(summary.as_dict()))

    assert data["op_histogram"] == {"Add": 1, "Constant": 1, "MatMul": 1}
    assert data["inputs"] == [{"name": "x", "dtype": "float", "shape": ["N", 3]}]
    assert data["uses_external_data"] is False
    assert data["sparsity"]["top"][0]["name"] == "w"


def test_render_summary_shows_ops_and_interface():
    console = Console(record=True, width=120)

    render_summary(summarize(parse(MATMUL_TEXT)), console)

    text = console.export_text()
    for expected in ("MatMul", "ai.onnx 17", "[N, ?]", "77.8%", "tests 1.0"):
        assert expected in text


def test_render_before_after_shows_op_changes():
    before = summarize(parse(MATMUL_TEXT))
    after_model = parse(MATMUL_TEXT)
    constant = next(node for node in after_model.graph if node.op_type == "Constant")
    after_model.graph.remove(constant)
    after = summarize(after_model)
    console = Console(record=True, width=120)

    render_before_after(before, after, console)

    rows = {cells[0]: cells[1:] for cells in table_rows(console.export_text())}
    assert rows["Constant"] == ["1", "0", "-1"]
    assert rows["MatMul"] == ["1", "1", ""]
    assert rows["nodes"] == ["3", "2", "-1 (-33.3%)"]
    assert rows["opset"] == ["17", "17", ""]


def table_rows(text: str) -> list[list[str]]:
    """The cells of each body row of a rich table printed as text."""
    return [
        [cell.strip() for cell in line.strip("│").split("│")]
        for line in text.splitlines()
        if line.startswith("│")
    ]
