"""The Python entry point: optimize a model with a recipe, the same way the CLI does."""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import onnx_ir as ir

from onnxopt.__about__ import __version__
from onnxopt.compare import SpeedReport, measure_speed
from onnxopt.context import Context
from onnxopt.data import open_data
from onnxopt.errors import InputError, ProcessingError, ValidationFailed
from onnxopt.io import check_output_path, external_data_files, load, save, stamp_metadata
from onnxopt.passes.validate import ValidatePass
from onnxopt.pipeline import Pipeline
from onnxopt.progress import QUIET, Progress
from onnxopt.recipe import Recipe, apply_overrides, apply_settings, load_recipe
from onnxopt.report import report_document, transfer_json
from onnxopt.runtime import create_session, random_feeds
from onnxopt.summary import ModelSummary, summarize
from onnxopt.transfer import (
    OnMismatch,
    TransferReport,
    TransferSettings,
    TransferTuning,
    WeightScales,
    finetune_transferred,
    transfer_weights,
)
from onnxopt.transfer.files import read_map, read_pruning_report
from onnxopt.transfer.match import MatchMode
from onnxopt.validation import Check, check_structure

logger = logging.getLogger(__name__)

RANDOM_SAMPLES = 32
# Samples the target and source are run on to show the outputs before and after a transfer.
TRANSFER_CHECK_SAMPLES = 4
RANDOM_DATA_WARNING = (
    "calibrating on RANDOM data: the activation ranges are meaningless and the quantized model's accuracy "
    "says nothing; use this for smoke tests only, and give real samples with --calib DATA.npz"
)


@dataclasses.dataclass
class OptimizeResult:
    """What one optimization produced, and everything the report shows."""

    model: ir.Model
    recipe: Recipe
    context: Context
    before: ModelSummary
    after: ModelSummary
    input_path: Path | None
    written: list[Path]
    failure: ValidationFailed | None = None
    speed: SpeedReport | None = None

    @property
    def passed(self) -> bool:
        return self.failure is None

    def report(self) -> dict[str, Any]:
        """Everything a CI job may want to keep, as JSON-ready data."""
        return report_document(
            recipe=self.recipe,
            context=self.context,
            before=self.before,
            after=self.after,
            input_path=self.input_path,
            written=self.written,
            failure=self.failure,
            speed=self.speed,
        )


