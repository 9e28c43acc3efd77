"""Weight transfer as a recipe step: new weights from a source model, then prune or quantize."""

from __future__ import annotations

from typing import Annotated, Literal

import onnx_ir as ir

from onnxopt.errors import InputError
from onnxopt.io import load
from onnxopt.options import REGULAR_EXPRESSIONS, Range
from onnxopt.passes.base import OnnxoptPass, PassResult
from onnxopt.transfer import (
    TransferSettings,
    TransferTuning,
    finetune_transferred,
    transfer_weights,
)
from onnxopt.transfer.files import read_map, read_pruning_report

CHECK_SAMPLES = 4


class TransferPass(OnnxoptPass):
    """Copy the learned weights of another model (``source``) into this one.

    Weights are matched by name where names agree and by graph structure elsewhere (see
    ``onnxopt.transfer``). The model with the new weights becomes the reference the later
    passes and validation compare with.

    Args:
        source: the .onnx file whose weights are copied.
        match: ``auto``, ``name`` or ``structure``.
        on_mismatch: a tensor of another shape: ``error``, ``skip`` or ``fit`` (slice, pad,
            adapt an input convolution's channels).
        include: regular expressions; only matching target layers receive weights.
        exclude: regular expressions; matching target layers keep theirs.
        map: a file of explicit ``TARGET SOURCE`` tensor pairs.
        pruned: the JSON report of the prune run that made the model, so source weights
            are cut to the channels it kept.
        weight_scales: an int8 model's weight scales: ``keep`` (weights they would clip are
            an error) or ``widen`` those that would clip.
        finetune_steps: about this many fine-tuning steps after the transfer on the
            calibration samples (their labels for the task, else distilling the source), each
            transferred weight held near its source value (L2-SP); needs the torch extra.
        l2sp: the weight of ``||theta - theta_source||^2`` in the fine-tune's loss.
        finetune_samples: samples the fine-tune trains on.
    """

    name = "transfer"
    reads_data = True

    def __init__(
        self,
        source: str = "",
        match: Literal["auto", "name", "structure"] = "auto",
        on_mismatch: Literal["error", "skip", "fit"] = "error",
        include: Annotated[list[str] | None, REGULAR_EXPRESSIONS] = None,
        exclude: Annotated[list[str] | None, REGULAR_EXPRESSIONS] = None,
        map: str | None = None,
        pruned: str | None = None,
        weight_scales: Literal["keep", "widen"] = "keep",
        finetune_steps: Annotated[int, Range(low=0)] = 0,
        l2sp: Annotated[float, Range(low=0.0)] = 0.01,
        finetune_samples: Annotated[int, Range(low=1)] = 512,
    ):
        super().__init__()
        self.source = source
        self.tuning = TransferTuning(steps=finetune_steps, l2sp=l2sp) if finetune_steps else None
        self.finetune_samples = finetune_samples
        self.settings = TransferSettings(
            match=match,
            on_mismatch=on_mismatch,
            include=tuple(include or []),
            exclude=tuple(exclude or []),
            mapping=read_map(map) if map else {},
            pruning=read_pruning_report(pruned) if pruned else None,
            weight_scales=weight_scales,
        )

    def call(self, model: ir.Model) -> PassResult:
        if not self.source:
            raise InputError(
                "transfer: no source model given",
                fix="set transfer.source to the .onnx file whose weights to copy",
            )
        data = self.context.data
        feeds = data.take(CHECK_SAMPLES) if data is not None else []
        source = load(self.source)
        report = transfer_weights(model, source, self.settings, feeds)
        if self.tuning is not None:
            training = data.take(self.finetune_samples) if data is not None else []
            labels = data.take_labels(len(training)) if data is not None else None
            report.tuning = finetune_transferred(
                model,
                source,
                training,
                report.written,
                self.tuning,
                labels,
                self.context.progress,
            )
        self.context.transfer = report
        self.context.reference = model.clone()
        self.context.comparison = None
        details = {
            "tensors": f"{report.transferred} of {len(report.slots)}",
            "layers paired": f"{report.paired_layers} of {report.target_layers}",
            **{f"by {how}": count for how, count in report.counts().items() if how != "left"},
        }
        if report.unused_source:
            details["source layers unused"] = len(report.unused_source)
        return PassResult(model, modified=True, changes=report.transferred, details=details)
