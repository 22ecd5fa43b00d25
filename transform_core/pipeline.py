"""The few orchestration steps the command line calls: plan, patch, burn in, report.

A :class:`Plan` says, for every tensor of a network (or of a bare safetensors file), which
recipe rule applies to it, and for every module, which activation rule; it is what
``rockq patch --dry-run`` shows. :func:`patch_network` turns a plan into a patched
network, :func:`burn_in` applies the transforms, removes the patches and reports on every
tensor one at a time, and :func:`burn_in_tensors` does the same for a safetensors file
without a network, streaming one tensor at a time.

Random transforms draw from a generator seeded from the run's seed and the tensor's
qualified name, so the same inputs and seed give the same outputs whatever the order in
which tensors are processed.

Example:
    >>> import torch
    >>> from transform_core.recipe import load_recipe
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    >>> plan = plan_network(net, load_recipe("ternary"), seed=0)
    >>> [(t.info.name, t.rule.label if t.rule else None) for t in plan.tensors]
    [('0.weight', 'params[0]'), ('0.bias', None), ('2.weight', 'params[0]'), ('2.bias', None)]
    >>> burned, report = burn_in(patch_network(net, plan), plan)
    >>> burned[0].weight.unique().numel() <= 3, report.totals.tensors
    (True, 4)
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from transform_core import kernels
from transform_core.errors import CheckpointError, RecipeError
from transform_core.families import TensorInfo, family_for_name, tensor_infos, tied_names
from transform_core.groups import (
    GroupInstance,
    attach_scale_groups,
    frozen_ranges,
    grouped_transforms,
    resolve_scale_groups,
)
from transform_core.patching import (
    _READS_CHILD_TENSORS,
    _logical_modules,
    apply_T,
    make_act_T_network,
    make_param_T_network,
    remove_T_net,
)
from transform_core.recipe import Recipe, Rule
from transform_core.registry import BoundTransform
from transform_core.report import Report, TensorReport, tensor_report
from transform_core.tree import set_nested

__all__ = [
    "ModulePlan",
    "Plan",
    "TensorPlan",
    "burn_in",
    "burn_in_tensors",
    "checkpoint_report",
    "output_metadata",
    "patch_network",
    "plan_network",
    "plan_tensors",
]

Progress = Callable[[str], None]
"""Called with a tensor's name as each tensor is processed."""

REPORT_BEHIND_BYTES = 64 << 20
"""In tensor mode, a tensor whose input and output take at most this many bytes together is
reported in a background thread while the next one is transformed."""
_PRELOAD_ELEMENTS = 1 << 26
"""Tensor mode loads the compiled kernels at once when it has this many elements to
transform: about a quarter of a second of work for them, several seconds without them."""

_DTYPE_BITS = {
    "float64": 64,
    "float32": 32,
    "float16": 16,
    "bfloat16": 16,
}


@dataclass(frozen=True)
class TensorPlan:
    """What the recipe does to one tensor.

    Attributes:
        info: The tensor: name, family, module class, shape, dtype.
        rule: The winning rule (the last one that selects it), or ``None``.
        matched_by: Every rule that selects it, in recipe order.
    """

    info: TensorInfo
    rule: Rule | None
    matched_by: tuple[Rule, ...]


@dataclass(frozen=True)
class ModulePlan:
    """The activation rule for one module's output.

    Attributes:
        path: The module's qualified name (``""`` for the whole network).
        module_class: Its class name.
        rule: The winning rule.
        matched_by: Every activation rule that selects it, in recipe order.
    """

    path: str
    module_class: str
    rule: Rule
    matched_by: tuple[Rule, ...]


