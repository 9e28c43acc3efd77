"""Weights onnx_ir reads from mapped external data files, and the pages reading them leaves.

onnx_ir maps external data files, and every page read stays resident while the map lives:
once a pass has read a model's weights, the process holds the model's size in mapped pages
on top of what it works with (a 1 GB model's int8 run peaked at 2.6x its size, 1x of it
these pages). Dropping them costs nothing: they come back from the file, or the page cache,
when read again.
"""

from __future__ import annotations

import mmap
from collections.abc import Iterable

import numpy as np
import onnx_ir as ir


def mapped_weights(model: ir.Model) -> list[ir.ExternalTensor]:
    """The model's weights that onnx_ir reads from mapped external data files."""
    return [
        tensor
        for graph in model.graphs()
        for value in graph.initializers.values()
        if isinstance(tensor := value.const_value, ir.ExternalTensor)
    ]


def unmap_read_weights(weights: Iterable[ir.ExternalTensor]) -> None:
    """Drop the pages of external data files that reading ``weights`` brought into this
    process's memory. A no-op where the system has no ``madvise``."""
    if not hasattr(mmap, "MADV_DONTNEED"):
        return
    for tensor in weights:
        if isinstance(tensor.raw, mmap.mmap):
            tensor.raw.madvise(mmap.MADV_DONTNEED)


def float32_weight(value: ir.Value) -> np.ndarray:
    """A constant's values as a float32 array of its own, the pages read from a mapped file
    for it dropped: a pass that reads every weight holds one at a time, not the model."""
    tensor = value.const_value
    array = tensor.numpy().astype(np.float32)
    if isinstance(tensor, ir.ExternalTensor):
        unmap_read_weights([tensor])
    return array
