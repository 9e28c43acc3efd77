"""Structured pruning on real pretrained models: channels, FFN neurons and attention heads
removed, the tensors physically smaller, timed against the FP32 original in the same run.

EfficientNet-Lite0 (top-1 agreement with FP32) and the MiniLM sentence encoder (embedding
cosine with FP32), after the cleanup preset, pruned by ``prune_structured`` with recovery (the
least-squares refit), fidelity on 64 held-back eval samples; then two ResNet-style CNNs with
half their channels removed, float and through the ``prune-int8`` preset: Yahoo's OpenNSFW
ResNet-50-1by2 (real weights, up to its pooled features; feature cosine with FP32), dlib's
face-recognition ResNet (real weights, shortcuts padded with zero channels; embedding cosine)
and a ResNet-18-shaped CNN (random weights: timed only). Latency: onnxruntime, one thread, batch 1,
the original and the pruned model timed interleaved. Build the models first
(benchmarks/README.md).

    .venv/bin/python benchmarks/structured.py [--finetune SAMPLES] [--epochs 4]

writes the table to its section of benchmarks/RESULTS.md as well.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
from pruning import MODELS, model_outputs, samples, score
from results_sections import write_section

from onnxopt.api import optimize
from onnxopt.compare import time_models
from onnxopt.data import open_data
from onnxopt.pruning.recovery import RecoverySettings, recover
from onnxopt.pruning.structured import (
    StructuredReport,
    StructuredSettings,
    default_samples,
    prune_structured,
)

SECTION = "## Structured pruning"
FISHER = StructuredSettings(flops=0.3, round_to=8, importance="fisher")
PRESET = StructuredSettings(flops=0.3, round_to=8)
# (label, settings, calibration samples, fine-tuned with --finetune): the anchor every tool has
# (weight magnitude, no refit), the prune preset with its samples ("auto":
# as the pass takes them), the same on 64 samples, the Fisher importance.
MAGNITUDE = dict(importance="magnitude", recover=False)
SETTINGS = [
    (
        "flops 0.3, magnitude, no refit",
        StructuredSettings(flops=0.3, round_to=8, **MAGNITUDE),
        64,
        False,
    ),
    ("flops 0.3 (prune preset)", PRESET, "auto", True),
    ("flops 0.3, 64 samples", PRESET, 64, False),
    ("flops 0.3, fisher", FISHER, "auto", False),
    ("ratio 0.5", StructuredSettings(ratio=0.5, round_to=8), "auto", False),
]
# (label, allocation, protect first and last layers): the ResNet-style rows.
HALF = dict(ratio=0.5, round_to=8)
HALVES = [
    ("ratio 0.5", StructuredSettings(**HALF)),
    ("half of every layer", StructuredSettings(**HALF, allocation="uniform")),
    (
        "half + stem, magnitude, no refit",
        StructuredSettings(**HALF, allocation="uniform", protect_first_last=False, **MAGNITUDE),
    ),
    (
        "half of every layer + stem",
        StructuredSettings(**HALF, allocation="uniform", protect_first_last=False),
    ),
]


def cleaned(path: Path) -> ir.Model:
    return optimize(path, recipe="cleanup", timing=False).model


def resnet18(folder: Path) -> Path:
    """A ResNet-18-shaped CNN (BatchNorm with random statistics), exported by torch."""
    import torch
    from torch import nn

    torch.manual_seed(0)

    def block(inputs: int, outputs: int, stride: int) -> nn.Module:
        class Block(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.body = nn.Sequential(
                    nn.Conv2d(inputs, outputs, 3, stride, 1, bias=False),
                    nn.BatchNorm2d(outputs),
                    nn.ReLU(),
                    nn.Conv2d(outputs, outputs, 3, 1, 1, bias=False),
                    nn.BatchNorm2d(outputs),
                )
                self.skip = (
                    nn.Identity()
                    if stride == 1 and inputs == outputs
                    else nn.Sequential(
                        nn.Conv2d(inputs, outputs, 1, stride, bias=False), nn.BatchNorm2d(outputs)
                    )
                )

            def forward(self, x: torch.Tensor) -> torch.Tensor:
                return torch.relu(self.body(x) + self.skip(x))

        return Block()

    layers: list[nn.Module] = [
        nn.Conv2d(3, 64, 7, 2, 3, bias=False),
        nn.BatchNorm2d(64),
        nn.ReLU(),
        nn.MaxPool2d(3, 2, 1),
    ]
    width = 64
    for outputs, stride in [(64, 1), (128, 2), (256, 2), (512, 2)]:
        layers += [block(width, outputs, stride), block(outputs, outputs, 1)]
        width = outputs
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, 1000)]
    network = nn.Sequential(*layers).eval()
    for module in network.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.5, 1.5)
            module.weight.data.uniform_(0.5, 1.0)
    path = folder / "resnet18.onnx"
    torch.onnx.export(
        network,
        (torch.randn(1, 3, 224, 224),),
        str(path),
        input_names=["image"],
        output_names=["logits"],
        opset_version=17,
        dynamo=False,
    )
    return path


def input_names(path: Path) -> list[str]:
    return [spec.name for spec in ort.InferenceSession(str(path)).get_inputs()]


def calibration_samples(name: str, names: list[str], count: int | str) -> list[dict]:
    """The first ``count`` calibration samples of model ``name``; ``auto``: those the prune
    pass takes by default (``default_samples``)."""
    path = MODELS / f"{name}_calibration.npz"
    if count != "auto":
        return samples(path, names, count)
    return default_samples(open_data(str(path), ir.load(MODELS / f"{name}.onnx")))


def halves(label: str, path: Path, data: list[dict], folder: Path) -> list[str]:
    """A ResNet-style CNN with half its channels removed, float (HALVES) and through the
    prune-int8 preset; fidelity on 64 eval samples where the model has them."""
    evaluation_path = MODELS / f"{path.stem}_eval.npz"
    evaluation = (
        samples(evaluation_path, input_names(path), 64) if evaluation_path.exists() else None
    )
    reference = model_outputs(path, evaluation) if evaluation else None

    def fidelity(model: ir.Model | Path) -> str:
        return (
            f"{score(path.stem, model_outputs(model, evaluation), reference)}; "
            if evaluation
            else ""
        )

    lines = []
    original = cleaned(path)
    for setting, settings in HALVES:
        model = original.clone()
        start = time.perf_counter()
        report = prune_structured(model, data, settings)
        seconds = time.perf_counter() - start
        lines.append(
            f"{label:<20} {setting:<32} {sizes(report)} {seconds:>6.1f}  "
            f"{fidelity(model)}{latency(original, model, data[0])}"
        )
        print(lines[-1], flush=True)
    output = folder / f"{path.stem}_int8.onnx"
    start = time.perf_counter()
    result = optimize(
        path,
        output,
        recipe="prune-int8",
        data=data,
        settings={
            "prune.ratio": 0.5,
            "prune.flops": None,
            "prune.allocation": "uniform",
            "prune.protect_first_last": False,
        },
        timing=False,
        raise_on_failure=False,
    )
    seconds = time.perf_counter() - start
    written = result.written
    lines.append(
        f"{label:<20} {'prune-int8, half + stem':<32} {'':>16} {'':>16} {seconds:>6.1f}  "
        + (
            f"{fidelity(output)}{latency(original, output, data[0])}"
            if written
            else "not written (validation failed)"
        )
    )
    print(lines[-1], flush=True)
    return lines


def sizes(report: StructuredReport) -> str:
    """Multiply-accumulates and parameters before and after, as the table's two columns."""
    return (
        f"{report.macs_before / 1e6:>7.0f}M->{report.macs_after / 1e6:.0f}M "
        f"{report.parameters_before / 1e6:>6.2f}M->{report.parameters_after / 1e6:.2f}M"
    )


