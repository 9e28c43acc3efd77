"""One small torch network exported the ways users meet it: TorchScript and dynamo exporters,
BatchNorm kept, onnxruntime's optimized graph."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

torch = pytest.importorskip("torch", reason="the torch extra is not installed")

SHAPE = (1, 3, 16, 16)


class Network(torch.nn.Module):
    """Conv-BN-ReLU, a residual Conv-BN-ReLU, a 1x1 Conv, average pooling, a Linear head."""

    def __init__(self, classes: int = 5, channels: int = 3):
        super().__init__()
        self.conv = torch.nn.Conv2d(channels, 8, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(8)
        self.conv2 = torch.nn.Conv2d(8, 8, 3, padding=1)
        self.bn2 = torch.nn.BatchNorm2d(8)
        self.project = torch.nn.Conv2d(8, 16, 1)
        self.fc = torch.nn.Linear(16, classes)

    def forward(self, x):
        y = torch.relu(self.bn(self.conv(x)))
        y = y + torch.relu(self.bn2(self.conv2(y)))
        return self.fc(torch.relu(self.project(y)).mean((2, 3)))


def network(seed: int, classes: int = 5, channels: int = 3) -> Network:
    """A network with random weights and BatchNorm statistics far from the identity."""
    torch.manual_seed(seed)
    net = Network(classes, channels).eval()
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-1, 1)
                module.running_var.uniform_(0.5, 2)
                module.weight.uniform_(0.5, 2)
                module.bias.uniform_(-1, 1)
    return net


def export(net: Network, path: Path, *, dynamo: bool = False, keep_batchnorm: bool = False) -> Path:
    """``net`` as ONNX: TorchScript (BatchNorm folded, generated names unless kept) or dynamo."""
    sample = torch.zeros(1, net.conv.in_channels, *SHAPE[2:])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dynamo:
            torch.onnx.export(net, (sample,), str(path), dynamo=True, input_names=["input"])
        else:
            torch.onnx.export(
                net,
                (sample,),
                str(path),
                dynamo=False,
                input_names=["x"],
                output_names=["logits"],
                do_constant_folding=not keep_batchnorm,
                training=torch.onnx.TrainingMode.PRESERVE
                if keep_batchnorm
                else torch.onnx.TrainingMode.EVAL,
            )
    return path


def onnxruntime_optimized(path: Path, output: Path) -> Path:
    """The graph onnxruntime's EXTENDED optimizations make of ``path`` (FusedConv, BatchNorm
    folded into renamed weights)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(output)
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return output


def torch_outputs(net: Network, image: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return net(torch.from_numpy(image)).numpy()


def image(seed: int = 0, channels: int = 3) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.standard_normal((1, channels, *SHAPE[2:])).astype(np.float32)
