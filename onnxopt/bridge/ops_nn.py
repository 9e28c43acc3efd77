"""Convolutions, pooling and normalizations."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from onnxopt.bridge.registry import Call, op

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_TRANSPOSE = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}
_MAX_POOL = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}
_AVG_POOL = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}


def _spatial_check(call: Call) -> str | None:
    rank = len(call.get("kernel_shape", [])) or None
    if rank is not None and rank not in (1, 2, 3):
        return f"{rank}-d kernels (supported: 1-d to 3-d)"
    return None


def _pads(call: Call, x, kernel, strides, dilations) -> list[int]:
    """Explicit pads (begins, then ends), with auto_pad resolved on the input's shape."""
    rank = len(kernel)
    auto_pad = call.get("auto_pad", "NOTSET")
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        begins, ends = [], []
        for size, k, s, d in zip(x.shape[2:], kernel, strides, dilations, strict=True):
            out = -(-size // s)
            total = max((out - 1) * s + (k - 1) * d + 1 - size, 0)
            small, large = total // 2, total - total // 2
            begins.append(small if auto_pad == "SAME_UPPER" else large)
            ends.append(large if auto_pad == "SAME_UPPER" else small)
        return begins + ends
    if auto_pad == "VALID":
        return [0] * 2 * rank
    return list(call.get("pads", [0] * 2 * rank))


def _torch_pad(pads: list[int]) -> list[int]:
    """ONNX pads (begins, then ends, first axis first) in F.pad's order (last axis first)."""
    rank = len(pads) // 2
    order = []
    for axis in reversed(range(rank)):
        order += [pads[axis], pads[rank + axis]]
    return order


def _kernel_settings(call: Call, weight) -> tuple[int, list[int], list[int], list[int]]:
    """A convolution's spatial rank, kernel, strides and dilations."""
    rank = weight.dim() - 2
    strides = list(call.get("strides", [1] * rank))
    dilations = list(call.get("dilations", [1] * rank))
    return rank, list(weight.shape[2:]), strides, dilations


@op("Conv", check=_spatial_check)
def conv(call: Call, x, weight, bias=None):
    rank, kernel, strides, dilations = _kernel_settings(call, weight)
    pads = _pads(call, x, kernel, strides, dilations)
    begins, ends = pads[:rank], pads[rank:]
    if begins == ends:
        padding = begins
    else:
        x = F.pad(x, _torch_pad(pads))
        padding = [0] * rank
    return _CONV[rank](x, weight, bias, strides, padding, dilations, call.get("group", 1))


@op("ConvTranspose", check=_spatial_check)
def conv_transpose(call: Call, x, weight, bias=None):
    rank, kernel, strides, dilations = _kernel_settings(call, weight)
    output_padding = list(call.get("output_padding", [0] * rank))
    full = _CONV_TRANSPOSE[rank](x, weight, None, strides, 0, 0, call.get("group", 1), dilations)
    # Rows past the full output receive nothing from the input: output_padding adds zeros.
    if any(output_padding):
        full = F.pad(full, _torch_pad([0] * rank + output_padding))
    sizes = [
        (size - 1) * s + (k - 1) * d + 1 + p
        for size, s, k, d, p in zip(
            x.shape[2:], strides, kernel, dilations, output_padding, strict=True
        )
    ]
    output_shape = call.get("output_shape")
    auto_pad = call.get("auto_pad", "NOTSET")
    if output_shape is not None or auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        if output_shape is None:
            output_shape = [size * s for size, s in zip(x.shape[2:], strides, strict=True)]
        output_shape = list(output_shape)[-rank:]
        totals = [full_size - out for full_size, out in zip(sizes, output_shape, strict=True)]
        if auto_pad == "SAME_UPPER":
            begins = [total // 2 for total in totals]
        else:
            begins = [total - total // 2 for total in totals]
        ends = [total - begin for total, begin in zip(totals, begins, strict=True)]
    elif auto_pad == "VALID":
        begins = ends = [0] * rank
    else:
        pads = list(call.get("pads", [0] * 2 * rank))
        begins, ends = pads[:rank], pads[rank:]
    index = [slice(None), slice(None)]
    index += [
        slice(begin, size - end) for begin, end, size in zip(begins, ends, sizes, strict=True)
    ]
    result = full[tuple(index)]
    if bias is not None:
        result = result + bias.reshape(1, -1, *[1] * rank)
    return result


def _pool_settings(call: Call, x):
    kernel = list(call.get("kernel_shape"))
    rank = len(kernel)
    strides = list(call.get("strides", [1] * rank))
    dilations = list(call.get("dilations", [1] * rank))
    return kernel, rank, strides, dilations, _pads(call, x, kernel, strides, dilations)


@op("MaxPool", check=_spatial_check)
def max_pool(call: Call, x):
    kernel, rank, strides, dilations, pads = _pool_settings(call, x)
    padded = x
    if any(pads):
        low = -math.inf if x.dtype.is_floating_point else torch.iinfo(x.dtype).min
        padded = F.pad(x, _torch_pad(pads), value=low)
    ceil_mode = bool(call.get("ceil_mode", 0))
    if call.outputs < 2:
        return _MAX_POOL[rank](padded, kernel, strides, 0, dilations, ceil_mode=ceil_mode)
    values, indices = _MAX_POOL[rank](
        padded, kernel, strides, 0, dilations, ceil_mode=ceil_mode, return_indices=True
    )
    column_major = bool(call.get("storage_order", 0))
    return values, _onnx_indices(indices, list(x.shape), list(padded.shape), pads, column_major)


def _onnx_indices(
    indices, shape: list[int], padded_shape: list[int], pads: list[int], column_major: bool
):
    """Torch's indices (into each padded plane) as ONNX's: into the whole unpadded input,
    the plane laid out row-major, or column-major with ``storage_order=1``."""
    spatial, padded_spatial = shape[2:], padded_shape[2:]
    rank = len(spatial)
    remainder = indices
    coordinates = []
    for size in reversed(padded_spatial):
        coordinates.insert(0, remainder % size)
        remainder = remainder // size
    coordinates = [coordinate - pads[axis] for axis, coordinate in enumerate(coordinates)]
    order = reversed(range(rank)) if column_major else range(rank)
    flat = torch.zeros_like(indices)
    for axis in order:
        flat = flat * spatial[axis] + coordinates[axis]
    planes = torch.arange(shape[0] * shape[1], dtype=torch.int64).reshape(
        shape[0], shape[1], *[1] * rank
    )
    return planes * math.prod(spatial) + flat


def _average_pool_check(call: Call) -> str | None:
    if any(d != 1 for d in call.get("dilations", [])):
        return "dilations other than 1"
    return _spatial_check(call)


@op("AveragePool", check=_average_pool_check)
def average_pool(call: Call, x):
    kernel, rank, strides, _, pads = _pool_settings(call, x)
    ceil_mode = bool(call.get("ceil_mode", 0))
    pool = _AVG_POOL[rank]
    if not any(pads):
        return pool(x, kernel, strides, 0, ceil_mode, True)
    # Sum over the window divided by how many values count: the padded sum over the padded
    # count, so that pads count or not as count_include_pad says, whatever the window.
    counted = torch.ones((1, 1, *x.shape[2:]), dtype=x.dtype)
    include = bool(call.get("count_include_pad", 0))
    padded = F.pad(x, _torch_pad(pads))
    counts = F.pad(counted, _torch_pad(pads), value=1.0 if include else 0.0)
    return pool(padded, kernel, strides, 0, ceil_mode, True) / pool(
        counts, kernel, strides, 0, ceil_mode, True
    )


@op("GlobalAveragePool")
def global_average_pool(call: Call, x):
    return torch.mean(x, dim=list(range(2, x.dim())), keepdim=True)


@op("GlobalMaxPool")
def global_max_pool(call: Call, x):
    return torch.amax(x, dim=list(range(2, x.dim())), keepdim=True)


@op("LpPool", check=_spatial_check)
def lp_pool(call: Call, x):
    kernel, rank, strides, _, pads = _pool_settings(call, x)
    power = call.get("p", 2)
    padded = F.pad(torch.abs(x) ** power, _torch_pad(pads))
    summed = _AVG_POOL[rank](padded, kernel, strides, 0, bool(call.get("ceil_mode", 0)), True)
    return (summed * math.prod(kernel)) ** (1.0 / power)


def _batch_norm_check(call: Call) -> str | None:
    if call.get("training_mode", 0):
        return "training_mode=1"
    if call.opset < 7 and (call.get("spatial", 1) != 1 or call.outputs > 1):
        return "spatial=0 or the training outputs (opset 6)"
    return None


@op("BatchNormalization", check=_batch_norm_check)
def batch_norm(call: Call, x, scale, bias, mean, variance):
    return F.batch_norm(x, mean, variance, scale, bias, False, 0.0, call.get("epsilon", 1e-5))


@op("InstanceNormalization")
def instance_norm(call: Call, x, scale, bias):
    return F.instance_norm(x, weight=scale, bias=bias, eps=call.get("epsilon", 1e-5))


def _layer_norm_check(call: Call) -> str | None:
    if call.outputs > 1:
        return "the Mean and InvStdDev outputs"
    return None


@op("LayerNormalization", check=_layer_norm_check)
def layer_norm(call: Call, x, scale, bias=None):
    axis = call.get("axis", -1) % x.dim()
    dims = list(range(axis, x.dim()))
    compute = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
    mean = compute.mean(dims, keepdim=True)
    variance = ((compute - mean) ** 2).mean(dims, keepdim=True)
    normalized = ((compute - mean) / torch.sqrt(variance + call.get("epsilon", 1e-5))).to(x.dtype)
    result = normalized * scale
    return result if bias is None else result + bias


@op("GroupNormalization")
def group_norm(call: Call, x, scale, bias):
    groups = call.get("num_groups")
    channels = x.shape[1]
    if scale.numel() == groups and groups != channels:
        # Opset 18 gives one scale and bias per group.
        scale = scale.repeat_interleave(channels // groups)
        bias = bias.repeat_interleave(channels // groups)
    return F.group_norm(x, groups, scale, bias, call.get("epsilon", 1e-5))


@op("LRN")
def lrn(call: Call, x):
    return F.local_response_norm(
        x, call.get("size"), call.get("alpha", 1e-4), call.get("beta", 0.75), call.get("bias", 1.0)
    )


@op("Dropout")
def dropout(call: Call, x, ratio=None, training_mode=None):
    if call.outputs > 1:
        return x, torch.ones_like(x, dtype=torch.bool)
    return x


@op("DepthToSpace")
def depth_to_space(call: Call, x):
    block = call.get("blocksize")
    n, c, h, w = x.shape
    if call.get("mode", "DCR") == "DCR":
        y = x.reshape(n, block, block, c // block**2, h, w).permute(0, 3, 4, 1, 5, 2)
    else:
        y = x.reshape(n, c // block**2, block, block, h, w).permute(0, 1, 4, 2, 5, 3)
    return y.reshape(n, c // block**2, h * block, w * block)


@op("SpaceToDepth")
def space_to_depth(call: Call, x):
    block = call.get("blocksize")
    n, c, h, w = x.shape
    y = x.reshape(n, c, h // block, block, w // block, block).permute(0, 3, 5, 1, 2, 4)
    return y.reshape(n, c * block * block, h // block, w // block)
