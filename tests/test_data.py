from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper
from onnxruntime.quantization import CalibrationDataReader

from onnxopt.data import DataSource, open_data
from onnxopt.errors import InputError
from onnxopt.runtime import create_session

# x has a free batch axis and a fixed one; ids has a fixed trailing axis.
TWO_INPUTS = """
<ir_version: 8, opset_import: ["" : 17]>
agraph (float[N, 3] x, int64[N, 2] ids) => (float[N, 3] y, int64[N, 2] z) {
    y = Relu(x)
    z = Identity(ids)
}
"""

# Old IR versions list initializers among the graph inputs; 'w' is a weight, not data.
WEIGHT_AS_INPUT = """
<ir_version: 3, opset_import: ["" : 9]>
agraph (float[N, 2] x, float[2] w) => (float[N, 2] y) <float[2] w = {1.0, 2.0}> {
    y = Add(x, w)
}
"""


def parse(text: str) -> ir.Model:
    return ir.from_proto(onnx.parser.parse_model(text))


@pytest.fixture
def model() -> ir.Model:
    return parse(TWO_INPUTS)


def samples(count: int, start: int = 0) -> dict[str, np.ndarray]:
    """Arrays of ``count`` samples of batch size 1; sample i is filled with start + i."""
    values = np.arange(start, start + count)
    return {
        "x": np.repeat(values, 3).reshape(count, 1, 3).astype(np.float32),
        "ids": np.repeat(values, 2).reshape(count, 1, 2).astype(np.int64),
    }


def feeds(count: int, start: int = 0) -> list[dict[str, np.ndarray]]:
    arrays = samples(count, start)
    return [{name: array[index] for name, array in arrays.items()} for index in range(count)]


def numbers(data: DataSource | list[dict[str, np.ndarray]]) -> list[int]:
    """Which samples a source yields, by the value each sample is filled with."""
    return [int(feed["x"][0, 0]) for feed in data]


def error_of(source: object, model: ir.Model) -> str:
    """The message a user reads for ``source``, whether opening or reading it fails."""
    with pytest.raises(InputError) as info:
        list(open_data(source, model))
    assert info.value.exit_code == 2
    return str(info.value)


class Reader(CalibrationDataReader):
    """A calibration reader as onnxruntime users write them, optionally with rewind()."""

    def __init__(self, items: list[dict[str, np.ndarray]]):
        self.items = items
        self.position = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.position == len(self.items):
            return None
        self.position += 1
        return self.items[self.position - 1]


class RewindingReader(Reader):
    def rewind(self) -> None:
        self.position = 0


class Reiterable:
    """An iterable that is not an iterator, such as a torch DataLoader: each iter() starts over."""

    def __init__(self, items: list[dict[str, np.ndarray]]):
        self.items = items

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return iter(self.items)


def test_npz_yields_one_feed_per_sample(tmp_path, model):
    np.savez(tmp_path / "calib.npz", **samples(4))
    data = open_data(tmp_path / "calib.npz", model)
    assert data.count == 4
    assert data.description == f"{tmp_path / 'calib.npz'} (4 samples)"
    read = list(data)
    for got, expected in zip(read, feeds(4), strict=True):
        assert got.keys() == expected.keys()
        for name in got:
            assert got[name].dtype == expected[name].dtype
            np.testing.assert_array_equal(got[name], expected[name])


def test_npz_feeds_run_in_onnxruntime(tmp_path, model):
    np.savez_compressed(tmp_path / "calib.npz", **samples(2))
    session = create_session(model)
    for feed in open_data(str(tmp_path / "calib.npz"), model):
        _, z = session.run(None, feed)
        np.testing.assert_array_equal(z, feed["ids"])


def test_folder_is_one_stream_of_its_npz_files_sorted_by_name(tmp_path, model):
    np.savez(tmp_path / "b.npz", **samples(2, start=3))
    np.savez(tmp_path / "a.npz", **samples(3))
    (tmp_path / "notes.txt").write_text("not data")
    (tmp_path / "._a.npz").write_bytes(b"macOS metadata")
    data = open_data(tmp_path, model)
    assert data.count == 5
    assert numbers(data) == [0, 1, 2, 3, 4]


