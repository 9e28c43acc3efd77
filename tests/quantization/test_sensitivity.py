from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from onnx import helper

from onnxopt.context import Context
from onnxopt.data import open_data
from onnxopt.passes.correct_bias import CorrectBiasPass
from onnxopt.passes.fallback import FallbackPass
from onnxopt.passes.quantize import QuantizePass
from onnxopt.passes.validate import ValidatePass
from onnxopt.quantization import fallback as search_module
from onnxopt.quantization import sensitivity
from onnxopt.quantization.fusion import fusion_report
from onnxopt.quantization.plan import QuantizationOptions
from onnxopt.quantization.qdq import quantize_model
from onnxopt.quantization.sensitivity import compare_tensors, float_counterparts, layer_sqnr
from onnxopt.runtime import ProbeSession
from onnxopt.shapes import known_sizes
from tests.quantization.helpers import build, calibrated, cosine, ops, random_weights, run


def outlier_samples(count: int = 8, outlier: float = 100.0):
    """Channel 0 spans hundreds while the others span a few units: one 8-bit scale loses them."""
    rng = np.random.default_rng(2)
    samples = []
    for _ in range(count):
        x = rng.standard_normal((1, 4, 8, 8)).astype(np.float32)
        x[:, 0] *= outlier
        samples.append({"x": x})
    return samples


def three_convs(outlier_inside: bool = False):
    """conv_a -> relu -> conv_b -> relu -> conv_c -> relu; conv_a all but ignores channel 0.

    With ``outlier_inside``, conv_a's output carries the outlier channel instead, and conv_b is
    the layer that needs the small channels.
    """
    weights = random_weights(conv_a_w=(8, 4, 3, 3), conv_b_w=(8, 8, 3, 3), conv_c_w=(4, 8, 1, 1))
    if outlier_inside:
        weights["conv_a_w"][0] *= 100.0
        weights["conv_b_w"][:, 0] *= 1e-3
    else:
        weights["conv_a_w"][:, 0] *= 1e-3
    nodes = [
        helper.make_node("Conv", ["x", "conv_a_w"], ["a"], pads=[1] * 4, name="conv_a"),
        helper.make_node("Relu", ["a"], ["relu_a"], name="relu_a"),
        helper.make_node("Conv", ["relu_a", "conv_b_w"], ["b"], pads=[1] * 4, name="conv_b"),
        helper.make_node("Relu", ["b"], ["relu_b"], name="relu_b"),
        helper.make_node("Conv", ["relu_b", "conv_c_w"], ["c"], name="conv_c"),
        helper.make_node("Relu", ["c"], ["y"], name="relu_c"),
    ]
    return build(nodes, {"x": [1, 4, 8, 8]}, {"y": [1, 4, 8, 8]}, weights)


def quantized(model, samples, correct_bias=False):
    """Quantize ``model`` in place; the context compares with a float copy on the same samples."""
    context = Context(
        data=open_data(samples, model),
        validation_data=open_data(samples, model),
        reference=model.clone(),
        calibration=calibrated(model, samples),
        comparison_samples=len(samples),
    )
    passes = [QuantizePass(reduce_range=False)]
    if correct_bias:
        passes.append(CorrectBiasPass())
    for pass_ in passes:
        pass_.bind(context)
        pass_(model)
    return context


def fallback(model, context, **options):
    pass_ = FallbackPass(**options)
    pass_.bind(context)
    return pass_(model)


def test_layer_sqnr_shows_where_the_error_starts():
    samples = outlier_samples(4)
    float_model = three_convs()
    model = three_convs()
    quantized(model, samples)
    layers = layer_sqnr(float_model, model, samples)
    by_tensor = {layer.tensor: layer for layer in layers}
    assert set(by_tensor) == {"x", "a", "b", "c"}
    assert by_tensor["x"].node is None and by_tensor["x"].op_type == "input"
    assert by_tensor["a"].node == "conv_a" and by_tensor["a"].op_type == "Conv"
    # The input keeps its outlier channel well; conv_a's output has lost the small channels.
    assert by_tensor["x"].sqnr_db > 30 and by_tensor["a"].sqnr_db < 10
    assert [layer.sqnr_db for layer in layers] == sorted(layer.sqnr_db for layer in layers)
    assert layers[-1].tensor == "x"


