"""Tests for transform_core.recipe: the YAML schema, its errors, loading and built-in recipes."""

from __future__ import annotations

import dataclasses
import os
import textwrap
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from transform_core.errors import RecipeError
from transform_core.recipe import (
    Recipe,
    Rule,
    builtin_recipe_text,
    builtin_recipes,
    load_recipe,
    parse_recipe,
)
from transform_core.registry import derive_seed, get_transform

BUILTINS = ["int8", "int8-act", "qat4", "ternary", "xylo"]


def recipe_error(text: str) -> RecipeError:
    with pytest.raises(RecipeError) as info:
        parse_recipe(textwrap.dedent(text).lstrip("\n"), source="r.yaml")
    return info.value


# --- the brief's example, exactly --------------------------------------------------------


def test_error_names_file_line_key_and_expectation() -> None:
    error = recipe_error(
        """
        version: 1
        description: too few levels
        params:
          - family: weights
            transform: stochastic_rounding
            args:
              num_levels: 1
        """
    )
    assert str(error) == "r.yaml:7: params[0].args.num_levels: must be an integer >= 2, got 1"
    assert (error.path, error.line, error.key) == ("r.yaml", 7, "params[0].args.num_levels")


# --- every error path: message and line --------------------------------------------------

ERROR_CASES = {
    "unknown top-level key": (
        """
        version: 1
        parms: []
        """,
        # Later sections join the end of the list; the start is fixed.
        "r.yaml:2: parms: unknown key 'parms' (did you mean 'params'?); expected one of "
        "version, description, seed, families, params, activations, ...",
    ),
    "unknown rule key": (
        """
        version: 1
        params:
          - family: weights
            transfrom: identity
        """,
        "r.yaml:4: params[0].transfrom: unknown key 'transfrom' (did you mean 'transform'?); "
        "expected one of family, match, module, transform, args, optional",
    ),
    "unknown transform": (
        """
        version: 1
        params:
          - family: weights
            transform: stochastic_roundin
        """,
        "r.yaml:4: params[0].transform: unknown transform 'stochastic_roundin' (did you mean "
        "'stochastic_rounding'?); expected one of stochastic_rounding, deterministic_rounding, "
        "stochastic_channel_rounding, deterministic_channel_rounding, int_quant, t_decay, dropout, identity or your own "
        "'package.module:function'",
    ),
    "unknown argument": (
        """
        version: 1
        params:
          - family: weights
            transform: stochastic_rounding
            args: {seed: 1,
                   num_level: 3}
        """,
        "r.yaml:5: params[0].args.seed: unknown argument 'seed' for stochastic_rounding; "
        "expected input_range, output_range, num_levels, maintain_zero",
    ),
    "misspelt argument": (
        """
        version: 1
        params:
          - family: weights
            transform: stochastic_rounding
            args:
              maintain_zero: true
              num_level: 3
        """,
        "r.yaml:7: params[0].args.num_level: unknown argument 'num_level' for "
        "stochastic_rounding (did you mean 'num_levels'?); expected input_range, "
        "output_range, num_levels, maintain_zero",
    ),
    "bool given for int": (
        """
        version: 1
        params:
          - family: weights
            transform: deterministic_rounding
            args:
              num_levels: true
        """,
        "r.yaml:6: params[0].args.num_levels: must be an integer, got true (a boolean)",
    ),
    "fraction given for int": (
        """
        version: 1
        params:
          - family: weights
            transform: int_quant
            args: {n_bits: 2.5}
        """,
        "r.yaml:5: params[0].args.n_bits: must be an integer, got 2.5",
    ),
    "range of three numbers": (
        """
        version: 1
        params:
          - family: weights
            transform: deterministic_rounding
            args:
              output_range: [-1, 0, 1]
        """,
        "r.yaml:6: params[0].args.output_range: must be a range [min, max] of two numbers or "
        "null, got [-1, 0, 1] (a list of 3)",
    ),
    "reversed range": (
        """
        version: 1
        params:
          - family: weights
            transform: deterministic_rounding
            args:
              num_levels: 255
              output_range: [127, -128]
        """,
        "r.yaml:7: params[0].args.output_range: is reversed: got [127.0, -128.0]; give it as "
        "[min, max], e.g. [-128.0, 127.0]",
    ),
    "probability out of range": (
        """
        version: 1
        activations:
          - module: Linear
            transform: dropout
            args: {dropout_prob: 1.5}
        """,
        "r.yaml:5: activations[0].args.dropout_prob: must be a number in [0, 1], got 1.5",
    ),
    "missing required argument": (
        """
        version: 1
        params:
          - family: weights
            transform: stochastic_channel_rounding
        """,
        "r.yaml:3: params[0].args: stochastic_channel_rounding needs the argument(s) "
        "output_range ([float, float]); add them under 'args'",
    ),
    "args not a mapping": (
        """
        version: 1
        params:
          - family: weights
            transform: identity
            args: [1, 2]
        """,
        "r.yaml:5: params[0].args: 'args' must be a mapping, got a list",
    ),
    "bad regex": (
        """
        version: 1
        params:
          - match: "re:fc[.weight"
            transform: identity
        """,
        "r.yaml:3: params[0].match: bad regular expression 'fc[.weight': unterminated "
        "character set at position 2; fix it or drop the 're:' prefix to use a glob",
    ),
    "duplicate key": (
        """
        version: 1
        params: []
        version: 1
        """,
        "r.yaml:3: version: duplicate key 'version' (first given on line 1); keep one",
    ),
    "duplicate argument": (
        """
        version: 1
        params:
          - family: weights
            transform: deterministic_rounding
            args:
              num_levels: 3
              num_levels: 5
        """,
        "r.yaml:7: params[0].args.num_levels: duplicate key 'num_levels' (first given on "
        "line 6); keep one",
    ),
    "bad YAML": (
        """
        version: 1
        params:
          - family: weights
           transform: identity
        """,
        "r.yaml:4: invalid YAML: while parsing a block collection; expected <block end>, but "
        "found '<block mapping start>'; check indentation, colons and quoting",
    ),
    "version 2": (
        """
        # a newer recipe
        version: 2
        fine_tuning: {epochs: 3}
        """,
        "r.yaml:2: version: unsupported recipe version 2; this rockq reads 'version: 1' recipes",
    ),
    "version as a string": (
        """
        version: "1"
        """,
        "r.yaml:1: version: unsupported recipe version '1'; this rockq reads 'version: 1' recipes",
    ),
    "version missing": (
        """
        description: no version
        params: []
        """,
        "r.yaml:1: missing 'version'; start the recipe with 'version: 1'",
    ),
    "top level a list": (
        """
        - version: 1
        """,
        "r.yaml:1: a recipe must be a mapping, got a list",
    ),
    "no rules": (
        """
        version: 1
        description: nothing to do
        """,
        "r.yaml:1: the recipe has no rules; add a 'params' or 'activations' list of rules",
    ),
    "params not a list": (
        """
        version: 1
        params:
          family: weights
        """,
        "r.yaml:3: params: must be a list of rules (each starting with '- '), got "
        "{'family': 'weights'}",
    ),
    "null params": (
        """
        version: 1
        params:
        """,
        "r.yaml:2: params: must be a list of rules (each starting with '- '), got null",
    ),
    "family and match": (
        """
        version: 1
        params:
          - family: weights
            match: "*.weight"
            transform: identity
        """,
        "r.yaml:3: params[0]: a params rule needs exactly one of 'family' or 'match', found both",
    ),
    "neither family nor match": (
        """
        version: 1
        params:
          - module: Linear
            transform: identity
        """,
        "r.yaml:3: params[0]: a params rule needs exactly one of 'family' or 'match', found "
        "neither",
    ),
    "activation by family": (
        """
        version: 1
        activations:
          - module: Linear
            transform: identity
          - family: weights
            transform: identity
        """,
        "r.yaml:5: activations[1].family: activation rules select modules by 'module' and/or "
        "'match', not 'family'",
    ),
    "activation without selector": (
        """
        version: 1
        activations:
          - transform: identity
        """,
        "r.yaml:3: activations[0]: an activations rule needs 'module' (a class name) and/or "
        "'match' (a module name glob)",
    ),
    "transform missing": (
        """
        version: 1
        params:
          - family: weights
        """,
        "r.yaml:3: params[0]: a rule needs 'transform: NAME'",
    ),
    "transform not a string": (
        """
        version: 1
        params:
          - family: weights
            transform: 3
        """,
        "r.yaml:4: params[0].transform: must be a transform name, got 3",
    ),
    "optional not a bool": (
        """
        version: 1
        params:
          - family: biases
            transform: identity
            optional: maybe
        """,
        "r.yaml:5: params[0].optional: must be true or false, got 'maybe'",
    ),
    "empty match": (
        """
        version: 1
        params:
          - match: ""
            transform: identity
        """,
        "r.yaml:3: params[0].match: must be a glob or 're:' and a regular expression, got ''",
    ),
    "seed not an int": (
        """
        version: 1
        seed: 1.5
        params: []
        """,
        "r.yaml:2: seed: must be an integer, got 1.5",
    ),
    "families empty list": (
        """
        version: 1
        families:
          decays: []
        params: []
        """,
        "r.yaml:3: families.decays: must be a non-empty list of name patterns, got []",
    ),
    "families bad regex": (
        """
        version: 1
        families:
          decays: ["*.alpha", "re:(beta"]
        params: []
        """,
        "r.yaml:3: families.decays[1]: bad regular expression '(beta': missing ), unterminated "
        "subpattern at position 0; fix it or drop the 're:' prefix to use a glob",
    ),
    "glob in two families": (
        """
        version: 1
        families:
          decays: ["*.alpha"]
          taus:
            - "*.alpha"
        params: []
        """,
        "r.yaml:5: families.taus[0]: pattern '*.alpha' is already in family 'decays'; a "
        "tensor belongs to one family",
    ),
    "non-string key": (
        """
        version: 1
        params:
          - family: weights
            transform: identity
            1: x
        """,
        "r.yaml:5: params[0]: keys must be strings, got 1",
    ),
    "unsafe tag": (
        """
        version: 1
        params:
          - family: !!python/name:os.system weights
            transform: identity
        """,
        "r.yaml:3: params[0].family: cannot read this value: could not determine a "
        "constructor for the tag 'tag:yaml.org,2002:python/name:os.system'",
    ),
}


