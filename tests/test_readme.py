"""README's generated parts stay in step with the code they describe."""

from __future__ import annotations

from pathlib import Path

from cli.render import transforms_markdown
from transform_core.recipe import builtin_recipes
from transform_core.registry import available_transforms

README = Path(__file__).resolve().parent.parent / "README.md"


def _section(text: str, start: str, end: str) -> str:
    return text.split(start, 1)[1].split(end, 1)[0]


def test_transforms_table_matches_the_registry() -> None:
    text = README.read_text()
    table = _section(text, "<!-- transforms-table", "<!-- end transforms-table -->")
    table = table.split("\n", 1)[1].strip()
    assert table == transforms_markdown(available_transforms())


def test_every_builtin_recipe_is_listed() -> None:
    text = README.read_text()
    for name in builtin_recipes():
        assert f"| `{name}` |" in text, f"README does not list the built-in recipe {name}"
