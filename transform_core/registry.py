"""The transform registry: one source of truth for transform names, arguments and defaults.

A recipe names a transform (``stochastic_rounding``) and gives it arguments
(``{num_levels: 16}``). This module maps those names to the library functions in
:mod:`transform_core.quantise`, describes their arguments, checks the arguments a recipe gives,
and binds a transform and its arguments into a picklable callable ``T(x) -> x``.

The argument list of a transform is derived from the function's own signature, so a new
argument or default in :mod:`transform_core.quantise` shows up in recipes, in
``rockq transforms`` and in the README without an edit here. Value ranges of a library
transform's arguments are checked by the function itself: :func:`validate_args` calls it on a
small probe tensor and reports its ``ValueError``, so every range lives in one place. What
depends on a tensor (its shape, its dtype, its values) is checked per tensor when a recipe is
applied, and a user's own function is not run on a made-up tensor at all.

The registry is an explicit table. Nothing is discovered by walking packages; a user's own
function is reached only through an explicit ``"package.module:function"`` reference.

Example:
    >>> spec = get_transform("stochastic_rounding")
    >>> [arg.name for arg in spec.args]
    ['input_range', 'output_range', 'num_levels', 'maintain_zero']
    >>> T = BoundTransform(spec, validate_args(spec, {"num_levels": 16}), seed=derive_seed(0, "fc.weight"))
    >>> T
    stochastic_rounding(num_levels=16)
    >>> T.bits
    4
"""

from __future__ import annotations

import hashlib
import inspect
import math
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from transform_core import quantise
from transform_core.errors import ConfigError, RecipeError, RockqError, did_you_mean
from transform_core.imports import import_reference

__all__ = [
    "ArgSpec",
    "Binding",
    "BoundTransform",
    "TransformSpec",
    "available_transforms",
    "derive_seed",
    "describe_value",
    "get_transform",
    "make_spec",
    "register",
    "validate_args",
]

_REQUIRED: Any = inspect.Parameter.empty

# Argument kinds understood by the recipe checker. Anything else is passed through unchecked.
# A ``list`` is shown by its items (``list[float]``, ``[int, int]``); a ``range`` only when the
# registry declares it one (``register(..., ranges=...)``), whatever the annotation.
_KIND_TEXT = {
    "bool": "bool",
    "int": "int",
    "float": "float",
    "str": "str",
    "range": "[float, float]",
}
_EXPECTED = {"bool": "true or false", "int": "an integer", "float": "a number", "str": "a string"}
_ITEMS_TEXT = {
    "bool": "true or false values",
    "int": "integers",
    "float": "numbers",
    "str": "strings",
}

# The ranges of the library's rounding transforms (the channel roundings have only the second).
_RANGES = ("input_range", "output_range")

# Names of arguments that set a bit width, and how to turn their value into bits; the first one
# a transform has counts.
_BIT_ARGS: dict[str, Callable[[Any], int]] = {
    "num_levels": lambda levels: math.ceil(math.log2(levels)),
    "n_bits": int,
}

# Arguments that name a dimension of the tensor: the recipe-time probe gets as many dimensions as
# they need, since the number a real tensor has is checked per tensor. torch's operations take
# at most 64 dimensions, so a dimension beyond that is refused at once.
_DIM_ARGS = ("dim",)
_MAX_DIMS = 64


@dataclass(frozen=True)
class ArgSpec:
    """One recipe argument of a transform, derived from the function signature.

    Attributes:
        name: The keyword the recipe uses.
        type: The type as shown to users: ``int``, ``float``, ``bool``, ``str``,
            ``[float, float]`` (a range), ``list[float]`` or ``[int, int]`` (a list), or the
            annotation's own text; ``| None`` is appended when ``null`` is accepted.
        default: The default value; meaningless when ``required`` is true.
        required: Whether a recipe must give this argument.
        kind: What :func:`validate_args` checks: ``bool``, ``int``, ``float``, ``str``,
            ``range`` (two numbers), ``list`` (see ``items``) or ``any`` (not checked).
        nullable: Whether ``null`` (``None``) is accepted.
        items: For a ``list``: the kind of its items (one, for a list of any length), or of
            each item (for a list of ``length`` items).
        length: For a ``list``: the number of items it must have, or ``None`` for any.

    Example:
        >>> ArgSpec("num_levels", "int", 256, False, kind="int")
        ArgSpec(name='num_levels', type='int', default=256, required=False, kind='int', nullable=False, items=(), length=None)
    """

    name: str
    type: str
    default: Any
    required: bool
    kind: str = "any"
    nullable: bool = False
    items: tuple[str, ...] = ()
    length: int | None = None


