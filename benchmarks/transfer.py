"""Weight transfer on a real model: fine-tuned weights moved into graphs already made for
deployment, against the name-based copy other tools do.

The source is EfficientNet-Lite0 fine-tuned a few steps in PyTorch and exported by the dynamo
exporter (``build_models.py --only efficientnet_lite0_finetuned``); the targets are made from
the deployed export of the original network (TorchScript: other names, the same layers):
as exported, cleaned by onnxopt, optimized by onnxruntime (FusedConv, renamed weights),
quantized by onnxopt's int8 preset, and pruned by its prune preset. Each target receives the
fine-tuned weights twice: by the anchor, onnxruntime-style copying of initializers whose
names and shapes agree (``SessionOptions.add_initializer`` and the scripts built on it), and
by ``onnxopt transfer``. Scored on the 200 eval images against the fine-tuned model: top-1
agreement and the largest logit difference. The int8 target takes the new weights with its
weight scales widened where they would clip (``weight_scales = "widen"``; with its own scales
the transfer refuses, and the row says how many tensors would clip) and is compared with the
fine-tuned model quantized from scratch; the pruned one, whose refit the fine-tuned weights replace, is
also fine-tuned after the transfer (distillation from the source, L2-SP).

    .venv/bin/python benchmarks/transfer.py

writes its table to the "Weight transfer" section of benchmarks/RESULTS.md as well.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
from pruning import MODELS, samples
from results_sections import write_section

from onnxopt.api import optimize, transfer_model
from onnxopt.errors import OnnxoptError
from onnxopt.runtime import runnable_random_feeds

SECTION = "## Weight transfer"
TARGET = MODELS / "efficientnet_lite0.onnx"
SOURCE = MODELS / "efficientnet_lite0_finetuned.onnx"
CALIBRATION = MODELS / "efficientnet_lite0_calibration.npz"
EVALUATION = MODELS / "efficientnet_lite0_eval.npz"
CALIBRATION_SAMPLES = 128
FINETUNE_STEPS = 64


def logits(model: ir.Model | Path, feeds: list[dict[str, np.ndarray]]) -> np.ndarray:
    source = str(model) if isinstance(model, Path) else ir.to_proto(model).SerializeToString()
    session = ort.InferenceSession(source, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return np.concatenate([session.run(None, {name: feed["image"]})[0] for feed in feeds])


def by_name(target: ir.Model, source: ir.Model) -> tuple[ir.Model, int]:
    """The anchor: every target initializer whose name and shape a source initializer has
    gets its values, as onnxruntime's ``add_initializer`` would."""
    model = target.clone()
    copied = 0
    theirs = source.graph.initializers
    for name, value in model.graph.initializers.items():
        other = theirs.get(name)
        if other is None or other.const_value is None or value.const_value is None:
            continue
        if other.const_value.shape != value.const_value.shape:
            continue
        if other.const_value.dtype != value.const_value.dtype:
            continue
        value.const_value = ir.tensor(other.const_value.numpy(), name=name)
        copied += 1
    return model, copied


def agreement(candidate: np.ndarray, reference: np.ndarray) -> float:
    return float(np.mean(candidate.argmax(1) == reference.argmax(1)))


def targets(folder: Path) -> dict[str, tuple[Path, Path | None]]:
    """The deployment graphs of the original network, with the pruning report where one is."""
    made: dict[str, tuple[Path, Path | None]] = {"as exported (TorchScript)": (TARGET, None)}
    cleaned = folder / "cleanup.onnx"
    optimize(TARGET, cleaned, recipe="cleanup", timing=False)
    made["onnxopt cleanup"] = (cleaned, None)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(folder / "ort_extended.onnx")
    ort.InferenceSession(str(TARGET), options, providers=["CPUExecutionProvider"])
    made["onnxruntime EXTENDED"] = (folder / "ort_extended.onnx", None)
    data = samples(CALIBRATION, ["image"], CALIBRATION_SAMPLES)
    optimize(TARGET, folder / "int8.onnx", recipe="int8", data=data, timing=False)
    made["onnxopt int8"] = (folder / "int8.onnx", None)
    pruned = optimize(TARGET, folder / "prune.onnx", recipe="prune", data=data, timing=False)
    (folder / "prune.json").write_text(json.dumps(pruned.report(), default=str))
    made["onnxopt prune (30% fewer MACs)"] = (folder / "prune.onnx", folder / "prune.json")
    return made


