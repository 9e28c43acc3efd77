"""Planning decides without rewriting; emitting carries the plan out."""

from __future__ import annotations

import numpy as np
from onnx import helper, numpy_helper

from onnxopt.quantization.plan import QuantizationOptions, plan_quantization
from onnxopt.quantization.prepare import tensors_to_calibrate
from onnxopt.quantization.qdq import emit_plan, quantize_model
from tests.quantization.helpers import build, feeds, measured_ranges, ops, random_weights, run
from tests.quantization.test_qdq import cnn


def chain_through_relus():
    """conv -> Relu -> Clip(0, inf) -> Pad (filling with 1) -> conv: two absorptions in a row,
    then a float op, and a conv that stays float since it makes the graph output (which must
    stay exact)."""
    weights = random_weights(w1=(4, 3, 3, 3), w2=(4, 4, 3, 3))
    weights |= {
        "zero": np.array(0, np.float32),
        "one": np.array(1, np.float32),
        "pads": np.array([0, 0, 1, 1, 0, 0, 1, 1]),
    }
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c1"], pads=[1] * 4, name="conv1"),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu"),
        helper.make_node("Clip", ["r1", "zero"], ["r2"], name="clip"),
        helper.make_node("Pad", ["r2", "pads", "one"], ["p"], name="pad"),
        helper.make_node("Conv", ["p", "w2"], ["y"], name="conv2"),
    ]
    return build(nodes, {"x": [1, 3, 8, 8]}, {"y": [1, 4, 8, 8]}, weights)


def test_planning_leaves_the_graph_as_it_was():
    model = chain_through_relus()
    ranges = measured_ranges(model, feeds(model))
    before = [(node.name, [value.name for value in node.inputs]) for node in model.graph]
    plan_quantization(model, ranges, {}, QuantizationOptions(reduce_range=False))
    assert [(node.name, [value.name for value in node.inputs]) for node in model.graph] == before


def test_the_plan_prints_every_decision():
    model = chain_through_relus()
    plan = plan_quantization(
        model, measured_ranges(model, feeds(model)), {}, QuantizationOptions(reduce_range=False)
    )
    decisions = {row.node: row.decision for row in plan.decisions()}
    assert decisions == {
        "conv1": "int8, output int8",
        "relu": "absorbed into conv1",
        "clip": "absorbed into conv1",
        "pad": "float: its fill value is not a constant zero",
        "conv2": "float: output: it is a graph output, kept float for full output precision",
    }
    lines = plan.describe().splitlines()
    assert len(lines) == 5 and lines[1].split() == ["relu", "Relu", "absorbed", "into", "conv1"]


def test_emitting_the_plan_is_quantizing():
    samples = feeds(cnn())
    planned, direct = cnn(), cnn()
    ranges = measured_ranges(planned, samples)
    options = QuantizationOptions(reduce_range=False)
    report = emit_plan(plan_quantization(planned, ranges, {}, options))
    assert report == quantize_model(direct, ranges, {}, options)
    assert ops(planned) == ops(direct)
    assert "Relu" not in ops(planned)
    np.testing.assert_array_equal(run(planned, samples), run(direct, samples))


def test_heavy_ops_inside_branches_are_reported_as_kept_float():
    import onnx
    import onnx_ir as ir

    model = ir.from_proto(
        onnx.parser.parse_model(
            """
            <ir_version: 8, opset_import: ["" : 17]>
            g (float[2, 4] x, bool flag) => (float[2, 4] y) <float[4, 4] w = {1,0,0,0, 0,1,0,0, 0,0,1,0, 0,0,0,1}> {
                y = If(flag) <
                    then_branch = then_graph () => (float[2, 4] a) { a = MatMul(x, w) },
                    else_branch = else_graph () => (float[2, 4] b) { b = Relu(x) }
                >
            }
            """
        )
    )
    plan = plan_quantization(model, {}, {}, QuantizationOptions())
    [entry] = plan.kept_float
    assert entry["op_type"] == "If" and "main graph only" in entry["reason"]


def test_a_weight_from_a_constant_node_stays_float_with_the_fix():
    """Recipes without lift-constants reach the quantizer with Constant-node weights."""
    weights = random_weights(w2=(4, 4, 3, 3))
    w1 = random_weights(seed=3, w1=(4, 3, 3, 3))["w1"]
    nodes = [
        helper.make_node("Constant", [], ["w1"], value=numpy_helper.from_array(w1)),
        helper.make_node("Conv", ["x", "w1"], ["c1"], pads=[1] * 4, name="conv1"),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu"),
        helper.make_node("Conv", ["r1", "w2"], ["c2"], pads=[1] * 4, name="conv2"),
        helper.make_node("Relu", ["c2"], ["y"], name="relu2"),
    ]
    model = build(nodes, {"x": [1, 3, 8, 8]}, {"y": [1, 4, 8, 8]}, weights)
    assert tensors_to_calibrate(model) is not None
    plan = plan_quantization(
        model, measured_ranges(model, feeds(model)), {}, QuantizationOptions(reduce_range=False)
    )
    decisions = {row.node: row.decision for row in plan.decisions()}
    assert "lift-constants" in decisions["conv1"]
    assert decisions["conv2"].startswith("int8")


def hardswish_then_division():
    """conv -> HardSwish -> Div(6) -> conv: the Div reads what the spelled-out HardSwish gives."""
    weights = random_weights(w1=(4, 3, 3, 3), w2=(4, 4, 3, 3))
    weights["six"] = np.array(6.0, np.float32)
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c1"], pads=[1] * 4, name="conv1"),
        helper.make_node("HardSwish", ["c1"], ["h"], name="hardswish"),
        helper.make_node("Div", ["h", "six"], ["d"], name="divide"),
        helper.make_node("Conv", ["d", "w2"], ["c2"], pads=[1] * 4, name="conv2"),
        helper.make_node("Relu", ["c2"], ["y"], name="relu"),
    ]
    return build(nodes, {"x": [1, 3, 8, 8]}, {"y": [1, 4, 8, 8]}, weights)


def test_a_division_after_a_spelled_out_hardswish_runs_in_int8_too():
    model = hardswish_then_division()
    quantize_model(
        model, measured_ranges(model, feeds(model)), {}, QuantizationOptions(reduce_range=False)
    )
    assert "HardSwish" not in ops(model) and "Div" not in ops(model)


def test_an_excluded_op_type_is_not_rewritten_for_int8():
    weights = random_weights(w1=(4, 3, 3, 3), w2=(4, 4, 3, 3))
    weights["six"] = np.array(6.0, np.float32)
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c1"], pads=[1] * 4, name="conv1"),
        helper.make_node("Div", ["c1", "six"], ["d"], name="divide"),
        helper.make_node("Conv", ["d", "w2"], ["c2"], pads=[1] * 4, name="conv2"),
        helper.make_node("Relu", ["c2"], ["y"], name="relu"),
    ]
    for excluded in ([], ["Div"]):
        model = build(nodes, {"x": [1, 3, 8, 8]}, {"y": [1, 4, 8, 8]}, weights)
        options = QuantizationOptions(reduce_range=False, exclude_op_types=excluded)
        quantize_model(model, measured_ranges(model, feeds(model)), {}, options)
        assert ("Div" in ops(model)) == bool(excluded)