@dataclass(frozen=True)
class TransformSpec:
    """A transform as recipes see it.

    Attributes:
        name: The recipe name: a library name, or ``"package.module:function"``.
        function: The function, called as ``function(tensor, **args)``.
        summary: The first line of the function's docstring.
        args: The recipe arguments: every parameter after the first, except ``generator``.
        uses_generator: Whether the function takes a keyword-only ``generator``; a bound
            transform then passes its own seeded ``torch.Generator``.
        probe_shape: Shape of the tensor used to check arguments by calling the function
            (with more dimensions where a ``dim`` argument needs them).
        probe_range: Value range of that probe tensor.
    """

    name: str
    function: Callable[..., torch.Tensor]
    summary: str
    args: tuple[ArgSpec, ...]
    uses_generator: bool = False
    probe_shape: tuple[int, ...] = (2, 4)
    probe_range: tuple[float, float] = (-1.0, 1.0)

    def arg(self, name: str) -> ArgSpec | None:
        """Return the argument called ``name``, or ``None``.

        Example:
            >>> get_transform("dropout").arg("dropout_prob").default
            0.5
        """
        for spec in self.args:
            if spec.name == name:
                return spec
        return None

    @property
    def is_reference(self) -> bool:
        """Whether this is a user's function, named ``"package.module:function"``.

        Such a function is not run on a made-up tensor to check its arguments (it may rightly
        refuse one), and anything it raises on a tensor is reported as that tensor's error.
        """
        return ":" in self.name


def _summary(function: Callable[..., Any]) -> str:
    doc = inspect.getdoc(function) or ""
    for line in doc.splitlines():
        if line.strip():
            return line.strip()
    return ""


def _signature(function: Callable[..., Any]) -> inspect.Signature:
    # Annotations may be strings (``from __future__ import annotations``); evaluate them to see
    # real types, but a user's module may name types only under TYPE_CHECKING, so fall back.
    try:
        return inspect.signature(function, eval_str=True)
    except (NameError, TypeError, SyntaxError, AttributeError):
        return inspect.signature(function)


def _is_number_type(annotation: Any) -> bool:
    return annotation in (int, float)


@dataclass(frozen=True)
class _Kind:
    kind: str
    nullable: bool
    text: str | None = None  # the annotation's text, for kind ``any``
    items: tuple[str, ...] = ()
    length: int | None = None

    def shown(self) -> str:
        if self.kind == "list":
            if self.length is None:
                return f"list[{self.items[0]}]"
            return f"[{', '.join(self.items)}]"
        if self.kind == "any" and self.text:
            return self.text
        return _KIND_TEXT.get(self.kind, "any")


# bool first: True is an int too.
_SCALARS: dict[type, str] = {bool: "bool", int: "int", float: "float", str: "str"}


def _scalar_kind(annotation: Any) -> str | None:
    """The kind of a bool, int, float or str annotation (``int | float`` is a float), or None."""
    for kind, name in _SCALARS.items():
        if annotation is kind:
            return name
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        members = typing.get_args(annotation)
        if all(_is_number_type(m) for m in members):
            return "float"
    return None


def _list_kind(annotation: Any, nullable: bool) -> _Kind | None:
    """The kind of a list, tuple or sequence annotation of scalars, or None."""
    origin = typing.get_origin(annotation)
    if origin not in (list, tuple, Sequence):
        return None
    args = typing.get_args(annotation)
    if origin is tuple and not (len(args) == 2 and args[1] is Ellipsis):
        kinds = [_scalar_kind(a) for a in args]
        if not args or any(k is None for k in kinds):
            return None
        return _Kind("list", nullable, items=tuple(k for k in kinds if k), length=len(args))
    item = _scalar_kind(args[0]) if args else None
    return None if item is None else _Kind("list", nullable, items=(item,))


