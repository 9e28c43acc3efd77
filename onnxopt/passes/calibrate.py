"""The calibration pass: activation statistics and ranges for the quantizer."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator

import onnx_ir as ir

from onnxopt.calibration import (
    METHODS,
    TensorStatistics,
    calibrate_tensor,
    collect_statistics,
    data_fingerprint,
    load_cache,
    model_fingerprint,
    save_cache,
)
from onnxopt.errors import InputError
from onnxopt.passes.base import OnnxoptPass

logger = logging.getLogger(__name__)


class CalibratePass(OnnxoptPass):
    """Run the model over the calibration data and choose a range for every float activation.

    Fills ``context.statistics`` with a ``CalibratedTensor`` per tensor name. A tensor that saw
    NaN or Inf gets a nan range and a reason, so the quantizer keeps it float and says why. The
    model itself is not changed.

    Args:
        method: how a range is chosen from the statistics: minmax, percentile, entropy or mse.
        percentile: for ``method="percentile"``, the percentile kept at each end, in (50, 100].
        per_sample_minmax: for ``method="minmax"``, use the mean of each sample's min and max
            instead of the overall min and max.
        batch_size: samples per onnxruntime run, where the model takes batches.
        samples: calibrate on at most this many samples; None for all.
        cache: a JSON file to reuse statistics from, when it was made for the same model, data
            and settings, and to write them to otherwise.
    """

    name = "calibrate"
    needs_data = True
    provides_statistics = True

    def __init__(
        self,
        method: str = "minmax",
        percentile: float = 99.99,
        per_sample_minmax: bool = False,
        batch_size: int = 8,
        samples: int | None = None,
        cache: str | None = None,
    ):
        super().__init__()
        if method not in METHODS:
            raise InputError(
                f"unknown calibration method '{method}'",
                details=[f"valid methods: {', '.join(METHODS)}"],
                fix="set calibrate.method to one of them, e.g. --set calibrate.method=entropy",
            )
        if not 50.0 < percentile <= 100.0:
            raise InputError(
                f"calibration percentile {percentile} is out of range",
                details=["it is the percentile kept at each end of a range, in (50, 100]"],
                fix="set calibrate.percentile to e.g. 99.99",
            )
        if batch_size < 1:
            raise InputError(
                f"calibration batch_size must be 1 or more, got {batch_size}",
                fix="set calibrate.batch_size to e.g. 8",
            )
        if samples is not None and samples < 1:
            raise InputError(
                f"calibration samples must be 1 or more, got {samples}",
                fix="set calibrate.samples to a positive count, or leave it out to use all",
            )
        self.method = method
        self.percentile = percentile
        self.per_sample_minmax = per_sample_minmax
        self.batch_size = batch_size
        self.samples = samples
        self.cache = cache

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        statistics, samples, cache_state = self._statistics(model)
        calibrated = {
            name: calibrate_tensor(
                tensor,
                self.method,
                percentile=self.percentile,
                per_sample_mean=self.per_sample_minmax,
            )
            for name, tensor in statistics.items()
        }
        self.context.statistics.update(calibrated)
        unusable = {name: tensor.reason for name, tensor in calibrated.items() if tensor.reason}
        for name, reason in unusable.items():
            logger.info("tensor '%s' stays float: %s", name, reason)
        self.changes = len(calibrated)
        self.details = {
            "tensors": len(calibrated),
            "samples": samples,
            "method": self.method,
            "cache": cache_state,
        }
        if unusable:
            self.details["unusable"] = len(unusable)
        logger.info(
            "calibrated %d tensors on %d samples with %s", len(calibrated), samples, self.method
        )
        return ir.passes.PassResult(model, modified=False)

    def _statistics(self, model: ir.Model) -> tuple[dict[str, TensorStatistics], int, str | None]:
        """Statistics from the cache when it fits, else collected (and cached if asked)."""
        data = self.context.data
        fingerprint = None
        if self.cache is not None:
            settings = {
                "data": data_fingerprint(data),
                "samples": self.samples,
                "batch_size": self.batch_size,
            }
            fingerprint = model_fingerprint(model, settings)
            cached = load_cache(self.cache, fingerprint)
            if cached is not None:
                return cached.statistics, cached.samples, "hit"
        total = (
            data.count if self.samples is None else min(data.count or self.samples, self.samples)
        )
        seen = 0
        with self._progress(total) as advance:

            def count(samples: int) -> None:
                nonlocal seen
                seen += samples
                advance(samples)

            statistics = collect_statistics(
                model,
                None,
                data,
                batch_size=self.batch_size,
                max_samples=self.samples,
                progress=count,
            )
        if fingerprint is None:
            return statistics, seen, None
        save_cache(self.cache, statistics, fingerprint, samples=seen)
        return statistics, seen, "written"

    @contextlib.contextmanager
    def _progress(self, total: int | None) -> Iterator[Callable[[int], None]]:
        if self.context.progress is None:
            yield lambda steps=1: None
            return
        with self.context.progress.task("calibrating", total) as advance:
            yield advance
