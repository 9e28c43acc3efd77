"""The base every onnxopt pass derives from."""

from __future__ import annotations

from typing import Any, ClassVar

import onnx_ir as ir

from onnxopt.context import Context


class OnnxoptPass(ir.passes.InPlacePass):
    """An in-place onnx_ir pass that knows its recipe name, what it needs and what it changed.

    Subclasses take their options as keyword arguments of ``__init__`` with type hints (the recipe
    checks values against them), do their work in ``call(model)``, and set ``self.changes`` to the
    number of things they changed so the pipeline can report it; ``self.details`` holds anything
    else worth a line in the report.

    Attributes:
        name: the name a recipe uses for this pass.
        needs_data: the pass cannot run without calibration data.
        needs_statistics: the pass reads ``context.statistics`` that calibration collected.
        min_opset: the lowest default-domain opset the pass supports, or None.
        provides_statistics: the pass fills ``context.statistics`` for the passes after it.
    """

    name: ClassVar[str] = ""
    needs_data: ClassVar[bool] = False
    needs_statistics: ClassVar[bool] = False
    min_opset: ClassVar[int | None] = None
    provides_statistics: ClassVar[bool] = False

    context: Context
    changes: int = 0
    details: dict[str, Any]

    def opset_after(self, opset: int) -> int:
        """The default-domain opset of the model after this pass, for checking later passes' needs."""
        return opset

    def bind(self, context: Context) -> None:
        """Give the pass the state of the run it is part of."""
        self.context = context

    def __call__(self, model: ir.Model) -> ir.passes.PassResult:
        if not hasattr(self, "context"):
            self.context = Context()
        self.changes = 0
        self.details = {}
        return super().__call__(model)
