"""What the passes of one pipeline run share: data, the original model, and typed results."""

from __future__ import annotations

import dataclasses
from typing import Any

import onnx_ir as ir

from onnxopt.calibration import CalibrationResult
from onnxopt.data import DataSource
from onnxopt.errors import ProcessingError
from onnxopt.fidelity import ReferenceComparison, reference_comparison
from onnxopt.progress import QUIET, Progress
from onnxopt.pruning import SparsityReport
from onnxopt.pruning.recovery import RecoveryResult
from onnxopt.pruning.structured import StructuredReport
from onnxopt.quantization.speed_check import SpeedCheck
from onnxopt.quantization.state import QuantizationState
from onnxopt.transfer import TransferReport
from onnxopt.validation import ValidationResult

# Past the first eight samples, comparisons take more only while the original model has run
# less than COMPARISON_SECONDS on them and their outputs hold fewer than COMPARISON_VALUES
# values: every candidate a repair tries runs on all of them, so a slow model is compared on
# fewer, and outputs as large as a detector's maps give a stable figure from a few (a
# classifier's scores or a sentence's embeddings use every sample asked for).
COMPARISON_SECONDS = 3.0
COMPARISON_VALUES = 2**22


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
        reference: the original model, untouched (or its path), to compare against.
        calibration: the ranges and statistics calibration found.
        speed_check: how fast int8 ran against float before calibration, when it was checked;
            when int8 cannot beat ``min_speedup``, the passes that quantize are skipped.
        quantization: what the quantizer did, for the repairs after it and the report.
        sparsity: what the sparsify pass pruned, for the report.
        recovery: how the fine-tune after pruning went (``finetune_steps``), for the report.
        pruning: the channels the prune pass removed (keep indices per group), for the report
            and for weight transfer.
        transfer: what the transfer pass copied, for the report; the pass also makes the
            model with the new weights the reference later passes are compared with.
        validation: the result of the last validation.
        report: one row per pass, filled in by the pipeline.
        progress: where long-running passes report progress.
        comparison_samples: how many samples fidelity is judged on (the validate pass's).
        comparison: the reference's outputs on those samples, made once by the first pass that
            measures fidelity, so that every pass measures the same way.
    """

    data: DataSource | None = None
    validation_data: DataSource | None = None
    reference: ir.Model | str | None = None
    calibration: CalibrationResult | None = None
    speed_check: SpeedCheck | None = None
    quantization: QuantizationState | None = None
    sparsity: SparsityReport | None = None
    recovery: RecoveryResult | None = None
    pruning: StructuredReport | None = None
    transfer: TransferReport | None = None
    validation: ValidationResult | None = None
    report: list[ReportRow] = dataclasses.field(default_factory=list)
    progress: Progress = QUIET
    comparison_samples: int = 8
    comparison: ReferenceComparison | None = None

    def reference_comparison(
        self, samples: int | None = None, seed: int = 0
    ) -> ReferenceComparison:
        """The comparison every fidelity figure of this run is measured with; made on first use.

        On up to ``samples`` (default ``comparison_samples``) samples: the held-back validation
        samples first, then calibration samples when fewer were held back (flips of a classifier
        or small errors are judged on many samples more reliably than on a few), taking no more
        than COMPARISON_SECONDS of the original model's time and COMPARISON_VALUES output values
        beyond the first eight. Without
        data, random samples the reference runs on. Later calls get the same comparison.
        """
        if self.comparison is None:
            if self.reference is None:
                raise ProcessingError(
                    "fidelity cannot be measured: the run has no reference model",
                    fix="give the original model as Context(reference=...)",
                )
            count = samples or self.comparison_samples
            held = self.validation_data.take(count) if self.validation_data is not None else []
            extra = self.data.take(count - len(held)) if self.data is not None else []
            parts = []
            if held:
                parts.append(f"held back from {self.validation_data.description}")
            if extra:
                parts.append(f"then calibration samples of {self.data.description}")
            self.comparison = reference_comparison(
                self.reference,
                [*held, *extra],
                "samples: " + ", ".join(parts) if parts else "",
                count,
                seed,
                COMPARISON_SECONDS,
                max_values=COMPARISON_VALUES,
            )
        return self.comparison

    @property
    def runtime_name(self) -> str:
        """Where this run's model is measured: the quantize pass's target's runtime, else
        onnxruntime."""
        if self.quantization is None:
            return "onnxruntime"
        return self.quantization.options.target.runtime

    @property
    def int8_declined(self) -> str | None:
        """Why int8 is not worth it on this model, once the speed check found so; else None."""
        if self.speed_check is None or self.speed_check.worthwhile:
            return None
        return self.speed_check.reason

    def calibration_for(self, pass_name: str) -> CalibrationResult:
        """This run's calibration; a ProcessingError naming ``pass_name`` when none ran."""
        if self.calibration is None:
            raise ProcessingError(
                f"pass '{pass_name}' needs activation ranges, but no calibration ran before it",
                fix=f"put 'calibrate' before '{pass_name}' in the recipe",
            )
        return self.calibration

    def quantization_for(self, pass_name: str) -> QuantizationState:
        """What this run's quantizer did; a ProcessingError naming ``pass_name`` when it did not run."""
        if self.quantization is None:
            raise ProcessingError(
                f"pass '{pass_name}' repairs what the quantize pass did, but no quantize pass ran before it",
                fix=f"put 'quantize' before '{pass_name}' in the recipe",
            )
        return self.quantization
