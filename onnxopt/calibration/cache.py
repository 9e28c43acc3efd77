"""A calibration cache: statistics saved as JSON, reused while the model and data are the same.

Collection is the slow part of calibration; ranges are cheap to recompute. So the cache holds the
statistics, not ranges, and one cache serves every range method. A fingerprint of the model,
the data and the settings that change statistics guards against reusing it for something else.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from collections.abc import Mapping
from typing import Any

import numpy as np
import onnx_ir as ir

from onnxopt.calibration.collectors import TensorStatistics
from onnxopt.data import DataSource
from onnxopt.errors import InputError
from onnxopt.io import atomic_write_text

logger = logging.getLogger(__name__)

CACHE_FORMAT = 1

# Below this many bytes of initializers the fingerprint hashes all of them; above, it hashes the
# first and last EDGE_BYTES of each, so that fingerprinting a large model stays fast.
FULL_HASH_BYTES = 64 * 2**20
EDGE_BYTES = 4096


@dataclasses.dataclass
class CachedStatistics:
    """What a cache file holds: statistics by tensor name, and how many samples made them."""

    statistics: dict[str, TensorStatistics]
    samples: int


def model_fingerprint(model: ir.Model, settings: Mapping[str, Any] | None = None) -> str:
    """A sha256 of what the statistics depend on: the graph, its weights, and ``settings``.

    The graph counts with every node (attributes and subgraphs included), the inputs, outputs and
    opsets; weights by name, type and shape, and by content: all of it for models under
    FULL_HASH_BYTES of initializers, the first and last EDGE_BYTES of each above that.
    ``settings`` (JSON-able) should name the data and whatever collection setting changes the
    statistics.
    """
    digest = hashlib.sha256()
    digest.update(f"onnxopt calibration cache {CACHE_FORMAT}\n".encode())
    digest.update(json.dumps(settings or {}, sort_keys=True, default=str).encode())
    digest.update(repr(sorted(model.opset_imports.items())).encode())
    graph = model.graph
    for value in graph.inputs:
        digest.update(f"input {value.name} {value.dtype} {value.shape}\n".encode())
    for value in graph.outputs:
        digest.update(f"output {value.name}\n".encode())
    for function in model.functions.values():
        _hash_nodes(digest, function)
    _hash_nodes(digest, graph)
    initializers = [value for value in graph.initializers.values() if value.const_value is not None]
    whole = sum(value.const_value.nbytes for value in initializers) <= FULL_HASH_BYTES
    for value in initializers:
        tensor = value.const_value
        digest.update(f"initializer {value.name} {tensor.dtype} {tensor.shape}\n".encode())
        raw = np.asarray(tensor.numpy()).reshape(-1).view(np.uint8)
        if whole or raw.size <= 2 * EDGE_BYTES:
            digest.update(raw.tobytes())
        else:
            digest.update(raw[:EDGE_BYTES].tobytes())
            digest.update(raw[-EDGE_BYTES:].tobytes())
    return digest.hexdigest()


def data_fingerprint(data: DataSource) -> str:
    """A sha256 that names the data: its description, count, and the bytes of its first sample.

    Cheaper than hashing every sample, and enough to tell datasets apart in practice.
    """
    digest = hashlib.sha256()
    digest.update(f"{data.description}\n{data.count}\n".encode())
    for feed in data.take(1):
        for name in sorted(feed):
            array = np.ascontiguousarray(feed[name])
            digest.update(f"{name} {array.dtype} {array.shape}\n".encode())
            digest.update(array.tobytes())
    return digest.hexdigest()


def save_cache(
    path: str | os.PathLike[str],
    statistics: Mapping[str, TensorStatistics],
    fingerprint: str,
    *,
    samples: int,
) -> None:
    """Write the statistics as JSON, atomically (``io.atomic_write_text``).

    Raises:
        InputError: the file cannot be written there.
    """
    path = os.fspath(path)
    content = {
        "format": CACHE_FORMAT,
        "fingerprint": fingerprint,
        "samples": samples,
        "tensors": {name: value.to_dict() for name, value in statistics.items()},
    }
    try:
        atomic_write_text(path, json.dumps(content, separators=(",", ":")))
    except InputError as error:
        raise InputError(
            f"calibration cache '{path}' cannot be written",
            details=error.details,
            fix="give a path in an existing folder you can write to",
        ) from error
    logger.info("wrote calibration cache '%s' (%d tensors)", path, len(statistics))


def load_cache(path: str | os.PathLike[str], fingerprint: str) -> CachedStatistics | None:
    """The cached statistics, or None when there is no cache or it was made for something else.

    Raises:
        InputError: the file exists but is not a calibration cache this version can read.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        return None
    try:
        with open(path, encoding="utf-8") as file:
            content = json.load(file)
        if content.get("format") != CACHE_FORMAT:
            raise ValueError(f"format {content.get('format')!r}, expected {CACHE_FORMAT}")
        if content["fingerprint"] != fingerprint:
            logger.warning(
                "calibration cache '%s' was made for another model, data or settings; "
                "recalibrating and overwriting it",
                path,
            )
            return None
        statistics = {
            str(name): TensorStatistics.from_dict(value)
            for name, value in content["tensors"].items()
        }
        samples = int(content["samples"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError, IndexError) as error:
        raise InputError(
            f"calibration cache '{path}' cannot be read",
            details=[f"{type(error).__name__}: {error}"],
            fix=f"delete '{path}'; the next run calibrates again and rewrites it",
        ) from error
    logger.info("read calibration cache '%s' (%d tensors)", path, len(statistics))
    return CachedStatistics(statistics, samples)


def _hash_nodes(digest: Any, graph: ir.Graph | ir.Function) -> None:
    """Hash every node as its serialized proto: op, domain, names, attributes and subgraphs."""
    for node in graph:
        digest.update(ir.serde.serialize_node(node).SerializeToString(deterministic=True))
