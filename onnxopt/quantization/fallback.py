"""Fallback: the fastest quantization, with as few layers float as it takes, that meets a budget.

Three families of candidates, each searched by bisection on the final outputs with the run's
``ReferenceComparison`` (the very measurement validation makes):

- the first layers float: where a network reads raw input its first layers are often the most
  sensitive, and a float prefix costs one conversion, so it keeps int8's speed;
- the last layers float: a detector's or segmenter's head, which draws fine maps or boxes
  from the features, is often the most sensitive part, and a float suffix costs one conversion;
- the layers whose quantization alone hurts the outputs most float (each measured in
  isolation: the float model with that layer alone quantized, on a few samples), for models
  whose sensitive layers sit anywhere; tried only when neither end is short.

Of the candidates that meet the budget, the fastest is kept, timed against the float model;
when even that is slower than float, the float model is. Keeping every layer float gives the
float model, which meets any budget the original meets, so the search always ends with a model
that meets the budget: int8 where it can, float where it must, float altogether (with the
reason) when nothing less will do.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Literal

import numpy as np
import onnx_ir as ir

from onnxopt import runtime
from onnxopt.fidelity import ReferenceComparison
from onnxopt.metrics import OutputFidelity
from onnxopt.progress import QUIET, Progress
from onnxopt.quantization.bias_correction import BiasCorrectionReport, ChannelMeans, correct_biases
from onnxopt.quantization.plan import QuantizationOptions
from onnxopt.quantization.qdq import QuantizationReport, WeightRounding, quantized_copy
from onnxopt.quantization.sensitivity import (
    LayerSqnr,
    compare_tensors,
    layer_sqnr,
    node_added_noise,
    noise_points,
)
from onnxopt.quantization.speed_check import lighter_variants, time_against_float
from onnxopt.runtime import Feed
from onnxopt.validation import Thresholds, meets

logger = logging.getLogger(__name__)

# A float prefix or suffix longer than this share of the layers sends the search on to the
# sensitive layers.
END_SHARE = 0.2

# The ranking (and the per-layer table of the chosen model) measures on the first samples
# until their outputs hold this many values, at most RANKING_SAMPLES: a detector's map of 640x640 gives a stable figure from one
# sample, a classifier's scores need several.
RANKING_VALUES = 2**18
RANKING_SAMPLES = 8

# A bisection stops once it knows the fewest layers float to within this share of the layers
# it orders (at least one): a layer or two more float barely changes speed or size, and each
# step costs a quantization and a measurement (PicoDet, 419 layers: 3 steps of 3 s fewer).
BISECT_RESOLUTION = 1 / 32

# Measuring every layer in isolation may take at most the time of this many trials; layers not
# reached by then are ranked by the noise they add in the quantized model, which puts the
# layers that stand out first. On the benchmark's EfficientNet-Lite0, PP-OCRv4 recognizer and
# PicoDet no layer stands out and this family's candidate was never the one chosen, while 8
# trials' time was a third of EfficientNet-Lite0's quantization time (4.7 of 13.5 s).
RANKING_TRIALS = 4


@dataclasses.dataclass
class QuantizedFrom:
    """How a quantized model was made from its float model, to make it again with other choices.

    Attributes:
        float_model: the model just before quantization.
        ranges: the calibrated (low, high) of each tensor.
        problems: tensors that had to stay float, with the reason.
        options: the quantizer's options.
        create_bias: bias correction's setting, or None when biases were not corrected.
        means: per-channel means for bias correction, when biases were corrected.
        rounding: how the weights were rounded, when not to nearest.
    """

    float_model: ir.Model
    ranges: Mapping[str, tuple[float, float]]
    problems: Mapping[str, str]
    options: QuantizationOptions
    create_bias: bool | None = None
    means: ChannelMeans | None = None
    rounding: WeightRounding | None = None

    def quantized_with_float(
        self, float_layers: Iterable[str]
    ) -> tuple[ir.Model, QuantizationReport]:
        """The float model quantized again, with ``float_layers`` kept float too."""
        return quantized_copy(
            self.float_model, self.ranges, self.problems, self.options, float_layers, self.rounding
        )


@dataclasses.dataclass
class FallbackOutcome:
    """How the search ended.

    Attributes:
        kept_float: the layers kept float.
        outputs: the fidelity of every output of the chosen model.
        budget_met: whether the chosen model meets the budget.
        quantized_layers: how many layers the chosen model still quantizes.
        trials: how many quantizations the search measured.
        stopped: why the search ended, in words.
        budget: the budget it searched for.
        speedup: the chosen model's speed over the float model's (one thread), when timed.
        against: what ``outputs`` and the budget were measured against: ``original``, the
            run's input model, or ``float``, the float model quantized.
    """

    kept_float: list[str]
    outputs: list[OutputFidelity]
    budget_met: bool
    quantized_layers: int
    trials: int
    stopped: str
    budget: Thresholds
    speedup: float | None = None
    against: Literal["original", "float"] = "original"


@dataclasses.dataclass
class FallbackResult:
    """The model the search chose.

    Attributes:
        model: that model: the quantized model given, or a new one quantized again.
        outcome: how the search ended.
        report: the quantizer's report of a new model; None when the given one was chosen.
        bias_correction: bias correction's report of a new model, when biases are corrected.
        layers: the SQNR of every quantized tensor of ``model``, worst first.
    """

    model: ir.Model
    outcome: FallbackOutcome
    report: QuantizationReport | None
    bias_correction: BiasCorrectionReport | None
    layers: list[LayerSqnr]


@dataclasses.dataclass
class _Trial:
    """A quantization with some layers float, and how its outputs compare; the model is
    dropped (None) once the search no longer needs it."""

    float_layers: tuple[str, ...]
    model: ir.Model | None
    outputs: list[OutputFidelity]
    met: bool
    report: QuantizationReport | None = None
    bias_report: BiasCorrectionReport | None = None
    speedup: float | None = None


def keep_sensitive_layers_float(
    quantized: ir.Model,
    quantized_nodes: Sequence[str],
    source: QuantizedFrom,
    comparison: ReferenceComparison,
    budget: Thresholds,
    *,
    min_speedup: float | None = None,
    max_seconds: float | None = None,
    quantized_speedup: float | None = None,
    progress: Progress = QUIET,
) -> FallbackResult:
    """The fastest quantization that meets ``budget``, with as few layers float as it takes.

    Args:
        quantized: the quantized model; not changed.
        quantized_nodes: its quantized nodes.
        source: how it was made, to quantize again with layers float.
        comparison: what the outputs are measured against (the run's validation samples).
        budget: what the outputs must reach.
        min_speedup: the chosen model must run at least this much faster than the float model
            (one thread, timed on the first sample); else the float model is chosen. None skips
            timing and keeps the candidate with the fewest layers float.
        max_seconds: stop searching after this long, with the best model known to meet the
            budget (at worst the float model); None for no limit.
        quantized_speedup: the speed of ``quantized`` against float, when it is known already
            (``speed_check`` timed a quantization of the same nodes); else it is timed.
        progress: shows the quantizations tried.
    """
    search = _Search(source, comparison, budget, quantized_nodes, progress, max_seconds)
    first = _Trial(
        (), quantized, *_judge(comparison, quantized, budget, source.options.target.runtime)
    )
    first.speedup = quantized_speedup if min_speedup is not None else None
    search.trials += 1
    if first.met:
        candidates = [first]
        stopped = _kept(first, len(quantized_nodes), budget)
    else:
        candidates, stopped = search.fastest(first, min_speedup)
        if not stopped:
            candidates += search.candidates(quantized)
    chosen, stopped = _choose(search, candidates, min_speedup, stopped)
    layers = layer_sqnr(source.float_model, chosen.model, _ranking_feeds(comparison))
    still_quantized = chosen.report.quantized if chosen.report else quantized_nodes
    outcome = FallbackOutcome(
        list(chosen.float_layers),
        chosen.outputs,
        chosen.met,
        len(still_quantized),
        search.trials,
        stopped,
        budget,
        chosen.speedup,
    )
    logger.info("fallback: %s", stopped)
    return FallbackResult(
        chosen.model,
        outcome,
        chosen.report if chosen is not first else None,
        chosen.bias_report,
        layers,
    )


def _choose(
    search: _Search, candidates: list[_Trial], min_speedup: float | None, stopped: str
) -> tuple[_Trial, str]:
    """The candidate to keep: the fastest that is fast enough, else the float model."""
    meeting = [trial for trial in candidates if trial.met]
    total = len(search.nodes)
    if min_speedup is None:
        best = min(meeting, key=lambda trial: len(trial.float_layers), default=None)
        if best is not None and len(best.float_layers) < total:
            return best, stopped or _kept(best, total, search.budget)
        return _all_float(search.float_model())
    timed = [trial for trial in meeting if len(trial.float_layers) < total]
    if stopped and not timed:
        return search.float_model(), stopped
    for trial in timed:
        if trial.speedup is None:
            trial.speedup = search.speedup(trial.model)
    fast = [trial for trial in timed if trial.speedup >= min_speedup]
    if timed and not fast:
        # Slower than float: try leaving float what int8 speeds up least.
        base = min(timed, key=lambda trial: len(trial.float_layers))
        for trial in search.lighter(base, min_speedup):
            if trial.met and len(trial.float_layers) < total:
                timed.append(trial)
        fast = [trial for trial in timed if trial.speedup >= min_speedup]
    if fast:
        best = max(fast, key=lambda trial: trial.speedup)
        return best, stopped or _kept(best, total, search.budget)
    float_model = search.float_model()
    if timed:
        best = max(timed, key=lambda trial: trial.speedup)
        return float_model, (
            f"int8 would be slower than float: the fastest quantization that meets the budget "
            f"({_kept(best, total, search.budget)}) runs at {best.speedup:.2f}x, below min_speedup "
            f"{min_speedup:g}; every layer kept float"
        )
    return _all_float(float_model)


def _all_float(float_model: _Trial) -> tuple[_Trial, str]:
    if float_model.met:
        return float_model, "int8 cannot meet the budget: every quantized layer kept float"
    return float_model, "even the float model misses the budget: every quantized layer kept float"


def _described(trial: _Trial, total: int) -> str:
    if not trial.float_layers:
        return "every layer quantized"
    return f"{len(trial.float_layers)} of {total} layers float"


def _kept(trial: _Trial, total: int, budget: Thresholds) -> str:
    if budget.empty:
        return f"no fidelity budget: {_described(trial, total)}"
    if not trial.float_layers:
        return "budget met with every layer quantized"
    return f"budget met with {len(trial.float_layers)} of {total} layers kept float"


def _judge(
    comparison: ReferenceComparison, model: ir.Model, budget: Thresholds, runtime_name: str
) -> tuple[list[OutputFidelity], bool]:
    outputs = comparison.measure(model, rtol=budget.rtol, runtime_name=runtime_name)
    return outputs, meets(outputs, budget)


class _Search:
    """Quantizations with chosen layers float, judged against the budget, each made once."""

    def __init__(
        self,
        source: QuantizedFrom,
        comparison: ReferenceComparison,
        budget: Thresholds,
        nodes: Sequence[str],
        progress: Progress,
        max_seconds: float | None,
    ):
        self.source = source
        self.comparison = comparison
        self.budget = budget
        self.nodes = list(nodes)
        self.progress = progress
        self.deadline = None if max_seconds is None else time.perf_counter() + max_seconds
        self.trials = 0
        self._made: dict[frozenset[str], _Trial] = {}
        self._trial_seconds = 0.0

    def candidates(self, quantized: ir.Model) -> list[_Trial]:
        """The shortest float prefix that meets the budget; when that is long, the shortest
        float suffix; when both are long, the fewest most sensitive layers that do. A later
        family looks only for candidates with fewer layers float than one already found."""
        float_order = [node.name for node in self.source.float_model.graph]
        quantized_nodes = set(self.nodes)
        order = [name for name in float_order if name in quantized_nodes]
        longest_end = len(self.nodes) * END_SHARE
        found = [self.bisect(order, "keeping the first layers float")]
        if len(found[-1].float_layers) > longest_end and not self.out_of_time():
            found.append(
                self.bisect(order[::-1], "keeping the last layers float", _fewest_float(found))
            )
        if (
            all(trial is None or len(trial.float_layers) > longest_end for trial in found)
            and not self.out_of_time()
        ):
            ranking_deadline = time.perf_counter() + RANKING_TRIALS * self.trial_seconds()
            if self.deadline is not None:
                ranking_deadline = min(ranking_deadline, self.deadline)
            ranking = _ranking(
                self.source, quantized, self.nodes, self.comparison, ranking_deadline
            )
            found.append(
                self.bisect(
                    ranking, "keeping the most sensitive layers float", _fewest_float(found)
                )
            )
        return [trial for trial in found if trial is not None]

    def fastest(self, first: _Trial, min_speedup: float | None) -> tuple[list[_Trial], str]:
        """Before searching: whether int8 at its fastest beats float by ``min_speedup``.

        Every layer quantized, and its ``lighter`` variants, are about as fast as a
        quantization of this model gets (keeping more layers float adds float work). When none
        reaches ``min_speedup``, no search can, and the answer is the reason to keep the model
        float. Otherwise, the lighter variants that meet the budget, timed, and "".
        """
        if min_speedup is None:
            return [], ""
        if first.speedup is None:
            first.speedup = self.speedup(first.model)
        if first.speedup >= min_speedup:
            return [], ""
        variants = self.lighter(first, min_speedup)
        best = max([first, *variants], key=lambda trial: trial.speedup or 0.0)
        if best.speedup is not None and best.speedup >= min_speedup:
            return [variant for variant in variants if variant.met], ""
        total = len(self.nodes)
        return [], (
            f"int8 would be slower than float: at its fastest ({_described(best, total)}) it "
            f"runs at {best.speedup:.2f}x, below min_speedup {min_speedup:g}; every layer kept "
            "float"
        )

    def trial_seconds(self) -> float:
        """The mean time a trial has taken so far."""
        return self._trial_seconds / max(len(self._made), 1)

    def bisect(
        self, order: list[str], description: str, fewer_than: int | None = None
    ) -> _Trial | None:
        """The trial with the shortest prefix of ``order`` float that meets the budget, to
        within BISECT_RESOLUTION of the length of ``order``.

        The whole of ``order`` float is the float model, taken to meet the budget until tried.
        With ``fewer_than``, only prefixes shorter than that are tried, and None is the answer
        when the longest of them misses the budget.
        """
        low, high = 0, len(order)
        passing = None
        if fewer_than is not None and fewer_than - 1 < high:
            high = max(fewer_than - 1, 0)
            passing = self.trial(order[:high])
            if not passing.met:
                return None
        resolution = max(1, math.ceil(len(order) * BISECT_RESOLUTION))
        steps = math.ceil(math.log2(high / resolution + 1))
        with self.progress.task(description, steps) as advance:
            while high - low > resolution and not self.out_of_time():
                middle = (low + high) // 2
                trial = self.trial(order[:middle])
                advance(1)
                if trial.met:
                    high, passing = middle, trial
                else:
                    low = middle
        found = passing if passing is not None else self.trial(order[:high])
        self._forget_missed_models()
        return found

    def _forget_missed_models(self) -> None:
        """Drop the models of trials that missed the budget, but the float model's: none can
        be chosen, and each is a copy of the whole model."""
        for trial in self._made.values():
            if not trial.met and len(trial.float_layers) < len(self.nodes):
                trial.model = None
        runtime.release_freed_memory()

    def float_model(self) -> _Trial:
        return self.trial(self.nodes)

    def lighter(self, base: _Trial, min_speedup: float) -> list[_Trial]:
        """``base`` with, in turn, each of ``speed_check.lighter_variants`` float too.

        Each is timed first, and judged against the budget only if it runs ``min_speedup``
        times faster than float: one too slow to choose need not be measured (it counts as
        missing the budget)."""
        quantized = set(self.nodes)
        variants = lighter_variants(
            node for node in self.source.float_model.graph if node.name in quantized
        )
        trials = []
        for _, extra in variants:
            if not extra <= set(base.float_layers):
                float_layers = [*base.float_layers, *sorted(extra - set(base.float_layers))]
                trials.append(self._timed_trial(float_layers, min_speedup))
        return trials

    def _timed_trial(self, float_layers: Sequence[str], min_speedup: float) -> _Trial:
        """The trial of ``float_layers``, timed; judged only if it reaches ``min_speedup``."""
        known = self._made.get(frozenset(float_layers))
        if known is not None and known.model is not None:
            if known.speedup is None:
                known.speedup = self.speedup(known.model)
            return known
        model, report, bias_report = self._quantized(float_layers)
        speedup = self.speedup(model)
        if speedup < min_speedup:
            self.trials += 1
            logger.debug("%d layers float: %.2fx, too slow to judge", len(float_layers), speedup)
            return _Trial(tuple(float_layers), None, [], False, report, bias_report, speedup)
        trial = self.trial(float_layers, (model, report, bias_report))
        trial.speedup = speedup
        return trial

    def trial(
        self,
        float_layers: Sequence[str],
        quantized: tuple[ir.Model, QuantizationReport, BiasCorrectionReport | None] | None = None,
    ) -> _Trial:
        """The float model quantized with ``float_layers`` float (or ``quantized``, that
        quantization made already), and judged."""
        key = frozenset(float_layers)
        if key in self._made:
            return self._made[key]
        self.trials += 1
        start = time.perf_counter()
        model, report, bias_report = quantized or self._quantized(float_layers)
        outputs, met = _judge(
            self.comparison, model, self.budget, self.source.options.target.runtime
        )
        logger.debug(
            "%d layers float: budget %s; %s",
            len(float_layers),
            "met" if met else "missed",
            _describe(outputs),
        )
        trial = _Trial(tuple(float_layers), model, outputs, met, report, bias_report)
        self._made[key] = trial
        self._trial_seconds += time.perf_counter() - start
        return trial

    def _quantized(
        self, float_layers: Sequence[str]
    ) -> tuple[ir.Model, QuantizationReport, BiasCorrectionReport | None]:
        model, report = self.source.quantized_with_float(float_layers)
        bias_report = None
        if self.source.create_bias is not None and self.source.means is not None:
            bias_report = correct_biases(
                model, self.source.float_model, self.source.means, self.source.create_bias
            )
        return model, report, bias_report

    def speedup(self, model: ir.Model) -> float:
        """How much faster ``model`` runs than the float model, one thread, on the first sample."""
        return time_against_float(
            self.source.float_model,
            model,
            self.comparison.feeds[0],
            self.source.options.target.runtime,
        )

    def out_of_time(self) -> bool:
        return self.deadline is not None and time.perf_counter() > self.deadline


def _fewest_float(trials: Sequence[_Trial | None]) -> int | None:
    """The fewest layers float of the trials that meet the budget; None when none does."""
    return min(
        (len(trial.float_layers) for trial in trials if trial is not None and trial.met),
        default=None,
    )


def _describe(outputs: Sequence[OutputFidelity]) -> str:
    parts = []
    for output in outputs:
        text = f"{output.name}: cosine {output.cosine:.5f}"
        if output.expected_top1_agreement is not None:
            text += f", expected top-1 {output.expected_top1_agreement:.3f}"
        parts.append(text)
    return "; ".join(parts)


def _ranking(
    source: QuantizedFrom,
    quantized: ir.Model,
    quantized_nodes: Sequence[str],
    comparison: ReferenceComparison,
    deadline: float | None,
) -> list[str]:
    """Every quantized node, the ones whose quantization alone hurts the outputs most first.

    Each node is measured in isolation: the float model with that node alone quantized, on the
    ranking samples, as the noise-to-signal ratio of the outputs. That accounts for how
    much of a layer's noise reaches the outputs, which the noise a layer adds where it sits does
    not (a noisy layer before a normalizing one may not matter). Nodes left unmeasured at the
    deadline follow, ranked by the noise each adds in the fully quantized model.
    """
    feeds = _ranking_feeds(comparison)
    measured = noise_points(source.float_model, quantized, quantized_nodes)
    noise = compare_tensors(source.float_model, quantized, feeds, measured)
    added = node_added_noise(source.float_model, quantized, noise, quantized_nodes)
    by_added = [*added, *(name for name in quantized_nodes if name not in added)]
    isolated: dict[str, float] = {}
    for name in by_added:
        if deadline is not None and time.perf_counter() > deadline:
            break
        model, _ = source.quantized_with_float(other for other in quantized_nodes if other != name)
        session = runtime.sample_session(model, source.options.target.runtime)
        isolated[name] = _output_noise_ratio(comparison, feeds, runtime.run(session, feeds))
        del model, session
        runtime.release_freed_memory()
    ranked = sorted(isolated, key=lambda name: -isolated[name])
    return [*ranked, *(name for name in by_added if name not in isolated)]


def _output_noise_ratio(
    comparison: ReferenceComparison, feeds: Sequence[Feed], outputs: Sequence[Sequence[np.ndarray]]
) -> float:
    """Noise power over signal power of the outputs of the first ``feeds`` of ``comparison``,
    summed over the float outputs; padded positions are left out, as validation leaves them."""
    total = 0.0
    for feed, expected_sample, actual_sample in zip(
        feeds, comparison.reference_outputs, outputs, strict=False
    ):
        for expected, actual in zip(
            comparison.unpadded(feed, expected_sample),
            comparison.unpadded(feed, actual_sample),
            strict=True,
        ):
            if np.asarray(expected).dtype.kind != "f":
                continue
            expected = np.asarray(expected, dtype=np.float64)
            signal = float(np.sum(expected**2)) or 1.0
            total += float(np.sum((np.asarray(actual, dtype=np.float64) - expected) ** 2)) / signal
    return total


def _ranking_feeds(comparison: ReferenceComparison) -> list[Feed]:
    """The first samples whose outputs hold RANKING_VALUES values, at most RANKING_SAMPLES."""
    values = 0
    for count, outputs in enumerate(comparison.reference_outputs[:RANKING_SAMPLES], start=1):
        values += sum(np.asarray(output).size for output in outputs)
        if values >= RANKING_VALUES:
            return list(comparison.feeds[:count])
    return list(comparison.feeds[:RANKING_SAMPLES])
