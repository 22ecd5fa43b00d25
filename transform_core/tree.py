"""Nested-dictionary trees: the shape of transformation configs.

A config tree mirrors a module tree: each key is a child module's name (as in
``named_children()``) or a tensor's attribute name, and each leaf is a value such as a
transform function. These helpers build, merge and walk such trees.

Example:
    >>> cfg = {"0": {"weight": "w0"}, "2": {"weight": "w2", "bias": "b2"}}
    >>> tree_flatten(cfg)
    (['w0', 'w2', 'b2'], [('0', 'weight'), ('2', 'weight'), ('2', 'bias')])
    >>> tree_unflatten(*tree_flatten(cfg)) == cfg
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


def tree_update(target: MutableMapping[str, Any], additional: Tree) -> MutableMapping[str, Any]:
    """Merge ``additional`` into ``target`` recursively, in place, and return ``target``.

    Branches are merged key by key; a leaf in ``additional`` replaces what ``target`` held.
    Branches of ``additional`` are copied, so later changes to ``target`` never reach it.

    Example:
        >>> tree_update({"fc": {"weight": 1}}, {"fc": {"bias": 2}})
        {'fc': {'weight': 1, 'bias': 2}}
    """
    for key, node in additional.items():
        current = target.get(key)
        if _is_branch(node) and isinstance(current, MutableMapping):
            tree_update(current, node)
        elif _is_branch(node):
            # A read-only branch of the target is copied first, so its keys are kept.
            start = tree_update({}, current) if isinstance(current, Mapping) else {}
            target[key] = tree_update(start, node)
        else:
            target[key] = node
    return target


def tree_flatten(tree: Tree) -> tuple[list[Any], list[KeyPath]]:
    """Return the leaves and their key paths, in the same order.

    :func:`tree_unflatten` rebuilds the tree from them. An empty branch holds no leaf, so
    it is not rebuilt.
    """
    leaves: list[Any] = []
    paths: list[KeyPath] = []
    for path, leaf in tree_items(tree):
        paths.append(path)
        leaves.append(leaf)
    return leaves, paths


def tree_unflatten(leaves: Sequence[Any], paths: Sequence[KeyPath]) -> dict[str, Any]:
    """Build a tree from leaves and key paths, as returned by :func:`tree_flatten`.

    Raises:
        ValueError: If the two lengths differ, or a path is empty.
    """
    if len(leaves) != len(paths):
        raise ValueError(f"got {len(leaves)} leaves for {len(paths)} key paths")
    tree: dict[str, Any] = {}
    for path, leaf in zip(paths, leaves, strict=True):
        set_nested(tree, path, leaf)
    return tree


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


def set_nested(tree: MutableMapping[str, Any], path: Sequence[str], value: Any) -> None:
    """Set the node at ``path`` to ``value``, creating branches as needed.

    Raises:
        ValueError: If ``path`` is empty or runs through a leaf.

    Example:
        >>> t = {}
        >>> set_nested(t, ("a", "b"), 3)
        >>> t
        {'a': {'b': 3}}
    """
    if not path:
        raise ValueError("a key path needs at least one key")
    node: MutableMapping[str, Any] = tree
    for depth, key in enumerate(path[:-1]):
        child = node.setdefault(key, {})
        if not isinstance(child, MutableMapping):
            raise ValueError(f"{'.'.join(path[: depth + 1])} is a leaf, not a branch")
        node = child
    node[path[-1]] = value
