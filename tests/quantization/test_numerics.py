from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from onnxopt.quantization import numerics


@given(st.floats(-1e3, 1e3), st.floats(-1e3, 1e3))
def test_zero_is_exactly_representable_and_the_range_round_trips(low, high):
    low, high = min(low, high), max(low, high)
    scale, zero_point = numerics.activation_parameters(low, high)
    assert 0 <= int(zero_point) <= 255
    covered = np.array([min(low, 0.0), 0.0, max(high, 0.0)], np.float32)
    quantized = numerics.quantize_values(covered, scale, np.array(zero_point), np.uint8)
    assert quantized[1] == zero_point
    restored = (quantized.astype(np.float64) - int(zero_point)) * float(scale)
    assert restored[1] == 0.0
    # Every value of the range comes back within half a step (plus float32 rounding).
    assert np.all(
        np.abs(restored - covered) <= float(scale) * 0.5 + 1e-6 * max(1.0, abs(low), abs(high))
    )


def test_range_is_widened_to_include_zero():
    scale, zero_point = numerics.activation_parameters(2.0, 6.0)
    assert zero_point == 0
    assert scale == pytest.approx(6.0 / 255)
    scale, zero_point = numerics.activation_parameters(-4.0, -1.0)
    assert zero_point == 255
    assert scale == pytest.approx(4.0 / 255)


def test_an_empty_range_gets_scale_one():
    assert numerics.activation_parameters(0.0, 0.0) == (np.float32(1.0), np.uint8(0))


def test_rounding_is_half_to_even_and_saturates():
    values = np.array([0.5, 1.5, 2.5, -0.5, 300.0, -300.0], np.float32)
    unsigned = numerics.quantize_values(values, np.float32(1.0), np.array(0), np.uint8)
    assert unsigned.tolist() == [0, 2, 2, 0, 255, 0]
    signed = numerics.quantize_values(values, np.float32(1.0), np.array(0), np.int8)
    assert signed.tolist() == [0, 2, 2, 0, 127, -128]


def test_weight_scales_per_channel_and_reduced_range():
    weight = np.array([[1.0, -2.0], [0.5, 0.25], [0.0, 0.0]], np.float32)
    scales = numerics.weight_scales(weight, axis=0, reduce_range=False)
    np.testing.assert_allclose(scales, [2 / 127, 0.5 / 127, 1.0])
    reduced = numerics.weight_scales(weight, axis=0, reduce_range=True)
    np.testing.assert_allclose(reduced[:2], [2 / 63, 0.5 / 63])
    quantized = numerics.quantize_weight(weight, scales, axis=0)
    assert quantized[0].tolist() == [64, -127]
    assert quantized[2].tolist() == [0, 0]


def test_per_tensor_weight_scale():
    weight = np.array([[1.0, -4.0]], np.float32)
    assert numerics.weight_scales(weight, None, reduce_range=False) == pytest.approx(4 / 127)


def test_bias_that_would_overflow_int32_widens_the_weight_scale():
    bias = np.array([1e6, 1e-3], np.float32)
    scales = np.array([1e-6, 1e-6], np.float32)
    widened = numerics.widen_for_bias(bias, 1e-4, scales)
    assert widened[0] > scales[0] and widened[1] == scales[1]
    quantized, bias_scale = numerics.quantize_bias(bias, 1e-4, widened)
    assert np.abs(quantized.astype(np.int64)).max() < 2**31 - 1
    np.testing.assert_allclose(quantized * bias_scale.astype(np.float64), bias, rtol=1e-6)


def test_vnni_detection_answers():
    assert isinstance(numerics.cpu_has_vnni(), bool)


def test_rounded_to_half_rounds_only_what_float16_holds_to_11_bits():
    values = np.array([0.0, 1e-3, 0.1, 3.0, 1000.0], dtype=np.float32)
    rounded = numerics.rounded_to_half(values)
    np.testing.assert_array_equal(rounded, values.astype(np.float16).astype(np.float32))
    assert np.all(np.abs(rounded - values) <= np.abs(values) * 2**-11)
    for outside in (1e-6, 1e5):
        values = np.array([1.0, outside], dtype=np.float32)
        np.testing.assert_array_equal(numerics.rounded_to_half(values), values)


@pytest.mark.parametrize(
    ("shape", "scale_shape"), [((37, 5, 3, 3), (37, 1, 1, 1)), ((29, 64), (1, 64)), ((300,), ())]
)
def test_quantizing_a_block_of_rows_at_a_time_equals_one_float64_pass(
    monkeypatch, shape, scale_shape
):
    monkeypatch.setattr(numerics, "QUANTIZE_BLOCK_VALUES", 50)
    rng = np.random.default_rng(2)
    values = (rng.standard_normal(shape) * 3).astype(np.float32)
    scale = rng.uniform(0.01, 0.1, scale_shape).astype(np.float32)
    zero_point = np.zeros(scale_shape, dtype=np.int8)
    whole = np.clip(np.round(values.astype(np.float64) / scale), -128, 127).astype(np.int8)
    np.testing.assert_array_equal(
        numerics.quantize_values(values, scale, zero_point, np.int8), whole
    )
