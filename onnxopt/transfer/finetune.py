"""Fine-tuning after a transfer: the target's task on its own data, kept near the source.

``theta* = argmin L(theta; D_T) + lambda * ||theta - theta_S||^2``: the task loss on the
target's samples plus L2-SP (Li, Grandvalet and Davoine 2018), the squared distance of every
transferred weight from the value the source gave it. Plain weight decay would pull the
weights towards zero, forgetting what the source learned; L2-SP pulls them towards the
source. Weights the source did not give (a new class's row, a layer left) train freely. The
task loss is the cross-entropy against the data's labels where it has them, else the
distillation loss against the source model's outputs of the same shape.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Collection, Sequence

import numpy as np
import onnx_ir as ir

from onnxopt.errors import InputError
from onnxopt.metrics import class_score_outputs
from onnxopt.progress import QUIET, Progress
from onnxopt.runtime import Feed

LABELS_INPUT = "onnxopt.labels"


@dataclasses.dataclass(frozen=True)
class TransferTuning:
    """How to fine-tune after a transfer.

    Attributes:
        steps: optimizer steps, about (whole epochs over the samples).
        l2sp: lambda, the weight of ``||theta - theta_source||^2`` (summed over the transferred
            weights); 0 trains without it.
        learning_rate: AdamW's, no weight decay (L2-SP replaces it).
        batch_size: samples per step where the graph runs batches.
        seed: the order of samples.
    """

    steps: int
    l2sp: float = 0.01
    learning_rate: float = 1e-4
    batch_size: int = 8
    seed: int = 0


@dataclasses.dataclass(frozen=True)
class TuningResult:
    """How the fine-tune went: its loss (``labels`` or ``distillation``), the mean loss of
    each epoch (task and L2-SP together), the steps, the weights held near the source, the
    weights changed, and the time."""

    loss: str
    losses: list[float]
    steps: int
    anchored: int
    changed: list[str]
    seconds: float


def finetune_transferred(
    target: ir.Model,
    source: ir.Model,
    feeds: Sequence[Feed],
    transferred: Collection[str],
    settings: TransferTuning,
    labels: Sequence[np.ndarray] | None = None,
    progress: Progress = QUIET,
) -> TuningResult:
    """Fine-tune ``target`` in place after weights named ``transferred`` came from ``source``.

    Raises InputError without samples, for an int8 target (fine-tune the float model, then
    quantize), or without labels when no target output has the shape of a source output.
    """
    from onnxopt.bridge import to_module, write_back  # without torch, an InputError that says so
    from onnxopt.bridge.training import TrainingSettings, distillation_loss, fine_tune

    start = time.perf_counter()
    if not feeds:
        raise InputError(
            "the fine-tune after the transfer has no samples",
            fix="give the target's samples (--data), with a 'labels' array for its task",
        )
    module = to_module(target)
    parameters = module.onnx_parameters()
    anchors = {
        name: parameter.detach().clone()
        for name, parameter in parameters.items()
        if name in transferred
    }
    if not anchors:
        raise InputError(
            "no transferred weight is a float parameter the fine-tune can train",
            fix="fine-tune the float target, then quantize it (transfer before quantize in a "
            "recipe)",
        )
    if labels is not None:
        student, task, name = _with_labels(module, target), _label_task(target), "labels"
        feeds = [{**feed, LABELS_INPUT: label} for feed, label in zip(feeds, labels, strict=True)]
    else:
        student, name = module, "distillation"
        task = _distillation_task(module, to_module(source), feeds, distillation_loss)
    weight = settings.l2sp

    def loss(outputs, inputs):
        total = task(outputs, inputs)
        if weight:
            for key, anchor in anchors.items():
                total = total + weight * (parameters[key] - anchor).pow(2).sum()
        return total

    per_epoch = math.ceil(len(feeds) / settings.batch_size)
    training = TrainingSettings(
        epochs=max(1, round(settings.steps / per_epoch)),
        learning_rate=settings.learning_rate,
        batch_size=settings.batch_size,
        seed=settings.seed,
        schedule="cosine",
        warmup=0.1,
    )
    result = fine_tune(student, feeds, loss, training, progress)
    changed = write_back(module, target)
    return TuningResult(
        name, result.losses, result.steps, len(anchors), changed, time.perf_counter() - start
    )


def _with_labels(module, model: ir.Model):
    """The module taking each sample's labels as one more input, passed through as its last
    output, so the training loop batches them with the samples."""
    import torch

    class WithLabels(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = module
            self.input_names = [*module.input_names, LABELS_INPUT]

        def forward(self, *inputs):
            return (*self.inner(*inputs[:-1]), inputs[-1])

    return WithLabels()


def _label_task(model: ir.Model):
    from onnxopt.bridge.training import label_loss

    classes = class_score_outputs(model)
    positions = [i for i, value in enumerate(model.graph.outputs) if value.name in classes]
    if not positions:
        raise InputError(
            "the data has labels, but no output of the target holds class scores",
            fix="remove the 'labels' array to distil from the source model instead",
        )
    output = model.graph.outputs[positions[0]]

    def task(outputs, inputs):
        return label_loss(outputs[positions[0]], outputs[-1].numpy(), output)

    return task


def _distillation_task(student, teacher, feeds: Sequence[Feed], distillation_loss):
    """The distillation loss over the outputs whose shapes the source shares; the source
    runs a batch sample by sample where its graph fixes a batch of one."""
    import torch

    from onnxopt.bridge.training import as_tensors, runs_batches

    sample = feeds[0]
    teacher.eval()
    for parameter in teacher.parameters():
        parameter.requires_grad_(False)
    if len(teacher.input_names) != len(student.input_names):
        raise _no_common_output()
    with torch.no_grad():
        mine = student(*as_tensors(student, sample))
        theirs = teacher(*as_tensors(student, sample))
    shared = [
        index
        for index, (a, b) in enumerate(zip(mine, theirs, strict=False))
        if a.shape == b.shape and a.dtype.is_floating_point
    ]
    if not shared:
        raise _no_common_output()
    classes = [name in student.class_outputs for name in student.output_names]
    batched = runs_batches(
        teacher,
        [
            {
                theirs: feed[mine]
                for theirs, mine in zip(teacher.input_names, student.input_names, strict=True)
            }
            for feed in feeds[:2]
        ],
    )

    def teach(inputs):
        if batched or inputs[0].shape[0] == 1:
            return teacher(*inputs)
        rows = [teacher(*(tensor[i : i + 1] for tensor in inputs)) for i in range(len(inputs[0]))]
        return [torch.cat(parts) for parts in zip(*rows, strict=True)]

    def task(outputs, inputs):
        with torch.no_grad():
            targets = teach(inputs)
        return distillation_loss(
            [outputs[i] for i in shared],
            [targets[i] for i in shared],
            [classes[i] for i in shared],
        )

    return task


def _no_common_output() -> InputError:
    return InputError(
        "the fine-tune has no labels, and no target output has the shape of a source output "
        "to distil from",
        fix="give the target's samples with a 'labels' array (one class index per sample)",
    )
