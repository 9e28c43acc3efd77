"""The base every onnxopt pass derives from, and the result every pass returns."""

from __future__ import annotations

import dataclasses
import functools
import inspect
from collections.abc import Callable, Sequence
from typing import Any, ClassVar, TypeVar

import onnx_ir as ir

from onnxopt.context import Context
from onnxopt.options import Option, check_options, declared_options

_Pass = TypeVar("_Pass", bound="OnnxoptPass")


@dataclasses.dataclass
class PassResult(ir.passes.PassResult):
    """What a pass did: onnx_ir's result, plus a count of changes and notes for the report.

    Attributes:
        changes: how many things the pass changed (nodes folded, layers kept float, ...).
        details: anything else worth a note in the report, by label.
    """

    changes: int = 0
    details: dict[str, Any] = dataclasses.field(default_factory=dict)


class OnnxoptPass(ir.passes.InPlacePass):
    """An in-place onnx_ir pass that knows its recipe name, its options and what it needs.

    A subclass takes its options as typed keyword parameters of ``__init__`` (``Literal``
    choices, ``Annotated[int, Range(low=1)]`` and the like, see ``onnxopt.options``); they are
    checked before ``__init__`` runs, from a recipe or from Python alike. It does its work in
    ``call(model)``, reads and writes shared state through ``self.context``, and returns a
    ``PassResult`` with its count of changes.

    Attributes:
        name: the name a recipe uses for this pass.
        needs_data: the pass cannot run without calibration data.
        reads_data: the pass measures on calibration data when there is some (validation
            then holds back at most a quarter of the samples, as for ``needs_data``).
        needs_calibration: the pass reads ``context.calibration``.
        provides_calibration: the pass fills ``context.calibration`` for the passes after it.
        min_opset: the lowest default-domain opset the pass supports, or None.
        quantizes: the pass is a step of int8 quantization, skipped once the speed check
            found int8 slower than float (``context.int8_declined``).
    """

    name: ClassVar[str] = ""
    needs_data: ClassVar[bool] = False
    reads_data: ClassVar[bool] = False
    needs_calibration: ClassVar[bool] = False
    provides_calibration: ClassVar[bool] = False
    min_opset: ClassVar[int | None] = None
    quantizes: ClassVar[bool] = False

    _context: Context | None = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "__init__" in cls.__dict__:
            cls.__init__ = _checking_options(cls, cls.__dict__["__init__"])

    @classmethod
    def options(cls) -> dict[str, Option]:
        """The options this pass declares, by name."""
        return declared_options(inspect.unwrap(cls.__init__))

    @property
    def context(self) -> Context:
        """The state of the run this pass is part of; a fresh one when it runs alone."""
        if self._context is None:
            self._context = Context()
        return self._context

    def bind(self, context: Context) -> None:
        """Make the pass part of a run that shares ``context``."""
        self._context = context

    def configure(self, passes: Sequence[OnnxoptPass]) -> None:
        """Read settings from the other passes of the pipeline (``passes``, this one among
        them) before any runs; most passes need none."""

    def next_pass(self, passes: Sequence[OnnxoptPass], kind: type[_Pass]) -> _Pass | None:
        """The first pass of ``kind`` after this one in ``passes``, or None."""
        if self not in passes:
            return None
        later = passes[passes.index(self) + 1 :]
        return next((pass_ for pass_ in later if isinstance(pass_, kind)), None)

    def opset_after(self, opset: int) -> int:
        """The default-domain opset of the model after this pass, for checking later passes' needs."""
        return opset

    def call(self, model: ir.Model) -> PassResult:
        raise NotImplementedError


def _checking_options(cls: type[OnnxoptPass], init: Callable[..., None]) -> Callable[..., None]:
    """``init``, checking the options it is given against their declarations first."""
    signature = inspect.signature(init)

    @functools.wraps(init)
    def checked(self: OnnxoptPass, *args: Any, **kwargs: Any) -> None:
        bound = signature.bind(self, *args, **kwargs)
        given = {name: value for name, value in bound.arguments.items() if name != "self"}
        check_options(cls.name or cls.__name__, given, declared_options(init), "options")
        init(self, *args, **kwargs)

    return checked
