import numpy as np
import pytest
from onnx import helper

from onnxopt import runtime
from onnxopt.calibration import moments as layer_moments
from onnxopt.calibration.moments import collect_hessians
from onnxopt.context import Context
from onnxopt.data import open_data
from onnxopt.passes.quantize import QuantizePass
from onnxopt.quantization import gptq, numerics
from onnxopt.quantization.fallback import QuantizedFrom
from onnxopt.quantization.gptq import GptqRounding, gptq_integers

from .helpers import build, calibrated, feeds, random_weights, run

# (weight shape, Conv attributes, input shape): every way a convolution reads its input.
CONVOLUTIONS = {
    "pointwise": ((6, 4, 1, 1), {}, [1, 4, 7, 7]),
    "pointwise, strided": ((6, 4, 1, 1), {"strides": [2, 2]}, [1, 4, 7, 7]),
    "3x3 padded, strided": ((5, 4, 3, 3), {"pads": [1, 1, 1, 1], "strides": [2, 2]}, [1, 4, 9, 9]),
    "asymmetric pads": ((5, 4, 3, 2), {"pads": [0, 1, 2, 0]}, [1, 4, 8, 8]),
    "dilated": ((5, 4, 3, 3), {"dilations": [2, 2], "pads": [2, 2, 2, 2]}, [1, 4, 9, 9]),
    "depthwise 5x5": ((4, 1, 5, 5), {"group": 4, "pads": [2, 2, 2, 2]}, [1, 4, 8, 8]),
    "grouped": ((6, 2, 3, 3), {"group": 2, "pads": [1, 1, 1, 1]}, [1, 4, 6, 6]),
    "same upper": ((5, 4, 3, 3), {"auto_pad": "SAME_UPPER", "strides": [2, 2]}, [1, 4, 8, 8]),
    "same lower": ((5, 4, 2, 2), {"auto_pad": "SAME_LOWER"}, [1, 4, 7, 7]),
    "1-D": ((5, 4, 3), {"pads": [1, 1]}, [1, 4, 16]),
    "batch of 2": ((5, 4, 3, 3), {"pads": [1, 1, 1, 1]}, [2, 4, 6, 6]),
}


def single_layer(op_type, weight, input_shape, **attributes):
    node = helper.make_node(op_type, ["x", "w"], ["y"], name="layer", **attributes)
    output_shape = [f"d{axis}" for axis in range(len(input_shape))]
    return build([node], {"x": input_shape}, {"y": output_shape}, {"w": weight})


def output_energy(model, samples):
    """Mean over output positions of the squared output, summed over channels: what
    sum_rows w H w^T must equal when H measures exactly what the layer reads."""
    session = runtime.create_session(model)
    outputs = [session.run(None, sample)[0] for sample in samples]
    if next(iter(model.graph)).op_type == "Conv":
        outputs = [np.moveaxis(output, 1, -1) for output in outputs]
    rows = np.concatenate([output.reshape(-1, output.shape[-1]) for output in outputs])
    return float(np.mean(np.sum(rows.astype(np.float64) ** 2, axis=1)))


def energy_from_hessian(model, hessian):
    node = next(iter(model.graph))
    layout = layer_moments.input_layout(node)
    weight = node.inputs[1].const_value.numpy().astype(np.float64)
    rows, _ = layer_moments.weight_rows(weight, layout, hessian.shape[0])
    return float(np.einsum("grk,gkl,grl->", rows, hessian.astype(np.float64), rows))


@pytest.mark.parametrize("case", CONVOLUTIONS, ids=list(CONVOLUTIONS))
def test_hessian_of_a_convolution_measures_what_it_reads(case, monkeypatch):
    """With every position kept, w H w^T is the layer's mean squared output: H's columns are the
    patches the convolution multiplies, in the order of the weight's rows."""
    monkeypatch.setattr(layer_moments, "ROWS_PER_COLUMN", 10**6)
    shape, attributes, input_shape = CONVOLUTIONS[case]
    weight = random_weights(**{"w": shape})["w"]
    model = single_layer("Conv", weight, input_shape, **attributes)
    samples = feeds(model, count=3)
    hessians = collect_hessians(model, list(model.graph), samples)
    assert set(hessians) == {"layer"}
    expected = output_energy(model, samples)
    assert energy_from_hessian(model, hessians["layer"].fit) == pytest.approx(expected, rel=1e-4)


