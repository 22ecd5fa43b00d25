"""The ``finetune:`` section of a recipe: its schema, its parsing and the schedule it names.

:func:`parse_finetune_section` checks every key of the section (each key is shown in
:mod:`transform_core.finetune`) and builds a :class:`FinetuneConfig`; unknown keys, wrong
types and out-of-range values are refused with the line and key path. Every number must be
finite, every count at most ``2**63 - 1``, ``seed`` what ``torch.manual_seed`` takes
(``-2**63`` to ``2**64 - 1``) and a step schedule's ``gamma`` (a decay factor) from 0 to 1,
so that no learning rate can overflow; a number given as a string (``'1e-3'``) is refused, as
transform arguments are, saying to write it without quotes. Optimiser arguments are checked
against the torch optimiser's own signature, then by building it on a dummy parameter and
taking one step.
:func:`lr_factor` turns the schedule into the learning rate of each step.

Example:
    >>> from transform_core.recipe import parse_recipe
    >>> recipe = parse_recipe('''
    ... version: 1
    ... params: [{family: weights, transform: deterministic_rounding, args: {num_levels: 3}}]
    ... finetune: {epochs: 2, optimizer: {name: adamw, lr: 0.01, weight_decay: 0.1}}
    ... ''')
    >>> config = recipe.finetune
    >>> config.epochs, config.optimizer, config.lr, config.optimizer_args
    (2, 'adamw', 0.01, {'weight_decay': 0.1})
"""

from __future__ import annotations

import inspect
import math
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from transform_core.errors import did_you_mean
from transform_core.registry import describe_value

if TYPE_CHECKING:
    from yaml.nodes import Node

__all__ = [
    "LOSSES",
    "METRICS",
    "OPTIMIZERS",
    "REDUCTIONS",
    "SCHEDULES",
    "FinetuneConfig",
    "lr_factor",
    "parse_finetune_section",
]

OPTIMIZERS: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "adam": torch.optim.Adam,
    "adamw": torch.optim.AdamW,
    "sgd": torch.optim.SGD,
}
SCHEDULES = ("constant", "cosine", "linear", "step")
LOSSES = ("cross_entropy", "mse")
REDUCTIONS = ("sum", "mean", "last")
METRICS = ("accuracy", "loss")

_KEYS = (
    "epochs",
    "steps",
    "batch_size",
    "optimizer",
    "schedule",
    "loss",
    "reduce_time",
    "metric",
    "eval_every",
    "checkpoint_every",
    "seed",
    "shuffle",
    "grad_clip",
)
_SCHEDULE_KEYS = ("name", "warmup_steps", "min_lr", "step_size", "gamma")
_FUNCTION_REF = "'package.module:function'"
# Counts and sizes are 64-bit inside torch; seeds are what torch.manual_seed takes.
_MAX_WHOLE = 2**63 - 1
_SEED_RANGE = (-(2**63), 2**64 - 1)
# Arguments of torch's optimisers that do not fit fine-tuning's plain, eager steps.
_REFUSED_ARGS = {
    "capturable": "it is for steps captured in a CUDA graph, which fine-tuning does not use, "
    "and it fails on the CPU",
    "differentiable": "it is for differentiating through the optimiser step, which cannot "
    "update the network's parameters in place",
}


@dataclass(frozen=True)
class FinetuneConfig:
    """The ``finetune:`` section of a recipe.

    Attributes:
        epochs: Passes over the training data; ``None`` when ``steps`` is given.
        steps: Optimiser steps in all; ``None`` when ``epochs`` is given.
        batch_size: Samples per step, over all processes together.
        optimizer: ``adam``, ``adamw`` or ``sgd``.
        optimizer_args: Keyword arguments of the torch optimiser, ``lr`` excluded.
        lr: The peak learning rate.
        schedule: ``constant``, ``cosine``, ``linear`` (both decay to ``min_lr``) or ``step``
            (multiply by ``gamma`` every ``step_size`` steps).
        warmup_steps: Steps of linear warm-up before the schedule.
        min_lr: The final learning rate of ``cosine`` and ``linear``.
        step_size: For ``step``: steps between decays.
        gamma: For ``step``: the decay factor, from 0 to 1.
        loss: ``cross_entropy``, ``mse`` or ``"package.module:function"``.
        reduce_time: How a ``(batch, time, channels)`` output becomes ``(batch, channels)``:
            ``sum``, ``mean``, ``last``, or ``None`` to leave it.
        metric: ``accuracy`` or ``loss``.
        eval_every: Steps between evaluations; ``None`` for each epoch.
        checkpoint_every: Steps between checkpoints; ``None`` for each epoch.
        seed: Seed of the data order; ``None`` for the recipe's seed.
        shuffle: Shuffle the training data each epoch.
        grad_clip: Maximum gradient norm, or ``None``.
    """

    epochs: int | None = 1
    steps: int | None = None
    batch_size: int = 32
    optimizer: str = "adam"
    optimizer_args: dict[str, Any] = field(default_factory=dict, hash=False)
    lr: float = 1e-3
    schedule: str = "constant"
    warmup_steps: int = 0
    min_lr: float = 0.0
    step_size: int = 1
    gamma: float = 0.1
    loss: str = "cross_entropy"
    reduce_time: str | None = None
    metric: str = "accuracy"
    eval_every: int | None = None
    checkpoint_every: int | None = None
    seed: int | None = None
    shuffle: bool = True
    grad_clip: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """The configuration as JSON-safe data."""
        return {name: getattr(self, name) for name in self.__dataclass_fields__}


