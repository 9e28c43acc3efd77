"""The validation pass that ends every preset."""

from __future__ import annotations

import logging
from typing import Annotated

import onnx_ir as ir

from onnxopt.errors import ValidationFailed
from onnxopt.options import Range
from onnxopt.passes.base import OnnxoptPass, PassResult
from onnxopt.validation import Thresholds, validate

logger = logging.getLogger(__name__)


class ValidatePass(OnnxoptPass):
    """Check the model and compare it with the original before anyone writes it.

    Compares on samples held back from the user's data (then calibration samples, up to
    ``samples``), or on random inputs the original model runs on when there is no data (when it runs on none, the comparison is skipped and the
    report says why). Every pass that measures fidelity in the run measures on these samples.
    Fails the run (nothing is written) when a check fails.
    """

    name = "validate"

    def __init__(
        self,
        samples: Annotated[int, Range(low=1)] = 8,
        atol: Annotated[float | None, Range(low=0.0)] = None,
        rtol: Annotated[float, Range(low=0.0)] = 0.0,
        min_cosine: Annotated[float | None, Range(-1.0, 1.0)] = None,
        min_sqnr_db: float | None = None,
        min_top1_agreement: Annotated[float | None, Range(0.0, 1.0)] = None,
        seed: int = 0,
    ):
        super().__init__()
        self.samples = samples
        self.thresholds = Thresholds(atol, rtol, min_cosine, min_sqnr_db, min_top1_agreement)
        self.seed = seed

    def call(self, model: ir.Model) -> PassResult:
        comparison = (
            self.context.reference_comparison(self.samples, self.seed)
            if self.context.reference is not None
            else None
        )
        result = validate(model, comparison, self.thresholds, self.context.runtime_name)
        self.context.validation = result
        for check in result.checks:
            if check.skipped:
                logger.warning("%s not run: %s", check.name, check.detail)
        if not result.passed:
            raise ValidationFailed(
                "the optimized model failed validation",
                details=[f"{check.name}: {check.detail}" for check in result.failures],
                fix="loosen the recipe's thresholds (--set validate.<option>=...) if the loss is acceptable, "
                "or --force to write it anyway",
            )
        return PassResult(model, modified=False, changes=0, details={"samples": result.samples})
