from __future__ import annotations

import json

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from onnxopt.cli import main
from onnxopt.passes import PASSES
from onnxopt.passes.base import OnnxoptPass


def run_cli(*arguments: str) -> int:
    return main([str(argument) for argument in arguments])


def test_optimize_cleanup_writes_a_stamped_model_and_a_report(tmp_path, classifier_path, capsys):
    output, report = tmp_path / "out.onnx", tmp_path / "report.json"
    assert run_cli("optimize", classifier_path, "-o", output, "--report", report) == 0
    model = onnx.load(output)
    assert {prop.key: prop.value for prop in model.metadata_props}["onnxopt.recipe"] == "cleanup"
    assert {node.op_type for node in model.graph.node}.isdisjoint(
        {"BatchNormalization", "Identity", "Constant"}
    )
    document = json.loads(report.read_text())
    assert document["passed"] is True
    assert [row["name"] for row in document["passes"]][-1] == "validate"
    assert document["before"]["node_count"] > document["after"]["node_count"]
    printed = capsys.readouterr().out
    assert (
        "BatchNormalization" in printed and "Validation" in printed and f"wrote {output}" in printed
    )


def test_optimize_validates_on_held_back_user_data(tmp_path, classifier_path, classifier_data):
    report = tmp_path / "report.json"
    arguments = (
        "optimize",
        classifier_path,
        "-o",
        tmp_path / "out.onnx",
        "--recipe",
        "cleanup",
        "--calib",
        classifier_data,
    )
    assert run_cli(*arguments, "--report", report, "-q") == 0
    validation = json.loads(report.read_text())["validation"]
    assert validation["samples"] == 8
    assert "held back" in validation["data"]


class ShiftBias(OnnxoptPass):
    """Moves the classifier's outputs by 0.1: an optimization that loses accuracy."""

    name = "shift-bias"

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        bias = model.graph.initializers["fc.bias"]
        bias.const_value = ir.tensor(bias.const_value.numpy() + 0.1)
        self.changes = 1
        return ir.passes.PassResult(model, modified=True)


@pytest.fixture
def failing_recipe(tmp_path, monkeypatch):
    monkeypatch.setitem(PASSES, ShiftBias.name, ShiftBias)
    path = tmp_path / "lossy.toml"
    path.write_text('[[passes]]\nname = "shift-bias"\n[[passes]]\nname = "validate"\natol = 1e-3\n')
    return path


def test_failed_validation_writes_nothing_and_exits_1(
    tmp_path, classifier_path, failing_recipe, capsys
):
    output, report = tmp_path / "out.onnx", tmp_path / "report.json"
    code = run_cli(
        "optimize", classifier_path, "-o", output, "--recipe", failing_recipe, "--report", report
    )
    assert code == 1
    assert not output.exists()
    assert "failed validation" in capsys.readouterr().err
    assert json.loads(report.read_text())["passed"] is False


def test_force_writes_a_failing_model_but_still_exits_1(tmp_path, classifier_path, failing_recipe):
    output = tmp_path / "out.onnx"
    code = run_cli(
        "optimize", classifier_path, "-o", output, "--recipe", failing_recipe, "--force", "-q"
    )
    assert code == 1
    assert output.exists()


def bad_model_files(tmp_path, classifier_path):
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(classifier_path.read_bytes()[:200])
    text = tmp_path / "notes.onnx"
    text.write_text("these are not the weights you are looking for")
    return {"missing": tmp_path / "missing.onnx", "truncated": truncated, "not onnx": text}


@pytest.mark.parametrize("kind", ["missing", "truncated", "not onnx"])
def test_bad_model_files_exit_2_without_output(tmp_path, classifier_path, capsys, kind):
    source = bad_model_files(tmp_path, classifier_path)[kind]
    output = tmp_path / "out.onnx"
    assert run_cli("optimize", source, "-o", output) == 2
    assert not output.exists()
    error = capsys.readouterr().err
    assert error.startswith("onnxopt: error:") and "Traceback" not in error


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (("--recipe", "turbo"), "unknown recipe 'turbo'"),
        (("--set", "validate.colour=blue"), "has no option 'colour'"),
        (("--set", "shrink.ratio=2"), "has no pass 'shrink'"),
        (("--set", "validate.samples=many"), "must be an integer"),
        (
            ("--recipe", "int8", "--set", "quantize.rounding=stochastic"),
            "'quantize.rounding' must be one of gptq, nearest",
        ),
        (("--recipe", "int8", "--set", "quantize.gptq_samples=0"), "must be an integer >= 1"),
        (("--recipe", "int8", "--set", "check-speed.samples=0"), "must be an integer >= 1"),
        (("--recipe", "int8", "--set", "check-speed.min_speedup=-1"), "check-speed.min_speedup"),
        (("--recipe", "int8", "--set", "calibrate.workers=0"), "must be an integer >= 1"),
        (("--recipe", "int8", "--set", "quantize.exclude_nodes=['conv[']"), "not a regular"),
        (("--recipe", "prune", "--set", "prune.exclude=['(']"), "not a regular expression"),
        (("--recipe", "sparsify", "--set", "sparsify.exclude=['(']"), "not a regular"),
    ],
)
def test_bad_recipe_choices_exit_2(tmp_path, classifier_path, capsys, extra, message):
    output = tmp_path / "out.onnx"
    assert run_cli("optimize", classifier_path, "-o", output, *extra) == 2
    assert message in capsys.readouterr().err
    assert not output.exists()