def sweep() -> list[str]:
    """Each benchmark model into its own onnxruntime EXTENDED graph, by ``auto`` and by
    structure alone: tensors moved, whether the graphs were judged one network, and the
    largest difference of the result's outputs from the model's."""
    lines = [f"{'model':<22} {'match':<10} {'tensors':>9} {'one network':>11} {'max |dout|':>11}"]
    with tempfile.TemporaryDirectory() as name:
        folder = Path(name)
        for path in sorted(MODELS.glob("*.onnx")):
            if path == SOURCE:
                continue
            optimized = folder / path.name
            options = ort.SessionOptions()
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
            options.optimized_model_filepath = str(optimized)
            original = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
            feeds, _ = runnable_random_feeds(ir.load(path), 4)
            expected = [original.run(None, feed) for feed in feeds]
            for match in ("auto", "structure"):
                try:
                    result = transfer_model(path, optimized, match=match)
                except OnnxoptError as error:
                    lines.append(
                        f"{path.stem:<22} {match:<10} refused: {str(error).splitlines()[0]}"
                    )
                    continue
                session = ort.InferenceSession(
                    ir.to_proto(result.model).SerializeToString(),
                    providers=["CPUExecutionProvider"],
                )
                difference = max(
                    float(np.abs(np.asarray(got) - np.asarray(want)).max())
                    for feed, outputs in zip(feeds, expected, strict=True)
                    for got, want in zip(session.run(None, feed), outputs, strict=True)
                )
                report = result.report
                lines.append(
                    f"{path.stem:<22} {match:<10} "
                    f"{report.transferred:>4}/{len(report.slots):<4} "
                    f"{'yes' if report.equivalent else 'no':>11} {difference:>11.2e}"
                )
            print(lines[-1], flush=True)
    return lines


def main() -> int:
    if not SOURCE.exists() or not TARGET.exists():
        print(
            "build the models first: benchmarks/README.md (efficientnet_lite0 and "
            "efficientnet_lite0_finetuned)"
        )
        return 1
    evaluation = samples(EVALUATION, ["image"], 200)
    tuned = logits(SOURCE, evaluation)
    source = ir.load(SOURCE)
    lines = [
        f"{'target':<32} {'method':<34} {'tensors':>9} {'seconds':>8} "
        f"{'top-1 agr.':>10} {'max |dlogit|':>12}"
    ]

    def row(target: str, method: str, tensors: str, seconds: float | None, result: np.ndarray):
        difference = float(np.abs(result - tuned).max())
        lines.append(
            f"{target:<32} {method:<34} {tensors:>9} "
            f"{'' if seconds is None else f'{seconds:.1f}':>8} "
            f"{agreement(result, tuned):>10.3f} {difference:>12.2e}"
        )
        print(lines[-1], flush=True)

    with tempfile.TemporaryDirectory() as name:
        folder = Path(name)
        for label, (path, report) in targets(folder).items():
            target = ir.load(path)
            row(label, "before (original weights)", "", None, logits(path, evaluation))
            anchored, copied = by_name(target, source)
            total = len(target.graph.initializers)
            row(
                label,
                "anchor: copy by name and shape",
                f"{copied}/{total}",
                None,
                logits(anchored, evaluation),
            )
            quantized = label == "onnxopt int8"
            if quantized:
                try:
                    transfer_model(SOURCE, path)
                    lines.append(f"{label:<32} with the target's weight scales: accepted")
                except OnnxoptError as error:
                    lines.append(
                        f"{label:<32} with the target's weight scales: refused: "
                        + str(error).splitlines()[0]
                    )
                print(lines[-1], flush=True)
            start = time.perf_counter()
            result = transfer_model(
                SOURCE, path, pruning=report, weight_scales="widen" if quantized else "keep"
            )
            seconds = time.perf_counter() - start
            counts = result.report.counts()
            method = (
                "onnxopt transfer ("
                + ", ".join(f"{count} {how}" for how, count in counts.items())
                + ")"
            )
            row(
                label,
                method,
                f"{result.report.transferred}/{len(result.report.slots)}",
                seconds,
                logits(result.model, evaluation),
            )
            if quantized:
                rebuilt = optimize(
                    SOURCE,
                    None,
                    recipe="int8",
                    data=samples(CALIBRATION, ["image"], CALIBRATION_SAMPLES),
                    timing=False,
                )
                row(
                    label,
                    "rebuilt: int8 of the fine-tuned",
                    "",
                    None,
                    logits(rebuilt.model, evaluation),
                )
            if report is not None:
                start = time.perf_counter()
                tuned_result = transfer_model(
                    SOURCE,
                    path,
                    pruning=report,
                    data=samples(CALIBRATION, ["image"], 512),
                    finetune_steps=FINETUNE_STEPS,
                )
                row(
                    label,
                    f"transfer + {FINETUNE_STEPS}-step fine-tune",
                    "",
                    time.perf_counter() - start,
                    logits(tuned_result.model, evaluation),
                )
    lines += ["", *sweep()]
    write_section(
        SECTION,
        "Command: `.venv/bin/python benchmarks/transfer.py`, "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}. EfficientNet-Lite0 fine-tuned "
        "40 steps in PyTorch and exported by the dynamo exporter (source) into graphs made "
        "from the TorchScript export of the original (targets); top-1 agreement and largest "
        "logit difference against the fine-tuned model on 200 eval images; tensors: target "
        "tensors that received source values. Then every other benchmark model's weights "
        "moved into its own onnxruntime EXTENDED graph (BatchNorm, Mul and Add folded into "
        "convolutions, FusedConv, FusedMatMul, LayerNormalization fused, weights renamed), "
        "matched by `auto` and by structure alone: whether the result reproduces the model "
        "(largest output difference on 4 random samples).\n\n```\n" + "\n".join(lines) + "\n```",
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
