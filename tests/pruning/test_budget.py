"""Budget-driven sparsity: the highest share of zeros whose model meets a fidelity budget,
judged as validation judges, and at worst the model left dense."""

from __future__ import annotations

import json

import numpy as np
import onnx_ir as ir
import pytest

from onnxopt.cli import main
from onnxopt.fidelity import reference_comparison
from onnxopt.metrics import OutputFidelity
from onnxopt.pruning import SparsitySettings, parse_pattern
from onnxopt.pruning.budget import _best_allocation, sparsify_to_budget
from onnxopt.pruning.sparsify import SparsityReport, allocations, prepare_layers
from onnxopt.validation import Thresholds
from tests.pruning.test_sparsify import conv_net
from tests.quantization.helpers import cosine, feeds, run


def budget_run(min_cosine: float, pattern: str = "unstructured"):
    model = conv_net()
    samples = feeds(model, count=48)
    comparison = reference_comparison(conv_net(), samples[32:], "held back", count=16)
    settings = SparsitySettings(pattern=parse_pattern(pattern), protect_first_last=False)
    report = sparsify_to_budget(
        model, samples[:32], settings, comparison, Thresholds(min_cosine=min_cosine)
    )
    return model, report, comparison


@pytest.mark.parametrize("min_cosine", [0.999, 0.99])
def test_the_search_keeps_the_highest_sparsity_that_meets_the_budget(min_cosine):
    model, report, comparison = budget_run(min_cosine)
    assert report.budget == f"cosine >= {min_cosine:g}" and report.budget_met
    outputs = run(model, comparison.feeds)
    reference = np.concatenate([sample[0].reshape(-1) for sample in comparison.reference_outputs])
    assert cosine(outputs, reference) >= min_cosine
    met = [trial.ratio for trial in report.trials if trial.budget_met]
    assert met and report.sparsity == pytest.approx(max(met), abs=0.02)
    # At the first share every candidate allocation is judged; the others may miss there.
    chosen = [trial for trial in report.trials if trial.allocation == report.allocation]
    failed = [trial.ratio for trial in chosen if not trial.budget_met]
    assert all(ratio > max(met) for ratio in failed)
    assert all(trial.cosine >= min_cosine for trial in report.trials if trial.budget_met)


def test_the_allocation_is_chosen_by_its_margin_to_the_budget_not_by_closeness():
    # The first candidate keeps one output close and the other near the cosine floor: the
    # closer in mean SQNR, it has less room for the higher shares the search goes on to.
    model = conv_net()
    prepared = prepare_layers(model, feeds(model, count=16), SparsitySettings())
    candidates = allocations(prepared, 0.5)[:2]

    def fidelity(cosine: float, sqnr_db: float) -> OutputFidelity:
        return OutputFidelity("y", 0.0, 0.0, cosine, sqnr_db)

    measured = {
        candidates[0][0]: [fidelity(0.9995, 60.0), fidelity(0.991, 25.0)],
        candidates[1][0]: [fidelity(0.995, 30.0), fidelity(0.995, 30.0)],
    }
    report = SparsityReport()
    pruned, met, index = _best_allocation(
        prepared,
        candidates,
        0.5,
        lambda pruned: (True, measured[pruned.label]),
        report,
        Thresholds(min_cosine=0.99),
    )
    assert met and index == 1 and pruned.label == candidates[1][0]
    closeness = report.candidate_closeness
    assert closeness[candidates[0][0]] > closeness[candidates[1][0]]


def test_a_looser_budget_gives_more_zeros():
    _, strict, _ = budget_run(0.999)
    _, loose, _ = budget_run(0.95)
    assert loose.sparsity > strict.sparsity


def test_a_budget_no_sparsity_meets_leaves_the_model_dense_and_says_so():
    model, report, _ = budget_run(1.0)
    assert report.budget_met and report.layers == [] and report.sparsity == 0
    assert set(report.dense.values()) == {"no sparsity met the budget"}
    assert not any(trial.budget_met for trial in report.trials)
    original = conv_net()
    for name, value in model.graph.initializers.items():
        expected = original.graph.initializers[name].const_value.numpy()
        np.testing.assert_array_equal(value.const_value.numpy(), expected)


def test_n_m_keeps_the_layers_that_change_most_dense_to_meet_the_budget():
    _, loose, _ = budget_run(0.5, "2:4")
    assert loose.dense == {"stem": "27 input columns do not divide into 2:4"}
    model, report, comparison = budget_run(0.999, "2:4")
    kept = [name for name, reason in report.dense.items() if reason.startswith("kept dense")]
    assert kept and report.layers
    errors = {layer.node: layer.output_error for layer in loose.layers}
    assert min(errors[name] for name in kept) >= max(errors[layer.node] for layer in report.layers)
    outputs = run(model, comparison.feeds)
    reference = np.concatenate([sample[0].reshape(-1) for sample in comparison.reference_outputs])
    assert cosine(outputs, reference) >= 0.999


def test_auto_needs_samples_the_original_runs_on():
    model = conv_net()
    broken = reference_comparison(model, [{"x": np.zeros((1, 3, 2, 2), np.float32)}], "bad")
    assert broken.problem is not None
    with pytest.raises(Exception, match="ratio = 'auto' needs samples"):
        sparsify_to_budget(model, feeds(model), SparsitySettings(), broken, Thresholds())


def test_the_preset_writes_the_sparsest_model_validation_accepts(tmp_path):
    source, output, report = tmp_path / "m.onnx", tmp_path / "out.onnx", tmp_path / "r.json"
    ir.save(conv_net(), source)
    data = tmp_path / "calib.npz"
    np.savez(data, x=np.stack([sample["x"] for sample in feeds(conv_net(), count=96)]))
    arguments = ["optimize", source, "-o", output, "--recipe", "sparsify", "--calib", data]
    assert main([str(a) for a in [*arguments, "--report", report]]) == 0
    document = json.loads(report.read_text())
    sparsity = document["sparsity"]
    assert sparsity["budget"] == "cosine >= 0.99, top-1 agreement >= 0.97"
    assert sparsity["budget_met"] and sparsity["trials"] and sparsity["sparsity"] > 0
    assert document["passed"]
    checks = {check["name"]: check for check in document["validation"]["checks"]}
    assert all(check["passed"] for check in checks.values())
    after = document["after"]["sparsity"]
    assert after["compressed_bytes"] < document["before"]["sparsity"]["compressed_bytes"]
