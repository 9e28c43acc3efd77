"""Per-channel means of the float tensors bias correction reads."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping

import numpy as np
import onnx_ir as ir

from onnxopt.calibration.collect import collect_statistics
from onnxopt.calibration.collectors import CHANNEL_AXES, TensorStatistics
from onnxopt.quantization.bias_correction import ChannelMeans, mean_requests
from onnxopt.runtime import Feed

logger = logging.getLogger(__name__)

# The calibration statistics' name for each axis bias correction asks means along.
AXIS_KEYS = {axis: key for key, axis in CHANNEL_AXES.items()}


def channel_means(
    quantized: ir.Model,
    float_model: ir.Model,
    statistics: Mapping[str, TensorStatistics],
    data: Iterable[Feed] | None,
) -> ChannelMeans:
    """The means correction of ``quantized`` reads, from calibration's statistics.

    Tensors whose statistics hold no means along the axis asked for (or none at all) are measured
    on the float model over ``data``; without data they have none, and correction skips them.
    """
    known: dict[tuple[str, int], np.ndarray] = {}
    missing = []
    for name, axis in mean_requests(quantized, float_model).items():
        tensor = statistics.get(name)
        means = tensor.channel_means(AXIS_KEYS[axis]) if tensor is not None else None
        if means is None:
            missing.append(name)
        else:
            known[(name, axis)] = means
    if missing and data is not None:
        logger.info("measuring channel means of %d tensors for bias correction", len(missing))
        for name, measured in collect_statistics(float_model, missing, data).items():
            for key, axis in CHANNEL_AXES.items():
                means = measured.channel_means(key)
                if means is not None:
                    known[(name, axis)] = means

    def means_of(name: str, axis: int) -> np.ndarray | None:
        return known.get((name, axis))

    return means_of
