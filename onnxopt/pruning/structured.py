"""Structured pruning: whole channels removed, so the model gets smaller and faster on any
runtime (unlike zeros, which dense kernels multiply all the same).

``prune_structured`` finds the channel groups (``channels``: convolution channels and FFN
neurons; ``attention``: heads, counted at the calibration data's sequence length), scores every
channel by one of
``CHANNEL_IMPORTANCES``, removes the lowest-scored ones model-wide until a share of channels
or of multiply-accumulates is gone (never a whole group: each keeps ``min_keep`` of its
channels, rounded up to ``round_to``), cuts them (``shrink``) and, by default, refits the
layers that read the cut channels so their outputs on calibration samples stay as close as
possible to the original's (least squares, ``refit``).

Importances (compared across groups as ``_relative_scores`` says: convolution channels
relative to their group's mean, FFN neurons and heads as they are, per multiply-accumulate
for a FLOPs target):
- ``activation`` (default): per channel, the mean square of its activation where each next
  layer reads it, times the squared norm of that layer's weights on it: the output energy
  the channel carries into the next layers; for a head, the mean ||context_h . Wo_h||^2 over
  tokens (its block of the output projection's input, correlations included). Needs
  calibration data.
- ``magnitude``: the L2 norm of the channel's weights in the layers that write it.
- ``taylor``: sum of ``|w| * mean|dL/dw|`` over the channel's weights (producers and
  consumers), through the torch bridge (``importance.gradient_magnitudes``).
- ``gradient``: sum of ``mean|dL/dw|`` over the same weights.
- ``fisher``: the Fisher information of a mask on the channel where the next layers read it,
  ``mean_n (dL_n/dm)^2`` with ``dL/dm = sum w * dL/dw`` over the channel's weights in those
  layers (Kwon et al. 2022): the loss a removal costs to second order, in the loss's units
  for every group, so all groups are ranked together. Through the torch bridge.

The gradient importances use the loss ``importance.self_prediction_loss`` says.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
import time
from collections.abc import Callable, Sequence
from typing import Literal

import numpy as np
import onnx_ir as ir

from onnxopt.calibration.moments import InputLayout, input_layout, weight_rows
from onnxopt.data import DataSource
from onnxopt.errors import InputError
from onnxopt.graph import add_initializer, set_constant
from onnxopt.padding import padding_mask_input, token_rows
from onnxopt.progress import QUIET, Progress
from onnxopt.pruning.attention import find_attention_groups
from onnxopt.pruning.channels import find_channel_groups, layer_axes
from onnxopt.pruning.groups import ChannelGroup, ChannelSlice, Unprunable
from onnxopt.pruning.importance import gradient_loss, gradient_magnitudes, sample_gradients
from onnxopt.pruning.quantized import quantized_model_error
from onnxopt.pruning.shrink import apply_keeps, model_statistics, node_macs, removed_positions
from onnxopt.runtime import Feed, ProbeSession, SerializedModel
from onnxopt.shapes import infer_shapes

logger = logging.getLogger(__name__)

ChannelImportance = Literal["activation", "magnitude", "taylor", "gradient", "fisher"]
CHANNEL_IMPORTANCES: tuple[str, ...] = ("activation", "magnitude", "taylor", "gradient", "fisher")
NEEDS_DATA = frozenset({"activation", "taylor", "gradient", "fisher"})
GRADIENT_BASED = frozenset({"taylor", "gradient", "fisher"})

# Calibration samples the activation importance is measured on, at most (MiniLM at 30% fewer
# MACs, 512 samples for the refit: embedding cosine 0.9705 with 16, 0.9719 with 64).
ACTIVATION_SAMPLES = 64


# Why nothing can be pruned when the main graph has no layer with a constant weight.
NO_LAYERS = (
    "no Conv, ConvTranspose, Gemm or MatMul with a constant weight in the main graph "
    "(layers inside If, Loop and Scan bodies are not pruned)"
)


@dataclasses.dataclass(frozen=True)
class StructuredSettings:
    """What ``prune_structured`` does.

    Attributes:
        ratio: the share of the prunable channels removed (set this or ``flops``).
        flops: the share of the model's multiply-accumulates removed (set this or ``ratio``).
        importance: how channels are scored (``CHANNEL_IMPORTANCES``).
        recover: refit the layers that read cut channels by least squares on calibration
            samples (``refit``).
        exclude: regular expressions on node names; groups written by a matching layer stay.
        protect_first_last: the groups the first layer writes and the last layer reads stay
            whole (the stem sees the raw input, the head decides the outputs).
        round_to: each group keeps a multiple of this many channels (8 suits int8 kernels),
            or all of them where it has fewer; not for heads, which are whole units.
        min_keep: the share of each group's channels always kept.
        allocation: ``global`` (the lowest-scored channels model-wide go first, so groups
            lose different shares) or ``uniform`` (every group loses the same share, the
            lowest-scored channels of each: "half the channels of every layer").
    """

    ratio: float | None = None
    flops: float | None = None
    importance: ChannelImportance = "activation"
    recover: bool = True
    exclude: tuple[str, ...] = ()
    protect_first_last: bool = True
    round_to: int = 1
    min_keep: float = 0.1
    allocation: Literal["global", "uniform"] = "global"


@dataclasses.dataclass(frozen=True)
class GroupPruning:
    """One group cut: its channels before, the ones kept (original indices, sorted), and
    where they lie in the model's constants (what weight transfer slices source weights by)."""

    name: str
    kind: str
    channels: int
    keep: tuple[int, ...]
    slices: tuple[ChannelSlice, ...] = ()

    @property
    def kept(self) -> int:
        return len(self.keep)


