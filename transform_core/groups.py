"""Scale groups: tensors whose quantisation range is computed together.

Some targets scale several tensors by one factor. On SynSense Xylo, a neuron's input
weights, its recurrent weights and its threshold are integers in one common unit: scaling
the weights without the threshold changes when the neuron fires. A recipe states this with
a ``scale_groups:`` section::

    scale_groups:
      - name: neuron_inputs
        per: neuron               # layer (default): one range per group instance;
                                  # neuron: one range per neuron (index along ``dim``)
        pair: order               # how tensors form instances: order (default) or
                                  # "re:REGEX" whose first capture group names the instance
        optional: false           # a group that matches nothing is an error unless optional
        members:                  # selectors, as in params rules: family, match, module
          - {family: weights, module: LinearTorch}     # input weights
          - {family: weights, module: LIFTorch}        # recurrent weights
          - {family: thresholds, sets_range: false}    # scaled along, does not set the range
        # each member also takes dim: the neuron dimension for per: neuron (default -1)

**The range.** At every forward pass the group reads the *current* values of its
range-setting members (``sets_range: true``, the default), so training moves the range
with the tensors, and takes their peak magnitude ``m`` (per instance, or per neuron). Each
member's transform (from its ``params`` rule, which must take an ``input_range``:
``deterministic_rounding`` or ``stochastic_rounding``) is called with the symmetric input
range ``[-m, m]``. A member whose rule has more levels than the range-setters keeps the
same step: it gets ``[-m, m] * (its num_levels - 1) / (their num_levels - 1)``. So with
8-bit weights (``num_levels: 255``, ``output_range: [-127, 127]``) and 16-bit thresholds
(``num_levels: 65535``, ``output_range: [-32767, 32767]``) a weight ``w`` becomes
``round(w * 127 / m)`` and a threshold ``t`` becomes ``round(t * 127 / m)``: one factor.
Burn-in computes every range once from the raw values, before any tensor is replaced.

**Pairing.** Members may live in different modules (a ``LinearTorch`` weight feeding a
``LIFTorch`` whose ``w_rec`` and ``threshold`` it shares a scale with). With
``pair: order``, the matched tensors are walked in network order and an instance closes
after each module that holds a tensor of the *last* member listed (the anchor, e.g. the
thresholds): a layer's weights join the neurons they feed. A matched tensor after the last
anchor module is an error. With ``pair: "re:..."``, tensors whose first capture group is
equal form one instance.

**Per neuron.** A neuron's inputs lie along ``dim`` of each member: ``-1`` (the default)
fits Rockpool, whose weights are ``(inputs, neurons)`` and thresholds ``(neurons,)``;
``dim: 0`` fits a torch ``nn.Linear`` weight ``(outputs, inputs)``. All members of an
instance must have the same number of neurons. A neuron (or instance) whose range-setting
values are all zero has a zero-width range; its members map to zero.

Example:
    >>> from transform_core.recipe import parse_recipe
    >>> recipe = parse_recipe('''
    ... version: 1
    ... params:
    ...   - {family: weights, transform: deterministic_rounding,
    ...      args: {output_range: [-127, 127], num_levels: 255}}
    ... scale_groups:
    ...   - name: all_weights
    ...     members: [{family: weights}]
    ... ''')
    >>> group = recipe.scale_groups[0]
    >>> group.name, group.per, group.pair, group.members[0].sets_range
    ('all_weights', 'layer', 'order', True)
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from transform_core.errors import RecipeError
from transform_core.families import name_matches
from transform_core.patching import TWrapper, _logical_modules
from transform_core.registry import BoundTransform

if TYPE_CHECKING:
    from yaml.nodes import Node

    from transform_core.pipeline import TensorPlan
    from transform_core.recipe import Recipe, _Parser

__all__ = [
    "GroupInstance",
    "GroupMember",
    "GroupedTransform",
    "MemberPlan",
    "ScaleGroup",
    "SharedRange",
    "attach_scale_groups",
    "frozen_ranges",
    "grouped_transforms",
    "parse_scale_groups",
    "resolve_scale_groups",
]

_GROUP_KEYS = ("name", "members", "per", "pair", "optional")
_MEMBER_KEYS = ("family", "match", "module", "sets_range", "dim")
_PER = ("layer", "neuron")
_REGEX_PREFIX = "re:"


@dataclass(frozen=True)
class GroupMember:
    """One selector of a scale group.

    Attributes:
        family: The family selected, or ``None``.
        match: A name pattern (glob, or ``re:`` and a regular expression), or ``None``.
        module: A glob on the owning module's class name, or ``None``.
        sets_range: Whether its values count towards the group's range.
        dim: The neuron dimension, for ``per: neuron``.
        line: Its line in the recipe.
    """

    family: str | None = None
    match: str | None = None
    module: str | None = None
    sets_range: bool = True
    dim: int = -1
    line: int | None = None

    def selects(self, name: str, family: str | None, module_class: str) -> bool:
        """Whether this member selects a tensor, by the rules of a params rule."""
        if self.module is not None and not fnmatch.fnmatchcase(module_class, self.module):
            return False
        if self.family is not None and family != self.family:
            return False
        return self.match is None or name_matches(name, self.match)

    @property
    def selector(self) -> str:
        """The selection in words: ``family=weights, module=LinearTorch``."""
        parts = (("family", self.family), ("match", self.match), ("module", self.module))
        return ", ".join(f"{k}={v}" for k, v in parts if v is not None)


@dataclass(frozen=True)
class ScaleGroup:
    """A ``scale_groups`` entry of a recipe.

    Attributes:
        name: The group's name.
        members: Its selectors; the last one is the anchor for ``pair: order``.
        per: ``"layer"`` or ``"neuron"``.
        pair: ``"order"`` or ``"re:"`` and a regular expression with a capture group.
        optional: If false, a group that matches no tensor is an error.
        index: Its position in the list.
        line: Its line in the recipe.
    """

    name: str
    members: tuple[GroupMember, ...]
    per: str = "layer"
    pair: str = "order"
    optional: bool = False
    index: int = 0
    line: int | None = None

    @property
    def label(self) -> str:
        """The group's key path, such as ``scale_groups[0]``."""
        return f"scale_groups[{self.index}]"


