"""Recurrent layers: LSTM, GRU and RNN, with every gate activation, clip and sequence length
that onnxruntime's CPU kernels accept."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from onnxopt.bridge.registry import Call, op

Activation = Callable[[torch.Tensor], torch.Tensor]

_DEFAULT_ACTIVATIONS = {
    "LSTM": ["Sigmoid", "Tanh", "Tanh"],
    "GRU": ["Sigmoid", "Tanh"],
    "RNN": ["Tanh"],
}
# How onnxruntime reads activation_alpha and activation_beta: whether each function takes an
# alpha and a beta (consumed in order across all functions), and the values used when the lists
# run out.
_ACTIVATION_ARGUMENTS: dict[str, tuple[bool, bool, float, float]] = {
    "affine": (True, True, 0.0, 0.0),
    "relu": (False, False, 0.0, 0.0),
    "leakyrelu": (True, False, 0.01, 0.0),
    "thresholdedrelu": (True, False, 0.0, 0.0),
    "tanh": (False, False, 0.0, 0.0),
    "scaledtanh": (True, True, 0.0, 0.0),
    "sigmoid": (False, False, 0.0, 0.0),
    "hardsigmoid": (True, True, 0.2, 0.5),
    "elu": (True, False, 1.0, 0.0),
    "softsign": (False, False, 0.0, 0.0),
    "softplus": (False, False, 0.0, 0.0),
}


def _activation(name: str, alpha: float, beta: float) -> Activation:
    functions: dict[str, Activation] = {
        "affine": lambda x: alpha * x + beta,
        "relu": torch.relu,
        "leakyrelu": lambda x: F.leaky_relu(x, alpha),
        "thresholdedrelu": lambda x: x * (x > alpha),
        "tanh": torch.tanh,
        "scaledtanh": lambda x: alpha * torch.tanh(beta * x),
        "sigmoid": torch.sigmoid,
        "hardsigmoid": lambda x: torch.clamp(alpha * x + beta, 0.0, 1.0),
        "elu": lambda x: F.elu(x, alpha),
        "softsign": F.softsign,
        "softplus": F.softplus,
    }
    return functions[name]


def _activation_names(call: Call) -> list[str]:
    defaults = _DEFAULT_ACTIVATIONS[call.op_type]
    directions = len(_directions(call))
    names = list(call.get("activations") or defaults * directions)
    if directions == 2 and len(names) == len(defaults):
        names *= 2  # one set given for both directions, as onnxruntime reads it
    return names


def _recurrent_check(call: Call) -> str | None:
    names = _activation_names(call)
    unknown = [name for name in names if name.lower() not in _ACTIVATION_ARGUMENTS]
    if unknown:
        return f"activations {unknown} (supported: {', '.join(sorted(_ACTIVATION_ARGUMENTS))})"
    expected = len(_DEFAULT_ACTIVATIONS[call.op_type]) * len(_directions(call))
    if len(names) != expected:
        return f"{len(names)} activations (expected {expected})"
    return None


def _gate_functions(call: Call) -> list[list[Activation]]:
    """Per direction, the activations with their alphas and betas."""
    alphas = iter(call.get("activation_alpha") or [])
    betas = iter(call.get("activation_beta") or [])
    functions = []
    for name in _activation_names(call):
        takes_alpha, takes_beta, alpha, beta = _ACTIVATION_ARGUMENTS[name.lower()]
        alpha = next(alphas, alpha) if takes_alpha else alpha
        beta = next(betas, beta) if takes_beta else beta
        functions.append(_activation(name.lower(), alpha, beta))
    count = len(_DEFAULT_ACTIVATIONS[call.op_type])
    return [functions[start : start + count] for start in range(0, len(functions), count)]


def _clip(call: Call) -> Activation:
    """Bounds a gate's input to [-clip, clip] (every gate's, not an LSTM's cell state)."""
    bound = call.get("clip")
    if bound is None:
        return lambda x: x
    return lambda x: torch.clamp(x, -float(bound), float(bound))


def _directions(call: Call) -> list[bool]:
    """Whether each direction runs backwards through the sequence."""
    direction = call.get("direction", "forward")
    return {"forward": [False], "reverse": [True], "bidirectional": [False, True]}[direction]


class _Sequence:
    """A recurrent layer's input as (sequence, batch, features), its initial states as
    (directions, batch, hidden), and which steps each batch entry runs (``sequence_lens``):
    past its length a state stays as it was and the output is zero, as onnxruntime computes."""

    def __init__(self, call: Call, x, r, sequence_lens, initial_states):
        self.batch_first = bool(call.get("layout", 0))
        if self.batch_first:
            x = x.transpose(0, 1)
            initial_states = [None if s is None else s.transpose(0, 1) for s in initial_states]
        self.x = x
        self.initial_states = initial_states
        self.hidden = r.shape[-1]
        self.batch = x.shape[1]
        self.lengths = None if sequence_lens is None else sequence_lens.to(torch.int64)
        self.call = call

    def initial(self, index: int, direction: int) -> torch.Tensor:
        state = self.initial_states[index]
        return state[direction] if state is not None else self.x.new_zeros(self.batch, self.hidden)

    def steps(self, reverse: bool) -> range:
        length = self.x.shape[0]
        return range(length - 1, -1, -1) if reverse else range(length)

    def active(self, step: int) -> torch.Tensor | None:
        """Which batch entries run ``step`` (as a column), or None when all of them do."""
        if self.lengths is None or bool((self.lengths > step).all()):
            return None
        return (self.lengths > step).reshape(-1, 1)

    def outputs(self, ys: list[list[torch.Tensor]], states: list[list[torch.Tensor]]):
        y = torch.stack([torch.stack(outputs, 0) for outputs in ys], 1)
        finals = [torch.stack(state, 0) for state in states]
        if self.batch_first:
            y = y.permute(2, 0, 1, 3)
            finals = [final.transpose(0, 1) for final in finals]
        return (y, *finals)[: max(self.call.outputs, 1)]