@pytest.mark.parametrize("kernel", [3, 7], ids=["channels padded", "2x2 blocks"])
def test_a_stems_input_is_measured_though_its_integers_are_read_laid_out(kernel):
    """A stem reads its int8 input padded or rearranged (quantization/stems.py), so no
    DequantizeLinear gives the input back as it was: its quantization is measured on the
    integers themselves, and measures what a plain QuantizeLinear/DequantizeLinear pair would."""
    weights = random_weights(stem_w=(8, 3, kernel, kernel), head_w=(4, 8, 1, 1))
    nodes = [
        helper.make_node(
            "Conv", ["x", "stem_w"], ["s"], pads=[kernel // 2] * 4, strides=[2, 2], name="stem"
        ),
        helper.make_node("Relu", ["s"], ["r"], name="relu"),
        helper.make_node("Conv", ["r", "head_w"], ["y"], name="head"),
    ]
    samples = [
        {"x": np.random.default_rng(seed).uniform(-1, 1, (1, 3, 16, 16)).astype(np.float32)}
        for seed in range(4)
    ]
    float_model = build(nodes, {"x": [1, 3, 16, 16]}, {"y": [1, 4, 8, 8]}, weights)
    model = float_model.clone()
    quantized(model, samples)
    layout = {"Pad", "SpaceToDepth"} & {node.op_type for node in model.graph}
    assert layout, "the stem reads its input laid out"
    by_tensor = {layer.tensor: layer for layer in layer_sqnr(float_model, model, samples)}
    assert set(by_tensor) == {"x", "s"}
    assert by_tensor["x"].op_type == "input"
    scale = float(
        next(node for node in model.graph if node.op_type == "QuantizeLinear")
        .inputs[1]
        .const_value.numpy()
    )
    noise = np.mean(
        [np.mean(np.square(scale * np.round(f["x"] / scale) - f["x"])) for f in samples]
    )
    signal = np.mean([np.mean(np.square(f["x"])) for f in samples])
    assert by_tensor["x"].sqnr_db == pytest.approx(10 * np.log10(signal / noise), abs=0.5)


def test_tensors_are_compared_in_groups_as_large_as_the_memory_headroom(monkeypatch):
    """Memory the process held at its peak and freed is used for fewer, larger groups."""
    samples = outlier_samples(2)
    float_model = three_convs()
    model = three_convs()
    quantized(model, samples)
    pairs = float_counterparts(float_model, model)
    monkeypatch.setattr(sensitivity, "PROBE_BYTES", 1)
    monkeypatch.setattr(sensitivity, "memory_headroom", lambda: 0)
    assert len(sensitivity._groups_by_size(float_model, pairs, samples[0])) == len(pairs)
    monkeypatch.setattr(sensitivity, "memory_headroom", lambda: 2**30)
    assert len(sensitivity._groups_by_size(float_model, pairs, samples[0])) == 1


def test_tensors_compared_in_small_groups_measure_the_same(monkeypatch):
    """Large activations are compared a group at a time; the figures must not depend on it."""
    samples = outlier_samples(4)
    float_model = three_convs()
    model = three_convs()
    quantized(model, samples)
    whole = compare_tensors(float_model, model, samples)
    monkeypatch.setattr(sensitivity, "PROBE_BYTES", 1)
    monkeypatch.setattr(sensitivity, "HEADROOM_SHARE", 0.0)
    assert (
        len(
            sensitivity._groups_by_size(
                float_model, float_counterparts(float_model, model), samples[0]
            )
        )
        > 1
    )
    grouped = compare_tensors(float_model, model, samples)
    assert set(grouped) == set(whole) and len(whole) >= 4
    # Which tensors a session exposes changes which kernels onnxruntime fuses, a little.
    for name, noise in whole.items():
        assert grouped[name].signal == pytest.approx(noise.signal, rel=1e-6)
        assert grouped[name].noise == pytest.approx(noise.noise, rel=1e-2)


def test_scalar_tensors_are_compared_too():
    """A detector's post-processing computes 0-d float tensors; their noise is summed like any."""
    weights = random_weights(conv_w=(4, 4, 3, 3))
    nodes = [
        helper.make_node("Conv", ["x", "conv_w"], ["c"], pads=[1] * 4, name="conv"),
        helper.make_node("Relu", ["c"], ["r"], name="relu"),
        helper.make_node("ReduceMax", ["r"], ["peak"], keepdims=0, name="peak"),
        helper.make_node("Div", ["r", "peak"], ["y"], name="normalize"),
    ]
    float_model = build(nodes, {"x": [1, 4, 8, 8]}, {"y": [1, 4, 8, 8]}, weights)
    model = build(nodes, {"x": [1, 4, 8, 8]}, {"y": [1, 4, 8, 8]}, weights)
    samples = outlier_samples(2, outlier=1.0)
    quantized(model, samples)
    noise = compare_tensors(float_model, model, samples)
    assert noise["peak"].signal > 0 and np.isfinite(noise["peak"].noise)


def test_comparing_only_the_tensors_a_reader_needs_measures_them_the_same():
    """The ranking and the layer table compare only the tensors they read; their figures must
    be those of the full comparison, and fewer tensors must be compared."""
    samples = outlier_samples(4)
    float_model = three_convs()
    model = three_convs()
    quantized(model, samples)
    whole = compare_tensors(float_model, model, samples)
    nodes = ["conv_a", "conv_b", "conv_c"]
    points = sensitivity.noise_points(float_model, model, nodes)
    some = compare_tensors(float_model, model, samples, points)
    assert set(some) == points & set(whole) and len(some) < len(whole)
    # Which tensors a session exposes changes which kernels onnxruntime fuses, a little.
    expected = sensitivity.node_added_noise(float_model, model, whole, nodes)
    added = sensitivity.node_added_noise(float_model, model, some, nodes)
    assert list(added) == list(expected)
    assert added == pytest.approx(expected, rel=1e-2)
    layers = layer_sqnr(float_model, model, samples)
    expected_layers = sensitivity.layers_from(model, whole)
    assert [layer.tensor for layer in layers] == [layer.tensor for layer in expected_layers]
    assert [layer.sqnr_db for layer in layers] == pytest.approx(
        [layer.sqnr_db for layer in expected_layers], abs=0.05
    )


def test_sizes_known_from_shapes_are_those_of_the_tensors():
    """Grouping sizes tensors from their shapes where it can, so that it need not run a model
    with every tensor exposed; a free batch dimension is bound by the sample."""
    float_model = three_convs()
    float_model.graph.inputs[0].shape = ir.Shape(["N", 4, 8, 8])
    for node in float_model.graph:
        node.outputs[0].shape = ir.Shape(["N", *node.outputs[0].shape[1:]])
    names = {node.outputs[0].name for node in float_model.graph}
    batch = {"x": np.concatenate([sample["x"] for sample in outlier_samples(3)])}
    sizes = known_sizes(float_model, names, batch)
    measured = ProbeSession(float_model, sorted(names)).run(batch)
    assert sizes == {name: measured[name].nbytes for name in names}
    assert sizes["relu_a"] == 3 * 8 * 8 * 8 * 4


def test_fallback_keeps_exactly_the_sensitive_layer_float():
    samples = outlier_samples()
    reference = run(three_convs(), samples)
    model = three_convs()
    context = quantized(model, samples, correct_bias=True)
    before = cosine(reference, run(model, samples))

    assert context.quantization.fusion.integer_kernels == 3

    result = fallback(model, context, min_cosine=0.99)

    after = cosine(reference, run(model, samples))
    assert before < 0.9 and after > 0.99
    assert context.quantization.fallback.kept_float == ["conv_a"]
    assert result.details["budget met"] is True
    assert result.changes == 1
    state = context.quantization
    kept = {entry["node"]: entry["reason"] for entry in state.report.kept_float}
    assert kept["conv_a"] == "excluded by name"
    assert set(state.report.quantized) == {"conv_b", "conv_c"}
    assert set(state.bias_correction.report.corrected) == {"conv_b", "conv_c"}
    assert "a" not in {layer.tensor for layer in state.layers}
    # The figures describe the model that is written, not the one quantize made first.
    assert state.fusion == fusion_report(model)
    assert state.fusion.integer_kernels == 2 and state.fusion.rate == 1.0


def test_the_search_keeps_the_fewest_layers_float_that_meet_the_budget():
    samples = outlier_samples(outlier=1.0)
    reference = run(three_convs(outlier_inside=True), samples)
    model = three_convs(outlier_inside=True)
    context = quantized(model, samples)
    before = cosine(reference, run(model, samples))

    result = fallback(model, context, min_cosine=0.999)

    outcome = context.quantization.fallback
    assert before < 0.999 and outcome.budget_met
    assert cosine(reference, run(model, samples)) > 0.999
    assert result.changes == len(outcome.kept_float) >= 1
    assert outcome.quantized_layers == 3 - len(outcome.kept_float)
    # One layer fewer kept float misses the budget: the bisection found the edge.
    fewer = three_convs(outlier_inside=True)
    quantize_model(
        fewer,
        context.quantization.ranges,
        {},
        QuantizationOptions(reduce_range=False, exclude_nodes=outcome.kept_float[:-1]),
    )
    assert cosine(reference, run(fewer, samples)) < 0.999


def test_a_budget_int8_cannot_meet_ends_with_the_float_model():
    samples = outlier_samples(4)
    reference = run(three_convs(), samples)
    model = three_convs()
    context = quantized(model, samples)
    result = fallback(model, context, min_cosine=None, min_sqnr_db=200.0)
    assert result.details["budget met"] is True
    assert (
        result.details["stopped"] == "int8 cannot meet the budget: every quantized layer kept float"
    )
    assert result.details["still quantized"] == 0
    assert not {"QuantizeLinear", "DequantizeLinear"} & set(ops(model))
    np.testing.assert_allclose(run(model, samples), reference, rtol=1e-6, atol=1e-6)


def test_fallback_and_validation_measure_the_same_thing():
    samples = outlier_samples()
    model = three_convs()
    context = quantized(model, samples, correct_bias=True)
    fallback(model, context, min_cosine=0.99)
    validate = ValidatePass(samples=len(samples), min_cosine=0.99)
    validate.bind(context)
    validate(model)
    measured = {output.name: output for output in context.validation.outputs}
    for output in context.quantization.fallback.outputs:
        assert measured[output.name] == output
    assert context.validation.passed


@pytest.mark.parametrize("against", ["original", "float"])
def test_against_float_the_budget_holds_the_quantization_not_what_came_before(against):
    """Pruned before quantizing (here: half of conv_c's inputs zeroed), the model quantized is
    no longer the original. Against the original even the float model misses the budget, so
    every layer stays float; against the float model quantized, the budget holds int8's own
    error, as it would without pruning (prune-int8)."""
    samples = outlier_samples(4)
    original = three_convs()
    model = three_convs()
    pruned = model.graph.initializers["conv_c_w"]
    weight = pruned.const_value.numpy().copy()
    weight[:, :4] = 0
    pruned.const_value = ir.tensor(weight)
    context = quantized(model, samples, correct_bias=True)
    context.reference, context.comparison = original, None
    fallback(model, context, min_cosine=0.99, against=against)
    outcome = context.quantization.fallback
    assert outcome.against == against
    if against == "original":
        assert not outcome.budget_met and outcome.quantized_layers == 0
        assert not {"QuantizeLinear", "DequantizeLinear"} & set(ops(model))
    else:
        assert outcome.budget_met and outcome.quantized_layers > 0
        assert min(output.cosine for output in outcome.outputs) >= 0.99
        assert "QuantizeLinear" in ops(model)


def test_without_a_budget_fallback_only_reports():
    samples = outlier_samples(4)
    model = three_convs()
    context = quantized(model, samples)
    result = fallback(model, context, min_cosine=None)
    assert result.changes == 0 and result.details["kept float"] == 0
    assert result.details["stopped"] == "no fidelity budget: every layer quantized"
    assert context.quantization.layers[-1].tensor == "x"


def test_a_quantization_slower_than_float_gives_way_to_the_float_model(monkeypatch):
    """Timing itself is not tested here (no timed unit tests); the choice it drives is."""
    samples = outlier_samples(4)
    model = three_convs()
    context = quantized(model, samples)
    monkeypatch.setattr(search_module._Search, "speedup", lambda self, candidate: 0.8)
    result = fallback(model, context, min_cosine=None, min_speedup=1.0)
    assert result.details["stopped"].startswith("int8 would be slower than float")
    assert "0.80x, below min_speedup 1" in result.details["stopped"]
    assert not {"QuantizeLinear", "DequantizeLinear"} & set(ops(model))


def test_when_int8_at_its_fastest_is_slower_than_float_no_search_runs(monkeypatch):
    """Every layer quantized, and its lighter variants, are as fast as int8 gets here: when
    they are slower than float, searching which layers to keep float cannot help."""
    samples = outlier_samples(4)
    model = three_convs()
    context = quantized(model, samples)
    monkeypatch.setattr(search_module._Search, "speedup", lambda self, candidate: 0.8)
    bisected = []
    monkeypatch.setattr(search_module._Search, "bisect", lambda *args: bisected.append(args))
    result = fallback(model, context, min_cosine=0.99999, min_speedup=1.0)
    assert not bisected
    assert "at its fastest (every layer quantized) it runs at 0.80x" in result.details["stopped"]
    assert result.details["kept float"] == 3
    assert not {"QuantizeLinear", "DequantizeLinear"} & set(ops(model))


def test_lighter_variants_too_slow_to_choose_are_not_judged(monkeypatch):
    """Int8 slower than float with every layer quantized: its lighter variants are timed, and
    only one fast enough is measured against the budget."""
    weights = random_weights(conv_a_w=(8, 4, 3, 3), conv_c_w=(4, 8, 1, 1))
    nodes = [
        helper.make_node("Conv", ["x", "conv_a_w"], ["a"], pads=[1] * 4, name="conv_a"),
        helper.make_node(
            "MaxPool", ["a"], ["pooled"], kernel_shape=[3, 3], pads=[1] * 4, name="pool"
        ),
        helper.make_node("Conv", ["pooled", "conv_c_w"], ["y"], name="conv_c"),
    ]
    model = build(nodes, {"x": [1, 4, 8, 8]}, {"y": [1, 4, 8, 8]}, weights)
    context = quantized(model, outlier_samples(4))
    assert "pool" in context.quantization.report.quantized
    judged = []
    real_judge = search_module._judge

    def judge(comparison, candidate, budget, runtime_name):
        judged.append(candidate)
        return real_judge(comparison, candidate, budget, runtime_name)

    monkeypatch.setattr(search_module, "_judge", judge)
    monkeypatch.setattr(search_module._Search, "speedup", lambda self, candidate: 0.8)
    result = fallback(model, context, min_cosine=None, min_speedup=1.0)
    # The fully quantized model, then the float model the answer falls back to.
    assert len(judged) == 2
    assert result.details["stopped"].startswith("int8 would be slower than float")


def test_a_quantization_fast_enough_is_kept_with_its_speedup(monkeypatch):
    samples = outlier_samples(4)
    model = three_convs()
    context = quantized(model, samples)
    monkeypatch.setattr(search_module._Search, "speedup", lambda self, candidate: 1.7)
    result = fallback(model, context, min_cosine=0.9, min_speedup=1.0)
    assert result.details["speedup"] == 1.7 and result.details["still quantized"] > 0
    assert "QLinearConv" in fusion_report(model).op_counts


def test_a_later_family_only_tries_fewer_layers_float_than_found(monkeypatch):
    """Bisection capped below a candidate already found: one trial says whether it can beat it."""
    from onnxopt.progress import QUIET

    tried = []

    def trial(float_layers):
        tried.append(len(float_layers))
        return search_module._Trial(tuple(float_layers), None, [], len(float_layers) >= needed)

    search = object.__new__(search_module._Search)
    search.progress, search.deadline, search.trial = QUIET, None, trial
    order = [f"layer{index}" for index in range(64)]
    search.nodes, search._made = order, {}
    needed = 40
    assert search.bisect(order, "test", fewer_than=30) is None and tried == [29]
    tried.clear()
    needed = 12
    found = search.bisect(order, "test", fewer_than=30)
    assert len(found.float_layers) == 12 and tried[0] == 29 and max(tried) == 29
    tried.clear()
    assert len(search.bisect(order, "test").float_layers) == 12 and max(tried) < 64


def test_the_search_drops_the_models_of_trials_that_missed_but_the_float_model():
    """Each trial holds a copy of the whole model; only those that met the budget, and the
    float model (the answer when nothing else does), can still be chosen."""
    search = object.__new__(search_module._Search)
    search.nodes = ["a", "b", "c"]
    model = object()
    search._made = {
        frozenset(layers): search_module._Trial(layers, model, [], met)
        for layers, met in ((("a",), False), (("a", "b"), True), (("a", "b", "c"), False))
    }
    search._forget_missed_models()
    kept = {trial.float_layers: trial.model for trial in search._made.values()}
    assert kept == {("a",): None, ("a", "b"): model, ("a", "b", "c"): model}


def test_bisection_stops_once_the_fewest_float_is_known_within_its_resolution():
    """Over 320 layers it settles within 10 (1/32) of the fewest float layers that meet the
    budget, in fewer steps than an exact bisection's nine."""
    from onnxopt.progress import QUIET

    needed, tried = 101, []

    def trial(float_layers):
        tried.append(len(float_layers))
        return search_module._Trial(tuple(float_layers), None, [], len(float_layers) >= needed)

    search = object.__new__(search_module._Search)
    search.progress, search.deadline, search.trial = QUIET, None, trial
    order = [f"layer{index}" for index in range(320)]
    search.nodes, search._made = order, {}
    found = search.bisect(order, "test")
    assert needed <= len(found.float_layers) <= needed + 10
    assert found.met and len(tried) < 9
