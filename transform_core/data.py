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
  ``torch.utils.data.DataLoader``; a one-shot iterator (a generator) is refused as either
  loader, since training iterates one once per epoch and evaluation once per evaluation. An
  exception a loader raises while it is iterated (:func:`loader_batches`) is a one-line
  :class:`~transform_core.errors.ConfigError` naming ``--data``.

:func:`data_identity` says what data a run trained on, so that a resumed run can refuse
other data.

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

import hashlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from transform_core.errors import ConfigError, RockqError, did_you_mean
from transform_core.imports import import_reference, is_reference

__all__ = [
    "DATA_TENSORS",
    "LoaderData",
    "TensorData",
    "data_identity",
    "describe_identity",
    "first_line",
    "load_data",
    "loader_batches",
    "split_batch",
]

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

    def __post_init__(self) -> None:
        for name, loader in (("training", self.train), ("validation", self.val)):
            if isinstance(loader, Iterator):
                uses = (
                    "training iterates it once per epoch"
                    if name == "training"
                    else "evaluation iterates it once per evaluation"
                )
                raise ConfigError(
                    f"'{self.source}' returned a one-shot iterator as its {name} loader; "
                    f"{uses}, so return a DataLoader or a list of batches",
                    key="--data",
                )


Data = TensorData | LoaderData


def first_line(err: BaseException) -> str:
    """``type: first line of the message`` of an exception from the user's code, for a
    one-line error.

    An error a ``DataLoader`` worker re-raises holds the worker's traceback in its message;
    its last line is the original error.

    Example:
        >>> first_line(ValueError("bad config\\n line two")), first_line(KeyError("label"))
        ('ValueError: bad config', "KeyError: 'label'")
        >>> first_line(ValueError("Caught ValueError in DataLoader worker process 0.\\n"
        ...                       "Original Traceback (most recent call last):\\n"
        ...                       '  File "d.py", line 4\\nValueError: no label'))
        'ValueError: no label (in DataLoader worker process 0)'
    """
    lines = [line.strip() for line in str(err).strip().splitlines()]
    if len(lines) > 2 and lines[0].startswith("Caught ") and lines[1].startswith("Original Tr"):
        where = lines[0].split(" in ", 1)[-1].rstrip(".")
        return f"{lines[-1]} (in {where})"
    return f"{type(err).__name__}: {lines[0]}" if lines else type(err).__name__


def loader_batches(
    loader: Iterable[Any],
    source: str,
    role: str = "training",
    where: Callable[[], str] | None = None,
) -> Iterator[tuple[Tensor, Tensor]]:
    """The ``(inputs, targets)`` batches of a user's loader.

    ``iter(loader)`` is called at once (a ``DataLoader`` draws its shuffle from torch's
    global generator then), the batches are fetched lazily.

    Args:
        loader: The user's loader.
        source: Its ``package.module:function`` reference.
        role: ``training`` or ``validation``, for messages.
        where: Says where the run is (``"at step 3 of 12 (epoch 1)"``), for messages.

    Raises:
        ConfigError: The loader raised an exception (naming ``--data``, the exception's
            first line and ``where``), or yielded something that is not a batch.

    Example:
        >>> def broken():
        ...     yield torch.zeros(2, 3), torch.zeros(2)
        ...     raise KeyError("label")
        >>> class Loader:
        ...     def __iter__(self):
        ...         return broken()
        >>> batches = loader_batches(Loader(), "pkg.data:loaders")
        >>> tuple(next(batches)[0].shape)
        (2, 3)
        >>> try:
        ...     next(batches)
        ... except ConfigError as err:
        ...     print(err)
        --data: the training loader of 'pkg.data:loaders' raised KeyError: 'label'; fix the loader
    """

    def failed(err: Exception) -> ConfigError:
        at = where() if where is not None else ""
        return ConfigError(
            f"the {role} loader of '{source}' raised {first_line(err)}{' ' + at if at else ''}; "
            "fix the loader",
            key="--data",
        )

    def fetch(iterator: Iterator[Any]) -> Iterator[tuple[Tensor, Tensor]]:
        while True:
            try:
                batch = next(iterator)
            except StopIteration:
                return
            except RockqError:
                raise
            except Exception as err:  # the user's loader can raise anything
                raise failed(err) from err
            yield split_batch(batch, source)

    try:
        iterator = iter(loader)
    except RockqError:
        raise
    except Exception as err:
        raise failed(err) from err
    return fetch(iterator)


def data_identity(data: TensorData | LoaderData) -> dict[str, Any]:
    """What identifies the data a run trains on, as JSON: recorded in a run's checkpoint so
    that a resumed run can refuse other data.

    For tensors: the sample counts and a SHA-256 of the tensors (their dtypes, shapes and
    bytes), so the same data under another file name is the same data. For a loader
    function: its reference and its number of batches (``None`` without ``len()``).

    Example:
        >>> data = TensorData(torch.zeros(4, 2), torch.zeros(4, dtype=torch.long))
        >>> identity = data_identity(data)
        >>> identity["samples"], len(identity["sha256"])
        (4, 64)
        >>> describe_identity(data_identity(LoaderData([(data.inputs, data.targets)], None, "p.m:f")))
        "'p.m:f' with 1 batch(es) per epoch"
    """
    if isinstance(data, TensorData):
        digest = hashlib.sha256()
        for tensor in (data.inputs, data.targets, data.val_inputs, data.val_targets):
            if tensor is None:
                digest.update(b"none;")
                continue
            digest.update(f"{tensor.dtype}{tuple(tensor.shape)};".encode())
            raw = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
            for chunk in torch.split(raw, 1 << 26):  # 64 MiB copies at a time
                digest.update(chunk.numpy().tobytes())
        val = None if data.val_inputs is None else int(data.val_inputs.shape[0])
        return {
            "kind": "tensors",
            "samples": data.num_samples,
            "val_samples": val,
            "sha256": digest.hexdigest(),
        }
    try:
        batches: int | None = len(data.train)  # type: ignore[arg-type]
    except TypeError:
        batches = None
    return {"kind": "loader", "source": data.source, "batches": batches}


def describe_identity(identity: dict[str, Any]) -> str:
    """A :func:`data_identity` in words, for messages."""
    if identity.get("kind") == "tensors":
        val = identity.get("val_samples")
        counts = f"{identity.get('samples')} training" + (
            f" and {val} validation samples" if val else " samples"
        )
        return f"{counts}, sha256 {str(identity.get('sha256'))[:12]}"
    if identity.get("kind") == "loader":
        batches = identity.get("batches")
        count = "no len()" if batches is None else f"{batches} batch(es) per epoch"
        return f"'{identity.get('source')}' with {count}"
    return "unknown data"


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
        # Its first line: the error stays one line, whatever the function's message.
        raise ConfigError(f"'{reference}' raised {first_line(err)}", key="--data") from None
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
    # LoaderData refuses one-shot iterators.
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
            imported, raises, or returns something that is not a loader (a one-shot iterator
            included).
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
