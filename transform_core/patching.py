"""Patch networks so that transforms run in the forward pass, burn them in, and un-patch.

:class:`TWrapper` wraps one module and gives it transformed parameters (or buffers) for
the duration of each forward pass, through :func:`torch.func.functional_call`; the raw
values stay held, untransformed and trainable, by the wrapped module. :class:`ActWrapper`
transforms a module's output. Both keep the wrapped module as ``._mod``.

Config trees mirror the module tree (see :mod:`transform_core.tree`). A parameter config
maps child names to sub-trees and tensor attribute names to transforms::

    {"encoder": {"0": {"weight": T_w, "bias": T_b}}, "head": {"weight": T_w}}

An activation config holds a module's own output transform under the key ``""``::

    {"encoder": {"0": {"": T_act}}}

Example:
    >>> from torch import nn
    >>> import transform_core as tt
    >>> net = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    >>> cfg = tt.make_param_T_config(net, lambda w: tt.deterministic_rounding(w, num_levels=3), "weights")
    >>> T_net = tt.make_param_T_network(net, cfg)
    >>> type(T_net[0]).__name__, type(T_net[0]._mod).__name__
    ('TWrapper', 'Linear')
    >>> plain = tt.remove_T_net(tt.apply_T(T_net))
    >>> len(plain[0].weight.unique()) <= 3
    True
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from transform_core.errors import ConfigError, did_you_mean
from transform_core.families import FamilyRules, tensor_infos
from transform_core.rockpool_support import is_rockpool_module, sync_submodule
from transform_core.tree import Tree, set_nested, tree_items

__all__ = [
    "ActWrapper",
    "TWrapper",
    "apply_T",
    "make_act_T_config",
    "make_act_T_network",
    "make_param_T_config",
    "make_param_T_network",
    "remove_T_net",
]

Transform = Callable[[Tensor], Tensor]

# Modules whose forward pass reads their children's tensors directly instead of calling
# the children (MultiheadAttention uses ``out_proj.weight``; the encoder layer's fast path
# reads every tensor): their wrapper swaps in the children's transformed tensors too.
_READS_CHILD_TENSORS: tuple[type[nn.Module], ...] = (
    nn.MultiheadAttention,
    nn.TransformerEncoderLayer,
    nn.TransformerDecoderLayer,
)


class _Wrapper(nn.Module):
    """Shared behaviour of the wrappers: hold ``_mod`` and look like it from outside."""

    _mod: nn.Module

    def __init__(self, mod: nn.Module) -> None:
        super().__init__()
        self._mod = mod

    def __getattr__(self, name: str) -> Any:
        # nn.Module finds parameters, buffers and sub-modules; anything else (a Rockpool
        # module's ``shape`` or ``as_graph``, a layer's ``in_features``) comes from ``_mod``.
        try:
            return super().__getattr__(name)
        except AttributeError:
            modules = self.__dict__.get("_modules")
            if name.startswith("__") or not modules or "_mod" not in modules:
                raise
            inner: nn.Module = modules["_mod"]
            value = getattr(inner, name)
            if callable(value) and getattr(value, "__self__", None) is inner:
                return _returning_wrapper(value, inner, self)
            return value

    def parameters(self, *args: Any, **kwargs: Any) -> Any:
        """As the wrapped module's: a Rockpool module's takes a family and gives a tree.

        The wrapper holds no tensor of its own, so the parameters are the same either way;
        a Rockpool network patched at its root keeps ``parameters("taus")`` and
        ``parameters().astorch()`` working.
        """
        inner = self._mod
        if is_rockpool_module(inner):
            return inner.parameters(*args, **kwargs)
        return super().parameters(*args, **kwargs)


def _returning_wrapper(method: Callable[..., Any], inner: nn.Module, wrapper: nn.Module) -> Any:
    """``method`` of the wrapped module, returning the wrapper where it returns the module.

    Rockpool's functional style reassigns results (``mod = mod.reset_state()``; a
    ``Sequential`` does so for each child), which must not drop the wrapper.
    """

    @functools.wraps(method)
    def call(*args: Any, **kwargs: Any) -> Any:
        result = method(*args, **kwargs)
        return wrapper if result is inner else result

    return call


class TWrapper(_Wrapper):
    """Apply parameter transforms to one module in its forward pass.

    Most users build these through :func:`make_param_T_network`.

    Args:
        mod: The module to wrap; it keeps holding its raw parameters.
        T_config: Attribute name of a parameter or buffer of ``mod`` -> transform
            ``T(x) -> x``, or ``None`` for none. ``None`` or an empty mapping transforms
            nothing.

    Raises:
        ConfigError: If a key names no parameter or buffer of ``mod``, or a value is not
            callable.

    Example:
        >>> lin = nn.Linear(2, 2)
        >>> wrapped = TWrapper(lin, {"weight": torch.zeros_like})
        >>> wrapped(torch.ones(1, 2)).equal(lin.bias.detach().unsqueeze(0))
        True
    """

    def __init__(self, mod: nn.Module, T_config: Mapping[str, Transform] | None = None) -> None:
        super().__init__(mod)
        config = dict(T_config or {})
        for attr, fn in config.items():
            _check_tensor_attr(mod, attr, fn, attr)
        self._T_config: dict[str, Transform] = {a: f for a, f in config.items() if f is not None}
        self._swapped_in = False  # set while an enclosing wrapper has swapped our tensors in

    @property
    def T_config(self) -> dict[str, Transform]:
        """Attribute name -> transform, for this wrapper's module."""
        return self._T_config

    def transformed(self) -> dict[str, Tensor]:
        """The transformed values of the configured tensors, as used in the forward pass."""
        return {attr: fn(getattr(self._mod, attr)) for attr, fn in self._T_config.items()}

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self._swapped_in:
            return self._mod(*args, **kwargs)
        # The module's own tensors are swapped for their transformed values only for this
        # call; everything else, buffers it updates included, is the module's own state.
        values = self.transformed()
        nested = self._nested_wrappers()
        for prefix, wrapper in nested:
            values.update({f"{prefix}.{a}": v for a, v in wrapper.transformed().items()})
            wrapper._swapped_in = True
        try:
            return torch.func.functional_call(self._mod, values, args, kwargs, strict=False)
        finally:
            for _, wrapper in nested:
                wrapper._swapped_in = False

    def _nested_wrappers(self) -> list[tuple[str, TWrapper]]:
        """Wrappers below a module that reads its children's tensors directly."""
        if not isinstance(self._mod, _READS_CHILD_TENSORS):
            return []
        return [
            (_join(path, "_mod"), module)
            for path, module in self._mod.named_modules()
            if isinstance(module, TWrapper)
        ]

    def apply_T(self, inplace: bool = True) -> TWrapper:
        """Burn in: overwrite the configured tensors with their transformed values.

        Parameters stay the same ``nn.Parameter`` objects (an optimiser holding them
        keeps working) and keep ``requires_grad``.

        Args:
            inplace: Must be true for a single wrapper; use :func:`apply_T` for a copy.

        Returns:
            This wrapper.
        """
        if not inplace:
            return apply_T(self, inplace=False)  # type: ignore[return-value]
        with torch.no_grad():
            for attr, value in self.transformed().items():
                _store(self._mod, attr, value)
        return self

    def extra_repr(self) -> str:
        return ", ".join(f"{attr}: {fn!r}" for attr, fn in self._T_config.items())


