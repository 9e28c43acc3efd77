"""Weights moved between exports of one torch network, into optimized, pruned and int8
targets, and into networks of another shape."""

from __future__ import annotations

import json

import numpy as np
import onnx_ir as ir
import pytest

from onnxopt.api import optimize, transfer_model
from onnxopt.errors import InputError, ProcessingError
from onnxopt.transfer import TransferSettings, transfer_weights
from tests.helpers import count_ops, model_from_text, run_model
from tests.transfer.exports import (
    export,
    image,
    network,
    onnxruntime_optimized,
    torch,
    torch_outputs,
)


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """Network A (TorchScript, BatchNorm folded and kept; onnxruntime-optimized) and
    network B, other weights (dynamo exporter)."""
    folder = tmp_path_factory.mktemp("exports")
    a, b = network(0), network(1)
    paths = {
        "a": export(a, folder / "a.onnx"),
        "a_batchnorm": export(a, folder / "a_bn.onnx", keep_batchnorm=True),
        "b": export(b, folder / "b.onnx", dynamo=True),
    }
    paths["a_ort"] = onnxruntime_optimized(paths["a_batchnorm"], folder / "a_ort.onnx")
    return paths, {"a": a, "b": b}


def feed(model: ir.Model, array: np.ndarray) -> dict[str, np.ndarray]:
    return {model.graph.inputs[0].name: array}


def output(model: ir.Model, array: np.ndarray) -> np.ndarray:
    return run_model(model, feed(model, array))[0]


def test_two_exporters_names_differ_and_auto_transfer_reproduces_the_source(exports):
    paths, nets = exports
    target, source = ir.load(paths["a"]), ir.load(paths["b"])
    assert "conv.weight" in source.graph.initializers
    assert "conv.weight" not in target.graph.initializers
    report = transfer_weights(target, source)
    assert report.equivalent
    assert report.transferred == len(report.slots) == 8
    assert {slot.match for slot in report.slots} >= {"structure"}
    expected = torch_outputs(nets["b"], image())
    np.testing.assert_allclose(output(target, image()), expected, rtol=1e-5, atol=1e-5)


def test_batchnorm_source_into_folded_target_and_back(exports):
    paths, nets = exports
    folded = ir.load(paths["b"])
    report = transfer_weights(folded, ir.load(paths["a_batchnorm"]))
    assert any(slot.transform == "BatchNorm folded" for slot in report.slots)
    expected = torch_outputs(nets["a"], image())
    np.testing.assert_allclose(output(folded, image()), expected, rtol=1e-5, atol=1e-5)

    with_batchnorm = ir.load(paths["a_batchnorm"])
    report = transfer_weights(with_batchnorm, ir.load(paths["b"]))
    assert count_ops(with_batchnorm)["BatchNormalization"] == 2
    assert any(slot.transform == "BatchNorm made identity" for slot in report.slots)
    expected = torch_outputs(nets["b"], image())
    np.testing.assert_allclose(output(with_batchnorm, image()), expected, rtol=1e-5, atol=1e-5)


def test_onnxruntime_optimized_target_with_fused_ops_and_renamed_weights(exports):
    paths, nets = exports
    target = ir.load(paths["a_ort"])
    assert "FusedConv" in count_ops(target)
    assert any(name.startswith("ConvBnFusion") for name in target.graph.initializers)
    report = transfer_weights(target, ir.load(paths["b"]))
    assert report.equivalent
    expected = torch_outputs(nets["b"], image())
    np.testing.assert_allclose(output(target, image()), expected, rtol=1e-5, atol=1e-5)


def test_cleanup_optimized_target(exports, tmp_path):
    paths, nets = exports
    optimize(paths["a_batchnorm"], tmp_path / "clean.onnx", recipe="cleanup", timing=False)
    result = transfer_model(paths["b"], tmp_path / "clean.onnx", tmp_path / "out.onnx")
    assert result.written[-1] == tmp_path / "out.onnx"
    expected = torch_outputs(nets["b"], image())
    np.testing.assert_allclose(
        output(ir.load(tmp_path / "out.onnx"), image()), expected, rtol=1e-5, atol=1e-5
    )
    # A source that keeps its BatchNorms, into graphs where cleanup and onnxruntime folded them.
    for folded in (tmp_path / "clean.onnx", paths["a_ort"]):
        target = ir.load(folded)
        assert "BatchNormalization" not in count_ops(target)
        target_before = output(target, image())
        source = export(nets["b"], tmp_path / "b_bn.onnx", keep_batchnorm=True)
        report = transfer_weights(target, ir.load(source))
        assert report.equivalent
        assert any(slot.transform == "BatchNorm folded" for slot in report.slots)
        assert not np.allclose(target_before, expected, atol=1e-3)
        np.testing.assert_allclose(output(target, image()), expected, rtol=1e-5, atol=1e-5)


def calibration(tmp_path, name: str, count: int = 32):
    rng = np.random.default_rng(5)
    path = tmp_path / f"calib_{name}.npz"
    np.savez(path, **{name: rng.standard_normal((count, 1, 3, 16, 16)).astype(np.float32)})
    return path