def _kind_of(annotation: Any, default: Any) -> _Kind:
    nullable = default is None
    if annotation is inspect.Parameter.empty or isinstance(annotation, str):
        for kind, name in _SCALARS.items():
            if isinstance(default, kind):
                return _Kind(name, nullable)
        text = annotation if isinstance(annotation, str) else None
        return _Kind("any", nullable, text)
    ann = annotation
    if typing.get_origin(ann) in (typing.Union, types.UnionType):
        members = typing.get_args(ann)
        if type(None) in members:
            nullable = True
        rest = [m for m in members if m is not type(None)]
        if len(rest) > 1:
            # A recipe cannot hold a tensor; ``Sequence[float] | Tensor`` is a list to it.
            rest = [m for m in rest if m is not torch.Tensor]
        if len(rest) == 1:
            ann = rest[0]
        elif rest and all(_is_number_type(m) for m in rest):
            return _Kind("float", nullable)
        else:
            return _Kind("any", nullable, inspect.formatannotation(annotation))
    scalar = _scalar_kind(ann)
    if scalar is not None:
        return _Kind(scalar, nullable)
    listed = _list_kind(ann, nullable)
    if listed is not None:
        return listed
    return _Kind("any", nullable, inspect.formatannotation(ann))


def make_spec(
    name: str,
    function: Callable[..., torch.Tensor],
    *,
    probe_shape: tuple[int, ...] = (2, 4),
    probe_range: tuple[float, float] = (-1.0, 1.0),
    ranges: Sequence[str] = (),
) -> TransformSpec:
    """Describe ``function`` as a transform, deriving its arguments from its signature.

    The first parameter receives the tensor. Every later parameter is a recipe argument, except
    a keyword-only ``generator``, which marks the transform as random (``uses_generator``).
    ``*args`` and ``**kwargs`` are not recipe arguments. An argument annotated as a list, tuple
    or sequence of ``bool``, ``int``, ``float`` or ``str`` is a list of such items
    (``tuple[int, int]``: exactly two); one named in ``ranges`` is a range ``[min, max]`` of
    two numbers.

    Args:
        name: The recipe name.
        function: The transform function ``function(tensor, **args) -> tensor``.
        probe_shape: Shape of the tensor :func:`validate_args` calls the function on.
        probe_range: Range of the values in that probe tensor.
        ranges: The arguments that are ranges ``[min, max]``.

    Returns:
        The transform description.

    Raises:
        RecipeError: If the signature cannot be read, has no first parameter for the tensor,
            or has a positional-only argument after it.
        ValueError: If ``ranges`` names something that is not an argument.

    Example:
        >>> def scale(x, factor: float = 2.0, block: tuple[int, int] = (1, 1)):
        ...     '''Multiply by a factor.'''
        ...     return x * factor
        >>> [(arg.name, arg.type, arg.kind) for arg in make_spec("scale", scale).args]
        [('factor', 'float', 'float'), ('block', '[int, int]', 'list')]
    """
    try:
        signature = _signature(function)
    except (TypeError, ValueError) as exc:
        raise RecipeError(
            f"cannot read the signature of transform '{name}': {exc}; "
            "a transform must be a Python function f(tensor, **args) -> tensor"
        ) from exc
    params = [
        p
        for p in signature.parameters.values()
        if p.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    ]
    if not params or params[0].kind is inspect.Parameter.KEYWORD_ONLY:
        raise RecipeError(
            f"transform '{name}' takes no positional parameter for the tensor; "
            "a transform must be a function f(tensor, **args) -> tensor"
        )
    args: list[ArgSpec] = []
    uses_generator = False
    for param in params[1:]:
        if param.name == "generator" and param.kind is inspect.Parameter.KEYWORD_ONLY:
            uses_generator = True
            continue
        if param.kind is inspect.Parameter.POSITIONAL_ONLY:
            raise RecipeError(
                f"transform '{name}' has a positional-only parameter '{param.name}'; "
                "recipe arguments are passed by keyword, so make it an ordinary parameter"
            )
        kind = _kind_of(param.annotation, param.default)
        if param.name in ranges:
            kind = _Kind("range", kind.nullable)
        shown = kind.shown()
        if kind.nullable and not shown.endswith("| None"):
            shown += " | None"
        required = param.default is inspect.Parameter.empty
        args.append(
            ArgSpec(
                name=param.name,
                type=shown,
                default=None if required else param.default,
                required=required,
                kind=kind.kind,
                nullable=kind.nullable,
                items=kind.items,
                length=kind.length,
            )
        )
    unknown = [r for r in ranges if r not in {a.name for a in args}]
    if unknown:
        raise ValueError(f"'{unknown[0]}' is not an argument of {name}, so it cannot be a range")
    return TransformSpec(
        name=name,
        function=function,
        summary=_summary(function),
        args=tuple(args),
        uses_generator=uses_generator,
        probe_shape=probe_shape,
        probe_range=probe_range,
    )


