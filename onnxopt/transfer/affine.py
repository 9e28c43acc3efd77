"""Per-channel affine maps after a convolution, folded into it when weights are read.

Exporters and optimizers differ in what they fold: a BatchNormalization, a Mul by a scale
and an Add of a shift per channel (a Paddle export's bias, a FrozenBatchNorm) may follow a
convolution in one graph and be folded into its weights in the other (onnxruntime's
ConvBnFusion, ConvMulFusion, ConvAddFusion; onnxopt's cleanup). ``following_affine`` finds
the chain of such ops that alone reads a convolution's output; ``compose`` gives the one
map ``y = x * scale + shift`` they apply, which canonical weights fold in; ``set_identity``
makes each op pass its input through, once the folded values are written into the
convolution, so the target keeps its nodes.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from onnxopt.graph import is_default_domain, sole_use
from onnxopt.transfer.storage import StoredTensor, stored_constant

DEFAULT_EPSILON = 1e-5


class BatchNormAffine:
    """A BatchNormalization in inference mode: ``scale = gamma / sqrt(var + eps)``,
    ``shift = beta - mean * scale``."""

    name = "BatchNorm"

    def __init__(self, node: ir.Node, parameters: list[StoredTensor]):
        self.node = node
        self.gamma, self.beta, self.mean, self.variance = parameters
        self.epsilon = node.attributes.get_float("epsilon", DEFAULT_EPSILON)

    def affine(self) -> tuple[np.ndarray, np.ndarray]:
        scale = self.gamma.read().astype(np.float64) / np.sqrt(
            self.variance.read().astype(np.float64) + self.epsilon
        )
        return scale, self.beta.read().astype(np.float64) - self.mean.read() * scale

    def set_identity(self) -> list[str]:
        """gamma 1, beta 0, mean 0 and variance 1 - epsilon."""
        ones = np.ones(self.gamma.read().shape)
        self.gamma.write(ones)
        self.beta.write(np.zeros_like(ones))
        self.mean.write(np.zeros_like(ones))
        self.variance.write(np.full_like(ones, 1.0 - self.epsilon))
        return [self.gamma.name, self.beta.name, self.mean.name, self.variance.name]


class ConstantAffine:
    """A Mul by, or an Add of, a constant of one value per channel (or one in all)."""

    def __init__(self, node: ir.Node, constant: StoredTensor, channels: int):
        self.node = node
        self.name = node.op_type
        self.constant = constant
        self.channels = channels

    def affine(self) -> tuple[np.ndarray, np.ndarray]:
        values = np.broadcast_to(self.constant.read().reshape(-1), (self.channels,))
        values = values.astype(np.float64)
        if self.node.op_type == "Mul":
            return values, np.zeros(self.channels)
        return np.ones(self.channels), values

    def set_identity(self) -> list[str]:
        shape = self.constant.read().shape
        self.constant.write(np.ones(shape) if self.node.op_type == "Mul" else np.zeros(shape))
        return [self.constant.name]


Affine = BatchNormAffine | ConstantAffine


def following_affine(node: ir.Node, channels: int, rank: int) -> list[Affine]:
    """The chain of BatchNorm, Mul and Add by per-channel constants that alone reads the
    output (rank ``rank``, channels on axis 1) of ``node``, in order."""
    chain: list[Affine] = []
    current = node
    while True:
        step = _next_affine(current, channels, rank)
        if step is None:
            return chain
        chain.append(step)
        current = step.node


def compose(chain: list[Affine], channels: int) -> tuple[np.ndarray, np.ndarray]:
    """The one map ``x * scale + shift`` (float64, per channel) the chain applies."""
    scale, shift = np.ones(channels), np.zeros(channels)
    for step in chain:
        step_scale, step_shift = step.affine()
        scale, shift = scale * step_scale, shift * step_scale + step_shift
    return scale, shift


def _next_affine(node: ir.Node, channels: int, rank: int) -> Affine | None:
    use = sole_use(node)
    if use is None:
        return None
    reader, index = use
    if not is_default_domain(reader) or len(reader.outputs) != 1:
        return None
    if reader.op_type == "BatchNormalization" and index == 0 and len(reader.inputs) >= 5:
        parameters = [stored_constant(reader, position) for position in range(1, 5)]
        if all(
            p is not None and not p.quantized and p.read().shape == (channels,) for p in parameters
        ):
            return BatchNormAffine(reader, parameters)
        return None
    if reader.op_type in ("Mul", "Add") and len(reader.inputs) == 2:
        constant = stored_constant(reader, 1 - index)
        if (
            constant is not None
            and not constant.quantized
            and _per_channel(constant.read().shape, channels, rank)
        ):
            return ConstantAffine(reader, constant, channels)
    return None


def _per_channel(shape: tuple[int, ...], channels: int, rank: int) -> bool:
    """Whether a constant of ``shape`` broadcasts over [N, C, ...] one value per channel."""
    if len(shape) > rank:
        return False
    padded = (1,) * (rank - len(shape)) + tuple(shape)
    return padded[0] == 1 and padded[1] in (1, channels) and all(d == 1 for d in padded[2:])
