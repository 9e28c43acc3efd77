"""Attention heads as channel groups: the blocks found, exact cuts, and the blocks refused."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper

from onnxopt.pruning.attention import find_attention_groups
from onnxopt.pruning.shrink import apply_keep
from tests.helpers import run_model

D_MODEL, HEADS, HEAD_DIM, SEQ, LAYERS = 16, 4, 4, 5, 2
FLOAT = np.float32


def _tensor(name: str, array: np.ndarray) -> TensorProto:
    return helper.make_tensor(
        name, helper.np_dtype_to_tensor_dtype(array.dtype), array.shape, array.ravel()
    )


def _weights(seed: int = 0) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    layers = []
    for _ in range(LAYERS):
        layer = {
            f"w{n}": rng.standard_normal((D_MODEL, D_MODEL)).astype(FLOAT) * 0.4 for n in "qkvo"
        }
        layer |= {f"b{n}": rng.standard_normal(D_MODEL).astype(FLOAT) * 0.1 for n in "qkvo"}
        layer["head_bias"] = rng.standard_normal((1, HEADS, SEQ, SEQ)).astype(FLOAT)
        layers.append(layer)
    return layers


class _Builder:
    """A transformer-like encoder (attention and a residual per layer) in the node patterns
    exporters write; ``shapes`` picks how the Reshape targets are spelled."""

    def __init__(self, shapes: str):
        self.shapes = shapes
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[TensorProto] = []
        self.count = 0
        if shapes == "shared":  # one target for every split, one for every merge
            self.constant("split_shape", np.array([0, -1, HEADS, HEAD_DIM]))
            self.constant("merge_shape", np.array([0, -1, D_MODEL]))
        elif shapes == "inferred":  # heads left to Reshape: -1
            self.constant("split_shape", np.array([0, 0, -1, HEAD_DIM]))
            self.constant("merge_shape", np.array([0, 0, -1]))

    def add(self, op: str, inputs: list[str], **attributes) -> str:
        self.count += 1
        output = f"{op.lower()}_{self.count}"
        domain = attributes.pop("domain", "")
        self.nodes.append(
            helper.make_node(
                op, inputs, [output], name=f"{op}_{self.count}", domain=domain, **attributes
            )
        )
        return output

    def constant(self, name: str, array: np.ndarray) -> str:
        self.initializers.append(_tensor(name, array))
        return name

    def constant_node(self, array: np.ndarray) -> str:
        return self.add("Constant", [], value=_tensor(f"c{self.count}", array))

    def dims(self, value: str, *axes: int) -> list[str]:
        """The value's sizes on ``axes``, each as a 1-element vector (Shape, Gather, Unsqueeze)."""
        shape = self.add("Shape", [value])
        picked = [
            self.add("Gather", [shape, self.constant_node(np.array(a))], axis=0) for a in axes
        ]
        return [self.add("Unsqueeze", [v, self.constant_node(np.array([0]))]) for v in picked]

    def split_target(self, data: str) -> str:
        if self.shapes in ("shared", "inferred"):
            return "split_shape"
        (batch,) = self.dims(data, 0)
        if self.shapes == "dynamic":  # heads = features / 4, computed at run time
            features = self.add(
                "Gather", [self.add("Shape", [data]), self.constant_node(np.array(2))], axis=0
            )
            heads = self.add("Div", [features, self.constant_node(np.array(HEAD_DIM))])
            heads = self.add("Unsqueeze", [heads, self.constant_node(np.array([0]))])
        else:
            heads = self.constant_node(np.array([HEADS]))
        parts = [
            batch,
            self.constant_node(np.array([-1])),
            heads,
            self.constant_node(np.array([HEAD_DIM])),
        ]
        return self.add("Concat", parts, axis=0)

    def merge_target(self, context: str) -> str:
        if self.shapes in ("shared", "inferred"):
            return "merge_shape"
        return self.add(
            "Concat", [*self.dims(context, 0, 1), self.constant_node(np.array([D_MODEL]))], axis=0
        )

    def layer(self, x: str, index: int, weights: dict[str, np.ndarray], head_bias: bool) -> str:
        name = {
            n: self.constant(f"l{index}_{n}", array)
            for n, array in weights.items()
            if n != "head_bias"
        }
        heads = {}
        for n, perm in (("q", [0, 2, 1, 3]), ("k", [0, 2, 3, 1]), ("v", [0, 2, 1, 3])):
            projected = self.add("Add", [name[f"b{n}"], self.add("MatMul", [x, name[f"w{n}"]])])
            split = self.add("Reshape", [projected, self.split_target(projected)])
            heads[n] = self.add("Transpose", [split], perm=perm)
        scores = self.add("MatMul", [heads["q"], heads["k"]])
        scores = self.add(
            "Div", [scores, self.constant_node(np.array(np.sqrt(HEAD_DIM), dtype=FLOAT))]
        )
        scores = self.add("Add", [scores, "mask"])
        if head_bias:
            scores = self.add(
                "Add", [scores, self.constant(f"l{index}_head_bias", weights["head_bias"])]
            )
        probabilities = self.add("Softmax", [scores], axis=-1)
        context = self.add(
            "Transpose", [self.add("MatMul", [probabilities, heads["v"]])], perm=[0, 2, 1, 3]
        )
        merged = self.add("Reshape", [context, self.merge_target(context)])
        attended = self.add("Add", [self.add("MatMul", [merged, name["wo"]]), name["bo"]])
        return self.add("Add", [x, attended])


