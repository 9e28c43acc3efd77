"""The pipeline: runs passes in order over one model, checks what each needs, times and reports them."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

import onnx_ir as ir

from onnxopt.context import Context, ReportRow
from onnxopt.errors import OnnxoptError, ProcessingError
from onnxopt.graph import default_opset
from onnxopt.mapped import mapped_weights, unmap_read_weights
from onnxopt.passes.base import OnnxoptPass
from onnxopt.recipe import Recipe, build_passes

logger = logging.getLogger(__name__)


class Pipeline:
    """Passes run in order over one ``ir.Model`` with a shared ``Context``."""

    def __init__(self, passes: Sequence[OnnxoptPass]):
        self.passes = list(passes)
        for pass_ in self.passes:
            pass_.configure(self.passes)

    @classmethod
    def from_recipe(cls, recipe: Recipe) -> Pipeline:
        return cls(build_passes(recipe))

    @property
    def pass_names(self) -> list[str]:
        return [pass_.name for pass_ in self.passes]

    def check_requirements(self, model: ir.Model, context: Context) -> None:
        """Fail before any work when a pass cannot run on this model or with this context."""
        calibrated = context.calibration is not None
        opset = default_opset(model)
        for pass_ in self.passes:
            check_requirements(pass_, opset, context, calibrated)
            calibrated = calibrated or pass_.provides_calibration
            opset = pass_.opset_after(opset)

    def run(self, model: ir.Model, context: Context | None = None) -> Context:
        """Run every pass in place; a failure names the pass that failed and stops the run."""
        context = context or Context()
        self.check_requirements(model, context)
        for pass_ in self.passes:
            pass_.bind(context)
            if pass_.quantizes and context.int8_declined:
                logger.info("skipping %s: %s", pass_.name, context.int8_declined)
                context.report.append(ReportRow(pass_.name, 0.0, 0, {"skipped": "int8 declined"}))
                continue
            logger.info("running %s", pass_.name)
            start = time.perf_counter()
            mapped = mapped_weights(model)
            try:
                result = pass_(model)
            except OnnxoptError as error:
                context.report.append(
                    ReportRow(pass_.name, time.perf_counter() - start, 0, {"error": error.message})
                )
                raise
            except Exception as error:
                context.report.append(
                    ReportRow(pass_.name, time.perf_counter() - start, 0, {"error": str(error)})
                )
                raise ProcessingError(
                    f"pass '{pass_.name}' failed: {type(error).__name__}: {error}",
                    fix=f"leave '{pass_.name}' out of the recipe to skip it, and report the model that breaks it",
                ) from error
            unmap_read_weights([*mapped, *mapped_weights(model)])
            changes = getattr(result, "changes", int(result.modified))
            details = dict(getattr(result, "details", {}))
            context.report.append(
                ReportRow(pass_.name, time.perf_counter() - start, changes, details)
            )
        return context


def check_requirements(pass_: OnnxoptPass, opset: int, context: Context, calibrated: bool) -> None:
    """Raise a ProcessingError naming the pass and the fix when its needs are not met."""
    if pass_.min_opset is not None and opset < pass_.min_opset:
        raise ProcessingError(
            f"pass '{pass_.name}' needs opset {pass_.min_opset} or newer; the model uses opset {opset}",
            fix="put the 'upgrade-opset' pass before it in the recipe",
        )
    if pass_.needs_data and context.data is None:
        raise ProcessingError(
            f"pass '{pass_.name}' needs calibration data",
            fix="give samples with --calib DATA.npz (or data= from Python)",
        )
    if pass_.needs_calibration and not calibrated:
        raise ProcessingError(
            f"pass '{pass_.name}' needs activation ranges",
            fix="put a calibration pass before it in the recipe",
        )