# --- parsing ------------------------------------------------------------------------


def parse_scale_groups(parser: _Parser, node: Node) -> tuple[ScaleGroup, ...]:
    """Parse a recipe's ``scale_groups:`` list (called by the recipe parser).

    Raises:
        RecipeError: Naming the line and key path of the first problem.
    """
    from yaml.nodes import SequenceNode

    if not isinstance(node, SequenceNode):
        raise parser.error(
            "must be a list of groups (each starting with '- name:')", node, "scale_groups"
        )
    groups: list[ScaleGroup] = []
    seen: dict[str, int] = {}
    for index, child in enumerate(node.value):
        group = _parse_group(parser, child, index)
        if group.name in seen:
            raise parser.error(
                f"group name '{group.name}' is already used by scale_groups[{seen[group.name]}]; "
                "give each group its own name",
                child,
                f"{group.label}.name",
            )
        seen[group.name] = index
        groups.append(group)
    return tuple(groups)


def _parse_group(parser: _Parser, node: Node, index: int) -> ScaleGroup:
    from yaml.nodes import SequenceNode

    label = f"scale_groups[{index}]"
    entries = parser.items(node, label, "a scale group")
    parser.check_keys(entries, _GROUP_KEYS, label)
    for needed in ("name", "members"):
        if needed not in entries:
            raise parser.error(
                f"a scale group needs '{needed}'; write it as "
                "{name: NAME, members: [{family: weights}, ...]}",
                node,
                label,
            )
    name = parser.string(entries["name"][1], f"{label}.name", "a group name")
    per = "layer"
    if "per" in entries:
        per_node = entries["per"][1]
        per = parser.string(per_node, f"{label}.per", "layer or neuron")
        if per not in _PER:
            raise parser.error(f"must be layer or neuron, got '{per}'", per_node, f"{label}.per")
    pair = "order"
    if "pair" in entries:
        pair_node = entries["pair"][1]
        pair = parser.string(pair_node, f"{label}.pair", "order or 're:' and a regular expression")
        if pair != "order":
            if not pair.startswith(_REGEX_PREFIX):
                raise parser.error(
                    f"must be order or 're:' and a regular expression with a capture group, "
                    f"got '{pair}'",
                    pair_node,
                    f"{label}.pair",
                )
            pattern = parser.pattern(pair_node, f"{label}.pair")
            if re.compile(pattern[len(_REGEX_PREFIX) :]).groups < 1:
                raise parser.error(
                    f"'{pattern}' has no capture group; add one around the part that names the "
                    "instance, e.g. 're:(layer\\d+)\\..*'",
                    pair_node,
                    f"{label}.pair",
                )
    optional = False
    if "optional" in entries:
        optional = parser.boolean(entries["optional"][1], f"{label}.optional")
    members_node = entries["members"][1]
    if not isinstance(members_node, SequenceNode) or not members_node.value:
        raise parser.error(
            "must be a non-empty list of selectors such as {family: weights}",
            members_node,
            f"{label}.members",
        )
    members = tuple(
        _parse_member(parser, child, f"{label}.members[{i}]")
        for i, child in enumerate(members_node.value)
    )
    if not any(m.sets_range for m in members):
        raise parser.error(
            "no member sets the range (all have sets_range: false); let at least one set it",
            members_node,
            f"{label}.members",
        )
    return ScaleGroup(
        name=name,
        members=members,
        per=per,
        pair=pair,
        optional=optional,
        index=index,
        line=node.start_mark.line + 1,
    )