def test_files_lists_and_iterables_can_be_read_twice(tmp_path, model):
    np.savez(tmp_path / "calib.npz", **samples(3))
    for source in (
        tmp_path / "calib.npz",
        tmp_path,
        feeds(3),
        tuple(feeds(3)),
        Reiterable(feeds(3)),
    ):
        data = open_data(source, model)
        assert numbers(data) == numbers(data) == [0, 1, 2]


def test_generator_is_read_once_and_a_second_read_says_why_it_fails(model):
    data = open_data(iter(feeds(3)), model)
    assert data.count is None
    assert data.description == "list_iterator (count unknown)"
    assert numbers(data) == [0, 1, 2]
    with pytest.raises(InputError, match="already read"):
        list(data)


def test_take_and_split_keep_what_they_pull_so_a_generator_still_reads_in_full(model):
    data = open_data((feed for feed in feeds(6)), model)
    assert numbers(data.take(2)) == [0, 1]
    calibration, validation = data.split(2)
    assert numbers(validation) == numbers(validation) == [0, 1]
    assert numbers(calibration) == [2, 3, 4, 5]


def test_take_stops_at_a_byte_budget_but_not_before_the_least_it_is_asked_for(model):
    data = open_data(feeds(6), model)
    size = sum(array.nbytes for array in feeds(1)[0].values())
    assert numbers(data.take(6, max_bytes=3 * size)) == [0, 1, 2]
    assert numbers(data.take(2, max_bytes=3 * size)) == [0, 1]
    assert numbers(data.take(6, max_bytes=1)) == [0]
    assert numbers(data.take(6, max_bytes=1, least=4)) == [0, 1, 2, 3]


def test_calibration_data_reader_with_rewind_can_be_read_twice(model):
    data = open_data(RewindingReader(feeds(4)), model)
    assert data.description == "RewindingReader (count unknown)"
    assert numbers(data) == numbers(data) == [0, 1, 2, 3]
    calibration, validation = data.split(1)
    assert calibration.description == "RewindingReader (from sample 1, count unknown)"
    assert numbers(calibration) == numbers(calibration) == [1, 2, 3]
    assert numbers(validation) == [0]


def test_calibration_data_reader_without_rewind_is_read_once(model):
    data = open_data(Reader(feeds(3)), model)
    assert numbers(data) == [0, 1, 2]
    with pytest.raises(InputError, match="rewind"):
        list(data)


def test_split_holds_back_the_last_samples_of_a_known_count(model):
    calibration, validation = open_data(feeds(10), model).split(3)
    assert numbers(calibration) == list(range(7))
    assert numbers(validation) == [7, 8, 9]
    assert (calibration.count, validation.count) == (7, 3)
    assert validation.description == "list, samples 7-9 of 10"


def test_split_keeps_a_sample_for_calibration_and_shares_a_single_one(model):
    calibration, validation = open_data(feeds(3), model).split(10)
    assert (numbers(calibration), numbers(validation)) == ([0], [1, 2])
    calibration, validation = open_data(feeds(1), model).split(10)
    assert numbers(calibration) == numbers(validation) == [0]


def test_split_without_holdout_gives_empty_validation(model):
    calibration, validation = open_data(iter(feeds(3)), model).split(0)
    assert validation.count == 0
    assert validation.take(5) == []
    assert numbers(calibration) == [0, 1, 2]


def test_split_of_a_short_generator_follows_the_known_count_rule(model):
    calibration, validation = open_data(iter(feeds(2)), model).split(5)
    assert (numbers(calibration), numbers(validation)) == ([0], [1])


def test_split_across_files_of_a_folder(tmp_path, model):
    np.savez(tmp_path / "a.npz", **samples(3))
    np.savez(tmp_path / "b.npz", **samples(3, start=3))
    calibration, validation = open_data(tmp_path, model).split(4)
    assert numbers(calibration) == [0, 1]
    assert numbers(validation) == [2, 3, 4, 5]
    assert validation.description == f"{tmp_path}, samples 2-5 of 6"
    assert validation.take(1)[0]["x"].shape == (1, 3)