@dataclass(frozen=True)
class Plan:
    """A recipe resolved against a network or a set of named tensors.

    Attributes:
        recipe: The recipe.
        seed: The seed random transforms derive their per-tensor seeds from.
        tensors: One entry per tensor, in the network's order.
        modules: One entry per module whose output is transformed.
        groups: The scale-group instances (see :mod:`transform_core.groups`).
        tied: ``(other name, listed name, module class)`` for each other name of a tensor
            held in several places (see :func:`~transform_core.families.tied_names`).
    """

    recipe: Recipe
    seed: int
    tensors: tuple[TensorPlan, ...]
    modules: tuple[ModulePlan, ...] = ()
    groups: tuple[GroupInstance, ...] = ()
    tied: tuple[tuple[str, str, str], ...] = ()

    def transform_for(self, entry: TensorPlan) -> BoundTransform | None:
        """The transform bound for one tensor, seeded from the plan's seed and its name."""
        if entry.rule is None:
            return None
        return self.recipe.bind(entry.rule, entry.info.name, self.seed)

    def unmatched_rules(self) -> list[Rule]:
        """Rules that select nothing (optional ones included)."""
        used = {id(r) for t in self.tensors for r in t.matched_by}
        used |= {id(r) for m in self.modules for r in m.matched_by}
        return [r for r in (*self.recipe.params, *self.recipe.activations) if id(r) not in used]

    def check(self) -> None:
        """Raise for a rule that matches nothing, unless it says ``optional: true``, and
        for a transform that refuses a tensor of its dtype and number of dimensions.

        Each transform is tried on a tensor of the same dtype and shape (or, for one of
        more than 65,536 values, at most two values along each dimension; a user's own
        transform is not tried: it runs on the real values), so that a recipe that cannot
        transform a tensor (a per-channel rounding of a bias, a range beyond float16)
        fails before any work.

        Raises:
            RecipeError: Naming the rule, its line and its selector.
            ConfigError: Naming the rule, the tensor and what the transform refused.
        """
        for rule in self.unmatched_rules():
            if not rule.optional:
                self._check_tied_selection(rule)
                what = "tensor" if rule.section == "params" else "module"
                skipped = self._never_transformed(rule)
                if skipped:
                    what = f"tensor it may transform ({rule.selector}): {skipped}"
                else:
                    what += f" of the network ({rule.selector})"
                raise RecipeError(
                    f"matches no {what}; fix the selector, or add 'optional: true' to the rule",
                    path=_recipe_path(self.recipe),
                    line=rule.line,
                    key=rule.label,
                )
        for entry in self.tensors:
            bound = self.transform_for(entry)  # a new one: the plan's streams stay unused
            dtype = getattr(torch, entry.info.dtype, None)
            if bound is None or not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
                continue
            if bound.spec.is_reference:
                # A user's function may need its tensor's true values (positive time
                # constants); its errors on them name the rule and the tensor.
                continue
            shape = entry.info.shape
            if entry.info.numel > _PROBE_ELEMENTS:
                shape = tuple(min(size, 2) for size in shape)
            low, high = bound.spec.probe_range
            probe = torch.linspace(low, high, math.prod(shape), dtype=dtype).reshape(shape)
            with torch.no_grad():
                bound(probe)

    def _check_tied_selection(self, rule: Rule) -> None:
        """Refuse a rule that selects a tied tensor only under a name it is not listed by."""
        if rule.section != "params":
            return
        families = {entry.info.name: entry.info.family for entry in self.tensors}
        for other, listed, module_class in self.tied:
            if rule.selects(other, families.get(listed), module_class):
                raise RecipeError(
                    f"selects '{other}', which is the same tensor as '{listed}' (tied), and "
                    f"rules see it under that name only; select '{listed}' instead",
                    path=_recipe_path(self.recipe),
                    line=rule.line,
                    key=rule.label,
                )

    def _never_transformed(self, rule: Rule) -> str:
        """The tensors ``rule`` selects by name that are never transformed, and why; or ``''``.

        Example:
            >>> from transform_core.recipe import parse_recipe
            >>> recipe = parse_recipe("version: 1\\nparams: [{match: step, transform: identity}]")
            >>> plan = plan_tensors([("step", (), "int64")], recipe)
            >>> plan._never_transformed(recipe.params[0])
            "'step' is int64, and only float64, float32, float16 and bfloat16 tensors are transformed"
        """
        if rule.section != "params":
            return ""
        reasons = []
        for entry in self.tensors:
            info = entry.info
            if _selectable(info) or not rule.selects(info.name, info.family, info.module_class):
                continue
            if info.dtype not in _DTYPE_BITS:
                *most, last = _DTYPE_BITS
                reasons.append(
                    f"'{info.name}' is {info.dtype}, and only {', '.join(most)} and {last} "
                    "tensors are transformed"
                )
            else:
                reasons.append(
                    f"'{info.name}' is a buffer without a family; name it under 'families:'"
                )
        return "; ".join(reasons[:3]) + ("; ..." if len(reasons) > 3 else "")

    def size_bits(self) -> tuple[int, int]:
        """Total size in bits before and after, at each tensor's dtype or recipe bit width."""
        before = after = 0
        for entry in self.tensors:
            width = _storage_bits(entry.info.dtype)
            before += entry.info.numel * width
            bound = self.transform_for(entry)
            bits = bound.bits if bound is not None else None
            after += entry.info.numel * (bits if bits is not None else width)
        return before, after

    def to_dict(self) -> dict[str, Any]:
        """The plan as JSON-safe data, as ``rockq patch --dry-run --json`` prints it."""
        before, after = self.size_bits()
        rules = [*self.recipe.params, *self.recipe.activations]
        return {
            "recipe": self.recipe.source,
            "seed": self.seed,
            "rules": [
                {
                    "rule": rule.label,
                    "selector": rule.selector,
                    "transform": _describe(rule),
                    "optional": rule.optional,
                    "matches": [
                        t.info.name for t in self.tensors if any(r is rule for r in t.matched_by)
                    ]
                    + [
                        m.path or "<network>"
                        for m in self.modules
                        if any(r is rule for r in m.matched_by)
                    ],
                }
                for rule in rules
            ],
            "unmatched_tensors": [t.info.name for t in self.tensors if not t.matched_by],
            "overlaps": [
                {
                    "tensor": t.info.name,
                    "rules": [r.label for r in t.matched_by],
                    "winner": t.rule.label if t.rule else None,
                }
                for t in self.tensors
                if len(t.matched_by) > 1
            ]
            + [
                {
                    "module": m.path or "<network>",
                    "rules": [r.label for r in m.matched_by],
                    "winner": m.rule.label,
                }
                for m in self.modules
                if len(m.matched_by) > 1
            ],
            "size_bits": {"before": before, "after": after},
            "scale_groups": [g.to_dict() for g in self.groups],
        }


