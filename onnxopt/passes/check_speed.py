"""The int8 speed check: keep the model float early when int8 cannot run faster."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated

import onnx_ir as ir

from onnxopt.calibration import CalibrationSettings, calibrate_model
from onnxopt.options import Range
from onnxopt.passes.base import OnnxoptPass, PassResult
from onnxopt.passes.fallback import FallbackPass
from onnxopt.passes.quantize import QuantizePass, already_quantized
from onnxopt.quantization.plan import AlreadyQuantizedError, QuantizationOptions
from onnxopt.quantization.prepare import tensors_to_calibrate
from onnxopt.quantization.speed_check import check_int8_speed


class CheckSpeedPass(OnnxoptPass):
    """Before calibrating, time the fastest int8 this model can get against float.

    Quantizes a copy on the min and max of a sample or two (speed does not depend on the
    ranges), with every layer, then with what int8 speeds up least kept float
    (``quantization.speed_check``), and times each against the float model, one thread. When
    none runs ``min_speedup`` times as fast, the model stays float, and the passes that
    quantize (equalize, calibrate, quantize, correct-bias, fallback) are skipped: the answer
    the fallback search would reach after calibrating, in a second. Otherwise the fallback
    pass reuses the timing. Put it before 'equalize' and 'calibrate'.

    Args:
        min_speedup: what int8 must reach, at its fastest, to be worth calibrating for; none
            takes the ``min_speedup`` of the 'fallback' pass after it in the pipeline, and
            checks nothing when that is none too (or there is no fallback pass).
        samples: calibration samples the rough ranges come from.
    """

    name = "check-speed"
    needs_data = True

    def __init__(
        self,
        min_speedup: Annotated[float | None, Range(low=0.0)] = None,
        samples: Annotated[int, Range(low=1)] = 2,
    ):
        super().__init__()
        self.min_speedup = min_speedup
        self.samples = samples
        self.options = QuantizationOptions()

    def configure(self, passes: Sequence[OnnxoptPass]) -> None:
        """The check quantizes as the next quantize pass will (its target among its options)
        and, without a ``min_speedup`` of its own, takes the next fallback pass's."""
        quantize = self.next_pass(passes, QuantizePass)
        if quantize is not None:
            self.options = quantize.options
        if self.min_speedup is not None:
            return
        fallback = self.next_pass(passes, FallbackPass)
        if fallback is not None:
            self.min_speedup = fallback.min_speedup

    def call(self, model: ir.Model) -> PassResult:
        if self.min_speedup is None:
            return PassResult(model, modified=False, details={"skipped": "no min_speedup"})
        data = self.context.data
        settings = CalibrationSettings(
            "minmax", samples=self.samples, tensors=tensors_to_calibrate(model)
        )
        rough = calibrate_model(model, data, settings)
        try:
            check = check_int8_speed(
                model,
                rough.ranges,
                rough.problems,
                self.options,
                data.take(1)[0],
                self.min_speedup,
                self.context.progress,
            )
        except AlreadyQuantizedError as error:
            raise already_quantized(error) from error
        self.context.speed_check = check
        details = {name: f"{speedup:.2f}x" for name, speedup in check.speedups.items()}
        if not check.worthwhile:
            details["kept float"] = check.reason
        return PassResult(model, modified=False, changes=0, details=details)
