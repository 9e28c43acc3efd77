"""The command line: argument parsing, progress and printing around the Python API."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from rich.console import Console

from onnxopt.__about__ import __version__
from onnxopt.errors import InputError, OnnxoptError
from onnxopt.openvino_runtime import require_openvino
from onnxopt.progress import Progress
from onnxopt.quantization.targets import RUNTIMES, TARGETS

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="onnxopt", description="Optimize ONNX models for CPU and edge deployment."
    )
    parser.add_argument("--version", action="version", version=f"onnxopt {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    optimize = commands.add_parser(
        "optimize", help="run a recipe over a model, validate it and write it"
    )
    optimize.add_argument("model", help="input .onnx file")
    optimize.add_argument(
        "-o", "--output", required=True, help="output .onnx file (never the input)"
    )
    optimize.add_argument(
        "--recipe",
        default=None,
        help="preset name or recipe .toml file (default: int8 with --calib, else cleanup)",
    )
    optimize.add_argument(
        "--calib",
        default=None,
        help="samples: a .npz file or a folder of .npz files ('random': smoke tests only)",
    )
    optimize.add_argument(
        "--calib-cache",
        default=None,
        metavar="FILE.json",
        help="reuse calibration statistics from this file, or write them there (same model only)",
    )
    optimize.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="PASS.OPTION=VALUE",
        help="override a recipe option, e.g. validate.min_cosine=0.999 (repeatable)",
    )
    optimize.add_argument(
        "--target",
        choices=sorted(TARGETS),
        default=None,
        help="the runtime the int8 model is for: "
        + "; ".join(f"{name}: {target.summary}" for name, target in TARGETS.items())
        + " (sets quantize.target)",
    )
    optimize.add_argument("--report", default=None, help="write the full report as JSON here")
    optimize.add_argument(
        "--plot",
        default=None,
        metavar="FILE.png",
        help="draw the per-layer SQNR of a quantized result, the layers kept float and the budget "
        "(needs matplotlib: pip install 'onnxopt[plot]')",
    )
    optimize.add_argument(
        "--force", action="store_true", help="write the model even if validation fails"
    )
    optimize.add_argument(
        "--external-data",
        action="store_true",
        default=None,
        help="write weights to OUTPUT.data (automatic above 2 GB)",
    )
    optimize.add_argument(
        "--no-timing",
        action="store_true",
        help="skip timing the result against the input model (a few seconds)",
    )
    optimize.add_argument("-q", "--quiet", action="store_true", help="no progress bars or tables")

    inspect_command = commands.add_parser(
        "inspect", help="describe a model: IO, ops, parameters, size"
    )
    inspect_command.add_argument("model", help=".onnx file")
    inspect_command.add_argument("--json", action="store_true", help="print JSON instead of tables")

    compare = commands.add_parser("compare", help="fidelity and latency of model B against model A")
    compare.add_argument("model_a", help="reference .onnx file")
    compare.add_argument("model_b", help="candidate .onnx file")
    compare.add_argument(
        "--data", default=None, help="samples (.npz or folder); random inputs when absent"
    )
    compare.add_argument(
        "--samples", type=int, default=16, help="samples used for fidelity (default 16)"
    )
    compare.add_argument("--runs", type=int, default=50, help="timed runs per model (default 50)")
    compare.add_argument("--threads", type=int, default=None, help="intra-op threads")
    compare.add_argument(
        "--runtime",
        choices=RUNTIMES,
        default="onnxruntime",
        help="run both models in onnxruntime (default) or OpenVINO (float parts in float32; "
        "pip install 'onnxopt[openvino]')",
    )
    compare.add_argument("--json", action="store_true", help="print JSON instead of tables")
    compare.add_argument("-q", "--quiet", action="store_true", help="no progress bars")

    transfer = commands.add_parser(
        "transfer", help="copy the learned weights of one model into another and write it"
    )
    transfer.add_argument("source", help=".onnx file whose weights are copied")
    transfer.add_argument("target", help=".onnx file that receives them (not changed)")
    transfer.add_argument(
        "-o", "--output", required=True, help="output .onnx file (never an input)"
    )
    transfer.add_argument(
        "--match",
        choices=("auto", "name", "structure"),
        default="auto",
        help="pair weights by name, by graph structure, or auto: names where they agree with "
        "the structure, structure elsewhere (default)",
    )
    transfer.add_argument(
        "--on-mismatch",
        choices=("error", "skip", "fit"),
        default="error",
        help="a weight of another shape: error (default), skip it, or fit (slice or pad; an "
        "input convolution's channels summed or tiled)",
    )
    transfer.add_argument(
        "--include",
        action="append",
        default=[],
        metavar="RE",
        help="only target layers whose node or tensor name matches receive weights (repeatable)",
    )
    transfer.add_argument(
        "--exclude",
        action="append",
        default=[],
        metavar="RE",
        help="target layers whose node or tensor name matches keep theirs (repeatable)",
    )
    transfer.add_argument(
        "--map",
        default=None,
        metavar="FILE",
        help="explicit pairs: one 'TARGET_TENSOR SOURCE_TENSOR' a line, or a JSON object",
    )
    transfer.add_argument(
        "--pruned",
        default=None,
        metavar="REPORT.json",
        help="the --report of the prune run that made the target: source weights are cut "
        "to the channels it kept",
    )
    transfer.add_argument(
        "--weight-scales",
        choices=("keep", "widen"),
        default="keep",
        help="an int8 target's weight scales: keep them, new weights they would clip being an "
        "error (default), or widen those that would clip",
    )
    transfer.add_argument(
        "--data", default=None, help="samples of the target's inputs for the before/after check"
    )
    transfer.add_argument(
        "--finetune-steps",
        type=int,
        default=0,
        metavar="N",
        help="fine-tune about N steps after the transfer on --data (its 'labels' array for "
        "the task, else distilling the source), held near the source's weights (needs "
        "pip install 'onnxopt[torch]'); 0: none (default)",
    )
    transfer.add_argument(
        "--l2sp",
        type=float,
        default=0.01,
        metavar="LAMBDA",
        help="weight of ||theta - theta_source||^2 in the fine-tune's loss (default 0.01)",
    )
    transfer.add_argument("--report", default=None, help="write the full report as JSON here")
    transfer.add_argument(
        "--external-data",
        action="store_true",
        default=None,
        help="write weights to OUTPUT.data (automatic above 2 GB)",
    )
    transfer.add_argument("-q", "--quiet", action="store_true", help="no tables")

    commands.add_parser("recipes", help="list the preset recipes and every pass with its options")
    return parser


class _LoudWarnings(logging.Handler):
    """Log records on stderr as ``onnxopt: warning: ...``, warnings and worse in bold red."""

    def __init__(self, console: Console):
        super().__init__(logging.WARNING)
        self.console = console

    def emit(self, record: logging.LogRecord) -> None:
        style = "bold red" if record.levelno >= logging.WARNING else None
        self.console.print(
            f"onnxopt: {record.levelname.lower()}: {record.getMessage()}",
            style=style,
            markup=False,
            highlight=False,
            soft_wrap=True,
        )


def main(argv: Sequence[str] | None = None) -> int:
    arguments = build_parser().parse_args(argv)
    console = Console()
    errors = Console(stderr=True)
    root = logging.getLogger()
    if not any(isinstance(handler, _LoudWarnings) for handler in root.handlers):
        root.addHandler(_LoudWarnings(errors))
        root.setLevel(logging.WARNING)
    handlers = {
        "optimize": _optimize,
        "inspect": _inspect,
        "compare": _compare,
        "recipes": _recipes,
        "transfer": _transfer,
    }
    try:
        return handlers[arguments.command](arguments, console)
    except OnnxoptError as error:
        errors.print(
            f"onnxopt: error: {error.render()}", markup=False, highlight=False, soft_wrap=True
        )
        return error.exit_code
    except KeyboardInterrupt:
        errors.print("onnxopt: interrupted; nothing was written")
        return EXIT_FAILED


def _optimize(arguments: argparse.Namespace, console: Console) -> int:
    from onnxopt.api import optimize
    from onnxopt.report import render_passes, render_quantization, render_speed, render_validation
    from onnxopt.summary import render_before_after

    progress = Progress(enabled=not arguments.quiet)
    for path in (arguments.report, arguments.plot):
        if path:
            _check_report_path(path)
    if arguments.plot:
        from onnxopt.plot import require_matplotlib

        require_matplotlib()
    settings = {"calibrate.cache": arguments.calib_cache} if arguments.calib_cache else {}
    result = optimize(
        arguments.model,
        arguments.output,
        recipe=arguments.recipe or ("int8" if arguments.calib else "cleanup"),
        data=arguments.calib,
        settings=settings,
        overrides=[
            *arguments.overrides,
            *([f"quantize.target={arguments.target}"] if arguments.target else []),
        ],
        force=arguments.force,
        external_data=arguments.external_data,
        progress=progress,
        raise_on_failure=False,
        timing=not arguments.no_timing,
    )
    if not arguments.quiet:
        render_before_after(result.before, result.after, console)
        render_passes(result.context.report, console)
        render_quantization(result.context.quantization, console)
        render_validation(result.context.validation, console)
        render_speed(result.speed, console)
    if arguments.report:
        _write_json(arguments.report, result.report())
    if arguments.plot:
        _plot(arguments.plot, result)
    if result.failure is not None:
        Console(stderr=True).print(
            f"onnxopt: error: {result.failure.render()}",
            markup=False,
            highlight=False,
            soft_wrap=True,
        )
        if result.written:
            console.print(
                f"wrote {result.written[-1]} anyway (--force), although validation failed"
            )
        else:
            console.print("nothing written")
        return EXIT_FAILED
    console.print(f"wrote {result.written[-1]}", highlight=False, soft_wrap=True)
    return EXIT_OK


def _inspect(arguments: argparse.Namespace, console: Console) -> int:
    from onnxopt.io import load
    from onnxopt.summary import render_summary, summarize

    summary = summarize(load(arguments.model), arguments.model)
    if arguments.json:
        print(json.dumps(summary.as_dict(), indent=2))
    else:
        render_summary(summary, console)
    return EXIT_OK


def _compare(arguments: argparse.Namespace, console: Console) -> int:
    from onnxopt.compare import compare_models, render_comparison
    from onnxopt.data import open_data
    from onnxopt.io import load
    from onnxopt.runtime import random_feeds

    if arguments.runtime == "openvino":
        require_openvino()
    model_a, model_b = load(arguments.model_a), load(arguments.model_b)
    if arguments.data:
        feeds = open_data(arguments.data, model_a).take(arguments.samples)
    else:
        feeds = random_feeds(model_a, arguments.samples)
    comparison = compare_models(
        model_a,
        model_b,
        feeds,
        latency_runs=arguments.runs,
        threads=arguments.threads,
        progress=Progress(enabled=not (arguments.quiet or arguments.json)),
        runtime_name=arguments.runtime,
    )
    if arguments.json:
        print(json.dumps(comparison.as_dict(), indent=2))
    else:
        render_comparison(comparison, console)
    return EXIT_OK


def _transfer(arguments: argparse.Namespace, console: Console) -> int:
    from onnxopt.api import transfer_model
    from onnxopt.report import render_transfer

    if arguments.report:
        _check_report_path(arguments.report)
    for option in ("finetune_steps", "l2sp"):
        if getattr(arguments, option) < 0:
            raise InputError(
                f"--{option.replace('_', '-')} must be 0 or more",
                fix="give a number >= 0",
            )
    result = transfer_model(
        arguments.source,
        arguments.target,
        arguments.output,
        match=arguments.match,
        on_mismatch=arguments.on_mismatch,
        include=arguments.include,
        exclude=arguments.exclude,
        mapping=arguments.map,
        pruning=arguments.pruned,
        weight_scales=arguments.weight_scales,
        data=arguments.data,
        finetune_steps=arguments.finetune_steps,
        l2sp=arguments.l2sp,
        external_data=arguments.external_data,
        progress=Progress(enabled=not arguments.quiet),
    )
    if not arguments.quiet:
        render_transfer(result.report, console)
    if arguments.report:
        _write_json(arguments.report, result.report_document())
    console.print(f"wrote {result.written[-1]}", highlight=False, soft_wrap=True)
    return EXIT_OK


def _recipes(arguments: argparse.Namespace, console: Console) -> int:
    from rich.table import Table

    from onnxopt.passes import PASSES
    from onnxopt.recipe import available_presets, load_recipe

    presets = Table(title="Presets", title_justify="left")
    presets.add_column("preset")
    presets.add_column("passes")
    presets.add_column("description")
    for name in available_presets():
        recipe = load_recipe(name)
        presets.add_row(name, ", ".join(spec.name for spec in recipe.passes), recipe.description)
    console.print(presets)
    passes = Table(title="Passes", title_justify="left")
    passes.add_column("pass")
    passes.add_column("options (type = default)")
    passes.add_column("what it does")
    for name, pass_class in sorted(PASSES.items()):
        options = ", ".join(
            f"{option_name} ({option.describe()} = {option.default!r})"
            for option_name, option in pass_class.options().items()
        )
        passes.add_row(name, options or "-", (pass_class.__doc__ or "").strip().splitlines()[0])
    console.print(passes)
    return EXIT_OK


def _plot(path: str, result) -> None:
    from onnxopt.plot import plot_layers

    state = result.context.quantization
    if state is None or not state.layers:
        logging.getLogger(__name__).warning(
            "no plot written to '%s': the recipe measured no quantized layers (it needs "
            "'quantize' and 'fallback')",
            path,
        )
        return
    plot_layers(state, path)


def _check_report_path(path: str) -> None:
    folder = Path(path).parent
    if not folder.is_dir() or not os.access(folder, os.W_OK):
        raise InputError(
            f"cannot write '{path}': its folder is missing or not writable",
            fix="give a path in an existing folder you can write to",
        )


def _write_json(path: str, document: dict) -> None:
    from onnxopt.io import atomic_write_text

    atomic_write_text(path, json.dumps(document, indent=2, default=str) + "\n")


if __name__ == "__main__":
    sys.exit(main())