@pytest.mark.parametrize(("text", "expected"), ERROR_CASES.values(), ids=list(ERROR_CASES))
def test_error_paths(text: str, expected: str) -> None:
    error = recipe_error(text)
    if expected.endswith("..."):
        assert str(error).startswith(expected.removesuffix("..."))
    else:
        assert str(error) == expected
    assert error.line == int(expected.split(":")[1])


def test_empty_recipe() -> None:
    for text in ("", "# only a comment\n"):
        error = recipe_error(text)
        assert str(error) == (
            "r.yaml: the recipe is empty; expected a mapping starting with 'version: 1'"
        )
        assert error.line is None


def test_errors_are_single_line() -> None:
    for text, _ in ERROR_CASES.values():
        assert "\n" not in str(recipe_error(text))


# --- what a valid recipe parses to -------------------------------------------------------

FULL = """\
version: 1
description: 4-bit stochastic weights, 8-bit biases
seed: 7
families:
  decays: ["*.alpha", "re:.*beta"]
params:
  - family: weights
    transform: stochastic_rounding
    args: {num_levels: 16}
  - match: "re:.*\\\\.bias"
    module: "Lin*"
    transform: deterministic_rounding
    args: {num_levels: 256, output_range: [-128, 127]}
    optional: true
  - family: decays
    transform: t_decay
activations:
  - module: Linear
    transform: deterministic_rounding
    args: {num_levels: 256, output_range: [-128, 127]}
"""


