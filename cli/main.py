"""``rockq``: quantise network checkpoints from YAML recipes.

Each command parses its options, calls into :mod:`transform_core`, and renders the
result. torch and the library are imported inside the commands, so ``rockq --help``
stays fast.

Exit codes: 0 success, 1 internal error, 2 bad input (one line on stderr, naming the file,
key or tensor and the fix; ``--debug`` shows the traceback), 3 ``report --check`` found a
tensor outside its hardware limit, 130 interrupted.
"""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

app = typer.Typer(
    name="rockq",
    help="Quantise neural-network checkpoints with a transformation-in-training pipeline.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

F = TypeVar("F", bound=Callable[..., Any])

EXIT_USER_ERROR = 2
EXIT_INTERNAL_ERROR = 1
EXIT_LIMITS = 3

# --- shared options ------------------------------------------------------------------------

Arch = Annotated[
    str | None,
    typer.Option(
        help="Factory 'package.module:function' that builds the network for a state-dict "
        "input (imports and runs that code).",
    ),
]
ArchKwargs = Annotated[
    str | None, typer.Option(help="JSON object of keyword arguments for the --arch factory.")
]
Trust = Annotated[
    list[str] | None,
    typer.Option(help="Package whose classes a pickled network may use (repeatable)."),
]
Seed = Annotated[
    int | None, typer.Option(help="Seed for random transforms (default: the recipe's, else 0).")
]
Force = Annotated[bool, typer.Option("--force", help="Overwrite an existing output file.")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="Print nothing but errors.")]
Debug = Annotated[bool, typer.Option("--debug", help="Show tracebacks for errors.")]
Json = Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")]
DataOption = Annotated[
    str | None,
    typer.Option(
        "--data",
        help="Training data: a .safetensors file with 'inputs' and 'targets' (and optional "
        "'val_inputs', 'val_targets'), or 'package.module:function' returning "
        "(train_loader, val_loader).",
    ),
]
Device = Annotated[str, typer.Option(help="Where to train: auto, cpu or cuda.")]
Resume = Annotated[
    bool,
    typer.Option("--resume", help="Continue an interrupted run from the output's last checkpoint."),
]
AllowNonfinite = Annotated[
    bool,
    typer.Option("--allow-nonfinite", help="Accept NaN or Inf values in the input's parameters."),
]


def _version_callback(value: bool) -> None:
    if value:
        # The installed distribution's version: no torch import, so this stays fast.
        from importlib.metadata import PackageNotFoundError, version

        try:
            shown = version("rockq")
        except PackageNotFoundError:  # running from a source tree that is not installed
            from transform_core import __version__ as shown
        typer.echo(f"rockq {shown}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_version_callback, is_eager=True, help="Show the version."
        ),
    ] = False,
) -> None:
    """Quantise neural-network checkpoints with a transformation-in-training pipeline."""


def _fail(message: str, code: int) -> typer.Exit:
    typer.echo(f"rockq: error: {message}", err=True)
    return typer.Exit(code)


def handle_errors(command: F) -> F:
    """Turn user errors into one line and exit 2, other errors into exit 1.

    A command's ``debug`` argument shows the traceback instead.
    """

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from transform_core.errors import RockqError

        try:
            return command(*args, **kwargs)
        except (typer.Exit, typer.Abort):
            raise
        except KeyboardInterrupt:
            raise _fail("interrupted; no output was written", 130) from None
        except RockqError as err:
            if kwargs.get("debug"):
                raise
            raise _fail(str(err), EXIT_USER_ERROR) from None
        except Exception as err:
            if kwargs.get("debug"):
                raise
            raise _fail(
                f"internal error: {type(err).__name__}: {err} (run again with --debug for the "
                "traceback, and please report it)",
                EXIT_INTERNAL_ERROR,
            ) from None

    return wrapper  # type: ignore[return-value]


def _console(quiet: bool = False) -> Any:
    from rich.console import Console

    return Console(quiet=quiet, width=None if sys.stdout.isatty() else 160)


