from __future__ import annotations

import os
import sys

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from onnxopt import runtime
from onnxopt.io import load
from onnxopt.runtime import (
    ProbeSession,
    SerializedModel,
    concurrently,
    create_session,
    memory_headroom,
    random_feeds,
    run,
    sample_session,
)
from tests.builders import classifier_proto, external_data_classifier


def test_probe_session_returns_named_inner_values_and_fed_inputs_without_touching_the_model():
    model = ir.from_proto(classifier_proto())
    outputs_before = [value.name for value in model.graph.outputs]
    probe = ProbeSession(model, ["conv", "relu", "x", "logits", "no-such-value"])
    assert probe.fed == ["x"] and probe.fetched == ["conv", "relu", "logits"]
    assert probe.output_names == ["logits"]
    [feed] = random_feeds(model, 1)
    arrays = probe.run(feed)
    assert set(arrays) == {"conv", "relu", "logits", "x"}
    assert np.array_equal(arrays["x"], feed["x"])
    assert np.all(arrays["relu"] >= 0) and arrays["conv"].shape == (1, 4, 8, 8)
    assert set(probe.run(feed, ["relu"])) == {"relu", "x"}
    assert [value.name for value in model.graph.outputs] == outputs_before


def test_probe_sessions_return_memory_between_runs_and_plain_ones_keep_their_arena():
    """A probe's runs hold every tensor it exposes: an arena would keep the largest for good."""
    model = ir.from_proto(classifier_proto())
    assert not ProbeSession(model, ["conv"]).session.get_session_options().enable_cpu_mem_arena
    assert create_session(model).get_session_options().enable_cpu_mem_arena


def test_probe_sessions_of_a_model_written_once_see_what_plain_ones_see():
    """Probes that share one written copy of the model (weights written once) return the same
    values as probes of their own, each exposing other tensors, and the files go on close."""
    model = ir.from_proto(classifier_proto())
    [feed] = random_feeds(model, 1)
    with SerializedModel(model) as written:
        folder = written._folder.name
        for names in (["conv"], ["relu", "logits"], ["x", "conv", "relu"]):
            shared = ProbeSession(written, names, threads=1).run(feed)
            alone = ProbeSession(model, names).run(feed)
            assert shared.keys() == alone.keys()
            for name in shared:
                np.testing.assert_allclose(shared[name], alone[name], rtol=1e-6)
        assert os.path.isdir(folder)
    assert not os.path.exists(folder)
    assert [value.name for value in model.graph.outputs] == ["logits"]


def test_samples_run_one_per_core_in_order():
    model = ir.from_proto(classifier_proto())
    feeds = random_feeds(model, 5, seed=3)
    session = sample_session(model)
    assert session.get_session_options().intra_op_num_threads == 1
    together = run(session, feeds)
    for feed, outputs in zip(feeds, together, strict=True):
        np.testing.assert_array_equal(outputs[0], session.run(None, feed)[0])
    assert concurrently(lambda value: value * 2, range(7)) == [0, 2, 4, 6, 8, 10, 12]


def test_pruned_probe_sessions_run_only_the_nodes_their_values_need():
    """A probe of an early tensor leaves out what comes after it, in a model written once and
    in a copy, and returns the same values as an unpruned probe."""
    model = ir.from_proto(classifier_proto())
    [feed] = random_feeds(model, 1)
    full = ProbeSession(model, ["conv", "relu"]).run(feed)
    with SerializedModel(model) as written:
        path = written.with_outputs([model.graph.node(0).outputs[0]], prune=True)
        pruned_graph = onnx.load(path, load_external_data=False).graph
        assert [node.op_type for node in pruned_graph.node] == [model.graph.node(0).op_type]
        assert [output.name for output in pruned_graph.output] == ["conv"]
        for probe in (
            ProbeSession(written, ["conv", "relu"], threads=1, prune=True),
            ProbeSession(model, ["conv", "relu"], prune=True),
        ):
            assert probe.output_names == [] and probe.fetched == ["conv", "relu"]
            arrays = probe.run(feed)
            assert set(arrays) == {"conv", "relu"}
            for name in arrays:
                np.testing.assert_allclose(arrays[name], full[name], rtol=1e-6)
        inputs_only = ProbeSession(written, ["x"], prune=True)
        assert inputs_only.session is None
        assert inputs_only.run(feed).keys() == {"x"}
    assert [value.name for value in model.graph.outputs] == ["logits"]
    assert len(model.graph) == len(ir.from_proto(classifier_proto()).graph)


