"""Small float models for quantization tests, and their activation ranges measured directly."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
from onnx import TensorProto, helper, numpy_helper

from onnxopt import runtime
from onnxopt.calibration import CalibrationResult, CalibrationSettings, calibrate_model
from onnxopt.calibration.collect import collect_statistics
from onnxopt.data import open_data
from onnxopt.shapes import infer_shapes


def build(
    nodes: list[onnx.NodeProto],
    inputs: dict[str, list[int | str]],
    outputs: dict[str, list[int | str]],
    weights: dict[str, np.ndarray],
    opset: int = 17,
) -> ir.Model:
    """A float32 model from nodes, with shapes inferred as the quantizer expects."""
    graph = helper.make_graph(
        nodes,
        "test",
        [
            helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)
            for name, shape in inputs.items()
        ],
        [
            helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)
            for name, shape in outputs.items()
        ],
        initializer=[numpy_helper.from_array(array, name) for name, array in weights.items()],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    proto.ir_version = 8
    onnx.checker.check_model(proto)
    model = ir.from_proto(proto)
    infer_shapes(model)
    return model


def random_weights(seed: int = 0, **shapes: tuple[int, ...]) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        name: (rng.standard_normal(shape) * 0.3).astype(np.float32)
        for name, shape in shapes.items()
    }


def feeds(model: ir.Model, count: int = 8, seed: int = 1) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [
        {
            spec.name: rng.standard_normal(runtime.concrete_shape(spec)).astype(np.float32)
            for spec in runtime.input_specs(model)
        }
        for _ in range(count)
    ]


def measured_ranges(
    model: ir.Model, samples: list[dict[str, np.ndarray]]
) -> dict[str, tuple[float, float]]:
    """Global min/max of every float tensor over the samples, as the calibration collectors see it."""
    return {
        name: (statistics.minimum, statistics.maximum)
        for name, statistics in collect_statistics(model, None, samples).items()
    }


def run(model: ir.Model, samples: list[dict[str, np.ndarray]]) -> np.ndarray:
    session = runtime.create_session(model)
    return np.concatenate([session.run(None, sample)[0].reshape(-1) for sample in samples])


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))


def ops(model: ir.Model) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in model.graph:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


def calibrated(model: ir.Model, samples: list[dict[str, np.ndarray]]) -> CalibrationResult:
    """What the calibrate pass leaves in ``context.calibration``: min/max ranges, channel means."""
    return calibrate_model(model, open_data(samples, model), CalibrationSettings("minmax"))