@contextmanager
def _progress(quiet: bool, total: int, what: str) -> Iterator[Callable[[str], None]]:
    """A Rich progress bar on stderr, advanced once per tensor."""
    from rich.console import Console

    console = Console(stderr=True)
    # Off a terminal a bar is noise: Rich would still end it with a blank line, which
    # would break the one-line error contract of piped stderr.
    if quiet or total == 0 or not console.is_terminal:
        yield lambda name: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[tensor]}"),
        console=console,
        transient=True,
    ) as progress:
        task = progress.add_task(what, total=total, tensor="")
        yield lambda name: progress.update(task, advance=1, tensor=name)


def _arch_kwargs(text: str | None) -> dict[str, Any] | None:
    from transform_core.errors import RockqError

    if text is None:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise RockqError(
            f"is not valid JSON ({err.msg} at column {err.colno}); give an object such as "
            "'{\"hidden\": 64}'",
            key="--arch-kwargs",
        ) from None
    if not isinstance(value, dict):
        raise RockqError(f"must be a JSON object, got {type(value).__name__}", key="--arch-kwargs")
    return value


def _load(model: Path, arch: str | None, arch_kwargs: str | None, trust: list[str] | None) -> Any:
    from transform_core.checkpoint import load_network

    return load_network(model, arch=arch, arch_kwargs=_arch_kwargs(arch_kwargs), trust=trust or ())


def _check_finite(named: Iterator[tuple[str, Any]], path: Path) -> None:
    import torch

    from transform_core.errors import CheckpointError

    for name, tensor in named:
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise CheckpointError(
                f"holds {bad} NaN or Inf value(s); fix the network, or pass --allow-nonfinite "
                "to quantise it anyway (NaN stays NaN, Inf saturates)",
                path=str(path),
                key=name,
            )


def _default_output(source: Path, suffix: str) -> Path:
    name = source.name
    for ending in (".patched.safetensors", ".safetensors", ".pt", ".pth", ".bin", ".json"):
        if name.endswith(ending):
            name = name[: -len(ending)]
            break
    return source.with_name(name + suffix)


# --- commands --------------------------------------------------------------------------------


@app.command()
@handle_errors
def inspect(
    model: Annotated[Path, typer.Argument(help="Network file: pickle, state dict or safetensors.")],
    arch: Arch = None,
    arch_kwargs: ArchKwargs = None,
    trust: Trust = None,
    recipe: Annotated[
        str | None, typer.Option(help="Recipe whose 'families' rules to apply (path or name).")
    ] = None,
    json_output: Json = False,
    debug: Debug = False,
) -> None:
    """List every parameter and buffer with its module, family, shape, dtype and size."""
    from transform_core.families import family_for_name, tensor_infos
    from transform_core.recipe import load_recipe

    rules = load_recipe(recipe).family_rules() if recipe else None
    loaded = _load(model, arch, arch_kwargs, trust)
    rows: list[dict[str, Any]] = []
    if loaded.module is not None:
        for info in tensor_infos(loaded.module, rules).values():
            rows.append({**_info_dict(info), "numel": info.numel})
    else:
        for stored in loaded.tensors.infos():
            numel = 1
            for n in stored.shape:
                numel *= n
            rows.append(
                {
                    "name": stored.name,
                    "module_class": None,
                    "family": family_for_name(stored.name, rules),
                    "shape": list(stored.shape),
                    "dtype": str(stored.dtype).removeprefix("torch."),
                    "numel": numel,
                    "is_buffer": False,
                }
            )
    if json_output:
        typer.echo(json.dumps({"source": loaded.source.to_dict(), "tensors": rows}, indent=2))
        return
    from cli import render

    render.inventory(_console(), rows, title=str(model))


def _info_dict(info: Any) -> dict[str, Any]:
    return {
        "name": info.name,
        "module_class": info.module_class,
        "family": info.family,
        "shape": list(info.shape),
        "dtype": info.dtype,
        "is_buffer": info.is_buffer,
    }


