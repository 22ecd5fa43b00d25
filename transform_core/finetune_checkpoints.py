"""Checkpoints of a fine-tuning run: what they hold, how a run resumes from one, and its log.

A run's checkpoint is a patched checkpoint (:mod:`transform_core.patched_checkpoint`)
whose extra state holds everything needed to continue bit for bit: the optimiser state
(tensors as ``__rockq__/optim/INDEX/NAME``, the rest as JSON), the position (step, epoch,
batch), the random transforms' generator states (``__rockq__/gen/WHERE/DEVICE``),
torch's global random states (``__rockq__/rng/...``), the seed and what identifies the
data (:func:`~transform_core.data.data_identity`). A run resumes only from a checkpoint of
the same network, seed and data (:func:`check_same_network`, :func:`resumed_seed`,
:func:`check_resume`). The JSON-lines log beside it is trimmed back to the checkpoint's
step when a run resumes. A fresh run writes its log only once its first checkpoint is on
disk, so a run that fails before that leaves nothing behind.

Example:
    >>> from pathlib import Path
    >>> log_path_for(Path("out/net.patched.safetensors")).name
    'net.patched.finetune.jsonl'
"""

from __future__ import annotations

import contextlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from transform_core.data import LoaderData, TensorData, describe_identity
from transform_core.errors import ConfigError
from transform_core.patching import ActWrapper, TWrapper
from transform_core.registry import BoundTransform

if TYPE_CHECKING:
    from transform_core.patched_checkpoint import SourceInfo
    from transform_core.pipeline import Plan

__all__ = [
    "STATE_KEY",
    "CheckpointTarget",
    "Position",
    "RunLog",
    "check_resume",
    "check_same_network",
    "check_target",
    "json_safe",
    "log_path_for",
    "restore_training_state",
    "resumed_seed",
    "save_training_state",
]

STATE_KEY = "finetune"
"""The key of a run's state in a patched checkpoint's ``rockq.state``."""


