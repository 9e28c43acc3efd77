"""Sparsity: masks by pattern, SparseGPT's reconstruction, the model-level driver, the pass,
and the errors a user reads."""

from __future__ import annotations

import json

import numpy as np
import onnx_ir as ir
import pytest
from onnx import helper

from onnxopt import runtime
from onnxopt.calibration.moments import collect_hessians
from onnxopt.cli import main
from onnxopt.errors import InputError
from onnxopt.pruning import SparsitySettings, parse_pattern, sparsify, sparsify_model
from onnxopt.pruning.allocation import MAX_LAYER_RATIO, candidate_ratios, global_ratios
from onnxopt.pruning.importance import gradient_magnitudes
from onnxopt.pruning.patterns import n_m_mask, smallest_mask
from onnxopt.pruning.sparsegpt import refit, sparsegpt
from tests.pruning.test_structured import siamese_net, siamese_samples
from tests.quantization.helpers import build, cosine, feeds, random_weights, run

# The allocations ``auto`` prunes and judges.
AUTO_CANDIDATES = {
    "uniform",
    "0.5 of the way to global",
    "global",
    "0.5 of the way to sensitivity",
    "sensitivity",
}


def correlated_inputs(columns: int, count: int, seed: int = 0) -> np.ndarray:
    """Inputs whose columns correlate, as real activations do: where reconstruction pays."""
    rng = np.random.default_rng(seed)
    mixing = rng.standard_normal((columns, columns)) * 0.5 + np.eye(columns)
    return rng.standard_normal((count, columns)) @ mixing


def test_patterns_parse_and_refuse_with_the_fix():
    assert parse_pattern("unstructured").structured is False
    pattern = parse_pattern("2:4")
    assert (pattern.keep, pattern.group, pattern.ratio) == (2, 4, 0.5)
    for bad in ("4:2", "0:4", "half", "2-4"):
        with pytest.raises(InputError, match="N:M with 0 < N < M"):
            parse_pattern(bad)


def test_masks_prune_the_lowest_scores_by_row_by_matrix_and_by_group():
    scores = np.random.default_rng(1).random((6, 16))
    per_row = smallest_mask(scores, 0.25, per_row=True)
    assert (per_row.sum(axis=1) == 4).all()
    assert (scores[per_row].max() <= scores[~per_row].max()) and per_row.dtype == bool
    whole = smallest_mask(scores, 0.5, per_row=False)
    assert whole.sum() == 48 and scores[whole].max() < scores[~whole].min()
    grouped = n_m_mask(scores, parse_pattern("2:4"))
    assert (grouped.reshape(6, 4, 4).sum(axis=2) == 2).all()
    kept = np.where(grouped, np.inf, scores).reshape(6, 4, 4).min(axis=2)
    pruned = np.where(grouped, scores, -np.inf).reshape(6, 4, 4).max(axis=2)
    assert (pruned <= kept).all()


@pytest.mark.parametrize("pattern", ["unstructured", "2:4", "1:8"])
def test_sparsegpt_keeps_the_output_closer_than_masking_alone(pattern):
    rng = np.random.default_rng(2)
    inputs = correlated_inputs(64, 512)
    hessian = inputs.T @ inputs / len(inputs)
    rows = rng.standard_normal((24, 64))
    parsed = parse_pattern(pattern)
    pruned = sparsegpt(rows, hessian, parsed, 0.5)
    zeros = pruned == 0
    if parsed.structured:
        kept = (~zeros).reshape(24, -1, parsed.group).sum(axis=2)
        assert (kept == parsed.keep).all()
    else:
        assert zeros.mean() == pytest.approx(0.5, abs=0.01)
    masked = np.where(zeros, 0.0, rows)

    def error(weights):
        return float(np.linalg.norm(inputs @ (weights - rows).T))

    # The least-squares optimum for the same zeros bounds what any update can reach; SparseGPT
    # (which moves only the columns after each zero) gets most of the way there.
    optimal = rows.copy()
    for row in range(len(rows)):
        kept, dropped = ~zeros[row], zeros[row]
        optimal[row, dropped] = 0.0
        optimal[row, kept] += np.linalg.solve(
            hessian[np.ix_(kept, kept)], hessian[np.ix_(kept, dropped)] @ rows[row, dropped]
        )
    assert error(optimal) <= error(pruned) < error(masked)
    assert error(pruned) - error(optimal) < 0.6 * (error(masked) - error(optimal))
    # The refit lets every kept weight move: most of the rest of the way, the zeros kept.
    refitted = refit(pruned, rows, hessian, steps=30, damping=0.0)
    assert ((refitted == 0) == zeros).all()
    assert error(refitted) - error(optimal) < 0.2 * (error(pruned) - error(optimal))
    # A mask chosen by another importance is kept exactly, and reconstruction still helps.
    given = smallest_mask(np.abs(rows), 0.5, per_row=True)
    reconstructed = sparsegpt(rows, hessian, parse_pattern("unstructured"), 0.5, mask=given)
    assert ((reconstructed == 0) == given).all()
    assert error(reconstructed) < error(np.where(given, 0.0, rows))


