"""to_module and write_back: parameters named after initializers, gradients, the round trip,
and the errors a user reads."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from onnxopt import runtime
from onnxopt.errors import InputError

torch = pytest.importorskip("torch", reason="the torch extra is not installed")

from onnxopt.bridge import (  # noqa: E402
    NodeFailedError,
    UnsupportedModelError,
    to_module,
    write_back,
)


def model_from(text: str, **weights: np.ndarray) -> ir.Model:
    proto = onnx.parser.parse_model(text)
    for name, array in weights.items():
        proto.graph.initializer.append(onnx.numpy_helper.from_array(array, name))
    return ir.from_proto(proto)


def random(*shape: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


CONV_HEAD = """
<ir_version: 8, opset_import: ["" : 17]>
net (float[N, 3, 8, 8] x) => (float[N, 4] y) {
    c = Conv <pads = [1, 1, 1, 1]> (x, conv_weight, conv_bias)
    r = Relu (c)
    p = GlobalAveragePool (r)
    f = Flatten (p)
    y = Gemm <transB = 1> (f, fc_weight, fc_bias)
}
"""


def conv_head() -> ir.Model:
    """Weights named as torch exports name them ("conv.weight"), which the text syntax cannot."""
    model = model_from(
        CONV_HEAD,
        conv_weight=random(6, 3, 3, 3),
        conv_bias=random(6, seed=1),
        fc_weight=random(4, 6, seed=2),
        fc_bias=random(4, seed=3),
    )
    weights = list(model.graph.initializers.values())
    model.graph.initializers.clear()
    for value in weights:
        value.name = value.name.replace("_", ".")
        model.graph.register_initializer(value)
    return model


def test_weights_are_parameters_named_after_their_initializers():
    module = to_module(conv_head())
    assert set(module.onnx_parameters()) == {"conv.weight", "conv.bias", "fc.weight", "fc.bias"}
    assert module.input_names == ["x"] and module.output_names == ["y"]
    x = random(2, 3, 8, 8, seed=4)
    (y,) = module(torch.from_numpy(x))
    expected = runtime.create_session(conv_head()).run(None, {"x": x})[0]
    np.testing.assert_allclose(y.detach().numpy(), expected, rtol=1e-5, atol=1e-6)


def test_shapes_and_scalars_are_buffers_not_parameters():
    model = model_from(
        """
        <ir_version: 8, opset_import: ["" : 17]>
        net (float[2, 6] x) => (float[3, 4] y) {
            s = Div (x, scale)
            b = Add (s, bias)
            y = Reshape (b, shape)
        }
        """,
        scale=np.array(2.0, np.float32),
        bias=random(6),
        shape=np.array([3, 4], np.int64),
    )
    module = to_module(model)
    assert set(module.onnx_parameters()) == {"bias"}
    assert {name for name, _ in module.onnx_tensors()} == {"scale", "bias", "shape"}


def test_to_module_then_write_back_leaves_the_model_bit_for_bit_unchanged():
    model = conv_head()
    before = ir.to_proto(model).SerializeToString()
    assert write_back(to_module(model), model) == []
    assert ir.to_proto(model).SerializeToString() == before


def test_trained_weights_written_back_reproduce_the_modules_outputs():
    model = conv_head()
    module = to_module(model)
    optimizer = torch.optim.SGD(module.parameters(), lr=0.1)
    x = torch.from_numpy(random(4, 3, 8, 8, seed=5))
    target = torch.zeros(4, 4)
    losses = []
    for _ in range(5):
        optimizer.zero_grad()
        loss = torch.nn.functional.mse_loss(module(x)[0], target)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    changed = write_back(module, model)
    assert set(changed) == {"conv.weight", "conv.bias", "fc.weight", "fc.bias"}
    written = runtime.create_session(model).run(None, {"x": x.numpy()})[0]
    np.testing.assert_allclose(written, module(x)[0].detach().numpy(), rtol=1e-5, atol=1e-6)


def test_a_weight_whose_shape_changed_is_named():
    model = conv_head()
    module = to_module(model)
    before = ir.to_proto(model).SerializeToString()
    with torch.no_grad():
        module.onnx_parameters()["conv.weight"].add_(1.0)
    module.register_parameter("fc%2Eweight", torch.nn.Parameter(torch.zeros(3, 6)))
    with pytest.raises(InputError, match=r"parameter 'fc.weight' has shape \[3, 6\]"):
        write_back(module, model)
    assert ir.to_proto(model).SerializeToString() == before


def test_an_unsupported_op_is_named_before_anything_runs():
    model = model_from(
        """
        <ir_version: 8, opset_import: ["" : 17, "custom" : 1]>
        net (float[2] x) => (float[2] y) {
            a = Relu (x)
            y = custom.Mystery (a)
        }
        """
    )
    with pytest.raises(UnsupportedModelError) as raised:
        to_module(model)
    assert raised.value.exit_code == 2
    assert "Mystery" in raised.value.render() and "opset 17" in raised.value.render()


def test_an_unsupported_attribute_is_named():
    model = model_from(
        """
        <ir_version: 8, opset_import: ["" : 15]>
        net (float[2, 3, 4, 4] x) => (float[2, 3, 4, 4] y) {
            y = BatchNormalization <training_mode = 1> (x, scale, bias, mean, variance)
        }
        """,
        scale=np.ones(3, np.float32),
        bias=np.zeros(3, np.float32),
        mean=np.zeros(3, np.float32),
        variance=np.ones(3, np.float32),
    )
    with pytest.raises(UnsupportedModelError, match="training_mode=1"):
        to_module(model)


def test_without_torch_the_message_says_how_to_install_it():
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "from onnxopt.errors import InputError\n"
        "try:\n    import onnxopt.bridge\nexcept InputError as error:\n    print(error.render())\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert "pip install 'onnxopt[torch]'" in result.stdout


def test_if_runs_the_branch_its_condition_takes():
    model = model_from(
        """
        <ir_version: 8, opset_import: ["" : 17]>
        net (bool c, float[3] x) => (float[3] y) {
            y = If (c) <
                then_branch = g1 () => (float[3] t) { t = Mul (x, w) },
                else_branch = g2 () => (float[3] e) { e = Neg (x) }
            >
        }
        """,
        w=np.array([1.0, 2.0, 3.0], np.float32),
    )
    module = to_module(model)
    x = torch.tensor([1.0, 1.0, 1.0])
    assert module(torch.tensor(True), x)[0].tolist() == [1.0, 2.0, 3.0]
    assert module(torch.tensor(False), x)[0].tolist() == [-1.0, -1.0, -1.0]
    assert "w" in module.onnx_parameters()


def test_loop_runs_its_trip_count_and_stacks_scan_outputs():
    model = model_from(
        """
        <ir_version: 8, opset_import: ["" : 17]>
        net (int64 n, float[2] x) => (float[2] total, float[K, 2] steps) {
            total, steps = Loop (n, , x) <
                body = b (int64 i, bool c, float[2] acc) => (bool c2, float[2] next, float[2] seen) {
                    c2 = Identity (c)
                    next = Add (acc, x)
                    seen = Identity (next)
                }
            >
        }
        """
    )
    module = to_module(model)
    total, steps = module(torch.tensor(3), torch.tensor([1.0, 2.0]))
    assert total.tolist() == [4.0, 8.0]
    assert steps.shape == (3, 2)


GRADIENT_CASES = {
    "conv groups dilation": (
        "y = Conv <group = 2, dilations = [2, 2], pads = [1, 2, 2, 1], strides = [2, 1]> (x, w, b)",
        {"x": (1, 4, 7, 7), "w": (6, 2, 3, 3), "b": (6,)},
    ),
    "conv same": (
        'y = Conv <auto_pad = "SAME_UPPER"> (x, w)',
        {"x": (1, 2, 5, 5), "w": (3, 2, 2, 2)},
    ),
    "conv transpose": (
        "y = ConvTranspose <strides = [2, 2], pads = [1, 0, 0, 1], output_padding = [1, 1]> (x, w, b)",
        {"x": (1, 2, 3, 3), "w": (2, 3, 3, 3), "b": (3,)},
    ),
    "gemm": (
        "y = Gemm <transA = 1, alpha = 0.5, beta = 2.0> (x, w, b)",
        {"x": (3, 2), "w": (3, 4), "b": (4,)},
    ),
    "matmul": ("y = MatMul (x, w)", {"x": (2, 3, 4), "w": (4, 5)}),
    "batchnorm": (
        "y = BatchNormalization (x, s, b, m, v)",
        {"x": (2, 3, 2, 2), "s": (3,), "b": (3,), "m": (3,), "v": "positive3"},
    ),
    "layernorm": (
        "y = LayerNormalization <axis = -1> (x, s, b)",
        {"x": (2, 5), "s": (5,), "b": (5,)},
    ),
    "instancenorm": ("y = InstanceNormalization (x, s, b)", {"x": (2, 3, 4), "s": (3,), "b": (3,)}),
    "prelu": ("y = PRelu (x, s)", {"x": (2, 3, 2), "s": (3, 1)}),
    "average pool": (
        "y = AveragePool <kernel_shape = [2, 2], pads = [1, 1, 0, 0], ceil_mode = 1> (x)",
        {"x": (1, 2, 5, 5)},
    ),
    "max pool": ("y = MaxPool <kernel_shape = [3, 3], strides = [2, 2]> (x)", {"x": (1, 1, 5, 5)}),
    "resize linear": (
        'y = Resize <mode = "linear"> (x, , s)',
        {"x": (1, 1, 3, 3), "s": "scales"},
    ),
    "softmax": ("y = Softmax <axis = 1> (x)", {"x": (2, 4)}),
    "activations": ("h = HardSwish (x)\n y = Gelu (h)", {"x": (2, 4)}),
    "pad reflect and slice": (
        'p = Pad <mode = "reflect"> (x, pads)\n y = Slice (p, starts, ends, axes, steps)',
        {
            "x": (1, 2, 4, 4),
            "pads": "pads",
            "starts": "starts",
            "ends": "ends",
            "axes": "axes",
            "steps": "steps",
        },
    ),
    "resize cubic": ('y = Resize <mode = "cubic"> (x, , s)', {"x": (1, 1, 4, 4), "s": "scales"}),
    "einsum": ('y = Einsum <equation = "bij,jk->bik"> (x, w)', {"x": (2, 3, 4), "w": (4, 2)}),
    "embedding": (
        "e = Gather (table, indices)\n y = Add (e, x)",
        {"x": (3, 4), "table": (5, 4), "indices": "indices"},
    ),
    "reductions and elementwise": (
        "m = ReduceMean <axes = [1]> (x)\n s = Sigmoid (m)\n t = Tanh (x)\n d = Div (t, w)\n y = Mul (d, s)",
        {"x": (2, 3), "w": (2, 3)},
    ),
    "lstm": (
        'y, h = LSTM <hidden_size = 3, direction = "bidirectional"> (x, w, r, b)',
        {"x": (4, 2, 3), "w": (2, 12, 3), "r": (2, 12, 3), "b": (2, 24)},
    ),
    "gru": (
        "y, h = GRU <hidden_size = 3, linear_before_reset = 1> (x, w, r, b)",
        {"x": (4, 2, 3), "w": (1, 9, 3), "r": (1, 9, 3), "b": (1, 18)},
    ),
    "lstm activations clip lengths": (
        'y, h = LSTM <hidden_size = 3, activations = ["HardSigmoid", "Softsign", "Elu"], '
        "clip = 2.5> (x, w, r, b, lengths)",
        {"x": (4, 2, 3), "w": (1, 12, 3), "r": (1, 12, 3), "b": (1, 24), "lengths": "lengths"},
    ),
    "rnn reverse softplus": (
        'y, h = RNN <hidden_size = 3, direction = "reverse", activations = ["Softplus"]> '
        "(x, w, r, b)",
        {"x": (4, 2, 3), "w": (1, 3, 3), "r": (1, 3, 3), "b": (1, 6)},
    ),
    "resize antialias": (
        'y = Resize <mode = "linear", antialias = 1> (x, , s)',
        {"x": (1, 1, 6, 5), "s": "downscales"},
    ),
}


def _gradient_model(body: str, shapes: dict) -> tuple[ir.Model, dict[str, np.ndarray]]:
    """A model with float input x and the other names as initializers; its output y."""
    weights = {}
    for index, (name, shape) in enumerate(shapes.items()):
        if name == "x":
            continue
        if shape == "positive3":
            weights[name] = np.abs(random(3, seed=index)) + 0.5
        elif shape == "scales":
            weights[name] = np.array([1, 1, 2, 1.5], np.float32)
        elif shape == "downscales":
            weights[name] = np.array([1, 1, 0.5, 0.6], np.float32)
        elif shape == "lengths":
            weights[name] = np.array([4, 2], np.int32)
        elif shape == "indices":
            weights[name] = np.array([4, 0, 2], np.int64)
        elif shape == "pads":
            weights[name] = np.array([0, 0, 1, 2, 0, 0, 2, 1], np.int64)
        elif shape in ("starts", "ends", "axes", "steps"):
            weights[name] = {"starts": [5, 0], "ends": [0, 6], "axes": [2, 3], "steps": [-2, 2]}[
                shape
            ]
            weights[name] = np.array(weights[name], np.int64)
        else:
            weights[name] = random(*shape, seed=index)
            if name == "w" and "Div" in body:
                weights[name] = np.abs(weights[name]) + 1.0
    outputs = "float y, float h" if ", h =" in body else "float y"
    text = (
        '<ir_version: 8, opset_import: ["" : 17]>\n'
        f"net (float{list(shapes['x'])} x) => ({outputs}) {{\n{body}\n}}"
    )
    return model_from(text, **weights), weights


@pytest.mark.parametrize("case", list(GRADIENT_CASES), ids=list(GRADIENT_CASES))
def test_gradients_agree_with_finite_differences(case):
    body, shapes = GRADIENT_CASES[case]
    model, _ = _gradient_model(body, shapes)
    module = to_module(model).double()
    names = list(module.onnx_parameters())
    x = torch.from_numpy(random(*shapes["x"], seed=9).astype(np.float64)).requires_grad_()
    parameters = {
        name: module.onnx_tensor(name).detach().clone().requires_grad_() for name in names
    }

    assert torch.autograd.gradcheck(
        lambda x, *values: _with_weights(module, names, values, x),
        (x, *parameters.values()),
        eps=1e-6,
        atol=1e-5,
    )


def _with_weights(module, names, values, x):
    """The module's first output with its weights replaced by ``values`` (which keep their
    gradients)."""
    replaced = {module.torch_name(name): value for name, value in zip(names, values, strict=True)}
    return torch.func.functional_call(module, replaced, (x,))[0]


def test_writing_back_into_another_model_names_the_missing_weight():
    module = to_module(conv_head())
    other = model_from(
        """
        <ir_version: 8, opset_import: ["" : 17]>
        net (float[2] x) => (float[2] y) { y = Relu (x) }
        """
    )
    before = ir.to_proto(other).SerializeToString()
    with pytest.raises(InputError, match="has no initializer of that name"):
        write_back(module, other)
    assert ir.to_proto(other).SerializeToString() == before


def test_an_exact_module_runs_without_onednn_and_leaves_the_setting_as_it_was():
    seen = []
    model = conv_head()
    module = to_module(model, exact=True)
    x = torch.from_numpy(random(2, 3, 8, 8, seed=4))
    original = module.graph.steps[0].spec.function

    def recording(call, *arguments):
        seen.append(torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled)
        return original(call, *arguments)

    module.graph.steps[0] = dataclasses.replace(
        module.graph.steps[0],
        spec=dataclasses.replace(module.graph.steps[0].spec, function=recording),
    )
    (exact,) = module(x)
    assert seen == [False] and torch.backends.mkldnn.enabled
    (fast,) = to_module(model)(x)
    np.testing.assert_allclose(exact.detach().numpy(), fast.detach().numpy(), rtol=1e-5, atol=1e-6)


def test_an_input_that_contradicts_the_declared_shape_or_type_is_named():
    module = to_module(conv_head())
    declared = r"input 'x' has shape \[2, 3, 6, 6\]; the model declares \['\?', 3, 8, 8\]"
    with pytest.raises(InputError, match=declared):
        module(torch.zeros(2, 3, 6, 6))
    with pytest.raises(InputError, match=r"input 'x' is torch.int64; the model declares FLOAT"):
        module(torch.zeros(2, 3, 8, 8, dtype=torch.int64))
    (y,) = module(torch.zeros(5, 3, 8, 8))  # the symbolic batch is free
    assert y.shape == (5, 4)


def test_a_node_that_fails_on_its_inputs_is_named_with_their_shapes():
    model = model_from(
        """
        <ir_version: 8, opset_import: ["" : 17]>
        net (float[N, 6] x) => (float[2, 3] y) {
            y = Reshape (x, shape)
        }
        """,
        shape=np.array([2, 3], np.int64),
    )
    module = to_module(model)
    assert module(torch.zeros(1, 6))[0].shape == (2, 3)
    with pytest.raises(NodeFailedError) as raised:
        module(torch.zeros(4, 6))
    message = raised.value.render()
    assert "(Reshape, opset 17) failed on inputs of shapes [[4, 6], [2]]" in message
    assert "fix: feed inputs of the shapes" in message
    assert raised.value.exit_code == 2