def test_full_recipe_fields() -> None:
    recipe = parse_recipe(FULL, source="full.yaml")
    assert (recipe.version, recipe.seed, recipe.source) == (1, 7, "full.yaml")
    assert recipe.description == "4-bit stochastic weights, 8-bit biases"
    assert recipe.families == {"decays": ("*.alpha", "re:.*beta")}
    assert recipe.family_rules() == {"*.alpha": "decays", "re:.*beta": "decays"}
    assert recipe.text == FULL
    weights, biases, decays = recipe.params
    assert weights.transform is get_transform("stochastic_rounding")
    assert (weights.label, weights.family, weights.args, weights.line) == (
        "params[0]",
        "weights",
        {"num_levels": 16},
        7,
    )
    assert biases.args == {"num_levels": 256, "output_range": [-128.0, 127.0]}
    assert (biases.match, biases.module, biases.optional) == (r"re:.*\.bias", "Lin*", True)
    assert decays.transform.name == "t_decay" and decays.args == {}
    (act,) = recipe.activations
    assert (act.label, act.section, act.module, act.line) == (
        "activations[0]",
        "activations",
        "Linear",
        18,
    )
    assert repr(biases) == (
        "<Rule params[1]: match=re:.*\\.bias, module=Lin* -> deterministic_rounding("
        "num_levels=256, output_range=[-128.0, 127.0]), optional>"
    )


def test_recipe_and_rules_are_frozen() -> None:
    recipe = parse_recipe(FULL)
    with pytest.raises(dataclasses.FrozenInstanceError):
        recipe.seed = 3  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        recipe.params[0].optional = True  # type: ignore[misc]


def test_defaults_of_optional_keys() -> None:
    recipe = parse_recipe("version: 1\nparams: [{family: weights, transform: identity}]")
    assert (recipe.description, recipe.seed, recipe.families, recipe.activations) == (
        "",
        None,
        {},
        (),
    )
    assert recipe.source == "<string>"
    assert recipe.params[0].optional is False and recipe.params[0].args == {}


def rule(**fields: object) -> Rule:
    return Rule("params", 0, get_transform("identity"), {}, **fields)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("fields", "name", "family", "module_class", "selected"),
    [
        ({"family": "weights"}, "fc.weight", "weights", "Linear", True),
        ({"family": "weights"}, "fc.bias", "biases", "Linear", False),
        ({"family": "weights"}, "fc.weight", None, "Linear", False),
        ({"match": "*.weight"}, "enc.fc.weight", None, "Linear", True),
        ({"match": "*.weight"}, "weight", None, "Linear", True),  # a top-level tensor too
        ({"match": "*.weight"}, "enc.fc.Weight", None, "Linear", False),  # case-sensitive
        ({"match": "enc.*"}, "enc.fc.bias", "biases", "Linear", True),
        ({"match": r"re:.*\.bias"}, "fc.bias", None, "Linear", True),
        ({"match": r"re:.*\.bias"}, "fc.bias_scale", None, "Linear", False),  # full match
        ({"match": "re:fc"}, "fc.weight", None, "Linear", False),
        ({"family": "weights", "module": "Conv*"}, "c.weight", "weights", "Conv2d", True),
        ({"family": "weights", "module": "Conv*"}, "fc.weight", "weights", "Linear", False),
        ({"module": "Linear"}, "fc", None, "Linear", True),
        ({"module": "Linear"}, "fc", None, "LinearTorch", False),
        ({"module": "Linear", "match": "head.*"}, "body.fc", None, "Linear", False),
    ],
)
def test_rule_selects(
    fields: dict[str, str],
    name: str,
    family: str | None,
    module_class: str,
    selected: bool,
) -> None:
    assert rule(**fields).selects(name, family, module_class) is selected


