"""What the passes of one pipeline run share."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import onnx_ir as ir

    from onnxopt.data import DataSource
    from onnxopt.passes.quantize import QuantizationInputs
    from onnxopt.progress import Progress


@dataclasses.dataclass
class ReportRow:
    """One pass's line in the report: how long it took and what it changed."""

    pass_name: str
    seconds: float
    changes: int
    details: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class Context:
    """State shared by the passes of one run.

    Attributes:
        data: samples for calibration; None when the user gave no data.
        validation_data: samples held back from calibration, for the final comparison.
        reference: the original model, untouched, to compare against.
        statistics: activation statistics collected by calibration, keyed by tensor name.
        report: one row per pass, filled in by the pipeline.
        validation: figures of the last validation, filled in by the validation pass.
        quantization: what the quantizer did: quantized nodes, nodes kept float and why, and
            per-tensor figures of the repairs.
        quantization_inputs: the float model and settings the quantize pass started from, so
            that repairs after it (fallback) can quantize again with other choices.
        progress: where long-running passes report progress.
    """

    data: DataSource | None = None
    validation_data: DataSource | None = None
    reference: ir.Model | None = None
    statistics: dict[str, Any] = dataclasses.field(default_factory=dict)
    report: list[ReportRow] = dataclasses.field(default_factory=list)
    validation: dict[str, Any] = dataclasses.field(default_factory=dict)
    quantization: dict[str, Any] = dataclasses.field(default_factory=dict)
    quantization_inputs: QuantizationInputs | None = None
    progress: Progress | None = None
