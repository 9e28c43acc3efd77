"""Convolutions, pooling, normalizations, resizing and recurrent layers."""

from __future__ import annotations

import math

import numpy as np
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


def _max_pool_check(call: Call) -> str | None:
    if call.outputs > 1:
        return "the Indices output"
    if call.get("storage_order", 0):
        return "storage_order=1"
    return _spatial_check(call)


@op("MaxPool", check=_max_pool_check)
def max_pool(call: Call, x):
    kernel, rank, strides, dilations, pads = _pool_settings(call, x)
    if any(pads):
        low = -math.inf if x.dtype.is_floating_point else torch.iinfo(x.dtype).min
        x = F.pad(x, _torch_pad(pads), value=low)
    return _MAX_POOL[rank](
        x, kernel, strides, 0, dilations, ceil_mode=bool(call.get("ceil_mode", 0))
    )


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


# --- resizing -----------------------------------------------------------------------------

_COORDINATES = ("half_pixel", "pytorch_half_pixel", "align_corners", "asymmetric")
_NEAREST = ("round_prefer_floor", "round_prefer_ceil", "floor", "ceil")


def _resize_check(call: Call) -> str | None:
    mode = call.get("mode", "nearest")
    if mode not in ("nearest", "linear", "bilinear", "cubic"):
        return f"mode={mode!r} (supported: nearest, linear, cubic)"
    coordinates = call.get("coordinate_transformation_mode", "half_pixel")
    if call.op_type == "Resize" and coordinates not in _COORDINATES:
        return (
            f"coordinate_transformation_mode={coordinates!r} (supported: {', '.join(_COORDINATES)})"
        )
    if call.get("nearest_mode", "round_prefer_floor") not in _NEAREST:
        return f"nearest_mode={call.get('nearest_mode')!r}"
    if call.get("antialias", 0):
        return "antialias=1"
    if call.get("axes") is not None:
        return "the axes attribute"
    if call.get("keep_aspect_ratio_policy", "stretch") != "stretch":
        return f"keep_aspect_ratio_policy={call.get('keep_aspect_ratio_policy')!r}"
    return None


@op("Resize", check=_resize_check)
def resize(call: Call, x, roi=None, scales=None, sizes=None):
    if call.opset < 11:
        scales, roi = roi, None
    coordinates = call.get("coordinate_transformation_mode", "half_pixel")
    if call.opset < 11:
        coordinates = "asymmetric"
    return _resize(call, x, scales, sizes, coordinates)


@op("Upsample", check=_resize_check)
def upsample(call: Call, x, scales=None):
    if scales is None:
        scales = torch.tensor(call.get("scales"), dtype=torch.float32)
    return _resize(call, x, scales, None, "asymmetric")


def _resize(call: Call, x, scales, sizes, coordinates: str):
    """Separable resizing, one axis at a time, by gathering source positions: exact for every
    coordinate mode and differentiable with respect to ``x``."""
    shape = list(x.shape)
    if sizes is not None and sizes.numel():
        out_sizes = [int(size) for size in sizes.tolist()]
        axis_scales = [out / size for out, size in zip(out_sizes, shape, strict=True)]
    else:
        axis_scales = [float(scale) for scale in scales.tolist()]
        out_sizes = [
            math.floor(size * scale) for size, scale in zip(shape, axis_scales, strict=True)
        ]
    mode = call.get("mode", "nearest")
    linear = mode in ("linear", "bilinear")
    for axis, (size, out, scale) in enumerate(zip(shape, out_sizes, axis_scales, strict=True)):
        if out == size and scale == 1.0:
            continue
        source = _source_coordinates(size, out, scale, coordinates)
        if mode == "cubic":
            x = _cubic(call, x, axis, size, source)
        elif linear:
            source = np.clip(source, 0, size - 1)
            low = np.floor(source).astype(np.int64)
            high = np.minimum(low + 1, size - 1)
            weight = torch.tensor(source - low, dtype=x.dtype).reshape(
                [-1 if index == axis else 1 for index in range(x.dim())]
            )
            x = (
                torch.index_select(x, axis, torch.from_numpy(low)) * (1 - weight)
                + torch.index_select(x, axis, torch.from_numpy(high)) * weight
            )
        else:
            index = _nearest(source, call.get("nearest_mode", "round_prefer_floor"))
            index = np.clip(index, 0, size - 1)
            x = torch.index_select(x, axis, torch.from_numpy(index))
    return x