@app.command()
@handle_errors
def patch(
    model: Annotated[Path, typer.Argument(help="Network file: pickle, or state dict with --arch.")],
    recipe: Annotated[str, typer.Argument(help="Recipe: a YAML file or a built-in name.")],
    output: Annotated[
        Path | None,
        typer.Option(
            "--output", "-o", help="Patched checkpoint (default MODEL.patched.safetensors)."
        ),
    ] = None,
    arch: Arch = None,
    arch_kwargs: ArchKwargs = None,
    trust: Trust = None,
    seed: Seed = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Show what each rule matches; write nothing.")
    ] = False,
    json_output: Json = False,
    force: Force = False,
    allow_nonfinite: AllowNonfinite = False,
    finetune: Annotated[
        bool,
        typer.Option(
            "--finetune", help="Fine-tune the patched network (the recipe's finetune section)."
        ),
    ] = False,
    data: DataOption = None,
    device: Device = "auto",
    resume: Resume = False,
    quiet: Quiet = False,
    debug: Debug = False,
) -> None:
    """Patch a network with a recipe's transforms and write a patched checkpoint.

    With --finetune, train the patched network on --data first; the checkpoint is rewritten
    as training goes, and --resume picks up an interrupted run.
    """
    from transform_core.checkpoint import save_patched
    from transform_core.errors import CheckpointError
    from transform_core.pipeline import patch_network, plan_network
    from transform_core.recipe import load_recipe

    parsed = load_recipe(recipe)
    loaded = _load(model, arch, arch_kwargs, trust)
    if loaded.module is None:
        raise CheckpointError(
            "is a bare tensor file: patching needs a network for its forward pass; pass --arch "
            "with the factory that builds it, or use 'rockq quantize' to quantise the tensors",
            path=str(model),
        )
    net = loaded.module
    plan = plan_network(net, parsed, seed=seed)
    if dry_run:
        if json_output:
            typer.echo(json.dumps(plan.to_dict(), indent=2))
        else:
            from cli import render

            render.plan(_console(quiet), plan.to_dict())
        plan.check()
        return
    plan.check()
    if not allow_nonfinite:
        _check_finite(iter(net.state_dict().items()), model)
    target = output or _default_output(model, ".patched.safetensors")
    if finetune or data is not None or resume:
        _finetune_run(
            net,
            plan,
            data=data,
            device=device,
            resume=resume,
            target=_target(target, loaded.source, parsed.text, loaded.network_bytes, model, force),
            trust=trust,
            quiet=quiet,
        )
        return
    # Patching builds every wrapper and binds every transform: a recipe that cannot
    # patch this network fails here, before anything is written.
    patch_network(net, plan, inplace=False)
    save_patched(
        target,
        net.state_dict(),
        source=loaded.source,
        recipe=parsed.text,
        seed=plan.seed,
        network_bytes=loaded.network_bytes,
        force=force,
        inputs=[model],
    )
    transformed = sum(1 for t in plan.tensors if t.rule is not None)
    if not quiet:
        typer.echo(f"wrote {target}: {transformed} of {len(plan.tensors)} tensors patched")


def _target(
    path: Path, source: Any, recipe: str, network_bytes: bytes | None, input_: Path, force: bool
) -> Any:
    from transform_core.finetune import CheckpointTarget

    return CheckpointTarget(path, source, recipe, network_bytes, (input_,), force)