@settings(max_examples=60, deadline=None)
@given(
    sizes=st.lists(st.integers(min_value=0, max_value=4), min_size=1, max_size=4).filter(any),
    holdout=st.integers(min_value=0, max_value=20),
    kind=st.sampled_from(["folder", "list", "generator"]),
)
def test_split_never_loses_or_repeats_a_sample(sizes, holdout, kind):
    model = parse(TWO_INPUTS)
    total = sum(sizes)
    with tempfile.TemporaryDirectory() as folder:
        if kind == "folder":
            start = 0
            for index, size in enumerate(sizes):
                np.savez(Path(folder) / f"part-{index}.npz", **samples(size, start))
                start += size
            source = folder
        elif kind == "list":
            source = feeds(total)
        else:
            source = iter(feeds(total))
        calibration, validation = open_data(source, model).split(holdout)
        held, calibrated = numbers(validation), numbers(calibration)
    if total == 1:
        assert calibrated == [0] and held == ([0] if holdout else [])
    else:
        assert sorted(calibrated + held) == list(range(total))
        assert calibrated and len(held) == min(holdout, total - 1)


def test_an_open_source_rebinds_to_another_model(tmp_path, model):
    data = open_data(feeds(2), model)
    assert numbers(open_data(data, parse(TWO_INPUTS))) == [0, 1]


def test_weights_listed_as_inputs_are_not_data(model):
    weighted = parse(WEIGHT_AS_INPUT)
    data = open_data([{"x": np.ones((1, 2), np.float32)}], weighted)
    assert [spec.name for spec in data.specs] == ["x"]
    assert len(list(data)) == 1


def test_an_input_of_unknown_shape_takes_any_shape(tmp_path):
    x, y = (helper.make_tensor_value_info(name, TensorProto.FLOAT, None) for name in "xy")
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "relu", [x], [y])
    model = ir.from_proto(helper.make_model(graph))
    np.savez(tmp_path / "calib.npz", x=np.zeros((2, 4, 5, 6), np.float32))
    shapes = [feed["x"].shape for feed in open_data(tmp_path / "calib.npz", model)]
    assert shapes == [(4, 5, 6), (4, 5, 6)]


def npz(tmp_path: Path, **arrays: np.ndarray) -> Path:
    path = tmp_path / "calib.npz"
    np.savez(path, **arrays)
    return path


def test_missing_file(tmp_path, model):
    message = error_of(tmp_path / "nope.npz", model)
    assert f"data file '{tmp_path / 'nope.npz'}' does not exist" in message


def test_file_that_is_not_an_npz(tmp_path, model):
    (tmp_path / "calib.npz").write_text("x,ids\n1,2\n")
    message = error_of(tmp_path / "calib.npz", model)
    assert "is not a valid .npz archive" in message
    assert "fix: write it with numpy.savez(" in message and "x=..., ids=..." in message


def test_npy_file_is_named_as_such(tmp_path, model):
    np.save(tmp_path / "calib.npy", samples(2)["x"])
    assert "it is a .npy file" in error_of(tmp_path / "calib.npy", model)


def test_folder_without_npz(tmp_path, model):
    (tmp_path / "notes.txt").write_text("")
    assert "holds no .npz files" in error_of(tmp_path, model)
    assert "files found: notes.txt" in error_of(tmp_path, model)
    (tmp_path / "notes.txt").unlink()
    assert "it is empty" in error_of(tmp_path, model)


def test_npz_missing_an_input(tmp_path, model):
    message = error_of(npz(tmp_path, x=samples(2)["x"]), model)
    assert "calib.npz' has no array for model input 'ids'" in message
    assert "arrays found: x" in message
    assert "model inputs: x: float32[N, 3]; ids: int64[N, 2]" in message


def test_npz_with_an_array_the_model_does_not_take(tmp_path, model):
    message = error_of(npz(tmp_path, **samples(2), mask=np.ones((2, 1, 2))), model)
    assert "has 1 array 'mask' that the model does not take as input" in message


def test_npz_without_the_sample_axis_suggests_adding_it(tmp_path, model):
    message = error_of(npz(tmp_path, x=np.zeros((4, 3), np.float32), ids=samples(4)["ids"]), model)
    assert (
        "array 'x' in" in message
        and "has shape (4, 3)" in message
        and "lacks the sample axis" in message
    )
    assert "array[:, None]" in message


def test_npz_with_a_wrong_fixed_dim(tmp_path, model):
    message = error_of(
        npz(tmp_path, x=np.zeros((2, 1, 5), np.float32), ids=samples(2)["ids"]), model
    )
    assert "each sample of array 'x'" in message and "has shape (1, 5)" in message
    assert "the model expects x: float32[N, 3]" in message
    assert "axis 1 is 5; the model fixes it at 3" in message