def _cubic(call: Call, x, axis: int, size: int, source: np.ndarray):
    """Four taps per output along ``axis`` with the cubic kernel of ``cubic_coeff_a``; taps past
    the edge read the edge, or weigh nothing (renormalized) with ``exclude_outside``."""
    a = call.get("cubic_coeff_a", -0.75)
    base = np.floor(source).astype(np.int64)
    fraction = source - base
    distances = np.stack([fraction + 1, fraction, 1 - fraction, 2 - fraction])
    near = (a + 2) * distances**3 - (a + 3) * distances**2 + 1
    far = a * distances**3 - 5 * a * distances**2 + 8 * a * distances - 4 * a
    weights = np.where(distances <= 1, near, far)
    taps = base[None, :] + np.arange(-1, 3)[:, None]
    if call.get("exclude_outside", 0):
        weights = np.where((taps >= 0) & (taps < size), weights, 0.0)
        weights = weights / weights.sum(axis=0, keepdims=True)
    taps = np.clip(taps, 0, size - 1)
    view = [-1 if index == axis else 1 for index in range(x.dim())]
    result = 0
    for tap, weight in zip(taps, weights, strict=True):
        gathered = torch.index_select(x, axis, torch.from_numpy(tap))
        result = result + gathered * torch.tensor(weight, dtype=x.dtype).reshape(view)
    return result


def _source_coordinates(size: int, out: int, scale: float, coordinates: str) -> np.ndarray:
    target = np.arange(out, dtype=np.float64)
    if coordinates == "half_pixel":
        return (target + 0.5) / scale - 0.5
    if coordinates == "pytorch_half_pixel":
        return (target + 0.5) / scale - 0.5 if out > 1 else np.zeros(out)
    if coordinates == "align_corners":
        return target * (size - 1) / (out - 1) if out > 1 else np.zeros(out)
    return target / scale


def _nearest(source: np.ndarray, mode: str) -> np.ndarray:
    if mode == "floor":
        return np.floor(source).astype(np.int64)
    if mode == "ceil":
        return np.ceil(source).astype(np.int64)
    if mode == "round_prefer_ceil":
        return np.floor(source + 0.5).astype(np.int64)
    return np.ceil(source - 0.5).astype(np.int64)


# --- recurrent layers ---------------------------------------------------------------------


def _recurrent_check(call: Call) -> str | None:
    defaults = {
        "LSTM": ["Sigmoid", "Tanh", "Tanh"],
        "GRU": ["Sigmoid", "Tanh"],
        "RNN": ["Tanh"],
    }[call.op_type]
    activations = call.get("activations")
    directions = 2 if call.get("direction", "forward") == "bidirectional" else 1
    if activations is not None and list(activations) != defaults * directions:
        return f"activations {list(activations)} (supported: the defaults, {defaults})"
    if call.get("clip") is not None:
        return "clip"
    if call.get("input_forget", 0):
        return "input_forget=1"
    return None


def _recurrent_inputs(call: Call, x, r, sequence_lens, initial_states):
    """Inputs as (sequence, batch, features), initial states as (directions, batch, hidden),
    whether the layout is batch first, the hidden size and the batch."""
    batch_first = bool(call.get("layout", 0))
    if batch_first:
        x = x.transpose(0, 1)
        initial_states = [None if s is None else s.transpose(0, 1) for s in initial_states]
    _sequence_check(sequence_lens, x)
    return x, initial_states, batch_first, r.shape[-1], x.shape[1]


def _recurrent_outputs(call: Call, batch_first: bool, ys, states):
    y = torch.stack(ys, 1)  # (sequence, directions, batch, hidden)
    finals = [torch.stack(state, 0) for state in states]
    if batch_first:
        y = y.permute(2, 0, 1, 3)
        finals = [final.transpose(0, 1) for final in finals]
    return (y, *finals)[: max(call.outputs, 1)]


def _directions(call: Call) -> list[bool]:
    direction = call.get("direction", "forward")
    return {"forward": [False], "reverse": [True], "bidirectional": [False, True]}[direction]


def _sequence_check(sequence_lens, x) -> None:
    if sequence_lens is not None and bool((sequence_lens != x.shape[0]).any()):
        raise NotImplementedError("sequence_lens shorter than the sequence")


