from __future__ import annotations

import math

import numpy as np
import onnx_ir as ir

from onnxopt.graph import UniqueNames, add_initializer, clip_bound, default_opset
from tests.helpers import model_from_text

CLIPS = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[4] x, float low_input) => (float[4] a, float[4] b, float[4] c) <float low = {-1.0}> {
    a = Clip(x, low)
    b = Clip(x)
    c = Clip(x, low_input)
}
"""


def test_default_opset_under_either_domain_name():
    model = model_from_text(CLIPS)
    assert default_opset(model) == 17
    model.opset_imports.clear()
    model.opset_imports["ai.onnx"] = 13
    assert default_opset(model) == 13
    model.opset_imports.clear()
    assert default_opset(model) == 1


def test_clip_bounds_from_constants_absent_or_unknown():
    clip_constant, clip_open, clip_input = model_from_text(CLIPS).graph
    assert (clip_bound(clip_constant, 1, "min"), clip_bound(clip_constant, 2, "max")) == (
        -1.0,
        math.inf,
    )
    assert clip_bound(clip_open, 1, "min") == -math.inf
    assert clip_bound(clip_input, 1, "min") is None


def test_unique_names_avoid_values_nodes_inputs_and_each_other():
    model = model_from_text(CLIPS)
    model.graph.node(0).name = "taken_node"
    unique = UniqueNames(model.graph)
    assert unique("x") == "x_2"
    assert unique("low") == "low_2"
    assert unique("taken_node") == "taken_node_2"
    assert unique("fresh") == "fresh"
    assert unique("fresh") == "fresh_2"


def test_add_initializer_registers_a_typed_constant():
    model = model_from_text(CLIPS)
    value = add_initializer(model.graph, "scale", np.array([0.5], np.float32))
    assert model.graph.initializers["scale"] is value
    assert value.dtype == ir.DataType.FLOAT and value.shape == ir.Shape([1])
    assert value.const_value.numpy().tolist() == [0.5]
