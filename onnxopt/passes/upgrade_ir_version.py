"""Bring models of IR version 3 and older up to IR version 4, where weights are not graph inputs."""

from __future__ import annotations

import logging

import onnx_ir as ir
from onnx_ir.passes.common import RemoveInitializersFromInputsPass

from onnxopt.passes.base import OnnxoptPass, PassResult

logger = logging.getLogger(__name__)

# IR version 4 is the first in which an initializer need not also be listed as a graph input.
FIRST_IR_VERSION_WITHOUT_INITIALIZER_INPUTS = 4


class UpgradeIrVersionPass(OnnxoptPass):
    """Take initializers out of the graph inputs of models older than IR version 4.

    Those models had to list every weight as an input, so every pass must treat the weights as
    values a caller may override, and nothing folds or quantizes them. onnxruntime already runs
    such models with the weights as constants, so the upgrade changes no result. Newer models,
    where an initializer listed as an input really is an overridable default, are left alone.
    """

    name = "upgrade-ir-version"

    def call(self, model: ir.Model) -> PassResult:
        if model.ir_version >= FIRST_IR_VERSION_WITHOUT_INITIALIZER_INPUTS:
            return PassResult(model, modified=False)
        listed = sum(1 for value in model.graph.inputs if value.name in model.graph.initializers)
        RemoveInitializersFromInputsPass()(model)
        model.ir_version = FIRST_IR_VERSION_WITHOUT_INITIALIZER_INPUTS
        logger.info("upgraded to IR version 4; %d initializers are no longer graph inputs", listed)
        return PassResult(
            model,
            modified=True,
            changes=listed + 1,
            details={"initializers no longer inputs": listed},
        )