def test_npz_with_a_wrong_rank(tmp_path, model):
    message = error_of(
        npz(tmp_path, x=np.zeros((2, 1, 3, 1), np.float32), ids=samples(2)["ids"]), model
    )
    assert "rank 3, where the model takes rank 2" in message


def test_npz_with_a_wrong_dtype_is_not_cast(tmp_path, model):
    message = error_of(
        npz(tmp_path, x=samples(2)["x"].astype(np.float64), ids=samples(2)["ids"]), model
    )
    assert "array 'x'" in message and "is float64; the model expects x: float32[N, 3]" in message
    assert "array.astype(numpy.float32)" in message


def test_npz_arrays_of_different_lengths(tmp_path, model):
    message = error_of(npz(tmp_path, x=samples(3)["x"], ids=samples(2)["ids"]), model)
    assert "hold different numbers of samples" in message and "x: 3, ids: 2" in message


def test_npz_without_samples(tmp_path, model):
    assert "holds no samples" in error_of(npz(tmp_path, **samples(0)), model)


def test_nan_names_the_file_sample_and_input(tmp_path, model):
    np.savez(tmp_path / "a.npz", **samples(2))
    arrays = samples(3)
    arrays["x"][2, 0, 1] = np.nan
    np.savez(tmp_path / "b.npz", **arrays)
    message = error_of(tmp_path, model)
    assert f"input 'x' of sample 2 of '{tmp_path / 'b.npz'}' has 1 NaN or Inf value" in message
    assert "index (0, 1)" in message


def test_inf_in_a_python_sample(model):
    items = feeds(3)
    items[1]["x"] = np.full((1, 3), np.inf, np.float32)
    assert "input 'x' of sample 1 has 3 NaN or Inf values" in error_of(items, model)


@pytest.mark.parametrize(
    ("sample", "expected"),
    [
        ({"x": np.zeros((1, 3), np.float32)}, "sample 1 has no array for model input 'ids'"),
        (
            {**feeds(1)[0], "mask": np.ones(2)},
            "sample 1 has 1 array 'mask' that the model does not take",
        ),
        (
            {**feeds(1)[0], "x": [[0.0, 1.0, 2.0]]},
            "input 'x' of sample 1 is a list, not a numpy array",
        ),
        ({**feeds(1)[0], "ids": np.zeros((1, 2), np.int32)}, "input 'ids' of sample 1 is int32"),
        (
            {**feeds(1)[0], "x": np.zeros((1, 4), np.float32)},
            "axis 1 is 4; the model fixes it at 3",
        ),
        (
            (np.zeros((1, 3), np.float32),),
            "sample 1 is a tuple, not a dict of model input name to array",
        ),
    ],
)
def test_bad_python_sample(model, sample, expected):
    assert expected in error_of([feeds(1)[0], sample], model)
    assert expected in error_of(iter([feeds(1)[0], sample]), model)


def test_a_bad_first_sample_fails_when_opening(model):
    with pytest.raises(InputError, match="sample 0 has no array"):
        open_data(iter([{"x": np.zeros((1, 3), np.float32)}]), model)


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ([], "data from a list holds no samples"),
        (iter([]), "data from a list_iterator holds no samples"),
        (Reader([]), "data from a Reader holds no samples"),
        (feeds(1)[0], "data is a single dict"),
        (np.zeros((2, 1, 3), np.float32), "data is a single numpy array"),
        (3, "data of type int is not a data source"),
    ],
)
def test_unusable_python_sources(model, source, expected):
    assert expected in error_of(source, model)


def test_split_holds_back_at_most_a_share_of_a_reader_of_unknown_length():
    model = _share_model()
    feeds = ({"x": np.full((1, 2), index, np.float32)} for index in range(20))
    calibration, validation = open_data(feeds, model).split(16, max_share=0.25)
    assert len(validation.take(100)) == 5
    assert len(list(calibration)) == 15


def test_split_with_a_share_on_a_known_count():
    model = _share_model()
    feeds = [{"x": np.full((1, 2), index, np.float32)} for index in range(12)]
    calibration, validation = open_data(feeds, model).split(8, max_share=0.25)
    assert [feed["x"][0, 0] for feed in validation] == [9.0, 10.0, 11.0]
    assert calibration.count == 9


def _share_model():
    return ir.from_proto(
        onnx.parser.parse_model(
            """
            <ir_version: 8, opset_import: ["" : 17]>
            g (float[N, 2] x) => (float[N, 2] y) { y = Relu(x) }
            """
        )
    )


