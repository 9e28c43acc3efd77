"""Zeros in the weights of every Conv, Gemm and MatMul: unstructured or N:M, chosen by an
importance, the remaining weights reconstructed (SparseGPT) by default."""

from __future__ import annotations

import dataclasses
import logging
import math
import re
from collections.abc import Sequence
from typing import Literal

import numpy as np
import onnx_ir as ir

from onnxopt import runtime
from onnxopt.calibration.moments import (
    InputMoments,
    collect_hessians,
    input_layout,
    weight_rows,
)
from onnxopt.errors import InputError
from onnxopt.metrics import OutputFidelity, class_score_outputs, compare_outputs
from onnxopt.progress import QUIET, Progress
from onnxopt.pruning.allocation import (
    BLENDS,
    candidate_ratios,
    global_ratios,
    output_power,
    saliencies,
)
from onnxopt.pruning.importance import (
    NEEDS_GRADIENTS,
    NEEDS_MOMENTS,
    Importance,
    gradient_loss,
    gradient_magnitudes,
    magnitude_scores,
    wanda_scores,
)
from onnxopt.pruning.patterns import SparsityPattern, n_m_mask, smallest_mask
from onnxopt.pruning.quantized import quantized_model_error
from onnxopt.pruning.sensitivity import output_sensitivities, sensitivity_factors
from onnxopt.pruning.sparsegpt import refit, sparsegpt
from onnxopt.runtime import Feed

logger = logging.getLogger(__name__)

# Calibration samples candidate allocations are compared on, at most.
EVALUATION_SAMPLES = 32

# Input moments measured in all (fit and check, float32, layers in graph order). The layers
# past it are pruned by magnitude, unreconstructed and left out of the allocation. Four times
# what int8's GPTQ measures (``moments.MAX_HESSIAN_BYTES``): sparsity's accuracy rests on the
# reconstruction, and the real models measured need 368 MB at most (dlib's face ResNet; with
# 128 MB, 6 of its 28 layers, 64% of its weights, went without).
MAX_HESSIAN_BYTES = 2**29


@dataclasses.dataclass(frozen=True)
class SparsitySettings:
    """What ``sparsify_model`` does.

    Attributes:
        ratio: the share of each layer's weights zeroed (unstructured patterns).
        pattern: unstructured, or N:M along each layer's input columns.
        importance: how weights are chosen (``importance.IMPORTANCES``).
        reconstruct: update the remaining weights so each layer's output on the calibration
            samples moves least (SparseGPT, then ``refit_steps`` of a least-squares refit);
            False zeros them and changes nothing else.
        refit_steps: conjugate-gradient steps of the refit after SparseGPT (0: none).
        allocation: how ``ratio`` is shared among layers (unstructured SparseGPT only; the
            others prune every layer alike): ``uniform``, ``global`` (by saliency model-wide,
            ``allocation``), ``sensitivity`` (global, each layer's saliencies scaled by how much
            of its error reaches the outputs, ``sensitivity``), or ``auto``: whichever of
            uniform, global, sensitivity and halfway to each keeps the outputs closest to the
            original's on the calibration samples.
        exclude: regular expressions; layers whose node name matches one stay dense.
        protect_first_last: the first and last prunable layers stay dense (the input stem and
            the classifier or projection head, which small models depend on most).
    """

    ratio: float = 0.5
    pattern: SparsityPattern = dataclasses.field(default_factory=SparsityPattern)
    importance: Importance = "sparsegpt"
    reconstruct: bool = True
    refit_steps: int = 30
    allocation: Literal["auto", "uniform", "global", "sensitivity"] = "auto"
    exclude: tuple[str, ...] = ()
    protect_first_last: bool = True

    @property
    def share(self) -> float:
        """The share of zeros each pruned layer gets."""
        return self.pattern.ratio if self.pattern.structured else self.ratio


@dataclasses.dataclass(frozen=True)
class LayerSparsity:
    """One pruned layer: its share of zeros, how its weights were chosen and changed, and its
    output error on the calibration samples relative to its output (None when unmeasured)."""

    node: str
    weight: str
    op_type: str
    parameters: int
    sparsity: float
    method: str
    output_error: float | None