_LIBRARY: dict[str, TransformSpec] = {}


def register(
    name: str,
    function: Callable[..., torch.Tensor],
    *,
    probe_shape: tuple[int, ...] = (2, 4),
    probe_range: tuple[float, float] = (-1.0, 1.0),
    ranges: Sequence[str] = (),
) -> TransformSpec:
    """Add ``function`` to the library under the recipe name ``name``.

    Args:
        name: The recipe name; must not be taken and must not contain ``:``.
        function: The transform function ``function(tensor, **args) -> tensor``.
        probe_shape: Shape of the tensor used to check arguments.
        probe_range: Range of the probe tensor's values (``t_decay`` needs values in (0, 1)).
        ranges: The arguments that are ranges ``[min, max]`` of two numbers.

    Returns:
        The registered description.

    Raises:
        ValueError: If the name is taken or contains ``:``, or ``ranges`` names something
            that is not an argument.
    """
    if name in _LIBRARY:
        raise ValueError(f"transform name '{name}' is already registered")
    if ":" in name:
        raise ValueError(f"transform name '{name}' must not contain ':'")
    spec = make_spec(
        name, function, probe_shape=probe_shape, probe_range=probe_range, ranges=ranges
    )
    _LIBRARY[name] = spec
    return spec


register("stochastic_rounding", quantise.stochastic_rounding, ranges=_RANGES)
register("deterministic_rounding", quantise.deterministic_rounding, ranges=_RANGES)
register("stochastic_channel_rounding", quantise.stochastic_channel_rounding, ranges=_RANGES[1:])
register(
    "deterministic_channel_rounding", quantise.deterministic_channel_rounding, ranges=_RANGES[1:]
)
register("int_quant", quantise.int_quant)
# Decays are factors exp(-dt/tau) in (0, 1); probe with values a real decay could take.
register("t_decay", quantise.t_decay, probe_range=(0.05, 0.95))
register("dropout", quantise.dropout)
register("identity", quantise.identity)


def available_transforms() -> tuple[TransformSpec, ...]:
    """Return the library transforms in registration order.

    Example:
        >>> [spec.name for spec in available_transforms()][:2]
        ['stochastic_rounding', 'deterministic_rounding']
    """
    return tuple(_LIBRARY.values())


def get_transform(name: str) -> TransformSpec:
    """Look up a transform by recipe name.

    ``name`` is either a library name (see :func:`available_transforms`) or a reference
    ``"package.module:function"`` to a user's own function. A reference **imports that module
    and so runs its code**: only load recipes you trust.

    Args:
        name: A library name or ``"package.module:function"``.

    Returns:
        The transform description.

    Raises:
        RecipeError: If the name is unknown (with a suggestion), the module cannot be
            imported, the function does not exist in it, or it is not callable.

    Example:
        >>> [arg.name for arg in get_transform("int_quant").args]
        ['maintain_zero', 'map_to_max', 'n_bits', 'max_n_bits']
        >>> try:
        ...     get_transform("stochastic_roundin")
        ... except RecipeError as err:
        ...     print(err.message.split(";")[0])
        unknown transform 'stochastic_roundin' (did you mean 'stochastic_rounding'?)
    """
    if not isinstance(name, str) or not name:
        raise RecipeError(
            f"a transform name must be a non-empty string, got {describe_value(name)}"
        )
    if name in _LIBRARY:
        return _LIBRARY[name]
    if ":" not in name:
        raise RecipeError(
            f"unknown transform '{name}'{did_you_mean(name, _LIBRARY)}; "
            f"expected one of {', '.join(_LIBRARY)} or your own 'package.module:function'"
        )
    return make_spec(name, _import_function(name))


def _import_function(reference: str) -> Callable[..., torch.Tensor]:
    function: Callable[..., torch.Tensor] = import_reference(
        reference,
        noun="function",
        role="transform",
        fix="a transform must be a function f(tensor, **args) -> tensor",
        error=RecipeError,
    )
    return function


def describe_value(value: Any) -> str:
    """Show a value as a recipe author wrote it (YAML spelling), with how to write a number
    that was quoted: for the errors about recipe values, here and in the ``finetune:`` section.

    Example:
        >>> describe_value("16"), describe_value(["-1e3", 1])
        ("'16' (a string; write the number without quotes)", "['-1e3', 1] (a list of 2; write the numbers without quotes)")
    """
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"{str(value).lower()} (a boolean)"
    if isinstance(value, str):
        quoted = "; write the number without quotes" if _is_number_text(value) else ""
        return f"'{value}' (a string{quoted})"
    if isinstance(value, (list, tuple)):
        any_quoted = any(isinstance(v, str) and _is_number_text(v) for v in value)
        hint = "; write the numbers without quotes" if any_quoted else ""
        return f"{list(value)!r} (a list of {len(value)}{hint})"
    if isinstance(value, Mapping):
        return "a mapping"
    return repr(value)


