"""Fold a zero Pad into the padding of the Conv it feeds."""

from __future__ import annotations

import logging

import onnx_ir as ir
from onnxscript.rewriter.rules.common import _fuse_pad_into_conv

from onnxopt.passes.base import OnnxoptPass

logger = logging.getLogger(__name__)


class FusePadIntoConvPass(OnnxoptPass):
    """Fold a constant, zero, spatial-only Pad into the following Conv's ``pads`` attribute.

    TensorFlow-style "same" padding exports as a separate Pad before each Conv. Folded, the Conv
    pads by itself: one node less in float, and in int8 no float island (dequantize, Pad,
    quantize) between two integer kernels. Uses onnxscript's rules, which also turn ``auto_pad``
    into explicit pads and refuse non-zero or non-spatial padding.
    """

    name = "fuse-pad"

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        pads_before = sum(1 for node in model.graph.all_nodes() if node.op_type == "Pad")
        _fuse_pad_into_conv.rules.apply_to_model(model)
        ir.passes.common.RemoveUnusedNodesPass()(model)
        self.changes = pads_before - sum(
            1 for node in model.graph.all_nodes() if node.op_type == "Pad"
        )
        logger.info("folded %d Pad nodes into Conv", self.changes)
        return ir.passes.PassResult(model, modified=bool(self.changes))
