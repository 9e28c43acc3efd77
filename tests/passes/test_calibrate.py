from __future__ import annotations

import contextlib
import math

import numpy as np
import onnx_ir as ir
import pytest

from onnxopt.calibration import CalibratedTensor
from onnxopt.context import Context
from onnxopt.data import open_data
from onnxopt.errors import InputError, ProcessingError
from onnxopt.passes import PASSES
from onnxopt.passes.base import PassResult
from onnxopt.passes.calibrate import CalibratePass
from onnxopt.passes.quantize import QuantizePass
from onnxopt.pipeline import Pipeline
from tests.builders import classifier_proto
from tests.helpers import model_from_text

# Scores masked by adding float32's minimum, as exported attention does, then divided by a
# learned temperature that can be 0.
MASKED = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[N,4] x) => (float[N,4] p, float[N,4] q)
  <float[4] mask = {0.0, 0.0, -3.4028234663852886e38, 0.0}, float[4] temperature = {1.0, 0.0, 1.0, 2.0}> {
    s = Add(x, mask)
    p = Softmax<axis = -1>(s)
    q = Div(x, temperature)
}
"""


class RecordingProgress:
    """Stands in for onnxopt.progress.Progress and remembers what it was told."""

    def __init__(self):
        self.tasks = []

    @contextlib.contextmanager
    def task(self, description, total=None):
        steps = []
        self.tasks.append((description, total, steps))
        yield steps.append


def classifier_context(count: int = 10, **context) -> tuple[ir.Model, Context]:
    model = ir.from_proto(classifier_proto())
    rng = np.random.default_rng(0)
    feeds = [{"x": rng.standard_normal((1, 3, 8, 8)).astype(np.float32)} for _ in range(count)]
    return model, Context(data=open_data(feeds, model), **context)


def calibrate(model: ir.Model, context: Context, **options) -> PassResult:
    calibration = CalibratePass(**options)
    calibration.bind(context)
    return calibration(model)


@pytest.mark.parametrize("method", ["minmax", "percentile", "entropy", "mse"])
def test_every_float_activation_gets_a_range(method):
    model, context = classifier_context()
    calibration = calibrate(model, context, method=method)
    assert set(context.calibration.tensors) == {
        "x",
        "conv",
        "bn",
        "relu",
        "identity",
        "pool",
        "flat",
        "logits",
    }
    for tensor in context.calibration.tensors.values():
        assert isinstance(tensor, CalibratedTensor) and tensor.reason is None
        assert math.isfinite(tensor.low) and tensor.low <= tensor.high
    assert context.calibration.tensors["relu"].low == 0.0
    assert calibration.changes == 8
    assert calibration.details == {"tensors": 8, "samples": 10, "method": method, "cache": None}


def test_minmax_of_per_sample_means_is_narrower():
    model, context = classifier_context()
    calibrate(model, context, per_sample_minmax=True)
    narrow = context.calibration.tensors["x"]
    assert narrow.statistics.minimum < narrow.low and narrow.high < narrow.statistics.maximum


def test_progress_counts_samples_and_samples_limits_them():
    progress = RecordingProgress()
    model, context = classifier_context(progress=progress)
    calibration = calibrate(model, context, samples=6, batch_size=4)
    [(description, total, steps)] = progress.tasks
    assert (description, total, sum(steps), max(steps)) == ("calibrating", 6, 6, 4)
    assert calibration.details["samples"] == 6
    assert context.calibration.tensors["x"].statistics.sample_count == 6


def test_tensors_with_inf_or_mask_values_get_a_reason_not_a_range():
    model = model_from_text(MASKED)
    rng = np.random.default_rng(0)
    feeds = [{"x": rng.standard_normal((1, 4)).astype(np.float32)} for _ in range(4)]
    context = Context(data=open_data(feeds, model))
    calibration = calibrate(model, context, method="entropy")
    statistics = context.calibration.tensors
    assert "NaN or Inf" in statistics["q"].reason and math.isnan(statistics["q"].low)
    assert "attention mask" in statistics["s"].reason
    assert statistics["p"].reason is None and statistics["x"].reason is None
    assert calibration.details["unusable"] == 2


def test_cache_is_written_then_hit_and_serves_every_method(tmp_path):
    path = str(tmp_path / "calibration.json")
    model, context = classifier_context()
    assert calibrate(model, context, method="entropy", cache=path).details["cache"] == "written"
    first = {
        name: (tensor.low, tensor.high) for name, tensor in context.calibration.tensors.items()
    }
    again = calibrate(model, context, method="entropy", cache=path)
    assert again.details["cache"] == "hit" and again.details["samples"] == 10
    assert {
        name: (tensor.low, tensor.high) for name, tensor in context.calibration.tensors.items()
    } == first
    assert calibrate(model, context, method="mse", cache=path).details["cache"] == "hit"


def test_cache_made_with_other_settings_is_replaced(tmp_path):
    path = str(tmp_path / "calibration.json")
    model, context = classifier_context()
    calibrate(model, context, cache=path)
    assert calibrate(model, context, samples=5, cache=path).details["cache"] == "written"
    assert calibrate(model, context, samples=5, cache=path).details["cache"] == "hit"


def test_unknown_method_lists_the_valid_ones():
    with pytest.raises(InputError) as error:
        CalibratePass(method="kl")
    assert "minmax, percentile, entropy, mse" in error.value.render()


@pytest.mark.parametrize(
    "options", [{"percentile": 40.0}, {"batch_size": 0}, {"samples": 0}], ids=str
)
def test_bad_options_are_input_errors(options):
    with pytest.raises(InputError):
        CalibratePass(**options)


def test_registered_and_run_by_the_pipeline_which_requires_data():
    assert PASSES["calibrate"] is CalibratePass
    model, context = classifier_context()
    Pipeline([CalibratePass()]).run(model, context)
    assert context.report[0].details["tensors"] == 8
    with pytest.raises(ProcessingError, match="needs calibration data"):
        Pipeline([CalibratePass()]).run(model, Context())


FLOAT_IN_THE_MIDDLE = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[N, 2, 4, 4] x) => (float[N, 2, 1, 1] y)
  <float[2, 2, 1, 1] w1 = {1.0, 0.5, -0.5, 1.0}, float[2, 2, 1, 1] w2 = {0.5, 1.0, 1.0, -1.0},
   int64[8] pads = {0, 0, 1, 1, 0, 0, 1, 1}, float one = {1.0}> {
    c1 = Conv(x, w1)
    hs = Pad(c1, pads, one)
    sig = Sigmoid(hs)
    c2 = Conv(sig, w2)
    y = GlobalAveragePool(c2)
}
"""


def test_quantizable_tensors_leave_out_what_stays_float_and_quantize_the_same():
    model = model_from_text(FLOAT_IN_THE_MIDDLE)
    rng = np.random.default_rng(0)
    feeds = [{"x": rng.standard_normal((1, 2, 4, 4)).astype(np.float32)} for _ in range(6)]
    every, some = Context(data=open_data(feeds, model)), Context(data=open_data(feeds, model))
    calibrate(model, every)
    result = calibrate(model, some, tensors="quantizable")
    assert set(some.calibration.tensors) == {"x", "c1", "sig", "c2"}
    assert set(every.calibration.tensors) == {"x", "c1", "hs", "sig", "c2", "y"}
    assert result.details["tensors"] == 4
    quantized = []
    for context in (every, some):
        copy = model.clone()
        quantize = QuantizePass(reduce_range=False)
        quantize.bind(context)
        quantize(copy)
        quantized.append(context.quantization.report)
    assert quantized[0] == quantized[1]
