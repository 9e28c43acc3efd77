from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Callable, Iterator

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from rich.console import Console

from onnxopt.compare import compare_models, render_comparison
from onnxopt.errors import InputError
from onnxopt.metrics import class_score_outputs, compare_outputs
from onnxopt.progress import Progress
from onnxopt.runtime import random_feeds
from tests.builders import classifier_proto

SHIFT_TEXT = """
<ir_version: 8, opset_import: ["" : 17]>
shift (float[2, 4] x) => (float[2, 4] y) <float[4] offset = {{0, 0, {shift}, 0}}> {{
    y = Add(x, offset)
}}
"""

RENAMED_TEXT = """
<ir_version: 8, opset_import: ["" : 17]>
renamed (float[2, 4] pixels) => (float[2, 4] scores) {
    scores = Relu(pixels)
}
"""


def shift_model(shift: float) -> ir.Model:
    return ir.from_proto(onnx.parser.parse_model(SHIFT_TEXT.format(shift=shift)))


def test_identical_models_agree_exactly():
    model = shift_model(0.0)

    comparison = compare_models(
        model, shift_model(0.0), random_feeds(model, 3), latency_runs=3, warmup=1
    )

    [output] = comparison.outputs
    assert output.name == "y"
    assert output.max_abs_error == 0.0
    assert output.cosine == pytest.approx(1.0)
    assert math.isinf(output.sqnr_db)
    assert comparison.samples == 3
    assert comparison.latency_a.runs == comparison.latency_b.runs == 3
    assert comparison.speedup > 0


def test_perturbed_model_shows_its_error():
    model = shift_model(0.0)

    comparison = compare_models(model, shift_model(0.5), random_feeds(model, 2), latency_runs=0)

    [output] = comparison.outputs
    assert output.max_abs_error == pytest.approx(0.5, rel=1e-6)
    assert output.cosine < 1.0
    assert comparison.latency_a is None
    assert comparison.speedup is None


def test_as_dict_is_json_with_infinities_as_strings():
    model = shift_model(0.0)
    comparison = compare_models(model, model, random_feeds(model, 1), latency_runs=2, warmup=0)

    data = json.loads(json.dumps(comparison.as_dict(), allow_nan=False))

    assert data["outputs"][0]["sqnr_db"] == "inf"
    assert data["outputs"][0]["max_abs_error"] == 0.0
    assert isinstance(data["speedup"], float)
    assert set(data["latency_a"]) == {"runs", "median_ms", "p90_ms", "min_ms"}


def test_mismatched_names_are_an_input_error():
    renamed = ir.from_proto(onnx.parser.parse_model(RENAMED_TEXT))

    with pytest.raises(InputError) as caught:
        compare_models(shift_model(0.0), renamed, random_feeds(renamed, 1), latency_runs=0)

    message = str(caught.value)
    assert "inputs only in A: x" in message
    assert "inputs only in B: pixels" in message
    assert "outputs only in B: scores" in message
    assert "fix:" in message


def test_sample_without_a_model_input_is_an_input_error():
    model = shift_model(0.0)

    with pytest.raises(InputError, match="no array for model input 'x'"):
        compare_models(model, model, [{"pixels": np.zeros((2, 4), np.float32)}], latency_runs=0)


class RecordingProgress(Progress):
    """Keeps every task's steps instead of drawing bars."""

    def __init__(self):
        super().__init__(enabled=False)
        self.steps: dict[str, list[int]] = {}

    @contextlib.contextmanager
    def task(self, description: str, total: int | None = None) -> Iterator[Callable[[int], None]]:
        self.steps[description] = [total, 0]

        def advance(steps: int = 1) -> None:
            self.steps[description][1] += steps

        yield advance


def test_progress_sees_every_step_of_both_stages():
    model = shift_model(0.0)
    progress = RecordingProgress()

    compare_models(
        model, model, random_feeds(model, 2), latency_runs=3, warmup=1, progress=progress
    )

    assert progress.steps == {"comparing outputs": [2, 2], "timing": [4, 4]}


def test_render_comparison_shows_fidelity_and_latency():
    model = shift_model(0.0)
    comparison = compare_models(
        model, shift_model(0.5), random_feeds(model, 2), latency_runs=2, warmup=0
    )
    console = Console(record=True, width=120)

    render_comparison(comparison, console, labels=("original", "optimized"))

    text = console.export_text()
    for expected in (
        "fidelity of optimized against original",
        "0.5",
        "median",
        "speedup of optimized",
    ):
        assert expected in text


