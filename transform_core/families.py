"""Which tensor of a network belongs to which parameter family.

A family is a name for a kind of tensor that a recipe or a config can select at once:
``weights``, ``biases``, ``norms``, or any name a module class or a rule gives.

For each parameter and buffer the family comes from the first of these that names it:

1. a caller's rule, a glob on the tensor's qualified name (``{"*.alpha": "decays"}``);
   a later rule wins over an earlier one;
2. the module class's own declaration, a class attribute ``transform_families`` mapping
   attribute names to families (``transform_families = {"alpha": "decays"}``), or the
   families a Rockpool module registers for its parameters;
3. the built-in families of torch layers: ``weights`` (the weights of ``Linear``,
   ``Bilinear``, ``Conv*``, ``ConvTranspose*``, ``Embedding``, ``EmbeddingBag``,
   ``MultiheadAttention``, and the ``weight_*`` tensors of RNN, LSTM and GRU layers and
   cells), ``biases`` (their biases) and ``norms`` (the affine parameters of normalisation
   layers).

Anything else has no family. Buffers get a family only from a rule or a declaration.

Glob patterns match the whole qualified name with :func:`fnmatch.fnmatchcase` (``*``
matches dots too); a pattern that starts with ``*.`` also matches a top-level name, so
``*.alpha`` selects ``alpha`` as well as ``layer.alpha``. A pattern starting with ``re:``
is a regular expression that must match the whole name.
"""

from __future__ import annotations

import fnmatch
import re
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from functools import lru_cache

import torch
from torch import nn

from transform_core.errors import ConfigError

__all__ = [
    "BUILTIN_FAMILIES",
    "TensorInfo",
    "family_for_name",
    "name_matches",
    "param_families",
    "tensor_infos",
    "tied_names",
]

BUILTIN_FAMILIES = ("weights", "biases", "norms")

FamilyRules = Mapping[str, str]
"""Glob (or ``re:`` regex) on qualified tensor names -> family name."""

_WEIGHTED: tuple[type[nn.Module], ...] = (
    nn.Linear,
    nn.Bilinear,
    nn.modules.conv._ConvNd,
    nn.Embedding,
    nn.EmbeddingBag,
    nn.RNNBase,
    nn.RNNCellBase,
    nn.MultiheadAttention,
)
_NORMS: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._NormBase,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.RMSNorm,
)


@dataclass(frozen=True)
class TensorInfo:
    """One parameter or buffer of a network, as families and recipes see it.

    Attributes:
        name: Qualified name, as in ``state_dict()`` (``"encoder.0.weight"``).
        module_path: Qualified name of the module that holds it (``""`` for the root).
        attr: Attribute name within that module (``"weight"``).
        module_class: Class name of the holding module (``"Linear"``).
        family: The tensor's family, or ``None``.
        is_buffer: Whether it is a buffer rather than a parameter.
        shape: Its shape.
        dtype: Its dtype, as text (``"float32"``).
    """

    name: str
    module_path: str
    attr: str
    module_class: str
    family: str | None
    is_buffer: bool
    shape: tuple[int, ...]
    dtype: str

    @property
    def numel(self) -> int:
        """Number of elements."""
        n = 1
        for size in self.shape:
            n *= size
        return n


@lru_cache(maxsize=256)
def _compile(pattern: str) -> re.Pattern[str]:
    if pattern.startswith("re:"):
        return re.compile(pattern[3:])
    glob = pattern[2:] if pattern.startswith("*.") else None
    source = fnmatch.translate(pattern)
    if glob is not None:
        source = f"(?:{source})|(?:{fnmatch.translate(glob)})"
    return re.compile(source)


def name_matches(name: str, pattern: str) -> bool:
    """Whether a qualified tensor name matches a glob or ``re:`` pattern.

    Raises:
        re.error: If a ``re:`` pattern is not a valid regular expression.

    Example:
        >>> name_matches("block.1.alpha", "*.alpha"), name_matches("alpha", "*.alpha")
        (True, True)
        >>> name_matches("fc.weight", "re:fc\\\\.(weight|bias)")
        True
    """
    return _compile(pattern).fullmatch(name) is not None


def _rule_family(name: str, rules: FamilyRules | None) -> str | None:
    if not rules:
        return None
    found = None
    for pattern, family in rules.items():
        if name_matches(name, pattern):
            found = family  # later rules win
    return found


def _builtin_family(module: nn.Module, attr: str) -> str | None:
    if isinstance(module, _NORMS):
        return "norms" if attr in ("weight", "bias") else None
    if isinstance(module, _WEIGHTED):
        if attr == "weight" or attr.startswith("weight_") or attr.endswith("_weight"):
            return "weights"
        if attr == "bias" or attr.startswith("bias_") or attr.endswith("_bias"):
            return "biases"
    return None


