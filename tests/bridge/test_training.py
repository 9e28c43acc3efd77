"""Fine-tuning and distillation through the bridge."""

from __future__ import annotations

import numpy as np
import pytest

from onnxopt import runtime
from tests.bridge.test_module import conv_head, model_from, random

torch = pytest.importorskip("torch", reason="the torch extra is not installed")

from onnxopt.bridge import to_module, write_back  # noqa: E402
from onnxopt.bridge.training import (  # noqa: E402
    TrainingSettings,
    _rate_factor,
    distill,
    distillation_loss,
    fine_tune,
    runs_batches,
)


def samples(count: int = 16) -> list[dict[str, np.ndarray]]:
    return [{"x": random(1, 3, 8, 8, seed=seed)} for seed in range(count)]


def test_fine_tuning_lowers_the_loss_and_the_written_model_reproduces_the_module():
    model = conv_head()
    module = to_module(model)

    # A synthetic task: class 0 when the image's mean is positive, else class 1.
    def loss(outputs, inputs):
        labels = (inputs[0].mean(dim=(1, 2, 3)) <= 0).long()
        return torch.nn.functional.cross_entropy(outputs[0], labels)

    settings = TrainingSettings(epochs=8, learning_rate=1e-2, batch_size=4)
    result = fine_tune(module, samples(), loss, settings)
    assert result.batched and result.steps == 8 * 4
    assert result.losses[-1] < result.losses[0]
    write_back(module, model)
    feed = samples(1)[0]
    written = runtime.create_session(model).run(None, feed)[0]
    with torch.no_grad():
        expected = module(torch.from_numpy(feed["x"]))[0].numpy()
    np.testing.assert_allclose(written, expected, rtol=1e-5, atol=1e-6)


def test_training_is_repeatable_with_a_seed():
    results = []
    for _ in range(2):
        module = to_module(conv_head())
        result = fine_tune(
            module,
            samples(8),
            lambda outputs, inputs: outputs[0].pow(2).mean(),
            TrainingSettings(epochs=2, learning_rate=1e-2, seed=3),
        )
        results.append((result.losses, module.onnx_parameters()["fc.weight"].detach().clone()))
    assert results[0][0] == results[1][0]
    assert torch.equal(results[0][1], results[1][1])


def test_a_graph_that_hard_codes_a_batch_of_one_runs_sample_by_sample():
    model = model_from(
        """
        <ir_version: 8, opset_import: ["" : 17]>
        net (float[N, 3, 8, 8] x) => (float[1, 4] y) {
            f = Reshape (x, shape)
            y = MatMul (f, w)
        }
        """,
        shape=np.array([1, 192], np.int64),
        w=random(192, 4),
    )
    module = to_module(model)
    assert not runs_batches(module, samples(2))
    result = fine_tune(
        module, samples(4), lambda outputs, inputs: outputs[0].pow(2).mean(), TrainingSettings()
    )
    assert not result.batched and result.steps == 4


def test_distillation_brings_a_perturbed_model_back_to_the_original():
    teacher = to_module(conv_head())
    student = to_module(conv_head())
    with torch.no_grad():
        student.onnx_parameters()["fc.weight"].add_(torch.from_numpy(random(4, 6, seed=7)))
    batch = torch.from_numpy(np.concatenate([feed["x"] for feed in samples(8)]))

    def gap():
        with torch.no_grad():
            return float(distillation_loss(student(batch), teacher(batch)))

    before = gap()
    distill(student, samples(), teacher, TrainingSettings(epochs=25, learning_rate=1e-2))
    assert gap() < 0.25 * before


def test_distillation_uses_kl_for_class_scores_and_mse_otherwise():
    logits = torch.tensor([[2.0, 0.0, -1.0]])
    same = distillation_loss([logits], [logits])
    assert float(same) == pytest.approx(0.0, abs=1e-7)
    shifted = distillation_loss([logits + 5.0], [logits])  # softmax ignores a shift
    assert float(shifted) == pytest.approx(0.0, abs=1e-6)
    maps = torch.zeros(1, 1, 2, 2)
    assert float(distillation_loss([maps + 1.0], [maps])) == pytest.approx(1.0)


def test_fine_tuning_reads_an_npz_data_source(tmp_path):
    from onnxopt.data import open_data

    model = conv_head()
    path = tmp_path / "data.npz"
    np.savez(path, x=np.stack([feed["x"] for feed in samples(6)]))
    module = to_module(model)
    result = fine_tune(
        module,
        open_data(path, model),
        lambda outputs, inputs: outputs[0].pow(2).mean(),
        TrainingSettings(epochs=3, learning_rate=1e-2, batch_size=3),
    )
    assert result.batched and result.steps == 3 * 2
    assert result.losses[-1] < result.losses[0]


def test_training_on_no_samples_is_a_clear_error():
    from onnxopt.errors import InputError

    with pytest.raises(InputError, match="no samples to train on"):
        fine_tune(to_module(conv_head()), [], lambda outputs, inputs: outputs[0].sum())


def test_distillation_compares_an_embedding_by_squared_error_not_as_class_scores():
    embedding = torch.nn.functional.normalize(torch.randn(4, 8), dim=1)
    moved = embedding + 0.5
    as_logits = distillation_loss([moved], [embedding])
    as_embedding = distillation_loss([moved], [embedding], class_scores=[False])
    assert float(as_logits) == pytest.approx(0.0, abs=1e-6)  # a shift leaves softmax alike
    assert float(as_embedding) == pytest.approx(0.25)


def test_warmup_raises_the_rate_linearly_then_the_schedule_decays_it():
    cosine = _rate_factor(TrainingSettings(schedule="cosine", warmup=0.25), total=8)
    assert [round(cosine(step), 3) for step in range(3)] == [0.5, 0.962, 0.854]
    assert cosine(7) < cosine(4) < cosine(2)
    constant = _rate_factor(TrainingSettings(warmup=0.5), total=8)
    assert [constant(step) for step in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert _rate_factor(TrainingSettings(), total=8)(0) == 1.0