def lr_factor(config: FinetuneConfig, step: int, total_steps: int) -> float:
    """The learning rate of optimiser step ``step`` (from 0), as a fraction of ``config.lr``.

    Example:
        >>> c = FinetuneConfig(schedule="linear", warmup_steps=2, lr=1.0)
        >>> [lr_factor(c, s, 6) for s in range(6)]
        [0.5, 1.0, 1.0, 0.75, 0.5, 0.25]
    """
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    done = step - config.warmup_steps
    if config.schedule == "step":
        return float(config.gamma ** (done // config.step_size))
    if config.schedule == "constant":
        return 1.0
    floor = config.min_lr / config.lr if config.lr > 0 else 0.0
    t = done / max(1, total_steps - config.warmup_steps)
    if config.schedule == "cosine":
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * t))
    return 1.0 - (1.0 - floor) * t


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_finite(value: Any) -> bool:
    """Whether ``value`` is a number that a float holds finitely.

    Example:
        >>> _is_finite(1e-3), _is_finite(10**400), _is_finite(float("nan"))
        (True, False, False)
    """
    if _is_int(value):
        return bool(abs(value) <= sys.float_info.max)
    return _is_number(value) and math.isfinite(value)


def _whole_problem(value: Any, low: int, what: str = "a whole number") -> str:
    """The complaint about a count, or ``''`` when ``value`` is fine.

    Example:
        >>> _whole_problem(0, 1), _whole_problem(3, 1)
        ('must be a whole number >= 1, got 0', '')
        >>> _whole_problem(2**63, 1)
        'must be a whole number <= 9223372036854775807 (2**63 - 1), got 9223372036854775808'
    """
    if not _is_int(value) or value < low:
        return f"must be {what} >= {low}, got {describe_value(value)}"
    if value > _MAX_WHOLE:
        return f"must be {what} <= {_MAX_WHOLE} (2**63 - 1), got {value}"
    return ""


def _float_problem(value: Any, minimum: float, *, inclusive: bool, nullable: bool = False) -> str:
    """The complaint about a float setting, or ``''`` when ``value`` is fine."""
    if (value is None and nullable) or (
        _is_finite(value) and (value >= minimum if inclusive else value > minimum)
    ):
        return ""
    bound = ">=" if inclusive else ">"
    or_null = " or null" if nullable else ""
    return f"must be a finite number {bound} {minimum:g}{or_null}, got {describe_value(value)}"


def _optimizer_arg_names(name: str) -> dict[str, Any]:
    params = inspect.signature(OPTIMIZERS[name]).parameters
    return {k: p.default for k, p in params.items() if k != "params" and k not in _REFUSED_ARGS}


def parse_finetune_section(parser: Any, node: Node) -> FinetuneConfig:
    """Parse and check a recipe's ``finetune:`` mapping.

    Args:
        parser: The recipe parser (it builds values and errors with line numbers).
        node: The section's YAML node.

    Raises:
        RecipeError: An unknown key, a wrong type or value (a non-finite number included),
            naming the line and key path.
    """
    entries = parser.items(node, "finetune", "'finetune'")
    parser.check_keys(entries, _KEYS, "finetune")

    def fail(message: str, name: str, at: Node | None = None) -> Exception:
        where = at if at is not None else entries[name][1]
        return parser.error(message, where, f"finetune.{name}")  # type: ignore[no-any-return]

    def get(name: str) -> Any:
        return parser.value(entries[name][1], f"finetune.{name}")

    if "epochs" in entries and "steps" in entries:
        raise fail("give 'epochs' or 'steps', not both", "steps", entries["steps"][0])
    values = _parse_plain_keys(entries, get, fail)
    if "optimizer" in entries:
        values.update(_parse_optimizer(parser, entries["optimizer"][1], fail))
    if "schedule" in entries:
        lr = values.get("lr", FinetuneConfig.lr)
        values.update(_parse_schedule(parser, entries["schedule"][1], fail, lr))
    return FinetuneConfig(**values)


