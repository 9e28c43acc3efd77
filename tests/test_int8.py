"""The int8 preset end to end: CLI, Python API, and the inputs that break other quantizers."""

from __future__ import annotations

import json
import sys

import numpy as np
import onnx
import pytest
from onnx import helper
from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantType

import onnxopt
from onnxopt.cli import main
from onnxopt.quantization.fusion import fusion_report
from tests.builders import classifier_proto
from tests.quantization.helpers import build, random_weights

# The test models are too small for int8 to beat float in onnxruntime, which the int8 preset's
# speed check would then choose; tests of what quantization does turn the check off.
ALWAYS_QUANTIZE = ("--set", "fallback.min_speedup=none")


def run_cli(*arguments) -> int:
    return main([str(argument) for argument in arguments])


class Reader(CalibrationDataReader):
    """An onnxruntime data reader, as users of quantize_static have them."""

    def __init__(self, count: int = 24):
        rng = np.random.default_rng(7)
        self.samples = [
            {"x": rng.standard_normal((1, 3, 8, 8)).astype(np.float32)} for _ in range(count)
        ]
        self.position = 0

    def get_next(self):
        if self.position >= len(self.samples):
            return None
        self.position += 1
        return self.samples[self.position - 1]

    def rewind(self):
        self.position = 0


def test_calib_without_recipe_runs_int8_and_writes_a_fused_model(
    tmp_path, classifier_path, classifier_data, capsys
):
    output, report = tmp_path / "int8.onnx", tmp_path / "report.json"
    assert (
        run_cli(
            "optimize",
            classifier_path,
            "-o",
            output,
            "--calib",
            classifier_data,
            "--report",
            report,
            *ALWAYS_QUANTIZE,
        )
        == 0
    )
    document = json.loads(report.read_text())
    assert document["recipe"]["name"] == "int8"
    assert document["passed"]
    quantized = document["quantization"]["quantized_nodes"]
    assert {"Conv", "Gemm"} <= set(quantized.values())
    assert fusion_report(output).rate == 1.0
    assert "Least accurate quantized tensors" in capsys.readouterr().out


def test_constant_node_weights_are_quantized(tmp_path, classifier_path, classifier_data):
    """The classifier's Gemm weight is a Constant node, as in every Paddle export."""
    report = tmp_path / "report.json"
    run_cli(
        "optimize",
        classifier_path,
        "-o",
        tmp_path / "q.onnx",
        "--calib",
        classifier_data,
        "--report",
        report,
        "-q",
        *ALWAYS_QUANTIZE,
    )
    assert json.loads(report.read_text())["quantization"]["quantized_nodes"]["fc"] == "Gemm"


def test_python_api_takes_an_onnxruntime_reader_like_quantize_static(tmp_path, classifier_path):
    output = tmp_path / "api.onnx"
    result = onnxopt.quantize(
        classifier_path,
        output,
        Reader(),
        calibrate_method=CalibrationMethod.Entropy,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        overrides=["fallback.min_speedup=none"],
    )
    assert result.passed and output.exists()
    assert (
        result.report()["passes"][
            [row["name"] for row in result.report()["passes"]].index("calibrate")
        ]["details"]["method"]
        == "entropy"
    )


def test_python_api_passes_paths_and_names_as_values_not_as_toml_text(tmp_path, classifier_path):
    folder = tmp_path / 'quote " and back\\slash'
    folder.mkdir()
    cache = folder / "calib.json"
    result = onnxopt.quantize(
        classifier_path,
        folder / "q.onnx",
        Reader(),
        calibration_cache=cache,
        nodes_to_exclude=['fc"]'],
        per_channel=False,
        overrides=["fallback.min_speedup=none"],
    )
    assert result.passed and cache.exists() and (folder / "q.onnx").exists()
    steps = {spec.name: spec.options for spec in result.recipe.passes}
    assert steps["calibrate"]["cache"] == str(cache)
    assert steps["quantize"]["exclude_nodes"] == ['fc"]']
    assert steps["quantize"]["per_channel"] is False


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"activation_type": QuantType.QInt8}, "activation_type=QInt8 is not supported"),
        ({"symmetric_everything": True}, "unknown option 'symmetric_everything'"),
    ],
)
def test_python_api_refuses_settings_it_does_not_produce(
    tmp_path, classifier_path, options, message
):
    with pytest.raises(onnxopt.InputError, match=message):
        onnxopt.quantize(classifier_path, tmp_path / "x.onnx", Reader(), **options)
    assert not (tmp_path / "x.onnx").exists()


