from __future__ import annotations

import numpy as np
import pytest

from onnxopt.passes.fold_batchnorm import FoldBatchNormPass
from tests.helpers import assert_outputs_close, count_ops, model_from_text, run_model

IMAGE = {"x": np.random.default_rng(0).standard_normal((1, 2, 4, 4)).astype(np.float32)}
ROWS = {"x": np.random.default_rng(1).standard_normal((3, 2)).astype(np.float32)}
PARAMETERS = (
    "float[2] scale = {1.5, 0.5}, float[2] shift = {0.1, -0.2}, "
    "float[2] mean = {0.3, -0.1}, float[2] var = {2.0, 0.5}"
)
FOUR_PARAMETERS = (
    "float[4] scale = {1.5, 0.5, 1.0, 2.0}, float[4] shift = {0.1, -0.2, 0.0, 1.0}, "
    "float[4] mean = {0.3, -0.1, 0.0, 1.0}, float[4] var = {2.0, 0.5, 1.0, 3.0}"
)
WEIGHTS = "float[2,2,1,1] w = {1.0, 2.0, 3.0, -4.0}, float[2] bias = {0.5, -1.0}"


def graph_text(inputs: str, outputs: str, initializers: str, body: str, opset: int = 17) -> str:
    return f"""
<ir_version: 8, opset_import: ["" : {opset}]>
g ({inputs}) => ({outputs}) <{initializers}> {{
    {body}
}}
"""


FOLDABLE = {
    "conv": (
        graph_text(
            "float[1,2,4,4] x",
            "float[1,2,4,4] y",
            f"{WEIGHTS}, {PARAMETERS}",
            "c = Conv(x, w, bias)  y = BatchNormalization<epsilon = 0.001>(c, scale, shift, mean, var)",
        ),
        IMAGE,
        {"Conv": 1},
    ),
    "conv without bias": (
        graph_text(
            "float[1,2,4,4] x",
            "float[1,2,4,4] y",
            f"float[2,2,1,1] w = {{1.0, 2.0, 3.0, -4.0}}, {PARAMETERS}",
            "c = Conv(x, w)  y = BatchNormalization(c, scale, shift, mean, var)",
        ),
        IMAGE,
        {"Conv": 1},
    ),
    "grouped conv transpose": (
        graph_text(
            "float[1,2,4,4] x",
            "float[1,4,4,4] y",
            f"float[2,2,1,1] w = {{1.0, 2.0, 3.0, -4.0}}, {FOUR_PARAMETERS}",
            "c = ConvTranspose<group = 2>(x, w)  y = BatchNormalization(c, scale, shift, mean, var)",
        ),
        IMAGE,
        {"ConvTranspose": 1},
    ),
    "gemm with alpha, beta and transB": (
        graph_text(
            "float[3,2] x",
            "float[3,2] y",
            f"{WEIGHTS}, {PARAMETERS}".replace("float[2,2,1,1]", "float[2,2]"),
            "c = Gemm<alpha = 2.0, beta = 0.5, transB = 1>(x, w, bias)  y = BatchNormalization(c, scale, shift, mean, var)",
        ),
        ROWS,
        {"Gemm": 1},
    ),
}


@pytest.mark.parametrize("case", FOLDABLE, ids=list(FOLDABLE))
def test_fold_batchnorm_folds_into_producer_and_keeps_outputs(case):
    text, feeds, expected_ops = FOLDABLE[case]
    folded = model_from_text(text)
    before = run_model(folded, feeds)
    result = FoldBatchNormPass()(folded)
    assert result.changes == 1
    assert count_ops(folded) == expected_ops
    assert not {"scale", "shift", "mean", "var"} & set(folded.graph.initializers)
    assert_outputs_close(run_model(folded, feeds), before)


