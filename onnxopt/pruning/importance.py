"""How much each weight matters, by one of ``IMPORTANCES``.

- ``sparsegpt``: the output error zeroing the weight causes, ``w^2 / [H^-1]_jj^2``, chosen as
  the weights are visited (``sparsegpt``); needs calibration data.
- ``magnitude``: ``|w|``, the baseline every tool has; needs nothing.
- ``wanda``: ``|w| * ||x_j||``, the weight times the norm of the input it reads (Sun et al.
  2023, compared within each output row); needs calibration data.
- ``gradient``: ``(1/n) sum_n |dL/dw|`` over the samples, through the torch bridge.
- ``taylor``: ``|w| * (1/n) sum_n |dL/dw|``, the first-order change of the loss.

With labels (an array ``labels`` beside the inputs in the data: each sample's class indices)
the loss is the task's: the cross-entropy of the model's class scores against them. Without,
it is the cross-entropy of every float output (over its last axis) against the model's own
predictions: its gradient is not zero at the original weights, where a distillation loss
against the model itself would be. A transformer's padded positions are left out of it
(``padding``).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Literal

import numpy as np
import onnx_ir as ir

from onnxopt.errors import InputError
from onnxopt.metrics import class_score_outputs
from onnxopt.padding import padding_mask_input, token_rows
from onnxopt.progress import QUIET, Progress
from onnxopt.runtime import Feed

Importance = Literal["sparsegpt", "magnitude", "wanda", "gradient", "taylor"]
IMPORTANCES: tuple[str, ...] = ("sparsegpt", "magnitude", "wanda", "gradient", "taylor")
NEEDS_MOMENTS = frozenset({"sparsegpt", "wanda"})
NEEDS_GRADIENTS = frozenset({"gradient", "taylor"})


def magnitude_scores(rows: np.ndarray) -> np.ndarray:
    return np.abs(rows)


def wanda_scores(rows: np.ndarray, hessian: np.ndarray) -> np.ndarray:
    """``|w| * ||x_j||``: H's diagonal is the mean square of each input column."""
    return np.abs(rows) * np.sqrt(np.clip(np.diag(hessian), 0, None))[None, :]


def gradient_magnitudes(
    model: ir.Model,
    feeds: Sequence[Feed],
    names: Iterable[str],
    progress: Progress = QUIET,
    labels: Sequence[np.ndarray] | None = None,
) -> dict[str, np.ndarray]:
    """``(1/n) sum_n |dL/dw|`` of the initializers ``names`` over ``feeds``, in their shapes,
    with L the loss the module docstring says. Needs the torch extra."""
    sums: dict[str, np.ndarray] = {}
    for gradients in sample_gradients(model, feeds, names, progress, labels=labels):
        for name, gradient in gradients.items():
            sums[name] = sums.get(name, 0) + np.abs(gradient)
    return {name: total / len(feeds) for name, total in sums.items()}


def sample_gradients(
    model: ir.Model,
    feeds: Sequence[Feed],
    names: Iterable[str],
    progress: Progress = QUIET,
    what: str = "gradients for importance",
    labels: Sequence[np.ndarray] | None = None,
) -> Iterator[dict[str, np.ndarray]]:
    """Each feed's ``dL/dw`` of the initializers ``names`` (those the loss reaches), with L
    the cross-entropy against ``labels`` (one array per feed) where given, else against the
    model's own predictions: per sample, for importances that square or take the magnitude
    of each sample's gradient before averaging. Needs the torch extra.

    Raises InputError with labels but no class-score output, or labels that do not fit it."""
    from onnxopt.bridge import to_module  # without torch, an InputError that says so
    from onnxopt.bridge.training import as_tensors, label_loss

    if not feeds:
        raise InputError(
            "the gradient importance needs calibration data",
            fix="pass --calib DATA, or use importance = 'magnitude'",
        )
    import torch

    module = to_module(model)
    parameters = module.onnx_parameters()
    wanted = {name: parameters[name] for name in names if name in parameters}
    scores = _class_score_position(model) if labels is not None else None
    mask = padding_mask_input(model)
    with progress.task(what, total=len(feeds)) as advance:
        for index, feed in enumerate(feeds):
            outputs = module(*as_tensors(module, feed))
            loss = (
                self_prediction_loss([token_rows(output, feed, mask) for output in outputs])
                if labels is None
                else label_loss(outputs[scores], labels[index], model.graph.outputs[scores])
            )
            gradients = torch.autograd.grad(loss, list(wanted.values()), allow_unused=True)
            yield {
                name: gradient.detach().numpy()
                for name, gradient in zip(wanted, gradients, strict=True)
                if gradient is not None
            }
            advance(1)


def gradient_loss(labels: Sequence[np.ndarray] | None) -> str:
    """The loss the gradient importances use, for reports: ``labels`` or ``self-prediction``."""
    return "self-prediction" if labels is None else "labels"


def _class_score_position(model: ir.Model) -> int:
    """Where the first class-score output is among the model's outputs."""
    classes = class_score_outputs(model)
    for position, value in enumerate(model.graph.outputs):
        if value.name in classes:
            return position
    raise InputError(
        "the data has labels, but no output of the model holds class scores "
        "([batch, classes] from a classifier head)",
        fix="remove the 'labels' array from the data: the gradient importances then use the "
        "model's own predictions",
    )


def self_prediction_loss(outputs):
    """Cross-entropy of each float output's last axis against its own argmax, summed."""
    import torch
    import torch.nn.functional as F

    loss = torch.zeros((), dtype=torch.float32)
    for output in outputs:
        if not output.dtype.is_floating_point or output.dim() == 0 or output.shape[-1] < 2:
            continue
        logits = output.reshape(-1, output.shape[-1]).float()
        loss = loss + F.cross_entropy(logits, logits.argmax(-1).detach())
    if not loss.requires_grad:
        raise InputError(
            "the gradient importance needs a float output with a last axis of 2 or more",
            fix="use importance = 'sparsegpt', 'wanda' or 'magnitude'",
        )
    return loss
