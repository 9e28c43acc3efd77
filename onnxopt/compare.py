"""Two models side by side: how closely B follows A, and how fast each runs.

Used by ``onnxopt compare``. Fidelity is measured on the samples given; latency is measured by
running A and B alternately on the same sample, so that drift of the machine (clock, heat, other
load) touches both alike instead of whichever model happened to run second.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
from rich.console import Console
from rich.table import Table

from onnxopt.errors import InputError, ValidationFailed
from onnxopt.metrics import OutputFidelity, class_score_outputs, compare_outputs, output_parts
from onnxopt.progress import QUIET, Progress
from onnxopt.runtime import create_session, input_specs
from onnxopt.serialize import json_data

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class LatencyStats:
    """Wall-clock time of one model's ``session.run`` over the timed runs, in milliseconds."""

    runs: int
    median_ms: float
    p90_ms: float
    min_ms: float

    @classmethod
    def from_seconds(cls, seconds: Sequence[float]) -> LatencyStats:
        milliseconds = np.asarray(seconds, dtype=np.float64) * 1000.0
        return cls(
            runs=len(milliseconds),
            median_ms=float(np.median(milliseconds)),
            p90_ms=float(np.percentile(milliseconds, 90)),
            min_ms=float(milliseconds.min()),
        )


@dataclasses.dataclass
class Comparison:
    """What ``compare_models`` measured.

    Attributes:
        samples: how many samples the fidelity figures cover.
        outputs: fidelity of each of B's outputs against A's, in A's output order.
        latency_a: A's latency; None when no timed runs were asked for.
        latency_b: B's latency; None when no timed runs were asked for.
        threads: intra-op threads both sessions used; None for the runtime's default.
        runtime: where both ran: onnxruntime, or openvino (float parts in float32).
    """

    samples: int
    outputs: list[OutputFidelity]
    latency_a: LatencyStats | None
    latency_b: LatencyStats | None
    threads: int | None
    runtime: str = "onnxruntime"

    @property
    def speedup(self) -> float | None:
        """median_A / median_B: above 1 when B is faster. None without timing."""
        if self.latency_a is None or self.latency_b is None:
            return None
        if self.latency_b.median_ms == 0.0:
            return math.inf
        return self.latency_a.median_ms / self.latency_b.median_ms

    def as_dict(self) -> dict[str, Any]:
        """Plain data for ``json.dumps``.

        Infinite and NaN figures (SQNR of identical outputs is +inf) become the strings "inf",
        "-inf" and "nan", which ``float()`` reads back; None keeps meaning "not applicable".
        """
        return json_data(self) | {"speedup": json_data(self.speedup)}


def compare_models(
    model_a: ir.Model,
    model_b: ir.Model,
    feeds: list[dict[str, np.ndarray]],
    *,
    latency_runs: int = 50,
    warmup: int = 5,
    threads: int | None = None,
    progress: Progress | None = None,
    runtime_name: str = "onnxruntime",
) -> Comparison:
    """Measure B against A on the same samples, both run in ``runtime_name``.

    Args:
        model_a: the reference, usually the original model.
        model_b: the candidate, usually the optimized model.
        feeds: samples, input name -> array; arrays for names the models do not take are ignored.
        latency_runs: timed runs of each model; 0 measures fidelity only.
        warmup: untimed runs of each model first, so that allocation and caches settle.
        threads: intra-op threads for both sessions; None for onnxruntime's default.
        progress: where to show the two stages, comparing outputs and timing; None shows nothing.
        runtime_name: onnxruntime, or openvino (the optional extra; float parts in float32).

    Raises:
        InputError: the models take or return differently named values, or a sample lacks an input.
        ValidationFailed: B returns an output of a different shape than A.
    """
    _check_same_interface(model_a, model_b)
    if not feeds:
        raise InputError(
            "no samples to compare the models on",
            fix="pass calibration data, or let onnxopt make random samples",
        )
    input_names = [spec.name for spec in input_specs(model_a)]
    samples = [_select_inputs(feed, input_names, index) for index, feed in enumerate(feeds)]
    output_names = [value.name for value in model_a.graph.outputs]
    session_a = create_session(model_a, threads=threads, runtime=runtime_name)
    session_b = create_session(model_b, threads=threads, runtime=runtime_name)
    progress = progress or QUIET

    outputs_a, outputs_b = [], []
    with progress.task("comparing outputs", total=len(samples)) as advance:
        for sample in samples:
            outputs_a.append(session_a.run(output_names, sample))
            outputs_b.append(session_b.run(output_names, sample))
            advance()
    try:
        fidelity = compare_outputs(
            output_names,
            outputs_a,
            outputs_b,
            class_outputs=class_score_outputs(model_a),
            parts=output_parts(model_a),
        )
    except ValueError as error:
        raise ValidationFailed(f"model B does not return what model A returns: {error}") from error

    latency_a = latency_b = None
    if latency_runs > 0:
        with progress.task("timing", total=warmup + latency_runs) as advance:
            seconds_a, seconds_b = _time_interleaved(
                session_a, session_b, samples, latency_runs, warmup, advance
            )
        latency_a = LatencyStats.from_seconds(seconds_a)
        latency_b = LatencyStats.from_seconds(seconds_b)
        logger.info("median latency A %.3f ms, B %.3f ms", latency_a.median_ms, latency_b.median_ms)
    return Comparison(
        samples=len(samples),
        outputs=fidelity,
        latency_a=latency_a,
        latency_b=latency_b,
        threads=threads,
        runtime=runtime_name,
    )


