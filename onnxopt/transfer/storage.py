"""How a learned tensor is stored: a float initializer, or integers behind a DequantizeLinear.

``stored_constant`` finds the storage of a node's constant input (through an Identity);
``StoredTensor`` reads it as float and writes float values back the storage's way: as they
are, or requantized with the target's scales, which may be widened where new values would
clip (an int8 graph keeps its activation ranges; only weight scales move).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from onnxopt.graph import constant_array, is_default_domain, set_constant

QUANTIZED_SUFFIX = "_quantized"
# A weight requantized with the target's scales clips badly when what clipping loses
# exceeds this share of the weight's norm.
MAX_CLIPPED_ERROR = 0.01


class RequantizationError(ValueError):
    """New weights that the target's int8 scales cannot hold without clipping badly."""


@dataclasses.dataclass
class StoredTensor:
    """A learned constant: the initializer holding it, the name users know it by, and, when
    it holds integers, their scales (a float ``StoredTensor`` themselves), zero points and the
    axis the scales run along (None: scales of the values' rank, or one in all).

    Floats of another type than float32 (a float16 vector cast to float32, as int8 models
    store their biases and norms) read as float32 and are written in their type where it
    holds the new values exactly, else as float32 (the Cast then casts float32 to float32).
    """

    value: ir.Value
    name: str
    scale: StoredTensor | None = None
    zero_point: ir.Value | None = None
    axis: int | None = None

    def read(self) -> np.ndarray:
        array = constant_array(self.value).astype(np.float32)
        if self.scale is None:
            return array
        scale, zero_point = self._parameters(array.ndim)
        return ((array - zero_point) * scale).astype(np.float32)

    @property
    def stored(self) -> str:
        """The stored type: ``float`` for float32, else the element type (``int8``, ``float16``)."""
        if self.value.dtype == ir.DataType.FLOAT:
            return "float"
        return self.value.dtype.name.lower()

    @property
    def quantized(self) -> bool:
        return self.scale is not None

    def write(self, array: np.ndarray, widen: bool = False) -> np.ndarray | None:
        """Store ``array``; integers with the target's scales, or where those would clip,
        with ``widen`` the scales raised just enough (returned: each scale's new / old, one
        per scale or one in all; None when no scale changed)."""
        if self.scale is None:
            self._write_float(array)
            return None
        integers = self.value.const_value.numpy()
        scale, zero_point = self._parameters(integers.ndim)
        info = np.iinfo(integers.dtype)
        ratio = None
        if widen:
            needed = _needed_scale(array, scale, zero_point, info)
            if np.any(needed > scale):
                widened = np.maximum(scale, needed)
                ratio = (widened / scale).reshape(-1)
                self.scale_by(ratio)
                scale, _ = self._parameters(integers.ndim)
        exact = array / scale + zero_point
        rounded = np.clip(np.rint(exact), info.min, info.max)
        clipped = (exact < info.min - 0.5) | (exact > info.max + 0.5)
        if clipped.any():
            lost = np.linalg.norm(((exact - rounded) * scale)[clipped])
            norm = np.linalg.norm(array)
            if lost > MAX_CLIPPED_ERROR * max(norm, np.finfo(np.float32).tiny):
                raise RequantizationError(
                    f"{self.name}: {int(clipped.sum())} of {array.size} new values lie outside "
                    f"what its {self.stored} scales hold (clipping loses {lost / norm:.1%} of the "
                    "weight's norm)"
                )
        set_constant(self.value, rounded.astype(integers.dtype))
        return ratio

    def scale_by(self, ratio: np.ndarray) -> None:
        """Multiply the integers' scales by ``ratio`` (one per scale, or one)."""
        scale = self.scale.read()
        self.scale.write((scale.astype(np.float64).reshape(-1) * ratio).reshape(scale.shape))

    def _write_float(self, array: np.ndarray) -> None:
        dtype = self.value.const_value.numpy().dtype
        converted = np.ascontiguousarray(array, dtype=dtype)
        if dtype != np.float32 and not np.array_equal(converted.astype(np.float32), array):
            converted = np.ascontiguousarray(array, dtype=np.float32)
            self.value.dtype = ir.DataType.FLOAT
        set_constant(self.value, converted)

    def _parameters(self, ndim: int) -> tuple[np.ndarray, np.ndarray]:
        """The scales and zero points, shaped to broadcast over the integers."""
        scale = self.scale.read().astype(np.float64)
        zero_point = (
            np.zeros_like(scale)
            if self.zero_point is None
            else constant_array(self.zero_point).astype(np.float64)
        )
        if scale.ndim != ndim and scale.size > 1:
            shape = [1] * ndim
            shape[(self.axis if self.axis is not None else 1) % ndim] = scale.size
            scale, zero_point = scale.reshape(shape), zero_point.reshape(shape)
        return scale, zero_point


