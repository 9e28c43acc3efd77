"""Every model of ONNX's backend test data that onnxruntime runs keeps its outputs through cleanup.

The models come with the installed onnx package: folders of model.onnx with test_data_set_0
inputs, and the 'light' models, which ship without inputs (onnx's runner feeds them
arange(n) / n) and hold dummy weights that ConstantOfShape nodes make. A model onnxruntime cannot
run as it is (too old an opset, training ops, a missing locale) is skipped and counted.

The light models with BatchNormalization also run with random weights as initializers, as an
exporter writes them: the only models here that give BatchNorm folding real work.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import numpy_helper
from onnx_ir.passes.common import RemoveInitializersFromInputsPass

import onnxopt.io
from onnxopt import runtime
from onnxopt.passes import PASSES
from tests.helpers import CLEANUP, count_ops

DATA = Path(onnx.__file__).parent / "backend" / "test" / "data"
RTOL = 1e-4
ATOL = 1e-5
# 109 of the 149 models ran with onnxruntime 1.32 and onnx 1.23.
MIN_RUNNABLE = 100


@dataclasses.dataclass(frozen=True)
class Case:
    """One model and where its inputs come from; no test data folder means onnx's dummy inputs."""

    name: str
    model_path: Path
    test_data: Path | None


def _cases() -> list[Case]:
    cases = []
    for suite in ("simple", "pytorch-converted", "pytorch-operator"):
        for folder in sorted((DATA / suite).iterdir()):
            if (folder / "model.onnx").exists():
                cases.append(
                    Case(
                        f"{suite}/{folder.name}", folder / "model.onnx", folder / "test_data_set_0"
                    )
                )
    for path in sorted((DATA / "light").glob("*.onnx")):
        cases.append(Case(f"light/{path.stem}", path, None))
    return cases


CASES = _cases()


def _feeds(case: Case) -> dict[str, Any]:
    """The inputs onnx's backend test runner gives this model."""
    graph = onnx.load(case.model_path, load_external_data=False).graph
    if case.test_data is None:
        initializers = {tensor.name for tensor in graph.initializer}
        return {
            value.name: _dummy_input(value)
            for value in graph.input
            if value.name not in initializers
        }
    files = sorted(case.test_data.glob("input_*.pb"), key=lambda path: int(path.stem.split("_")[1]))
    return {
        value.name: _read_value(path, value.type)
        for value, path in zip(graph.input, files, strict=False)
    }


def _dummy_input(value: onnx.ValueInfoProto) -> np.ndarray:
    """onnx's runner's input for a light model: arange(n) / n, free dimensions set to 1."""
    shape = tuple(
        dim.dim_value if dim.HasField("dim_value") else 1
        for dim in value.type.tensor_type.shape.dim
    )
    count = int(np.prod(shape))
    return (np.arange(count).reshape(shape) / count).astype(np.float32)


def _read_value(path: Path, type_proto: onnx.TypeProto) -> Any:
    kind = type_proto.WhichOneof("value")
    if kind == "sequence_type":
        sequence = onnx.SequenceProto.FromString(path.read_bytes())
        return numpy_helper.to_list(sequence)
    if kind == "optional_type":
        return numpy_helper.to_optional(onnx.OptionalProto.FromString(path.read_bytes()))
    return numpy_helper.to_array(onnx.TensorProto.FromString(path.read_bytes()))


@functools.cache
def _original_outputs(case: Case) -> tuple[list[Any] | None, str]:
    """onnxruntime's outputs for the untouched model, or None and why it cannot run it."""
    try:
        session = runtime.create_session(case.model_path)
        return session.run(None, _feeds(case)), ""
    except Exception as error:  # Any failure of onnxruntime on the original makes it not runnable.
        return None, str(error).splitlines()[0][:200]


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_cleanup_keeps_outputs(case: Case, tmp_path: Path):
    expected, reason = _original_outputs(case)
    if expected is None:
        pytest.skip(f"not runnable by onnxruntime: {reason}")
    model = ir.load(case.model_path)
    for name in CLEANUP:
        PASSES[name]()(model)
    onnxopt.io.save(model, tmp_path / "model.onnx")
    model = onnxopt.io.load(tmp_path / "model.onnx")
    actual = runtime.create_session(model).run(None, _feeds(case))
    _assert_close(actual, expected)


BATCHNORM_CASES = [
    case
    for case in CASES
    if case.test_data is None
    and any(node.op_type == "BatchNormalization" for node in onnx.load(case.model_path).graph.node)
]


@pytest.mark.parametrize("case", BATCHNORM_CASES, ids=[case.name for case in BATCHNORM_CASES])
def test_cleanup_keeps_outputs_of_light_models_with_random_weights(case: Case):
    model = _with_random_weights(case)
    batchnorms = count_ops(model)["BatchNormalization"]
    expected = runtime.create_session(model).run(None, _feeds(case))
    for name in CLEANUP:
        PASSES[name]()(model)
    assert count_ops(model).get("BatchNormalization", 0) < batchnorms
    actual = runtime.create_session(model).run(None, _feeds(case))
    # The outputs are class probabilities of about 1e-3: an absolute tolerance must be far smaller.
    _assert_close(actual, expected, atol=1e-7)


def _with_random_weights(case: Case) -> ir.Model:
    """The light model with random initializers in place of the nodes that make its dummy weights.

    It moves to IR version 8 with the initializers out of the graph inputs, so that the passes
    may take them for constants (in IR 3 every initializer is listed as an input, and an input may
    be overridden); onnxruntime runs IR 3 models that way anyway.
    """
    model = ir.load(case.model_path)
    model.ir_version = 8
    RemoveInitializersFromInputsPass()(model)
    rng = np.random.default_rng(0)
    for node in [node for node in model.graph if node.op_type == "ConstantOfShape"]:
        shape = tuple(int(dim) for dim in node.inputs[0].const_value.numpy())
        if len(shape) == 1:
            # Biases and BatchNorm parameters; variances must be positive.
            values = rng.uniform(0.5, 1.5, shape)
        else:
            # Weights that keep the scale of the activations from layer to layer.
            values = rng.uniform(-1.0, 1.0, shape) * np.sqrt(3.0 / np.prod(shape[1:]))
        dummy = node.outputs[0]
        weight = ir.Value(
            name=dummy.name,
            type=ir.TensorType(ir.DataType.FLOAT),
            shape=ir.Shape(shape),
            const_value=ir.tensor(values.astype(np.float32), name=dummy.name),
        )
        model.graph.remove(node)
        model.graph.register_initializer(weight)
        dummy.replace_all_uses_with(weight)
    return model


def _assert_close(actual: Any, expected: Any, atol: float = ATOL) -> None:
    if isinstance(expected, list):
        assert isinstance(actual, list)
        assert len(actual) == len(expected)
        for actual_item, expected_item in zip(actual, expected, strict=True):
            _assert_close(actual_item, expected_item, atol)
    elif np.asarray(expected).dtype.kind in "fc":
        np.testing.assert_allclose(actual, expected, rtol=RTOL, atol=atol)
    else:
        np.testing.assert_array_equal(actual, expected)


def test_conformance_summary():
    runnable = [case for case in CASES if _original_outputs(case)[0] is not None]
    print(
        f"\nconformance: {len(runnable)} models checked, {len(CASES) - len(runnable)} not runnable by onnxruntime"
    )
    assert len(runnable) >= MIN_RUNNABLE