def conv_net() -> ir.Model:
    """Conv -> Relu -> Conv -> Relu -> GlobalAveragePool -> Flatten -> Gemm -> Gemm."""
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1], name="stem"),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], pads=[1, 1, 1, 1], name="body"),
        helper.make_node("Relu", ["c2"], ["r2"]),
        helper.make_node("Conv", ["r2", "w3"], ["c3"], name="pointwise"),
        helper.make_node("GlobalAveragePool", ["c3"], ["p"]),
        helper.make_node("Flatten", ["p"], ["f"]),
        helper.make_node("Gemm", ["f", "w4", "b4"], ["g"], transB=1, name="hidden"),
        helper.make_node("Gemm", ["g", "w5"], ["y"], transB=1, name="head"),
    ]
    weights = random_weights(
        3,
        w1=(16, 3, 3, 3),
        b1=(16,),
        w2=(16, 16, 3, 3),
        b2=(16,),
        w3=(32, 16, 1, 1),
        w4=(32, 32),
        b4=(32,),
        w5=(10, 32),
    )
    return build(nodes, {"x": [1, 3, 8, 8]}, {"y": [1, 10]}, weights)


def test_sparsify_model_zeros_half_of_every_inner_layer_and_reconstruction_keeps_it_close():
    """Uniform allocation: every pruned layer loses the same share."""
    samples = feeds(conv_net(), count=48)
    reference = run(conv_net(), samples)
    results = {}
    for importance, reconstruct in [("magnitude", False), ("sparsegpt", True)]:
        model = conv_net()
        settings = SparsitySettings(
            ratio=0.5, importance=importance, reconstruct=reconstruct, allocation="uniform"
        )
        report = sparsify_model(model, samples[:32], settings)
        assert [layer.node for layer in report.layers] == ["body", "pointwise", "hidden"]
        assert set(report.dense) == {"stem", "head"}
        for layer in report.layers:
            assert layer.sparsity == pytest.approx(0.5, abs=0.01)
            weight = model.graph.initializers[layer.weight].const_value.numpy()
            assert np.mean(weight == 0) == pytest.approx(0.5, abs=0.01)
        stem = model.graph.initializers["w1"].const_value.numpy()
        assert not (stem == 0).any()
        results[importance] = cosine(run(model, samples[32:]), reference[-16 * 10 :])
    assert results["sparsegpt"] > results["magnitude"]
    assert results["sparsegpt"] > 0.95


def test_global_allocation_prunes_the_least_salient_layers_most_at_the_same_total():
    rng = np.random.default_rng(4)
    layer_saliencies = {
        "robust": rng.random(1000) * 0.01,
        "sensitive": rng.random(3000),
        "middling": rng.random(2000) * 0.5,
    }
    ratios = global_ratios(layer_saliencies, 0.5)
    pruned = sum(ratios[name] * values.size for name, values in layer_saliencies.items())
    assert pruned == pytest.approx(3000, rel=0.01)
    assert ratios["robust"] == MAX_LAYER_RATIO
    assert ratios["robust"] > ratios["middling"] > ratios["sensitive"]
    blends = candidate_ratios(layer_saliencies, 0.5)
    assert blends[0] == dict.fromkeys(layer_saliencies, 0.5) and blends[-1] == ratios


