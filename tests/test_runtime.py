from __future__ import annotations

import numpy as np
import onnx_ir as ir

from onnxopt.runtime import ProbeSession, random_feeds
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
