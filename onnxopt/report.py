"""The report of one optimization: its JSON form and the tables `onnxopt optimize` prints.

Every typed result a run leaves in its ``Context`` (calibration, quantization, validation, the
pass rows) becomes JSON here and nowhere else.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from onnxopt.__about__ import __version__
from onnxopt.calibration import CalibrationResult
from onnxopt.compare import SpeedReport
from onnxopt.context import Context, ReportRow
from onnxopt.errors import ValidationFailed
from onnxopt.pruning import SparsityReport
from onnxopt.pruning.structured import StructuredReport
from onnxopt.quantization.speed_check import SpeedCheck
from onnxopt.quantization.state import QuantizationState
from onnxopt.recipe import Recipe
from onnxopt.serialize import json_data
from onnxopt.summary import ModelSummary
from onnxopt.transfer import TransferReport
from onnxopt.validation import ValidationResult


def report_document(
    *,
    recipe: Recipe,
    context: Context,
    before: ModelSummary,
    after: ModelSummary,
    input_path: Path | None,
    written: Sequence[Path],
    failure: ValidationFailed | None,
    speed: SpeedReport | None = None,
) -> dict[str, Any]:
    """Everything a CI job may want to keep about one optimization, as JSON-ready data."""
    return {
        "onnxopt_version": __version__,
        "input": str(input_path) if input_path else None,
        "written": [str(path) for path in written],
        "recipe": recipe.as_dict(),
        "passes": passes_json(context.report),
        "before": before.as_dict(),
        "after": after.as_dict(),
        "calibration": calibration_json(context.calibration),
        "validation": validation_json(context.validation),
        "quantization": quantization_json(context.quantization, context.speed_check),
        "sparsity": sparsity_json(context.sparsity),
        "finetune": dataclasses.asdict(context.recovery) if context.recovery else None,
        "pruning": pruning_json(context.pruning),
        "transfer": transfer_json(context.transfer),
        "speed": speed_json(speed),
        "passed": failure is None,
        "failure": failure.render() if failure else None,
    }


def sparsity_json(report: SparsityReport | None) -> dict[str, Any] | None:
    if report is None:
        return None
    return {
        "sparsity": report.sparsity,
        "allocation": report.allocation,
        "candidate_closeness": report.candidate_closeness,
        "layers": [dataclasses.asdict(layer) for layer in report.layers],
        "dense": report.dense,
        "budget": report.budget,
        "budget_met": report.budget_met,
        "trials": [dataclasses.asdict(trial) for trial in report.trials],
        "gradient_loss": report.gradient_loss,
    }


def pruning_json(report: StructuredReport | None) -> dict[str, Any] | None:
    """Structured pruning: each group's keep indices (what weight transfer reads), the layers
    left whole and why, and the size and multiply-accumulates before and after."""
    if report is None:
        return None
    return {
        "importance": report.importance,
        "gradient_loss": report.gradient_loss,
        "removed_channels": report.removed,
        "parameters": {"before": report.parameters_before, "after": report.parameters_after},
        "macs": {"before": report.macs_before, "after": report.macs_after},
        "groups": [
            {
                "name": group.name,
                "kind": group.kind,
                "channels": group.channels,
                "kept": group.kept,
                "keep": list(group.keep),
                "tensors": [dataclasses.asdict(piece) for piece in group.slices],
            }
            for group in report.groups
        ],
        "unprunable": [dataclasses.asdict(item) for item in report.unprunable],
        "refitted": report.refitted,
        "samples": report.samples,
        "seconds": report.seconds,
    }


def transfer_json(report: TransferReport | None) -> dict[str, Any] | None:
    """Weight transfer: for every target tensor its source and how it was matched and
    changed, or why it kept its value; counts; the outputs before and after."""
    if report is None:
        return None
    return {
        "transferred": report.transferred,
        "tensors": len(report.slots),
        "counts": report.counts(),
        "layers": {
            "target": report.target_layers,
            "source": report.source_layers,
            "paired": report.paired_layers,
        },
        "unused_source": report.unused_source,
        "equivalent": report.equivalent,
        "slots": [dataclasses.asdict(slot) for slot in report.slots],
        "outputs": [json_data(dataclasses.asdict(change)) for change in report.outputs],
        "check_samples": report.check_samples,
        "seconds": report.seconds,
        "finetune": dataclasses.asdict(report.tuning) if report.tuning else None,
    }


def render_transfer(report: TransferReport | None, console: Console, rows: int = 20) -> None:
    """The tensors transferred (the first ``rows``), the counts and the outputs' change."""
    if report is None:
        return
    table = Table(title="Weight transfer", title_justify="left")
    for column in ("target tensor", "source tensor", "matched by", "transform or why left"):
        table.add_column(column)
    for slot in report.slots[:rows]:
        table.add_row(
            slot.target,
            slot.source or "-",
            slot.match or "-",
            slot.transform if slot.left is None else f"left: {slot.left}",
            style=None if slot.left is None else "yellow",
        )
    if len(report.slots) > rows:
        table.add_row(f"... {len(report.slots) - rows} more in the JSON report", "", "", "")
    console.print(table)
    counts = ", ".join(
        f"{count} left" if how == "left" else f"{count} by {how}"
        for how, count in report.counts().items()
    )
    console.print(
        f"{report.transferred} of {len(report.slots)} target tensors transferred ({counts}); "
        f"{report.paired_layers} of {report.target_layers} layers paired with the source's "
        f"{report.source_layers}; {report.seconds:.1f} s",
        highlight=False,
    )
    if report.unused_source:
        console.print(
            f"source layers not used: {', '.join(report.unused_source[:8])}"
            + (" ..." if len(report.unused_source) > 8 else ""),
            highlight=False,
        )
    if report.tuning is not None:
        tuning = report.tuning
        console.print(
            f"fine-tuned {tuning.steps} steps on {tuning.loss} ({tuning.anchored} weights held "
            f"near the source): loss {tuning.losses[0]:.4g} -> {tuning.losses[-1]:.4g}, "
            f"{tuning.seconds:.0f} s",
            highlight=False,
        )
    for change in report.outputs:
        with_source = (
            f"cosine with the source {change.cosine_with_source_before:.4f} -> "
            f"{change.cosine_with_source_after:.4f}"
            if change.cosine_with_source_after is not None
            else "shapes differ from the source's"
        )
        console.print(
            f"output {change.name}: {with_source}; with its own before: "
            f"{change.cosine_with_target_before:.4f} ({report.check_samples} samples)",
            highlight=False,
        )