@dataclasses.dataclass
class StructuredReport:
    """What ``prune_structured`` did: every group with its keep set, the layers left whole
    and why, parameters and multiply-accumulates per sample before and after, the layers
    recovery refitted, and the calibration samples it was given."""

    groups: list[GroupPruning] = dataclasses.field(default_factory=list)
    unprunable: list[Unprunable] = dataclasses.field(default_factory=list)
    importance: str = "activation"
    gradient_loss: str | None = None
    parameters_before: int = 0
    parameters_after: int = 0
    macs_before: int = 0
    macs_after: int = 0
    refitted: list[str] = dataclasses.field(default_factory=list)
    samples: int = 0
    seconds: float = 0.0

    @property
    def removed(self) -> int:
        """Channels removed in all."""
        return sum(group.channels - group.kept for group in self.groups)


def prune_structured(
    model: ir.Model,
    feeds: Sequence[Feed],
    settings: StructuredSettings,
    progress: Progress = QUIET,
    labels: Sequence[np.ndarray] | None = None,
) -> StructuredReport:
    """Remove channels from ``model`` in place as ``settings`` say; the report of what was
    done. ``labels``: the feeds' class indices, for the gradient importances' task loss.
    Raises InputError for a target out of range or out of reach, a model with nothing
    to prune, or an importance or recovery that needs data without ``feeds``."""
    start = time.perf_counter()
    _check_settings(settings, feeds)
    infer_shapes(model)
    sample = feeds[0] if feeds else None
    found, unprunable = _find_groups(model, sample)
    parameters, macs = model_statistics(model, sample)
    groups, left = _selectable(model, found, settings)
    unprunable.extend(left)
    if not groups:
        raise quantized_model_error(model, "prune found no channels to cut") or InputError(
            "the model has no channels to prune: "
            + ("; ".join(f"{item.node}: {item.reason}" for item in unprunable) or NO_LAYERS),
            fix="relax prune.exclude or prune.protect_first_last",
        )
    original = model.clone() if settings.recover else None
    scores = _scores(model, groups, feeds, settings.importance, progress, labels)
    keeps = _select(model, groups, scores, settings, macs, node_macs(model, sample))
    cut = [
        (group, keep)
        for group, keep in zip(groups, keeps, strict=True)
        if len(keep) < group.channels
    ]
    apply_keeps(model, cut)
    refitted: list[str] = []
    if original is not None and cut:
        consumers = list(dict.fromkeys(name for group, _ in cut for name in group.consumer_nodes))
        refitted = _refit_consumers(model, original, consumers, feeds, progress)
    parameters_after, macs_after = model_statistics(model, sample)
    report = StructuredReport(
        groups=[
            GroupPruning(
                group.name,
                group.kind,
                group.channels,
                tuple(int(i) for i in keep),
                tuple(dict.fromkeys((*group.producers, *group.consumers))),
            )
            for group, keep in zip(groups, keeps, strict=True)
        ],
        unprunable=unprunable,
        importance=settings.importance,
        gradient_loss=gradient_loss(labels) if settings.importance in GRADIENT_BASED else None,
        parameters_before=parameters,
        parameters_after=parameters_after,
        macs_before=macs,
        macs_after=macs_after,
        refitted=refitted,
        samples=len(feeds),
        seconds=time.perf_counter() - start,
    )
    logger.info(
        "removed %d channels: %d -> %d multiply-accumulates per sample",
        report.removed,
        macs,
        macs_after,
    )
    return report


def _find_groups(
    model: ir.Model, sample: Feed | None
) -> tuple[list[ChannelGroup], list[Unprunable]]:
    """Attention heads and convolution or dense channels (FFN neurons), no tensor claimed by
    both: a heads group that shares a tensor with a channel group stays whole. Heads are found
    first, on this model: the finder gives each block its own shape constants."""
    heads, unprunable = find_attention_groups(model, _sequence_length(model, sample))
    channels, left = find_channel_groups(model)
    unprunable.extend(left)
    claimed = {piece.tensor for group in channels for piece in (*group.producers, *group.consumers)}
    groups = list(channels)
    for group in heads:
        shared = sorted({piece.tensor for piece in (*group.producers, *group.consumers)} & claimed)
        if shared:
            unprunable.append(
                Unprunable(group.name, f"attention heads: {shared[0]!r} is in a channel group")
            )
        else:
            groups.append(group)
    return groups, unprunable


