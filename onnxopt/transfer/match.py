"""Pair the layers of a target graph with the layers of a source graph.

Names are not enough: two exports of one network share few initializer names, and a shared
name can hold other values (one export folds BatchNorm into ``conv.weight``, the other does
not). Structure is compared on the graph of layers (``layers.Layer``; the nodes between them
are looked through, so an exporter's extra Reshape or a fused activation changes nothing):
each layer gets a Weisfeiler-Lehman hash, its label refined ``DEPTH`` times by the hashes of
the layers it reads and the layers that read it. Layers of one hash (first also of the same
shapes, then of any) in the two graphs are paired in graph order when both graphs have as
many of them; what is left is tried at shallower depths. ``auto`` pairs names first where a name is on one layer in each graph
with the same label and structure does not pair either layer elsewhere.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import re
from collections.abc import Mapping, Sequence
from typing import Literal

import onnx_ir as ir

from onnxopt.transfer.layers import Layer

MatchMode = Literal["auto", "name", "structure"]
DEPTH = 8
_INPUT, _OUTPUT = "graph input", "graph output"


@dataclasses.dataclass
class Pairing:
    """The layer pairs found (target, source, how: ``name``, ``structure`` or ``map``), and
    the target layers structure could not pair uniquely, each with its candidates."""

    pairs: list[tuple[Layer, Layer, str]]
    ambiguous: dict[str, list[str]]


def pair_layers(
    target: Sequence[Layer],
    source: Sequence[Layer],
    target_graph: ir.Graph,
    source_graph: ir.Graph,
    mode: MatchMode,
    explicit: Mapping[str, str] | None = None,
) -> Pairing:
    """Pair target layers with source layers; ``explicit``: target layer -> source layer
    (by ``Layer.name``), taken first."""
    pairs: list[tuple[Layer, Layer, str]] = []
    by_name_target = {layer.name: layer for layer in target}
    by_name_source = {layer.name: layer for layer in source}
    by_key_source = _by_name_key(source)
    used_target: set[int] = set()
    used_source: set[int] = set()

    def take(t: Layer, s: Layer, how: str) -> None:
        pairs.append((t, s, how))
        used_target.add(id(t))
        used_source.add(id(s))

    for target_name, source_name in (explicit or {}).items():
        take(by_name_target[target_name], by_name_source[source_name], "map")
    hashes_target = layer_hashes(target, target_graph)
    hashes_source = layer_hashes(source, source_graph)
    if mode in ("auto", "name"):
        unique = _unique_structural(target, source, hashes_target, hashes_source)
        partner_of_source = {id(other): key for key, other in unique.items()}
        for layer in target:
            other = by_key_source.get(name_key(layer.name))
            if id(layer) in used_target or other is None or id(other) in used_source:
                continue
            if other.label != layer.label:
                continue
            certain = unique.get(id(layer))
            claimed = partner_of_source.get(id(other))
            if mode == "auto" and (
                (certain is not None and certain is not other)
                or (claimed is not None and claimed != id(layer))
            ):
                continue
            take(layer, other, "name")
    ambiguous: dict[str, list[str]] = {}
    if mode in ("auto", "structure"):
        for depth in range(DEPTH, -1, -1):
            for with_shapes in (True, False):
                classes_target = _classes(target, hashes_target, depth, used_target, with_shapes)
                classes_source = _classes(source, hashes_source, depth, used_source, with_shapes)
                for key, members in classes_target.items():
                    candidates = classes_source.get(key, [])
                    if candidates and len(candidates) == len(members):
                        for t, s in zip(members, candidates, strict=True):
                            take(t, s, "structure")
                    elif candidates and depth == 0 and not with_shapes:
                        for t in members:
                            ambiguous[t.name] = [s.name for s in candidates]
    pairs.sort(key=lambda pair: pair[0].order)
    return Pairing(pairs, ambiguous)


# What optimizers add to the names of weights they rewrite: onnxruntime's
# "ConvBnFusion_W_conv1.weight" and "..._token_3", onnxopt's "..._float16".
_OPTIMIZER_PREFIX = re.compile(r"^[A-Za-z]+Fusion_(?:[A-Z]+_)+")
_OPTIMIZER_SUFFIX = re.compile(r"(?:_token_\d+|_float16)$")


def name_key(name: str) -> str:
    """A weight's name without what optimizers add to the names of weights they rewrite."""
    return _OPTIMIZER_SUFFIX.sub("", _OPTIMIZER_PREFIX.sub("", name))


def _by_name_key(layers: Sequence[Layer]) -> dict[str, Layer]:
    """Layers by the key of their name, where one layer alone has that key."""
    found: dict[str, list[Layer]] = collections.defaultdict(list)
    for layer in layers:
        found[name_key(layer.name)].append(layer)
    return {key: members[0] for key, members in found.items() if len(members) == 1}