def test_calibration_cache_is_written_then_reused(tmp_path, classifier_path, classifier_data):
    cache, report = tmp_path / "calib.json", tmp_path / "report.json"
    arguments = (
        "optimize",
        classifier_path,
        "--calib",
        classifier_data,
        "--calib-cache",
        cache,
        "-q",
        *ALWAYS_QUANTIZE,
    )
    assert run_cli(*arguments, "-o", tmp_path / "a.onnx") == 0
    assert cache.exists()
    assert run_cli(*arguments, "-o", tmp_path / "b.onnx", "--report", report) == 0
    calibrate = next(
        row for row in json.loads(report.read_text())["passes"] if row["name"] == "calibrate"
    )
    assert calibrate["details"]["cache"] == "hit"


def test_random_calibration_warns_loudly(tmp_path, classifier_path, capsys):
    assert (
        run_cli("optimize", classifier_path, "-o", tmp_path / "r.onnx", "--calib", "random", "-q")
        == 0
    )
    assert "RANDOM data" in capsys.readouterr().err


def test_an_already_quantized_model_is_refused(tmp_path, classifier_path, classifier_data, capsys):
    quantized = tmp_path / "int8.onnx"
    run_cli(
        "optimize",
        classifier_path,
        "-o",
        quantized,
        "--calib",
        classifier_data,
        "-q",
        *ALWAYS_QUANTIZE,
    )
    capsys.readouterr()
    assert (
        run_cli("optimize", quantized, "-o", tmp_path / "again.onnx", "--calib", classifier_data)
        == 2
    )
    assert "already quantized" in capsys.readouterr().err
    assert not (tmp_path / "again.onnx").exists()


def test_nan_in_calibration_data_is_refused(tmp_path, classifier_path, capsys):
    data = tmp_path / "nan.npz"
    samples = np.zeros((4, 1, 3, 8, 8), np.float32)
    samples[2, 0, 0, 0, 0] = np.nan
    np.savez(data, x=samples)
    assert run_cli("optimize", classifier_path, "-o", tmp_path / "q.onnx", "--calib", data) == 2
    error = capsys.readouterr().err
    assert "'x'" in error and "NaN" in error


def test_old_opset_is_upgraded_so_per_channel_weights_load(tmp_path, classifier_data):
    source = tmp_path / "opset11.onnx"
    onnx.save(classifier_proto(opset=11), source)
    output = tmp_path / "q.onnx"
    assert run_cli("optimize", source, "-o", output, "--calib", classifier_data, "-q") == 0
    model = onnx.load(output)
    assert model.opset_import[0].version >= 13
    assert fusion_report(output).rate == 1.0


def test_zero_range_activations_quantize_exactly(tmp_path):
    """A Relu that never fires gives an all-zero tensor: scale 1, and zeros stay zeros."""
    weights = random_weights(w=(4, 3, 1, 1), fc=(2, 4))
    weights["b"] = np.full(4, -100.0, np.float32)
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv"),
        helper.make_node("Relu", ["c"], ["r"], name="relu"),
        helper.make_node("GlobalAveragePool", ["r"], ["g"], name="gap"),
        helper.make_node("Flatten", ["g"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "fc"], ["y"], transB=1, name="fc"),
    ]
    model = build(nodes, {"x": ["N", 3, 4, 4]}, {"y": ["N", 2]}, weights)
    data = [
        {"x": np.random.default_rng(0).standard_normal((1, 3, 4, 4)).astype(np.float32)}
        for _ in range(12)
    ]
    result = onnxopt.optimize(
        model,
        tmp_path / "q.onnx",
        recipe="int8",
        data=data,
        overrides=["fallback.min_speedup=none"],
    )
    assert result.passed
    assert result.context.quantization.report.tensors["c"] == {"scale": 1.0, "zero_point": 0}
    assert result.context.validation.outputs[0].max_abs_error == 0.0


