from __future__ import annotations

import tracemalloc

import numpy as np
import onnx_ir as ir
import pytest

from onnxopt.calibration import collect
from onnxopt.calibration.collect import collect_statistics
from onnxopt.calibration.ranges import METHODS, compute_range
from tests.builders import classifier_proto
from tests.helpers import model_from_text

ELEMENTWISE = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[N,4] x) => (float[N,4] y) <float[4] scale = {1.0, -2.0, 0.5, 3.0}> {
    m = Mul(x, scale)
    r = Relu(m)
    y = Add(r, x)
}
"""

# Sums the whole batch: a batch of samples gives other outputs than each sample alone.
MIXES_SAMPLES = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[N,4] x) => (float[N,4] y) <int64[2] flat = {1, -1}, int64[1] axis = {1}> {
    f = Reshape(x, flat)
    s = ReduceSum<keepdims = 1>(f, axis)
    y = Mul(x, s)
}
"""

# Sums along axis 0 as if it were time: a batch's first sample comes out right, its last does not.
RUNS_ALONG_AXIS_0 = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[T,4] x) => (float[T,4] y) <int64 axis = {0}> {
    y = CumSum(x, axis)
}
"""

# Reshapes to a fixed batch of 1: a batch of samples fails.
FIXED_BATCH = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[N,4] x) => (float[1,4] y) <int64[2] shape = {1, 4}> {
    y = Reshape(x, shape)
}
"""

WITH_INTEGERS = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[N,4] x) => (float[N,4] y, int64[2] s) {
    y = Relu(x)
    s = Shape(x)
}
"""

DIVIDES_BY_ZERO = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[N,4] x) => (float[N,4] y) <float[4] zero = {0.0, 1.0, 0.0, 1.0}> {
    y = Div(x, zero)
}
"""

