"""Resize and Upsample: every mode, coordinate transformation, antialias, crop, axes and
aspect-ratio policy that onnxruntime's CPU kernel runs.

Resizing is separable: one axis at a time, each output position a weighted sum of a few input
positions (taps). Taps and weights are numpy arrays computed from the shapes, so the result is
differentiable with respect to the input.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import numpy as np
import torch

from onnxopt.bridge.registry import Call, op

_COORDINATES = (
    "half_pixel",
    "half_pixel_symmetric",
    "pytorch_half_pixel",
    "align_corners",
    "asymmetric",
    "tf_crop_and_resize",
)
_NEAREST = ("round_prefer_floor", "round_prefer_ceil", "floor", "ceil")
_POLICIES = ("stretch", "not_larger", "not_smaller")


def _resize_check(call: Call) -> str | None:
    mode = call.get("mode", "nearest")
    if mode not in ("nearest", "linear", "bilinear", "cubic"):
        return f"mode={mode!r} (supported: nearest, linear, cubic)"
    coordinates = call.get("coordinate_transformation_mode", "half_pixel")
    if call.op_type == "Resize" and coordinates not in _COORDINATES:
        return (
            f"coordinate_transformation_mode={coordinates!r} (supported: {', '.join(_COORDINATES)})"
        )
    if call.get("nearest_mode", "round_prefer_floor") not in _NEAREST:
        return f"nearest_mode={call.get('nearest_mode')!r}"
    if call.get("keep_aspect_ratio_policy", "stretch") not in _POLICIES:
        return f"keep_aspect_ratio_policy={call.get('keep_aspect_ratio_policy')!r}"
    return None


@dataclasses.dataclass
class _Axis:
    """One axis of a resize: input and output sizes, the scale that maps them and the region
    of interest (as fractions of the input, for tf_crop_and_resize)."""

    size: int
    out: int
    scale: float
    roi: tuple[float, float] = (0.0, 1.0)


@op("Resize", check=_resize_check)
def resize(call: Call, x, roi=None, scales=None, sizes=None):
    if call.opset < 11:  # Resize-10 takes (x, scales), asymmetric, onnxruntime's "simple" rounding
        return _resize(call, x, _scaled_axes(call, list(x.shape), roi, None), "asymmetric")
    coordinates = call.get("coordinate_transformation_mode", "half_pixel")
    shape = list(x.shape)
    if sizes is not None and sizes.numel():
        axes = _sized_axes(call, shape, sizes, roi)
    else:
        axes = _scaled_axes(call, shape, scales, roi)
    return _resize(call, x, axes, coordinates)


@op("Upsample", check=_resize_check)
def upsample(call: Call, x, scales=None):
    if scales is None:
        scales = torch.tensor(call.get("scales"), dtype=torch.float32)
    return _resize(call, x, _scaled_axes(call, list(x.shape), scales, None), "asymmetric")


def _regions(call: Call, rank: int, roi) -> tuple[list[int], list[tuple[float, float]]]:
    """The resized axes (the ``axes`` attribute, else all) and each axis's region of interest."""
    axes = [axis % rank for axis in (call.get("axes") or range(rank))]
    regions = [(0.0, 1.0)] * rank
    if roi is not None and roi.numel():
        values = [float(value) for value in roi.tolist()]
        for index, axis in enumerate(axes):
            regions[axis] = (values[index], values[len(axes) + index])
    return axes, regions


def _scaled_axes(call: Call, shape: list[int], scales, roi) -> list[_Axis]:
    axes, regions = _regions(call, len(shape), roi)
    result = [_Axis(size, size, 1.0, region) for size, region in zip(shape, regions, strict=True)]
    for axis, scale in zip(axes, scales.tolist(), strict=True):
        result[axis].scale = float(scale)
        # in float32, as onnxruntime multiplies: 10 * 0.7f is 7, not 6.99...
        result[axis].out = math.floor(np.float32(shape[axis]) * np.float32(scale))
    return result


def _sized_axes(call: Call, shape: list[int], sizes, roi) -> list[_Axis]:
    axes, regions = _regions(call, len(shape), roi)
    result = [_Axis(size, size, 1.0, region) for size, region in zip(shape, regions, strict=True)]
    requested = [int(size) for size in sizes.tolist()]
    policy = call.get("keep_aspect_ratio_policy", "stretch")
    if policy == "stretch":
        for axis, size in zip(axes, requested, strict=True):
            result[axis].out, result[axis].scale = size, size / shape[axis]
        return result
    ratios = [size / shape[axis] for axis, size in zip(axes, requested, strict=True)]
    scale = min(ratios) if policy == "not_larger" else max(ratios)
    for axis in axes:
        result[axis].out, result[axis].scale = math.floor(scale * shape[axis] + 0.5), scale
    return result