def _describe(rule: Rule) -> str:
    return _transform_text(rule.transform.name, rule.args)


_PROBE_ELEMENTS = 1 << 16
"""The largest tensor :meth:`Plan.check` tries a transform on at full shape."""


def _recipe_path(recipe: Recipe) -> str | None:
    return None if recipe.source.startswith("<") else recipe.source


def _seed(recipe: Recipe, seed: int | None) -> int:
    if seed is not None:
        return seed
    return recipe.seed if recipe.seed is not None else 0


def _storage_bits(dtype: str) -> int:
    # Every dtype, not only the float ones a recipe may select: an int64 step counter
    # takes 64 bits before and after.
    found = getattr(torch, dtype, None)
    return found.itemsize * 8 if isinstance(found, torch.dtype) else 32


def _selectable(info: TensorInfo) -> bool:
    # Integer tensors (step counters, indices) are never transformed; a buffer is
    # transformed only when it has a family, given by the recipe or its module class.
    return info.dtype in _DTYPE_BITS and (not info.is_buffer or info.family is not None)


def _plan_tensors(infos: Iterable[TensorInfo], recipe: Recipe) -> tuple[TensorPlan, ...]:
    plans = []
    for info in infos:
        matched: tuple[Rule, ...] = ()
        if _selectable(info):
            matched = tuple(
                rule
                for rule in recipe.params
                if rule.selects(info.name, info.family, info.module_class)
            )
        plans.append(TensorPlan(info, matched[-1] if matched else None, matched))
    return tuple(plans)


def plan_network(net: nn.Module, recipe: Recipe, *, seed: int | None = None) -> Plan:
    """Resolve ``recipe`` against ``net``: the rule for each tensor and module output.

    Args:
        net: The un-patched network.
        recipe: The recipe.
        seed: Overrides the recipe's seed (default 0).

    Returns:
        The plan. Call :meth:`Plan.check` to refuse rules that match nothing.
    """
    infos = tensor_infos(net, recipe.family_rules()).values()
    modules = []
    if recipe.activations:
        readers: dict[str, str] = {}  # path -> class, of modules that read their children
        for path, module in _logical_modules(net):
            matched = tuple(
                r for r in recipe.activations if r.selects(path, None, type(module).__name__)
            )
            if matched:
                _check_output_runs(path, readers, matched[-1], recipe)
                modules.append(ModulePlan(path, type(module).__name__, matched[-1], matched))
            if isinstance(module, _READS_CHILD_TENSORS):
                readers[path] = type(module).__name__
    tensors = _plan_tensors(infos, recipe)
    groups = resolve_scale_groups(recipe, tensors)
    tied = tuple((other, *listed) for other, listed in tied_names(net).items())
    return Plan(recipe, _seed(recipe, seed), tensors, tuple(modules), groups, tied)