def optimize(
    model: str | os.PathLike | ir.Model,
    output: str | os.PathLike | None = None,
    *,
    recipe: str | os.PathLike | Recipe = "cleanup",
    data: Any = None,
    overrides: Sequence[str] = (),
    settings: Mapping[str, Any] | None = None,
    force: bool = False,
    external_data: bool | None = None,
    progress: Progress = QUIET,
    raise_on_failure: bool = True,
    timing: bool = True,
) -> OptimizeResult:
    """Optimize a model with a recipe, validate it against the original, and write it.

    Args:
        model: a path to an .onnx file, or an ``ir.Model`` (left untouched; a copy is optimized).
        output: where to write the result; None to only return it.
        recipe: a preset name, a .toml recipe path, or a ``Recipe``.
        data: calibration/validation samples: a .npz path, a folder of them, an iterable of feed
            dicts, or an onnxruntime ``CalibrationDataReader``; ``"random"`` makes random inputs,
            for smoke tests only.
        overrides: ``pass.option=value`` texts applied on top of the recipe and ``settings``, as
            ``--set`` takes them (the value is TOML or a bare word).
        settings: ``{"pass.option": value}`` applied on top of the recipe, values as they are.
        force: write the model even when validation fails.
        external_data: True or False to force weights in or out of a separate ``.data`` file;
            None decides by size (over 2 GB must be external).
        progress: where long passes show progress.
        raise_on_failure: raise ``ValidationFailed`` when validation fails (the CLI reports instead).
        timing: time the result against the input model (a few seconds, one thread and the
            default threads) for ``result.speed``.

    Returns:
        The optimized model, the report rows and the summaries before and after.
    """
    input_path = None if isinstance(model, ir.Model) else Path(model)
    if input_path is not None:
        loaded = load(input_path)
        reference: ir.Model | str = str(input_path)
        protected = [input_path, *external_data_files(loaded)]
    else:
        loaded = model.clone()
        reference = model
        protected = []
    if output is not None:
        check_output_path(output, protected)
    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe)
    recipe = apply_overrides(apply_settings(recipe.copy(), settings or {}), overrides)
    pipeline = Pipeline.from_recipe(recipe)
    context = Context(reference=reference, progress=progress)
    if isinstance(data, str) and data == "random":
        logger.warning(RANDOM_DATA_WARNING)
        data = random_feeds(loaded, RANDOM_SAMPLES)
    holdout = max(
        (pass_.samples for pass_ in pipeline.passes if isinstance(pass_, ValidatePass)),
        default=0,
    )
    context.comparison_samples = holdout or context.comparison_samples
    if data is not None:
        source = open_data(data, loaded)
        # Calibration needs the samples more: then validation holds back at most a quarter of them.
        calibrating = any(pass_.needs_data or pass_.reads_data for pass_ in pipeline.passes)
        context.data, context.validation_data = source.split(holdout, 0.25 if calibrating else 1.0)
    before = summarize(loaded, str(input_path) if input_path else None)
    failure = None
    try:
        pipeline.run(loaded, context)
    except ValidationFailed as error:
        failure = error
    stamp_metadata(loaded, recipe.name, pipeline.pass_names)
    written: list[Path] = []
    if output is not None and (failure is None or force):
        written = save(loaded, output, protected=protected, external_data=external_data)
    after = summarize(ir.load(written[-1]), written[-1]) if written else summarize(loaded)
    result = OptimizeResult(loaded, recipe, context, before, after, input_path, written, failure)
    if timing:
        reference_model = model if isinstance(model, ir.Model) else input_path
        result.speed = measure_speed(
            reference_model,
            written[-1] if written else loaded,
            _timing_feed(context),
            progress,
            context.runtime_name,
        )
    if failure is not None and raise_on_failure and not force:
        failure.result = result
        raise failure
    return result


def _timing_feed(context: Context) -> dict[str, Any] | None:
    """One sample to time on: the first compared on, else one the input model runs on."""
    comparison = context.comparison
    if comparison is None and context.reference is not None:
        comparison = context.reference_comparison()
    return comparison.feeds[0] if comparison is not None and comparison.feeds else None


_ORT_METHODS = {"MinMax": "minmax", "Entropy": "entropy", "Percentile": "percentile"}


