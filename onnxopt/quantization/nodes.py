"""Quantization nodes and constants added to a graph under names no value has yet.

The quantizer and the repairs after it (bias correction) name what they add the same way, so a
quantized model reads alike wherever a tensor came from: ``{base}_quantized``, ``{base}_scale``,
``{base}_zero_point``, ``{base}_DequantizeLinear``, ``{base}_dequantized``.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from onnxopt.graph import UniqueNames, add_initializer, constant_array


class QdqBuilder:
    """Adds QuantizeLinear/DequantizeLinear nodes and their constants to one graph."""

    def __init__(self, graph: ir.Graph):
        self.graph = graph
        self.unique = UniqueNames(graph)

    def constant(self, name: str, array: np.ndarray) -> ir.Value:
        """A new initializer holding ``array``, named ``name`` or a free variant of it."""
        return add_initializer(self.graph, self.unique(name), array)

    def compact_constant(self, name: str, array: np.ndarray) -> ir.Value:
        """A float32 constant, stored as float16 and cast back where float16 holds it exactly.

        Half the bytes on disk for the scale and bias vectors beside int8 weights; onnxruntime
        folds a Cast of a constant when it loads the model, so runs are unchanged. Round values
        with ``numerics.rounded_to_half`` first to make them fit.
        """
        array = np.asarray(array, dtype=np.float32)
        half = array.astype(np.float16)
        if not np.array_equal(half.astype(np.float32), array):
            return self.constant(name, array)
        cast = ir.node(
            "Cast",
            [self.constant(f"{name}_float16", half)],
            attributes={"to": ir.DataType.FLOAT},
            name=self.unique(f"{name}_Cast"),
        )
        output = cast.outputs[0]
        output.name = self.unique(name)
        output.dtype = ir.DataType.FLOAT
        output.shape = ir.Shape(array.shape)
        self.graph.append(cast)
        return output

    def dequantized_constant(
        self,
        base: str,
        values: np.ndarray,
        scales: np.ndarray,
        zero_points: np.ndarray,
        axis: int | None = None,
        *,
        before: ir.Node | None = None,
    ) -> ir.Value:
        """The float value of integer constants: DequantizeLinear(values, scales, zero_points).

        Args:
            base: the name the new values and node are named after.
            values: the integers (int8 weights, int32 biases).
            scales: one scale, or one per slice along ``axis``.
            zero_points: of the integer type, shaped like ``scales``.
            axis: the axis of per-channel scales; None for one scale.
            before: insert the node before this one; else append it to the graph.
        """
        return self.dequantize(
            base,
            self.constant(f"{base}_quantized", values),
            self.constant(f"{base}_scale", scales.astype(np.float32)),
            self.constant(f"{base}_zero_point", zero_points),
            axis,
            shape=ir.Shape(values.shape),
            before=before,
        )

    def dequantize(
        self,
        base: str,
        quantized: ir.Value,
        scale: ir.Value,
        zero_point: ir.Value,
        axis: int | None = None,
        *,
        shape: ir.Shape | None,
        before: ir.Node | None = None,
    ) -> ir.Value:
        """DequantizeLinear(quantized, scale, zero_point), named after ``base``; its float
        output, of ``shape``. Inserted before ``before``, else appended to the graph."""
        node = ir.node(
            "DequantizeLinear",
            [quantized, scale, zero_point],
            attributes={"axis": axis} if axis is not None else {},
            name=self.unique(f"{base}_DequantizeLinear"),
        )
        output = node.outputs[0]
        output.name = self.unique(f"{base}_dequantized")
        output.dtype = ir.DataType.FLOAT
        output.shape = shape
        if before is None:
            self.graph.append(node)
        else:
            self.graph.insert_before(before, node)
        return output

    def quantize_dequantize(
        self, value: ir.Value, scale: np.float32, zero_point: np.integer
    ) -> ir.Value:
        """``value`` through QuantizeLinear and DequantizeLinear with one scale and zero point,
        of the zero point's type (uint8 or int8).

        Returns the dequantized value; nothing reads it yet.
        """
        base = value.name
        scale_value = self.constant(f"{base}_scale", np.array(scale, dtype=np.float32))
        zero_array = np.array(zero_point)
        zero_value = self.constant(f"{base}_zero_point", zero_array)
        quantize = ir.node(
            "QuantizeLinear",
            [value, scale_value, zero_value],
            name=self.unique(f"{base}_QuantizeLinear"),
        )
        quantized = quantize.outputs[0]
        quantized.name = self.unique(f"{base}_quantized")
        quantized.dtype = ir.DataType.from_numpy(zero_array.dtype)
        quantized.shape = value.shape
        dequantize = ir.node(
            "DequantizeLinear",
            [quantized, scale_value, zero_value],
            name=self.unique(f"{base}_DequantizeLinear"),
        )
        dequantized = dequantize.outputs[0]
        dequantized.name = self.unique(f"{base}_dequantized")
        dequantized.dtype = ir.DataType.FLOAT
        dequantized.shape = value.shape
        self.graph.extend([quantize, dequantize])
        return dequantized

    def dequantize_per_channel(
        self, dequantized: ir.Value, axis: int, channels: int, *, before: ir.Node
    ) -> ir.Value:
        """The values of ``dequantized`` (a one-scale DequantizeLinear's output) again, from a
        DequantizeLinear with its scale and zero point repeated for each of ``channels`` along
        ``axis``: the same numbers, in a form that reads as per channel.

        Returns the new value; nothing reads it yet.
        """
        quantized, scale, zero_point = dequantized.producer().inputs
        base = quantized.name.removesuffix("_quantized")
        scale_array, zero_point_array = constant_array(scale), constant_array(zero_point)
        scales = np.full(channels, scale_array, dtype=scale_array.dtype)
        zero_points = np.full(channels, zero_point_array, dtype=zero_point_array.dtype)
        return self.dequantize(
            base,
            quantized,
            self.constant(f"{base}_channel_scale", scales),
            self.constant(f"{base}_channel_zero_point", zero_points),
            axis,
            shape=dequantized.shape,
            before=before,
        )
