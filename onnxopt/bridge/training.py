"""Fine-tuning through the bridge: a loop over the project's data with a loss of the caller's
choice, and distillation against the model as it was. Pruning recovery and weight transfer
train with these."""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
from collections.abc import Callable, Iterable, Sequence
from typing import Literal

import numpy as np
import onnx_ir as ir
import torch
import torch.nn.functional as F

from onnxopt.bridge.module import OnnxModule
from onnxopt.errors import InputError
from onnxopt.progress import QUIET, Progress
from onnxopt.runtime import Feed

logger = logging.getLogger(__name__)

# Outputs a batch of samples must reproduce, against the samples run alone, for batching.
BATCH_TOLERANCE = 1e-4

Loss = Callable[[tuple[torch.Tensor, ...], list[torch.Tensor]], torch.Tensor]

# Called after each epoch with its number (from 0) and its mean loss; True stops training.
EpochHook = Callable[[int, float], bool]


@dataclasses.dataclass
class TrainingSettings:
    """How to train.

    Attributes:
        epochs: passes over the data.
        learning_rate: Adam's default for fine-tuning pretrained weights: small steps.
        optimizer: "adam" (AdamW) or "sgd" (with momentum 0.9).
        weight_decay: AdamW's or SGD's decay.
        batch_size: samples per step where the graph runs batches; else one at a time.
        seed: makes the order of samples and torch's random numbers repeatable.
        schedule: "constant" learning rate, or "cosine": decayed to zero over the run (the
            last steps settle rather than jump, which matters when few samples are seen).
        warmup: the share of the run's steps over which the rate rises linearly to its
            value first: Adam's first full-rate steps, its moments barely measured, can throw
            pretrained weights far off (a pruned EfficientNet-Lite0 lost 6 points of top-1
            agreement in its first epoch without warmup, and regained them later).
    """

    epochs: int = 1
    learning_rate: float = 1e-4
    optimizer: Literal["adam", "sgd"] = "adam"
    weight_decay: float = 0.0
    batch_size: int = 8
    seed: int = 0
    schedule: Literal["constant", "cosine"] = "constant"
    warmup: float = 0.0


@dataclasses.dataclass
class TrainingResult:
    """How training went: the mean loss of each epoch, the steps taken, whether samples ran
    in batches."""

    losses: list[float]
    steps: int
    batched: bool


def as_tensors(module: OnnxModule, feed: Feed) -> list[torch.Tensor]:
    """A feed dict as tensors in the module's input order."""
    return [torch.from_numpy(np.array(feed[name])) for name in module.input_names]


def runs_batches(module: OnnxModule, feeds: Sequence[Feed]) -> bool:
    """Whether the graph takes samples stacked on their first axis and gives their outputs
    stacked: the first two samples, run together and alone, must agree (a graph that hard-codes
    a batch of 1 in a Reshape fails or mixes them)."""
    if len(feeds) < 2:
        return False
    first, second = (as_tensors(module, feed) for feed in feeds[:2])
    if any(
        a.dim() == 0 or a.shape[0] != 1 or a.shape != b.shape
        for a, b in zip(first, second, strict=True)
    ):
        return False
    with torch.no_grad():
        try:
            together = module(*(torch.cat(pair) for pair in zip(first, second, strict=True)))
        except Exception:  # the graph refuses a batch: run samples one at a time
            return False
        alone = [module(*first), module(*second)]
    for index, output in enumerate(together):
        expected = torch.cat([alone[0][index], alone[1][index]])
        if output.shape != expected.shape:
            return False
        if output.dtype.is_floating_point:
            scale = float(expected.abs().max()) or 1.0
            if float((output - expected).abs().max()) > BATCH_TOLERANCE * scale:
                return False
        elif not torch.equal(output, expected):
            return False
    return True


def distillation_loss(
    outputs: Sequence[torch.Tensor],
    targets: Sequence[torch.Tensor],
    class_scores: Sequence[bool] | None = None,
) -> torch.Tensor:
    """How far ``outputs`` are from the original model's ``targets``, summed over the float
    outputs: KL divergence for class scores, mean squared error otherwise. ``class_scores``
    says which outputs hold class scores (``OnnxModule.class_outputs``); without it, every
    [N, C] output is taken for logits."""
    total = outputs[0].new_zeros(())
    if class_scores is None:
        class_scores = [output.dim() == 2 and output.shape[1] > 1 for output in outputs]
    for output, target, is_class in zip(outputs, targets, class_scores, strict=True):
        if not output.dtype.is_floating_point:
            continue
        if is_class and output.dim() == 2:
            total = total + F.kl_div(
                F.log_softmax(output, 1),
                F.log_softmax(target, 1),
                reduction="batchmean",
                log_target=True,
            )
        else:
            total = total + F.mse_loss(output, target)
    return total


