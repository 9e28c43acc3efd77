"""Pass options, declared once: the typed keyword parameters of a pass's ``__init__``.

A parameter's type hint is the declaration. ``Literal[...]`` lists the valid choices,
``Annotated[int, Range(low=1)]`` adds a range, ``Annotated[..., Rule(check)]`` any other rule.
Recipes, ``--set`` and direct construction in Python are all checked here, with one kind of
error that names the option, what it must be, and what was given.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math
import operator
import re
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from onnxopt.errors import InputError

# The word a recipe or --set uses for None, where an option allows it.
NONE_WORD = "none"


@dataclasses.dataclass(frozen=True)
class Range:
    """A numeric option's bounds; an open end excludes the bound itself."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def admits(self, value: Any) -> bool:
        """Numbers within the bounds; a word (``"auto"``) is another option's choice."""
        if isinstance(value, str):
            return True
        if math.isnan(value):
            return False
        if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
            return False
        return not (
            self.high is not None and (value > self.high or (self.high_open and value == self.high))
        )

    def describe(self) -> str:
        if self.low is not None and self.high is not None:
            opening = "(" if self.low_open else "["
            closing = ")" if self.high_open else "]"
            return f"in {opening}{self.low:g}, {self.high:g}{closing}"
        if self.low is not None:
            return f"{'>' if self.low_open else '>='} {self.low:g}"
        if self.high is not None:
            return f"{'<' if self.high_open else '<='} {self.high:g}"
        return "any number"


@dataclasses.dataclass(frozen=True)
class Rule:
    """Any other rule: ``check`` returns what is wrong with a value, or None when it is fine."""

    check: Callable[[Any], str | None]


def regular_expression_problem(patterns: Sequence[str] | None) -> str | None:
    """What is wrong with a list of regular expressions (the first that does not compile),
    or None."""
    for pattern in patterns or ():
        try:
            re.compile(pattern)
        except re.error as error:
            return f"has {pattern!r}, which is not a regular expression: {error}"
    return None


# The rule of options that hold regular expressions on node or tensor names.
REGULAR_EXPRESSIONS = Rule(regular_expression_problem)


@dataclasses.dataclass(frozen=True)
class Option:
    """One declared option: its name, its type, its constraints and its default."""

    name: str
    hint: Any
    constraints: tuple[Any, ...] = ()
    default: Any = inspect.Parameter.empty

    def describe(self) -> str:
        """What a valid value is, in words a recipe author reads: "an integer >= 1 or none"."""
        ranges = [
            constraint.describe()
            for constraint in self.constraints
            if isinstance(constraint, Range)
        ]
        hint = _without_none(self.hint)
        words = _literal_words(hint)
        numbers = _without_literals(hint)
        text = " ".join([type_name(numbers), *ranges])
        if words:
            text = f"{text} or {', '.join(words)}"
        return (
            f"{text} or {NONE_WORD}" if self.hint is not Any and _allows_none(self.hint) else text
        )

    def problem(self, value: Any) -> str | None:
        """What is wrong with ``value`` for this option, or None."""
        if value is None or value == NONE_WORD:
            return None if _allows_none(self.hint) else f"must be {self.describe()}, got {value!r}"
        if not _fits(value, self.hint):
            return f"must be {self.describe()}, got {value!r}"
        for constraint in self.constraints:
            if isinstance(constraint, Range) and not constraint.admits(value):
                return f"must be {self.describe()}, got {value!r}"
            if isinstance(constraint, Rule):
                found = constraint.check(value)
                if found is not None:
                    return found
        return None


@functools.cache
def declared_options(function: Callable[..., Any]) -> dict[str, Option]:
    """The options a pass takes: the keyword parameters of its ``__init__``, with their types."""
    hints = typing.get_type_hints(function, include_extras=True)
    options = {}
    for name, parameter in inspect.signature(function).parameters.items():
        if name == "self" or parameter.kind not in (
            parameter.KEYWORD_ONLY,
            parameter.POSITIONAL_OR_KEYWORD,
        ):
            continue
        hint = hints.get(name, Any)
        constraints: tuple[Any, ...] = ()
        if typing.get_origin(hint) is typing.Annotated:
            hint, *extras = typing.get_args(hint)
            constraints = tuple(extras)
        options[name] = Option(name, hint, constraints, parameter.default)
    return options


