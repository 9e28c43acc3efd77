"""--target on optimize, --runtime on compare, and OpenVINO sessions."""

from __future__ import annotations

import builtins
import json

import numpy as np
import onnx
import pytest

from onnxopt import runtime
from onnxopt.cli import main
from onnxopt.io import load
from onnxopt.openvino_runtime import OpenVinoSession

openvino = pytest.importorskip("openvino", reason="the openvino extra (make installs it)")

ALWAYS_QUANTIZE = ("--set", "fallback.min_speedup=none")


def run_cli(*arguments) -> int:
    return main([str(argument) for argument in arguments])


def quantize_cli(model, output, data, *arguments) -> int:
    """``onnxopt optimize`` with calibration data, and the given further arguments."""
    return run_cli("optimize", model, "-o", output, "--calib", data, *arguments)


def pass_details(report, name: str) -> dict:
    passes = json.loads(report.read_text())["passes"]
    return next(row["details"] for row in passes if row["name"] == name)


def test_an_openvino_session_runs_like_onnxruntime(classifier_path, classifier_data):
    model = load(classifier_path)
    feed = {name: array[0] for name, array in np.load(classifier_data).items()}
    expected = runtime.create_session(model).run(None, feed)
    session = runtime.create_session(model, threads=1, runtime="openvino")
    assert isinstance(session, OpenVinoSession)
    assert [output.name for output in session.get_outputs()] == ["logits"]
    np.testing.assert_allclose(session.run(None, feed)[0], expected[0], rtol=1e-4, atol=1e-5)
    from_file = OpenVinoSession(classifier_path)
    np.testing.assert_allclose(
        from_file.run(["logits"], feed)[0], expected[0], rtol=1e-4, atol=1e-5
    )


@pytest.mark.parametrize("target", ["openvino", "generic"])
def test_optimize_for_a_target_writes_its_form_and_measures_it_there(
    tmp_path, classifier_path, classifier_data, target
):
    output, report = tmp_path / "int8.onnx", tmp_path / "report.json"
    code = quantize_cli(
        classifier_path,
        output,
        classifier_data,
        "--target",
        target,
        "--report",
        report,
        "-q",
        *ALWAYS_QUANTIZE,
    )
    assert code == 0
    written = onnx.load(output)
    op_types = {node.op_type for node in written.graph.node}
    assert "QuantizeLinear" in op_types and "DynamicQuantizeLinear" not in op_types
    assert pass_details(report, "quantize")["target"] == target
    assert pass_details(report, "smooth")["layers"] == 1  # the classifier's Gemm
    speed = json.loads(report.read_text())["speed"]
    assert speed["runtime"] == ("openvino" if target == "openvino" else "onnxruntime")
    zero_points = [
        onnx.numpy_helper.to_array(tensor)
        for tensor in written.graph.initializer
        if tensor.name.endswith("_zero_point") and tensor.data_type == onnx.TensorProto.UINT8
    ]
    assert (target == "generic") == (not zero_points)


def test_the_default_target_smooths_nothing(tmp_path, classifier_path, classifier_data):
    report = tmp_path / "report.json"
    code = quantize_cli(
        classifier_path,
        tmp_path / "o.onnx",
        classifier_data,
        "--report",
        report,
        "-q",
        "--no-timing",
        *ALWAYS_QUANTIZE,
    )
    assert code == 0
    assert pass_details(report, "smooth") == {"skipped": "MatMul inputs quantize at run time"}


def test_compare_runs_both_models_in_openvino(tmp_path, classifier_path, classifier_data, capsys):
    output = tmp_path / "out.onnx"
    assert run_cli("optimize", classifier_path, "-o", output, "-q", "--no-timing") == 0
    capsys.readouterr()
    code = run_cli(
        "compare",
        classifier_path,
        output,
        "--data",
        classifier_data,
        "--runs",
        3,
        "--runtime",
        "openvino",
        "--json",
    )
    assert code == 0
    comparison = json.loads(capsys.readouterr().out)
    assert comparison["runtime"] == "openvino"
    assert comparison["outputs"][0]["cosine"] > 0.9999


def test_an_unknown_target_is_a_usage_error(tmp_path, classifier_path, classifier_data, capsys):
    with pytest.raises(SystemExit) as raised:
        run_cli("optimize", classifier_path, "-o", tmp_path / "o.onnx", "--target", "tensorrt")
    assert raised.value.code == 2
    code = quantize_cli(
        classifier_path, tmp_path / "o.onnx", classifier_data, "--set", "quantize.target=tensorrt"
    )
    assert code == 2 and not (tmp_path / "o.onnx").exists()
    assert "onnxruntime-cpu" in capsys.readouterr().err


def test_openvino_without_the_package_names_the_extra(
    tmp_path, classifier_path, classifier_data, capsys, monkeypatch
):
    real_import = builtins.__import__

    def without_openvino(name, *arguments, **keywords):
        if name == "openvino" or name.startswith("openvino."):
            raise ImportError("No module named 'openvino'")
        return real_import(name, *arguments, **keywords)

    monkeypatch.setattr(builtins, "__import__", without_openvino)
    output = tmp_path / "o.onnx"
    code = quantize_cli(classifier_path, output, classifier_data, "--target", "openvino")
    assert code == 2 and not output.exists()
    assert "onnxopt[openvino]" in capsys.readouterr().err
    assert run_cli("compare", classifier_path, classifier_path, "--runtime", "openvino") == 2
    assert "onnxopt[openvino]" in capsys.readouterr().err


def test_the_python_api_takes_a_target(tmp_path, classifier_path, classifier_data):
    import onnxopt
    from onnxopt.errors import InputError

    samples = [{"x": array} for array in np.load(classifier_data)["x"]]
    output = tmp_path / "generic.onnx"
    onnxopt.quantize(
        classifier_path,
        output,
        samples,
        target="generic",
        timing=False,
        overrides=["fallback.min_speedup=none"],
    )
    zero_points = [
        tensor
        for tensor in onnx.load(output).graph.initializer
        if tensor.name.endswith("_zero_point")
    ]
    types = {tensor.data_type for tensor in zero_points}
    assert onnx.TensorProto.INT8 in types and onnx.TensorProto.UINT8 not in types
    with pytest.raises(InputError, match="onnxruntime-cpu"):
        onnxopt.quantize(classifier_path, tmp_path / "x.onnx", samples, target="tensorrt")
    assert not (tmp_path / "x.onnx").exists()