def _sequence_length(model: ir.Model, sample: Feed | None) -> int:
    """Tokens per sample in the calibration data, for the cost of attention heads: axis 1 of
    a [batch, sequence] token input (ids or mask), or of a [batch, sequence, features] input
    where there is none; 128 without data."""
    if sample is None:
        return 128
    lengths = {2: [], 3: []}
    for value in model.graph.inputs:
        array = sample.get(value.name)
        if array is not None and np.ndim(array) in lengths:
            lengths[np.ndim(array)].append(np.shape(array)[1])
    found = lengths[2] or lengths[3]
    return max(found) if found else 128


def _check_settings(settings: StructuredSettings, feeds: Sequence[Feed]) -> None:
    if (settings.ratio is None) == (settings.flops is None):
        raise InputError(
            "prune needs exactly one target: ratio (share of channels) or flops (share of "
            "multiply-accumulates)",
            fix="set one of them and the other to none, e.g. --set prune.ratio=0.5 --set prune.flops=none",
        )
    name, target = (
        ("ratio", settings.ratio)
        if settings.ratio is not None
        else (
            "flops",
            settings.flops,
        )
    )
    if not 0 <= target < 1:
        raise InputError(
            f"prune.{name} = {target} is outside [0, 1)",
            fix=f"give the share to remove, such as prune.{name} = 0.3",
        )
    if not 0 < settings.min_keep <= 1 or settings.round_to < 1:
        raise InputError(
            "prune.min_keep must be in (0, 1] and prune.round_to at least 1",
            fix="use the defaults: min_keep = 0.1, round_to = 1",
        )
    if settings.importance not in CHANNEL_IMPORTANCES:
        raise InputError(
            f"unknown channel importance '{settings.importance}'",
            fix="use one of " + ", ".join(CHANNEL_IMPORTANCES),
        )
    needs = [f"importance = '{settings.importance}'"] if settings.importance in NEEDS_DATA else []
    needs += ["recovery"] if settings.recover else []
    if needs and not feeds:
        raise InputError(
            "prune with " + " and ".join(needs) + " needs calibration data",
            fix="pass --calib DATA, or set prune.importance = 'magnitude' and "
            "prune.recover = false",
        )


def _selectable(
    model: ir.Model, groups: list[ChannelGroup], settings: StructuredSettings
) -> tuple[list[ChannelGroup], list[Unprunable]]:
    """The groups settings let be cut, and the others with the reason."""
    patterns = [re.compile(expression) for expression in settings.exclude]
    layers = [node.name for node in model.graph if node.op_type in LAYER_OPS]
    chosen, left = [], []
    for group in groups:
        if any(pattern.search(name) for pattern in patterns for name in group.producer_nodes):
            left.append(Unprunable(group.name, "excluded"))
        elif (
            settings.protect_first_last
            and layers
            and (layers[0] in group.producer_nodes or layers[-1] in group.consumer_nodes)
        ):
            left.append(Unprunable(group.name, "first or last layer (protect_first_last)"))
        else:
            chosen.append(group)
    return chosen, left


LAYER_OPS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"})


# -- importance ---------------------------------------------------------------------------


def _per_channel(array: np.ndarray, axis: int, offset: int, width: int, channels: int):
    """The slice of ``array`` a group covers, as (channels, everything else)."""
    part = np.take(array, np.arange(offset, offset + channels * width), axis=axis)
    part = np.moveaxis(part, axis, 0).reshape(channels, width, -1)
    return part.reshape(channels, -1)


def _scores(
    model: ir.Model,
    groups: list[ChannelGroup],
    feeds: Sequence[Feed],
    importance: str,
    progress: Progress,
    labels: Sequence[np.ndarray] | None = None,
) -> list[np.ndarray]:
    """Each group's channel scores (in the order of ``groups``), higher mattering more."""
    initializers = model.graph.initializers
    if importance == "activation":
        return _activation_scores(model, groups, feeds, progress)
    if importance == "magnitude":
        weights = {node.inputs[1].name for node in model.graph if node.op_type in LAYER_OPS}
        scores = []
        for group in groups:
            total = np.zeros(group.channels)
            for piece in group.producers:
                if piece.tensor in weights:
                    array = initializers[piece.tensor].const_value.numpy().astype(np.float64)
                    rows = _per_channel(
                        array, piece.axis, piece.offset, piece.width, group.channels
                    )
                    norms = np.sum(rows**2, axis=1)
                    total += norms / max(norms.mean(), 1e-30)
            scores.append(np.sqrt(total))
        return scores
    if importance == "fisher":
        return _fisher_scores(model, groups, feeds, progress, labels)
    names = {piece.tensor for group in groups for piece in (*group.producers, *group.consumers)}
    gradients = gradient_magnitudes(model, feeds, sorted(names), progress, labels)
    scores = []
    for group in groups:
        total = np.zeros(group.channels)
        for piece in dict.fromkeys((*group.producers, *group.consumers)):
            if piece.tensor not in gradients:
                continue
            gradient = gradients[piece.tensor].astype(np.float64)
            if importance == "taylor":
                gradient = gradient * np.abs(initializers[piece.tensor].const_value.numpy())
            args = (piece.axis, piece.offset, piece.width, group.channels)
            total += _per_channel(gradient, *args).sum(axis=1)
        scores.append(total)
    return scores