SEQUENCE = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[N,S] x) => (float[N,S] y) {
    y = Sigmoid(x)
}
"""


def samples(count: int, shape: tuple[int, ...] = (1, 4), seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal(shape).astype(np.float32)} for _ in range(count)]


def as_dicts(statistics: dict) -> dict:
    return {name: value.to_dict() for name, value in statistics.items()}


def without_channel_sums(statistics: dict) -> dict:
    return {name: {**value, "channel_sums": None} for name, value in as_dicts(statistics).items()}


def test_collects_every_float_activation_and_leaves_the_model_untouched():
    model = model_from_text(ELEMENTWISE)
    before = ir.serde.serialize_model(model).SerializeToString()
    statistics = collect_statistics(model, None, samples(3))
    assert sorted(statistics) == ["m", "r", "x", "y"]
    assert ir.serde.serialize_model(model).SerializeToString() == before
    assert statistics["r"].minimum == 0.0 and statistics["x"].count == 12


def test_integer_tensors_are_not_collected():
    statistics = collect_statistics(model_from_text(WITH_INTEGERS), None, samples(2))
    assert sorted(statistics) == ["x", "y"]


def test_named_tensors_only_and_unknown_names_refused():
    model = model_from_text(ELEMENTWISE)
    assert sorted(collect_statistics(model, ["r", "x"], samples(2))) == ["r", "x"]
    with pytest.raises(ValueError, match="'nope'"):
        collect_statistics(model, ["nope"], samples(1))


def test_batches_give_the_statistics_of_single_runs():
    model = model_from_text(ELEMENTWISE)
    data = samples(10)
    batched = collect_statistics(model, None, data, batch_size=4)
    single = collect_statistics(model, None, data, batch_size=1)
    assert without_channel_sums(batched) == without_channel_sums(single)
    for name, value in batched.items():
        if value.channel_means("axis1") is not None:
            np.testing.assert_allclose(
                value.channel_means("axis1"), single[name].channel_means("axis1"), rtol=1e-6
            )


def test_folding_while_the_next_batch_runs_gives_the_same_statistics(monkeypatch):
    """Small batches are folded while onnxruntime runs the next; large ones one after the
    other. Which one happens must not change a single count."""
    model = model_from_text(ELEMENTWISE)
    data = samples(10)
    in_turn = []
    original = collect._Collector.collect
    monkeypatch.setattr(
        collect._Collector,
        "collect",
        lambda self, group: in_turn.append(len(group)) or original(self, group),
    )
    overlapped = collect_statistics(model, None, data, batch_size=1)
    assert in_turn == [1]  # the first sample alone, to size batches; the rest overlapped
    monkeypatch.setattr(collect, "OVERLAP_MAX_BYTES", 0)
    sequential = collect_statistics(model, None, data, batch_size=1)
    assert in_turn == [1] * 11
    assert without_channel_sums(overlapped) == without_channel_sums(sequential)
    assert overlapped.keys() == sequential.keys() and len(overlapped) > 1


def test_batched_classifier_ranges_match_single_runs():
    model = ir.from_proto(classifier_proto())
    data = samples(6, (1, 3, 8, 8))
    batched = collect_statistics(model, None, data, batch_size=4)
    single = collect_statistics(model, None, data, batch_size=1)
    assert batched.keys() == single.keys()
    for name in single:
        for method in METHODS:
            np.testing.assert_allclose(
                compute_range(batched[name], method),
                compute_range(single[name], method),
                rtol=1e-4,
                atol=1e-4,
            )


def test_statistics_of_two_halves_merge_into_those_of_all_samples():
    model = ir.from_proto(classifier_proto())
    data = samples(8, (1, 3, 8, 8))
    whole = collect_statistics(model, None, data, batch_size=1)
    first = collect_statistics(model, None, data[:3], batch_size=1)
    for name, value in collect_statistics(model, None, data[3:], batch_size=1).items():
        first[name].merge(value)
    assert as_dicts(first) == as_dicts(whole)
    for name, value in whole.items():
        for method in METHODS:
            assert compute_range(first[name], method) == compute_range(value, method)
        if value.channel_means("last_axis") is not None:
            np.testing.assert_allclose(
                first[name].channel_means("last_axis"), value.channel_means("last_axis"), rtol=1e-9
            )


def test_channel_means_are_kept_only_where_bias_correction_reads_them():
    """Bias correction reads the means of what feeds Conv along its channels, and of what feeds
    Gemm and MatMul along their features; nothing else does."""
    model = ir.from_proto(classifier_proto())
    statistics = collect_statistics(model, None, samples(4, (1, 3, 8, 8)), batch_size=1)

    def with_means(axis):
        return {name for name, value in statistics.items() if value.channel_means(axis) is not None}

    assert with_means("axis1") == {"x"}
    assert with_means("last_axis") == {"flat"}


@pytest.mark.parametrize(
    "text",
    [MIXES_SAMPLES, RUNS_ALONG_AXIS_0, FIXED_BATCH],
    ids=["mixes", "axis 0 is time", "fails"],
)
def test_models_that_cannot_batch_run_one_sample_at_a_time(text, caplog):
    model = model_from_text(text)
    data = samples(5)
    with caplog.at_level("INFO", logger="onnxopt.calibration.collect"):
        batched = collect_statistics(model, None, data, batch_size=4)
    assert "running one sample at a time" in caplog.text
    assert as_dicts(batched) == as_dicts(collect_statistics(model, None, data, batch_size=1))


def test_samples_of_different_shapes_run_in_separate_batches():
    model = model_from_text(SEQUENCE)
    data = samples(3, (1, 5)) + samples(2, (1, 7)) + samples(3, (1, 5), seed=1)
    batched = collect_statistics(model, None, data, batch_size=8)
    single = collect_statistics(model, None, data, batch_size=1)
    assert without_channel_sums(batched) == without_channel_sums(single)
    assert batched["y"].channel_means("last_axis") is None  # the sequence length varies


def test_progress_advances_per_sample_and_max_samples_limits_reading():
    pulled = []

    def feeds():
        for index, feed in enumerate(samples(20)):
            pulled.append(index)
            yield feed

    steps = []
    collect_statistics(
        model_from_text(ELEMENTWISE),
        None,
        feeds(),
        batch_size=4,
        max_samples=10,
        progress=steps.append,
    )
    assert sum(steps) == 10 and max(steps) == 4
    assert pulled == list(range(10))


def test_memory_does_not_grow_with_the_number_of_samples():
    model = ir.from_proto(classifier_proto())

    def peak_bytes(count: int) -> int:
        rng = np.random.default_rng(0)
        feeds = ({"x": rng.standard_normal((1, 3, 8, 8)).astype(np.float32)} for _ in range(count))
        tracemalloc.start()
        statistics = collect_statistics(model, None, feeds, batch_size=4)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert statistics["x"].sample_count == count
        return peak

    peak_bytes(8)  # warm up imports and caches
    assert peak_bytes(200) < peak_bytes(8) * 1.2 + 64 * 1024


def test_a_model_that_produces_inf_is_collected_not_refused():
    statistics = collect_statistics(model_from_text(DIVIDES_BY_ZERO), None, samples(3))
    assert statistics["y"].nonfinite_count == 6
    assert statistics["y"].count == 6


def test_batches_are_cut_to_fit_the_memory_budget(monkeypatch):
    monkeypatch.setattr("onnxopt.calibration.collect.MAX_BATCH_BYTES", 3 * 4 * 4 * 4)
    steps = []
    collect_statistics(
        model_from_text(ELEMENTWISE), None, samples(8), batch_size=8, progress=steps.append
    )
    assert steps == [1, 3, 3, 1]