def test_later_rule_wins() -> None:
    recipe = parse_recipe(
        textwrap.dedent(
            """
            version: 1
            params:
              - family: weights
                transform: deterministic_rounding
              - match: "head.*"
                transform: identity
            """
        )
    )
    head = recipe.rule_for("params", "head.weight", "weights", "Linear")
    body = recipe.rule_for("params", "body.weight", "weights", "Linear")
    assert head is recipe.params[1] and body is recipe.params[0]
    assert recipe.rule_for("params", "body.bias", "biases", "Linear") is None
    assert recipe.rule_for("activations", "head", None, "Linear") is None


# --- binding and seeds -------------------------------------------------------------------


def test_bind_seeds_random_transforms_per_tensor() -> None:
    recipe = parse_recipe(FULL)
    weights, biases, _ = recipe.params
    T = recipe.bind(weights, "fc.weight")
    assert T.seed == derive_seed(7, "fc.weight")
    assert recipe.bind(weights, "fc.weight", seed=3).seed == derive_seed(3, "fc.weight")
    assert recipe.bind(weights, "fc2.weight").seed != T.seed
    assert repr(T) == "stochastic_rounding(num_levels=16)" and T.bits == 4
    # Deterministic transforms need no stream.
    assert recipe.bind(biases, "fc.bias").seed is None
    # Without a recipe seed, 0 is used.
    unseeded = parse_recipe("version: 1\nparams: [{family: weights, transform: dropout}]")
    assert unseeded.bind(unseeded.params[0], "fc.weight").seed == derive_seed(0, "fc.weight")


def test_bound_transforms_do_not_share_args() -> None:
    recipe = parse_recipe(FULL)
    T = recipe.bind(recipe.params[0], "fc.weight")
    T.args["num_levels"] = 3
    assert recipe.params[0].args == {"num_levels": 16}


def test_bind_repeats_across_loads() -> None:
    x = torch.linspace(-1, 1, 50)
    first = parse_recipe(FULL)
    second = parse_recipe(FULL)
    a = first.bind(first.params[0], "fc.weight")(x)
    b = second.bind(second.params[0], "fc.weight")(x)
    assert torch.equal(a, b)


# --- loading -----------------------------------------------------------------------------


def test_load_from_file(tmp_path: Path) -> None:
    path = tmp_path / "mine.yaml"
    path.write_text(FULL, encoding="utf-8")
    recipe = load_recipe(path)
    assert recipe.source == str(path) and recipe.text == FULL
    assert load_recipe(str(path)).params[0].args == {"num_levels": 16}


def test_file_errors_name_the_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("version: 1\nparams:\n  - family: weights\n    transform: idnetity\n")
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    assert str(info.value).startswith(
        f"{path}:4: params[0].transform: unknown transform 'idnetity' (did you mean 'identity'?)"
    )
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"version: 1\n\xff\xfe")
    with pytest.raises(RecipeError) as info:
        load_recipe(binary)
    assert str(info.value) == (
        f"{binary}: the recipe file is not UTF-8 text (invalid start byte at byte 11); "
        "save it as UTF-8"
    )


def test_missing_file_versus_unknown_builtin(tmp_path: Path) -> None:
    listed = "give a YAML file path or one of the built-ins: int8, int8-act, qat4, ternary, xylo"
    with pytest.raises(RecipeError) as info:
        load_recipe(tmp_path / "nofile.yaml")
    assert str(info.value) == (
        f"'{tmp_path / 'nofile.yaml'}' is not a recipe file and not a built-in recipe; {listed}"
    )
    with pytest.raises(RecipeError) as info:
        load_recipe("int9")
    assert str(info.value) == (
        f"'int9' is not a recipe file and not a built-in recipe (did you mean 'int8'?); {listed}"
    )
    with pytest.raises(RecipeError) as info:
        load_recipe(tmp_path)
    assert str(info.value).startswith(f"'{tmp_path}' is a directory, not a recipe file")
    fifo = tmp_path / "recipe.yaml"
    os.mkfifo(fifo)  # never opened: reading would wait for a writer
    with pytest.raises(RecipeError) as info:
        load_recipe(fifo)
    assert str(info.value) == f"'{fifo}' is not a regular file (a pipe or a device); {listed}"