def _finetune_run(
    net: Any,
    plan: Any,
    *,
    data: str | None,
    device: str,
    resume: bool,
    target: Any,
    trust: list[str] | None,
    quiet: bool,
) -> None:
    """Fine-tune ``net`` patched by ``plan``, writing checkpoints at ``target``."""
    import os

    from transform_core.checkpoint import is_patched, load_patched
    from transform_core.data import load_data
    from transform_core.errors import ConfigError, RecipeError
    from transform_core.finetune import finetune, log_path_for, resolve_device
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
    dataset = load_data(data)
    torch_device = resolve_device(device, local_rank=int(os.environ.get("LOCAL_RANK", "0")))
    float_net, checkpoint = net, None
    if resume:
        if not is_patched(target.path):
            raise ConfigError(
                f"found no checkpoint to resume from at {target.path}; run without --resume "
                "to start, or pass the -o of the interrupted run",
                key="--resume",
            )
        checkpoint = load_patched(target.path, trust=trust or ())
        if checkpoint.recipe != recipe.text or checkpoint.network is None:
            raise ConfigError(
                "was written by a run with another recipe or network; resume with the same "
                "recipe, or drop --resume and pick another -o",
                path=str(target.path),
                key="--resume",
            )
        net = checkpoint.network
        plan = plan_network(net, recipe, seed=plan.seed)
        float_net = None
    T_net = patch_network(net, plan, inplace=checkpoint is not None)
    rank0 = int(os.environ.get("RANK", "0")) == 0
    with _training_progress(quiet or not rank0) as on_event:
        result = finetune(
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
    if quiet or not rank0:
        return
    shown = {k: "-" if v is None else f"{v:.4f}" for k, v in result.metrics.items()}
    typer.echo(
        f"{result.metric} on {result.evaluated_on} data: float {shown['float']}, "
        f"post-training {shown['post_training']}, fine-tuned {shown['finetuned']}"
    )
    typer.echo(f"wrote {target.path} after {result.steps} steps (log {log_path_for(target.path)})")


@contextmanager
def _training_progress(quiet: bool) -> Iterator[Callable[[dict[str, Any]], None]]:
    """A Rich progress bar on stderr: epoch, step, loss and the metric."""
    from rich.console import Console

    console = Console(stderr=True)
    # Off a terminal the JSON-lines log has the same figures; a bar would be noise.
    if quiet or not console.is_terminal:
        yield lambda event: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    with Progress(
        TextColumn("epoch {task.fields[epoch]}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]}  metric {task.fields[metric]}"),
        console=console,
        transient=True,
    ) as progress:
        task = progress.add_task("train", total=None, epoch=0, loss="-", metric="-")

        def update(event: dict[str, Any]) -> None:
            fields: dict[str, Any] = {"epoch": event["epoch"], "total": event["total_steps"]}
            if event["kind"] == "train":
                fields["loss"] = f"{event['loss']:.4f}"
            elif event["kind"] == "eval" and event.get("metric") is not None:
                fields["metric"] = f"{event['metric']:.4f}"
            progress.update(task, completed=event["step"], **fields)

        yield update


@contextmanager
def _outputs(
    target: Path, force: bool, inputs: list[Path]
) -> Iterator[tuple[Path, Callable[[Any], None]]]:
    """A temporary file for the tensors and a writer of the two reports beside them.

    Nothing is moved into place until all three are written, the tensors last, so an
    interrupted run leaves no tensors without their report (and usually nothing at all).
    """
    from contextlib import ExitStack

    from transform_core.safetensors_io import atomic_output

    stem = target.name.removesuffix(".safetensors")
    paths = (target, target.with_name(stem + ".report.json"), target.with_name(stem + ".report.md"))
    with ExitStack() as stack:
        tmp, tmp_json, tmp_md = (
            stack.enter_context(atomic_output(path, force=force, inputs=inputs)) for path in paths
        )

        def write_reports(report: Any) -> None:
            tmp_json.write_text(report.to_json() + "\n")
            tmp_md.write_text(report.to_markdown())

        yield tmp, write_reports


def _check_outputs_free(target: Path, force: bool, inputs: list[Path]) -> None:
    """Refuse before any work if the safetensors or report files cannot be written."""
    from transform_core.safetensors_io import check_output_path

    stem = target.name.removesuffix(".safetensors")
    for path in (
        target,
        target.with_name(stem + ".report.json"),
        target.with_name(stem + ".report.md"),
    ):
        check_output_path(path, force=force, inputs=inputs)


def _run_burn_in(
    net: Any,
    plan: Any,
    *,
    target: Path,
    source_sha: str | None,
    force: bool,
    quiet: bool,
    inputs: list[Path],
    meta: dict[str, Any],
) -> Any:
    from transform_core import __version__
    from transform_core.pipeline import burn_in, output_metadata, patch_network
    from transform_core.safetensors_io import save_safetensors

    _check_outputs_free(target, force, inputs)
    patched = patch_network(net, plan, inplace=True)
    total = sum(1 for t in plan.tensors if t.rule is not None)
    with _progress(quiet, total, "burn-in") as advance:
        burned, report = burn_in(patched, plan, progress=advance, meta=meta)
    metadata = output_metadata(plan, version=__version__, input_sha256=source_sha)
    with _outputs(target, force, inputs) as (tmp, write_reports):
        save_safetensors(burned.state_dict(), tmp, metadata, force=True)
        write_reports(report)
    return report


def _report_meta(plan: Any, source: Any) -> dict[str, Any]:
    from transform_core import __version__

    return {
        "rockq_version": __version__,
        "recipe": plan.recipe.source,
        "seed": plan.seed,
        "input": source.path,
        "input_sha256": source.sha256,
    }


def _show_report(report: Any, quiet: bool, target: Path | None = None) -> None:
    if quiet:
        return
    from cli import render

    console = _console()
    render.report(console, report.to_dict())
    if target is not None:
        stem = target.name.removesuffix(".safetensors")
        console.print(f"wrote {target} and {stem}.report.json, {stem}.report.md")


@app.command("burn-in")
@handle_errors
def burn_in_command(
    checkpoint: Annotated[Path, typer.Argument(help="Patched checkpoint from 'rockq patch'.")],
    output: Annotated[
        Path | None,
        typer.Option(
            "--output", "-o", help="Output safetensors (default CHECKPOINT.quantised.safetensors)."
        ),
    ] = None,
    trust: Trust = None,
    seed: Seed = None,
    force: Force = False,
    quiet: Quiet = False,
    debug: Debug = False,
) -> None:
    """Burn in a patched checkpoint: apply its transforms, unpatch, write safetensors and a report."""
    from transform_core.checkpoint import is_patched, load_patched
    from transform_core.errors import CheckpointError
    from transform_core.pipeline import plan_network
    from transform_core.recipe import parse_recipe
    from transform_core.safetensors_io import require_file

    require_file(checkpoint, expected="a patched checkpoint written by 'rockq patch'")
    if not is_patched(checkpoint):
        raise CheckpointError(
            "is not a patched checkpoint; create one with 'rockq patch MODEL RECIPE', or use "
            "'rockq quantize MODEL RECIPE -o OUT' to patch and burn in at once",
            path=str(checkpoint),
        )
    ckpt = load_patched(checkpoint, trust=trust or ())
    if ckpt.network is None:
        raise CheckpointError(
            "holds no network to rebuild; quantise its source with 'rockq quantize'",
            path=str(checkpoint),
        )
    recipe = parse_recipe(ckpt.recipe, source=f"{checkpoint} (recipe)")
    plan = plan_network(ckpt.network, recipe, seed=seed if seed is not None else ckpt.seed)
    target = output or _default_output(checkpoint, ".quantised.safetensors")
    meta = _report_meta(plan, ckpt.source) | {"checkpoint": str(checkpoint)}
    if "finetune" in ckpt.state:
        # What the transforms cost and what fine-tuning won back, in the report.
        meta["finetune"] = ckpt.state["finetune"].get("metrics")
    report = _run_burn_in(
        ckpt.network,
        plan,
        target=target,
        source_sha=ckpt.sha256,
        force=force,
        quiet=quiet,
        inputs=[checkpoint],
        meta=meta,
    )
    _show_report(report, quiet, target)


@app.command("finetune")
@handle_errors
def finetune_command(
    checkpoint: Annotated[Path, typer.Argument(help="Patched checkpoint from 'rockq patch'.")],
    data: DataOption = None,
    output: Annotated[
        Path | None,
        typer.Option(
            "--output",
            "-o",
            help="Fine-tuned patched checkpoint (default CHECKPOINT.finetuned.safetensors).",
        ),
    ] = None,
    device: Device = "auto",
    resume: Resume = False,
    trust: Trust = None,
    force: Force = False,
    quiet: Quiet = False,
    debug: Debug = False,
) -> None:
    """Fine-tune a patched checkpoint with its recipe's finetune section."""
    from transform_core.checkpoint import is_patched, load_patched
    from transform_core.errors import CheckpointError
    from transform_core.pipeline import plan_network
    from transform_core.recipe import parse_recipe
    from transform_core.safetensors_io import require_file

    require_file(checkpoint, expected="a patched checkpoint written by 'rockq patch'")
    if not is_patched(checkpoint):
        raise CheckpointError(
            "is not a patched checkpoint; create one with 'rockq patch MODEL RECIPE'",
            path=str(checkpoint),
        )
    ckpt = load_patched(checkpoint, trust=trust or ())
    if ckpt.network is None:
        raise CheckpointError("holds no network to train", path=str(checkpoint))
    recipe = parse_recipe(ckpt.recipe, source=f"{checkpoint} (recipe)")
    plan = plan_network(ckpt.network, recipe, seed=ckpt.seed)
    target = output or _default_output(checkpoint, ".finetuned.safetensors")
    _finetune_run(
        ckpt.network,
        plan,
        data=data,
        device=device,
        resume=resume,
        target=_target(target, ckpt.source, ckpt.recipe, ckpt.network_bytes, checkpoint, force),
        trust=trust,
        quiet=quiet,
    )


@app.command()
@handle_errors
def quantize(
    model: Annotated[Path, typer.Argument(help="Network or tensor file to quantise.")],
    recipe: Annotated[str, typer.Argument(help="Recipe: a YAML file or a built-in name.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Output safetensors file.")],
    arch: Arch = None,
    arch_kwargs: ArchKwargs = None,
    trust: Trust = None,
    seed: Seed = None,
    force: Force = False,
    allow_nonfinite: AllowNonfinite = False,
    quiet: Quiet = False,
    debug: Debug = False,
) -> None:
    """Patch and burn in at once: write quantised safetensors and a report.

    A bare safetensors file (or a folder of shards) without --arch is quantised tensor by
    tensor, with families taken from tensor names.
    """
    from transform_core.pipeline import plan_network
    from transform_core.recipe import load_recipe

    parsed = load_recipe(recipe)
    loaded = _load(model, arch, arch_kwargs, trust)
    if loaded.module is None:
        report = _quantize_tensors(
            loaded, parsed, seed, output, force, allow_nonfinite, quiet, model
        )
        _show_report(report, quiet, output)
        return
    net = loaded.module
    plan = plan_network(net, parsed, seed=seed)
    plan.check()
    if not allow_nonfinite:
        _check_finite(iter(net.state_dict().items()), model)
    report = _run_burn_in(
        net,
        plan,
        target=output,
        source_sha=loaded.source.sha256,
        force=force,
        quiet=quiet,
        inputs=[model],
        meta=_report_meta(plan, loaded.source),
    )
    _show_report(report, quiet, output)


def _quantize_tensors(
    loaded: Any,
    recipe: Any,
    seed: int | None,
    output: Path,
    force: bool,
    allow_nonfinite: bool,
    quiet: bool,
    model: Path,
) -> Any:
    import torch

    from transform_core import __version__
    from transform_core.errors import CheckpointError
    from transform_core.pipeline import burn_in_tensors, output_metadata, plan_tensors
    from transform_core.safetensors_io import SafetensorsWriter

    source = loaded.tensors
    infos = source.infos()
    plan = plan_tensors(
        ((i.name, tuple(i.shape), str(i.dtype).removeprefix("torch.")) for i in infos),
        recipe,
        seed=seed,
    )
    plan.check()
    _check_outputs_free(output, force, [model])
    metadata = output_metadata(plan, version=__version__, input_sha256=loaded.source.sha256)
    specs = {i.name: (i.dtype, tuple(i.shape)) for i in infos}

    def checked() -> Iterator[tuple[str, Any]]:
        for name, tensor in source.iter_tensors():
            finite = not tensor.is_floating_point() or bool(torch.isfinite(tensor).all())
            if not allow_nonfinite and not finite:
                raise CheckpointError(
                    "holds NaN or Inf values; fix the file, or pass --allow-nonfinite",
                    path=str(model),
                    key=name,
                )
            yield name, tensor

    with _outputs(output, force, [model]) as (tmp, write_reports):
        with tmp.open("wb") as handle:
            writer = SafetensorsWriter(handle, specs, metadata)
            with _progress(quiet, len(infos), "quantise") as advance:
                report = burn_in_tensors(
                    checked(),
                    plan,
                    writer.write,
                    progress=advance,
                    meta=_report_meta(plan, loaded.source),
                )
            writer.close()
        write_reports(report)
    return report


@app.command()
@handle_errors
def report(
    checkpoint: Annotated[
        Path, typer.Argument(help="Quantised safetensors, patched checkpoint or state dict.")
    ],
    reference: Annotated[
        Path | None, typer.Option(help="The original tensors, for error and SQNR columns.")
    ] = None,
    json_output: Json = False,
    markdown: Annotated[
        Path | None, typer.Option(help="Also write the report as Markdown to this file.")
    ] = None,
    limits: Annotated[
        str | None,
        typer.Option(
            help="Recipe (path or built-in name) whose 'limits' to check; default: the limits "
            "of the recipe recorded in the checkpoint."
        ),
    ] = None,
    check: Annotated[
        bool,
        typer.Option("--check", help=f"Exit {EXIT_LIMITS} when a tensor breaks its limit."),
    ] = False,
    trust: Trust = None,
    force: Force = False,
    debug: Debug = False,
) -> None:
    """Show the bit-width report of a checkpoint: values used, bits, grid, range and error.

    Tensors of a family with a hardware limit are checked against it; with --check, any
    violation makes the command exit 3.
    """
    from transform_core.pipeline import checkpoint_report
    from transform_core.recipe import load_recipe

    chosen = load_recipe(limits).limits if limits is not None else None
    built = checkpoint_report(checkpoint, reference=reference, limits=chosen, trust=trust or ())
    if markdown is not None:
        from transform_core.safetensors_io import atomic_output

        with atomic_output(markdown, force=force, inputs=[checkpoint]) as tmp:
            tmp.write_text(built.to_markdown())
    if json_output:
        typer.echo(built.to_json())
    else:
        _show_report(built, False)
    if check and not built.ok:
        if json_output:
            # The reason is in the JSON on stdout; stderr still says why the exit code.
            typer.echo(f"rockq: {len(built.violations)} limit violation(s)", err=True)
        raise typer.Exit(EXIT_LIMITS)


@app.command()
@handle_errors
def recipes(
    name: Annotated[str | None, typer.Argument(help="Print this built-in recipe.")] = None,
    debug: Debug = False,
) -> None:
    """List the built-in recipes, or print one."""
    from transform_core.recipe import builtin_recipe_text, builtin_recipes

    if name is not None:
        typer.echo(builtin_recipe_text(name), nl=False)
        return
    from cli import render

    render.recipes(_console(), builtin_recipes())


@app.command()
@handle_errors
def transforms(json_output: Json = False, debug: Debug = False) -> None:
    """List the transforms a recipe can name, with their arguments and defaults."""
    from transform_core.registry import available_transforms

    specs = available_transforms()
    if json_output:
        typer.echo(
            json.dumps(
                [
                    {
                        "name": s.name,
                        "summary": s.summary,
                        "args": [
                            {"name": a.name, "type": a.type, "required": a.required}
                            | ({} if a.required else {"default": a.default})
                            for a in s.args
                        ],
                    }
                    for s in specs
                ],
                indent=2,
            )
        )
        return
    from cli import render

    render.transforms(_console(), specs)


@app.command()
@handle_errors
def demo(
    out_dir: Annotated[
        Path | None,
        typer.Option(help="Folder for the example's files (default: a new temporary folder)."),
    ] = None,
    recipe: Annotated[str, typer.Option(help="Recipe to apply (path or built-in name).")] = "int8",
    quiet: Quiet = False,
    debug: Debug = False,
) -> None:
    """Run the whole pipeline on a small built-in example network and show the report."""
    import tempfile

    import torch

    from cli.example import build_example
    from transform_core.errors import CheckpointError

    folder = Path(tempfile.mkdtemp(prefix="rockq-demo-")) if out_dir is None else out_dir
    if folder.exists() and not folder.is_dir():
        raise CheckpointError(
            "exists and is not a folder; pick another --out-dir", path=str(folder)
        )
    folder.mkdir(parents=True, exist_ok=True)
    model = folder / "example.pt"
    patched = folder / "example.patched.safetensors"
    quantised = folder / "example.quantised.safetensors"
    for existing in (model, patched, quantised):
        if existing.exists():
            raise CheckpointError("already exists; pick an empty --out-dir", path=str(existing))
    torch.save(build_example(), model)
    console = _console(quiet)
    console.print(f"[bold]1. example network[/] saved to {model}")
    inspect(
        model, arch=None, arch_kwargs=None, trust=None, recipe=None, json_output=False, debug=debug
    ) if not quiet else None
    console.print(f"[bold]2. plan[/] for recipe '{recipe}'")
    patch(
        model,
        recipe,
        output=None,
        arch=None,
        arch_kwargs=None,
        trust=None,
        seed=None,
        dry_run=True,
        json_output=False,
        force=False,
        allow_nonfinite=False,
        quiet=quiet,
        debug=debug,
    )
    console.print("[bold]3. patch[/]")
    patch(
        model,
        recipe,
        output=patched,
        arch=None,
        arch_kwargs=None,
        trust=None,
        seed=None,
        dry_run=False,
        json_output=False,
        force=False,
        allow_nonfinite=False,
        quiet=quiet,
        debug=debug,
    )
    console.print("[bold]4. burn-in and report[/]")
    burn_in_command(
        patched, output=quantised, trust=None, seed=None, force=False, quiet=quiet, debug=debug
    )
    console.print(f"\nNext: rockq report {quantised} --reference {model}   (files are in {folder})")


def run() -> None:
    """The ``rockq`` console entry point: like ``app()``, with one-line usage errors.

    Typer prints a usage error (a missing option, an unknown flag) as a multi-line box;
    rockq's rule for bad input is one line on stderr and exit 2, so it is caught here.
    """
    # Typer re-exports click's BadParameter but not its base; newer Typer vendors click,
    # so the base class is found through the MRO rather than imported by module name.
    click_error: type[Exception] = next(
        c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException"
    )
    try:
        code = app(standalone_mode=False)
    except click_error as err:
        ctx = getattr(err, "ctx", None)
        command = f"{ctx.command_path} " if ctx is not None else "rockq "
        format_message = getattr(err, "format_message", None)
        message = str(format_message() if callable(format_message) else err)
        if message.strip():  # empty when the help was shown for a bare `rockq`
            typer.echo(f"rockq: error: {message} (see '{command}--help')", err=True)
        sys.exit(getattr(err, "exit_code", 2))
    except typer.Abort:
        typer.echo("rockq: error: interrupted; no output was written", err=True)
        sys.exit(130)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":  # pragma: no cover
    run()
