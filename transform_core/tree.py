"""Nested-dictionary trees: the shape of transformation configs.

A config tree mirrors a module tree: each key is a child module's name (as in
``named_children()``) or a tensor's attribute name, and each leaf is a value such as a
transform function. These helpers build, merge and walk such trees, with the parameters
and defaults of the original implementation's ``tree_utils``: they copy the branches they
change unless ``inplace=True``, but share the leaves where the original deep-copies them.

Example:
    >>> cfg = {"0": {"weight": "w0"}, "2": {"weight": "w2", "bias": "b2"}}
    >>> leaves, treedef = tree_flatten(cfg)
    >>> leaves
    ['w0', 'w2', 'b2']
    >>> tree_unflatten(treedef, leaves) == cfg
    True
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, MutableMapping, Sequence
from typing import Any

__all__ = [
    "Tree",
    "get_nested",
    "set_nested",
    "tree_flatten",
    "tree_items",
    "tree_map",
    "tree_unflatten",
    "tree_update",
]

Tree = Mapping[str, Any]
KeyPath = tuple[str, ...]


def _is_branch(node: Any) -> bool:
    return isinstance(node, Mapping)


def tree_items(tree: Tree, prefix: KeyPath = ()) -> Iterator[tuple[KeyPath, Any]]:
    """Yield ``(key_path, leaf)`` for every leaf, depth first, in insertion order.

    Example:
        >>> list(tree_items({"a": 1, "b": {"c": 2}}))
        [(('a',), 1), (('b', 'c'), 2)]
    """
    for key, node in tree.items():
        path = (*prefix, key)
        if _is_branch(node):
            yield from tree_items(node, path)
        else:
            yield path, node


def tree_map(tree: Tree, fn: Callable[[Any], Any]) -> dict[str, Any]:
    """Return a new tree with ``fn`` applied to every leaf.

    Example:
        >>> tree_map({"a": 1, "b": {"c": 2}}, lambda x: x * 10)
        {'a': 10, 'b': {'c': 20}}
    """
    return {k: tree_map(v, fn) if _is_branch(v) else fn(v) for k, v in tree.items()}


def tree_update(target: Tree, additional: Tree, inplace: bool = False) -> Tree:
    """Merge ``additional`` into ``target`` recursively and return the merged tree.

    Branches are merged key by key; a leaf in ``additional`` replaces what ``target`` held.
    Branches of ``additional`` are copied, so later changes to the result never reach it.

    Args:
        target: The tree to update.
        additional: The branches and leaves to add or replace.
        inplace: Update ``target`` itself; by default a copy of its branches is updated
            (the leaves, such as transforms, are shared), and ``target`` is left as it was.

    Example:
        >>> cfg = {"fc": {"weight": 1}}
        >>> tree_update(cfg, {"fc": {"bias": 2}}), cfg
        ({'fc': {'weight': 1, 'bias': 2}}, {'fc': {'weight': 1}})
    """
    merged = target if inplace and isinstance(target, MutableMapping) else _copy_branches(target)
    for key, node in additional.items():
        current = merged.get(key)
        if _is_branch(node) and isinstance(current, MutableMapping):
            tree_update(current, node, inplace=True)
        elif _is_branch(node):
            # A read-only branch of the target is copied first, so its keys are kept.
            start = dict(current) if isinstance(current, Mapping) else {}
            merged[key] = tree_update(start, node, inplace=True)
        else:
            merged[key] = node
    return merged


def _copy_branches(tree: Tree) -> dict[str, Any]:
    """A copy of every branch of ``tree``, sharing its leaves (transforms are not copied)."""
    return tree_map(tree, lambda leaf: leaf)


def tree_flatten(tree: Tree) -> tuple[list[Any], dict[str, Any]]:
    """Return the leaves, depth first, and the tree's shape with ``None`` for each leaf.

    :func:`tree_unflatten` rebuilds the tree from them.

    Example:
        >>> tree_flatten({"fc": {"weight": "w", "bias": "b"}, "empty": {}})
        (['w', 'b'], {'fc': {'weight': None, 'bias': None}, 'empty': {}})
    """
    leaves = [leaf for _, leaf in tree_items(tree)]
    return leaves, tree_map(tree, lambda _: None)


def tree_unflatten(treedef: Tree, leaves: Sequence[Any]) -> dict[str, Any]:
    """Build a tree of the shape ``treedef`` from its leaves, as :func:`tree_flatten` gives.

    Raises:
        ValueError: If the number of leaves differs from the number ``treedef`` has.

    Example:
        >>> tree_unflatten({"fc": {"weight": None, "bias": None}}, [1, 2])
        {'fc': {'weight': 1, 'bias': 2}}
    """
    expected = sum(1 for _ in tree_items(treedef))
    if len(leaves) != expected:
        raise ValueError(f"got {len(leaves)} leaves for a tree of {expected}")
    remaining = iter(leaves)
    return tree_map(treedef, lambda _: next(remaining))


def get_nested(tree: Tree, path: Sequence[str]) -> Any:
    """Return the node at ``path``.

    Raises:
        KeyError: Naming the first missing key and the path up to it.

    Example:
        >>> get_nested({"a": {"b": 3}}, ("a", "b"))
        3
    """
    node: Any = tree
    for depth, key in enumerate(path):
        if not _is_branch(node) or key not in node:
            raise KeyError(f"no key {key!r} at {'.'.join(path[:depth]) or '<root>'}")
        node = node[key]
    return node


def set_nested(tree: Tree, path: Sequence[str], value: Any, inplace: bool = False) -> Tree:
    """Set the node at ``path`` to ``value``, creating branches as needed; return the tree.

    Args:
        tree: The tree.
        path: Keys from the root to the node.
        value: The new node.
        inplace: Change ``tree`` itself; by default a copy of its branches is changed.

    Raises:
        ValueError: If ``path`` is empty or runs through a leaf.

    Example:
        >>> t = {"a": {"b": 1}}
        >>> set_nested(t, ("a", "c"), 3), t
        ({'a': {'b': 1, 'c': 3}}, {'a': {'b': 1}})
    """
    if not path:
        raise ValueError("a key path needs at least one key")
    root = tree if inplace and isinstance(tree, MutableMapping) else _copy_branches(tree)
    node = root
    for depth, key in enumerate(path[:-1]):
        child = node.setdefault(key, {})
        if not isinstance(child, MutableMapping):
            raise ValueError(f"{'.'.join(path[: depth + 1])} is a leaf, not a branch")
        node = child
    node[path[-1]] = value
    return root