PRUNE = [
    "prune.flops=none",
    "prune.ratio=0.5",
    "prune.round_to=1",
    "prune.protect_first_last=false",
    "validate.min_cosine=0",
]


def test_pruned_target_gets_the_source_cut_to_its_kept_channels(exports, tmp_path):
    """Transferring a model's own weights into its pruned and refitted copy gives the same
    model as pruning the same channels without the refit."""
    paths, _ = exports
    data = calibration(tmp_path, "x")
    pruned = optimize(
        paths["a"],
        tmp_path / "pruned.onnx",
        recipe="prune",
        data=data,
        overrides=PRUNE,
        timing=False,
    )
    (tmp_path / "report.json").write_text(json.dumps(pruned.report(), default=str))
    unrefitted = optimize(
        paths["a"],
        None,
        recipe="prune",
        data=data,
        overrides=[*PRUNE, "prune.recover=false"],
        timing=False,
    )
    result = transfer_model(paths["a"], tmp_path / "pruned.onnx", pruning=tmp_path / "report.json")
    assert any("kept" in slot.transform for slot in result.report.slots)
    assert not result.report.equivalent
    np.testing.assert_allclose(
        output(result.model, image()), output(unrefitted.model, image()), rtol=1e-5, atol=1e-5
    )
    with pytest.raises(InputError, match="another shape"):
        transfer_model(paths["a"], tmp_path / "pruned.onnx")


def fine_tuned(seed: int, scale: float = 0.02):
    """Network ``seed`` with every weight moved by a few percent, as a fine-tune moves them."""
    net = network(seed)
    generator = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for parameter in net.parameters():
            noise = torch.randn(parameter.shape, generator=generator)
            parameter.add_(noise * scale * parameter.abs().mean())
    return net


def test_int8_target_is_requantized_with_its_own_scales(exports, tmp_path):
    paths, _ = exports
    tuned = fine_tuned(0)
    tuned_path = export(tuned, tmp_path / "tuned.onnx", dynamo=True)
    quantized = int8(paths["a"], calibration(tmp_path, "x"))
    assert "DequantizeLinear" in count_ops(quantized.model)
    result = transfer_model(tuned_path, quantized.model)
    assert any("requantized" in slot.transform for slot in result.report.slots)
    assert "DequantizeLinear" in count_ops(result.model)
    expected = torch_outputs(tuned, image())
    got = output(result.model, image())
    assert cosine(got, expected) > 0.99
    before = output(quantized.model, image())
    assert np.abs(got - expected).max() < np.abs(before - expected).max()
    # Within quantization noise of the fine-tuned model quantized from scratch.
    np.savez(tmp_path / "tuned.npz", input=np.load(calibration(tmp_path, "x"))["x"])
    rebuilt = int8(tuned_path, tmp_path / "tuned.npz")
    from_scratch = run_model(rebuilt.model, {"input": image()})[0]
    assert np.abs(got - from_scratch).max() < 2 * np.abs(from_scratch - expected).max() + 1e-3


def int8(path, data):
    """``path`` through the int8 preset, every layer quantized, nothing written."""
    return optimize(
        path,
        None,
        recipe="int8",
        data=data,
        overrides=["fallback.min_speedup=none", "validate.min_cosine=0"],
        timing=False,
    )


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.dot(a.ravel(), b.ravel()) / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_int8_target_refuses_weights_its_scales_would_clip(exports, tmp_path):
    paths, _ = exports
    quantized = int8(paths["a"], calibration(tmp_path, "x"))
    louder = ir.load(paths["a"])
    for value in louder.graph.initializers.values():
        if value.name.endswith("weight"):
            value.const_value = ir.tensor(value.const_value.numpy() * 10)
    with pytest.raises(InputError, match="cannot store their new weights") as error:
        transfer_weights(quantized.model.clone(), louder)
    assert "clipping" in str(error.value) and "--weight-scales widen" in str(error.value)

    # A fine-tune that moves weights past their channel's largest: widening keeps it.
    tuned = fine_tuned(0, scale=0.3)
    source = ir.load(export(tuned, tmp_path / "tuned.onnx", dynamo=True))
    with pytest.raises(InputError, match="cannot store their new weights"):
        transfer_weights(quantized.model.clone(), source)
    widened = quantized.model.clone()
    report = transfer_weights(widened, source, TransferSettings(weight_scales="widen"))
    assert any("scales widened" in slot.transform for slot in report.slots)
    expected = torch_outputs(tuned, image())
    assert cosine(output(widened, image()), expected) > 0.99


