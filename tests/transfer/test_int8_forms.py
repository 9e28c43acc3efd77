"""Transfer into onnxopt's own int8 forms for transformers: MatMulInteger with run-time
activation scales, int8 embedding tables with a scale per row, float16 norms and biases."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
from onnx import TensorProto, helper, numpy_helper

from onnxopt.api import optimize
from onnxopt.transfer import TransferSettings, transfer_weights
from tests.helpers import count_ops, run_model

ROWS, WIDTH = 2048, 32  # a table of 65536 values: the quantizer's smallest int8 table


def encoder(seed: int) -> ir.Model:
    """ids -> embedding table -> LayerNorm -> MatMul + bias -> Relu -> MatMul."""
    rng = np.random.default_rng(seed)
    arrays = {
        "table": rng.standard_normal((ROWS, WIDTH)),
        "ln_scale": rng.uniform(0.5, 1.5, WIDTH),
        "ln_bias": rng.standard_normal(WIDTH) * 0.1,
        "w1": rng.standard_normal((WIDTH, WIDTH)) / 6,
        "b1": rng.standard_normal(WIDTH) * 0.1,
        "w2": rng.standard_normal((WIDTH, 16)) / 6,
    }
    nodes = [
        helper.make_node("Gather", ["table", "ids"], ["embedded"]),
        helper.make_node(
            "LayerNormalization", ["embedded", "ln_scale", "ln_bias"], ["normed"], axis=-1
        ),
        helper.make_node("MatMul", ["normed", "w1"], ["hidden"]),
        helper.make_node("Add", ["hidden", "b1"], ["biased"]),
        helper.make_node("Relu", ["biased"], ["active"]),
        helper.make_node("MatMul", ["active", "w2"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "encoder",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, [1, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 16, 16])],
        initializer=[
            numpy_helper.from_array(array.astype(np.float32), name)
            for name, array in arrays.items()
        ],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    onnx.checker.check_model(proto)
    return ir.from_proto(proto)


def test_new_weights_into_dynamic_int8_matmuls_and_an_int8_table(tmp_path):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "calib.npz", ids=rng.integers(0, ROWS, (32, 1, 16)))
    quantized = optimize(
        encoder(0),
        None,
        recipe="int8",
        data=tmp_path / "calib.npz",
        overrides=["fallback.min_speedup=none", "validate.min_cosine=0"],
        timing=False,
    ).model
    ops = count_ops(quantized)
    assert ops["MatMulInteger"] == 2 and ops["Gather"] == 2 and "MatMul" not in ops
    source = encoder(1)
    report = transfer_weights(quantized, source, TransferSettings(weight_scales="widen"))
    assert [slot.target for slot in report.slots if slot.left] == []
    sources = {slot.source for slot in report.slots}
    assert sources == {"table", "ln_scale", "ln_bias", "w1", "b1", "w2"}
    by_name = {slot.source: slot.transform for slot in report.slots}
    assert "requantized to int8" in by_name["table"] and "requantized" in by_name["w1"]
    ids = {"ids": rng.integers(0, ROWS, (1, 16))}
    got, expected = run_model(quantized, ids)[0], run_model(source, ids)[0]
    cosine = np.dot(got.ravel(), expected.ravel()) / (
        np.linalg.norm(got) * np.linalg.norm(expected)
    )
    assert cosine > 0.999
    assert count_ops(quantized)["MatMulInteger"] == 2