@dataclasses.dataclass(frozen=True)
class SparsityTrial:
    """One model the budget search measured: the share of zeros asked of the pruned layers,
    the allocation, how many prunable layers it left dense, whether it met the budget and
    its worst figures (lowest cosine; lowest expected top-1 agreement of class scores)."""

    ratio: float
    allocation: str
    dense_layers: int
    budget_met: bool
    cosine: float
    top1_agreement: float | None


@dataclasses.dataclass
class SparsityReport:
    """Every pruned layer, every layer left dense with the reason, the allocation chosen and
    how close each candidate allocation stayed to the original (``_closeness``: expected
    top-1 agreement in % for class scores, else SQNR in dB). A budget-driven run
    (``budget.sparsify_to_budget``) adds the budget, each model it measured, and whether the
    result met the budget. ``gradient_loss``: the loss a gradient importance used
    (``importance.gradient_loss``), else None."""

    layers: list[LayerSparsity] = dataclasses.field(default_factory=list)
    dense: dict[str, str] = dataclasses.field(default_factory=dict)
    allocation: str = "uniform"
    candidate_closeness: dict[str, float] = dataclasses.field(default_factory=dict)
    budget: str | None = None
    trials: list[SparsityTrial] = dataclasses.field(default_factory=list)
    budget_met: bool | None = None
    gradient_loss: str | None = None

    @property
    def sparsity(self) -> float:
        """Zeros over the weights of the pruned layers."""
        total = sum(layer.parameters for layer in self.layers)
        zeros = sum(layer.parameters * layer.sparsity for layer in self.layers)
        return zeros / total if total else 0.0


def prunable_layers(
    model: ir.Model, settings: SparsitySettings
) -> tuple[list[ir.Node], dict[str, str]]:
    """The layers ``settings`` lets be pruned, in graph order, and the others with the reason.
    Of the layers that share one weight, only the first is listed: the weight is pruned once,
    for all of them (``sharing_layers``)."""
    candidates: list[ir.Node] = []
    dense: dict[str, str] = {}
    patterns = [re.compile(expression) for expression in settings.exclude]
    for node in model.graph:
        layout = input_layout(node)
        if layout is None:
            continue
        weight = node.inputs[1]
        sharing = sharing_layers(node)
        if weight.const_value.dtype not in (ir.DataType.FLOAT, ir.DataType.FLOAT16):
            dense[node.name] = f"weight of type {weight.const_value.dtype.name}"
        elif sharing is None:
            dense[node.name] = "weight shared with nodes that are not layers of the same kind"
        elif sharing and sharing[0] is not node:
            continue
        elif any(pattern.search(node.name) for pattern in patterns):
            dense[node.name] = "excluded"
        elif settings.pattern.structured and (
            layout.column_count(weight.const_value.shape) % settings.pattern.group
        ):
            columns = layout.column_count(weight.const_value.shape)
            dense[node.name] = f"{columns} input columns do not divide into {settings.pattern}"
        else:
            candidates.append(node)
    if settings.protect_first_last and candidates:
        for node in {
            candidates[0].name: candidates[0],
            candidates[-1].name: candidates[-1],
        }.values():
            dense[node.name] = "first or last layer (protect_first_last)"
            candidates.remove(node)
    return candidates, dense


def sharing_layers(node: ir.Node) -> list[ir.Node] | None:
    """Every layer that reads ``node``'s weight, in graph order, where more than one does (the
    time steps of an unrolled RNN, the branches of a siamese network), all reading it the same
    way; [] where only ``node`` reads it; None where it has readers of another kind."""
    weight = node.inputs[1]
    uses = weight.uses()
    if len(uses) == 1:
        return []
    layout = dataclasses.replace(input_layout(node), input="")
    readers = []
    for use in uses:
        other = input_layout(use.node) if use.idx == 1 else None
        if other is None or dataclasses.replace(other, input="") != layout:
            return None
        if use.node.op_type != node.op_type:
            return None
        readers.append(use.node)
    order = {id(one): index for index, one in enumerate(node.graph or ())}
    return sorted(readers, key=lambda one: order.get(id(one), 0))


