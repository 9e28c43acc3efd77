"""The validation pass that ends every preset."""

from __future__ import annotations

from typing import Annotated

import onnx_ir as ir

from onnxopt import runtime
from onnxopt.errors import ValidationFailed
from onnxopt.options import Range
from onnxopt.passes.base import OnnxoptPass, PassResult
from onnxopt.runtime import Feed
from onnxopt.validation import Thresholds, validate


class ValidatePass(OnnxoptPass):
    """Check the model and compare it with the original before anyone writes it.

    Compares on samples held back from the user's data, or on random inputs of the right shapes
    and dtypes when there is no data. Fails the run (nothing is written) when a check fails.
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
        feeds, description = self._feeds(model)
        result = validate(model, self.context.reference, feeds, self.thresholds, description)
        self.context.validation = result
        if not result.passed:
            raise ValidationFailed(
                "the optimized model failed validation",
                details=[f"{check.name}: {check.detail}" for check in result.failures],
                fix="loosen the recipe's thresholds (--set validate.<option>=...) if the loss is acceptable, "
                "or --force to write it anyway",
            )
        return PassResult(model, modified=False, changes=0, details={"samples": len(feeds)})

    def _feeds(self, model: ir.Model) -> tuple[list[Feed], str]:
        source = self.context.validation_data
        if source is not None:
            feeds = source.take(self.samples)
            if feeds:
                return feeds, f"{len(feeds)} held-back samples of {source.description}"
        feeds = runtime.random_feeds(model, self.samples, self.seed)
        return feeds, f"{len(feeds)} random samples (no data given)"