def _check_output_runs(path: str, readers: Mapping[str, str], rule: Rule, recipe: Recipe) -> None:
    """Refuse an activation rule for a module whose parent never calls it.

    MultiheadAttention reads ``out_proj``'s tensors, and the transformer layers' fast path
    (eval, no grad) all their children's, without calling them: a transform of such a
    module's output would run sometimes, or never.
    """
    for parent, name in readers.items():
        if path.startswith(f"{parent}." if parent else ""):
            raise RecipeError(
                f"selects '{path}', inside {name} '{parent or '<root>'}', which reads its "
                "sub-modules' tensors instead of calling them, so their outputs cannot be "
                f"transformed; narrow the rule (match:), or transform the output of "
                f"'{parent or '<root>'}' instead",
                path=_recipe_path(recipe),
                line=rule.line,
                key=rule.label,
            )


def plan_tensors(
    tensors: Iterable[tuple[str, tuple[int, ...], str]],
    recipe: Recipe,
    *,
    seed: int | None = None,
) -> Plan:
    """Resolve ``recipe`` against named tensors without a network (tensor mode).

    Families come from names alone (see :func:`~transform_core.families.family_for_name`).

    Args:
        tensors: ``(name, shape, dtype)`` for each tensor; dtype as text (``"float32"``).
        recipe: The recipe; it must have no activation rules and no ``module:`` selectors.
        seed: Overrides the recipe's seed (default 0).

    Raises:
        RecipeError: If the recipe needs a network.
    """
    path = _recipe_path(recipe)
    if recipe.activations:
        rule = recipe.activations[0]
        raise RecipeError(
            "activation rules need a network, and this input is a bare tensor file; pass the "
            "network (a whole-module file, or a state dict with --arch)",
            path=path,
            line=rule.line,
            key=rule.label,
        )
    if recipe.scale_groups:
        group = recipe.scale_groups[0]
        raise RecipeError(
            "scale groups need a network to pair tensors and read their ranges, and this "
            "input is a bare tensor file; pass the network with --arch",
            path=path,
            line=group.line,
            key=group.label,
        )
    for rule in recipe.params:
        if rule.module is not None:
            raise RecipeError(
                "'module:' needs a network to know module classes, and this input is a bare "
                "tensor file; select by family or match instead, or pass --arch",
                path=path,
                line=rule.line,
                key=rule.label,
            )
    rules = recipe.family_rules()
    infos = []
    for name, shape, dtype in tensors:
        module_path, _, attr = name.rpartition(".")
        infos.append(
            TensorInfo(
                name=name,
                module_path=module_path,
                attr=attr,
                module_class="",
                family=family_for_name(name, rules),
                is_buffer=False,
                shape=tuple(shape),
                dtype=dtype,
            )
        )
    return Plan(recipe, _seed(recipe, seed), _plan_tensors(infos, recipe))


def patch_network(net: nn.Module, plan: Plan, *, inplace: bool = False) -> nn.Module:
    """Patch ``net`` with the plan's parameter and activation transforms.

    Args:
        net: The network the plan was made for.
        plan: From :func:`plan_network`.
        inplace: Patch ``net`` itself (no copy of its parameters).

    Returns:
        The patched network.
    """
    params: dict[str, Any] = {}
    by_name = {t.info.name: t for t in plan.tensors}
    grouped = grouped_transforms(plan.groups, lambda name: plan.transform_for(by_name[name]))
    for entry in plan.tensors:
        bound = grouped.get(entry.info.name) or plan.transform_for(entry)
        if bound is not None:
            info = entry.info
            path = (*info.module_path.split("."), info.attr) if info.module_path else (info.attr,)
            set_nested(params, path, bound, inplace=True)
    patched = make_param_T_network(net, params, inplace=inplace)
    attach_scale_groups(patched, grouped)
    if plan.modules:
        acts: dict[str, Any] = {}
        for module in plan.modules:
            bound = plan.recipe.bind(module.rule, module.path, plan.seed)
            set_nested(
                acts, (*module.path.split("."), "") if module.path else ("",), bound, inplace=True
            )
        patched = make_act_T_network(patched, acts, inplace=True)
    return patched


