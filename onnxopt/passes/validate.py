"""The validation pass that ends every preset."""

from __future__ import annotations

import logging

import onnx_ir as ir

from onnxopt import runtime
from onnxopt.errors import ValidationFailed
from onnxopt.passes.base import OnnxoptPass
from onnxopt.validation import Thresholds, validate

logger = logging.getLogger(__name__)


class ValidatePass(OnnxoptPass):
    """Check the model and compare it with the original before anyone writes it.

    Compares on samples held back from the user's data, or on random inputs of the right shapes
    and dtypes when there is no data. Fails the run (nothing is written) when a check fails.
    """

    name = "validate"

    def __init__(
        self,
        samples: int = 8,
        atol: float | None = None,
        rtol: float = 0.0,
        min_cosine: float | None = None,
        min_sqnr_db: float | None = None,
        min_top1_agreement: float | None = None,
        seed: int = 0,
    ):
        super().__init__()
        self.samples = samples
        self.thresholds = Thresholds(atol, rtol, min_cosine, min_sqnr_db, min_top1_agreement)
        self.seed = seed

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        feeds, description = self._feeds(model)
        result = validate(model, self.context.reference, feeds, self.thresholds, description)
        self.context.validation = result.as_dict()
        self.details = {"samples": len(feeds)}
        if not result.passed:
            self.details["failed"] = [check.name for check in result.failures]
        if not result.passed:
            raise ValidationFailed(
                "the optimized model failed validation",
                details=[f"{check.name}: {check.detail}" for check in result.failures],
                fix="loosen the recipe's thresholds (--set validate.<option>=...) if the loss is acceptable, "
                "or --force to write it anyway",
            )
        return ir.passes.PassResult(model, modified=False)

    def _feeds(self, model: ir.Model) -> tuple[list, str]:
        source = self.context.validation_data
        if source is not None:
            feeds = source.take(self.samples)
            if feeds:
                return feeds, f"{len(feeds)} held-back samples of {source.description}"
        feeds = runtime.random_feeds(model, self.samples, self.seed)
        return feeds, f"{len(feeds)} random samples (no data given)"
