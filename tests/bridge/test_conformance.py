"""The torch bridge computes what onnxruntime computes on ONNX's own backend test models.

Every model of the installed onnx package's test data (tests/test_conformance.py) that
onnxruntime runs and the bridge supports must give onnxruntime's outputs within 1e-5 of the
output's magnitude; the ones it does not support are string models.
"""

from __future__ import annotations

import functools

import numpy as np
import onnx_ir as ir
import pytest

from onnxopt import runtime
from tests.test_conformance import CASES, Case, _feeds

torch = pytest.importorskip("torch", reason="the torch extra is not installed")

from onnxopt.bridge import UnsupportedModelError, to_module  # noqa: E402

TOLERANCE = 1e-5
# The backend test models the bridge cannot run hold string ops.
UNSUPPORTED_OPS = {"StringNormalizer"}
# 107 of the 109 models onnxruntime runs (onnx 1.23, onnxruntime 1.32).
MIN_SUPPORTED = 105


@functools.cache
def _expected(case: Case):
    try:
        return runtime.create_session(case.model_path).run(None, _feeds(case))
    except Exception:  # onnxruntime cannot run it: no reference
        return None


def _supported(case: Case) -> bool:
    try:
        to_module(ir.load(case.model_path))
    except UnsupportedModelError:
        return False
    return True


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_bridge_outputs_equal_onnxruntimes(case: Case):
    expected = _expected(case)
    if expected is None:
        pytest.skip("onnxruntime cannot run it either")
    model = ir.load(case.model_path)
    try:
        module = to_module(model)
    except UnsupportedModelError as error:
        named = {detail.split("(")[1].split(",")[0] for detail in error.details if "(" in detail}
        assert named <= UNSUPPORTED_OPS, error.render()
        return
    feeds = _feeds(case)
    with torch.no_grad():
        actual = module(*(torch.from_numpy(np.array(feeds[name])) for name in module.input_names))
    assert len(actual) == len(expected)
    for value, reference in zip(actual, expected, strict=True):
        result = value.numpy()
        assert result.shape == reference.shape
        if reference.dtype.kind != "f":
            np.testing.assert_array_equal(result, reference)
            continue
        scale = float(np.max(np.abs(reference), initial=0.0, where=np.isfinite(reference))) or 1.0
        np.testing.assert_allclose(
            result, reference, rtol=0, atol=TOLERANCE * scale, equal_nan=True
        )


def test_most_backend_models_are_supported():
    runnable = [case for case in CASES if _expected(case) is not None]
    assert sum(_supported(case) for case in runnable) >= MIN_SUPPORTED