def test_exponents_without_a_dot_or_sign_are_numbers() -> None:
    text = "version: 1\nparams:\n  - family: weights\n    transform: deterministic_rounding\n"
    recipe = parse_recipe(text + "    args: {output_range: [-1e3, 2.5E+3], num_levels: 4}\n")
    assert recipe.params[0].args["output_range"] == [-1000.0, 2500.0]
    with pytest.raises(RecipeError, match=r"output_range: must be a range"):
        parse_recipe(text + "    args: {output_range: ['-1e3', 1e3]}\n")  # quoted: a string


def test_a_character_yaml_forbids_is_one_line_naming_its_line() -> None:
    text = "version: 1\nparams:\n  - family: weights\x00\n    transform: identity\n"
    with pytest.raises(RecipeError) as info:
        parse_recipe(text, source="r.yaml")
    assert str(info.value) == (
        "r.yaml:3: holds the character #x0000, which YAML does not allow (special characters "
        "are not allowed); remove it, or check that this is a text file"
    )


@pytest.mark.parametrize("nest", [("[", "]"), ("{a: ", "}")])
def test_a_recipe_nested_too_deeply_is_refused(nest: tuple[str, str]) -> None:
    deep = nest[0] * 5000 + nest[1] * 5000
    text = f"version: 1\nparams:\n  - family: weights\n    transform: identity\n    args: {deep}\n"
    with pytest.raises(RecipeError, match=r"^r\.yaml: is nested too deeply to read"):
        parse_recipe(text, source="r.yaml")


def test_inline_yaml_is_never_parsed() -> None:
    with pytest.raises(RecipeError, match="is not a recipe file and not a built-in recipe"):
        load_recipe("version: 1\nparams: [{family: weights, transform: identity}]")


def test_file_wins_over_builtin_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "int8").write_text("version: 1\nparams: [{family: weights, transform: identity}]")
    monkeypatch.chdir(tmp_path)
    recipe = load_recipe("int8")
    assert recipe.source == "int8" and recipe.params[0].transform.name == "identity"


# --- built-in recipes --------------------------------------------------------------------


def test_builtin_names_and_descriptions() -> None:
    recipes = builtin_recipes()
    assert list(recipes) == BUILTINS
    assert all(description and "\n" not in description for description in recipes.values())


@pytest.mark.parametrize("name", BUILTINS)
def test_builtin_recipe_loads(name: str) -> None:
    recipe = load_recipe(name)
    assert recipe.source == f"builtin:{name}"
    assert recipe.description == builtin_recipes()[name]
    assert recipe.text == builtin_recipe_text(name)
    assert recipe.params and recipe.params[0].family == "weights"
    assert isinstance(recipe, Recipe)


def test_unknown_builtin_text() -> None:
    with pytest.raises(RecipeError) as info:
        builtin_recipe_text("qat")
    assert str(info.value) == (
        "no built-in recipe 'qat' (did you mean 'qat4'?); built-ins: int8, int8-act, qat4, ternary, xylo"
    )


def small_net() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(2, 3, 3),
        torch.nn.Flatten(),
        torch.nn.Linear(12, 4),
        torch.nn.Linear(4, 2, bias=False),
    )


