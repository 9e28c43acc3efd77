from __future__ import annotations

import os

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from onnxopt import io
from onnxopt.errors import InputError
from onnxopt.io import atomic_write_text
from tests.builders import classifier_proto, external_data_classifier


def test_load_keeps_external_weights_on_disk_until_used(tmp_path):
    source = ir.from_proto(classifier_proto())
    ir.save(source, tmp_path / "big.onnx", external_data="big.onnx.data", size_threshold_bytes=0)
    model = io.load(tmp_path / "big.onnx")
    tensors = [value.const_value for value in model.graph.initializers.values()]
    assert tensors and all(isinstance(tensor, ir.ExternalTensor) for tensor in tensors)
    assert io.external_data_files(model) == {tmp_path / "big.onnx.data"}


def test_save_writes_external_data_above_threshold_and_round_trips(tmp_path, classifier_path):
    model = io.load(classifier_path)
    written = io.save(model, tmp_path / "out.onnx", external_data_threshold=100)
    assert written == [tmp_path / "out.onnx.data", tmp_path / "out.onnx"]
    reloaded = io.load(tmp_path / "out.onnx")
    assert io.external_data_files(reloaded) == {tmp_path / "out.onnx.data"}
    np.testing.assert_array_equal(
        reloaded.graph.initializers["conv.weight"].const_value.numpy(),
        model.graph.initializers["conv.weight"].const_value.numpy(),
    )


def test_save_inlines_weights_of_an_external_input_so_the_output_stands_alone(tmp_path):
    ir.save(
        ir.from_proto(classifier_proto()),
        tmp_path / "in.onnx",
        external_data="in.data",
        size_threshold_bytes=0,
    )
    model = io.load(tmp_path / "in.onnx")
    (tmp_path / "out").mkdir()
    io.save(model, tmp_path / "out" / "model.onnx", external_data=False)
    assert sorted(os.listdir(tmp_path / "out")) == ["model.onnx"]
    onnx.checker.check_model(onnx.load(tmp_path / "out" / "model.onnx"))


def test_save_leaves_no_temporary_files(tmp_path, classifier_path):
    io.save(io.load(classifier_path), tmp_path / "out.onnx")
    assert sorted(os.listdir(tmp_path)) == ["classifier.onnx", "out.onnx"]


def test_save_refuses_to_overwrite_the_input(classifier_path):
    before = classifier_path.read_bytes()
    with pytest.raises(InputError, match="never overwrites its input"):
        io.save(io.load(classifier_path), classifier_path, protected=[classifier_path])
    assert classifier_path.read_bytes() == before


def test_save_refuses_a_missing_folder(tmp_path, classifier_path):
    with pytest.raises(InputError, match="does not exist") as raised:
        io.save(io.load(classifier_path), tmp_path / "missing" / "out.onnx")
    assert raised.value.exit_code == 2


@pytest.mark.parametrize(
    ("content", "message"),
    [(b"", "no outputs"), (b"not an onnx model at all", "not a readable ONNX model")],
)
def test_load_rejects_files_that_are_not_models(tmp_path, content, message):
    path = tmp_path / "bad.onnx"
    path.write_bytes(content)
    with pytest.raises(InputError, match=message):
        io.load(path)


def test_load_rejects_a_truncated_model(tmp_path, classifier_path):
    data = classifier_path.read_bytes()
    path = tmp_path / "truncated.onnx"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError):
        io.load(path)


def test_load_names_missing_external_data(tmp_path):
    ir.save(
        ir.from_proto(classifier_proto()),
        tmp_path / "m.onnx",
        external_data="m.data",
        size_threshold_bytes=0,
    )
    (tmp_path / "m.data").unlink()
    with pytest.raises(InputError, match="external data") as raised:
        io.load(tmp_path / "m.onnx")
    assert "m.data" in raised.value.render()


def test_stamp_metadata_records_recipe_and_passes(classifier_path):
    model = io.load(classifier_path)
    io.stamp_metadata(model, "cleanup", ["fold-constants", "validate"])
    assert model.metadata_props["onnxopt.recipe"] == "cleanup"
    assert model.metadata_props["onnxopt.passes"] == "fold-constants,validate"
    assert model.metadata_props["onnxopt.version"]


def test_atomic_write_text_replaces_the_file_and_leaves_nothing_else(tmp_path):
    target = tmp_path / "report.json"
    target.write_text("old")
    atomic_write_text(target, "new")
    assert target.read_text() == "new"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["report.json"]


def test_atomic_write_text_that_fails_leaves_no_partial_file(tmp_path):
    blocked = tmp_path / "a-folder"
    blocked.mkdir()
    (blocked / "inside").write_text("keeps the folder from being replaced")
    with pytest.raises(InputError, match="cannot write"):
        atomic_write_text(blocked, "text")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["a-folder"]
    with pytest.raises(InputError, match="cannot write"):
        atomic_write_text(tmp_path / "missing" / "file.json", "text")


