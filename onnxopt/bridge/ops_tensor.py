"""Shapes, data movement, indexing and constants."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from onnxopt.bridge.registry import Call, op
from onnxopt.bridge.types import to_tensor, to_torch_dtype


def _ints(value) -> list[int]:
    """A 1-d int tensor, list or scalar as a list of Python ints."""
    if value is None:
        return []
    if isinstance(value, torch.Tensor):
        return [int(v) for v in value.reshape(-1).tolist()]
    return [int(v) for v in np.asarray(value).reshape(-1)]


def _axis(axis: int, rank: int) -> int:
    return axis + rank if axis < 0 else axis


@op("Identity")
def identity(call: Call, x):
    return x


@op("Shape")
def shape(call: Call, x):
    sizes = list(x.shape)
    start = call.get("start", 0)
    end = call.get("end")
    return torch.tensor(sizes[start:end], dtype=torch.int64)


@op("Size")
def size(call: Call, x):
    return torch.tensor(x.numel(), dtype=torch.int64)


def _constant_check(call: Call) -> str | None:
    for name in ("sparse_value", "value_string", "value_strings"):
        if call.get(name) is not None:
            return f"the {name} attribute"
    return None


@op("Constant", check=_constant_check)
def constant(call: Call):
    for name, dtype in (
        ("value_float", torch.float32),
        ("value_floats", torch.float32),
        ("value_int", torch.int64),
        ("value_ints", torch.int64),
    ):
        if call.get(name) is not None:
            return torch.tensor(call.get(name), dtype=dtype)
    return to_tensor(call.get("value"))


@op("ConstantOfShape")
def constant_of_shape(call: Call, sizes):
    value = call.get("value")
    fill = to_tensor(value).reshape(-1) if value is not None else torch.zeros(1)
    return fill.expand(_ints(sizes)).clone() if _ints(sizes) else fill.reshape(()).clone()


@op("Range")
def range_(call: Call, start, limit, delta):
    return torch.arange(start.item(), limit.item(), delta.item(), dtype=start.dtype)


@op("Reshape")
def reshape(call: Call, x, sizes=None):
    target = _ints(sizes) if call.opset >= 5 else list(call.get("shape"))
    if not call.get("allowzero", 0):
        target = [x.shape[index] if size == 0 else size for index, size in enumerate(target)]
    return x.reshape(target)


@op("Flatten")
def flatten(call: Call, x):
    axis = _axis(call.get("axis", 1), x.dim())
    leading = int(np.prod(x.shape[:axis], dtype=np.int64))
    return x.reshape(leading, -1)


@op("Transpose")
def transpose(call: Call, x):
    perm = call.get("perm")
    return x.permute(list(perm) if perm is not None else list(range(x.dim()))[::-1])


@op("Squeeze")
def squeeze(call: Call, x, axes=None):
    axes = _ints(axes) if call.opset >= 13 else list(call.get("axes", []))
    if not axes:
        axes = [index for index, size in enumerate(x.shape) if size == 1]
    keep = [
        size for index, size in enumerate(x.shape) if index not in {_axis(a, x.dim()) for a in axes}
    ]
    return x.reshape(keep)


@op("Unsqueeze")
def unsqueeze(call: Call, x, axes=None):
    axes = _ints(axes) if call.opset >= 13 else list(call.get("axes"))
    rank = x.dim() + len(axes)
    for axis in sorted(_axis(a, rank) for a in axes):
        x = x.unsqueeze(axis)
    return x


@op("Concat")
def concat(call: Call, *inputs):
    return torch.cat([value for value in inputs if value is not None], call.get("axis"))


@op("Split")
def split(call: Call, x, sizes=None):
    axis = _axis(call.get("axis", 0), x.dim())
    sizes = _ints(sizes) if call.opset >= 13 else list(call.get("split", []))
    if not sizes:
        count = call.get("num_outputs", call.outputs)
        length = x.shape[axis]
        chunk = -(-length // count)
        sizes = [min(chunk, length - chunk * index) for index in range(count)]
    return tuple(torch.split(x, sizes, axis))


@op("Slice")
def slice_(call: Call, x, starts=None, ends=None, axes=None, steps=None):
    if call.opset < 10:
        starts, ends, axes = call.get("starts"), call.get("ends"), call.get("axes")
    starts, ends = _ints(starts), _ints(ends)
    axes = _ints(axes) if axes is not None and len(_ints(axes)) else list(range(len(starts)))
    steps = _ints(steps) if steps is not None and len(_ints(steps)) else [1] * len(starts)
    for start, end, axis, step in zip(starts, ends, axes, steps, strict=True):
        axis = _axis(axis, x.dim())
        length = x.shape[axis]
        begin, stop, stride = slice(start, end, step).indices(length)
        if stride > 0:
            index = [slice(None)] * axis + [slice(begin, stop, stride)]
            x = x[tuple(index)]
        else:
            picked = torch.arange(begin, stop, stride, dtype=torch.int64)
            x = torch.index_select(x, axis, picked)
    return x


def _positive(indices, length: int):
    indices = indices.to(torch.int64)
    return torch.where(indices < 0, indices + length, indices)


@op("Gather")
def gather(call: Call, data, indices):
    axis = _axis(call.get("axis", 0), data.dim())
    flat = _positive(indices, data.shape[axis]).reshape(-1)
    picked = torch.index_select(data, axis, flat)
    return picked.reshape((*data.shape[:axis], *indices.shape, *data.shape[axis + 1 :]))


@op("GatherElements")
def gather_elements(call: Call, data, indices):
    axis = _axis(call.get("axis", 0), data.dim())
    return torch.gather(data, axis, _positive(indices, data.shape[axis]))


def _gather_nd_check(call: Call) -> str | None:
    return "batch_dims other than 0" if call.get("batch_dims", 0) else None


@op("GatherND", check=_gather_nd_check)
def gather_nd(call: Call, data, indices):
    indices = indices.to(torch.int64)
    depth = indices.shape[-1]
    coordinates = tuple(_positive(indices[..., level], data.shape[level]) for level in range(depth))
    return data[coordinates]


def _scatter_check(call: Call) -> str | None:
    reduction = call.get("reduction", "none")
    if reduction not in ("none", "add", "mul", "max", "min"):
        return f"reduction={reduction!r}"
    return None


_SCATTER_REDUCE = {"add": "sum", "mul": "prod", "max": "amax", "min": "amin"}


@op("ScatterElements", "Scatter", check=_scatter_check)
def scatter_elements(call: Call, data, indices, updates):
    axis = _axis(call.get("axis", 0), data.dim())
    indices = _positive(indices, data.shape[axis])
    reduction = call.get("reduction", "none")
    if reduction == "none":
        return torch.scatter(data, axis, indices, updates)
    return torch.scatter_reduce(data, axis, indices, updates, _SCATTER_REDUCE[reduction])


@op("ScatterND", check=_scatter_check)
def scatter_nd(call: Call, data, indices, updates):
    indices = indices.to(torch.int64)
    coordinates = tuple(
        _positive(indices[..., level], data.shape[level]) for level in range(indices.shape[-1])
    )
    result = data.clone()
    reduction = call.get("reduction", "none")
    if reduction == "none":
        result[coordinates] = updates
    elif reduction == "add":
        result = result.index_put(coordinates, updates, accumulate=True)
    else:
        current = result[coordinates]
        combined = {
            "mul": lambda: current * updates,
            "max": lambda: torch.maximum(current, updates),
            "min": lambda: torch.minimum(current, updates),
        }[reduction]()
        result[coordinates] = combined
    return result


@op("Expand")
def expand(call: Call, x, sizes):
    target = torch.broadcast_shapes(tuple(x.shape), tuple(_ints(sizes)))
    return x.expand(target)


@op("Tile")
def tile(call: Call, x, repeats):
    return x.repeat(_ints(repeats))


def _pad_check(call: Call) -> str | None:
    mode = call.get("mode", "constant")
    if mode not in ("constant", "reflect", "edge", "wrap"):
        return f"mode={mode!r}"
    return None


@op("Pad", check=_pad_check)
def pad(call: Call, x, pads=None, value=None, axes=None):
    if call.opset < 11:
        pads, value = call.get("pads"), call.get("value", 0.0)
    pads = _ints(pads)
    rank = x.dim()
    axes = [_axis(a, rank) for a in _ints(axes)] if axes is not None else list(range(rank))
    begins = dict(zip(axes, pads[: len(axes)], strict=True))
    ends = dict(zip(axes, pads[len(axes) :], strict=True))
    mode = call.get("mode", "constant")
    if mode == "constant":
        fill = value.item() if isinstance(value, torch.Tensor) and value.numel() else value or 0
        order = []
        for axis in reversed(range(rank)):
            order += [begins.get(axis, 0), ends.get(axis, 0)]
        return F.pad(x, order, value=fill)
    for axis in range(rank):
        begin, end = begins.get(axis, 0), ends.get(axis, 0)
        if begin or end:
            x = torch.index_select(x, axis, _padded_indices(x.shape[axis], begin, end, mode))
    return x


def _padded_indices(length: int, begin: int, end: int, mode: str) -> torch.Tensor:
    """Source positions of a padded axis: reflected, repeated at the edge, or wrapped."""
    positions = np.arange(-begin, length + end)
    if mode == "edge":
        positions = np.clip(positions, 0, length - 1)
    elif mode == "wrap":
        positions = np.mod(positions, length)
    else:
        period = 2 * (length - 1) if length > 1 else 1
        positions = np.abs(np.mod(positions, period))
        positions = np.where(positions >= length, period - positions, positions)
    return torch.from_numpy(positions.astype(np.int64))


@op("TopK")
def top_k(call: Call, x, k=None):
    count = int(k.reshape(-1)[0]) if call.opset >= 10 else call.get("k")
    axis = _axis(call.get("axis", -1), x.dim())
    values, indices = torch.topk(x, count, axis, largest=bool(call.get("largest", 1)), sorted=True)
    return values, indices.to(torch.int64)


@op("NonZero")
def non_zero(call: Call, x):
    return torch.nonzero(x).T.contiguous().to(torch.int64)


@op("Trilu")
def trilu(call: Call, x, k=None):
    diagonal = int(k) if k is not None else 0
    return torch.triu(x, diagonal) if call.get("upper", 1) else torch.tril(x, diagonal)


@op("OneHot")
def one_hot(call: Call, indices, depth, values):
    count = int(depth.reshape(-1)[0])
    indices = _positive(indices, count)
    axis = call.get("axis", -1)
    encoded = F.one_hot(indices.clamp(0, count - 1), count) * (indices < count).unsqueeze(-1)
    encoded = encoded.movedim(-1, _axis(axis, indices.dim() + 1))
    off, on = values[0], values[1]
    return torch.where(encoded.bool(), on, off)


@op("Compress")
def compress(call: Call, x, condition):
    keep = torch.nonzero(condition.to(torch.bool)).reshape(-1)
    axis = call.get("axis")
    if axis is None:
        return x.reshape(-1)[keep]
    return torch.index_select(x, _axis(axis, x.dim()), keep)


@op("EyeLike")
def eye_like(call: Call, x):
    dtype = to_torch_dtype(call.get("dtype")) if call.get("dtype") is not None else x.dtype
    diagonal = call.get("k", 0)
    return torch.ones(x.shape, dtype=torch.float32).triu(diagonal).tril(diagonal).to(dtype)
