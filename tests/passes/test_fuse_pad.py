from __future__ import annotations

import numpy as np

from onnxopt.passes.fuse_pad import FusePadIntoConvPass
from tests.helpers import count_ops, model_from_text, run_model

PAD_CONV = """
<ir_version: 8, opset_import: ["" : 17]>
padded (float[1, 2, 5, 5] x) => (float[1, 3, 5, 5] y)
<int64[8] pads = {0, 0, 1, 1, 0, 0, 1, 1}, float[3, 2, 3, 3] w = {%s}> {
    padded = Pad(x, pads)
    y = Conv(padded, w)
}
"""

REFLECT_PAD_CONV = PAD_CONV.replace(
    "padded = Pad(x, pads)", 'padded = Pad <mode = "reflect"> (x, pads)'
)


def weights() -> str:
    return ", ".join(f"{value:.3f}" for value in np.linspace(-1, 1, 54))


def test_zero_pad_folds_into_the_conv():
    model = model_from_text(PAD_CONV % weights())
    feed = {"x": np.random.default_rng(0).standard_normal((1, 2, 5, 5)).astype(np.float32)}
    expected = run_model(model, feed)
    result = FusePadIntoConvPass()(model)
    assert result.modified
    assert result.changes == 1
    assert count_ops(model) == {"Conv": 1}
    np.testing.assert_allclose(run_model(model, feed), expected, rtol=1e-5, atol=1e-6)


def test_reflect_padding_is_left_alone():
    model = model_from_text(REFLECT_PAD_CONV % weights())
    assert not FusePadIntoConvPass()(model).modified
    assert count_ops(model) == {"Pad": 1, "Conv": 1}
