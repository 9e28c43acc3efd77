"""Canonical layers: one form whatever the storage, and writes back into the storage."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

from onnxopt.errors import InputError
from onnxopt.transfer import TransferSettings, transfer_weights
from onnxopt.transfer.layers import find_layers
from onnxopt.transfer.match import name_key
from onnxopt.transfer.sharing import retie, untie
from tests.helpers import model_from_text, run_model

WEIGHT = np.arange(12, dtype=np.float32).reshape(3, 4) / 10  # [out, in]
BIAS = np.array([0.5, -1.0, 2.0], dtype=np.float32)


def dense(form: str, weight: np.ndarray = WEIGHT, bias: np.ndarray = BIAS) -> ir.Model:
    """x[1, 4] -> a dense layer stored as ``form`` -> y[1, 3]."""
    stored = {
        "gemm": ("Gemm <transB: int = 1>(x, w, b)", weight),
        "gemm_plain": ("Gemm(x, w, b)", weight.T),
        "matmul": ("Add(MatMul(x, w), b)", weight.T),
        "fused": (
            'com.microsoft.FusedGemm <transB: int = 1, activation: string = "Relu">(x, w, b)',
            weight,
        ),
    }[form]
    expression, array = stored
    text = f"""
        <ir_version: 8, opset_import: ["" : 17, "com.microsoft" : 1]>
        agraph (float[1, 4] x) => (float[1, 3] y)
        <float[{array.shape[0]}, {array.shape[1]}] w = {{{", ".join(map(str, array.ravel()))}}},
         float[3] b = {{{", ".join(map(str, bias))}}}>
        {{ y = {expression.replace("Add(MatMul(x, w), b)", "Add(xw, b)")} }}
    """
    if form == "matmul":
        text = text.replace("{ y = Add(xw, b) }", "{ xw = MatMul(x, w)\n y = Add(xw, b) }")
    if form == "fused":
        import onnx.parser

        return ir.from_proto(onnx.parser.parse_model(text))
    return model_from_text(text)


@pytest.mark.parametrize("form", ["gemm", "gemm_plain", "matmul", "fused"])
def test_dense_layers_read_as_out_by_in_whatever_the_storage(form):
    [layer] = find_layers(dense(form))
    assert layer.kind == "dense"
    np.testing.assert_array_equal(layer.slots["weight"].read(), WEIGHT)
    np.testing.assert_array_equal(layer.slots["bias"].read(), BIAS)


@pytest.mark.parametrize("target_form", ["gemm", "gemm_plain", "matmul"])
def test_transfer_between_dense_storages_keeps_the_outputs(target_form):
    source = dense("gemm")
    target = dense(target_form, weight=np.ones((3, 4), np.float32), bias=np.zeros(3, np.float32))
    report = transfer_weights(target, source)
    assert report.equivalent
    x = {"x": np.array([[1.0, -2.0, 3.0, 0.5]], np.float32)}
    np.testing.assert_allclose(run_model(target, x)[0], run_model(source, x)[0], rtol=1e-6)
    assert ("transposed" in report.slots[0].transform) == (target_form != "gemm")


def test_bias_of_a_matmul_fused_with_its_activation_is_the_dense_layers_bias():
    """onnxruntime fuses MatMul + Add(bias) + Gelu into MatMul + BiasGelu(bias)."""
    import onnx.parser

    weights = ", ".join(map(str, WEIGHT.T.ravel()))
    fused = ir.from_proto(
        onnx.parser.parse_model(
            f"""
            <ir_version: 8, opset_import: ["" : 17, "com.microsoft" : 1]>
            agraph (float[1, 4] x) => (float[1, 3] y)
            <float[4, 3] w = {{{weights}}}, float[3] b = {{0.0, 0.0, 0.0}}>
            {{ xw = MatMul(x, w)
               y = com.microsoft.BiasGelu(xw, b) }}
            """
        )
    )
    [layer] = find_layers(fused)
    assert layer.kind == "dense" and layer.slots["bias"].name == "b"
    report = transfer_weights(fused, dense("matmul"))
    assert report.transferred == 2
    np.testing.assert_array_equal(fused.graph.initializers["b"].const_value.numpy(), BIAS)


BRANCHES = """
    <ir_version: 8, opset_import: ["" : 17]>
    agraph (float[1, 4] x) => (float[1, 3] y) {{
        {nodes}
    }}
