"""Torch bridge fidelity on the real benchmark models: forward outputs against onnxruntime's.

For every model built into benchmarks/models (and the bundled MNIST sample), runs the first
calibration samples through onnxruntime (all graph optimizations off, so it computes what the
graph says) and through ``onnxopt.bridge.to_module``, and prints the largest error relative to
the output's magnitude, per model, and the largest of all. The target (issue #8): 1e-5.

    .venv/bin/python benchmarks/bridge.py [--samples N]

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
import torch
from results_sections import write_section

from onnxopt.bridge import to_module
from onnxopt.errors import OnnxoptError

REPOSITORY = Path(__file__).resolve().parent.parent
TARGET = 1e-5
SECTION = "## Torch bridge fidelity"


def model_pairs() -> list[tuple[str, Path, Path]]:
    pairs = [
        ("mnist", REPOSITORY / "models/mnist_cnn.onnx", REPOSITORY / "models/mnist_calibration.npz")
    ]
    for calibration in sorted((REPOSITORY / "benchmarks/models").glob("*_calibration.npz")):
        name = calibration.name.removesuffix("_calibration.npz")
        model = calibration.with_name(f"{name}.onnx")
        if model.exists():
            pairs.append((name, model, calibration))
    return pairs


def relative_error(actual: np.ndarray, expected: np.ndarray) -> float:
    if expected.dtype.kind != "f":
        return 0.0 if np.array_equal(actual, expected) else float("inf")
    scale = float(np.max(np.abs(expected))) or 1.0
    return (
        float(np.max(np.abs(actual.astype(np.float64) - expected))) / scale
        if expected.size
        else 0.0
    )


def measure(model_path: Path, calibration: Path, samples: int) -> tuple[float, float, float, float]:
    """Largest relative error, onnxruntime's own spread (all optimizations against none: the
    float32 rounding the model amplifies), onnxruntime's and the bridge's seconds per sample."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(str(model_path), options)
    optimized = ort.InferenceSession(str(model_path))
    module = to_module(ir.load(model_path))
    data = np.load(calibration)
    worst, spread, ort_seconds, torch_seconds = 0.0, 0.0, 0.0, 0.0
    for index in range(samples):
        feed = {name: np.asarray(data[name][index]) for name in module.input_names}
        start = time.perf_counter()
        expected = session.run(None, feed)
        ort_seconds += time.perf_counter() - start
        start = time.perf_counter()
        with torch.no_grad():
            actual = module(
                *(torch.from_numpy(np.asarray(feed[name])) for name in module.input_names)
            )
        torch_seconds += time.perf_counter() - start
        for value, reference in zip(actual, expected, strict=True):
            worst = max(worst, relative_error(value.numpy(), np.asarray(reference)))
        for value, reference in zip(optimized.run(None, feed), expected, strict=True):
            spread = max(spread, relative_error(np.asarray(value), np.asarray(reference)))
    return worst, spread, ort_seconds / samples, torch_seconds / samples


def main(arguments: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=4)
    options = parser.parse_args(arguments)
    lines = [
        f"{'model':<22} {'max rel error':>14} {'ort spread':>11} {'ort ms':>9} {'bridge ms':>10}  result"
    ]
    largest = 0.0
    failures = 0
    for name, model, calibration in model_pairs():
        try:
            error, spread, ort_seconds, torch_seconds = measure(model, calibration, options.samples)
        except OnnxoptError as problem:
            lines.append(
                f"{name:<22} {'-':>14} {'-':>9} {'-':>10}  not supported: {problem.message}"
            )
            failures += 1
            continue
        largest = max(largest, error)
        if error <= TARGET:
            verdict = "ok"
        elif error <= spread:
            verdict = "above the target, within onnxruntime's own spread"
        else:
            verdict = "ABOVE TARGET"
        failures += error > TARGET
        lines.append(
            f"{name:<22} {error:>14.2e} {spread:>11.2e} {ort_seconds * 1e3:>9.2f} "
            f"{torch_seconds * 1e3:>10.2f}  {verdict}"
        )
    lines.append(
        f"largest relative error: {largest:.2e} (target {TARGET:g}); {failures} model(s) failing"
    )
    print("\n".join(lines))
    command = " ".join(["benchmarks/bridge.py", *arguments])
    write_section(
        SECTION,
        f"Command: `.venv/bin/python {command}`, "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {options.samples} calibration samples "
        "per model; error relative to the output's largest magnitude, against onnxruntime with graph "
        "optimizations off; 'ort spread' is onnxruntime with all of them against none, the float32 "
        "rounding the model amplifies; default threads.\n\n```\n" + "\n".join(lines) + "\n```",
    )
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
