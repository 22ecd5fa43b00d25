"""Losses and evaluation for fine-tuning: what the network's output is compared with, and how.

The loss sees the network's output with a ``(batch, time, channels)`` output reduced over
time as ``reduce_time`` says; a loss that cannot compare outputs with the data's targets is
refused with both shapes (``mse`` wants targets shaped like the outputs). A custom loss must
take ``(outputs, targets)`` and return a scalar tensor that autograd can differentiate.
:func:`check_data_fits` runs the first batch through the network and the loss before a run
starts, so data the network cannot take is refused naming the data. :func:`evaluate`
measures mean loss and accuracy; fine-tuning evaluates a burned-in copy of the patched
network (:func:`burned_copy`), so the figures are those the deployed, quantised network
will have.

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
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from transform_core.data import LoaderData, TensorData, split_batch
from transform_core.errors import ConfigError
from transform_core.finetune_config import LOSSES, FinetuneConfig
from transform_core.imports import import_reference
from transform_core.patching import apply_T, remove_T_net

__all__ = [
    "apply_loss",
    "burned_copy",
    "check_data_fits",
    "compute_loss",
    "evaluate",
    "loss_function",
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


def check_data_fits(
    T_net: nn.Module,
    data: TensorData | LoaderData,
    config: FinetuneConfig,
    loss_fn: Callable[..., Tensor],
    device: torch.device,
) -> None:
    """Run the first training batch through a burned-in copy of ``T_net`` and the loss.

    The copy carries copies of the generators, so training's random streams are untouched.

    Raises:
        ConfigError: Inputs the network cannot take, naming the data and ``inputs`` with
            torch's complaint; targets or a loss that do not fit (see :func:`apply_loss`).

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
        x, y = data.inputs[: config.batch_size], data.targets[: config.batch_size]
    else:
        first = next(iter(data.train), None)
        if first is None:
            return  # no batch: evaluation reports the empty data
        x, y = split_batch(first, data.source)
    if x.dim() == 0 or x.shape[0] == 0:
        return
    net = burned_copy(T_net)
    net.eval()
    x, y = x.to(device), y.to(device)
    try:
        output = net(x)
    except (RuntimeError, ValueError, IndexError) as err:
        if isinstance(err, torch.cuda.OutOfMemoryError):  # not the data's fault
            raise
        first_line = str(err).splitlines()[0] if str(err) else ""
        raise ConfigError(
            f"the network cannot take samples of shape {tuple(x.shape[1:])} "
            f"({str(x.dtype).removeprefix('torch.')}): {type(err).__name__}: {first_line}; "
            "check --data matches the network's input (if it does, the fault is in the "
            "network)",
            path=data.source,
            key="inputs",
        ) from err
    apply_loss(prepare_output(output, y, config.reduce_time), y, config, loss_fn, data.source)


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


def validation_batches(
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
    return _chunks(x, y, batch_size)


def train_eval_batches(
    data: TensorData | LoaderData, batch_size: int
) -> Iterable[tuple[Tensor, Tensor]]:
    if isinstance(data, LoaderData):
        return (split_batch(b, data.source) for b in data.train)
    return _chunks(data.inputs, data.targets, batch_size)


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


def burned_copy(T_net: nn.Module) -> nn.Module:
    # A copy carries copies of the generators, so the training stream is not disturbed.
    return remove_T_net(apply_T(T_net, inplace=False), inplace=True)