SCALAR_INPUT = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[N, 4] x, int64 rate) => (float[N, 4] y) {
    scale = Cast<to = 1>(rate)
    y = Mul(x, scale)
}
"""


def test_a_scalar_input_takes_one_element_of_an_array_of_shape_n_per_sample(tmp_path):
    model = ir.from_proto(onnx.parser.parse_model(SCALAR_INPUT))
    path = tmp_path / "scalar.npz"
    rates = np.array([16000, 8000, 16000], dtype=np.int64)
    np.savez(path, x=np.ones((3, 1, 4), np.float32), rate=rates)
    feeds = list(open_data(path, model))
    assert [feed["rate"].shape for feed in feeds] == [(), (), ()]
    assert [int(feed["rate"]) for feed in feeds] == [16000, 8000, 16000]
    session = create_session(model)
    assert session.run(None, feeds[1])[0][0, 0] == 8000.0


def test_a_scalar_of_the_wrong_type_is_still_refused(tmp_path):
    model = ir.from_proto(onnx.parser.parse_model(SCALAR_INPUT))
    feed = {"x": np.ones((1, 4), np.float32), "rate": np.float32(16000)}
    with pytest.raises(InputError, match="input 'rate'"):
        list(open_data([feed], model))


def test_a_dimension_exported_as_minus_one_is_free(tmp_path):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [-1, 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [-1, 3])
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "relu", [x], [y])
    model = ir.from_proto(helper.make_model(graph))
    np.savez(tmp_path / "calib.npz", x=np.zeros((2, 1, 3), np.float32))
    assert [feed["x"].shape for feed in open_data(tmp_path / "calib.npz", model)] == [(1, 3)] * 2


def test_a_labels_array_is_read_apart_from_the_feeds(tmp_path, model):
    np.savez(tmp_path / "calib.npz", labels=np.array([[2], [0], [1]]), **samples(3))
    data = open_data(tmp_path / "calib.npz", model)
    assert [sorted(feed) for feed in data] == [["ids", "x"]] * 3
    assert [label.tolist() for label in data.take_labels(2)] == [[2], [0]]
    assert open_data(tmp_path / "calib.npz", model).split(1)[1].take_labels(5)[0].tolist() == [1]
    assert open_data(feeds(2), model).take_labels(2) is None


def test_labels_that_are_not_integers_or_not_on_every_sample_are_input_errors(tmp_path, model):
    np.savez(tmp_path / "float.npz", labels=np.zeros(3, np.float32), **samples(3))
    with pytest.raises(InputError, match="not integer class indices"):
        open_data(tmp_path / "float.npz", model)
    np.savez(tmp_path / "short.npz", labels=np.zeros(2, np.int64), **samples(3))
    with pytest.raises(InputError, match="different numbers of samples"):
        open_data(tmp_path / "short.npz", model)
    partial = [{**feeds(1)[0], "labels": np.array([1])}, feeds(1)[0]]
    with pytest.raises(InputError, match="no 'labels' array, but the samples before it have"):
        open_data(partial, model).take_labels(2)


def test_labels_that_start_after_the_first_sample_name_the_sample_without(model):
    partial = [feeds(1)[0], {**feeds(1)[0], "labels": np.array([1])}]
    with pytest.raises(InputError, match="sample 1 has a 'labels' array, but sample 0 has none"):
        open_data(partial, model).take_labels(2)


def test_folder_follows_no_link_out_of_itself(tmp_path, model):
    outside = tmp_path / "elsewhere.npz"
    np.savez(outside, **samples(2))
    folder = tmp_path / "calib"
    folder.mkdir()
    np.savez(folder / "a.npz", **samples(3))
    (folder / "inside.npz").symlink_to(folder / "a.npz")
    assert open_data(folder, model).count == 6
    (folder / "b.npz").symlink_to(outside)
    message = error_of(folder, model)
    assert "links to files outside it" in message and "b.npz" in message


def test_npz_with_pickled_objects_is_not_unpickled(tmp_path, model):
    path = tmp_path / "calib.npz"
    np.savez(path, x=np.array([{"a": 1}] * 2, dtype=object), ids=samples(2)["ids"])
    assert "pickle" in error_of(path, model).lower() or "object" in error_of(path, model).lower()