def _check_same_interface(model_a: ir.Model, model_b: ir.Model) -> None:
    """Both models must take the same named inputs of the same types and return the same names."""
    inputs_a = {spec.name: spec.dtype for spec in input_specs(model_a)}
    inputs_b = {spec.name: spec.dtype for spec in input_specs(model_b)}
    outputs_a = [value.name for value in model_a.graph.outputs]
    outputs_b = [value.name for value in model_b.graph.outputs]
    details = []
    for kind, names_a, names_b in (
        ("inputs", inputs_a, inputs_b),
        ("outputs", outputs_a, outputs_b),
    ):
        only_a = [name for name in names_a if name not in names_b]
        only_b = [name for name in names_b if name not in names_a]
        if only_a:
            details.append(f"{kind} only in A: {', '.join(only_a)}")
        if only_b:
            details.append(f"{kind} only in B: {', '.join(only_b)}")
    for name, dtype in inputs_a.items():
        if name in inputs_b and inputs_b[name] != dtype:
            details.append(f"input '{name}' is {dtype} in A but {inputs_b[name]} in B")
    if details:
        raise InputError(
            "the two models do not take and return the same values, so their outputs cannot be compared",
            details=details,
            fix="compare two versions of the same model; if one renamed or retyped its inputs or "
            "outputs, give it the other's names and types first",
        )


def _select_inputs(
    feed: dict[str, np.ndarray], input_names: list[str], index: int
) -> dict[str, np.ndarray]:
    missing = [name for name in input_names if name not in feed]
    if missing:
        raise InputError(
            f"sample {index} has no array for model input '{missing[0]}'",
            details=[
                f"arrays found: {', '.join(feed) or 'none'}",
                f"model inputs: {', '.join(input_names)}",
            ],
            fix="give one array per model input, named as the model names it",
        )
    return {name: feed[name] for name in input_names}


def _time_interleaved(
    session_a: ort.InferenceSession,
    session_b: ort.InferenceSession,
    samples: list[dict[str, np.ndarray]],
    runs: int,
    warmup: int,
    advance: Callable[[], None],
) -> tuple[list[float], list[float]]:
    """Seconds per run of A and of B, timed in turns on the same sample.

    The order flips every round (A B, B A, ...) so neither model always runs right after the
    other one has warmed the caches with the same sample.
    """
    sessions = (session_a, session_b)
    seconds: tuple[list[float], list[float]] = ([], [])
    for round_index in range(warmup + runs):
        sample = samples[round_index % len(samples)]
        order = (0, 1) if round_index % 2 == 0 else (1, 0)
        for which in order:
            start = time.perf_counter()
            sessions[which].run(None, sample)
            elapsed = time.perf_counter() - start
            if round_index >= warmup:
                seconds[which].append(elapsed)
        advance()
    return seconds


@dataclasses.dataclass
class SpeedComparison:
    """Latency of two models on one sample, timed in turns, with one thread count."""

    threads: int | None
    latency_a: LatencyStats
    latency_b: LatencyStats

    @property
    def speedup(self) -> float:
        """median_A / median_B: above 1 when B is faster."""
        if self.latency_b.median_ms == 0.0:
            return math.inf
        return self.latency_a.median_ms / self.latency_b.median_ms


