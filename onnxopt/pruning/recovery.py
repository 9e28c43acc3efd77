"""Recovery after pruning: distil the pruned model towards the original through the torch bridge,
zeros kept where pruning put them.

The student learns the original's outputs (KL divergence at a temperature for class scores,
mean squared error relative to the output's power otherwise) and, layer by layer, the output
of every pruned layer (the same relative error, so each layer counts alike whatever its
scale): more signal per sample than the final outputs alone, which matters with a few hundred
unlabelled samples. A transformer's padded positions are left out of both (``padding``):
nothing reads them, and sentences padded to one length are mostly padding. A slice of the
samples is held out; the weights kept are those of the epoch that reproduced the original's
outputs best on it, and the one-shot weights when no epoch did better than they do.

The rate rises over the first epoch (warmup), then decays (cosine). A rate that suits one
pruned model wrecks another (AdamW at 1e-4 took EfficientNet-Lite0 with 30% fewer FLOPs from
78% top-1 agreement with FP32 to 64% after one epoch, where 2e-5 reached 86%; MiniLM at 50%
sparsity gained most at 1e-4). So when no epoch beats the one-shot weights on the held-out
samples, training restarts from them at a quarter of the rate, ``backoff`` times at most.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Mapping, Sequence

import numpy as np
import onnx_ir as ir

from onnxopt.errors import InputError
from onnxopt.metrics import class_score_outputs
from onnxopt.padding import at_tokens, padding_mask_input
from onnxopt.progress import QUIET, Progress
from onnxopt.runtime import Feed

logger = logging.getLogger(__name__)

# Guards the normalized errors of outputs that are all zeros.
EPSILON = 1e-12


@dataclasses.dataclass(frozen=True)
class RecoverySettings:
    """How ``recover`` fine-tunes.

    Attributes:
        epochs: passes over the training samples, at most (the learning rate decays to zero
            over them, cosine).
        learning_rate: AdamW's first, no weight decay: pretrained weights need small steps.
        batch_size: samples per step where the graph runs batches.
        held_out: the share of the samples held out to choose the epoch whose weights are kept
            (at least one sample); the rest are trained on.
        features: also match the output of every pruned layer to the original's.
        temperature: softens class scores in their KL divergence (distillation's T); the
            held-out loss always compares them at 1.
        patience: epochs after the first (the warmup) in which no epoch has beaten the one-shot
            weights on the held-out samples before training stops (and restarts at a lower rate,
            ``backoff``). Once one has, training runs its whole schedule: at the full rate the
            held-out loss jumps from epoch to epoch, and the cosine's last, small steps gain
            most (EfficientNet-Lite0 at 50% sparsity, at 2.5e-5: stopped two epochs after
            its first best, 0.844 top-1 agreement on 64 eval images; run to the end, epoch 10
            of 12 was best, 0.860 on 200).
        backoff: restarts at a quarter of the learning rate when no epoch beats the one-shot
            weights (module docstring).
        seed: the held-out split, the order of samples and torch's random numbers.
    """

    epochs: int = 4
    learning_rate: float = 1e-4
    batch_size: int = 8
    held_out: float = 0.125
    features: bool = True
    temperature: float = 2.0
    patience: int = 2
    backoff: int = 2
    seed: int = 0


@dataclasses.dataclass(frozen=True)
class RecoveryResult:
    """How the fine-tune went.

    Attributes:
        losses: the mean training loss of each epoch.
        held_out_losses: the loss on the held-out samples after each epoch.
        held_out_before: that loss with the one-shot weights.
        held_out_after: that loss with the weights kept.
        kept: whether fine-tuned weights were kept (False: no epoch beat the one-shot weights,
            which the model keeps).
        best_epoch: the epoch whose weights were kept, from 1 (0: the one-shot weights).
        learning_rate: the rate of the last training run (lower than asked after backoff).
        steps: optimizer steps taken, restarts included.
        features: pruned layers whose outputs were matched.
        train_samples: samples trained on.
        seconds: the time it took.
    """

    losses: list[float]
    held_out_losses: list[float]
    held_out_before: float
    held_out_after: float
    kept: bool
    best_epoch: int
    learning_rate: float
    steps: int
    features: int
    train_samples: int
    seconds: float


def recover(
    model: ir.Model,
    original: ir.Model,
    feeds: Sequence[Feed],
    zeros: Mapping[str, np.ndarray],
    settings: RecoverySettings | None = None,
    progress: Progress = QUIET,
) -> RecoveryResult:
    """Fine-tune ``model`` in place to reproduce ``original``'s outputs on ``feeds``, every
    weight in ``zeros`` (by initializer name, True where pruned) kept at zero. ``original``
    must be the model before pruning, with the same value names. Needs the torch extra.

    Raises InputError with fewer than two samples (one must be held out).
    """
    from onnxopt.bridge import write_back
    from onnxopt.bridge.training import TrainingSettings, fine_tune

    settings = settings or RecoverySettings()
    start = time.perf_counter()
    train, held = _split(feeds, settings)
    matched = _matched_layers(model, original, zeros) if settings.features else []
    pair = _Distillation(model, original, matched, zeros, settings.temperature)
    held_batches = _batches(pair.student, held, settings.batch_size)
    pair.apply_masks()
    before = pair.held_out_loss(held_batches)
    logger.info("one-shot weights: held-out loss %.6g", before)
    one_shot = {name: p.detach().clone() for name, p in pair.parameters.items()}
    best_loss, best_epoch, best_weights = before, 0, None
    history: list[float] = []

    def after_epoch(epoch: int, _: float) -> bool:
        nonlocal best_loss, best_epoch, best_weights
        history.append(pair.held_out_loss(held_batches))
        logger.info("epoch %d: held-out loss %.6g", epoch + 1, history[-1])
        if history[-1] < best_loss:
            best_loss, best_epoch = history[-1], epoch + 1
            best_weights = {name: p.detach().clone() for name, p in pair.parameters.items()}
        # The first epoch warms up; patience counts the epochs after it.
        return best_weights is None and epoch >= settings.patience

    rate, steps = settings.learning_rate, 0
    for attempt in range(settings.backoff + 1):
        if attempt:
            rate /= 4
            logger.info("no epoch beat the one-shot weights: restarting at %g", rate)
            _load(pair.parameters, one_shot)
            history.clear()
        training = TrainingSettings(
            epochs=settings.epochs,
            learning_rate=rate,
            batch_size=settings.batch_size,
            seed=settings.seed,
            schedule="cosine",
            warmup=1 / settings.epochs,
        )
        result = fine_tune(
            pair.student, train, pair.loss, training, progress, pair.apply_masks, after_epoch
        )
        steps += result.steps
        if best_weights is not None:
            break
    if best_weights is not None:
        _load(pair.parameters, best_weights)
        write_back(pair.student, model)
    else:
        logger.info("no epoch beat the one-shot weights on the held-out samples: kept them")
    return RecoveryResult(
        losses=result.losses,
        held_out_losses=history,
        held_out_before=before,
        held_out_after=best_loss,
        kept=best_weights is not None,
        best_epoch=best_epoch,
        learning_rate=rate,
        steps=steps,
        features=len(matched),
        train_samples=len(train),
        seconds=time.perf_counter() - start,
    )


def _load(parameters: Mapping, weights: Mapping) -> None:
    import torch

    with torch.no_grad():
        for name, weight in weights.items():
            parameters[name].copy_(weight)


def recover_steps(
    model: ir.Model,
    original: ir.Model,
    feeds: Sequence[Feed],
    steps: int,
    pruned_weights: Sequence[str] = (),
    progress: Progress = QUIET,
) -> RecoveryResult:
    """``recover`` for about ``steps`` optimizer steps (whole epochs, at least one), the zeros
    of the ``pruned_weights`` initializers kept. What the ``finetune_steps`` option of the
    sparsify and prune passes runs."""
    defaults = RecoverySettings()
    train = len(feeds) - _held_out_count(len(feeds), defaults)
    per_epoch = max(1, -(-train // defaults.batch_size))
    settings = dataclasses.replace(defaults, epochs=max(1, round(steps / per_epoch)))
    initializers = model.graph.initializers
    zeros = {name: initializers[name].const_value.numpy() == 0 for name in pruned_weights}
    return recover(model, original, feeds, zeros, settings, progress)


class _Distillation:
    """The pruned model (student, trainable, its zeros masked) beside the original (teacher,
    frozen), both also giving the ``matched`` layer outputs after their own outputs."""

    def __init__(
        self,
        model: ir.Model,
        original: ir.Model,
        matched: Sequence[str],
        zeros: Mapping[str, np.ndarray],
        temperature: float,
    ):
        import torch

        from onnxopt.bridge import to_module

        self.student = to_module(_with_outputs(model, matched))
        self.teacher = to_module(_with_outputs(original, matched))
        self.teacher.eval()
        for parameter in self.teacher.parameters():
            parameter.requires_grad_(False)
        mask = padding_mask_input(model)
        names = [value.name for value in model.graph.inputs]
        self.mask_position = names.index(mask) if mask in names else None
        classes = class_score_outputs(model)
        self.is_class = [value.name in classes for value in model.graph.outputs]
        self.count = len(self.is_class)
        self.temperature = temperature
        self.parameters = self.student.onnx_parameters()
        self.keeps = {
            name: torch.from_numpy(~np.asarray(mask, dtype=bool)).to(self.parameters[name].dtype)
            for name, mask in zeros.items()
            if name in self.parameters
        }
        # Pruned weights get no gradient, so Adam's moments for them stay zero too.
        for name, keep in self.keeps.items():
            self.parameters[name].register_hook(lambda gradient, keep=keep: gradient * keep)

    def apply_masks(self) -> None:
        import torch

        with torch.no_grad():
            for name, keep in self.keeps.items():
                self.parameters[name].mul_(keep)

    def loss(self, results, inputs):
        """The outputs' loss plus the mean relative error of the matched layers."""
        import torch

        with torch.no_grad():
            targets = self.teacher(*inputs)
        count, keep = self.count, self.tokens(inputs)
        value = output_loss(results[:count], targets[:count], self.is_class, self.temperature, keep)
        if len(results) > count:
            layers = zip(results[count:], targets[count:], strict=True)
            errors = (_relative_error(*(at_tokens(part, keep) for part in pair)) for pair in layers)
            value = value + sum(errors) / (len(results) - count)
        return value

    def tokens(self, inputs):
        """Where the batch holds tokens (its attention mask is not 0); None without a mask."""
        return None if self.mask_position is None else inputs[self.mask_position] != 0

    def held_out_loss(self, batches: Sequence[tuple[list, int]]) -> float:
        """The outputs' loss (class scores at temperature 1) per sample over ``batches``."""
        import torch

        total, samples = 0.0, 0
        with torch.no_grad():
            for inputs, size in batches:
                results = self.student(*inputs)[: self.count]
                targets = self.teacher(*inputs)[: self.count]
                loss = output_loss(results, targets, self.is_class, 1.0, self.tokens(inputs))
                total += float(loss) * size
                samples += size
        return total / samples


def output_loss(outputs, targets, is_class: Sequence[bool], temperature: float, keep=None):
    """How far ``outputs`` are from the original's ``targets``, summed over the float outputs:
    the KL divergence of softened class scores (times T², distillation's scale), else the mean
    squared error relative to the target's mean square (each output counts alike whatever its
    scale). ``keep``: where the batch holds tokens ([batch, sequence], ``padding``); outputs
    over those axes are compared there only."""
    import torch
    import torch.nn.functional as F

    total = torch.zeros(())
    for output, target, classes in zip(outputs, targets, is_class, strict=True):
        if not output.dtype.is_floating_point:
            continue
        output, target = at_tokens(output, keep), at_tokens(target, keep)
        if classes:
            scores, reference = output.flatten(0, -2), target.flatten(0, -2)
            total = total + temperature**2 * F.kl_div(
                F.log_softmax(scores / temperature, -1),
                F.log_softmax(reference / temperature, -1),
                reduction="batchmean",
                log_target=True,
            )
        else:
            total = total + _relative_error(output, target)
    return total


def _relative_error(output, target):
    return (output - target).pow(2).mean() / target.pow(2).mean().clamp_min(EPSILON)


def _held_out_count(samples: int, settings: RecoverySettings) -> int:
    """How many of ``samples`` are held out: the share asked, at least one, never all."""
    return min(samples - 1, max(1, round(samples * settings.held_out)))


def _split(feeds: Sequence[Feed], settings: RecoverySettings) -> tuple[list[Feed], list[Feed]]:
    """The samples to train on and those held out, chosen at random by the seed."""
    feeds = list(feeds)
    if len(feeds) < 2:
        raise InputError(
            f"recovery needs at least 2 calibration samples, got {len(feeds)}",
            fix="give more samples: some train, at least one is held out to check the result",
        )
    count = _held_out_count(len(feeds), settings)
    order = np.random.default_rng(settings.seed).permutation(len(feeds))
    return [feeds[i] for i in order[count:]], [feeds[i] for i in order[:count]]


def _matched_layers(
    model: ir.Model, original: ir.Model, zeros: Mapping[str, np.ndarray]
) -> list[str]:
    """The float outputs of the nodes that read a pruned weight, where the original computes a
    value of the same name (not graph outputs: those are matched anyway)."""
    in_original = {
        output.name for node in original.graph for output in node.outputs if output is not None
    }
    graph_outputs = {value.name for value in model.graph.outputs}
    names: list[str] = []
    for node in model.graph:
        if not any(value is not None and value.name in zeros for value in node.inputs):
            continue
        value = node.outputs[0]
        if (
            value.name in in_original
            and value.name not in graph_outputs
            and value.name not in names
            and value.dtype in (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.DOUBLE, None)
        ):
            names.append(value.name)
    return names


def _with_outputs(model: ir.Model, names: Sequence[str]) -> ir.Model:
    """A copy of ``model`` that also outputs the values ``names``, after its own outputs."""
    if not names:
        return model
    copy = model.clone()
    values = {output.name: output for node in copy.graph for output in node.outputs}
    copy.graph.outputs.extend(values[name] for name in names)
    return copy


def _batches(module, feeds: Sequence[Feed], size: int) -> list[tuple[list, int]]:
    """The feeds as input tensors, stacked by ``size`` where the graph runs batches, each with
    its number of samples."""
    import torch

    from onnxopt.bridge.training import as_tensors, runs_batches

    size = size if runs_batches(module, feeds[:2]) else 1
    batches = []
    for first in range(0, len(feeds), size):
        group = [as_tensors(module, feed) for feed in feeds[first : first + size]]
        batches.append(([torch.cat(parts) for parts in zip(*group, strict=True)], len(group)))
    return batches