@op("LSTM", check=_recurrent_check)
def lstm(call: Call, x, w, r, b=None, sequence_lens=None, initial_h=None, initial_c=None, p=None):
    x, (initial_h, initial_c), batch_first, hidden, batch = _recurrent_inputs(
        call, x, r, sequence_lens, [initial_h, initial_c]
    )
    ys, finals_h, finals_c = [], [], []
    for direction, reverse in enumerate(_directions(call)):
        bias = b[direction, : 4 * hidden] + b[direction, 4 * hidden :] if b is not None else 0
        h = initial_h[direction] if initial_h is not None else x.new_zeros(batch, hidden)
        c = initial_c[direction] if initial_c is not None else x.new_zeros(batch, hidden)
        peephole = p[direction] if p is not None else None
        steps = range(x.shape[0] - 1, -1, -1) if reverse else range(x.shape[0])
        outputs = [None] * x.shape[0]
        for step in steps:
            gates = x[step] @ w[direction].T + h @ r[direction].T + bias
            i, o, f, g = gates.split(hidden, dim=-1)
            if peephole is not None:
                i = i + peephole[:hidden] * c
                f = f + peephole[2 * hidden :] * c
            i, f, g = torch.sigmoid(i), torch.sigmoid(f), torch.tanh(g)
            c = f * c + i * g
            if peephole is not None:
                o = o + peephole[hidden : 2 * hidden] * c
            h = torch.sigmoid(o) * torch.tanh(c)
            outputs[step] = h
        ys.append(torch.stack(outputs, 0))
        finals_h.append(h)
        finals_c.append(c)
    return _recurrent_outputs(call, batch_first, ys, [finals_h, finals_c])


@op("GRU", check=_recurrent_check)
def gru(call: Call, x, w, r, b=None, sequence_lens=None, initial_h=None):
    x, (initial_h,), batch_first, hidden, batch = _recurrent_inputs(
        call, x, r, sequence_lens, [initial_h]
    )
    linear_before_reset = bool(call.get("linear_before_reset", 0))
    ys, finals = [], []
    for direction, reverse in enumerate(_directions(call)):
        wb = b[direction, : 3 * hidden] if b is not None else x.new_zeros(3 * hidden)
        rb = b[direction, 3 * hidden :] if b is not None else x.new_zeros(3 * hidden)
        h = initial_h[direction] if initial_h is not None else x.new_zeros(batch, hidden)
        rz, rr, rh = r[direction].split(hidden, dim=0)
        steps = range(x.shape[0] - 1, -1, -1) if reverse else range(x.shape[0])
        outputs = [None] * x.shape[0]
        for step in steps:
            xz, xr, xh = (x[step] @ w[direction].T + wb).split(hidden, dim=-1)
            rbz, rbr, rbh = rb.split(hidden)
            z = torch.sigmoid(xz + h @ rz.T + rbz)
            reset = torch.sigmoid(xr + h @ rr.T + rbr)
            if linear_before_reset:
                candidate = torch.tanh(xh + reset * (h @ rh.T + rbh))
            else:
                candidate = torch.tanh(xh + (reset * h) @ rh.T + rbh)
            h = (1 - z) * candidate + z * h
            outputs[step] = h
        ys.append(torch.stack(outputs, 0))
        finals.append(h)
    return _recurrent_outputs(call, batch_first, ys, [finals])


@op("RNN", check=_recurrent_check)
def rnn(call: Call, x, w, r, b=None, sequence_lens=None, initial_h=None):
    x, (initial_h,), batch_first, hidden, batch = _recurrent_inputs(
        call, x, r, sequence_lens, [initial_h]
    )
    ys, finals = [], []
    for direction, reverse in enumerate(_directions(call)):
        bias = b[direction, :hidden] + b[direction, hidden:] if b is not None else 0
        h = initial_h[direction] if initial_h is not None else x.new_zeros(batch, hidden)
        steps = range(x.shape[0] - 1, -1, -1) if reverse else range(x.shape[0])
        outputs = [None] * x.shape[0]
        for step in steps:
            h = torch.tanh(x[step] @ w[direction].T + h @ r[direction].T + bias)
            outputs[step] = h
        ys.append(torch.stack(outputs, 0))
        finals.append(h)
    return _recurrent_outputs(call, batch_first, ys, [finals])