def _is_number_text(text: str) -> bool:
    """Whether ``text`` spells a finite number (a number a recipe author put in quotes).

    Not ``1_000``: a YAML 1.2 recipe reads that unquoted as text, and Python's float() does not.
    """
    if "_" in text or not text.isascii():
        return False
    try:
        return math.isfinite(float(text))
    except ValueError:
        return False


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


_WRONG: Any = object()  # what _clean returns for a value of the wrong type


def _clean(kind: str, value: Any) -> Any:
    """``value`` cleaned for a scalar ``kind`` (an int given for a float becomes a float), or
    ``_WRONG``; an int beyond the largest float raises OverflowError."""
    if kind == "bool":
        return value if isinstance(value, bool) else _WRONG
    if kind == "int":
        return value if isinstance(value, int) and not isinstance(value, bool) else _WRONG
    if kind == "float":
        return float(value) if _is_number(value) else _WRONG
    if kind == "str":
        return value if isinstance(value, str) else _WRONG
    return value


def _clean_list(arg: ArgSpec, value: Any) -> Any:
    if not isinstance(value, (list, tuple)):
        return _WRONG
    if arg.length is not None and len(value) != arg.length:
        return _WRONG
    kinds = arg.items if arg.length is not None else arg.items * len(value)
    cleaned = [_clean(kind, item) for kind, item in zip(kinds, value, strict=True)]
    return _WRONG if any(item is _WRONG for item in cleaned) else cleaned


def _expected_list(arg: ArgSpec) -> str:
    if arg.length is None:
        return f"a list of {_ITEMS_TEXT[arg.items[0]]}"
    if len(set(arg.items)) == 1:
        return f"a list of {arg.length} {_ITEMS_TEXT[arg.items[0]]}"
    return f"a list [{', '.join(arg.items)}]"


def _check_type(arg: ArgSpec, value: Any) -> Any:
    """Return ``value`` cleaned for ``arg``, or raise RecipeError keyed on the argument."""
    if value is None and arg.nullable:
        return None
    or_null = " or null" if arg.nullable else ""
    try:
        if arg.kind in _EXPECTED:
            cleaned = _clean(arg.kind, value)
            expected = _EXPECTED[arg.kind]
        elif arg.kind == "range":
            pair = ArgSpec(arg.name, arg.type, None, False, "list", items=("float",) * 2, length=2)
            cleaned = _clean_list(pair, value)
            expected = "a range [min, max] of two numbers"
        elif arg.kind == "list":
            cleaned = _clean_list(arg, value)
            expected = _expected_list(arg)
        else:
            return value
    except OverflowError as exc:  # float() of an integer of hundreds of digits
        subject = "is" if arg.kind == "float" else "holds"
        raise RecipeError(
            f"{subject} an integer larger than the largest number (about 1.8e308); "
            "use a smaller value",
            key=arg.name,
        ) from exc
    if cleaned is not _WRONG:
        return cleaned
    raise RecipeError(f"must be {expected}{or_null}, got {describe_value(value)}", key=arg.name)


def _probe_tensor(spec: TransformSpec, args: Mapping[str, Any]) -> torch.Tensor:
    shape = spec.probe_shape
    needed = len(shape)
    for name in _DIM_ARGS:
        dim = args.get(name)
        if isinstance(dim, int) and not isinstance(dim, bool):
            needed = max(needed, dim + 1 if dim >= 0 else -dim)
    # Size 1 along the added dimensions: the probe stays small.
    shape = shape + (1,) * (min(needed, _MAX_DIMS) - len(shape))
    low, high = spec.probe_range
    return torch.linspace(low, high, math.prod(shape)).reshape(shape)


def _call_probe(spec: TransformSpec, args: Mapping[str, Any]) -> None:
    extra: dict[str, Any] = {}
    if spec.uses_generator:
        # A private generator keeps validation from advancing torch's global random state.
        extra["generator"] = torch.Generator().manual_seed(0)
    with torch.no_grad():
        spec.function(_probe_tensor(spec, args), **args, **extra)