"""


def branches(count: int, seed: int) -> ir.Model:
    """``count`` parallel Gemms of x, summed: layers that structure cannot tell apart."""
    rng = np.random.default_rng(seed)
    nodes, weights = [], []
    for index in range(count):
        values = ", ".join(f"{v:.3f}" for v in rng.standard_normal(12))
        weights.append(f"float[3, 4] w{seed}_{index} = {{{values}}}")
        nodes.append(f"h{index} = Gemm <transB: int = 1>(x, w{seed}_{index})")
    total = "h0"
    for index in range(1, count):
        nodes.append(f"s{index} = Add({total}, h{index})")
        total = f"s{index}"
    nodes.append(f"y = Identity({total})")
    text = BRANCHES.format(nodes="\n".join(nodes))
    text = text.replace(" {\n", f" <{', '.join(weights)}> {{\n", 1)
    return model_from_text(text)


def test_ambiguous_layers_are_refused_and_a_map_resolves_them():
    target, source = branches(2, 0), branches(3, 1)
    with pytest.raises(InputError, match="several source layers alike") as error:
        transfer_weights(target.clone(), source)
    assert "w0_0" in str(error.value) and "fix: pair them with --map" in str(error.value)
    mapping = {"w0_0": "w1_2", "w0_1": "w1_0"}
    report = transfer_weights(target, source, TransferSettings(mapping=mapping))
    assert [(slot.source, slot.match) for slot in report.slots if slot.role == "weight"] == [
        ("w1_2", "map"),
        ("w1_0", "map"),
    ]
    np.testing.assert_array_equal(
        target.graph.initializers["w0_0"].const_value.numpy(),
        source.graph.initializers["w1_2"].const_value.numpy(),
    )


def test_untie_gives_each_reader_a_copy_and_retie_merges_equal_ones():
    model = model_from_text(
        """
        <ir_version: 8, opset_import: ["" : 17]>
        agraph (float[1, 2] x) => (float[1, 2] y)
        <float[2] shared = {1.0, 2.0}>
        { a = Mul(x, shared)
          c = Identity(shared)
          b = Add(a, c)
          d = Mul(b, shared)
          y = Identity(d) }
        """
    )
    copies = untie(model)
    readers = [node for node in model.graph if node.op_type in ("Mul", "Add")]
    assert len({id(node.inputs[1]) for node in readers}) == 3
    assert "Identity" in [node.op_type for node in model.graph]  # the one not of a constant
    first_copy = copies["shared"][0]
    first_copy.const_value = ir.tensor(np.array([5.0, 6.0], np.float32))
    retie(model, copies)
    names = sorted(node.inputs[1].name for node in readers)
    assert names.count("shared") == 2 and len(set(names)) == 2


def two_widths(first: str, seed: int) -> ir.Model:
    """x -> a Gemm of 3 outputs and a Gemm of 5, concatenated; ``first`` says which of the
    two nodes the graph lists first."""
    rng = np.random.default_rng(seed)
    narrow = ", ".join(f"{v:.3f}" for v in rng.standard_normal(12))
    wide = ", ".join(f"{v:.3f}" for v in rng.standard_normal(20))
    nodes = {
        "narrow": "a = Gemm <transB: int = 1>(x, n)",
        "wide": "b = Gemm <transB: int = 1>(x, w)",
    }
    order = [nodes[first], nodes["wide" if first == "narrow" else "narrow"]]
    return model_from_text(
        f"""
        <ir_version: 8, opset_import: ["" : 17]>
        agraph (float[1, 4] x) => (float[1, 8] y)
        <float[3, 4] n = {{{narrow}}}, float[5, 4] w = {{{wide}}}>
        {{ {order[0]}
           {order[1]}
           y = Concat <axis: int = 1>(a, b) }}
        """
    )


def test_layers_of_one_structure_pair_by_their_shapes_first():
    target, source = two_widths("narrow", 0), two_widths("wide", 1)
    report = transfer_weights(target, source, TransferSettings(match="structure"))
    assert report.equivalent
    x = {"x": np.array([[1.0, -2.0, 3.0, 0.5]], np.float32)}
    np.testing.assert_allclose(run_model(target, x)[0], run_model(source, x)[0], rtol=1e-6)


def conv_with_affine(folded: bool, seed: int) -> ir.Model:
    """x -> Conv -> (Mul by a scale, Add of a shift, each reshaped to [1, C, 1, 1] by a node,
    as Paddle exports them) -> Relu; or the same network with both folded into the Conv."""
    rng = np.random.default_rng(seed)
    weight = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    bias = rng.standard_normal(4).astype(np.float32)
    scale = rng.uniform(0.5, 2.0, 4).astype(np.float32)
    shift = rng.standard_normal(4).astype(np.float32)
    if folded:
        weight, bias = weight * scale[:, None, None, None], bias * scale + shift

    def values(array: np.ndarray) -> str:
        return ", ".join(f"{v:.9g}" for v in array.ravel())

    nodes = (
        "z = Conv <pads: ints = [1, 1, 1, 1]>(x, w, b)\n y = Relu(z)"
        if folded
        else """c = Conv <pads: ints = [1, 1, 1, 1]>(x, w, b)
           s4 = Reshape(s, shape)
           m = Mul(c, s4)
           t4 = Unsqueeze(t, axes)
           z = Add(t4, m)
           y = Relu(z)"""
    )
    return model_from_text(
        f"""
        <ir_version: 8, opset_import: ["" : 17]>
        agraph (float[1, 3, 6, 6] x) => (float[1, 4, 6, 6] y)
        <float[4, 3, 3, 3] w = {{{values(weight)}}}, float[4] b = {{{values(bias)}}},
         float[4] s = {{{values(scale)}}}, float[4] t = {{{values(shift)}}},
         int64[4] shape = {{1, 4, 1, 1}}, int64[3] axes = {{0, 2, 3}}>
        {{ {nodes} }}
        """
    )


def test_a_scale_and_shift_after_a_conv_fold_when_read_and_become_identities_when_written():
    image = {"x": np.random.default_rng(0).standard_normal((1, 3, 6, 6)).astype(np.float32)}
    unfolded_source = conv_with_affine(folded=False, seed=1)
    folded_target = conv_with_affine(folded=True, seed=2)
    report = transfer_weights(folded_target, unfolded_source)
    assert report.equivalent
    assert {slot.transform for slot in report.slots} == {"Mul, Add folded"}
    expected = run_model(unfolded_source, image)[0]
    np.testing.assert_allclose(run_model(folded_target, image)[0], expected, rtol=1e-5, atol=1e-5)

    unfolded_target = conv_with_affine(folded=False, seed=3)
    report = transfer_weights(unfolded_target, conv_with_affine(folded=True, seed=1))
    assert {slot.transform for slot in report.slots} == {"Mul, Add made identity"}
    assert [node.op_type for node in unfolded_target.graph].count("Mul") == 1
    np.testing.assert_allclose(run_model(unfolded_target, image)[0], expected, rtol=1e-5, atol=1e-5)


def heads(order: tuple[int, int], seed: int) -> ir.Model:
    """x -> two Gemms alike, each to its own graph output, listed in ``order``."""
    rng = np.random.default_rng(seed)
    weights = [", ".join(f"{v:.3f}" for v in rng.standard_normal(12)) for _ in range(2)]
    nodes = [f"y{i} = Gemm <transB: int = 1>(x, w{i})" for i in order]
    return model_from_text(
        f"""
        <ir_version: 8, opset_import: ["" : 17]>
        agraph (float[1, 4] x) => (float[1, 3] y0, float[1, 3] y1)
        <float[3, 4] w0 = {{{weights[0]}}}, float[3, 4] w1 = {{{weights[1]}}}>
        {{ {nodes[0]}
           {nodes[1]} }}
        """
    )


def test_heads_alike_pair_by_the_output_they_write_whatever_the_node_order():
    target, source = heads((0, 1), seed=0), heads((1, 0), seed=1)
    report = transfer_weights(target, source, TransferSettings(match="structure"))
    assert report.equivalent
    x = {"x": np.array([[1.0, -2.0, 3.0, 0.5]], np.float32)}
    for got, expected in zip(run_model(target, x), run_model(source, x), strict=True):
        np.testing.assert_allclose(got, expected, rtol=1e-6)


def test_names_an_optimizer_rewrote_still_pair():
    assert name_key("ConvBnFusion_W_conv1.weight") == "conv1.weight"
    assert name_key("ConvBnFusion_BN_B_bn1.bias_token_2") == "bn1.bias"
    assert name_key("b1_float16") == "b1"
    target = dense("gemm", weight=np.ones((3, 4), np.float32))
    initializers = target.graph.initializers
    value = initializers.pop("w")
    value.name = "MatMulAddFusion_W_w"
    initializers[value.name] = value
    report = transfer_weights(target, dense("gemm"), TransferSettings(match="name"))
    assert [slot.match for slot in report.slots if slot.role == "weight"] == ["name"]
