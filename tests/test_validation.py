from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

from onnxopt.context import Context
from onnxopt.errors import ValidationFailed
from onnxopt.passes.validate import ValidatePass
from onnxopt.validation import Thresholds, validate
from tests.builders import classifier_proto


def perturbed(scale: float) -> ir.Model:
    """The classifier with its last bias shifted, so outputs move by a known amount."""
    proto = classifier_proto()
    model = ir.from_proto(proto)
    bias = model.graph.initializers["fc.bias"]
    bias.const_value = ir.tensor(bias.const_value.numpy() + scale)
    return model


def feeds(count: int = 4):
    rng = np.random.default_rng(3)
    return [{"x": rng.standard_normal((1, 3, 8, 8)).astype(np.float32)} for _ in range(count)]


def test_identical_model_passes_every_check():
    reference = ir.from_proto(classifier_proto())
    result = validate(
        perturbed(0.0),
        reference,
        feeds(),
        Thresholds(atol=0.0, min_cosine=1.0, min_top1_agreement=1.0),
    )
    assert result.passed
    assert [check.name for check in result.checks][:3] == [
        "onnx checker",
        "shape inference",
        "onnxruntime session",
    ]
    assert result.outputs[0].max_abs_error == 0.0


def test_a_shifted_output_fails_with_the_size_of_the_error():
    reference = ir.from_proto(classifier_proto())
    result = validate(perturbed(0.5), reference, feeds(), Thresholds(atol=1e-3))
    assert not result.passed
    (failure,) = result.failures
    assert "logits" in failure.detail
    assert "0.5" in failure.detail


def test_cosine_threshold_reports_the_shortfall():
    reference = ir.from_proto(classifier_proto())
    result = validate(perturbed(3.0), reference, feeds(), Thresholds(min_cosine=0.9999))
    (failure,) = result.failures
    assert failure.name == "cosine >= 0.9999"
    assert "short by" in failure.detail


def test_a_model_the_checker_rejects_fails_structure():
    model = ir.from_proto(classifier_proto())
    conv = next(node for node in model.graph if node.op_type == "Conv")
    conv.attributes["pads"] = ir.AttrInt64s("pads", [1, 1])
    result = validate(model, None, feeds(), Thresholds())
    assert not result.passed
    assert result.failures[0].name in ("onnx checker", "shape inference")


def test_validate_pass_uses_random_inputs_without_data_and_raises_on_failure():
    context = Context(reference=ir.from_proto(classifier_proto()))
    validate_pass = ValidatePass(samples=3, atol=1e-6)
    validate_pass.bind(context)
    with pytest.raises(ValidationFailed, match="failed validation") as raised:
        validate_pass(perturbed(1.0))
    assert "allclose" in raised.value.render()
    assert context.validation.passed is False
    assert context.validation.samples == 3
    assert "random" in context.validation.data
