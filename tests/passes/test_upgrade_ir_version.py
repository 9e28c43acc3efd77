from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir

from onnxopt.passes.fold_constants import FoldConstantsPass
from onnxopt.passes.upgrade_ir_version import UpgradeIrVersionPass
from tests.helpers import count_ops, run_model

OLD_MODEL = """
<ir_version: 3, opset_import: ["" : 9]>
old (float[2] x, float[2] w, float[2] b) => (float[2] y) <float[2] w = {1.0, 2.0}, float[2] b = {3.0, 4.0}> {
    wb = Mul(w, b)
    y = Add(x, wb)
}
"""


def old_model(ir_version: int = 3) -> ir.Model:
    proto = onnx.parser.parse_model(OLD_MODEL)
    proto.ir_version = ir_version
    return ir.from_proto(proto)


def test_old_models_lose_their_initializer_inputs_so_weights_fold():
    model = old_model()
    feed = {"x": np.array([1.0, 1.0], np.float32)}
    expected = run_model(model, feed)
    result = UpgradeIrVersionPass()(model)
    assert result.modified
    assert model.ir_version == 4
    assert [value.name for value in model.graph.inputs] == ["x"]
    FoldConstantsPass()(model)
    assert count_ops(model) == {"Add": 1}
    np.testing.assert_array_equal(run_model(model, feed), expected)


def test_newer_models_keep_overridable_initializer_inputs():
    model = old_model(ir_version=8)
    assert not UpgradeIrVersionPass()(model).modified
    assert [value.name for value in model.graph.inputs] == ["x", "w", "b"]