def _resize(call: Call, x, axes: list[_Axis], coordinates: str):
    mode = call.get("mode", "nearest")
    integer = not x.dtype.is_floating_point and mode != "nearest"
    result = x.to(torch.float32) if integer else x
    outside = None
    for index, axis in enumerate(axes):
        if axis.out == axis.size and axis.scale == 1.0 and coordinates != "tf_crop_and_resize":
            continue
        source = _source_coordinates(axis, coordinates)
        if mode == "nearest":
            taps, weights = _nearest_taps(call, axis, source), None
        else:
            taps, weights = _interpolation_taps(call, axis, source, mode)
        result = _gather(result, index, taps, weights)
        if coordinates == "tf_crop_and_resize":
            beyond = ((source < 0) | (source > axis.size - 1)).reshape(
                [-1 if other == index else 1 for other in range(len(axes))]
            )
            outside = beyond if outside is None else outside | beyond
    if outside is not None:
        fill = torch.tensor(call.get("extrapolation_value", 0.0), dtype=result.dtype)
        result = torch.where(torch.from_numpy(outside), fill, result)
    if integer:
        limits = torch.iinfo(x.dtype)
        result = torch.clamp(torch.round(result), limits.min, limits.max).to(x.dtype)
    return result


def _gather(x, axis: int, taps: np.ndarray, weights: np.ndarray | None):
    """Along ``axis``, the sum over taps of the input at ``taps[t]`` times ``weights[t]``."""
    if weights is None:
        return torch.index_select(x, axis, torch.from_numpy(taps))
    view = [-1 if index == axis else 1 for index in range(x.dim())]
    result = 0
    for tap, weight in zip(taps, weights, strict=True):
        gathered = torch.index_select(x, axis, torch.from_numpy(tap))
        result = result + gathered * torch.tensor(weight, dtype=x.dtype).reshape(view)
    return result


def _source_coordinates(axis: _Axis, coordinates: str) -> np.ndarray:
    """The input position each output position samples."""
    target = np.arange(axis.out, dtype=np.float64)
    size, out, scale = axis.size, axis.out, axis.scale
    if coordinates == "half_pixel":
        return (target + 0.5) / scale - 0.5
    if coordinates == "half_pixel_symmetric":
        adjustment = out / (scale * size)
        offset = size / 2 * (1 - adjustment)
        return offset + (target + 0.5) / scale - 0.5
    if coordinates == "pytorch_half_pixel":
        return (target + 0.5) / scale - 0.5 if out > 1 else np.zeros(out)
    if coordinates == "align_corners":
        return target * (size - 1) / (out - 1) if out > 1 else np.zeros(out)
    if coordinates == "tf_crop_and_resize":
        start, end = axis.roi
        if out > 1:
            return start * (size - 1) + target * (end - start) * (size - 1) / (out - 1)
        return np.full(out, 0.5 * (start + end) * (size - 1))
    return target / scale


def _nearest_taps(call: Call, axis: _Axis, source: np.ndarray) -> np.ndarray:
    if call.op_type == "Upsample" or call.opset < 11:
        # onnxruntime's "simple" rounding for the opsets before nearest_mode
        taps = np.ceil(source) if axis.scale < 1 else np.floor(source)
    else:
        taps = _round(source, call.get("nearest_mode", "round_prefer_floor"))
    return np.clip(taps.astype(np.int64), 0, axis.size - 1)


def _round(source: np.ndarray, mode: str) -> np.ndarray:
    if mode == "floor":
        return np.floor(source)
    if mode == "ceil":
        return np.ceil(source)
    if mode == "round_prefer_ceil":
        return np.floor(source + 0.5)
    return np.ceil(source - 0.5)


def _interpolation_taps(
    call: Call, axis: _Axis, source: np.ndarray, mode: str
) -> tuple[np.ndarray, np.ndarray]:
    """Taps and weights of linear or cubic interpolation, as onnxruntime computes them: the
    kernel centred on each source position, stretched by 1 / scale when antialiasing a
    downscale; taps past the edges read the edge, or weigh nothing with ``exclude_outside``;
    weights normalized to sum to 1."""
    if mode == "cubic":
        kernel, support = _cubic_kernel(call.get("cubic_coeff_a", -0.75)), 4.0
    else:
        kernel, support = _linear_kernel, 2.0
    stretch = 1 / axis.scale if call.get("antialias", 0) and axis.scale < 1 else 1.0
    half_width = support / 2 * stretch
    first = np.floor(source + 1 - half_width).astype(np.int64)
    last = np.floor(source + 1 + half_width).astype(np.int64)
    window = int((last - first).max(initial=1))
    taps = first[None, :] + np.arange(window)[:, None]
    weights = kernel((taps - source[None, :]) / stretch) * (taps < last[None, :])
    if call.get("exclude_outside", 0):
        weights = weights * ((taps >= 0) & (taps < axis.size))
    totals = weights.sum(axis=0, keepdims=True)
    weights = weights / np.where(totals == 0, 1.0, totals)
    return np.clip(taps, 0, axis.size - 1), weights


def _linear_kernel(distance: np.ndarray) -> np.ndarray:
    return np.clip(1 - np.abs(distance), 0, None)


def _cubic_kernel(a: float) -> Callable[[np.ndarray], np.ndarray]:
    def kernel(distance: np.ndarray) -> np.ndarray:
        distance = np.abs(distance)
        near = ((a + 2) * distance - (a + 3)) * distance * distance + 1
        far = (((distance - 5) * distance + 8) * distance - 4) * a
        return np.where(distance < 1, near, np.where(distance < 2, far, 0.0))

    return kernel
