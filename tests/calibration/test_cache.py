from __future__ import annotations

import logging

import numpy as np
import onnx_ir as ir
import pytest

from onnxopt.calibration.cache import (
    data_fingerprint,
    load_cache,
    model_fingerprint,
    save_cache,
)
from onnxopt.calibration.collectors import TensorStatistics
from onnxopt.data import open_data
from onnxopt.errors import InputError
from tests.builders import classifier_proto


def some_statistics() -> dict[str, TensorStatistics]:
    rng = np.random.default_rng(0)
    first, second = TensorStatistics(), TensorStatistics()
    first.update(rng.standard_normal((4, 3, 5)).astype(np.float32), per_sample=True)
    second.update(np.array([1.0, np.inf], dtype=np.float32))
    return {"conv": first, "logits": second}


def test_round_trip_is_exact(tmp_path):
    path = tmp_path / "calibration.json"
    statistics = some_statistics()
    save_cache(path, statistics, "abc", samples=4)
    cached = load_cache(path, "abc")
    assert cached.samples == 4
    assert {name: value.to_dict() for name, value in cached.statistics.items()} == {
        name: value.to_dict() for name, value in statistics.items()
    }
    assert [file.name for file in tmp_path.iterdir()] == ["calibration.json"]


def test_unwritable_cache_is_an_input_error(tmp_path):
    with pytest.raises(InputError, match="cannot be written"):
        save_cache(tmp_path / "missing" / "calibration.json", some_statistics(), "abc", samples=1)


def test_missing_cache_is_none(tmp_path):
    assert load_cache(tmp_path / "none.json", "abc") is None


def test_cache_of_another_fingerprint_is_ignored_with_a_warning(tmp_path, caplog):
    path = tmp_path / "calibration.json"
    save_cache(path, some_statistics(), "abc", samples=4)
    with caplog.at_level(logging.WARNING):
        assert load_cache(path, "def") is None
    assert "another model, data or settings" in caplog.text


@pytest.mark.parametrize(
    "content",
    [
        "{not json",
        '{"format": 1}',
        '{"format": 99, "fingerprint": "abc"}',
        '{"format": 1, "fingerprint": "abc", "samples": 1, "tensors": {"x": {}}}',
    ],
    ids=["not json", "no fingerprint", "other format", "bad tensor"],
)
def test_corrupt_cache_is_an_input_error_naming_the_file(tmp_path, content):
    path = tmp_path / "calibration.json"
    path.write_text(content)
    with pytest.raises(InputError) as error:
        load_cache(path, "abc")
    assert str(path) in error.value.message
    assert "delete" in error.value.fix


def test_fingerprint_follows_weights_graph_and_settings():
    model = ir.from_proto(classifier_proto())
    fingerprint = model_fingerprint(model, {"samples": 8})
    assert model_fingerprint(ir.from_proto(classifier_proto()), {"samples": 8}) == fingerprint
    assert model_fingerprint(model, {"samples": 9}) != fingerprint
    assert model_fingerprint(ir.from_proto(classifier_proto(seed=1)), {"samples": 8}) != fingerprint
    model.graph.node(2).op_type = "Sigmoid"
    assert model_fingerprint(model, {"samples": 8}) != fingerprint


def test_large_initializers_are_hashed_by_their_ends(monkeypatch):
    monkeypatch.setattr("onnxopt.calibration.cache.FULL_HASH_BYTES", 16)
    model = ir.from_proto(classifier_proto())
    fingerprint = model_fingerprint(model)
    weight = model.graph.initializers["conv.weight"]
    values = weight.const_value.numpy().copy()
    values.reshape(-1)[-1] += 1
    weight.const_value = ir.tensor(values, name="conv.weight")
    assert model_fingerprint(model) != fingerprint


def test_data_fingerprint_tells_datasets_apart():
    model = ir.from_proto(classifier_proto())

    def data(seed: int):
        rng = np.random.default_rng(seed)
        feeds = [{"x": rng.standard_normal((1, 3, 8, 8)).astype(np.float32)} for _ in range(3)]
        return open_data(feeds, model)

    assert data_fingerprint(data(0)) == data_fingerprint(data(0))
    assert data_fingerprint(data(0)) != data_fingerprint(data(1))