@dataclasses.dataclass
class PreparedLayers:
    """What pruning needs, measured once on the calibration samples: the layers to prune, the
    layers left dense with the reason, each layer's input moments and weight gradients (and
    the loss they are of, ``importance.gradient_loss``; None without), the samples, each
    layer's sensitivity factor once an allocation has measured them (``allocations``), and the
    layers pruned uniformly to measure them, at ``uniform_share``: ``prune_layers`` reuses a
    layer pruned to the same share (the uniform candidate; the layers no allocation moves)."""

    model: ir.Model
    settings: SparsitySettings
    layers: list[ir.Node]
    dense: dict[str, str]
    moments: dict[str, InputMoments]
    gradients: dict[str, np.ndarray]
    gradient_loss: str | None = None
    feeds: Sequence[Feed] = ()
    sensitivity: dict[str, float] | None = None
    uniform: PrunedLayers | None = None
    uniform_share: float | None = None


@dataclasses.dataclass
class PrunedLayers:
    """One candidate's new weights and per-layer report, by node name; the model is unchanged
    until ``apply``."""

    label: str
    layers: dict[str, tuple[np.ndarray, LayerSparsity]]

    def apply(self, model: ir.Model) -> list[LayerSparsity]:
        """Write the new weights into ``model`` (the one pruned, or a clone of it)."""
        by_name = {node.name: node for node in model.graph}
        for name, (weight, _) in self.layers.items():
            value = by_name[name].inputs[1]
            value.const_value = ir.tensor(weight, name=value.name)
        return [layer for _, layer in self.layers.values()]

    def without(self, dense: set[str]) -> PrunedLayers:
        """The same candidate with the layers in ``dense`` left as they were."""
        return PrunedLayers(
            self.label, {name: item for name, item in self.layers.items() if name not in dense}
        )


def prepare_layers(
    model: ir.Model,
    feeds: Sequence[Feed],
    settings: SparsitySettings,
    progress: Progress = QUIET,
    labels: Sequence[np.ndarray] | None = None,
) -> PreparedLayers:
    """The layers ``settings`` lets be pruned, measured on ``feeds`` (with their ``labels``
    where given: the gradient importances then use the task loss).

    Raises InputError when nothing can be pruned, or when the importance or the
    reconstruction needs data and ``feeds`` is empty.
    """
    if not 0 <= settings.share < 1:
        raise InputError(
            f"sparsify.ratio = {settings.ratio} is outside [0, 1)",
            fix="give the share of weights to zero, such as 0.5",
        )
    _name_unnamed_layers(model)
    layers, dense = prunable_layers(model, settings)
    if not layers:
        raise quantized_model_error(model, "sparsify found no layer to prune") or InputError(
            "the model has no layer to prune: "
            + (
                "; ".join(f"{name}: {reason}" for name, reason in dense.items())
                or "no Conv, Gemm or MatMul with a constant weight in the main graph (layers "
                "inside If, Loop and Scan bodies are not pruned)"
            ),
            fix="relax sparsify.exclude or sparsify.protect_first_last, or pick another pattern",
        )
    needs_moments = settings.importance in NEEDS_MOMENTS or settings.reconstruct
    if needs_moments and not feeds:
        raise InputError(
            f"sparsify with importance = '{settings.importance}'"
            + (" and reconstruction" if settings.reconstruct else "")
            + " needs calibration data",
            fix="pass --calib DATA, or set sparsify.importance = 'magnitude' and "
            "sparsify.reconstruct = false",
        )
    gradients: dict[str, np.ndarray] = {}
    if settings.importance in NEEDS_GRADIENTS:
        names = [node.inputs[1].name for node in layers]
        gradients = gradient_magnitudes(model, feeds, names, progress, labels)
    moments = {}
    if needs_moments:
        readers = {node.name: sharing_layers(node) or [node] for node in layers}
        # A shared weight is pruned once, to keep the outputs of all its readers: one H over
        # all their inputs (their squared errors add up).
        shared = {
            reader.name: name
            for name, group in readers.items()
            if len(group) > 1
            for reader in group
        }
        measured = collect_hessians(
            model,
            [reader for group in readers.values() for reader in group],
            feeds,
            max_bytes=MAX_HESSIAN_BYTES,
            progress=progress,
            shared=shared,
            few_rows_diagonal=True,
        )
        moments = {
            name: measured[group[0].name]
            for name, group in readers.items()
            if group[0].name in measured
        }
    loss = gradient_loss(labels) if settings.importance in NEEDS_GRADIENTS else None
    return PreparedLayers(model, settings, layers, dense, moments, gradients, loss, feeds)