def latency(original: ir.Model | Path, pruned: ir.Model | Path, feed: dict) -> str:
    timing = time_models(original, pruned, feed, threads=1, seconds=3.0)
    return (
        f"{timing.latency_a.median_ms:.1f} -> {timing.latency_b.median_ms:.1f} ms "
        f"({timing.speedup:.2f}x)"
    )


def main(arguments: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--finetune",
        type=int,
        default=0,
        metavar="SAMPLES",
        help="also fine-tune the preset's models on this many calibration samples",
    )
    parser.add_argument(
        "--epochs",
        type=int,
        default=RecoverySettings.epochs,
        help="the fine-tune's epochs, at most",
    )
    options = parser.parse_args(arguments)
    lines = [
        f"{'model':<20} {'setting':<32} {'MACs':>16} {'params':>16} {'s':>6}  "
        "fidelity with FP32; latency 1 thread"
    ]
    for name in ("efficientnet_lite0", "minilm"):
        path = MODELS / f"{name}.onnx"
        if not path.exists():
            lines.append(f"{name:<20} not built (benchmarks/README.md)")
            continue
        names = input_names(path)
        evaluation = samples(MODELS / f"{name}_eval.npz", names, 64)
        reference = model_outputs(path, evaluation, name)
        original = cleaned(path)
        for label, settings, count, tune in SETTINGS:
            calibration = calibration_samples(name, names, count)
            model = original.clone()
            start = time.perf_counter()
            report = prune_structured(model, calibration, settings)
            seconds = time.perf_counter() - start
            outputs = model_outputs(model, evaluation, name)
            lines.append(
                f"{name:<20} {label:<32} "
                f"{sizes(report)} "
                f"{seconds:>6.1f}  {score(name, outputs, reference)}; {len(calibration)} samples; "
                f"{latency(original, model, evaluation[0])}"
            )
            print(lines[-1], flush=True)
            if options.finetune and tune:
                data = samples(MODELS / f"{name}_calibration.npz", names, options.finetune)
                start = time.perf_counter()
                result = recover(model, original, data, {}, RecoverySettings(epochs=options.epochs))
                seconds = time.perf_counter() - start
                outputs = model_outputs(model, evaluation, name)
                lines.append(
                    f"{name:<20} {'  + fine-tune':<32} {'':>16} {'':>16} "
                    f"{seconds:>6.1f}  {score(name, outputs, reference)}; {len(data)} samples, "
                    f"{result.steps} steps, learning rate {result.learning_rate:g}, "
                    f"best epoch {result.best_epoch}"
                )
                print(lines[-1], flush=True)
    with tempfile.TemporaryDirectory() as folder:
        for name in ("open_nsfw", "face_resnet"):
            path = MODELS / f"{name}.onnx"
            if path.exists():
                data = calibration_samples(name, input_names(path), 64)
                lines += halves(name, path, data, Path(folder))
            else:
                lines.append(f"{name:<20} not built (benchmarks/README.md)")
        rng = np.random.default_rng(0)
        data = [
            {"image": rng.standard_normal((1, 3, 224, 224)).astype(np.float32)} for _ in range(32)
        ]
        lines += halves("resnet18 (random)", resnet18(Path(folder)), data, Path(folder))
    write_section(
        SECTION,
        f"Command: `.venv/bin/python {' '.join(['benchmarks/structured.py', *arguments])}`, "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; after the cleanup preset, "
        "calibration samples as each row says (the prune preset's: up to 512, in at most 256 "
        "MiB of inputs), importance 'activation' unless said, every layer "
        "that reads cut channels refitted by least squares unless 'no refit' (the anchor: "
        "weight magnitude without refit, which every pruning tool has), channels kept in "
        "multiples of 8, first and last layers whole unless said, fidelity on 64 held-back eval "
        "samples; 'half of every layer': allocation 'uniform'; open_nsfw: OpenNSFW's "
        "ResNet-50-1by2 up to its pooled features (the last stage's channels reach the output "
        "and stay), 64 calibration photos, feature cosine; face_resnet: dlib's face ResNet, 64 "
        "calibration face chips, embedding cosine; ResNet-18 has random weights "
        "(timed only).\n\n```\n" + "\n".join(lines) + "\n```",
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
