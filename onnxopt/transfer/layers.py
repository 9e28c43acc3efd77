"""The layers of a graph in a canonical form, so that two exports of one network compare.

Exporters and optimizers store the same learned weights in different forms: a BatchNorm
after a convolution or folded into it, a Gemm with ``transB`` or a MatMul reading ``[in,
out]``, onnxruntime's ``FusedConv`` and ``FusedGemm``, int8 weights behind a
DequantizeLinear. ``find_layers`` reads every node that holds learned constants as a
``Layer`` whose ``Slot``s give their values in one form whatever the storage: dense and
convolution weights ``[out, in, ...]`` with a BatchNorm, Mul or Add per channel after them
folded on the fly (``affine.py``), a standalone
BatchNorm as the per-channel affine map it computes, int8 weights dequantized. A slot also
writes a value given in that form back into the graph's own storage (requantized with the
target's scales, the ops after a convolution made identities, ...), so the target graph
keeps its structure.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np
import onnx_ir as ir

from onnxopt.graph import is_default_domain, sole_use
from onnxopt.transfer.affine import BatchNormAffine, compose, following_affine
from onnxopt.transfer.storage import (
    StoredTensor,
    UnstorableError,
    scaled_integers,
    stored_constant,
)

MICROSOFT = "com.microsoft"
# Ops whose float constants are settings of the architecture, not learned weights, or that
# only reshape a constant for the node reading it (which reads it through them).
NOT_LEARNED = frozenset(
    {
        "Identity",
        "QuantizeLinear",
        "DequantizeLinear",
        "DynamicQuantizeLinear",
        "Resize",
        "Upsample",
        "Pad",
        "Clip",
        "Range",
        "Reshape",
        "Unsqueeze",
        "Squeeze",
        "Flatten",
        "Transpose",
        "Expand",
        "Tile",
        "Slice",
        "ConstantOfShape",
        "Cast",
        "Shape",
        "Size",
    }
)


@dataclasses.dataclass
class Slot:
    """One learned tensor of a layer in canonical form.

    Attributes:
        role: ``weight``, ``bias``, ``scale``, or ``input<i>`` for a constant of another op.
        name: the tensor a user knows it by (the float initializer's name, also for the int8
            one stored as ``<name>_quantized``).
        shape: the canonical shape.
        read: the canonical value (float32).
        stored: how the value is stored (``float``, ``int8``, ``float16``; with `` + BatchNorm,
            Mul`` when ops after it fold into it), for the report.
        axes: for each axis of the stored tensor ``name``, the canonical axis it is.
    """

    role: str
    name: str
    shape: tuple[int, ...]
    read: Callable[[], np.ndarray]
    stored: str = "float"
    axes: tuple[int, ...] | None = None


@dataclasses.dataclass
class Layer:
    """A node that holds learned constants, with its slots by role.

    Attributes:
        node: the node (a Conv, Gemm, MatMul, normalization, or any op with float constants).
        kind: ``conv``, ``conv_transpose``, ``dense``, ``batchnorm``, ``embedding`` or the op type.
        label: what structure matching compares first: the kind and what is fixed by the
            architecture rather than its width (kernel size, depthwise or not, rank).
        slots: by role.
        write: store canonical values by role (the others keep theirs); int8 storage keeps
            its scales and raises ``UnstorableError`` where they would clip badly, or
            with ``widen=True`` widens the scales that would clip (an int32 bias's with them).
        reads_input: the layer reads a graph input directly (an input convolution).
        order: the node's position in the graph (ties in structure matching go by it).
    """

    node: ir.Node
    kind: str
    label: tuple
    slots: dict[str, Slot]
    write: Callable[..., list[str]]
    reads_input: bool = False
    order: int = 0

    @property
    def name(self) -> str:
        primary = self.slots.get("weight") or next(iter(self.slots.values()))
        return primary.name


def find_layers(model: ir.Model) -> list[Layer]:
    """Every node of the main graph holding learned float constants, in graph order.

    Layers that take in the nodes around them (a BatchNorm after a convolution, a bias Add,
    the rescaling of int8 products) are read first, so those nodes are not read again as
    layers of their own wherever a topological order puts them.
    """
    graph = model.graph
    absorbed: set[int] = set()
    found: dict[int, Layer] = {}
    nodes = list(graph)
    for order, node in enumerate(nodes):
        layer = _read_layer(node, absorbed)
        if layer is not None:
            found[order] = layer
    for order, node in enumerate(nodes):
        if order not in found and id(node) not in absorbed:
            layer = _generic(node, kind=node.op_type)
            if layer is not None:
                found[order] = layer
    inputs = {id(value) for value in graph.inputs}
    layers = []
    for order in sorted(found):
        layer = found[order]
        if id(layer.node) in absorbed:
            continue
        layer.order = order
        data = layer.node.inputs[0] if layer.node.inputs else None
        layer.reads_input = data is not None and id(data) in inputs
        layers.append(layer)
    return layers


def _read_layer(node: ir.Node, absorbed: set[int]) -> Layer | None:
    """``node`` as a layer with the nodes it takes in, or None for the second pass."""
    op = _canonical_op(node)
    if op in ("Conv", "ConvTranspose"):
        return _convolution(node, op, absorbed)
    if op == "Gemm":
        return _gemm(node, absorbed)
    if op == "MatMul":
        return _matmul(node, absorbed)
    if op == "MatMulInteger":
        return _dynamic_matmul(node, absorbed)
    if op == f"{MICROSOFT}.FusedMatMul":
        return _fused_matmul(node, absorbed)
    if op == "BatchNormalization" and is_default_domain(node):
        return _batchnorm(node)
    if op == "LayerNormalization":
        return _normalization(node)
    if op == "Mul":
        return _decomposed_normalization(node, absorbed)
    if op == "Gather":
        table = stored_constant(node, 0) or _integer_table(node, absorbed)
        return _layer_of(node, "embedding", {"weight": table}) if table is not None else None
    return None


def _canonical_op(node: ir.Node) -> str:
    """The op a node computes, reading onnxruntime's fused ops as the layer they hold."""
    if node.domain == MICROSOFT and node.op_type in ("FusedConv", "FusedGemm"):
        return node.op_type[len("Fused") :]
    return node.op_type if is_default_domain(node) else f"{node.domain}.{node.op_type}"


def _dynamic_matmul(node: ir.Node, absorbed: set[int]) -> Layer | None:
    """x -> DynamicQuantizeLinear -> MatMulInteger with integer weights -> Cast -> Mul by the
    product of x's and the weights' scales (-> Add a bias): a dense layer, as onnxopt's and
    onnxruntime's dynamic quantization write one."""
    cast = _sole_reader(node, "Cast")
    rescale = _sole_reader(cast, "Mul") if cast is not None else None
    if rescale is None or len(node.inputs) < 2 or node.inputs[1] is None:
        return None
    other = rescale.inputs[1] if rescale.inputs[0] is cast.outputs[0] else rescale.inputs[0]
    combined = other.producer() if other is not None else None
    if combined is None or combined.op_type != "Mul" or not is_default_domain(combined):
        return None
    scales = [stored_constant(combined, index) for index in range(2)]
    scale = next((item for item in scales if item is not None), None)
    zero = node.inputs[3] if len(node.inputs) > 3 else None
    weight = scaled_integers(node.inputs[1], scale, zero, 1)
    if weight is None or weight.read().ndim != 2:
        return None
    absorbed.update({id(cast), id(rescale), id(combined)})
    bias = _bias_of(rescale, weight.read().shape[1], absorbed)
    return _dense(node, weight, True, 1.0, bias, 1.0, None, absorbed)


def _integer_table(node: ir.Node, absorbed: set[int]) -> StoredTensor | None:
    """Gather(integer rows, ids) -> Cast -> Mul by Gather(row scales, ids): an embedding
    table as onnxopt's int8 quantization stores one."""
    cast = _sole_reader(node, "Cast")
    rescale = _sole_reader(cast, "Mul") if cast is not None else None
    if rescale is None:
        return None
    other = rescale.inputs[1] if rescale.inputs[0] is cast.outputs[0] else rescale.inputs[0]
    gather = other.producer() if other is not None else None
    if gather is None or gather.op_type != "Gather" or gather.inputs[1] is not node.inputs[1]:
        return None
    table = scaled_integers(node.inputs[0], stored_constant(gather, 0), None, None)
    if table is not None:
        absorbed.update({id(cast), id(rescale), id(gather)})
    return table


def _sole_reader(node: ir.Node, op: str) -> ir.Node | None:
    """The one node, of type ``op``, that reads ``node``'s only output."""
    use = sole_use(node)
    if use is None or use[0].op_type != op or not is_default_domain(use[0]):
        return None
    return use[0]


def _convolution(node: ir.Node, op: str, absorbed: set[int]) -> Layer | None:
    weight = stored_constant(node, 1)
    if weight is None:
        return None
    bias = stored_constant(node, 2)
    shape = weight.read().shape
    group = node.attributes.get_int("group", 1)
    # A ConvTranspose's weight is [in, out / group, ...]: its output channels run along axis 1.
    out_axis = 1 if op == "ConvTranspose" else 0
    channels = shape[out_axis] * (group if op == "ConvTranspose" else 1)
    chain = following_affine(node, channels, len(shape)) if (op == "Conv" or group == 1) else []
    absorbed.update(id(step.node) for step in chain)
    folded = " + " + ", ".join(step.name for step in chain) if chain else ""
    depthwise = "depthwise" if group > 1 and group == channels else ("grouped" if group > 1 else "")
    broadcast = [1] * len(shape)
    broadcast[out_axis] = channels

    def read_weight() -> np.ndarray:
        array = weight.read()
        if not chain:
            return array
        scale, _ = compose(chain, channels)
        return (array * scale.reshape(broadcast)).astype(np.float32)

    def read_bias() -> np.ndarray:
        base = bias.read() if bias is not None else np.zeros(channels, np.float32)
        if not chain:
            return base
        scale, shift = compose(chain, channels)
        return (base * scale + shift).astype(np.float32)

    def write(values: dict[str, np.ndarray], widen: bool = False) -> list[str]:
        new_weight = values.get("weight", read_weight())
        new_bias = values.get("bias", read_bias())
        written = []
        if "weight" in values or chain:
            ratio = weight.write(new_weight, widen)
            written.append(weight.name)
            written += _follow_weight_scales(bias, ratio, new_bias)
        if "bias" in values or chain:
            written += _write_bias(node, 2, bias, new_bias)
        for step in chain:
            written += step.set_identity()
        return list(dict.fromkeys(written))

    slots = {
        "weight": Slot("weight", weight.name, shape, read_weight, weight.stored + folded),
        "bias": Slot(
            "bias",
            bias.name if bias is not None else f"{weight.name}:bias",
            (channels,),
            read_bias,
            (bias.stored if bias is not None else "none") + folded,
        ),
    }
    kind = "conv" if op == "Conv" else "conv_transpose"
    label = (kind, tuple(shape[2:]), depthwise)
    return Layer(node, kind, label, slots, write)


def _follow_weight_scales(
    bias: StoredTensor | None, ratio: np.ndarray | None, array: np.ndarray
) -> list[str]:
    """An int32 bias's scales are the input's times the weights': where the weights' scales
    were widened, widen the bias's alike and store ``array`` with them."""
    if ratio is None or bias is None or not bias.quantized:
        return []
    bias.scale_by(np.broadcast_to(ratio, array.shape) if ratio.size > 1 else ratio)
    bias.write(array)
    return [bias.name]


def _write_bias(
    node: ir.Node, index: int, bias: StoredTensor | None, array: np.ndarray
) -> list[str]:
    """Store a bias; a Conv or Gemm without one gets a new initializer when it is not zero."""
    if bias is not None:
        bias.write(array)
        return [bias.name]
    if not np.any(array):
        return []
    graph = node.graph
    value = ir.Value(name=f"{node.name or node.op_type}_transferred_bias")
    value.const_value = ir.tensor(np.ascontiguousarray(array, dtype=np.float32), name=value.name)
    value.shape = ir.Shape(array.shape)
    value.dtype = ir.DataType.FLOAT
    graph.register_initializer(value)
    while len(node.inputs) < index:
        node.resize_inputs(len(node.inputs) + 1)
    node.resize_inputs(index + 1)
    node.replace_input_with(index, value)
    return [value.name]


def _gemm(node: ir.Node, absorbed: set[int]) -> Layer | None:
    weight = stored_constant(node, 1)
    if weight is None or node.attributes.get_int("transA", 0) or weight.read().ndim != 2:
        return None
    transposed = not node.attributes.get_int("transB", 0)
    alpha = node.attributes.get_float("alpha", 1.0)
    beta = node.attributes.get_float("beta", 1.0)
    bias = stored_constant(node, 2)
    stored_shape = weight.read().shape
    out = stored_shape[1] if transposed else stored_shape[0]
    if bias is not None and bias.read().size not in (1, out):
        return None
    return _dense(node, weight, transposed, alpha, bias, beta, 2, absorbed)


def _matmul(node: ir.Node, absorbed: set[int]) -> Layer | None:
    weight = stored_constant(node, 1)
    if weight is None or weight.read().ndim != 2 or stored_constant(node, 0) is not None:
        return None
    bias = _bias_of(node, weight.read().shape[1], absorbed)
    return _dense(node, weight, True, 1.0, bias, 1.0, None, absorbed)


def _fused_matmul(node: ir.Node, absorbed: set[int]) -> Layer | None:
    """onnxruntime's FusedMatMul (transposes and a scale folded into a MatMul) with constant
    weights: a dense layer (a transposed input changes nothing in the weights)."""
    weight = stored_constant(node, 1)
    if (
        weight is None
        or weight.read().ndim != 2
        or stored_constant(node, 0) is not None
        or node.attributes.get_int("transBatchB", 0)
    ):
        return None
    transposed = not node.attributes.get_int("transB", 0)
    alpha = node.attributes.get_float("alpha", 1.0)
    out = weight.read().shape[1 if transposed else 0]
    bias = _bias_of(node, out, absorbed)
    return _dense(node, weight, transposed, alpha, bias, 1.0, None, absorbed)


def _bias_of(node: ir.Node, out: int, absorbed: set[int]) -> StoredTensor | None:
    """The constant bias ``[out]`` of the node that alone adds one to ``node``'s output."""
    reader = _bias_reader(node)
    if reader is None:
        return None
    consumer, index = reader
    bias = stored_constant(consumer, index)
    if bias is None or bias.read().shape != (out,):
        return None
    absorbed.add(id(consumer))
    return bias


# onnxruntime's fusions of a MatMul's bias Add with the activation after it: the bias input.
BIAS_ACTIVATIONS = {"BiasGelu": 1, "FastGelu": 1}


def _bias_reader(node: ir.Node) -> tuple[ir.Node, int] | None:
    """The node that adds a bias to ``node``'s output, when it alone reads it, and where the
    bias is among its inputs: an Add, or onnxruntime's BiasGelu and FastGelu."""
    use = sole_use(node)
    if use is None:
        return None
    consumer, index = use
    if consumer.op_type == "Add" and is_default_domain(consumer) and len(consumer.inputs) == 2:
        return consumer, 1 - index
    position = BIAS_ACTIVATIONS.get(consumer.op_type)
    if (
        consumer.domain == MICROSOFT
        and position is not None
        and index == 0
        and len(consumer.inputs) > position
    ):
        return consumer, position
    return None


def _dense(
    node: ir.Node,
    weight: StoredTensor,
    transposed: bool,
    alpha: float,
    bias: StoredTensor | None,
    beta: float,
    bias_index: int | None,
    absorbed: set[int],
) -> Layer:
    """A dense layer ``y = x W^T + b`` read from a Gemm (``transB``, ``alpha``, ``beta``) or
    a MatMul and its bias Add; canonical weight ``[out, in]``."""
    stored_shape = weight.read().shape
    out = stored_shape[1] if transposed else stored_shape[0]

    def read_weight() -> np.ndarray:
        array = weight.read() * np.float32(alpha)
        return np.ascontiguousarray(array.T if transposed else array)

    def read_bias() -> np.ndarray:
        if bias is None:
            return np.zeros(out, np.float32)
        return np.broadcast_to(bias.read() * np.float32(beta), (out,)).astype(np.float32)

    def write(values: dict[str, np.ndarray], widen: bool = False) -> list[str]:
        written = []
        if "weight" in values:
            array = values["weight"] / np.float32(alpha)
            current_bias = values.get("bias", read_bias()) / np.float32(beta)
            ratio = weight.write(array.T if transposed else array, widen)
            written.append(weight.name)
            if bias is not None and bias.read().size == out:
                written += _follow_weight_scales(bias, ratio, current_bias)
        if "bias" in values:
            new_bias = values["bias"] / np.float32(beta)
            if bias is not None and bias.read().size == 1 and out > 1:
                if not np.allclose(new_bias, new_bias[0]):
                    raise UnstorableError(
                        f"{bias.name}: one shared bias cannot hold per-unit biases"
                    )
                new_bias = new_bias[:1]
            if bias is None and bias_index is None:
                if np.any(new_bias):
                    raise UnstorableError(
                        f"{weight.name}: the target's MatMul has no bias to hold the source's"
                    )
                return written
            written += _write_bias(node, bias_index or 2, bias, new_bias)
        return written

    shape = (out, stored_shape[0] if transposed else stored_shape[1])
    slots = {
        "weight": Slot(
            "weight",
            weight.name,
            shape,
            read_weight,
            weight.stored + (" [in, out]" if transposed else ""),
            (1, 0) if transposed else (0, 1),
        ),
        "bias": Slot(
            "bias",
            bias.name if bias is not None else f"{weight.name}:bias",
            (out,),
            read_bias,
            bias.stored if bias is not None else "none",
        ),
    }
    return Layer(node, "dense", ("dense",), slots, write)


def _batchnorm(node: ir.Node) -> Layer | None:
    parameters = [stored_constant(node, index) for index in range(1, 5)]
    if len(node.outputs) != 1 or any(p is None or p.quantized for p in parameters):
        return None
    batchnorm = BatchNormAffine(node, parameters)
    channels = batchnorm.gamma.read().shape

    def write(values: dict[str, np.ndarray], widen: bool = False) -> list[str]:
        """Store the map as gamma = scale, beta = shift, mean 0 and variance 1 - epsilon."""
        scale, shift = batchnorm.affine()
        written = batchnorm.set_identity()
        batchnorm.gamma.write(values.get("scale", scale))
        batchnorm.beta.write(values.get("bias", shift))
        return written

    slots = {
        "scale": Slot(
            "scale",
            batchnorm.gamma.name,
            channels,
            lambda: batchnorm.affine()[0].astype(np.float32),
            "BatchNorm",
        ),
        "bias": Slot(
            "bias",
            batchnorm.beta.name,
            channels,
            lambda: batchnorm.affine()[1].astype(np.float32),
            "BatchNorm",
        ),
    }
    return Layer(node, "batchnorm", ("batchnorm",), slots, write)


def _normalization(node: ir.Node) -> Layer | None:
    """A LayerNormalization's scale and bias, as the ``norm`` layer a decomposed one reads as."""
    scale, bias = stored_constant(node, 1), stored_constant(node, 2)
    if scale is None:
        return None
    return _layer_of(node, "norm", {"scale": scale, **({"bias": bias} if bias else {})})


# The ops that divide by the standard deviation in a LayerNorm exporters spelled out.
_NORMALIZING = frozenset({"Div", "Mul"})
_DEVIATION = frozenset({"Sqrt", "Reciprocal", "Pow"})


def _decomposed_normalization(node: ir.Node, absorbed: set[int]) -> Layer | None:
    """A LayerNorm spelled out, ``(x - mean) / sqrt(var + eps) * scale + bias``: the Mul by
    the scale and the Add of the bias read as one ``norm`` layer, so it pairs with a fused
    LayerNormalization (onnxruntime's LayerNormFusion, a newer exporter)."""
    if len(node.inputs) != 2:
        return None
    for index in (0, 1):
        scale = stored_constant(node, 1 - index)
        normalized = node.inputs[index].producer() if node.inputs[index] is not None else None
        if scale is None or scale.read().ndim != 1 or not _divides_by_deviation(normalized):
            continue
        add = _sole_reader(node, "Add")
        bias = None
        if add is not None:
            other = 1 if add.inputs[0] is node.outputs[0] else 0
            bias = stored_constant(add, other)
        if bias is None or bias.read().shape != scale.read().shape:
            return _layer_of(node, "norm", {"scale": scale})
        absorbed.add(id(add))
        return _layer_of(node, "norm", {"scale": scale, "bias": bias})
    return None


def _divides_by_deviation(node: ir.Node | None) -> bool:
    """Whether ``node`` divides (or multiplies) by a square root or its reciprocal."""
    if node is None or node.op_type not in _NORMALIZING:
        return False
    return any(
        value is not None
        and value.producer() is not None
        and value.producer().op_type in _DEVIATION
        for value in node.inputs
    )


def _generic(node: ir.Node, kind: str) -> Layer | None:
    """A node whose float constant inputs (of two values or more) are learned: a scale, a
    per-channel shift, a normalization's parameters."""
    if node.op_type in NOT_LEARNED and is_default_domain(node):
        return None
    stored: dict[str, StoredTensor] = {}
    for index in range(len(node.inputs)):
        weight = stored_constant(node, index)
        if weight is not None and weight.read().size >= 2:
            stored[f"input{index}"] = weight
    return _layer_of(node, kind, stored) if stored else None


def _layer_of(node: ir.Node, kind: str, stored: dict[str, StoredTensor]) -> Layer:
    """A layer whose slots are ``stored`` as they are, by role."""

    def write(values: dict[str, np.ndarray], widen: bool = False) -> list[str]:
        for role, array in values.items():
            stored[role].write(array, widen)
        return [stored[role].name for role in values]

    slots = {
        role: Slot(role, item.name, item.read().shape, item.read, item.stored)
        for role, item in stored.items()
    }
    label = (kind, tuple((role, len(slot.shape)) for role, slot in slots.items()))
    return Layer(node, kind, label, slots, write)