def speed_json(speed: SpeedReport | None) -> dict[str, Any] | None:
    """Latency of the input model and the result, medians in milliseconds, and the speedup."""
    if speed is None:
        return None
    return {
        "skipped": speed.skipped,
        "runtime": speed.runtime,
        "timings": [
            {
                "threads": comparison.threads if comparison.threads is not None else "default",
                "input_ms": comparison.latency_a.median_ms,
                "result_ms": comparison.latency_b.median_ms,
                "speedup": json_data(comparison.speedup),
                "runs": comparison.latency_a.runs,
            }
            for comparison in speed.comparisons
        ],
    }


def render_speed(speed: SpeedReport | None, console: Console) -> None:
    if speed is None:
        return
    if speed.skipped:
        console.print(f"Speed: not timed ({speed.skipped})")
        return
    table = Table(
        title=f"Speed in {speed.runtime} (batch 1, median of interleaved runs)",
        title_justify="left",
    )
    for column in ("threads", "input", "result", "speedup"):
        table.add_column(column, justify="left" if column == "threads" else "right")
    for comparison in speed.comparisons:
        table.add_row(
            "1" if comparison.threads == 1 else "default",
            f"{comparison.latency_a.median_ms:.3g} ms",
            f"{comparison.latency_b.median_ms:.3g} ms",
            f"{comparison.speedup:.2f}x",
        )
    console.print(table)


def passes_json(rows: Sequence[ReportRow]) -> list[dict[str, Any]]:
    return [
        {
            "name": row.pass_name,
            "seconds": row.seconds,
            "changes": row.changes,
            "details": json_data(row.details),
        }
        for row in rows
    ]


def calibration_json(result: CalibrationResult | None) -> dict[str, Any] | None:
    """How calibration went, and the tensors it could give no range (which stay float)."""
    if result is None:
        return None
    return {
        "samples": result.samples,
        "method": result.method,
        "cache": result.cache,
        "tensors": len(result.tensors),
        "unusable": result.problems,
    }


def validation_json(result: ValidationResult | None) -> dict[str, Any]:
    if result is None:
        return {}
    return {
        "passed": result.passed,
        "samples": result.samples,
        "data": result.data,
        "checks": json_data(result.checks),
        "outputs": json_data(result.outputs),
    }


