"""Before calibrating: whether int8 can run faster than float on this CPU at all.

Where onnxruntime's integer kernels lose to its float ones (batch-1 depthwise networks on CPUs
without VNNI: PP-LCNet runs at 0.82x), calibration, GPTQ and the fallback search end in the
float model after spending most of a run. Speed does not depend on the ranges, only on where
the Q/DQ pairs sit, so a quantization on ranges from a sample or two, timed against float with
the variants that leave float what int8 speeds up least, answers the question in about a second.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable, Mapping

import onnx_ir as ir

from onnxopt import runtime
from onnxopt.compare import time_models
from onnxopt.progress import QUIET, Progress
from onnxopt.quantization.plan import QuantizationOptions
from onnxopt.quantization.qdq import quantized_copy
from onnxopt.runtime import Feed

logger = logging.getLogger(__name__)

# Ops whose integer kernels carry int8's speed; the others only move or combine values.
HEAVY_OPS = frozenset({"Conv", "Gemm", "MatMul"})

# How long each variant is timed against the float model (interleaved, one thread, medians):
# enough rounds for a stable median on models up to a few hundred milliseconds a run.
TIMING_SECONDS = 0.5

EVERY_LAYER_QUANTIZED = "every layer quantized"


@dataclasses.dataclass
class SpeedCheck:
    """How fast int8 runs against float at its fastest, timed before calibration.

    Attributes:
        speedups: each variant timed, by what it keeps float (EVERY_LAYER_QUANTIZED first),
            one thread, float median over the variant's median.
        min_speedup: what int8 must reach to be worth calibrating for.
        quantized_nodes: the nodes the variant with every layer quantized quantizes; a later
            quantization of the same nodes runs at its speed, whatever its ranges.
    """

    speedups: dict[str, float]
    min_speedup: float
    quantized_nodes: frozenset[str]

    @property
    def best(self) -> tuple[str, float]:
        """The fastest variant and its speedup."""
        return max(self.speedups.items(), key=lambda item: item[1])

    @property
    def worthwhile(self) -> bool:
        return self.best[1] >= self.min_speedup

    @property
    def reason(self) -> str:
        """Why the model stays float, in words; empty when int8 is worth it."""
        if self.worthwhile:
            return ""
        variant, speedup = self.best
        return (
            f"int8 would be slower than float: at its fastest ({variant}) it runs at "
            f"{speedup:.2f}x, below min_speedup {self.min_speedup:g}; every layer kept float"
        )


def lighter_variants(nodes: Iterable[ir.Node]) -> list[tuple[str, set[str]]]:
    """The quantized ``nodes`` int8 speeds up least, as sets to keep float, described: the
    elementwise and data-movement ops, the depthwise convolutions, and both. Where batch-1
    int8 loses to float, these are usually why (their integer kernels gain little, and each
    costs a requantization). Empty sets are left out."""
    nodes = list(nodes)
    cheap = {node.name for node in nodes if node.op_type not in HEAVY_OPS}
    depthwise = {node.name for node in nodes if is_depthwise(node)}
    variants = [
        ("elementwise and data-movement ops float", cheap),
        ("depthwise convolutions float", depthwise),
        ("elementwise ops and depthwise convolutions float", cheap | depthwise),
    ]
    return [(description, names) for description, names in variants if names]


def is_depthwise(node: ir.Node) -> bool:
    """A grouped Conv with one input channel per group."""
    if node.op_type != "Conv" or node.attributes.get_int("group", 1) == 1:
        return False
    weight = node.inputs[1] if len(node.inputs) > 1 else None
    return (
        weight is not None
        and weight.shape is not None
        and len(weight.shape) > 1
        and weight.shape[1] == 1
    )


def check_int8_speed(
    model: ir.Model,
    ranges: Mapping[str, tuple[float, float]],
    problems: Mapping[str, str],
    options: QuantizationOptions,
    feed: Feed,
    min_speedup: float,
    progress: Progress = QUIET,
) -> SpeedCheck:
    """Time ``model`` quantized with every layer, then (while none reaches ``min_speedup``)
    with each of ``lighter_variants`` float, against ``model``, one thread, on ``feed``.

    Args:
        model: the float model; not changed.
        ranges, problems: rough ranges (a sample's min and max do): speed does not depend on
            them, only on which tensors can be quantized.
        options: the quantizer's options.
        feed: the sample to time on.
        min_speedup: stop timing variants once one reaches it.
        progress: shows the variants timed.
    """
    speedups: dict[str, float] = {}
    quantized, report = quantized_copy(model, ranges, problems, options)
    nodes = frozenset(report.quantized)
    variants = lighter_variants(node for node in model.graph if node.name in nodes)
    with progress.task("timing int8 against float", 1 + len(variants)) as advance:
        speedups[EVERY_LAYER_QUANTIZED] = time_against_float(
            model, quantized, feed, options.target.runtime
        )
        advance(1)
        del quantized
        for description, float_layers in variants:
            if max(speedups.values()) >= min_speedup:
                break
            variant, _ = quantized_copy(model, ranges, problems, options, float_layers)
            speedups[description] = time_against_float(model, variant, feed, options.target.runtime)
            advance(1)
            del variant
    runtime.release_freed_memory()
    check = SpeedCheck(speedups, min_speedup, nodes)
    logger.info(
        "int8 speed check: %s",
        ", ".join(f"{name} {speedup:.2f}x" for name, speedup in speedups.items()),
    )
    return check


def time_against_float(
    float_model: ir.Model, model: ir.Model, feed: Feed, runtime_name: str = "onnxruntime"
) -> float:
    """How much faster ``model`` runs than ``float_model`` on ``feed`` in ``runtime_name``:
    one thread, interleaved, TIMING_SECONDS long, float median over ``model``'s median."""
    return time_models(
        float_model, model, feed, threads=1, seconds=TIMING_SECONDS, runtime_name=runtime_name
    ).speedup
