"""The calibration pass: activation statistics and ranges for the quantizer."""

from __future__ import annotations

import dataclasses
from typing import Annotated, Literal

import onnx_ir as ir

from onnxopt.calibration import CalibrationSettings, RangeMethod, calibrate_model
from onnxopt.options import Range
from onnxopt.passes.base import OnnxoptPass, PassResult
from onnxopt.quantization.prepare import tensors_to_calibrate


class CalibratePass(OnnxoptPass):
    """Run the model over the calibration data and choose a range for every float activation.

    Fills ``context.calibration`` (``calibration.calibrate_model``). A tensor that saw NaN or
    Inf gets a nan range and a reason, so the quantizer keeps it float and says why. The model
    itself is not changed.

    Args:
        method: how a range is chosen from the statistics: minmax, percentile, entropy or mse.
        percentile: for ``method="percentile"``, the percentile kept at each end, in (50, 100].
        per_sample_minmax: for ``method="minmax"``, use the mean of each sample's min and max
            instead of the overall min and max.
        batch_size: samples per onnxruntime run, where the model takes batches.
        samples: calibrate on at most this many samples; None for all.
        cache: a JSON file to reuse statistics from, when it was made for the same model, data
            and settings, and to write them to otherwise.
        tensors: "all" float activations, or only those the quantizer can use ("quantizable"):
            inputs and outputs of ops it may quantize, not the tensors around ops that stay float,
            which saves time and memory on models with large activations.
        workers: processes that collect statistics side by side, each with its own
            onnxruntime session and part of the data; the statistics are those of one
            process, bit for bit.
        ray_address: collect as Ray tasks on a cluster: ``auto`` (the cluster this machine
            belongs to), ``ray://host:port``, or ``local`` (a new one here); needs
            ``pip install 'onnxopt[ray]'``. Samples in .npz files are read by the workers
            (shared storage), other data is sent to them in batches.
    """

    name = "calibrate"
    quantizes = True
    needs_data = True
    provides_calibration = True

    def __init__(
        self,
        method: RangeMethod = "minmax",
        percentile: Annotated[float, Range(50.0, 100.0, low_open=True)] = 99.99,
        per_sample_minmax: bool = False,
        batch_size: Annotated[int, Range(low=1)] = 8,
        samples: Annotated[int | None, Range(low=1)] = None,
        cache: str | None = None,
        tensors: Literal["all", "quantizable"] = "all",
        workers: Annotated[int, Range(low=1)] = 1,
        ray_address: str | None = None,
    ):
        super().__init__()
        self.settings = CalibrationSettings(
            method,
            percentile,
            per_sample_minmax,
            batch_size,
            samples,
            cache,
            workers=workers,
            ray_address=ray_address,
        )
        self.tensors = tensors

    def call(self, model: ir.Model) -> PassResult:
        settings = self.settings
        if self.tensors == "quantizable":
            settings = dataclasses.replace(settings, tensors=tensors_to_calibrate(model))
        result = calibrate_model(model, self.context.data, settings, self.context.progress)
        self.context.calibration = result
        details = {
            "tensors": len(result.tensors),
            "samples": result.samples,
            "method": result.method,
            "cache": result.cache,
        }
        if result.problems:
            details["unusable"] = len(result.problems)
        return PassResult(model, modified=False, changes=len(result.tensors), details=details)