def _name_unnamed_layers(model: ir.Model) -> None:
    """Give every unnamed Conv, Gemm and MatMul a unique name: layers are told apart, and
    reported, by name."""
    taken = {node.name for node in model.graph if node.name}
    for index, node in enumerate(model.graph):
        if not node.name and input_layout(node) is not None:
            name = f"{node.op_type}_{index}"
            while name in taken:
                name += "_"
            node.name = name
            taken.add(name)


def sparsify_model(
    model: ir.Model,
    feeds: Sequence[Feed],
    settings: SparsitySettings,
    progress: Progress = QUIET,
    labels: Sequence[np.ndarray] | None = None,
) -> SparsityReport:
    """Prune ``model``'s layers in place as ``settings`` say; the report of what was done.
    ``labels``: the feeds' class indices, for the gradient importances' task loss.

    Raises InputError when nothing can be pruned, or when the importance or the
    reconstruction needs data and ``feeds`` is empty.
    """
    prepared = prepare_layers(model, feeds, settings, progress, labels)
    candidates = allocations(prepared, settings.share, progress)
    chosen, scores = _best_candidate(prepared, candidates, feeds, progress)
    report = SparsityReport(
        dense=prepared.dense,
        allocation=chosen.label,
        candidate_closeness=scores,
        gradient_loss=prepared.gradient_loss,
    )
    report.layers = chosen.apply(model)
    return report


def allocations(
    prepared: PreparedLayers, share: float, progress: Progress = QUIET
) -> list[tuple[str, dict[str, float]]]:
    """The per-layer shares to try for ``share`` overall, labelled: uniform alone, or
    (unstructured SparseGPT, two layers' inputs measured at least) the allocations
    ``settings.allocation`` asks for, among the layers whose inputs were measured in full; the
    others keep ``share`` (no saliencies, or saliencies from H's diagonal alone, which do not
    compare: let in, they lowered dlib's face ResNet's budget-driven sparsity from 25% to 15%).
    The sensitivity factors are measured at the first ``share`` asked for and kept in
    ``prepared``."""
    settings, moments = prepared.settings, prepared.moments
    uniform = {node.name: share for node in prepared.layers}
    layers = [node for node in prepared.layers if _allocatable(prepared, node.name)]
    allocates = (
        settings.allocation != "uniform"
        and not settings.pattern.structured
        and settings.importance == "sparsegpt"
        and len(layers) > 1
    )
    if not allocates:
        return [("uniform", uniform)]
    layer_saliencies = {}
    for node in layers:
        layout = input_layout(node)
        weight = node.inputs[1].const_value.numpy().astype(np.float32)
        rows, _ = weight_rows(weight, layout, layout.groups)
        layer_saliencies[node.name] = saliencies(rows, moments[node.name].fit)
    candidates = []
    if settings.allocation in ("auto", "sensitivity"):
        factors = _sensitivity(prepared, share, progress)
        if factors:
            weighted = {name: values * factors[name] for name, values in layer_saliencies.items()}
            if settings.allocation == "sensitivity":
                return [("sensitivity", uniform | global_ratios(weighted, share))]
            labels = {1.0: "sensitivity"}
            candidates = [
                (labels.get(blend, f"{blend:g} of the way to sensitivity"), uniform | ratios)
                for blend, ratios in zip(BLENDS, candidate_ratios(weighted, share), strict=True)
                if blend > 0
            ]
    if settings.allocation != "auto":
        return [("global", uniform | global_ratios(layer_saliencies, share))]
    labels = {0.0: "uniform", 1.0: "global"}
    return [
        (labels.get(blend, f"{blend:g} of the way to global"), uniform | ratios)
        for blend, ratios in zip(BLENDS, candidate_ratios(layer_saliencies, share), strict=True)
    ] + candidates


