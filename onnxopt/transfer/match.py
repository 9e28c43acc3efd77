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
from collections.abc import Mapping, Sequence
from typing import Literal

import onnx_ir as ir

from onnxopt.transfer.layers import Layer

MatchMode = Literal["auto", "name", "structure"]
DEPTH = 4
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
            other = by_name_source.get(layer.name)
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
            before = sorted(current.get(other, other) for other in writers.get(key, ()))
            after = sorted(current.get(other, other) for other in readers.get(key, ()))
            refined[key] = _digest(f"{value}|{','.join(before)}|{','.join(after)}")
        current = refined
        for layer in layers:
            history[id(layer)].append(current[id(layer)])
    return history


def _labels(layers: Sequence[Layer]) -> dict[int, tuple]:
    return {id(layer): layer.label for layer in layers}


def _layer_edges(
    layers: Sequence[Layer], graph: ir.Graph
) -> tuple[dict[int, list], dict[int, list]]:
    """For each layer, the layers (or graph input/output markers) reading its output and
    those it reads, looking through the nodes that hold no learned constants."""
    layer_of = {id(layer.node): layer for layer in layers}
    upstream: dict[int, frozenset] = {}
    for value in graph.inputs:
        upstream[id(value)] = frozenset([_INPUT])
    writers: dict[int, list] = collections.defaultdict(list)
    readers: dict[int, list] = collections.defaultdict(list)
    for node in graph:
        sources: set = set()
        for value in node.inputs:
            if value is not None:
                sources |= upstream.get(id(value), frozenset())
        layer = layer_of.get(id(node))
        if layer is not None:
            for origin in sorted(sources, key=str):
                writers[id(layer)].append(origin)
                if origin != _INPUT:
                    readers[origin].append(id(layer))
            produced = frozenset([id(layer)])
        else:
            produced = frozenset(sources)
        for output in node.outputs:
            upstream[id(output)] = produced
    for value in graph.outputs:
        for origin in upstream.get(id(value), frozenset()):
            if origin != _INPUT:
                readers[origin].append(_OUTPUT)
    return readers, writers


def _digest(text: str) -> str:
    return hashlib.blake2b(text.encode(), digest_size=8).hexdigest()