@pytest.mark.parametrize(
    ("op_type", "weight_shape", "attributes"),
    [("MatMul", (8, 5), {}), ("Gemm", (5, 8), {"transB": 1}), ("Gemm", (8, 5), {})],
)
def test_hessian_of_a_matmul_measures_what_it_reads(op_type, weight_shape, attributes, monkeypatch):
    monkeypatch.setattr(layer_moments, "ROWS_PER_COLUMN", 10**6)
    weight = random_weights(w=weight_shape)["w"]
    input_shape = [3, 4, 8] if op_type == "MatMul" else [4, 8]
    model = single_layer(op_type, weight, input_shape, **attributes)
    samples = feeds(model, count=3)
    hessians = collect_hessians(model, list(model.graph), samples)
    expected = output_energy(model, samples)
    assert energy_from_hessian(model, hessians["layer"].fit) == pytest.approx(expected, rel=1e-4)


def test_rows_gathered_over_samples_before_they_are_multiplied_in_give_the_same_h(monkeypatch):
    """A layer that reads a row a sample: its rows are gathered (a quarter of its 64 columns at
    a time) and the last, partial gathering still counts."""
    monkeypatch.setattr(layer_moments, "ROWS_PER_COLUMN", 10**6)
    weight = random_weights(w=(64, 5))["w"]
    model = single_layer("Gemm", weight, [1, 64])
    samples = feeds(model, count=23)
    (moments,) = collect_hessians(model, list(model.graph), samples).values()
    held = [sample for index, sample in enumerate(samples) if index % 4 == 3]
    fit = [sample for index, sample in enumerate(samples) if index % 4 != 3]
    for measured, rows in ((moments.fit, fit), (moments.check, held)):
        inputs = np.concatenate([sample["x"] for sample in rows]).astype(np.float64)
        np.testing.assert_allclose(measured[0], inputs.T @ inputs / len(rows), rtol=1e-4, atol=1e-6)


