"""Sparsity on real pretrained models: magnitude pruning (the baseline every tool has), Wanda,
and onnxopt's sparsify (SparseGPT with a least-squares refit), side by side in one run.

For EfficientNet-Lite0 (top-1 agreement with FP32) and the MiniLM sentence encoder (cosine of
the embeddings with FP32), one-shot, 50% unstructured and 2:4 on every Conv, Gemm and MatMul
but the first and last, measured on the held-back eval samples; then the ``sparsify`` preset
as a user runs it (budget-driven: the highest sparsity meeting its budget, judged on samples
held back from the calibration data, never on the eval samples). Build the models first
(benchmarks/README.md).

    .venv/bin/python benchmarks/pruning.py [--samples 128] [--finetune 512] [--epochs 4]

writes the table to its section of benchmarks/RESULTS.md as well.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
from results_sections import write_section

from onnxopt.api import optimize
from onnxopt.pruning import SparsityReport, SparsitySettings, parse_pattern, sparsify_model
from onnxopt.pruning.recovery import RecoverySettings, recover

MODELS = Path(__file__).resolve().parent / "models"
SECTION = "## Sparsity"
METHODS = [
    ("magnitude", "magnitude", False, "unstructured"),
    ("wanda", "wanda", False, "unstructured"),
    ("onnxopt sparsify", "sparsegpt", True, "unstructured"),
    ("magnitude 2:4", "magnitude", False, "2:4"),
    ("wanda 2:4", "wanda", False, "2:4"),
    ("onnxopt sparsify 2:4", "sparsegpt", True, "2:4"),
]


def samples(path: Path, names: list[str], count: int) -> list[dict[str, np.ndarray]]:
    with np.load(path) as data:
        arrays = {name: data[name][:count] for name in names}  # each read loads the whole array
    total = len(arrays[names[0]])
    return [{name: np.array(arrays[name][index]) for name in names} for index in range(total)]


# The output each model is scored on, where it is not the first: MiniLM's sentence embedding
# (its first output, the hidden state of every position, is three quarters padding).
SCORED_OUTPUTS = {"minilm": "sentence_embedding"}


def quiet_session_options() -> ort.SessionOptions:
    """Session options without onnxruntime's warnings: ddddocr's graph declares its output
    [1, seqlen] where it gives [steps, 1, classes], and onnxruntime says so on every run."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return options


def model_outputs(
    model: ir.Model | Path, feeds: list[dict[str, np.ndarray]], name: str = ""
) -> list[np.ndarray]:
    """The scored output of ``model`` (SCORED_OUTPUTS of model ``name``, else its first) on
    each feed, in onnxruntime."""
    source = str(model) if isinstance(model, Path) else ir.to_proto(model).SerializeToString()
    session = ort.InferenceSession(source, quiet_session_options())
    wanted = SCORED_OUTPUTS.get(name, session.get_outputs()[0].name)
    return [session.run([wanted], feed)[0] for feed in feeds]


def score(name: str, outputs: list[np.ndarray], reference: list[np.ndarray]) -> str:
    if name == "efficientnet_lite0":
        agreement = np.mean(
            [a.argmax(-1) == b.argmax(-1) for a, b in zip(outputs, reference, strict=True)]
        )
        return f"top-1 agreement {agreement:.3f}"
    cosines = [
        float(np.sum(a * b) / (np.linalg.norm(a) * np.linalg.norm(b)))
        for a, b in zip(outputs, reference, strict=True)
    ]
    return f"cosine {np.mean(cosines):.4f}"


def finetuned(
    name: str,
    path: Path,
    model: ir.Model,
    report: SparsityReport,
    count: int,
    epochs: int,
    evaluation: list[dict[str, np.ndarray]],
    reference: list[np.ndarray],
) -> str:
    """The one-shot model distilled towards the original on ``count`` calibration samples,
    scored against the original's outputs ``reference`` on ``evaluation``."""
    original = ir.load(path)
    names = [value.name for value in original.graph.inputs]
    data = samples(MODELS / f"{name}_calibration.npz", names, count)
    zeros = {
        layer.weight: model.graph.initializers[layer.weight].const_value.numpy() == 0
        for layer in report.layers
    }
    start = time.perf_counter()
    result = recover(model, original, data, zeros, RecoverySettings(epochs=epochs))
    seconds = time.perf_counter() - start
    outputs = model_outputs(model, evaluation, name)
    return (
        f"{name:<20} {'+ fine-tune':<22} {report.sparsity:>8.3f} {seconds:>8.1f}  "
        f"{score(name, outputs, reference)}; {len(data)} samples, {result.steps} steps, "
        f"learning rate {result.learning_rate:g}, best epoch {result.best_epoch}"
    )


