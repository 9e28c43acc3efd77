from __future__ import annotations

import re

import pytest

from onnxopt.errors import InputError
from onnxopt.passes.validate import ValidatePass
from onnxopt.recipe import (
    apply_overrides,
    available_presets,
    build_passes,
    load_recipe,
    parse_recipe,
)


def test_presets_ship_inside_the_package_and_parse():
    assert "cleanup" in available_presets()
    for name in available_presets():
        recipe = load_recipe(name)
        assert recipe.passes[-1].name == "validate", f"preset {name} must end with validation"
        build_passes(recipe)


def test_recipe_file_and_overrides(tmp_path):
    path = tmp_path / "mine.toml"
    path.write_text('name = "mine"\n[[passes]]\nname = "validate"\nsamples = 3\n')
    recipe = apply_overrides(load_recipe(path), ["validate.min_cosine=0.99", "validate.samples=5"])
    (validate,) = build_passes(recipe)
    assert isinstance(validate, ValidatePass)
    assert validate.samples == 5
    assert validate.thresholds.min_cosine == 0.99


def test_override_of_an_optional_option_to_none():
    recipe = apply_overrides(load_recipe("cleanup"), ["validate.atol=none"])
    assert build_passes(recipe)[-1].thresholds.atol is None


def test_copy_keeps_the_original_recipe_untouched():
    recipe = load_recipe("cleanup")
    apply_overrides(recipe.copy(), ["validate.samples=2"])
    assert recipe.passes[-1].options["samples"] == 8


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[[passes]]\nname = "no-such-pass"', "unknown pass 'no-such-pass'"),
        ('[[passes]]\nname = "validate"\nbogus = 1', "has no option 'bogus'"),
        ('[[passes]]\nname = "validate"\nsamples = "many"', "must be an integer"),
        (
            '[[passes]]\nname = "validate"\nmin_cosine = true',
            "must be a number in [-1, 1] or none, got True",
        ),
        ("name = 'x'", "names no passes"),
        ("[[passes", "not valid TOML"),
        ('colour = "red"\n[[passes]]\nname = "validate"', "unknown top-level keys"),
    ],
)
def test_bad_recipes_name_what_is_wrong(text, message):
    with pytest.raises(InputError, match=re.escape(message)):
        parse_recipe(text)


def test_unknown_pass_lists_the_valid_ones():
    with pytest.raises(InputError) as raised:
        parse_recipe('[[passes]]\nname = "fold-constnats"')
    assert "fold-constants" in raised.value.render()


def test_unknown_option_lists_the_valid_ones():
    with pytest.raises(InputError) as raised:
        apply_overrides(load_recipe("cleanup"), ["validate.cosine=0.9"])
    assert "min_cosine" in raised.value.render()


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("validate", "not of the form"),
        ("samples=3", "not of the form"),
        ("quantize.mode=qdq", "has no pass 'quantize'"),
        ("validate.samples=lots", "must be an integer"),
    ],
)
def test_bad_overrides(override, message):
    with pytest.raises(InputError, match=message):
        apply_overrides(load_recipe("cleanup"), [override])


def test_unknown_preset_lists_presets():
    with pytest.raises(InputError, match="unknown recipe 'fast'") as raised:
        load_recipe("fast")
    assert "cleanup" in raised.value.render()
    assert raised.value.exit_code == 2


def test_missing_recipe_file():
    with pytest.raises(InputError, match="does not exist"):
        load_recipe("nowhere/recipe.toml")


def test_recipes_and_overrides_are_data_never_code(tmp_path):
    marker = tmp_path / "ran"
    code = f"__import__('pathlib').Path('{marker}').touch()"
    path = tmp_path / "mine.toml"
    path.write_text(f'name = "mine"\n[[passes]]\nname = "validate"\nmin_cosine = "{code}"\n')
    with pytest.raises(InputError):
        build_passes(load_recipe(path))
    with pytest.raises(InputError):
        build_passes(apply_overrides(load_recipe("cleanup"), [f"validate.min_cosine={code}"]))
    assert not marker.exists()
