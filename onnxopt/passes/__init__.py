"""The passes a recipe can name, by the name it uses."""

from __future__ import annotations

from onnxopt.passes.base import OnnxoptPass
from onnxopt.passes.calibrate import CalibratePass
from onnxopt.passes.check_speed import CheckSpeedPass
from onnxopt.passes.correct_bias import CorrectBiasPass
from onnxopt.passes.eliminate_identity import EliminateIdentityPass
from onnxopt.passes.equalize import EqualizePass
from onnxopt.passes.fallback import FallbackPass
from onnxopt.passes.fold_batchnorm import FoldBatchNormPass
from onnxopt.passes.fold_constants import FoldConstantsPass
from onnxopt.passes.fold_conv_affine import FoldConvAffinePass
from onnxopt.passes.fuse_pad import FusePadIntoConvPass
from onnxopt.passes.infer_shapes import InferShapesPass
from onnxopt.passes.lift_constants import LiftConstantsPass
from onnxopt.passes.prune import PrunePass
from onnxopt.passes.quantize import QuantizePass
from onnxopt.passes.remove_dead_code import RemoveDeadCodePass
from onnxopt.passes.smooth import SmoothPass
from onnxopt.passes.sparsify import SparsifyPass
from onnxopt.passes.transfer import TransferPass
from onnxopt.passes.upgrade_ir_version import UpgradeIrVersionPass
from onnxopt.passes.upgrade_opset import UpgradeOpsetPass
from onnxopt.passes.validate import ValidatePass

PASSES: dict[str, type[OnnxoptPass]] = {
    "calibrate": CalibratePass,
    "check-speed": CheckSpeedPass,
    "correct-bias": CorrectBiasPass,
    "eliminate-identity": EliminateIdentityPass,
    "equalize": EqualizePass,
    "fallback": FallbackPass,
    "fold-batchnorm": FoldBatchNormPass,
    "fold-constants": FoldConstantsPass,
    "fold-conv-affine": FoldConvAffinePass,
    "fuse-pad": FusePadIntoConvPass,
    "infer-shapes": InferShapesPass,
    "lift-constants": LiftConstantsPass,
    "prune": PrunePass,
    "quantize": QuantizePass,
    "remove-dead-code": RemoveDeadCodePass,
    "smooth": SmoothPass,
    "sparsify": SparsifyPass,
    "transfer": TransferPass,
    "upgrade-ir-version": UpgradeIrVersionPass,
    "upgrade-opset": UpgradeOpsetPass,
    "validate": ValidatePass,
}
