from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from onnxopt.calibration import collectors
from onnxopt.calibration.collectors import ChannelSums, TensorStatistics
from onnxopt.calibration.ranges import percentile_range

UNIT_FLOATS = st.floats(-1.0, 1.0, width=32)
SCALES = st.sampled_from([1e-30, 1e-6, 1e-2, 1.0, 3.0, 1e3, 1e8, 1e30])
PER_SAMPLE_KEYS = ("sample_count", "sample_minimum_sum", "sample_maximum_sum")


def collected(*arrays: np.ndarray, per_sample: bool = False) -> TensorStatistics:
    statistics = TensorStatistics()
    for array in arrays:
        statistics.update(array, per_sample=per_sample)
    return statistics


def merged(*parts: TensorStatistics) -> TensorStatistics:
    total = TensorStatistics()
    for part in parts:
        total.merge(part)
    return total


@st.composite
def scaled_arrays(draw: st.DrawFn) -> np.ndarray:
    """Arrays mixing values of very different magnitudes, subnormals and zeros included."""
    values = draw(hnp.arrays(np.float32, st.integers(1, 60), elements=UNIT_FLOATS))
    return values * np.float32(draw(SCALES))


@settings(max_examples=150, deadline=None)
@given(first=scaled_arrays(), second=scaled_arrays(), third=scaled_arrays())
@example(  # a negative subnormal, then values that widen the grid far past it
    first=np.array([-1e-45, 0.0], np.float32),
    second=np.array([3e38], np.float32),
    third=np.array([-(2.0**-20)], np.float32),
)
def test_merge_of_parts_equals_one_pass_exactly(first, second, third):
    one_pass = collected(first, second, third).to_dict()
    assert merged(collected(first), collected(second, third)).to_dict() == one_pass
    assert merged(collected(third), collected(first), collected(second)).to_dict() == one_pass
    assert (
        collected(np.concatenate([first, second, third])).to_dict()
        | {
            "sample_count": 3,
            "sample_minimum_sum": one_pass["sample_minimum_sum"],
            "sample_maximum_sum": one_pass["sample_maximum_sum"],
        }
        == one_pass
    )


def test_histogram_counts_every_value_in_its_bin():
    values = np.array([-3.0, -0.5, 0.0, 0.25, 2.5, 3.99], dtype=np.float32)
    statistics = collected(values)
    assert statistics.range_exponent == 2  # the smallest power of two above 3.99
    edges = statistics.bin_edges
    for value in values:
        index = int(np.searchsorted(edges, value, side="right")) - 1
        assert statistics.histogram[index] >= 1
    assert statistics.count == len(values)


def test_growing_the_range_merges_bins_exactly():
    rng = np.random.default_rng(0)
    small = rng.standard_normal(10_000).astype(np.float32)
    large = (rng.standard_normal(100) * 1e5).astype(np.float32)
    grown = collected(small, large)
    assert grown.range_exponent > collected(small).range_exponent
    np.testing.assert_array_equal(grown.histogram, collected(large, small).histogram)


def test_all_zero_tensor_has_a_small_range():
    statistics = collected(np.zeros((2, 3), np.float32))
    assert statistics.minimum == statistics.maximum == 0.0
    assert statistics.bin_width > 0
    assert statistics.count == 6


def test_per_sample_min_and_max_average_over_samples():
    batch = np.array([[0.0, 1.0], [-2.0, 3.0], [-4.0, 5.0]], dtype=np.float32)
    per_sample = collected(batch, per_sample=True)
    assert per_sample.sample_count == 3
    assert per_sample.sample_minimum_mean == pytest.approx(-2.0)
    assert per_sample.sample_maximum_mean == pytest.approx(3.0)
    whole = collected(batch)
    assert (whole.sample_count, whole.sample_minimum_mean, whole.sample_maximum_mean) == (1, -4, 5)


def test_non_finite_values_are_counted_and_left_out():
    values = np.array([[1.0, np.inf, -2.0], [np.nan, np.nan, np.nan]], dtype=np.float32)
    statistics = collected(values, per_sample=True)
    assert statistics.nonfinite_count == 4
    assert (statistics.minimum, statistics.maximum, statistics.count) == (-2.0, 1.0, 2)
    assert statistics.sample_count == 1  # the second sample has no finite value