def test_output_equal_to_input_is_refused_and_the_input_untouched(classifier_path, capsys):
    before = classifier_path.read_bytes()
    assert run_cli("optimize", classifier_path, "-o", classifier_path) == 2
    assert "never overwrites its input" in capsys.readouterr().err
    assert classifier_path.read_bytes() == before


def test_output_folder_that_cannot_be_written(tmp_path, classifier_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert run_cli("optimize", classifier_path, "-o", blocker / "out.onnx") == 2
    assert "output folder" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        (
            {"image": np.zeros((2, 1, 3, 8, 8), np.float32)},
            "data file '{data}' has no array for model input 'x'",
        ),
        (
            {"x": np.zeros((2, 1, 3, 9, 9), np.float32)},
            "each sample of array 'x' in '{data}' has shape (1, 3, 9, 9); the model expects "
            "x: float32[N, 3, 8, 8]",
        ),
        (
            {"x": np.full((2, 1, 3, 8, 8), np.nan, np.float32)},
            "input 'x' of sample 1 of '{data}' has 192 NaN or Inf values",
        ),
    ],
    ids=["missing input", "wrong shape", "not finite"],
)
def test_bad_data_exits_2_and_names_the_input(tmp_path, classifier_path, capsys, arrays, message):
    data = tmp_path / "bad.npz"
    np.savez(data, **arrays)
    output = tmp_path / "out.onnx"
    assert (
        run_cli("optimize", classifier_path, "-o", output, "--recipe", "cleanup", "--calib", data)
        == 2
    )
    error = capsys.readouterr().err
    assert error.startswith("onnxopt: error: " + message.format(data=data))
    assert "fix: " in error and "Traceback" not in error
    assert not output.exists()


def test_inspect_json(classifier_path, capsys):
    assert run_cli("inspect", classifier_path, "--json") == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["op_histogram"]["BatchNormalization"] == 1


def test_inspect_tables(classifier_path, capsys):
    assert run_cli("inspect", classifier_path) == 0
    assert "BatchNormalization" in capsys.readouterr().out


def test_compare_an_optimized_model_with_its_original(
    tmp_path, classifier_path, classifier_data, capsys
):
    output = tmp_path / "out.onnx"
    assert run_cli("optimize", classifier_path, "-o", output, "-q") == 0
    capsys.readouterr()
    assert (
        run_cli(
            "compare", classifier_path, output, "--data", classifier_data, "--runs", 3, "--json"
        )
        == 0
    )
    comparison = json.loads(capsys.readouterr().out)
    assert comparison["outputs"][0]["cosine"] > 0.99999


def test_recipes_lists_presets_and_passes(capsys):
    assert run_cli("recipes") == 0
    printed = capsys.readouterr().out
    assert "cleanup" in printed and "fold-batchnorm" in printed and "min_cosine" in printed


def test_usage_errors_exit_2():
    with pytest.raises(SystemExit) as raised:
        run_cli("optimize")
    assert raised.value.code == 2


def test_optimize_times_the_result_against_the_input_unless_told_not_to(
    tmp_path, classifier_path, capsys
):
    report = tmp_path / "report.json"
    assert run_cli("optimize", classifier_path, "-o", tmp_path / "a.onnx", "--report", report) == 0
    assert "Speed in onnxruntime (batch 1" in capsys.readouterr().out
    speed = json.loads(report.read_text())["speed"]
    assert speed["skipped"] is None
    assert [timing["threads"] for timing in speed["timings"]] == [1, "default"]
    for timing in speed["timings"]:
        assert timing["input_ms"] > 0 and timing["result_ms"] > 0 and timing["runs"] >= 5
        assert timing["speedup"] == pytest.approx(timing["input_ms"] / timing["result_ms"])
    arguments = ("optimize", classifier_path, "-o", tmp_path / "b.onnx", "--report", report)
    assert run_cli(*arguments, "--no-timing") == 0
    assert json.loads(report.read_text())["speed"] is None


def test_a_bad_smoothing_alpha_exits_2_and_writes_nothing(
    tmp_path, classifier_path, classifier_data, capsys
):
    output = tmp_path / "o.onnx"
    code = run_cli(
        "optimize",
        classifier_path,
        "-o",
        output,
        "--calib",
        classifier_data,
        "--set",
        "smooth.alpha=1.5",
    )
    assert code == 2 and not output.exists()
    assert "smooth.alpha" in capsys.readouterr().err


def test_compare_refuses_an_unknown_runtime(classifier_path):
    with pytest.raises(SystemExit) as raised:
        run_cli("compare", classifier_path, classifier_path, "--runtime", "tensorrt")
    assert raised.value.code == 2
