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


def _number(value: float | str, pattern: str) -> str:
    if isinstance(value, str):
        return value
    return pattern.format(value) if math.isfinite(value) else str(value)


def _short(value: Any) -> str:
    if isinstance(value, dict):
        return ", ".join(f"{key}={item}" for key, item in value.items())
    return str(value)
