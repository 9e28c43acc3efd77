"""The ``prune``, ``prune-int8`` and ``sparsify`` presets as a user runs them, on real pretrained
models other than the two the pruning work was tuned on (EfficientNet-Lite0 and MiniLM): does each
write a model, does validation pass, how close do the outputs stay, how much faster do the
pruned models run (onnxruntime, one thread, batch 1, timed interleaved with the original).

Each model gets its first 64 calibration samples (the presets hold a quarter back for validation
and the sparsify budget); the cosine with FP32 is of the first output, per sample, on 32 eval
samples, with the top-1 agreement where that output holds class scores (per step for a
sequence). A model a preset refuses shows its error. Build the models first (benchmarks/README.md).

    .venv/bin/python benchmarks/pruning_presets.py

writes the table to its section of benchmarks/RESULTS.md as well. ``--models`` and ``--recipes``
rerun some of it, to a section of their own (the full table stays as it was measured).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
from pruning import MODELS, model_outputs, quiet_session_options, samples
from results_sections import cpu_model, write_section

from onnxopt.api import optimize
from onnxopt.compare import time_models
from onnxopt.errors import OnnxoptError
from onnxopt.metrics import class_score_outputs, compare_outputs

SECTION = "## Pruning presets on more models"
SUBSET_SECTION = "## Pruning presets on more models, some rerun"
RECIPES = ("prune", "prune-int8", "sparsify")
MODEL_NAMES = (
    "ppocr_cls",
    "text_orientation",
    "ppocr_rec",
    "silero_vad",
    "ppocr_det",
    "picodet_layout",
    "vit_saliency",
    "open_nsfw",
    "face_resnet",
    "ddddocr",
    "nudenet",
    "captcha_crnn",
)


def mean_cosine(outputs: list[np.ndarray], reference: list[np.ndarray]) -> float:
    cosines = []
    for a, b in zip(outputs, reference, strict=True):
        a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
        cosines.append(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-30))
    return float(np.mean(cosines))


def main(arguments: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODEL_NAMES), help="comma-separated")
    parser.add_argument("--recipes", default=",".join(RECIPES), help="comma-separated")
    options = parser.parse_args(arguments)
    models, recipes = options.models.split(","), options.recipes.split(",")
    subset = models != list(MODEL_NAMES) or recipes != list(RECIPES)
    lines = [f"{'model':<18} {'preset':<10} {'seconds':>7}  result"]
    for name in models:
        path = MODELS / f"{name}.onnx"
        if not path.exists():
            lines.append(f"{name:<18} not built (benchmarks/README.md)")
            continue
        reference_session = ort.InferenceSession(str(path), quiet_session_options())
        names = [spec.name for spec in reference_session.get_inputs()]
        data = samples(MODELS / f"{name}_calibration.npz", names, 64)
        evaluation = samples(MODELS / f"{name}_eval.npz", names, 32)
        reference = [reference_session.run(None, feed)[0] for feed in evaluation]
        first = reference_session.get_outputs()[0].name
        classes = class_score_outputs(ir.load(path)) & {first}
        for recipe in recipes:
            start = time.perf_counter()
            try:
                result = optimize(
                    path, recipe=recipe, data=data, timing=False, raise_on_failure=False
                )
            except OnnxoptError as error:
                lines.append(
                    f"{name:<18} {recipe:<10} {time.perf_counter() - start:>7.1f}  refused: "
                    + str(error).splitlines()[0]
                )
                print(lines[-1], flush=True)
                continue
            seconds = time.perf_counter() - start
            context = result.context
            if context.pruning is not None:
                report = context.pruning
                what = (
                    f"MACs {report.macs_before / 1e6:.0f}M -> {report.macs_after / 1e6:.0f}M, "
                    f"{len(report.groups)} groups cut, {len(report.unprunable)} whole"
                )
                if context.int8_declined:
                    what += (
                        "; kept float (int8 at best "
                        f"{context.speed_check.best[1]:.2f}x the pruned float model)"
                    )
                elif context.quantization is not None and context.quantization.fallback:
                    what += "; " + context.quantization.fallback.stopped
                timing = time_models(path, result.model, evaluation[0], threads=1, seconds=3.0)
                what += f"; {timing.speedup:.2f}x FP32"
            else:
                what = f"sparsity {context.sparsity.sparsity:.2f}"
            verdict = "validation passed" if result.failure is None else "validation FAILED"
            outputs = model_outputs(result.model, evaluation)
            fidelity = f"cosine {mean_cosine(outputs, reference):.4f}"
            if classes:
                [scores] = compare_outputs(
                    [first], [[a] for a in reference], [[a] for a in outputs], class_outputs=classes
                )
                fidelity += f", top-1 agreement {scores.top1_agreement:.3f}"
            lines.append(f"{name:<18} {recipe:<10} {seconds:>7.1f}  {what}; {fidelity}; {verdict}")
            print(lines[-1], flush=True)
    command = " ".join([".venv/bin/python benchmarks/pruning_presets.py", *arguments])
    write_section(
        SUBSET_SECTION if subset else SECTION,
        f"Command: `{command}`, "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {cpu_model()}, "
        f"{os.cpu_count()} cores; presets with their defaults "
        "(prune: 30% fewer MACs, channels in multiples of 8, refit; prune-int8: the same, then "
        "int8 where it runs faster than the pruned float model; sparsify: the highest "
        "sparsity meeting cosine >= 0.99 and top-1 agreement >= 0.97), 64 calibration samples, "
        "cosine of the first output with FP32 on 32 eval samples (and the top-1 agreement where "
        "it holds class scores: per step for the text recognizers); speed against the "
        "original, "
        "onnxruntime, one thread, batch 1, timed interleaved.\n\n```\n"
        + "\n".join(lines)
        + "\n```",
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
