"""The fine-tune after a transfer: the task loss (labels) or distillation from the source,
with L2-SP holding the transferred weights near the source's."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

from onnxopt.api import transfer_model
from onnxopt.errors import InputError
from tests.transfer.exports import export, network, torch


def samples(tmp_path, count: int = 32, labels: bool = True):
    rng = np.random.default_rng(1)
    images = rng.standard_normal((count, 1, 3, 16, 16)).astype(np.float32)
    arrays = {"x": images}
    if labels:
        # A task the source does not solve: the class is the sign pattern of two pixels.
        arrays["labels"] = (
            (images[:, 0, 0, 0, 0] > 0).astype(np.int64) + 2 * (images[:, 0, 1, 0, 0] > 0)
        ).reshape(count, 1)
    path = tmp_path / "data.npz"
    np.savez(path, **arrays)
    return path


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tune")
    return export(network(11), folder / "source.onnx", dynamo=True), export(
        network(12), folder / "target.onnx"
    )


def distance(model: ir.Model, source: ir.Model, name: str) -> float:
    return float(
        np.linalg.norm(
            model.graph.initializers[name].const_value.numpy()
            - source.graph.initializers[name].const_value.numpy()
        )
    )


def test_labels_train_the_task_and_l2sp_holds_weights_near_the_source(pair, tmp_path):
    source, target = pair
    data = samples(tmp_path)
    free = transfer_model(source, target, data=data, finetune_steps=24, l2sp=0.0)
    held = transfer_model(source, target, data=data, finetune_steps=24, l2sp=100.0)
    tuning = free.report.tuning
    assert tuning.loss == "labels" and tuning.steps >= 20
    assert tuning.losses[-1] < tuning.losses[0]
    assert "fc.weight" in tuning.changed
    plain = transfer_model(source, target).model
    assert distance(held.model, plain, "fc.weight") < distance(free.model, plain, "fc.weight") / 3


def test_without_labels_the_target_distils_the_source(pair, tmp_path):
    source, _ = pair
    wider = network(13)
    wider.project = torch.nn.Conv2d(8, 24, 1)
    wider.fc = torch.nn.Linear(24, 5)
    target = export(wider.eval(), tmp_path / "wider.onnx")
    result = transfer_model(
        source,
        target,
        on_mismatch="fit",
        data=samples(tmp_path, labels=False),
        finetune_steps=24,
    )
    tuning = result.report.tuning
    assert tuning.loss == "distillation"
    assert tuning.losses[-1] < tuning.losses[0]
    after = result.report.outputs[0]
    assert after.cosine_with_source_after is not None


def test_fine_tune_needs_samples_and_something_to_learn_from(pair, tmp_path):
    source, _ = pair
    with pytest.raises(InputError, match="no samples"):
        transfer_model(source, pair[1], finetune_steps=4)
    seven = export(network(14, classes=7), tmp_path / "seven.onnx")
    with pytest.raises(InputError, match="no labels"):
        transfer_model(
            source,
            seven,
            on_mismatch="fit",
            data=samples(tmp_path, labels=False),
            finetune_steps=4,
        )