def _allocatable(prepared: PreparedLayers, name: str) -> bool:
    """Whether an allocation moves the layer's share: its input moments were measured in full."""
    moments = prepared.moments.get(name)
    return moments is not None and not moments.diagonal


def _sensitivity(prepared: PreparedLayers, share: float, progress: Progress) -> dict[str, float]:
    """Each layer's sensitivity factor (``sensitivity.sensitivity_factors``), measured with
    every layer pruned uniformly to ``share``, once; empty when it could not be measured."""
    if prepared.sensitivity is None:
        uniform = {node.name: share for node in prepared.layers}
        pruned = prune_layers(prepared, "uniform", uniform, progress)
        prepared.uniform, prepared.uniform_share = pruned, share
        weights = {
            name: weight
            for name, (weight, _) in pruned.layers.items()
            if _allocatable(prepared, name)
        }
        effects = output_sensitivities(prepared.model, weights, prepared.feeds, progress)
        errors = {name: layer.output_error for name, (_, layer) in pruned.layers.items()}
        prepared.sensitivity = sensitivity_factors(effects, errors)
    return prepared.sensitivity


def prune_layers(
    prepared: PreparedLayers, label: str, ratios: dict[str, float], progress: Progress = QUIET
) -> PrunedLayers:
    """Every prepared layer pruned to its share in ``ratios``; the model is not changed."""
    pruned = PrunedLayers(label, {})
    with progress.task(f"pruning layers ({label})", total=len(prepared.layers)) as advance:
        for node in prepared.layers:
            if prepared.uniform is not None and ratios[node.name] == prepared.uniform_share:
                pruned.layers[node.name] = prepared.uniform.layers[node.name]
            else:
                pruned.layers[node.name] = _prune_layer(
                    node,
                    prepared.moments.get(node.name),
                    prepared.gradients,
                    prepared.settings,
                    ratios[node.name],
                )
            advance(1)
    return pruned


def _best_candidate(
    prepared: PreparedLayers,
    candidates: list[tuple[str, dict[str, float]]],
    feeds: Sequence[Feed],
    progress: Progress,
) -> tuple[PrunedLayers, dict[str, float]]:
    """Each candidate pruned; with more than one, the one whose outputs are closest to the
    original's on the samples (``_closeness``), and the closeness of each by label."""
    held = list(feeds[:EVALUATION_SAMPLES])
    if len(candidates) == 1:
        label, ratios = candidates[0]
        return prune_layers(prepared, label, ratios, progress), {}
    reference = runtime.run(runtime.sample_session(prepared.model), held)
    best, best_score, scores = None, -math.inf, {}
    for label, ratios in candidates:
        pruned = prune_layers(prepared, label, ratios, progress)
        score = _closeness(prepared.model, pruned, held, reference)
        scores[label] = score
        if score > best_score:
            best, best_score = pruned, score
    return best, scores


def _closeness(
    model: ir.Model, pruned: PrunedLayers, feeds: list[Feed], reference: list[list[np.ndarray]]
) -> float:
    """How close ``model`` with ``pruned``'s weights stays to the original (``closeness``)."""
    candidate = model.clone()
    pruned.apply(candidate)
    outputs = runtime.run(runtime.sample_session(candidate), feeds)
    names = [value.name for value in model.graph.outputs]
    fidelities = compare_outputs(
        names, reference, outputs, class_outputs=class_score_outputs(model)
    )
    return closeness(fidelities)


