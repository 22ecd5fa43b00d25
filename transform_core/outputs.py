"""Writing quantised outputs: the tensors and, beside them, the report as JSON and Markdown.

All three files appear together or not at all. :func:`write_burned` serves a network (from
``quantize`` or ``burn-in``), :func:`write_burned_tensors` a bare tensor file, streamed one
tensor at a time.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import Tensor, nn

    from transform_core.checkpoint import SourceInfo
    from transform_core.pipeline import Plan
    from transform_core.recipe import Recipe
    from transform_core.report import Report
    from transform_core.safetensors_io import TensorSource

Progress = Callable[[str], None]


def report_files(output: Path) -> tuple[Path, Path, Path]:
    """The files of a quantised output: the tensors, and the report as JSON and as Markdown.

    Example:
        >>> [p.name for p in report_files(Path("out/net.safetensors"))]
        ['net.safetensors', 'net.report.json', 'net.report.md']
    """
    stem = output.name.removesuffix(".safetensors")
    return output, output.with_name(stem + ".report.json"), output.with_name(stem + ".report.md")


def write_burned(
    net: nn.Module,
    plan: Plan,
    output: Path,
    *,
    source: SourceInfo,
    input_sha256: str | None = None,
    meta: Mapping[str, Any] | None = None,
    force: bool = False,
    inputs: Sequence[Path] = (),
    progress: Progress | None = None,
    refuse_nonfinite: bool = False,
) -> Report:
    """Patch ``net``, burn it in, and write the tensors and both reports.

    Args:
        net: The network ``plan`` was made for; it is patched and burned in place.
        plan: From :func:`~transform_core.pipeline.plan_network`.
        output: The ``.safetensors`` file; the reports go beside it.
        source: The :class:`~transform_core.checkpoint.SourceInfo` of the network.
        input_sha256: The SHA-256 of the file read (default: ``source``'s).
        meta: More facts for the report.
        force: Replace existing output files.
        inputs: The files this run reads, which are never overwritten.
        progress: Called with each tensor's name as it is burned in.
        refuse_nonfinite: Write nothing if a transformed tensor holds NaN or Inf: for
            finite inputs, values its transform could not represent.

    Returns:
        The :class:`~transform_core.report.Report` that was written.

    Raises:
        CheckpointError: An output may not be written; checked before any work.
        ConfigError: With ``refuse_nonfinite``, a transformed tensor holds NaN or Inf.
    """
    from transform_core.pipeline import burn_in, patch_network
    from transform_core.safetensors_io import save_safetensors

    _check_outputs_free(output, force, inputs)
    burned, report = burn_in(
        patch_network(net, plan, inplace=True),
        plan,
        progress=progress,
        meta=_report_meta(plan, source) | dict(meta or {}),
    )
    if refuse_nonfinite:
        _refuse_nonfinite(report)
    metadata = _metadata(plan, source.sha256 if input_sha256 is None else input_sha256)
    with _report_outputs(output, force, inputs) as (tmp, write_reports):
        save_safetensors(burned.state_dict(), tmp, metadata, force=True)
        write_reports(report)
    return report


def write_burned_tensors(
    reader: TensorSource,
    recipe: Recipe,
    output: Path,
    *,
    source: SourceInfo | Callable[[], SourceInfo],
    seed: int | None = None,
    force: bool = False,
    inputs: Sequence[Path] = (),
    check: Callable[[str, Tensor], None] | None = None,
    progress: Progress | None = None,
    refuse_nonfinite: bool = False,
) -> Report:
    """Quantise a bare tensor file one tensor at a time, streaming into ``output``.

    Memory stays bounded by a few of the largest tensors and the writes in flight;
    families come from tensor names. Each tensor is written in a background thread while
    the next one is read and transformed.

    Args:
        reader: The :class:`~transform_core.safetensors_io.TensorSource` to read.
        recipe: The :class:`~transform_core.recipe.Recipe`.
        output: The ``.safetensors`` file; the reports go beside it.
        source: The :class:`~transform_core.checkpoint.SourceInfo` of the tensors, or a
            function that returns it, called once the tensors are written (so that the
            input's digest can come from the bytes read; see
            :class:`~transform_core.checkpoint.LoadedNetwork`). The function's digest
            must be a hex SHA-256, whose length the header reserves.
        seed: Overrides the recipe's seed.
        force: Replace existing output files.
        inputs: The files this run reads, which are never overwritten.
        check: Called with each tensor as it is read; it may raise to refuse the input,
            and then nothing is written.
        progress: Called with each tensor's name as it is done.
        refuse_nonfinite: As for :func:`write_burned`.

    Returns:
        The :class:`~transform_core.report.Report` that was written.

    Raises:
        RecipeError: The recipe needs a network, or a rule matches nothing.
        CheckpointError: An output may not be written; checked before any work.
        ConfigError: With ``refuse_nonfinite``, a transformed tensor holds NaN or Inf.
    """
    from transform_core.direct_file import DirectFile
    from transform_core.pipeline import burn_in_tensors, plan_tensors
    from transform_core.safetensors_io import SafetensorsWriter, WriteBehind

    infos = reader.infos()
    plan = plan_tensors(
        ((i.name, tuple(i.shape), str(i.dtype).removeprefix("torch.")) for i in infos),
        recipe,
        seed=seed,
    )
    plan.check()
    _check_outputs_free(output, force, inputs)
    specs = {i.name: (i.dtype, tuple(i.shape)) for i in infos}

    def checked() -> Iterator[tuple[str, Tensor]]:
        for name, tensor in reader.iter_tensors(digest=True):
            if check is not None:
                check(name, tensor)
            yield name, tensor

    with _report_outputs(output, force, inputs) as (tmp, write_reports):
        # Past the page cache: cheaper in CPU time, and a burn-in never reads it back.
        with DirectFile(tmp) as handle:
            # The digest goes into the header, written first: when it comes only at the
            # end, a placeholder of its length holds its place until then.
            early = _DIGEST_PLACEHOLDER if callable(source) else source.sha256
            writer = SafetensorsWriter(handle, specs, _metadata(plan, early, reader.metadata))
            with WriteBehind(writer, sync=not handle.direct) as behind, _core_left_for_io():
                report = burn_in_tensors(
                    checked(), plan, behind.write, wait=behind.wait, progress=progress
                )
            known = source() if callable(source) else source
            if known.sha256 != early:
                writer.replace_metadata(_metadata(plan, known.sha256, reader.metadata))
            writer.close()
        if refuse_nonfinite:
            _refuse_nonfinite(report)  # before anything is moved into place
        report = dataclasses.replace(report, meta=_report_meta(plan, known))
        write_reports(report)
    return report


@contextmanager
def _core_left_for_io() -> Iterator[None]:
    """One core fewer for torch and the compiled kernels, for the threads that hash and
    write: on two cores, splitting each transform over both while those threads run made a
    4 GiB file take 15.8 to 18.2 s instead of 13.2 to 16.3 s."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, threads - 1))
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@contextmanager
def _report_outputs(
    output: Path, force: bool, inputs: Sequence[Path]
) -> Iterator[tuple[Path, Callable[[Report], None]]]:
    """A temporary file for the tensors and a writer of the two reports beside them.

    Nothing is moved into place until all three are written, and then all three or none:
    a failure never leaves new reports beside old tensors.
    """
    from transform_core.files import atomic_outputs

    with atomic_outputs(report_files(output), force=force, inputs=inputs) as temps:
        tmp, tmp_json, tmp_md = temps

        def write_reports(report: Report) -> None:
            tmp_json.write_text(report.to_json() + "\n")
            tmp_md.write_text(report.to_markdown())

        yield tmp, write_reports


def _refuse_nonfinite(report: Report) -> None:
    """Raise for the first transformed tensor that holds NaN or Inf."""
    from transform_core.errors import ConfigError

    for entry in report.tensors:
        if entry.transform is not None and entry.nonfinite:
            raise ConfigError(
                f"{entry.transform} made {entry.nonfinite} NaN or Inf value(s) in tensor "
                f"'{entry.name}' ({entry.dtype}); nothing was written: check its rule's ranges "
                "and levels, convert the tensor to a wider dtype, or pass --allow-nonfinite to "
                "write them anyway"
            )


def _check_outputs_free(output: Path, force: bool, inputs: Sequence[Path]) -> None:
    """Refuse before any work if the tensors or either report cannot be written."""
    from transform_core.safetensors_io import check_output_path

    check_output_path(output, force=force, inputs=inputs)  # first: it may have no name
    for path in report_files(output)[1:]:
        check_output_path(path, force=force, inputs=inputs)


def _report_meta(plan: Plan, source: SourceInfo) -> dict[str, Any]:
    """Facts about the run that its report records."""
    from transform_core import __version__

    return {
        "rockq_version": __version__,
        "recipe": plan.recipe.source,
        "seed": plan.seed,
        "input": source.path,
        "input_sha256": source.sha256,
    }


_DIGEST_PLACEHOLDER = "0" * 64
"""As long as a hex SHA-256."""


def _metadata(
    plan: Plan, input_sha256: str | None, kept: Mapping[str, str] | None = None
) -> dict[str, str]:
    """The output's ``__metadata__``: ``format: pt`` (which Hugging Face loaders require),
    the input's own entries (``kept``; none of rockq's), then rockq's."""
    from transform_core import __version__
    from transform_core.pipeline import output_metadata

    own = {k: v for k, v in (kept or {}).items() if not k.startswith("rockq.")}
    rockq = output_metadata(plan, version=__version__, input_sha256=input_sha256)
    return {"format": "pt", **own, **rockq}
