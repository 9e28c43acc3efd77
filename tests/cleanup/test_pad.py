from __future__ import annotations

import numpy as np
import pytest

from onnxopt.cleanup.pad import fuse_pads
from onnxopt.shapes import infer_shapes
from tests.helpers import count_ops, model_from_text, run_model

RNG = np.random.default_rng(0)
FLOAT_WEIGHTS = ", ".join(f"{value:.3f}" for value in np.linspace(-1, 1, 54))
BYTE_WEIGHTS = ", ".join(str(value) for value in RNG.integers(0, 256, 54))


def test_a_pad_adds_to_the_pads_auto_pad_stood_for():
    model = model_from_text(f"""
<ir_version: 8, opset_import: ["" : 17]>
g (float[1, 2, 5, 5] x) => (float[1, 3, 7, 7] y)
<int64[8] pads = {{0, 0, 1, 1, 0, 0, 1, 1}}, float[3, 2, 3, 3] w = {{{FLOAT_WEIGHTS}}}> {{
    padded = Pad(x, pads)
    y = Conv<auto_pad = "SAME_UPPER">(padded, w)
}}
""")
    feed = {"x": RNG.standard_normal((1, 2, 5, 5)).astype(np.float32)}
    expected = run_model(model, feed)
    infer_shapes(model)
    result = fuse_pads(model)
    assert (result.fused, result.made_explicit) == (1, 1)
    conv = model.graph.node(0)
    assert list(conv.attributes.get_ints("pads")) == [2, 2, 2, 2]
    assert conv.attributes.get_string("auto_pad") == "NOTSET"
    np.testing.assert_allclose(run_model(model, feed), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("zero_point", "fused"), [(0, 1), (128, 0)])
def test_conv_integer_takes_a_zero_pad_only_when_it_pads_with_zero_too(zero_point, fused):
    # ConvInteger pads with its input zero point; a Pad with 0 there is another computation.
    model = model_from_text(f"""
<ir_version: 8, opset_import: ["" : 17]>
g (uint8[1, 2, 5, 5] x) => (int32[1, 3, 5, 5] y)
<int64[8] pads = {{0, 0, 1, 1, 0, 0, 1, 1}}, uint8[3, 2, 3, 3] w = {{{BYTE_WEIGHTS}}}, uint8 x_zero = {{{zero_point}}}> {{
    padded = Pad(x, pads)
    y = ConvInteger(padded, w, x_zero)
}}
""")
    feed = {"x": RNG.integers(0, 256, (1, 2, 5, 5)).astype(np.uint8)}
    expected = run_model(model, feed)
    infer_shapes(model)
    assert fuse_pads(model).fused == fused
    assert count_ops(model).get("Pad", 0) == 1 - fused
    assert {node.domain for node in model.graph} == {""}
    np.testing.assert_array_equal(run_model(model, feed), expected)