def _fisher_scores(
    model: ir.Model,
    groups: list[ChannelGroup],
    feeds: Sequence[Feed],
    progress: Progress,
    labels: Sequence[np.ndarray] | None = None,
) -> list[np.ndarray]:
    """Each channel's ``mean_n (dL_n/dm)^2`` for a mask ``m`` scaling it in every layer that
    reads it: ``dL/dm`` is the sum of ``w * dL/dw`` over those layers' weights on it."""
    initializers = model.graph.initializers
    readers = [list(dict.fromkeys(group.consumers)) for group in groups]
    names = sorted({piece.tensor for pieces in readers for piece in pieces})
    weights = {name: initializers[name].const_value.numpy().astype(np.float64) for name in names}
    totals = [np.zeros(group.channels) for group in groups]
    information = sample_gradients(model, feeds, names, progress, "Fisher information", labels)
    for gradients in information:
        for group, pieces, total in zip(groups, readers, totals, strict=True):
            mask_gradient = np.zeros(group.channels)
            for piece in pieces:
                if piece.tensor in gradients:
                    product = gradients[piece.tensor] * weights[piece.tensor]
                    args = (piece.axis, piece.offset, piece.width, group.channels)
                    mask_gradient += _per_channel(product, *args).sum(axis=1)
            total += mask_gradient**2
    return [total / len(feeds) for total in totals]


def _activation_scores(
    model: ir.Model, groups: list[ChannelGroup], feeds: Sequence[Feed], progress: Progress
) -> list[np.ndarray]:
    nodes = {node.name: node for node in model.graph}
    initializers = model.graph.initializers
    # Each consumer's input, with the axis its channels lie on.
    axes = {}
    for group in groups:
        for name in group.consumer_nodes:
            node = nodes[name]
            axes[node.inputs[0].name] = 1 if node.op_type.startswith("Conv") else -1
    # A head's input to the output projection is a block of positions, read together.
    blocks = {
        nodes[name].inputs[0].name: group.consumers[0].width
        for group in groups
        if group.kind == "heads"
        for name in group.consumer_nodes
    }
    energy: dict[str, np.ndarray] = {}
    samples = list(feeds[:ACTIVATION_SAMPLES])
    mask = padding_mask_input(model)
    with SerializedModel(model) as source:
        probe = ProbeSession(source, sorted(axes), threads=1, prune=True)
        with progress.task("channel activations", total=len(samples)) as advance:
            for feed in samples:
                for name, array in probe.run(feed).items():
                    if axes.get(name) == -1:
                        array = token_rows(array, feed, mask)
                    if name in blocks:
                        energy[name] = energy.get(name, 0) + _block_moments(array, blocks[name])
                    elif name in axes:
                        energy[name] = energy.get(name, 0) + _mean_square(array, axes[name])
                advance(1)
    scores = []
    for group in groups:
        total = np.zeros(group.channels)
        by_tensor = {piece.tensor: piece for piece in group.consumers}
        for name in group.consumer_nodes:
            node = nodes[name]
            piece = by_tensor.get(node.inputs[1].name)
            power = energy.get(node.inputs[0].name)
            if piece is None or power is None:
                continue
            weight = initializers[piece.tensor].const_value.numpy().astype(np.float64)
            if group.kind == "heads":
                total += _head_output_energy(power, weight, piece, group.channels)
                continue
            positions = group.channels * piece.width
            norms = _per_channel(weight**2, piece.axis, piece.offset, 1, positions).sum(axis=1)
            reads = power[piece.offset : piece.offset + positions] * norms
            total += reads.reshape(group.channels, piece.width).sum(axis=1)
        scores.append(total)
    return scores


def _block_moments(array: np.ndarray, width: int) -> np.ndarray:
    """Second moments within each block of ``width`` positions on the last axis, averaged over
    the other axes (tokens): (blocks, width, width)."""
    flat = np.asarray(array, dtype=np.float64).reshape(-1, array.shape[-1])
    blocks = flat.reshape(len(flat), -1, width)
    return np.einsum("nhi,nhj->hij", blocks, blocks) / len(flat)


