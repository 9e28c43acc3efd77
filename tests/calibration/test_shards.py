"""Statistics collected by several processes equal one process's, bit for bit."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

from onnxopt.calibration.collect import collect_statistics
from onnxopt.calibration.shards import _parts, collect_sharded
from onnxopt.data import open_data
from tests.builders import classifier_proto

COUNT = 21


def as_dicts(statistics: dict) -> dict:
    return {name: value.to_dict() for name, value in statistics.items()}


@pytest.fixture(scope="module")
def model() -> ir.Model:
    return ir.from_proto(classifier_proto())


def feeds(count: int = COUNT) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(4)
    return [
        {"x": (rng.standard_normal((1, 3, 8, 8)) * rng.uniform(0.1, 8)).astype(np.float32)}
        for _ in range(count)
    ]


@pytest.mark.parametrize("in_files", [True, False])
def test_two_worker_processes_give_one_process_statistics_bit_for_bit(tmp_path, model, in_files):
    samples = feeds()
    if in_files:
        stacked = np.stack([sample["x"] for sample in samples])
        np.savez(tmp_path / "a.npz", x=stacked[:8])
        np.savez(tmp_path / "b.npz", x=stacked[8:])
        data = open_data(tmp_path, model)
    else:
        data = open_data(samples, model)
    single = collect_statistics(model, None, data, batch_size=4)
    sharded, seen = collect_sharded(model, None, data, workers=2, batch_size=4)
    assert seen == COUNT
    assert as_dicts(sharded) == as_dicts(single)


def test_a_sample_limit_holds_across_workers(model):
    data = open_data(feeds(), model)
    single = collect_statistics(model, None, data, batch_size=4, max_samples=10)
    sharded, seen = collect_sharded(model, None, data, workers=2, batch_size=4, max_samples=10)
    assert seen == 10 and as_dicts(sharded) == as_dicts(single)


def test_parts_are_whole_groups_after_the_first_sample():
    assert _parts(21, 4, 2) == [(1, 13), (13, 21)]
    assert _parts(2, 4, 3) == [(1, 2)]
    covered = [index for start, stop in _parts(100, 8, 3) for index in range(start, stop)]
    assert covered == list(range(1, 100))


def test_ray_tasks_give_one_process_statistics_bit_for_bit(model):
    pytest.importorskip("ray", reason="the ray extra is not installed")
    data = open_data(feeds(), model)
    single = collect_statistics(model, None, data, batch_size=4)
    sharded, seen = collect_sharded(model, None, data, workers=1, batch_size=4, ray_address="local")
    assert seen == COUNT and as_dicts(sharded) == as_dicts(single)


def test_the_int8_preset_with_two_workers_writes_the_same_model(tmp_path):
    from onnxopt.api import optimize

    path = tmp_path / "model.onnx"
    ir.save(ir.from_proto(classifier_proto()), path)
    np.savez(tmp_path / "calib.npz", x=np.stack([sample["x"] for sample in feeds(40)]))
    results = [
        optimize(
            path,
            tmp_path / f"out{workers}.onnx",
            recipe="int8",
            data=tmp_path / "calib.npz",
            overrides=[f"calibrate.workers={workers}", "fallback.min_speedup=none"],
            timing=False,
        )
        for workers in (1, 2)
    ]
    one, two = (result.context.calibration for result in results)
    assert one.ranges == two.ranges and one.samples == two.samples
    assert (tmp_path / "out1.onnx").read_bytes() == (tmp_path / "out2.onnx").read_bytes()


def test_ray_without_the_package_is_a_clear_error(model, monkeypatch):
    import sys

    from onnxopt.errors import InputError

    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(InputError, match="needs Ray") as raised:
        collect_sharded(model, None, open_data(feeds(), model), workers=1, ray_address="auto")
    assert "onnxopt[ray]" in raised.value.render()
