"""Quantisation-aware fine-tuning of a patched network, resumable bit for bit.

The recipe's ``finetune:`` section (parsed into
:class:`~transform_core.finetune_config.FinetuneConfig`) says how to train::

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
network as ``rockq burn-in`` burns in the run's checkpoint, with the same random draws
(:func:`~transform_core.finetune_eval.burned_copy`), so the metric is the one of the file
``rockq burn-in`` writes. Evaluating leaves training's random streams alone: how often a
run evaluates does not change what it trains.

Exactness: the data order is drawn from ``seed`` and the epoch alone, the learning rate is a
function of the step, and each checkpoint stores the optimiser state, the position (epoch,
batch, step), the random transforms' generator states and torch's global random state. A run
stopped and resumed from its last checkpoint therefore ends with the same bits as one that
was never stopped. A resumed run keeps the seed its checkpoint recorded, and refuses another
network or other data than the run started with.

Before training, data the run cannot use is refused: an empty training loader, inputs the
network cannot take (in evaluation or training mode: a batch of one sample, which BatchNorm
refuses in training), a class index out of range anywhere in tensor data, and ``metric:
accuracy`` for outputs without classes. An exception the network or the user's loader
raises during training is a one-line error naming the step and ``--data``.

A loss that becomes NaN or Inf stops the run with an error naming the step, and the weights
are checked before each checkpoint, so a run that diverges never writes NaN weights over its
last good checkpoint. Neither the checkpoint nor its log may overwrite a file the run reads.

Under ``torchrun`` (``WORLD_SIZE > 1``) training uses ``DistributedDataParallel``: each
process takes every ``WORLD_SIZE``-th sample of each global batch and the loss is weighted so
that the gradient equals the single-process one; only rank 0 writes files.

This module holds the training loop. The section's schema and parsing are in
:mod:`transform_core.finetune_config`, losses and evaluation in
:mod:`transform_core.finetune_eval`, and the run's checkpoints in
:mod:`transform_core.finetune_checkpoints`; their public names are importable from here too.

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

import math
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from transform_core.data import LoaderData, TensorData, data_identity, loader_batches
from transform_core.errors import CheckpointError, ConfigError, RockqError, did_you_mean
from transform_core.finetune_checkpoints import (
    STATE_KEY,
    CheckpointTarget,
    Position,
    RunLog,
    check_resume,
    check_same_network,
    check_target,
    log_path_for,
    restore_training_state,
    resumed_seed,
    save_training_state,
)
from transform_core.finetune_config import (
    LOSSES,
    METRICS,
    OPTIMIZERS,
    REDUCTIONS,
    SCHEDULES,
    FinetuneConfig,
    lr_factor,
    parse_finetune_section,
)
from transform_core.finetune_eval import (
    apply_loss,
    burned_copy,
    check_data_fits,
    evaluate,
    loss_function,
    network_failed,
    prepare_output,
    train_eval_batches,
    validation_batches,
)
from transform_core.patching import remove_T_net

if TYPE_CHECKING:
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
    "finetune_patched",
    "log_path_for",
    "lr_factor",
    "parse_finetune_section",
    "resolve_device",
]

Event = dict[str, Any]
"""A progress record: ``kind`` (``train``, ``eval``, ``checkpoint``), ``epoch``, ``step``,
``total_steps`` and the figures of that kind (``loss``, ``lr``, ``metric``)."""


# --- devices and processes --------------------------------------------------------------------


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
    if per_epoch == 0:
        # Epochs of no steps would "train" by doing nothing.
        raise ConfigError(
            "the training loader's len() is 0, so 'epochs' come to no steps; make len() the "
            "number of batches it yields, or give 'steps' in the finetune section instead",
            key="--data",
        )
    return (config.epochs or 1) * per_epoch


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
            earlier run of the same recipe, seed and data, to continue from. ``T_net`` must
            have been patched from its network.
        device: Where to train.
        on_event: Called with each progress record (on every rank).

    Returns:
        The metrics and counts of the run.

    Raises:
        ConfigError: Data the network, the loss or the metric cannot use (see
            :func:`~transform_core.finetune_eval.check_data_fits`); a ``resume``
            checkpoint without training state, or written by a run with another seed,
            network (the target's source) or data; an exception the network or the
            loader raises during training; a loss or weights that become NaN or Inf (the
            last checkpoint written is kept).
        CheckpointError: The checkpoint or its log may not be written (see
            :func:`~transform_core.finetune_checkpoints.check_target`).
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


def finetune_patched(
    net: nn.Module,
    plan: Plan,
    *,
    data: str | None,
    target: CheckpointTarget,
    device: str = "auto",
    resume: bool = False,
    trust: Iterable[str] = (),
    seed: int | None = None,
    on_event: Callable[[Event], None] | None = None,
) -> FinetuneResult:
    """Patch ``net`` with ``plan``, fine-tune it with the recipe's section, checkpoint it.

    What ``rockq patch --finetune`` and ``rockq finetune`` run. With ``resume``, training
    continues from the patched checkpoint at ``target.path`` (written by an interrupted
    run of the same recipe, network and data) and ends bit-identical to an uninterrupted
    run. A resumed run keeps the seed the checkpoint recorded: ``plan``'s seed is replaced
    by it, and a ``seed`` set to another value is refused. Under ``torchrun`` every
    process calls this; only rank 0 writes.

    Args:
        net: The un-patched network ``plan`` was made for.
        plan: From :func:`~transform_core.pipeline.plan_network`.
        data: A ``.safetensors`` file or ``"package.module:function"`` (see
            :func:`~transform_core.data.load_data`).
        target: Where to write checkpoints and the log; a data file joins its inputs.
        device: ``auto``, ``cpu`` or ``cuda``.
        resume: Continue from the checkpoint at ``target.path``.
        trust: Packages a checkpoint's network may use, for ``resume``.
        seed: The seed set for this run (``--seed``), if any; ``plan`` was made with it.
        on_event: Called with each progress record.

    Returns:
        The metrics and counts of the run.

    Raises:
        RecipeError: The recipe has no ``finetune:`` section.
        ConfigError: No data; ``resume`` without a checkpoint of the same recipe,
            network, seed and data; a loss that becomes NaN or Inf; and see
            :func:`finetune`.
        CheckpointError: The checkpoint or its log would overwrite an input (the data file
            included) or, on a fresh run without ``force``, an existing file.
    """
    from transform_core.checkpoint import is_patched, load_patched
    from transform_core.data import load_data
    from transform_core.errors import RecipeError
    from transform_core.pipeline import patch_network, plan_network

    recipe = plan.recipe
    if recipe.finetune is None:
        raise RecipeError(
            "has no 'finetune:' section; add one (for example 'finetune: {epochs: 10}') to "
            "fine-tune",
            path=None if recipe.source.startswith("<") else recipe.source,
            key="finetune",
        )
    if data is None:
        raise ConfigError("is required to fine-tune; pass the training data", key="--data")
    if Path(data).is_file():
        # Neither the checkpoint nor its log may overwrite the data they are trained on.
        target = replace(target, inputs=(*target.inputs, Path(data)))
    dataset = load_data(data)
    torch_device = resolve_device(device, local_rank=int(os.environ.get("LOCAL_RANK", "0")))
    float_net: nn.Module | None = net
    checkpoint = None
    if resume:
        if not is_patched(target.path):
            raise ConfigError(
                f"found no checkpoint to resume from at {target.path}; run without --resume "
                "to start, or pass the -o of the interrupted run",
                key="--resume",
            )
        checkpoint = load_patched(target.path, trust=trust)
        if checkpoint.recipe != recipe.text:
            raise ConfigError(
                "was written by a run with another recipe; resume with the same recipe, or "
                "drop --resume and pick another -o",
                path=str(target.path),
                key="--resume",
            )
        if checkpoint.network is None:
            raise ConfigError(
                "holds no network to resume training; drop --resume and pick another -o",
                path=str(target.path),
                key="--resume",
            )
        check_same_network(checkpoint, target, net)
        seed = resumed_seed(checkpoint.seed, seed, plan.seed, target.path)
        net = checkpoint.network
        plan = plan_network(net, recipe, seed=seed)
        # The float network is measured once, on a fresh run; a resumed run keeps the
        # figure its checkpoint recorded.
        float_net = None
    T_net = patch_network(net, plan, inplace=checkpoint is not None)
    return finetune(
        T_net,
        plan,
        recipe.finetune,
        dataset,
        float_net=float_net,
        target=target,
        resume=checkpoint,
        device=torch_device,
        on_event=on_event,
    )


def _smallest_share(data: TensorData | LoaderData, batch_size: int, world: _World) -> int | None:
    """The fewest samples any process trains on in one step (none counted), for tensor data.

    Example:
        >>> data = TensorData(torch.zeros(17, 2), torch.zeros(17))
        >>> _smallest_share(data, 16, _World()), _smallest_share(data, 8, _World(0, 2))
        (1, 1)
    """
    if not isinstance(data, TensorData):
        return None
    n = data.num_samples
    sizes = {min(batch_size, n)} | ({n % batch_size} if n % batch_size else set())
    shares = {len(range(rank, size, world.size)) for size in sizes for rank in range(world.size)}
    shares.discard(0)
    return min(shares) if shares else None


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
    if resume is not None and STATE_KEY not in resume.state:
        raise ConfigError(
            "holds no fine-tuning state to resume from; drop --resume to start a new run",
            path=resume.path,
        )
    if target is not None:
        _check_target_everywhere(target, resume is None, world)
    seed = config.seed if config.seed is not None else plan.seed
    T_net.to(device)
    loss_fn = loss_function(config.loss)
    # One batch through the network and the loss first, before torch's global generator is
    # seeded or restored: data the network cannot take is refused naming the data.
    check_data_fits(
        T_net,
        data,
        config,
        loss_fn,
        device,
        plan=plan,
        smallest_batch=_smallest_share(data, config.batch_size, world),
        processes=world.size,
    )
    identity = data_identity(data) if target is not None or resume is not None else None
    if resume is not None and identity is not None:
        check_resume(resume, target, seed, identity, data)
    has_val = (
        data.val is not None if isinstance(data, LoaderData) else data.validation() is not None
    )
    evaluated_on = "validation" if has_val else "training"

    def eval_batches() -> Iterable[tuple[Tensor, Tensor]]:
        batches = validation_batches(data, config.batch_size)
        return batches if batches is not None else train_eval_batches(data, config.batch_size)

    def measure(net: nn.Module) -> dict[str, float | None]:
        # Evaluation draws nothing from training's streams: a user's DataLoader draws its
        # seed from torch's global generator whenever it is iterated, so the global state
        # is put back, and how often a run evaluates does not change what it trains.
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            figures = evaluate(net, eval_batches(), config, device, data.source)
        if config.metric == "accuracy" and figures["accuracy"] is None:
            raise ConfigError(
                "'accuracy' needs (batch, classes) outputs with 2 or more classes and "
                f"class-index or one-hot targets, which the {evaluated_on} data does not "
                "give; set 'metric: loss'",
                key="finetune.metric",
            )
        return figures

    # Evaluated before anything is written: bad data or a bad loss fail here.
    if resume is not None:
        metrics: dict[str, float | None] = dict(resume.state[STATE_KEY]["metrics"])
    else:
        base = float_net if float_net is not None else remove_T_net(T_net, inplace=False)
        before = measure(base.to(device))
        after = measure(burned_copy(T_net, plan))
        _check_losses_finite(before["loss"], after["loss"], evaluated_on)
        metrics = {"float": before[config.metric], "post_training": after[config.metric]}
    per_epoch = _steps_per_epoch(data, config.batch_size)
    total = _total_steps(config, per_epoch)
    params = [p for p in nn.Module.parameters(T_net) if p.requires_grad]
    optimizer = OPTIMIZERS[config.optimizer](params, lr=config.lr, **config.optimizer_args)
    model: nn.Module = T_net
    if world.size > 1:
        from torch.nn.parallel import DistributedDataParallel

        ids = [device.index] if device.type == "cuda" else None
        model = DistributedDataParallel(T_net, device_ids=ids)
    pos = Position()
    if resume is None:
        # Dropout and unseeded transforms draw from torch's global generator: seed it, so
        # that two runs with the same seed agree bit for bit.
        # Any integer is a recipe seed; torch takes 64 bits (a negative seed wraps alike).
        torch.manual_seed(seed % 2**64)
    epoch_rng = torch.get_rng_state()
    if resume is not None:
        pos, epoch_rng = restore_training_state(resume, T_net, optimizer, device)
    writing = target is not None and world.rank == 0
    log = RunLog(
        log_path_for(target.path) if writing and target is not None else None,
        pos.step if resume is not None else None,
    )
    info = {"metrics": metrics, "metric": config.metric, "total_steps": total, "seed": seed}
    if identity is not None:
        info["data"] = identity

    def emit(event: Event) -> None:
        event = {"epoch": pos.epoch, "step": pos.step, "total_steps": total, **event}
        log.write(event)
        if on_event is not None:
            on_event(event)

    # The step of the checkpoint on disk, for the error that stops a diverging run.
    saved = pos.step if resume is not None and target is not None else None

    def checkpoint() -> None:
        nonlocal saved
        # Every rank checks (the weights agree across ranks), so none waits at the barrier.
        _check_weights(T_net, pos, total, saved)
        if writing and target is not None:
            save_training_state(target, T_net, plan, optimizer, pos, info, epoch_rng, device)
            log.commit()
            emit({"kind": "checkpoint", "path": str(target.path)})
        if target is not None:
            saved = pos.step
        if world.size > 1:
            import torch.distributed as dist

            dist.barrier()

    def run_eval() -> None:
        figures = measure(burned_copy(T_net, plan))
        emit({"kind": "eval", "metric": figures[config.metric], **figures})

    def where() -> str:
        return f"at step {pos.step + 1} of {total} (epoch {pos.epoch + 1})"

    while pos.step < total:
        first_batch = pos.batch
        batches, rest_rng = _epoch_batches(data, config, pos, seed, world, epoch_rng, where)
        if pos.batch == 0:
            epoch_rng = rest_rng
        ended = True
        for x, y, scale in batches:
            lr = config.lr * lr_factor(config, pos.step, total)
            loss = _train_step(
                model,
                T_net,
                optimizer,
                x,
                y,
                scale,
                lr,
                config,
                loss_fn,
                device,
                data.source,
                where,
            )
            pos.step += 1
            pos.batch += 1
            mean = _global_mean(loss, world)
            if not math.isfinite(mean):
                raise _diverged(f"the training loss became {mean}", pos, total, saved, lr)
            emit({"kind": "train", "loss": mean, "lr": lr})
            if config.eval_every is not None and pos.step % config.eval_every == 0:
                run_eval()
            if config.checkpoint_every is not None and pos.step % config.checkpoint_every == 0:
                checkpoint()
            if pos.step >= total:
                ended = per_epoch is not None and pos.batch >= per_epoch
                break
        if first_batch == 0 and pos.batch == 0:
            # A whole epoch without a batch: the next would be the same, for ever.
            raise _no_batches(data, pos)
        if ended:
            pos.epoch += 1
            pos.batch = 0
            epoch_rng = torch.get_rng_state()
            if config.eval_every is None:
                run_eval()
            if config.checkpoint_every is None and pos.step < total:
                checkpoint()
    metrics["finetuned"] = measure(burned_copy(T_net, plan))[config.metric]
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


def _no_batches(data: TensorData | LoaderData, pos: Position) -> ConfigError:
    """The error for an epoch that yields no batch at all."""
    if isinstance(data, TensorData):
        return ConfigError("holds no training samples; give at least one", path=data.source)
    earlier = " (it yielded batches in earlier epochs)" if pos.step else ""
    return ConfigError(
        f"the training loader of '{data.source}' yielded no batches in epoch {pos.epoch + 1}"
        f"{earlier}; it must yield (inputs, targets) batches each time it is iterated",
        key="--data",
    )


def _epoch_batches(
    data: TensorData | LoaderData,
    config: FinetuneConfig,
    pos: Position,
    seed: int,
    world: _World,
    epoch_rng: Tensor,
    where: Callable[[], str],
) -> tuple[Iterator[tuple[Tensor, Tensor, float]], Tensor]:
    """This epoch's remaining batches ``(inputs, targets, loss scale)`` for this rank.

    ``where`` says where the run is, for the error about a loader that raises.
    """
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
    iterator = loader_batches(data.train, data.source, "training", where)
    for done in range(pos.batch):
        if next(iterator, None) is None:
            raise ConfigError(
                f"the training loader of '{data.source}' yielded {done} batches in epoch "
                f"{pos.epoch + 1}, but the checkpoint was written after {pos.batch}; resume "
                "with a loader that yields the same batches",
                key="--data",
            )
    if pos.batch > 0:
        torch.set_rng_state(now)
    return ((x, y, 1.0) for x, y in iterator), start


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
    source: str,
    where: Callable[[], str],
) -> Tensor:
    model.train()
    x, y = x.to(device), y.to(device)
    try:
        output = model(x)
    except (RuntimeError, ValueError, IndexError) as err:
        if isinstance(err, (RockqError, torch.cuda.OutOfMemoryError)):
            raise
        fix = "drop the last partial batch (DataLoader(drop_last=True)) or change the batch size"
        raise network_failed(err, x, source, f"failed in training {where()}", fix) from err
    out = prepare_output(output, y, config.reduce_time)
    # A rank with no samples in a small last batch still runs forward and backward, so it
    # joins the gradient average, with a zero loss.
    empty = x.shape[0] == 0
    loss = out.sum() * 0.0 if empty else apply_loss(out, y, config, loss_fn, source)
    optimizer.zero_grad(set_to_none=True)
    torch.autograd.backward(loss * scale)
    if config.grad_clip is not None:
        nn.utils.clip_grad_norm_(nn.Module.parameters(T_net), config.grad_clip)
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.step()
    return (loss.detach() * scale).float()


def _check_losses_finite(before: float | None, after: float | None, data: str) -> None:
    """Refuse to train from a loss that is NaN or Inf already: every step would be NaN.

    Example:
        >>> try:
        ...     _check_losses_finite(1.1, float("inf"), "training")
        ... except ConfigError as err:
        ...     print(err)
        the quantised network's loss on the training data is inf before any training (the float network's is 1.1): the transforms make its outputs NaN or Inf, so training cannot start; narrow the rules' ranges or give them more levels
    """
    if before is not None and not math.isfinite(before):
        raise ConfigError(
            f"the float network's loss on the {data} data is {before} before any training: "
            "check the data and the network"
        )
    if after is not None and not math.isfinite(after):
        raise ConfigError(
            f"the quantised network's loss on the {data} data is {after} before any training "
            f"(the float network's is {before}): the transforms make its outputs NaN or Inf, "
            "so training cannot start; narrow the rules' ranges or give them more levels"
        )


def _check_target_everywhere(target: CheckpointTarget, fresh: bool, world: _World) -> None:
    """Check the outputs on rank 0, the rank that writes them, and stop every rank if they
    may not be written: a process launched on its own (``srun``, say) would otherwise wait
    for rank 0 at the first collective for ever."""
    error: CheckpointError | None = None
    if world.rank == 0:
        try:
            check_target(target, fresh=fresh)
        except CheckpointError as err:
            error = err
    if world.size > 1:
        import torch.distributed as dist

        shared: list[str | None] = [None if error is None else str(error)]
        dist.broadcast_object_list(shared, src=0)
        if error is None and shared[0] is not None:
            raise CheckpointError(shared[0])
    if error is not None:
        raise error


def _diverged(
    what: str, pos: Position, total: int, saved: int | None, lr: float | None = None
) -> ConfigError:
    """The error that stops a run whose loss or weights are no longer finite."""
    # After an epoch's last step the position has already moved on to the next epoch.
    epoch = pos.epoch if pos.batch == 0 else pos.epoch + 1
    at_lr = "" if lr is None else f", learning rate {lr:g}"
    kept = "nothing was written" if saved is None else f"the checkpoint of step {saved} is kept"
    return ConfigError(
        f"{what} at step {pos.step} of {total} (epoch {epoch}{at_lr}); lower "
        "'finetune.optimizer.lr' or set 'finetune.grad_clip', and check the data for extreme "
        f"values; {kept}",
        key="finetune",
    )


def _check_weights(T_net: nn.Module, pos: Position, total: int, saved: int | None) -> None:
    """Refuse to checkpoint NaN or Inf weights (a finite loss can still step them there)."""
    flags = [torch.isfinite(p).all() for p in nn.Module.parameters(T_net)]
    if flags and not bool(torch.stack(flags).all()):
        raise _diverged("the weights became NaN or Inf", pos, total, saved)


def _global_mean(loss: Tensor, world: _World) -> float:
    if world.size > 1:
        import torch.distributed as dist

        total = loss.clone()
        dist.all_reduce(total)
        return float(total) / world.size
    return float(loss)
