"""Sequence ops: a sequence of tensors is a Python list of torch tensors."""

from __future__ import annotations

import torch

from onnxopt.bridge.registry import Call, op
from onnxopt.bridge.types import to_torch_dtype


def _position(position, length: int) -> int:
    """A position counted from the back when negative."""
    index = int(position)
    return index + length if index < 0 else index


@op("SequenceEmpty")
def sequence_empty(call: Call):
    return []


@op("SequenceConstruct")
def sequence_construct(call: Call, *tensors):
    return list(tensors)


@op("SequenceLength")
def sequence_length(call: Call, sequence):
    return torch.tensor(len(sequence), dtype=torch.int64)


@op("SequenceAt")
def sequence_at(call: Call, sequence, position):
    return sequence[_position(position, len(sequence))]


@op("SequenceInsert")
def sequence_insert(call: Call, sequence, tensor, position=None):
    result = list(sequence)
    index = len(result) if position is None else _position(position, len(result))
    result.insert(index, tensor)
    return result


@op("SequenceErase")
def sequence_erase(call: Call, sequence, position=None):
    result = list(sequence)
    del result[-1 if position is None else _position(position, len(result))]
    return result


@op("SplitToSequence")
def split_to_sequence(call: Call, x, split=None):
    axis = call.get("axis", 0) % x.dim()
    if split is None:
        parts = list(torch.split(x, 1, axis))
        if not call.get("keepdims", 1):
            parts = [part.squeeze(axis) for part in parts]
        return parts
    sizes = split.reshape(-1).tolist()
    if split.dim() == 0:
        sizes = int(split)
    return list(torch.split(x, sizes, axis))


@op("ConcatFromSequence")
def concat_from_sequence(call: Call, sequence):
    axis = call.get("axis")
    if call.get("new_axis", 0):
        return torch.stack(list(sequence), axis if axis >= 0 else axis + sequence[0].dim() + 1)
    return torch.cat(list(sequence), axis)


@op("CastSequence")
def cast_sequence(call: Call, sequence):
    return [tensor.to(to_torch_dtype(call.get("to"))) for tensor in sequence]
