"""Quantisation-aware fine-tuning of a patched network, resumable bit for bit.

The recipe's ``finetune:`` section (parsed into :class:`FinetuneConfig`) says how to train::

    finetune:
      epochs: 10                  # or steps: 500 (exactly one of the two)
      batch_size: 64              # the global batch, over all processes
      optimizer: {name: adamw, lr: 0.003, weight_decay: 0.0}   # adam | adamw | sgd
      schedule: {name: cosine, warmup_steps: 20, min_lr: 0.0}  # constant | cosine | linear | step
      loss: cross_entropy         # cross_entropy | mse | "package.module:function"
      reduce_time: mean           # sum | mean | last: for (batch, time, channels) outputs
      metric: accuracy            # accuracy | loss
      eval_every: epoch           # or a number of steps
      checkpoint_every: epoch     # or a number of steps
      seed: 0                     # data order (default: the recipe's seed, else 0)
      shuffle: true
      grad_clip: null             # clip the gradient norm to this value

The patched network trains its raw parameters; the forward pass sees the transformed values
and the transforms pass gradients straight through. Every evaluation burns in a copy of the
network, so the metric is the one the deployed, quantised network will have.

Exactness: the data order is drawn from ``seed`` and the epoch alone, the learning rate is a
function of the step, and each checkpoint stores the optimiser state, the position (epoch,
batch, step), the random transforms' generator states and torch's global random state. A run
stopped and resumed from its last checkpoint therefore ends with the same bits as one that
was never stopped.

Under ``torchrun`` (``WORLD_SIZE > 1``) training uses ``DistributedDataParallel``: each
process takes every ``WORLD_SIZE``-th sample of each global batch and the loss is weighted so
that the gradient equals the single-process one; only rank 0 writes files.

Example:
    >>> from transform_core.recipe import parse_recipe
    >>> recipe = parse_recipe('''
    ... version: 1
    ... params: [{family: weights, transform: deterministic_rounding, args: {num_levels: 3}}]
    ... finetune: {steps: 100, optimizer: {name: sgd, lr: 0.1}, schedule: cosine}
    ... ''')
    >>> config = recipe.finetune
    >>> config.steps, config.optimizer, config.lr, lr_factor(config, 50, 100)
    (100, 'sgd', 0.1, 0.5)
"""

from __future__ import annotations

import contextlib
import inspect
import json
import math
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from transform_core.data import LoaderData, TensorData, split_batch
from transform_core.errors import ConfigError, did_you_mean
from transform_core.imports import import_reference
from transform_core.patching import ActWrapper, TWrapper, apply_T, remove_T_net
from transform_core.registry import BoundTransform

if TYPE_CHECKING:
    from yaml.nodes import Node

    from transform_core.checkpoint import SourceInfo
    from transform_core.pipeline import Plan

