from __future__ import annotations

import onnx_ir as ir
import pytest

from onnxopt.context import Context
from onnxopt.errors import ProcessingError
from onnxopt.passes.base import OnnxoptPass
from onnxopt.pipeline import Pipeline
from tests.builders import classifier_proto


class CountNodes(OnnxoptPass):
    """Counts nodes; changes nothing."""

    name = "count-nodes"

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        self.details = {"nodes": len(model.graph)}
        return ir.passes.PassResult(model, modified=False)


class RenameNodes(OnnxoptPass):
    """Renames every node, so there is a change to count."""

    name = "rename-nodes"

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        for index, node in enumerate(model.graph):
            node.name = f"node{index}"
            self.changes += 1
        return ir.passes.PassResult(model, modified=True)


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


class NeedsStatistics(NeedsData):
    name = "needs-statistics"
    needs_data = False
    needs_statistics = True


class ProvidesStatistics(NeedsData):
    name = "provides-statistics"
    needs_data = False
    provides_statistics = True


def test_pipeline_runs_passes_in_order_and_reports_time_and_changes():
    model = ir.from_proto(classifier_proto())
    context = Pipeline([CountNodes(), RenameNodes()]).run(model)
    assert [row.pass_name for row in context.report] == ["count-nodes", "rename-nodes"]
    assert context.report[0].details == {"nodes": 8}
    assert context.report[1].changes == 8
    assert all(row.seconds >= 0 for row in context.report)


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
        ([NeedsStatistics()], "pass 'needs-statistics' needs activation statistics"),
    ],
)
def test_unmet_needs_fail_before_any_work(passes, message):
    context = Context()
    with pytest.raises(ProcessingError, match=message):
        Pipeline([RenameNodes(), *passes]).run(ir.from_proto(classifier_proto()), context)
    assert context.report == []


def test_statistics_provided_by_an_earlier_pass_satisfy_a_later_one():
    context = Pipeline([ProvidesStatistics(), NeedsStatistics()]).run(
        ir.from_proto(classifier_proto())
    )
    assert len(context.report) == 2