def time_models(
    model_a: ir.Model | str | os.PathLike,
    model_b: ir.Model | str | os.PathLike,
    feed: dict[str, np.ndarray],
    threads: int | None = None,
    seconds: float = 2.0,
    runs: tuple[int, int] = (5, 200),
    warmup: int = 3,
    runtime_name: str = "onnxruntime",
) -> SpeedComparison:
    """How fast B runs against A on one sample: a short interleaved timing, medians.

    After up to ``warmup`` runs of each (fewer once they have taken a quarter of ``seconds``:
    a detector's first run settles it, and each more costs a third of a second), times as
    many rounds as fit in about ``seconds`` (at least ``runs[0]``, at most ``runs[1]``), so a
    slow model costs seconds, not minutes. ``runtime_name`` is onnxruntime or openvino.
    """
    sessions = [
        create_session(model, threads=threads, runtime=runtime_name) for model in (model_a, model_b)
    ]
    start = time.perf_counter()
    warmed = 0
    while warmed < max(warmup, 1) and (warmed == 0 or time.perf_counter() - start < seconds / 4):
        _time_interleaved(sessions[0], sessions[1], [feed], 0, 1, lambda: None)
        warmed += 1
    per_round = (time.perf_counter() - start) / warmed
    rounds = int(min(max(seconds / max(per_round, 1e-9), runs[0]), runs[1]))
    seconds_a, seconds_b = _time_interleaved(
        sessions[0], sessions[1], [feed], rounds, 0, lambda: None
    )
    return SpeedComparison(
        threads, LatencyStats.from_seconds(seconds_a), LatencyStats.from_seconds(seconds_b)
    )


@dataclasses.dataclass
class SpeedReport:
    """How much faster the optimized model runs: one thread, then onnxruntime's default threads.

    Attributes:
        comparisons: the timings, ``latency_a`` of the input model, ``latency_b`` of the result.
        skipped: why nothing was timed, or None.
        runtime: where both were timed: onnxruntime or openvino.
    """

    comparisons: list[SpeedComparison]
    skipped: str | None = None
    runtime: str = "onnxruntime"


def measure_speed(
    model_a: ir.Model | str | os.PathLike,
    model_b: ir.Model | str | os.PathLike,
    feed: dict[str, np.ndarray] | None,
    progress: Progress = QUIET,
    runtime_name: str = "onnxruntime",
) -> SpeedReport:
    """A short interleaved timing of B against A with one thread and with the default threads,
    in ``runtime_name`` (onnxruntime or openvino)."""
    if feed is None:
        return SpeedReport([], "no sample the input model runs on", runtime_name)
    comparisons = []
    with progress.task("timing", 2) as advance:
        for threads in (1, None):
            comparisons.append(
                time_models(model_a, model_b, feed, threads, runtime_name=runtime_name)
            )
            advance(1)
    return SpeedReport(comparisons, runtime=runtime_name)


def _format_optional(value: float | None, pattern: str) -> str:
    return "-" if value is None else pattern.format(value)


def render_comparison(
    comparison: Comparison, console: Console, labels: tuple[str, str] = ("A", "B")
) -> None:
    """Print fidelity per output and latency side by side, naming the models by ``labels``."""
    label_a, label_b = labels
    fidelity = Table(
        title=f"fidelity of {label_b} against {label_a} over {comparison.samples} samples",
        title_justify="left",
    )
    for column in ("output", "max abs error", "cosine", "SQNR dB", "top-1 agreement", "mismatched"):
        fidelity.add_column(column, justify="left" if column == "output" else "right")
    for output in comparison.outputs:
        fidelity.add_row(
            output.name,
            f"{output.max_abs_error:.3g}",
            f"{output.cosine:.6f}",
            f"{output.sqnr_db:.1f}",
            _format_optional(output.top1_agreement, "{:.1%}"),
            _format_optional(output.mismatched, "{:.2%}"),
        )
    console.print(fidelity)

    if comparison.latency_a is None or comparison.latency_b is None:
        return
    threads = "default threads" if comparison.threads is None else f"{comparison.threads} threads"
    console.print(
        f"latency over {comparison.latency_a.runs} runs each, {label_a} and {label_b} "
        f"interleaved, {threads}, in {comparison.runtime}"
    )
    latency = Table()
    latency.add_column("ms")
    latency.add_column(label_a, justify="right")
    latency.add_column(label_b, justify="right")
    for row, field in (("median", "median_ms"), ("p90", "p90_ms"), ("min", "min_ms")):
        latency.add_row(
            row,
            f"{getattr(comparison.latency_a, field):.3f}",
            f"{getattr(comparison.latency_b, field):.3f}",
        )
    console.print(latency)
    console.print(f"speedup of {label_b} over {label_a} (median): {comparison.speedup:.2f}x")
