from __future__ import annotations

import re
import time
from typing import Annotated, Literal

import onnx_ir as ir
import pytest

from onnxopt.context import Context
from onnxopt.errors import InputError, ProcessingError
from onnxopt.options import Range
from onnxopt.passes.base import OnnxoptPass, PassResult
from onnxopt.pipeline import Pipeline
from tests.builders import classifier_proto

PAUSE_SECONDS = 0.05


class CountNodes(OnnxoptPass):
    """Counts nodes; changes nothing."""

    name = "count-nodes"

    def call(self, model: ir.Model) -> PassResult:
        return PassResult(model, modified=False, details={"nodes": len(model.graph)})


class RenameNodes(OnnxoptPass):
    """Renames every node, so there is a change to count; pauses, so there is time to measure."""

    name = "rename-nodes"

    def call(self, model: ir.Model) -> PassResult:
        for index, node in enumerate(model.graph):
            node.name = f"node{index}"
        time.sleep(PAUSE_SECONDS)
        return PassResult(model, modified=True, changes=len(model.graph))


class WithOptions(OnnxoptPass):
    name = "with-options"

    def __init__(
        self,
        level: Annotated[int, Range(low=1, high=3)] = 1,
        mode: Literal["fast", "exact"] = "fast",
        limit: Annotated[float | None, Range(low=0.0, low_open=True)] = None,
    ):
        super().__init__()
        self.level, self.mode, self.limit = level, mode, limit

    def call(self, model: ir.Model) -> PassResult:
        return PassResult(model, modified=False)


class Broken(OnnxoptPass):
    """Fails like a bug would."""

    name = "broken"

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        raise KeyError("surprise")


class NeedsData(OnnxoptPass):
    name = "needs-data"
    needs_data = True

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        return ir.passes.PassResult(model, modified=False)


class NeedsOpset18(NeedsData):
    name = "needs-opset-18"
    needs_data = False
    min_opset = 18


class NeedsCalibration(NeedsData):
    name = "needs-calibration"
    needs_data = False
    needs_calibration = True


class ProvidesCalibration(NeedsData):
    name = "provides-calibration"
    needs_data = False
    provides_calibration = True


def test_pipeline_runs_passes_in_order_and_reports_time_and_changes():
    model = ir.from_proto(classifier_proto())
    context = Pipeline([CountNodes(), RenameNodes()]).run(model)
    assert [row.pass_name for row in context.report] == ["count-nodes", "rename-nodes"]
    assert context.report[0].details == {"nodes": 8}
    assert (context.report[0].changes, context.report[1].changes) == (0, 8)
    assert context.report[1].seconds >= PAUSE_SECONDS
    assert [node.name for node in model.graph][:2] == ["node0", "node1"]


def test_options_are_checked_against_their_declarations_when_a_pass_is_made():
    assert WithOptions(level=3, mode="exact", limit=None).level == 3
    for options, message in (
        ({"level": 4}, "option 'with-options.level' must be an integer in [1, 3], got 4"),
        ({"level": 2.0}, "option 'with-options.level' must be an integer in [1, 3], got 2.0"),
        ({"mode": "slow"}, "must be one of fast, exact, got 'slow'"),
        ({"limit": 0.0}, "option 'with-options.limit' must be a number > 0 or none, got 0.0"),
    ):
        with pytest.raises(InputError, match=re.escape(message)):
            WithOptions(**options)
    assert set(WithOptions.options()) == {"level", "mode", "limit"}


def test_a_failing_pass_is_named_in_the_error_and_the_report():
    context = Context()
    with pytest.raises(ProcessingError, match="pass 'broken' failed: KeyError") as raised:
        Pipeline([CountNodes(), Broken()]).run(ir.from_proto(classifier_proto()), context)
    assert raised.value.exit_code == 1
    assert context.report[-1].pass_name == "broken"


@pytest.mark.parametrize(
    ("passes", "message"),
    [
        ([NeedsData()], "pass 'needs-data' needs calibration data"),
        (
            [NeedsOpset18()],
            "pass 'needs-opset-18' needs opset 18 or newer; the model uses opset 17",
        ),
        ([NeedsCalibration()], "pass 'needs-calibration' needs activation ranges"),
    ],
)
def test_unmet_needs_fail_before_any_work(passes, message):
    context = Context()
    with pytest.raises(ProcessingError, match=message):
        Pipeline([RenameNodes(), *passes]).run(ir.from_proto(classifier_proto()), context)
    assert context.report == []


def test_calibration_provided_by_an_earlier_pass_satisfies_a_later_one():
    context = Pipeline([ProvidesCalibration(), NeedsCalibration()]).run(
        ir.from_proto(classifier_proto())
    )
    assert len(context.report) == 2