__all__ = [
    "LOSSES",
    "METRICS",
    "OPTIMIZERS",
    "REDUCTIONS",
    "SCHEDULES",
    "CheckpointTarget",
    "FinetuneConfig",
    "FinetuneResult",
    "evaluate",
    "finetune",
    "log_path_for",
    "lr_factor",
    "parse_finetune_section",
    "resolve_device",
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
_STATE_KEY = "finetune"

Event = dict[str, Any]
"""A progress record: ``kind`` (``train``, ``eval``, ``checkpoint``), ``epoch``, ``step``,
``total_steps`` and the figures of that kind (``loss``, ``lr``, ``metric``)."""


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
        gamma: For ``step``: the decay factor.
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


# --- the recipe section --------------------------------------------------------------------


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _optimizer_arg_names(name: str) -> dict[str, Any]:
    params = inspect.signature(OPTIMIZERS[name]).parameters
    return {k: p.default for k, p in params.items() if k != "params"}


def parse_finetune_section(parser: Any, node: Node) -> FinetuneConfig:
    """Parse and check a recipe's ``finetune:`` mapping.

    Args:
        parser: The recipe parser (it builds values and errors with line numbers).
        node: The section's YAML node.

    Raises:
        RecipeError: An unknown key, a wrong type or value, naming the line and key path.
    """
    entries = parser.items(node, "finetune", "'finetune'")
    parser.check_keys(entries, _KEYS, "finetune")
    values: dict[str, Any] = {}

    def fail(message: str, name: str, at: Node | None = None) -> Exception:
        where = at if at is not None else entries[name][1]
        return parser.error(message, where, f"finetune.{name}")  # type: ignore[no-any-return]

    def get(name: str) -> Any:
        return parser.value(entries[name][1], f"finetune.{name}")

    if "epochs" in entries and "steps" in entries:
        raise fail("give 'epochs' or 'steps', not both", "steps", entries["steps"][0])
    for name in ("epochs", "steps", "batch_size"):
        if name in entries:
            value = get(name)
            if not _is_int(value) or value < 1:
                raise fail(f"must be a whole number >= 1, got {value!r}", name)
            values[name] = value
    if "steps" in values:
        values["epochs"] = None
    for name in ("eval_every", "checkpoint_every"):
        if name in entries:
            value = get(name)
            if value == "epoch":
                values[name] = None
            elif _is_int(value) and value >= 1:
                values[name] = value
            else:
                raise fail(f"must be 'epoch' or a number of steps >= 1, got {value!r}", name)
    if "seed" in entries:
        value = get("seed")
        if not _is_int(value):
            raise fail(f"must be an integer, got {value!r}", "seed")
        values["seed"] = value
    if "shuffle" in entries:
        value = get("shuffle")
        if not isinstance(value, bool):
            raise fail(f"must be true or false, got {value!r}", "shuffle")
        values["shuffle"] = value
    if "grad_clip" in entries:
        value = get("grad_clip")
        if value is not None and (not _is_number(value) or value <= 0):
            raise fail(f"must be a number > 0 or null, got {value!r}", "grad_clip")
        values["grad_clip"] = None if value is None else float(value)
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
    if "optimizer" in entries:
        values.update(_parse_optimizer(parser, entries["optimizer"][1], fail))
    if "schedule" in entries:
        values.update(_parse_schedule(parser, entries["schedule"][1], fail))
    return FinetuneConfig(**values)


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
        if arg not in allowed:
            raise fail(
                f"'{name}' has no argument '{arg}'{did_you_mean(arg, allowed)}; expected "
                f"name, {', '.join(allowed)}",
                key,
                key_node,
            )
        value = parser.value(value_node, f"finetune.{key}")
        default = allowed[arg]
        if isinstance(default, bool):
            ok = isinstance(value, bool) or (default is False and value is None)
        elif isinstance(default, tuple):
            ok = isinstance(value, list) and all(_is_number(v) for v in value)
        else:
            ok = _is_number(value)
        if not ok:
            raise fail(f"has a value of the wrong type: {value!r}", key, value_node)
        args[arg] = tuple(value) if isinstance(value, list) else value
    lr = float(args.pop("lr", 1e-3))
    try:
        # The optimiser checks its own ranges (lr >= 0, betas in [0, 1), ...).
        OPTIMIZERS[name]([nn.Parameter(torch.zeros(1))], lr=lr, **args)
    except (ValueError, TypeError, RuntimeError) as err:
        raise fail(f"{name}: {err}", "optimizer", node) from None
    return {"optimizer": name, "optimizer_args": args, "lr": lr}


def _parse_schedule(parser: Any, node: Node, fail: Callable[..., Exception]) -> dict[str, Any]:
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
        whole = arg in ("warmup_steps", "step_size")
        low = 1 if arg == "step_size" else 0
        if (whole and (not _is_int(value) or value < low)) or (
            not whole and (not _is_number(value) or value < 0)
        ):
            kind = f"a whole number >= {low}" if whole else "a number >= 0"
            raise fail(f"must be {kind}, got {value!r}", key, value_node)
        values[arg] = value
    return values


# --- devices, processes, data ----------------------------------------------------------------


def resolve_device(name: str, *, local_rank: int = 0) -> torch.device:
    """Turn ``auto``, ``cpu`` or ``cuda`` into a device (``cuda:LOCAL_RANK`` under torchrun).

    Raises:
        ConfigError: An unknown name, or ``cuda`` where no CUDA device is available.

    Example:
        >>> resolve_device("cpu")
        device(type='cpu')
    """
    choices = ("auto", "cpu", "cuda")
    if name not in choices:
        raise ConfigError(
            f"must be one of {', '.join(choices)}, got {name!r}{did_you_mean(name, choices)}",
            key="--device",
        )
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            "asks for CUDA but no CUDA device is available here; use --device cpu or auto",
            key="--device",
        )
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    return torch.device("cuda", local_rank % torch.cuda.device_count())