def closeness(fidelities: Sequence[OutputFidelity]) -> float:
    """How close outputs stay to the original's, comparable across candidates: the expected
    top-1 agreement (in %) of outputs that hold class scores, as a classifier's user counts
    flipped decisions; else the mean SQNR (dB, at most 200) of the float outputs."""
    agreements = [
        fidelity.expected_top1_agreement
        for fidelity in fidelities
        if fidelity.expected_top1_agreement is not None
    ]
    if agreements:
        return 100.0 * float(np.mean(agreements))
    ratios = [
        min(fidelity.sqnr_db, 200.0) for fidelity in fidelities if fidelity.mismatched is None
    ]
    return float(np.mean(ratios)) if ratios else 0.0


def _prune_layer(
    node: ir.Node,
    moments: InputMoments | None,
    gradients: dict[str, np.ndarray],
    settings: SparsitySettings,
    ratio: float,
) -> tuple[np.ndarray, LayerSparsity]:
    """The layer's pruned weight (the model is not changed) and its report line."""
    weight_value = node.inputs[1]
    weight = weight_value.const_value.numpy()
    layout = input_layout(node)
    groups = layout.groups
    rows, restore = weight_rows(weight.astype(np.float32), layout, groups)
    hessians = moments.fit if moments is not None else None
    if hessians is not None and hessians.shape != (groups, rows.shape[2], rows.shape[2]):
        hessians = None
    importance = settings.importance
    if hessians is None and importance in NEEDS_MOMENTS:
        importance = "magnitude"  # a layer whose inputs were not measured
    if importance in NEEDS_GRADIENTS:
        scores_of_weight = np.abs(gradients[weight_value.name])
        if importance == "taylor":
            scores_of_weight = scores_of_weight * np.abs(weight)
        score_rows, _ = weight_rows(scores_of_weight.astype(np.float32), layout, groups)
    pruned = np.empty_like(rows, dtype=np.float64)
    reconstructed = settings.reconstruct and hessians is not None
    # With H's diagonal alone, SparseGPT chooses by w^2 times the input's power and moves no
    # other weight, and the refit has nothing to move.
    diagonal = hessians is not None and moments.diagonal
    for group in range(groups):
        mask = None
        if importance != "sparsegpt":
            if importance == "magnitude":
                scores = magnitude_scores(rows[group])
            elif importance == "wanda":
                scores = wanda_scores(rows[group], hessians[group])
            else:
                scores = score_rows[group]
            mask = _mask(scores, settings.pattern, ratio, per_row=importance == "wanda")
        result = None
        if reconstructed:
            result = sparsegpt(rows[group], hessians[group], settings.pattern, ratio, mask)
            if result is not None and settings.refit_steps and not diagonal:
                result = refit(result, rows[group], hessians[group], settings.refit_steps)
        if result is None:
            if mask is None:
                mask = _mask(magnitude_scores(rows[group]), settings.pattern, ratio, per_row=False)
            result = np.where(mask, 0.0, rows[group])
            reconstructed = False
        pruned[group] = result
    error = None
    if hessians is not None:
        difference = pruned - rows
        change = output_power(difference, hessians)
        signal = output_power(rows, hessians)
        error = float(change / signal) if signal > 0 else None
    new_weight = restore(pruned.astype(np.float32)).astype(weight.dtype)
    method = importance + (" + reconstruction" if reconstructed and not diagonal else "")
    if diagonal:
        method += " (input power alone: too few rows to reconstruct)"
    readers = len(sharing_layers(node) or [node])
    if readers > 1:
        method += f" (weight shared by {readers} layers, pruned for all)"
    layer = LayerSparsity(
        node.name,
        weight_value.name,
        node.op_type,
        int(weight.size),
        float(np.mean(new_weight == 0)),
        method,
        error,
    )
    return new_weight, layer


def _mask(scores: np.ndarray, pattern: SparsityPattern, ratio: float, per_row: bool) -> np.ndarray:
    if pattern.structured:
        return n_m_mask(scores, pattern)
    return smallest_mask(scores, ratio, per_row)
