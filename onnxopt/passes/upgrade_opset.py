"""Raise the model's opset where quantization needs newer operator versions."""

from __future__ import annotations

import logging
from typing import Annotated

import onnx
import onnx_ir as ir
from onnx import version_converter

from onnxopt.errors import ProcessingError
from onnxopt.graph import default_opset
from onnxopt.options import Range
from onnxopt.passes.base import OnnxoptPass, PassResult

logger = logging.getLogger(__name__)


class UpgradeOpsetPass(OnnxoptPass):
    """Convert the model to at least ``target_opset`` with onnx's version converter.

    Per-channel DequantizeLinear needs opset 13; a quantizer that writes it into an opset 10-12
    model produces a file that does not load. Models at or above ``target_opset`` are left alone.
    Safe because the converter rewrites each node into its equivalent in the newer opset.
    The conversion goes through one protobuf message, so it is limited to models under 2 GB.
    """

    name = "upgrade-opset"

    def __init__(self, target_opset: Annotated[int, Range(low=1)] = 13):
        super().__init__()
        self.target_opset = target_opset

    def opset_after(self, opset: int) -> int:
        return max(opset, self.target_opset)

    def call(self, model: ir.Model) -> PassResult:
        current = default_opset(model)
        if current >= self.target_opset:
            return PassResult(model, modified=False)
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
        logger.info("converted the model from opset %d to %d", current, self.target_opset)
        return PassResult(
            model, modified=True, changes=1, details={"opset": f"{current} -> {self.target_opset}"}
        )