@dataclass(frozen=True)
class _World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0


def _world_from_env() -> _World:
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return _World()
    return _World(int(os.environ["RANK"]), size, int(os.environ.get("LOCAL_RANK", "0")))


def _loss_function(name: str) -> Callable[[Tensor, Tensor], Tensor]:
    if name == "cross_entropy":
        return F.cross_entropy
    if name == "mse":
        return lambda out, y: F.mse_loss(out, y.to(out.dtype))
    return import_reference(
        name,
        noun="function",
        role="loss",
        fix="a loss must be a function f(outputs, targets) -> scalar tensor",
        key="finetune.loss",
    )


def _prepare(output: Any, targets: Tensor, reduce_time: str | None) -> Tensor:
    """The network's output as the loss sees it: first of a tuple, time reduced."""
    if isinstance(output, (tuple, list)):
        output = output[0]
    if not isinstance(output, Tensor):
        raise ConfigError(
            f"the network returned a {type(output).__name__}; fine-tuning needs a tensor "
            "(or a tuple whose first item is one)",
            key="finetune",
        )
    if output.dim() == 3 and targets.dim() < 3:
        if reduce_time == "sum":
            return output.sum(dim=1)
        if reduce_time == "mean":
            return output.mean(dim=1)
        if reduce_time == "last":
            return output[:, -1]
        raise ConfigError(
            f"the network returns a (batch, time, channels) output {tuple(output.shape)} and "
            f"the targets are {tuple(targets.shape)}; set 'reduce_time: sum', 'mean' or 'last'",
            key="finetune.reduce_time",
        )
    return output


def _loss(
    net: nn.Module, x: Tensor, y: Tensor, config: FinetuneConfig, loss_fn: Callable[..., Tensor]
) -> tuple[Tensor, Tensor]:
    out = _prepare(net(x), y, config.reduce_time)
    try:
        loss = loss_fn(out, y)
    except (RuntimeError, ValueError, IndexError) as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ConfigError(
            f"loss '{config.loss}' cannot compare outputs {tuple(out.shape)} with targets "
            f"{tuple(y.shape)} ({str(y.dtype).removeprefix('torch.')}): {first}; check the "
            "data's targets, 'loss' and 'reduce_time'",
            key="targets",
        ) from None
    if not isinstance(loss, Tensor) or loss.numel() != 1:
        raise ConfigError(f"loss '{config.loss}' must return a scalar tensor", key="finetune.loss")
    return loss.reshape(()), out


def _accuracy_hits(out: Tensor, y: Tensor) -> int | None:
    if out.dim() != 2:
        return None
    if not y.is_floating_point() and y.dim() == 1:
        labels = y
    elif y.shape == out.shape:
        labels = y.argmax(dim=-1)
    else:
        return None
    return int((out.argmax(dim=-1) == labels).sum())


def _eval_batches(
    data: TensorData | LoaderData, batch_size: int
) -> Iterable[tuple[Tensor, Tensor]] | None:
    if isinstance(data, LoaderData):
        if data.val is None:
            return None
        return (split_batch(b, data.source) for b in data.val)
    val = data.validation()
    if val is None:
        return None
    x, y = val
    return list(zip(torch.split(x, batch_size * 4), torch.split(y, batch_size * 4), strict=True))


def _train_eval_batches(
    data: TensorData | LoaderData, batch_size: int
) -> Iterable[tuple[Tensor, Tensor]]:
    if isinstance(data, LoaderData):
        return (split_batch(b, data.source) for b in data.train)
    return list(
        zip(
            torch.split(data.inputs, batch_size * 4),
            torch.split(data.targets, batch_size * 4),
            strict=True,
        )
    )


