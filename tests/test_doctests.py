"""Run the docstring examples of every ``transform_core`` module as tests.

The examples are part of the documentation, so they must hold: a module whose examples
drift from its behaviour fails here.
"""

from __future__ import annotations

import doctest
import importlib
import pkgutil
from types import ModuleType

import pytest

import transform_core

MODULES = sorted(
    ["transform_core"]
    + [f"transform_core.{info.name}" for info in pkgutil.iter_modules(transform_core.__path__)]
)
FLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE


def _import(name: str) -> ModuleType:
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as error:
        # A module for an optional integration needs its extra installed.
        if error.name is not None and not error.name.startswith("transform_core"):
            pytest.skip(f"{name} needs {error.name}")
        raise


@pytest.mark.parametrize(
    "name",
    [
        # The Rockpool integration's examples need the rockpool extra.
        pytest.param(name, marks=pytest.mark.rockpool) if "rockpool" in name else name
        for name in MODULES
    ],
)
def test_docstring_examples(name: str) -> None:
    if "rockpool" in name:
        pytest.importorskip("rockpool")
    module = _import(name)
    result = doctest.testmod(module, optionflags=FLAGS, verbose=False, report=False)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples failed in {name}"


def test_the_core_modules_have_examples() -> None:
    for name in ("transform_core.quantise", "transform_core.tree", "transform_core.errors"):
        assert doctest.testmod(_import(name), optionflags=FLAGS, report=False).attempted > 0
