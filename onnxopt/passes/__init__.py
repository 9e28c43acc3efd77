"""The passes a recipe can name, by the name it uses."""

from __future__ import annotations

from onnxopt.passes.base import OnnxoptPass
from onnxopt.passes.eliminate_identity import EliminateIdentityPass
from onnxopt.passes.fold_batchnorm import FoldBatchNormPass
from onnxopt.passes.fold_constants import FoldConstantsPass
from onnxopt.passes.infer_shapes import InferShapesPass
from onnxopt.passes.lift_constants import LiftConstantsPass
from onnxopt.passes.quantize import QuantizePass
from onnxopt.passes.remove_dead_code import RemoveDeadCodePass
from onnxopt.passes.upgrade_ir_version import UpgradeIrVersionPass
from onnxopt.passes.upgrade_opset import UpgradeOpsetPass
from onnxopt.passes.validate import ValidatePass

PASSES: dict[str, type[OnnxoptPass]] = {
    "eliminate-identity": EliminateIdentityPass,
    "fold-batchnorm": FoldBatchNormPass,
    "fold-constants": FoldConstantsPass,
    "infer-shapes": InferShapesPass,
    "lift-constants": LiftConstantsPass,
    "quantize": QuantizePass,
    "remove-dead-code": RemoveDeadCodePass,
    "upgrade-ir-version": UpgradeIrVersionPass,
    "upgrade-opset": UpgradeOpsetPass,
    "validate": ValidatePass,
}
