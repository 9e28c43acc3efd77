from __future__ import annotations

import numpy as np
import onnx_ir as ir

from onnxopt.runtime import ProbeSession, create_session, random_feeds
from tests.builders import classifier_proto


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
