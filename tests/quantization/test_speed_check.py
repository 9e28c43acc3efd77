"""The int8 speed check before calibration. Timing itself is not tested (no timed unit tests):
the speedups are set, and what they decide is checked."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import helper

import onnxopt
from onnxopt.passes.check_speed import CheckSpeedPass
from onnxopt.passes.fallback import FallbackPass
from onnxopt.pipeline import Pipeline
from onnxopt.quantization import fallback as search_module
from onnxopt.quantization import speed_check
from onnxopt.quantization.plan import QuantizationOptions
from onnxopt.quantization.speed_check import (
    EVERY_LAYER_QUANTIZED,
    check_int8_speed,
    lighter_variants,
)
from tests.quantization.helpers import build, calibrated, random_weights


def depthwise_block():
    """conv -> depthwise conv -> add (residual) -> pointwise conv."""
    weights = random_weights(conv_w=(8, 4, 3, 3), dw_w=(8, 1, 3, 3), pw_w=(4, 8, 1, 1))
    nodes = [
        helper.make_node("Conv", ["x", "conv_w"], ["a"], pads=[1] * 4, name="conv"),
        helper.make_node("Conv", ["a", "dw_w"], ["d"], pads=[1] * 4, group=8, name="dw"),
        helper.make_node("Add", ["a", "d"], ["s"], name="add"),
        helper.make_node("Conv", ["s", "pw_w"], ["y"], name="pw"),
    ]
    return build(nodes, {"x": [1, 4, 8, 8]}, {"y": [1, 4, 8, 8]}, weights)


def samples(count=4):
    rng = np.random.default_rng(0)
    return [{"x": rng.standard_normal((1, 4, 8, 8)).astype(np.float32)} for _ in range(count)]


def speeds(monkeypatch, by_float_layers):
    """Make every timing return the speedup ``by_float_layers`` gives for the set of layers
    the timed model keeps float, and record those sets in the order timed."""
    timed = []
    made = {}
    real_quantized = speed_check.quantized_copy

    def quantized(model, ranges, problems, options, float_layers=()):
        copy, report = real_quantized(model, ranges, problems, options, float_layers)
        made[id(copy)] = frozenset(float_layers)
        return copy, report

    def speedup(float_model, quantized_model, feed, runtime_name):
        float_layers = made[id(quantized_model)]
        timed.append(float_layers)
        return by_float_layers(float_layers)

    monkeypatch.setattr(speed_check, "quantized_copy", quantized)
    monkeypatch.setattr(speed_check, "time_against_float", speedup)
    return timed


def test_lighter_variants_keep_elementwise_ops_depthwise_convolutions_and_both_float():
    variants = dict(lighter_variants(depthwise_block().graph))
    assert variants == {
        "elementwise and data-movement ops float": {"add"},
        "depthwise convolutions float": {"dw"},
        "elementwise ops and depthwise convolutions float": {"add", "dw"},
    }


def test_a_fast_quantization_stops_the_timing_at_once(monkeypatch):
    model = depthwise_block()
    ranges = calibrated(model, samples()).ranges
    timed = speeds(monkeypatch, lambda float_layers: 1.6)
    check = check_int8_speed(
        model, ranges, {}, QuantizationOptions(reduce_range=False), samples()[0], 1.0
    )
    assert len(timed) == 1 and check.worthwhile and check.reason == ""
    assert check.speedups == {EVERY_LAYER_QUANTIZED: 1.6}
    assert {"conv", "dw", "add"} <= check.quantized_nodes


def test_a_slow_quantization_times_the_lighter_variants_until_one_is_fast(monkeypatch):
    model = depthwise_block()
    ranges = calibrated(model, samples()).ranges
    timed = speeds(monkeypatch, lambda float_layers: 1.2 if float_layers == {"dw"} else 0.7)
    check = check_int8_speed(
        model, ranges, {}, QuantizationOptions(reduce_range=False), samples()[0], 1.0
    )
    assert timed == [set(), {"add"}, {"dw"}]
    assert check.worthwhile and check.best == ("depthwise convolutions float", 1.2)

    timed = speeds(monkeypatch, lambda float_layers: 0.7)
    check = check_int8_speed(
        model, ranges, {}, QuantizationOptions(reduce_range=False), samples()[0], 1.0
    )
    assert not check.worthwhile and len(timed) == 4 and timed[-1] == {"add", "dw"}
    assert check.reason.startswith("int8 would be slower than float: at its fastest")
    assert "0.70x, below min_speedup 1" in check.reason


def test_without_its_own_bar_the_check_takes_the_fallback_passes():
    check = CheckSpeedPass()
    Pipeline([check, FallbackPass(min_speedup=1.5)])
    assert check.min_speedup == 1.5
    check = CheckSpeedPass(min_speedup=2.0)
    Pipeline([check, FallbackPass(min_speedup=1.5)])
    assert check.min_speedup == 2.0
    check = CheckSpeedPass()
    Pipeline([FallbackPass(min_speedup=1.5), check])
    assert check.min_speedup is None


def _run_int8(tmp_path, monkeypatch, speedup, **settings):
    model_path = tmp_path / "model.onnx"
    ir.save(depthwise_block(), model_path)
    timed = speeds(monkeypatch, lambda float_layers: speedup)
    result = onnxopt.optimize(
        model_path,
        tmp_path / "out.onnx",
        recipe="int8",
        data=samples(8),
        settings={"quantize.reduce_range": False, **settings},
        timing=False,
    )
    return result, timed


def test_int8_slower_than_float_skips_calibration_and_writes_the_float_model(tmp_path, monkeypatch):
    result, timed = _run_int8(tmp_path, monkeypatch, 0.8)
    rows = {row["name"]: row for row in result.report()["passes"]}
    for name in ("equalize", "calibrate", "quantize", "correct-bias", "fallback"):
        assert rows[name]["details"] == {"skipped": "int8 declined"}
    assert result.context.calibration is None and result.context.quantization is None
    quantization = result.report()["quantization"]
    assert quantization["declined"].startswith("int8 would be slower than float")
    assert quantization["speed_check"]["speedups"][EVERY_LAYER_QUANTIZED] == 0.8
    assert len(timed) == 4
    assert result.passed
    written = ort.InferenceSession(str(tmp_path / "out.onnx"))
    assert not {"QuantizeLinear", "DequantizeLinear"} & {
        node.op_type for node in result.model.graph
    }
    assert written.run(None, samples(1)[0])[0].shape == (1, 4, 8, 8)


def test_int8_fast_enough_is_quantized_and_fallback_reuses_the_timing(tmp_path, monkeypatch):
    def not_timed_again(self, candidate):
        raise AssertionError("fallback timed the quantization the speed check timed")

    monkeypatch.setattr(search_module._Search, "speedup", not_timed_again)
    result, timed = _run_int8(tmp_path, monkeypatch, 1.7, **{"fallback.min_cosine": 0.5})
    assert len(timed) == 1
    quantization = result.report()["quantization"]
    assert "declined" not in quantization
    assert quantization["fallback"]["speedup"] == pytest.approx(1.7)
    assert quantization["quantized_nodes"]


def test_no_bar_means_no_check(tmp_path, monkeypatch):
    result, timed = _run_int8(tmp_path, monkeypatch, 0.5, **{"fallback.min_speedup": None})
    rows = {row["name"]: row for row in result.report()["passes"]}
    assert rows["check-speed"]["details"] == {"skipped": "no min_speedup"}
    assert not timed and result.report()["quantization"]["quantized_nodes"]
