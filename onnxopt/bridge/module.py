"""An ONNX model as a torch module (its weights trainable parameters), and the weights back."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext

import numpy as np
import onnx_ir as ir
import torch
from torch import nn

from onnxopt.bridge.interpreter import Graph, compile_model, run_graph
from onnxopt.bridge.types import supported_type, to_numpy, to_tensor, to_torch_dtype
from onnxopt.errors import InputError
from onnxopt.metrics import class_score_outputs

# Inputs that hold a layer's weights, by op: their float initializers become parameters.
WEIGHT_INPUTS: dict[str, frozenset[int]] = {
    "Conv": frozenset({1, 2}),
    "ConvTranspose": frozenset({1, 2}),
    "Gemm": frozenset({0, 1, 2}),
    "MatMul": frozenset({0, 1}),
    "Einsum": frozenset(range(8)),
    "BatchNormalization": frozenset({1, 2}),
    "LayerNormalization": frozenset({1, 2}),
    "InstanceNormalization": frozenset({1, 2}),
    "GroupNormalization": frozenset({1, 2}),
    "PRelu": frozenset({1}),
    "LSTM": frozenset({1, 2, 3, 7}),
    "GRU": frozenset({1, 2, 3}),
    "RNN": frozenset({1, 2, 3}),
    "Gather": frozenset({0}),
}

# Elementwise ops whose float initializers of more than one value are weights too (the biases
# and scales of decomposed layers, position embeddings); scalars among them stay constants.
AFFINE_OPS = frozenset({"Add", "Sub", "Mul", "Div"})


def escape(name: str) -> str:
    """An initializer name as a torch attribute name: torch refuses '.' and the empty name."""
    return "%" if not name else name.replace("%", "%25").replace(".", "%2E")


class OnnxModule(nn.Module):
    """Runs an ONNX graph with torch ops; call it with tensors in graph input order.

    Float initializers that hold weights (``WEIGHT_INPUTS``, and non-scalar operands of Add,
    Sub, Mul and Div) are ``nn.Parameter``s, every other initializer a buffer. Torch names may
    not contain '.', so their torch names are escaped (``escape``); ``onnx_parameters()`` gives
    them by their ONNX names.

    Attributes:
        graph: the compiled graph.
        input_names: the graph inputs, in the order ``forward`` takes them.
        output_names: the graph outputs, in the order ``forward`` returns them.
        exact: run convolutions on torch's own kernels rather than oneDNN's. oneDNN rounds
            differently, and deep networks amplify it: on a 100-convolution detector its
            outputs differ from onnxruntime's by 1e-5 of their magnitude, torch's own by 2e-6.
            1.3-4x slower; for checking fidelity, not for training.
    """

    def __init__(self, model: ir.Model, exact: bool = False):
        super().__init__()
        self.exact = exact
        self.graph: Graph = compile_model(model)
        self.input_names = list(self.graph.inputs)
        self.output_names = list(self.graph.outputs)
        # Outputs that hold class scores, judged on the graph: distillation compares them by
        # KL divergence, other outputs by squared error.
        self.class_outputs = frozenset(class_score_outputs(model))
        weights = _weight_names(self.graph)
        self._torch_names: dict[str, str] = {}
        for graph in self.graph.walk():
            for name, value in graph.initializers.items():
                if name in self._torch_names:
                    continue
                tensor = to_tensor(value.const_value.numpy())
                torch_name = escape(name)
                self._torch_names[name] = torch_name
                if name in weights and tensor.dtype.is_floating_point:
                    self.register_parameter(torch_name, nn.Parameter(tensor))
                else:
                    self.register_buffer(torch_name, tensor)

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if len(inputs) != len(self.input_names):
            raise TypeError(
                f"the model takes {len(self.input_names)} inputs ({', '.join(self.input_names)}), "
                f"got {len(inputs)}"
            )
        for name, tensor in zip(self.input_names, inputs, strict=True):
            _check_input(name, tensor, *self.graph.declared.get(name, (None, None)))
        feeds = dict(zip(self.input_names, inputs, strict=True))
        with _without_onednn() if self.exact else nullcontext():
            return tuple(run_graph(self.graph, feeds, self.onnx_tensor))

    def torch_name(self, name: str) -> str:
        """The torch attribute name of initializer ``name`` (for ``state_dict`` and
        ``torch.func.functional_call``)."""
        return self._torch_names[name]

    def onnx_tensor(self, name: str) -> torch.Tensor:
        """The parameter or buffer of the initializer ``name``."""
        return getattr(self, self._torch_names[name])

    def onnx_parameters(self) -> dict[str, nn.Parameter]:
        """The trainable weights, by initializer name."""
        parameters = dict(self.named_parameters(recurse=False))
        return {
            name: parameters[torch_name]
            for name, torch_name in self._torch_names.items()
            if torch_name in parameters
        }

    def onnx_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Every initializer's tensor, parameters and buffers, by initializer name."""
        for name in self._torch_names:
            yield name, self.onnx_tensor(name)