# What a transform raises for argument values it refuses. OverflowError covers values so large
# that the function's arithmetic fails before its own checks could word an error.
_REFUSED = (ValueError, OverflowError)


def _range_error(spec: TransformSpec, args: Mapping[str, Any], exc: Exception) -> RecipeError:
    """Turn the function's refusal into a RecipeError keyed on the argument to blame."""
    required = {k: v for k, v in args.items() if (a := spec.arg(k)) is not None and a.required}
    culprit: str | None = None
    try:
        _call_probe(spec, required)
    except _REFUSED:
        if len(required) == 1:
            culprit = next(iter(required))
    else:
        for name, value in args.items():
            if name in required:
                continue
            try:
                _call_probe(spec, {**required, name: value})
            except _REFUSED:
                culprit = name
                break
    message = str(exc).strip() or f"{type(exc).__name__} from {spec.name}"
    if isinstance(exc, OverflowError):
        subject = "is" if culprit is not None else "the arguments are"
        return RecipeError(
            f"{subject} too large for {spec.name} ({message}); use smaller values", key=culprit
        )
    if culprit is not None:
        # The function names the argument; the key path already does, so say it once.
        for prefix in (f"{culprit} ", f"{culprit}: ", f"'{culprit}' ", f"`{culprit}` "):
            if message.startswith(prefix):
                message = message[len(prefix) :]
                break
    return RecipeError(message, key=culprit)


def validate_args(spec: TransformSpec, args: Mapping[str, Any] | None) -> dict[str, Any]:
    """Check recipe arguments for ``spec`` and return them cleaned.

    Checks, in order: argument names (with a suggestion for a misspelling), required arguments,
    types from the annotations (an ``int`` rejects ``true`` and ``2.5``; a ``float`` accepts an
    integer; a range is a list of two numbers; a ``list[float]`` or ``tuple[int, int]`` is a
    list of such items), then, for a library transform, value ranges, by calling the function
    on a small probe tensor and reporting the ``ValueError`` it raises. The probe has as many
    dimensions as a ``dim`` argument needs: whether a tensor has them is checked per tensor.

    A user's own function (``"package.module:function"``) is not called here: it may rightly
    refuse a made-up tensor. It is tried on tensors of the real dtype and shape when the recipe
    is applied, and its errors then name the tensor.

    Args:
        spec: The transform.
        args: The arguments a recipe gives, or ``None`` for none.

    Returns:
        The given arguments, cleaned: integers given for floats become floats, ranges become
        lists of two floats and lists become lists. Defaults are not filled in.

    Raises:
        RecipeError: With ``key`` set to the argument at fault (``None`` when no single one
            is), so a recipe can point at ``params[0].args.num_levels``.

    Example:
        >>> validate_args(get_transform("stochastic_channel_rounding"), {"output_range": [-8, 7]})
        {'output_range': [-8.0, 7.0]}
        >>> try:
        ...     validate_args(get_transform("dropout"), {"dropout_prob": True})
        ... except RecipeError as err:
        ...     print(err)
        dropout_prob: must be a number, got true (a boolean)
    """
    if args is None:
        args = {}
    if not isinstance(args, Mapping):
        raise RecipeError(f"arguments must be a mapping of name: value, got {describe_value(args)}")
    names = [a.name for a in spec.args]
    cleaned: dict[str, Any] = {}
    for name, value in args.items():
        arg = spec.arg(name) if isinstance(name, str) else None
        if arg is None:
            if name == "generator" and spec.uses_generator:
                raise RecipeError(
                    "'generator' is not a recipe argument; the random stream is seeded from "
                    "the recipe's 'seed' and the tensor name",
                    key=str(name),
                )
            expected = ", ".join(names) if names else "no arguments"
            raise RecipeError(
                f"unknown argument '{name}' for {spec.name}{did_you_mean(str(name), names)}; "
                f"expected {expected}",
                key=str(name),
            )
        cleaned[name] = _check_type(arg, value)
    missing = [a for a in spec.args if a.required and a.name not in cleaned]
    if missing:
        listed = ", ".join(f"{a.name} ({a.type})" for a in missing)
        raise RecipeError(f"{spec.name} needs the argument(s) {listed}; add them under 'args'")
    if spec.is_reference:
        return cleaned
    try:
        _call_probe(spec, cleaned)
    except _REFUSED as exc:
        raise _range_error(spec, cleaned, exc) from exc
    return cleaned