def _parse_member(parser: _Parser, node: Node, label: str) -> GroupMember:
    entries = parser.items(node, label, "a group member")
    parser.check_keys(entries, _MEMBER_KEYS, label)
    if not any(k in entries for k in ("family", "match", "module")):
        raise parser.error(
            "a member needs a selector: family, match and/or module, as in a params rule",
            node,
            label,
        )
    family = (
        parser.string(entries["family"][1], f"{label}.family", "a family name")
        if "family" in entries
        else None
    )
    match = parser.pattern(entries["match"][1], f"{label}.match") if "match" in entries else None
    module = (
        parser.string(entries["module"][1], f"{label}.module", "a module class name")
        if "module" in entries
        else None
    )
    sets_range = True
    if "sets_range" in entries:
        sets_range = parser.boolean(entries["sets_range"][1], f"{label}.sets_range")
    dim = -1
    if "dim" in entries:
        dim_node = entries["dim"][1]
        value = parser.value(dim_node, f"{label}.dim")
        if isinstance(value, bool) or not isinstance(value, int):
            raise parser.error(
                f"must be an integer dimension such as -1 or 0, got {value!r}",
                dim_node,
                f"{label}.dim",
            )
        dim = value
    return GroupMember(family, match, module, sets_range, dim, node.start_mark.line + 1)


# --- resolving against a network -------------------------------------------------------


@dataclass(frozen=True)
class MemberPlan:
    """One tensor of a group instance.

    Attributes:
        name: Its qualified name.
        module_path: Its module's qualified name.
        attr: Its attribute name.
        sets_range: Whether it counts towards the range.
        dim: Its neuron dimension (``per: neuron``).
        factor: Its input range relative to the range-setters' (``(L - 1) / (L_ref - 1)``).
    """

    name: str
    module_path: str
    attr: str
    sets_range: bool
    dim: int
    factor: float


