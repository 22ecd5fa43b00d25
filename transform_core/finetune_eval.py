"""Losses and evaluation for fine-tuning: what the network's output is compared with, and how.

The loss sees the network's output with a ``(batch, time, channels)`` output reduced over
time as ``reduce_time`` says; a loss that cannot compare outputs with the data's targets is
refused with both shapes (``mse`` wants targets shaped like the outputs), and for
``cross_entropy`` a class index outside the outputs' classes is refused naming it. A custom
loss must take ``(outputs, targets)`` and return a scalar tensor that autograd can
differentiate. :func:`check_data_fits` runs the first batch through the network (in
evaluation and in training mode) and the loss before a run starts, so data the network
cannot take is refused naming the data. :func:`evaluate` measures mean loss and accuracy
(accuracy only where the outputs have classes and the targets name them). Fine-tuning
evaluates :func:`burned_copy`: the network a later ``rockq burn-in`` of the run's checkpoint
writes, random draws included, so the figures are those of that file.

Example:
    >>> import torch
    >>> from transform_core.finetune_config import FinetuneConfig
    >>> config = FinetuneConfig(loss="mse", metric="loss")
    >>> batches = [(torch.ones(3), torch.zeros(3))]  # outputs (3,): no classes, no accuracy
    >>> evaluate(torch.nn.Identity(), batches, config, torch.device("cpu"))
    {'loss': 1.0, 'accuracy': None}
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from transform_core.data import LoaderData, TensorData, first_line, loader_batches
from transform_core.errors import ConfigError, RockqError
from transform_core.finetune_config import LOSSES, FinetuneConfig
from transform_core.imports import import_reference
from transform_core.patching import apply_T, remove_T_net

if TYPE_CHECKING:
    from transform_core.pipeline import Plan

__all__ = [
    "accuracy_problem",
    "apply_loss",
    "burned_copy",
    "check_data_fits",
    "compute_loss",
    "evaluate",
    "loss_function",
    "network_failed",
    "prepare_output",
    "train_eval_batches",
    "validation_batches",
]


_LOSS_FIX = "a loss must be a function f(outputs, targets) -> scalar tensor"


def _mse(out: Tensor, y: Tensor) -> Tensor:
    """Mean squared error; targets must be shaped like the outputs (torch would broadcast).

    Example:
        >>> try:
        ...     _mse(torch.zeros(2, 3), torch.zeros(2, dtype=torch.long))
        ... except ValueError as err:
        ...     print(err)
        mse needs targets shaped like the outputs (class indices need 'loss: cross_entropy')
    """
    if out.shape != y.shape:
        hint = "" if y.is_floating_point() else " (class indices need 'loss: cross_entropy')"
        raise ValueError(f"mse needs targets shaped like the outputs{hint}")
    return F.mse_loss(out, y.to(out.dtype))


def loss_function(name: str) -> Callable[[Tensor, Tensor], Tensor]:
    """The loss a config names: built in, or imported and checked to take two arguments.

    Example:
        >>> loss_function("mse")(torch.ones(2), torch.zeros(2))
        tensor(1.)
        >>> try:
        ...     loss_function("math:sqrt")
        ... except ConfigError as err:
        ...     print(err)
        finetune.loss: 'math:sqrt' cannot be called as f(outputs, targets) (too many positional arguments); a loss must be a function f(outputs, targets) -> scalar tensor
    """
    if name == "cross_entropy":
        return F.cross_entropy
    if name == "mse":
        return _mse
    function = import_reference(
        name, noun="function", role="loss", fix=_LOSS_FIX, key="finetune.loss"
    )
    try:
        signature = inspect.signature(function)
    except (TypeError, ValueError):  # some built-ins have none: calling them will tell
        return function
    try:
        signature.bind(None, None)
    except TypeError as err:
        raise ConfigError(
            f"'{name}' cannot be called as f(outputs, targets) ({err}); {_LOSS_FIX}",
            key="finetune.loss",
        ) from None
    return function


def prepare_output(output: Any, targets: Tensor, reduce_time: str | None) -> Tensor:
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


def compute_loss(
    net: nn.Module,
    x: Tensor,
    y: Tensor,
    config: FinetuneConfig,
    loss_fn: Callable[..., Tensor],
    source: str | None = None,
) -> tuple[Tensor, Tensor]:
    """The loss of ``net`` on one batch, and the output the loss saw.

    ``source`` (the data's file or reference) is named by the errors about targets.
    """
    out = prepare_output(net(x), y, config.reduce_time)
    return apply_loss(out, y, config, loss_fn, source), out


def _exit_call(code: object) -> str:
    return "sys.exit()" if code is None else f"sys.exit({code!r})"


def apply_loss(
    out: Tensor,
    y: Tensor,
    config: FinetuneConfig,
    loss_fn: Callable[..., Tensor],
    source: str | None = None,
) -> Tensor:
    """``loss_fn(out, y)``, checked to be a scalar tensor (differentiable when grad is on).

    Raises:
        ConfigError: A loss that cannot compare ``out`` with ``y`` (naming ``source`` and
            ``targets``), or a custom loss that fails, exits or returns anything else
            (naming ``finetune.loss``).

    Example:
        >>> config = FinetuneConfig(loss="mse")
        >>> try:
        ...     apply_loss(torch.ones(2, 3), torch.zeros(2), config, _mse, "d.safetensors")
        ... except ConfigError as err:
        ...     print(err)
        d.safetensors: targets: loss 'mse' cannot compare outputs (2, 3) with targets (2,) (float32): mse needs targets shaped like the outputs; check the data's targets, 'loss' and 'reduce_time'
    """
    custom = config.loss not in LOSSES
    classes = _class_count(out, y) if config.loss == "cross_entropy" else None
    if classes is not None:
        # Checked here: on a GPU torch would stop the process with a device-side assert.
        bad = _first_bad_class(y, classes)
        if bad is not None:
            index, value = bad
            raise ConfigError(
                f"loss 'cross_entropy' got class index {value} (target {index} of a batch), but "
                f"the outputs {tuple(out.shape)} give {classes} classes (indices 0 to "
                f"{classes - 1}); {_CLASS_FIX}",
                path=source,
                key="targets",
            )
    try:
        loss = loss_fn(out, y)
    except (RuntimeError, ValueError, IndexError) as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ConfigError(
            f"loss '{config.loss}' cannot compare outputs {tuple(out.shape)} with targets "
            f"{tuple(y.shape)} ({str(y.dtype).removeprefix('torch.')}): {first}; check the "
            "data's targets, 'loss' and 'reduce_time'",
            path=source,
            key="targets",
        ) from (err if custom else None)
    except SystemExit as err:
        raise ConfigError(
            f"loss '{config.loss}' called {_exit_call(err.code)}; it must return a scalar "
            "tensor instead of exiting",
            key="finetune.loss",
        ) from None
    except Exception as err:
        if not custom:
            raise
        first = str(err).splitlines()[0] if str(err) else ""
        raise ConfigError(
            f"loss '{config.loss}' raised {type(err).__name__}: {first}; fix the function "
            f"({_LOSS_FIX})",
            key="finetune.loss",
        ) from err
    problem = _loss_problem(loss, out)
    if problem:
        raise ConfigError(f"loss '{config.loss}' {problem}", key="finetune.loss")
    return loss.reshape(())


def _loss_problem(loss: Any, out: Tensor) -> str:
    """What is wrong with a loss's return value, or ``''``.

    Example:
        >>> out = torch.ones(4, 2)
        >>> _loss_problem(1.0, out), _loss_problem(out.sum(dim=1), out)
        ('returned a float; it must return a scalar tensor', 'returned a tensor of shape (4,); it must return a scalar tensor (reduce it, for example with .mean())')
    """
    if not isinstance(loss, Tensor):
        return f"returned a {type(loss).__name__}; it must return a scalar tensor"
    if loss.numel() != 1:
        return (
            f"returned a tensor of shape {tuple(loss.shape)}; it must return a scalar tensor "
            "(reduce it, for example with .mean())"
        )
    if not loss.is_floating_point():
        return (
            f"returned a {str(loss.dtype).removeprefix('torch.')} tensor; it must return a "
            "floating-point scalar tensor"
        )
    if torch.is_grad_enabled() and out.requires_grad and not loss.requires_grad:
        return (
            "returned a tensor that autograd cannot differentiate (no grad_fn); compute it "
            "from the outputs with torch operations, without .item(), .detach() or "
            "torch.tensor(...)"
        )
    return ""


_CLASS_FIX = "fix the targets, or give the network as many outputs as there are classes"
# cross_entropy's default ignore_index: targets that are skipped, not class indices.
_IGNORE_INDEX = -100
_NETWORK_FIX = "check --data matches the network's input (if it does, the fault is in the network)"
_BATCH_OF_ONE = "layers such as BatchNorm need 2 or more samples per batch in training"
_ACCURACY_NEEDS = (
    "needs (batch, classes) outputs with 2 or more classes and class-index or one-hot targets"
)


def _class_count(out: Tensor, targets: Tensor) -> int | None:
    """The outputs' classes (dim 1) where ``targets`` are class indices for them, else
    ``None``: integer targets with one dimension fewer than the outputs."""
    if (
        targets.is_floating_point()
        or targets.dtype == torch.bool
        or out.dim() < 2
        or targets.dim() != out.dim() - 1
    ):
        return None
    return int(out.shape[1])


def _first_bad_class(targets: Tensor, classes: int) -> tuple[int, int] | None:
    """The sample (index along dim 0) and value of the first target that is not a class
    index below ``classes``, or ``None``; torch's ``ignore_index`` (-100) is allowed.

    Example:
        >>> _first_bad_class(torch.tensor([0, 2, -100, 1]), 3)
        >>> _first_bad_class(torch.tensor([0, 2, 3, 1]), 3)
        (2, 3)
    """
    if targets.numel() == 0:
        return None
    low, high = (int(v) for v in torch.aminmax(targets))  # one pass, one sync
    if low >= 0 and high < classes:
        return None
    bad = ((targets < 0) & (targets != _IGNORE_INDEX)) | (targets >= classes)
    per_sample = bad.reshape(bad.shape[0], -1).any(dim=1)
    if not bool(per_sample.any()):
        return None
    index = int(per_sample.nonzero()[0, 0])
    return index, int(targets[index][bad[index]].flatten()[0])


def _samples(n: int) -> str:
    return f"{n} sample" if n == 1 else f"{n} samples"


def network_failed(err: Exception, x: Tensor, source: str, when: str, one_fix: str) -> ConfigError:
    """The one-line error for a network that raised on a batch of the data.

    Args:
        err: What the network raised (a torch ``RuntimeError``, ``ValueError`` or
            ``IndexError``).
        x: The batch of inputs.
        source: The data's file or reference.
        when: What the network did (``"failed in training at step 3 of 12 (epoch 1)"``).
        one_fix: The fix for a batch of a single sample, which layers such as BatchNorm
            cannot take in training mode.

    Example:
        >>> err = ValueError("Expected more than 1 value per channel when training")
        >>> print(network_failed(err, torch.zeros(1, 4), "d", "fails in training mode",
        ...                      "use larger batches"))
        d: inputs: the network fails in training mode on a batch of 1 sample of shape (4,) (float32): ValueError: Expected more than 1 value per channel when training; layers such as BatchNorm need 2 or more samples per batch in training: use larger batches
    """
    n = int(x.shape[0]) if x.dim() else 0
    fix = f"{_BATCH_OF_ONE}: {one_fix}" if n == 1 else _NETWORK_FIX
    return ConfigError(
        f"the network {when} on a batch of {_samples(n)} of shape {tuple(x.shape[1:])} "
        f"({str(x.dtype).removeprefix('torch.')}): {first_line(err)}; {fix}",
        path=source,
        key="inputs",
    )


def _is_network_error(err: BaseException) -> bool:
    """Whether ``err``, raised by a network's forward pass, is torch's complaint about the
    data (shapes, sizes, values) rather than rockq's own error or a lack of memory."""
    return isinstance(err, (RuntimeError, ValueError, IndexError)) and not isinstance(
        err, (RockqError, torch.cuda.OutOfMemoryError)
    )


def check_data_fits(
    T_net: nn.Module,
    data: TensorData | LoaderData,
    config: FinetuneConfig,
    loss_fn: Callable[..., Tensor],
    device: torch.device,
    *,
    plan: Plan | None = None,
    smallest_batch: int | None = None,
    processes: int = 1,
) -> None:
    """Check, before a run, that the network, the loss and the metric can use the data.

    The first training batch goes through a copy of ``T_net`` (burned in with ``plan``;
    without it, the raw network, which takes the same inputs) in evaluation mode, then
    the loss; then through the copy in training mode, also cut to ``smallest_batch``
    samples, the smallest batch the run will train on. For tensor data every class index
    is checked against the outputs' classes (for ``cross_entropy``), naming the sample.
    Training's random streams are untouched.

    Args:
        T_net: The patched network.
        data: The data.
        config: The ``finetune:`` section.
        loss_fn: The loss (see :func:`loss_function`).
        device: Where to run.
        plan: The plan ``T_net`` was patched with.
        smallest_batch: The fewest samples one process trains on in a step.
        processes: How many processes share each batch, for messages.

    Raises:
        ConfigError: An empty training loader; inputs the network cannot take (in
            evaluation or training mode: a batch of one sample, which BatchNorm refuses, is
            named with the fix), naming the data and ``inputs`` with torch's complaint; a
            class index out of range, naming the sample; targets or a loss that do not fit
            (see :func:`apply_loss`); ``metric: accuracy`` for outputs without classes.

    Example:
        >>> data = TensorData(torch.zeros(4, 5), torch.zeros(4, dtype=torch.long), source="d")
        >>> try:
        ...     check_data_fits(nn.Linear(4, 3), data, FinetuneConfig(), F.cross_entropy,
        ...                     torch.device("cpu"))
        ... except ConfigError as err:
        ...     print(err)
        d: inputs: the network cannot take samples of shape (5,) (float32): RuntimeError: mat1 and mat2 shapes cannot be multiplied (4x5 and 4x3); check --data matches the network's input (if it does, the fault is in the network)
    """
    if isinstance(data, TensorData):
        if data.num_samples == 0:
            raise ConfigError("holds no training samples; give at least one", path=data.source)
        x, y = data.inputs[: config.batch_size], data.targets[: config.batch_size]
    else:
        first = next(loader_batches(data.train, data.source), None)
        if first is None:
            raise ConfigError(
                f"the training loader of '{data.source}' yielded no batches; it must yield "
                "(inputs, targets) batches each time it is iterated",
                key="--data",
            )
        x, y = first
    if x.dim() == 0 or x.shape[0] == 0:
        return
    net = burned_copy(T_net, plan) if plan is not None else remove_T_net(T_net, inplace=False)
    net.eval()
    x, y = x.to(device), y.to(device)
    try:
        output = net(x)
    except Exception as err:
        if not _is_network_error(err):
            raise
        raise ConfigError(
            f"the network cannot take samples of shape {tuple(x.shape[1:])} "
            f"({str(x.dtype).removeprefix('torch.')}): {first_line(err)}; {_NETWORK_FIX}",
            path=data.source,
            key="inputs",
        ) from err
    out = prepare_output(output, y, config.reduce_time)
    if isinstance(data, TensorData) and config.loss == "cross_entropy":
        _check_class_indices(data, out)
    apply_loss(out, y, config, loss_fn, data.source)
    if config.metric == "accuracy":
        problem = accuracy_problem(out, y)
        if problem:
            raise ConfigError(problem, key="finetune.metric")
    _check_training_mode(net, x, data, config, smallest_batch, processes)


def _check_class_indices(data: TensorData, out: Tensor) -> None:
    """Refuse a class index that the outputs have no class for, anywhere in the data."""
    for name, targets in (("targets", data.targets), ("val_targets", data.val_targets)):
        classes = None if targets is None else _class_count(out, targets)
        if targets is None or classes is None:
            continue
        bad = _first_bad_class(targets, classes)
        if bad is not None:
            index, value = bad
            raise ConfigError(
                f"sample {index} holds class index {value}, but the network gives {classes} "
                f"classes (indices 0 to {classes - 1}); {_CLASS_FIX}",
                path=data.source,
                key=name,
            )


@torch.no_grad()
def _check_training_mode(
    net: nn.Module,
    x: Tensor,
    data: TensorData | LoaderData,
    config: FinetuneConfig,
    smallest_batch: int | None,
    processes: int,
) -> None:
    """Run the first batch through ``net`` in training mode, and its smallest batch."""
    if isinstance(data, TensorData):
        split = f", split over {processes} processes" if processes > 1 else ""
        one_fix = (
            f"set finetune.batch_size so that no batch holds a single sample "
            f"({data.num_samples} samples in batches of {config.batch_size}{split})"
        )
    else:
        one_fix = "drop the last partial batch (DataLoader(drop_last=True)) or use larger batches"
    sizes = [int(x.shape[0])]
    if smallest_batch is not None and 0 < smallest_batch < sizes[0]:
        sizes.append(smallest_batch)
    net.train()
    for size in sizes:
        try:
            net(x[:size])
        except Exception as err:
            if not _is_network_error(err):
                raise
            raise network_failed(
                err, x[:size], data.source, "fails in training mode", one_fix
            ) from err


def _class_labels(out: Tensor, y: Tensor) -> Tensor | None:
    """The class each sample's target names, or ``None`` where there are no classes.

    Classes need ``(batch, classes)`` outputs with 2 or more classes, and targets that are
    class indices, or probabilities over the classes (one-hot included): a regression's
    float targets shaped like its outputs name no class.

    Example:
        >>> _class_labels(torch.zeros(2, 3), torch.tensor([[0.0, 1.0, 0.0], [0.2, 0.3, 0.5]]))
        tensor([1, 2])
        >>> _class_labels(torch.zeros(2, 1), torch.tensor([[0.5], [2.0]])) is None
        True
    """
    if out.dim() != 2 or out.shape[1] < 2:
        return None
    if not y.is_floating_point():
        return y if y.dim() == 1 and y.dtype != torch.bool else None
    if y.shape != out.shape:
        return None
    sums = y.sum(dim=1, dtype=torch.float32)
    if not bool((y >= 0).all()) or not torch.allclose(sums, torch.ones_like(sums), atol=1e-3):
        return None
    return y.argmax(dim=-1)


def _accuracy_hits(out: Tensor, y: Tensor) -> int | None:
    labels = _class_labels(out, y)
    return None if labels is None else int((out.argmax(dim=-1) == labels).sum())


def accuracy_problem(out: Tensor, y: Tensor) -> str:
    """Why accuracy cannot be measured on outputs ``out`` with targets ``y``, or ``''``.

    Example:
        >>> accuracy_problem(torch.zeros(4, 1), torch.zeros(4, 1))
        "'accuracy' needs (batch, classes) outputs with 2 or more classes and class-index or one-hot targets, got outputs (4, 1) and targets (4, 1) (float32); set 'metric: loss'"
    """
    if _class_labels(out, y) is not None:
        return ""
    return (
        f"'accuracy' {_ACCURACY_NEEDS}, got outputs {tuple(out.shape)} and targets "
        f"{tuple(y.shape)} ({str(y.dtype).removeprefix('torch.')}); set 'metric: loss'"
    )


def validation_batches(
    data: TensorData | LoaderData, batch_size: int
) -> Iterable[tuple[Tensor, Tensor]] | None:
    if isinstance(data, LoaderData):
        if data.val is None:
            return None
        return loader_batches(data.val, data.source, "validation", _evaluating)
    val = data.validation()
    if val is None:
        return None
    x, y = val
    return _chunks(x, y, batch_size)


def train_eval_batches(
    data: TensorData | LoaderData, batch_size: int
) -> Iterable[tuple[Tensor, Tensor]]:
    if isinstance(data, LoaderData):
        return loader_batches(data.train, data.source, "training", _evaluating)
    return _chunks(data.inputs, data.targets, batch_size)


def _evaluating() -> str:
    return "while evaluating"


def _chunks(x: Tensor, y: Tensor, batch_size: int) -> list[tuple[Tensor, Tensor]]:
    """Evaluation batches of four training batches each, capped at all samples.

    The cap keeps a huge ``batch_size`` within torch's 64-bit sizes.

    Example:
        >>> [tuple(b.shape) for b, _ in _chunks(torch.zeros(10, 2), torch.zeros(10), 2**62)]
        [(10, 2)]
    """
    size = max(1, min(batch_size * 4, int(x.shape[0])))
    return list(zip(torch.split(x, size), torch.split(y, size), strict=True))


@torch.no_grad()
def evaluate(
    net: nn.Module,
    batches: Iterable[tuple[Tensor, Tensor]],
    config: FinetuneConfig,
    device: torch.device,
    source: str | None = None,
) -> dict[str, float | None]:
    """Mean loss and accuracy of ``net`` (put in eval mode) over ``batches``.

    ``source`` (the data's file or reference) is named by errors about the targets.

    Returns:
        ``{"loss": ..., "accuracy": ...}``; accuracy is ``None`` where outputs are not
        ``(batch, classes)`` with 2 or more classes, or the targets are neither class
        indices nor probabilities over the classes (one-hot).

    Example:
        >>> net = nn.Linear(2, 2)
        >>> with torch.no_grad():
        ...     _ = net.weight.copy_(torch.eye(2)); _ = net.bias.zero_()
        >>> x, y = torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([0, 0])
        >>> evaluate(net, [(x, y)], FinetuneConfig(), torch.device("cpu"))["accuracy"]
        0.5
    """
    net.eval()
    loss_fn = loss_function(config.loss)
    total = hits = 0
    loss_sum = 0.0
    accurate = True
    for x, y in batches:
        x, y = x.to(device), y.to(device)
        loss, out = compute_loss(net, x, y, config, loss_fn, source)
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


def burned_copy(T_net: nn.Module, plan: Plan) -> nn.Module:
    """A burned-in, un-patched copy of ``T_net``: the network that ``rockq burn-in`` writes
    from a checkpoint of ``T_net``'s raw weights.

    ``T_net`` and its random streams are left alone. The copy is made from its raw weights,
    patched again with ``plan`` on the CPU, so that each random transform draws from a fresh
    generator seeded from ``plan.seed`` and the tensor's name, and burned in as
    :func:`~transform_core.pipeline.burn_in` does it (scale-group ranges fixed from the raw
    values, the tensor chains rather than the compiled kernels). Its metric is therefore
    the metric of the file a later ``rockq burn-in`` writes, stochastic rounding included.

    Args:
        T_net: A network patched with ``plan``.
        plan: The plan it was patched with (its seed is the checkpoint's ``rockq.seed``).

    Returns:
        The burned-in network, un-patched, on ``T_net``'s device.
    """
    from transform_core.groups import frozen_ranges
    from transform_core.kernels import compiled
    from transform_core.pipeline import patch_network

    device = next(
        (t.device for t in (*nn.Module.parameters(T_net), *nn.Module.buffers(T_net))),
        torch.device("cpu"),
    )
    raw = remove_T_net(T_net, inplace=False).to("cpu")
    patched = patch_network(raw, plan, inplace=True)
    with compiled(False), frozen_ranges(patched):
        apply_T(patched, inplace=True, on_tensor=_ignore)
    return remove_T_net(patched, inplace=True).to(device)


def _ignore(name: str, raw: Tensor, value: Tensor) -> None:
    """An ``on_tensor`` callback that does nothing: :func:`apply_T` then takes the path
    that :func:`~transform_core.pipeline.burn_in` takes."""
