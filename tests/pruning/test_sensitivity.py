"""Layer sensitivity: each layer's measured effect on the outputs, the factors that scale its
saliencies, and the allocation that uses them."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from onnx import helper

from onnxopt import runtime
from onnxopt.pruning import SparsitySettings, sparsify, sparsify_model
from onnxopt.pruning.sensitivity import output_sensitivities, sensitivity_factors
from onnxopt.pruning.sparsify import allocations, prepare_layers, prune_layers
from tests.pruning.test_sparsify import AUTO_CANDIDATES, correlated_inputs
from tests.quantization.helpers import build, cosine, random_weights, run

WIDTH = 24


def loud_and_quiet_net():
    """Two branches alike but for their gain into the output: ``loud`` x10, ``quiet`` x0.1,
    between a stem and a head (the first and last layers, protected)."""
    nodes = [
        helper.make_node("Gemm", ["x", "w0"], ["h"], transB=1, name="stem"),
        helper.make_node("Gemm", ["h", "wa"], ["a"], transB=1, name="loud"),
        helper.make_node("Mul", ["a", "gain_a"], ["ga"]),
        helper.make_node("Gemm", ["h", "wb"], ["b"], transB=1, name="quiet"),
        helper.make_node("Mul", ["b", "gain_b"], ["gb"]),
        helper.make_node("Add", ["ga", "gb"], ["s"]),
        helper.make_node("Gemm", ["s", "w3"], ["y"], transB=1, name="head"),
    ]
    weights = random_weights(
        5, w0=(WIDTH, WIDTH), wa=(WIDTH, WIDTH), wb=(WIDTH, WIDTH), w3=(WIDTH, WIDTH)
    )
    weights["gain_a"] = np.array(10.0, dtype=np.float32)
    weights["gain_b"] = np.array(0.1, dtype=np.float32)
    return build(nodes, {"x": [1, WIDTH]}, {"y": [1, WIDTH]}, weights)


def samples(count: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
    rows = correlated_inputs(WIDTH, count, seed).astype(np.float32)
    return [{"x": row[None]} for row in rows]


def test_a_layers_effect_is_the_outputs_relative_change_with_it_alone_changed():
    model = loud_and_quiet_net()
    feeds = samples(8)
    rng = np.random.default_rng(1)
    weights = {
        name: (rng.standard_normal((WIDTH, WIDTH)) * 0.3).astype(np.float32)
        for name in ("loud", "quiet")
    }
    effects = output_sensitivities(model, weights, feeds)
    reference = run(model, feeds)
    for name, weight in weights.items():
        changed = loud_and_quiet_net()
        node = next(node for node in changed.graph if node.name == name)
        node.inputs[1].const_value = ir.tensor(weight, name=node.inputs[1].name)
        outputs = run(changed, feeds).reshape(8, -1)
        expected = np.mean(
            np.sum((outputs - reference.reshape(8, -1)) ** 2, axis=1)
            / np.sum(reference.reshape(8, -1) ** 2, axis=1)
        )
        assert effects[name] == pytest.approx(expected, rel=1e-4)
    assert effects["loud"] > 1000 * effects["quiet"]
    # The model keeps its weights: the measurement worked on a copy.
    assert all(
        node.inputs[1].const_value is not None for node in model.graph if node.op_type == "Gemm"
    )


def test_factors_divide_the_effect_by_the_layers_own_error_with_the_median_for_the_rest():
    factors = sensitivity_factors(
        {"a": 2.0, "b": 0.5, "c": 1e-12, "d": 1.0},
        {"a": 1.0, "b": 1.0, "c": 1.0, "d": None, "e": 0.5},
    )
    # Measured: a 2, b 0.5, c 1e-12 (floored at a thousandth of the median, 0.5).
    assert factors == {"a": 2.0, "b": 0.5, "c": 5e-4, "d": 0.5, "e": 0.5}
    assert sensitivity_factors({"a": 0.0}, {"a": 1.0}) == {}
    assert output_sensitivities(loud_and_quiet_net(), {}, samples(4)) == {}


def test_sensitivity_allocation_prunes_the_quiet_branch_more_and_keeps_the_outputs_closer():
    feeds = samples(64)
    reference = run(loud_and_quiet_net(), feeds[48:])
    results = {}
    for allocation in ("global", "sensitivity"):
        model = loud_and_quiet_net()
        settings = SparsitySettings(ratio=0.5, allocation=allocation)
        report = sparsify_model(model, feeds[:48], settings)
        results[allocation] = (
            {layer.node: layer.sparsity for layer in report.layers},
            cosine(run(model, feeds[48:]), reference),
        )
        assert report.sparsity == pytest.approx(0.5, abs=0.02)
    (global_shares, global_cosine), (shares, sensitive_cosine) = results.values()
    assert abs(global_shares["loud"] - global_shares["quiet"]) < 0.2
    assert shares["quiet"] > shares["loud"] + 0.3
    assert sensitive_cosine > global_cosine


def test_auto_allocation_offers_the_sensitivity_candidates():
    model = loud_and_quiet_net()
    report = sparsify_model(model, samples(48), SparsitySettings(ratio=0.5))
    assert set(report.candidate_closeness) == AUTO_CANDIDATES
    assert report.allocation == "sensitivity"


def test_a_model_that_will_not_run_with_fed_weights_goes_without(monkeypatch):
    def refuse(model, runtime="onnxruntime"):
        raise RuntimeError("no session")

    monkeypatch.setattr(runtime, "sample_session", refuse)
    weights = {"loud": np.zeros((WIDTH, WIDTH), np.float32)}
    assert output_sensitivities(loud_and_quiet_net(), weights, samples(4)) == {}


def test_layers_pruned_to_measure_sensitivity_are_reused_at_that_share(monkeypatch):
    model = loud_and_quiet_net()
    prepared = prepare_layers(model, samples(48), SparsitySettings(ratio=0.5))
    candidates = dict(allocations(prepared, 0.5))
    assert prepared.uniform_share == 0.5 and set(prepared.uniform.layers) == {"loud", "quiet"}
    pruned_anew = []
    original = sparsify._prune_layer
    monkeypatch.setattr(
        sparsify,
        "_prune_layer",
        lambda node, *rest: pruned_anew.append(node.name) or original(node, *rest),
    )
    uniform = prune_layers(prepared, "uniform", candidates["uniform"])
    assert pruned_anew == []
    for name, (weight, _) in uniform.layers.items():
        assert weight is prepared.uniform.layers[name][0]
    prune_layers(prepared, "sensitivity", candidates["sensitivity"])
    assert pruned_anew == ["loud", "quiet"]
