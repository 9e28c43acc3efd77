"""Fold a zero Pad into the padding of the Conv it feeds."""

from __future__ import annotations

import onnx_ir as ir

from onnxopt.cleanup.pad import fuse_pads
from onnxopt.passes.base import OnnxoptPass, PassResult


class FusePadIntoConvPass(OnnxoptPass):
    """Fold a constant, zero, spatial-only Pad into the following Conv's ``pads`` attribute.

    TensorFlow-style "same" padding exports as a separate Pad before each Conv. Folded, the Conv
    pads by itself: one node less in float, and in int8 no float island (dequantize, Pad,
    quantize) between two integer kernels. Safe because a zero Pad on the spatial axes is what
    the Conv's own padding computes; onnxscript's rules refuse any other Pad, and turn
    ``auto_pad`` into explicit pads first so that the amounts add up.
    """

    name = "fuse-pad"

    def call(self, model: ir.Model) -> PassResult:
        result = fuse_pads(model)
        return PassResult(
            model, modified=bool(result.fused or result.made_explicit), changes=result.fused
        )
