from __future__ import annotations

import re
from typing import Annotated, Any, Literal

import pytest

from onnxopt.errors import InputError
from onnxopt.options import Range, Rule, check_options, declared_options


def no_spaces(value: str) -> str | None:
    return "must not contain spaces" if " " in value else None


def example(
    self,
    count: Annotated[int, Range(low=1)] = 4,
    share: Annotated[float | None, Range(0.0, 1.0, high_open=True)] = None,
    mode: Literal["fast", "exact"] = "fast",
    names: list[str] | None = None,
    label: Annotated[str, Rule(no_spaces)] = "x",
    table: dict[str, Any] | None = None,
    size: Annotated[int | Literal["auto"], Range(low=1)] = "auto",
):
    """Stands for a pass's __init__."""


DECLARED = declared_options(example)


@pytest.mark.parametrize(
    "values",
    [
        {"count": 1},
        {"share": 0.0},
        {"share": None},
        {"share": "none"},
        {"mode": "exact"},
        {"names": ["a", "b"]},
        {"names": ("a",)},
        {"label": "ok"},
        {"table": {"a": 1}},
        {"size": "auto"},
        {"size": 2},
    ],
    ids=str,
)
def test_values_that_fit_pass(values):
    check_options("example", values, DECLARED, "recipe")


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"count": 0}, "recipe: option 'example.count' must be an integer >= 1, got 0"),
        ({"count": True}, "option 'example.count' must be an integer >= 1, got True"),
        ({"count": None}, "option 'example.count' must be an integer >= 1, got None"),
        ({"share": 1.0}, "option 'example.share' must be a number in [0, 1) or none, got 1.0"),
        ({"share": float("nan")}, "must be a number in [0, 1) or none, got nan"),
        ({"mode": "slow"}, "option 'example.mode' must be one of fast, exact, got 'slow'"),
        ({"names": "a"}, "option 'example.names' must be a list of a string or none, got 'a'"),
        ({"label": "a b"}, "option 'example.label' must not contain spaces"),
        ({"table": [1]}, "option 'example.table' must be a table or none, got [1]"),
        ({"size": 0}, "option 'example.size' must be an integer >= 1 or auto, got 0"),
        ({"size": "all"}, "option 'example.size' must be an integer >= 1 or auto, got 'all'"),
    ],
)
def test_values_that_do_not_fit_name_the_option_and_what_it_must_be(values, message):
    with pytest.raises(InputError, match=re.escape(message)):
        check_options("example", values, DECLARED, "recipe")


def test_unknown_option_lists_every_option_with_its_type():
    with pytest.raises(InputError) as raised:
        check_options("example", {"colour": 1}, DECLARED, "--set")
    rendered = raised.value.render()
    assert "--set: pass 'example' has no option 'colour'" in rendered
    assert "count (an integer >= 1)" in rendered and "mode (one of fast, exact)" in rendered


def test_a_range_error_suggests_the_default():
    with pytest.raises(InputError) as raised:
        check_options("example", {"count": -3}, DECLARED, "--set")
    assert raised.value.fix == "e.g. --set example.count=4 (the default)"


def test_declarations_keep_defaults_and_drop_self():
    assert list(DECLARED) == ["count", "share", "mode", "names", "label", "table", "size"]
    assert DECLARED["count"].default == 4 and DECLARED["count"].constraints == (Range(low=1),)
