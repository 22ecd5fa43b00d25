"""Tests for the nested config-tree helpers in ``transform_core.tree``."""

from __future__ import annotations

import copy
from collections import OrderedDict
from types import MappingProxyType
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from transform_core.tree import (
    get_nested,
    set_nested,
    tree_flatten,
    tree_items,
    tree_map,
    tree_unflatten,
    tree_update,
)

TREE_SETTINGS = settings(max_examples=50, deadline=None)

_keys = st.text(alphabet="abcxyz_0123", min_size=1, max_size=3)
_leaves = st.one_of(
    st.integers(), st.text(max_size=3), st.none(), st.lists(st.integers(), max_size=2)
)
# Non-empty branches: an empty branch holds no leaf, so flattening cannot keep it.
_trees = st.recursive(
    _leaves,
    lambda children: st.dictionaries(_keys, children, min_size=1, max_size=4),
    max_leaves=12,
).filter(lambda t: isinstance(t, dict))


def _sample() -> dict[str, Any]:
    return {"0": {"weight": "w0", "bias": "b0"}, "2": {"weight": "w2"}, "scale": 3}


def _branch_ids(tree: Any) -> set[int]:
    """ids of every branch dict in ``tree``, the root included."""
    if not isinstance(tree, dict):
        return set()
    ids = {id(tree)}
    for node in tree.values():
        ids |= _branch_ids(node)
    return ids


# --------------------------------------------------------------------------------------
# tree_items, tree_map


def test_tree_items_depth_first_in_insertion_order() -> None:
    assert list(tree_items(_sample())) == [
        (("0", "weight"), "w0"),
        (("0", "bias"), "b0"),
        (("2", "weight"), "w2"),
        (("scale",), 3),
    ]


def test_tree_map_applies_to_every_leaf_and_keeps_shape() -> None:
    tree = _sample()
    before = copy.deepcopy(tree)
    mapped = tree_map(tree, lambda leaf: f"<{leaf}>")
    assert mapped == {
        "0": {"weight": "<w0>", "bias": "<b0>"},
        "2": {"weight": "<w2>"},
        "scale": "<3>",
    }
    assert list(mapped) == list(tree) and list(mapped["0"]) == ["weight", "bias"]
    assert tree == before  # the input is untouched
    assert not _branch_ids(mapped) & _branch_ids(tree)  # and shares no branch with the output


def test_tree_map_accepts_any_mapping_and_keeps_empty_branches() -> None:
    tree = OrderedDict(a=MappingProxyType({"b": 1}), c={})
    mapped = tree_map(tree, lambda leaf: leaf + 1)
    assert mapped == {"a": {"b": 2}, "c": {}}
    assert type(mapped) is dict and type(mapped["a"]) is dict


def test_tree_map_treats_lists_as_leaves() -> None:
    assert tree_map({"a": [1, 2]}, len) == {"a": 2}


@TREE_SETTINGS
@given(_trees)
def test_tree_map_identity_is_an_equal_copy(tree: dict[str, Any]) -> None:
    mapped = tree_map(tree, lambda leaf: leaf)
    assert mapped == tree
    assert not _branch_ids(mapped) & _branch_ids(tree)


# --------------------------------------------------------------------------------------
# tree_update


def test_tree_update_merges_branches_deeply_into_a_copy() -> None:
    target = {"fc": {"weight": 1, "sub": {"a": 1}}, "other": 5}
    before = copy.deepcopy(target)
    result = tree_update(target, {"fc": {"bias": 2, "sub": {"b": 2}}, "new": {"x": 0}})
    assert result == {
        "fc": {"weight": 1, "sub": {"a": 1, "b": 2}, "bias": 2},
        "other": 5,
        "new": {"x": 0},
    }
    assert target == before  # by default the target is left as it was
    assert not _branch_ids(result) & _branch_ids(target)


def test_tree_update_in_place() -> None:
    target = {"fc": {"weight": 1}}
    assert tree_update(target, {"fc": {"bias": 2}}, inplace=True) is target
    assert target == {"fc": {"weight": 1, "bias": 2}}


def test_tree_update_replaces_leaves() -> None:
    target = {"fc": {"weight": "old"}, "leaf": 1, "branch": {"x": 1}}
    merged = tree_update(
        target, {"fc": {"weight": "new"}, "leaf": {"now": "branch"}, "branch": "now leaf"}
    )
    assert merged == {"fc": {"weight": "new"}, "leaf": {"now": "branch"}, "branch": "now leaf"}


def test_tree_update_does_not_alias_additional() -> None:
    additional = {"fc": {"bias": 2, "deep": {"x": 1}}}
    snapshot = copy.deepcopy(additional)
    target = tree_update({}, additional)
    assert target == additional
    assert not _branch_ids(target) & _branch_ids(additional)
    # Changing the merged tree leaves the source alone, and the other way round.
    target["fc"]["deep"]["x"] = 99
    target["fc"]["new"] = 0
    assert additional == snapshot
    additional["fc"]["deep"]["y"] = 5
    assert "y" not in target["fc"]["deep"]


def test_tree_update_merges_into_a_read_only_branch() -> None:
    target: dict[str, Any] = {"fc": MappingProxyType({"weight": 1})}
    assert tree_update(target, {"fc": {"bias": 2}}, inplace=True) == {
        "fc": {"weight": 1, "bias": 2}
    }
    assert tree_update(MappingProxyType({"a": 1}), {"b": 2}) == {"a": 1, "b": 2}


def test_tree_update_with_empty_additional_changes_nothing() -> None:
    assert tree_update(_sample(), {}) == _sample()
    assert tree_update(_sample(), {"0": {}}) == _sample()


