from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir

from onnxopt.cleanup.batchnorm import fold_batchnorms
from tests.helpers import assert_outputs_close, count_ops, model_from_text, output_names, run_model

IMAGE = {"x": np.random.default_rng(0).standard_normal((1, 2, 4, 4)).astype(np.float32)}
ROWS = {"x": np.random.default_rng(1).standard_normal((3, 2)).astype(np.float32)}
PARAMETERS = (
    "float[2] scale = {1.5, 0.5}, float[2] shift = {0.1, -0.2}, "
    "float[2] mean = {0.3, -0.1}, float[2] var = {2.0, 0.5}"
)
WEIGHTS = "float[2,2,1,1] w = {1.0, 2.0, 3.0, -4.0}, float[2] bias = {0.5, -1.0}"


def model(inputs: str, outputs: str, initializers: str, body: str, opset: int = 17) -> ir.Model:
    return model_from_text(f"""
<ir_version: 8, opset_import: ["" : {opset}]>
g ({inputs}) => ({outputs}) <{initializers}> {{
    {body}
}}
""")


def test_a_batchnorm_that_makes_a_graph_output_leaves_its_name_on_the_conv():
    folded = model(
        "float[1,2,4,4] x",
        "float[1,2,4,4] y",
        f"{WEIGHTS}, {PARAMETERS}",
        "c = Conv(x, w, bias)  y = BatchNormalization(c, scale, shift, mean, var)",
    )
    before = run_model(folded, IMAGE)
    result = fold_batchnorms(folded)
    assert result.folded == 1
    assert output_names(folded) == ["y"]
    assert folded.graph.outputs[0].producer().op_type == "Conv"
    assert set(folded.graph.initializers) == {"w", "bias"}
    onnx.checker.check_model(ir.to_proto(folded), full_check=True)
    assert_outputs_close(run_model(folded, IMAGE), before)


def test_gemm_beta_scales_the_broadcast_bias_and_goes_away():
    folded = model(
        "float[3,2] x",
        "float[3,2] z",
        f"float[2,2] w = {{1.0, 2.0, 3.0, -4.0}}, float[1] bias = {{0.5}}, {PARAMETERS}",
        "c = Gemm<alpha = 0.5, beta = 3.0>(x, w, bias)  y = BatchNormalization(c, scale, shift, mean, var)  z = Relu(y)",
    )
    before = run_model(folded, ROWS)
    assert fold_batchnorms(folded).folded == 1
    gemm = folded.graph.node(0)
    assert "beta" not in gemm.attributes
    assert gemm.inputs[2].const_value.shape == (2,)
    assert_outputs_close(run_model(folded, ROWS), before)


def test_gemm_without_bias_gets_one_with_a_name_of_its_own():
    folded = model(
        "float[3,2] x",
        "float[3,2] y",
        f"float[2,2] w = {{1.0, 2.0, 3.0, -4.0}}, float[2] w_bias = {{7.0, 7.0}}, {PARAMETERS}",
        "c = Gemm<transB = 1>(x, w)  y = BatchNormalization(c, scale, shift, mean, var)  unused = Neg(w_bias)",
    )
    before = run_model(folded, ROWS)
    assert fold_batchnorms(folded).folded == 1
    assert folded.graph.node(0).inputs[2].name == "w_bias_2"
    assert_outputs_close(run_model(folded, ROWS), before)


def test_float16_weights_fold_through_float64_and_stay_float16():
    # float16 values are written as their bits: 1.0, 2.0, 0.5, -1.0 and 1.5, 0.5, 0.1, -0.2...
    folded = model(
        "float16[1,2,4,4] x",
        "float16[1,2,4,4] y",
        "float16[2,2,1,1] w = {15360, 16384, 14336, 48128}, float16[2] scale = {15872, 14336}, "
        "float16[2] shift = {11878, 45670}, float16[2] mean = {13517, 44646}, "
        "float16[2] var = {16384, 14336}",
        "c = Conv(x, w)  y = BatchNormalization(c, scale, shift, mean, var)",
    )
    feeds = {"x": IMAGE["x"].astype(np.float16)}
    before = run_model(folded, feeds)
    assert fold_batchnorms(folded).folded == 1
    conv = folded.graph.node(0)
    assert {value.const_value.dtype for value in conv.inputs[1:]} == {ir.DataType.FLOAT16}
    assert_outputs_close(run_model(folded, feeds), before, rtol=2e-3, atol=2e-3)


def test_parameters_shared_by_two_batchnorms_go_once_both_are_folded():
    folded = model(
        "float[1,2,4,4] x",
        "float[1,2,4,4] y, float[1,2,4,4] z",
        f"{WEIGHTS}, float[2,2,1,1] w2 = {{0.5, 1.0, -1.0, 2.0}}, {PARAMETERS}",
        "c = Conv(x, w, bias)  y = BatchNormalization(c, scale, shift, mean, var) "
        " d = Conv(x, w2)  z = BatchNormalization(d, scale, shift, mean, var)",
    )
    before = run_model(folded, IMAGE)
    assert fold_batchnorms(folded).folded == 2
    assert count_ops(folded) == {"Conv": 2}
    assert set(folded.graph.initializers) == {"w", "bias", "w2", "w2_bias"}
    assert_outputs_close(run_model(folded, IMAGE), before)


