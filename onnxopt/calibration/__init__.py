"""Calibration: activation statistics over sample data, and the quantization ranges they give.

``calibrate_model`` is the whole job: ``collect_statistics`` runs a model over data into
per-tensor ``TensorStatistics`` (or the cache gives them back), and ``calibrate_tensor`` turns
each into a ``CalibratedTensor`` range by one of ``METHODS``; the ``CalibrationResult`` holds
them all. The ``calibrate`` pass is a thin adapter over ``calibrate_model``.
"""

from __future__ import annotations

from onnxopt.calibration.cache import (
    CachedStatistics,
    data_fingerprint,
    load_cache,
    model_fingerprint,
    save_cache,
)
from onnxopt.calibration.calibrate import CalibrationResult, CalibrationSettings, calibrate_model
from onnxopt.calibration.collect import collect_statistics
from onnxopt.calibration.collectors import ChannelSums, TensorStatistics
from onnxopt.calibration.ranges import (
    METHODS,
    CalibratedTensor,
    RangeMethod,
    calibrate_tensor,
    compute_range,
    entropy_range,
    minmax_range,
    mse_range,
    percentile_range,
)

__all__ = [
    "METHODS",
    "CachedStatistics",
    "CalibratedTensor",
    "CalibrationResult",
    "CalibrationSettings",
    "ChannelSums",
    "RangeMethod",
    "TensorStatistics",
    "calibrate_model",
    "calibrate_tensor",
    "collect_statistics",
    "compute_range",
    "data_fingerprint",
    "entropy_range",
    "load_cache",
    "minmax_range",
    "model_fingerprint",
    "mse_range",
    "percentile_range",
    "save_cache",
]