def _parse_plain_keys(
    entries: dict[str, Any], get: Callable[[str], Any], fail: Callable[..., Exception]
) -> dict[str, Any]:
    """The section's keys other than ``optimizer`` and ``schedule``."""
    values: dict[str, Any] = {}
    for name in ("epochs", "steps", "batch_size"):
        if name in entries:
            value = get(name)
            problem = _whole_problem(value, 1)
            if problem:
                raise fail(problem, name)
            values[name] = value
    if "steps" in values:
        values["epochs"] = None
    for name in ("eval_every", "checkpoint_every"):
        if name in entries:
            value = get(name)
            if value == "epoch":
                values[name] = None
                continue
            problem = _whole_problem(value, 1, "'epoch' or a number of steps")
            if problem:
                raise fail(problem, name)
            values[name] = value
    if "seed" in entries:
        value = get("seed")
        if not _is_int(value):
            raise fail(f"must be an integer, got {describe_value(value)}", "seed")
        low, high = _SEED_RANGE
        if not low <= value <= high:
            raise fail(
                f"must be an integer from {low} to {high} (what torch.manual_seed takes), "
                f"got {value}",
                "seed",
            )
        values["seed"] = value
    if "shuffle" in entries:
        value = get("shuffle")
        if not isinstance(value, bool):
            raise fail(f"must be true or false, got {describe_value(value)}", "shuffle")
        values["shuffle"] = value
    if "grad_clip" in entries:
        value = get("grad_clip")
        problem = _float_problem(value, 0, inclusive=False, nullable=True)
        if problem:
            raise fail(problem, "grad_clip")
        values["grad_clip"] = None if value is None else float(value)
    values.update(_parse_choices(entries, get, fail))
    return values


def _parse_choices(
    entries: dict[str, Any], get: Callable[[str], Any], fail: Callable[..., Exception]
) -> dict[str, Any]:
    """``reduce_time``, ``metric`` and ``loss``: one of a few names."""
    values: dict[str, Any] = {}
    for name, allowed in (("reduce_time", REDUCTIONS), ("metric", METRICS)):
        if name in entries:
            value = get(name)
            if value is None and name == "reduce_time":
                values[name] = None
                continue
            if value not in allowed:
                raise fail(
                    f"must be one of {', '.join(allowed)}, got {value!r}"
                    f"{did_you_mean(str(value), allowed)}",
                    name,
                )
            values[name] = value
    if "loss" in entries:
        value = get("loss")
        if not isinstance(value, str) or (value not in LOSSES and ":" not in value):
            raise fail(
                f"must be {' or '.join(LOSSES)} or a function {_FUNCTION_REF}, got {value!r}"
                f"{did_you_mean(str(value), LOSSES)}",
                "loss",
            )
        values["loss"] = value
    return values


def _named_section(
    parser: Any, node: Node, key: str, choices: Iterable[str], fail: Callable[..., Exception]
) -> tuple[str, dict[str, tuple[Node, Node]]]:
    """A ``name`` or ``{name: NAME, arg: value, ...}`` value: the name and the other entries."""
    choices = tuple(choices)
    from yaml.nodes import MappingNode

    if isinstance(node, MappingNode):
        entries = dict(parser.items(node, f"finetune.{key}", f"'{key}'"))
        if "name" not in entries:
            raise fail(f"needs 'name: ' one of {', '.join(choices)}", key, node)
        name_node = entries.pop("name")[1]
    else:
        entries, name_node = {}, node
    name = parser.value(name_node, f"finetune.{key}")
    if name not in choices:
        raise fail(
            f"must be one of {', '.join(choices)}, got {name!r}{did_you_mean(str(name), choices)}",
            key,
            name_node,
        )
    return name, entries


