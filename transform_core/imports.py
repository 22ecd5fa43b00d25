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
from collections.abc import Callable
from typing import Any

from transform_core.errors import ConfigError, RockqError, did_you_mean

__all__ = ["import_reference", "is_dotted_name", "is_reference"]

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
