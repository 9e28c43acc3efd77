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

from onnxopt.graph import constant_array, is_default_domain, laid_out_constant, set_constant

QUANTIZED_SUFFIX = "_quantized"
# A weight requantized with the target's scales clips badly when what clipping loses
# exceeds this share of the weight's norm.
MAX_CLIPPED_ERROR = 0.01


class UnstorableError(ValueError):
    """New values the target's storage cannot hold: int8 scales that would clip badly, a
    MatMul without a bias for a bias, one shared bias for biases per unit."""


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
    views: tuple[tuple[str, tuple[int, ...]], ...] = ()

    def read(self) -> np.ndarray:
        array = constant_array(self.value).astype(np.float32)
        if self.scale is None:
            for kind, operand in self.views:
                array = array.reshape(operand) if kind == "reshape" else array.transpose(operand)
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
                raise UnstorableError(
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
        stored = self.value.const_value.numpy()
        array = np.asarray(array)
        shapes = [stored.shape] if self.views else []
        for kind, operand in self.views[:-1]:
            probe = np.empty(shapes[-1], dtype=np.bool_)
            shapes.append(
                (probe.reshape(operand) if kind == "reshape" else probe.transpose(operand)).shape
            )
        for (kind, operand), shape in zip(reversed(self.views), reversed(shapes), strict=True):
            array = (
                array.reshape(shape) if kind == "reshape" else array.transpose(np.argsort(operand))
            )
        array = array.reshape(stored.shape)
        dtype = stored.dtype
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
    if producer.op_type in VIEW_OPS:
        inner = float_constant(producer.inputs[0])
        if inner is None or inner.scale is not None:
            return None
        view = _view(producer, inner.read().shape)
        if view is None:
            return None
        return dataclasses.replace(inner, name=value.name or inner.name, views=(*inner.views, view))
    if producer.op_type == "Cast" and value.dtype == ir.DataType.FLOAT:
        inner = float_constant(producer.inputs[0])
        if inner is None or inner.scale is not None:
            return None
        # Known by the name the graph reads it under, not its float16 initializer's.
        return dataclasses.replace(inner, name=value.name or inner.name)
    if producer.op_type == "DequantizeLinear":
        scale = float_constant(producer.inputs[1]) if len(producer.inputs) > 1 else None
        zero = producer.inputs[2] if len(producer.inputs) > 2 else None
        axis = producer.attributes.get_int("axis", 1)
        per_channel = scale is not None and scale.read().size > 1
        return scaled_integers(
            laid_out_constant(producer.inputs[0], axis if per_channel else None),
            scale,
            zero,
            axis,
        )
    return None


# Ops that only give a constant another shape or order (a Paddle export's bias reshaped to
# [1, C, 1, 1], a weight transposed before its MatMul).
VIEW_OPS = frozenset({"Reshape", "Unsqueeze", "Squeeze", "Flatten", "Transpose"})


def _view(node: ir.Node, shape: tuple[int, ...]) -> tuple[str, tuple[int, ...]] | None:
    """What ``node`` (one of VIEW_OPS) does to an input of ``shape``: ``("transpose",
    perm)`` or ``("reshape", new shape)``; None where its shape or axes are not constants."""
    if node.op_type == "Transpose":
        perm = node.attributes.get_ints("perm", None)
        return (
            "transpose",
            tuple(perm) if perm is not None else tuple(reversed(range(len(shape)))),
        )
    new_shape = _view_shape(node, shape)
    return None if new_shape is None else ("reshape", new_shape)


def _view_shape(node: ir.Node, shape: tuple[int, ...]) -> tuple[int, ...] | None:
    """The shape ``node`` (a reshaping op of VIEW_OPS, its shape or axes constant) gives an
    input of ``shape``; None where they are not constants or do not fit."""
    probe = np.empty(shape, dtype=np.bool_)
    operand = node.inputs[1] if len(node.inputs) > 1 else None
    given = constant_array(operand) if operand is not None else None
    try:
        if node.op_type == "Reshape":
            if given is None:
                return None
            target = [
                shape[index] if size == 0 and not node.attributes.get_int("allowzero", 0) else size
                for index, size in enumerate(given.astype(np.int64).tolist())
            ]
            return probe.reshape(target).shape
        if node.op_type == "Flatten":
            axis = node.attributes.get_int("axis", 1) % max(len(shape), 1)
            return (int(np.prod(shape[:axis])), int(np.prod(shape[axis:])))
        axes = given if given is not None else node.attributes.get_ints("axes", None)
        if node.op_type == "Unsqueeze":
            return None if axes is None else np.expand_dims(probe, tuple(axes)).shape
        return np.squeeze(probe, None if axes is None else tuple(axes)).shape
    except (ValueError, IndexError, np.exceptions.AxisError):
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
