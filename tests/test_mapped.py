"""Weights read from mapped external data files leave no pages resident once dropped."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import helper, numpy_helper

from onnxopt.io import load
from onnxopt.mapped import float32_weight, mapped_weights, unmap_read_weights

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="resident pages measured from /proc on Linux"
)


def _resident_bytes_of(path: Path) -> int:
    """The pages of ``path`` resident in this process, over every mapping of it."""
    resident, inside = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        fields = line.split()
        if fields and not fields[0].endswith(":"):
            inside = fields[-1] == str(path)
        elif inside and fields[0] == "Rss:":
            resident += int(fields[1]) * 1024
    return resident


def _model_with_external_weight(folder: Path) -> tuple[ir.Model, Path]:
    weight = np.random.default_rng(0).standard_normal((1024, 4096)).astype(np.float32)  # 16 MB
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 1024])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 4096])],
        [numpy_helper.from_array(weight, "w")],
    )
    path = folder / "m.onnx"
    onnx.save(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]),
        str(path),
        save_as_external_data=True,
        location="m.onnx.data",
        size_threshold=0,
    )
    return load(path), (folder / "m.onnx.data").resolve()


def test_dropping_read_weights_leaves_none_of_their_pages_resident(tmp_path):
    model, data = _model_with_external_weight(tmp_path)
    (tensor,) = mapped_weights(model)
    total = float(tensor.numpy().sum())
    assert _resident_bytes_of(data) >= 15 * 2**20
    unmap_read_weights([tensor])
    assert _resident_bytes_of(data) < 2**20
    assert float(tensor.numpy().sum()) == total  # read again from the file


def test_a_float32_copy_of_a_mapped_weight_keeps_its_values_and_drops_its_pages(tmp_path):
    model, data = _model_with_external_weight(tmp_path)
    value = model.graph.initializers["w"]
    copy = float32_weight(value)
    assert _resident_bytes_of(data) < 2**20
    np.testing.assert_array_equal(copy, value.const_value.numpy())
    assert not np.shares_memory(copy, value.const_value.numpy())
