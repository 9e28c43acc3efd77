"""Source values made to fit a target slot of another shape.

Three ways, in the order ``fitted`` tries them: the channels a pruned target kept (the
positions the pruning report lists, so the slice is exact), an input convolution's channel
count (summed into one channel, or tiled and scaled, as timm's ``adapt_input_conv`` does, so
the first layer's response to a grey or a four-channel image stays that of the colour
image), and otherwise slice or pad along each axis: a classifier head with another class
count keeps the shared classes, and what the source lacks keeps the target's own values.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from onnxopt.errors import InputError

# (tensor name, stored axis) -> original positions removed by pruning.
RemovedPositions = Mapping[tuple[str, int], np.ndarray]


def removed_by_pruning(pruning: Mapping[str, Any]) -> dict[tuple[str, int], np.ndarray]:
    """The positions each pruned tensor lost, per axis, from a pruning report's groups
    (the JSON ``pruning`` section: each group's ``channels``, ``keep`` and ``tensors``)."""
    removed: dict[tuple[str, int], set[int]] = {}
    for group in pruning.get("groups", []):
        dropped = np.setdiff1d(np.arange(int(group["channels"])), np.asarray(group["keep"]))
        for piece in group.get("tensors", []):
            width = int(piece.get("width", 1))
            positions = int(piece.get("offset", 0)) + dropped[:, None] * width + np.arange(width)
            key = (piece["tensor"], int(piece["axis"]))
            removed.setdefault(key, set()).update(int(p) for p in positions.ravel())
    return {key: np.array(sorted(values), dtype=np.int64) for key, values in removed.items()}


def kept_slice(
    value: np.ndarray,
    name: str,
    axes: Sequence[int],
    removed: RemovedPositions,
) -> tuple[np.ndarray, list[str]] | None:
    """``value`` (canonical) with the positions pruning removed from tensor ``name`` taken
    out; ``axes`` maps each stored axis to its canonical one. None when pruning cut nothing
    from ``name``."""
    notes = []
    result = value
    for stored_axis, canonical_axis in enumerate(axes):
        positions = removed.get((name, stored_axis))
        if positions is None:
            positions = removed.get((name, stored_axis - len(axes)))
        if positions is None or positions.size == 0:
            continue
        length = result.shape[canonical_axis]
        if positions[-1] >= length:
            raise InputError(
                f"{name}: the pruning report removes position {positions[-1]} of axis "
                f"{stored_axis}, but the source has {length}",
                fix="give the report of the prune run that made this target from a model "
                "of the source's shapes",
            )
        result = np.delete(result, positions, axis=canonical_axis)
        notes.append(f"kept {length - positions.size} of {length} on axis {canonical_axis}")
    return (result, notes) if notes else None


def fitted(
    value: np.ndarray, current: np.ndarray, input_channels_axis: int | None
) -> tuple[np.ndarray, str] | None:
    """``value`` made the shape of ``current`` (the target's values), or None when the
    ranks differ."""
    if value.ndim != current.ndim:
        return None
    notes = []
    axis = input_channels_axis
    if axis is not None and value.shape[axis] != current.shape[axis]:
        value = adapted_input_channels(value, current.shape[axis], axis)
        notes.append(f"input channels {'summed' if current.shape[axis] == 1 else 'tiled'}")
    result = current.astype(np.float32, copy=True)
    shared = tuple(slice(0, min(a, b)) for a, b in zip(value.shape, current.shape, strict=True))
    result[shared] = value[shared]
    for index, (a, b) in enumerate(zip(value.shape, current.shape, strict=True)):
        if a > b:
            notes.append(f"sliced {a} -> {b} on axis {index}")
        elif a < b:
            notes.append(f"{a} of {b} on axis {index}, the rest kept")
    return result, ", ".join(notes)


def adapted_input_channels(value: np.ndarray, channels: int, axis: int) -> np.ndarray:
    """A convolution's weights for ``channels`` input channels: summed into one, or the
    source's channels repeated and scaled by source/target so the output keeps its size."""
    if channels == 1:
        return value.sum(axis=axis, keepdims=True)
    source = value.shape[axis]
    repeats = math.ceil(channels / source)
    tiled = np.concatenate([value] * repeats, axis=axis)
    taken = np.take(tiled, np.arange(channels), axis=axis)
    return (taken * (source / channels)).astype(np.float32)
