"""Sparsity: zeros in the weights of Conv, Gemm and MatMul layers, the rest reconstructed."""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

import onnx_ir as ir

from onnxopt.options import REGULAR_EXPRESSIONS, Range, Rule
from onnxopt.passes.base import OnnxoptPass, PassResult
from onnxopt.pruning import SparsitySettings, parse_pattern, sparsify_model
from onnxopt.pruning.budget import sparsify_to_budget
from onnxopt.pruning.recovery import recover_steps
from onnxopt.validation import Thresholds


def _pattern_problem(value: Any) -> str | None:
    if value == "unstructured" or re.fullmatch(r"\d+:\d+", str(value)):
        left, _, right = str(value).partition(":")
        if value == "unstructured" or 0 < int(left) < int(right):
            return None
    return "must be 'unstructured' or N:M with 0 < N < M, such as '2:4'"


def _ratio_problem(value: Any) -> str | None:
    if value == "auto" or (
        isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value < 1
    ):
        return None
    return "must be 'auto' (the highest sparsity meeting the budget) or a share in [0, 1)"


class SparsifyPass(OnnxoptPass):
    """Zero a share of every Conv, Gemm and MatMul weight (unstructured or N:M along the input
    columns) and, by default, update the remaining weights so each layer's output on the
    calibration samples moves least (SparseGPT). Zeros make the file compress and feed sparse
    runtimes; onnxruntime's dense kernels run no faster on them.

    With ``ratio = "auto"`` (the default) it finds the highest sparsity whose model meets the
    budget (``min_cosine``, ``min_sqnr_db``, ``min_top1_agreement``), each candidate measured
    as the validate pass measures (``pruning.budget``); at worst the model stays dense.

    Args:
        ratio: ``auto``, or the share of the pruned layers' weights zeroed (unstructured).
        pattern: ``unstructured`` or N:M (``2:4``): N of every M consecutive input columns
            kept; layers whose columns do not divide into groups of M stay dense. With
            ``ratio = "auto"``, the layers that change most stay dense as the budget needs.
        importance: ``sparsegpt`` (default), ``magnitude``, ``wanda``, ``gradient`` or
            ``taylor`` (``pruning.importance``; the last two need the torch extra).
        reconstruct: update the remaining weights (needs calibration data).
        refit_steps: conjugate-gradient steps of the least-squares refit after SparseGPT.
        allocation: how ``ratio`` is shared among layers (unstructured SparseGPT): ``auto``
            (whichever of uniform, global, sensitivity and halfway to each keeps the outputs
            closest on the calibration samples), ``uniform``, ``global`` (by saliency
            model-wide) or ``sensitivity`` (global, each layer's saliencies scaled by its
            measured effect on the outputs, ``pruning.sensitivity``).
        samples: calibration samples the layer inputs (and gradients) are measured on.
        exclude: regular expressions on node names; matching layers stay dense.
        protect_first_last: keep the first and last prunable layers dense.
        min_cosine: with ``ratio = "auto"``: every output's cosine with the original, at least.
        min_sqnr_db: with ``ratio = "auto"``: every output's SQNR, at least.
        min_top1_agreement: with ``ratio = "auto"``: outputs that hold class scores are
            expected to agree on the top class this often.
        finetune_steps: about this many distillation steps after pruning, through the torch
            bridge (``pruning.recovery``; needs the torch extra), zeros kept; 0: none.
        finetune_samples: calibration samples the fine-tune trains on (an eighth held out
            to keep the best epoch, or the one-shot weights when no epoch beats them).
    """

    name = "sparsify"
    reads_data = True

    def __init__(
        self,
        ratio: Annotated[float | Literal["auto"], Rule(_ratio_problem)] = "auto",
        pattern: Annotated[str, Rule(_pattern_problem)] = "unstructured",
        importance: Literal["sparsegpt", "magnitude", "wanda", "gradient", "taylor"] = "sparsegpt",
        reconstruct: bool = True,
        refit_steps: Annotated[int, Range(low=0)] = 30,
        allocation: Literal["auto", "uniform", "global", "sensitivity"] = "auto",
        samples: Annotated[int, Range(low=1)] = 32,
        exclude: Annotated[list[str] | None, REGULAR_EXPRESSIONS] = None,
        protect_first_last: bool = True,
        min_cosine: Annotated[float | None, Range(-1.0, 1.0)] = 0.99,
        min_sqnr_db: float | None = None,
        min_top1_agreement: Annotated[float | None, Range(0.0, 1.0)] = 0.97,
        finetune_steps: Annotated[int, Range(low=0)] = 0,
        finetune_samples: Annotated[int, Range(low=2)] = 512,
    ):
        super().__init__()
        self.finetune_steps = finetune_steps
        self.finetune_samples = finetune_samples
        self.ratio = ratio
        self.budget = Thresholds(
            min_cosine=min_cosine, min_sqnr_db=min_sqnr_db, min_top1_agreement=min_top1_agreement
        )
        self.settings = SparsitySettings(
            ratio=0.5 if ratio == "auto" else ratio,
            pattern=parse_pattern(pattern),
            importance=importance,
            reconstruct=reconstruct,
            refit_steps=refit_steps,
            allocation=allocation,
            exclude=tuple(exclude or []),
            protect_first_last=protect_first_last,
        )
        self.samples = samples

    def call(self, model: ir.Model) -> PassResult:
        data = self.context.data
        feeds = data.take(self.samples) if data is not None else []
        labels = data.take_labels(self.samples) if data is not None else None
        progress = self.context.progress
        original = model.clone() if self.finetune_steps else None
        if self.ratio == "auto":
            comparison = self.context.reference_comparison()
            report = sparsify_to_budget(
                model, feeds, self.settings, comparison, self.budget, progress, labels
            )
        else:
            report = sparsify_model(model, feeds, self.settings, progress, labels)
        self.context.sparsity = report
        if original is not None and report.layers:
            self.context.recovery = recover_steps(
                model,
                original,
                data.take(self.finetune_samples) if data is not None else [],
                self.finetune_steps,
                [layer.weight for layer in report.layers],
                progress,
            )
        details = {
            "sparsity": round(report.sparsity, 4),
            "pattern": str(self.settings.pattern),
            "layers pruned": len(report.layers),
        }
        if report.dense:
            details["layers dense"] = len(report.dense)
        if report.candidate_closeness:
            details["allocation"] = report.allocation
        if self.context.recovery is not None and original is not None:
            details["fine-tune kept"] = self.context.recovery.kept
        if report.budget is not None:
            details["budget"] = report.budget
            details["trials"] = len(report.trials)
        return PassResult(
            model, modified=bool(report.layers), changes=len(report.layers), details=details
        )