def encoder(
    shapes: str = "computed",
    head_bias: bool = False,
    mask_per_head: bool = False,
    weights: list[dict[str, np.ndarray]] | None = None,
) -> ir.Model:
    builder = _Builder(shapes)
    x = "x"
    for index, layer in enumerate(weights or _weights()):
        x = builder.layer(x, index, layer, head_bias)
    builder.nodes.append(helper.make_node("Identity", [x], ["y"], name="output"))
    mask_shape = ["batch", HEADS, SEQ, SEQ] if mask_per_head else ["batch", 1, 1, SEQ]
    graph = helper.make_graph(
        builder.nodes,
        "encoder",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", SEQ, D_MODEL]),
            helper.make_tensor_value_info("mask", TensorProto.FLOAT, mask_shape),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", SEQ, D_MODEL])],
        builder.initializers,
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(proto, full_check=True)
    return ir.from_proto(proto)


def reference(
    weights: list[dict[str, np.ndarray]],
    feeds: dict[str, np.ndarray],
    keep: dict[int, list[int]],
    head_bias: bool,
) -> np.ndarray:
    """The encoder in numpy, computing only the heads in ``keep`` (all heads of other layers)."""
    x = feeds["x"].astype(np.float64)
    for index, w in enumerate(weights):
        attended = w["bo"].astype(np.float64)
        for head in keep.get(index, range(HEADS)):
            cols = slice(head * HEAD_DIM, (head + 1) * HEAD_DIM)
            q, k, v = (x @ w[f"w{n}"][:, cols] + w[f"b{n}"][cols] for n in "qkv")
            scores = q @ k.swapaxes(1, 2) / np.sqrt(HEAD_DIM) + feeds["mask"][:, 0]
            if head_bias:
                scores = scores + w["head_bias"][:, head]
            probabilities = np.exp(scores - scores.max(-1, keepdims=True))
            probabilities /= probabilities.sum(-1, keepdims=True)
            attended = attended + probabilities @ v @ w["wo"][cols]
        x = x + attended
    return x


def sample_feeds() -> dict[str, np.ndarray]:
    """Two samples, the second with its last two tokens masked out."""
    rng = np.random.default_rng(7)
    mask = np.zeros((2, 1, 1, SEQ), FLOAT)
    mask[1, ..., -2:] = -1e4  # the second sample pads its last two tokens
    return {"x": rng.standard_normal((2, SEQ, D_MODEL)).astype(FLOAT), "mask": mask}


def readers(model: ir.Model, name: str) -> int:
    return len(model.graph.initializers[name].uses())


def test_finds_a_heads_group_per_layer_with_its_slices_edits_and_costs():
    groups, unprunable = find_attention_groups(encoder("computed"))
    assert unprunable == []
    assert [group.producers[0].tensor for group in groups] == ["l0_wq", "l1_wq"]
    first = groups[0]
    assert (first.kind, first.channels) == ("heads", HEADS)
    assert [(s.axis, s.width) for s in first.producers] == [(1, HEAD_DIM), (0, HEAD_DIM)] * 3
    assert [s.tensor for s in first.producers] == [
        "l0_wq",
        "l0_bq",
        "l0_wk",
        "l0_bk",
        "l0_wv",
        "l0_bv",
    ]
    assert [(s.tensor, s.axis, s.width) for s in first.consumers] == [("l0_wo", 0, HEAD_DIM)]
    assert [(e.per_channel, e.index) for e in first.shape_edits] == [(1, 0)] * 3 + [(HEAD_DIM, 0)]
    assert len(first.producer_nodes) == 3 and len(first.consumer_nodes) == 1
    # per head: 3 projections and the output rows of D_MODEL x HEAD_DIM (+ 3 bias values)
    assert first.parameters_per_channel == 4 * D_MODEL * HEAD_DIM + 3 * HEAD_DIM
    # per token 4 x D_MODEL x HEAD_DIM, plus the two SEQ x SEQ x HEAD_DIM products
    assert first.flops_per_channel == 4 * SEQ * D_MODEL * HEAD_DIM + 2 * SEQ * SEQ * HEAD_DIM
    assert groups[1].flops_per_channel == first.flops_per_channel


@pytest.mark.parametrize("shapes", ["computed", "shared", "inferred"])
def test_cutting_two_heads_is_exact(shapes):
    weights, feeds = _weights(), sample_feeds()
    model = encoder(shapes, weights=weights)
    before = run_model(model, feeds)[0]
    np.testing.assert_allclose(before, reference(weights, feeds, {}, False), rtol=1e-4, atol=1e-4)
    groups, _ = find_attention_groups(model)
    np.testing.assert_allclose(run_model(model, feeds)[0], before, rtol=1e-6, atol=1e-6)
    for edit in groups[0].shape_edits:  # each shape constant now belongs to one node
        assert readers(model, edit.tensor) == 1

    apply_keep(model, groups[0], np.array([0, 2]))
    onnx.checker.check_model(ir.serde.serialize_model(model), full_check=True)
    after = run_model(model, feeds)[0]
    np.testing.assert_allclose(
        after, reference(weights, feeds, {0: [0, 2]}, False), rtol=1e-4, atol=1e-4
    )
    # the same as the original with those heads' output-projection rows zeroed
    zeroed = [dict(layer) for layer in weights]
    zeroed[0]["wo"] = weights[0]["wo"].copy()
    zeroed[0]["wo"][HEAD_DIM : 2 * HEAD_DIM] = 0
    zeroed[0]["wo"][3 * HEAD_DIM :] = 0
    np.testing.assert_allclose(
        after, run_model(encoder(shapes, weights=zeroed), feeds)[0], rtol=1e-5, atol=1e-5
    )
    assert model.graph.initializers["l0_wq"].const_value.shape == (D_MODEL, 2 * HEAD_DIM)
    assert model.graph.initializers["l1_wq"].const_value.shape == (D_MODEL, D_MODEL)


def test_both_layers_cut_differently_and_a_per_head_bias_goes_with_its_heads():
    weights, feeds = _weights(1), sample_feeds()
    model = encoder("shared", head_bias=True, weights=weights)
    groups, unprunable = find_attention_groups(model)
    assert unprunable == [] and len(groups) == 2
    assert groups[0].producers[-1].tensor == "l0_head_bias" and groups[0].producers[-1].axis == 1
    apply_keep(model, groups[0], np.array([3]))
    apply_keep(model, groups[1], np.array([0, 1, 2]))
    expected = reference(weights, feeds, {0: [3], 1: [0, 1, 2]}, True)
    np.testing.assert_allclose(run_model(model, feeds)[0], expected, rtol=1e-4, atol=1e-4)


def test_refuses_blocks_it_cannot_cut_and_says_why():
    _, unprunable = find_attention_groups(encoder("dynamic"))
    assert len(unprunable) == LAYERS
    assert all("head count" in u.reason and "not a constant" in u.reason for u in unprunable)

    groups, unprunable = find_attention_groups(encoder(mask_per_head=True))
    assert groups == [] and all("'mask' differs per head" in u.reason for u in unprunable)

    model = encoder()
    softmax = next(node for node in model.graph if node.op_type == "Softmax")
    softmax.attributes["axis"] = ir.AttrInt64("axis", 1)  # across heads: they do not part
    _, unprunable = find_attention_groups(model)
    assert "not normalise over the last axis" in unprunable[0].reason

    model = encoder()
    softmax = next(node for node in model.graph if node.op_type == "Softmax")
    model.graph.outputs.append(softmax.outputs[0])
    groups, unprunable = find_attention_groups(model)
    assert len(groups) == 1 and len(unprunable) == 1
    assert unprunable[0].node == softmax.name and "graph output" in unprunable[0].reason


def test_a_softmax_that_is_no_attention_is_left_alone():
    proto = helper.make_model(
        helper.make_graph(
            [
                helper.make_node("MatMul", ["x", "w"], ["h"]),
                helper.make_node("Softmax", ["h"], ["y"]),
            ],
            "classifier",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])],
            [_tensor("w", np.ones((4, 3), FLOAT))],
        ),
        opset_imports=[helper.make_opsetid("", 17)],
    )
    assert find_attention_groups(ir.from_proto(proto)) == ([], [])