def test_fold_batchnorm_folds_inside_if_branches():
    folded = model_from_text(
        graph_text(
            "float[1,2,4,4] x, bool condition",
            "float[1,2,4,4] y",
            f"{WEIGHTS}, {PARAMETERS}",
            """y = If(condition) <
        then_branch = then_graph () => (float[1,2,4,4] then_y) {
            c = Conv(x, w, bias)  then_y = BatchNormalization(c, scale, shift, mean, var)
        },
        else_branch = else_graph () => (float[1,2,4,4] else_y) { else_y = Relu(x) }
    >""",
        )
    )
    feeds = [{**IMAGE, "condition": np.array(value)} for value in (True, False)]
    before = [run_model(folded, feed) for feed in feeds]
    FoldBatchNormPass()(folded)
    assert count_ops(folded) == {"If": 1, "Conv": 1, "Relu": 1}
    assert not folded.graph.initializers
    for feed, expected in zip(feeds, before, strict=True):
        assert_outputs_close(run_model(folded, feed), expected)


REFUSED = {
    "conv output has another consumer": (
        graph_text(
            "float[1,2,4,4] x",
            "float[1,2,4,4] y, float[1,2,4,4] z",
            f"{WEIGHTS}, {PARAMETERS}",
            "c = Conv(x, w, bias)  y = BatchNormalization(c, scale, shift, mean, var)  z = Relu(c)",
        ),
        IMAGE,
    ),
    "conv output is a graph output": (
        graph_text(
            "float[1,2,4,4] x",
            "float[1,2,4,4] y, float[1,2,4,4] c",
            f"{WEIGHTS}, {PARAMETERS}",
            "c = Conv(x, w, bias)  y = BatchNormalization(c, scale, shift, mean, var)",
        ),
        IMAGE,
    ),
    "weights shared with another conv": (
        graph_text(
            "float[1,2,4,4] x",
            "float[1,2,4,4] y, float[1,2,4,4] z",
            f"{WEIGHTS}, {PARAMETERS}",
            "c = Conv(x, w, bias)  y = BatchNormalization(c, scale, shift, mean, var)  z = Conv(x, w)",
        ),
        IMAGE,
    ),
    "weights are a graph input": (
        graph_text(
            "float[1,2,4,4] x, float[2,2,1,1] w",
            "float[1,2,4,4] y",
            PARAMETERS,
            "c = Conv(x, w)  y = BatchNormalization(c, scale, shift, mean, var)",
        ),
        {**IMAGE, "w": np.ones((2, 2, 1, 1), dtype=np.float32)},
    ),
    "training mode": (
        graph_text(
            "float[1,2,4,4] x",
            "float[1,2,4,4] y",
            f"{WEIGHTS}, {PARAMETERS}",
            "c = Conv(x, w, bias)  y, running_mean, running_var = BatchNormalization<training_mode = 1>(c, scale, shift, mean, var)",
        ),
        IMAGE,
    ),
    "float16 weights with float parameters": (
        # float16 values are written as their bits: 1.0, 2.0, 0.5, -1.0.
        graph_text(
            "float16[1,2,4,4] x",
            "float16[1,2,4,4] y",
            f"float16[2,2,1,1] w = {{15360, 16384, 14336, 48128}}, {PARAMETERS}",
            "c = Conv(x, w)  y = BatchNormalization(c, scale, shift, mean, var)",
        ),
        {"x": IMAGE["x"].astype(np.float16)},
    ),
    "parameters per activation (spatial = 0)": (
        graph_text(
            "float[1,2,1,2] x",
            "float[1,2,1,2] y",
            "float[2,2,1,1] w = {1.0, 2.0, 3.0, -4.0}, float[2,1,2] scale = {1.5, 0.5, 1.0, 2.0}, "
            "float[2,1,2] shift = {0.1, -0.2, 0.0, 1.0}, float[2,1,2] mean = {0.3, -0.1, 0.0, 1.0}, "
            "float[2,1,2] var = {2.0, 0.5, 1.0, 3.0}",
            "c = Conv(x, w)  y = BatchNormalization<spatial = 0>(c, scale, shift, mean, var)",
            opset=8,
        ),
        {"x": IMAGE["x"][:, :, :1, :2].copy()},
    ),
}


@pytest.mark.parametrize("case", REFUSED, ids=list(REFUSED))
def test_fold_batchnorm_refuses_unsafe_folds(case):
    text, feeds = REFUSED[case]
    refused = model_from_text(text)
    ops = count_ops(refused)
    before = run_model(refused, feeds)
    result = FoldBatchNormPass()(refused)
    assert result.changes == 0
    assert count_ops(refused) == ops
    assert_outputs_close(run_model(refused, feeds), before)