def apply_params(recipe: Recipe, net: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Apply the recipe's parameter rules by tensor-name family, as a plain torch net has them."""
    out = {}
    for name, tensor in net.named_parameters():
        family = {"weight": "weights", "bias": "biases"}[name.rsplit(".", 1)[1]]
        module_class = type(net.get_submodule(name.rsplit(".", 1)[0])).__name__
        chosen = recipe.rule_for("params", name, family, module_class)
        if chosen is not None:
            out[name] = recipe.bind(chosen, name)(tensor.detach())
    return out


@pytest.mark.parametrize(("name", "levels"), [("int8", 255), ("ternary", 3)])
def test_builtin_deterministic_weights_keep_scale_and_zero(name: str, levels: int) -> None:
    net = small_net()
    out = apply_params(load_recipe(name), net)
    assert set(out) == {"0.weight", "2.weight", "3.weight"}
    for tensor_name, value in out.items():
        original = net.get_parameter(tensor_name).detach()
        assert value.unique().numel() <= levels
        # Symmetric levels in the weight's own scale: the largest magnitude is kept.
        assert torch.isclose(value.abs().max(), original.abs().max())
        assert torch.equal(
            load_recipe(name).bind(load_recipe(name).params[0], "w")(torch.zeros(3)), torch.zeros(3)
        )


def test_builtin_qat4_rounds_weights_to_15_levels_and_biases_to_255() -> None:
    recipe = load_recipe("qat4")
    weights, biases = recipe.params
    assert (weights.transform.name, weights.optional, biases.optional) == (
        "stochastic_rounding",
        False,
        True,
    )
    assert recipe.bind(weights, "w").bits == 4 and recipe.bind(biases, "b").bits == 8
    out = apply_params(recipe, small_net())
    assert set(out) == {"0.weight", "0.bias", "2.weight", "2.bias", "3.weight"}
    assert all(out[n].unique().numel() <= 15 for n in ("0.weight", "2.weight", "3.weight"))
    again = apply_params(load_recipe("qat4"), small_net())
    assert all(torch.equal(out[n], again[n]) for n in out)  # seeded: repeatable


def test_builtin_int8_act_covers_linear_and_conv_outputs() -> None:
    recipe = load_recipe("int8-act")
    classes = ["Linear", "Conv1d", "Conv2d", "Conv3d", "ReLU", "LinearTorch"]
    chosen = {c: recipe.rule_for("activations", "m", None, c) for c in classes}
    assert [c for c, r in chosen.items() if r is not None] == [
        "Linear",
        "Conv1d",
        "Conv2d",
        "Conv3d",
    ]
    assert all(
        r.optional and r.transform.name == "deterministic_rounding" for r in recipe.activations
    )
    assert all(recipe.bind(r, "m").bits == 8 for r in recipe.activations)


# --- robustness --------------------------------------------------------------------------


@settings(max_examples=150, deadline=None)
@given(
    st.text(
        alphabet=st.sampled_from(list("version: 1\n -{}[],'\"#&*!|>%@`params family transform")),
        max_size=80,
    )
)
def test_any_text_gives_a_recipe_or_a_recipe_error(text: str) -> None:
    try:
        parse_recipe(text)
    except RecipeError as error:
        assert "\n" not in str(error)


@settings(max_examples=60, deadline=None)
@given(
    key=st.text(alphabet="abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=12),
    value=st.one_of(st.integers(), st.floats(allow_nan=False), st.booleans(), st.none()),
)
def test_any_extra_rule_key_or_arg_is_reported_with_its_line(key: str, value: object) -> None:
    shown = "null" if value is None else str(value).lower() if isinstance(value, bool) else value
    text = (
        "version: 1\nparams:\n  - family: weights\n    transform: deterministic_rounding\n"
        f'    args:\n      "{key}": {shown}\n'
    )
    try:
        parse_recipe(text, source="r.yaml")
    except RecipeError as error:
        assert error.line == 6 and error.key == f"params[0].args.{key}"
    else:
        assert key in {"num_levels", "maintain_zero", "input_range", "output_range"}


def test_recursive_alias_is_an_error() -> None:
    error = recipe_error(
        """
        version: 1
        params:
          - family: weights
            transform: identity
            args: &loop {k: *loop}
        """
    )
    assert str(error) == (
        "r.yaml:5: params[0].args.k.k: a YAML alias (*name) refers to a value that contains "
        "it; recipe values cannot be recursive"
    )


def test_alias_bomb_is_an_error() -> None:
    parts = ["a0: &a0 [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]"]
    parts += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 9)]
    text = f"version: 1\nparams: [{{family: weights, transform: identity, args: {{{', '.join(parts)}}}}}]"
    with pytest.raises(RecipeError, match="expand to more than 100000 items") as info:
        parse_recipe(text, source="r.yaml")
    assert info.value.line == 2