class ActWrapper(_Wrapper):
    """Transform a module's output after its forward pass.

    For a module that returns a tensor, the tensor is transformed. For a Rockpool module
    that returns ``(output, state, record)``, and for other tuple outputs such as an
    LSTM's ``(output, (h, c))``, the first element is transformed and the rest pass
    through unchanged.

    Args:
        mod: The module to wrap.
        trans_Fn: Transform ``T(x) -> x`` of the output; ``None`` leaves it unchanged.

    Example:
        >>> relu = ActWrapper(nn.ReLU(), lambda x: x * 2)
        >>> relu(torch.tensor([-1.0, 3.0]))
        tensor([0., 6.])
    """

    def __init__(self, mod: nn.Module, trans_Fn: Transform | None = None) -> None:
        super().__init__(mod)
        if trans_Fn is not None and not callable(trans_Fn):
            raise ConfigError(f"an activation transform must be callable, got {trans_Fn!r}")
        self._trans_Fn = trans_Fn

    @property
    def trans_Fn(self) -> Transform | None:
        """The output transform, or ``None``."""
        return self._trans_Fn

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        out = self._mod(*args, **kwargs)
        fn = self._trans_Fn
        if fn is None:
            return out
        if isinstance(out, tuple) and out and isinstance(out[0], Tensor):
            items = (fn(out[0]), *out[1:])
            # A named tuple keeps its type, so that callers can still read its fields.
            return type(out)(*items) if hasattr(out, "_fields") else items
        if isinstance(out, Tensor):
            return fn(out)
        raise TypeError(
            f"ActWrapper around {type(self._mod).__name__}: cannot transform an output of "
            f"type {type(out).__name__}; expected a tensor or a tuple starting with one"
        )

    def extra_repr(self) -> str:
        return f"output: {self._trans_Fn!r}"