def test_save_writes_no_value_info_for_initializers_and_keeps_their_types(tmp_path):
    """An initializer's tensor states its type and shape; a value_info entry would repeat it."""
    model = ir.from_proto(classifier_proto())
    weight = model.graph.initializers["conv.weight"]
    weight.type, weight.shape = ir.TensorType(ir.DataType.FLOAT), weight.const_value.shape
    io.save(model, tmp_path / "out.onnx")
    proto = onnx.load(tmp_path / "out.onnx")
    initializers = {tensor.name for tensor in proto.graph.initializer}
    assert initializers and not initializers & {info.name for info in proto.graph.value_info}
    onnx.checker.check_model(proto, full_check=True)
    assert weight.shape == weight.const_value.shape and weight.dtype == ir.DataType.FLOAT


def external_model(folder, location: str = "m.onnx.data"):
    """The classifier with its weights in an external file at ``location``."""
    external_data_classifier(folder / "m.onnx")
    if location != "m.onnx.data":
        stored = onnx.load(str(folder / "m.onnx"), load_external_data=False)
        for tensor in stored.graph.initializer:
            for entry in tensor.external_data:
                if entry.key == "location":
                    entry.value = location
        onnx.save(stored, str(folder / "m.onnx"))
    return folder / "m.onnx"


@pytest.mark.parametrize("escape", ["relative", "absolute", "link"])
def test_load_refuses_external_data_outside_the_models_folder(tmp_path, escape):
    secret = tmp_path / "secret.data"
    external_model(tmp_path / "source")
    secret.write_bytes((tmp_path / "source" / "m.onnx.data").read_bytes())
    folder = tmp_path / "models" / "sub"
    if escape == "link":
        path = external_model(folder)
        (folder / "m.onnx.data").unlink()
        (folder / "m.onnx.data").symlink_to(secret)
    else:
        path = external_model(folder, "../../secret.data" if escape == "relative" else str(secret))
    with pytest.raises(InputError, match="outside its folder") as raised:
        io.load(path)
    assert "secret.data" in raised.value.render()


def test_load_refuses_external_data_shorter_than_its_tensors_declare(tmp_path):
    path = external_model(tmp_path)
    data = tmp_path / "m.onnx.data"
    data.write_bytes(data.read_bytes()[:100])
    with pytest.raises(InputError, match="do not hold") as raised:
        io.load(path)
    assert "which has 100" in raised.value.render()


@pytest.mark.parametrize("command", ["inspect", "optimize"])
def test_cli_exits_2_on_external_data_outside_the_folder(tmp_path, capsys, command):
    from onnxopt.cli import main

    external_model(tmp_path / "source")
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "secret.data").write_bytes(
        (tmp_path / "source" / "m.onnx.data").read_bytes()
    )
    path = external_model(tmp_path / "models" / "sub", "../secret.data")
    output = tmp_path / "out.onnx"
    arguments = [command, str(path)] + (["-o", str(output)] if command == "optimize" else [])
    assert main(arguments) == 2
    captured = capsys.readouterr()
    assert "outside its folder" in captured.err and "Traceback" not in captured.err
    assert not output.exists()


def test_a_failed_write_leaves_the_old_output_and_no_partial_file(
    tmp_path, classifier_path, monkeypatch
):
    (tmp_path / "out").mkdir()
    output = tmp_path / "out" / "out.onnx"
    output.write_bytes(b"previous model")

    def full_disk(model, path, **_):
        with open(path, "wb") as file:
            file.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(io.ir, "save", full_disk)
    with pytest.raises(InputError, match="No space left") as raised:
        io.save(io.load(classifier_path), output)
    assert "free space" in raised.value.render()
    assert output.read_bytes() == b"previous model"
    assert sorted(path.name for path in output.parent.iterdir()) == ["out.onnx"]


KILLED_DURING_SAVE = """
import sys, time
import onnx_ir as ir
from onnxopt import io

def slow(model, path, **_):
    with open(path, "wb") as file:
        file.write(b"partial")
        file.flush()
        print("writing", flush=True)
        time.sleep(60)

ir.save = slow
io.save(io.load(sys.argv[1]), sys.argv[2])
"""


def test_a_process_killed_while_saving_leaves_the_old_output(tmp_path, classifier_path):
    import signal
    import subprocess
    import sys

    (tmp_path / "out").mkdir()
    output = tmp_path / "out" / "out.onnx"
    output.write_bytes(b"previous model")
    child = subprocess.Popen(
        [sys.executable, "-c", KILLED_DURING_SAVE, str(classifier_path), str(output)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert child.stdout.readline().strip() == "writing"
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=30)
    assert output.read_bytes() == b"previous model"
    leftovers = [path.name for path in output.parent.iterdir() if path.name != "out.onnx"]
    assert all(name.startswith(".onnxopt-") for name in leftovers)
