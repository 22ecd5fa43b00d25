"""Quantisation-aware fine-tuning on scikit-learn's 8x8 digits: float, post-training, fine-tuned.

Trains a small float MLP on ``sklearn.datasets.load_digits`` (1797 images, shipped with
scikit-learn, no download), then quantises its weights to 4 bits and to ternary (3 levels),
and prints the test accuracy of the float network, of the burned-in network without training
(post-training quantisation) and after quantisation-aware fine-tuning, side by side::

    python examples/digits.py                # the full run (a minute or two on 2 cores)
    python examples/digits.py --quick        # a tiny run, as the tests do

Per-channel ranges are what make ternary work: one range per output neuron (the rows of a
torch ``Linear`` weight, so ``dim: 0``) instead of one per tensor, so a row of small weights
is not rounded to all zeros because another row has a large one.

It writes, into ``--out`` (default: a new temporary folder), the float network, the data
file (``inputs``, ``targets``, ``val_inputs``, ``val_targets``), each recipe, and each
fine-tuned patched checkpoint with its JSON-lines log, so every step can be repeated with
``rockq patch MODEL RECIPE --finetune --data DATA``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from transform_core.checkpoint import load_network
from transform_core.data import TensorData, load_data
from transform_core.finetune import CheckpointTarget, FinetuneConfig, finetune
from transform_core.patching import remove_T_net
from transform_core.pipeline import patch_network, plan_network
from transform_core.recipe import parse_recipe

HIDDEN = 128

# The fine-tuning section shared by both recipes (a full run; --quick shortens it).
FINETUNE = """\
finetune:
  epochs: {epochs}
  batch_size: 64
  optimizer: {{name: adam, lr: 0.002}}
  schedule: {{name: cosine, warmup_steps: 20}}
  loss: cross_entropy
  metric: accuracy
  seed: 0
"""

RECIPES = {
    # 15 levels keep zero on the grid: -7..7 times a per-row step.
    "4-bit": """\
version: 1
description: 4-bit weights (15 levels), one range per output neuron
seed: 0
params:
  - family: weights
    transform: deterministic_channel_rounding
    args: {{num_levels: 15, dim: 0}}
""",
    "ternary": """\
version: 1
description: ternary weights (-1, 0, +1), one range per output neuron
seed: 0
params:
  - family: weights
    transform: deterministic_channel_rounding
    args: {{num_levels: 3, dim: 0}}
""",
}


def build_mlp() -> nn.Module:
    """The float network: 64 pixels -> HIDDEN -> HIDDEN -> 10 classes."""
    return nn.Sequential(
        nn.Linear(64, HIDDEN),
        nn.ReLU(),
        nn.Linear(HIDDEN, HIDDEN),
        nn.ReLU(),
        nn.Linear(HIDDEN, 10),
    )


def digits_data(test_fraction: float = 0.3, seed: int = 0) -> TensorData:
    """The digits as a stratified train/test split, pixels scaled to [0, 1]."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=test_fraction, random_state=seed, stratify=y
    )

    def inputs(a: Any) -> torch.Tensor:
        return torch.tensor(a / 16.0, dtype=torch.float32)

    def targets(a: Any) -> torch.Tensor:
        return torch.tensor(a, dtype=torch.int64)

    return TensorData(
        inputs(x_train), targets(y_train), inputs(x_test), targets(y_test), source="digits"
    )


def train_float(data: TensorData, epochs: int, seed: int = 0) -> nn.Module:
    """Train the float MLP with Adam and a cosine schedule."""
    torch.manual_seed(seed)
    net = build_mlp()
    config = FinetuneConfig(
        epochs=epochs, batch_size=64, optimizer="adam", lr=0.003, schedule="cosine", seed=seed
    )
    plan = plan_network(net, parse_recipe(_IDENTITY))
    T_net = patch_network(net, plan)
    finetune(T_net, plan, config, data)
    return remove_T_net(T_net, inplace=True)


# A recipe that transforms nothing, so the float network trains through the same loop.
_IDENTITY = """\
version: 1
params:
  - family: weights
    transform: identity
"""


def run(out: Path, *, float_epochs: int, qat_epochs: int) -> dict[str, dict[str, float]]:
    """Train, quantise and fine-tune; return accuracies by recipe name."""
    data = digits_data()
    data_path = out / "digits.safetensors"
    save_file(
        {
            "inputs": data.inputs,
            "targets": data.targets,
            "val_inputs": data.val_inputs,
            "val_targets": data.val_targets,
        }
        if data.val_inputs is not None and data.val_targets is not None
        else {},
        str(data_path),
    )
    float_net = train_float(data, float_epochs)
    model_path = out / "mlp.pt"
    torch.save(float_net, model_path)
    results: dict[str, dict[str, float]] = {}
    for name, text in RECIPES.items():
        recipe_text = text.format() + FINETUNE.format(epochs=qat_epochs)
        recipe_path = out / f"{name}.yaml"
        recipe_path.write_text(recipe_text)
        recipe = parse_recipe(recipe_text, str(recipe_path))
        loaded = load_network(model_path)
        assert loaded.module is not None  # a whole-module pickle, not tensor mode
        plan = plan_network(loaded.module, recipe)
        T_net = patch_network(loaded.module, plan)
        target = CheckpointTarget(
            out / f"mlp.{name}.patched.safetensors",
            loaded.source,
            recipe.text,
            loaded.network_bytes,
            (model_path,),
            force=True,
        )
        assert recipe.finetune is not None
        result = finetune(
            T_net,
            plan,
            recipe.finetune,
            load_data(data_path),
            float_net=loaded.module,
            target=target,
        )
        results[name] = {k: 100.0 * float(v or 0.0) for k, v in result.metrics.items()}
    return results


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="A tiny run (seconds).")
    parser.add_argument("--out", type=Path, default=None, help="Folder for the files.")
    parser.add_argument("--float-epochs", type=int, default=30)
    parser.add_argument("--qat-epochs", type=int, default=20)
    parser.add_argument("--json", action="store_true", help="Print the accuracies as JSON.")
    args = parser.parse_args(argv)
    # A network this small runs faster on one thread than it pays for sharing work.
    torch.set_num_threads(1)
    out = args.out or Path(tempfile.mkdtemp(prefix="rockq-digits-"))
    out.mkdir(parents=True, exist_ok=True)
    float_epochs, qat_epochs = (2, 1) if args.quick else (args.float_epochs, args.qat_epochs)
    results = run(out, float_epochs=float_epochs, qat_epochs=qat_epochs)
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        print(f"{'weights':<10}{'float':>8}{'post-training':>16}{'fine-tuned':>13}")
        for name, acc in results.items():
            print(
                f"{name:<10}{acc['float']:>7.2f}%{acc['post_training']:>15.2f}%"
                f"{acc['finetuned']:>12.2f}%"
            )
        print(f"files in {out}")
    return results


if __name__ == "__main__":
    main()
