from __future__ import annotations

import math

import numpy as np
import pytest

from onnxopt.calibration.collectors import HISTOGRAM_VALUES_PER_SAMPLE, TensorStatistics
from onnxopt.calibration.ranges import (
    METHODS,
    auto_range,
    calibrate_tensor,
    compute_range,
    entropy_range,
    expected_error,
    minmax_range,
    mse_range,
    percentile_range,
)

RNG = np.random.default_rng(0)
GAUSSIAN = RNG.standard_normal(1_000_000).astype(np.float32)
UNIFORM = RNG.uniform(-1.0, 3.0, 200_000).astype(np.float32)
RELU = np.maximum(GAUSSIAN, 0)


def statistics_of(*arrays: np.ndarray, per_sample: bool = False) -> TensorStatistics:
    """Statistics of the arrays; a large array comes as samples of HISTOGRAM_VALUES_PER_SAMPLE
    values each, as calibration sees large tensors (one sample at a time), so every value
    reaches the histogram."""
    statistics = TensorStatistics()
    size = HISTOGRAM_VALUES_PER_SAMPLE
    for array in arrays:
        if per_sample or array.size <= size:
            statistics.update(array, per_sample=per_sample)
            continue
        for start in range(0, array.size, size):
            statistics.update(array.reshape(-1)[start : start + size])
    return statistics


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize(
    "values",
    [GAUSSIAN[:1000], UNIFORM, RELU, np.zeros(10, np.float32), np.full(5, -3.0, np.float32)],
    ids=["small gaussian", "uniform", "relu", "zeros", "constant"],
)
def test_ranges_are_finite_ordered_and_within_the_values(method, values):
    statistics = statistics_of(values)
    low, high = compute_range(statistics, method)
    assert math.isfinite(low) and math.isfinite(high) and low <= high
    assert values.min() <= low and high <= values.max()


def test_minmax_is_the_extremes_or_their_mean_per_sample():
    batch = np.array([[0.0, 1.0], [-2.0, 3.0]], dtype=np.float32)
    statistics = statistics_of(batch, per_sample=True)
    assert minmax_range(statistics) == (-2.0, 3.0)
    assert minmax_range(statistics, per_sample_mean=True) == (-1.0, 2.0)


def test_clipping_methods_cut_gaussian_tails():
    statistics = statistics_of(GAUSSIAN)
    extreme = min(-GAUSSIAN.min(), GAUSSIAN.max())
    low, high = percentile_range(statistics, 99.99)
    assert low == pytest.approx(np.percentile(GAUSSIAN, 0.01), abs=0.02)
    assert high == pytest.approx(np.percentile(GAUSSIAN, 99.99), abs=0.02)
    for low, high in (entropy_range(statistics), mse_range(statistics)):
        assert 2.5 < high < extreme and -extreme < low < -2.5


@pytest.mark.parametrize("method", METHODS)
def test_uniform_values_keep_about_their_full_range(method):
    low, high = compute_range(statistics_of(UNIFORM), method)
    assert low == pytest.approx(-1.0, abs=0.02) and high == pytest.approx(3.0, abs=0.02)


def test_non_negative_tensors_keep_their_minimum():
    statistics = statistics_of(RELU)
    for method in METHODS:
        low, high = compute_range(statistics, method)
        assert low == 0.0 and 2.0 < high <= RELU.max()


@pytest.mark.parametrize(
    ("method", "kept"),
    [("minmax", True), ("percentile", False), ("entropy", False), ("mse", False), ("auto", False)],
)
def test_only_minmax_keeps_a_far_outlier(method, kept):
    values = np.append(GAUSSIAN, np.float32(100.0))
    high = compute_range(statistics_of(values), method)[1]
    assert (high == 100.0) is kept
    if method != "minmax":
        assert high < 50


def test_auto_picks_the_candidate_with_the_least_expected_error():
    uniform, tailed = statistics_of(UNIFORM), statistics_of(np.append(GAUSSIAN, np.float32(100.0)))
    assert auto_range(uniform) == pytest.approx(minmax_range(uniform), abs=0.02)
    for statistics in (uniform, tailed):
        chosen = expected_error(statistics, *auto_range(statistics))
        for candidate in (minmax_range, percentile_range, mse_range):
            assert chosen <= expected_error(statistics, *candidate(statistics))
    assert (
        expected_error(tailed, *auto_range(tailed))
        < expected_error(tailed, *minmax_range(tailed)) / 2
    )


def test_expected_error_of_a_range_that_fits_is_a_twelfth_of_a_step_squared():
    statistics = statistics_of(UNIFORM)
    step = 4.0 / 255
    assert expected_error(statistics, -1.0, 3.0) == pytest.approx(step**2 / 12, rel=0.05)
    assert expected_error(statistics, -1.0, 2.0) > expected_error(statistics, -1.0, 3.0)


def test_an_outlier_of_ten_thousand_is_kept_by_minmax_and_cut_by_percentile():
    values = np.append(GAUSSIAN, np.float32(1e4))
    statistics = statistics_of(values)
    assert minmax_range(statistics)[1] == 1e4
    assert percentile_range(statistics)[1] < 10


def test_percentile_of_100_is_minmax():
    statistics = statistics_of(UNIFORM)
    assert percentile_range(statistics, 100.0) == minmax_range(statistics)


def test_entropy_and_mse_ignore_a_few_far_outliers_that_stretch_minmax():
    outliers = np.array([-50.0, 50.0], dtype=np.float32)
    statistics = statistics_of(GAUSSIAN, outliers)
    assert minmax_range(statistics) == (-50.0, 50.0)
    for low, high in (entropy_range(statistics), mse_range(statistics)):
        assert -25.0 < low < -2.5 and 2.5 < high < 25.0


def test_non_finite_statistics_give_a_reason_not_a_range():
    statistics = statistics_of(np.array([1.0, np.inf, -np.inf], dtype=np.float32))
    calibrated = calibrate_tensor(statistics, "entropy")
    assert math.isnan(calibrated.low) and math.isnan(calibrated.high)
    assert "2 NaN or Inf values" in calibrated.reason


def test_float32_min_sentinels_give_a_reason():
    masked = np.array([0.5, -1.0, np.finfo(np.float32).min], dtype=np.float32)
    calibrated = calibrate_tensor(statistics_of(masked), "percentile")
    assert math.isnan(calibrated.low)
    assert "attention mask" in calibrated.reason


def test_empty_statistics_give_a_reason():
    assert calibrate_tensor(TensorStatistics()).reason == "calibration saw no values"


def test_unknown_method_is_refused():
    with pytest.raises(ValueError, match="minmax, percentile, entropy, mse"):
        compute_range(statistics_of(UNIFORM), "kl")
