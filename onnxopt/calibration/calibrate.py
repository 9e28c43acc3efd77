"""Calibrate a model: statistics over the data (or from a cache), then a range per tensor."""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Mapping, Sequence

import onnx_ir as ir

from onnxopt.calibration.cache import data_fingerprint, load_cache, model_fingerprint, save_cache
from onnxopt.calibration.collect import collect_statistics
from onnxopt.calibration.collectors import TensorStatistics
from onnxopt.calibration.ranges import CalibratedTensor, calibrate_tensor
from onnxopt.calibration.shards import collect_sharded
from onnxopt.data import DataSource
from onnxopt.progress import QUIET, Progress

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class CalibrationSettings:
    """How ranges are chosen and statistics collected.

    Attributes:
        method: minmax, percentile, entropy or mse (``ranges.METHODS``).
        percentile: for ``method="percentile"``, the percentile kept at each end, in (50, 100].
        per_sample_minmax: for ``method="minmax"``, the mean of each sample's min and max.
        batch_size: samples per onnxruntime run, where the model takes batches.
        samples: calibrate on at most this many samples; None for all.
        cache: a JSON file to reuse statistics from, when it was made for the same model, data
            and collection settings, and to write them to otherwise.
        tensors: the activations to collect; None for every float activation.
        workers: processes collecting statistics, each with its own onnxruntime session and
            a part of the data (``shards``); the statistics equal one process's.
        ray_address: collect on a Ray cluster instead (``auto``, ``ray://host:port``, or
            ``local`` for a new one on this machine); needs the ``ray`` extra.
    """

    method: str = "minmax"
    percentile: float = 99.99
    per_sample_minmax: bool = False
    batch_size: int = 8
    samples: int | None = None
    cache: str | os.PathLike | None = None
    tensors: Sequence[str] | None = None
    workers: int = 1
    ray_address: str | None = None


@dataclasses.dataclass
class CalibrationResult:
    """Every calibrated tensor, and how calibration went.

    Attributes:
        tensors: per tensor name, its statistics and the range chosen (or why it has none).
        samples: how many samples the statistics hold.
        method: the range method used.
        cache: "hit" when statistics came from the cache, "written" when they were saved to it,
            None without a cache.
    """

    tensors: dict[str, CalibratedTensor]
    samples: int
    method: str
    cache: str | None = None

    @property
    def ranges(self) -> dict[str, tuple[float, float]]:
        """(low, high) of every tensor that can be quantized."""
        return {
            name: (tensor.low, tensor.high)
            for name, tensor in self.tensors.items()
            if tensor.reason is None
        }

    @property
    def problems(self) -> dict[str, str]:
        """Tensors that must stay float, with the reason."""
        return {name: tensor.reason for name, tensor in self.tensors.items() if tensor.reason}

    @property
    def statistics(self) -> dict[str, TensorStatistics]:
        return {name: tensor.statistics for name, tensor in self.tensors.items()}


def calibrate_model(
    model: ir.Model,
    data: DataSource,
    settings: CalibrationSettings | None = None,
    progress: Progress = QUIET,
) -> CalibrationResult:
    """Run ``model`` over ``data`` and choose a range for every float activation.

    The model is not changed. A tensor that saw NaN or Inf gets a nan range and a reason, so the
    quantizer keeps it float and says why.
    """
    settings = settings or CalibrationSettings()
    statistics, samples, cache_state = _statistics(model, data, settings, progress)
    tensors = {
        name: calibrate_tensor(
            tensor,
            settings.method,
            percentile=settings.percentile,
            per_sample_mean=settings.per_sample_minmax,
        )
        for name, tensor in statistics.items()
    }
    result = CalibrationResult(tensors, samples, settings.method, cache_state)
    for name, reason in result.problems.items():
        logger.info("tensor '%s' stays float: %s", name, reason)
    logger.info(
        "calibrated %d tensors on %d samples with %s", len(tensors), samples, settings.method
    )
    return result


def _statistics(
    model: ir.Model, data: DataSource, settings: CalibrationSettings, progress: Progress
) -> tuple[Mapping[str, TensorStatistics], int, str | None]:
    """Statistics from the cache when it fits, else collected (and cached if asked)."""
    fingerprint = None
    if settings.cache is not None:
        fingerprint = model_fingerprint(
            model,
            {
                "data": data_fingerprint(data),
                "samples": settings.samples,
                "batch_size": settings.batch_size,
                "tensors": None if settings.tensors is None else sorted(settings.tensors),
            },
        )
        cached = load_cache(settings.cache, fingerprint)
        if cached is not None:
            return cached.statistics, cached.samples, "hit"
    total = (
        data.count
        if settings.samples is None
        else min(data.count or settings.samples, settings.samples)
    )
    seen = 0
    with progress.task("calibrating", total) as advance:

        def count(samples: int) -> None:
            nonlocal seen
            seen += samples
            advance(samples)

        if settings.workers > 1 or settings.ray_address:
            statistics, _ = collect_sharded(
                model,
                settings.tensors,
                data,
                workers=settings.workers,
                batch_size=settings.batch_size,
                max_samples=settings.samples,
                ray_address=settings.ray_address,
                progress=count,
            )
        else:
            statistics = collect_statistics(
                model,
                settings.tensors,
                data,
                batch_size=settings.batch_size,
                max_samples=settings.samples,
                progress=count,
            )
    if fingerprint is None:
        return statistics, seen, None
    save_cache(settings.cache, statistics, fingerprint, samples=seen)
    return statistics, seen, "written"
