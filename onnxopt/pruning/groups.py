"""Channel dependency groups: the constants that must lose the same channels together.

Removing output channel c of a Conv also removes row c of its bias, of the BatchNorm or
scale that follows, of every depthwise filter on the way, of every other producer added to
it in a residual sum, and input channel c of every layer that reads it. A ``ChannelGroup``
lists all of those places for one set of channels; ``shrink.apply_keep`` cuts them all with
one keep set, so the graph stays consistent. The finders (``channels.find_channel_groups``
for convolutional and dense chains, ``attention.find_attention_groups`` for heads and
FFN neurons) say where a graph can be cut and, in ``Unprunable``, where not and why.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

GroupKind = Literal["channels", "neurons", "heads"]


@dataclasses.dataclass(frozen=True)
class ChannelSlice:
    """Where a group's channels lie in one constant tensor (an initializer): along ``axis``,
    channel c covers positions ``offset + c * width`` up to ``offset + (c + 1) * width``
    (``width`` is the head size for attention heads, the spatial size for a Flatten before
    a Gemm, 1 otherwise; ``offset`` places the group in a Concat or Split)."""

    tensor: str
    axis: int
    offset: int = 0
    width: int = 1


@dataclasses.dataclass(frozen=True)
class ShapeEdit:
    """A constant shape or size list (a Reshape target, Split sizes) whose entry ``index``
    counts the group's channels ``per_channel`` at a time; it becomes kept * per_channel
    plus what the entry counted besides the group (``extra``)."""

    tensor: str
    index: int
    per_channel: int = 1
    extra: int = 0


@dataclasses.dataclass(frozen=True)
class AttributeEdit:
    """An integer attribute of a node that counts the group's channels (a depthwise Conv's
    ``group``, an attention op's ``num_heads``): it becomes kept * per_channel + extra."""

    node: str
    attribute: str
    per_channel: int = 1
    extra: int = 0


@dataclasses.dataclass(frozen=True)
class ChannelGroup:
    """Channels that are removed together.

    Attributes:
        name: the group's name in reports (the first producer's node name).
        kind: ``channels`` (convolution and dense outputs), ``neurons`` (FFN hidden units)
            or ``heads`` (attention heads).
        channels: how many channels the group has.
        producers: slices over the channels a layer writes (weight output rows, biases,
            BatchNorm and scale parameters, depthwise filters); importance is measured here.
        consumers: slices over the input channels of the layers that read the group.
        consumer_nodes: the nodes whose weights are in ``consumers``: the layers whose
            output recovery refits after the cut.
        shape_edits: shape constants that count the group's channels.
        attribute_edits: attributes that count the group's channels.
        flops_per_channel: multiply-accumulates per sample that one channel costs in the
            producers and consumers (for FLOPs targets).
        parameters_per_channel: constant elements one channel holds.
        producer_nodes: the nodes whose weights are in ``producers`` (for exclusion by name,
            and to tell the first layer's group).
    """

    name: str
    kind: GroupKind
    channels: int
    producers: tuple[ChannelSlice, ...]
    consumers: tuple[ChannelSlice, ...]
    consumer_nodes: tuple[str, ...]
    shape_edits: tuple[ShapeEdit, ...] = ()
    attribute_edits: tuple[AttributeEdit, ...] = ()
    flops_per_channel: float = 0.0
    parameters_per_channel: int = 0
    producer_nodes: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class Unprunable:
    """A layer the finders left whole, and why (shown in the report)."""

    node: str
    reason: str
