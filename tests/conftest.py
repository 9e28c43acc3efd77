"""Fixtures shared across the suite: small generated models and data files."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from tests.builders import classifier_proto


@pytest.fixture
def classifier_path(tmp_path):
    path = tmp_path / "classifier.onnx"
    onnx.save(classifier_proto(), path)
    return path


@pytest.fixture
def classifier_data(tmp_path):
    """Twelve samples for the classifier, one feed of shape [1,3,8,8] each."""
    path = tmp_path / "classifier.npz"
    samples = np.random.default_rng(1).standard_normal((12, 1, 3, 8, 8)).astype(np.float32)
    np.savez(path, x=samples)
    return path
