"""Small generated models the tests share."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def classifier_proto(seed: int = 0, opset: int = 17) -> onnx.ModelProto:
    """A small CNN classifier with the things cleanup removes: a BatchNorm, an Identity, a Constant.

    x[N,3,8,8] -> Conv -> BatchNormalization -> Relu -> Identity -> GlobalAveragePool -> Flatten
    -> Gemm (weights from a Constant node) -> logits[N,5]
    """
    rng = np.random.default_rng(seed)
    conv_weight = numpy_helper.from_array(
        rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "conv.weight"
    )
    conv_bias = numpy_helper.from_array(rng.standard_normal(4).astype(np.float32), "conv.bias")
    bn = {
        name: numpy_helper.from_array(values.astype(np.float32), f"bn.{name}")
        for name, values in {
            "scale": rng.uniform(0.5, 1.5, 4),
            "bias": rng.standard_normal(4),
            "mean": rng.standard_normal(4) * 0.1,
            "var": rng.uniform(0.5, 1.5, 4),
        }.items()
    }
    fc_weight = numpy_helper.from_array(rng.standard_normal((5, 4)).astype(np.float32), "fc.weight")
    fc_bias = numpy_helper.from_array(rng.standard_normal(5).astype(np.float32), "fc.bias")
    nodes = [
        helper.make_node(
            "Conv", ["x", "conv.weight", "conv.bias"], ["conv"], pads=[1, 1, 1, 1], name="conv"
        ),
        helper.make_node(
            "BatchNormalization",
            ["conv", "bn.scale", "bn.bias", "bn.mean", "bn.var"],
            ["bn"],
            name="bn",
        ),
        helper.make_node("Relu", ["bn"], ["relu"], name="relu"),
        helper.make_node("Identity", ["relu"], ["identity"], name="identity"),
        helper.make_node("GlobalAveragePool", ["identity"], ["pool"], name="pool"),
        helper.make_node("Flatten", ["pool"], ["flat"], axis=1, name="flatten"),
        helper.make_node("Constant", [], ["fc.weight"], value=fc_weight, name="fc.weight.constant"),
        helper.make_node("Gemm", ["flat", "fc.weight", "fc.bias"], ["logits"], transB=1, name="fc"),
    ]
    graph = helper.make_graph(
        nodes,
        "classifier",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 5])],
        initializer=[conv_weight, conv_bias, *bn.values(), fc_bias],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="tests"
    )
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def external_data_classifier(path: Path) -> Path:
    """The classifier saved at ``path`` with every weight in ``<name>.data`` beside it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(
        classifier_proto(),
        str(path),
        save_as_external_data=True,
        location=f"{path.name}.data",
        size_threshold=0,
    )
    return path
