"""Single ops in the forms the backend test models leave out, against onnxruntime: recurrent
layers with other activations, clip and short sequences; MaxPool's Indices; Resize's
antialias, crop-and-resize, axes and aspect-ratio policies."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import helper

from onnxopt import runtime

torch = pytest.importorskip("torch", reason="the torch extra is not installed")

from onnxopt.bridge import UnsupportedModelError, to_module  # noqa: E402

TOLERANCE = 1e-5


def single_node(
    op_type: str,
    inputs: dict[str, np.ndarray],
    outputs: int,
    initializers: dict[str, np.ndarray] | None = None,
    opset: int = 21,
    **attributes,
) -> ir.Model:
    """A model of one node; ``inputs`` are graph inputs (by name, in order; an empty name
    leaves an optional input out), ``initializers`` constant inputs after them."""
    initializers = initializers or {}
    names = list(inputs) + list(initializers)
    node = helper.make_node(
        op_type,
        [name if not name.startswith("_") else "" for name in names],
        [f"out{index}" for index in range(outputs)],
        **attributes,
    )
    graph = helper.make_graph(
        [node],
        "single",
        [
            helper.make_tensor_value_info(
                name, helper.np_dtype_to_tensor_dtype(array.dtype), array.shape
            )
            for name, array in inputs.items()
        ],
        [helper.make_empty_tensor_value_info(f"out{index}") for index in range(outputs)],
        [
            onnx.numpy_helper.from_array(array, name)
            for name, array in initializers.items()
            if not name.startswith("_")
        ],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    proto.ir_version = 9
    return ir.from_proto(proto)


def assert_matches_onnxruntime(model: ir.Model, feeds: dict[str, np.ndarray]) -> None:
    expected = runtime.create_session(model).run(None, feeds)
    module = to_module(model)
    with torch.no_grad():
        actual = module(*(torch.from_numpy(feeds[name]) for name in module.input_names))
    assert len(actual) == len(expected)
    for value, reference in zip(actual, expected, strict=True):
        assert tuple(value.shape) == reference.shape
        if reference.dtype.kind != "f":
            np.testing.assert_array_equal(value.numpy(), reference)
            continue
        scale = float(np.max(np.abs(reference), initial=0.0)) or 1.0
        np.testing.assert_allclose(value.numpy(), reference, rtol=0, atol=TOLERANCE * scale)


def random(*shape: int, seed: int = 0, scale: float = 1.0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(shape) * scale).astype(np.float32)


GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}
RECURRENT_CASES = {
    "lstm-activations": ("LSTM", {"activations": ["HardSigmoid", "LeakyRelu", "Softsign"]}),
    "lstm-alphas": (
        "LSTM",
        {
            "activations": ["HardSigmoid", "ScaledTanh", "Affine"],
            "activation_alpha": [0.3, 0.8, 0.5],
            "activation_beta": [0.4, 1.2, 0.1],
        },
    ),
    "lstm-clip-input-forget": ("LSTM", {"clip": 0.7, "input_forget": 1}),
    "lstm-bidirectional-elu": (
        "LSTM",
        {
            "direction": "bidirectional",
            "activations": ["Sigmoid", "Elu", "Tanh", "Sigmoid", "Softplus", "Relu"],
        },
    ),
    "gru-activations-clip": (
        "GRU",
        {"activations": ["HardSigmoid", "ThresholdedRelu"], "activation_alpha": [0.25, 0.1]},
    ),
    "gru-clip-linear-before-reset": ("GRU", {"clip": 0.5, "linear_before_reset": 1}),
    "rnn-relu-clip": ("RNN", {"activations": ["Relu"], "clip": 1.5}),
    "rnn-reverse-affine": (
        "RNN",
        {"direction": "reverse", "activations": ["Affine"], "activation_alpha": [0.5]},
    ),
}


def recurrent_model(op_type: str, attributes: dict, sequence_lens: np.ndarray | None):
    directions = 2 if attributes.get("direction") == "bidirectional" else 1
    hidden, features, steps, batch = 5, 3, 6, 3
    gates = GATES[op_type]
    x = random(steps, batch, features, seed=1)
    inputs = {"x": x}
    initializers = {
        "w": random(directions, gates * hidden, features, seed=2, scale=0.7),
        "r": random(directions, gates * hidden, hidden, seed=3, scale=0.5),
        "b": random(directions, 2 * gates * hidden, seed=4, scale=0.3),
    }
    if sequence_lens is not None:
        initializers["sequence_lens"] = sequence_lens
        initializers["initial_h"] = random(directions, batch, hidden, seed=5)
    model = single_node(
        op_type, inputs, 2, initializers, hidden_size=hidden, opset=14, **attributes
    )
    return model, inputs


@pytest.mark.parametrize("case", list(RECURRENT_CASES), ids=list(RECURRENT_CASES))
def test_recurrent_layers_with_other_activations_and_clip(case):
    op_type, attributes = RECURRENT_CASES[case]
    model, feeds = recurrent_model(op_type, attributes, None)
    assert_matches_onnxruntime(model, feeds)


@pytest.mark.parametrize("op_type", list(GATES))
@pytest.mark.parametrize("direction", ["forward", "reverse", "bidirectional"])
def test_recurrent_layers_stop_each_sequence_at_its_length(op_type, direction):
    lengths = np.array([6, 2, 4], np.int32)
    model, feeds = recurrent_model(op_type, {"direction": direction}, lengths)
    assert_matches_onnxruntime(model, feeds)


def test_an_unknown_recurrent_activation_is_named():
    model, _ = recurrent_model("GRU", {"activations": ["Sigmoid", "Swish"]}, None)
    with pytest.raises(UnsupportedModelError, match="Swish"):
        to_module(model)


@pytest.mark.parametrize(
    "attributes",
    [
        {"kernel_shape": [3, 3], "strides": [2, 2]},
        {"kernel_shape": [3, 3], "pads": [1, 0, 2, 1], "storage_order": 1},
        {"kernel_shape": [2, 3], "strides": [2, 2], "ceil_mode": 1, "pads": [0, 1, 0, 1]},
        {"kernel_shape": [3, 2], "dilations": [2, 1], "pads": [2, 1, 1, 0]},
        {"kernel_shape": [3], "strides": [2], "pads": [1, 1]},
    ],
    ids=["strided", "padded-column-major", "ceil", "dilated", "1d"],
)
def test_max_pool_indices_are_onnxs_flat_indices(attributes):
    rank = len(attributes["kernel_shape"])
    x = random(2, 3, *[9, 7][:rank], seed=6)
    model = single_node("MaxPool", {"x": x}, 2, opset=12, **attributes)
    assert_matches_onnxruntime(model, {"x": x})


RESIZE_CASES = {
    "antialias-linear-down": ({"mode": "linear", "antialias": 1}, [1, 1, 0.4, 0.55], None),
    "antialias-cubic-down": (
        {"mode": "cubic", "antialias": 1, "exclude_outside": 1},
        [1, 1, 0.3, 0.5],
        None,
    ),
    "antialias-cubic-edges": ({"mode": "cubic", "antialias": 1}, [1, 1, 0.6, 0.45], None),
    "antialias-linear-up": ({"mode": "linear", "antialias": 1}, [1, 1, 1.7, 2.0], None),
    "half-pixel-symmetric": (
        {"mode": "linear", "coordinate_transformation_mode": "half_pixel_symmetric"},
        [1, 1, 1.3, 0.7],
        None,
    ),
    "crop-and-resize-linear": (
        {
            "mode": "linear",
            "coordinate_transformation_mode": "tf_crop_and_resize",
            "extrapolation_value": -3.0,
        },
        None,
        [7, 5],
    ),
    "crop-and-resize-nearest": (
        {"mode": "nearest", "coordinate_transformation_mode": "tf_crop_and_resize"},
        None,
        [9, 4],
    ),
    "axes-sizes": ({"mode": "cubic", "axes": [3, 2]}, None, [5, 11]),
    "not-larger": (
        {"mode": "linear", "keep_aspect_ratio_policy": "not_larger", "axes": [2, 3]},
        None,
        [8, 8],
    ),
    "not-smaller": (
        {"mode": "nearest", "keep_aspect_ratio_policy": "not_smaller", "axes": [2, 3]},
        None,
        [8, 8],
    ),
}


@pytest.mark.parametrize("case", list(RESIZE_CASES), ids=list(RESIZE_CASES))
def test_resize_in_every_form_onnxruntime_runs(case):
    attributes, scales, sizes = RESIZE_CASES[case]
    x = random(2, 3, 12, 10, seed=7)
    initializers = {}
    if attributes.get("coordinate_transformation_mode") == "tf_crop_and_resize":
        initializers["roi"] = np.array([0, 0, -0.1, 0.2, 1, 1, 0.8, 1.3], np.float32)
    else:
        initializers["_roi"] = np.zeros(0, np.float32)
    if scales is not None:
        initializers["scales"] = np.array(scales, np.float32)
    else:
        initializers["_scales"] = np.zeros(0, np.float32)
        initializers["sizes"] = np.array(
            sizes if "axes" in attributes else [2, 3, *sizes],
            np.int64,
        )
    model = single_node("Resize", {"x": x}, 1, initializers, opset=19, **attributes)
    assert_matches_onnxruntime(model, {"x": x})


@pytest.mark.parametrize("scale", [2.0, 3.0, 0.5])
def test_upsample_and_resize_10_round_as_onnxruntime_does(scale):
    x = random(1, 2, 6, 6, seed=8)
    scales = np.array([1, 1, scale, scale], np.float32)
    if scale >= 1:  # Upsample only enlarges
        upsample = single_node("Upsample", {"x": x}, 1, {"scales": scales}, opset=9)
        assert_matches_onnxruntime(upsample, {"x": x})
    resize = single_node("Resize", {"x": x}, 1, {"scales": scales}, opset=10)
    assert_matches_onnxruntime(resize, {"x": x})