def _head_output_energy(moments: np.ndarray, weight: np.ndarray, piece, heads: int) -> np.ndarray:
    """Each head's mean ||context_h . Wo_h||^2 over tokens, from the second moments of its
    context and its rows of the output projection: what the head adds to the block's output
    (its activation importance)."""
    rows = np.moveaxis(weight, piece.axis, 0).reshape(weight.shape[piece.axis], -1)
    first = piece.offset // piece.width
    energy = np.zeros(heads)
    for head in range(heads):
        start = piece.offset + head * piece.width
        part = rows[start : start + piece.width]
        energy[head] = np.sum((moments[first + head] @ part) * part)
    return energy


def _mean_square(array: np.ndarray, axis: int) -> np.ndarray:
    """Mean square of each position along ``axis`` (a layer input's channels)."""
    moved = np.moveaxis(np.asarray(array, dtype=np.float64), axis, -1)
    return np.mean(moved.reshape(-1, moved.shape[-1]) ** 2, axis=0)


# -- selection ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Layer:
    """A layer's multiply-accumulates and the groups that shrink its input or output."""

    macs: int
    inputs: int
    outputs: int
    sides: tuple[tuple[int, int, bool], ...]  # (group index, positions a channel, is input)


def _layers(
    model: ir.Model, groups: list[ChannelGroup], macs_by_node: dict[str, int]
) -> list[_Layer]:
    weights = {node.inputs[1].name: node for node in model.graph if node.op_type in LAYER_OPS}
    sides: dict[str, list[tuple[int, int, bool]]] = {}
    for index, group in enumerate(groups):
        for pieces, is_input in ((group.producers, False), (group.consumers, True)):
            for piece in dict.fromkeys(pieces):
                if piece.tensor in weights:
                    sides.setdefault(piece.tensor, []).append((index, piece.width, is_input))
    layers = []
    for name, entries in sides.items():
        node = weights[name]
        macs = macs_by_node.get(node.name)
        shape = node.inputs[1].const_value.shape
        in_axis, out_axis, _ = layer_axes(node, len(shape))
        if macs:
            layers.append(_Layer(macs, shape[in_axis], shape[out_axis], tuple(entries)))
    return layers


def _select(
    model: ir.Model,
    groups: list[ChannelGroup],
    scores: list[np.ndarray],
    settings: StructuredSettings,
    macs: int,
    macs_by_node: dict[str, int],
) -> list[np.ndarray]:
    """The channels each group keeps (sorted, in the order of ``groups``): the lowest scores
    relative to their group's mean go first, model-wide, until the target is met. Weighing
    scores by each channel's multiply-accumulates cut early, wide layers first and kept less
    (EfficientNet-Lite0 at 30% fewer MACs, refitted: 58% top-1 agreement against 77%)."""
    orders = [np.argsort(score, kind="stable") for score in scores]
    layers = _layers(model, groups, macs_by_node)
    unweighted = _unweighted_macs(groups, layers)
    cost = _covered_macs(groups, layers) + unweighted
    relative = _relative_scores(groups, scores, cost, settings)
    candidates = []
    for index, (group, order) in enumerate(zip(groups, orders, strict=True)):
        for rank in range(group.channels - _least_kept(group, settings)):
            candidates.append((float(relative[index][order[rank]]), index, rank))
    candidates.sort()
    total_channels = sum(group.channels for group in groups)

    def removed_after(count: int) -> np.ndarray:
        removed = np.zeros(len(groups), dtype=np.int64)
        for _, index, _ in candidates[:count]:
            removed[index] += 1
        for index, group in enumerate(groups):
            kept = _round_up(
                group.channels - removed[index], _round_to(group, settings), group.channels
            )
            removed[index] = group.channels - kept
        return removed

    def achieved(removed: np.ndarray) -> float:
        if settings.ratio is not None:
            return removed.sum() / total_channels
        saved = 0.0
        for layer in layers:
            shares = {True: 1.0, False: 1.0}
            for index, width, is_input in layer.sides:
                size = layer.inputs if is_input else layer.outputs
                shares[is_input] -= removed[index] * width / size
            saved += layer.macs * (1 - shares[True] * shares[False])
        saved += float(removed @ unweighted)
        return saved / macs if macs else 0.0

    target = settings.ratio if settings.ratio is not None else settings.flops
    best = achieved(removed_after(len(candidates)))
    if best + 1e-9 < target:
        what = "channels" if settings.ratio is not None else "multiply-accumulates"
        raise InputError(
            f"prune cannot remove {target:.0%} of the {what}: at most {best:.1%} with "
            f"{len(groups)} prunable groups, each keeping {settings.min_keep:.0%}",
            fix="lower the target, lower prune.min_keep, or relax prune.exclude and "
            "prune.protect_first_last",
        )
    if settings.allocation == "uniform":
        removed = _uniform_removal(groups, settings, target, achieved)
        return [np.sort(order[count:]) for order, count in zip(orders, removed, strict=True)]
    low, high = 0, len(candidates)
    while low < high:
        middle = (low + high) // 2
        if achieved(removed_after(middle)) + 1e-9 >= target:
            high = middle
        else:
            low = middle + 1
    removed = removed_after(low)
    return [np.sort(order[count:]) for order, count in zip(orders, removed, strict=True)]


