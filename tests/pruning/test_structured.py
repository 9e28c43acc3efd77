"""Structured pruning: the model gets smaller and still runs, cutting a channel is the same as
never reading it, recovery brings the outputs back closer, and bad targets are input errors."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import helper

from onnxopt import runtime
from onnxopt.cli import main
from onnxopt.errors import InputError
from onnxopt.progress import QUIET
from onnxopt.pruning import structured
from onnxopt.pruning.channels import find_channel_groups
from onnxopt.pruning.shrink import model_statistics
from onnxopt.pruning.sparsify import SparsitySettings, sparsify_model
from onnxopt.pruning.structured import StructuredSettings, _fisher_scores, prune_structured
from tests.pruning.test_attention import D_MODEL, HEAD_DIM, SEQ, _Builder, _weights
from tests.pruning.test_channels import padded_shortcut_net, residual_net
from tests.quantization.helpers import build, feeds, random_weights, run


def branchy_net() -> ir.Model:
    """conv1 -> Relu -> conv2 -> BatchNorm -> Relu -> (conv3a, conv3b) -> Concat -> Relu
    -> conv4 -> GlobalAveragePool -> Flatten -> fc."""
    weights = random_weights(
        c1=(16, 3, 3, 3), c2=(16, 16, 3, 3), c2_b=(16,), c3a=(8, 16, 1, 1), c3b=(8, 16, 3, 3),
        c4=(8, 16, 1, 1), c4_b=(8,), fc=(5, 8), fc_b=(5,),
    )  # fmt: skip
    rng = np.random.default_rng(3)
    weights.update(
        scale=rng.uniform(0.5, 1.5, 16).astype(np.float32),
        shift=rng.standard_normal(16).astype(np.float32) * 0.1,
        mean=rng.standard_normal(16).astype(np.float32) * 0.1,
        var=rng.uniform(0.5, 1.5, 16).astype(np.float32),
    )
    nodes = [
        helper.make_node("Conv", ["x", "c1"], ["y1"], name="conv1", pads=[1] * 4),
        helper.make_node("Relu", ["y1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "c2", "c2_b"], ["y2"], name="conv2", pads=[1] * 4),
        helper.make_node(
            "BatchNormalization", ["y2", "scale", "shift", "mean", "var"], ["n2"], name="bn"
        ),
        helper.make_node("Relu", ["n2"], ["r2"], name="relu2"),
        helper.make_node("Conv", ["r2", "c3a"], ["a"], name="conv3a"),
        helper.make_node("Conv", ["r2", "c3b"], ["b"], name="conv3b", pads=[1] * 4),
        helper.make_node("Concat", ["a", "b"], ["cat"], name="cat", axis=1),
        helper.make_node("Relu", ["cat"], ["r3"], name="relu3"),
        helper.make_node("Conv", ["r3", "c4", "c4_b"], ["y4"], name="conv4"),
        helper.make_node("GlobalAveragePool", ["y4"], ["pool"], name="pool"),
        helper.make_node("Flatten", ["pool"], ["flat"], name="flatten"),
        helper.make_node("Gemm", ["flat", "fc", "fc_b"], ["y"], name="fc", transB=1),
    ]
    return build(nodes, {"x": ["N", 3, 12, 12]}, {"y": ["N", 5]}, weights)


def error(model: ir.Model, reference: ir.Model, samples) -> float:
    expected = run(reference, samples)
    return float(np.linalg.norm(run(model, samples) - expected) / np.linalg.norm(expected))


def test_pruned_model_is_smaller_valid_and_records_what_it_kept():
    model = branchy_net()
    samples = feeds(model, count=16)
    report = prune_structured(model, samples, StructuredSettings(ratio=0.5, recover=False))
    onnx.checker.check_model(ir.to_proto(model), full_check=True)
    assert run(model, samples[:2]).shape == (10,)
    assert {group.name for group in report.groups} == {"conv2", "conv3a", "conv3b"}
    assert report.removed == 16
    for group in report.groups:
        assert list(group.keep) == sorted(group.keep) and 0 < group.kept < group.channels
    assert {item.node: item.reason for item in report.unprunable} == {
        "conv1": "first or last layer (protect_first_last)",
        "conv4": "first or last layer (protect_first_last)",
        "fc": "reaches the model output",
    }
    assert report.parameters_after < report.parameters_before
    assert report.macs_after < report.macs_before
    assert (report.parameters_after, report.macs_after) == model_statistics(model)
    assert model.graph.initializers["c4"].const_value.shape[1] == 8


def without_reading(untouched: ir.Model, report) -> ir.Model:
    """``untouched`` with the layers that read each group's cut channels reading zeros
    there instead: what the pruned model must compute."""
    groups = {group.name: group for group in find_channel_groups(untouched)[0]}
    for pruned in report.groups:
        group = groups[pruned.name]
        removed = np.setdiff1d(np.arange(group.channels), pruned.keep)
        for piece in group.consumers:
            value = untouched.graph.initializers[piece.tensor]
            array = value.const_value.numpy().copy()
            index = [slice(None)] * array.ndim
            index[piece.axis] = piece.offset + removed
            array[tuple(index)] = 0
            value.const_value = ir.tensor(array)
    return untouched


def test_cutting_a_channel_is_the_same_as_never_reading_it():
    model = branchy_net()
    samples = feeds(model, count=4)
    settings = StructuredSettings(ratio=0.5, importance="magnitude", recover=False)
    report = prune_structured(model, [], settings)
    expected = run(without_reading(branchy_net(), report), samples)
    np.testing.assert_allclose(run(model, samples), expected, atol=1e-4)


def test_a_zero_padded_shortcut_prunes_like_never_reading_the_channels():
    model = padded_shortcut_net()
    samples = feeds(model, count=4)
    settings = StructuredSettings(
        ratio=0.5, importance="magnitude", recover=False, protect_first_last=False
    )
    report = prune_structured(model, [], settings)
    cut = {pruned.name: pruned for pruned in report.groups if pruned.kept < pruned.channels}
    assert "pad padding after" in cut
    pads = model.graph.initializers["pads"].const_value.numpy()
    assert pads[5] == cut["pad padding after"].kept
    expected = run(without_reading(padded_shortcut_net(), report), samples)
    np.testing.assert_allclose(run(model, samples), expected, atol=1e-4)


def test_recovery_brings_the_output_closer_to_the_original():
    original = branchy_net()
    calibration, held = feeds(original, count=32), feeds(original, count=8, seed=7)
    errors = {}
    for recover in (False, True):
        model = branchy_net()
        prune_structured(model, calibration, StructuredSettings(ratio=0.5, recover=recover))
        errors[recover] = error(model, original, held)
    assert errors[True] < 0.8 * errors[False]


class CountedReads(list):
    """Feeds that record how many samples each pass over them read."""

    def __init__(self, items):
        super().__init__(items)
        self.reads: list[int] = []

    def __iter__(self):
        self.reads.append(0)
        for item in super().__iter__():
            self.reads[-1] += 1
            yield item


def test_each_refit_reads_only_the_samples_it_needs(monkeypatch):
    """A convolution sees 144 positions a sample and stops after MIN_REFIT_SAMPLES; the
    classifier sees one row a sample and reads them all."""
    monkeypatch.setattr(structured, "MIN_REFIT_SAMPLES", 4)
    monkeypatch.setattr(structured, "REFIT_ROWS_PER_COLUMN", 16)
    model = branchy_net()
    samples = CountedReads(feeds(model, count=40))
    settings = StructuredSettings(ratio=0.5, importance="magnitude", protect_first_last=False)
    report = prune_structured(model, samples, settings)
    assert "fc" in report.refitted and "conv3b" in report.refitted
    assert min(samples.reads) == 4
    assert max(samples.reads) == 40


def test_a_flops_target_is_met_and_residual_groups_prune_together():
    model = residual_net()
    before = model_statistics(model)[1]
    settings = StructuredSettings(flops=0.2, protect_first_last=False, round_to=2)
    report = prune_structured(model, feeds(model, count=8), settings)
    assert report.macs_after <= 0.8 * before
    assert all(group.kept % 2 == 0 for group in report.groups)
    run(model, feeds(model, count=1))
    assert model.graph.node(4).attributes.get_int("group") == report.groups[0].kept


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (StructuredSettings(ratio=1.0), "outside"),
        (StructuredSettings(), "exactly one target"),
        (StructuredSettings(ratio=0.3, flops=0.3), "exactly one target"),
        (StructuredSettings(flops=0.95, importance="magnitude", recover=False), "cannot remove"),
        (StructuredSettings(ratio=0.5, importance="taylor", recover=False), "calibration data"),
        (StructuredSettings(ratio=0.5), "calibration data"),
    ],
)
def test_bad_targets_are_input_errors_with_a_fix(settings, message):
    model = branchy_net()
    samples = []
    with pytest.raises(InputError, match=message) as raised:
        prune_structured(model, samples, settings)
    assert raised.value.fix


def test_nothing_to_prune_names_the_reasons():
    model = residual_net()
    settings = StructuredSettings(ratio=0.5, importance="magnitude", recover=False)
    with pytest.raises(InputError, match="protect_first_last"):
        prune_structured(model, [], settings)


FFN = 32


def encoder_with_ffn(layers: int = 2) -> ir.Model:
    """The attention encoder of ``test_attention`` with a feed-forward block (MatMul, Tanh,
    MatMul, residual) after each attention block."""
    rng = np.random.default_rng(11)
    builder = _Builder("computed")
    x = "x"
    for index, weights in enumerate(_weights()[:layers]):
        # The last head and half the neurons add little: the ones to cut.
        weights = dict(weights, wo=weights["wo"] * np.repeat([1, 1, 1, 0.05], HEAD_DIM)[:, None])
        x = builder.layer(x, index, {n: w.astype(np.float32) for n, w in weights.items()}, False)
        up = builder.constant(f"l{index}_w1", rng.standard_normal((D_MODEL, FFN)) * 0.3)
        up_bias = builder.constant(f"l{index}_b1", rng.standard_normal(FFN) * 0.1)
        down = rng.standard_normal((FFN, D_MODEL)) * np.repeat([0.3, 0.01], FFN // 2)[:, None]
        down = builder.constant(f"l{index}_w2", down)
        hidden = builder.add(
            "Tanh", [builder.add("Add", [builder.add("MatMul", [x, up]), up_bias])]
        )
        x = builder.add("Add", [x, builder.add("MatMul", [hidden, down])])
    builder.nodes.append(helper.make_node("Identity", [x], ["y"], name="output"))
    graph = helper.make_graph(
        builder.nodes,
        "encoder",
        [
            helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["batch", SEQ, D_MODEL]),
            helper.make_tensor_value_info("mask", onnx.TensorProto.FLOAT, ["batch", 1, 1, SEQ]),
        ],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["batch", SEQ, D_MODEL])],
        [
            onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(t).astype(np.float32), t.name)
            if t.data_type == onnx.TensorProto.DOUBLE
            else t
            for t in builder.initializers
        ],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(proto, full_check=True)
    return ir.from_proto(proto)


def token_feeds(count: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [
        {
            "x": rng.standard_normal((1, SEQ, D_MODEL)).astype(np.float32),
            "mask": np.zeros((1, 1, 1, SEQ), np.float32),
        }
        for _ in range(count)
    ]


def test_a_transformer_loses_heads_and_ffn_neurons_and_recovery_keeps_it_close():
    original = encoder_with_ffn()
    calibration, held = token_feeds(64), token_feeds(8, seed=5)
    errors, reports = {}, {}
    for recover in (False, True):
        model = encoder_with_ffn()
        settings = StructuredSettings(flops=0.3, recover=recover, protect_first_last=False)
        reports[recover] = report = prune_structured(model, calibration, settings)
        onnx.checker.check_model(ir.to_proto(model), full_check=True)
        errors[recover] = error(model, original, held)
    kinds = {group.kind for group in report.groups if group.kept < group.channels}
    assert kinds == {"heads", "neurons"}
    assert report.macs_after <= 0.7 * report.macs_before
    assert errors[True] < errors[False] and errors[True] < 0.15


@pytest.mark.parametrize("target", [{"ratio": 0.5}, {"flops": 0.4}])
def test_uniform_allocation_cuts_every_group_by_the_same_share(target):
    model = branchy_net()
    samples = feeds(model, count=16)
    settings = StructuredSettings(allocation="uniform", protect_first_last=False, **target)
    report = prune_structured(model, samples, settings)
    shares = {round(1 - group.kept / group.channels, 2) for group in report.groups}
    assert len(shares) == 1 and shares.pop() > 0
    if "ratio" in target:
        assert report.removed >= 0.5 * sum(group.channels for group in report.groups)
    else:
        assert report.macs_after <= 0.6 * report.macs_before
    assert run(model, samples).shape == run(branchy_net(), samples).shape


def test_a_model_without_layers_says_where_layers_are_looked_for():
    model = build([helper.make_node("Relu", ["x"], ["y"])], {"x": [1, 4]}, {"y": [1, 4]}, {})
    with pytest.raises(InputError, match="in the main graph"):
        prune_structured(model, feeds(model), StructuredSettings(ratio=0.5, recover=False))


def _self_prediction_loss(model: ir.Model, sample: dict, targets: np.ndarray) -> float:
    logits = run(model, [sample]).reshape(-1, 5).astype(np.float64)
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_probabilities = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    return float(-log_probabilities[np.arange(len(targets)), targets].mean())


def test_fisher_scores_are_the_mean_squared_gradient_of_a_channel_mask():
    pytest.importorskip("torch")
    model = branchy_net()
    samples = feeds(model, count=3)
    group = next(g for g in find_channel_groups(model)[0] if g.name == "conv2")
    (scores,) = _fisher_scores(model, [group], samples, QUIET)
    step = 1e-3
    for channel in (0, 5):
        squares = []
        for sample in samples:
            targets = run(model, [sample]).reshape(-1, 5).argmax(axis=1)
            losses = []
            for factor in (1 + step, 1 - step):
                masked = branchy_net()
                for piece in group.consumers:  # the channel scaled where conv3a and conv3b read it
                    value = masked.graph.initializers[piece.tensor]
                    array = value.const_value.numpy().copy()
                    index = [slice(None)] * array.ndim
                    index[piece.axis] = piece.offset + channel
                    array[tuple(index)] *= factor
                    value.const_value = ir.tensor(array)
                losses.append(_self_prediction_loss(masked, sample, targets))
            squares.append(((losses[0] - losses[1]) / (2 * step)) ** 2)
        assert scores[channel] == pytest.approx(np.mean(squares), rel=0.02, abs=1e-9)


def test_fisher_importance_prunes_a_valid_model():
    pytest.importorskip("torch")
    model = branchy_net()
    samples = feeds(model, count=8)
    report = prune_structured(model, samples, StructuredSettings(ratio=0.5, importance="fisher"))
    assert report.importance == "fisher" and report.removed == 16
    assert run(model, samples).shape == run(branchy_net(), samples).shape


def siamese_net() -> ir.Model:
    """Two branches that share their weights: y_a = fc2(relu(fc1(a))), y_b the same of b."""
    weights = random_weights(fc1=(8, 16), fc2=(16, 4), fc2_b=(4,))
    nodes = []
    for branch in ("a", "b"):
        nodes += [
            helper.make_node("Gemm", [branch, "fc1"], [f"h_{branch}"], name=f"fc1_{branch}"),
            helper.make_node("Relu", [f"h_{branch}"], [f"r_{branch}"], name=f"relu_{branch}"),
            helper.make_node(
                "Gemm", [f"r_{branch}", "fc2", "fc2_b"], [f"y_{branch}"], name=f"fc2_{branch}"
            ),
        ]
    return build(nodes, {"a": ["N", 8], "b": ["N", 8]}, {"y_a": ["N", 4], "y_b": ["N", 4]}, weights)


def siamese_samples(count: int) -> list[dict[str, np.ndarray]]:
    """Each branch sees inputs of its own scale on its own features."""
    rng = np.random.default_rng(4)
    scale = np.array([3.0] * 4 + [0.1] * 4, dtype=np.float32)
    return [
        {
            "a": (rng.standard_normal((4, 8)) * scale).astype(np.float32),
            "b": (rng.standard_normal((4, 8)) * scale[::-1]).astype(np.float32),
        }
        for _ in range(count)
    ]


def test_layers_sharing_a_weight_are_refitted_once_on_the_rows_of_both():
    # Each branch sees inputs of its own scale on its own features: a weight fitted on one
    # branch's rows alone would serve the other badly.
    samples = siamese_samples(48)
    calibration, held = samples[:40], samples[40:]
    original = siamese_net()
    reference = runtime.create_session(original)
    errors = {}
    for recover in (False, True):
        model = siamese_net()
        settings = StructuredSettings(ratio=0.5, recover=recover, protect_first_last=False)
        report = prune_structured(model, calibration, settings)
        session = runtime.create_session(model)
        for index, name in enumerate(("y_a", "y_b")):
            want = np.concatenate([reference.run(None, s)[index] for s in held])
            got = np.concatenate([session.run(None, s)[index] for s in held])
            errors[recover, name] = np.linalg.norm(got - want) / np.linalg.norm(want)
    assert {"fc2_a", "fc2_b"} <= set(report.refitted)
    assert len([value for value in model.graph.initializers if value.startswith("fc2")]) == 2
    for name in ("y_a", "y_b"):
        assert errors[True, name] < errors[False, name], errors


def quantized_net() -> ir.Model:
    weights = {"w": np.arange(-6, 6, dtype=np.int8).reshape(4, 3), "scale": np.float32(0.1)}
    nodes = [
        helper.make_node("DequantizeLinear", ["w", "scale"], ["w_float"], name="dequantize"),
        helper.make_node("MatMul", ["x", "w_float"], ["h"], name="fc1"),
        helper.make_node("Relu", ["h"], ["y"], name="relu"),
    ]
    return build(nodes, {"x": ["N", 4]}, {"y": ["N", 3]}, weights)


def test_a_model_quantized_already_is_named_as_such_with_the_fix():
    model = quantized_net()
    for prune in (
        lambda: prune_structured(model, feeds(model), StructuredSettings(ratio=0.5)),
        lambda: sparsify_model(model, feeds(model), SparsitySettings(ratio=0.5)),
    ):
        with pytest.raises(InputError, match=r"already quantized.*DequantizeLinear") as error:
            prune()
        assert "float model" in error.value.fix


@pytest.mark.parametrize("recipe", ["prune", "sparsify"])
def test_the_cli_refuses_a_model_quantized_already_and_writes_nothing(recipe, tmp_path, capsys):
    source, output, data = tmp_path / "m.onnx", tmp_path / "out.onnx", tmp_path / "calib.npz"
    model = quantized_net()
    ir.save(model, source)
    np.savez(data, x=np.stack([feed["x"] for feed in feeds(model, count=8)]))
    arguments = ["optimize", source, "-o", output, "--recipe", recipe, "--calib", data]
    assert main([str(argument) for argument in arguments]) == 2
    assert not output.exists()
    error = capsys.readouterr().err
    assert "already quantized" in error and "Traceback" not in error
