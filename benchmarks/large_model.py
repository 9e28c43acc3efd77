"""A model over 2 GB through the int8 preset, against onnxruntime's quantize_static.

Builds a synthetic transformer-style model with external data (``--layers`` blocks of
LayerNorm, a ``--width``-square MatMul, Gelu, another MatMul and a residual Add; 24 blocks of
4096 make 3.2 GB), then quantizes it twice, each in a fresh process: ``onnxopt optimize
--recipe int8 --calib random`` and onnxruntime's ``quantize_static`` (QDQ, per-channel,
``use_external_data_format=True``) on the same number of random samples. Prints the size on
disk, the wall time and the peak RSS of each, and the peak RSS as a multiple of the size.
The targets (issue 11): onnxopt's peak RSS at most 2x the model's size and below
onnxruntime's, its wall time no more than onnxruntime's.

    .venv/bin/python benchmarks/large_model.py [--layers 24] [--width 4096] [--samples 32]

writes its table to the "Large model" section of benchmarks/RESULTS.md as well. Needs about
4x the model's size in free disk (the model, two results) under the system's temp folder.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from results_sections import write_section

SECTION = "## Large model"

BUILD = """
import sys
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

path, layers, width = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
rng = np.random.default_rng(0)
nodes, initializers, current = [], [], "x"
for index in range(layers):
    for name, scale in (("w1", 1.0), ("w2", 1.0)):
        weight = rng.standard_normal((width, width), dtype=np.float32) * np.float32(scale / width**0.5)
        initializers.append(numpy_helper.from_array(weight, f"layer{index}.{name}"))
    initializers.append(numpy_helper.from_array(np.ones(width, np.float32), f"layer{index}.gamma"))
    initializers.append(numpy_helper.from_array(np.zeros(width, np.float32), f"layer{index}.beta"))
    p = f"layer{index}"
    nodes += [
        helper.make_node("LayerNormalization", [current, f"{p}.gamma", f"{p}.beta"], [f"{p}.n"], axis=-1),
        helper.make_node("MatMul", [f"{p}.n", f"{p}.w1"], [f"{p}.h"]),
        helper.make_node("Gelu", [f"{p}.h"], [f"{p}.a"]),
        helper.make_node("MatMul", [f"{p}.a", f"{p}.w2"], [f"{p}.o"]),
        helper.make_node("Add", [current, f"{p}.o"], [f"{p}.r"]),
    ]
    current = f"{p}.r"
graph = helper.make_graph(
    nodes, "large",
    [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16, width])],
    [helper.make_tensor_value_info(current, TensorProto.FLOAT, [1, 16, width])],
    initializers,
)
model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
model.ir_version = 9
onnx.save(model, path, save_as_external_data=True, location=path.split("/")[-1] + ".data")
"""

ONNXOPT = """
import json, resource, sys, time
from onnxopt.cli import main

model, output, samples = sys.argv[1:4]
start = time.perf_counter()
code = main(["optimize", model, "-o", output, "--calib", "random", "--no-timing", "-q",
             "--set", f"calibrate.samples={samples}"])
print(json.dumps({"seconds": time.perf_counter() - start, "exit": code,
                  "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""

ONNXRUNTIME = """
import json, resource, sys, time
import numpy as np
from onnxruntime.quantization import (CalibrationDataReader, QuantFormat, QuantType,
                                      quantize_static)

model, output, samples, width = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])

class Random(CalibrationDataReader):
    def __init__(self):
        self.left, self.rng = samples, np.random.default_rng(0)
    def get_next(self):
        if not self.left:
            return None
        self.left -= 1
        return {"x": self.rng.standard_normal((1, 16, width)).astype(np.float32)}

start = time.perf_counter()
quantize_static(model, output, Random(), quant_format=QuantFormat.QDQ, per_channel=True,
                activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                use_external_data_format=True)
print(json.dumps({"seconds": time.perf_counter() - start, "exit": 0,
                  "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def run(script: str, *arguments: object) -> dict:
    result = subprocess.run(
        [sys.executable, "-c", script, *map(str, arguments)], capture_output=True, text=True
    )
    if result.returncode != 0:
        return {"failed": (result.stderr.strip().splitlines() or ["no output"])[-1]}
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--width", type=int, default=4096)
    parser.add_argument("--samples", type=int, default=32)
    arguments = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="onnxopt-large-") as name:
        folder = Path(name)
        model = folder / "large.onnx"
        subprocess.run(
            [sys.executable, "-c", BUILD, str(model), str(arguments.layers), str(arguments.width)],
            check=True,
        )
        size_mb = sum(path.stat().st_size for path in folder.iterdir()) / 2**20
        print(f"model: {size_mb:,.0f} MB", flush=True)
        rows = {
            "onnxopt int8 preset": run(ONNXOPT, model, folder / "onnxopt.onnx", arguments.samples),
            "onnxruntime quantize_static": run(
                ONNXRUNTIME, model, folder / "ort.onnx", arguments.samples, arguments.width
            ),
        }
    lines = [f"{'tool':<28} {'seconds':>8} {'peak RSS MB':>12} {'x size':>7}"]
    for label, figures in rows.items():
        if "failed" in figures:
            lines.append(f"{label:<28} failed: {figures['failed']}")
        else:
            lines.append(
                f"{label:<28} {figures['seconds']:>8.1f} {figures['rss_mb']:>12,.0f} "
                f"{figures['rss_mb'] / size_mb:>6.2f}x"
            )
        print(lines[-1], flush=True)
    write_section(
        SECTION,
        f"Command: `.venv/bin/python benchmarks/large_model.py --layers {arguments.layers} "
        f"--width {arguments.width} --samples {arguments.samples}`, "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}. A synthetic transformer-style "
        f"model of {size_mb:,.0f} MB with external data ({arguments.layers} blocks of "
        f"LayerNorm, two {arguments.width}-square MatMuls, Gelu, a residual Add), quantized "
        f"on {arguments.samples} random samples, each tool in a fresh process. Targets: "
        "onnxopt's peak RSS at most 2x the size and below onnxruntime's, its time no more "
        "than onnxruntime's.\n\n```\n" + "\n".join(lines) + "\n```",
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