def _uniform_removal(
    groups: list[ChannelGroup],
    settings: StructuredSettings,
    target: float,
    achieved: Callable[[np.ndarray], float],
) -> np.ndarray:
    """How many channels each group loses when all lose the same share: the smallest share
    (by bisection) whose cut meets ``target``."""

    def removed_at(share: float) -> np.ndarray:
        removed = []
        for group in groups:
            kept = math.ceil((1 - share) * group.channels - 1e-9)
            kept = _round_up(kept, _round_to(group, settings), group.channels)
            removed.append(group.channels - max(kept, _least_kept(group, settings)))
        return np.array(removed, dtype=np.int64)

    low, high = 0.0, 1.0
    for _ in range(40):
        middle = (low + high) / 2
        if achieved(removed_at(middle)) + 1e-9 >= target:
            high = middle
        else:
            low = middle
    return removed_at(high)


def _relative_scores(
    groups: list[ChannelGroup],
    scores: list[np.ndarray],
    cost: np.ndarray,
    settings: StructuredSettings,
) -> list[np.ndarray]:
    """Scores made comparable across groups. Convolution channels: divided by their group's
    mean (layers differ in scale), except Fisher scores, in the loss's units everywhere. FFN
    neurons and heads all write into one residual stream,
    so their scores (output energies for ``activation``) compare as they are: they are
    divided by their pooled mean only, and for a FLOPs target by each channel's
    multiply-accumulates, the value per cost of a greedy knapsack (MiniLM at 30% fewer MACs:
    per-group means cut FFN layer 0 to a tenth, cosine 0.886; pooled 0.91 or 0.90 per MAC,
    the latter also cutting heads)."""
    pooled = [
        index
        for index, group in enumerate(groups)
        if group.kind in ("neurons", "heads") or settings.importance == "fisher"
    ]
    scale = max(float(np.mean(np.concatenate([scores[i] for i in pooled]))), 1e-30) if pooled else 1
    unit = max(float(np.mean(cost[pooled])), 1e-30) if pooled else 1.0
    relative = []
    for index, score in enumerate(scores):
        score = np.asarray(score, dtype=np.float64)
        if index not in pooled:
            relative.append(score / max(float(np.mean(score)), 1e-30))
        elif settings.flops is not None:
            relative.append(score / scale / max(cost[index] / unit, 1e-30))
        else:
            relative.append(score / scale)
    return relative


def _covered_macs(groups: list[ChannelGroup], layers: list[_Layer]) -> np.ndarray:
    """Multiply-accumulates a channel of each group costs in the layers with weights."""
    covered = np.zeros(len(groups))
    for layer in layers:
        for index, width, is_input in layer.sides:
            covered[index] += layer.macs * width / (layer.inputs if is_input else layer.outputs)
    return covered


def _unweighted_macs(groups: list[ChannelGroup], layers: list[_Layer]) -> np.ndarray:
    """Multiply-accumulates a channel costs outside the layers with weights: the attention
    products of a head (scores and context), from the group's ``flops_per_channel``."""
    covered = _covered_macs(groups, layers)
    return np.array(
        [
            max(0.0, group.flops_per_channel - covered[index]) if group.kind == "heads" else 0.0
            for index, group in enumerate(groups)
        ]
    )


def _round_to(group: ChannelGroup, settings: StructuredSettings) -> int:
    """Heads are whole units already: ``round_to`` counts channels and neurons only."""
    return 1 if group.kind == "heads" else settings.round_to


def _least_kept(group: ChannelGroup, settings: StructuredSettings) -> int:
    least = max(1, math.ceil(settings.min_keep * group.channels))
    return _round_up(least, _round_to(group, settings), group.channels)


