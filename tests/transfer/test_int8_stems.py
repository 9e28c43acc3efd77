"""Transfer into int8 stems laid out for onnxruntime: a 3x3 stem reading its channels padded to
4, a 7x7 stem reading 2x2 blocks. The weight read and written is the layer's own, in its
kernel's shape; the layout is rebuilt from it when the model loads."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxopt.api import optimize
from onnxopt.transfer import TransferSettings, transfer_weights
from tests.helpers import count_ops, run_model


def cnn(seed: int, kernel: int) -> ir.Model:
    """RGB image -> stem conv (``kernel``, stride 2) -> Relu -> 1x1 conv -> Relu -> pooled."""
    rng = np.random.default_rng(seed)
    arrays = {
        "stem_weight": rng.standard_normal((16, 3, kernel, kernel)) / kernel,
        "stem_bias": rng.standard_normal(16) * 0.1,
        "mix_weight": rng.standard_normal((16, 16, 1, 1)) / 4,
    }
    nodes = [
        helper.make_node(
            "Conv",
            ["x", "stem_weight", "stem_bias"],
            ["s"],
            pads=[kernel // 2] * 4,
            strides=[2, 2],
            name="stem",
        ),
        helper.make_node("Relu", ["s"], ["r"]),
        helper.make_node("Conv", ["r", "mix_weight"], ["m"], name="mix"),
        helper.make_node("Relu", ["m"], ["a"]),
        helper.make_node("GlobalAveragePool", ["a"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "cnn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 32, 32])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 16, 1, 1])],
        initializer=[
            numpy_helper.from_array(array.astype(np.float32), name)
            for name, array in arrays.items()
        ],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    onnx.checker.check_model(proto)
    return ir.from_proto(proto)


@pytest.mark.parametrize("kernel, layout", [(3, "Pad"), (7, "SpaceToDepth")])
def test_new_weights_into_an_int8_stem_laid_out_for_onnxruntime(tmp_path, kernel, layout):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "calib.npz", x=rng.uniform(0, 1, (32, 1, 3, 32, 32)).astype(np.float32))
    quantized = optimize(
        cnn(0, kernel),
        None,
        recipe="int8",
        data=tmp_path / "calib.npz",
        overrides=["fallback.min_speedup=none", "validate.min_cosine=0"],
        timing=False,
    ).model
    assert layout in count_ops(quantized)
    source = cnn(1, kernel)
    report = transfer_weights(quantized, source, TransferSettings(weight_scales="widen"))
    assert [slot.target for slot in report.slots if slot.left] == []
    assert {"stem_weight", "stem_bias", "mix_weight"} <= {slot.source for slot in report.slots}
    image = {"x": rng.uniform(0, 1, (1, 3, 32, 32)).astype(np.float32)}
    got, expected = run_model(quantized, image)[0], run_model(source, image)[0]
    before = run_model(cnn(0, kernel), image)[0]
    cosine = np.dot(got.ravel(), expected.ravel()) / (
        np.linalg.norm(got) * np.linalg.norm(expected)
    )
    assert cosine > 0.99
    assert not np.allclose(before, expected, atol=0.05), "the two weight sets differ"
