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
    """A learned constant input: its value, the name users know it by, and the
    DequantizeLinear in front of it when it is stored as integers."""

    value: ir.Value
    name: str
    dequantize: ir.Node | None = None

    def read(self) -> np.ndarray:
        array = constant_array(self.value).astype(np.float32)
        if self.dequantize is None:
            return array
        scale, zero_point = self._parameters(array.ndim)
        return ((array - zero_point) * scale).astype(np.float32)

    @property
    def stored(self) -> str:
        if self.dequantize is None:
            return "float"
        return str(self.value.dtype).lower().replace("datatype.", "")

    def write(self, array: np.ndarray, widen: bool = False) -> np.ndarray | None:
        """Store ``array``; int8 values with the target's scales, or where those would clip,
        with ``widen`` the scales raised just enough (returned: each scale's new / old, one
        per channel or one in all; None when no scale changed)."""
        if self.dequantize is None:
            dtype = self.value.const_value.numpy().dtype
            set_constant(self.value, np.ascontiguousarray(array, dtype=dtype))
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
                scale = widened
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
        """Multiply the DequantizeLinear's scales by ``ratio`` (one per scale, or one)."""
        scale_value = self.dequantize.inputs[1]
        scale = constant_array(scale_value)
        widened = (scale.astype(np.float64).reshape(-1) * ratio).astype(scale.dtype)
        set_constant(scale_value, widened.reshape(scale.shape))

    def _parameters(self, ndim: int) -> tuple[np.ndarray, np.ndarray]:
        """The DequantizeLinear's scales and zero points, shaped to broadcast over the values."""
        node = self.dequantize
        scale = constant_array(node.inputs[1]).astype(np.float64)
        zero = node.inputs[2] if len(node.inputs) > 2 else None
        zero_point = (
            np.zeros_like(scale) if zero is None else constant_array(zero).astype(np.float64)
        )
        if scale.ndim == 1 and scale.size > 1:
            axis = node.attributes.get_int("axis", 1) % ndim
            shape = [1] * ndim
            shape[axis] = scale.size
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


def stored_constant(node: ir.Node, index: int) -> StoredTensor | None:
    """How input ``index`` of ``node`` is stored when it is a learned float constant."""
    value = node.inputs[index] if len(node.inputs) > index else None
    if value is None:
        return None
    producer = value.producer()
    if producer is not None and producer.op_type == "Identity" and is_default_domain(producer):
        return stored_constant(producer, 0)
    if producer is None:
        if value.const_value is None or not value.is_initializer():
            return None
        if value.dtype not in (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.DOUBLE):
            return None
        return StoredTensor(value, value.name)
    if producer.op_type != "DequantizeLinear" or not is_default_domain(producer):
        return None
    integers = producer.inputs[0]
    if (
        integers is None
        or not integers.is_initializer()
        or integers.const_value is None
        or constant_array(producer.inputs[1]) is None
        or (
            len(producer.inputs) > 2
            and producer.inputs[2] is not None
            and constant_array(producer.inputs[2]) is None
        )
    ):
        return None
    name = integers.name
    if name.endswith(QUANTIZED_SUFFIX):
        name = name[: -len(QUANTIZED_SUFFIX)]
    return StoredTensor(integers, name, producer)