def test_one_dimensional_convolutions_quantize_and_fuse(tmp_path):
    weights = random_weights(w=(8, 4, 3), b=(8,), w2=(8, 8, 3))
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1], name="conv1d"),
        helper.make_node("Relu", ["c"], ["r"], name="relu"),
        helper.make_node("Conv", ["r", "w2"], ["c2"], pads=[1, 1], name="conv1d_2"),
        helper.make_node("GlobalAveragePool", ["c2"], ["y"], name="gap"),
    ]
    model = build(nodes, {"x": ["N", 4, 32]}, {"y": ["N", 8, 1]}, weights)
    data = [
        {"x": np.random.default_rng(index).standard_normal((1, 4, 32)).astype(np.float32)}
        for index in range(16)
    ]
    output = tmp_path / "conv1d.onnx"
    result = onnxopt.optimize(
        model, output, recipe="int8", data=data, overrides=["fallback.min_speedup=none"]
    )
    assert result.context.quantization.report.quantized["conv1d"] == "Conv"
    assert fusion_report(output).op_counts.get("QLinearConv", 0) == 2


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        (
            "calibrate.method=kl",
            "option 'calibrate.method' must be one of auto, minmax, percentile, entropy, mse, got 'kl'",
        ),
        (
            "quantize.tensor_overrides={ x = { low = 0.0, colour = 1 } }",
            "has entry 'x' that is not a table with keys among high, low, type",
        ),
        ('quantize.tensor_overrides={ x = { type = "int4" } }', "has entry 'x' of type 'int4'"),
        ("calibrate.percentile=40", "option 'calibrate.percentile' must be a number in (50, 100]"),
        ("fallback.max_seconds=0", "option 'fallback.max_seconds' must be a number > 0 or none"),
        ("quantize.exclude_nodes=conv1", "must be a list of a string or none"),
    ],
)
def test_bad_quantization_settings_exit_2_without_output(
    tmp_path, classifier_path, classifier_data, capsys, setting, message
):
    output = tmp_path / "q.onnx"
    assert (
        run_cli(
            "optimize", classifier_path, "-o", output, "--calib", classifier_data, "--set", setting
        )
        == 2
    )
    assert message in capsys.readouterr().err
    assert not output.exists()


def test_a_corrupt_calibration_cache_is_a_clear_error(
    tmp_path, classifier_path, classifier_data, capsys
):
    cache = tmp_path / "calib.json"
    cache.write_text("{ not json")
    output = tmp_path / "q.onnx"
    arguments = (
        "optimize",
        classifier_path,
        "-o",
        output,
        "--calib",
        classifier_data,
        "--calib-cache",
        cache,
        *ALWAYS_QUANTIZE,
    )
    assert run_cli(*arguments) == 2
    assert str(cache) in capsys.readouterr().err
    assert not output.exists()


def test_plot_draws_the_layers_of_a_quantized_result(tmp_path, classifier_path, classifier_data):
    plot = tmp_path / "layers.png"
    arguments = ("optimize", classifier_path, "-o", tmp_path / "q.onnx", "--calib")
    assert run_cli(*arguments, classifier_data, "--plot", plot, "-q", *ALWAYS_QUANTIZE) == 0
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and plot.stat().st_size > 5000


def test_plot_into_a_missing_folder_is_refused_before_any_work(
    tmp_path, classifier_path, classifier_data, capsys
):
    output = tmp_path / "q.onnx"
    arguments = ("optimize", classifier_path, "-o", output, "--calib", classifier_data)
    assert run_cli(*arguments, "--plot", tmp_path / "missing" / "layers.png") == 2
    assert "cannot write" in capsys.readouterr().err
    assert not output.exists()


def test_plot_without_matplotlib_is_refused_before_any_work(
    tmp_path, classifier_path, classifier_data, capsys, monkeypatch
):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    output = tmp_path / "q.onnx"
    arguments = ("optimize", classifier_path, "-o", output, "--calib", classifier_data)
    assert run_cli(*arguments, "--plot", tmp_path / "layers.png") == 2
    error = capsys.readouterr().err
    assert "--plot needs matplotlib" in error and "onnxopt[plot]" in error
    assert "Traceback" not in error
    assert not output.exists() and not (tmp_path / "layers.png").exists()