def test_family_rules_feed_param_families() -> None:
    from transform_core.families import param_families

    class Leaky(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.alpha = torch.nn.Parameter(torch.full((3,), 0.9))
            self.fc = torch.nn.Linear(3, 3)

    recipe = parse_recipe(FULL)
    families = param_families(torch.nn.Sequential(Leaky()), recipe.family_rules())
    assert families["0.alpha"] == "decays"
    assert families["0.fc.weight"] == "weights"


# --- YAML 1.2 scalars --------------------------------------------------------------------

ARGS = "version: 1\nparams:\n  - family: weights\n    transform: {}\n    args: {}\n"


@pytest.mark.parametrize(
    ("spelling", "value"),
    [
        ("010", 10),  # YAML 1.1 read this as octal 8
        ("0o10", 8),
        ("0x10", 16),
        ("0xfF", 255),
        ("+16", 16),
        ("-0", 0),
    ],
)
def test_integers_are_read_as_yaml_1_2_reads_them(spelling: str, value: int) -> None:
    recipe = parse_recipe(
        f"version: 1\nseed: {spelling}\nparams: [{{family: w, transform: identity}}]"
    )
    assert recipe.seed == value and type(recipe.seed) is int


def test_a_leading_zero_is_not_octal() -> None:
    recipe = parse_recipe(ARGS.format("deterministic_rounding", "{num_levels: 010}"))
    assert recipe.params[0].args == {"num_levels": 10}


@pytest.mark.parametrize(
    ("spelling", "value"),
    [
        (".5", 0.5),
        ("-.5", -0.5),
        ("+.5", 0.5),
        ("+1", 1.0),
        ("1.", 1.0),
        ("1e3", 1000.0),
        ("-1E-3", -0.001),
        ("2.5e+3", 2500.0),
        (".5e1", 5.0),
    ],
)
def test_floats_are_read_as_yaml_1_2_reads_them(spelling: str, value: float) -> None:
    recipe = parse_recipe(
        ARGS.format("deterministic_rounding", f"{{input_range: [{spelling}, 1e6]}}")
    )
    assert recipe.params[0].args == {"input_range": [value, 1e6]}


def test_special_floats_and_null_are_read_as_yaml_1_2_reads_them() -> None:
    error = recipe_error(ARGS.format("t_decay", "{dt: .inf}"))
    assert str(error) == (
        "r.yaml:5: params[0].args.dt: must be a positive, finite number of seconds, got inf"
    )
    for spelling in ("-.Inf", ".NaN", ".nan", "+.INF"):
        error = recipe_error(ARGS.format("t_decay", f"{{dt: {spelling}}}"))
        assert error.key == "params[0].args.dt" and "finite" in error.message
    for spelling in ("~", "null", "Null", "NULL", ""):
        recipe = parse_recipe(ARGS.format("deterministic_rounding", f"{{input_range: {spelling}}}"))
        assert recipe.params[0].args == {"input_range": None}


def test_a_number_written_without_quotes_is_never_called_quoted() -> None:
    recipe = parse_recipe(ARGS.format("deterministic_rounding", "{input_range: [-.5, .5]}"))
    assert recipe.params[0].args == {"input_range": [-0.5, 0.5]}
    error = recipe_error(ARGS.format("deterministic_rounding", "{num_levels: 1_000}"))
    assert (
        str(error)
        == "r.yaml:5: params[0].args.num_levels: must be an integer, got '1_000' (a string)"
    )
    error = recipe_error(ARGS.format("deterministic_rounding", "{num_levels: '16'}"))
    assert error.message.endswith("(a string; write the number without quotes)")


@pytest.mark.parametrize("spelling", ["true", "True", "TRUE", "false", "False", "FALSE"])
def test_only_true_and_false_are_booleans(spelling: str) -> None:
    recipe = parse_recipe(ARGS.format("int_quant", f"{{map_to_max: {spelling}}}"))
    assert recipe.params[0].args == {"map_to_max": spelling.lower() == "true"}


@pytest.mark.parametrize("spelling", ["yes", "no", "on", "off", "Y", "n"])
def test_yes_no_on_and_off_are_words(spelling: str) -> None:
    error = recipe_error(ARGS.format("int_quant", f"{{map_to_max: {spelling}}}"))
    assert str(error) == (
        f"r.yaml:5: params[0].args.map_to_max: must be true or false, got '{spelling}' (a string)"
    )
    error = recipe_error(
        f"version: 1\nparams:\n  - family: weights\n    transform: identity\n    optional: {spelling}\n"
    )
    assert str(error) == f"r.yaml:5: params[0].optional: must be true or false, got '{spelling}'"
    # a family or module named like one is a name, as it reads
    recipe = parse_recipe(f"version: 1\nparams: [{{family: {spelling}, transform: identity}}]")
    assert recipe.params[0].family == spelling


def test_dates_and_other_yaml_1_1_types_are_text() -> None:
    recipe = parse_recipe(
        "version: 1\ndescription: 2024-01-31\n"
        "params: [{match: =, transform: identity}, {match: '1:30', module: 1:30, transform: identity}]"
    )
    assert recipe.description == "2024-01-31"
    assert (recipe.params[0].match, recipe.params[1].module) == ("=", "1:30")


def test_a_huge_integer_for_a_float_is_one_recipe_error() -> None:
    huge = "1" + "0" * 400
    error = recipe_error(ARGS.format("t_decay", f"{{dt: {huge}}}"))
    assert error.line == 5 and error.key == "params[0].args.dt"
    assert "larger than the largest number (about 1.8e308)" in error.message
    assert huge not in str(error)
    error = recipe_error(ARGS.format("deterministic_rounding", f"{{input_range: [0, {huge}]}}"))
    assert error.line == 5 and error.key == "params[0].args.input_range"
    error = recipe_error(ARGS.format("int_quant", "{n_bits: " + "9" * 5000 + "}"))
    assert error.line == 5 and error.key == "params[0].args.n_bits"
    assert error.message.startswith("cannot read this value: ")


# --- merge keys --------------------------------------------------------------------------


def test_merge_keys_in_args() -> None:
    recipe = parse_recipe(
        textwrap.dedent(
            """
            version: 1
            params:
              - family: weights
                transform: deterministic_rounding
                args: &common {num_levels: 15, maintain_zero: false}
              - family: biases
                transform: deterministic_rounding
                args:
                  <<: *common
                  num_levels: 255
            """
        )
    )
    weights, biases = recipe.params
    assert weights.args == {"num_levels": 15, "maintain_zero": False}
    assert biases.args == {"num_levels": 255, "maintain_zero": False}


def test_merge_keys_in_rules() -> None:
    recipe = parse_recipe(
        textwrap.dedent(
            """
            version: 1
            params:
              - &w
                family: weights
                transform: deterministic_rounding
                args: {num_levels: 15}
              - <<: *w
                family: biases
              - {<<: [*w, {optional: true, module: Linear}], module: Conv*}
            """
        )
    )
    _, biases, merged = recipe.params
    assert (biases.family, biases.transform.name, biases.args, biases.line) == (
        "biases",
        "deterministic_rounding",
        {"num_levels": 15},
        8,
    )
    # an earlier mapping of a merge list wins over a later one; the rule's own keys over both
    assert (merged.family, merged.optional, merged.module) == ("weights", True, "Conv*")


def test_errors_in_merged_mappings_point_at_the_right_line() -> None:
    text = """
        version: 1
        params:
          - family: weights
            transform: deterministic_rounding
            args: &common {num_levels: 1}
          - family: biases
            transform: deterministic_rounding
            args:
              <<: *common
              num_levels: 255
              num_levels: 3
        """
    error = recipe_error(text)  # the anchored mapping's own value
    assert str(error) == "r.yaml:5: params[0].args.num_levels: must be an integer >= 2, got 1"
    error = recipe_error(text.replace("{num_levels: 1}", "{num_levels: 4}"))
    assert str(error) == (
        "r.yaml:11: params[1].args.num_levels: duplicate key 'num_levels' (first given on "
        "line 10); keep one"
    )
    error = recipe_error(  # valid where it is written, refused where it is merged
        """
        version: 1
        params:
          - family: weights
            transform: deterministic_rounding
            args: &common {input_range: [-1, 1]}
          - family: biases
            transform: deterministic_channel_rounding
            args: {<<: *common, output_range: [-1, 1]}
        """
    )
    assert str(error).startswith(
        "r.yaml:5: params[1].args.input_range: unknown argument 'input_range' for "
        "deterministic_channel_rounding"
    )
    error = recipe_error(
        """
        version: 1
        params:
          - &w
            family: weights
            transfrom: identity
          - <<: *w
            family: biases
        """
    )
    assert str(error).startswith("r.yaml:5: params[0].transfrom: unknown key 'transfrom'")


MERGED = """\
version: 1
params:
  - family: weights
    transform: identity
    args: &a {{}}
  - family: biases
    transform: identity
    args:
      {}
"""


@pytest.mark.parametrize(
    ("merge", "expected"),
    [
        (
            "<<: 3",
            "r.yaml:9: params[1].args.<<: a merge key (<<) takes a mapping (<<: *name) or a "
            "list of mappings, got 3",
        ),
        (
            "<<: [*a, [1]]",
            "r.yaml:9: params[1].args.<<[1]: a merge key (<<) takes a mapping (<<: *name) or a "
            "list of mappings, got [1]",
        ),
        (
            "<<: *a\n      <<: *a",
            "r.yaml:10: params[1].args.<<: duplicate key '<<' (first given on line 9); keep one",
        ),
        (
            "&b {<<: *b}",
            "r.yaml:9: params[1].args.<<: a merge key (<<) refers to the mapping that holds "
            "it; recipe values cannot be recursive",
        ),
    ],
)
def test_bad_merge_keys(merge: str, expected: str) -> None:
    with pytest.raises(RecipeError) as info:
        parse_recipe(MERGED.format(merge), source="r.yaml")
    assert str(info.value) == expected


def test_a_merge_key_bomb_is_an_error() -> None:
    parts = ["a0: &a0 {k: 1}"]
    parts += [f"a{i}: &a{i} {{<<: [{', '.join([f'*a{i - 1}'] * 10)}]}}" for i in range(1, 9)]
    text = f"version: 1\nparams: [{{family: weights, transform: identity, args: {{{', '.join(parts)}}}}}]"
    with pytest.raises(RecipeError, match="expand to more than 100000 items"):
        parse_recipe(text, source="r.yaml")


def test_a_quoted_merge_key_is_an_ordinary_key() -> None:
    error = recipe_error(MERGED.format("'<<': *a"))
    assert str(error).startswith("r.yaml:9: params[1].args.<<: unknown argument '<<' for identity")


# --- what depends on the tensor is checked against the tensor ----------------------------


@pytest.mark.parametrize("dim", [2, 3, -3, -4])
def test_a_channel_dim_of_a_conv_weight_is_accepted(dim: int) -> None:
    recipe = parse_recipe(
        "version: 1\nparams:\n  - family: weights\n    module: Conv2d\n"
        "    transform: deterministic_channel_rounding\n"
        f"    args: {{num_levels: 15, dim: {dim}}}\n"
    )
    weight = small_net()[0].weight.detach()
    out = recipe.bind(recipe.params[0], "0.weight")(weight)
    assert out.shape == weight.shape
    for channel in range(weight.shape[dim]):
        assert out.select(dim, channel).unique().numel() <= 15


def test_a_users_transform_that_refuses_the_probe_is_accepted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "rockq_positive.py").write_text(
        "import torch\n\n"
        "def log(x):\n"
        "    if (x <= 0).any():\n"
        "        raise ValueError('needs positive values')\n"
        "    return torch.log(x)\n\n"
        "def rows(x):\n"
        "    return x[3]\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in ("log", "rows"):
        recipe = parse_recipe(
            f"version: 1\nparams: [{{family: weights, transform: 'rockq_positive:{name}'}}]"
        )
        assert recipe.params[0].args == {}
