"""Quantization ranges from a tensor's statistics: minmax, percentile, entropy and mse.

Each method returns (low, high), finite with low <= high, for the CPU default activation type:
uint8, asymmetric, 256 levels. The range need not hold 0; the quantizer widens it to do so.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import typing
from collections.abc import Callable
from typing import Literal

import numpy as np

from onnxopt.calibration.collectors import TensorStatistics

logger = logging.getLogger(__name__)

# How a range is chosen from a tensor's statistics.
RangeMethod = Literal["auto", "minmax", "percentile", "entropy", "mse"]
METHODS: tuple[str, ...] = typing.get_args(RangeMethod)

# uint8 has 256 levels: 255 steps between the ends of the range.
QUANTIZATION_STEPS = 255

# Levels the entropy search quantizes to: all of uint8 over [0, t] for non-negative tensors, and
# the 128 of one sign for a symmetric threshold over |x|.
UNSIGNED_LEVELS = 255
SIGNED_LEVELS = 128

# No real activation reaches this magnitude; values that do are sentinels, such as the float32
# minimum that attention masks add, and a range that holds them leaves none for the others.
SENTINEL_MAGNITUDE = 1e30

# Counts that Q holds in bins where P has mass but Q has none: TensorRT's smoothing epsilon.
ENTROPY_SMOOTHING = 1e-4

# Candidate thresholds the coarse pass of a search tries along one side; the fine pass then tries
# every bin near the best coarse one.
COARSE_CANDIDATES = 128


@dataclasses.dataclass
class CalibratedTensor:
    """A tensor's statistics and the range calibration chose for it.

    Attributes:
        statistics: what calibration saw of the tensor.
        low: lower end of the range; nan when the tensor cannot be quantized.
        high: upper end of the range; nan when the tensor cannot be quantized.
        reason: why the tensor cannot be quantized (it then stays float), or None.
    """

    statistics: TensorStatistics
    low: float
    high: float
    reason: str | None = None


def calibrate_tensor(
    statistics: TensorStatistics,
    method: str = "minmax",
    *,
    percentile: float = 99.99,
    per_sample_mean: bool = False,
) -> CalibratedTensor:
    """The tensor's range by ``method``, or nan and a reason when it has none worth using.

    A tensor has none when calibration saw NaN or Inf in it, no values at all, or values of
    SENTINEL_MAGNITUDE or more: whatever the method, clipping those changes what the model
    computes (a masked position is no longer masked) and keeping them leaves the others no levels.
    """
    if statistics.nonfinite_count:
        count = statistics.nonfinite_count
        reason = f"calibration saw {count} NaN or Inf {'value' if count == 1 else 'values'}"
        return CalibratedTensor(statistics, math.nan, math.nan, reason)
    if statistics.count == 0:
        return CalibratedTensor(statistics, math.nan, math.nan, "calibration saw no values")
    largest = max(-statistics.minimum, statistics.maximum)
    if largest >= SENTINEL_MAGNITUDE:
        extreme = (
            statistics.minimum if -statistics.minimum >= statistics.maximum else statistics.maximum
        )
        reason = (
            f"calibration saw {extreme:.4g}, a sentinel value (such as a float32-min attention "
            "mask) that no 8-bit range can hold along with the others"
        )
        return CalibratedTensor(statistics, math.nan, math.nan, reason)
    low, high = compute_range(
        statistics, method, percentile=percentile, per_sample_mean=per_sample_mean
    )
    if not (math.isfinite(low) and math.isfinite(high)):
        return CalibratedTensor(
            statistics, math.nan, math.nan, f"{method} range ({low}, {high}) is not finite"
        )
    return CalibratedTensor(statistics, low, high)


def compute_range(
    statistics: TensorStatistics,
    method: str,
    *,
    percentile: float = 99.99,
    per_sample_mean: bool = False,
) -> tuple[float, float]:
    """(low, high) of a tensor with finite values, by one of ``METHODS``."""
    if method == "minmax":
        return minmax_range(statistics, per_sample_mean=per_sample_mean)
    if method == "percentile":
        return percentile_range(statistics, percentile)
    if method == "entropy":
        return entropy_range(statistics)
    if method == "mse":
        return mse_range(statistics)
    if method == "auto":
        return auto_range(statistics)
    raise ValueError(f"unknown calibration method '{method}'; valid: {', '.join(METHODS)}")


def minmax_range(
    statistics: TensorStatistics, per_sample_mean: bool = False
) -> tuple[float, float]:
    """The smallest and largest values, or with ``per_sample_mean`` the means of each sample's."""
    if per_sample_mean:
        return statistics.sample_minimum_mean, statistics.sample_maximum_mean
    return statistics.minimum, statistics.maximum