CLASSIFIER_AND_EMBEDDING = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[N, 4] x) => (float[N, 3] logits, float[N, 3] probabilities, float[N, 4] embedding,
                      float[N, 2, 3] per_step) <float[4, 3] w = {1,0,0, 0,1,0, 0,0,1, 1,1,1},
                      float[3] b = {0.1, 0.2, 0.3}, int64[3] steps = {-1, 2, 3}> {
    product = MatMul(x, w)
    logits = Add(product, b)
    probabilities = Softmax<axis = -1>(logits)
    norm = ReduceL2<keepdims = 1>(x)
    embedding = Div(x, norm)
    flat = Concat<axis = 1>(logits, logits)
    per_step = Reshape(flat, steps)
}
"""


def test_class_scores_are_told_apart_from_embeddings_by_the_graph():
    model = ir.from_proto(onnx.parser.parse_model(CLASSIFIER_AND_EMBEDDING))
    assert class_score_outputs(model) == {"logits", "probabilities"}
    scores = [np.array([[0.0, 1.0, 0.5]]), np.array([[0.0, 1.0]])]
    flipped = [np.array([[1.0, 0.0, 0.5]]), np.array([[1.0, 0.0]])]
    fidelity = compare_outputs(
        ["logits", "embedding"], [scores], [flipped], class_outputs={"logits"}
    )
    assert fidelity[0].top1_agreement == 0.0 and fidelity[1].top1_agreement is None


SEQUENCE_HEADS = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[N, 5, 4] x, float[N, 4, 5] signal) => (float[N, 5, 3] per_step, float[N, 3, 5] per_sample)
    <float[4, 3] w = {1,0,0, 0,1,0, 0,0,1, 1,1,1}, float[3] b = {0.1, 0.2, 0.3},
     float[3, 4, 1] kernel = {1,0,0,0, 0,1,0,0, 0,0,1,1}> {
    product = MatMul(x, w)
    per_step = Add(product, b)
    per_sample = Conv(signal, kernel)
}
"""


def test_a_sequence_of_class_scores_is_told_apart_from_a_convolution_over_time():
    # [N, steps, classes] from a MatMul head: each step's top class is a decision (a CTC
    # recognizer's characters). A 1-D Conv's [N, classes, steps] has its classes on axis 1.
    model = ir.from_proto(onnx.parser.parse_model(SEQUENCE_HEADS))
    assert class_score_outputs(model) == {"per_step"}


TRANSPOSED_HEADS = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[N, 4, 5] signal, float[5, N, 4] x) => (float[N, 5, 3] per_step, float[5, N, 3] ctc,
                                               float[N, 3, 5] per_channel)
    <float[3, 4, 1] kernel = {1,0,0,0, 0,1,0,0, 0,0,1,1}, float[4, 3] w = {1,0,0, 0,1,0, 0,0,1, 1,1,1}> {
    features = Conv(signal, kernel)
    probabilities = Softmax<axis = 1>(features)
    per_step = Transpose<perm = [0, 2, 1]>(probabilities)
    product = MatMul(x, w)
    bias = Constant<value = float[3] {0.1, 0.2, 0.3}>()
    ctc = Add(product, bias)
    steps_first = Transpose<perm = [0, 2, 1]>(per_step)
    per_channel = Identity(steps_first)
}
"""


def test_classes_are_followed_through_transposes_and_constant_nodes():
    # A 1-D Conv's classes (axis 1), put last by a Transpose, are a sequence of class scores
    # (slovorez's morpheme tagger); moved back to axis 1 they are not. A bias from a Constant
    # node, as torch's exporter writes it, still makes a classifier head (a CRNN's CTC scores).
    model = ir.from_proto(onnx.parser.parse_model(TRANSPOSED_HEADS))
    assert class_score_outputs(model) == {"per_step", "ctc"}


@pytest.mark.parametrize(("round_seconds", "warmups"), [(1.0, 1), (0.01, 3)])
def test_timing_warms_a_slow_model_up_once_and_a_fast_one_fully(
    round_seconds, warmups, monkeypatch
):
    """No clock is read for real: a fake one advances by each round's time."""
    from onnxopt import compare

    clock, calls = [0.0], []

    def interleaved(session_a, session_b, samples, runs, warmup, advance):
        calls.append((runs, warmup))
        clock[0] += round_seconds * (runs + warmup)
        return [round_seconds] * runs, [round_seconds / 2] * runs

    monkeypatch.setattr(compare, "_time_interleaved", interleaved)
    monkeypatch.setattr(compare.time, "perf_counter", lambda: clock[0])
    model = ir.from_proto(classifier_proto())
    [feed] = random_feeds(model, 1)
    timing = compare.time_models(model, model, feed, seconds=0.5, runs=(5, 200), warmup=3)
    assert calls[:-1] == [(0, 1)] * warmups
    assert calls[-1] == (max(5, int(0.5 / round_seconds)), 0)
    assert timing.speedup == pytest.approx(2.0)
