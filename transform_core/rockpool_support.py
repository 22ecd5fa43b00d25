"""Rockpool networks: their parameter families and module interface."""

from __future__ import annotations

from collections.abc import Mapping

from torch import nn


def declared_families(module: nn.Module) -> Mapping[str, str]:
    """The families a Rockpool module registers for its own tensors: attribute -> family."""
    registry = getattr(module, "_ModuleBase__registered_attributes", None)
    if not isinstance(registry, Mapping):
        return {}
    families: dict[str, str] = {}
    for attr, entry in registry.items():
        # Each entry is (value, kind, family, init, shape); the family may be None.
        if isinstance(entry, (tuple, list)) and len(entry) > 2 and isinstance(entry[2], str):
            families[attr] = str(entry[2])
    return families