def percentile_range(
    statistics: TensorStatistics, percentile: float = 99.99
) -> tuple[float, float]:
    """The (100 - p)th and pth percentiles; a non-negative tensor keeps its minimum as low.

    Percentiles interpolate linearly inside a histogram bin and stay within [min, max].
    """
    if not 50.0 < percentile <= 100.0:
        raise ValueError(f"percentile must be in (50, 100], got {percentile}")
    high = _quantile(statistics, percentile / 100.0)
    if statistics.minimum >= 0.0:
        return statistics.minimum, high
    return _quantile(statistics, 1.0 - percentile / 100.0), high


def entropy_range(statistics: TensorStatistics) -> tuple[float, float]:
    """The threshold whose quantized histogram loses the least information (TensorRT's KL method).

    A non-negative tensor searches its upper end over the histogram of [0, R) quantized to 255
    levels; any other searches a symmetric threshold over the histogram of |x| with 128 levels,
    clipped to [min, max].
    """
    half = statistics.bins // 2
    positive = statistics.histogram[half:]
    if statistics.minimum >= 0.0:
        bins = _best_entropy_bins(positive, UNSIGNED_LEVELS)
        high = min(statistics.maximum, bins * statistics.bin_width)
        return min(statistics.minimum, high), high
    magnitudes = positive + statistics.histogram[:half][::-1]
    threshold = _best_entropy_bins(magnitudes, SIGNED_LEVELS) * statistics.bin_width
    high = min(statistics.maximum, threshold)
    low = max(statistics.minimum, -threshold)
    return min(low, high), high


def mse_range(statistics: TensorStatistics) -> tuple[float, float]:
    """The range whose uint8 quantization has the least expected squared error over the histogram.

    A candidate (low, high) is widened to hold 0 and split into 255 steps. A value outside it costs
    its squared distance to the range; a value within half a step of 0 rounds to the exact 0, so
    it costs its square; any other costs step**2 / 12 of rounding. Values sit at their bin's
    center, and prefix sums make each candidate O(1). Candidates are bin edges, searched on a
    coarse grid and then bin by bin around the best.
    """
    half = statistics.bins // 2
    width = statistics.bin_width
    edges = statistics.bin_edges
    counts = statistics.histogram.astype(np.float64)
    centers = edges[:-1] + width / 2
    count_below = np.concatenate([[0.0], np.cumsum(counts)])
    first_below = np.concatenate([[0.0], np.cumsum(counts * centers)])
    second_below = np.concatenate([[0.0], np.cumsum(counts * centers**2)])
    total = count_below[-1]
    nonzero = np.flatnonzero(statistics.histogram)
    # Candidate edge indices: low from the first nonzero bin up to 0, high from 0 to past the last.
    lows = (int(nonzero[0]), half + 1) if nonzero[0] < half else (half, half + 1)
    highs = (half, int(nonzero[-1]) + 2) if nonzero[-1] >= half else (half, half + 1)

    def error(low_index: np.ndarray, high_index: np.ndarray) -> np.ndarray:
        low, high = edges[low_index], edges[high_index]
        clipped_below = (
            second_below[low_index]
            - 2 * low * first_below[low_index]
            + low**2 * count_below[low_index]
        )
        above = total - count_below[high_index]
        clipped_above = (
            second_below[-1]
            - second_below[high_index]
            - 2 * high * (first_below[-1] - first_below[high_index])
            + high**2 * above
        )
        inside = count_below[high_index] - count_below[low_index]
        step = (np.maximum(high, 0.0) - np.minimum(low, 0.0)) / QUANTIZATION_STEPS
        # Bins whose centers lie within half a step of 0, and inside the range, round to 0.
        reach = step / (2 * width)
        zero_start = np.maximum(np.floor(half - 0.5 - reach).astype(np.intp) + 1, low_index)
        zero_stop = np.minimum(np.ceil(half - 0.5 + reach).astype(np.intp), high_index)
        zero_stop = np.maximum(zero_stop, zero_start)
        to_zero = count_below[zero_stop] - count_below[zero_start]
        to_zero_error = second_below[zero_stop] - second_below[zero_start]
        rounded = (inside - to_zero) * step**2 / 12 + to_zero_error
        return clipped_below + clipped_above + rounded

    low_index, high_index = _search_grid(error, lows, highs)
    high = min(statistics.maximum, float(edges[high_index]))
    low = max(statistics.minimum, float(edges[low_index]))
    return min(low, high), high


