"""Forms exporters and onnxruntime's optimizer give one layer, read alike: a LayerNorm
spelled out or fused, weights transposed by a node, onnxruntime's FusedMatMul, attention
whose query and key differ only in the side of the MatMul they enter."""

from __future__ import annotations

import logging

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxopt.api import transfer_model
from onnxopt.transfer import TransferSettings, transfer_weights
from tests.helpers import run_model

WIDTH = 6


def build(nodes, arrays, opset: int = 17, check: bool = True) -> ir.Model:
    """x[1, 4, WIDTH] -> ``nodes`` -> y[1, 4, WIDTH], with ``arrays`` as initializers."""
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, WIDTH])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, WIDTH])],
        initializer=[
            numpy_helper.from_array(np.asarray(array, np.float32), name)
            for name, array in arrays.items()
        ],
    )
    proto = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid("com.microsoft", 1)],
    )
    proto.ir_version = 8
    if check:
        onnx.checker.check_model(proto)
    return ir.from_proto(proto)


def parameters(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "gamma": rng.uniform(0.5, 1.5, WIDTH),
        "beta": rng.standard_normal(WIDTH),
        "w": rng.standard_normal((WIDTH, WIDTH)) / 3,
        "wq": rng.standard_normal((WIDTH, WIDTH)) / 3,
        "wk": rng.standard_normal((WIDTH, WIDTH)) / 3,
    }


SAMPLE = {"x": np.random.default_rng(9).standard_normal((1, 4, WIDTH)).astype(np.float32)}


def fused_norm(seed: int, opset: int = 17, check: bool = True) -> ir.Model:
    values = parameters(seed)
    return build(
        [
            helper.make_node("LayerNormalization", ["x", "gamma", "beta"], ["n"], axis=-1),
            helper.make_node("MatMul", ["n", "w"], ["y"]),
        ],
        {name: values[name] for name in ("gamma", "beta", "w")},
        opset,
        check,
    )


def spelled_out_norm(seed: int) -> ir.Model:
    """The same network as exporters before LayerNormalization wrote it, the MatMul's
    weight stored transposed and turned by a Transpose node."""
    values = parameters(seed)
    return build(
        [
            helper.make_node("ReduceMean", ["x"], ["mean"], axes=[-1]),
            helper.make_node("Sub", ["x", "mean"], ["centred"]),
            helper.make_node("Mul", ["centred", "centred"], ["squared"]),
            helper.make_node("ReduceMean", ["squared"], ["variance"], axes=[-1]),
            helper.make_node("Add", ["variance", "epsilon"], ["shifted"]),
            helper.make_node("Sqrt", ["shifted"], ["deviation"]),
            helper.make_node("Div", ["centred", "deviation"], ["normalized"]),
            helper.make_node("Mul", ["normalized", "gamma"], ["scaled"]),
            helper.make_node("Add", ["scaled", "beta"], ["n"]),
            helper.make_node("Transpose", ["w_t"], ["w"], perm=[1, 0]),
            helper.make_node("MatMul", ["n", "w"], ["y"]),
        ],
        {
            "gamma": values["gamma"],
            "beta": values["beta"],
            "w_t": values["w"].T,
            "epsilon": np.array(1e-5),
        },
    )


def test_a_spelled_out_layernorm_and_a_fused_one_exchange_weights():
    fused = fused_norm(seed=0)
    report = transfer_weights(fused, spelled_out_norm(seed=1), TransferSettings(match="structure"))
    assert report.equivalent
    np.testing.assert_allclose(
        run_model(fused, SAMPLE)[0], run_model(spelled_out_norm(1), SAMPLE)[0], atol=1e-4
    )
    spelled = spelled_out_norm(seed=2)
    transfer_weights(spelled, fused_norm(seed=3), TransferSettings(match="structure"))
    np.testing.assert_allclose(
        run_model(spelled, SAMPLE)[0], run_model(fused_norm(3), SAMPLE)[0], atol=1e-4
    )
    np.testing.assert_allclose(
        spelled.graph.initializers["w_t"].const_value.numpy(), parameters(3)["w"].T, rtol=1e-6
    )


def test_onnxruntime_fused_matmul_with_a_scale_reads_as_its_dense_layer():
    values = parameters(4)
    target = build(
        [
            helper.make_node(
                "FusedMatMul", ["x", "w"], ["y"], domain="com.microsoft", alpha=2.0, transB=1
            )
        ],
        {"w": np.eye(WIDTH)},
    )
    source = build([helper.make_node("MatMul", ["x", "w"], ["y"])], {"w": values["w"]})
    report = transfer_weights(target, source)
    assert report.equivalent
    np.testing.assert_allclose(
        run_model(target, SAMPLE)[0], run_model(source, SAMPLE)[0], rtol=1e-5, atol=1e-6
    )


def attention(seed: int, key_first: bool) -> ir.Model:
    """Scores softmax(Q K^T) V with V = x: the query and key projections differ only in
    the side of the scores' MatMul they enter; ``key_first`` lists the key's node first."""
    values = parameters(seed)
    query = helper.make_node("MatMul", ["x", "wq"], ["q"])
    key = helper.make_node("MatMul", ["x", "wk"], ["k"])
    return build(
        [
            *([key, query] if key_first else [query, key]),
            helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 2, 1]),
            helper.make_node("MatMul", ["q", "kt"], ["scores"]),
            helper.make_node("Softmax", ["scores"], ["weights"], axis=-1),
            helper.make_node("MatMul", ["weights", "x"], ["y"]),
        ],
        {"wq": values["wq"], "wk": values["wk"]},
    )


def test_query_and_key_pair_by_the_side_of_the_scores_they_enter():
    target, source = attention(5, key_first=False), attention(6, key_first=True)
    report = transfer_weights(target, source, TransferSettings(match="structure"))
    assert report.equivalent
    np.testing.assert_allclose(
        run_model(target, SAMPLE)[0], run_model(source, SAMPLE)[0], rtol=1e-5, atol=1e-6
    )


def test_a_target_the_checker_refuses_on_its_own_is_checked_by_onnxruntime(caplog):
    """onnxruntime writes LayerNormalization at opsets before 17, which it runs and the
    onnx checker refuses: the transfer is not blamed for it."""
    target = fused_norm(seed=7, opset=14, check=False)
    with caplog.at_level(logging.WARNING):
        result = transfer_model(fused_norm(seed=8), target)
    assert "fails the onnx checker on its own" in caplog.text
    np.testing.assert_allclose(
        run_model(result.model, SAMPLE)[0], run_model(fused_norm(8), SAMPLE)[0], atol=1e-5
    )


@pytest.mark.parametrize("key_first", [False, True])
def test_self_transfer_of_attention_is_exact(key_first):
    model = attention(10, key_first)
    report = transfer_weights(model.clone(), model, TransferSettings(match="structure"))
    assert report.equivalent
