"""Errors a user reads: what is wrong, what to do, and the exit code that goes with it."""

from __future__ import annotations


class OnnxoptError(Exception):
    """Base of every error onnxopt reports to a user without a traceback.

    Attributes:
        exit_code: 2 for bad usage or bad input, 1 for processing or validation failures.
    """

    exit_code = 1

    def __init__(self, message: str, *, details: list[str] | None = None, fix: str | None = None):
        super().__init__(message)
        self.message = message
        self.details = list(details or [])
        self.fix = fix

    def render(self) -> str:
        lines = [self.message]
        lines += [f"  {line}" for line in self.details]
        if self.fix:
            lines.append(f"  fix: {self.fix}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.render()


class InputError(OnnxoptError):
    """The user gave something unusable: a missing file, bad data, an unknown option."""

    exit_code = 2


class ProcessingError(OnnxoptError):
    """A pass could not do its work on a valid input."""

    exit_code = 1


class ValidationFailed(OnnxoptError):
    """The optimized model does not meet the recipe's checks; it is not written.

    Attributes:
        result: the ``OptimizeResult`` of the failed run, when raised by ``onnxopt.optimize``.
    """

    exit_code = 1
    result = None