def test_another_class_count_keeps_the_shared_classes(tmp_path):
    source = network(2, classes=5)
    target_path = export(network(3, classes=7), tmp_path / "seven.onnx")
    source_path = export(source, tmp_path / "five.onnx", dynamo=True)
    with pytest.raises(InputError, match=r"fc\.weight"):
        transfer_model(source_path, target_path)
    result = transfer_model(source_path, target_path, on_mismatch="fit")
    got = output(result.model, image())
    np.testing.assert_allclose(got[:, :5], torch_outputs(source, image()), rtol=1e-5, atol=1e-5)
    assert result.report.outputs[0].cosine_with_source_after is None

    fewer = export(network(4, classes=3), tmp_path / "three.onnx")
    result = transfer_model(source_path, fewer, on_mismatch="fit")
    np.testing.assert_allclose(
        output(result.model, image()), torch_outputs(source, image())[:, :3], rtol=1e-5, atol=1e-5
    )
    skipped = transfer_model(source_path, target_path, on_mismatch="skip")
    left = [slot for slot in skipped.report.slots if slot.left]
    assert {slot.target for slot in left} == {"fc.weight", "fc.bias"}


def test_grey_input_convolution_sums_the_colour_channels(tmp_path):
    source = network(5, channels=3)
    source_path = export(source, tmp_path / "rgb.onnx", dynamo=True)
    grey_path = export(network(6, channels=1), tmp_path / "grey.onnx")
    result = transfer_model(source_path, grey_path, on_mismatch="fit")
    grey = image(channels=1)
    np.testing.assert_allclose(
        output(result.model, grey),
        torch_outputs(source, np.repeat(grey, 3, axis=1)),
        rtol=1e-4,
        atol=1e-4,
    )
    assert any("summed" in slot.transform for slot in result.report.slots)


def test_names_that_lie_lose_to_structure(exports):
    """A source whose names say conv <-> conv2 the other way round still transfers right."""
    paths, nets = exports
    source = ir.load(paths["b"])
    initializers = source.graph.initializers
    renames = {"conv.weight": "conv2.weight", "conv2.weight": "conv.weight"}
    values = {old: initializers[old] for old in renames}
    for old, value in values.items():
        del initializers[old]
        value.name = renames[old]
    for value in values.values():
        initializers[value.name] = value
    target = ir.load(paths["b"])
    report = transfer_weights(target, source)
    assert report.equivalent
    np.testing.assert_allclose(
        output(target, image()), torch_outputs(nets["b"], image()), rtol=1e-5, atol=1e-5
    )


def test_explicit_map_pairs_first_and_unknown_names_are_refused(exports):
    paths, _ = exports
    target = ir.load(paths["b"])
    report = transfer_weights(
        target, ir.load(paths["a"]), TransferSettings(mapping={"fc.weight": "fc.weight"})
    )
    assert [slot.match for slot in report.slots if slot.target == "fc.weight"] == ["map"]
    with pytest.raises(InputError, match="no learned weight") as error:
        transfer_weights(
            ir.load(paths["b"]),
            ir.load(paths["a"]),
            TransferSettings(mapping={"fc.weight": "missing", "nothing": "fc.weight"}),
        )
    assert "'missing'" in str(error.value) and "'nothing'" in str(error.value)


def test_include_and_exclude_choose_the_target_layers(exports):
    paths, _ = exports
    target = ir.load(paths["b"])
    original = target.graph.initializers["fc.weight"].const_value.numpy().copy()
    report = transfer_weights(target, ir.load(paths["a"]), TransferSettings(exclude=("^fc",)))
    assert "fc.weight" not in {slot.target for slot in report.slots}
    np.testing.assert_array_equal(
        target.graph.initializers["fc.weight"].const_value.numpy(), original
    )
    report = transfer_weights(
        ir.load(paths["b"]), ir.load(paths["a"]), TransferSettings(include=("^fc",))
    )
    assert {slot.target for slot in report.slots} == {"fc.weight", "fc.bias"}


def test_graphs_with_nothing_in_common_are_refused(exports):
    paths, _ = exports
    other = model_from_text(
        """
        <ir_version: 8, opset_import: ["" : 17]>
        agraph (float[1, 8] x) => (float[1, 8] y)
        <float[8] slope = {0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8}>
        { y = PRelu(x, slope) }
        """
    )
    with pytest.raises(InputError, match="no layer in common"):
        transfer_weights(other, ir.load(paths["a"]))


def test_a_result_that_does_not_reproduce_an_equivalent_source_is_an_error(exports):
    """A source that scales its output by a constant the layers do not hold: every layer
    pairs, yet the outputs differ, and the transfer says so instead of passing garbage."""
    paths, _ = exports
    source = ir.load(paths["b"])
    final = source.graph.outputs[0]
    doubled = ir.node(
        "Mul", [final.producer().outputs[0], ir.val("two", const_value=ir.tensor(np.float32(2.0)))]
    )
    source.graph.register_initializer(doubled.inputs[1])
    source.graph.append(doubled)
    source.graph.outputs[0] = doubled.outputs[0]
    doubled.outputs[0].name = "doubled"
    doubled.outputs[0].shape = final.shape
    doubled.outputs[0].dtype = final.dtype
    with pytest.raises(ProcessingError, match="does not reproduce"):
        transfer_weights(ir.load(paths["b"]), source)
