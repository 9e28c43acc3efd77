"""Running models in OpenVINO (the optional extra ``onnxopt[openvino]``) through the part of
onnxruntime's session interface onnxopt uses, so timing and fidelity code runs either.

OpenVINO's CPU plugin runs float models in bfloat16 by default where the CPU has AMX or
AVX512-BF16; sessions here run float parts in float32 unless told otherwise, so that "FP32
speed" means float32 and fidelity is measured against what the model computes.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir

from onnxopt.errors import InputError

INSTALL_FIX = "install OpenVINO with pip install 'onnxopt[openvino]' (or pip install openvino)"


def require_openvino() -> Any:
    """The openvino module, or a clear error naming the extra to install."""
    try:
        import openvino
    except ImportError as error:
        raise InputError(
            f"OpenVINO is not installed: {error}",
            fix=INSTALL_FIX,
        ) from error
    return openvino


@dataclasses.dataclass(frozen=True)
class NamedValue:
    """An input or output as onnxruntime's sessions describe them: its name (and shape)."""

    name: str
    shape: list[int | str | None]


class OpenVinoSession:
    """A model compiled for OpenVINO's CPU plugin, run like an onnxruntime session.

    Args:
        model: an ``ir.Model`` or the path of an .onnx file.
        threads: inference threads (None: OpenVINO's default).
        precision: the precision float parts run in: ``f32`` (default) or OpenVINO's own
            choice (None: bfloat16 on CPUs that have it).
    """

    def __init__(
        self,
        model: ir.Model | str | os.PathLike,
        threads: int | None = None,
        precision: str | None = "f32",
    ):
        openvino = require_openvino()
        config: dict[str, Any] = {"PERFORMANCE_HINT": "LATENCY"}
        if threads is not None:
            config["INFERENCE_NUM_THREADS"] = threads
        if precision is not None:
            config["INFERENCE_PRECISION_HINT"] = precision
        core = openvino.Core()
        if isinstance(model, ir.Model):
            with tempfile.TemporaryDirectory(prefix="onnxopt-openvino-") as folder:
                path = os.path.join(folder, "model.onnx")
                ir.save(model, path, external_data="model.onnx.data")
                self._compiled = core.compile_model(core.read_model(path), "CPU", config)
        else:
            self._compiled = core.compile_model(os.fspath(model), "CPU", config)
        inputs, outputs = _graph_names(model)
        self._inputs = [_port_name(port, inputs) for port in self._compiled.inputs]
        self._outputs = [_port_name(port, outputs) for port in self._compiled.outputs]
        self._requests = threading.local()

    def get_inputs(self) -> list[NamedValue]:
        return [
            NamedValue(name, _shape(port))
            for name, port in zip(self._inputs, self._compiled.inputs, strict=True)
        ]

    def get_outputs(self) -> list[NamedValue]:
        return [
            NamedValue(name, _shape(port))
            for name, port in zip(self._outputs, self._compiled.outputs, strict=True)
        ]

    def run(
        self, output_names: Sequence[str] | None, feed: dict[str, np.ndarray]
    ) -> list[np.ndarray]:
        """The named outputs (None: all, in the model's order) on ``feed``; safe to call
        from several threads, each with a request of its own."""
        request = getattr(self._requests, "request", None)
        if request is None:
            request = self._requests.request = self._compiled.create_infer_request()
        request.infer({index: feed[name] for index, name in enumerate(self._inputs)})
        names = list(output_names) if output_names is not None else self._outputs
        return [
            np.array(request.get_output_tensor(self._outputs.index(name)).data, copy=True)
            for name in names
        ]


def _graph_names(model: ir.Model | str | os.PathLike) -> tuple[set[str], set[str]]:
    """The names of the model's graph inputs and outputs."""
    if not isinstance(model, ir.Model):
        proto = onnx.load(os.fspath(model), load_external_data=False)
        initializers = {tensor.name for tensor in proto.graph.initializer}
        return (
            {value.name for value in proto.graph.input if value.name not in initializers},
            {value.name for value in proto.graph.output},
        )
    return (
        {value.name for value in model.graph.inputs if value.name},
        {value.name for value in model.graph.outputs if value.name},
    )


def _port_name(port: Any, graph_names: set[str]) -> str:
    """The port's name in the ONNX graph: OpenVINO gives a port every name its tensor had,
    and ``get_any_name`` may pick an inner one (an input's Cast output, say)."""
    names = sorted(set(port.get_names()) & graph_names)
    return names[0] if names else port.get_any_name()


def _shape(port: Any) -> list[int | str | None]:
    return [
        dimension.get_length() if dimension.is_static else None
        for dimension in port.get_partial_shape()
    ]
