"""Layouts onnxruntime's integer convolution runs faster for a stem: the first convolution of
an image, over its 1 to 3 channels.

Both rewrites change only how the int8 input and weights are laid out, so the outputs stay the
same. The weight stays stored as the layer's own (unpadded, in its kernel's shape), behind
Pad, Reshape and Transpose nodes that onnxruntime folds when it loads the model: weight transfer
and inspection read it as learned.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from onnxopt.graph import constant_array, is_default_domain
from onnxopt.quantization.nodes import QdqBuilder

# The largest kernel (height times width) whose few input channels are padded: a 7x7
# convolution of 3 channels ran slower with 4.
MAX_STEM_KERNEL_AREA = 25

# Space-to-depth is used where it was measured faster: 5x5 and 7x7 kernels, stride 2 (the
# channel padding above gains less at 5x5 and loses at 7x7; at 3x3 it wins).
SPACE_TO_DEPTH_KERNELS = ((5, 5), (7, 7))
SPACE_TO_DEPTH_STRIDE = 2
MAX_STEM_INPUT_CHANNELS = 3


@dataclasses.dataclass(frozen=True)
class SpaceToDepthLayout:
    """A strided convolution rewritten to read its input rearranged into ``stride``-by-stride
    blocks: kernel ``kernel`` becomes ``blocks`` over ``stride**2`` times the channels.

    Attributes:
        input_pads: the Pad of the int8 input (ONNX order: begins, then ends), so that every
            block the convolution reads is whole and the output keeps its size.
        kernel: the original kernel's height and width.
        blocks: the new kernel's height and width, ceil(kernel / stride).
        stride: the original stride, the SpaceToDepth block size.
    """

    input_pads: tuple[int, ...]
    kernel: tuple[int, int]
    blocks: tuple[int, int]
    stride: int


def reads_padded_channels(
    node: ir.Node, weight_shape: tuple[int, ...], stem_channels: int | None
) -> bool:
    """Whether a quantized Conv reads its few input channels padded with zero channels to
    ``stem_channels`` (a target's; None: never)."""
    return (
        stem_channels is not None
        and _is_quantized_stem(node, weight_shape)
        and weight_shape[1] < stem_channels
        and weight_shape[2] * weight_shape[3] <= MAX_STEM_KERNEL_AREA
    )


def space_to_depth_layout(
    node: ir.Node, weight_shape: tuple[int, ...]
) -> SpaceToDepthLayout | None:
    """How a quantized stem Conv with a 5x5 or 7x7 kernel and stride 2 reads its input as
    2x2 blocks; None where it is not such a convolution, or its input's height and width are
    not known.

    onnxruntime's integer convolution ran a 7x7, stride 2 stem of 3 channels 1.3-1.4x faster so
    (224x224 and 150x150 images, 16-64 filters), faster than the float convolution from 32
    filters up; a 5x5 one 1.3-1.4x faster, where channels padded to 4 gained 1.1x. A 3x3 one
    gains more from ``reads_padded_channels``, and non-overlapping patches (kernel equal to the
    stride, a vision transformer's 16x16) ran slower.
    """
    if not _is_quantized_stem(node, weight_shape):
        return None
    kernel = (weight_shape[2], weight_shape[3])
    strides = tuple(node.attributes.get_ints("strides", (1, 1)))
    dilations = tuple(node.attributes.get_ints("dilations", (1, 1)))
    auto_pad = node.attributes.get_string("auto_pad", "NOTSET")
    shape = node.inputs[0].shape
    if (
        kernel not in SPACE_TO_DEPTH_KERNELS
        or strides != (SPACE_TO_DEPTH_STRIDE,) * 2
        or dilations != (1, 1)
        or auto_pad not in ("NOTSET", "VALID")
        or shape is None
        or len(shape) != 4
        or not all(isinstance(size, int) for size in (shape[2], shape[3]))
    ):
        return None
    stride = SPACE_TO_DEPTH_STRIDE
    pads = tuple(node.attributes.get_ints("pads", (0, 0, 0, 0)))
    blocks = tuple(-(-size // stride) for size in kernel)
    ends = []
    for axis, size in enumerate((shape[2], shape[3])):
        padded = size + pads[axis] + pads[axis + 2]
        outputs = (padded - kernel[axis]) // stride + 1
        if outputs < 1:
            return None
        ends.append(pads[axis + 2] + stride * (outputs + blocks[axis] - 1) - padded)
    if min(ends) < 0:
        return None
    return SpaceToDepthLayout((0, 0, pads[0], pads[1], 0, 0, *ends), kernel, blocks, stride)


def _is_quantized_stem(node: ir.Node, weight_shape: tuple[int, ...]) -> bool:
    """A plain Conv of at most 3 input channels whose input arrives int8."""
    producer = node.inputs[0].producer()
    return (
        node.op_type == "Conv"
        and is_default_domain(node)
        and node.attributes.get_int("group", 1) == 1
        and len(weight_shape) == 4
        and weight_shape[1] <= MAX_STEM_INPUT_CHANNELS
        and producer is not None
        and producer.op_type == "DequantizeLinear"
    )


class StemLayouts:
    """Rewrites quantized stems of one graph into the layouts above."""

    def __init__(self, graph: ir.Graph, builder: QdqBuilder):
        self.graph = graph
        self.builder = builder

    def pad_channels(self, node: ir.Node, channels: int, stem_channels: int) -> None:
        """Make ``node`` read its int8 input and its int8 weight both padded with zero input
        channels (the zero point, and 0) from ``channels`` to ``stem_channels``.

        onnxruntime's integer convolution ran a 3x3 convolution of 3 channels 1.2-1.4x faster
        with a fourth channel of zeros (224x224 images, 16-48 filters; 1x1 and 5x5 kernels
        gained too, 7x7 lost), with the same outputs; the MNIST sample ran 1.13-1.18x faster.
        """
        pads = self.builder.constant(
            f"{node.name or 'Conv'}_channel_pads",
            np.array([0, 0, 0, 0, 0, stem_channels - channels, 0, 0], np.int64),
        )
        for index in (0, 1):
            integers = self._integers(node, index)
            padded = self._padded(node, index, pads, "channels")
            dims = list(integers.shape) if integers.shape is not None else None
            if dims is not None and len(dims) == 4:
                dims[1] = stem_channels
                padded.shape = ir.Shape(dims)
            self._read(node, index, padded)

    def space_to_depth(self, node: ir.Node, layout: SpaceToDepthLayout) -> None:
        """Make ``node`` read its int8 input padded and rearranged by SpaceToDepth, and its
        int8 weight padded to whole blocks and rearranged to match, as a convolution of
        ``layout.blocks`` with stride 1 and no padding: the same outputs."""
        name = node.name or "Conv"
        stride = layout.stride
        input_pads = self.builder.constant(
            f"{name}_block_pads", np.array(layout.input_pads, np.int64)
        )
        integers = self._integers(node, 0)
        padded = self._padded(node, 0, input_pads, "blocks")
        rearranged = self._add(
            ir.node("SpaceToDepth", [padded], attributes={"blocksize": stride}),
            node,
            f"{integers.name}_blocks",
            integers.dtype,
        )
        self._read(node, 0, rearranged)

        weight = self._integers(node, 1)
        outputs, channels = constant_array(weight).shape[:2]
        (kernel_height, kernel_width), (block_rows, block_columns) = layout.kernel, layout.blocks
        missing = (stride * block_rows - kernel_height, stride * block_columns - kernel_width)
        weight_pads = self.builder.constant(
            f"{name}_kernel_pads", np.array([0] * 6 + list(missing), np.int64)
        )
        padded_weight = self._padded(node, 1, weight_pads, "kernel")
        split = self._reshaped(
            padded_weight, (outputs, channels, block_rows, stride, block_columns, stride), node
        )
        ordered = self._add(
            ir.node("Transpose", [split], attributes={"perm": [0, 3, 5, 1, 2, 4]}),
            node,
            f"{weight.name}_block_order",
            weight.dtype,
        )
        blocked = self._reshaped(
            ordered, (outputs, stride * stride * channels, block_rows, block_columns), node
        )
        self._read(node, 1, blocked)
        node.attributes["kernel_shape"] = ir.AttrInt64s("kernel_shape", list(layout.blocks))
        node.attributes["strides"] = ir.AttrInt64s("strides", [1, 1])
        node.attributes["pads"] = ir.AttrInt64s("pads", [0, 0, 0, 0])
        node.attributes.pop("auto_pad", None)

    def _integers(self, node: ir.Node, index: int) -> ir.Value:
        """The int8 values input ``index`` of ``node`` dequantizes."""
        return node.inputs[index].producer().inputs[0]

    def _padded(self, node: ir.Node, index: int, pads: ir.Value, what: str) -> ir.Value:
        """The int8 values input ``index`` of ``node`` dequantizes, padded by ``pads`` and
        filled with their zero point (0 where it differs per channel)."""
        integers = self._integers(node, index)
        zero_point = node.inputs[index].producer().inputs[2]
        fill = zero_point
        if constant_array(zero_point).size != 1:
            fill = self.builder.constant(
                f"{integers.name}_fill", np.zeros((), dtype=constant_array(zero_point).dtype)
            )
        return self._add(
            ir.node("Pad", [integers, pads, fill]),
            node,
            f"{integers.name}_{what}_padded",
            integers.dtype,
        )

    def _reshaped(self, value: ir.Value, shape: tuple[int, ...], before: ir.Node) -> ir.Value:
        target = self.builder.constant(f"{value.name}_shape", np.array(shape, np.int64))
        reshaped = self._add(
            ir.node("Reshape", [value, target]), before, f"{value.name}_reshaped", value.dtype
        )
        reshaped.shape = ir.Shape(shape)
        return reshaped

    def _add(self, new: ir.Node, before: ir.Node, name: str, dtype: ir.DataType | None) -> ir.Value:
        """Insert ``new`` before ``before``; its output, named ``name`` or a free variant."""
        new.name = self.builder.unique(f"{name}_{new.op_type}")
        output = new.outputs[0]
        output.name = self.builder.unique(name)
        output.dtype = dtype
        self.graph.insert_before(before, new)
        return output

    def _read(self, node: ir.Node, index: int, integers: ir.Value) -> None:
        """Make input ``index`` of ``node`` dequantize ``integers`` as its present
        DequantizeLinear does; that one goes once nothing else reads it."""
        dequantize = node.inputs[index].producer()
        _, scale, zero_point = dequantize.inputs
        axis = dequantize.attributes.get_int("axis", None)
        read = self.builder.dequantize(
            integers.name, integers, scale, zero_point, axis, shape=integers.shape, before=node
        )
        node.replace_input_with(index, read)
        if not dequantize.outputs[0].uses():
            self.graph.remove(dequantize, safe=True)
