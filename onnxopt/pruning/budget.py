"""Budget-driven sparsity: the highest share of zeros whose model still meets a fidelity budget.

Every candidate is judged exactly as the validate pass judges the written model: through the
run's one ``ReferenceComparison`` (the same samples, the same metrics), so a budget the search
reports met is a budget validation finds met. Pruning is monotone enough in practice (more
zeros, larger error) for a bisection over a grid of shares; every model measured is in the
report. The search always ends with a model that meets the budget: at worst the original,
unpruned, and the report says so.

Unstructured patterns search the share of zeros (in RATIO_STEP steps up to MAX_RATIO), with
the allocation across layers chosen once, at the first share tried, among the candidates
``sparsify.allocations`` offers, by its margin to the budget (the layers' sensitivity is
measured at that share too). N:M patterns fix the share inside a pruned layer, so the search is
over how many layers stay dense: the layers whose pruning changed their output most (relative
to it) are kept dense first.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import numpy as np
import onnx_ir as ir

from onnxopt.errors import InputError
from onnxopt.fidelity import ReferenceComparison
from onnxopt.metrics import OutputFidelity
from onnxopt.progress import QUIET, Progress
from onnxopt.pruning.sparsify import (
    PreparedLayers,
    PrunedLayers,
    SparsityReport,
    SparsitySettings,
    SparsityTrial,
    allocations,
    closeness,
    prepare_layers,
    prune_layers,
)
from onnxopt.runtime import Feed
from onnxopt.validation import Thresholds, budget_margin, meets

logger = logging.getLogger(__name__)

# The shares of zeros the search tries: multiples of RATIO_STEP up to MAX_RATIO.
RATIO_STEP = 0.05
MAX_RATIO = 0.9

Judge = Callable[[PrunedLayers], tuple[bool, list[OutputFidelity]]]


def describe_budget(budget: Thresholds) -> str:
    """The budget as the report shows it, e.g. ``cosine >= 0.99, top-1 agreement >= 0.97``."""
    parts = []
    if budget.min_cosine is not None:
        parts.append(f"cosine >= {budget.min_cosine:g}")
    if budget.min_sqnr_db is not None:
        parts.append(f"SQNR >= {budget.min_sqnr_db:g} dB")
    if budget.min_top1_agreement is not None:
        parts.append(f"top-1 agreement >= {budget.min_top1_agreement:g}")
    return ", ".join(parts) or "none"


def sparsify_to_budget(
    model: ir.Model,
    feeds: Sequence[Feed],
    settings: SparsitySettings,
    comparison: ReferenceComparison,
    budget: Thresholds,
    progress: Progress = QUIET,
    labels: Sequence[np.ndarray] | None = None,
) -> SparsityReport:
    """Prune ``model`` in place to the highest sparsity that meets ``budget`` on
    ``comparison``; ``settings.ratio`` is ignored (the search sets it). ``labels``: the
    feeds' class indices, for the gradient importances' task loss.

    Raises InputError when there is nothing to compare on or nothing to prune.
    """
    if not comparison.feeds or comparison.problem is not None:
        raise InputError(
            "sparsify.ratio = 'auto' needs samples the original model runs on, to measure "
            "each candidate: " + (comparison.problem or "there are none"),
            fix="pass --calib DATA, or set sparsify.ratio to a share such as 0.5",
        )
    prepared = prepare_layers(model, feeds, settings, progress, labels)

    def judge(pruned: PrunedLayers) -> tuple[bool, list[OutputFidelity]]:
        candidate = model.clone()
        pruned.apply(candidate)
        outputs = comparison.measure(candidate, rtol=budget.rtol)
        return meets(outputs, budget), outputs

    report = SparsityReport(
        dense=dict(prepared.dense),
        budget=describe_budget(budget),
        gradient_loss=prepared.gradient_loss,
    )
    if settings.pattern.structured:
        chosen = _fewest_dense_layers(prepared, judge, report, progress)
    else:
        chosen = _highest_ratio(prepared, judge, budget, report, progress)
    report.budget_met = True
    if chosen is None:
        logger.info("no sparsity met the budget (%s): the model stays dense", report.budget)
        report.dense.update({node.name: "no sparsity met the budget" for node in prepared.layers})
        return report
    report.allocation = chosen.label
    for name in {node.name for node in prepared.layers} - chosen.layers.keys():
        report.dense[name] = "kept dense to meet the budget"
    report.layers = chosen.apply(model)
    return report


def _highest_ratio(
    prepared: PreparedLayers,
    judge: Judge,
    budget: Thresholds,
    report: SparsityReport,
    progress: Progress,
) -> PrunedLayers | None:
    """The pruned layers at the highest grid share that meets the budget, by bisection."""
    grid = [round(RATIO_STEP * step, 4) for step in range(1, round(MAX_RATIO / RATIO_STEP) + 1)]
    low, high = -1, len(grid)  # grid[low] met (or nothing tried), grid[high] did not
    best: PrunedLayers | None = None
    allocation_index: int | None = None
    # The first share's candidates, before the search's bar: they measure the layers'
    # sensitivity, with a bar of their own.
    first_candidates = allocations(prepared, grid[(low + high) // 2], progress)
    with progress.task("searching the sparsity that meets the budget") as advance:
        while high - low > 1:
            middle = (low + high) // 2
            ratio = grid[middle]
            if allocation_index is None:
                pruned, met, allocation_index = _best_allocation(
                    prepared, first_candidates, ratio, judge, report, budget
                )
            else:
                label, ratios = allocations(prepared, ratio)[allocation_index]
                pruned = prune_layers(prepared, label, ratios)
                met = _record(report, judge, pruned, ratio, 0)
            if met:
                low, best = middle, pruned
            else:
                high = middle
            advance(1)
    return best


def _best_allocation(
    prepared: PreparedLayers,
    candidates: list[tuple[str, dict[str, float]]],
    ratio: float,
    judge: Judge,
    report: SparsityReport,
    budget: Thresholds,
) -> tuple[PrunedLayers, bool, int]:
    """Every candidate allocation at ``ratio``, judged; the one farthest inside the budget
    (``validation.budget_margin``), then closest to the original; whether it met the budget,
    and its index among the candidates.

    The margin, not closeness: the search goes on to higher shares with the allocation chosen
    here, and what fails there is the budget's binding check (the worst output's cosine, say),
    which closeness (a mean SQNR over outputs, or the top-1 agreement alone) may not follow."""
    best: tuple[tuple[bool, float, float], PrunedLayers, int] | None = None
    for index, (label, ratios) in enumerate(candidates):
        pruned = prune_layers(prepared, label, ratios)
        met, outputs = judge(pruned)
        _append(report, pruned, ratio, 0, met, outputs)
        if len(candidates) > 1:
            report.candidate_closeness[label] = closeness(outputs)
        margin = budget_margin(outputs, budget)
        key = (met, 0.0 if margin is None else margin, closeness(outputs))
        if best is None or key > best[0]:
            best = (key, pruned, index)
    (met, _, _), pruned, index = best
    return pruned, met, index


def _fewest_dense_layers(
    prepared: PreparedLayers, judge: Judge, report: SparsityReport, progress: Progress
) -> PrunedLayers | None:
    """Every layer pruned N:M, then, by bisection, the fewest layers (largest output change
    first) left dense for the rest to meet the budget."""
    share = prepared.settings.share
    label, ratios = allocations(prepared, share)[0]
    pruned = prune_layers(prepared, label, ratios)
    order = sorted(
        pruned.layers,
        key=lambda name: -(pruned.layers[name][1].output_error or 0.0),
    )
    low, high = -1, len(order)  # keeping order[:high] dense met (all dense meets trivially)
    best: PrunedLayers | None = None
    with progress.task("searching the layers to keep dense") as advance:
        while high - low > 1:
            middle = (low + high) // 2
            candidate = pruned.without(set(order[:middle]))
            if _record(report, judge, candidate, share, middle):
                high, best = middle, candidate
            else:
                low = middle
            advance(1)
    return best


def _record(
    report: SparsityReport, judge: Judge, pruned: PrunedLayers, ratio: float, dense: int
) -> bool:
    met, outputs = judge(pruned)
    _append(report, pruned, ratio, dense, met, outputs)
    return met


def _append(
    report: SparsityReport,
    pruned: PrunedLayers,
    ratio: float,
    dense: int,
    met: bool,
    outputs: list[OutputFidelity],
) -> None:
    agreements = [
        output.expected_top1_agreement
        for output in outputs
        if output.expected_top1_agreement is not None
    ]
    trial = SparsityTrial(
        ratio=ratio,
        allocation=pruned.label,
        dense_layers=dense,
        budget_met=met,
        cosine=min((output.cosine for output in outputs), default=1.0),
        top1_agreement=min(agreements) if agreements else None,
    )
    logger.info("sparsity trial %s", trial)
    report.trials.append(trial)