def derive_seed(seed: int, tensor_name: str) -> int:
    """Derive the seed of one tensor's random stream from a recipe seed.

    Stable across runs, processes and Python versions (a SHA-256 digest, not ``hash()``), and
    different for every tensor name, so tensors do not share random streams.

    Args:
        seed: The recipe seed.
        tensor_name: The qualified tensor name (``fc.weight``).

    Returns:
        A non-negative 63-bit integer.

    Example:
        >>> derive_seed(0, "fc.weight") == derive_seed(0, "fc.weight") != derive_seed(0, "fc.bias")
        True
    """
    digest = hashlib.sha256(f"{seed}/{tensor_name}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


@dataclass(frozen=True)
class Binding:
    """What a bound transform is for: a tensor (or module) and the recipe rule that chose it.

    Errors of the transform name both.

    Attributes:
        name: The qualified name of the tensor, or of the module for an activation.
        rule: The rule's key path, such as ``params[0]``.
        recipe: Where the recipe came from (a file path, ``builtin:NAME``).
        line: The rule's line in the recipe.
    """

    name: str
    rule: str
    recipe: str | None = None
    line: int | None = None

    @property
    def is_param(self) -> bool:
        return self.rule.startswith("params")

    def error(self, transform: str, problem: str) -> ConfigError:
        """An error of ``transform`` on this tensor, keyed on the rule.

        Example:
            >>> str(Binding("fc.weight", "params[0]", "r.yaml", 4).error("int_quant", "oops"))
            "r.yaml:4: params[0]: int_quant cannot transform tensor 'fc.weight': oops; change \
the rule's args, or leave this tensor out of it"
        """
        problem = problem.removeprefix(f"{transform} ")  # said once is enough
        what = f"tensor '{self.name}'" if self.is_param else f"the output of '{self.name}'"
        left_out = "tensor" if self.is_param else "module"
        return ConfigError(
            f"{transform} cannot transform {what}: {problem}; change the rule's args, or "
            f"leave this {left_out} out of it",
            path=self.recipe,
            line=self.line,
            key=self.rule,
        )


@dataclass(eq=False)
class BoundTransform:
    """A transform bound to its arguments: a picklable callable ``T(x) -> x``.

    For a random transform (``spec.uses_generator``) with a ``seed``, each device the transform
    sees gets its own ``torch.Generator``, created lazily on that device and seeded with
    ``seed``; its state can be saved and restored with :meth:`generator_states` and
    :meth:`load_generator_states` so training resumes bit-identically. Without a seed, a random
    transform draws from torch's global generator.

    Arguments are used as given: check them first with :func:`validate_args`.

    Args:
        spec: The transform.
        args: Its recipe arguments.
        seed: The seed of this tensor's random stream (see :func:`derive_seed`).
        binding: The tensor and rule it is for; then a value the transform refuses (its
            ``ValueError``), any exception a user's own function raises, or a result that is
            not a tensor of the input's shape (and, for a floating-point input, of a
            floating-point dtype) is a :class:`~transform_core.errors.ConfigError` that names
            them. Other exceptions of a library transform pass unchanged: they are bugs.

    Example:
        >>> T = BoundTransform(get_transform("stochastic_rounding"), {"num_levels": 3}, seed=7)
        >>> x = torch.linspace(-1, 1, 9)
        >>> torch.equal(T(x), BoundTransform(T.spec, T.args, seed=7)(x))
        True
    """

    spec: TransformSpec
    args: dict[str, Any] = field(default_factory=dict)
    seed: int | None = None
    binding: Binding | None = None
    _generators: dict[str, torch.Generator] = field(default_factory=dict, init=False, repr=False)
    _pending: dict[str, torch.Tensor] = field(default_factory=dict, init=False, repr=False)

    def __call__(self, value: torch.Tensor) -> torch.Tensor:
        if self.binding is None:
            return self._apply(value)
        version = value._version  # counts in-place changes of the tensor
        try:
            result = self._apply(value)
        except RockqError:
            raise
        except (ValueError, OverflowError) as err:
            problem = str(err) or type(err).__name__
            raise self.binding.error(self.spec.name, problem) from err
        except Exception as err:
            if not self.spec.is_reference:
                raise
            # The user's code: its IndexError or RuntimeError is a problem of the recipe's rule.
            raise self.binding.error(self.spec.name, f"{type(err).__name__}: {err}") from err
        if self.binding.is_param and value._version != version:
            # The raw value is gone: burn-in would report an error of zero against it.
            # (A module's output may be changed in place, as torch's inplace ReLU does.)
            problem = "it changed its input in place; return a new tensor (x * 2, not x.mul_(2))"
            raise self.binding.error(self.spec.name, problem)
        if not isinstance(result, torch.Tensor):
            problem = f"it returned {type(result).__name__}, not a tensor"
            raise self.binding.error(self.spec.name, problem)
        if self.binding.is_param and result.shape != value.shape:
            problem = f"it returned shape {tuple(result.shape)} for shape {tuple(value.shape)}"
            raise self.binding.error(self.spec.name, problem)
        if value.is_floating_point() and not result.is_floating_point():
            dtype = str(result.dtype).removeprefix("torch.")
            problem = f"it returned a tensor of {dtype}, not of a floating-point dtype"
            raise self.binding.error(self.spec.name, problem)
        return result

    def _apply(self, value: torch.Tensor) -> torch.Tensor:
        if self.spec.uses_generator and self.seed is not None:
            generator = self._generator(value.device, self.seed)
            return self.spec.function(value, **self.args, generator=generator)
        return self.spec.function(value, **self.args)

    def _generator(self, device: torch.device, seed: int) -> torch.Generator:
        key = str(device)
        generator = self._generators.get(key)
        if generator is None:
            generator = torch.Generator(device=device)
            generator.manual_seed(seed)
            pending = self._pending.pop(key, None)
            if pending is not None:
                generator.set_state(pending)
            self._generators[key] = generator
        return generator

    def generator_states(self) -> dict[str, torch.Tensor]:
        """Return the state of each device's generator, keyed by device (``"cpu"``, ``"cuda:0"``).

        States loaded but not yet used (their device not seen since) are included.
        """
        states = {key: state.clone() for key, state in self._pending.items()}
        states.update({key: g.get_state() for key, g in self._generators.items()})
        return states

    def load_generator_states(self, states: Mapping[str, torch.Tensor]) -> None:
        """Restore generator states saved by :meth:`generator_states`.

        A state for a device not seen yet is applied when that device is first used.

        Example:
            >>> T = BoundTransform(get_transform("dropout"), {}, seed=1)
            >>> x = torch.ones(16)
            >>> _ = T(x)
            >>> saved = T.generator_states()
            >>> first = T(x)
            >>> T.load_generator_states(saved)
            >>> torch.equal(T(x), first)
            True
        """
        for key, state in states.items():
            generator = self._generators.get(key)
            if generator is None:
                self._pending[key] = state.clone()
            else:
                generator.set_state(state)

    @property
    def name(self) -> str:
        """The transform's recipe name."""
        return self.spec.name

    @property
    def bits(self) -> int | None:
        """The bit width the arguments imply, or ``None`` for a transform that sets none.

        ``num_levels`` gives ``ceil(log2(num_levels))`` and ``n_bits`` gives itself, except
        that with ``map_to_max: true`` ``max_n_bits`` does (``int_quant`` then maps the
        largest magnitude to ``2**(max_n_bits-1) - 1``); defaults count when the argument is
        not given.

        Example:
            >>> BoundTransform(get_transform("deterministic_rounding"), {"num_levels": 255}).bits
            8
            >>> BoundTransform(get_transform("int_quant"), {"map_to_max": True, "max_n_bits": 4}).bits
            4
            >>> BoundTransform(get_transform("dropout")).bits is None
            True
        """
        given = {
            arg.name: self.args.get(arg.name, None if arg.required else arg.default)
            for arg in self.spec.args
        }
        names = list(_BIT_ARGS)
        if given.get("map_to_max") is True and "max_n_bits" in given:
            names = ["max_n_bits"]
        for name in names:
            value: Any = given.get(name)
            if _is_number(value) and value >= 1:
                return max(_BIT_ARGS.get(name, int)(value), 1)
        return None

    def __repr__(self) -> str:
        shown = ", ".join(f"{key}={value!r}" for key, value in self.args.items())
        return f"{self.spec.name}({shown})"

    def __getstate__(self) -> dict[str, Any]:
        # Generators do not pickle; their states do, so a copy continues the same stream.
        return {
            "spec": self.spec,
            "args": self.args,
            "seed": self.seed,
            "binding": self.binding,
            "states": self.generator_states(),
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.spec = state["spec"]
        self.args = state["args"]
        self.seed = state["seed"]
        self.binding = state.get("binding")
        self._generators = {}
        self._pending = dict(state["states"])