def burn_in(
    T_net: nn.Module,
    plan: Plan,
    *,
    progress: Progress | None = None,
    meta: Mapping[str, Any] | None = None,
) -> tuple[nn.Module, Report]:
    """Apply the transforms, remove the patches, and report on every tensor.

    Works in place on ``T_net`` and one tensor at a time, so memory stays at the network
    plus two tensors. The report compares each transformed tensor with its raw value.

    Args:
        T_net: A network patched by :func:`patch_network` (it is consumed).
        plan: The plan it was patched with.
        progress: Called with each tensor's name as it is done.
        meta: Facts about the run for the report.

    Returns:
        The un-patched network with burned-in values, and the report.
    """
    by_name = {t.info.name: t for t in plan.tensors}
    entries: dict[str, TensorReport] = {}

    def record(name: str, raw: Tensor, value: Tensor) -> None:
        entry = by_name[name]
        entries[name] = tensor_report(
            name,
            value,
            family=entry.info.family,
            transform=repr(plan.transform_for(entry)),
            reference=raw,
        )
        if progress is not None:
            progress(name)

    # Each tensor is transformed and reported once: the tensor chains and NumPy do it as
    # well as the compiled kernels would, without loading them (about a second and 120 MB).
    with kernels.compiled(False):
        with frozen_ranges(T_net):
            apply_T(T_net, inplace=True, on_tensor=record)
        net = remove_T_net(T_net, inplace=True)
        state = net.state_dict()
        ordered = []
        for entry in plan.tensors:
            name = entry.info.name
            if name in entries:
                ordered.append(entries[name])
            elif name in state:
                ordered.append(tensor_report(name, state[name], family=entry.info.family))
    return net, Report.build(ordered, limits=plan.recipe.limits, meta=meta)


def burn_in_tensors(
    tensors: Iterable[tuple[str, Tensor]],
    plan: Plan,
    write: Callable[[str, Tensor], None],
    *,
    wait: Callable[[], None] | None = None,
    progress: Progress | None = None,
    meta: Mapping[str, Any] | None = None,
) -> Report:
    """Transform and write tensors one at a time (tensor mode), reporting on each.

    Each tensor is reported on in a second thread while the next is transformed, unless
    its input and output together take more than :data:`REPORT_BEHIND_BYTES`.

    Args:
        tensors: ``(name, tensor)`` pairs, read lazily.
        plan: From :func:`plan_tensors` for the same names.
        write: Called with each output tensor, before its report is made; it must not
            keep a reference once done, and may return before it is done (then ``wait``
            waits for it).
        wait: Called before each transform, so that a ``write`` that works in the
            background can hold the caller back and bound the results in flight.
        progress: Called with each tensor's name as it is done.
        meta: Facts about the run for the report.

    Returns:
        The report.
    """
    by_name = {t.info.name: t for t in plan.tensors}
    entries: list[TensorReport] = []
    if sum(t.info.numel for t in plan.tensors if t.rule is not None) >= _PRELOAD_ELEMENTS:
        # Enough work that the compiled kernels pay: load them now, in the background
        # (unlike burn_in, which transforms each tensor once and never loads them).
        kernels.start_loading_compiled_kernels()

    def collect(done: TensorReport) -> None:
        entries.append(done)
        if progress is not None:
            progress(done.name)

    # A tensor's report (the larger part of the work, after reading) runs in a second
    # thread while the next tensor is read and transformed; one at a time, and only for
    # tensors small enough that holding one more pair stays within the memory bound.
    with torch.no_grad(), ThreadPoolExecutor(1, thread_name_prefix="rockq-report") as reporting:
        behind: Future[TensorReport] | None = None
        for name, raw in tensors:
            entry = by_name[name]
            bound = plan.transform_for(entry)
            if wait is not None:
                wait()
            value = bound(raw) if bound is not None else raw
            if value.dtype != raw.dtype:
                value = value.to(raw.dtype)
            # Written first: a background write overlaps the report.
            write(name, value)
            report = partial(
                tensor_report,
                name,
                value,
                family=entry.info.family,
                transform=repr(bound) if bound is not None else None,
                reference=raw if bound is not None else None,
            )
            if behind is not None:
                collect(behind.result())
                behind = None
            if raw.nbytes + value.nbytes <= REPORT_BEHIND_BYTES:
                behind = reporting.submit(report)
            else:
                collect(report())
            del raw, value, report
        if behind is not None:
            collect(behind.result())
    return Report.build(entries, limits=plan.recipe.limits, meta=meta)