def test_auto_allocation_keeps_the_candidate_closest_to_the_original():
    samples = feeds(conv_net(), count=48)
    reference = run(conv_net(), samples[32:])
    model = conv_net()
    report = sparsify_model(model, samples[:32], SparsitySettings(ratio=0.6))
    assert set(report.candidate_closeness) == AUTO_CANDIDATES
    assert report.allocation == max(report.candidate_closeness, key=report.candidate_closeness.get)
    assert report.sparsity == pytest.approx(0.6, abs=0.02)
    uniform = conv_net()
    sparsify_model(uniform, samples[:32], SparsitySettings(ratio=0.6, allocation="uniform"))
    if report.allocation != "uniform":
        assert len({round(layer.sparsity, 2) for layer in report.layers}) > 1
    assert (
        cosine(run(model, samples[32:]), reference)
        >= cosine(run(uniform, samples[32:]), reference) - 0.01
    )


def test_layers_without_measured_inputs_keep_the_share_and_the_others_are_allocated(
    monkeypatch,
):
    # The budget for input moments runs out at 'body' (graph order): it is pruned by magnitude
    # at the share asked, and the allocation shares the rest among the layers measured.
    stem, body = 2 * 27 * 27 * 4, 2 * 144 * 144 * 4
    monkeypatch.setattr(sparsify, "MAX_HESSIAN_BYTES", stem + body - 1)
    model = conv_net()
    settings = SparsitySettings(ratio=0.5, allocation="global", protect_first_last=False)
    report = sparsify_model(model, feeds(model, count=32), settings)
    assert report.allocation == "global"
    layers = {layer.node: layer for layer in report.layers}
    assert layers["body"].method == "magnitude" and layers["body"].sparsity == pytest.approx(0.5)
    measured = [layer for name, layer in layers.items() if name != "body"]
    assert all(layer.method == "sparsegpt + reconstruction" for layer in measured)
    assert len({round(layer.sparsity, 2) for layer in measured}) > 1
    zeros = sum(layer.parameters * layer.sparsity for layer in measured)
    assert zeros / sum(layer.parameters for layer in measured) == pytest.approx(0.5, abs=0.01)


def test_a_layer_with_too_few_rows_is_pruned_by_input_power_and_not_moved():
    # Six samples give the Gemm after the pooling six rows for 32 columns: its columns' power
    # is measured, their correlations are not, so the smallest w^2 * power go, no weight moves,
    # and it keeps the share asked for while the allocation moves the others.
    samples = feeds(conv_net(), count=6)
    model = conv_net()
    settings = SparsitySettings(ratio=0.5, allocation="global", protect_first_last=False)
    report = sparsify_model(model, samples, settings)
    layers = {layer.node: layer for layer in report.layers}
    assert layers["hidden"].method == "sparsegpt (input power alone: too few rows to reconstruct)"
    assert layers["body"].method == "sparsegpt + reconstruction"
    original = conv_net()
    hidden = next(node for node in original.graph if node.name == "hidden")
    (moments,) = collect_hessians(original, [hidden], samples, few_rows_diagonal=True).values()
    power = np.diag(moments.fit[0])
    weight = original.graph.initializers["w4"].const_value.numpy()
    pruned = model.graph.initializers["w4"].const_value.numpy()
    zero = pruned == 0
    np.testing.assert_array_equal(pruned[~zero], weight[~zero])
    scores = weight**2 * (power + 0.01 * power.mean())[None, :]
    assert zero.mean() == pytest.approx(0.5) and scores[zero].max() <= scores[~zero].min()
    assert report.allocation == "global"
    assert len({round(layers[name].sparsity, 2) for name in ("stem", "body", "pointwise")}) > 1


@pytest.mark.parametrize("importance", ["wanda", "gradient", "taylor"])
def test_other_importances_prune_the_same_share(importance):
    pytest.importorskip("torch", reason="the torch extra is not installed")
    model = conv_net()
    settings = SparsitySettings(ratio=0.3, importance=importance, reconstruct=False)
    report = sparsify_model(model, feeds(model, count=8), settings)
    assert all(layer.method == importance for layer in report.layers)
    assert report.sparsity == pytest.approx(0.3, abs=0.01)


