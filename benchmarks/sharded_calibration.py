"""Sharded calibration: one process against 2 and 4 worker processes and Ray tasks.

Collects EfficientNet-Lite0's activation statistics over its 512 calibration samples (an .npz
file each worker reads itself) with ``calibrate.workers`` = 1, 2 and 4 and with Ray on a
local cluster, and prints the wall time, the speedup over one process, the peak RSS of the
driver and of the largest worker, and whether the statistics equal one process's bit for bit.
Each configuration runs in a fresh Python process, so peak RSS is its own. The machine's
core count bounds the speedup (2 cores here: 4 workers cannot beat 2).

    .venv/bin/python benchmarks/sharded_calibration.py [--samples 512]

writes its table to the "Sharded calibration" section of benchmarks/RESULTS.md as well.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from results_sections import write_section

BENCHMARKS = Path(__file__).resolve().parent
MODEL = BENCHMARKS / "models/efficientnet_lite0.onnx"
DATA = BENCHMARKS / "models/efficientnet_lite0_calibration.npz"
SECTION = "## Sharded calibration"

RUN = """
import hashlib, json, resource, sys, time
from onnxopt.calibration.collect import collect_statistics
from onnxopt.calibration.shards import collect_sharded
from onnxopt.data import open_data
from onnxopt.io import load

model_path, data_path, samples, workers, ray = sys.argv[1:6]
model = load(model_path)
data = open_data(data_path, model)
start = time.perf_counter()
if int(workers) == 1 and ray == "-":
    statistics = collect_statistics(model, None, data, max_samples=int(samples))
else:
    statistics, _ = collect_sharded(
        model, None, data, workers=int(workers), max_samples=int(samples),
        ray_address=None if ray == "-" else ray,
    )
seconds = time.perf_counter() - start
digest = hashlib.sha256(
    json.dumps({name: value.to_dict() for name, value in sorted(statistics.items())},
               sort_keys=True).encode()
).hexdigest()
print(json.dumps({
    "seconds": seconds,
    "driver_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    "worker_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
    "digest": digest,
}))
"""


def measure(samples: int, workers: int, ray: str) -> dict:
    output = subprocess.run(
        [sys.executable, "-c", RUN, str(MODEL), str(DATA), str(samples), str(workers), ray],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "RAY_DEDUP_LOGS": "0"},
    )
    return json.loads(output.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=512)
    arguments = parser.parse_args()
    if not MODEL.exists():
        print("build the models first: benchmarks/README.md (efficientnet_lite0)")
        return 1
    configurations = [("1 process", 1, "-"), ("2 workers", 2, "-"), ("4 workers", 4, "-")]
    if importlib.util.find_spec("ray") is not None:
        configurations.append(("Ray, local cluster", 1, "local"))
    else:
        print("Ray is not installed (pip install 'onnxopt[ray]'): its row is left out")
    lines = [
        f"{'collection':<20} {'seconds':>8} {'speedup':>8} {'driver MB':>10} "
        f"{'worker MB':>10}  statistics"
    ]
    baseline = None
    for label, workers, ray in configurations:
        figures = measure(arguments.samples, workers, ray)
        baseline = baseline or figures
        same = "identical" if figures["digest"] == baseline["digest"] else "DIFFER"
        worker = f"{figures['worker_mb']:.0f}" if workers > 1 else "-"
        lines.append(
            f"{label:<20} {figures['seconds']:>8.1f} "
            f"{baseline['seconds'] / figures['seconds']:>7.2f}x {figures['driver_mb']:>10.0f} "
            f"{worker:>10}  {same}"
        )
        print(lines[-1], flush=True)
    write_section(
        SECTION,
        f"Command: `.venv/bin/python benchmarks/sharded_calibration.py --samples "
        f"{arguments.samples}`, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
        f"{os.cpu_count()} cores. EfficientNet-Lite0's activation statistics (every float "
        "tensor) over its calibration samples, read from the .npz file by each worker; peak "
        "RSS of the driver and of the largest worker process (Ray's workers are not its "
        "children: their memory is not counted); 'identical': the statistics' SHA-256 "
        "equals one process's.\n\n```\n" + "\n".join(lines) + "\n```",
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