def correlated_problem(seed=0, rows=16, columns=32, positions=2000):
    rng = np.random.default_rng(seed)
    # Inputs that mostly move in a few directions, as a layer's input features do.
    mixing = rng.standard_normal((columns // 4, columns))
    inputs = rng.standard_normal((positions, columns // 4)) @ mixing
    inputs += 0.1 * rng.standard_normal(inputs.shape)
    weights = rng.standard_normal((1, rows, columns))
    hessian = (inputs.T @ inputs / positions)[None]
    scales = np.abs(weights).max(axis=2) / 63
    return weights, hessian, scales, inputs


def output_error(weights, integers, scales, inputs):
    dequantized = integers * scales[..., None]
    return float(np.linalg.norm((weights - dequantized)[0] @ inputs.T))


def test_gptq_moves_the_output_less_than_rounding_to_nearest():
    weights, hessian, scales, inputs = correlated_problem()
    nearest = np.clip(np.round(weights / scales[..., None]), -63, 63)
    rounded = gptq_integers(weights, hessian, scales, 63)
    assert rounded.dtype == np.int8
    assert np.abs(rounded).max() <= 63
    # On the same grid: each weight moved at most a few steps from its nearest value.
    assert np.abs(rounded - nearest).max() <= 8
    assert output_error(weights, rounded, scales, inputs) < 0.6 * output_error(
        weights, nearest, scales, inputs
    )


@pytest.mark.parametrize("columns", [9, 150])
def test_the_inverse_factor_is_the_upper_cholesky_factor_of_the_damped_inverse(columns):
    """``U^T U = (H + damping)^-1`` with ``U`` upper triangular, for sizes inverted directly
    and by halves, and for groups of H at once."""
    rng = np.random.default_rng(1)
    inputs = rng.standard_normal((3, 4 * columns, columns)).astype(np.float32)
    hessian = np.matmul(inputs.transpose(0, 2, 1), inputs) / len(inputs[0])
    upper = gptq._inverse_cholesky(hessian, 0.01)
    mean = np.mean(np.diagonal(hessian, axis1=1, axis2=2), axis=1)[:, None, None]
    damped = hessian.astype(np.float64) + 0.01 * mean * np.eye(columns)
    product = np.matmul(upper.transpose(0, 2, 1).astype(np.float64), upper)
    np.testing.assert_allclose(product, np.linalg.inv(damped), rtol=1e-3, atol=1e-4)
    assert np.array_equal(upper, np.triu(upper))


def test_an_input_never_seen_rounds_to_nearest_and_takes_no_error():
    weights, hessian, scales, _ = correlated_problem(columns=8)
    hessian[:, 3, :] = 0.0
    hessian[:, :, 3] = 0.0
    rounded = gptq_integers(weights, hessian, scales, 63)
    nearest = np.clip(np.round(weights / scales[..., None]), -63, 63)
    np.testing.assert_array_equal(rounded[..., 3], nearest[..., 3])


def test_a_hessian_that_is_not_finite_rounds_to_nearest():
    weights, hessian, scales, _ = correlated_problem(columns=8)
    hessian[0, 0, 0] = np.nan
    rounded = gptq_integers(weights, hessian, scales, 63)
    nearest = np.clip(np.round(weights / scales[..., None]), -63, 63)
    np.testing.assert_array_equal(rounded, nearest)


def two_convolutions():
    """Two 3x3 convolutions with a Relu between, wide enough for rounding errors to add up, and
    a 1x1 convolution that writes the output (kept float, as graph outputs are)."""
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["c2", "w3"], ["y"], name="conv3"),
    ]
    weights = random_weights(
        seed=3, w1=(16, 8, 3, 3), b1=(16,), w2=(8, 16, 3, 3), b2=(8,), w3=(8, 8, 1, 1)
    )
    return build(nodes, {"x": [1, 8, 10, 10]}, {"y": [1, 8, 10, 10]}, weights)


def correlated_samples(count, seed):
    """Inputs whose channels move together (the same way for every seed), as image features do."""
    mixing = np.random.default_rng(100).standard_normal((8, 8))
    rng = np.random.default_rng(seed)
    return [
        {
            "x": np.einsum("ij,bjhw->bihw", mixing, rng.standard_normal((1, 8, 10, 10))).astype(
                np.float32
            )
        }
        for _ in range(count)
    ]


def quantized(rounding):
    model = two_convolutions()
    samples = correlated_samples(16, seed=0)
    context = Context(data=open_data(samples, model), calibration=calibrated(model, samples))
    quantize = QuantizePass(rounding=rounding, reduce_range=True)
    quantize.bind(context)
    result = quantize(model)
    return model, result, context


def test_quantize_pass_with_gptq_is_closer_to_float_on_unseen_samples():
    held_back = correlated_samples(8, seed=1)
    reference = run(two_convolutions(), held_back)
    nearest, _, _ = quantized("nearest")
    rounded, result, context = quantized("gptq")
    assert result.details["gptq rounded"] == 2
    assert context.quantization.rounding is not None
    error_nearest = np.linalg.norm(run(nearest, held_back) - reference)
    error_gptq = np.linalg.norm(run(rounded, held_back) - reference)
    assert error_gptq < 0.9 * error_nearest


def weight_integers(model):
    return {
        value.name: value.const_value.numpy()
        for value in model.graph.initializers.values()
        if value.const_value.dtype.name == "INT8"
    }


def test_quantizing_again_for_fallback_reuses_the_rounded_weights():
    """Fallback quantizes the float model again with some layers float; the other layers keep
    the integers GPTQ chose, though H was released after the quantize pass."""
    model, _, context = quantized("gptq")
    state = context.quantization
    assert state.rounding.moments == {}
    source = QuantizedFrom(
        state.float_model, state.ranges, state.problems, state.options, rounding=state.rounding
    )
    again, _ = source.quantized_with_float([])
    first = weight_integers(model)
    assert first and weight_integers(again).keys() == first.keys()
    for name, integers in weight_integers(again).items():
        np.testing.assert_array_equal(integers, first[name])
    one_float, _ = source.quantized_with_float(["conv1"])
    assert set(weight_integers(one_float)) == {name for name in first if name.startswith("w2")}
    np.testing.assert_array_equal(weight_integers(one_float)["w2_quantized"], first["w2_quantized"])


def test_without_data_weights_round_to_nearest():
    model = two_convolutions()
    samples = correlated_samples(4, seed=0)
    context = Context(calibration=calibrated(model, samples))
    quantize = QuantizePass(rounding="gptq")
    quantize.bind(context)
    result = quantize(model)
    assert "gptq rounded" not in result.details
    assert context.quantization.rounding is None


def test_every_fourth_sample_is_held_back_to_check_the_fit():
    model = two_convolutions()
    moments = collect_hessians(model, list(model.graph), correlated_samples(8, seed=0))
    assert moments["conv1"].check is not None
    assert not np.allclose(moments["conv1"].check, moments["conv1"].fit)
    few = collect_hessians(model, list(model.graph), correlated_samples(3, seed=0))
    assert few["conv1"].check is None


def test_a_layer_that_sees_too_few_rows_is_not_overfitted():
    """Fit to fewer rows than columns, GPTQ at a small damping moves the weights into directions
    the samples never showed; the held rows catch it, and the choice is never worse there than
    rounding to nearest."""
    rng = np.random.default_rng(0)
    columns = 48
    mixing = rng.standard_normal((columns, columns))
    fit_rows = rng.standard_normal((12, columns)) @ mixing
    check_rows = rng.standard_normal((4000, columns)) @ mixing
    weight = rng.standard_normal((16, columns)).astype(np.float32)
    moments = GptqRounding(
        {
            "layer": layer_moments.InputMoments(
                (fit_rows.T @ fit_rows / 12)[None].astype(np.float32),
                (check_rows.T @ check_rows / 4000)[None].astype(np.float32),
            )
        }
    )
    model = single_layer("Gemm", weight, [4, columns], transB=1)
    node = next(iter(model.graph))
    scales = np.abs(weight).max(axis=1) / 63
    chosen = moments.integers(node, weight, scales, 0, 63)
    nearest = np.clip(np.round(weight / scales[:, None]), -63, 63)
    check = (check_rows.T @ check_rows / 4000)[None]
    overfitted = gptq_integers(weight[None], moments.moments["layer"].fit, scales[None], 63)

    def error(integers):
        return gptq._output_error(weight[None], integers[None], scales[None], check)

    assert error(overfitted[0]) > error(nearest)
    assert chosen is None or error(chosen) <= error(nearest)


def test_layers_past_the_memory_budget_round_to_nearest():
    model = two_convolutions()
    samples = correlated_samples(4, seed=0)
    first_only = 2 * 8 * 9 * 8 * 9 * 4
    hessians = collect_hessians(model, list(model.graph), samples, max_bytes=first_only)
    assert set(hessians) == {"conv1"}
    rounding = GptqRounding(hessians)
    conv2 = next(node for node in model.graph if node.name == "conv2")
    weight = conv2.inputs[1].const_value.numpy()
    assert rounding.integers(conv2, weight, np.ones(8, np.float32), 0, 127) is None


def test_moments_that_do_not_fit_the_weight_round_to_nearest():
    """A layer whose input had another width than its weight expects (H measured on a tensor of
    unexpected shape) is rounded to nearest, not misread."""
    weight = random_weights(w=(5, 8))["w"]
    model = single_layer("Gemm", weight, [4, 8], transB=1)
    node = next(iter(model.graph))
    wrong = np.eye(6, dtype=np.float32)[None]
    rounding = GptqRounding({"layer": layer_moments.InputMoments(wrong, wrong)})
    assert rounding.integers(node, weight, np.full(5, 0.01, np.float32), 0, 127) is None


def test_a_layer_with_too_few_rows_for_its_columns_gets_no_moments():
    """A classifier's Gemm reads one vector a sample: 16 samples give 16 rows for 128 columns,
    too few to fit anything; it is not measured (no memory, no solve) and rounds to nearest."""
    weight = random_weights(w=(10, 128))["w"]
    model = single_layer("Gemm", weight, [1, 128], transB=1)
    assert collect_hessians(model, list(model.graph), feeds(model, count=16)) == {}
    wide_batch = single_layer("Gemm", weight, [8, 128], transB=1)
    assert set(collect_hessians(wide_batch, list(wide_batch.graph), feeds(wide_batch, 16))) == {
        "layer"
    }


def test_asked_for_a_layer_with_too_few_rows_gets_the_diagonal_alone():
    """Sparsity asks for each column's input power where the correlations cannot be fitted:
    the diagonal of H, each column's mean square, and nothing off it."""
    weight = random_weights(w=(10, 128))["w"]
    model = single_layer("Gemm", weight, [1, 128], transB=1)
    samples = feeds(model, count=16)
    (moments,) = collect_hessians(
        model, list(model.graph), samples, few_rows_diagonal=True
    ).values()
    assert moments.diagonal
    fitted = np.concatenate([sample["x"] for index, sample in enumerate(samples) if index % 4 != 3])
    np.testing.assert_allclose(np.diag(moments.fit[0]), np.mean(fitted**2, axis=0), rtol=1e-5)
    assert np.count_nonzero(moments.fit[0] - np.diag(np.diag(moments.fit[0]))) == 0
    wide_batch = single_layer("Gemm", weight, [8, 128], transB=1)
    (enough,) = collect_hessians(
        wide_batch, list(wide_batch.graph), feeds(wide_batch, 16), few_rows_diagonal=True
    ).values()
    assert not enough.diagonal and np.count_nonzero(enough.fit[0] - np.diag(np.diag(enough.fit[0])))


def test_layer_inputs_are_measured_a_batch_at_a_time_within_the_budget():
    """With room for one layer's H at a time, each layer is measured when the quantizer asks
    for it, once, its H dropped once it is rounded, and the integers are those of measuring
    every layer at once."""
    model = two_convolutions()
    samples = correlated_samples(8, seed=0)
    conv1_bytes = 2 * (8 * 9) ** 2 * 4
    batches = layer_moments.LayerBatches(model, samples, batch_bytes=conv1_bytes)
    assert set(batches.moments_for("conv1")) == {"conv1"}
    assert batches.moments_for("conv1") == {}
    assert set(batches.moments_for("conv2")) == {"conv2"}
    assert set(batches.moments_for("conv3")) == {"conv3"} and batches.batches == 3
    batches.close()
    together = layer_moments.LayerBatches(model, samples)
    assert set(together.moments_for("conv1")) == {"conv1", "conv2", "conv3"}
    together.close()
    within_total = layer_moments.LayerBatches(model, samples, max_bytes=conv1_bytes + 2 * 8**2 * 4)
    assert within_total.moments_for("conv2") == {}
    assert set(within_total.moments_for("conv1")) == {"conv1", "conv3"}
    within_total.close()

    at_once = GptqRounding(collect_hessians(model, list(model.graph), samples))
    lazily = GptqRounding({}, layer_moments.LayerBatches(model, samples, batch_bytes=conv1_bytes))
    for node in list(model.graph)[:3:2]:
        weight = node.inputs[1].const_value.numpy()
        scales = numerics.weight_scales(weight, 0, True)
        expected = at_once.integers(node, weight, scales, 0, 63)
        assert expected is not None
        np.testing.assert_array_equal(lazily.integers(node, weight, scales, 0, 63), expected)
        assert lazily.moments == {}
    assert lazily.rounded == {"conv1", "conv2"} and lazily.batches.batches == 2
    lazily.release()
    assert lazily.batches is None