def test_n_m_leaves_layers_it_cannot_divide_dense_and_says_why():
    model = conv_net()
    settings = SparsitySettings(pattern=parse_pattern("2:4"), protect_first_last=False)
    report = sparsify_model(model, feeds(model, count=16), settings)
    assert report.dense == {"stem": "27 input columns do not divide into 2:4"}
    assert {layer.node for layer in report.layers} == {"body", "pointwise", "hidden", "head"}


def test_bad_settings_are_input_errors_naming_the_fix():
    model = conv_net()
    with pytest.raises(InputError, match="needs calibration data"):
        sparsify_model(model, [], SparsitySettings())
    with pytest.raises(InputError, match=r"outside \[0, 1\)"):
        sparsify_model(model, feeds(model), SparsitySettings(ratio=1.0))
    with pytest.raises(InputError, match="no layer to prune"):
        sparsify_model(model, feeds(model), SparsitySettings(exclude=(".*",)))
    untouched = conv_net()
    assert all(
        np.array_equal(
            value.const_value.numpy(), untouched.graph.initializers[name].const_value.numpy()
        )
        for name, value in model.graph.initializers.items()
    )


def test_the_sparsify_preset_writes_a_sparse_model_and_reports_each_layer(tmp_path):
    model = conv_net()
    source, output, report = tmp_path / "m.onnx", tmp_path / "out.onnx", tmp_path / "r.json"
    ir.save(model, source)
    data = tmp_path / "calib.npz"
    np.savez(data, x=np.stack([sample["x"] for sample in feeds(model, count=96)]))
    arguments = ["optimize", source, "-o", output, "--recipe", "sparsify", "--calib", data]
    ratio = ["--set", "sparsify.ratio=0.5", "--set", "validate.min_cosine=0.9"]
    ratio += ["--set", "validate.min_top1_agreement=none"]
    assert main([str(a) for a in [*arguments, *ratio, "--report", report]]) == 0
    document = json.loads(report.read_text())
    assert document["sparsity"]["sparsity"] == pytest.approx(0.5, abs=0.02)
    assert document["sparsity"]["allocation"] in document["sparsity"]["candidate_closeness"]
    assert {layer["node"] for layer in document["sparsity"]["layers"]} == {
        "body",
        "pointwise",
        "hidden",
    }
    written = ir.load(output)
    zeros = {
        layer["weight"]: np.mean(
            written.graph.initializers[layer["weight"]].const_value.numpy() == 0
        )
        for layer in document["sparsity"]["layers"]
    }
    assert zeros == pytest.approx(
        {layer["weight"]: layer["sparsity"] for layer in document["sparsity"]["layers"]}
    )


@pytest.mark.parametrize(
    "option",
    [
        "sparsify.ratio=1.5",
        "sparsify.ratio=most",
        "sparsify.min_cosine=2",
        "sparsify.finetune_samples=1",
        "sparsify.pattern=4:2",
        "sparsify.importance=random",
        "sparsify.allocation=sensitive",
    ],
)
def test_bad_sparsify_options_exit_2_and_write_nothing(tmp_path, option, capsys):
    source, output = tmp_path / "m.onnx", tmp_path / "out.onnx"
    ir.save(conv_net(), source)
    code = main(
        ["optimize", str(source), "-o", str(output), "--recipe", "sparsify", "--set", option]
    )
    assert code == 2 and not output.exists()
    assert "sparsify" in capsys.readouterr().err


def test_without_data_the_preset_says_how_to_give_it(tmp_path, capsys):
    source, output = tmp_path / "m.onnx", tmp_path / "out.onnx"
    ir.save(conv_net(), source)
    assert main(["optimize", str(source), "-o", str(output), "--recipe", "sparsify"]) == 2
    assert not output.exists()
    assert "--calib" in capsys.readouterr().err


