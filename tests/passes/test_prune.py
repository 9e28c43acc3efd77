"""The prune pass through the presets a user runs: a smaller model written, the keep indices
in the report, int8 quantization on the pruned graph, and options refused with the fix."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnx_ir as ir
import pytest

from onnxopt.cli import main
from onnxopt.pruning.shrink import model_statistics
from tests.pruning.test_structured import branchy_net
from tests.quantization.helpers import feeds


def optimize(tmp_path, recipe: str, *options: str, labels: bool = False) -> tuple[int, dict | None]:
    model = branchy_net()
    source, output, report = tmp_path / "m.onnx", tmp_path / "out.onnx", tmp_path / "r.json"
    ir.save(model, source)
    data = tmp_path / "calib.npz"
    arrays = {"x": np.stack([sample["x"] for sample in feeds(model, count=48)])}
    if labels:
        arrays["labels"] = np.random.default_rng(0).integers(0, 5, (48, 1))
    np.savez(data, **arrays)
    arguments = ["optimize", source, "-o", output, "--recipe", recipe, "--calib", data]
    settings = [part for option in options for part in ("--set", option)]
    code = main([str(a) for a in [*arguments, *settings, "--report", report]])
    return code, json.loads(report.read_text()) if report.exists() else None


def test_the_prune_preset_writes_a_smaller_model_and_reports_the_keep_indices(tmp_path):
    code, document = optimize(tmp_path, "prune", "prune.round_to=1")
    assert code == 0
    pruning = document["pruning"]
    assert pruning["macs"]["after"] <= 0.7 * pruning["macs"]["before"]
    assert {group["name"] for group in pruning["groups"]} == {"conv2", "conv3a", "conv3b"}
    for group in pruning["groups"]:
        assert isinstance(group["keep"], list) and len(group["keep"]) == group["kept"]
    assert {"node": "fc", "reason": "reaches the model output"} in pruning["unprunable"]
    written = ir.load(tmp_path / "out.onnx")
    assert model_statistics(written)[0] == pruning["parameters"]["after"]


# Of the 48 samples, validation holds back 12.


@pytest.mark.parametrize(
    ("option", "samples"), [("prune.samples=auto", 36), ("prune.samples=8", 8)]
)
def test_prune_measures_on_all_the_samples_by_default_or_on_as_many_as_asked(
    tmp_path, option, samples
):
    code, document = optimize(tmp_path, "prune", "prune.round_to=1", option)
    assert code == 0 and document["pruning"]["samples"] == samples


def test_the_prune_int8_preset_quantizes_the_pruned_graph(tmp_path):
    options = ("prune.round_to=1", "fallback.min_speedup=none")
    code, document = optimize(tmp_path, "prune-int8", *options)
    assert code == 0
    assert document["pruning"]["removed_channels"] > 0
    ops = ir.load(tmp_path / "out.onnx").graph
    assert any(node.op_type == "QuantizeLinear" for node in ops)
    # The fallback's budget holds int8's own error: against the pruned float model.
    fallback = document["quantization"]["fallback"]
    assert fallback["against"] == "float" and fallback["budget_met"]


def test_the_prune_int8_preset_keeps_the_pruned_model_float_where_int8_is_slower(tmp_path):
    # No CPU runs int8 1000x faster than float: the speed check must decline, and the pruned
    # float model is what is written (PP-OCR's direction classifier pruned: 1.33x FP32 float,
    # 0.84x in int8).
    options = ("prune.round_to=1", "fallback.min_speedup=1000")
    code, document = optimize(tmp_path, "prune-int8", *options)
    assert code == 0
    assert document["pruning"]["removed_channels"] > 0
    assert "below min_speedup 1000" in document["quantization"]["declined"]
    ops = ir.load(tmp_path / "out.onnx").graph
    assert not any(node.op_type == "QuantizeLinear" for node in ops)


def test_finetune_steps_distil_the_pruned_model_and_report_it(tmp_path):
    pytest.importorskip("torch", reason="the torch extra is not installed")
    code, document = optimize(tmp_path, "prune", "prune.round_to=1", "prune.finetune_steps=12")
    assert code == 0
    finetune = document["finetune"]
    assert finetune["train_samples"] > 0 and finetune["held_out_before"] > 0
    assert finetune["held_out_after"] <= finetune["held_out_before"]
    assert finetune["steps"] > 0 and finetune["features"] == 0


@pytest.mark.parametrize("labels", [False, True])
def test_gradient_importances_use_the_labels_in_the_data(tmp_path, labels):
    pytest.importorskip("torch", reason="the torch extra is not installed")
    options = ("prune.round_to=1", "prune.importance=fisher")
    code, document = optimize(tmp_path, "prune", *options, labels=labels)
    assert code == 0 and document["validation"]["passed"]
    assert document["pruning"]["importance"] == "fisher"
    assert document["pruning"]["gradient_loss"] == ("labels" if labels else "self-prediction")


@pytest.mark.parametrize(
    ("labels", "says"),
    [
        (np.zeros((48, 1), np.float32), "not integer class indices"),
        (np.zeros((40, 1), np.int64), "different numbers of samples"),
        (np.full((48, 1), 7), "do not fit output 'y'"),
    ],
)
def test_bad_labels_exit_2_naming_the_problem_and_write_nothing(tmp_path, capsys, labels, says):
    pytest.importorskip("torch", reason="the torch extra is not installed")
    model = branchy_net()
    source, output, data = tmp_path / "m.onnx", tmp_path / "out.onnx", tmp_path / "calib.npz"
    ir.save(model, source)
    np.savez(data, x=np.stack([sample["x"] for sample in feeds(model, count=48)]), labels=labels)
    arguments = ["optimize", source, "-o", output, "--recipe", "prune", "--calib", data]
    code = main([str(a) for a in [*arguments, "--set", "prune.importance=fisher"]])
    printed = capsys.readouterr()
    assert code == 2 and says in printed.out + printed.err
    assert not output.exists()


@pytest.mark.parametrize("option", ["prune.importance=fisher", "prune.finetune_steps=8"])
def test_without_torch_gradients_and_fine_tune_say_how_to_install_it(tmp_path, option):
    source, output, data = tmp_path / "m.onnx", tmp_path / "out.onnx", tmp_path / "calib.npz"
    model = branchy_net()
    ir.save(model, source)
    np.savez(data, x=np.stack([sample["x"] for sample in feeds(model, count=16)]))
    code = "import sys; sys.modules['torch'] = None\nfrom onnxopt.cli import main\n"
    code += "sys.exit(main(sys.argv[1:]))"
    arguments = ["optimize", source, "-o", output, "--recipe", "prune", "--calib", data]
    result = subprocess.run(
        [sys.executable, "-c", code, *map(str, arguments), "--set", option],
        capture_output=True,
        text=True,
    )
    printed = result.stdout + result.stderr
    assert result.returncode == 2, printed
    assert "pip install 'onnxopt[torch]'" in printed and "Traceback" not in printed
    assert not output.exists()


@pytest.mark.parametrize(
    ("option", "says"),
    [
        ("prune.ratio=1.5", "prune"),
        ("prune.importance=random", "prune"),
        ("prune.finetune_steps=-1", "prune.finetune_steps"),
        ("prune.allocation=even", "prune.allocation"),
        ("prune.samples=0", "prune.samples"),
    ],
)
def test_bad_prune_options_exit_2_and_write_nothing(tmp_path, option, says, capsys):
    code, _ = optimize(tmp_path, "prune", option)
    assert code == 2 and not (tmp_path / "out.onnx").exists()
    assert says in capsys.readouterr().err


def test_a_bad_fallback_reference_exits_2_names_the_choices_and_writes_nothing(tmp_path, capsys):
    code, _ = optimize(tmp_path, "prune-int8", "fallback.against=pruned")
    assert code == 2 and not (tmp_path / "out.onnx").exists()
    err = capsys.readouterr().err
    assert "fallback.against" in err and "original, float" in err and "Traceback" not in err