def test_pruning_keeps_the_nodes_a_subgraph_reads_from_the_outer_graph():
    """An If whose branches read an outer value keeps that value's producer."""
    then_branch = onnx.helper.make_graph(
        [onnx.helper.make_node("Identity", ["doubled"], ["then_out"])],
        "then",
        [],
        [onnx.helper.make_tensor_value_info("then_out", onnx.TensorProto.FLOAT, [2])],
    )
    else_branch = onnx.helper.make_graph(
        [onnx.helper.make_node("Neg", ["doubled"], ["else_out"])],
        "else",
        [],
        [onnx.helper.make_tensor_value_info("else_out", onnx.TensorProto.FLOAT, [2])],
    )
    graph = onnx.helper.make_graph(
        [
            onnx.helper.make_node("Add", ["x", "x"], ["doubled"]),
            onnx.helper.make_node("Exp", ["x"], ["unused"]),
            onnx.helper.make_node(
                "If", ["flag"], ["chosen"], then_branch=then_branch, else_branch=else_branch
            ),
        ],
        "g",
        [
            onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2]),
            onnx.helper.make_tensor_value_info("flag", onnx.TensorProto.BOOL, []),
        ],
        [onnx.helper.make_tensor_value_info("unused", onnx.TensorProto.FLOAT, [2])],
    )
    model = ir.from_proto(
        onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
    )
    feed = {"x": np.array([1.0, 2.0], np.float32), "flag": np.array(False)}
    with SerializedModel(model) as written:
        arrays = ProbeSession(written, ["chosen"], prune=True).run(feed)
        path = written.with_outputs([model.graph.node(2).outputs[0]], prune=True)
        kept = [node.op_type for node in onnx.load(path, load_external_data=False).graph.node]
    assert kept == ["Add", "If"]
    np.testing.assert_array_equal(arrays["chosen"], [-2.0, -4.0])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="measured from /proc on Linux")
def test_memory_headroom_counts_memory_freed_below_the_peak():
    block = np.ones(2**24)  # 128 MB, written, so resident
    del block
    assert memory_headroom() >= 100 * 2**20


def test_a_session_reads_weights_still_on_disk_from_their_files(tmp_path, monkeypatch):
    model = load(external_data_classifier(tmp_path / "m.onnx"))
    session = runtime.create_session(model)
    weights = [value.const_value for value in model.graph.initializers.values()]
    assert all(isinstance(tensor, ir.ExternalTensor) and tensor.raw is None for tensor in weights)
    feed = {"x": np.random.default_rng(0).standard_normal((1, 3, 8, 8)).astype(np.float32)}
    expected = runtime.create_session(tmp_path / "m.onnx").run(None, feed)
    np.testing.assert_array_equal(session.run(None, feed)[0], expected[0])
    # Weights changed in memory reach the session, inline when small and handed over as
    # arrays when large; the rest stay on disk.
    monkeypatch.setattr(runtime, "HANDED_WEIGHT_BYTES", 64)
    bias, weight = model.graph.initializers["conv.bias"], model.graph.initializers["conv.weight"]
    bias.const_value = ir.tensor(bias.const_value.numpy() + 1.0, name="conv.bias")
    weight.const_value = ir.tensor(-weight.const_value.numpy(), name="conv.weight")
    assert bias.const_value.nbytes < 64 <= weight.const_value.nbytes
    ir.save(model, tmp_path / "changed.onnx", external_data="changed.onnx.data")
    expected = runtime.create_session(tmp_path / "changed.onnx").run(None, feed)[0]
    changed = runtime.create_session(model)
    assert changed in runtime._HANDED_WEIGHTS
    assert not isinstance(weight.const_value, ir.ExternalTensor)
    np.testing.assert_array_equal(changed.run(None, feed)[0], expected)
    assert not np.allclose(expected, session.run(None, feed)[0])
