"""Recipes: TOML files naming passes and their options; presets ship inside the package."""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

from onnxopt import options as options_module
from onnxopt.errors import InputError
from onnxopt.options import without_none_words
from onnxopt.passes import PASSES

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib


@dataclasses.dataclass
class PassSpec:
    """One step of a recipe: a pass name and the options given to it."""

    name: str
    options: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class Recipe:
    """A named, ordered list of passes with their options."""

    name: str
    passes: list[PassSpec]
    description: str = ""

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def copy(self) -> Recipe:
        """A copy whose options can be overridden without touching this one."""
        return Recipe(
            self.name,
            [PassSpec(spec.name, dict(spec.options)) for spec in self.passes],
            self.description,
        )


def available_presets() -> list[str]:
    """Names of the recipes that ship inside the package."""
    folder = resources.files("onnxopt") / "presets"
    return sorted(
        entry.name.removesuffix(".toml")
        for entry in folder.iterdir()
        if entry.name.endswith(".toml")
    )


def load_recipe(name_or_path: str | Path) -> Recipe:
    """A preset by name, or a recipe from a .toml file."""
    text_source = str(name_or_path)
    if text_source.endswith(".toml") or Path(text_source).is_file():
        path = Path(text_source)
        if not path.is_file():
            raise InputError(f"recipe file '{path}' does not exist", fix="check the path")
        return parse_recipe(
            path.read_text(encoding="utf-8"), default_name=path.stem, origin=str(path)
        )
    if text_source not in available_presets():
        raise InputError(
            f"unknown recipe '{text_source}'",
            details=[f"presets: {', '.join(available_presets())}"],
            fix="name a preset or give the path of a .toml recipe file",
        )
    text = (resources.files("onnxopt") / "presets" / f"{text_source}.toml").read_text(
        encoding="utf-8"
    )
    return parse_recipe(text, default_name=text_source, origin=f"preset '{text_source}'")


def parse_recipe(text: str, default_name: str = "recipe", origin: str = "recipe") -> Recipe:
    """Parse and check recipe TOML: every pass and option must exist and every value fit its type."""
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise InputError(
            f"{origin} is not valid TOML: {error}", fix="fix the TOML syntax"
        ) from error
    unknown_keys = set(document) - {"name", "description", "passes"}
    if unknown_keys:
        raise InputError(
            f"{origin} has unknown top-level keys: {', '.join(sorted(unknown_keys))}",
            details=["allowed: name, description, passes"],
        )
    entries = document.get("passes")
    if not isinstance(entries, list) or not entries:
        raise InputError(
            f"{origin} names no passes",
            fix='add one [[passes]] table per pass, e.g.\n    [[passes]]\n    name = "fold-constants"',
        )
    passes = []
    for position, entry in enumerate(entries, start=1):
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            raise InputError(
                f"{origin}: pass #{position} has no name", fix='give it name = "<pass>"'
            )
        options = {key: value for key, value in entry.items() if key != "name"}
        passes.append(PassSpec(entry["name"], options))
    recipe = Recipe(
        str(document.get("name", default_name)), passes, str(document.get("description", ""))
    )
    for spec in recipe.passes:
        check_options(spec.name, spec.options, origin)
    return recipe


def apply_overrides(recipe: Recipe, overrides: Sequence[str]) -> Recipe:
    """Apply ``pass.option=value`` settings given as text; the value is TOML or a bare word."""
    settings = {}
    for override in overrides:
        key, separator, raw_value = override.partition("=")
        if not separator:
            raise InputError(
                f"--set '{override}' is not of the form pass.option=value",
                fix="e.g. --set validate.min_cosine=0.999",
            )
        settings[key.strip()] = parse_value(raw_value.strip())
    return apply_settings(recipe, settings, origin="--set")


def apply_settings(recipe: Recipe, settings: Mapping[str, Any], origin: str = "settings") -> Recipe:
    """Set ``{"pass.option": value}`` on every step of that pass, values as they are (no parsing).

    Raises:
        InputError: a key is not ``pass.option``, the recipe has no such pass, or the pass no
            such option, or the value does not fit it.
    """
    for key, value in settings.items():
        pass_name, dot, option = key.partition(".")
        if not dot or not pass_name or not option:
            raise InputError(
                f"{origin}: '{key}' is not of the form pass.option",
                fix="e.g. validate.min_cosine",
            )
        steps = [spec for spec in recipe.passes if spec.name == pass_name]
        if not steps:
            raise InputError(
                f"{origin} '{key}={value}': recipe '{recipe.name}' has no pass '{pass_name}'",
                details=[f"its passes: {', '.join(spec.name for spec in recipe.passes)}"],
            )
        check_options(pass_name, {option: value}, origin)
        for spec in steps:
            spec.options[option] = value
    return recipe


def parse_value(text: str) -> Any:
    """A TOML value (number, boolean, quoted string, array), else the text itself as a string."""
    try:
        return tomllib.loads(f"value = {text}")["value"]
    except tomllib.TOMLDecodeError:
        return text


def check_options(pass_name: str, options: Mapping[str, Any], origin: str) -> None:
    """Fail with the valid choices when a pass, option or value is wrong."""
    if pass_name not in PASSES:
        raise InputError(
            f"{origin}: unknown pass '{pass_name}'",
            details=[f"passes: {', '.join(sorted(PASSES))}"],
        )
    declared = PASSES[pass_name].options()
    options_module.check_options(pass_name, options, declared, origin)


def build_passes(recipe: Recipe) -> list:
    """Instantiate the recipe's passes with their options, after checking them."""
    passes = []
    for spec in recipe.passes:
        check_options(spec.name, spec.options, f"recipe '{recipe.name}'")
        passes.append(PASSES[spec.name](**without_none_words(spec.options)))
    return passes
