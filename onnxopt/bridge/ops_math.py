"""Elementwise arithmetic, activations, comparisons, reductions and matrix products."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from onnxopt.bridge.registry import Call, op
from onnxopt.bridge.types import to_torch_dtype

# --- arithmetic ---------------------------------------------------------------------------


def _legacy_broadcast(call: Call, a, b):
    """Before opset 7, ``broadcast=1`` with ``axis`` lines B up with A from that axis."""
    if call.opset >= 7 or not call.get("broadcast", 0) or call.get("axis") is None:
        return b
    axis = call.get("axis") % a.dim()
    return b.reshape(*b.shape, *[1] * (a.dim() - axis - b.dim()))


@op("Add")
def add(call: Call, a, b):
    return a + _legacy_broadcast(call, a, b)


@op("Sub")
def sub(call: Call, a, b):
    return a - _legacy_broadcast(call, a, b)


@op("Mul")
def mul(call: Call, a, b):
    return a * _legacy_broadcast(call, a, b)


@op("Div")
def div(call: Call, a, b):
    b = _legacy_broadcast(call, a, b)
    if a.dtype.is_floating_point:
        return a / b
    return torch.div(a, b, rounding_mode="trunc")


@op("Mod")
def mod(call: Call, a, b):
    if call.get("fmod", 0):
        return torch.fmod(a, b)
    return torch.remainder(a, b)


@op("Pow")
def pow_(call: Call, base, exponent):
    return torch.pow(base, exponent).to(base.dtype)


_UNARY = {
    "Neg": torch.neg,
    "Abs": torch.abs,
    "Reciprocal": torch.reciprocal,
    "Sqrt": torch.sqrt,
    "Exp": torch.exp,
    "Log": torch.log,
    "Floor": torch.floor,
    "Ceil": torch.ceil,
    "Round": torch.round,
    "Sign": torch.sign,
    "Relu": torch.relu,
    "Not": torch.logical_not,
    "IsNaN": torch.isnan,
    "Sin": torch.sin,
    "Cos": torch.cos,
    "Tan": torch.tan,
    "Asin": torch.asin,
    "Acos": torch.acos,
    "Atan": torch.atan,
    "Sinh": torch.sinh,
    "Cosh": torch.cosh,
    "Asinh": torch.asinh,
    "Acosh": torch.acosh,
    "Atanh": torch.atanh,
    "Erf": torch.erf,
    "Tanh": torch.tanh,
    "Sigmoid": torch.sigmoid,
    "Softsign": F.softsign,
    "Mish": F.mish,
}


_BINARY = {
    "Equal": torch.eq,
    "Less": torch.lt,
    "LessOrEqual": torch.le,
    "Greater": torch.gt,
    "GreaterOrEqual": torch.ge,
    "And": torch.logical_and,
    "Or": torch.logical_or,
    "Xor": torch.logical_xor,
}


def _unary(function):
    return lambda call, x: function(x)


def _binary(function):
    return lambda call, a, b: function(a, b)


for _op_type, _function in _UNARY.items():
    op(_op_type)(_unary(_function))
for _op_type, _function in _BINARY.items():
    op(_op_type)(_binary(_function))


def _variadic(function):
    def run(call: Call, *inputs):
        result = inputs[0]
        for value in inputs[1:]:
            result = function(result, value)
        return result

    return run


op("Sum")(_variadic(torch.add))
op("Max")(_variadic(torch.maximum))
op("Min")(_variadic(torch.minimum))


@op("Mean")
def mean(call: Call, *inputs):
    return _variadic(torch.add)(call, *inputs) / len(inputs)


# --- activations --------------------------------------------------------------------------


@op("LeakyRelu")
def leaky_relu(call: Call, x):
    return F.leaky_relu(x, call.get("alpha", 0.01))


@op("PRelu")
def prelu(call: Call, x, slope):
    return torch.where(x < 0, x * slope, x)


@op("Elu")
def elu(call: Call, x):
    return F.elu(x, call.get("alpha", 1.0))


@op("Selu")
def selu(call: Call, x):
    alpha = call.get("alpha", 1.67326319217681884765625)
    gamma = call.get("gamma", 1.05070102214813232421875)
    return gamma * torch.where(x > 0, x, alpha * (torch.exp(x) - 1))


@op("Celu")
def celu(call: Call, x):
    return F.celu(x, call.get("alpha", 1.0))


@op("ThresholdedRelu")
def thresholded_relu(call: Call, x):
    return torch.where(x > call.get("alpha", 1.0), x, torch.zeros_like(x))


@op("HardSigmoid")
def hard_sigmoid(call: Call, x):
    return torch.clamp(call.get("alpha", 0.2) * x + call.get("beta", 0.5), 0.0, 1.0)


@op("HardSwish")
def hard_swish(call: Call, x):
    return x * torch.clamp(x / 6.0 + 0.5, 0.0, 1.0)


@op("Softplus")
def softplus(call: Call, x):
    return F.softplus(x)


@op("Gelu", check=lambda call: _choice(call, "approximate", ("none", "tanh")))
def gelu(call: Call, x):
    return F.gelu(x, approximate=call.get("approximate", "none"))


@op("Clip")
def clip(call: Call, x, low=None, high=None):
    if call.opset < 11:
        low, high = call.get("min"), call.get("max")
    result = x
    if low is not None:
        result = torch.maximum(result, torch.as_tensor(low, dtype=x.dtype))
    if high is not None:
        result = torch.minimum(result, torch.as_tensor(high, dtype=x.dtype))
    return result


def _softmax_axis(call: Call, x) -> tuple[int, bool]:
    """The axis, and whether the op flattens at it first (before opset 13)."""
    if call.opset < 13:
        return call.get("axis", 1), True
    return call.get("axis", -1), False


def _softmax_like(function):
    def run(call: Call, x):
        axis, flatten = _softmax_axis(call, x)
        if not flatten:
            return function(x, axis)
        axis = axis % x.dim() if x.dim() else 0
        flat = x.reshape(math.prod(x.shape[:axis]), -1)
        return function(flat, 1).reshape(x.shape)

    return run


op("Softmax")(_softmax_like(lambda x, axis: torch.softmax(x, axis)))
op("LogSoftmax")(_softmax_like(lambda x, axis: torch.log_softmax(x, axis)))
op("Hardmax")(
    _softmax_like(
        lambda x, axis: (
            F.one_hot(torch.argmax(x, axis), x.shape[axis]).movedim(-1, axis).to(x.dtype)
        )
    )
)


# --- comparisons and logic ----------------------------------------------------------------


@op("Where")
def where(call: Call, condition, a, b):
    return torch.where(condition, a, b)


@op("IsInf")
def is_inf(call: Call, x):
    positive = (
        torch.isposinf(x)
        if call.get("detect_positive", 1)
        else torch.zeros_like(x, dtype=torch.bool)
    )
    negative = (
        torch.isneginf(x)
        if call.get("detect_negative", 1)
        else torch.zeros_like(x, dtype=torch.bool)
    )
    return positive | negative


# --- reductions ---------------------------------------------------------------------------


def _reduce_axes(call: Call, x, axes_input) -> list[int] | None:
    """The axes to reduce, or None for all; an empty list means none (noop_with_empty_axes)."""
    axes_from_input = (call.op_type == "ReduceSum" and call.opset >= 13) or call.opset >= 18
    axes = axes_input if axes_from_input else call.get("axes")
    if axes is None or (hasattr(axes, "numel") and axes.numel() == 0):
        return [] if call.get("noop_with_empty_axes", 0) else None
    values = axes.tolist() if hasattr(axes, "tolist") else list(axes)
    return [int(axis) % max(x.dim(), 1) for axis in values]


def _reduction(function):
    def run(call: Call, x, axes=None):
        dims = _reduce_axes(call, x, axes)
        keep = bool(call.get("keepdims", 1))
        if dims == []:
            return x
        if dims is None:
            dims = list(range(x.dim()))
        if not dims:
            return x
        return function(x, dims, keep)

    return run


op("ReduceSum")(_reduction(lambda x, dims, keep: torch.sum(x, dims, keepdim=keep)))
op("ReduceMean")(_reduction(lambda x, dims, keep: torch.mean(x, dims, keepdim=keep)))
op("ReduceMax")(_reduction(lambda x, dims, keep: torch.amax(x, dims, keepdim=keep)))
op("ReduceMin")(_reduction(lambda x, dims, keep: torch.amin(x, dims, keepdim=keep)))
op("ReduceL1")(_reduction(lambda x, dims, keep: torch.sum(torch.abs(x), dims, keepdim=keep)))
op("ReduceL2")(_reduction(lambda x, dims, keep: torch.sqrt(torch.sum(x * x, dims, keepdim=keep))))
op("ReduceSumSquare")(_reduction(lambda x, dims, keep: torch.sum(x * x, dims, keepdim=keep)))
op("ReduceLogSum")(_reduction(lambda x, dims, keep: torch.log(torch.sum(x, dims, keepdim=keep))))
op("ReduceLogSumExp")(_reduction(lambda x, dims, keep: torch.logsumexp(x, dims, keepdim=keep)))


def _prod(x, dims, keep):
    for dim in sorted(dims, reverse=True):
        x = torch.prod(x, dim, keepdim=keep)
    return x


op("ReduceProd")(_reduction(_prod))


def _arg(function):
    def run(call: Call, x):
        axis = call.get("axis", 0) % max(x.dim(), 1)
        keep = bool(call.get("keepdims", 1))
        if call.get("select_last_index", 0):
            flipped = torch.flip(x, [axis])
            index = x.shape[axis] - 1 - function(flipped, axis, keepdim=keep)
        else:
            index = function(x, axis, keepdim=keep)
        return index.to(torch.int64)

    return run


op("ArgMax")(_arg(torch.argmax))
op("ArgMin")(_arg(torch.argmin))


@op("CumSum")
def cumsum(call: Call, x, axis):
    dim = int(axis) % x.dim()
    if call.get("reverse", 0):
        x = torch.flip(x, [dim])
    result = torch.cumsum(x, dim)
    if call.get("exclusive", 0):
        result = result - x
    if call.get("reverse", 0):
        result = torch.flip(result, [dim])
    return result.to(x.dtype)


# --- matrix products ----------------------------------------------------------------------


@op("MatMul")
def matmul(call: Call, a, b):
    return torch.matmul(a, b)


@op("Gemm")
def gemm(call: Call, a, b, c=None):
    if call.get("transA", 0):
        a = a.transpose(0, 1)
    if call.get("transB", 0):
        b = b.transpose(0, 1)
    result = call.get("alpha", 1.0) * torch.matmul(a, b)
    if c is not None:
        result = result + call.get("beta", 1.0) * c
    return result


@op("Einsum")
def einsum(call: Call, *inputs):
    return torch.einsum(call.get("equation").replace(" ", ""), *inputs)


@op("Cast")
def cast(call: Call, x):
    return x.to(to_torch_dtype(call.get("to")))


@op("CastLike")
def cast_like(call: Call, x, like):
    return x.to(like.dtype)


def _choice(call: Call, name: str, supported: tuple[str, ...]) -> str | None:
    value = call.get(name)
    if value is not None and value not in supported:
        return f"{name}={value!r} (supported: {', '.join(supported)})"
    return None


@op("Shrink")
def shrink(call: Call, x):
    lambd, bias = call.get("lambd", 0.5), call.get("bias", 0.0)
    return torch.where(x > lambd, x - bias, torch.where(x < -lambd, x + bias, torch.zeros_like(x)))
