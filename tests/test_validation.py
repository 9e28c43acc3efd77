from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from onnxopt.context import Context
from onnxopt.errors import ValidationFailed
from onnxopt.fidelity import reference_comparison
from onnxopt.metrics import OutputFidelity
from onnxopt.passes.validate import ValidatePass
from onnxopt.validation import Thresholds, budget_margin, validate
from tests.builders import classifier_proto, external_data_classifier


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


def against_the_classifier():
    return reference_comparison(ir.from_proto(classifier_proto()), feeds(), "samples", count=4)


def test_identical_model_passes_every_check():
    result = validate(
        perturbed(0.0),
        against_the_classifier(),
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
    result = validate(perturbed(0.5), against_the_classifier(), Thresholds(atol=1e-3))
    assert not result.passed
    (failure,) = result.failures
    assert "logits" in failure.detail
    assert "0.5" in failure.detail


def test_cosine_threshold_reports_the_shortfall():
    result = validate(perturbed(3.0), against_the_classifier(), Thresholds(min_cosine=0.9999))
    (failure,) = result.failures
    assert failure.name == "cosine >= 0.9999"
    assert "short by" in failure.detail


def test_a_model_the_checker_rejects_fails_structure():
    model = ir.from_proto(classifier_proto())
    conv = next(node for node in model.graph if node.op_type == "Conv")
    conv.attributes["pads"] = ir.AttrInt64s("pads", [1, 1])
    result = validate(model, None, Thresholds())
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


# Pads its signal by reflection, which needs more samples than it pads: random samples of one
# value fail in the original model as much as in any optimized copy.
REFLECT_PADDED = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[1, N] signal) => (float[1, M] framed) <int64[4] pads = {0, 100, 0, 100}> {
    padded = Pad<mode = "reflect">(signal, pads)
    framed = Relu(padded)
}
"""


def test_random_samples_are_samples_the_original_runs_on(caplog):
    model = ir.from_proto(onnx.parser.parse_model(REFLECT_PADDED))
    context = Context(reference=ir.from_proto(onnx.parser.parse_model(REFLECT_PADDED)))
    validate_pass = ValidatePass(samples=2, atol=0.0)
    validate_pass.bind(context)
    validate_pass(model)
    assert context.validation.passed and context.validation.samples == 2
    assert all(feed["signal"].shape == (1, 256) for feed in context.comparison.feeds)
    assert context.validation.outputs[0].max_abs_error == 0.0


def test_a_comparison_the_original_cannot_run_is_skipped_and_said(caplog):
    text = REFLECT_PADDED.replace("{0, 100, 0, 100}", "{0, 9000, 0, 9000}")
    context = Context(reference=ir.from_proto(onnx.parser.parse_model(text)))
    validate_pass = ValidatePass(samples=2, atol=0.0)
    validate_pass.bind(context)
    validate_pass(ir.from_proto(onnx.parser.parse_model(text)))
    [skipped] = [check for check in context.validation.checks if check.skipped]
    assert context.validation.passed and not context.validation.outputs
    assert "the model fails on random inputs" in skipped.detail
    assert "comparison with the original not run" in caplog.text


def test_a_model_with_external_data_passes_from_another_working_folder(tmp_path, monkeypatch):
    folder = tmp_path / "models"
    external_data_classifier(folder / "model.onnx")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    model = ir.load(str(folder / "model.onnx"))
    assert isinstance(model.graph.initializers["fc.bias"].const_value, ir.ExternalTensor)
    result = validate(model, against_the_classifier(), Thresholds(min_cosine=1.0))
    assert result.passed, result.failures


DETECTOR_HEAD = """
<ir_version: 8, opset_import: ["" : 17]>
head (float[1, 4, 6] x) => (float[1, 6, 6] output) <float[2, 4] w = {{{w}}}, float[1] scale = {{300}}> {{
    boxes = Mul(x, scale)
    logits = MatMul(w, x)
    scores = Sigmoid(logits)
    output = Concat<axis = 1>(boxes, scores)
}}
"""


def detector_head(weights: str) -> ir.Model:
    """A YOLOv8-like output: box coordinates in pixels joined with class scores in [0, 1]."""
    return ir.from_proto(onnx.parser.parse_model(DETECTOR_HEAD.format(w=weights)))


def test_a_part_of_a_joined_output_is_judged_on_its_own():
    # The scores change completely; the pixel-sized boxes hide it in the whole output's cosine.
    original = detector_head("4, 0, 0, 0, 0, 4, 0, 0")
    broken = detector_head("0, 0, 4, 0, 0, 0, 0, 4")
    rng = np.random.default_rng(5)
    samples = [{"x": rng.standard_normal((1, 4, 6)).astype(np.float32)} for _ in range(4)]
    comparison = reference_comparison(original, samples, "samples", count=4)
    result = validate(broken, comparison, Thresholds(min_cosine=0.99))
    whole, boxes, scores = result.outputs
    assert (whole.name, boxes.name, scores.name) == ("output", "output[:, 0:4]", "output[:, 4:6]")
    assert whole.cosine > 0.99 and boxes.cosine == pytest.approx(1.0)
    assert scores.cosine < 0.9
    assert not result.passed
    (failure,) = result.failures
    assert "output[:, 4:6]" in failure.detail


def fidelity(name: str, cosine: float, sqnr_db: float, agreement: float | None = None):
    return OutputFidelity(name, 0.0, 0.0, cosine, sqnr_db, expected_top1_agreement=agreement)


def test_the_budget_margin_is_the_check_nearest_failing_in_one_unit():
    budget = Thresholds(min_cosine=0.99, min_top1_agreement=0.9)
    # 1 - cosine is a tenth of what the budget allows; 1 - agreement half: the agreement binds.
    outputs = [fidelity("a", 0.999, 40.0), fidelity("b", 0.9995, 40.0, agreement=0.95)]
    assert budget_margin(outputs, budget) == pytest.approx(np.log(2))
    assert budget_margin([fidelity("a", 0.99, 40.0)], budget) == pytest.approx(0.0)
    assert budget_margin([fidelity("a", 0.98, 40.0)], budget) == pytest.approx(-np.log(2))
    # 10 dB above the floor is a tenth of the noise it allows.
    sqnr = budget_margin([fidelity("a", 1.0, 30.0)], Thresholds(min_sqnr_db=20.0))
    assert sqnr == pytest.approx(np.log(10))
    assert budget_margin([fidelity("a", float("nan"), 0.0)], budget) == -np.inf
    assert budget_margin(outputs, Thresholds()) is None