def _round_up(count: int, multiple: int, limit: int) -> int:
    return min(limit, -(-count // multiple) * multiple)


# -- recovery -----------------------------------------------------------------------------

# Rows (output positions) the refit of a layer sees per column of its input, over all samples.
REFIT_ROWS_PER_COLUMN = 32

# A layer's refit reads samples until it has REFIT_ROWS_PER_COLUMN rows per input column, and
# at least this many (all there are where fewer). A convolution sees hundreds of positions a
# sample, a transformer's layer only the sample's tokens: MiniLM's calibration sentences hold
# about 16, so its FFN output projection (1536 columns) reads every sample it is given (at 30%
# fewer MACs, embedding cosine with FP32 0.953 on 64 samples, 0.972 on 512).
MIN_REFIT_SAMPLES = 64

# Samples a pass gives pruning by default ("auto"): at most this many, in at most this many
# bytes of arrays (large images stop sooner, but not before MIN_REFIT_SAMPLES).
AUTO_SAMPLES = 512
AUTO_SAMPLE_BYTES = 256 << 20


def default_samples(data: DataSource) -> list[Feed]:
    """The samples pruning takes when not told how many (``samples = "auto"``)."""
    return data.take(AUTO_SAMPLES, AUTO_SAMPLE_BYTES, least=MIN_REFIT_SAMPLES)


# Ridge dampings tried, relative to the mean of the inputs' second moments (SparseGPT uses 1%).
# Each layer keeps the one whose fit reproduces the original's output best on held-out samples,
# then is fitted on all samples with it: the best damping depends on how many rows a layer sees
# (MiniLM at 30% fewer MACs, embedding cosine with FP32: 64 samples 0.931 at 0.01, 0.951 at
# 0.2; 512 samples 0.970 at 0.01, 0.971 at 0.05, 0.970 at 0.2). Not everywhere a gain:
# EfficientNet-Lite0 with 64 samples kept 0.790 top-1 agreement (200 images) against 0.815 at
# 0.01 throughout; the PP-OCR direction classifier's cosine rose from 0.972 to 0.989.
DAMPINGS = (0.01, 0.03, 0.1, 0.3, 1.0)

# Every HOLD_EVERY-th sample is held out to choose the damping (with at least that many samples).
HOLD_EVERY = 4


def _refit_consumers(
    model: ir.Model,
    original: ir.Model,
    names: list[str],
    feeds: Sequence[Feed],
    progress: Progress,
) -> list[str]:
    """Refit each named layer, in graph order, so its output on the samples (its input
    measured in the pruned model, earlier refits included) stays closest to the original
    layer's output on the original model's input:
    ``V = argmin ||X' V^T - X W^T||^2 + damping ||V - W_kept||^2``, a bias column in both
    (one is added where the layer had none). The damping pulls towards the original weights
    of the kept channels, so a layer with few rows (a classifier reads one a sample) stays
    near them; each layer takes the one of DAMPINGS that does best on held-out samples.
    A layer reads only the samples it needs (MIN_REFIT_SAMPLES). Layers that share one weight
    (the two branches of a siamese network) are fitted once, on the rows of all of them.
    Returns the layers refitted."""
    wanted = set(names)
    sharing: dict[int, list[ir.Node]] = {}
    for node in model.graph:
        if node.name in wanted:
            sharing.setdefault(id(node.inputs[1]), []).append(node)
    originals = {node.name: node for node in original.graph if node.name in wanted}
    refitted = []
    mask = padding_mask_input(model)
    with (
        SerializedModel(original) as source,
        progress.task("refitting layers", total=len(wanted)) as advance,
    ):
        for nodes in sharing.values():
            if _refit(model, source, nodes, [originals[node.name] for node in nodes], feeds, mask):
                refitted.extend(node.name for node in nodes)
            advance(len(nodes))
    return refitted


def _refit(
    model: ir.Model,
    source: SerializedModel,
    nodes: list[ir.Node],
    originals: list[ir.Node],
    feeds: Sequence[Feed],
    mask: str | None,
) -> bool:
    """Refit the weight (and bias) that ``nodes`` share, on the rows of each of them."""
    node, original = nodes[0], originals[0]
    layouts = [
        (input_layout(one), input_layout(other))
        for one, other in zip(nodes, originals, strict=True)
    ]
    if any(
        layout is None or original_layout is None or layout.groups != 1
        for layout, original_layout in layouts
    ):
        return False
    layout, original_layout = layouts[0]
    if any(other.inputs[2:3] != node.inputs[2:3] for other in nodes):
        return False
    weight = node.inputs[1]
    rows, restore = weight_rows(weight.const_value.numpy(), layout, 1)
    full, _ = weight_rows(original.inputs[1].const_value.numpy(), original_layout, 1)
    in_axis, out_axis, _ = layer_axes(node, len(weight.const_value.shape))
    if in_axis is None:
        return False
    full = np.delete(full[0], removed_positions(weight, out_axis), axis=0).astype(np.float64)
    has_bias = node.op_type != "MatMul"
    bias = node.inputs[2] if len(node.inputs) > 2 and node.inputs[2] is not None else None
    if bias is not None and (bias.const_value is None or bias.const_value.size != rows.shape[1]):
        return False
    channels = original.inputs[1].const_value.shape[in_axis]
    kept_in = np.setdiff1d(np.arange(channels), removed_positions(weight, in_axis))
    near = full.reshape(len(full), -1, channels)[:, :, kept_in].reshape(len(full), -1)
    if has_bias:
        # The bias is already cut to the kept outputs; the refit starts from it.
        old = bias.const_value.numpy() if bias is not None else np.zeros(len(full))
        full = np.concatenate([full, old.reshape(-1, 1)], axis=1)
        near = np.concatenate([near, old.reshape(-1, 1)], axis=1)
    columns = rows.shape[2]
    # Sums of X^T X and X^T Y (X: the pruned layer's input rows, Y: the original's), for the
    # samples fitted on and those held out.
    sums = {held: _RefitSums(columns + has_bias, full.shape[1]) for held in (False, True)}
    for layout, original_layout in layouts:
        if not _add_rows(sums, model, source, layout, original_layout, feeds, mask, has_bias):
            return False
    fit, held = sums[False], sums[True]
    try:
        relative = DAMPINGS[0]
        if held.count:
            errors = [held.error(fit.solve(full, near, damping), full) for damping in DAMPINGS]
            relative = DAMPINGS[int(np.argmin(errors))]
        fit.add_sums(held)
        solved = fit.solve(full, near, relative)
        logger.debug("refit %s: damping %g", node.name, relative)
    except np.linalg.LinAlgError:
        return False
    dtype = weight.const_value.dtype.numpy()
    set_constant(weight, restore(solved[None, :, :columns].astype(dtype)))
    if has_bias:
        new_bias = solved[:, columns].astype(dtype)
        if bias is not None:
            set_constant(bias, new_bias)
        else:
            for one in nodes:
                _add_bias(model, one, new_bias)
    return True


def _add_rows(
    sums: dict[bool, _RefitSums],
    model: ir.Model,
    source: SerializedModel,
    layout: InputLayout,
    original_layout: InputLayout,
    feeds: Sequence[Feed],
    mask: str | None,
    has_bias: bool,
) -> bool:
    """Add one layer's input rows, pruned and original, to ``sums``, reading samples until it
    has REFIT_ROWS_PER_COLUMN rows a column (and MIN_REFIT_SAMPLES samples); False where a
    probe cannot read the layer's input."""
    columns = sums[False].gram.shape[0] - has_bias
    least = min(MIN_REFIT_SAMPLES, len(feeds))
    positions = max(1, -(-REFIT_ROWS_PER_COLUMN * columns // least))
    # A token's row, not a padded position's (``padding``); convolutions see no padding mask.
    mask = None if layout.kernel else mask
    pruned_probe = ProbeSession(model, [layout.input], threads=1, prune=True)
    original_probe = ProbeSession(source, [original_layout.input], threads=1, prune=True)
    seen = 0
    for index, feed in enumerate(feeds):
        pruned_in = pruned_probe.run(feed).get(layout.input)
        original_in = original_probe.run(feed).get(original_layout.input)
        if pruned_in is None or original_in is None:
            return False
        pruned_in = token_rows(pruned_in, feed, mask)
        original_in = token_rows(original_in, feed, mask)
        x = _columns(layout, pruned_in, positions, index, has_bias)
        y = _columns(original_layout, original_in, positions, index, has_bias)
        sums[len(feeds) >= HOLD_EVERY and index % HOLD_EVERY == HOLD_EVERY - 1].add(x, y)
        seen += len(x)
        if index + 1 >= least and seen >= REFIT_ROWS_PER_COLUMN * columns:
            break
    return True


class _RefitSums:
    """``X^T X`` and ``X^T Y`` over some samples' rows, and the ridge fits they give."""

    def __init__(self, columns: int, original_columns: int):
        self.gram = np.zeros((columns, columns))
        self.cross = np.zeros((columns, original_columns))
        self.count = 0

    def add(self, x: np.ndarray, y: np.ndarray) -> None:
        self.gram += x.T @ x
        self.cross += x.T @ y
        self.count += len(x)

    def add_sums(self, other: _RefitSums) -> None:
        self.gram += other.gram
        self.cross += other.cross
        self.count += other.count

    def solve(self, full: np.ndarray, near: np.ndarray, relative: float) -> np.ndarray:
        """``V = argmin ||X V^T - Y W^T||^2 + damping ||V - near||^2``, W = ``full``; the
        damping is ``relative`` to the mean second moment, more where rows are few."""
        columns = len(self.gram)
        mean = float(np.mean(np.diag(self.gram)))
        damping = relative * mean * max(1.0, columns / max(self.count, 1))
        gram = self.gram + damping * np.eye(columns)
        return np.linalg.solve(gram, self.cross @ full.T + damping * near.T).T

    def error(self, weights: np.ndarray, full: np.ndarray) -> float:
        """``||X V^T - Y W^T||^2`` on these rows, less its part that does not depend on V."""
        return float(
            np.sum((weights @ self.gram) * weights) - 2 * np.sum(weights.T * (self.cross @ full.T))
        )


def _columns(layout, array: np.ndarray, positions: int, seed: int, bias: bool) -> np.ndarray:
    """A sample's input as rows of columns (the same positions for the same seed), with a
    column of ones for the bias."""
    rng = np.random.default_rng(seed)
    parts = [part[:, 0, :] for part in layout.columns(np.asarray(array), positions, rng)]
    flat = np.concatenate(parts).astype(np.float64)
    return np.concatenate([flat, np.ones((len(flat), 1))], axis=1) if bias else flat


def _add_bias(model: ir.Model, node: ir.Node, bias: np.ndarray) -> None:
    name = f"{node.inputs[1].name}_bias"
    while name in model.graph.initializers:
        name += "_"
    value = add_initializer(model.graph, name, bias)
    node.resize_inputs(3)
    node.replace_input_with(2, value)