def test_refusals_are_counted_by_reason():
    refused = model(
        "float[1,2,4,4] x",
        "float[1,2,4,4] y, float[1,2,4,4] z, float[1,2,4,4] v",
        f"{WEIGHTS}, {PARAMETERS}",
        "c = Conv(x, w, bias)  y = BatchNormalization(c, scale, shift, mean, var)  z = Conv(x, w) "
        " r = Relu(x)  v = BatchNormalization(r, scale, shift, mean, var)",
    )
    result = fold_batchnorms(refused)
    assert result.folded == 0
    # The BatchNorm after a Relu is no candidate, so no refusal.
    assert result.refused == {"the Conv's weights or bias feed other nodes too": 1}
    assert count_ops(refused) == {"Conv": 2, "BatchNormalization": 2, "Relu": 1}


def test_before_opset_7_a_batchnorm_without_is_test_computes_batch_statistics_and_stays():
    text = "c = Conv(x, w, bias)  y = BatchNormalization{}(c, scale, shift, mean, var)"
    training = model(
        "float[1,2,4,4] x", "float[1,2,4,4] y", f"{WEIGHTS}, {PARAMETERS}", text.format(""), 6
    )
    assert fold_batchnorms(training).refused == {"it runs in training mode": 1}
    inference = model(
        "float[1,2,4,4] x",
        "float[1,2,4,4] y",
        f"{WEIGHTS}, {PARAMETERS}",
        text.format("<is_test = 1>"),
        6,
    )
    assert fold_batchnorms(inference).folded == 1
    assert count_ops(inference) == {"Conv": 1}


def test_a_conv_in_a_branch_takes_its_weights_into_the_branch():
    folded = model(
        "float[1,2,4,4] x, bool condition",
        "float[1,2,4,4] y, float[2] kept",
        f"{WEIGHTS}, {PARAMETERS}",
        """kept = Identity(shift)
        y = If(condition) <
            then_branch = then_graph () => (float[1,2,4,4] then_y) {
                c = Conv(x, w, bias)  then_y = BatchNormalization(c, scale, shift, mean, var)
            },
            else_branch = else_graph () => (float[1,2,4,4] else_y) { else_y = Relu(x) }
        >""",
    )
    feeds = [{**IMAGE, "condition": np.array(value)} for value in (True, False)]
    before = [run_model(folded, feed) for feed in feeds]
    assert fold_batchnorms(folded).folded == 1
    branch = folded.graph.node(1).attributes["then_branch"].as_graph()
    assert set(branch.initializers) == {"w", "bias"}
    # A parameter something else still reads stays where it was.
    assert set(folded.graph.initializers) == {"shift"}
    onnx.checker.check_model(ir.to_proto(folded), full_check=True)
    for feed, expected in zip(feeds, before, strict=True):
        assert_outputs_close(run_model(folded, feed), expected)


def test_functions_hold_no_initializers_so_nothing_folds_there():
    kept = model_from_text("""
<ir_version: 8, opset_import: ["" : 17, "local" : 1]>
g (float[1,2,4,4] x) => (float[1,2,4,4] y) {
    y = local.block(x)
}
<domain: "local", opset_import: ["" : 17]>
block (x) => (y) {
    w = Constant<value = float[2,2,1,1] {1.0, 2.0, 3.0, -4.0}>()
    scale = Constant<value = float[2] {1.5, 0.5}>()
    shift = Constant<value = float[2] {0.1, -0.2}>()
    mean = Constant<value = float[2] {0.3, -0.1}>()
    var = Constant<value = float[2] {2.0, 0.5}>()
    c = Conv(x, w)
    y = BatchNormalization(c, scale, shift, mean, var)
}
""")
    before = run_model(kept, IMAGE)
    result = fold_batchnorms(kept)
    assert result.refused == {"weights or parameters are not constant initializers": 1}
    assert_outputs_close(run_model(kept, IMAGE), before)


def test_a_batchnorm_in_a_branch_stays_when_its_conv_is_outside():
    kept = model(
        "float[1,2,4,4] x, bool condition",
        "float[1,2,4,4] y",
        f"{WEIGHTS}, {PARAMETERS}",
        """c = Conv(x, w, bias)
        y = If(condition) <
            then_branch = then_graph () => (float[1,2,4,4] then_y) {
                then_y = BatchNormalization(c, scale, shift, mean, var)
            },
            else_branch = else_graph () => (float[1,2,4,4] else_y) { else_y = Relu(x) }
        >""",
    )
    feeds = [{**IMAGE, "condition": np.array(value)} for value in (True, False)]
    before = [run_model(kept, feed) for feed in feeds]
    result = fold_batchnorms(kept)
    assert result.refused == {"the Conv is in an enclosing graph": 1}
    for feed, expected in zip(feeds, before, strict=True):
        assert_outputs_close(run_model(kept, feed), expected)
