"""Checks an optimized model must pass before it is written: structure, runtime, fidelity."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import tempfile
from collections.abc import Callable, Iterator, Sequence

import onnx
import onnx_ir as ir
from onnx_ir.passes.common import CheckerPass

from onnxopt import runtime
from onnxopt.fidelity import ReferenceComparison
from onnxopt.metrics import OutputFidelity


@dataclasses.dataclass
class Thresholds:
    """Fidelity limits; None turns a check off.

    ``min_top1_agreement`` holds for outputs of class scores, on their expected top-1 agreement
    (``metrics.expected_agreement``): on the few samples a run compares on, counting flips would
    hinge on whether a near-tie happened to flip.

    ``atol`` and ``rtol`` together ask, like ``numpy.allclose``, that every element satisfies
    ``|candidate - reference| <= atol + rtol * |reference|``.
    """

    atol: float | None = None
    rtol: float = 0.0
    min_cosine: float | None = None
    min_sqnr_db: float | None = None
    min_top1_agreement: float | None = None

    @property
    def empty(self) -> bool:
        """No check is set: every output meets these thresholds."""
        limits = (self.atol, self.min_cosine, self.min_sqnr_db, self.min_top1_agreement)
        return all(limit is None for limit in limits)


@dataclasses.dataclass
class Check:
    """One named check and, when it failed or could not run, why.

    A skipped check (the comparison, when the original model itself fails on every sample
    tried) does not fail validation; the report says why it did not run.
    """

    name: str
    passed: bool
    detail: str = ""
    skipped: bool = False


@dataclasses.dataclass
class ValidationResult:
    """Every check run and the fidelity of every output."""

    checks: list[Check]
    outputs: list[OutputFidelity]
    samples: int
    data: str

    @property
    def passed(self) -> bool:
        return all(check.passed for check in self.checks)

    @property
    def failures(self) -> list[Check]:
        return [check for check in self.checks if not check.passed]


def check_structure(model: ir.Model) -> list[Check]:
    """The onnx checker, then strict shape inference, each reported on its own.

    A model whose weights stay in an external file is checked from a copy saved beside its
    own data: the checker reads external data relative to the working folder, so a model
    loaded from another folder failed a check it passes.
    """
    checks = []
    with _checkable(model) as checked:
        for name, full_check in (("onnx checker", False), ("shape inference", True)):
            try:
                checked(full_check)
            except Exception as error:
                cause = error.__cause__ or error
                checks.append(Check(name, False, f"{type(cause).__name__}: {cause}"))
                return checks
            checks.append(Check(name, True))
    return checks


@contextlib.contextmanager
def _checkable(model: ir.Model) -> Iterator[Callable[[bool], None]]:
    """A function running the checker on ``model``, with or without its full check."""
    external = any(
        isinstance(value.const_value, ir.ExternalTensor)
        for value in model.graph.initializers.values()
    )
    if not external:
        yield lambda full_check: CheckerPass(full_check=full_check)(model)
        return
    with tempfile.TemporaryDirectory(prefix="onnxopt-check-", ignore_cleanup_errors=True) as folder:
        path = os.path.join(folder, runtime.MODEL_FILE)
        ir.save(model, path, external_data=runtime.DATA_FILE)
        yield lambda full_check: onnx.checker.check_model(path, full_check=full_check)


def validate(
    model: ir.Model,
    comparison: ReferenceComparison | None,
    thresholds: Thresholds,
    runtime_name: str = "onnxruntime",
) -> ValidationResult:
    """Check the model's structure, load it in onnxruntime, and compare it with the reference.

    Args:
        model: the optimized model.
        comparison: the reference's outputs on the samples to compare on; None skips comparing.
        thresholds: the limits the comparison must meet.
        runtime_name: where the model's outputs are measured: onnxruntime, or openvino (for
            a model made for it; it must load in onnxruntime too).
    """
    feeds = comparison.feeds if comparison is not None else []
    description = comparison.description if comparison is not None else ""
    checks = check_structure(model)
    result = ValidationResult(checks, [], len(feeds), description)
    if not result.passed:
        return result
    try:
        runtime.create_session(model)
    except Exception as error:
        checks.append(Check("onnxruntime session", False, f"{type(error).__name__}: {error}"))
        return result
    checks.append(Check("onnxruntime session", True))
    if comparison is None:
        return result
    if comparison.problem is not None:
        checks.append(Check("comparison with the original", True, comparison.problem, skipped=True))
        return result
    try:
        result.outputs = comparison.measure(model, rtol=thresholds.rtol, runtime_name=runtime_name)
    except Exception as error:
        checks.append(Check(f"{runtime_name} run", False, f"{type(error).__name__}: {error}"))
        return result
    checks.extend(fidelity_checks(result.outputs, thresholds))
    return result


def meets(outputs: Sequence[OutputFidelity], thresholds: Thresholds) -> bool:
    """Whether the outputs pass every fidelity check the thresholds set."""
    return all(check.passed for check in fidelity_checks(outputs, thresholds))


def _limits(
    thresholds: Thresholds,
) -> list[tuple[str, float, Callable[[OutputFidelity], float | None], Callable[[float], float]]]:
    """The lower limits ``thresholds`` sets: each one's label, minimum, the figure of an output
    it limits (None where it does not apply), and the error that figure stands for."""
    limits = (
        ("cosine", thresholds.min_cosine, lambda output: output.cosine, lambda x: 1 - x),
        (
            "sqnr_db",
            thresholds.min_sqnr_db,
            lambda output: output.sqnr_db,
            lambda x: 10 ** (-min(x, 300.0) / 10),  # relative noise power
        ),
        (
            "expected top1_agreement",
            thresholds.min_top1_agreement,
            lambda output: output.expected_top1_agreement,
            lambda x: 1 - x,
        ),
    )
    return [limit for limit in limits if limit[1] is not None]


def fidelity_checks(outputs: Sequence[OutputFidelity], thresholds: Thresholds) -> list[Check]:
    """One check per threshold that is set, naming the worst output and the margin it missed by."""
    checks = []
    if thresholds.atol is not None:
        worst = max(outputs, key=lambda output: output.max_error_beyond_rtol)
        passed = worst.max_error_beyond_rtol <= thresholds.atol
        checks.append(
            Check(
                f"allclose(atol={thresholds.atol:g}, rtol={thresholds.rtol:g})",
                passed,
                "" if passed else f"output '{worst.name}': max abs error {worst.max_abs_error:.3g}",
            )
        )
    for label, minimum, figure, _ in _limits(thresholds):
        measured = [output for output in outputs if figure(output) is not None]
        if not measured:
            continue
        worst = min(measured, key=figure)
        passed = figure(worst) >= minimum
        checks.append(
            Check(
                f"{label} >= {minimum:g}",
                passed,
                ""
                if passed
                else f"output '{worst.name}': {label} {figure(worst):.6g}, short by {minimum - figure(worst):.3g}",
            )
        )
    return checks


def budget_margin(outputs: Sequence[OutputFidelity], thresholds: Thresholds) -> float | None:
    """How far inside ``thresholds`` the outputs are, in the check nearest failing: the least,
    over the checks set and the outputs they apply to, of ``ln(allowed error / measured error)``
    (errors: 1 - cosine, 1 - expected top-1 agreement, the relative noise power an SQNR
    stands for, the absolute error beyond rtol). 0 on the edge, negative outside. One unit for
    every check, so candidates bound by different checks compare; None where none is set."""
    tiny = 1e-12
    errors: list[tuple[float, float]] = []  # (allowed, measured)
    if thresholds.atol is not None:
        worst = max(output.max_error_beyond_rtol for output in outputs)
        errors.append((thresholds.atol, worst))
    for _, minimum, figure, error in _limits(thresholds):
        errors += [
            (error(minimum), error(figure(output)))
            for output in outputs
            if figure(output) is not None
        ]
    if not errors:
        return None
    if not all(math.isfinite(measured) for _, measured in errors):
        return -math.inf  # a NaN or infinite output
    return min(math.log(max(allowed, tiny) / max(measured, tiny)) for allowed, measured in errors)
