"""Calibration: activation statistics over sample data, and the quantization ranges they give.

``collect_statistics`` runs a model over data into per-tensor ``TensorStatistics``;
``calibrate_tensor`` turns those into a ``CalibratedTensor`` range by one of ``METHODS``; the
cache saves statistics between runs. The ``calibrate`` pass ties them together.
"""

from __future__ import annotations

from onnxopt.calibration.cache import (
    CachedStatistics,
    data_fingerprint,
    load_cache,
    model_fingerprint,
    save_cache,
)
from onnxopt.calibration.collect import collect_statistics
from onnxopt.calibration.collectors import ChannelSums, TensorStatistics
from onnxopt.calibration.ranges import (
    METHODS,
    CalibratedTensor,
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
    "ChannelSums",
    "TensorStatistics",
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
