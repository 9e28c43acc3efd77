"""dlib's face-recognition ResNet (dlib_face_recognition_resnet_model_v1.dat) as a PyTorch
module, without dlib.

The network is dlib's examples/dnn_face_recognition_ex.cpp ``anet_type``: a 7x7/2 convolution
and a 3x3/2 max pool, then residual blocks of two 3x3 convolutions (32 channels x 3; 64 x 4;
128 x 3; 256 x 3; 256 x 1; each level but the first opens with a stride-2 block), an average
pool over everything and a 128-d embedding, for 150x150 RGB face chips. A downsampling
block's shortcut is a 2x2/2 average pool, and dlib's ``add_prev`` sums tensors of different
shapes by zero-padding the smaller one at the end of each axis: channels (32 -> 64, ...) and,
where a stride-2 convolution without padding gives one row and column fewer, rows and columns.
dlib's ``affine`` layers are frozen BatchNorms (``gamma * x + beta``).

The file is dlib's serialization: each layer's version string, then its parameters as a tensor
(int headers in dlib's variable-length format, then raw float32 values).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

# The mean dlib subtracts from each RGB channel of a chip, then divides by 256.
PIXEL_MEAN = np.array([122.782, 117.001, 104.298], np.float32)
PIXEL_SCALE = 256.0
CHIP_SIZE = 150

# (channels, blocks, opens with a stride-2 block) per level, input side first.
LEVELS = ((32, 3, False), (64, 4, True), (128, 3, True), (256, 3, True), (256, 1, True))
LAYER_PATTERN = re.compile(rb"\x01\x05con_4|\x01\x07affine_|\x01\x04fc_[23]")


class _Reader:
    def __init__(self, data: bytes, position: int):
        self.data, self.position = data, position

    def integer(self) -> int:
        head = self.data[self.position]
        size = head & 0x0F
        start = self.position + 1
        value = int.from_bytes(self.data[start : start + size], "little")
        self.position = start + size
        return -value if head & 0x80 else value

    def string(self) -> str:
        length = self.integer()
        text = self.data[self.position : self.position + length].decode()
        self.position += length
        return text

    def tensor(self) -> np.ndarray:
        if self.integer() != 2:
            raise ValueError("unexpected tensor version in the dlib file")
        dims = [self.integer() for _ in range(4)]
        count = int(np.prod(dims))
        array = np.frombuffer(self.data, "<f4", count, self.position).copy()
        self.position += 4 * count
        return array

    def alias(self) -> list[int]:
        if self.integer() != 1:
            raise ValueError("unexpected alias version in the dlib file")
        return [self.integer() for _ in range(4)]


def read_layers(path: Path) -> list[tuple]:
    """("con", weight, bias, stride, padding), ("affine", gamma, beta) and ("fc", weight)
    for each parametrized layer, in file order (the input side first)."""
    data = path.read_bytes()
    layers = []
    for match in LAYER_PATTERN.finditer(data):
        reader = _Reader(data, match.start())
        version = reader.string()
        if version == "con_4":
            parameters = reader.tensor()
            filters = reader.integer()
            reader.integer(), reader.integer()  # kernel rows and columns: in the alias too
            stride = (reader.integer(), reader.integer())
            padding = (reader.integer(), reader.integer())
            shape = reader.alias()
            size = int(np.prod(shape))
            weight = parameters[:size].reshape(shape)
            layers.append(("con", weight, parameters[size : size + filters], stride, padding))
        elif version == "affine_":
            parameters = reader.tensor()
            half = parameters.size // 2
            layers.append(("affine", parameters[:half], parameters[half:]))
        else:
            # fc_2 or fc_3: outputs and inputs, then the weights (no bias in this network).
            outputs, inputs = reader.integer(), reader.integer()
            weights = reader.tensor()
            layers.append(("fc", weights[: inputs * outputs].reshape(inputs, outputs)))
    return layers


class DlibResNet(torch.nn.Module):
    """The network of ``read_layers``'s layers; input [N, 3, 150, 150], output [N, 128]."""

    def __init__(self, layers: list[tuple]):
        super().__init__()
        convolutions = [layer for layer in layers if layer[0] == "con"]
        affines = [layer for layer in layers if layer[0] == "affine"]
        dense = [layer for layer in layers if layer[0] == "fc"]
        expected = 1 + 2 * sum(blocks for _, blocks, _ in LEVELS)
        if len(convolutions) != expected or len(affines) != expected or len(dense) != 1:
            raise ValueError(
                f"expected {expected} convolutions, as many affine layers and one fc layer; "
                f"found {len(convolutions)}, {len(affines)} and {len(dense)}"
            )
        self.convolutions = torch.nn.ModuleList()
        self.norms = torch.nn.ModuleList()
        for (_, weight, bias, stride, padding), (_, gamma, beta) in zip(
            convolutions, affines, strict=True
        ):
            convolution = torch.nn.Conv2d(
                weight.shape[1], weight.shape[0], weight.shape[2:], stride, padding
            )
            convolution.weight.data = torch.from_numpy(weight)
            convolution.bias.data = torch.from_numpy(bias)
            norm = torch.nn.BatchNorm2d(gamma.size)
            # Mean 0 and variance 1 - eps make the norm exactly gamma * x + beta.
            norm.running_var.data.fill_(1.0 - norm.eps)
            norm.weight.data, norm.bias.data = torch.from_numpy(gamma), torch.from_numpy(beta)
            self.convolutions.append(convolution)
            self.norms.append(norm)
        weight = dense[0][1]
        self.embedding = torch.nn.Linear(weight.shape[0], weight.shape[1], bias=False)
        self.embedding.weight.data = torch.from_numpy(np.ascontiguousarray(weight.T))
        self.eval()

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.norms[0](self.convolutions[0](image)))
        x = F.max_pool2d(x, 3, 2)
        index = 1
        for _, blocks, downsamples in LEVELS:
            for block in range(blocks):
                y = F.relu(self.norms[index](self.convolutions[index](x)))
                y = self.norms[index + 1](self.convolutions[index + 1](y))
                index += 2
                shortcut = F.avg_pool2d(x, 2, 2) if downsamples and block == 0 else x
                x = F.relu(_add_prev(y, shortcut))
        pooled = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        return self.embedding(pooled)


def _add_prev(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """dlib's sum of two tensors of different shapes: each zero-padded at the end of every
    axis (channels, rows, columns) to the larger size. The sizes are fixed by the chip size,
    so the exported graph has constant pads."""
    sizes = [max(x, y) for x, y in zip(a.shape[1:], b.shape[1:], strict=True)]

    def padded(x: torch.Tensor) -> torch.Tensor:
        channels, rows, columns = (
            int(size - have) for size, have in zip(sizes, x.shape[1:], strict=True)
        )
        return F.pad(x, (0, columns, 0, rows, 0, channels)) if channels or rows or columns else x

    return padded(a) + padded(b)


def chip_input(chip: np.ndarray) -> np.ndarray:
    """A 150x150 RGB uint8 chip as the network's [3, 150, 150] input."""
    return ((chip.astype(np.float32) - PIXEL_MEAN) / PIXEL_SCALE).transpose(2, 0, 1).copy()