# The percentiles auto_range weighs against the minmax and the MSE-optimal ranges.
AUTO_PERCENTILES = (99.9, 99.99, 99.999)


def auto_range(statistics: TensorStatistics) -> tuple[float, float]:
    """Of the minmax, percentile and MSE-optimal ranges, the one with the least expected error.

    The error is ``expected_error``'s, over the tensor's histogram: what 8 bits will cost this
    tensor, rounding and clipping together. Minmax wins for tensors without outliers (clipping
    anything costs more than the steps it saves), a clipping range for long-tailed ones.
    """
    candidates = [
        minmax_range(statistics),
        *(percentile_range(statistics, percentile) for percentile in AUTO_PERCENTILES),
        mse_range(statistics),
    ]
    errors = [expected_error(statistics, low, high) for low, high in candidates]
    return candidates[int(np.argmin(errors))]


def expected_error(statistics: TensorStatistics, low: float, high: float) -> float:
    """Expected squared error of quantizing the tensor to uint8 over (low, high), per value.

    As in ``mse_range``: the range is widened to hold 0 and split into 255 steps; a value outside
    costs its squared distance to the range, one within half a step of 0 its square, any other
    step**2 / 12; values sit at their bin's center.
    """
    counts = statistics.histogram.astype(np.float64)
    total = counts.sum()
    if total == 0:
        return 0.0
    centers = statistics.bin_edges[:-1] + statistics.bin_width / 2
    low, high = min(low, 0.0), max(high, 0.0)
    step = (high - low) / QUANTIZATION_STEPS
    below, above = centers < low, centers > high
    clipped = np.where(below, (low - centers) ** 2, 0.0) + np.where(
        above, (centers - high) ** 2, 0.0
    )
    inside = ~(below | above)
    to_zero = inside & (np.abs(centers) < step / 2)
    rounded = np.where(to_zero, centers**2, np.where(inside, step**2 / 12, 0.0))
    return float(np.dot(counts, clipped + rounded) / total)


def _quantile(statistics: TensorStatistics, fraction: float) -> float:
    """The value below which ``fraction`` of the values lie, interpolated within its bin."""
    cumulative = np.cumsum(statistics.histogram)
    target = fraction * float(cumulative[-1])
    index = int(np.searchsorted(cumulative, target, side="left"))
    if index >= len(cumulative):
        return statistics.maximum
    before = float(cumulative[index - 1]) if index else 0.0
    inside = float(statistics.histogram[index])
    position = (target - before) / inside if inside else 0.0
    value = float(statistics.bin_edges[index]) + position * statistics.bin_width
    return min(max(value, statistics.minimum), statistics.maximum)


