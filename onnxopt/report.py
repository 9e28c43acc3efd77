"""The tables `onnxopt optimize` prints: what each pass did and how the result validated."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from rich.console import Console
from rich.table import Table

from onnxopt.context import ReportRow


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


def render_validation(validation: dict[str, Any], console: Console) -> None:
    if not validation:
        return
    table = Table(title=f"Validation on {validation['data']}", title_justify="left")
    table.add_column("check")
    table.add_column("result")
    table.add_column("detail")
    for check in validation["checks"]:
        verdict = "[green]pass[/green]" if check["passed"] else "[red]FAIL[/red]"
        table.add_row(check["name"], verdict, check["detail"])
    console.print(table)
    if not validation["outputs"]:
        return
    outputs = Table(title="Fidelity per output", title_justify="left")
    for column in ("output", "max abs error", "cosine", "SQNR dB", "top-1 agreement"):
        outputs.add_column(column, justify="left" if column == "output" else "right")
    for output in validation["outputs"]:
        top1 = output["top1_agreement"]
        outputs.add_row(
            output["name"],
            _number(output["max_abs_error"], "{:.3g}"),
            _number(output["cosine"], "{:.6f}"),
            _number(output["sqnr_db"], "{:.1f}"),
            "-" if top1 is None else f"{top1:.1%}",
        )
    console.print(outputs)


def render_quantization(quantization: dict[str, Any], console: Console, rows: int = 10) -> None:
    """Where accuracy is lost and what stayed float: the two things a user acts on."""
    layers = quantization.get("layers") or []
    if layers:
        table = Table(
            title=f"Least accurate quantized tensors (of {len(layers)})", title_justify="left"
        )
        for column in ("node", "op", "tensor", "SQNR dB"):
            table.add_column(column, justify="right" if column == "SQNR dB" else "left")
        for layer in layers[:rows]:
            table.add_row(
                layer["node"],
                layer["op_type"],
                layer["tensor"],
                _number(layer["sqnr_db"], "{:.1f}"),
            )
        console.print(table)
    kept = quantization.get("kept_float") or []
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


def _number(value: float | str, pattern: str) -> str:
    if isinstance(value, str):
        return value
    return pattern.format(value) if math.isfinite(value) else str(value)


def _short(value: Any) -> str:
    if isinstance(value, dict):
        return ", ".join(f"{key}={item}" for key, item in value.items())
    return str(value)
