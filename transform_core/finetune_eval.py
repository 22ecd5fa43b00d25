"""Losses and evaluation for fine-tuning: what the network's output is compared with, and how.

The loss sees the network's output with a ``(batch, time, channels)`` output reduced over
time as ``reduce_time`` says; a loss that cannot compare outputs with the data's targets is
refused with both shapes. :func:`evaluate` measures mean loss and accuracy; fine-tuning
evaluates a burned-in copy of the patched network (:func:`burned_copy`), so the figures are
those the deployed, quantised network will have.

Example:
    >>> import torch
    >>> from transform_core.finetune_config import FinetuneConfig
    >>> config = FinetuneConfig(loss="mse", metric="loss")
    >>> batches = [(torch.ones(3), torch.zeros(3))]  # outputs (3,): no classes, no accuracy
    >>> evaluate(torch.nn.Identity(), batches, config, torch.device("cpu"))
    {'loss': 1.0, 'accuracy': None}
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from transform_core.data import LoaderData, TensorData, split_batch
from transform_core.errors import ConfigError
from transform_core.finetune_config import FinetuneConfig
from transform_core.imports import import_reference
from transform_core.patching import apply_T, remove_T_net

__all__ = [
    "burned_copy",
    "compute_loss",
    "evaluate",
    "loss_function",
    "prepare_output",
    "train_eval_batches",
    "validation_batches",
]


def loss_function(name: str) -> Callable[[Tensor, Tensor], Tensor]:
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
    net: nn.Module, x: Tensor, y: Tensor, config: FinetuneConfig, loss_fn: Callable[..., Tensor]
) -> tuple[Tensor, Tensor]:
    out = prepare_output(net(x), y, config.reduce_time)
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
    return list(zip(torch.split(x, batch_size * 4), torch.split(y, batch_size * 4), strict=True))


def train_eval_batches(
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
    loss_fn = loss_function(config.loss)
    total = hits = 0
    loss_sum = 0.0
    accurate = True
    for x, y in batches:
        x, y = x.to(device), y.to(device)
        loss, out = compute_loss(net, x, y, config, loss_fn)
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