def test_finetune_steps_keep_the_zeros_and_never_end_worse(tmp_path):
    pytest.importorskip("torch", reason="the torch extra is not installed")
    source, output, report = tmp_path / "m.onnx", tmp_path / "out.onnx", tmp_path / "r.json"
    ir.save(conv_net(), source)
    data = tmp_path / "calib.npz"
    np.savez(data, x=np.stack([sample["x"] for sample in feeds(conv_net(), count=64)]))
    arguments = ["optimize", source, "-o", output, "--recipe", "sparsify", "--calib", data]
    options = ["sparsify.ratio=0.6", "sparsify.finetune_steps=20", "validate.min_cosine=0.8"]
    options += ["validate.min_top1_agreement=none"]
    settings = [part for option in options for part in ("--set", option)]
    assert main([str(a) for a in [*arguments, *settings, "--report", report]]) == 0
    document = json.loads(report.read_text())
    finetune = document["finetune"]
    assert finetune["held_out_after"] <= finetune["held_out_before"]
    assert finetune["features"] == 3 and finetune["steps"] > 0
    written = ir.load(output)
    for layer in document["sparsity"]["layers"]:
        weight = written.graph.initializers[layer["weight"]].const_value.numpy()
        assert np.mean(weight == 0) >= layer["sparsity"] - 1e-6


def test_unnamed_layers_are_named_and_all_pruned():
    model = conv_net()
    for node in model.graph:
        node.name = ""
    report = sparsify_model(model, feeds(model, count=8), SparsitySettings(ratio=0.5))
    assert len(report.layers) == 3 and len({layer.node for layer in report.layers}) == 3
    assert all(layer.sparsity == pytest.approx(0.5, abs=0.02) for layer in report.layers)


def test_gradients_with_labels_use_the_task_loss():
    pytest.importorskip("torch", reason="the torch extra is not installed")
    model = conv_net()
    samples = feeds(model, count=4)
    names = [node.inputs[1].name for node in model.graph if node.op_type in ("Conv", "Gemm")]
    own = [run(model, [sample]).reshape(1, -1).argmax(axis=1) for sample in samples]
    other = [(label + 1) % run(model, samples[:1]).size for label in own]
    self_prediction = gradient_magnitudes(model, samples, names)
    with_own_labels = gradient_magnitudes(model, samples, names, labels=own)
    with_other_labels = gradient_magnitudes(model, samples, names, labels=other)
    for name in names:
        np.testing.assert_allclose(with_own_labels[name], self_prediction[name], rtol=1e-5)
    assert not np.allclose(with_other_labels[names[-1]], self_prediction[names[-1]])
    with pytest.raises(InputError, match="do not fit output"):
        gradient_magnitudes(model, samples, names, labels=[np.array([1, 2])] * 4)
    settings = SparsitySettings(ratio=0.3, importance="gradient", reconstruct=False)
    assert sparsify_model(model, samples, settings, labels=other).gradient_loss == "labels"
    assert sparsify_model(conv_net(), samples, settings).gradient_loss == "self-prediction"


def test_labels_need_a_class_score_output():
    pytest.importorskip("torch", reason="the torch extra is not installed")
    model = conv_net()
    model.graph.outputs[0].shape = ir.Shape(["N", 4, 1, 1])  # not [batch, classes]
    with pytest.raises(InputError, match="no output of the model holds class scores"):
        gradient_magnitudes(model, feeds(model, count=1), ["w"], labels=[np.array([0])])


def branch_errors(model: ir.Model, reference: ir.Model, samples) -> dict[str, float]:
    expected = runtime.create_session(reference)
    actual = runtime.create_session(model)
    errors = {}
    for index, name in enumerate(("y_a", "y_b")):
        want = np.concatenate([expected.run(None, sample)[index] for sample in samples])
        got = np.concatenate([actual.run(None, sample)[index] for sample in samples])
        errors[name] = float(np.linalg.norm(got - want) / np.linalg.norm(want))
    return errors