def output_metadata(plan: Plan, *, version: str, input_sha256: str | None) -> dict[str, str]:
    """The ``__metadata__`` of a burned-in safetensors file.

    Keys: ``rockq.format`` (``"burned"``), ``rockq.version``, ``rockq.recipe`` (its text),
    ``rockq.recipe_source``, ``rockq.seed``, ``rockq.input_sha256``, ``rockq.tensors``,
    a JSON object mapping each transformed tensor to its family, transform and arguments,
    and ``rockq.families``, a JSON object mapping every tensor to its family (or ``null``),
    so a report read back from the file shows the families the network gave.
    """
    per_tensor = {
        t.info.name: {
            "family": t.info.family,
            "transform": t.rule.transform.name,
            "args": t.rule.args,
            "rule": t.rule.label,
        }
        for t in plan.tensors
        if t.rule is not None
    }
    return {
        "rockq.format": "burned",
        "rockq.version": version,
        "rockq.recipe": plan.recipe.text,
        "rockq.recipe_source": plan.recipe.source,
        "rockq.seed": str(plan.seed),
        "rockq.input_sha256": input_sha256 or "",
        # Network order and the recipe's argument order (both fixed by the inputs), not
        # sorted keys: `rockq report` rebuilds the transform text from this and must show
        # it as the burn-in report did.
        "rockq.tensors": json.dumps(per_tensor),
        "rockq.families": json.dumps({t.info.name: t.info.family for t in plan.tensors}),
    }


def _reference_tensors(path: Path, trust: Iterable[str]) -> Callable[[str], Tensor | None]:
    """A lookup of reference tensors by name, from any file rockq reads."""
    from transform_core.checkpoint import is_patched, load_patched, load_state_dict_file
    from transform_core.safetensors_io import is_safetensors, open_tensors

    if path.is_dir() or (is_safetensors(path) and not is_patched(path)):
        source = open_tensors(path)
        return lambda name: source.get(name) if name in source else None
    if is_patched(path):
        # Only the tensors are needed: no network is rebuilt, so no code runs.
        state = load_patched(path, trust=trust, rebuild=False).state_dict
    else:
        # A state dict, or a whole-module pickle through the safe loader.
        state = load_state_dict_file(path, trust=trust)
    return state.get