def _best_entropy_bins(counts: np.ndarray, levels: int) -> int:
    """How many leading bins of ``counts`` to keep: the number whose quantization to ``levels``
    levels diverges least (Kullback-Leibler) from the histogram with its clipped tail.

    For i kept bins (TensorRT's algorithm), P is counts[:i] with the tail added to bin i - 1, and
    Q quantizes counts[:i], tail left out, spreading each level's sum S evenly over the Z bins
    where P is nonzero; each is normalized by its own total (T for P, C for Q). Then
    T * KL(P || Q) = sum P log P - T log T + T log C - sum_levels P_level log(S / Z), and prefix
    sums give every candidate in O(levels). Where P has mass but Q has none (a clipped tail folded
    into an empty last level), Q holds ENTROPY_SMOOTHING counts instead, as TensorRT's smoothing
    does, so clipping a few far outliers costs little rather than being ruled out. Bin 0, whose
    spike of exact zeros (ReLU) would make every threshold that merges it look costly, counts as
    much as bin 1, as in NVIDIA's pytorch-quantization.
    """
    used = int(np.flatnonzero(counts)[-1]) + 1
    if used <= levels:
        return used
    counts = counts[:used].astype(np.float64)
    if used > 1:
        counts[0] = counts[1]
    total = counts.sum()
    cumulative = np.concatenate([[0.0], np.cumsum(counts)])
    nonzero = np.concatenate([[0], np.cumsum(counts > 0)])
    entropy_terms = np.concatenate([[0.0], np.cumsum(_x_log_x(counts))])
    level_starts = np.arange(levels + 1)

    def divergence(candidates: np.ndarray) -> np.ndarray:
        tail = total - cumulative[candidates]
        last = counts[candidates - 1] + tail
        bounds = (level_starts * candidates[:, None]) // levels
        sums = np.diff(cumulative[bounds], axis=1)
        reference_sums = sums.copy()
        reference_sums[:, -1] += tail
        filled = np.diff(nonzero[bounds], axis=1).astype(np.float64)
        filled[:, -1] += (counts[candidates - 1] == 0) & (last > 0)
        with np.errstate(divide="ignore", invalid="ignore"):
            level_values = np.where(sums > 0, sums / filled, ENTROPY_SMOOTHING)
            spread = np.where(reference_sums > 0, reference_sums * np.log(level_values), 0.0)
            kept = total * np.log(cumulative[candidates])
        result = entropy_terms[candidates - 1] + _x_log_x(last) + kept - spread.sum(axis=1)
        return np.where(cumulative[candidates] > 0, result, np.inf)

    return _search_line(divergence, (levels, used + 1))


def _search_line(
    objective: Callable[[np.ndarray], np.ndarray], index_range: tuple[int, int]
) -> int:
    """The index of a half-open range that minimizes ``objective``, which maps an index array.

    Tries about COARSE_CANDIDATES evenly spread indices, then every index within one coarse step
    of the best of them.
    """
    stride = _stride(index_range)
    coarse = _candidates(index_range, stride)
    best = int(coarse[np.argmin(objective(coarse))])
    if stride == 1:
        return best
    fine = _candidates(_around(best, stride, index_range), 1)
    return int(fine[np.argmin(objective(fine))])


def _search_grid(
    objective: Callable[[np.ndarray, np.ndarray], np.ndarray],
    first_range: tuple[int, int],
    second_range: tuple[int, int],
) -> tuple[int, int]:
    """The index pair of two half-open ranges that minimizes ``objective`` (broadcasting arrays).

    A coarse grid of about COARSE_CANDIDATES per axis finds the best region, then every pair
    within one coarse step of the best is tried: at most about COARSE_CANDIDATES**2 evaluations.
    """
    first_stride, second_stride = _stride(first_range), _stride(second_range)
    best = _grid_minimum(
        objective,
        _candidates(first_range, first_stride),
        _candidates(second_range, second_stride),
    )
    if first_stride == 1 and second_stride == 1:
        return best
    return _grid_minimum(
        objective,
        _candidates(_around(best[0], first_stride, first_range), 1),
        _candidates(_around(best[1], second_stride, second_range), 1),
    )


def _grid_minimum(
    objective: Callable[[np.ndarray, np.ndarray], np.ndarray],
    first: np.ndarray,
    second: np.ndarray,
) -> tuple[int, int]:
    values = objective(first[:, None], second[None, :])
    row, column = np.unravel_index(int(np.argmin(values)), values.shape)
    return int(first[row]), int(second[column])


def _stride(index_range: tuple[int, int]) -> int:
    return max(1, (index_range[1] - index_range[0]) // COARSE_CANDIDATES)


def _candidates(index_range: tuple[int, int], stride: int) -> np.ndarray:
    """Indices of a half-open range by ``stride``, always with its last index."""
    start, stop = index_range
    return np.unique(np.append(np.arange(start, stop, stride), stop - 1))


def _around(index: int, stride: int, index_range: tuple[int, int]) -> tuple[int, int]:
    return max(index - stride, index_range[0]), min(index + stride + 1, index_range[1])


def _x_log_x(values: np.ndarray) -> np.ndarray:
    """x log x, with 0 log 0 = 0."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(values > 0, values * np.log(values), 0.0)