@dataclass(frozen=True)
class GroupInstance:
    """The tensors that share one range (per layer) or one range per neuron.

    Attributes:
        group: The recipe's group.
        members: Its tensors, in network order.
    """

    group: ScaleGroup
    members: tuple[MemberPlan, ...]

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe data for plans: group name, ``per`` and member tensors."""
        return {
            "group": self.group.name,
            "per": self.group.per,
            "members": [
                {"name": m.name, "sets_range": m.sets_range, "factor": m.factor}
                for m in self.members
            ],
        }


def _levels(entry: TensorPlan) -> int:
    rule = entry.rule
    if rule is None:  # checked by the caller
        raise ValueError(entry.info.name)
    arg = rule.transform.arg("num_levels")
    value = rule.args.get("num_levels", None if arg is None or arg.required else arg.default)
    return int(value) if isinstance(value, (int, float)) and value >= 2 else 256


def resolve_scale_groups(
    recipe: Recipe, tensors: Sequence[TensorPlan]
) -> tuple[GroupInstance, ...]:
    """Pair each group's tensors into instances and check them against the recipe's rules.

    Args:
        recipe: The recipe.
        tensors: The plan's tensors, in network order.

    Returns:
        Every instance of every group, group by group.

    Raises:
        RecipeError: A required group matching nothing, a tensor in two groups or selected
            by two members, a member tensor that no rule with an ``input_range`` transforms
            (or whose rule sets ``input_range`` itself), a tensor that cannot be paired,
            an instance without a range-setter, range-setters with different
            ``num_levels``, or different neuron counts within an instance.
    """
    path = None if recipe.source.startswith("<") else recipe.source
    owner: dict[str, str] = {}
    instances: list[GroupInstance] = []
    for group in recipe.scale_groups:

        def fail(message: str, group: ScaleGroup = group) -> RecipeError:
            return RecipeError(message, path=path, line=group.line, key=group.label)

        matched: list[tuple[TensorPlan, int]] = []
        for entry in tensors:
            info = entry.info
            if info.is_buffer and info.family is None:
                continue  # states and settings: never transformed, never grouped
            hits = [
                i
                for i, m in enumerate(group.members)
                if m.selects(info.name, info.family, info.module_class)
            ]
            if not hits:
                continue
            if len(hits) > 1:
                raise fail(
                    f"tensor '{info.name}' is selected by members[{hits[0]}] and "
                    f"members[{hits[1]}]; narrow the selectors so each tensor has one member"
                )
            if info.name in owner:
                raise fail(
                    f"tensor '{info.name}' is already in scale group '{owner[info.name]}'; a "
                    "tensor belongs to one group"
                )
            owner[info.name] = group.name
            matched.append((entry, hits[0]))
        if not matched:
            if group.optional:
                continue
            raise fail(
                f"scale group '{group.name}' matches no tensor of the network; fix its "
                "members, or add 'optional: true' to the group"
            )
        for members in _pair(group, matched, fail):
            instances.append(_instance(group, members, fail))
    return tuple(instances)


def _pair(
    group: ScaleGroup,
    matched: list[tuple[TensorPlan, int]],
    fail: Callable[[str], RecipeError],
) -> list[list[tuple[TensorPlan, int]]]:
    if group.pair != "order":
        regex = re.compile(group.pair[len(_REGEX_PREFIX) :])
        keyed: dict[str, list[tuple[TensorPlan, int]]] = {}
        for entry, index in matched:
            found = regex.fullmatch(entry.info.name)
            if found is None or found.group(1) is None:
                raise fail(
                    f"tensor '{entry.info.name}' does not match pair '{group.pair}'; widen the "
                    "pattern or narrow the members"
                )
            keyed.setdefault(found.group(1), []).append((entry, index))
        return list(keyed.values())
    anchor = len(group.members) - 1
    anchor_modules = {e.info.module_path for e, i in matched if i == anchor}
    result: list[list[tuple[TensorPlan, int]]] = []
    current: list[tuple[TensorPlan, int]] = []
    for position, (entry, index) in enumerate(matched):
        current.append((entry, index))
        module = entry.info.module_path
        following = (
            matched[position + 1][0].info.module_path if position + 1 < len(matched) else None
        )
        if module in anchor_modules and following != module:
            result.append(current)
            current = []
    if current:
        names = ", ".join(e.info.name for e, _ in current)
        raise fail(
            f"tensor(s) {names} come after the last module holding members[{anchor}] "
            f"({group.members[anchor].selector}), so they pair with no instance; list the "
            "anchor member last, narrow the members, or pair with 're:...'"
        )
    return result


def _instance(
    group: ScaleGroup,
    members: list[tuple[TensorPlan, int]],
    fail: Callable[[str], RecipeError],
) -> GroupInstance:
    names = ", ".join(e.info.name for e, _ in members)
    for entry, _ in members:
        rule = entry.rule
        if rule is None:
            raise fail(
                f"tensor '{entry.info.name}' is in scale group '{group.name}' but no params rule "
                "transforms it; add a rule for it, or narrow the members"
            )
        if rule.transform.arg("input_range") is None:
            raise fail(
                f"tensor '{entry.info.name}' is transformed by {rule.label} with "
                f"{rule.transform.name}, which takes no input_range to share; use "
                "deterministic_rounding or stochastic_rounding"
            )
        if "input_range" in rule.args:
            raise fail(
                f"{rule.label} sets input_range for '{entry.info.name}', but scale group "
                f"'{group.name}' gives it; remove input_range from the rule"
            )
    setters = [(e, i) for e, i in members if group.members[i].sets_range]
    if not setters:
        raise fail(
            f"the instance {names} holds no member that sets the range; pair it with a "
            "range-setting member"
        )
    levels = {_levels(e) for e, _ in setters}
    if len(levels) > 1:
        raise fail(
            f"the range-setting tensors of {names} have different num_levels "
            f"({sorted(levels)}); give their rules the same num_levels"
        )
    reference = levels.pop()
    neurons: dict[str, int] = {}
    plans = []
    for entry, index in members:
        member = group.members[index]
        info = entry.info
        if group.per == "neuron":
            if not info.shape:
                raise fail(
                    f"tensor '{info.name}' is a scalar, shared by every neuron, and per: neuron "
                    "needs one value per neuron; build the module with one value per neuron "
                    "(e.g. threshold=torch.ones(n)), or use per: layer"
                )
            if not -len(info.shape) <= member.dim < len(info.shape):
                raise fail(
                    f"tensor '{info.name}' has shape {list(info.shape)}, which has no dimension "
                    f"{member.dim} (members[{index}].dim); set dim to its neuron dimension"
                )
            neurons[info.name] = info.shape[member.dim]
        plans.append(
            MemberPlan(
                name=info.name,
                module_path=info.module_path,
                attr=info.attr,
                sets_range=member.sets_range,
                dim=member.dim,
                factor=(_levels(entry) - 1) / (reference - 1),
            )
        )
    if len(set(neurons.values())) > 1:
        shown = ", ".join(f"{n}: {c}" for n, c in neurons.items())
        raise fail(
            f"per: neuron needs one neuron count in an instance, found {shown}; set each "
            "member's dim to its neuron dimension, or use per: layer"
        )
    return GroupInstance(group, tuple(plans))


# --- the forward pass -----------------------------------------------------------------


class SharedRange:
    """The current peak magnitude of a group instance's range-setting tensors.

    Read from the network at each call, so it follows training; frozen by
    :func:`frozen_ranges` while burning in.

    Args:
        per: ``"layer"`` (a scalar peak) or ``"neuron"`` (one peak per neuron).
        members: The instance's tensors.
    """

    def __init__(self, per: str, members: Sequence[MemberPlan]) -> None:
        self.per = per
        self.members = tuple(members)
        self._sources: list[tuple[nn.Module, str, int]] = []
        self._frozen: Tensor | None = None

    def attach(self, modules: Mapping[str, nn.Module]) -> None:
        """Point at the modules (by qualified name, wrappers seen through) holding the tensors."""
        self._sources = [
            (modules[m.module_path], m.attr, m.dim) for m in self.members if m.sets_range
        ]

    def peak(self) -> Tensor:
        """Peak ``|value|`` of the range-setting tensors: a scalar, or one per neuron."""
        if self._frozen is not None:
            return self._frozen
        if not self._sources:
            raise RuntimeError(
                "this scale group is not attached to a network; patch with "
                "transform_core.pipeline.patch_network"
            )
        with torch.no_grad():
            peaks = []
            for module, attr, dim in self._sources:
                value: Tensor = getattr(module, attr).detach()
                magnitude = torch.where(torch.isfinite(value), value.abs(), 0.0)
                if self.per == "neuron":
                    count = value.shape[dim]
                    magnitude = magnitude.movedim(dim, -1).reshape(-1, count)
                    peaks.append(
                        magnitude.amax(0) if magnitude.numel() else magnitude.new_zeros(count)
                    )
                else:
                    peaks.append(magnitude.amax() if magnitude.numel() else magnitude.new_zeros(()))
            device = peaks[0].device
            return torch.stack([p.to(device) for p in peaks]).amax(0)

    def freeze(self) -> None:
        """Keep the current peak until :meth:`thaw`."""
        self._frozen = None
        self._frozen = self.peak()

    def thaw(self) -> None:
        """Read the tensors again at each call."""
        self._frozen = None


@dataclass(repr=False, eq=False)
class GroupedTransform(BoundTransform):
    """A bound transform that gets its ``input_range`` from a scale group at each call.

    Attributes:
        shared: The group instance's range.
        factor: This tensor's range relative to the range-setters'.
        dim: Its neuron dimension, for per-neuron ranges.
    """

    shared: SharedRange | None = None
    factor: float = 1.0
    dim: int = -1

    def __call__(self, value: Tensor) -> Tensor:
        if self.shared is None:
            raise RuntimeError("a GroupedTransform needs its scale group's range")
        peak = self.shared.peak().to(device=value.device, dtype=torch.float64) * self.factor
        peak = peak.to(value.dtype if value.is_floating_point() else torch.get_default_dtype())
        if peak.dim():
            shape = [1] * value.dim()
            shape[self.dim] = -1
            peak = peak.reshape(shape)
        kwargs: dict[str, Any] = {**self.args, "input_range": (-peak, peak)}
        if self.spec.uses_generator and self.seed is not None:
            kwargs["generator"] = self._generator(value.device, self.seed)
        return self.spec.function(value, **kwargs)

    def __getstate__(self) -> dict[str, Any]:
        return {
            **super().__getstate__(),
            "shared": self.shared,
            "factor": self.factor,
            "dim": self.dim,
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.shared = state["shared"]
        self.factor = state["factor"]
        self.dim = state["dim"]


def grouped_transforms(
    instances: Sequence[GroupInstance], bound_for: Callable[[str], BoundTransform | None]
) -> dict[str, GroupedTransform]:
    """The transform of every grouped tensor, by qualified name, not yet attached.

    Args:
        instances: From :func:`resolve_scale_groups`.
        bound_for: The tensor's own bound transform, by name.
    """
    result: dict[str, GroupedTransform] = {}
    for instance in instances:
        shared = SharedRange(instance.group.per, instance.members)
        for member in instance.members:
            bound = bound_for(member.name)
            if bound is None:  # resolve_scale_groups refuses tensors without a rule
                raise ValueError(f"no transform for grouped tensor {member.name!r}")
            result[member.name] = GroupedTransform(
                bound.spec,
                dict(bound.args),
                bound.seed,
                shared=shared,
                factor=member.factor,
                dim=member.dim,
            )
    return result


def attach_scale_groups(net: nn.Module, transforms: Mapping[str, GroupedTransform]) -> None:
    """Point each grouped transform's range at the tensors of the patched network ``net``."""
    modules = dict(_logical_modules(net))
    for shared in {id(t.shared): t.shared for t in transforms.values() if t.shared}.values():
        shared.attach(modules)


def _shared_ranges(net: nn.Module) -> list[SharedRange]:
    found: dict[int, SharedRange] = {}
    for module in nn.Module.modules(net):  # Rockpool modules override modules()
        if isinstance(module, TWrapper):
            for fn in module.T_config.values():
                if isinstance(fn, GroupedTransform) and fn.shared is not None:
                    found.setdefault(id(fn.shared), fn.shared)
    return list(found.values())


@contextmanager
def frozen_ranges(net: nn.Module) -> Iterator[None]:
    """Fix every scale group's range at its current value while burning in.

    Burn-in replaces tensors one at a time; without this, a group member burned in later
    would see the integers of one burned in earlier instead of the raw values.
    """
    shared = _shared_ranges(net)
    for item in shared:
        item.freeze()
    try:
        yield
    finally:
        for item in shared:
            item.thaw()
