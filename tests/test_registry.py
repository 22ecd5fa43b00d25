"""Tests for transform_core.registry: names, argument specs, checks, seeds and bound transforms."""

from __future__ import annotations

import copy
import inspect
import math
import pickle
import sys
import textwrap
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from transform_core import quantise, registry
from transform_core.errors import ConfigError, RecipeError
from transform_core.registry import (
    ArgSpec,
    Binding,
    BoundTransform,
    available_transforms,
    derive_seed,
    get_transform,
    make_spec,
    register,
    validate_args,
)

LIBRARY = {
    "stochastic_rounding": quantise.stochastic_rounding,
    "deterministic_rounding": quantise.deterministic_rounding,
    "stochastic_channel_rounding": quantise.stochastic_channel_rounding,
    "deterministic_channel_rounding": quantise.deterministic_channel_rounding,
    "int_quant": quantise.int_quant,
    "t_decay": quantise.t_decay,
    "dropout": quantise.dropout,
    "identity": quantise.identity,
}
RANDOM = {"stochastic_rounding", "stochastic_channel_rounding", "dropout"}


def check_error(spec_name: str, args: dict[str, object]) -> RecipeError:
    with pytest.raises(RecipeError) as info:
        validate_args(get_transform(spec_name), args)
    return info.value


# --- the library table -------------------------------------------------------------------


def test_library_names_map_to_quantise_functions() -> None:
    assert [spec.name for spec in available_transforms()] == list(LIBRARY)
    for name, function in LIBRARY.items():
        assert get_transform(name).function is function


@pytest.mark.parametrize("name", list(LIBRARY))
def test_args_are_derived_from_the_signature(name: str) -> None:
    spec = get_transform(name)
    params = list(inspect.signature(LIBRARY[name]).parameters.values())[1:]
    expected = [p for p in params if p.name != "generator"]
    assert [a.name for a in spec.args] == [p.name for p in expected]
    for arg, param in zip(spec.args, expected, strict=True):
        assert arg.required == (param.default is inspect.Parameter.empty)
        if not arg.required:
            assert arg.default == param.default
    assert spec.uses_generator == (name in RANDOM)


@pytest.mark.parametrize("name", list(LIBRARY))
def test_summary_is_first_docstring_line(name: str) -> None:
    doc = inspect.getdoc(LIBRARY[name])
    assert doc is not None
    assert get_transform(name).summary == doc.splitlines()[0].strip()


def test_arg_types_shown_as_text() -> None:
    rounding = get_transform("stochastic_rounding")
    assert rounding.arg("num_levels") == ArgSpec("num_levels", "int", 256, False, kind="int")
    assert rounding.arg("maintain_zero") == ArgSpec(
        "maintain_zero", "bool", True, False, kind="bool"
    )
    output_range = rounding.arg("output_range")
    assert output_range is not None
    assert (output_range.type, output_range.kind, output_range.nullable) == (
        "[float, float] | None",
        "range",
        True,
    )
    channel = get_transform("stochastic_channel_rounding")
    required = channel.arg("output_range")
    assert required is not None and required.required and required.type == "[float, float]"
    # Keyword-only dim is an ordinary argument; generator is not.
    dim = channel.arg("dim")
    assert dim is not None and dim.kind == "int" and dim.default == 1
    assert channel.arg("generator") is None
    assert get_transform("dropout").arg("dropout_prob") == ArgSpec(
        "dropout_prob", "float", 0.5, False, kind="float"
    )
    assert get_transform("identity").args == ()


def test_make_spec_infers_kinds_from_defaults_without_annotations() -> None:
    def shift(x, amount=1, scale=2.0, flag=False, mode="a", extra=None, *rest, **more):  # type: ignore[no-untyped-def]
        """Shift values."""
        return x + amount

    spec = make_spec("shift", shift)
    assert [(a.name, a.kind, a.nullable) for a in spec.args] == [
        ("amount", "int", False),
        ("scale", "float", False),
        ("flag", "bool", False),
        ("mode", "str", False),
        ("extra", "any", True),
    ]
    assert spec.summary == "Shift values." and not spec.uses_generator


