"""Fold BatchNormalization into the Conv, ConvTranspose or Gemm that feeds it."""

from __future__ import annotations

import logging

import onnx_ir as ir
from onnxscript.rewriter import MatchContext, MatchResult, RewriteRuleSet
from onnxscript.rewriter.rules.common import _fuse_batchnorm

from onnxopt.passes.base import OnnxoptPass

logger = logging.getLogger(__name__)

PRODUCERS = ("Conv", "ConvTranspose", "Gemm")


class FoldBatchNormPass(OnnxoptPass):
    """Fold BatchNormalization into the Conv, ConvTranspose or Gemm that feeds it.

    Uses onnxscript's rules, which scale the producer's weights and bias. They refuse unless the
    weights and BatchNorm parameters are initializers (not graph inputs), the producer's output
    goes only to the BatchNorm, and its weights feed nothing else, so the fold changes nothing
    else. On top of that this pass refuses BatchNorms in training mode, with parameters that are
    not one per channel (opset < 9 with spatial=0), or of another type than the weights (which
    opset 15 allows, and the rules would turn into a type error). Parameters left unused go.
    """

    name = "fold-batchnorm"

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        parameters = _foldable_parameters(model)
        self.changes = _RULES.apply_to_model(model)
        _remove_unused(parameters)
        logger.info("folded %d BatchNormalization nodes", self.changes)
        return ir.passes.PassResult(model, modified=bool(self.changes))


class _StricterChecks:
    """Refusals added in front of the check of an onnxscript BatchNorm rule."""

    def check(
        self, context: MatchContext, x: ir.Value, inbound_out: ir.Value, batchnorm_out: ir.Value
    ) -> MatchResult:
        producer, batchnorm = inbound_out.producer(), batchnorm_out.producer()
        reason = _refusal(producer, batchnorm)
        if reason is not None:
            return MatchResult().fail(f"{batchnorm.name}: {reason}")
        return super().check(context, x, inbound_out, batchnorm_out)


class _FoldIntoConv(_StricterChecks, _fuse_batchnorm.FuseBatchNormIntoConv):
    pass


class _FoldIntoConvTranspose(_StricterChecks, _fuse_batchnorm.FuseBatchNormIntoConvTranspose):
    pass


class _FoldIntoGemm(_StricterChecks, _fuse_batchnorm.FuseBatchNormIntoGemm):
    pass


_RULES = RewriteRuleSet([_FoldIntoConv.rule(), _FoldIntoConvTranspose.rule(), _FoldIntoGemm.rule()])


def _refusal(producer: ir.Node, batchnorm: ir.Node) -> str | None:
    """Why the BatchNorm cannot be folded into its producer, or None when nothing stands in the way."""
    if any(value is None for value in producer.inputs):
        return f"{producer.op_type} has an empty optional input"
    training_mode = batchnorm.attributes.get("training_mode")
    if len(batchnorm.outputs) != 1 or (training_mode is not None and training_mode.value != 0):
        return "it runs in training mode"
    tensors = [value.const_value for value in (*producer.inputs[1:], *batchnorm.inputs[1:])]
    if any(tensor is None for tensor in tensors):
        return "weights or parameters are not constant"
    if any(len(value.const_value.shape) != 1 for value in batchnorm.inputs[1:]):
        return "its parameters are not one per channel"
    if len({tensor.dtype for tensor in tensors}) != 1:
        return "its parameters differ in type from the weights"
    return None


def _foldable_parameters(model: ir.Model) -> list[ir.Value]:
    """Initializers that BatchNorms and their candidate producers read, which a fold may leave unused."""
    return [
        value
        for node in model.graph.all_nodes()
        if node.op_type in ("BatchNormalization", *PRODUCERS) and node.domain == ""
        for value in node.inputs[1:]
        if value is not None and value.is_initializer()
    ]


def _remove_unused(values: list[ir.Value]) -> None:
    for value in values:
        graph = value.graph
        if graph is None or graph.initializers.get(value.name) is not value:
            continue
        if not (value.uses() or value.is_graph_input() or value.is_graph_output()):
            del graph.initializers[value.name]
