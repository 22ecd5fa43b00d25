"""Fine-tuning: the ``finetune`` command, and the run that ``patch --finetune`` shares with it.

Both train a patched network with its recipe's ``finetune:`` section and rewrite a patched
checkpoint as training goes, so that ``--resume`` can pick up an interrupted run.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Annotated, Any

import typer

from cli.inputs import default_output, load_patched_plan, read_files
from cli.options import (
    Data,
    Debug,
    Device,
    Force,
    PatchedCheckpoint,
    Quiet,
    Resume,
    Trust,
    output_file,
)
from cli.output import training_progress


def finetune_command(
    checkpoint: PatchedCheckpoint,
    data: Data = None,
    output: Annotated[
        Path | None,
        typer.Option(
            "--output",
            "-o",
            parser=output_file,
            help="Fine-tuned patched checkpoint (default: CHECKPOINT's name without "
            ".patched.safetensors, plus .finetuned.safetensors).",
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
    from transform_core.imports import check_trusted, is_reference, named_in_file

    ckpt, plan = load_patched_plan(checkpoint, trust=trust, no_network="to train")
    config = plan.recipe.finetune
    if config is not None and is_reference(config.loss):
        with named_in_file(str(checkpoint), trust or ()):  # the file named it, not the user
            check_trusted(config.loss, "loss")
    target = output or default_output(checkpoint, ".finetuned.safetensors")
    run_finetune(
        ckpt.network,
        plan,
        data=data,
        device=device,
        resume=resume,
        # The recipe comes from inside the checkpoint; finetune_patched adds the data file.
        target=checkpoint_target(
            target, ckpt.source, ckpt.recipe, ckpt.network_bytes, read_files(checkpoint), force
        ),
        trust=trust,
        quiet=quiet,
    )


def checkpoint_target(
    path: Path,
    source: Any,
    recipe: str,
    network_bytes: bytes | None,
    inputs: Iterable[Path],
    force: bool,
) -> Any:
    """Where fine-tuning writes its patched checkpoints, and what they record.

    ``inputs`` are the files the command read (network, recipe); the checkpoint and its log
    never overwrite them, nor the ``--data`` file, which the run adds itself.
    """
    from transform_core.finetune import CheckpointTarget

    return CheckpointTarget(path, source, recipe, network_bytes, tuple(inputs), force)


def run_finetune(
    net: Any,
    plan: Any,
    *,
    data: str | None,
    device: str,
    resume: bool,
    target: Any,
    trust: list[str] | None,
    quiet: bool,
    seed: int | None = None,
) -> None:
    """Fine-tune ``net`` patched by ``plan``, writing checkpoints at ``target``.

    ``seed`` is the ``--seed`` given, if any: a resumed run refuses another than its own.

    Under ``torchrun`` every process trains; only rank 0 prints.
    """
    from transform_core.finetune import finetune_patched, log_path_for

    rank0 = int(os.environ.get("RANK", "0")) == 0
    with training_progress(quiet or not rank0) as on_event:
        result = finetune_patched(
            net,
            plan,
            data=data,
            target=target,
            device=device,
            resume=resume,
            trust=trust or (),
            seed=seed,
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