@torch.no_grad()
def evaluate(
    net: nn.Module,
    batches: Iterable[tuple[Tensor, Tensor]],
    config: FinetuneConfig,
    device: torch.device,
) -> dict[str, float | None]:
    """Mean loss and accuracy of ``net`` (put in eval mode) over ``batches``.

    Returns:
        ``{"loss": ..., "accuracy": ...}``; accuracy is ``None`` where outputs are not
        ``(batch, classes)``.

    Example:
        >>> net = nn.Linear(2, 2)
        >>> with torch.no_grad():
        ...     _ = net.weight.copy_(torch.eye(2)); _ = net.bias.zero_()
        >>> x, y = torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([0, 0])
        >>> evaluate(net, [(x, y)], FinetuneConfig(), torch.device("cpu"))["accuracy"]
        0.5
    """
    net.eval()
    loss_fn = _loss_function(config.loss)
    total = hits = 0
    loss_sum = 0.0
    accurate = True
    for x, y in batches:
        x, y = x.to(device), y.to(device)
        loss, out = _loss(net, x, y, config, loss_fn)
        n = int(x.shape[0])
        total += n
        loss_sum += float(loss) * n
        got = _accuracy_hits(out, y)
        if got is None:
            accurate = False
        else:
            hits += got
    if total == 0:
        raise ConfigError("the evaluation data holds no samples", key="--data")
    return {"loss": loss_sum / total, "accuracy": hits / total if accurate else None}


def _burned_copy(T_net: nn.Module) -> nn.Module:
    # A copy carries copies of the generators, so the training stream is not disturbed.
    return remove_T_net(apply_T(T_net, inplace=False), inplace=True)


# --- checkpoints ------------------------------------------------------------------------------


@dataclass(frozen=True)
class CheckpointTarget:
    """Where and how to write the patched checkpoints of a run.

    Attributes:
        path: The patched checkpoint (rewritten at each checkpoint and at the end).
        source: Where the network came from.
        recipe: The recipe text.
        network_bytes: The whole-module pickle, for pickle sources.
        inputs: Files that must never be overwritten.
        force: Replace an existing file at the start of a fresh run.
    """

    path: Path
    source: SourceInfo
    recipe: str
    network_bytes: bytes | None = None
    inputs: tuple[Path, ...] = ()
    force: bool = False


def log_path_for(path: Path) -> Path:
    """The JSON-lines log beside a checkpoint: ``NAME.finetune.jsonl``.

    Example:
        >>> log_path_for(Path("out/net.patched.safetensors")).name
        'net.patched.finetune.jsonl'
    """
    return path.with_name(path.name.removesuffix(".safetensors") + ".finetune.jsonl")


def _raw_state_dict(T_net: nn.Module) -> dict[str, Tensor]:
    """The state dict under the un-patched network's names (wrappers' ``_mod`` removed)."""
    return {
        ".".join(p for p in key.split(".") if p != "_mod"): value.detach()
        for key, value in T_net.state_dict().items()
    }


def _bound_transforms(T_net: nn.Module) -> dict[str, BoundTransform]:
    found: dict[str, BoundTransform] = {}
    seen: set[int] = set()
    for name, module in T_net.named_modules():
        fns: list[tuple[str, Any]] = []
        if isinstance(module, TWrapper):
            fns = [(f"{name}.{attr}" if name else attr, fn) for attr, fn in module.T_config.items()]
        elif isinstance(module, ActWrapper):
            fns = [(f"{name}:output", module.trans_Fn)]
        for key, fn in fns:
            if isinstance(fn, BoundTransform) and id(fn) not in seen:
                seen.add(id(fn))
                found[key] = fn
    return found


@dataclass
class _Position:
    step: int = 0
    epoch: int = 0
    batch: int = 0


def _save(
    target: CheckpointTarget,
    T_net: nn.Module,
    plan: Plan,
    optimizer: torch.optim.Optimizer,
    pos: _Position,
    info: dict[str, Any],
    epoch_rng: Tensor,
    device: torch.device,
) -> None:
    from transform_core.checkpoint import save_patched

    extra: dict[str, Tensor] = {}
    opt_state = optimizer.state_dict()
    scalars: dict[str, dict[str, Any]] = {}
    for index, values in opt_state["state"].items():
        for key, value in values.items():
            if isinstance(value, Tensor):
                extra[f"optim/{index}/{key}"] = value.detach().cpu()
            else:
                scalars.setdefault(str(index), {})[key] = value
    for key, fn in _bound_transforms(T_net).items():
        for dev, generator_state in fn.generator_states().items():
            extra[f"gen/{key}/{dev}"] = generator_state
    extra["rng/cpu"] = torch.get_rng_state()
    extra["rng/epoch_cpu"] = epoch_rng
    if device.type == "cuda":
        extra["rng/cuda"] = torch.cuda.get_rng_state(device)
    state = {
        _STATE_KEY: {
            **info,
            "step": pos.step,
            "epoch": pos.epoch,
            "batch": pos.batch,
            "optimizer": {"param_groups": opt_state["param_groups"], "scalars": scalars},
        }
    }
    save_patched(
        target.path,
        _raw_state_dict(T_net),
        source=target.source,
        recipe=target.recipe,
        seed=plan.seed,
        network_bytes=target.network_bytes,
        state=state,
        extra_tensors=extra,
        force=True,
        inputs=target.inputs,
    )


