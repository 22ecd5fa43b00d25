"""Training data for fine-tuning: a safetensors file of tensors, or the user's own loaders.

Two kinds of data source, picked by :func:`load_data`:

* **A ``.safetensors`` file** holding ``inputs`` and ``targets`` (the first dimension counts
  samples), and optionally ``val_inputs`` and ``val_targets`` for evaluation. Inputs are
  floating point; targets are integer class indices (for ``cross_entropy``) or floating point
  (for ``mse``, or class probabilities), all finite. Fine-tuning batches it itself, in an
  order drawn from the run's seed, so runs repeat and resume exactly.
* **``"package.module:function"``**: a function, called with no arguments, that returns
  ``(train_loader, val_loader)`` (``val_loader`` may be ``None``) or just a training
  loader. A loader is any re-iterable of ``(inputs, targets)`` batches, such as a
  ``torch.utils.data.DataLoader``.

Example:
    >>> import tempfile, torch
    >>> from safetensors.torch import save_file
    >>> path = tempfile.mkdtemp() + "/data.safetensors"
    >>> save_file({"inputs": torch.zeros(6, 4), "targets": torch.zeros(6, dtype=torch.long)}, path)
    >>> data = load_data(path)
    >>> data.num_samples, data.val_inputs is None
    (6, True)
    >>> [len(b) for b in data.batch_indices(batch_size=4, epoch=0, seed=0)]
    [4, 2]
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from transform_core.errors import ConfigError, did_you_mean
from transform_core.imports import import_reference, is_reference

__all__ = ["DATA_TENSORS", "LoaderData", "TensorData", "load_data", "split_batch"]

DATA_TENSORS = ("inputs", "targets", "val_inputs", "val_targets")
"""The tensor names a data file may hold."""

_HINT = (
    "expected a .safetensors file with 'inputs' and 'targets' tensors, or "
    "'package.module:function' returning (train_loader, val_loader)"
)


@dataclass(frozen=True)
class TensorData:
    """Training (and optional validation) tensors from a data file.

    Attributes:
        inputs: Training inputs, samples along dim 0.
        targets: Training targets, one per sample.
        val_inputs: Validation inputs, or ``None``.
        val_targets: Validation targets, or ``None``.
        source: Where they came from, for messages.
    """

    inputs: Tensor
    targets: Tensor
    val_inputs: Tensor | None = None
    val_targets: Tensor | None = None
    source: str = "<tensors>"

    @property
    def num_samples(self) -> int:
        """The number of training samples."""
        return int(self.inputs.shape[0])

    def batch_indices(
        self, batch_size: int, epoch: int, seed: int, *, shuffle: bool = True
    ) -> list[Tensor]:
        """The sample indices of each global batch of one epoch.

        The order depends only on ``seed`` and ``epoch`` (not on any global random state),
        so a resumed run sees the batches an uninterrupted run would.
        """
        if shuffle:
            # Torch takes 64-bit seeds; wrapping keeps any integer seed (a negative one
            # wraps as torch wraps it).
            generator = torch.Generator().manual_seed((seed * 1_000_003 + epoch) % 2**64)
            order = torch.randperm(self.num_samples, generator=generator)
        else:
            order = torch.arange(self.num_samples)
        return list(torch.split(order, batch_size))

    def validation(self) -> tuple[Tensor, Tensor] | None:
        """The validation tensors, or ``None`` when the file has none."""
        if self.val_inputs is None or self.val_targets is None:
            return None
        return self.val_inputs, self.val_targets


@dataclass(frozen=True)
class LoaderData:
    """The user's own loaders of ``(inputs, targets)`` batches.

    Attributes:
        train: Re-iterable training batches; iterated once per epoch.
        val: Validation batches, or ``None``.
        source: The ``package.module:function`` reference.
    """

    train: Iterable[Any]
    val: Iterable[Any] | None
    source: str


Data = TensorData | LoaderData


def split_batch(batch: Any, source: str) -> tuple[Tensor, Tensor]:
    """Return ``(inputs, targets)`` of one batch from a user's loader.

    A batch is a pair ``(inputs, targets)`` or a mapping with those keys.

    Raises:
        ConfigError: For anything else.

    Example:
        >>> x, y = split_batch([torch.zeros(2, 3), torch.ones(2)], "<loader>")
        >>> tuple(x.shape), tuple(y.shape)
        ((2, 3), (2,))
    """
    if isinstance(batch, dict) and "inputs" in batch and "targets" in batch:
        batch = (batch["inputs"], batch["targets"])
    if (
        isinstance(batch, (tuple, list))
        and len(batch) == 2
        and all(isinstance(t, Tensor) for t in batch)
    ):
        return batch[0], batch[1]
    raise ConfigError(
        f"yielded a {type(batch).__name__} batch; expected (inputs, targets) tensors or a "
        "dict with 'inputs' and 'targets'",
        path=source,
    )


def _check_pair(inputs: Tensor, targets: Tensor, names: tuple[str, str], path: str) -> None:
    x_name, y_name = names
    if inputs.dim() < 1 or inputs.shape[0] == 0:
        raise ConfigError(
            f"has shape {tuple(inputs.shape)}; expected at least one sample along dim 0",
            path=path,
            key=x_name,
        )
    if not inputs.is_floating_point():
        raise ConfigError(
            f"has dtype {str(inputs.dtype).removeprefix('torch.')}; expected a floating-point "
            f"dtype (store it as float32)",
            path=path,
            key=x_name,
        )
    if targets.dtype == torch.bool or targets.is_complex():
        raise ConfigError(
            f"has dtype {str(targets.dtype).removeprefix('torch.')}; expected integer class "
            "indices (int64) or floating-point values",
            path=path,
            key=y_name,
        )
    if targets.dim() < 1 or targets.shape[0] != inputs.shape[0]:
        raise ConfigError(
            f"has shape {tuple(targets.shape)} but '{x_name}' has {inputs.shape[0]} sample(s) "
            f"(shape {tuple(inputs.shape)}); give one target per sample along dim 0",
            path=path,
            key=y_name,
        )


def _check_finite(tensor: Tensor, name: str, path: str) -> None:
    """Refuse NaN or Inf values: one such sample turns the loss, then every weight, into NaN."""
    if not tensor.is_floating_point():
        return
    finite = torch.isfinite(tensor)
    if bool(finite.all()):
        return
    bad = (~finite).reshape(tensor.shape[0], -1).any(dim=1) if tensor.dim() else ~finite
    samples = bad.nonzero().flatten().tolist() if tensor.dim() else []
    where = f" in {len(samples)} sample(s), first at index {samples[0]}" if samples else ""
    raise ConfigError(
        f"holds NaN or Inf values{where}; remove or fix those samples and save the file again",
        path=path,
        key=name,
    )


def _load_tensor_file(path: Path) -> TensorData:
    from transform_core.safetensors_io import is_safetensors, open_tensors

    label = str(path)
    if not is_safetensors(path):
        raise ConfigError(f"is not a safetensors file; {_HINT}", path=label)
    source = open_tensors(path)
    names = set(source.names)
    for name in sorted(names - set(DATA_TENSORS)):
        raise ConfigError(
            f"unexpected tensor '{name}'{did_you_mean(name, DATA_TENSORS)}; a data file holds "
            f"{', '.join(DATA_TENSORS)}",
            path=label,
            key=name,
        )
    for name in ("inputs", "targets"):
        if name not in names:
            raise ConfigError(
                f"missing tensor '{name}'; a data file needs 'inputs' and 'targets' "
                "(samples along dim 0)",
                path=label,
                key=name,
            )
    if ("val_inputs" in names) != ("val_targets" in names):
        have, lack = (
            ("val_inputs", "val_targets")
            if "val_inputs" in names
            else ("val_targets", "val_inputs")
        )
        raise ConfigError(
            f"has '{have}' but no '{lack}'; give both validation tensors or neither",
            path=label,
            key=lack,
        )
    tensors = {name: source.get(name) for name in names}
    for name in sorted(tensors):
        _check_finite(tensors[name], name, label)
    inputs, targets = tensors["inputs"], tensors["targets"]
    _check_pair(inputs, targets, ("inputs", "targets"), label)
    val_inputs, val_targets = tensors.get("val_inputs"), tensors.get("val_targets")
    if val_inputs is not None and val_targets is not None:
        _check_pair(val_inputs, val_targets, ("val_inputs", "val_targets"), label)
        if val_inputs.shape[1:] != inputs.shape[1:]:
            raise ConfigError(
                f"has sample shape {tuple(val_inputs.shape[1:])} but 'inputs' has "
                f"{tuple(inputs.shape[1:])}; validation samples must be shaped like training ones",
                path=label,
                key="val_inputs",
            )
        if val_targets.shape[1:] != targets.shape[1:] or (
            val_targets.is_floating_point() != targets.is_floating_point()
        ):
            raise ConfigError(
                f"has sample shape {tuple(val_targets.shape[1:])} and dtype "
                f"{str(val_targets.dtype).removeprefix('torch.')} but 'targets' has "
                f"{tuple(targets.shape[1:])} and {str(targets.dtype).removeprefix('torch.')}; "
                "make them match",
                path=label,
                key="val_targets",
            )
    return TensorData(inputs, targets, val_inputs, val_targets, source=label)


def _load_function(reference: str) -> LoaderData:
    function = import_reference(reference, noun="function", role="--data", fix=_HINT, key="--data")
    try:
        result = function()
    except Exception as err:  # the user's function can raise anything
        raise ConfigError(
            f"'{reference}' raised {type(err).__name__}: {err}", key="--data"
        ) from None
    except SystemExit as err:  # which would end rockq with the function's exit code
        call = "sys.exit()" if err.code is None else f"sys.exit({err.code!r})"
        raise ConfigError(
            f"'{reference}' called {call}; a --data function must return "
            "(train_loader, val_loader) instead of exiting",
            key="--data",
        ) from None
    train, val = result if isinstance(result, tuple) and len(result) == 2 else (result, None)
    for name, loader in (("training", train), ("validation", val)):
        if loader is None and name == "validation":
            continue
        if not isinstance(loader, Iterable) or isinstance(loader, (Tensor, str, bytes)):
            raise ConfigError(
                f"'{reference}' returned a {type(loader).__name__} as its {name} loader; "
                "expected an iterable of (inputs, targets) batches such as a DataLoader",
                key="--data",
            )
    if isinstance(train, Iterator):
        raise ConfigError(
            f"'{reference}' returned a one-shot iterator as its training loader; training "
            "iterates it once per epoch, so return a DataLoader or a list of batches",
            key="--data",
        )
    return LoaderData(train, val, source=reference)


def load_data(ref: str | Path) -> TensorData | LoaderData:
    """Load fine-tuning data from a safetensors file or a ``package.module:function``.

    An existing path is always read as a file; anything else must look like
    ``package.module:function``.

    Args:
        ref: The ``--data`` argument.

    Returns:
        :class:`TensorData` for a file, :class:`LoaderData` for a function.

    Raises:
        ConfigError: A missing file, an unknown, missing or malformed tensor (naming it,
            with its shape or dtype), a tensor holding NaN or Inf, a function that cannot be
            imported or returns something that is not a loader.
    """
    path = Path(ref)
    if path.is_file():
        return _load_tensor_file(path)
    text = str(ref)
    if path.is_dir():
        raise ConfigError(f"is a folder; {_HINT}", path=text)
    if is_reference(text):
        return _load_function(text)
    raise ConfigError(f"no such file; {_HINT}", path=text)
