from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxscript.optimizer
import pytest

from onnxopt.cleanup.constants import fold_constants, rewrites_beyond_opset
from onnxopt.cleanup.holding import HOLDING_DOMAIN
from tests.helpers import assert_outputs_close, count_ops, model_from_text, run_model

FEEDS = {
    "x": np.arange(6, dtype=np.float32).reshape(2, 3),
    "z": np.arange(6, dtype=np.float32) - 2.5,
}

# Ops the folder rewrites into forms of newer opsets: a Shape into Constant<value_ints> (opset
# 12) in the graph, a ConcatFromSequence into Unsqueeze with axes as an input (13) in a
# function; beside them an Add it may fold whatever the opset.
REWRITTEN = """
<ir_version: 8, opset_import: ["" : {opset}, "local" : 1]>
g (float[2,3] x, float[6] z) => (float[2,3] y, float[2,3,2] w) <float[3] a = {{1.0, 2.0, 3.0}}> {{
    sum = Add(a, a)
    shape = Shape(x)
    reshaped = Reshape(z, shape)
    y = Add(reshaped, sum)
    w = local.stack(x)
}}
<domain: "local", opset_import: ["" : {opset}]>
stack (x) => (y) {{
    sequence = SequenceConstruct(x, x)
    y = ConcatFromSequence<axis = -1, new_axis = 1>(sequence)
}}
"""


def all_nodes(model: ir.Model) -> list[ir.Node]:
    nodes = list(model.graph.all_nodes())
    for function in model.functions.values():
        nodes.extend(function.all_nodes())
    return nodes


def test_ops_the_opset_lacks_the_rewrite_of_are_held_back_and_the_rest_folds():
    model = model_from_text(REWRITTEN.format(opset=11))
    before = run_model(model, FEEDS)
    assert {node.op_type for node in rewrites_beyond_opset(model)} == {
        "Shape",
        "ConcatFromSequence",
    }
    result = fold_constants(model)
    assert result.folded == 1
    assert count_ops(model) == {
        "Shape": 1,
        "Reshape": 1,
        "Add": 1,
        "stack": 1,
        "SequenceConstruct": 1,
        "ConcatFromSequence": 1,
    }
    assert {node.domain for node in all_nodes(model)} == {"", "local"}
    onnx.checker.check_model(ir.to_proto(model), full_check=True)
    assert_outputs_close(run_model(model, FEEDS), before)


def test_from_opset_13_they_are_rewritten_too():
    model = model_from_text(REWRITTEN.format(opset=13))
    before = run_model(model, FEEDS)
    assert not rewrites_beyond_opset(model)
    result = fold_constants(model)
    assert result.folded == 3
    assert not {"Shape", "ConcatFromSequence"} & set(count_ops(model))
    onnx.checker.check_model(ir.to_proto(model), full_check=True)
    assert_outputs_close(run_model(model, FEEDS), before)


def test_every_domain_comes_back_when_the_folder_raises(monkeypatch):
    model = model_from_text(REWRITTEN.format(opset=11))
    domains = {node: node.domain for node in all_nodes(model)}
    seen = {}

    def broken_folder(model: ir.Model, **options: object) -> None:
        seen.update({node.name or node.op_type: node.domain for node in all_nodes(model)})
        raise RuntimeError("the folder broke")

    monkeypatch.setattr(onnxscript.optimizer, "fold_constants_ir", broken_folder)
    with pytest.raises(RuntimeError, match="the folder broke"):
        fold_constants(model)
    assert seen["Shape"] == seen["ConcatFromSequence"] == HOLDING_DOMAIN
    assert seen["Reshape"] == seen["SequenceConstruct"] == ""
    assert {node: node.domain for node in all_nodes(model)} == domains
    assert HOLDING_DOMAIN not in {node.domain for node in all_nodes(model)}


def test_an_if_on_a_constant_condition_counts_once_with_what_its_branch_folds():
    model = model_from_text("""
<ir_version: 8, opset_import: ["" : 17]>
g (float[2,3] x, float[6] z) => (float[2,3] y) {
    condition = Constant<value = bool {1}>()
    y = If(condition) <
        then_branch = then_graph () => (float[2,3] then_y) { shape = Shape(x)  then_y = Reshape(z, shape) },
        else_branch = else_graph () => (float[2,3] else_y) { a = Neg(x)  b = Neg(a)  else_y = Neg(b) }
    >
}
""")
    before = run_model(model, FEEDS)
    result = fold_constants(model)
    # The If and the Shape in the branch it keeps; not the three Neg of the branch it drops.
    assert result.folded == 2
    assert result.removed.nodes == 1
    assert count_ops(model) == {"Constant": 1, "Reshape": 1}
    assert_outputs_close(run_model(model, FEEDS), before)