def _restore(
    resume: Any,
    T_net: nn.Module,
    optimizer: torch.optim.Optimizer,
    device: torch.device,
) -> tuple[_Position, Tensor]:
    """Load a checkpoint's training state into the run; returns position and epoch RNG."""
    saved = resume.state[_STATE_KEY]
    extra: dict[str, Tensor] = resume.extra_tensors
    groups = saved["optimizer"]["param_groups"]
    opt_state: dict[int, dict[str, Any]] = {}
    for key, tensor in extra.items():
        if key.startswith("optim/"):
            _, index, name = key.split("/", 2)
            opt_state.setdefault(int(index), {})[name] = tensor
    for index, values in saved["optimizer"]["scalars"].items():
        opt_state.setdefault(int(index), {}).update(values)
    optimizer.load_state_dict({"state": opt_state, "param_groups": groups})
    for key, fn in _bound_transforms(T_net).items():
        prefix = f"gen/{key}/"
        states = {k[len(prefix) :]: t for k, t in extra.items() if k.startswith(prefix)}
        fn.load_generator_states(states)
    torch.set_rng_state(extra["rng/cpu"])
    if device.type == "cuda" and "rng/cuda" in extra:
        torch.cuda.set_rng_state(extra["rng/cuda"], device)
    return _Position(saved["step"], saved["epoch"], saved["batch"]), extra["rng/epoch_cpu"]


# --- the loop ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class FinetuneResult:
    """What a fine-tuning run did.

    Attributes:
        metric: The metric's name (``accuracy`` or ``loss``).
        metrics: ``float``, ``post_training`` and ``finetuned`` values of the metric: the
            float network, the burned-in network before fine-tuning, and after it.
        evaluated_on: ``validation`` or ``training`` data.
        steps: Optimiser steps done in all.
        epochs: Epochs begun.
        log: The JSON-lines log, or ``None`` when nothing was written.
    """

    metric: str
    metrics: dict[str, float | None]
    evaluated_on: str
    steps: int
    epochs: int
    log: Path | None


def _steps_per_epoch(data: TensorData | LoaderData, batch_size: int) -> int | None:
    if isinstance(data, TensorData):
        return math.ceil(data.num_samples / batch_size)
    try:
        return len(data.train)  # type: ignore[arg-type]
    except TypeError:
        return None


def _total_steps(config: FinetuneConfig, per_epoch: int | None) -> int:
    if config.steps is not None:
        return config.steps
    if per_epoch is None:
        raise ConfigError(
            "the training loader has no len(), so 'epochs' cannot be turned into steps; "
            "give 'steps' in the finetune section instead",
            key="finetune.epochs",
        )
    return (config.epochs or 1) * per_epoch


class _Log:
    """The JSON-lines log (rank 0 only), trimmed to the resumed step on resume."""

    def __init__(self, path: Path | None, resume_step: int | None) -> None:
        self.path = path
        if path is None:
            return
        kept: list[str] = []
        if resume_step is not None and path.is_file():
            for line in path.read_text().splitlines():
                with contextlib.suppress(ValueError):
                    if json.loads(line).get("step", 0) <= resume_step:
                        kept.append(line)
        path.write_text("".join(line + "\n" for line in kept))

    def write(self, event: Event) -> None:
        if self.path is not None:
            with self.path.open("a") as handle:
                handle.write(json.dumps(event) + "\n")


