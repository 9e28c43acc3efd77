"""Recovery after pruning: the fine-tune brings the pruned model closer to the original, keeps
the zeros, never leaves the model worse than one-shot, and repeats with a seed."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from onnxopt import runtime
from onnxopt.errors import InputError
from onnxopt.pruning import SparsitySettings, sparsify_model

pytest.importorskip("torch", reason="the torch extra is not installed")

from onnxopt.pruning.recovery import RecoverySettings, recover

MLP = """
<ir_version: 8, opset_import: ["" : 17]>
mlp (float[N, 16] x) => (float[N, 5] y) {
    a = MatMul (x, w1)
    b = Relu (a)
    c = MatMul (b, w2)
    d = Relu (c)
    e = MatMul (d, w3)
    f = Relu (e)
    y = MatMul (f, w4)
}
"""


def mlp() -> ir.Model:
    rng = np.random.default_rng(0)
    proto = onnx.parser.parse_model(MLP)
    for index, node in enumerate(proto.graph.node):
        node.name = f"{node.op_type.lower()}{index}"  # sparsify tells layers apart by name
    for name, shape in {"w1": (16, 32), "w2": (32, 32), "w3": (32, 32), "w4": (32, 5)}.items():
        weight = (rng.standard_normal(shape) / np.sqrt(shape[0])).astype(np.float32)
        proto.graph.initializer.append(onnx.numpy_helper.from_array(weight, name))
    return ir.from_proto(proto)


def samples(count: int, seed: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal((1, 16)).astype(np.float32)} for _ in range(count)]


def pruned(original: ir.Model) -> tuple[ir.Model, dict[str, np.ndarray]]:
    """w2 and w3 at 60% by magnitude, nothing reconstructed: the outputs move, recovery has work."""
    model = original.clone()
    settings = SparsitySettings(ratio=0.6, importance="magnitude", reconstruct=False)
    report = sparsify_model(model, samples(8, seed=1), settings)
    return model, {layer.weight: weight(model, layer.weight) == 0 for layer in report.layers}


def weight(model: ir.Model, name: str) -> np.ndarray:
    return model.graph.initializers[name].const_value.numpy()


def error(model: ir.Model, original: ir.Model, feeds) -> float:
    """The outputs' distance to the original's, relative to their size."""
    outputs = np.concatenate([row[0] for row in runtime.run(runtime.sample_session(model), feeds)])
    reference = np.concatenate(
        [row[0] for row in runtime.run(runtime.sample_session(original), feeds)]
    )
    return float(np.linalg.norm(outputs - reference) / np.linalg.norm(reference))


FAST = RecoverySettings(epochs=6, learning_rate=1e-2)


def test_recovery_brings_the_outputs_back_and_keeps_the_zeros():
    original = mlp()
    model, zeros = pruned(original)
    assert set(zeros) == {"w2", "w3"}
    unseen = samples(64, seed=2)
    before = error(model, original, unseen)
    result = recover(model, original, samples(128, seed=3), zeros, FAST)
    assert result.kept and result.held_out_after < result.held_out_before
    assert result.held_out_after == min(result.held_out_losses)
    assert result.features == 2 and result.train_samples == 112
    assert error(model, original, unseen) < 0.8 * before
    for name, mask in zeros.items():
        assert (weight(model, name)[mask] == 0).all()
        assert (weight(model, name)[~mask] != 0).mean() > 0.99


def test_a_fine_tune_that_only_hurts_leaves_the_one_shot_weights():
    original = mlp()
    model, zeros = pruned(original)
    one_shot = {name: weight(model, name).copy() for name in ("w1", "w2", "w3", "w4")}
    settings = RecoverySettings(epochs=4, learning_rate=10.0, patience=1, backoff=0)
    result = recover(model, original, samples(32, seed=3), zeros, settings)
    assert not result.kept and result.best_epoch == 0
    assert result.held_out_after == result.held_out_before
    assert min(result.held_out_losses) >= result.held_out_before
    assert len(result.held_out_losses) == 2  # patience 1: the warmup epoch and one more
    for name, array in one_shot.items():
        np.testing.assert_array_equal(weight(model, name), array)


def test_once_an_epoch_beats_the_one_shot_weights_training_runs_its_whole_schedule():
    original = mlp()
    model, zeros = pruned(original)
    # At this rate the warmup epoch helps and the full-rate epochs after it do not.
    settings = RecoverySettings(epochs=6, learning_rate=0.03, patience=1, backoff=0)
    result = recover(model, original, samples(64, seed=3), zeros, settings)
    assert result.best_epoch == 1 and result.kept
    assert len(result.held_out_losses) == 6
    assert min(result.held_out_losses[1:]) > result.held_out_losses[0]
    assert result.held_out_after == result.held_out_losses[0]


def test_a_rate_at_which_no_epoch_helps_is_lowered_until_one_does():
    original = mlp()
    model, zeros = pruned(original)
    settings = RecoverySettings(epochs=3, learning_rate=10.0, backoff=6)
    result = recover(model, original, samples(64, seed=3), zeros, settings)
    assert result.learning_rate < 10.0 / 4
    assert result.kept and result.held_out_after < result.held_out_before
    assert min(result.held_out_losses) < result.held_out_before
    assert all(np.all(weight(model, name)[mask] == 0) for name, mask in zeros.items())


def test_recovery_repeats_with_a_seed():
    original = mlp()
    runs = []
    for _ in range(2):
        model, zeros = pruned(original)
        settings = RecoverySettings(epochs=2, learning_rate=3e-3, seed=5)
        result = recover(model, original, samples(32, seed=3), zeros, settings)
        runs.append((result.losses, result.held_out_losses, weight(model, "w2")))
    assert runs[0][:2] == runs[1][:2]
    np.testing.assert_array_equal(runs[0][2], runs[1][2])


def test_recovery_without_layer_features_still_improves():
    original = mlp()
    model, zeros = pruned(original)
    settings = RecoverySettings(epochs=6, learning_rate=3e-3, features=False)
    result = recover(model, original, samples(128, seed=3), zeros, settings)
    assert result.features == 0 and result.kept
    assert result.held_out_after < result.held_out_before


def test_one_sample_is_refused_with_the_fix():
    original = mlp()
    model, zeros = pruned(original)
    with pytest.raises(InputError, match="at least 2 calibration samples"):
        recover(model, original, samples(1, seed=3), zeros)


def test_the_distillation_loss_leaves_padded_positions_out():
    import torch

    from onnxopt.pruning.recovery import output_loss

    target = torch.randn(2, 5, 3)
    keep = torch.tensor([[True, True, True, False, False], [True, True, False, False, False]])
    output = target.clone()
    output[~keep] += 100.0
    assert float(output_loss([output], [target], [False], 1.0, keep)) == 0.0
    assert float(output_loss([output], [target], [False], 1.0)) > 1.0
    output[0, 0] += 1.0
    assert float(output_loss([output], [target], [False], 1.0, keep)) > 0.0