# --------------------------------------------------------------------------------------
# Helpers


def _store(module: nn.Module, attr: str, value: Tensor) -> None:
    """Write ``value`` into ``module.attr``, keeping the Parameter or buffer object."""
    current = getattr(module, attr)
    if current.shape == value.shape and current.dtype == value.dtype:
        current.copy_(value)
    elif attr in module._parameters:
        module._parameters[attr] = nn.Parameter(value.detach(), current.requires_grad)
    else:
        module._buffers[attr] = value.detach()


def _tensor_attrs(module: nn.Module) -> list[str]:
    return [k for k, v in module._parameters.items() if v is not None] + [
        k for k, v in module._buffers.items() if v is not None
    ]


def _check_tensor_attr(module: nn.Module, attr: str, fn: Any, where: str) -> None:
    if attr in module._modules:
        raise ConfigError(
            f"'{where}' names the module {type(module._modules[attr]).__name__}, not a tensor; "
            "give it a sub-tree of its tensor names"
        )
    attrs = _tensor_attrs(module)
    if attr not in attrs:
        raise ConfigError(
            f"'{where}' names no parameter or buffer of {type(module).__name__}; it has "
            f"{attrs or 'none'}{did_you_mean(attr, attrs)}"
        )
    if fn is not None and not callable(fn):
        raise ConfigError(
            f"'{where}' must map to a transform function (or None for none), got {fn!r}"
        )


def _deepcopy(net: nn.Module, memo: dict[int, Any] | None = None) -> nn.Module:
    """``copy.deepcopy``, also of modules that hold tensors from their last forward pass.

    Such tensors (Rockpool's ``RateTorch`` keeps its state trace) belong to an autograd
    graph, which deepcopy refuses; the copy holds them detached.
    """
    memo = {} if memo is None else memo
    for module in nn.Module.modules(net):
        for value in vars(module).values():
            for tensor in _graph_tensors(value):
                memo.setdefault(id(tensor), tensor.detach().clone())
    return copy.deepcopy(net, memo)


def _graph_tensors(value: Any, depth: int = 3) -> Iterator[Tensor]:
    """Tensors with a ``grad_fn`` in ``value`` and its dicts, lists and tuples, a few deep."""
    if isinstance(value, Tensor):
        if value.grad_fn is not None:
            yield value
    elif depth and isinstance(value, (dict, list, tuple)):
        for item in value.values() if isinstance(value, dict) else value:
            yield from _graph_tensors(item, depth - 1)