def test_make_spec_rejects_functions_recipes_cannot_call() -> None:
    def no_tensor(*, k: int = 1) -> torch.Tensor:
        return torch.zeros(1)

    def positional_only(x: torch.Tensor, k: int = 1, /) -> torch.Tensor:
        return x

    with pytest.raises(RecipeError, match="no positional parameter for the tensor"):
        make_spec("no_tensor", no_tensor)
    with pytest.raises(RecipeError, match="positional-only parameter 'k'"):
        make_spec("positional_only", positional_only)


def test_register_refuses_taken_and_reference_names(monkeypatch: pytest.MonkeyPatch) -> None:
    def negate(x: torch.Tensor) -> torch.Tensor:
        """Flip the sign."""
        return -x

    monkeypatch.setattr(registry, "_LIBRARY", dict(registry._LIBRARY))
    spec = register("negate", negate)
    assert get_transform("negate") is spec and spec.summary == "Flip the sign."
    with pytest.raises(ValueError, match="already registered"):
        register("negate", negate)
    with pytest.raises(ValueError, match="must not contain ':'"):
        register("my:negate", negate)


# --- get_transform -----------------------------------------------------------------------


def test_unknown_name_suggests_the_closest() -> None:
    with pytest.raises(RecipeError) as info:
        get_transform("stochastic_roundin")
    message = str(info.value)
    assert message.startswith(
        "unknown transform 'stochastic_roundin' (did you mean 'stochastic_rounding'?)"
    )
    assert "package.module:function" in message