def label_loss(scores: torch.Tensor, labels: np.ndarray, output: ir.Value) -> torch.Tensor:
    """Cross-entropy of class ``scores`` (logits, or probabilities from a Softmax, or
    log-probabilities from a LogSoftmax) against ``labels``, one class index per row."""
    rows = scores.reshape(-1, scores.shape[-1]).float()
    targets = torch.as_tensor(np.asarray(labels, dtype=np.int64).reshape(-1))
    if len(targets) != len(rows) or targets.min() < 0 or targets.max() >= rows.shape[-1]:
        raise InputError(
            f"labels {np.asarray(labels).tolist()} do not fit output '{output.name}' "
            f"of shape {list(scores.shape)}",
            fix=f"give one class index in [0, {rows.shape[-1]}) per row of the class scores",
        )
    producer = output.producer()
    kind = producer.op_type if producer is not None else ""
    if kind == "Softmax":
        return F.nll_loss(rows.clamp_min(1e-12).log(), targets)
    if kind == "LogSoftmax":
        return F.nll_loss(rows, targets)
    return F.cross_entropy(rows, targets)


def fine_tune(
    module: OnnxModule,
    data: Iterable[Feed],
    loss: Loss,
    settings: TrainingSettings | None = None,
    progress: Progress = QUIET,
    after_step: Callable[[], None] | None = None,
    after_epoch: EpochHook | None = None,
) -> TrainingResult:
    """Train the module's parameters to lower ``loss(outputs, inputs)`` over ``data``.

    ``data`` is any of the project's data sources (an ``open_data`` source, a list of feed
    dicts); samples run stacked in batches of ``settings.batch_size`` where ``runs_batches``
    says the graph allows it, else one at a time. ``after_step`` runs after every optimizer
    step (to re-apply a constraint such as a sparsity mask); ``after_epoch`` after every epoch,
    the module in eval mode, and stops training when it returns True.
    """
    settings = settings or TrainingSettings()
    torch.manual_seed(settings.seed)
    feeds = list(data)
    if not feeds:
        raise InputError("no samples to train on", fix="give fine_tune at least one sample")
    batched = settings.batch_size > 1 and runs_batches(module, feeds)
    size = settings.batch_size if batched else 1
    optimizer = _optimizer(module, settings)
    per_epoch = -(-len(feeds) // size)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, _rate_factor(settings, settings.epochs * per_epoch)
    )
    rng = np.random.default_rng(settings.seed)
    losses, steps = [], 0
    module.train()
    with progress.task("fine-tuning", settings.epochs * per_epoch) as advance:
        for epoch in range(settings.epochs):
            order = rng.permutation(len(feeds))
            total = 0.0
            for start in range(0, len(order), size):
                group = [as_tensors(module, feeds[index]) for index in order[start : start + size]]
                inputs = (
                    [torch.cat(parts) for parts in zip(*group, strict=True)]
                    if batched
                    else group[0]
                )
                optimizer.zero_grad()
                value = loss(module(*inputs), inputs)
                value.backward()
                optimizer.step()
                scheduler.step()
                if after_step is not None:
                    after_step()
                total += float(value.detach())
                steps += 1
                advance(1)
            losses.append(total / per_epoch)
            logger.info("epoch %d: mean loss %.6g", epoch + 1, losses[-1])
            if after_epoch is not None:
                module.eval()
                if after_epoch(epoch, losses[-1]):
                    break
                module.train()
    module.eval()
    return TrainingResult(losses, steps, batched)


def _rate_factor(settings: TrainingSettings, total: int) -> Callable[[int], float]:
    """The learning rate's multiplier at each step: the warmup's linear rise times the
    schedule's decay."""
    warm = round(settings.warmup * total)

    def factor(step: int) -> float:
        rise = min(1.0, (step + 1) / warm) if warm else 1.0
        if settings.schedule == "cosine":
            return rise * 0.5 * (1 + math.cos(math.pi * min(step, total) / total))
        return rise

    return factor


def distill(
    module: OnnxModule,
    data: Iterable[Feed],
    teacher: OnnxModule | None = None,
    settings: TrainingSettings | None = None,
    progress: Progress = QUIET,
) -> TrainingResult:
    """Fine-tune ``module`` to reproduce ``teacher``'s outputs (by default, the module as it is
    now, frozen): recovery after pruning or quantization-aware repairs."""
    if teacher is None:
        teacher = copy.deepcopy(module)
    teacher.eval()
    for parameter in teacher.parameters():
        parameter.requires_grad_(False)

    classes = [name in module.class_outputs for name in module.output_names]

    def loss(outputs, inputs):
        with torch.no_grad():
            targets = teacher(*inputs)
        return distillation_loss(outputs, targets, classes)

    return fine_tune(module, data, loss, settings, progress)


def _optimizer(module: OnnxModule, settings: TrainingSettings) -> torch.optim.Optimizer:
    parameters = [parameter for parameter in module.parameters() if parameter.requires_grad]
    if settings.optimizer == "sgd":
        return torch.optim.SGD(
            parameters, settings.learning_rate, momentum=0.9, weight_decay=settings.weight_decay
        )
    return torch.optim.AdamW(parameters, settings.learning_rate, weight_decay=settings.weight_decay)
