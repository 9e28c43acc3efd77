from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

from onnxopt.passes.base import PassResult
from onnxopt.passes.eliminate_identity import EliminateIdentityPass
from tests.helpers import assert_outputs_close, count_ops, model_from_text, output_names, run_model

X = {"x": np.array([0.5, -1.0, 2.0], dtype=np.float32)}
BOTH_BRANCHES = [{**X, "condition": np.array(value)} for value in (True, False)]


def eliminate(text: str, feeds: list[dict[str, np.ndarray]]) -> tuple[PassResult, ir.Model]:
    """Run the pass over ``text``'s model, check outputs and names; return the result and the model."""
    model = model_from_text(text)
    names = output_names(model)
    before = [run_model(model, feed) for feed in feeds]
    result = EliminateIdentityPass()(model)
    assert output_names(model) == names
    for feed, expected in zip(feeds, before, strict=True):
        assert_outputs_close(run_model(model, feed), expected)
    return result, model


def test_eliminate_identity_removes_inner_and_output_identities():
    result, model = eliminate(
        """
<ir_version: 8, opset_import: ["" : 17]>
g (float[3] x) => (float[3] y) {
    relu = Relu(x)
    copy = Identity(relu)
    negative = Neg(copy)
    y = Identity(negative)
}
""",
        [X],
    )
    assert result.changes == 2
    assert count_ops(model) == {"Relu": 1, "Neg": 1}


def test_eliminate_identity_keeps_identity_from_graph_input_to_output():
    result, model = eliminate(
        """
<ir_version: 8, opset_import: ["" : 17]>
g (float[3] x) => (float[3] y) {
    y = Identity(x)
}
""",
        [X],
    )
    assert result.changes == 0
    assert count_ops(model) == {"Identity": 1}


def test_eliminate_identity_keeps_identity_between_two_outputs():
    result, _ = eliminate(
        """
<ir_version: 8, opset_import: ["" : 17]>
g (float[3] x) => (float[3] relu, float[3] copy) {
    relu = Relu(x)
    copy = Identity(relu)
}
""",
        [X],
    )
    assert result.changes == 0


@pytest.mark.parametrize("outputs", ["float[3] y", "float[3] relu, float[3] y"])
def test_eliminate_identity_keeps_subgraph_output_taken_from_outer_scope(outputs):
    result, model = eliminate(
        f"""
<ir_version: 8, opset_import: ["" : 17]>
g (float[3] x, bool condition) => ({outputs}) {{
    relu = Relu(x)
    y = If(condition) <
        then_branch = then_graph () => (float[3] then_y) {{ then_y = Identity(relu) }},
        else_branch = else_graph () => (float[3] else_y) {{ copy = Identity(x)  else_y = Neg(copy) }}
    >
}}
""",
        BOTH_BRANCHES,
    )
    assert result.changes == 1
    assert count_ops(model) == {"Relu": 1, "If": 1, "Identity": 1, "Neg": 1}


def test_eliminate_identity_removes_identity_in_functions():
    result, model = eliminate(
        """
<ir_version: 8, opset_import: ["" : 17, "local" : 1]>
g (float[3] x) => (float[3] y) {
    y = local.negate(x)
}
<domain: "local", opset_import: ["" : 17]>
negate (input) => (output) {
    copy = Identity(input)
    output = Neg(copy)
}
""",
        [X],
    )
    assert result.changes == 1
    assert count_ops(model) == {"negate": 1, "Neg": 1}