def test_a_weight_layers_share_is_pruned_once_for_the_inputs_of_all(monkeypatch):
    # The two branches see their own features: reconstructing the shared weight for the first
    # branch's inputs alone would serve the second badly.
    samples = siamese_samples(48)
    calibration, held = samples[:40], samples[40:]
    settings = SparsitySettings(ratio=0.5, protect_first_last=False, allocation="uniform")
    errors = {}
    for pooled in (True, False):
        if not pooled:  # each reader measured alone: the weight is fitted to the first's inputs

            def unshared(*arguments, shared=None, **options):
                return collect_hessians(*arguments, **options)

            monkeypatch.setattr(sparsify, "collect_hessians", unshared)
        model = siamese_net()
        report = sparsify_model(model, calibration, settings)
        errors[pooled] = branch_errors(model, siamese_net(), held)
    assert [layer.node for layer in report.layers] == ["fc1_a", "fc2_a"]
    assert all("shared by 2 layers" in layer.method for layer in report.layers)
    weight = model.graph.initializers["fc2"]
    assert len(weight.uses()) == 2
    assert np.mean(weight.const_value.numpy() == 0) == pytest.approx(0.5)
    assert errors[True]["y_b"] < errors[False]["y_b"], errors
    assert max(errors[True].values()) < max(errors[False].values()), errors


def unrolled_steps(steps: int, columns: int, outputs: int) -> ir.Model:
    """``steps`` Gemms, each reading an input of its own, a row a sample, with one weight (the
    time steps of an RNN an exporter unrolled), their outputs summed."""
    nodes = [
        helper.make_node("Gemm", [f"x{step}", "w"], [f"h{step}"], name=f"step{step}")
        for step in range(steps)
    ]
    nodes.append(helper.make_node("Sum", [f"h{step}" for step in range(steps)], ["y"]))
    inputs = {f"x{step}": [1, columns] for step in range(steps)}
    return build(nodes, inputs, {"y": [1, outputs]}, random_weights(w=(columns, outputs)))


def test_layers_sharing_a_weight_pool_their_rows_to_be_measured():
    # Eight time steps read one weight: 8 samples give each too few rows for its 64 columns,
    # all of them together enough for SparseGPT.
    model = unrolled_steps(8, columns=64, outputs=16)
    settings = SparsitySettings(ratio=0.5, protect_first_last=False)
    report = sparsify_model(model, feeds(model, count=8), settings)
    (layer,) = report.layers
    assert layer.method.startswith("sparsegpt + reconstruction (weight shared by 8 layers")


def test_readers_of_a_shared_weight_get_one_h_over_all_their_inputs_held_once():
    model = unrolled_steps(6, columns=8, outputs=4)
    samples = feeds(model, count=64)
    readers = [node for node in model.graph if node.op_type == "Gemm"]
    alone = collect_hessians(model, readers, samples)
    one_h = 2 * 8 * 8 * 4  # fit and check, float32
    shared = collect_hessians(
        model, readers, samples, max_bytes=one_h, shared=dict.fromkeys(alone, "w")
    )
    assert sorted(shared) == sorted(alone)  # all six within the bytes of one
    assert len({id(moments) for moments in shared.values()}) == 1
    mean = np.mean([moments.fit for moments in alone.values()], axis=0)
    np.testing.assert_allclose(shared["step0"].fit, mean, rtol=1e-5, atol=1e-6)
    assert list(collect_hessians(model, readers, samples, max_bytes=one_h)) == ["step0"]


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_sparsegpt_on_a_diagonal_h_chooses_what_its_column_loop_would(pattern):
    rng = np.random.default_rng(3)
    rows = rng.standard_normal((6, 300))
    power = rng.uniform(0.1, 4.0, 300)
    power[7] = 0.0  # an input never seen
    diagonal = np.diag(power)
    nearly = diagonal + 1e-30 * np.ones_like(diagonal)  # takes the loop, moves nothing visible
    fast = sparsegpt(rows, diagonal, parse_pattern(pattern), 0.5)
    loop = sparsegpt(rows, nearly, parse_pattern(pattern), 0.5)
    np.testing.assert_array_equal(fast == 0, loop == 0)
    np.testing.assert_allclose(fast, loop, rtol=1e-9, atol=1e-12)
    assert (fast[:, 7] == 0).all()
    kept = fast != 0
    np.testing.assert_array_equal(fast[kept], rows[kept])
