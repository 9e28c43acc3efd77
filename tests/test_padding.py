"""Padded positions of a transformer's batch are left out of what is measured on it."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import helper

from onnxopt.calibration.moments import collect_hessians
from onnxopt.padding import padding_mask_input, token_rows
from onnxopt.pruning.structured import StructuredSettings, prune_structured

SEQ, WIDTH, HIDDEN = 6, 4, 16


def ffn_with_mask(masked_output: bool = True) -> ir.Model:
    """x [1, SEQ, WIDTH] through MatMul, Relu, MatMul; the output zeroed where the int64
    attention mask is 0, as a pooled transformer output ignores padding (else the mask added,
    as a hidden-state output that still holds every position)."""
    rng = np.random.default_rng(3)
    initializers = [
        onnx.numpy_helper.from_array(rng.standard_normal((WIDTH, HIDDEN)).astype(np.float32), "w1"),
        onnx.numpy_helper.from_array(rng.standard_normal((HIDDEN, WIDTH)).astype(np.float32), "w2"),
        onnx.numpy_helper.from_array(np.array([-1], np.int64), "last"),
    ]
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["up"], name="up"),
        helper.make_node("Relu", ["up"], ["hidden"], name="relu"),
        helper.make_node("MatMul", ["hidden", "w2"], ["down"], name="down"),
        helper.make_node("Unsqueeze", ["attention_mask", "last"], ["mask3"], name="unsqueeze"),
        helper.make_node("Cast", ["mask3"], ["maskf"], to=onnx.TensorProto.FLOAT, name="cast"),
        helper.make_node("Mul" if masked_output else "Add", ["down", "maskf"], ["y"], name="y"),
    ]
    graph = helper.make_graph(
        nodes,
        "ffn",
        [
            helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, SEQ, WIDTH]),
            helper.make_tensor_value_info("attention_mask", onnx.TensorProto.INT64, [1, SEQ]),
        ],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, SEQ, WIDTH])],
        initializers,
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(proto, full_check=True)
    return ir.from_proto(proto)


def feeds(count: int, padding_scale: float, seed: int = 0) -> list[dict[str, np.ndarray]]:
    """Samples with the same tokens whatever ``padding_scale``; their padded positions (the
    last ones, 1 to SEQ - 2 of them) hold noise of that scale."""
    tokens_rng, padding_rng = np.random.default_rng(seed), np.random.default_rng(seed + 100)
    samples = []
    for _ in range(count):
        length = int(tokens_rng.integers(2, SEQ))
        x = tokens_rng.standard_normal((1, SEQ, WIDTH)).astype(np.float32)
        x[:, length:] = padding_scale * padding_rng.standard_normal((1, SEQ - length, WIDTH))
        mask = (np.arange(SEQ) < length).astype(np.int64)[None]
        samples.append({"x": x, "attention_mask": mask})
    return samples


def test_token_rows_keep_the_positions_whose_mask_is_not_zero():
    feed = {"attention_mask": np.array([[1, 1, 0]])}
    hidden = np.arange(12, dtype=np.float32).reshape(1, 3, 4)
    assert np.array_equal(token_rows(hidden, feed, "attention_mask"), hidden[0, :2])
    pooled = np.ones((1, 4), np.float32)
    assert token_rows(pooled, feed, "attention_mask") is pooled
    assert token_rows(hidden, feed, None) is hidden
    assert token_rows(hidden, {}, "attention_mask") is hidden


def test_the_attention_mask_input_is_found_by_name_and_type():
    assert padding_mask_input(ffn_with_mask()) == "attention_mask"


def test_layer_input_moments_are_measured_on_tokens_only():
    model = ffn_with_mask()
    samples = feeds(8, padding_scale=100.0)
    moments = collect_hessians(model, [node for node in model.graph if node.name == "up"], samples)

    def second_moment(chosen: list[dict[str, np.ndarray]]) -> np.ndarray:
        rows = np.concatenate([s["x"][s["attention_mask"] != 0] for s in chosen]).astype(float)
        return rows.T @ rows / len(rows)

    # Every CHECK_EVERY-th sample (the 4th and the 8th) is held for checking, apart from the fit.
    held = [samples[3], samples[7]]
    fitted = [sample for index, sample in enumerate(samples) if index not in (3, 7)]
    assert np.allclose(moments["up"].fit[0], second_moment(fitted), rtol=1e-5)
    assert np.allclose(moments["up"].check[0], second_moment(held), rtol=1e-5)


@pytest.mark.parametrize("importance", ["activation", "magnitude", "fisher"])
def test_structured_pruning_does_not_depend_on_what_padded_positions_hold(importance):
    if importance == "fisher":
        pytest.importorskip("torch", reason="the torch extra is not installed")
    results = []
    for padding_scale in (0.0, 100.0):
        model = ffn_with_mask(masked_output=False)
        settings = StructuredSettings(ratio=0.5, importance=importance, protect_first_last=False)
        report = prune_structured(model, feeds(32, padding_scale), settings)
        results.append((report, model.graph.initializers))
    (quiet, quiet_weights), (noisy, noisy_weights) = results
    assert [group.keep for group in quiet.groups] == [group.keep for group in noisy.groups]
    assert quiet.refitted == noisy.refitted == ["down"]
    for name in ("w1", "w2"):
        assert np.allclose(
            quiet_weights[name].const_value.numpy(),
            noisy_weights[name].const_value.numpy(),
            rtol=1e-4,
            atol=1e-5,
        )


def test_recovery_does_not_depend_on_what_padded_positions_hold():
    pytest.importorskip("torch", reason="the torch extra is not installed")
    from onnxopt.pruning.recovery import RecoverySettings, recover

    weights = []
    for padding_scale in (0.0, 100.0):
        model = ffn_with_mask(masked_output=False)
        settings = StructuredSettings(ratio=0.5, recover=False, protect_first_last=False)
        prune_structured(model, feeds(32, 0.0), settings)
        original = ffn_with_mask(masked_output=False)
        result = recover(model, original, feeds(32, padding_scale), {}, RecoverySettings(epochs=2))
        assert result.steps > 0
        weights.append(
            {name: model.graph.initializers[name].const_value.numpy() for name in ("w1", "w2")}
        )
    for name in ("w1", "w2"):
        assert np.allclose(weights[0][name], weights[1][name], rtol=1e-4, atol=1e-5)