def quantize(
    model_input: str | os.PathLike | ir.Model,
    model_output: str | os.PathLike | None,
    calibration_data_reader: Any = None,
    *,
    recipe: str | os.PathLike | Recipe = "int8",
    calibrate_method: Any = None,
    per_channel: bool = True,
    reduce_range: bool | None = None,
    nodes_to_exclude: Sequence[str] = (),
    op_types_to_exclude: Sequence[str] = (),
    calibration_cache: str | os.PathLike | None = None,
    use_external_data_format: bool | None = None,
    overrides: Sequence[str] = (),
    force: bool = False,
    progress: Progress = QUIET,
    timing: bool = True,
    target: str = "onnxruntime-cpu",
    **unsupported: Any,
) -> OptimizeResult:
    """INT8 QDQ quantization with the ``int8`` recipe, called like onnxruntime's ``quantize_static``.

    Switching from onnxruntime means changing the import: the first three arguments, an
    onnxruntime ``CalibrationDataReader``, ``calibrate_method`` (``CalibrationMethod.MinMax``,
    ``Entropy``, ``Percentile``, or the strings ``minmax``, ``entropy``, ``percentile``, ``mse``),
    ``per_channel``, ``reduce_range`` and ``nodes_to_exclude`` mean what they mean there; without
    ``calibrate_method`` the recipe's method applies (percentile 99.99 in ``int8``).
    onnxruntime's format and type options are accepted only at the values onnxopt produces
    (QDQ, uint8 activations, int8 weights), since any other choice is slower on CPU.
    ``target`` is the runtime the model is for (``onnxruntime-cpu``, ``openvino``, ``generic``;
    docs/targets.md).

    Returns:
        The result of ``optimize``, with the quantization report in ``result.report()``.
    """
    _check_onnxruntime_options(unsupported)
    settings: dict[str, Any] = {
        "quantize.per_channel": per_channel,
        "quantize.reduce_range": reduce_range,
        "quantize.exclude_nodes": list(nodes_to_exclude),
        "quantize.exclude_op_types": list(op_types_to_exclude),
        "quantize.target": target,
    }
    if calibrate_method is not None:
        method = getattr(calibrate_method, "name", calibrate_method)
        settings["calibrate.method"] = _ORT_METHODS.get(method, method)
    if calibration_cache is not None:
        settings["calibrate.cache"] = os.fspath(calibration_cache)
    return optimize(
        model_input,
        model_output,
        recipe=recipe,
        data=calibration_data_reader,
        settings=settings,
        overrides=overrides,
        force=force,
        external_data=use_external_data_format or None,
        progress=progress,
        timing=timing,
    )


def _check_onnxruntime_options(options: dict[str, Any]) -> None:
    """Accept onnxruntime's keyword arguments at the values onnxopt produces; refuse the rest."""
    accepted = {
        "quant_format": {"QDQ"},
        "activation_type": {"QUInt8"},
        "weight_type": {"QInt8"},
    }
    for key, value in options.items():
        name = getattr(value, "name", value)
        if key in accepted and name in accepted[key]:
            continue
        if key in accepted:
            raise InputError(
                f"quantize: {key}={name} is not supported",
                details=[f"supported: {', '.join(sorted(accepted[key]))}"],
                fix="leave it out: QDQ with uint8 activations and int8 weights is what onnxruntime runs fastest on CPU",
            )
        raise InputError(f"quantize: unknown option '{key}'", fix="see help(onnxopt.quantize)")


@dataclasses.dataclass
class TransferResult:
    """What one weight transfer produced: the target with the new weights, the report of
    every tensor, and the files written."""

    model: ir.Model
    report: TransferReport
    written: list[Path]

    def report_document(self) -> dict[str, Any]:
        return {
            "onnxopt_version": __version__,
            "written": [str(path) for path in self.written],
            "transfer": transfer_json(self.report),
        }


