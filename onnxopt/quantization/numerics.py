"""Scale, zero point and integer conversion: the arithmetic onnxruntime's integer kernels expect."""

from __future__ import annotations

import dataclasses
import functools
import platform
from pathlib import Path

import numpy as np

UINT8_RANGE = (0, 255)
INT8_SYMMETRIC_RANGE = (-127, 127)
INT8_REDUCED_RANGE = (-63, 63)
INT32_LIMIT = 2**31 - 1


@dataclasses.dataclass(frozen=True)
class ActivationFormat:
    """How activations are stored: uint8 with a zero point (onnxruntime's CPU kernels), or
    int8 symmetric around zero (the form TensorRT and other QDQ consumers read)."""

    dtype: type = np.uint8
    symmetric: bool = False


UINT8_ASYMMETRIC = ActivationFormat(np.uint8, symmetric=False)
INT8_SYMMETRIC = ActivationFormat(np.int8, symmetric=True)


def activation_parameters(
    low: float, high: float, activations: ActivationFormat = UINT8_ASYMMETRIC
) -> tuple[np.float32, np.integer]:
    """Scale and zero point of an activation tensor; zero is exactly representable.

    The range is widened to include zero (padding and ReLU outputs are exact zeros), and an empty
    range gets scale 1, which quantizes the constant tensor it describes exactly. Symmetric int8
    spends its 255 levels on [-bound, bound], bound the larger magnitude of the two ends.
    """
    low, high = min(float(low), 0.0), max(float(high), 0.0)
    zero = activations.dtype(0)
    if high - low < 1e-12:
        return np.float32(1.0), zero
    if activations.symmetric:
        return np.float32(max(-low, high) / INT8_SYMMETRIC_RANGE[1]), zero
    scale = np.float32((high - low) / (UINT8_RANGE[1] - UINT8_RANGE[0]))
    zero_point = np.clip(np.round(-low / float(scale)), *UINT8_RANGE)
    return scale, np.uint8(zero_point)


# float16's smallest normal and largest finite magnitudes: between them it keeps 11 significant
# bits, a relative error of at most 2**-11, far below int8's.
HALF_NORMAL_RANGE = (2.0**-14, 65504.0)


def rounded_to_half(values: np.ndarray) -> np.ndarray:
    """``values`` (float32) rounded to the nearest float16 when every nonzero one lies within
    HALF_NORMAL_RANGE, else unchanged: scales and biases that can be stored in half the bytes."""
    magnitudes = np.abs(values[values != 0])
    if magnitudes.size and (
        magnitudes.min() < HALF_NORMAL_RANGE[0] or magnitudes.max() > HALF_NORMAL_RANGE[1]
    ):
        return values
    return values.astype(np.float16).astype(np.float32)


def quantize_values(
    values: np.ndarray, scale: np.ndarray, zero_point: np.ndarray, dtype: type
) -> np.ndarray:
    """Round half to even and saturate, as QuantizeLinear does.

    In float64, a block of rows at a time and in place: a large weight's float64
    temporaries would otherwise take eight bytes a value, several times over."""
    info = np.iinfo(dtype)
    values = np.asarray(values)
    scale, zero_point = np.asarray(scale), np.asarray(zero_point)
    result = np.empty(np.broadcast_shapes(values.shape, scale.shape, zero_point.shape), dtype)
    if result.ndim == 0:
        quantized = np.round(values.astype(np.float64) / scale) + zero_point.astype(np.float64)
        return np.clip(quantized, info.min, info.max).astype(dtype)
    rows = max(1, QUANTIZE_BLOCK_VALUES // max(1, result[0].size))
    for start in range(0, result.shape[0], rows):
        block = slice(start, start + rows)
        quantized = np.divide(
            _rows(values, block, result.ndim), _rows(scale, block, result.ndim), dtype=np.float64
        )
        np.round(quantized, out=quantized)
        quantized += _rows(zero_point, block, result.ndim)
        np.clip(quantized, info.min, info.max, out=quantized)
        result[block] = quantized
    return result


# Values quantized at a time: bounds the float64 temporaries to a few megabytes.
QUANTIZE_BLOCK_VALUES = 2**20


def _rows(array: np.ndarray, block: slice, rank: int) -> np.ndarray:
    """``array``'s rows in ``block`` when it has rows of its own along the first of ``rank``
    axes, else the array itself (it broadcasts over them)."""
    if array.ndim == rank and array.shape[0] > 1:
        return array[block]
    return array


def weight_limit(reduce_range: bool) -> int:
    """The largest magnitude of an int8 weight: 127, or 63 for 7-bit weights."""
    return (INT8_REDUCED_RANGE if reduce_range else INT8_SYMMETRIC_RANGE)[1]


def weight_scales(weight: np.ndarray, axis: int | None, reduce_range: bool) -> np.ndarray:
    """Symmetric int8 scales, one per channel along ``axis`` (or one for the tensor when None)."""
    limit = weight_limit(reduce_range)
    if axis is None:
        largest = np.abs(weight).max(initial=0.0)
    else:
        other_axes = tuple(index for index in range(weight.ndim) if index != axis)
        largest = np.abs(weight).max(axis=other_axes, initial=0.0)
    scales = np.asarray(largest, dtype=np.float64) / limit
    return np.where(scales > 0, scales, 1.0).astype(np.float32)


def quantize_weight(weight: np.ndarray, scales: np.ndarray, axis: int | None) -> np.ndarray:
    """int8 values of a weight for the given per-channel (or per-tensor) scales."""
    broadcast = scales if axis is None else _along_axis(scales, axis, weight.ndim)
    return quantize_values(weight, broadcast, np.zeros_like(broadcast, dtype=np.int8), np.int8)


def widen_for_bias(bias: np.ndarray, input_scale: float, scales: np.ndarray) -> np.ndarray:
    """Weight scales widened where ``bias / (input_scale * weight_scale)`` would overflow int32."""
    # A small margin keeps float32 rounding of the scales from pushing the bias past the limit.
    needed = np.abs(bias.astype(np.float64)) / (float(input_scale) * INT32_LIMIT * (1 - 1e-5))
    return np.maximum(scales.astype(np.float64), needed).astype(np.float32)


def quantize_bias(
    bias: np.ndarray, input_scale: float, scales: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """int32 bias and its scale (input scale x weight scale), the form integer kernels add directly."""
    bias_scale = (np.float32(input_scale) * scales.astype(np.float32)).astype(np.float32)
    quantized = np.round(bias.astype(np.float64) / bias_scale.astype(np.float64))
    quantized = np.clip(quantized, -INT32_LIMIT, INT32_LIMIT).astype(np.int32)
    return quantized, bias_scale


def _along_axis(values: np.ndarray, axis: int, rank: int) -> np.ndarray:
    shape = [1] * rank
    shape[axis] = -1
    return values.reshape(shape)


@functools.cache
def cpu_has_vnni() -> bool:
    """Whether this CPU multiplies uint8 x int8 without the 16-bit saturation that reduce_range avoids.

    Without VNNI (or AMX), x86's VPMADDUBSW sums pairs into int16 and can saturate with full 8-bit
    weights; 7-bit weights avoid that. ARM and other CPUs have no such instruction quirk.
    """
    if platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686"):
        return True
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return True
    return any(flag in flags for flag in ("avx512_vnni", "avx_vnni", "amx_int8"))
