"""Fold a zero Pad into the padding of the Conv or ConvInteger it feeds."""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import RewriteRuleSet
from onnxscript.rewriter.rules.common import (
    fuse_pad_into_conv_integer_rule,
    fuse_pad_into_conv_rule,
    normalize_pad_format_conv_integer_rule,
    normalize_pad_format_conv_rule,
)

from onnxopt.cleanup.holding import held_back

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class PadFusionResult:
    """What ``fuse_pads`` did.

    Attributes:
        fused: Pads folded into the Conv or ConvInteger they feed.
        made_explicit: convolutions whose ``auto_pad`` became an explicit ``pads`` list.
    """

    fused: int = 0
    made_explicit: int = 0


def fuse_pads(model: ir.Model) -> PadFusionResult:
    """Fold constant, zero, spatial-only Pads into the ``pads`` of the convolution they feed.

    Uses onnxscript's rules, in the main graph, subgraphs and functions. The first turns
    ``auto_pad`` into explicit pads (where the shapes are static), so that the second can add a
    Pad's amounts to them; the second refuses non-constant, non-zero, negative or non-spatial
    padding and modes other than "constant". A ConvInteger pads with its input zero point, not
    with zero, so one whose zero point is not a constant zero is held back from the rules.
    Pads left unused are removed.

    Args:
        model: changed in place.
    """
    made_explicit = RewriteRuleSet(
        [normalize_pad_format_conv_rule, normalize_pad_format_conv_integer_rule]
    ).apply_to_model(model)
    fuse = RewriteRuleSet([fuse_pad_into_conv_rule, fuse_pad_into_conv_integer_rule])
    with held_back(model, _conv_integers_padding_with_nonzero(model)):
        fused = fuse.apply_to_model(model)
    logger.info("folded %d Pad nodes into convolutions", fused)
    return PadFusionResult(fused=fused, made_explicit=made_explicit)


def _conv_integers_padding_with_nonzero(model: ir.Model) -> list[ir.Node]:
    """ConvInteger nodes whose input zero point is given and not a constant zero."""
    nodes = list(model.graph.all_nodes())
    for function in model.functions.values():
        nodes.extend(function.all_nodes())
    return [
        node
        for node in nodes
        if node.op_type == "ConvInteger"
        and node.domain == ""
        and len(node.inputs) > 2
        and node.inputs[2] is not None
        and not _is_constant_zero(node.inputs[2])
    ]


def _is_constant_zero(value: ir.Value) -> bool:
    tensor = value.const_value
    return tensor is not None and not np.any(tensor.numpy())
