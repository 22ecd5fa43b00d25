"""Importing the user's own code named by a ``"package.module:name"`` reference.

Recipes name custom transforms and losses this way, ``--arch`` names the factory that builds
a network and ``--data`` a function that returns data loaders. All of them go through
:func:`import_reference`, so every reference is checked, imported and reported alike: a
malformed reference, a module that cannot be imported (whatever the user's module raises
on import), a missing name (with a suggestion) and an object that cannot be called are
each one line naming the reference and the fix.

Example:
    >>> import_reference("math:sqrt", noun="function", role="loss")(16.0)
    4.0
    >>> is_reference("mypkg.models:make_net"), is_reference("net.pt")
    (True, False)
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

from transform_core.errors import CheckpointError, ConfigError, RockqError, did_you_mean

__all__ = [
    "check_trusted",
    "import_reference",
    "in_packages",
    "is_dotted_name",
    "is_reference",
    "named_in_file",
    "trust_hint",
]

_NAME = r"[A-Za-z_][A-Za-z0-9_]*"
_DOTTED = re.compile(rf"{_NAME}(\.{_NAME})*")
_REFERENCE = re.compile(rf"{_DOTTED.pattern}:{_DOTTED.pattern}")


def is_dotted_name(text: str) -> bool:
    """Whether ``text`` is a dotted Python name such as ``mypkg`` or ``mypkg.models``.

    Example:
        >>> is_dotted_name("mypkg.models"), is_dotted_name("my-pkg")
        (True, False)
    """
    return _DOTTED.fullmatch(text) is not None


def in_packages(module: str, packages: Iterable[str]) -> bool:
    """Whether ``module`` is one of ``packages`` or a submodule of one.

    Example:
        >>> in_packages("mypkg.models", ["mypkg"]), in_packages("mypkg2", ["mypkg"])
        (True, False)
    """
    return any(module == p or module.startswith(p + ".") for p in packages)


def trust_hint(module: str) -> str:
    """The fix for code from an untrusted package: trust its top-level package.

    Example:
        >>> trust_hint("mypkg.models")
        "if you trust package 'mypkg', pass --trust mypkg"
    """
    top = module.split(".")[0]
    return f"if you trust package '{top}', pass --trust {top}"


# While a recipe recorded in a file is read: (the file, the packages the user trusts).
_NAMED_IN_FILE: ContextVar[tuple[str, tuple[str, ...]] | None] = ContextVar(
    "named_in_file", default=None
)


@contextmanager
def named_in_file(label: str, trust: Iterable[str]) -> Iterator[None]:
    """Within this block, references come from ``label`` and need a trusted package.

    A recipe recorded in a checkpoint names its custom transforms and loss; importing them
    runs code that the file, not the user, chose. So, as for a pickled network, each
    reference must come from a package the user passed with ``--trust``.

    Example:
        >>> with named_in_file("net.patched.safetensors", trust=["mypkg"]):
        ...     try:
        ...         import_reference("os:system", noun="function", role="transform")
        ...     except CheckpointError as err:
        ...         print(err)
        net.patched.safetensors: its recipe runs transform 'os:system'; if you trust package 'os', pass --trust os
    """
    token = _NAMED_IN_FILE.set((label, tuple(trust)))
    try:
        yield
    finally:
        _NAMED_IN_FILE.reset(token)


def check_trusted(reference: str, role: str) -> None:
    """Refuse a reference named in a file from a package not trusted (see :func:`named_in_file`).

    Raises:
        CheckpointError: Inside :func:`named_in_file`, for a module outside its packages.
    """
    recorded = _NAMED_IN_FILE.get()
    if recorded is None:
        return
    label, trusted = recorded
    module = reference.partition(":")[0]
    if not in_packages(module, trusted):
        raise CheckpointError(
            f"its recipe runs {role} '{reference}'; {trust_hint(module)}", path=label
        )


def is_reference(text: str) -> bool:
    """Whether ``text`` has the shape ``package.module:name`` (nothing is imported).

    Example:
        >>> is_reference("pkg.mod:fn"), is_reference("pkg.mod:fn:x"), is_reference("pkg.mod")
        (True, False, False)
    """
    return _REFERENCE.fullmatch(text) is not None


def import_reference(
    reference: str,
    *,
    noun: str,
    role: str,
    fix: str = "",
    error: type[RockqError] = ConfigError,
    key: str | None = None,
) -> Callable[..., Any]:
    """Import the callable that ``"package.module:name"`` names.

    The part after ``:`` may be dotted (``pkg.mod:Class.method``).

    Args:
        reference: The reference as the user wrote it.
        noun: What the name should be, for messages: ``"function"``, ``"factory"``.
        role: What the reference is for, for messages: ``"transform"``, ``"loss"``.
        fix: What a callable must be, added to the message when the object is not one.
        error: The :class:`~transform_core.errors.RockqError` subclass to raise.
        key: The key of the error (the option or recipe key that gave the reference).

    Returns:
        The callable.

    Raises:
        RockqError: Of class ``error``: a malformed reference, a module that cannot be
            imported, a missing name or an object that is not callable.

    Example:
        >>> try:
        ...     import_reference("math:sqr", noun="function", role="loss", key="loss")
        ... except ConfigError as err:
        ...     print(err)
        loss: module 'math' has no function 'sqr' (did you mean 'sqrt'?); check the name after ':' in 'math:sqr'
    """
    if not is_reference(reference):
        raise error(f"expected 'package.module:{noun}', got {reference!r}", key=key)
    check_trusted(reference, role)
    module_name, _, attr_path = reference.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as err:  # the user's package can raise anything on import
        raise error(
            f"cannot import module '{module_name}' for {role} '{reference}' "
            f"({type(err).__name__}: {err}); check the spelling and that the package is "
            "installed or on PYTHONPATH",
            key=key,
        ) from err
    target: Any = module
    for part in attr_path.split("."):
        if not hasattr(target, part):
            public = [n for n in dir(target) if not n.startswith("_")]
            raise error(
                f"module '{module_name}' has no {noun} '{attr_path}'{did_you_mean(part, public)}; "
                f"check the name after ':' in '{reference}'",
                key=key,
            )
        target = getattr(target, part)
    if not callable(target):
        raise error(
            f"'{reference}' is not a {noun} (found an object of type {type(target).__name__})"
            + (f"; {fix}" if fix else ""),
            key=key,
        )
    function: Callable[..., Any] = target
    return function
