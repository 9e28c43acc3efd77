"""Runtime targets in OpenVINO: onnxopt's --target openvino against the other int8 models there.

For each model, in one run: onnxopt's int8 preset for its default target (onnxruntime-cpu) and
for --target openvino, and onnxruntime's best QDQ recipe (quantize_static, pre-processed,
per-channel, uint8 activations; the same as benchmarks/quantization.py's "onnxruntime best").
Every model, FP32 included, is then run in OpenVINO's CPU plugin, one thread: the task score
against FP32's outputs in OpenVINO (or against ground truth where the model has it), and the
median latency, timed round-robin. Speedups are against the FP32 model in float32 precision;
OpenVINO's default on CPUs with AMX or AVX512-BF16 runs float models in bfloat16, and its
latency is shown beside for reference.

Targets (issue 12): --target openvino runs at >= 1.0x FP32 in OpenVINO, at least as fast as
onnxruntime's QDQ model there, with task scores meeting the onnxruntime target's goals;
MiniLM >= 2x with cosine >= 0.99.

    .venv/bin/python benchmarks/targets.py                      # every built model, ~25 minutes
    .venv/bin/python benchmarks/targets.py --models minilm efficientnet

Needs OpenVINO (pip install 'onnxopt[openvino]') and the models of build_models.py and
build_hard_models.py. Writes the "Runtime targets" section of benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import sys
import tempfile
import time
from pathlib import Path

from quantization import (
    MODELS,
    NpzSampleReader,
    Settings,
    _ort_best,
    evaluation_outputs,
    interleaved_latency,
    load_evaluation_feeds,
)
from results_sections import write_section

SECTION = "## Runtime targets"
ORT_SAMPLES = 128
EVALUATION_SAMPLES = 200
TIMING = Settings(evaluation_samples=None, warmup_runs=5, latency_rounds=60, default_samples=())
ROWS = ("onnxruntime best (QDQ)", "onnxopt --target onnxruntime-cpu", "onnxopt --target openvino")


def quantize_all(model_key: str, folder: Path) -> dict[str, Path | str]:
    """Each int8 model of ``ROWS``, or why it could not be made."""
    import onnxopt

    model = MODELS[model_key]
    made: dict[str, Path | str] = {}
    reader = NpzSampleReader(model.calibration_path, ORT_SAMPLES)
    path = folder / "ort_best.onnx"
    try:
        with contextlib.chdir(folder):  # onnxruntime's shape inference leaves files in the cwd
            _ort_best(model.model_path, path, reader, [], {})
        made[ROWS[0]] = path
    except Exception as error:
        made[ROWS[0]] = f"failed: {type(error).__name__}: {str(error)[:120]}"
    finally:
        reader.close()
    for row, target in zip(ROWS[1:], ("onnxruntime-cpu", "openvino"), strict=True):
        path = folder / f"onnxopt_{target}.onnx"
        with contextlib.redirect_stdout(io.StringIO()):
            result = onnxopt.optimize(
                model.model_path,
                path,
                recipe="int8",
                data=model.calibration_path,
                overrides=[f"quantize.target={target}"],
                timing=False,
                raise_on_failure=False,
            )
        made[row] = path if result.written else f"failed: {result.failure}"
    return made


def measure(model_key: str, made: dict[str, Path | str]) -> list[str]:
    """Table lines: score and speed of FP32 and each int8 model, in OpenVINO."""
    from onnxopt.openvino_runtime import OpenVinoSession

    model = MODELS[model_key]
    feeds = load_evaluation_feeds(model, EVALUATION_SAMPLES)
    reference = OpenVinoSession(model.model_path, threads=1)
    sessions = {"fp32": reference}
    problems: dict[str, str] = {}
    for row, path in made.items():
        if isinstance(path, str):
            problems[row] = path
            continue
        try:
            sessions[row] = OpenVinoSession(path, threads=1)
        except Exception as error:
            lines = [line for line in str(error).splitlines() if line.strip()]
            problems[row] = f"does not load in OpenVINO: {(lines or [''])[-1][:110]}"
    fp32_outputs = evaluation_outputs(reference, model.output_name, feeds)
    scores = {
        row: model.score(
            evaluation_outputs(session, model.output_name, feeds), fp32_outputs, len(feeds)
        )
        for row, session in sessions.items()
    }
    sessions["fp32, OpenVINO's default precision"] = OpenVinoSession(
        model.model_path, threads=1, precision=None
    )
    latency = interleaved_latency(sessions, feeds[0], TIMING)
    base = latency["fp32"]
    lines = [f"{model.title} ({model.score_name}; {len(feeds)} samples)"]
    for row in ("fp32", "fp32, OpenVINO's default precision", *ROWS):
        if row in problems:
            lines.append(f"  {row:<36} {problems[row]}")
            continue
        score = f"{scores[row]:.4f}" if row in scores else "-"
        lines.append(
            f"  {row:<36} {latency[row]:8.2f} ms {base / latency[row]:6.2f}x  score {score}"
        )
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    available = [key for key, model in MODELS.items() if model.model_path.exists()]
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=available)
    arguments = parser.parse_args()
    try:
        import openvino
    except ImportError:
        print("needs OpenVINO: pip install 'onnxopt[openvino]'", file=sys.stderr)
        return 2
    lines = [
        f"OpenVINO {openvino.__version__}, CPU plugin, one thread; speedup against FP32 in "
        "float32 precision (median latency, round-robin)"
    ]
    print(lines[0], flush=True)
    for key in arguments.models:
        start = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix=f"onnxopt-targets-{key}-") as name:
            made = quantize_all(key, Path(name))
            block = measure(key, made)
        block[0] += f" [{time.perf_counter() - start:.0f} s]"
        print("\n".join(block), flush=True)
        lines.extend(block)
    models = " ".join(arguments.models)
    write_section(
        SECTION,
        f"Command: `.venv/bin/python benchmarks/targets.py --models {models}`, "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}. Each model quantized by "
        "onnxruntime's best QDQ recipe and by onnxopt's int8 preset for two targets, then "
        "scored and timed in OpenVINO. Targets: --target openvino at >= 1.0x FP32 and at "
        "least as fast as onnxruntime's QDQ model, scores meeting the onnxruntime target's "
        "goals; MiniLM >= 2x with cosine >= 0.99.\n\n```\n" + "\n".join(lines) + "\n```",
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
