"""``onnxopt transfer`` and the ``transfer`` pass: what a user runs, and bad input."""

from __future__ import annotations

import json
from importlib import resources

import numpy as np
import onnx_ir as ir
import pytest

from onnxopt.api import optimize
from onnxopt.cli import main
from onnxopt.errors import InputError
from onnxopt.transfer.files import read_map, read_pruning_report
from onnxopt.transfer.fit import adapted_input_channels, removed_by_pruning
from tests.helpers import count_ops, run_model
from tests.transfer.exports import export, image, network, torch_outputs


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli")
    source = network(7)
    return (
        export(source, folder / "source.onnx", dynamo=True),
        export(network(8), folder / "target.onnx"),
        source,
    )


def run_cli(*arguments) -> int:
    return main([str(argument) for argument in arguments])


def test_transfer_writes_the_model_and_a_report(pair, tmp_path, capsys):
    source, target, net = pair
    output, report = tmp_path / "out.onnx", tmp_path / "report.json"
    assert run_cli("transfer", source, target, "-o", output, "--report", report) == 0
    printed = capsys.readouterr().out
    assert "8 of 8 target tensors transferred" in printed and "wrote" in printed
    document = json.loads(report.read_text())["transfer"]
    assert document["transferred"] == 8 and document["equivalent"] is True
    assert {slot["match"] for slot in document["slots"]} <= {"name", "structure"}
    model = ir.load(output)
    assert model.metadata_props["onnxopt.recipe"] == "transfer"
    got = {"x": image()}
    np.testing.assert_allclose(
        run_model(model, got)[0], torch_outputs(net, image()), rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--map", "MAP"], "no learned weight"),
        (["--map", "missing.txt"], "cannot read the map"),
        (["--pruned", "BAD"], "holds no pruning report"),
        (["--finetune-steps", "-1"], "must be 0 or more"),
        (["--include", "conv["], "not a regular expression"),
        (["--finetune-steps", "2"], "has no samples"),
        (["--match", "name", "--include", "^project"], "another shape"),
    ],
)
def test_bad_input_exits_2_and_writes_nothing(pair, tmp_path, capsys, extra, message):
    source, target, _ = pair
    (tmp_path / "map.txt").write_text("fc.weight unknown_tensor\n")
    (tmp_path / "bad.json").write_text('{"passes": []}')
    extra = [
        str(tmp_path / "map.txt")
        if item == "MAP"
        else str(tmp_path / "bad.json")
        if item == "BAD"
        else item
        for item in extra
    ]
    if "--include" in extra:
        narrow = network(9)
        narrow.project = type(narrow.project)(8, 12, 1)
        narrow.fc = type(narrow.fc)(12, 5)
        target = export(narrow.eval(), tmp_path / "narrow.onnx")
    output = tmp_path / "out.onnx"
    assert run_cli("transfer", source, target, "-o", output, *extra) == 2
    error = capsys.readouterr().err
    assert message in error and "fix:" in error and "Traceback" not in error
    assert not output.exists()


def test_output_may_not_overwrite_an_input(pair, capsys):
    source, target, _ = pair
    before = target.read_bytes()
    assert run_cli("transfer", source, target, "-o", target) == 2
    assert target.read_bytes() == before


def test_transfer_pass_then_int8_validates_against_the_new_weights(pair, tmp_path):
    source, target, net = pair
    rng = np.random.default_rng(0)
    data = tmp_path / "calib.npz"
    np.savez(data, x=rng.standard_normal((32, 1, 3, 16, 16)).astype(np.float32))
    recipe = tmp_path / "recipe.toml"
    int8 = (resources.files("onnxopt") / "presets" / "int8.toml").read_text()
    recipe.write_text(
        int8.replace(
            "[[passes]]", f'[[passes]]\nname = "transfer"\nsource = "{source}"\n\n[[passes]]', 1
        )
    )
    result = optimize(
        target,
        tmp_path / "out.onnx",
        recipe=recipe,
        data=data,
        overrides=["fallback.min_speedup=none"],
        timing=False,
    )
    assert result.passed
    assert result.context.transfer.transferred == 8
    assert "DequantizeLinear" in count_ops(result.model)
    document = result.report()
    assert document["transfer"]["equivalent"] is True
    got = run_model(result.model, {"x": image()})[0]
    expected = torch_outputs(net, image())
    assert np.corrcoef(got.ravel(), expected.ravel())[0, 1] > 0.99


def test_transfer_pass_without_a_source_is_refused(tmp_path, pair):
    _, target, _ = pair
    with pytest.raises(InputError, match="no source model"):
        optimize(target, None, recipe=_recipe(tmp_path), timing=False)


def _recipe(tmp_path):
    path = tmp_path / "bare.toml"
    path.write_text('name = "bare"\n[[passes]]\nname = "transfer"\n')
    return path


def test_map_files_in_text_and_json(tmp_path):
    text = tmp_path / "map.txt"
    text.write_text("# target source\nconv.weight onnx::Conv_1\n\nfc.weight  fc.w  # head\n")
    assert read_map(text) == {"conv.weight": "onnx::Conv_1", "fc.weight": "fc.w"}
    as_json = tmp_path / "map.json"
    as_json.write_text('{"a": "b"}')
    assert read_map(as_json) == {"a": "b"}
    text.write_text("a b c\n")
    with pytest.raises(InputError, match="line 1"):
        read_map(text)
    text.write_text("a b\na c\n")
    with pytest.raises(InputError, match="paired twice"):
        read_map(text)


def test_pruning_report_positions_per_tensor_and_axis(tmp_path):
    report = {
        "groups": [
            {
                "channels": 4,
                "keep": [0, 2],
                "tensors": [
                    {"tensor": "w", "axis": 0, "offset": 0, "width": 1},
                    {"tensor": "v", "axis": 1, "offset": 3, "width": 2},
                ],
            }
        ]
    }
    removed = removed_by_pruning(report)
    assert removed[("w", 0)].tolist() == [1, 3]
    assert removed[("v", 1)].tolist() == [5, 6, 9, 10]
    path = tmp_path / "report.json"
    path.write_text(json.dumps({"pruning": report, "passed": True}))
    assert read_pruning_report(path) == report


def test_input_channels_are_summed_or_tiled_and_scaled():
    weight = np.arange(2 * 3 * 1 * 1, dtype=np.float32).reshape(2, 3, 1, 1)
    np.testing.assert_array_equal(
        adapted_input_channels(weight, 1, 1), weight.sum(axis=1, keepdims=True)
    )
    four = adapted_input_channels(weight, 4, 1)
    assert four.shape == (2, 4, 1, 1)
    np.testing.assert_allclose(four[:, 3], weight[:, 0] * 3 / 4)