def transfer_model(
    source: str | os.PathLike | ir.Model,
    target: str | os.PathLike | ir.Model,
    output: str | os.PathLike | None = None,
    *,
    match: MatchMode = "auto",
    on_mismatch: OnMismatch = "error",
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    mapping: Mapping[str, str] | str | os.PathLike | None = None,
    pruning: Mapping[str, Any] | str | os.PathLike | None = None,
    weight_scales: WeightScales = "keep",
    data: Any = None,
    finetune_steps: int = 0,
    l2sp: float = 0.01,
    finetune_samples: int = 512,
    external_data: bool | None = None,
    progress: Progress = QUIET,
) -> TransferResult:
    """Copy the learned weights of ``source`` into ``target`` and write the result.

    Args:
        source: the model whose weights are copied (a path or an ``ir.Model``, not changed).
        target: the model that receives them (a path, or an ``ir.Model`` left untouched: a
            copy receives them).
        output: where to write the result; None to only return it.
        match: ``auto`` (names where unambiguous, structure elsewhere), ``name``, ``structure``.
        on_mismatch: a tensor of another shape: ``error``, ``skip``, or ``fit`` (slice or pad;
            an input convolution's channels summed or tiled).
        include: regular expressions; only target layers with a matching node or tensor
            name receive weights.
        exclude: regular expressions; matching target layers keep their weights.
        mapping: explicit pairs, target tensor -> source tensor, or a file of them.
        pruning: the pruning report of a pruned target (a dict, or the ``--report`` JSON file
            of the prune run): source weights are cut to the channels it kept.
        weight_scales: an int8 target's weight scales: ``keep`` (weights they would clip are
            an error) or ``widen`` the ones that would clip.
        data: samples of the target's inputs (as ``optimize`` takes them) for the before and
            after comparison (random inputs when None) and the fine-tune; with a ``labels``
            array the fine-tune trains on the task, else it distils from the source.
        finetune_steps: about this many steps of fine-tuning after the transfer, through the
            torch bridge (the torch extra); 0: none.
        l2sp: the weight of ``||theta - theta_source||^2`` in the fine-tune's loss.
        finetune_samples: samples of ``data`` the fine-tune trains on.
        external_data: as in ``optimize``.
        progress: where the fine-tune shows progress.

    Raises:
        InputError: the models have nothing in common, a pair is ambiguous, a map names
            unknown tensors, a shape differs under ``error``; nothing is written.
        ProcessingError: the graphs are one network but the result does not reproduce the
            source's outputs, or the result fails the checker or onnxruntime.
    """
    protected: list[Path] = []
    models = []
    for given in (target, source):
        if isinstance(given, ir.Model):
            models.append(given.clone())
        else:
            loaded = load(given)
            protected += [Path(given), *external_data_files(loaded)]
            models.append(loaded)
    model, source_model = models
    if output is not None:
        check_output_path(output, protected)
    settings = TransferSettings(
        match=match,
        on_mismatch=on_mismatch,
        include=tuple(include),
        exclude=tuple(exclude),
        mapping=read_map(mapping) if isinstance(mapping, (str, os.PathLike)) else mapping or {},
        pruning=read_pruning_report(pruning)
        if isinstance(pruning, (str, os.PathLike))
        else pruning,
        weight_scales=weight_scales,
    )
    inherited = {check.name for check in check_structure(model) if not check.passed}
    samples = open_data(data, model) if data is not None else None
    feeds = samples.take(TRANSFER_CHECK_SAMPLES) if samples is not None else []
    report = transfer_weights(model, source_model, settings, feeds)
    if finetune_steps:
        training = samples.take(finetune_samples) if samples is not None else []
        report.tuning = finetune_transferred(
            model,
            source_model,
            training,
            report.written,
            TransferTuning(steps=finetune_steps, l2sp=l2sp),
            samples.take_labels(len(training)) if samples is not None else None,
            progress,
        )
    _check_transferred(model, inherited)
    stamp_metadata(model, "transfer", ["transfer"])
    written: list[Path] = []
    if output is not None:
        written = save(model, output, protected=protected, external_data=external_data)
    return TransferResult(model, report, written)


def _check_transferred(model: ir.Model, inherited: set[str]) -> None:
    """The checker, shape inference and an onnxruntime session on the target with its new
    weights. A check the target failed before the transfer is not the transfer's fault (a
    graph onnxruntime optimized may use its own ops at opsets the checker refuses): it is
    reported as a warning, and onnxruntime must still load the result."""
    failures = [
        check
        for check in check_structure(model)
        if not check.passed and check.name not in inherited
    ]
    try:
        create_session(model)
    except Exception as error:  # onnxruntime raises several unrelated types
        failures.append(Check("onnxruntime session", False, f"{type(error).__name__}: {error}"))
    if failures:
        raise ProcessingError(
            "the target with the new weights fails its checks",
            details=[f"{check.name}: {check.detail}" for check in failures],
            fix="report this as a bug, with the two models",
        )
    if inherited:
        logger.warning(
            "the target fails the %s on its own, before any transfer; the result was checked "
            "by loading it in onnxruntime",
            " and ".join(sorted(inherited)),
        )