def _declared_families(module: nn.Module) -> Mapping[str, str]:
    declared = getattr(type(module), "transform_families", None)
    if isinstance(declared, Mapping):
        return declared
    if "rockpool" in sys.modules:
        # Only once Rockpool is imported, so the core never needs it otherwise. Not keyed
        # on the class's module: subclasses of Rockpool's TorchModule live in user code.
        from transform_core.rockpool_support import declared_families

        return declared_families(module)
    return {}


def _iter_tensors(net: nn.Module) -> Iterator[tuple[str, str, nn.Module, str, torch.Tensor, bool]]:
    for module_path, module in net.named_modules():
        for attr, tensor in module._parameters.items():
            if isinstance(tensor, nn.parameter.UninitializedParameter):
                raise ConfigError(
                    f"'{_join(module_path, attr)}' of {type(module).__name__} is not "
                    "initialised yet (a lazy module); run one forward pass before patching"
                )
            if tensor is not None:
                yield _join(module_path, attr), module_path, module, attr, tensor, False
        for attr, tensor in module._buffers.items():
            if tensor is not None:
                yield _join(module_path, attr), module_path, module, attr, tensor, True


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def tensor_infos(net: nn.Module, rules: FamilyRules | None = None) -> dict[str, TensorInfo]:
    """Describe every parameter and buffer of ``net``, with its family.

    Tensors shared by several modules are listed once, under their first name.

    Args:
        net: Any torch module.
        rules: Extra family rules, glob on qualified names -> family; they take precedence.

    Returns:
        Qualified name -> :class:`TensorInfo`, in ``named_modules()`` order.

    Example:
        >>> net = nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3))
        >>> {k: v.family for k, v in tensor_infos(net).items() if not v.is_buffer}
        {'0.weight': 'weights', '0.bias': 'biases', '1.weight': 'norms', '1.bias': 'norms'}
    """
    infos: dict[str, TensorInfo] = {}
    seen: set[int] = set()
    for name, module_path, module, attr, tensor, is_buffer in _iter_tensors(net):
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        family = _rule_family(name, rules)
        if family is None:
            family = _declared_families(module).get(attr)
        if family is None and not is_buffer:
            family = _builtin_family(module, attr)
        infos[name] = TensorInfo(
            name=name,
            module_path=module_path,
            attr=attr,
            module_class=type(module).__name__,
            family=family,
            is_buffer=is_buffer,
            shape=tuple(tensor.shape),
            dtype=str(tensor.dtype).removeprefix("torch."),
        )
    return infos


def tied_names(net: nn.Module) -> dict[str, tuple[str, str]]:
    """The other names of tensors held in several places (tied weights, shared modules).

    :func:`tensor_infos` lists such a tensor once, under its first name; ``state_dict``
    has it under every name.

    Returns:
        Each other name -> (the name it is listed under, the class of the module holding
        it under the other name).

    Example:
        >>> emb, head = nn.Embedding(10, 4), nn.Linear(4, 10, bias=False)
        >>> head.weight = emb.weight
        >>> tied_names(nn.Sequential(emb, head))
        {'1.weight': ('0.weight', 'Linear')}
    """
    listed: dict[int, str] = {}
    tied: dict[str, tuple[str, str]] = {}
    for module_path, module in net.named_modules(remove_duplicate=False):
        for attr, tensor in (*module._parameters.items(), *module._buffers.items()):
            if tensor is None:
                continue
            name = _join(module_path, attr)
            first = listed.setdefault(id(tensor), name)
            if first != name:
                tied.setdefault(name, (first, type(module).__name__))
    return tied


def param_families(net: nn.Module, rules: FamilyRules | None = None) -> dict[str, str | None]:
    """Map each parameter (and each buffer that has a family) to its family.

    Example:
        >>> param_families(nn.Linear(2, 2))
        {'weight': 'weights', 'bias': 'biases'}
    """
    return {
        name: info.family
        for name, info in tensor_infos(net, rules).items()
        if not info.is_buffer or info.family is not None
    }


def family_for_name(name: str, rules: FamilyRules | None = None) -> str | None:
    """The family of a tensor known only by name, as in a bare safetensors file.

    Rules come first; otherwise ``*.weight`` (or ``weight``) is ``weights`` and ``*.bias``
    is ``biases``.

    Example:
        >>> family_for_name("layers.0.weight"), family_for_name("layers.0.alpha")
        ('weights', None)
    """
    family = _rule_family(name, rules)
    if family is not None:
        return family
    attr = name.rsplit(".", 1)[-1]
    if attr == "weight":
        return "weights"
    if attr == "bias":
        return "biases"
    return None