def finetune(
    T_net: nn.Module,
    plan: Plan,
    config: FinetuneConfig,
    data: TensorData | LoaderData,
    *,
    float_net: nn.Module | None = None,
    target: CheckpointTarget | None = None,
    resume: Any = None,
    device: torch.device | str = "cpu",
    on_event: Callable[[Event], None] | None = None,
) -> FinetuneResult:
    """Fine-tune a patched network, checkpointing as the config says.

    Args:
        T_net: The patched network (from :func:`~transform_core.pipeline.patch_network`);
            trained in place and moved to ``device``.
        plan: The plan it was patched with.
        config: The ``finetune:`` section.
        data: From :func:`~transform_core.data.load_data`.
        float_net: The un-patched network, for the float metric (default: ``T_net``'s raw
            weights, as they are before training).
        target: Where to write checkpoints and the log; ``None`` writes nothing.
        resume: A :class:`~transform_core.checkpoint.PatchedCheckpoint` written by an
            earlier run of the same recipe and data, to continue from. ``T_net`` must have
            been patched from its network.
        device: Where to train.
        on_event: Called with each progress record (on every rank).

    Returns:
        The metrics and counts of the run.

    Raises:
        ConfigError: Data the network or loss cannot use, or a ``resume`` checkpoint
            without training state.
    """
    device = torch.device(device)
    world = _world_from_env()
    created_group = False
    if world.size > 1:
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
            created_group = True
    try:
        return _run(T_net, plan, config, data, float_net, target, resume, device, world, on_event)
    finally:
        if created_group:
            import torch.distributed as dist

            dist.destroy_process_group()


def _run(
    T_net: nn.Module,
    plan: Plan,
    config: FinetuneConfig,
    data: TensorData | LoaderData,
    float_net: nn.Module | None,
    target: CheckpointTarget | None,
    resume: Any,
    device: torch.device,
    world: _World,
    on_event: Callable[[Event], None] | None,
) -> FinetuneResult:
    if resume is not None and _STATE_KEY not in resume.state:
        raise ConfigError(
            "holds no fine-tuning state to resume from; drop --resume to start a new run",
            path=resume.path,
        )
    if target is not None and resume is None and world.rank == 0:
        from transform_core.safetensors_io import check_output_path

        for path in (target.path, log_path_for(target.path)):
            check_output_path(path, force=target.force, inputs=target.inputs)
    seed = config.seed if config.seed is not None else plan.seed
    T_net.to(device)
    loss_fn = _loss_function(config.loss)
    val = _eval_batches(data, config.batch_size)
    evaluated_on = "validation" if val is not None else "training"

    def eval_batches() -> Iterable[tuple[Tensor, Tensor]]:
        batches = _eval_batches(data, config.batch_size)
        return batches if batches is not None else _train_eval_batches(data, config.batch_size)

    def measure(net: nn.Module) -> dict[str, float | None]:
        figures = evaluate(net, eval_batches(), config, device)
        if config.metric == "accuracy" and figures["accuracy"] is None:
            raise ConfigError(
                "metric 'accuracy' needs (batch, classes) outputs and class-index or one-hot "
                "targets; set 'metric: loss'",
                key="finetune.metric",
            )
        return figures

    # Evaluated before anything is written: bad data or a bad loss fail here.
    if resume is not None:
        metrics: dict[str, float | None] = dict(resume.state[_STATE_KEY]["metrics"])
    else:
        base = float_net if float_net is not None else remove_T_net(T_net, inplace=False)
        metrics = {
            "float": measure(base.to(device))[config.metric],
            "post_training": measure(_burned_copy(T_net))[config.metric],
        }
    per_epoch = _steps_per_epoch(data, config.batch_size)
    total = _total_steps(config, per_epoch)
    params = [p for p in T_net.parameters() if p.requires_grad]
    optimizer = OPTIMIZERS[config.optimizer](params, lr=config.lr, **config.optimizer_args)
    model: nn.Module = T_net
    if world.size > 1:
        from torch.nn.parallel import DistributedDataParallel

        ids = [device.index] if device.type == "cuda" else None
        model = DistributedDataParallel(T_net, device_ids=ids)
    pos = _Position()
    if resume is None:
        # Dropout and unseeded transforms draw from torch's global generator: seed it, so
        # that two runs with the same seed agree bit for bit.
        torch.manual_seed(seed)
    epoch_rng = torch.get_rng_state()
    if resume is not None:
        pos, epoch_rng = _restore(resume, T_net, optimizer, device)
    writing = target is not None and world.rank == 0
    log = _Log(
        log_path_for(target.path) if writing and target is not None else None,
        pos.step if resume is not None else None,
    )
    info = {"metrics": metrics, "metric": config.metric, "total_steps": total, "seed": seed}

    def emit(event: Event) -> None:
        event = {"epoch": pos.epoch, "step": pos.step, "total_steps": total, **event}
        log.write(event)
        if on_event is not None:
            on_event(event)

    def checkpoint() -> None:
        if writing and target is not None:
            _save(target, T_net, plan, optimizer, pos, info, epoch_rng, device)
            emit({"kind": "checkpoint", "path": str(target.path)})
        if world.size > 1:
            import torch.distributed as dist

            dist.barrier()

    def run_eval() -> None:
        figures = measure(_burned_copy(T_net))
        emit({"kind": "eval", "metric": figures[config.metric], **figures})

    while pos.step < total:
        batches, rest_rng = _epoch_batches(data, config, pos, seed, world, epoch_rng)
        if pos.batch == 0:
            epoch_rng = rest_rng
        ended = True
        for x, y, scale in batches:
            lr = config.lr * lr_factor(config, pos.step, total)
            loss = _train_step(model, T_net, optimizer, x, y, scale, lr, config, loss_fn, device)
            pos.step += 1
            pos.batch += 1
            emit({"kind": "train", "loss": _global_mean(loss, world), "lr": lr})
            if config.eval_every is not None and pos.step % config.eval_every == 0:
                run_eval()
            if config.checkpoint_every is not None and pos.step % config.checkpoint_every == 0:
                checkpoint()
            if pos.step >= total:
                ended = per_epoch is not None and pos.batch >= per_epoch
                break
        if ended:
            pos.epoch += 1
            pos.batch = 0
            epoch_rng = torch.get_rng_state()
            if config.eval_every is None:
                run_eval()
            if config.checkpoint_every is None and pos.step < total:
                checkpoint()
    metrics["finetuned"] = measure(_burned_copy(T_net))[config.metric]
    info["metrics"] = metrics
    checkpoint()
    return FinetuneResult(
        metric=config.metric,
        metrics=metrics,
        evaluated_on=evaluated_on,
        steps=pos.step,
        epochs=pos.epoch,
        log=log.path,
    )