def _needed_scale(
    array: np.ndarray, scale: np.ndarray, zero_point: np.ndarray, info: np.iinfo
) -> np.ndarray:
    """The smallest scales (shaped like ``scale``) that hold ``array`` with ``zero_point``."""
    axes = tuple(index for index, size in enumerate(scale.shape) if size == 1)
    if scale.ndim == 0:
        axes = None
    high = np.max(array, axis=axes, keepdims=scale.ndim > 0).astype(np.float64)
    low = np.min(array, axis=axes, keepdims=scale.ndim > 0).astype(np.float64)
    above = np.where(high > 0, high / np.maximum(info.max - zero_point, 1), 0.0)
    below = np.where(low < 0, low / np.minimum(info.min - zero_point, -1), 0.0)
    return np.maximum(above, below).reshape(scale.shape)


FLOAT_TYPES = (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16, ir.DataType.DOUBLE)
INTEGER_TYPES = (ir.DataType.INT8, ir.DataType.UINT8, ir.DataType.INT16, ir.DataType.INT32)


def stored_constant(node: ir.Node, index: int) -> StoredTensor | None:
    """How input ``index`` of ``node`` is stored when it is a learned float constant: a float
    initializer, one cast to float32, or integers behind a DequantizeLinear."""
    value = node.inputs[index] if len(node.inputs) > index else None
    return None if value is None else float_constant(value)


def float_constant(value: ir.Value) -> StoredTensor | None:
    """``value``'s storage when it is a constant float (see ``stored_constant``)."""
    producer = value.producer()
    if producer is None:
        stored = value.is_initializer() and value.const_value is not None
        return StoredTensor(value, value.name) if stored and value.dtype in FLOAT_TYPES else None
    if not is_default_domain(producer) or not producer.inputs or producer.inputs[0] is None:
        return None
    if producer.op_type == "Identity":
        return float_constant(producer.inputs[0])
    if producer.op_type == "Cast" and value.dtype == ir.DataType.FLOAT:
        inner = float_constant(producer.inputs[0])
        if inner is None or inner.scale is not None:
            return None
        # Known by the name the graph reads it under, not its float16 initializer's.
        return dataclasses.replace(inner, name=value.name or inner.name)
    if producer.op_type == "DequantizeLinear":
        scale = float_constant(producer.inputs[1]) if len(producer.inputs) > 1 else None
        zero = producer.inputs[2] if len(producer.inputs) > 2 else None
        return scaled_integers(
            producer.inputs[0], scale, zero, producer.attributes.get_int("axis", 1)
        )
    return None


def scaled_integers(
    integers: ir.Value,
    scale: StoredTensor | None,
    zero_point: ir.Value | None,
    axis: int | None,
) -> StoredTensor | None:
    """Integer weights and their float scales (and constant zero points), when all are
    constants; the name drops the ``_quantized`` suffix onnxopt's quantizer gives them."""
    if (
        scale is None
        or scale.scale is not None
        or not integers.is_initializer()
        or integers.const_value is None
        or integers.dtype not in INTEGER_TYPES
        or (zero_point is not None and constant_array(zero_point) is None)
    ):
        return None
    name = integers.name
    if name.endswith(QUANTIZED_SUFFIX):
        name = name[: -len(QUANTIZED_SUFFIX)]
    return StoredTensor(integers, name, scale, zero_point, axis)