def main(arguments: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--samples", type=int, default=128, help="calibration samples (SparseGPT's 128)"
    )
    parser.add_argument(
        "--preset-samples", type=int, default=128, help="samples given to the preset"
    )
    parser.add_argument(
        "--finetune",
        type=int,
        default=0,
        metavar="SAMPLES",
        help="also fine-tune the 50%% onnxopt model on this many calibration samples",
    )
    parser.add_argument(
        "--epochs",
        type=int,
        default=RecoverySettings.epochs,
        help="the fine-tune's epochs, at most",
    )
    parser.add_argument(
        "--models",
        default="efficientnet_lite0,minilm",
        help="comma-separated models to run (default: both)",
    )
    options = parser.parse_args(arguments)
    lines = [f"{'model':<20} {'method':<22} {'sparsity':>8} {'seconds':>8}  fidelity with FP32"]
    for name in options.models.split(","):
        path = MODELS / f"{name}.onnx"
        if not path.exists():
            lines.append(f"{name:<20} not built (benchmarks/README.md)")
            continue
        reference_session = ort.InferenceSession(str(path), quiet_session_options())
        names = [spec.name for spec in reference_session.get_inputs()]
        calibration = samples(MODELS / f"{name}_calibration.npz", names, options.samples)
        evaluation = samples(MODELS / f"{name}_eval.npz", names, 64)
        reference = model_outputs(path, evaluation, name)
        for label, importance, reconstruct, pattern in METHODS:
            model = ir.load(path)
            settings = SparsitySettings(
                ratio=0.5,
                pattern=parse_pattern(pattern),
                importance=importance,
                reconstruct=reconstruct,
            )
            start = time.perf_counter()
            report = sparsify_model(model, calibration, settings)
            seconds = time.perf_counter() - start
            outputs = model_outputs(model, evaluation, name)
            lines.append(
                f"{name:<20} {label:<22} {report.sparsity:>8.3f} {seconds:>8.1f}  "
                f"{score(name, outputs, reference)}"
            )
            print(lines[-1], flush=True)
            if options.finetune and label == "onnxopt sparsify":
                lines.append(
                    finetuned(
                        name,
                        path,
                        model,
                        report,
                        options.finetune,
                        options.epochs,
                        evaluation,
                        reference,
                    )
                )
                print(lines[-1], flush=True)
        data = samples(MODELS / f"{name}_calibration.npz", names, options.preset_samples)
        start = time.perf_counter()
        result = optimize(path, recipe="sparsify", data=data, timing=False)
        seconds = time.perf_counter() - start
        report = result.context.sparsity
        outputs = model_outputs(result.model, evaluation, name)
        lines.append(
            f"{name:<20} {'preset sparsify (auto)':<22} {report.sparsity:>8.3f} {seconds:>8.1f}  "
            f"{score(name, outputs, reference)}; budget {report.budget} met on "
            f"{result.context.validation.samples} held-back samples, {len(report.trials)} trials"
        )
        print(lines[-1], flush=True)
    command = " ".join(["benchmarks/pruning.py", *arguments])
    write_section(
        SECTION,
        f"Command: `.venv/bin/python {command}`, "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; one-shot, 50% of every Conv, "
        f"Gemm and MatMul weight but the first and last layers (2:4: layers whose input columns "
        f"divide into 4), {options.samples} calibration samples, fidelity on 64 held-back eval "
        "samples; 'sparsity' is over the pruned layers. The preset gets the first "
        f"{options.preset_samples} calibration samples (a quarter held back for its budget "
        "and validation).\n\n```\n" + "\n".join(lines) + "\n```",
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
