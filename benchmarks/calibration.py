"""Calibration cost: onnxopt's streaming collectors against onnxruntime's own calibrators.

Measures, on the same samples, the wall-clock time and peak RSS of computing activation ranges with
onnxruntime's Entropy and Percentile calibrators (``create_calibrator``, ``collect_data``,
``compute_data``) and with onnxopt's ``calibrate`` pass (collection plus the same method). Each
calibration runs in its own process with a time limit; one that runs past it, or fails, is
reported as such. Timing starts after the imports and covers loading the model, running it over the
samples and computing the ranges. Appends its table to benchmarks/RESULTS.md under "Calibration cost".

    .venv/bin/python benchmarks/calibration.py                 # MNIST 64/128 samples, EfficientNet-Lite0 16/64
    .venv/bin/python benchmarks/calibration.py --limit 120
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from results_sections import write_section

BENCHMARKS = Path(__file__).resolve().parent
REPOSITORY = BENCHMARKS.parent
MODELS = {
    "mnist": (
        REPOSITORY / "models/mnist_cnn.onnx",
        REPOSITORY / "models/mnist_calibration.npz",
        (64, 128),
    ),
    "efficientnet": (
        BENCHMARKS / "models/efficientnet_lite0.onnx",
        BENCHMARKS / "models/efficientnet_lite0_calibration.npz",
        (16, 64),
    ),
}
METHODS = ("entropy", "percentile")
SECTION = "## Calibration cost"


def samples(data_path: Path, count: int) -> list[dict[str, np.ndarray]]:
    with np.load(data_path) as data:
        arrays = {name: data[name][:count] for name in data.files}
    return [{name: array[index] for name, array in arrays.items()} for index in range(count)]


def worker(tool: str, model: str, data: str, count: int, method: str) -> None:
    """Calibrate once and print the seconds and peak RSS of this process as JSON."""
    feeds = samples(Path(data), count)
    if tool == "onnxruntime":
        from onnxruntime.quantization import (
            CalibrationDataReader,
            CalibrationMethod,
            create_calibrator,
        )

        start = time.perf_counter()

        class Reader(CalibrationDataReader):
            def __init__(self) -> None:
                self.iterator = iter(feeds)

            def get_next(self):
                return next(self.iterator, None)

        with tempfile.TemporaryDirectory() as folder:
            calibrator = create_calibrator(
                model,
                augmented_model_path=str(Path(folder) / "augmented.onnx"),
                calibrate_method=CalibrationMethod.Entropy
                if method == "entropy"
                else CalibrationMethod.Percentile,
            )
            calibrator.collect_data(Reader())
            calibrator.compute_data()
    else:
        import onnxopt
        from onnxopt.calibration import CalibrationSettings, calibrate_model
        from onnxopt.data import open_data
        from onnxopt.shapes import infer_shapes

        start = time.perf_counter()
        loaded = onnxopt.load(model)
        infer_shapes(loaded)
        calibrate_model(loaded, open_data(feeds, loaded), CalibrationSettings(method))
    seconds = time.perf_counter() - start
    peak_megabytes = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"seconds": seconds, "peak_rss_mb": peak_megabytes}))


def measure(tool: str, model: Path, data: Path, count: int, method: str, limit: float) -> dict:
    command = [
        sys.executable,
        __file__,
        "--worker",
        tool,
        str(model),
        str(data),
        str(count),
        method,
    ]
    try:
        finished = subprocess.run(
            command, capture_output=True, text=True, timeout=limit, cwd=tempfile.gettempdir()
        )
    except subprocess.TimeoutExpired:
        return {"error": f"over {limit:.0f} s"}
    if finished.returncode != 0:
        last = (finished.stderr.strip().splitlines() or ["failed"])[-1]
        return {"error": last[:160]}
    return json.loads(finished.stdout.strip().splitlines()[-1])


def cell(result: dict, key: str, pattern: str) -> str:
    return result["error"] if "error" in result else pattern.format(result[key])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--limit", type=float, default=240.0, help="seconds allowed per calibration"
    )
    parser.add_argument("--worker", nargs=5, help=argparse.SUPPRESS)
    arguments = parser.parse_args()
    if arguments.worker:
        tool, model, data, count, method = arguments.worker
        worker(tool, model, data, int(count), method)
        return
    rows = [
        "| model | method | samples | onnxruntime s | onnxopt s | time ratio | onnxruntime peak RSS MB | onnxopt peak RSS MB |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, (model, data, counts) in MODELS.items():
        if not model.exists():
            print(f"{name}: {model} is missing; build it first (benchmarks/README.md)")
            continue
        for method in METHODS:
            for count in counts:
                theirs = measure("onnxruntime", model, data, count, method, arguments.limit)
                ours = measure("onnxopt", model, data, count, method, arguments.limit)
                ratio = "-"
                if "error" not in ours and "error" not in theirs:
                    ratio = f"{ours['seconds'] / theirs['seconds']:.3f}"
                elif "error" not in ours and theirs["error"].startswith("over"):
                    ratio = f"< {ours['seconds'] / arguments.limit:.3f}"
                row = (
                    f"| {name} | {method} | {count} | {cell(theirs, 'seconds', '{:.1f}')} | {cell(ours, 'seconds', '{:.1f}')} "
                    f"| {ratio} | {cell(theirs, 'peak_rss_mb', '{:.0f}')} | {cell(ours, 'peak_rss_mb', '{:.0f}')} |"
                )
                print(row, flush=True)
                rows.append(row)
    section = "\n".join(
        [
            f"Command: `.venv/bin/python benchmarks/calibration.py --limit {arguments.limit:.0f}`, "
            f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}. Each calibration in its own process; "
            "time ratio is onnxopt / onnxruntime (target: at most 0.33).",
            "",
            *rows,
            "",
        ]
    )
    write_section(SECTION, section)


if __name__ == "__main__":
    main()