def _unique_structural(
    target: Sequence[Layer],
    source: Sequence[Layer],
    hashes_target: Mapping[int, list[str]],
    hashes_source: Mapping[int, list[str]],
) -> dict[int, Layer]:
    """Target layers (by id) that structure alone pairs with certainty: their deepest hash is
    on one layer in each graph."""
    deepest_target = collections.defaultdict(list)
    deepest_source = collections.defaultdict(list)
    for layer in target:
        deepest_target[hashes_target[id(layer)][DEPTH]].append(layer)
    for layer in source:
        deepest_source[hashes_source[id(layer)][DEPTH]].append(layer)
    return {
        id(members[0]): deepest_source[key][0]
        for key, members in deepest_target.items()
        if len(members) == 1 and len(deepest_source.get(key, [])) == 1
    }


def _classes(
    layers: Sequence[Layer],
    hashes: Mapping[int, list[str]],
    depth: int,
    used: set[int],
    with_shapes: bool,
) -> dict[tuple, list[Layer]]:
    """The unpaired layers by their hash at ``depth`` (and their slots' shapes: a first,
    stricter pass that tells apart layers of one structure but different widths)."""
    classes: dict[tuple, list[Layer]] = collections.defaultdict(list)
    for layer in sorted(layers, key=lambda item: item.order):
        if id(layer) not in used:
            shapes = tuple(slot.shape for slot in layer.slots.values()) if with_shapes else ()
            classes[(hashes[id(layer)][depth], shapes)].append(layer)
    return classes


def layer_hashes(layers: Sequence[Layer], graph: ir.Graph) -> dict[int, list[str]]:
    """Each layer's Weisfeiler-Lehman hashes at depths 0 to ``DEPTH`` (by ``id(layer)``)."""
    readers, writers = _layer_edges(layers, graph)
    current = {key: _digest(repr(label)) for key, label in _labels(layers).items()}
    history = {id(layer): [current[id(layer)]] for layer in layers}
    for _ in range(DEPTH):
        refined = {}
        for key, value in current.items():
            before = sorted(f"{current.get(other, other)}{tag}" for other, tag in writers[key])
            after = sorted(f"{current.get(other, other)}{tag}" for other, tag in readers[key])
            refined[key] = _digest(f"{value}|{','.join(before)}|{','.join(after)}")
        current = refined
        for layer in layers:
            history[id(layer)].append(current[id(layer)])
    return history


def _labels(layers: Sequence[Layer]) -> dict[int, tuple]:
    return {id(layer): layer.label for layer in layers}


# Ops whose inputs play different parts, by the op they count as: which input of them a
# path enters tells apart layers alike in all else (attention's query, entering its scores'
# MatMul first, and key, second). Exporters and optimizers agree on these; not on the ops
# in between (Reshape or Flatten, an extra Transpose, a division by a constant folded into
# a MatMul's alpha), which paths pass through unrecorded.
POSITIONAL = {"MatMul": "MatMul", "FusedMatMul": "MatMul", "Concat": "Concat"}
# Ops whose outputs describe a tensor rather than carry it: paths stop there (one export
# computes a Reshape's target from Shape nodes, another holds it constant).
SHAPE_OPS = frozenset({"Shape", "Size"})


def _layer_edges(
    layers: Sequence[Layer], graph: ir.Graph
) -> tuple[dict[int, list[tuple]], dict[int, list[tuple]]]:
    """For each layer, the layers (or graph output markers) reading its output and those
    (or graph input markers) it reads, each with the tag of the path between them, looking
    through the nodes that hold no learned constants. A tag lists the inputs of POSITIONAL
    ops the path enters. Markers carry the input's or output's position: the heads of a
    detector, alike in every layer, differ in the output they write."""
    layer_of = {id(layer.node): layer for layer in layers}
    # For each value: the layers (or input markers) it comes from, each with its path tags.
    upstream: dict[int, dict[object, frozenset[str]]] = {}
    for index, value in enumerate(graph.inputs):
        upstream[id(value)] = {f"{_INPUT} {index}": frozenset([""])}
    writers: dict[int, list[tuple]] = collections.defaultdict(list)
    readers: dict[object, list[tuple]] = collections.defaultdict(list)
    for node in graph:
        layer = layer_of.get(id(node))
        step = POSITIONAL.get(node.op_type)
        arriving: dict[object, set[str]] = collections.defaultdict(set)
        for position, value in enumerate(node.inputs):
            if value is None:
                continue
            for origin, tags in upstream.get(id(value), {}).items():
                mark = f">{step}{position}" if step and layer is None else ""
                arriving[origin].update(tag + mark for tag in tags)
        if node.op_type in SHAPE_OPS:
            arriving.clear()  # a tensor's shape carries no layer's values
        if layer is not None:
            for origin in sorted(arriving, key=str):
                for tag in sorted(arriving[origin]):
                    writers[id(layer)].append((origin, tag))
                    if not isinstance(origin, str):
                        readers[origin].append((id(layer), tag))
            produced = {id(layer): frozenset([""])}
        else:
            produced = {origin: frozenset(tags) for origin, tags in arriving.items()}
        for output in node.outputs:
            upstream[id(output)] = produced
    for index, value in enumerate(graph.outputs):
        for origin, tags in upstream.get(id(value), {}).items():
            if not isinstance(origin, str):
                readers[origin].extend((f"{_OUTPUT} {index}", tag) for tag in sorted(tags))
    return readers, writers


def _digest(text: str) -> str:
    return hashlib.blake2b(text.encode(), digest_size=8).hexdigest()
