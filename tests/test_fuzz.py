"""Property-based tests: random small valid graphs through every preset.

Each generated model (a chain of Conv, depthwise Conv, BatchNorm, activations, per-channel
constants, pooling, upsampling, residual sums, parallel branches concatenated, a Flatten and
Gemm head, at an opset from 13 to 21, with a fixed or a free batch) goes
through ``cleanup``, ``int8``, ``prune``, ``sparsify`` and ``prune-int8`` with calibration
data of its shapes. The result is written and loads in onnxruntime, or onnxopt refuses with
one of its errors (never another exception, never a written model that fails to load).

A fixed seed and a few examples per run in CI; ``make fuzz`` runs many more
(``ONNXOPT_FUZZ_EXAMPLES``).
"""

from __future__ import annotations

import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from onnxopt.api import optimize
from onnxopt.errors import OnnxoptError

EXAMPLES = int(os.environ.get("ONNXOPT_FUZZ_EXAMPLES", "8"))
PRESETS = ("cleanup", "int8", "prune", "sparsify", "prune-int8")
STEPS = (
    "conv",
    "batchnorm",
    "relu",
    "clip",
    "sigmoid",
    "hardswish",
    "scale",
    "shift",
    "pool",
    "upsample",
    "branches",
    "residual",
)


class _Builder:
    """Appends nodes to a chain whose current tensor is [1, channels, size, size]."""

    def __init__(self, draw, channels: int, size: int, opset: int):
        self.draw = draw
        self.opset = opset
        self.rng = np.random.default_rng(draw(st.integers(0, 2**16)))
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.current, self.channels, self.size = "x", channels, size

    def constant(self, array: np.ndarray) -> str:
        name = f"c{len(self.initializers)}"
        self.initializers.append(numpy_helper.from_array(array.astype(np.float32), name))
        return name

    def node(self, op: str, inputs: list[str], **attributes) -> str:
        output = f"t{len(self.nodes)}"
        self.nodes.append(helper.make_node(op, inputs, [output], name=output, **attributes))
        return output

    def conv(self, source: str, channels_in: int) -> tuple[str, int]:
        channels = self.draw(st.integers(1, 12))
        kernel = self.draw(st.sampled_from([1, 3]))
        group = channels_in if kernel == 3 and self.draw(st.booleans()) else 1
        if group > 1:
            channels = channels_in
        weight = self.rng.standard_normal((channels, channels_in // group, kernel, kernel))
        inputs = [source, self.constant(weight / kernel)]
        if self.draw(st.booleans()):
            inputs.append(self.constant(self.rng.standard_normal(channels) * 0.1))
        pad = kernel // 2
        output = self.node("Conv", inputs, pads=[pad] * 4, group=group)
        return output, channels

    def step(self, kind: str) -> None:
        shape = (1, self.channels, 1, 1)
        if kind == "conv":
            self.current, self.channels = self.conv(self.current, self.channels)
        elif kind == "batchnorm":
            parameters = [
                self.rng.uniform(0.5, 1.5, self.channels),
                self.rng.standard_normal(self.channels) * 0.1,
                self.rng.standard_normal(self.channels) * 0.1,
                self.rng.uniform(0.5, 1.5, self.channels),
            ]
            names = [self.constant(array) for array in parameters]
            self.current = self.node("BatchNormalization", [self.current, *names])
        elif kind == "relu":
            self.current = self.node("Relu", [self.current])
        elif kind == "sigmoid":
            self.current = self.node("Sigmoid", [self.current])
        elif kind == "hardswish" and self.opset >= 14:
            self.current = self.node("HardSwish", [self.current])
        elif kind == "upsample" and self.size <= 8:
            scales = self.constant(np.array([1.0, 1.0, 2.0, 2.0]))
            self.current = self.node("Resize", [self.current, "", scales], mode="nearest")
            self.size *= 2
        elif kind == "residual":
            branch, channels = self.conv(self.current, self.channels)
            if channels == self.channels:
                self.current = self.node("Add", [self.current, self.node("Relu", [branch])])
        elif kind == "clip":
            low, high = self.constant(np.array(0.0)), self.constant(np.array(6.0))
            self.current = self.node("Clip", [self.current, low, high])
        elif kind in ("scale", "shift"):
            values = self.constant(self.rng.uniform(0.5, 1.5, shape))
            op = "Mul" if kind == "scale" else "Add"
            self.current = self.node(op, [self.current, values])
        elif kind == "pool" and self.size >= 2:
            op = self.draw(st.sampled_from(["MaxPool", "AveragePool"]))
            self.current = self.node(op, [self.current], kernel_shape=[2, 2], strides=[2, 2])
            self.size //= 2
        elif kind == "branches":
            left, left_channels = self.conv(self.current, self.channels)
            right, right_channels = self.conv(self.current, self.channels)
            self.current = self.node("Concat", [left, right], axis=1)
            self.channels = left_channels + right_channels

    def head(self, classes: int) -> str:
        pooled = self.node("GlobalAveragePool", [self.current])
        flat = self.node("Flatten", [pooled], axis=1)
        weight = self.constant(self.rng.standard_normal((classes, self.channels)))
        bias = self.constant(self.rng.standard_normal(classes) * 0.1)
        return self.node("Gemm", [flat, weight, bias], transB=1)


@st.composite
def models(draw) -> onnx.ModelProto:
    """A small valid CNN: an input conv, 1 to 6 random steps, then a classifier head."""
    channels, size = draw(st.integers(1, 4)), draw(st.sampled_from([4, 8, 12]))
    opset = draw(st.integers(13, 21))
    builder = _Builder(draw, channels, size, opset)
    builder.current, builder.channels = builder.conv("x", channels)
    for kind in draw(st.lists(st.sampled_from(STEPS), min_size=1, max_size=6)):
        builder.step(kind)
    classes = draw(st.integers(2, 10))
    output = builder.head(classes)
    batch = draw(st.sampled_from([1, "N"]))
    graph = helper.make_graph(
        builder.nodes,
        "fuzz",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, channels, size, size])],
        [helper.make_tensor_value_info(output, TensorProto.FLOAT, [batch, classes])],
        initializer=builder.initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


@pytest.mark.parametrize("preset", PRESETS)
@settings(
    max_examples=EXAMPLES,
    derandomize=True,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(model=models())
def test_every_preset_writes_a_loadable_model_or_refuses_clearly(tmp_path, preset, model):
    source = tmp_path / "model.onnx"
    onnx.save(model, str(source))
    shape = [dim.dim_value or 1 for dim in model.graph.input[0].type.tensor_type.shape.dim]
    data = tmp_path / "calib.npz"
    rng = np.random.default_rng(0)
    np.savez(data, x=rng.standard_normal((24, *shape)).astype(np.float32))
    output = tmp_path / f"{preset}.onnx"
    output.unlink(missing_ok=True)
    try:
        result = optimize(source, output, recipe=preset, data=data, timing=False)
    except OnnxoptError as error:
        assert error.render().strip(), "an error must say what is wrong"
        assert not output.exists(), "a refused model must not be written"
        return
    assert result.passed and output.exists()
    session = ort.InferenceSession(str(output), providers=["CPUExecutionProvider"])
    feed = {"x": rng.standard_normal(shape).astype(np.float32)}
    (logits,) = session.run(None, feed)
    assert np.isfinite(logits).all()