def check_options(
    owner: str, values: Mapping[str, Any], declared: Mapping[str, Option], origin: str
) -> None:
    """Fail with the valid choices when an option is unknown or a value does not fit.

    Args:
        owner: the pass's recipe name, as the user wrote it.
        values: option name to value.
        declared: what the pass declares (``declared_options``).
        origin: where the values came from ("recipe 'int8'", "--set"), for the message.
    """
    for name, value in values.items():
        option = declared.get(name)
        if option is None:
            valid = ", ".join(f"{known} ({item.describe()})" for known, item in declared.items())
            raise InputError(
                f"{origin}: pass '{owner}' has no option '{name}'",
                details=[f"options: {valid or 'none'}"],
            )
        problem = option.problem(value)
        if problem is not None:
            raise InputError(
                f"{origin}: option '{owner}.{name}' {problem}",
                fix=_example_fix(owner, option),
            )


def without_none_words(values: Mapping[str, Any]) -> dict[str, Any]:
    """The values with the recipe word for None turned into None."""
    return {name: (None if value == NONE_WORD else value) for name, value in values.items()}


def type_name(hint: Any) -> str:
    """A type hint in words a recipe author reads."""
    origin = typing.get_origin(hint)
    if origin is typing.Literal:
        return "one of " + ", ".join(str(choice) for choice in typing.get_args(hint))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(
            NONE_WORD if argument is type(None) else type_name(argument)
            for argument in typing.get_args(hint)
        )
    if origin in (list, Sequence, tuple):
        (item_type, *_) = typing.get_args(hint) or (Any,)
        return f"a list of {type_name(item_type)}"
    if origin is dict or hint is dict:
        return "a table"
    if hint is Any:
        return "any value"
    return {bool: "true/false", int: "an integer", float: "a number", str: "a string"}.get(
        hint, str(hint)
    )


def _example_fix(owner: str, option: Option) -> str | None:
    if option.default is inspect.Parameter.empty or option.default is None:
        return None
    default = str(option.default).lower() if isinstance(option.default, bool) else option.default
    return f"e.g. --set {owner}.{option.name}={default} (the default)"


def _without_none(hint: Any) -> Any:
    """The hint without its None alternative: ``int | None`` -> ``int``."""
    if typing.get_origin(hint) not in (typing.Union, types.UnionType):
        return hint
    others = [argument for argument in typing.get_args(hint) if argument is not type(None)]
    return others[0] if len(others) == 1 else functools.reduce(operator.or_, others)


def _literal_words(hint: Any) -> list[str]:
    """The words of a union's Literal member (``int | Literal["auto"]``: ``["auto"]``)."""
    if typing.get_origin(hint) not in (typing.Union, types.UnionType):
        return []
    return [
        str(choice)
        for argument in typing.get_args(hint)
        if typing.get_origin(argument) is typing.Literal
        for choice in typing.get_args(argument)
    ]


def _without_literals(hint: Any) -> Any:
    """A union's members but its Literal ones, so its ranges read after the number."""
    if not _literal_words(hint):
        return hint
    others = [
        argument
        for argument in typing.get_args(hint)
        if typing.get_origin(argument) is not typing.Literal
    ]
    return functools.reduce(operator.or_, others) if others else hint


def _allows_none(hint: Any) -> bool:
    if hint is Any:
        return True
    return typing.get_origin(hint) in (typing.Union, types.UnionType) and type(
        None
    ) in typing.get_args(hint)


def _fits(value: Any, hint: Any) -> bool:
    origin = typing.get_origin(hint)
    if origin is typing.Literal:
        return any(
            value == choice and type(value) is type(choice) for choice in typing.get_args(hint)
        )
    if origin in (typing.Union, types.UnionType):
        return any(
            _fits(value, argument)
            for argument in typing.get_args(hint)
            if argument is not type(None)
        )
    if origin in (list, Sequence, tuple):
        (item_type, *_) = typing.get_args(hint) or (Any,)
        return isinstance(value, (list, tuple)) and all(_fits(item, item_type) for item in value)
    if hint is Any:
        return True
    if origin is dict or hint is dict:
        return isinstance(value, dict)
    if hint is bool:
        return isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(hint, type):
        return isinstance(value, hint)
    return True