def checkpoint_report(
    path: str | Path,
    *,
    reference: str | Path | None = None,
    limits: Mapping[str, tuple[bool, int]] | None = None,
    trust: Iterable[str] = (),
) -> Report:
    """Report on the tensors of a checkpoint, one tensor at a time.

    * A quantised safetensors file written by rockq: families and transforms come from its
      metadata.
    * A patched checkpoint: it is burned in (in memory) and the burned-in values are
      reported, with its raw values as the reference unless ``reference`` is given.
    * Any other safetensors file, shard folder or state dict: families come from names.

    Args:
        path: The checkpoint.
        reference: Original tensors (any of the same kinds of file, or a whole-module
            pickle) to compute errors against, matched by name.
        limits: Family -> ``(signed, bits)`` to check; by default the limits of the recipe
            recorded in a rockq-written file (none for other files).
        trust: Packages a pickled or recorded network may use.

    Raises:
        CheckpointError: A file that cannot be read, or a reference tensor whose shape
            differs.
    """
    from transform_core.checkpoint import is_patched, load_patched, load_state_dict_file
    from transform_core.imports import named_in_file
    from transform_core.recipe import parse_recipe, parse_recipe_limits
    from transform_core.safetensors_io import is_safetensors, open_tensors, require_file

    path, trust = Path(path), tuple(trust)
    if not path.is_dir():
        require_file(path)
    lookup = _reference_tensors(Path(reference), trust) if reference is not None else None
    meta: dict[str, Any] = {"checkpoint": str(path)}
    names: Iterable[tuple[str, Tensor]]
    if is_patched(path):
        ckpt = load_patched(path, trust=trust)
        if ckpt.network is None:
            raise CheckpointError("holds no network to rebuild", path=str(path))
        with named_in_file(str(path), trust):
            recipe = parse_recipe(ckpt.recipe, f"{path} (recipe)")
        plan = plan_network(ckpt.network, recipe, seed=ckpt.seed)
        net, built = burn_in(patch_network(ckpt.network, plan, inplace=True), plan, meta=meta)
        limits = plan.recipe.limits if limits is None else limits
        if lookup is None:  # errors against the checkpoint's own raw values
            return Report.build(built.tensors, limits=limits, meta=meta)
        # Errors against the reference: the burned-in values, reported as any other file's.
        described = {t.name: (t.family, t.transform) for t in built.tensors}
        recorded_order = True
        names = net.state_dict().items()
    elif path.is_dir() or is_safetensors(path):
        source = open_tensors(path)
        described = _described_tensors(source.metadata, str(path))
        recorded_order = "rockq.families" in source.metadata
        if limits is None and source.metadata.get("rockq.recipe"):
            # Only the limits: the transforms the rules name are not imported to read them.
            recipe_text = source.metadata["rockq.recipe"]
            limits = parse_recipe_limits(recipe_text, f"{path} (recipe)")
        names = source.iter_tensors()
    else:
        described, recorded_order = {}, False
        names = load_state_dict_file(path, trust=trust).items()
    entries = []
    compared = 0
    not_in_reference: set[str] = set()
    for name, tensor in names:
        family, transform = described.get(name, (family_for_name(name), None))
        ref = lookup(name) if lookup is not None else None
        compared += ref is not None
        if lookup is not None and ref is None:
            not_in_reference.add(name)
        if ref is not None and tuple(ref.shape) != tuple(tensor.shape):
            raise CheckpointError(
                f"has shape {tuple(ref.shape)} in the reference but {tuple(tensor.shape)} in "
                "the checkpoint; compare files of the same network",
                path=str(reference),
                key=name,
            )
        entries.append(
            tensor_report(name, tensor, family=family, transform=transform, reference=ref)
        )
    if lookup is not None and entries and not compared:
        # Without this the report would quietly show no error columns at all.
        raise CheckpointError(
            f"holds none of the checkpoint's {len(entries)} tensor names (such as "
            f"'{entries[0].name}'); give the file the checkpoint was made from",
            path=str(reference),
        )
    # A file lays tensors out by dtype; list them in the network's order when it is recorded.
    order = {name: i for i, name in enumerate(described)} if recorded_order else {}
    entries.sort(key=lambda entry: order.get(entry.name, len(order)))
    if not_in_reference:
        # Their error columns stay empty: say why, rather than leave it to be noticed.
        meta["not_in_reference"] = [e.name for e in entries if e.name in not_in_reference]
    return Report.build(entries, limits=limits, meta=meta)


def _described_tensors(
    metadata: Mapping[str, str], path: str
) -> dict[str, tuple[str | None, str | None]]:
    """Family and transform text per tensor, from a burned-in file's metadata."""
    result: dict[str, tuple[str | None, str | None]] = {}
    key = "rockq.families"
    try:
        families = json.loads(metadata.get(key) or "{}")
        for name, family in families.items():
            if family is not None and not isinstance(family, str):
                raise TypeError(name)
            result[name] = (family, None)
        key = "rockq.tensors"
        for name, entry in json.loads(metadata.get(key) or "{}").items():
            text = _transform_text(entry["transform"], entry.get("args", {}))
            result[name] = (entry.get("family"), text)
    except (ValueError, KeyError, TypeError, AttributeError):
        raise CheckpointError(
            f"has malformed '{key}' metadata; write the file again with rockq",
            path=path,
            key=key,
        ) from None
    return result


def _transform_text(name: str, args: Mapping[str, Any]) -> str:
    shown = ", ".join(f"{k}={v!r}" for k, v in args.items())
    return f"{name}({shown})"