@pytest.fixture
def user_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    name = "rockq_user_transforms"
    (tmp_path / f"{name}.py").write_text(
        textwrap.dedent(
            '''
            import torch

            LIMIT = 3

            def clip(x: torch.Tensor, limit: float = 1.0) -> torch.Tensor:
                """Clip values to [-limit, limit]."""
                if limit <= 0:
                    raise ValueError(f"limit must be positive, got {limit}")
                return x.clamp(-limit, limit)

            def noisy(x, scale: float = 0.1, *, generator=None):
                """Add noise."""
                return x + scale * torch.randn(x.shape, generator=generator)
            '''
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, name, raising=False)
    return name


def test_user_function_by_reference(user_module: str) -> None:
    spec = get_transform(f"{user_module}:clip")
    assert spec.name == f"{user_module}:clip"
    assert spec.summary == "Clip values to [-limit, limit]."
    assert [(a.name, a.kind) for a in spec.args] == [("limit", "float")]
    assert validate_args(spec, {"limit": 2}) == {"limit": 2.0}
    # Its values are checked when it runs, on tensors of the real shape.
    assert validate_args(spec, {"limit": -1}) == {"limit": -1.0}
    with pytest.raises(ValueError, match=r"limit must be positive, got -1\.0"):
        BoundTransform(spec, {"limit": -1.0})(torch.zeros(4))
    noisy = get_transform(f"{user_module}:noisy")
    assert noisy.uses_generator
    first = BoundTransform(noisy, {}, seed=3)(torch.zeros(4))
    assert torch.equal(first, BoundTransform(noisy, {}, seed=3)(torch.zeros(4)))


def test_user_reference_errors_name_module_and_function(user_module: str) -> None:
    with pytest.raises(RecipeError) as info:
        get_transform("no_such_package_xyz.sub:f")
    assert str(info.value).startswith(
        "cannot import module 'no_such_package_xyz.sub' for transform 'no_such_package_xyz.sub:f'"
    )
    with pytest.raises(RecipeError) as info:
        get_transform(f"{user_module}:clp")
    assert str(info.value).startswith(
        f"module '{user_module}' has no function 'clp' (did you mean 'clip'?)"
    )
    with pytest.raises(RecipeError, match=r"is not a function \(found an object of type int\)"):
        get_transform(f"{user_module}:LIMIT")
    with pytest.raises(RecipeError, match=r"expected 'package\.module:function'"):
        get_transform(f"{user_module}:")
    with pytest.raises(RecipeError, match="non-empty string"):
        get_transform("")


# --- validate_args -----------------------------------------------------------------------


def test_valid_args_are_cleaned() -> None:
    spec = get_transform("stochastic_rounding")
    cleaned = validate_args(spec, {"num_levels": 16, "output_range": [-8, 7], "input_range": None})
    assert cleaned == {"num_levels": 16, "output_range": [-8.0, 7.0], "input_range": None}
    assert all(isinstance(v, float) for v in cleaned["output_range"])
    assert validate_args(get_transform("t_decay"), {"dt": 1}) == {"dt": 1.0}
    assert validate_args(get_transform("identity"), None) == {}


def test_unknown_arg_suggests_the_closest() -> None:
    error = check_error("stochastic_rounding", {"num_level": 16})
    assert error.key == "num_level"
    assert error.message == (
        "unknown argument 'num_level' for stochastic_rounding (did you mean 'num_levels'?); "
        "expected input_range, output_range, num_levels, maintain_zero"
    )
    error = check_error("identity", {"x": 1})
    assert error.message == "unknown argument 'x' for identity; expected no arguments"


def test_generator_is_not_a_recipe_argument() -> None:
    error = check_error("dropout", {"generator": 1})
    assert error.key == "generator" and "not a recipe argument" in error.message


def test_missing_required_arg() -> None:
    error = check_error("stochastic_channel_rounding", {"num_levels": 3})
    assert error.key is None
    assert error.message == (
        "stochastic_channel_rounding needs the argument(s) output_range ([float, float]); "
        "add them under 'args'"
    )


@pytest.mark.parametrize(
    ("name", "args", "key", "message"),
    [
        (
            "stochastic_rounding",
            {"num_levels": True},
            "num_levels",
            "must be an integer, got true (a boolean)",
        ),
        ("stochastic_rounding", {"num_levels": 2.5}, "num_levels", "must be an integer, got 2.5"),
        ("stochastic_rounding", {"num_levels": 16.0}, "num_levels", "must be an integer, got 16.0"),
        (
            "stochastic_rounding",
            {"num_levels": "16"},
            "num_levels",
            "must be an integer, got '16' (a string; write the number without quotes)",
        ),
        (
            "deterministic_rounding",
            {"output_range": ["-1e3", 1]},
            "output_range",
            "must be a range [min, max] of two numbers or null, got ['-1e3', 1] (a list of 2; "
            "write the numbers without quotes)",
        ),
        (
            "stochastic_rounding",
            {"maintain_zero": 1},
            "maintain_zero",
            "must be true or false, got 1",
        ),
        (
            "dropout",
            {"dropout_prob": False},
            "dropout_prob",
            "must be a number, got false (a boolean)",
        ),
        ("dropout", {"dropout_prob": None}, "dropout_prob", "must be a number, got null"),
        (
            "deterministic_rounding",
            {"output_range": [1, 2, 3]},
            "output_range",
            "must be a range [min, max] of two numbers or null, got [1, 2, 3] (a list of 3)",
        ),
        (
            "deterministic_rounding",
            {"input_range": [0, True]},
            "input_range",
            "must be a range [min, max] of two numbers or null, got [0, True] (a list of 2)",
        ),
        (
            "stochastic_channel_rounding",
            {"output_range": 1},
            "output_range",
            "must be a range [min, max] of two numbers, got 1",
        ),
    ],
)
def test_type_errors(name: str, args: dict[str, object], key: str, message: str) -> None:
    error = check_error(name, args)
    assert (error.key, error.message) == (key, message)


@pytest.mark.parametrize(
    ("name", "args", "key", "message"),
    [
        ("stochastic_rounding", {"num_levels": 1}, "num_levels", "must be an integer >= 2, got 1"),
        (
            "deterministic_rounding",
            {"num_levels": 3, "output_range": [1, -1]},
            "output_range",
            "is reversed: got [1.0, -1.0]; give it as [min, max], e.g. [-1.0, 1.0]",
        ),
        (
            "stochastic_channel_rounding",
            {"output_range": [2, -2]},
            "output_range",
            "is reversed: got [2.0, -2.0]; give it as [min, max], e.g. [-2.0, 2.0]",
        ),
        (
            "stochastic_channel_rounding",
            {"output_range": [-1, 1], "dim": 64},  # no tensor has 65 dimensions
            "dim",
            "must be an integer in [-64, 63], got 64",
        ),
        ("int_quant", {"n_bits": 1}, "n_bits", "must be an integer >= 2, got 1"),
        ("dropout", {"dropout_prob": 1.5}, "dropout_prob", "must be a number in [0, 1], got 1.5"),
        ("t_decay", {"dt": 0}, "dt", "must be a positive, finite number of seconds, got 0.0"),
        (
            "t_decay",
            {"dt": float("inf")},
            "dt",
            "must be a positive, finite number of seconds, got inf",
        ),
    ],
)
def test_range_errors_come_from_the_function(
    name: str, args: dict[str, object], key: str, message: str
) -> None:
    error = check_error(name, args)
    assert (error.key, error.message) == (key, message)
    # The function itself raises for the same values: the range lives only there.
    with pytest.raises(ValueError):
        get_transform(name).function(torch.ones(2, 4), **args)


def test_validation_leaves_the_global_generator_alone() -> None:
    before = torch.random.get_rng_state()
    validate_args(get_transform("stochastic_rounding"), {"num_levels": 4})
    validate_args(get_transform("dropout"), {"dropout_prob": 0.2})
    assert torch.equal(torch.random.get_rng_state(), before)


@settings(max_examples=30, deadline=None)
@given(levels=st.integers(min_value=2, max_value=2**20))
def test_any_int_of_two_or_more_levels_is_accepted(levels: int) -> None:
    spec = get_transform("deterministic_rounding")
    assert validate_args(spec, {"num_levels": levels}) == {"num_levels": levels}


@settings(max_examples=30, deadline=None)
@given(value=st.floats(allow_nan=False).filter(lambda v: not v.is_integer()) | st.booleans())
def test_int_arg_rejects_bools_and_fractions(value: float) -> None:
    error = check_error("int_quant", {"n_bits": value})
    assert error.key == "n_bits" and error.message.startswith("must be an integer, got")


# --- seeds -------------------------------------------------------------------------------


def test_derive_seed_is_a_fixed_function_of_seed_and_name() -> None:
    # A literal value: changing the derivation would silently change every random stream.
    assert derive_seed(0, "fc.weight") == 8607887941996230803
    assert derive_seed(0, "fc.weight") != derive_seed(0, "fc.bias")
    assert derive_seed(0, "fc.weight") != derive_seed(1, "fc.weight")
    torch.Generator().manual_seed(2**63 - 1)  # the largest derived seed is accepted by torch


@settings(max_examples=50, deadline=None)
@given(seed=st.integers(min_value=-(2**70), max_value=2**70), name=st.text(max_size=30))
def test_derived_seeds_fit_63_bits(seed: int, name: str) -> None:
    assert 0 <= derive_seed(seed, name) < 2**63


# --- BoundTransform ----------------------------------------------------------------------


def bound(name: str, seed: int | None = None, **args: object) -> BoundTransform:
    spec = get_transform(name)
    return BoundTransform(spec, validate_args(spec, args), seed=seed)


def test_repr_shows_name_and_given_args() -> None:
    assert repr(bound("stochastic_rounding", seed=1, num_levels=16)) == (
        "stochastic_rounding(num_levels=16)"
    )
    assert repr(bound("deterministic_rounding", output_range=[-128, 127])) == (
        "deterministic_rounding(output_range=[-128.0, 127.0])"
    )
    assert repr(bound("identity")) == "identity()"


@pytest.mark.parametrize(
    ("name", "args", "bits"),
    [
        ("stochastic_rounding", {"num_levels": 16}, 4),
        ("stochastic_rounding", {"num_levels": 15}, 4),
        ("deterministic_rounding", {"num_levels": 255}, 8),
        ("deterministic_rounding", {}, 8),
        ("deterministic_rounding", {"num_levels": 3}, 2),
        ("stochastic_channel_rounding", {"output_range": [-1, 1], "num_levels": 2}, 1),
        ("int_quant", {"n_bits": 4}, 4),
        ("int_quant", {}, 8),
        # map_to_max stretches the values to max_n_bits's integers, whatever n_bits says
        ("int_quant", {"map_to_max": True, "max_n_bits": 4}, 4),
        ("int_quant", {"map_to_max": True, "n_bits": 3}, 8),
        ("int_quant", {"map_to_max": True, "n_bits": 6, "max_n_bits": 12}, 12),
        ("int_quant", {"map_to_max": False, "n_bits": 6, "max_n_bits": 4}, 6),
        ("dropout", {}, None),
        ("t_decay", {}, None),
        ("identity", {}, None),
    ],
)
def test_bits_implied_by_args(name: str, args: dict[str, object], bits: int | None) -> None:
    assert bound(name, **args).bits == bits


def test_deterministic_transform_applies_its_args() -> None:
    x = torch.tensor([-1.0, -0.4, 0.0, 0.4, 1.0])
    T = bound("deterministic_rounding", num_levels=3)
    assert torch.equal(T(x), quantise.deterministic_rounding(x, num_levels=3))
    assert T.name == "deterministic_rounding" and T.seed is None


def test_seeded_streams_repeat_and_differ_by_seed() -> None:
    x = torch.linspace(-1, 1, 64)
    a, b = (
        bound("stochastic_rounding", seed=5, num_levels=3),
        bound("stochastic_rounding", seed=5, num_levels=3),
    )
    first = a(x)
    assert torch.equal(first, b(x))
    assert not torch.equal(a(x), first)  # the stream moves on
    other = bound("stochastic_rounding", seed=6, num_levels=3)
    assert not torch.equal(other(x), first)


def test_seeded_transform_leaves_the_global_generator_alone() -> None:
    before = torch.random.get_rng_state()
    bound("dropout", seed=2)(torch.ones(32))
    assert torch.equal(torch.random.get_rng_state(), before)


def test_unseeded_random_transform_uses_the_global_generator() -> None:
    T = bound("dropout")
    torch.manual_seed(11)
    first = T(torch.ones(32))
    torch.manual_seed(11)
    assert torch.equal(T(torch.ones(32)), first)
    assert T.generator_states() == {}


def test_generator_states_round_trip() -> None:
    x = torch.linspace(-1, 1, 64)
    T = bound("stochastic_rounding", seed=9, num_levels=5)
    T(x)
    saved = T.generator_states()
    assert list(saved) == ["cpu"]
    expected = [T(x), T(x)]
    T.load_generator_states(saved)
    assert all(torch.equal(T(x), e) for e in expected)
    # A fresh transform picks up states before it has made its generator.
    fresh = bound("stochastic_rounding", seed=9, num_levels=5)
    fresh.load_generator_states(saved)
    assert torch.equal(fresh.generator_states()["cpu"], saved["cpu"])
    assert all(torch.equal(fresh(x), e) for e in expected)


@pytest.mark.parametrize(
    "clone", [lambda t: pickle.loads(pickle.dumps(t)), copy.deepcopy], ids=["pickle", "deepcopy"]
)
def test_copies_continue_the_same_stream(clone) -> None:  # type: ignore[no-untyped-def]
    x = torch.linspace(-1, 1, 64)
    T = bound("stochastic_channel_rounding", seed=4, output_range=[-1, 1], num_levels=4)
    T(x.reshape(8, 8))
    copied = clone(T)
    assert repr(copied) == repr(T) and copied.seed == T.seed
    assert copied.spec.function is T.spec.function
    assert torch.equal(copied(x.reshape(8, 8)), T(x.reshape(8, 8)))


def test_unpickled_library_transform_keeps_working() -> None:
    T = pickle.loads(pickle.dumps(bound("int_quant", n_bits=4)))
    out = T(torch.tensor([-1.0, 0.0, 0.5, 1.0]))
    assert out.tolist() == [-7.0, 0.0, 4.0, 7.0]
    assert math.isclose(T.bits or 0, 4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_one_generator_per_device() -> None:
    x = torch.linspace(-1, 1, 64)
    T = bound("stochastic_rounding", seed=3, num_levels=3)
    on_gpu = T(x.cuda())
    T(x)
    states = T.generator_states()
    assert sorted(states) == ["cpu", "cuda:0"]
    again = bound("stochastic_rounding", seed=3, num_levels=3)
    assert torch.equal(again(x.cuda()), on_gpu)
    copied = pickle.loads(pickle.dumps(T))
    assert torch.equal(copied(x.cuda()), T(x.cuda()))


def test_values_too_large_for_the_arithmetic_are_reported() -> None:
    error = check_error("stochastic_rounding", {"num_levels": 10**30})
    assert error.key == "num_levels"
    assert error.message.startswith("is too large for stochastic_rounding (")
    # a bit depth is checked against the dtype before its power of two is computed
    error = check_error("int_quant", {"map_to_max": True, "max_n_bits": 3000})
    assert (error.key, error.message) == (
        "max_n_bits",
        "must be at most 25 for float32 values (float32 holds every integer only up to 2**24), "
        "got 3000; convert the tensor to float64",
    )
    error = check_error("int_quant", {"n_bits": 10**20})  # would never finish
    assert error.key == "n_bits" and error.message.startswith("must be at most 25")


# --- errors that name the tensor ---------------------------------------------------------


def _bound_for(name: str, args: dict[str, object], tensor: str = "fc.weight") -> BoundTransform:
    binding = Binding(tensor, "params[1]", "r.yaml", 7)
    return BoundTransform(get_transform(name), args, binding=binding)


def test_a_refused_tensor_is_named_with_its_rule() -> None:
    T = _bound_for("int_quant", {"n_bits": 17})
    assert T(torch.ones(3)).tolist() == [65535.0] * 3  # float32 holds 17 bits
    with pytest.raises(ConfigError) as info:
        T(torch.ones(3, dtype=torch.float16))
    assert str(info.value) == (
        "r.yaml:7: params[1]: int_quant cannot transform tensor 'fc.weight': n_bits must be "
        "at most 12 for float16 values (float16 holds every integer only up to 2**11), got "
        "17; convert the tensor to float32; change the rule's args, or leave this tensor out "
        "of it"
    )
    with pytest.raises(ConfigError, match=r"'fc\.weight': needs a tensor of 2 or more dim"):
        _bound_for("stochastic_channel_rounding", {"output_range": [-1, 1]})(torch.ones(3))
    # unbound, the function's own error passes unchanged
    with pytest.raises(ValueError, match=r"^n_bits must be at most 12"):
        BoundTransform(get_transform("int_quant"), {"n_bits": 17})(torch.ones(3).half())


def test_a_user_function_must_return_a_tensor_of_the_same_shape(
    user_module: str, tmp_path: Path
) -> None:
    (tmp_path / f"{user_module}.py").write_text(
        "def nothing(x):\n    return None\n\ndef flat(x):\n    return x.flatten()\n"
    )
    with pytest.raises(ConfigError, match=r"'fc\.weight': it returned NoneType, not a tensor; "):
        _bound_for(f"{user_module}:nothing", {})(torch.ones(2, 2))
    with pytest.raises(ConfigError, match=r"it returned shape \(4,\) for shape \(2, 2\)"):
        _bound_for(f"{user_module}:flat", {})(torch.ones(2, 2))
    # an activation's transform may change its shape
    activation = BoundTransform(
        get_transform(f"{user_module}:flat"), {}, binding=Binding("fc", "activations[0]")
    )
    assert activation(torch.ones(2, 2)).shape == (4,)


def test_a_copy_keeps_its_binding() -> None:
    T = _bound_for("deterministic_rounding", {"num_levels": 3})
    assert pickle.loads(pickle.dumps(T)).binding == T.binding


# --- arguments that depend on the tensor -------------------------------------------------


@pytest.mark.parametrize("name", ["deterministic_channel_rounding", "stochastic_channel_rounding"])
@pytest.mark.parametrize("dim", [2, 3, -3, -4])
def test_a_channel_dim_the_probe_lacks_is_left_to_the_tensor(name: str, dim: int) -> None:
    spec = get_transform(name)
    args = {"output_range": [-1, 1], "num_levels": 15, "dim": dim}
    assert validate_args(spec, args) == {**args, "output_range": [-1.0, 1.0]}
    conv_weight = torch.linspace(-1, 1, 4 * 2 * 3 * 3).reshape(4, 2, 3, 3)
    assert BoundTransform(spec, args, seed=0)(conv_weight).shape == conv_weight.shape
    # The checks that do not depend on the tensor still hold, with the key at fault.
    error = check_error(name, {**args, "num_levels": 1})
    assert (error.key, error.message) == ("num_levels", "must be an integer >= 2, got 1")
    # A tensor of the real shape is refused when it lacks that dimension.
    with pytest.raises(ConfigError, match=r"'fc\.weight': dim must be an integer in \[-2, 1\]"):
        _bound_for(name, args)(torch.ones(3, 3))


def test_a_dim_no_tensor_can_have_is_refused_at_once() -> None:
    error = check_error("deterministic_channel_rounding", {"dim": 64})
    assert (error.key, error.message) == ("dim", "must be an integer in [-64, 63], got 64")
    error = check_error("deterministic_channel_rounding", {"dim": -(10**30)})
    assert error.key == "dim" and error.message.startswith("must be an integer in [-64, 63]")


@pytest.fixture
def fussy_module(user_module: str, tmp_path: Path) -> str:
    (tmp_path / f"{user_module}.py").write_text(
        textwrap.dedent(
            '''
            import torch

            def log(x, base: float = 2.0):
                """Logarithm of positive values."""
                if (x <= 0).any():
                    raise ValueError("needs positive values")
                return torch.log(x) / torch.log(torch.tensor(base))

            def index(x):
                return x[5]

            def runtime(x):
                raise RuntimeError("no kernel for this")

            def typed(x):
                return x + "a"

            def to_int(x):
                return x.round().to(torch.int8)

            def in_place(x):
                return x.mul_(2)

            def nothing(x, k: int = 1):
                return x
            '''
        )
    )
    return user_module


def test_a_users_transform_is_not_run_at_recipe_time(fussy_module: str) -> None:
    for name in ("log", "index", "runtime", "typed"):
        assert validate_args(get_transform(f"{fussy_module}:{name}"), {}) == {}
    assert validate_args(get_transform(f"{fussy_module}:log"), {"base": 10}) == {"base": 10.0}
    # Its signature is still checked: names and types.
    error = check_error(f"{fussy_module}:log", {"bsae": 10})
    assert error.key == "bsae" and "(did you mean 'base'?)" in error.message
    error = check_error(f"{fussy_module}:log", {"base": "e"})
    assert (error.key, error.message) == ("base", "must be a number, got 'e' (a string)")
    T = BoundTransform(get_transform(f"{fussy_module}:log"), {"base": 10.0})
    assert torch.allclose(T(torch.tensor([1.0, 100.0])), torch.tensor([0.0, 2.0]))


@pytest.mark.parametrize(
    ("function", "problem"),
    [
        ("log", "needs positive values"),
        ("index", "IndexError: index 5 is out of bounds for dimension 0 with size 2"),
        ("runtime", "RuntimeError: no kernel for this"),
        ("typed", "TypeError: "),
        ("to_int", "it returned a tensor of int8, not of a floating-point dtype"),
        ("in_place", "it changed its input in place; return a new tensor (x * 2, not x.mul_(2))"),
    ],
)
def test_any_error_of_a_users_transform_names_the_rule(
    fussy_module: str, function: str, problem: str
) -> None:
    T = _bound_for(f"{fussy_module}:{function}", {})
    with pytest.raises(ConfigError) as info:
        T(torch.zeros(2, 2))
    prefix = f"r.yaml:7: params[1]: {fussy_module}:{function} cannot transform tensor 'fc.weight': "
    assert str(info.value).startswith(prefix + problem)
    assert str(info.value).endswith("; change the rule's args, or leave this tensor out of it")
    activation = BoundTransform(
        get_transform(f"{fussy_module}:{function}"), {}, binding=Binding("fc", "activations[0]")
    )
    if function == "in_place":  # a module's output may be changed in place
        assert torch.equal(activation(torch.ones(2)), torch.full((2,), 2.0))
        return
    with pytest.raises(ConfigError, match=r"cannot transform the output of 'fc': "):
        activation(torch.zeros(2, 2))


def test_a_library_transform_error_other_than_a_refusal_stays_internal(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def broken(x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("a bug in rockq")

    monkeypatch.setattr(registry, "_LIBRARY", dict(registry._LIBRARY))
    spec = register("broken", broken)
    with pytest.raises(RuntimeError, match="a bug in rockq"):
        BoundTransform(spec, {}, binding=Binding("fc.weight", "params[0]"))(torch.ones(2))


# --- list arguments ----------------------------------------------------------------------


def _codebook(
    x: torch.Tensor,
    levels: list[float] | None = None,
    block: tuple[int, int] = (1, 1),
    sizes: Sequence[int] = (),
    pair: tuple[int, float] = (1, 2.0),
    limits: tuple[float, float] = (-1.0, 1.0),
) -> torch.Tensor:
    """A user's transform with list arguments (``limits`` is not declared a range)."""
    return x


def test_only_declared_ranges_are_ranges() -> None:
    spec = make_spec("codebook", _codebook)
    assert [(a.name, a.kind, a.type) for a in spec.args] == [
        ("levels", "list", "list[float] | None"),
        ("block", "list", "[int, int]"),
        ("sizes", "list", "list[int]"),
        ("pair", "list", "[int, float]"),
        ("limits", "list", "[float, float]"),
    ]
    cleaned = validate_args(
        spec,
        {
            "levels": [-0.1, 0, 0.1],
            "block": [2, 2],
            "sizes": [],
            "pair": [3, 4],
            "limits": [-2, 2],
        },
    )
    assert cleaned == {
        "levels": [-0.1, 0.0, 0.1],
        "block": [2, 2],
        "sizes": [],
        "pair": [3, 4.0],
        "limits": [-2.0, 2.0],
    }
    assert [type(v) for v in cleaned["block"] + cleaned["pair"]] == [int, int, int, float]
    assert validate_args(spec, {"levels": None}) == {"levels": None}
    ranged = make_spec("codebook", _codebook, ranges=("limits",))
    assert ranged.arg("limits") == ArgSpec(
        "limits", "[float, float]", (-1.0, 1.0), False, kind="range"
    )
    with pytest.raises(ValueError, match="'limts' is not an argument of codebook"):
        make_spec("codebook", _codebook, ranges=("limts",))


@pytest.mark.parametrize(
    ("args", "key", "message"),
    [
        ({"levels": 0.5}, "levels", "must be a list of numbers or null, got 0.5"),
        (
            {"levels": [0, "0.5"]},
            "levels",
            "must be a list of numbers or null, got [0, '0.5'] (a list of 2; write the numbers "
            "without quotes)",
        ),
        (
            {"block": [2, 2, 2]},
            "block",
            "must be a list of 2 integers, got [2, 2, 2] (a list of 3)",
        ),
        ({"block": [2, 2.5]}, "block", "must be a list of 2 integers, got [2, 2.5] (a list of 2)"),
        (
            {"block": [2, True]},
            "block",
            "must be a list of 2 integers, got [2, True] (a list of 2)",
        ),
        ({"sizes": [1.0]}, "sizes", "must be a list of integers, got [1.0] (a list of 1)"),
        ({"pair": [1.5, 2]}, "pair", "must be a list [int, float], got [1.5, 2] (a list of 2)"),
    ],
)
def test_list_arguments_are_checked_item_by_item(
    args: dict[str, object], key: str, message: str
) -> None:
    with pytest.raises(RecipeError) as info:
        validate_args(make_spec("codebook", _codebook), args)
    assert (info.value.key, info.value.message) == (key, message)


# --- numbers too large for a float -------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "args", "key"),
    [
        ("t_decay", {"dt": 10**400}, "dt"),
        ("deterministic_rounding", {"input_range": [0, 10**400]}, "input_range"),
        ("dropout", {"dropout_prob": -(10**309)}, "dropout_prob"),
    ],
)
def test_an_integer_too_large_for_a_float_is_refused(
    name: str, args: dict[str, object], key: str
) -> None:
    error = check_error(name, args)
    assert error.key == key
    assert "larger than the largest number (about 1.8e308)" in error.message
    assert len(error.message) < 200