def _advance(active, new: torch.Tensor, old: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The next state and this step's output: ``new`` where the step runs, else the old state
    and a zero output."""
    if active is None:
        return new, new
    return torch.where(active, new, old), torch.where(active, new, torch.zeros_like(new))


@op("LSTM", check=_recurrent_check)
def lstm(call: Call, x, w, r, b=None, sequence_lens=None, initial_h=None, initial_c=None, p=None):
    sequence = _Sequence(call, x, r, sequence_lens, [initial_h, initial_c])
    hidden, input_forget = sequence.hidden, bool(call.get("input_forget", 0))
    clip = _clip(call)
    ys, finals_h, finals_c = [], [], []
    for direction, reverse in enumerate(_directions(call)):
        gate, cell, output = _gate_functions(call)[direction]
        bias = b[direction, : 4 * hidden] + b[direction, 4 * hidden :] if b is not None else 0
        h, c = sequence.initial(0, direction), sequence.initial(1, direction)
        peephole = p[direction] if p is not None else None
        outputs = [None] * sequence.x.shape[0]
        for step in sequence.steps(reverse):
            gates = sequence.x[step] @ w[direction].T + h @ r[direction].T + bias
            i, o, f, g = gates.split(hidden, dim=-1)
            if peephole is not None:
                i = i + peephole[:hidden] * c
                f = f + peephole[2 * hidden :] * c
            i = gate(clip(i))
            f = 1 - i if input_forget else gate(clip(f))
            new_c = f * c + i * cell(clip(g))
            if peephole is not None:
                o = o + peephole[hidden : 2 * hidden] * new_c
            new_h = gate(clip(o)) * output(new_c)
            active = sequence.active(step)
            c, _ = _advance(active, new_c, c)
            h, outputs[step] = _advance(active, new_h, h)
        ys.append(outputs)
        finals_h.append(h)
        finals_c.append(c)
    return sequence.outputs(ys, [finals_h, finals_c])


@op("GRU", check=_recurrent_check)
def gru(call: Call, x, w, r, b=None, sequence_lens=None, initial_h=None):
    sequence = _Sequence(call, x, r, sequence_lens, [initial_h])
    hidden = sequence.hidden
    linear_before_reset = bool(call.get("linear_before_reset", 0))
    clip = _clip(call)
    ys, finals = [], []
    for direction, reverse in enumerate(_directions(call)):
        gate, candidate_function = _gate_functions(call)[direction]
        wb = b[direction, : 3 * hidden] if b is not None else x.new_zeros(3 * hidden)
        rb = b[direction, 3 * hidden :] if b is not None else x.new_zeros(3 * hidden)
        h = sequence.initial(0, direction)
        rz, rr, rh = r[direction].split(hidden, dim=0)
        rbz, rbr, rbh = rb.split(hidden)
        outputs = [None] * sequence.x.shape[0]
        for step in sequence.steps(reverse):
            xz, xr, xh = (sequence.x[step] @ w[direction].T + wb).split(hidden, dim=-1)
            z = gate(clip(xz + h @ rz.T + rbz))
            reset = gate(clip(xr + h @ rr.T + rbr))
            if linear_before_reset:
                candidate = candidate_function(clip(xh + reset * (h @ rh.T + rbh)))
            else:
                candidate = candidate_function(clip(xh + (reset * h) @ rh.T + rbh))
            h, outputs[step] = _advance(sequence.active(step), (1 - z) * candidate + z * h, h)
        ys.append(outputs)
        finals.append(h)
    return sequence.outputs(ys, [finals])


@op("RNN", check=_recurrent_check)
def rnn(call: Call, x, w, r, b=None, sequence_lens=None, initial_h=None):
    sequence = _Sequence(call, x, r, sequence_lens, [initial_h])
    hidden, clip = sequence.hidden, _clip(call)
    ys, finals = [], []
    for direction, reverse in enumerate(_directions(call)):
        (activation,) = _gate_functions(call)[direction]
        bias = b[direction, :hidden] + b[direction, hidden:] if b is not None else 0
        h = sequence.initial(0, direction)
        outputs = [None] * sequence.x.shape[0]
        for step in sequence.steps(reverse):
            new_h = activation(clip(sequence.x[step] @ w[direction].T + h @ r[direction].T + bias))
            h, outputs[step] = _advance(sequence.active(step), new_h, h)
        ys.append(outputs)
        finals.append(h)
    return sequence.outputs(ys, [finals])