def test_channel_means_along_axis_1_and_the_last_axis():
    rng = np.random.default_rng(1)
    first, second = (rng.standard_normal((2, 3, 4, 5)).astype(np.float32) for _ in range(2))
    statistics = collected(first, second)
    both = np.concatenate([first, second]).astype(np.float64)
    np.testing.assert_allclose(
        statistics.channel_means("axis1"), both.mean(axis=(0, 2, 3)), rtol=1e-6
    )
    np.testing.assert_allclose(
        statistics.channel_means("last_axis"), both.mean(axis=(0, 1, 2)), rtol=1e-6
    )


def test_channel_means_are_dropped_when_the_channel_count_varies():
    statistics = collected(np.ones((1, 4, 3), np.float32), np.ones((1, 5, 3), np.float32))
    assert statistics.channel_means("axis1") is None
    np.testing.assert_allclose(statistics.channel_means("last_axis"), [1.0, 1.0, 1.0])


def test_float16_values_are_collected():
    values = np.array([-1.5, 0.0, 2.0], dtype=np.float16)
    assert (collected(values).minimum, collected(values).maximum) == (-1.5, 2.0)


def test_dict_round_trip_is_exact_and_json_able():
    rng = np.random.default_rng(2)
    statistics = collected(rng.standard_normal((4, 3, 2)).astype(np.float32) * 7, per_sample=True)
    text = json.dumps(statistics.to_dict())
    restored = TensorStatistics.from_dict(json.loads(text))
    assert restored.to_dict() == statistics.to_dict()
    assert restored.sample_minimum_mean == statistics.sample_minimum_mean


def test_size_does_not_grow_with_samples():
    rng = np.random.default_rng(3)
    statistics = TensorStatistics()
    sizes = []
    for _ in range(3):
        for _ in range(20):
            statistics.update(rng.standard_normal((2, 8, 16)).astype(np.float32), per_sample=True)
        sizes.append(
            statistics.histogram.nbytes
            + sum(channel.high.nbytes for channel in statistics.channel_sums.values())
        )
    assert sizes[0] == sizes[1] == sizes[2]


def test_merging_different_bin_counts_is_refused():
    with pytest.raises(ValueError, match="bins"):
        TensorStatistics(bins=4096).merge(TensorStatistics(bins=1024))


def test_large_samples_add_a_fixed_sample_of_their_values_to_the_histogram():
    rng = np.random.default_rng(0)
    batch = rng.standard_normal((3, collectors.HISTOGRAM_VALUES_PER_SAMPLE * 4)).astype(np.float32)
    statistics = TensorStatistics()
    statistics.update(batch, per_sample=True, channel_axes=())
    assert statistics.count == 3 * collectors.HISTOGRAM_VALUES_PER_SAMPLE
    assert (statistics.minimum, statistics.maximum) == (float(batch.min()), float(batch.max()))
    one_by_one = TensorStatistics()
    for row in batch:
        one_by_one.update(row[None], per_sample=True, channel_axes=())
    assert one_by_one.to_dict() == statistics.to_dict()
    high = percentile_range(statistics, 99.9)[1]
    assert high == pytest.approx(np.percentile(batch, 99.9), rel=0.02)


def test_channel_sums_add_up_alike_in_any_order_and_stay_accurate():
    rng = np.random.default_rng(5)
    runs = [rng.standard_normal(6) * 10.0 ** rng.integers(-6, 9) for _ in range(50)]
    runs[7][2] = np.inf
    forward = ChannelSums.of(runs[0], 10)
    for run in runs[1:]:
        forward = forward.plus(ChannelSums.of(run, 10))
    backward = ChannelSums.of(runs[-1], 10)
    for run in reversed(runs[:-1]):
        backward = backward.plus(ChannelSums.of(run, 10))
    assert forward.to_dict() == backward.to_dict()
    expected = np.sum(np.array(runs, dtype=np.float64), axis=0)
    finite = np.isfinite(expected)
    np.testing.assert_allclose(forward.sums[finite], expected[finite], rtol=1e-12, atol=1e-15)
    assert forward.sums[2] == np.inf and forward.count == 500


def test_channel_sums_of_caches_from_earlier_versions_still_read():
    old = {"sums": [1.5, -2.25], "count": 4}
    assert ChannelSums.from_dict(old).means.tolist() == [0.375, -0.5625]