def _parse_optimizer(parser: Any, node: Node, fail: Callable[..., Exception]) -> dict[str, Any]:
    name, entries = _named_section(parser, node, "optimizer", OPTIMIZERS, fail)
    allowed = _optimizer_arg_names(name)
    args: dict[str, Any] = {}
    for arg, (key_node, value_node) in entries.items():
        key = f"optimizer.{arg}"
        if arg in _REFUSED_ARGS:
            raise fail(f"is not supported: {_REFUSED_ARGS[arg]}; remove it", key, key_node)
        if arg not in allowed:
            raise fail(
                f"'{name}' has no argument '{arg}'{did_you_mean(arg, allowed)}; expected "
                f"name, {', '.join(allowed)}",
                key,
                key_node,
            )
        value = parser.value(value_node, f"finetune.{key}")
        problem = _optimizer_arg_problem(value, allowed[arg])
        if problem:
            raise fail(problem, key, value_node)
        # Torch's numeric optimiser arguments are floats (a huge int overflows inside torch).
        if isinstance(value, list):
            args[arg] = tuple(float(v) for v in value)
        else:
            args[arg] = float(value) if _is_number(value) else value
    problem = _probe_optimizer(name, args)
    if problem:
        # Blame the one key that fails on its own (a range torch refuses); arguments that
        # only clash together (fused with foreach) are blamed on the whole optimizer.
        for arg, value in args.items():
            alone = _probe_optimizer(name, {arg: value})
            if alone:
                raise fail(alone, f"optimizer.{arg}", entries[arg][1])
        raise fail(problem, "optimizer", node)
    lr = float(args.pop("lr", 1e-3))
    return {"optimizer": name, "optimizer_args": args, "lr": lr}


def _optimizer_arg_problem(value: Any, default: Any) -> str:
    """The complaint about an optimiser argument's type (judged by its default), or ``''``."""
    if isinstance(default, bool):
        return (
            "" if isinstance(value, bool) else f"must be true or false, got {describe_value(value)}"
        )
    if default is None:
        # foreach and fused: null lets torch pick.
        ok = value is None or isinstance(value, bool)
        return "" if ok else f"must be true, false or null, got {describe_value(value)}"
    if isinstance(default, tuple):
        if isinstance(value, list) and len(value) == len(default) and all(map(_is_finite, value)):
            return ""
        return f"must be a list of {len(default)} finite numbers, got {describe_value(value)}"
    return "" if _is_finite(value) else f"must be a finite number, got {describe_value(value)}"


def _probe_optimizer(name: str, args: dict[str, Any]) -> str:
    """Build the optimiser on a dummy parameter and step it once; torch's complaint or ``''``.

    Building checks ranges (``lr >= 0``, ``betas`` in ``[0, 1)``, ``fused`` with
    ``foreach``); the step catches what only fails there.
    """
    param = nn.Parameter(torch.zeros(1))
    try:
        optimizer = OPTIMIZERS[name]([param], **args)
        param.grad = torch.ones(1)
        optimizer.step()
    except (ValueError, TypeError, RuntimeError, IndexError) as err:
        return f"{name}: {err}"
    return ""


def _parse_schedule(
    parser: Any, node: Node, fail: Callable[..., Exception], lr: float
) -> dict[str, Any]:
    name, entries = _named_section(parser, node, "schedule", SCHEDULES, fail)
    values: dict[str, Any] = {"schedule": name}
    for arg, (key_node, value_node) in entries.items():
        key = f"schedule.{arg}"
        if arg not in _SCHEDULE_KEYS:
            raise fail(
                f"unknown key '{arg}'{did_you_mean(arg, _SCHEDULE_KEYS)}; expected one of "
                f"{', '.join(_SCHEDULE_KEYS)}",
                key,
                key_node,
            )
        value = parser.value(value_node, f"finetune.{key}")
        if arg in ("warmup_steps", "step_size"):
            problem = _whole_problem(value, 1 if arg == "step_size" else 0)
            if problem:
                raise fail(problem, key, value_node)
        else:
            problem = _float_problem(value, 0, inclusive=True)
            if arg == "min_lr" and not problem and value > lr:
                # The schedule would raise the rate from lr to min_lr.
                problem = f"must be at most the optimizer's lr ({lr:g}), got {value:g}"
            if arg == "gamma" and (problem or value > 1):
                # A decay factor: one above 1 would grow the rate past float's range.
                problem = (
                    "must be a finite number from 0 to 1 (the factor each step_size steps "
                    f"multiplies the rate by), got {describe_value(value)}"
                )
            if problem:
                raise fail(problem, key, value_node)
            value = float(value)
        values[arg] = value
    return values