@dataclass(frozen=True)
class CheckpointTarget:
    """Where and how to write the patched checkpoints of a run.

    Attributes:
        path: The patched checkpoint (rewritten at each checkpoint and at the end).
        source: Where the network came from.
        recipe: The recipe text.
        network_bytes: The whole-module pickle, for pickle sources.
        inputs: Files the run reads (network, recipe, data), which neither the checkpoint
            nor its log may overwrite.
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


def json_safe(value: Any) -> Any:
    """``value`` with every NaN or Inf float replaced by ``None``, which JSON can hold.

    A metric measured on a network whose outputs overflow is not finite; the log and the
    checkpoint's state (and from it the report) stay standard JSON.

    Example:
        >>> json_safe({"loss": float("nan"), "accuracy": 0.5, "steps": [1, float("inf")]})
        {'loss': None, 'accuracy': 0.5, 'steps': [1, None]}
    """
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(item) for item in value]
    return value


def check_target(target: CheckpointTarget, *, fresh: bool) -> None:
    """Refuse, before training, a checkpoint or log path that may not be written.

    Neither file may be one of ``target.inputs``, even with ``force``. A fresh run also needs
    both to be new, or ``force``; a resumed run rewrites its own files.

    Raises:
        CheckpointError: A path is an input, a folder, in a missing folder, or exists on a
            fresh run without ``force``.
    """
    from transform_core.files import check_output_path

    for path in (target.path, log_path_for(target.path)):
        check_output_path(path, force=target.force or not fresh, inputs=target.inputs)


def _network_identity(source: Any) -> Any:
    """What identifies a source's network: its record without the paths (a file may have
    moved) and the packages trusted while loading it."""
    data = source.to_dict() if hasattr(source, "to_dict") else source
    if not isinstance(data, dict):
        return data
    return {
        key: _network_identity(value) if key == "origin" else value
        for key, value in data.items()
        if key not in ("path", "trust")
    }


def _describe_source(source: Any) -> str:
    arch = f", {source.arch}" if source.arch else ""
    return f"{source.kind} {source.path}{arch}, sha256 {source.sha256[:12]}"


def _state_dict_difference(saved: dict[str, Tensor], net: nn.Module) -> str:
    """How ``net``'s state dict differs from a checkpoint's in names and shapes, or ``''``."""
    mine = net.state_dict()
    for name, tensor in saved.items():
        if name not in mine:
            return f"the checkpoint has tensor '{name}', this network has not"
        if tuple(mine[name].shape) != tuple(tensor.shape):
            return (
                f"tensor '{name}' is {tuple(tensor.shape)} in the checkpoint but "
                f"{tuple(mine[name].shape)} in this network"
            )
    extra = [name for name in mine if name not in saved]
    return f"this network has tensor '{extra[0]}', the checkpoint has not" if extra else ""


def check_same_network(resume: Any, target: CheckpointTarget, net: nn.Module | None = None) -> None:
    """Refuse to resume from a checkpoint that a run with another network wrote.

    The resumed run rewrites the checkpoint with ``target``'s source and embedded network
    around the checkpoint's weights: another network would make a file nobody can load.

    Args:
        resume: The :class:`~transform_core.checkpoint.PatchedCheckpoint` to resume.
        target: Where the resumed run writes, with the source it records.
        net: The network the resumed run was given, to compare tensor names and shapes.

    Raises:
        ConfigError: The sources differ (kind, digest, factory and its arguments; not the
            path), the embedded networks differ, or ``net``'s tensors do not match the
            checkpoint's.
    """
    why = ""
    if _network_identity(resume.source) != _network_identity(target.source):
        why = (
            f"it records {_describe_source(resume.source)}; this run has "
            f"{_describe_source(target.source)}"
        )
    elif (
        resume.network_bytes is not None
        and target.network_bytes is not None
        and resume.network_bytes != target.network_bytes
    ):
        why = "its embedded network differs from this run's"
    elif net is not None:
        why = _state_dict_difference(resume.state_dict, net)
    if why:
        raise ConfigError(
            f"was written by a run with another network ({why}); resume with the network "
            "the run started from, or drop --resume and pick another -o",
            path=str(target.path),
            key="--resume",
        )


def resumed_seed(saved: int | None, given: int | None, planned: int, path: Path) -> int:
    """The seed a resumed run goes on with: the checkpoint's.

    Args:
        saved: The seed the checkpoint recorded (``None`` in files from before seeds were
            recorded: ``planned`` is used).
        given: The seed set for this run (``--seed``), or ``None``.
        planned: The seed of the run's plan.
        path: The checkpoint, for the message.

    Raises:
        ConfigError: ``given`` is not the checkpoint's seed.

    Example:
        >>> resumed_seed(5, None, 3, Path("out.safetensors"))
        5
        >>> try:
        ...     resumed_seed(5, 7, 7, Path("out.safetensors"))
        ... except ConfigError as err:
        ...     print(err)
        out.safetensors: --seed: the run was started with seed 5, not 7; drop --seed (a resumed run keeps its seed), or drop --resume and pick another -o
    """
    if saved is None:
        return planned
    if given is not None and given != saved:
        raise ConfigError(
            f"the run was started with seed {saved}, not {given}; drop --seed (a resumed run "
            "keeps its seed), or drop --resume and pick another -o",
            path=str(path),
            key="--seed",
        )
    return saved


def check_resume(
    resume: Any,
    target: CheckpointTarget | None,
    seed: int,
    identity: dict[str, Any],
    data: TensorData | LoaderData,
) -> None:
    """Refuse to resume a checkpoint of a run with another seed, network or data.

    Args:
        resume: The :class:`~transform_core.checkpoint.PatchedCheckpoint` to resume.
        target: Where the resumed run writes, or ``None``.
        seed: The run's data-order seed.
        identity: The run's data, from :func:`~transform_core.data.data_identity`.
        data: The run's data, for messages.

    Raises:
        ConfigError: Another seed, network (see :func:`check_same_network`) or data.
    """
    saved = resume.state[STATE_KEY]
    if saved.get("seed") is not None and saved["seed"] != seed:
        raise ConfigError(
            f"was written by a run with seed {saved['seed']}, not {seed}; resume with the seed "
            "the run started with",
            path=str(resume.path),
        )
    if target is not None:
        check_same_network(resume, target)
    # Checkpoints written before the data was recorded are not checked.
    recorded = saved.get("data")
    if isinstance(recorded, dict) and recorded != identity:
        raise ConfigError(
            f"{data.source} is not the data the run in {resume.path} was trained on "
            f"({describe_identity(recorded)}; this one: {describe_identity(identity)}); resume "
            "with the same --data, or drop --resume and pick another -o",
            key="--data",
        )


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
class Position:
    """Where a run is: optimiser steps done, the epoch, and batches done in that epoch."""

    step: int = 0
    epoch: int = 0
    batch: int = 0


def save_training_state(
    target: CheckpointTarget,
    T_net: nn.Module,
    plan: Plan,
    optimizer: torch.optim.Optimizer,
    pos: Position,
    info: dict[str, Any],
    epoch_rng: Tensor,
    device: torch.device,
) -> None:
    """Write the patched checkpoint of a run with everything needed to resume it.

    Args:
        target: Where to write.
        T_net: The patched network being trained.
        plan: The plan it was patched with (for the seed).
        optimizer: The run's optimiser.
        pos: Where the run is.
        info: JSON facts of the run (metrics so far, metric, total steps, seed, data).
        epoch_rng: Torch's global random state at the start of the current epoch.
        device: The training device (its CUDA random state is saved too).
    """
    from transform_core.patched_checkpoint import save_patched

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
        STATE_KEY: {
            **json_safe(info),
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


def restore_training_state(
    resume: Any,
    T_net: nn.Module,
    optimizer: torch.optim.Optimizer,
    device: torch.device,
) -> tuple[Position, Tensor]:
    """Load a checkpoint's training state into the run; returns position and epoch RNG."""
    saved = resume.state[STATE_KEY]
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
    return Position(saved["step"], saved["epoch"], saved["batch"]), extra["rng/epoch_cpu"]