def _set_child(parent: nn.Module, name: str, child: nn.Module) -> None:
    """Replace a sub-module without ``setattr``, which some module classes intercept."""
    parent._modules[name] = child
    # Rockpool modules also keep their own registry of sub-modules.
    sync_submodule(parent, name, child)


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _children(module: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    for name, child in module._modules.items():
        if child is not None:
            yield name, child


# --------------------------------------------------------------------------------------
# Parameter transforms


def make_param_T_config(
    net: nn.Module,
    T_fn: Transform,
    param_family: str | None = None,
    *,
    rules: FamilyRules | None = None,
) -> dict[str, Any]:
    """Build a parameter config tree that applies ``T_fn`` to one family of ``net``.

    Use :func:`~transform_core.tree.tree_update` to merge trees for several families.

    Args:
        net: The network the tree will patch.
        T_fn: Transform ``T(x) -> x`` for each selected tensor.
        param_family: Family to select (see :mod:`transform_core.families`); ``None``
            selects every parameter.
        rules: Extra family rules, glob on qualified names -> family.

    Returns:
        A nested dict mirroring ``net``'s module tree, holding only the selected tensors.

    Example:
        >>> net = nn.Sequential(nn.Linear(2, 2), nn.Tanh(), nn.Linear(2, 1))
        >>> sorted(make_param_T_config(net, torch.round, "biases"))
        ['0', '2']
    """
    tree: dict[str, Any] = {}
    for info in tensor_infos(net, rules).values():
        selected = (not info.is_buffer) if param_family is None else info.family == param_family
        if selected:
            path = (*info.module_path.split("."), info.attr) if info.module_path else (info.attr,)
            set_nested(tree, path, T_fn, inplace=True)
    return tree


def make_param_T_network(net: nn.Module, T_config_tree: Tree, inplace: bool = False) -> nn.Module:
    """Patch ``net`` so that the configured transforms run in its forward pass.

    Each module named in the tree with tensors to transform is replaced by a
    :class:`TWrapper` around it. The network keeps its structure and behaviour otherwise,
    at any depth and in any container (``Sequential``, ``ModuleList``, ``ModuleDict``,
    plain attributes). A module shared by several parents gets one wrapper, used by all;
    a tensor tied between modules is transformed in every module that uses it; and
    ``MultiheadAttention`` and the ``Transformer*Layer`` modules, which read their
    children's tensors directly, see them transformed too.

    Args:
        net: The network to patch.
        T_config_tree: Config tree, e.g. from :func:`make_param_T_config`.
        inplace: Patch ``net`` itself instead of a deep copy. A wrapper around ``net``
            itself (a tree naming its own tensors) is returned, not set in place.

    Returns:
        The patched network.

    Raises:
        ConfigError: If the tree names a module or tensor that ``net`` does not have,
            naming it.
    """
    patched = next((p for p, m in net.named_modules() if isinstance(m, TWrapper)), None)
    if (
        patched is not None
        and isinstance(T_config_tree, Mapping)
        and any(fn is not None for _, fn in tree_items(T_config_tree))
    ):
        raise ConfigError(
            f"the network already has parameter transforms (a TWrapper at "
            f"'{patched or '<root>'}'); merge the configs with tree_update and patch the "
            "un-patched network once (remove_T_net gives it back)"
        )
    _validate_param_tree(net, T_config_tree, "")
    if not inplace:
        net = _deepcopy(net)
    memo: dict[int, nn.Module] = {}
    _patch_params(net, T_config_tree, memo)
    _tie_transforms(net, memo)
    _share_patches(net, memo)
    return memo.get(id(net), net)


def _validate_param_tree(module: nn.Module, tree: Tree, prefix: str) -> None:
    if not isinstance(tree, Mapping):
        raise ConfigError(f"the config at '{prefix or '<root>'}' must be a mapping, got {tree!r}")
    for key, node in tree.items():
        where = _join(prefix, key)
        owner = _owner(module, key)
        if isinstance(node, Mapping):
            child = owner._modules.get(key)
            if child is None:
                names = [n for n, _ in _children(owner)]
                raise ConfigError(
                    f"'{where}' names no sub-module of {type(owner).__name__}; it has "
                    f"{names or 'none'}{did_you_mean(key, names)}"
                )
            _validate_param_tree(child, node, where)
        else:
            _check_tensor_attr(owner, key, node, where)  # None: named, not transformed


def _owner(module: nn.Module, key: str) -> nn.Module:
    """The module a config key refers to: activation wrappers are seen through.

    So a parameter tree built on the plain network also fits one with activation
    transforms; a key of the wrapper itself (``_mod``) still names the wrapper's child.
    """
    while isinstance(module, ActWrapper) and key not in module._modules:
        module = module._mod
    return module


def _patch_params(module: nn.Module, tree: Tree, memo: dict[int, nn.Module]) -> nn.Module:
    if id(module) in memo:
        return memo[id(module)]
    own: dict[str, Transform] = {}
    for key, node in tree.items():
        if isinstance(node, Mapping):
            owner = _owner(module, key)
            child = owner._modules[key]
            if child is not None:
                _set_child(owner, key, _patch_params(child, node, memo))
        elif node is not None:  # None: no transform, as in the original
            own[key] = node
    patched: nn.Module = module
    # The parameter wrapper goes inside any activation wrapper, as make_act_T_network
    # would place them.
    holder, inner = None, module
    while isinstance(inner, ActWrapper):
        holder, inner = inner, inner._mod
    if own or (
        isinstance(inner, _READS_CHILD_TENSORS)
        and any(isinstance(m, TWrapper) for m in inner.modules())
    ):
        wrapper = TWrapper(inner, own)
        if holder is None:
            patched = wrapper
        else:
            _set_child(holder, "_mod", wrapper)
    memo[id(module)] = patched
    return patched


def _tie_transforms(net: nn.Module, memo: dict[int, nn.Module]) -> None:
    """Give every module that holds a transformed tensor that tensor's transform.

    A tensor tied between modules (an embedding shared with an output layer) is listed
    once, so a tree names it in one module only; the other holders must use it
    transformed too, or the patched forward pass would differ from the burned-in network.
    New wrappers are added to ``memo`` for :func:`_share_patches` to put in place.
    """
    wrappers = {id(m._mod): m for m in memo.values() if isinstance(m, TWrapper)}
    for m in memo.values():
        if isinstance(m, ActWrapper) and isinstance(m._mod, TWrapper):
            wrappers[id(m._mod._mod)] = m._mod
    fns: dict[int, Transform] = {}
    for wrapper in wrappers.values():
        for attr, fn in wrapper.T_config.items():
            fns.setdefault(id(getattr(wrapper._mod, attr)), fn)
    if not fns:
        return
    for module in list(nn.Module.modules(net)):
        if isinstance(module, _Wrapper):
            continue
        tied = {
            attr: fns[id(getattr(module, attr))]
            for attr in _tensor_attrs(module)
            if id(getattr(module, attr)) in fns
        }
        if not tied:
            continue
        existing = wrappers.get(id(module))
        if existing is None:
            memo[id(module)] = TWrapper(module, tied)
        else:
            for attr, fn in tied.items():
                existing._T_config.setdefault(attr, fn)


def _share_patches(net: nn.Module, memo: dict[int, nn.Module]) -> None:
    """Point every parent of a patched module at its one wrapper.

    ``named_modules()`` lists a module shared by several parents once, so a tree may name
    it at one path only; every other parent must use the same wrapper, or the module would
    run unpatched there.
    """
    for parent in list(nn.Module.modules(net)):
        for name, child in list(_children(parent)):
            patched = memo.get(id(child))
            if patched is not None and patched is not child and patched is not parent:
                _set_child(parent, name, patched)


def _named_wrappers(net: nn.Module) -> Iterator[tuple[str, TWrapper]]:
    """Each TWrapper once, with its module's qualified name in the un-patched network."""
    seen: set[int] = set()
    for path, module in net.named_modules():
        if isinstance(module, TWrapper) and id(module) not in seen:
            seen.add(id(module))
            parts = [p for p in path.split(".") if p and p != "_mod"]
            yield ".".join(parts), module


def _wrappers(net: nn.Module) -> Iterator[TWrapper]:
    seen: set[int] = set()
    for module in nn.Module.modules(net):  # Rockpool modules override modules()
        if isinstance(module, TWrapper) and id(module) not in seen:
            seen.add(id(module))
            yield module


TensorCallback = Callable[[str, Tensor, Tensor], None]
"""``on_tensor(name, raw, transformed)``: called by :func:`apply_T` for each tensor."""


def apply_T(
    T_net: nn.Module, inplace: bool = False, *, on_tensor: TensorCallback | None = None
) -> nn.Module:
    """Burn in: store each configured tensor's transformed value in place of the raw one.

    The network stays patched; :func:`remove_T_net` then removes the wrappers. Parameters
    keep their ``nn.Parameter`` objects and ``requires_grad``. Each transform runs once,
    under ``torch.no_grad()``.

    Args:
        T_net: A network patched by :func:`make_param_T_network`.
        inplace: Transform ``T_net`` itself. Otherwise a copy is made, in which the
            tensors that are about to be replaced are not copied first.
        on_tensor: Called as ``on_tensor(name, raw, transformed)`` for each tensor, before
            ``raw`` is overwritten, with its qualified name in the un-patched network
            (``"encoder.0.weight"``); use it to report on tensors one at a time. With a
            callback and without ``inplace``, the whole network is copied first.

    Returns:
        The burned-in network.
    """
    if on_tensor is not None:
        if not inplace:
            T_net = _deepcopy(T_net)
        done: set[int] = set()  # a tied tensor is transformed once
        with torch.no_grad():
            for path, wrapper in _named_wrappers(T_net):
                for attr, fn in wrapper.T_config.items():
                    raw = getattr(wrapper._mod, attr)
                    if id(raw) in done:
                        continue
                    done.add(id(raw))
                    value = fn(raw)
                    on_tensor(_join(path, attr), raw, value)
                    _store(wrapper._mod, attr, value)
        return T_net
    if not inplace:
        # Share the raw tensors that are about to be replaced instead of copying them.
        memo: dict[int, Any] = {}
        with torch.no_grad():
            new_values = {
                (id(w), attr): value
                for w in _wrappers(T_net)
                for attr, value in w.transformed().items()
            }
            for w in _wrappers(T_net):
                for attr in w.T_config:
                    tensor = getattr(w._mod, attr)
                    memo[id(tensor)] = _fresh_like(tensor, new_values[(id(w), attr)])
        return _deepcopy(T_net, memo)
    burned: set[int] = set()  # a tied tensor is transformed once
    with torch.no_grad():
        for wrapper in _wrappers(T_net):
            for attr, fn in wrapper.T_config.items():
                raw = getattr(wrapper._mod, attr)
                if id(raw) not in burned:
                    burned.add(id(raw))
                    _store(wrapper._mod, attr, fn(raw))
    return T_net


def _fresh_like(old: Tensor, value: Tensor) -> Tensor:
    value = value.detach()
    if value.untyped_storage().data_ptr() == old.untyped_storage().data_ptr():
        # The transform returned its input or a view of it: the copy must not alias it.
        value = value.clone()
    if isinstance(old, nn.Parameter):
        return nn.Parameter(value, old.requires_grad)
    return value


def remove_T_net(T_net: nn.Module, inplace: bool = False) -> nn.Module:
    """Remove every :class:`TWrapper` and :class:`ActWrapper` from a patched network.

    The result has the original module classes and ``state_dict`` keys, with the values
    the patched network holds (raw, or burned in by :func:`apply_T`).

    Args:
        T_net: A patched network.
        inplace: Un-patch ``T_net`` itself rather than a deep copy. A wrapper at the top
            level cannot be removed in place: its wrapped module is returned.

    Returns:
        The un-patched network.
    """
    if not inplace:
        T_net = _deepcopy(T_net)
    return _unpatch(T_net, {})


def _unpatch(module: nn.Module, memo: dict[int, nn.Module]) -> nn.Module:
    if id(module) in memo:
        return memo[id(module)]
    inner = module
    while isinstance(inner, _Wrapper):
        inner = inner._mod
    for name, child in list(_children(inner)):
        _set_child(inner, name, _unpatch(child, memo))
    memo[id(module)] = inner
    return inner


# --------------------------------------------------------------------------------------
# Activation transforms


def make_act_T_config(
    net: nn.Module, T_fn: Transform | None = None, ModuleClass: type | None = None
) -> dict[str, Any]:
    """Build an activation config tree that transforms module outputs with ``T_fn``.

    Args:
        net: The network the tree will patch.
        T_fn: Transform ``T(x) -> x`` of a module's output; ``None`` transforms nothing.
        ModuleClass: Select the modules of this class (containers included). Without it,
            every module with no children is selected.

    Returns:
        A nested dict mirroring ``net``, with ``""`` keys holding the transforms.

    Example:
        >>> net = nn.Sequential(nn.Linear(2, 2), nn.ReLU())
        >>> make_act_T_config(net, torch.round, nn.Linear)
        {'0': {'': <built-in method round of type object at ...>}}
    """
    tree: dict[str, Any] = {}
    if T_fn is None:
        return tree
    for path, module in _logical_modules(net, into_readers=False):
        # A module that reads its children's tensors counts as a leaf: its children's
        # outputs cannot be transformed (see _validate_act_tree).
        leaf = isinstance(module, _READS_CHILD_TENSORS) or not any(_children(module))
        if (ModuleClass is None and leaf) or (
            ModuleClass is not None and isinstance(module, ModuleClass)
        ):
            set_nested(tree, (*path.split("."), "") if path else ("",), T_fn, inplace=True)
    return tree


def _logical_modules(
    net: nn.Module, prefix: str = "", *, into_readers: bool = True
) -> Iterator[tuple[str, nn.Module]]:
    """Like ``named_modules()``, but seeing through wrappers to the modules they wrap.

    Without ``into_readers``, the children of modules that read their children's tensors
    directly (attention, transformer layers) are left out.
    """
    inner = net
    while isinstance(inner, _Wrapper):
        inner = inner._mod
    yield prefix, inner
    if not into_readers and isinstance(inner, _READS_CHILD_TENSORS):
        return
    for name, child in _children(inner):
        yield from _logical_modules(child, _join(prefix, name), into_readers=into_readers)


def make_act_T_network(net: nn.Module, act_T_config: Tree, inplace: bool = False) -> nn.Module:
    """Wrap the modules named in ``act_T_config`` in :class:`ActWrapper`.

    Args:
        net: The network to patch.
        act_T_config: Config tree, e.g. from :func:`make_act_T_config`.
        inplace: Patch ``net`` itself instead of a deep copy. A wrapper around ``net``
            itself is returned, not set in place.

    Returns:
        The patched network.

    Raises:
        ConfigError: If the tree names a module that ``net`` does not have.
    """
    _validate_act_tree(net, act_T_config, "")
    if not inplace:
        net = _deepcopy(net)
    memo: dict[int, nn.Module] = {}
    patched = _patch_acts(net, act_T_config, memo)
    _share_patches(net, memo)
    return patched


def _validate_act_tree(module: nn.Module, tree: Tree, prefix: str) -> None:
    if not isinstance(tree, Mapping):
        raise ConfigError(f"the config at '{prefix or '<root>'}' must be a mapping, got {tree!r}")
    inner = module
    while isinstance(inner, _Wrapper):
        inner = inner._mod
    for key, node in tree.items():
        where = _join(prefix, key) if key else (prefix or "<root>")
        if key == "":
            if node is not None and not callable(node):
                raise ConfigError(f"'{where}' must map to a transform function, got {node!r}")
            continue
        child = inner._modules.get(key)
        if child is None or not isinstance(node, Mapping):
            names = [n for n, _ in _children(inner)]
            raise ConfigError(
                f"'{_join(prefix, key)}' names no sub-module of {type(inner).__name__}; it has "
                f"{names or 'none'}{did_you_mean(key, names)}"
            )
        if isinstance(inner, _READS_CHILD_TENSORS) and any(
            fn is not None for _, fn in tree_items(node)
        ):
            # MultiheadAttention never calls out_proj, and the transformer layers' fast
            # path (eval, no grad) calls none of their children: such a transform would
            # run only sometimes, or never.
            raise ConfigError(
                f"'{_join(prefix, key)}' is inside {type(inner).__name__}, which reads its "
                "sub-modules' tensors instead of calling them, so a transform of their "
                f"output would not run; transform the output of '{prefix or '<root>'}' instead"
            )
        _validate_act_tree(child, node, _join(prefix, key))


def _patch_acts(module: nn.Module, tree: Tree, memo: dict[int, nn.Module]) -> nn.Module:
    if id(module) in memo:
        return memo[id(module)]
    # Children live inside any parameter wrapper; the activation wrapper goes outside it.
    inner = module
    while isinstance(inner, _Wrapper):
        inner = inner._mod
    for key, node in tree.items():
        if key:
            child = inner._modules[key]
            if child is not None:
                _set_child(inner, key, _patch_acts(child, node, memo))
    fn = tree.get("")
    patched: nn.Module = ActWrapper(module, fn) if fn is not None else module
    memo[id(module)] = patched
    return patched
