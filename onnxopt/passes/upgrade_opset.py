"""Raise the model's opset where quantization needs newer operator versions."""

from __future__ import annotations

import logging

import onnx
import onnx_ir as ir
from onnx import version_converter

from onnxopt.errors import ProcessingError
from onnxopt.passes.base import OnnxoptPass

logger = logging.getLogger(__name__)


class UpgradeOpsetPass(OnnxoptPass):
    """Convert the model to at least ``target_opset`` with onnx's version converter.

    Per-channel DequantizeLinear needs opset 13; a quantizer that writes it into an opset 10-12
    model produces a file that does not load. Models at or above ``target_opset`` are left alone.
    The conversion goes through one protobuf message, so it is limited to models under 2 GB.
    """

    name = "upgrade-opset"

    def __init__(self, target_opset: int = 13):
        super().__init__()
        self.target_opset = target_opset

    def opset_after(self, opset: int) -> int:
        return max(opset, self.target_opset)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        current = model.opset_imports.get("", model.opset_imports.get("ai.onnx", 1))
        if current >= self.target_opset:
            return ir.passes.PassResult(model, modified=False)
        try:
            converted = version_converter.convert_version(
                ir.serde.serialize_model(model), self.target_opset
            )
        except (onnx.checker.ValidationError, RuntimeError, IndexError, ValueError) as error:
            raise ProcessingError(
                f"could not convert the model from opset {current} to {self.target_opset}: {error}",
                fix="export the model again with a newer opset (13 or later)",
            ) from error
        upgraded = ir.serde.deserialize_model(converted)
        model.graph = upgraded.graph
        model.ir_version = max(model.ir_version, upgraded.ir_version)
        model.functions.clear()
        model.functions.update(upgraded.functions)
        self.changes = 1
        self.details = {"opset": f"{current} -> {self.target_opset}"}
        logger.info("converted the model from opset %d to %d", current, self.target_opset)
        return ir.passes.PassResult(model, modified=True)
