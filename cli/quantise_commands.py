"""The quantisation flow: ``inspect``, ``patch``, ``burn-in``, ``quantize`` and ``report``.

``patch`` then ``burn-in`` is the two-step path (with fine-tuning possible in between);
``quantize`` does both at once, and also quantises a bare safetensors file tensor by
tensor. The commands are plain functions; :mod:`cli.main` registers them.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Annotated, Any

import typer

from cli.finetune_command import checkpoint_target, run_finetune
from cli.inputs import check_finite, default_output, load_model, load_patched_plan, read_files
from cli.options import (
    EXIT_LIMITS,
    AllowNonfinite,
    Arch,
    ArchKwargs,
    Data,
    Debug,
    Device,
    Force,
    Json,
    PatchedCheckpoint,
    Quiet,
    RecipeArg,
    Resume,
    Seed,
    Trust,
    output_file,
)
from cli.output import console, show_report, tensor_progress
from cli.process import let_openmp_threads_sleep, map_large_blocks


def inspect(
    model: Annotated[
        Path,
        typer.Argument(metavar="MODEL", help="Network file: pickle, state dict or safetensors."),
    ],
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
    from transform_core.families import family_for_name, tensor_infos, tied_names
    from transform_core.recipe import load_recipe

    rules = load_recipe(recipe).family_rules() if recipe else None
    loaded = load_model(model, arch, arch_kwargs, trust)
    tied: dict[str, str] = {}
    if loaded.module is not None:
        infos = tensor_infos(loaded.module, rules).values()
        rows = [
            _row(i.name, i.module_class, i.family, i.shape, i.dtype, i.is_buffer) for i in infos
        ]
        tied = {other: listed for other, (listed, _) in tied_names(loaded.module).items()}
    else:
        rows = [
            _row(s.name, None, family_for_name(s.name, rules), s.shape, str(s.dtype))
            for s in loaded.tensors.infos()
        ]
    if json_output:
        listing = {"source": loaded.source.to_dict(), "tensors": rows, "tied": tied}
        typer.echo(json.dumps(listing, indent=2))
        return
    from cli import render

    render.inventory(console(), rows, title=str(model), tied=tied)


def _row(
    name: str,
    module_class: str | None,
    family: str | None,
    shape: Any,
    dtype: str,
    is_buffer: bool = False,
) -> dict[str, Any]:
    """One tensor of ``rockq inspect``, in the key order of its JSON output."""
    return {
        "name": name,
        "module_class": module_class,
        "family": family,
        "shape": list(shape),
        "dtype": dtype.removeprefix("torch."),
        "is_buffer": is_buffer,
        "numel": math.prod(shape),
    }


def patch(
    model: Annotated[
        Path,
        typer.Argument(metavar="MODEL", help="Network file: pickle, or state dict with --arch."),
    ],
    recipe: RecipeArg,
    output: Annotated[
        Path | None,
        typer.Option(
            "--output",
            "-o",
            parser=output_file,
            help="Patched checkpoint (default MODEL.patched.safetensors).",
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
    data: Data = None,
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
    loaded = load_model(model, arch, arch_kwargs, trust)
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

            render.plan(console(quiet), plan.to_dict())
        plan.check()
        return
    plan.check()
    if not allow_nonfinite:
        check_finite(net.state_dict().items(), model)
    target = output or default_output(model, ".patched.safetensors")
    if finetune or data is not None or resume:
        run_finetune(
            net,
            plan,
            data=data,
            device=device,
            resume=resume,
            target=checkpoint_target(
                target,
                loaded.source,
                parsed.text,
                loaded.network_bytes,
                read_files(model, recipe),
                force,
            ),
            trust=trust,
            quiet=quiet,
            seed=seed,
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
        inputs=read_files(model, recipe),
    )
    if not quiet:
        typer.echo(f"wrote {target}: {_transformed(plan)} of {len(plan.tensors)} tensors patched")


def burn_in_command(
    checkpoint: PatchedCheckpoint,
    output: Annotated[
        Path | None,
        typer.Option(
            "--output",
            "-o",
            parser=output_file,
            help="Output safetensors (default CHECKPOINT.quantised.safetensors).",
        ),
    ] = None,
    trust: Trust = None,
    seed: Seed = None,
    allow_nonfinite: AllowNonfinite = False,
    force: Force = False,
    quiet: Quiet = False,
    debug: Debug = False,
) -> None:
    """Burn in a patched checkpoint: apply its transforms, unpatch, write safetensors and a report."""
    ckpt, plan = load_patched_plan(
        checkpoint,
        trust=trust,
        seed=seed,
        not_patched_fix=", or use 'rockq quantize MODEL RECIPE -o OUT' to patch and burn in "
        "at once",
        no_network="to rebuild; quantise its source with 'rockq quantize'",
    )
    if not allow_nonfinite:
        check_finite(ckpt.network.state_dict().items(), checkpoint)
    from transform_core.outputs import write_burned

    target = output or default_output(checkpoint, ".quantised.safetensors")
    meta: dict[str, Any] = {"checkpoint": str(checkpoint)}
    if "finetune" in ckpt.state:
        # What the transforms cost and what fine-tuning won back, in the report.
        meta["finetune"] = ckpt.state["finetune"].get("metrics")
    with tensor_progress(quiet, _transformed(plan), "burn-in") as advance:
        report = write_burned(
            ckpt.network,
            plan,
            target,
            source=ckpt.source,
            input_sha256=ckpt.sha256,
            meta=meta,
            force=force,
            inputs=[checkpoint],
            progress=advance,
            refuse_nonfinite=not allow_nonfinite,
        )
    show_report(report, quiet, target)


def quantize(
    model: Annotated[
        Path, typer.Argument(metavar="MODEL", help="Network or tensor file to quantise.")
    ],
    recipe: RecipeArg,
    output: Annotated[
        Path,
        typer.Option("--output", "-o", parser=output_file, help="Output safetensors file."),
    ],
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
    let_openmp_threads_sleep()
    from transform_core.outputs import write_burned, write_burned_tensors
    from transform_core.pipeline import plan_network
    from transform_core.recipe import load_recipe

    parsed = load_recipe(recipe)
    loaded = load_model(model, arch, arch_kwargs, trust)
    if loaded.module is None:
        map_large_blocks()  # the peak memory of tensor mode has a bound to keep
        reader = loaded.tensors
        with tensor_progress(quiet, len(reader.infos()), "quantise") as advance:
            report = write_burned_tensors(
                reader,
                parsed,
                output,
                source=lambda: loaded.source,  # its digest comes from the bytes read
                seed=seed,
                force=force,
                inputs=read_files(model, recipe),
                check=None if allow_nonfinite else lambda name, t: check_finite([(name, t)], model),
                progress=advance,
                refuse_nonfinite=not allow_nonfinite,
            )
        show_report(report, quiet, output)
        return
    net = loaded.module
    plan = plan_network(net, parsed, seed=seed)
    plan.check()
    if not allow_nonfinite:
        check_finite(net.state_dict().items(), model)
    with tensor_progress(quiet, _transformed(plan), "burn-in") as advance:
        report = write_burned(
            net,
            plan,
            output,
            source=loaded.source,
            force=force,
            inputs=read_files(model, recipe),
            progress=advance,
            refuse_nonfinite=not allow_nonfinite,
        )
    show_report(report, quiet, output)


def report(
    checkpoint: Annotated[
        Path,
        typer.Argument(
            metavar="CHECKPOINT", help="Quantised safetensors, patched checkpoint or state dict."
        ),
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
    from transform_core.recipe import load_recipe_limits
    from transform_core.safetensors_io import atomic_output, check_output_path

    read = read_files(checkpoint, reference, limits)
    if markdown is not None:
        check_output_path(markdown, force=force, inputs=read)  # before the work
    chosen = load_recipe_limits(limits) if limits is not None else None  # imports nothing
    built = checkpoint_report(checkpoint, reference=reference, limits=chosen, trust=trust or ())
    if check and not built.limits:
        from transform_core.errors import CheckpointError

        raise CheckpointError(
            "has no limits to check: it records no recipe with a 'limits' section; pass "
            "--limits RECIPE",
            path=str(checkpoint),
            key="--check",
        )
    if markdown is not None:
        with atomic_output(markdown, force=force, inputs=read) as tmp:
            tmp.write_text(built.to_markdown())
    if json_output:
        typer.echo(built.to_json())
    else:
        show_report(built, False)
    if check and not built.ok:
        if json_output:
            # The reason is in the JSON on stdout; stderr still says why the exit code.
            typer.echo(f"rockq: {len(built.violations)} limit violation(s)", err=True)
        raise typer.Exit(EXIT_LIMITS)


def _transformed(plan: Any) -> int:
    """How many tensors a plan transforms."""
    return sum(1 for t in plan.tensors if t.rule is not None)
