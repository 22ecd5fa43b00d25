"""Fine-tuning: the ``finetune`` command, and the run that ``patch --finetune`` shares with it.

Both train a patched network with its recipe's ``finetune:`` section and rewrite a patched
checkpoint as training goes, so that ``--resume`` can pick up an interrupted run.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any

import typer

from cli.inputs import default_output, load_patched_plan
from cli.options import Data, Debug, Device, Force, PatchedCheckpoint, Quiet, Resume, Trust
from cli.output import training_progress


def finetune_command(
    checkpoint: PatchedCheckpoint,
    data: Data = None,
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
    ckpt, plan = load_patched_plan(checkpoint, trust=trust, no_network="to train")
    target = output or default_output(checkpoint, ".finetuned.safetensors")
    run_finetune(
        ckpt.network,
        plan,
        data=data,
        device=device,
        resume=resume,
        target=checkpoint_target(
            target, ckpt.source, ckpt.recipe, ckpt.network_bytes, checkpoint, force
        ),
        trust=trust,
        quiet=quiet,
    )


def checkpoint_target(
    path: Path, source: Any, recipe: str, network_bytes: bytes | None, input_: Path, force: bool
) -> Any:
    """Where fine-tuning writes its patched checkpoints, and what they record."""
    from transform_core.finetune import CheckpointTarget

    return CheckpointTarget(path, source, recipe, network_bytes, (input_,), force)


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
) -> None:
    """Fine-tune ``net`` patched by ``plan``, writing checkpoints at ``target``.

    Under ``torchrun`` every process trains; only rank 0 prints.

    Raises:
        RecipeError: The recipe has no ``finetune:`` section.
        ConfigError: No ``--data``; ``--resume`` without a checkpoint of the same recipe.
    """
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
        # The float network is measured once, on a fresh run; a resumed run keeps the
        # figure its checkpoint recorded.
        float_net = None
    T_net = patch_network(net, plan, inplace=checkpoint is not None)
    rank0 = int(os.environ.get("RANK", "0")) == 0
    with training_progress(quiet or not rank0) as on_event:
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