@TREE_SETTINGS
@given(_trees, _trees)
def test_tree_update_properties(first: dict[str, Any], second: dict[str, Any]) -> None:
    first_before, second_before = copy.deepcopy(first), copy.deepcopy(second)
    merged = tree_update(first, second)
    assert first == first_before and second == second_before
    assert not _branch_ids(merged) & (_branch_ids(first) | _branch_ids(second))
    # Every leaf of the second tree is in the result at the same path.
    for path, leaf in tree_items(second):
        assert get_nested(merged, path) == leaf
    # A leaf of the first tree survives unless the second tree has something on its path.
    second_paths = {path for path, _ in tree_items(second)}
    for path, leaf in tree_items(first):
        shadowed = any(p[: len(path)] == path or path[: len(p)] == p for p in second_paths)
        if not shadowed:
            assert get_nested(merged, path) == leaf
    # Merging a tree into an empty one copies it; in place gives the same tree.
    assert tree_update({}, second) == second
    assert tree_update(copy.deepcopy(first), second, inplace=True) == merged


# --------------------------------------------------------------------------------------
# tree_flatten, tree_unflatten


def test_tree_flatten_gives_leaves_in_order_and_the_shape() -> None:
    leaves, treedef = tree_flatten(_sample())
    assert leaves == ["w0", "b0", "w2", 3]
    assert treedef == {"0": {"weight": None, "bias": None}, "2": {"weight": None}, "scale": None}


def test_tree_flatten_of_empty_trees() -> None:
    assert tree_flatten({}) == ([], {})
    assert tree_unflatten({}, []) == {}
    # An empty branch is part of the shape, so it is rebuilt.
    assert tree_unflatten(*reversed(tree_flatten({"a": {}, "b": {"c": 1}}))) == {
        "a": {},
        "b": {"c": 1},
    }


@TREE_SETTINGS
@given(_trees)
def test_flatten_unflatten_round_trip(tree: dict[str, Any]) -> None:
    leaves, treedef = tree_flatten(tree)
    rebuilt = tree_unflatten(treedef, leaves)
    assert rebuilt == tree
    assert list(tree_items(rebuilt)) == list(tree_items(tree))  # order kept too
    assert not _branch_ids(rebuilt) & _branch_ids(tree)


def test_unflatten_with_transformed_leaves() -> None:
    leaves, treedef = tree_flatten(_sample())
    rebuilt = tree_unflatten(treedef, [str(leaf).upper() for leaf in leaves])
    assert rebuilt == {"0": {"weight": "W0", "bias": "B0"}, "2": {"weight": "W2"}, "scale": "3"}


@pytest.mark.parametrize("leaves", [[1], [1, 2, 3]])
def test_unflatten_needs_one_leaf_per_place(leaves: list[Any]) -> None:
    with pytest.raises(ValueError, match=f"got {len(leaves)} leaves for a tree of 2"):
        tree_unflatten({"a": None, "b": {"c": None}}, leaves)


# --------------------------------------------------------------------------------------
# get_nested, set_nested


def test_get_nested_returns_leaves_and_branches() -> None:
    tree = _sample()
    assert get_nested(tree, ("0", "bias")) == "b0"
    assert get_nested(tree, ["2"]) == {"weight": "w2"}
    assert get_nested(tree, ()) is tree


@pytest.mark.parametrize(
    ("path", "message"),
    [
        (("1",), "no key '1' at <root>"),
        (("0", "scale"), "no key 'scale' at 0"),
        (("scale", "x"), "no key 'x' at scale"),  # through a leaf
        (("0", "weight", "x", "y"), "no key 'x' at 0.weight"),
    ],
)
def test_get_nested_errors_name_the_missing_key(path: tuple[str, ...], message: str) -> None:
    with pytest.raises(KeyError) as info:
        get_nested(_sample(), path)
    assert info.value.args[0] == message


def test_set_nested_creates_branches_and_replaces_leaves() -> None:
    tree: dict[str, Any] = {}
    assert set_nested(tree, ("a", "b", "c"), 1, inplace=True) is tree
    set_nested(tree, ("a", "d"), 2, inplace=True)
    set_nested(tree, ("a", "b", "c"), 3, inplace=True)
    assert tree == {"a": {"b": {"c": 3}, "d": 2}}
    set_nested(tree, ("a", "b"), "leaf now", inplace=True)
    assert tree == {"a": {"b": "leaf now", "d": 2}}


def test_set_nested_changes_a_copy_by_default() -> None:
    tree = _sample()
    changed = set_nested(tree, ("0", "weight"), "new")
    assert changed["0"] == {"weight": "new", "bias": "b0"}
    assert tree == _sample()


@pytest.mark.parametrize(
    ("path", "match"),
    [
        ((), "at least one key"),
        (("scale", "x"), "scale is a leaf"),
        (("0", "weight", "x"), r"0\.weight is a leaf"),
    ],
)
def test_set_nested_errors(path: tuple[str, ...], match: str) -> None:
    tree = _sample()
    with pytest.raises(ValueError, match=match):
        set_nested(tree, path, 1, inplace=True)
    assert tree == _sample()  # nothing half-written


@TREE_SETTINGS
@given(_trees, st.lists(_keys, min_size=1, max_size=4), st.integers())
def test_set_then_get(tree: dict[str, Any], path: list[str], value: int) -> None:
    try:
        changed = set_nested(tree, path, value)
    except ValueError:
        # Only when the path runs through an existing leaf.
        assert any(
            not isinstance(get_nested(tree, path[:i]), dict)
            for i in range(1, len(path))
            if _has_path(tree, path[:i])
        )
        return
    assert get_nested(changed, path) == value


def _has_path(tree: dict[str, Any], path: list[str]) -> bool:
    try:
        get_nested(tree, path)
    except KeyError:
        return False
    return True