def _check_input(
    name: str, tensor: torch.Tensor, dtype: ir.DataType | None, shape: tuple | None
) -> None:
    """An InputError naming ``name`` when ``tensor`` contradicts the graph's declaration (its
    kind of element type, its rank, a dimension the graph fixes). Float inputs of another float
    type pass: a module converted with ``.double()`` runs in float64."""
    if (
        dtype is not None
        and supported_type(dtype)
        and _kind(tensor.dtype) != _kind(to_torch_dtype(dtype))
    ):
        raise InputError(
            f"input '{name}' is {tensor.dtype}; the model declares {dtype.name}",
            fix=f"feed {to_torch_dtype(dtype)} tensors",
        )
    if shape is None:
        return
    fixed = all(
        declared is None or declared == size
        for declared, size in zip(shape, tensor.shape, strict=False)
    )
    if len(shape) != tensor.dim() or not fixed:
        wanted = ["?" if size is None else size for size in shape]
        raise InputError(
            f"input '{name}' has shape {list(tensor.shape)}; the model declares {wanted}",
            fix="feed inputs of the declared shape ('?' is free)",
        )


def _kind(dtype: torch.dtype) -> str:
    if dtype.is_floating_point:
        return "float"
    return "bool" if dtype == torch.bool else "integer"


@contextmanager
def _without_onednn() -> Iterator[None]:
    before = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = False
    try:
        yield
    finally:
        torch.backends.mkldnn.enabled = before


def _weight_names(graph: Graph) -> set[str]:
    initializers = {
        name: value for subgraph in graph.walk() for name, value in subgraph.initializers.items()
    }
    names: set[str] = set()
    for subgraph in graph.walk():
        for step in subgraph.steps:
            positions = WEIGHT_INPUTS.get(step.call.op_type, frozenset())
            for index, name in enumerate(step.inputs):
                value = initializers.get(name)
                if value is None:
                    continue
                affine = step.call.op_type in AFFINE_OPS and value.const_value.size > 1
                if index in positions or affine:
                    names.add(name)
    return names


def to_module(model: ir.Model, exact: bool = False) -> OnnxModule:
    """``model`` as a torch module (see ``OnnxModule``, and its ``exact``); the model itself
    is not changed.

    Raises ``UnsupportedModelError`` (an InputError) naming every node it cannot run before
    anything runs.
    """
    return OnnxModule(model, exact)


def write_back(module: OnnxModule, model: ir.Model) -> list[str]:
    """Copy the module's parameters into the initializers of ``model`` they came from; the
    names of those whose values changed. Unchanged ones are left as they are (external data
    stays mapped). A parameter whose shape changed, or that the model lacks, is an InputError
    naming it."""
    initializers = _initializers(model)
    updates: list[tuple[ir.Value, np.ndarray]] = []
    for name, parameter in module.onnx_parameters().items():
        value = initializers.get(name)
        if value is None or value.const_value is None:
            raise InputError(
                f"parameter '{name}' has no initializer of that name in the model",
                fix="write back into the model the module was made from",
            )
        array = to_numpy(parameter)
        old = value.const_value.numpy()
        if array.shape != old.shape:
            raise InputError(
                f"parameter '{name}' has shape {list(array.shape)}, its initializer "
                f"{list(old.shape)}",
                fix="keep the weights' shapes while training, or change the ONNX graph to match",
            )
        array = array.astype(old.dtype, copy=False)
        if old.tobytes() != array.tobytes():
            updates.append((value, array))
    # Every parameter checked before any is written: an error leaves the model as it was.
    for value, array in updates:
        value.const_value = ir.tensor(array, name=value.name)
    return [value.name for value, _ in updates]


def _initializers(model: ir.Model) -> dict[str, ir.Value]:
    found: dict[str, ir.Value] = {}
    for graph in model.graphs():
        for name, value in graph.initializers.items():
            found.setdefault(name, value)
    return found