class RunLog:
    """The JSON-lines log of a run (written by rank 0 only).

    A fresh run holds its lines back until :meth:`commit`, called once its first checkpoint
    is written: a run that fails before then leaves no log, and an older log (replaced with
    ``force``) stays beside the older checkpoint it describes.

    Args:
        path: The log file (see :func:`log_path_for`), or ``None`` to write nothing.
        resume_step: On resume, the checkpoint's step: later lines, written after that
            checkpoint, are dropped. ``None`` starts the log afresh.
    """

    def __init__(self, path: Path | None, resume_step: int | None) -> None:
        self.path = path
        self._held: list[str] | None = None
        if path is None:
            return
        if resume_step is None:
            self._held = []
            return
        kept: list[str] = []
        if path.is_file():
            for line in path.read_text(errors="replace").splitlines():
                # A line cut short or edited by hand is dropped, not an error.
                with contextlib.suppress(ValueError, TypeError):
                    record = json.loads(line)
                    if isinstance(record, dict) and record.get("step", 0) <= resume_step:
                        kept.append(line + "\n")
        _replace_lines(path, kept)

    def write(self, event: dict[str, Any]) -> None:
        """Append one progress record as a line of JSON."""
        if self.path is None:
            return
        line = json.dumps(json_safe(event)) + "\n"
        if self._held is not None:
            self._held.append(line)
            return
        with self.path.open("a") as handle:
            handle.write(line)

    def commit(self) -> None:
        """Write the held-back lines; call once the run's checkpoint is on disk."""
        if self.path is not None and self._held is not None:
            _replace_lines(self.path, self._held)
            self._held = None


def _replace_lines(path: Path, lines: list[str]) -> None:
    from transform_core.files import atomic_output

    # Atomic, so that a run stopped while writing keeps the old log whole.
    with atomic_output(path, force=True) as temp:
        temp.write_text("".join(lines))
