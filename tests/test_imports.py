"""Tests for transform_core.imports: references to the user's own code."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from transform_core.errors import CheckpointError, ConfigError, RecipeError
from transform_core.imports import import_reference, is_dotted_name, is_reference

MODULE = "rockq_imports_testmod"


@pytest.fixture
def user_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    (tmp_path / f"{MODULE}.py").write_text(
        "class Maker:\n"
        "    @staticmethod\n"
        "    def build():\n"
        "        return 'built'\n"
        "def make():\n"
        "    return 'made'\n"
        "LIMIT = 3\n"
    )
    (tmp_path / "rockq_imports_broken.py").write_text("raise RuntimeError('no config file')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in (MODULE, "rockq_imports_broken"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    return MODULE


def test_shapes_of_names_and_references() -> None:
    assert is_dotted_name("a.b_c.d1") and not is_dotted_name("a..b") and not is_dotted_name("1a")
    assert is_reference("a.b:c") and is_reference("a:B.c")
    for text in ("a.b", "a.b:", ":c", "a:b:c", "a b:c", "dir/net.pt"):
        assert not is_reference(text), text


def test_imports_functions_and_dotted_attributes(user_module: str) -> None:
    assert import_reference(f"{user_module}:make", noun="function", role="loss")() == "made"
    built = import_reference(f"{user_module}:Maker.build", noun="factory", role="--arch")
    assert built() == "built"


def test_each_refusal_is_one_line_of_the_requested_class_and_key(user_module: str) -> None:
    cases: list[tuple[str, type[Exception], str]] = [
        ("no_colon", RecipeError, "transform: expected 'package.module:function', got 'no_colon'"),
        (
            "rockq_imports_broken:make",
            RecipeError,
            "transform: cannot import module 'rockq_imports_broken' for transform "
            "'rockq_imports_broken:make' (RuntimeError: no config file)",
        ),
        (
            f"{user_module}:mak",
            RecipeError,
            f"transform: module '{user_module}' has no function 'mak' (did you mean 'make'?)",
        ),
        (
            f"{user_module}:LIMIT",
            RecipeError,
            f"transform: '{user_module}:LIMIT' is not a function (found an object of type int); "
            "pass a function",
        ),
    ]
    for reference, kind, start in cases:
        with pytest.raises(kind) as info:
            import_reference(
                reference,
                noun="function",
                role="transform",
                fix="pass a function",
                error=RecipeError,
                key="transform",
            )
        assert str(info.value).startswith(start), str(info.value)
        assert "\n" not in str(info.value)


def test_default_error_is_a_config_error_and_other_classes_are_kept(user_module: str) -> None:
    with pytest.raises(ConfigError):
        import_reference("rockq_no_such_module_xyz:f", noun="function", role="loss")
    with pytest.raises(CheckpointError, match=r"has no factory 'Maker\.buil'"):
        import_reference(
            f"{user_module}:Maker.buil", noun="factory", role="--arch", error=CheckpointError
        )
