"""Zeros in the weights of every Conv, Gemm and MatMul: unstructured or N:M, chosen by an
importance, the remaining weights reconstructed (SparseGPT) by default."""

from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Sequence

import numpy as np
import onnx_ir as ir

from onnxopt.calibration.moments import InputMoments, LayerBatches, input_layout, weight_rows
from onnxopt.errors import InputError
from onnxopt.progress import QUIET, Progress
from onnxopt.pruning.importance import (
    NEEDS_GRADIENTS,
    NEEDS_MOMENTS,
    Importance,
    gradient_magnitudes,
    magnitude_scores,
    wanda_scores,
)
from onnxopt.pruning.patterns import SparsityPattern, n_m_mask, smallest_mask
from onnxopt.pruning.sparsegpt import refit, sparsegpt
from onnxopt.runtime import Feed

logger = logging.getLogger(__name__)


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
        exclude: regular expressions; layers whose node name matches one stay dense.
        protect_first_last: the first and last prunable layers stay dense (the input stem and
            the classifier or projection head, which small models depend on most).
    """

    ratio: float = 0.5
    pattern: SparsityPattern = dataclasses.field(default_factory=SparsityPattern)
    importance: Importance = "sparsegpt"
    reconstruct: bool = True
    refit_steps: int = 30
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


@dataclasses.dataclass
class SparsityReport:
    """Every pruned layer and every layer left dense with the reason."""

    layers: list[LayerSparsity] = dataclasses.field(default_factory=list)
    dense: dict[str, str] = dataclasses.field(default_factory=dict)

    @property
    def sparsity(self) -> float:
        """Zeros over the weights of the pruned layers."""
        total = sum(layer.parameters for layer in self.layers)
        zeros = sum(layer.parameters * layer.sparsity for layer in self.layers)
        return zeros / total if total else 0.0


def prunable_layers(
    model: ir.Model, settings: SparsitySettings
) -> tuple[list[ir.Node], dict[str, str]]:
    """The layers ``settings`` lets be pruned, in graph order, and the others with the reason."""
    candidates: list[ir.Node] = []
    dense: dict[str, str] = {}
    patterns = [re.compile(expression) for expression in settings.exclude]
    for node in model.graph:
        layout = input_layout(node)
        if layout is None:
            continue
        weight = node.inputs[1]
        if weight.const_value.dtype not in (ir.DataType.FLOAT, ir.DataType.FLOAT16):
            dense[node.name] = f"weight of type {weight.const_value.dtype.name}"
        elif len(weight.uses()) > 1:
            dense[node.name] = "weight shared with other nodes"
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


def sparsify_model(
    model: ir.Model,
    feeds: Sequence[Feed],
    settings: SparsitySettings,
    progress: Progress = QUIET,
) -> SparsityReport:
    """Prune ``model``'s layers in place as ``settings`` say; the report of what was done.

    Input moments are measured on the float model as it was, a batch of layers at a time.
    Raises InputError when nothing can be pruned, or when the importance or the
    reconstruction needs data and ``feeds`` is empty.
    """
    if not 0 <= settings.share < 1:
        raise InputError(
            f"sparsify.ratio = {settings.ratio} is outside [0, 1)",
            fix="give the share of weights to zero, such as 0.5",
        )
    layers, dense = prunable_layers(model, settings)
    report = SparsityReport(dense=dense)
    if not layers:
        raise InputError(
            "the model has no layer to prune: "
            + (
                "; ".join(f"{name}: {reason}" for name, reason in dense.items())
                or "no Conv, Gemm or MatMul with a constant weight"
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
        gradients = gradient_magnitudes(model, feeds, names, progress)
    batches = LayerBatches(model.clone(), feeds, progress=progress) if needs_moments else None
    moments: dict[str, InputMoments] = {}
    try:
        with progress.task("pruning layers", total=len(layers)) as advance:
            for node in layers:
                if batches is not None and node.name not in moments:
                    moments.update(batches.moments_for(node.name))
                report.layers.append(
                    _prune_layer(node, moments.pop(node.name, None), gradients, settings)
                )
                advance(1)
    finally:
        if batches is not None:
            batches.close()
    return report


def _prune_layer(
    node: ir.Node,
    moments: InputMoments | None,
    gradients: dict[str, np.ndarray],
    settings: SparsitySettings,
) -> LayerSparsity:
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
    for group in range(groups):
        mask = None
        if importance != "sparsegpt":
            if importance == "magnitude":
                scores = magnitude_scores(rows[group])
            elif importance == "wanda":
                scores = wanda_scores(rows[group], hessians[group])
            else:
                scores = score_rows[group]
            mask = _mask(scores, settings, per_row=importance == "wanda")
        result = None
        if reconstructed:
            result = sparsegpt(rows[group], hessians[group], settings.pattern, settings.share, mask)
            if result is not None and settings.refit_steps:
                result = refit(result, rows[group], hessians[group], settings.refit_steps)
        if result is None:
            if mask is None:
                mask = _mask(magnitude_scores(rows[group]), settings, per_row=False)
            result = np.where(mask, 0.0, rows[group])
            reconstructed = False
        pruned[group] = result
    error = None
    if hessians is not None:
        difference = pruned - rows
        change = np.einsum("grc,gcd,grd->", difference, hessians, difference)
        signal = np.einsum("grc,gcd,grd->", rows, hessians, rows)
        error = float(change / signal) if signal > 0 else None
    new_weight = restore(pruned.astype(np.float32)).astype(weight.dtype)
    weight_value.const_value = ir.tensor(new_weight, name=weight_value.name)
    method = importance + (" + reconstruction" if reconstructed else "")
    return LayerSparsity(
        node.name,
        weight_value.name,
        node.op_type,
        int(weight.size),
        float(np.mean(new_weight == 0)),
        method,
        error,
    )


def _mask(scores: np.ndarray, settings: SparsitySettings, per_row: bool) -> np.ndarray:
    if settings.pattern.structured:
        return n_m_mask(scores, settings.pattern)
    return smallest_mask(scores, settings.ratio, per_row)