def packed_attention(weights: dict[str, np.ndarray]) -> ir.Model:
    """com.microsoft Attention with a packed QKV weight, then the output projection."""
    nodes = [
        helper.make_node(
            "Attention",
            ["x", "wqkv", "bqkv"],
            ["context"],
            domain="com.microsoft",
            num_heads=HEADS,
            name="attention",
        ),
        helper.make_node("MatMul", ["context", "wo"], ["projected"], name="output"),
        helper.make_node("Add", ["projected", "bo"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "packed",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, SEQ, D_MODEL])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, SEQ, D_MODEL])],
        [_tensor(name, array) for name, array in weights.items()],
    )
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    return ir.from_proto(helper.make_model(graph, opset_imports=opsets))


def test_packed_attention_op_loses_heads_by_its_num_heads():
    layer = _weights()[0]
    weights = {
        "wqkv": np.concatenate([layer["wq"], layer["wk"], layer["wv"]], axis=1),
        "bqkv": np.concatenate([layer["bq"], layer["bk"], layer["bv"]]),
        "wo": layer["wo"],
        "bo": layer["bo"],
    }
    model = packed_attention(weights)
    feeds = {"x": sample_feeds()["x"][:1]}
    groups, unprunable = find_attention_groups(model)
    assert unprunable == [] and len(groups) == 1
    assert [(a.attribute, a.per_channel) for a in groups[0].attribute_edits] == [("num_heads", 1)]
    assert [s.offset for s in groups[0].producers] == [0, D_MODEL, 2 * D_MODEL] * 2

    apply_keep(model, groups[0], np.array([1, 2]))
    assert model.graph.initializers["wqkv"].const_value.shape == (D_MODEL, 3 * 2 * HEAD_DIM)
    zeroed = dict(weights, wo=weights["wo"].copy())
    zeroed["wo"][:HEAD_DIM] = 0
    zeroed["wo"][3 * HEAD_DIM :] = 0
    expected = run_model(packed_attention(zeroed), feeds)[0]
    np.testing.assert_allclose(run_model(model, feeds)[0], expected, rtol=1e-5, atol=1e-5)