def quantization_json(
    state: QuantizationState | None, speed_check: SpeedCheck | None = None
) -> dict[str, Any]:
    """What the quantizer and the repairs did, describing the model that is written; when the
    speed check kept the model float, why."""
    checked: dict[str, Any] = {}
    if speed_check is not None:
        checked["speed_check"] = {
            "speedups": speed_check.speedups,
            "min_speedup": speed_check.min_speedup,
        }
        if not speed_check.worthwhile:
            checked["declined"] = speed_check.reason
    if state is None:
        return json_data(checked)
    report = state.report
    document: dict[str, Any] = {
        "quantized_nodes": report.quantized,
        "kept_float": report.kept_float,
        "absorbed": report.absorbed,
        "tensors": report.tensors,
        "widened_weight_scales": report.widened_weight_scales,
        "dynamic": report.dynamic,
        "fusion": json_data(state.fusion) | {"rate": state.fusion.rate},
    }
    if state.bias_correction is not None:
        document["bias_correction"] = {
            "create_bias": state.bias_correction.create_bias
        } | json_data(state.bias_correction.report)
    if state.fallback is not None:
        document["fallback"] = json_data(state.fallback)
    if state.layers:
        document["layers"] = json_data(state.layers)
    return json_data(document | checked)


def render_passes(rows: Sequence[ReportRow], console: Console) -> None:
    table = Table(title="Passes", title_justify="left")
    table.add_column("pass")
    table.add_column("time", justify="right")
    table.add_column("changes", justify="right")
    table.add_column("notes")
    for row in rows:
        notes = "; ".join(f"{key}: {_short(value)}" for key, value in row.details.items())
        table.add_row(row.pass_name, f"{row.seconds * 1000:.0f} ms", str(row.changes), notes)
    console.print(table)


def render_validation(result: ValidationResult | None, console: Console) -> None:
    if result is None:
        return
    table = Table(title=f"Validation on {result.data}", title_justify="left")
    table.add_column("check")
    table.add_column("result")
    table.add_column("detail")
    for check in result.checks:
        verdict = "[green]pass[/green]" if check.passed else "[red]FAIL[/red]"
        table.add_row(check.name, verdict, check.detail)
    console.print(table)
    if not result.outputs:
        return
    outputs = Table(title="Fidelity per output", title_justify="left")
    for column in ("output", "max abs error", "cosine", "SQNR dB", "top-1 agreement"):
        outputs.add_column(column, justify="left" if column == "output" else "right")
    for output in result.outputs:
        top1 = output.top1_agreement
        outputs.add_row(
            output.name,
            _number(output.max_abs_error, "{:.3g}"),
            _number(output.cosine, "{:.6f}"),
            _number(output.sqnr_db, "{:.1f}"),
            "-" if top1 is None else f"{top1:.1%}",
        )
    console.print(outputs)


def render_quantization(state: QuantizationState | None, console: Console, rows: int = 10) -> None:
    """Where accuracy is lost and what stayed float: the two things a user acts on."""
    if state is None:
        return
    if state.layers:
        table = Table(
            title=f"Least accurate quantized tensors (of {len(state.layers)})",
            title_justify="left",
        )
        for column in ("node", "op", "tensor", "SQNR dB"):
            table.add_column(column, justify="right" if column == "SQNR dB" else "left")
        for layer in state.layers[:rows]:
            table.add_row(
                layer.node or "", layer.op_type, layer.tensor, _number(layer.sqnr_db, "{:.1f}")
            )
        console.print(table)
    if state.fusion.boundaries:
        conversions = ", ".join(
            f"{where} ({count})" for where, count in state.fusion.boundaries.items()
        )
        console.print(f"Conversions left between int8 and float after fusion: {conversions}")
    kept = state.report.kept_float
    if kept:
        table = Table(title=f"Kept float ({len(kept)} nodes)", title_justify="left")
        table.add_column("node")
        table.add_column("op")
        table.add_column("why")
        for entry in kept[:rows]:
            table.add_row(entry["node"], entry["op_type"], entry["reason"])
        if len(kept) > rows:
            table.add_row("...", "", f"{len(kept) - rows} more in the JSON report (--report)")
        console.print(table)


def _number(value: float, pattern: str) -> str:
    return pattern.format(value) if math.isfinite(value) else str(value)


def _short(value: Any) -> str:
    if isinstance(value, dict):
        return ", ".join(f"{key}={item}" for key, item in value.items())
    return str(value)