def _epoch_batches(
    data: TensorData | LoaderData,
    config: FinetuneConfig,
    pos: _Position,
    seed: int,
    world: _World,
    epoch_rng: Tensor,
) -> tuple[Iterator[tuple[Tensor, Tensor, float]], Tensor]:
    """This epoch's remaining batches ``(inputs, targets, loss scale)`` for this rank."""
    if isinstance(data, TensorData):
        indices = data.batch_indices(config.batch_size, pos.epoch, seed, shuffle=config.shuffle)

        def tensor_batches() -> Iterator[tuple[Tensor, Tensor, float]]:
            for batch in indices[pos.batch :]:
                mine = batch[world.rank :: world.size]
                # Mean over this rank's share, weighted so that DDP's average over ranks is
                # the mean over the whole global batch.
                yield data.inputs[mine], data.targets[mine], len(mine) * world.size / len(batch)

        return tensor_batches(), torch.get_rng_state()
    # A user's DataLoader draws its shuffle from torch's global generator when iterated:
    # replay the epoch from the state it had at the epoch's start, then skip what was done.
    now = torch.get_rng_state()
    if pos.batch > 0:
        torch.set_rng_state(epoch_rng)
    start = torch.get_rng_state()
    iterator = iter(data.train)
    for _ in range(pos.batch):
        next(iterator)
    if pos.batch > 0:
        torch.set_rng_state(now)
    source = data.source
    return ((*split_batch(b, source), 1.0) for b in iterator), start


def _train_step(
    model: nn.Module,
    T_net: nn.Module,
    optimizer: torch.optim.Optimizer,
    x: Tensor,
    y: Tensor,
    scale: float,
    lr: float,
    config: FinetuneConfig,
    loss_fn: Callable[..., Tensor],
    device: torch.device,
) -> Tensor:
    model.train()
    x, y = x.to(device), y.to(device)
    if x.shape[0] == 0:
        # A rank with no samples in a small last batch still runs forward and backward, so
        # it joins the gradient average, with a zero loss.
        loss = _prepare(model(x), y, config.reduce_time).sum() * 0.0
    else:
        loss, _ = _loss(model, x, y, config, loss_fn)
    optimizer.zero_grad(set_to_none=True)
    torch.autograd.backward(loss * scale)
    if config.grad_clip is not None:
        nn.utils.clip_grad_norm_(T_net.parameters(), config.grad_clip)
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.step()
    return (loss.detach() * scale).float()


def _global_mean(loss: Tensor, world: _World) -> float:
    if world.size > 1:
        import torch.distributed as dist

        total = loss.clone()
        dist.all_reduce(total)
        return float(total) / world.size
    return float(loss)
